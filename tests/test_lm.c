/* Language model: whole-model gradient checks (random direction and single coordinates) for
   post-LN and pre-LN, tied and untied heads; pattern rules; learning; determinism; the
   optimizer and schedules. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../acmoe.h"
#include "harness.h"

static acmoe_lm_desc tiny_desc(const char *pattern, int pre_ln, int untied) {
    acmoe_lm_desc d;
    memset(&d, 0, sizeof d);
    d.vocab = 11;
    d.d_model = 8;
    d.n_heads = 2;
    d.seq_len = 5;
    d.batch = 2;
    d.pattern = pattern;
    d.d_ff = 6;
    d.n_experts = 4;
    d.top_k = 2;
    d.activation = ACMOE_ACT_GELU; /* smooth, for finite differences */
    d.pre_ln = pre_ln;
    d.untied_head = untied;
    d.seed = 3;
    return d;
}

static void tiny_batch(int32_t *tokens, int32_t *targets, int n, uint64_t seed) {
    acmoe_rng rng;
    int i;
    acmoe_rng_seed(&rng, seed);
    for (i = 0; i < n; i++) tokens[i] = (int32_t)acmoe_rng_below(&rng, 11), targets[i] = (int32_t)acmoe_rng_below(&rng, 11);
}

/* The routing of every MoE layer, to skip perturbations that change it. */
static void lm_routing(acmoe_lm *lm, int *out, int max) {
    int l, p, at = 0;
    memset(out, 0, sizeof(int) * (size_t)max);
    for (l = 0; l < acmoe_lm_n_layers(lm); l++) {
        acmoe_moe_stats st = acmoe_moe_last_stats(acmoe_lm_moe(lm, l));
        for (p = 0; p < st.pairs && at + 2 <= max; p++) out[at++] = st.pair_token[p], out[at++] = st.pair_expert[p];
    }
}

/* The tiny vision encoder: 2 images of 5 patches of 3 floats, 4 classes. */
static acmoe_lm_desc tiny_vision_desc(const char *pattern, int pre_ln) {
    acmoe_lm_desc d = tiny_desc(pattern, pre_ln, 0);
    d.n_classes = 4;
    d.patch_dim = 3;
    return d;
}

/* A vision batch made from a token batch: patch i from token i, image b's label from its
   first target. */
static void tiny_images(const int32_t *tok, const int32_t *tgt, float *patches, int32_t *labels) {
    int i, c;
    for (i = 0; i < 10; i++)
        for (c = 0; c < 3; c++) patches[i * 3 + c] = sinf((float)(tok[i] * (c + 1) + c));
    labels[0] = tgt[0] % 4, labels[1] = tgt[5] % 4;
}

/* The loss of a token batch, or of the images made from it for a vision encoder. */
static double lm_loss(acmoe_lm *lm, acmoe_ctx *ctx, const int32_t *tok, const int32_t *tgt, int *routing) {
    float loss = NAN, patches[30];
    int32_t labels[2];
    acmoe_status s;
    if (acmoe_lm_settings(lm).n_classes) {
        tiny_images(tok, tgt, patches, labels);
        s = acmoe_vision_forward(lm, ctx, patches, labels, 2, 0, &loss);
    } else {
        s = acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 0, &loss);
    }
    if (s != ACMOE_OK) return NAN;
    if (routing) lm_routing(lm, routing, 512);
    return loss;
}

/* A Swin-style backbone: 2 images of 4 x 4 patches of 3 floats, windows of 2, 4 classes,
   stages of the pattern's '|'. */
static acmoe_lm_desc tiny_swin_desc(const char *pattern) {
    acmoe_lm_desc d = tiny_vision_desc(pattern, 1);
    d.seq_len = 16;
    d.window = 2;
    return d;
}

/* The loss of the Swin images: patches drawn once from a fixed generator, labels from the
   targets. */
static double swin_loss(acmoe_lm *lm, acmoe_ctx *ctx, const int32_t *tok, const int32_t *tgt, int *routing) {
    float loss = NAN, patches[2 * 16 * 3];
    int32_t labels[2];
    acmoe_rng rng;
    int i;
    (void)tok;
    acmoe_rng_seed(&rng, 17);
    for (i = 0; i < 2 * 16 * 3; i++) patches[i] = acmoe_rng_normal(&rng);
    labels[0] = tgt[0] % 4, labels[1] = tgt[5] % 4;
    if (acmoe_vision_forward(lm, ctx, patches, labels, 2, 0, &loss) != ACMOE_OK) return NAN;
    if (routing) lm_routing(lm, routing, 512);
    return loss;
}

typedef double (*loss_fn)(acmoe_lm *lm, acmoe_ctx *ctx, const int32_t *tok, const int32_t *tgt, int *routing);

static void check_gradients_of(const acmoe_lm_desc *d, loss_fn lm_loss);

/* Central differences along a random direction of all parameters, and along single ones. */
static void check_gradients(const acmoe_lm_desc *d) { check_gradients_of(d, lm_loss); }

static void check_gradients_of(const acmoe_lm_desc *d, loss_fn lm_loss) {
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    int32_t tok[10], tgt[10];
    int base_routing[512], routing[512], i, bad = 0, checked = 0;
    float *params, *grads, *saved, *dir;
    size_t n, c;
    double dot = 0.0;
    const float h = 1e-2f;
    acmoe_rng rng;
    CHECK_STATUS(acmoe_lm_create(&lm, d), ACMOE_OK);
    if (!lm) return;
    n = acmoe_lm_param_count(lm);
    params = acmoe_lm_params(lm);
    grads = acmoe_lm_grads(lm);
    saved = (float *)malloc(sizeof(float) * n);
    dir = (float *)malloc(sizeof(float) * n);
    tiny_batch(tok, tgt, 10, 5);
    CHECK(isfinite(lm_loss(lm, ctx, tok, tgt, NULL))); /* re-projects embeddings, measures AC */
    acmoe_lm_freeze_ac_weights(lm, 1);
    CHECK(isfinite(lm_loss(lm, ctx, tok, tgt, base_routing)));
    memcpy(saved, params, sizeof(float) * n);
    acmoe_lm_zero_grad(lm);
    CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
    acmoe_rng_seed(&rng, 9);
    for (c = 0; c < n; c++) dir[c] = acmoe_rng_normal(&rng), dot += (double)dir[c] * grads[c];
    { /* the largest step along dir that leaves every routing decision as it was */
        static const float steps[4] = {1e-3f, 3e-4f, 1e-4f, 3e-5f};
        double numeric = NAN;
        int k;
        for (k = 0; k < 4 && isnan(numeric); k++) {
            double up, down;
            int same;
            for (c = 0; c < n; c++) params[c] = saved[c] + steps[k] * dir[c];
            up = lm_loss(lm, ctx, tok, tgt, routing);
            same = memcmp(routing, base_routing, sizeof routing) == 0;
            for (c = 0; c < n; c++) params[c] = saved[c] - steps[k] * dir[c];
            down = lm_loss(lm, ctx, tok, tgt, routing);
            same &= memcmp(routing, base_routing, sizeof routing) == 0;
            if (same) numeric = (up - down) / (2.0 * steps[k]);
        }
        memcpy(params, saved, sizeof(float) * n);
        CHECKF(fabs(numeric - dot) <= 2e-2 * fabs(dot) + 2e-3, "direction: numeric %.6g, analytic %.6g", numeric, dot);
    }
    for (i = 0; i < 300; i++) { /* single coordinates spread over the whole buffer */
        double up, down, numeric;
        c = (size_t)acmoe_rng_below(&rng, (uint32_t)n);
        params[c] = saved[c] + h;
        up = lm_loss(lm, ctx, tok, tgt, routing);
        memcpy(params, saved, sizeof(float) * n);
        if (memcmp(routing, base_routing, sizeof routing) != 0) continue;
        params[c] = saved[c] - h;
        down = lm_loss(lm, ctx, tok, tgt, routing);
        memcpy(params, saved, sizeof(float) * n);
        if (memcmp(routing, base_routing, sizeof routing) != 0) continue;
        numeric = (up - down) / (2.0 * h);
        checked++;
        if (fabs(numeric - grads[c]) > 2e-3 + 3e-2 * fmax(fabs(numeric), fabs(grads[c]))) {
            fprintf(stderr, "    param[%zu]: numeric %.6g, analytic %.6g\n", c, numeric, grads[c]);
            bad++;
        }
    }
    CHECKF(bad == 0 && checked > 250, "%d of %d coordinates wrong", bad, checked);
    free(saved), free(dir);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

static void check_lm_gradients(const char *pattern, int pre_ln, int untied) {
    acmoe_lm_desc d = tiny_desc(pattern, pre_ln, untied);
    check_gradients(&d);
}

static void test_lm_grad_post_ln(void) { check_lm_gradients("gfc", 0, 0); }
static void test_lm_grad_pre_ln_untied(void) { check_lm_gradients("gcc", 1, 1); }
static void test_lm_grad_soft_moe(void) { check_lm_gradients("gmc", 0, 0); }

/* The vision encoder: post-LN with AC; pre-LN with Soft MoE over each image, then AC; and
   Soft MoE followed by the paper's AC variant of it. */
/* The Swin-style backbone: two stages (4 x 4 patches in windows of 2, the second block's
   shifted; then one window of 2 x 2 after the merge), Swin-MoE's gate, and its AC variant
   after it in the second stage; and a dense first stage before Soft MoE. */
static void test_swin_gradients(void) {
    acmoe_lm_desc d = tiny_swin_desc("gt|tw");
    check_gradients_of(&d, swin_loss);
    d = tiny_swin_desc("ff|nf");
    check_gradients_of(&d, swin_loss);
}

/* Every coordinate of the Swin-only tensors (the relative position biases, made large
   enough to matter, and the patch merging), against central differences. */
static void test_swin_tensor_gradients(void) {
    static const char *const names[] = {"layers.0.attn.rel_bias", "layers.1.attn.rel_bias", "layers.2.attn.rel_bias",
                                        "merges.0.norm.weight",   "merges.0.norm.bias",     "merges.0.reduction.weight",
                                        "patch_norm.weight",      "patch_norm.bias"};
    acmoe_lm_desc d = tiny_swin_desc("ff|ff");
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    int32_t tok[10], tgt[10];
    acmoe_rng rng;
    size_t t, i, count = 0;
    int bad = 0, checked = 0;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    if (!lm) return;
    tiny_batch(tok, tgt, 10, 5);
    acmoe_rng_seed(&rng, 23);
    for (t = 0; t < 3; t++) {
        float *bias = acmoe_lm_tensor(lm, names[t], &count);
        CHECK(bias != NULL && count == 9 * (t < 2 ? 2u : 4u));
        for (i = 0; bias && i < count; i++) bias[i] = acmoe_rng_normal(&rng);
    }
    CHECK(isfinite(swin_loss(lm, ctx, tok, tgt, NULL)));
    acmoe_lm_zero_grad(lm);
    CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
    for (t = 0; t < sizeof names / sizeof names[0]; t++) {
        float *p = acmoe_lm_tensor(lm, names[t], &count);
        const float *g = p ? acmoe_lm_grads(lm) + (p - acmoe_lm_params(lm)) : NULL;
        for (i = 0; p && i < count; i++) {
            const float kept = p[i], h = 1e-2f;
            double up, down, numeric;
            p[i] = kept + h, up = swin_loss(lm, ctx, tok, tgt, NULL);
            p[i] = kept - h, down = swin_loss(lm, ctx, tok, tgt, NULL);
            p[i] = kept;
            numeric = (up - down) / (2.0 * h);
            checked++;
            if (fabs(numeric - g[i]) > 2e-4 + 2e-2 * fabs(numeric)) {
                fprintf(stderr, "    %s[%zu]: numeric %.6g, analytic %.6g\n", names[t], i, numeric, g[i]);
                bad++;
            }
        }
    }
    CHECKF(bad == 0 && checked == 18 + 18 + 36 + 32 + 32 + 16 * 32 + 8 + 8, "%d of %d coordinates wrong",
           bad, checked);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

/* What a Swin backbone refuses: stages without windows, an AC layer first in its stage
   (labels start afresh), grids that are not square, that do not halve or do not hold whole
   windows, post-LN, empty stages, and language models. */
/* A Swin backbone saves and loads with its stages and windows, gives the same loss, and the
   same bits on one thread and two. */
static void test_swin_checkpoint(void) {
    acmoe_lm_desc d = tiny_swin_desc("gt|tw");
    acmoe_lm *lm = NULL, *loaded = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    int32_t tok[10], tgt[10];
    tiny_batch(tok, tgt, 10, 5);
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_save(lm, "build/swin.safetensors"), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_load(&loaded, "build/swin.safetensors"), ACMOE_OK);
    if (lm && loaded) {
        CHECK(acmoe_lm_settings(loaded).window == 2 && !strcmp(acmoe_lm_settings(loaded).pattern, "gt|tw"));
        CHECK(swin_loss(lm, ctx, tok, tgt, NULL) == swin_loss(loaded, ctx, tok, tgt, NULL));
    }
    if (lm && loaded) { /* and the same bits on two threads, gradients included */
        acmoe_ctx *two = test_context(2, 0, 0, 0);
        const size_t n = acmoe_lm_param_count(lm);
        CHECK(swin_loss(lm, ctx, tok, tgt, NULL) == swin_loss(loaded, two, tok, tgt, NULL));
        acmoe_lm_zero_grad(lm), acmoe_lm_zero_grad(loaded);
        swin_loss(lm, ctx, tok, tgt, NULL), swin_loss(loaded, two, tok, tgt, NULL);
        CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_backward(loaded, two), ACMOE_OK);
        CHECK(memcmp(acmoe_lm_grads(lm), acmoe_lm_grads(loaded), sizeof(float) * n) == 0);
        acmoe_ctx_destroy(two);
    }
    acmoe_lm_destroy(lm), acmoe_lm_destroy(loaded);
    acmoe_ctx_destroy(ctx);
    remove("build/swin.safetensors");
}

static void test_swin_rules(void) {
    static const struct {
        const char *pattern;
        int seq_len, window, pre_ln, classes;
        acmoe_status want;
    } cases[] = {
        {"gt|tw", 16, 2, 1, 4, ACMOE_OK},      {"gt|tw", 16, 0, 1, 4, ACMOE_ERR_ARG},
        {"gt|wt", 16, 2, 1, 4, ACMOE_ERR_ARG}, {"gt|tw", 15, 2, 1, 4, ACMOE_ERR_SHAPE},
        {"gg|gg|gg", 36, 3, 1, 4, ACMOE_ERR_SHAPE}, {"gg|gg", 36, 4, 1, 4, ACMOE_ERR_SHAPE},
        {"gt|tw", 16, 2, 0, 4, ACMOE_ERR_ARG}, {"gt||tw", 16, 2, 1, 4, ACMOE_ERR_ARG},
        {"gt|", 16, 2, 1, 4, ACMOE_ERR_ARG},   {"gt", 16, 2, 1, 0, ACMOE_ERR_ARG},
        {"gg|gg", 36, 3, 1, 4, ACMOE_OK},      {"gg", 16, 32, 1, 4, ACMOE_ERR_SHAPE},
    };
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        acmoe_lm_desc d = tiny_swin_desc(cases[i].pattern);
        acmoe_lm *lm = NULL;
        acmoe_status s;
        d.seq_len = cases[i].seq_len, d.window = cases[i].window, d.pre_ln = cases[i].pre_ln;
        d.n_classes = cases[i].classes;
        if (!d.n_classes) d.patch_dim = 0;
        s = acmoe_lm_create(&lm, &d);
        CHECKF(s == cases[i].want, "%s, %d patches, window %d: %s", cases[i].pattern, cases[i].seq_len,
               cases[i].window, acmoe_status_string(s));
        if (lm && s == ACMOE_OK) {
            CHECK(acmoe_lm_n_layers(lm) == 4);
            CHECK(acmoe_moe_settings(acmoe_lm_moe(lm, 3)).d_model == 2 * d.d_model); /* the second stage */
        }
        acmoe_lm_destroy(lm);
    }
}

static void test_vision_gradients(void) {
    acmoe_lm_desc d = tiny_vision_desc("gfc", 0);
    acmoe_moe_desc m;
    check_gradients(&d);
    d = tiny_vision_desc("gmc", 1);
    check_gradients(&d);
    d = tiny_vision_desc("gma", 1);
    check_gradients(&d);
    memset(&m, 0, sizeof m);
    CHECK_STATUS(acmoe_moe_router_preset(&m, 'a'), ACMOE_OK);
    CHECK(m.router_input == ACMOE_INPUT_AC && m.router_select == ACMOE_SELECT_SOFT &&
          m.soft_input == ACMOE_SOFT_NORMALIZED && m.ac_mix_labels && m.ac.eps == 0.35f && m.ac.clip == 5.0f &&
          m.ac.scaling == ACMOE_AC_SCALE_POSTCLIP_MEAN);
    d = tiny_vision_desc("gna", 1);
    check_gradients(&d);
}

/* The loss of images made of patches [2][seq][3] with labels 1 and 2, and the routing. */
static double patch_loss(acmoe_lm *lm, acmoe_ctx *ctx, const float *patches, int *routing) {
    static const int32_t labels[2] = {1, 2};
    float loss = NAN;
    if (acmoe_vision_forward(lm, ctx, patches, labels, 2, 0, &loss) != ACMOE_OK) return NAN;
    lm_routing(lm, routing, 512);
    return loss;
}

/* acmoe_vision_input_grad against central differences of the loss along a random direction
   of the patches and along single patch values, where no routing decision moves. */
static void check_input_gradient(const acmoe_lm_desc *d) {
    const int count = 2 * d->seq_len * 3;
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    float patches[2 * 16 * 3], grad[2 * 16 * 3], dir[2 * 16 * 3], moved[2 * 16 * 3];
    int base[512], routing[512], i, q, checked = 0, bad = 0;
    double dot = 0.0, numeric = NAN;
    acmoe_rng rng;
    CHECK_STATUS(acmoe_lm_create(&lm, d), ACMOE_OK);
    if (!lm) return;
    acmoe_rng_seed(&rng, 23);
    for (i = 0; i < count; i++) patches[i] = acmoe_rng_normal(&rng), dir[i] = acmoe_rng_normal(&rng);
    CHECK_STATUS(acmoe_vision_input_grad(lm, ctx, grad), ACMOE_ERR_ARG); /* no backward yet */
    CHECK(isfinite(patch_loss(lm, ctx, patches, base)));
    acmoe_lm_freeze_ac_weights(lm, 1);
    CHECK(isfinite(patch_loss(lm, ctx, patches, base)));
    CHECK_STATUS(acmoe_vision_input_grad(lm, ctx, grad), ACMOE_ERR_ARG); /* a forward call, no backward */
    CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
    CHECK_STATUS(acmoe_vision_input_grad(lm, ctx, grad), ACMOE_OK);
    for (i = 0; i < count; i++) dot += (double)dir[i] * grad[i];
    for (q = 0; q < 4 && isnan(numeric); q++) {
        const float step = 1e-3f / (float)(1 << (2 * q));
        double up, down;
        int same;
        for (i = 0; i < count; i++) moved[i] = patches[i] + step * dir[i];
        up = patch_loss(lm, ctx, moved, routing), same = !memcmp(routing, base, sizeof routing);
        for (i = 0; i < count; i++) moved[i] = patches[i] - step * dir[i];
        down = patch_loss(lm, ctx, moved, routing), same &= !memcmp(routing, base, sizeof routing);
        if (same) numeric = (up - down) / (2.0 * step);
    }
    CHECKF(fabs(numeric - dot) <= 2e-2 * fabs(dot) + 2e-3, "direction: numeric %.6g, analytic %.6g", numeric, dot);
    for (i = 0; i < count; i++) {
        const float h = 1e-2f;
        double up, down;
        memcpy(moved, patches, sizeof(float) * (size_t)count);
        moved[i] = patches[i] + h, up = patch_loss(lm, ctx, moved, routing);
        if (memcmp(routing, base, sizeof routing)) continue;
        moved[i] = patches[i] - h, down = patch_loss(lm, ctx, moved, routing);
        if (memcmp(routing, base, sizeof routing)) continue;
        checked++;
        numeric = (up - down) / (2.0 * h);
        if (fabs(numeric - grad[i]) > 2e-3 + 3e-2 * fmax(fabs(numeric), fabs(grad[i]))) {
            fprintf(stderr, "    patch value %d: numeric %.6g, analytic %.6g\n", i, numeric, grad[i]);
            bad++;
        }
    }
    CHECKF(bad == 0 && checked > count / 2, "%d of %d patch values wrong", bad, checked);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

/* The input gradient of a post-LN encoder with AC, a pre-LN one with Soft MoE and its AC
   variant, and a Swin-style backbone with Swin-MoE's gate and its AC variant. */
static void test_vision_input_gradient(void) {
    acmoe_lm_desc d = tiny_vision_desc("gfc", 0);
    check_input_gradient(&d);
    d = tiny_vision_desc("gma", 1);
    check_input_gradient(&d);
    d = tiny_swin_desc("gt|tw");
    check_input_gradient(&d);
}

/* Patches come out row by row, each in the image's order; sides the patch does not divide
   are refused. */
static void test_image_patches(void) {
    float image[4 * 6 * 2], patches[6 * 8];
    int i, p, r, x, c, bad = 0;
    for (i = 0; i < 4 * 6 * 2; i++) image[i] = (float)i;
    CHECK_STATUS(acmoe_image_patches(image, 4, 6, 2, 2, patches), ACMOE_OK);
    for (p = 0; p < 6; p++) /* patch p: grid row p / 3, column p % 3 */
        for (r = 0; r < 2; r++)
            for (x = 0; x < 2; x++)
                for (c = 0; c < 2; c++)
                    bad += patches[p * 8 + (r * 2 + x) * 2 + c] != image[((p / 3 * 2 + r) * 6 + p % 3 * 2 + x) * 2 + c];
    CHECK(bad == 0);
    CHECK_STATUS(acmoe_image_patches(image, 4, 6, 2, 4, patches), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_image_patches(NULL, 4, 6, 2, 2, patches), ACMOE_ERR_NULL);
}

/* Two images of noise with one patch, anywhere, carrying its class's mark: 3 in the class's
   channel, or -2 in every channel for class 3. */
static void marked_images(acmoe_rng *rng, float *patches, int32_t *labels) {
    int b, i, at;
    for (b = 0; b < 2; b++) {
        labels[b] = (int32_t)acmoe_rng_below(rng, 4);
        for (i = 0; i < 15; i++) patches[b * 15 + i] = 0.3f * acmoe_rng_normal(rng);
        at = (int)acmoe_rng_below(rng, 5);
        for (i = 0; i < 3; i++) patches[b * 15 + at * 3 + i] += labels[b] == 3 ? -2.0f : i == labels[b] ? 3.0f : 0.0f;
    }
}

/* Each image's class is the mark of one of its patches; the encoder learns it, an image's
   logits do not depend on the other image of the batch (Soft MoE groups each image by
   itself), and the calls meant for language models refuse it. */
static void test_vision_learns(void) {
    acmoe_lm_desc d = tiny_vision_desc("gm", 1);
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(2, 0, 0, 0);
    acmoe_optim_desc o;
    acmoe_rng rng;
    float patches[30], first[4], loss = 0.0f, start_loss = 0.0f;
    int32_t labels[2], tok[10];
    int step, b, i, correct = 0;
    memset(&o, 0, sizeof o);
    o.lr = 1e-2f;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    if (!lm) return;
    acmoe_rng_seed(&rng, 21);
    for (step = 0; step < 300; step++) {
        marked_images(&rng, patches, labels);
        CHECK_STATUS(acmoe_vision_forward(lm, ctx, patches, labels, 2, 1, &loss), ACMOE_OK);
        if (step == 0) start_loss = loss;
        acmoe_lm_zero_grad(lm);
        CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_step(lm, ctx, &o, NULL), ACMOE_OK);
    }
    for (step = 0; step < 50; step++) { /* 100 new images */
        marked_images(&rng, patches, labels);
        CHECK_STATUS(acmoe_vision_forward(lm, ctx, patches, NULL, 2, 0, NULL), ACMOE_OK);
        for (b = 0; b < 2; b++) {
            const float *z = acmoe_lm_logits(lm) + b * 4;
            int best = 0;
            for (i = 1; i < 4; i++) best = z[i] > z[best] ? i : best;
            correct += best == labels[b];
        }
    }
    CHECKF(correct >= 90 && loss < 0.5f * start_loss, "%d of 100 right, loss %g from %g", correct, loss, start_loss);
    CHECK_STATUS(acmoe_vision_forward(lm, ctx, patches, NULL, 2, 0, NULL), ACMOE_OK);
    memcpy(first, acmoe_lm_logits(lm), sizeof first);
    for (i = 15; i < 30; i++) patches[i] += 1.0f;
    CHECK_STATUS(acmoe_vision_forward(lm, ctx, patches, NULL, 2, 0, NULL), ACMOE_OK);
    CHECK(memcmp(first, acmoe_lm_logits(lm), sizeof first) == 0);
    tiny_batch(tok, tok, 10, 3);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, NULL, 2, 5, 0, NULL), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, 5, 0), ACMOE_ERR_ARG);
    labels[0] = 4;
    CHECK_STATUS(acmoe_vision_forward(lm, ctx, patches, labels, 2, 0, &loss), ACMOE_ERR_ARG);
    labels[0] = 0, patches[7] = NAN;
    CHECK_STATUS(acmoe_vision_forward(lm, ctx, patches, labels, 2, 0, &loss), ACMOE_ERR_NONFINITE);
    CHECK_STATUS(acmoe_vision_forward(lm, ctx, patches, labels, 3, 0, &loss), ACMOE_ERR_SHAPE);
    acmoe_lm_destroy(lm);
    d = tiny_desc("gm", 0, 0);
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    CHECK_STATUS(acmoe_vision_forward(lm, ctx, patches, labels, 2, 0, &loss), ACMOE_ERR_ARG);
    acmoe_lm_destroy(lm);
    d = tiny_vision_desc("gm", 0);
    d.patch_dim = 0;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_ERR_SHAPE);
    acmoe_ctx_destroy(ctx);
}

/* With a Soft MoE layer a position's logits depend on no later token: changing the last
   two positions, or running only the first three, leaves the first three positions' logits
   as they were, bit for bit. (Not with AC layers: their weights are statistics of the whole
   call.) */
static void test_lm_soft_moe_is_causal(void) {
    acmoe_lm_desc d = tiny_desc("gmg", 0, 0);
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    int32_t tok[10], short_tok[6];
    float first[10 * 11];
    int b, t, same_prefix = 1, later_changed = 0;
    tiny_batch(tok, tok, 10, 12);
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, NULL, 2, 5, 0, NULL), ACMOE_OK);
    memcpy(first, acmoe_lm_logits(lm), sizeof first);
    for (b = 0; b < 2; b++) tok[b * 5 + 3] = (tok[b * 5 + 3] + 1) % 11, tok[b * 5 + 4] = (tok[b * 5 + 4] + 5) % 11;
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, NULL, 2, 5, 0, NULL), ACMOE_OK);
    for (b = 0; b < 2; b++)
        for (t = 0; t < 5; t++) {
            int same = memcmp(first + (b * 5 + t) * 11, acmoe_lm_logits(lm) + (b * 5 + t) * 11, sizeof(float) * 11) == 0;
            if (t < 3) same_prefix &= same;
            else later_changed += !same;
        }
    CHECK(same_prefix && later_changed == 4);
    for (b = 0; b < 2; b++) memcpy(short_tok + b * 3, tok + b * 5, sizeof(int32_t) * 3);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, short_tok, NULL, 2, 3, 0, NULL), ACMOE_OK);
    for (b = 0; b < 2; b++)
        CHECK(memcmp(first + b * 5 * 11, acmoe_lm_logits(lm) + b * 3 * 11, sizeof(float) * 3 * 11) == 0);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

static void test_lm_patterns(void) {
    acmoe_lm_desc d = tiny_desc("cgg", 0, 0);
    acmoe_lm *lm = NULL;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_ERR_ARG); /* the first MoE layer cannot be AC */
    d.pattern = "fcg";
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_ERR_ARG); /* a dense layer gives no labels */
    d.pattern = "gqz";
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_ERR_ARG);
    d.pattern = "";
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_ERR_ARG);
    d.pattern = "gfcfcf";
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    CHECK(acmoe_lm_n_layers(lm) == 6 && acmoe_lm_moe(lm, 6) == NULL && acmoe_lm_moe(lm, 5) != NULL);
    acmoe_lm_destroy(lm);
    d = tiny_desc("ggc", 0, 0);
    d.n_heads = 3; /* does not divide d_model */
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_ERR_SHAPE);
    d = tiny_desc("ggc", 0, 0);
    d.dropout = 1.0f;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_ERR_ARG);
    CHECK(lm == NULL);
}

/* The model's MoE options reach its layers, defaults resolved: AC layers ('c') take the
   model's AC options, AC Soft MoE layers ('a') the preset's own, and Soft MoE layers leave
   out capacity and the auxiliary losses; both kinds of Soft MoE layer group by position in a
   language model and by image in a vision encoder, so that every image gets its own slots. */
static void test_lm_moe_settings(void) {
    acmoe_lm_desc d = tiny_vision_desc("gma", 1);
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_moe_desc g, c, a, none = acmoe_moe_settings(NULL);
    int32_t tok[10], tgt[10], labels[2];
    float patches[10 * 3], loss;
    int l;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    tiny_batch(tok, tgt, 10, 5);
    tiny_images(tok, tgt, patches, labels);
    CHECK_STATUS(acmoe_vision_forward(lm, ctx, patches, labels, 2, 1, &loss), ACMOE_OK);
    for (l = 1; l < 3; l++) {
        const acmoe_moe *layer = acmoe_lm_moe(lm, l);
        CHECK(acmoe_moe_settings(layer).group == ACMOE_GROUP_SEQUENCE);
        CHECK(acmoe_moe_last_stats(layer).tokens_per_expert[0] == 2); /* a slot for each image */
    }
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
    d = tiny_desc("gca", 0, 0);
    CHECK(none.d_model == 0 && none.n_experts == 0);
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    if (!lm) return;
    g = acmoe_moe_settings(acmoe_lm_moe(lm, 0)), c = acmoe_moe_settings(acmoe_lm_moe(lm, 1));
    CHECK(g.router_select == ACMOE_SELECT_TOPK && g.d_model == 8 && g.d_ff == 6 && g.n_experts == 4 && g.top_k == 2);
    CHECK(g.activation == ACMOE_ACT_GELU && g.usmoe_rho == 0.5f && g.proj_dim == 8 && g.soft_slots == 1 &&
          g.balance_temperature == 1.0f && g.max_tokens == 10);
    CHECK(c.router_input == ACMOE_INPUT_AC && c.ac.eps == 1e-4f && c.ac.clip == 10.0f &&
          c.ac.scaling == ACMOE_AC_SCALE_PER_FEATURE && c.ac.dispersion == ACMOE_AC_DISP_MAD && !c.ac_weight_experts);
    acmoe_lm_destroy(lm);
    d.moe.ac.eps = 0.2f, d.moe.ac.clip = 3.0f, d.moe.ac.scaling = ACMOE_AC_SCALE_PRECLIP_MEAN, d.moe.ac.robust = 1;
    d.moe.ac_weight_experts = 1, d.moe.usmoe_rho = 0.25f, d.moe.balance_temperature = 0.3f;
    d.moe.balance_alpha = 0.01f, d.moe.z_loss = 0.001f, d.moe.capacity = 1.5f;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    if (!lm) return;
    g = acmoe_moe_settings(acmoe_lm_moe(lm, 0)), c = acmoe_moe_settings(acmoe_lm_moe(lm, 1));
    a = acmoe_moe_settings(acmoe_lm_moe(lm, 2));
    CHECK(g.usmoe_rho == 0.25f && g.balance_temperature == 0.3f && g.balance_alpha == 0.01f && g.z_loss == 0.001f &&
          g.capacity == 1.5f);
    CHECK(a.balance_alpha == 0.0f && a.z_loss == 0.0f && a.capacity == 0.0f); /* Soft MoE has no pairs */
    CHECK(c.ac.eps == 0.2f && c.ac.clip == 3.0f && c.ac.scaling == ACMOE_AC_SCALE_PRECLIP_MEAN && c.ac.robust &&
          c.ac_weight_experts && !c.ac_mix_labels);
    CHECK(a.router_select == ACMOE_SELECT_SOFT && a.group == ACMOE_GROUP_POSITION && a.ac.eps == 0.35f &&
          a.ac.clip == 5.0f && a.ac.scaling == ACMOE_AC_SCALE_POSTCLIP_MEAN && a.ac.robust && a.ac_mix_labels);
    acmoe_lm_destroy(lm);
}

/* Bad calls are refused and change nothing. */
static void test_lm_bad_calls(void) {
    acmoe_lm_desc d = tiny_desc("ggc", 0, 0);
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    int32_t tok[10], tgt[10];
    float loss = 0.0f;
    tiny_batch(tok, tgt, 10, 1);
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_ERR_ARG); /* no forward yet */
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 3, 5, 1, &loss), ACMOE_ERR_SHAPE); /* batch > 2 */
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 6, 1, &loss), ACMOE_ERR_SHAPE); /* seq > 5 */
    tok[3] = 11;
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, &loss), ACMOE_ERR_ARG); /* token out of range */
    tok[3] = 1;
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, NULL, 1, 3, 0, NULL), ACMOE_OK); /* inference only */
    CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, &loss), ACMOE_OK);
    tgt[9] = -1;
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, &loss), ACMOE_ERR_ARG); /* refused ... */
    CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK); /* ... and the previous call still stands */
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

/* A few hundred AdamW steps learn a fixed batch: the loss falls far below log(vocab). */
static void test_lm_learns(void) {
    acmoe_lm_desc d = tiny_desc("ggc", 0, 0);
    acmoe_optim_desc opt;
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    int32_t tok[10], tgt[10];
    float loss = 0.0f, first = 0.0f, norm;
    int step;
    d.activation = ACMOE_ACT_RELU;
    memset(&opt, 0, sizeof opt);
    opt.lr = 1e-2f;
    opt.clip_norm = 1.0f;
    tiny_batch(tok, tgt, 10, 2);
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    for (step = 0; step < 300; step++) {
        CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, &loss), ACMOE_OK);
        if (step == 0) first = loss;
        acmoe_lm_zero_grad(lm);
        CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_step(lm, ctx, &opt, &norm), ACMOE_OK);
    }
    CHECKF(fabsf(first - logf(11.0f)) < 0.5f && loss < 0.2f, "loss %g -> %g", first, loss);
    CHECK(acmoe_lm_steps_taken(lm) == 300);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

/* Same seed, same bits; one thread or two, same bits. */
static void test_lm_deterministic(void) {
    acmoe_lm_desc d = tiny_desc("ggc", 0, 0);
    acmoe_lm *a = NULL, *b = NULL;
    acmoe_ctx *ctx1 = test_context(1, 0, 0, 0), *ctx2 = test_context(2, 0, 0, 0);
    int32_t tok[10], tgt[10];
    float la, lb;
    int step;
    d.dropout = 0.1f;
    tiny_batch(tok, tgt, 10, 4);
    CHECK_STATUS(acmoe_lm_create(&a, &d), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_create(&b, &d), ACMOE_OK);
    for (step = 0; step < 5; step++) {
        CHECK_STATUS(acmoe_lm_forward(a, ctx1, tok, tgt, 2, 5, 1, &la), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_forward(b, ctx2, tok, tgt, 2, 5, 1, &lb), ACMOE_OK);
        CHECK(memcmp(&la, &lb, sizeof la) == 0);
        acmoe_lm_zero_grad(a), acmoe_lm_zero_grad(b);
        CHECK_STATUS(acmoe_lm_backward(a, ctx1), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_backward(b, ctx2), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_step(a, ctx1, NULL, NULL), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_step(b, ctx2, NULL, NULL), ACMOE_OK);
    }
    CHECK(memcmp(acmoe_lm_params(a), acmoe_lm_params(b), sizeof(float) * acmoe_lm_param_count(a)) == 0);
    acmoe_lm_destroy(a), acmoe_lm_destroy(b);
    acmoe_ctx_destroy(ctx1), acmoe_ctx_destroy(ctx2);
}

/* A clock that moves one second a reading: each timed phase with no reading inside it
   lasts exactly one second. */
static double ticks;
static double tick_clock(void) { return ticks += 1.0; }

/* acmoe_lm_last_times: attention timed once a layer in the forward call and once in the
   backward, a forward call starting afresh; routing and experts the layers' stats summed;
   zeros without a clock. */
static void test_lm_last_times(void) {
    acmoe_lm_desc d = tiny_desc("gfc", 0, 0);
    acmoe_ctx_desc cd = acmoe_ctx_defaults();
    acmoe_ctx *timed = NULL, *plain = test_context(1, 0, 0, 0);
    acmoe_lm *lm = NULL;
    acmoe_lm_times t;
    int32_t tok[10], tgt[10];
    double routing = 0.0, experts = 0.0;
    float loss;
    int l;
    cd.n_threads = 1, cd.clock = tick_clock;
    tiny_batch(tok, tgt, 10, 6);
    CHECK_STATUS(acmoe_ctx_create(&timed, &cd), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    t = acmoe_lm_last_times(NULL);
    CHECK(t.attention == 0.0 && t.routing == 0.0 && t.experts == 0.0);
    CHECK_STATUS(acmoe_lm_forward(lm, timed, tok, tgt, 2, 5, 1, &loss), ACMOE_OK);
    CHECK(acmoe_lm_last_times(lm).attention == 3.0);
    CHECK_STATUS(acmoe_lm_backward(lm, timed), ACMOE_OK);
    t = acmoe_lm_last_times(lm);
    CHECKF(t.attention == 6.0, "attention %g ticks", t.attention);
    for (l = 0; l < 3; l++) {
        acmoe_moe_stats st = acmoe_moe_last_stats(acmoe_lm_moe(lm, l));
        CHECK(st.seconds_experts > 0.0);
        routing += st.seconds_routing, experts += st.seconds_experts;
    }
    CHECK(t.routing > 0.0 && t.routing == routing && t.experts == experts);
    CHECK_STATUS(acmoe_lm_forward(lm, timed, tok, tgt, 2, 5, 1, &loss), ACMOE_OK);
    CHECK(acmoe_lm_last_times(lm).attention == 3.0);
    CHECK_STATUS(acmoe_lm_forward(lm, plain, tok, tgt, 2, 5, 1, &loss), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_backward(lm, plain), ACMOE_OK);
    t = acmoe_lm_last_times(lm);
    CHECK(t.attention == 0.0 && t.routing == 0.0 && t.experts == 0.0);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(timed), acmoe_ctx_destroy(plain);
}

/* The first eight AdamW steps of a tiny model follow the recorded losses on every kernel
   path (they agree to about 1e-6; the tolerance leaves room for other compilers). */
static void test_lm_loss_trajectory(void) {
    static const float recorded[8] = {2.356224f, 2.321651f, 2.252711f, 2.181030f,
                                      2.125951f, 2.053988f, 1.985966f, 1.914469f};
    acmoe_lm_desc d = tiny_desc("ggc", 0, 0);
    acmoe_isa isas[ACMOE_ISA_COUNT];
    acmoe_optim_desc opt;
    acmoe_rng rng;
    int32_t tok[10], tgt[10];
    int n_isa = 0, v, i, step;
    for (i = ACMOE_ISA_SCALAR; i < ACMOE_ISA_COUNT; i++)
        if (acmoe_isa_supported((acmoe_isa)i)) isas[n_isa++] = (acmoe_isa)i;
    d.activation = ACMOE_ACT_RELU;
    memset(&opt, 0, sizeof opt);
    opt.lr = 1e-2f;
    acmoe_rng_seed(&rng, 8);
    for (i = 0; i < 10; i++) tok[i] = (int32_t)acmoe_rng_below(&rng, 11), tgt[i] = (int32_t)acmoe_rng_below(&rng, 11);
    for (v = 0; v < n_isa; v++) {
        acmoe_lm *lm = NULL;
        acmoe_ctx *ctx = test_context(1, 0, 0, 0);
        CHECK_STATUS(acmoe_ctx_set_isa(ctx, isas[v]), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
        for (step = 0; step < 8; step++) {
            float loss = 0.0f;
            CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, &loss), ACMOE_OK);
            CHECKF(fabsf(loss - recorded[step]) < 1e-4f, "%s step %d: loss %.6f, recorded %.6f",
                   acmoe_isa_name(isas[v]), step, loss, recorded[step]);
            acmoe_lm_zero_grad(lm);
            CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
            CHECK_STATUS(acmoe_lm_step(lm, ctx, &opt, NULL), ACMOE_OK);
        }
        acmoe_lm_destroy(lm);
        acmoe_ctx_destroy(ctx);
    }
}

static void test_optimizer_schedules(void) {
    acmoe_optim_desc o;
    memset(&o, 0, sizeof o);
    o.lr = 1.0f;
    o.warmup_steps = 4;
    CHECK(acmoe_lr_at(&o, 0) == 0.25f && acmoe_lr_at(&o, 3) == 1.0f && acmoe_lr_at(&o, 100) == 1.0f);
    o.schedule = ACMOE_SCHEDULE_COSINE;
    o.total_steps = 14;
    o.min_lr = 0.1f;
    CHECK(fabsf(acmoe_lr_at(&o, 4) - 1.0f) < 1e-6f && fabsf(acmoe_lr_at(&o, 9) - 0.55f) < 1e-6f);
    CHECK(fabsf(acmoe_lr_at(&o, 14) - 0.1f) < 1e-6f && fabsf(acmoe_lr_at(&o, 50) - 0.1f) < 1e-6f);
    CHECK(fabsf(acmoe_lr_at(NULL, 0) - 7e-4f) < 1e-9f);
}

/* One AdamW step against the formula, decay on weights only, and clipping. */
static void test_optimizer_adamw(void) {
    acmoe_lm_desc d = tiny_desc("g", 0, 0);
    acmoe_optim_desc o;
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    float *p, *g, before_w, before_ln, norm;
    size_t n, i, ln_index = 0;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    n = acmoe_lm_param_count(lm);
    p = acmoe_lm_params(lm);
    g = acmoe_lm_grads(lm);
    for (i = 0; i < n; i++) g[i] = 0.0f;
    /* layout: token embedding [11][8], positions [5][8], w_qkv [24][8], b_qkv [24], w_o [8][8],
       b_o [8], ln1 gain [8] ... */
    ln_index = 11 * 8 + 5 * 8 + 24 * 8 + 24 + 64 + 8;
    g[0] = 3.0f, g[ln_index] = 4.0f; /* norm 5 */
    before_w = p[0], before_ln = p[ln_index];
    memset(&o, 0, sizeof o);
    o.lr = 0.1f;
    o.weight_decay = 0.5f;
    o.clip_norm = 1.0f;
    CHECK_STATUS(acmoe_lm_step(lm, ctx, &o, &norm), ACMOE_OK);
    CHECK(fabsf(norm - 5.0f) < 1e-5f);
    /* first Adam step moves by lr * sign(g); decay adds lr * wd * p on weights only */
    CHECK(fabsf(p[0] - (before_w - 0.1f * (1.0f + 0.5f * before_w))) < 1e-5f);
    CHECK(fabsf(p[ln_index] - (before_ln - 0.1f)) < 1e-5f);
    g[1] = NAN;
    before_w = p[1];
    CHECK_STATUS(acmoe_lm_step(lm, ctx, &o, &norm), ACMOE_ERR_NONFINITE);
    CHECK(p[1] == before_w && acmoe_lm_steps_taken(lm) == 1);
    o.lr = -1.0f;
    CHECK_STATUS(acmoe_lm_step(lm, ctx, &o, NULL), ACMOE_ERR_ARG);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

/* ---- checkpoints ---- */

#define CKPT_PATH "build/test_checkpoint.safetensors"

/* steps AdamW steps of lm on the fixed batch */
static void train_steps(acmoe_lm *lm, acmoe_ctx *ctx, int steps, float *last_loss) {
    int32_t tok[10], tgt[10];
    acmoe_optim_desc o;
    int s;
    memset(&o, 0, sizeof o);
    o.lr = 1e-2f;
    tiny_batch(tok, tgt, 10, 6);
    for (s = 0; s < steps; s++) {
        CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, last_loss), ACMOE_OK);
        acmoe_lm_zero_grad(lm);
        CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_step(lm, ctx, &o, NULL), ACMOE_OK);
    }
}

static unsigned char *read_file(const char *path, long *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *data = NULL;
    *size = 0;
    if (f && fseek(f, 0, SEEK_END) == 0 && (*size = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0) {
        data = (unsigned char *)malloc((size_t)*size);
        if (fread(data, 1, (size_t)*size, f) != (size_t)*size) free(data), data = NULL;
    }
    if (f) fclose(f);
    return data;
}

static void write_file(const char *path, const unsigned char *data, long size) {
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(data, 1, (size_t)size, f) == (size_t)size);
    if (f) fclose(f);
}

/* Save and load: the same configuration, weights, moments, step and generator. */
static void test_checkpoint_round_trip(void) {
    acmoe_lm_desc d = tiny_desc("gfc", 1, 1);
    acmoe_lm *a = NULL, *b = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    float loss;
    size_t n;
    d.dropout = 0.1f;
    d.moe.balance_alpha = 0.01f;
    CHECK_STATUS(acmoe_lm_create(&a, &d), ACMOE_OK);
    train_steps(a, ctx, 2, &loss);
    CHECK_STATUS(acmoe_lm_save(a, CKPT_PATH), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_load(&b, CKPT_PATH), ACMOE_OK);
    if (b) {
        acmoe_lm_desc da = acmoe_lm_settings(a), db = acmoe_lm_settings(b);
        n = acmoe_lm_param_count(a);
        CHECK(acmoe_lm_param_count(b) == n && acmoe_lm_steps_taken(b) == 2);
        CHECK(memcmp(acmoe_lm_params(a), acmoe_lm_params(b), sizeof(float) * n) == 0);
        CHECK(strcmp(da.pattern, db.pattern) == 0 && da.dropout == db.dropout && da.pre_ln == db.pre_ln &&
              da.untied_head == db.untied_head && da.moe.balance_alpha == db.moe.balance_alpha && da.seed == db.seed);
    }
    acmoe_lm_destroy(a), acmoe_lm_destroy(b);
    acmoe_ctx_destroy(ctx);
}

/* A vision encoder saves and loads: the same settings, and the same logits to the bit. */
static void test_checkpoint_vision(void) {
    acmoe_lm_desc d = tiny_vision_desc("gmc", 1);
    acmoe_lm *a = NULL, *b = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_optim_desc o;
    float patches[30], logits[8], loss;
    int32_t tok[10], tgt[10], labels[2];
    memset(&o, 0, sizeof o);
    tiny_batch(tok, tgt, 10, 8);
    tiny_images(tok, tgt, patches, labels);
    CHECK_STATUS(acmoe_lm_create(&a, &d), ACMOE_OK);
    if (!a) return;
    CHECK_STATUS(acmoe_vision_forward(a, ctx, patches, labels, 2, 1, &loss), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_backward(a, ctx), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_step(a, ctx, &o, NULL), ACMOE_OK);
    CHECK_STATUS(acmoe_vision_forward(a, ctx, patches, NULL, 2, 0, NULL), ACMOE_OK);
    memcpy(logits, acmoe_lm_logits(a), sizeof logits);
    CHECK_STATUS(acmoe_lm_save(a, CKPT_PATH), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_load(&b, CKPT_PATH), ACMOE_OK);
    if (b) {
        acmoe_lm_desc db = acmoe_lm_settings(b);
        CHECK(db.n_classes == 4 && db.patch_dim == 3 && db.pre_ln == 1 && strcmp(db.pattern, "gmc") == 0);
        CHECK_STATUS(acmoe_vision_forward(b, ctx, patches, NULL, 2, 0, NULL), ACMOE_OK);
        CHECK(memcmp(logits, acmoe_lm_logits(b), sizeof logits) == 0);
    }
    acmoe_lm_destroy(a), acmoe_lm_destroy(b);
    acmoe_ctx_destroy(ctx);
}

/* Training 3 steps, saving, loading and training 3 more gives the bits of 6 straight steps,
   dropout included (the generator is part of the checkpoint). */
static void test_checkpoint_resume_is_exact(void) {
    acmoe_lm_desc d = tiny_desc("ggc", 0, 0);
    acmoe_lm *straight = NULL, *first = NULL, *resumed = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    float loss_straight = 0.0f, loss_resumed = 0.0f;
    d.dropout = 0.2f;
    CHECK_STATUS(acmoe_lm_create(&straight, &d), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_create(&first, &d), ACMOE_OK);
    train_steps(straight, ctx, 6, &loss_straight);
    train_steps(first, ctx, 3, &loss_resumed);
    CHECK_STATUS(acmoe_lm_save(first, CKPT_PATH), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_load(&resumed, CKPT_PATH), ACMOE_OK);
    if (resumed) {
        train_steps(resumed, ctx, 3, &loss_resumed);
        CHECK(memcmp(&loss_straight, &loss_resumed, sizeof loss_straight) == 0);
        CHECK(memcmp(acmoe_lm_params(straight), acmoe_lm_params(resumed),
                     sizeof(float) * acmoe_lm_param_count(straight)) == 0);
    }
    acmoe_lm_destroy(straight), acmoe_lm_destroy(first), acmoe_lm_destroy(resumed);
    acmoe_ctx_destroy(ctx);
}

/* Every truncation, random damage to the header and a flipped bit of the data give a status
   and no model (a damaged header may still load when it says the same thing). */
static void test_checkpoint_rejects_damage(void) {
    acmoe_lm_desc d = tiny_desc("ggc", 0, 0);
    acmoe_lm *lm = NULL, *loaded = NULL;
    unsigned char *good, *bad;
    long size, len, header;
    acmoe_rng rng;
    int trial, refused = 0;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_save(lm, CKPT_PATH), ACMOE_OK);
    good = read_file(CKPT_PATH, &size);
    CHECK(good && size > 8);
    if (!good) return;
    header = 8 + (long)(good[0] | good[1] << 8 | good[2] << 16);
    bad = (unsigned char *)malloc((size_t)size);
    for (len = 0; len < size; len += len < header + 64 ? 1 : 97) { /* every cut in the header */
        write_file(CKPT_PATH, good, len);
        CHECK_STATUS(acmoe_lm_load(&loaded, CKPT_PATH), ACMOE_ERR_FORMAT);
        CHECK(loaded == NULL);
    }
    acmoe_rng_seed(&rng, 77);
    for (trial = 0; trial < 300; trial++) {
        acmoe_status s;
        memcpy(bad, good, (size_t)size);
        bad[acmoe_rng_below(&rng, (uint32_t)header)] ^= (unsigned char)(1 + acmoe_rng_below(&rng, 255));
        write_file(CKPT_PATH, bad, size);
        s = acmoe_lm_load(&loaded, CKPT_PATH);
        refused += s != ACMOE_OK;
        CHECK(s == ACMOE_OK || s == ACMOE_ERR_FORMAT);
        CHECK((s == ACMOE_OK) == (loaded != NULL));
        acmoe_lm_destroy(loaded);
        loaded = NULL;
    }
    CHECKF(refused > 250, "only %d of 300 damaged headers refused", refused);
    for (trial = 0; trial < 20; trial++) { /* one flipped bit of the data: the checksum */
        memcpy(bad, good, (size_t)size);
        bad[header + (long)acmoe_rng_below(&rng, (uint32_t)(size - header))] ^= (unsigned char)(1u << (trial % 8));
        write_file(CKPT_PATH, bad, size);
        CHECK_STATUS(acmoe_lm_load(&loaded, CKPT_PATH), ACMOE_ERR_FORMAT);
        CHECK(loaded == NULL);
    }
    { /* a file of a format before the earlier one */
        long at = 8;
        memcpy(bad, good, (size_t)size);
        while (at + 10 <= header && memcmp(bad + at, "acmoe-lm-4", 10)) at++;
        CHECK(at + 10 <= header);
        bad[at + 9] = '1';
        write_file(CKPT_PATH, bad, size);
        CHECK_STATUS(acmoe_lm_load(&loaded, CKPT_PATH), ACMOE_ERR_FORMAT);
    }
    CHECK_STATUS(acmoe_lm_load(&loaded, "build/no/such/file"), ACMOE_ERR_IO);
    CHECK_STATUS(acmoe_lm_save(lm, "build/no/such/dir/x.safetensors"), ACMOE_ERR_IO);
    free(good), free(bad);
    acmoe_lm_destroy(lm);
}

/* A file of another shape of model: same format, different configuration. */
static void test_checkpoint_rejects_other_model(void) {
    acmoe_lm_desc d = tiny_desc("ggc", 0, 0);
    acmoe_lm *lm = NULL, *loaded = NULL;
    unsigned char *data;
    long size, i;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_save(lm, CKPT_PATH), ACMOE_OK);
    data = read_file(CKPT_PATH, &size);
    for (i = 0; data && i + 15 <= size; i++) /* claim 9 experts: the stored tensors no longer fit */
        if (!memcmp(data + i, "\"n_experts\":\"4\"", 15)) data[i + 13] = '9';
    if (data) write_file(CKPT_PATH, data, size);
    CHECK_STATUS(acmoe_lm_load(&loaded, CKPT_PATH), ACMOE_ERR_FORMAT);
    free(data);
    acmoe_lm_destroy(lm);
    remove(CKPT_PATH);
}

/* ---- data and training loop ---- */

static void test_corpus_batches(void) {
    unsigned char text[36];
    acmoe_corpus c;
    acmoe_rng rng;
    int32_t tok[20], tgt[20];
    int i;
    for (i = 0; i < 36; i++) text[i] = (unsigned char)(10 + i); /* each byte one more than the last */
    CHECK_STATUS(acmoe_corpus_view(&c, text, 36, 0.25f), ACMOE_OK);
    CHECK(c.train_size == 27 && c.size == 36);
    acmoe_rng_seed(&rng, 1);
    acmoe_corpus_batch(&c, ACMOE_SPLIT_TRAIN, &rng, 2, 5, tok, tgt);
    for (i = 0; i < 10; i++) CHECK(tgt[i] == tok[i] + 1 && tok[i] >= text[0] && tgt[i] <= text[26]);
    acmoe_corpus_batch(&c, ACMOE_SPLIT_VAL, &rng, 2, 5, tok, tgt);
    for (i = 0; i < 10; i++) CHECK(tgt[i] == tok[i] + 1 && tok[i] >= text[27]); /* only held-out bytes */
    acmoe_corpus_batch(&c, ACMOE_SPLIT_VAL, &rng, 1, 20, tok, tgt);         /* longer than the split */
    CHECK(tok[0] == text[27] && tok[19] == text[34] && tgt[19] == text[35]);
    CHECK_STATUS(acmoe_corpus_view(&c, text, 3, 0.5f), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_corpus_view(&c, text, 36, 1.0f), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_corpus_load(&c, "build/no/such/corpus", 0.1f), ACMOE_ERR_IO);
    CHECK(c.bytes == NULL);
}

static int count_events(const acmoe_train_event *e, acmoe_lm *lm, void *user) {
    int *counts = (int *)user;
    (void)lm;
    counts[e->kind]++;
    return e->kind == ACMOE_EVENT_EVAL && e->step >= 8; /* stop at the second evaluation */
}

/* The loop trains, reports, evaluates the same text for every model, and stops on request. */
static void test_train_loop(void) {
    static unsigned char text[600];
    acmoe_lm_desc d = tiny_desc("ggc", 0, 0);
    acmoe_train_desc t;
    acmoe_corpus c;
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    double before, after, again;
    int counts[2] = {0, 0}, i;
    for (i = 0; i < 600; i++) text[i] = (unsigned char)("abcab"[i % 5] - 'a' + (i % 7 == 0)); /* tokens 0..3 */
    CHECK_STATUS(acmoe_corpus_view(&c, text, sizeof text, 0.2f), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_evaluate(lm, ctx, &c, 2, 5, &before), ACMOE_OK);
    memset(&t, 0, sizeof t);
    t.steps = 20, t.eval_every = 4, t.eval_batches = 2, t.log_every = 2, t.seed = 1;
    t.optim.lr = 1e-2f;
    t.on_event = count_events, t.user = counts;
    CHECK_STATUS(acmoe_lm_train(lm, ctx, &c, &t), ACMOE_STOPPED);
    CHECK(acmoe_lm_steps_taken(lm) == 8 && counts[ACMOE_EVENT_STEP] == 4 && counts[ACMOE_EVENT_EVAL] == 2);
    t.on_event = NULL;
    CHECK_STATUS(acmoe_lm_train(lm, ctx, &c, &t), ACMOE_OK); /* continues to 20 */
    CHECK(acmoe_lm_steps_taken(lm) == 20);
    CHECK_STATUS(acmoe_lm_evaluate(lm, ctx, &c, 2, 5, &after), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_evaluate(lm, ctx, &c, 2, 5, &again), ACMOE_OK);
    CHECKF(after < before - 0.5 && after == again, "held-out loss %g -> %g (%g)", before, after, again);
    t.eval_batches = -1;
    CHECK_STATUS(acmoe_lm_train(lm, ctx, &c, &t), ACMOE_ERR_ARG);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

static int keep_last_eval(const acmoe_train_event *e, acmoe_lm *lm, void *user) {
    (void)lm;
    if (e->kind == ACMOE_EVENT_EVAL) *(acmoe_train_event *)user = *e;
    return 0;
}

/* Damaged input: no damage gives acmoe_lm_evaluate's loss bit for bit, the same seed the same
   damage, and a model that has learned to read its context loses more with half its input
   replaced; the training loop reports both losses; shares outside 0 to 1 are refused. */
static void test_evaluate_corrupted(void) {
    static unsigned char text[600];
    acmoe_lm_desc d = tiny_desc("ggc", 0, 0);
    acmoe_train_desc t;
    acmoe_train_event last;
    acmoe_corpus c;
    acmoe_lm *lm = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    double clean, none, half, again, loop_clean, loop_half;
    int i;
    for (i = 0; i < 600; i++) text[i] = (unsigned char)(i % 10); /* each token tells the next */
    CHECK_STATUS(acmoe_corpus_view(&c, text, sizeof text, 0.2f), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    memset(&t, 0, sizeof t);
    memset(&last, 0, sizeof last);
    t.steps = 100, t.eval_every = 50, t.eval_batches = 2, t.seed = 1, t.eval_seed = 9, t.eval_corrupt = 0.5f;
    t.optim.lr = 1e-2f;
    t.on_event = keep_last_eval, t.user = &last;
    CHECK_STATUS(acmoe_lm_train(lm, ctx, &c, &t), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_evaluate(lm, ctx, &c, 4, 5, &clean), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(lm, ctx, &c, 4, 5, 0.0f, &none), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(lm, ctx, &c, 4, 5, 0.5f, &half), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(lm, ctx, &c, 4, 5, 0.5f, &again), ACMOE_OK);
    CHECKF(none == clean && half == again && half > clean + 1.0, "clean %g, none %g, half %g, again %g", clean, none,
           half, again);
    CHECK_STATUS(acmoe_lm_evaluate(lm, ctx, &c, 2, 9, &loop_clean), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(lm, ctx, &c, 2, 9, 0.5f, &loop_half), ACMOE_OK);
    CHECKF(last.step == 100 && last.val_loss == loop_clean && last.val_loss_corrupted == loop_half,
           "step %ld: loop %g / %g, calls %g / %g", last.step, last.val_loss, last.val_loss_corrupted, loop_clean,
           loop_half);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(lm, ctx, &c, 4, 5, -0.1f, &half), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(lm, ctx, &c, 4, 5, 1.5f, &half), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(lm, ctx, &c, 4, 5, (float)NAN, &half), ACMOE_ERR_ARG);
    t.steps = 101, t.eval_corrupt = 2.0f;
    CHECK_STATUS(acmoe_lm_train(lm, ctx, &c, &t), ACMOE_ERR_ARG);
    CHECK(acmoe_lm_steps_taken(lm) == 100);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

/* Draws n tokens and counts them. */
static void sample_counts(const float *logits, int vocab, float temperature, int top_k, float top_p, int n,
                          int *counts) {
    float work[8];
    acmoe_rng rng;
    int i;
    acmoe_rng_seed(&rng, 23);
    memset(counts, 0, sizeof(int) * (size_t)vocab);
    for (i = 0; i < n; i++) {
        int32_t token = -1;
        CHECK_STATUS(acmoe_sample(logits, vocab, temperature, top_k, top_p, work, &rng, &token), ACMOE_OK);
        if (token >= 0 && token < vocab) counts[token]++;
    }
}

/* Sampling: each token as often as its softmax probability says (within four standard
   deviations), after the temperature; the top-k and top-p cuts leave out exactly the tokens
   they should, ties at the cut kept; temperature 0 is the first largest logit; bad calls are
   refused. */
static void test_sample(void) {
    enum { n = 40000 };
    const float logits[5] = {0.5f, 3.0f, -1.0f, 2.0f, 1.0f}, ties[3] = {1.0f, 0.0f, 1.0f};
    const float temperatures[2] = {1.0f, 0.5f};
    float work[8], bad[2] = {0.0f, 0.0f};
    int counts[5], t, j;
    int32_t token = -1;
    acmoe_rng rng;
    for (t = 0; t < 2; t++) {
        double p[5], sum = 0.0;
        sample_counts(logits, 5, temperatures[t], 0, 1.0f, n, counts);
        for (j = 0; j < 5; j++) sum += p[j] = exp(logits[j] / temperatures[t]);
        for (j = 0; j < 5; j++) {
            const double expect = n * p[j] / sum, sd = sqrt(expect * (1.0 - p[j] / sum));
            CHECKF(fabs(counts[j] - expect) <= 4.0 * sd + 1.0, "T %g token %d: %d, expected %g", temperatures[t], j,
                   counts[j], expect);
        }
    }
    sample_counts(logits, 5, 1.0f, 2, 1.0f, n, counts); /* tokens 1 and 3, e to 1 */
    CHECKF(counts[0] + counts[2] + counts[4] == 0 && fabs(counts[1] / (double)counts[3] - exp(1.0)) < 0.15,
           "top-2: %d %d %d %d %d", counts[0], counts[1], counts[2], counts[3], counts[4]);
    /* probabilities 0.624, 0.229, 0.084, 0.051, 0.011 (tokens 1, 3, 4, 0, 2) */
    sample_counts(logits, 5, 1.0f, 0, 0.6f, 1000, counts);
    CHECKF(counts[1] == 1000, "top-p 0.6: %d", counts[1]);
    sample_counts(logits, 5, 1.0f, 0, 0.9f, n, counts);
    CHECKF(counts[0] + counts[2] == 0 && counts[1] > 0 && counts[3] > 0 && counts[4] > 0, "top-p 0.9: %d %d %d %d %d",
           counts[0], counts[1], counts[2], counts[3], counts[4]);
    sample_counts(logits, 5, 1.0f, 3, 0.9f, n, counts); /* within the top 3, tokens 1 and 3 hold 0.910 */
    CHECKF(counts[0] + counts[2] + counts[4] == 0 && counts[3] > 0, "top-3, top-p 0.9: %d %d %d %d", counts[0],
           counts[2], counts[3], counts[4]);
    sample_counts(ties, 3, 1.0f, 1, 1.0f, 1000, counts);
    CHECKF(counts[1] == 0 && counts[0] > 400 && counts[2] > 400, "ties at the top-1 cut: %d %d %d", counts[0],
           counts[1], counts[2]);
    sample_counts(ties, 3, 0.0f, 0, 1.0f, 10, counts);
    CHECK(counts[0] == 10);
    acmoe_rng_seed(&rng, 1);
    CHECK_STATUS(acmoe_sample(logits, 0, 1.0f, 0, 1.0f, work, &rng, &token), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_sample(logits, 5, -1.0f, 0, 1.0f, work, &rng, &token), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_sample(logits, 5, 1.0f, -1, 1.0f, work, &rng, &token), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_sample(logits, 5, 1.0f, 0, 0.0f, work, &rng, &token), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_sample(logits, 5, 1.0f, 0, 1.5f, work, &rng, &token), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_sample(logits, 5, 1.0f, 0, 1.0f, NULL, &rng, &token), ACMOE_ERR_NULL);
    bad[1] = (float)NAN;
    CHECK_STATUS(acmoe_sample(bad, 2, 1.0f, 0, 1.0f, work, &rng, &token), ACMOE_ERR_NONFINITE);
}

/* Incremental decoding gives the full forward pass's logits bit for bit, position by
   position and from a later start, pre-LN and post-LN, with frozen AC weights; calls it
   cannot serve are refused. */
static void check_decode(int pre_ln) {
    enum { len = 150 }; /* more than one attention block; rows of keys 128 and more */
    acmoe_lm_desc d = tiny_desc("gfc", pre_ln, 0);
    acmoe_ctx *ctx = test_context(2, 0, 0, 0);
    acmoe_lm *lm = NULL;
    int32_t tok[len], tgt[len];
    static float full[len * 11];
    float loss;
    int t, same = 1;
    d.seq_len = len;
    d.batch = 2;
    d.d_model = d.d_ff = 32; /* wide enough that one token's products take the column kernels */
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    if (!lm) return;
    tiny_batch(tok, tgt, len, 21);
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, len, 0), ACMOE_ERR_ARG); /* AC weights not measured, not frozen */
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, NULL, 1, len, 0, NULL), ACMOE_OK);
    acmoe_lm_freeze_ac_weights(lm, 1);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, NULL, 1, len, 0, NULL), ACMOE_OK);
    memcpy(full, acmoe_lm_logits(lm), sizeof full);
    for (t = 0; t < len; t++) {
        CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, t + 1, t), ACMOE_OK);
        same &= memcmp(acmoe_lm_logits(lm) + t * 11, full + t * 11, sizeof(float) * 11) == 0;
    }
    CHECK(same);
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, 9, 0), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, len, 9), ACMOE_OK); /* the rest in one call */
    CHECK(memcmp(acmoe_lm_logits(lm) + 9 * 11, full + 9 * 11, sizeof(float) * 11 * (len - 9)) == 0);
    /* refused: bad ranges, a different prefix, a batch of two, a step since, a batch-wide router */
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, 5, 5), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, len + 1, 0), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_lm_decode(NULL, ctx, tok, 5, 0), ACMOE_ERR_NULL);
    tok[3] = (tok[3] + 1) % 11;
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, len, 9), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, NULL, 2, 5, 0, NULL), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, 6, 5), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 1, len, 1, &loss), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_step(lm, ctx, NULL, NULL), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, len, 9), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, len, 0), ACMOE_OK);
    acmoe_lm_destroy(lm);
    d.pattern = "gu";
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, 4, 0), ACMOE_ERR_ARG);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

/* A batch of sequences decoded together gives each sequence's logits of the forward pass on
   it alone, bit for bit, from a prompt and then position by position; calls it cannot serve
   are refused. */
static void check_decode_batch(int pre_ln) {
    enum { batch = 3, len = 40, vocab = 11, prompt = 9 };
    acmoe_lm_desc d = tiny_desc("gfc", pre_ln, 0);
    acmoe_ctx *ctx = test_context(2, 0, 0, 0);
    acmoe_lm *lm = NULL;
    int32_t tok[batch * len], tgt[batch * len];
    static float alone[batch][len * vocab];
    int b, t, same = 1, same_prompt = 1;
    d.seq_len = len;
    d.batch = batch;
    d.d_model = d.d_ff = 32;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    if (!lm) return;
    for (b = 0; b < batch; b++) tiny_batch(tok + b * len, tgt + b * len, len, 40 + b);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, NULL, batch, len, 0, NULL), ACMOE_OK); /* measures the AC weights */
    acmoe_lm_freeze_ac_weights(lm, 1);
    for (b = 0; b < batch; b++) {
        CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok + b * len, NULL, 1, len, 0, NULL), ACMOE_OK);
        memcpy(alone[b], acmoe_lm_logits(lm), sizeof alone[b]);
    }
    CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, len, batch, prompt, 0), ACMOE_OK);
    for (b = 0; b < batch; b++)
        for (t = 0; t < prompt; t++)
            same_prompt &= memcmp(acmoe_lm_position_logits(lm, b, t), alone[b] + t * vocab, sizeof(float) * vocab) == 0;
    CHECK(same_prompt);
    for (t = prompt; t < len; t++) {
        CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, len, batch, t + 1, t), ACMOE_OK);
        for (b = 0; b < batch; b++)
            same &= memcmp(acmoe_lm_position_logits(lm, b, t), alone[b] + t * vocab, sizeof(float) * vocab) == 0;
    }
    CHECK(same);
    CHECK(acmoe_lm_position_logits(lm, batch, 0) == NULL && acmoe_lm_position_logits(lm, 0, len) == NULL);
    CHECK(acmoe_lm_position_logits(lm, -1, 0) == NULL && acmoe_lm_position_logits(NULL, 0, 0) == NULL);
    /* refused: too many sequences, another prefix in one of them, another batch size, rows
       sequence by sequence */
    CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, len, batch + 1, 5, 0), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, len, 0, 5, 0), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, 4, batch, 5, 0), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, len, batch, 6, 0), ACMOE_OK);
    tok[len + 2] = (tok[len + 2] + 1) % vocab;
    CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, len, batch, 7, 6), ACMOE_ERR_ARG);
    tok[len + 2] = (tok[len + 2] + vocab - 1) % vocab;
    CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, len, 2, 7, 6), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, len, batch, 7, 6), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, NULL, batch, 6, 0, NULL), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, len, batch, 7, 6), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, NULL, batch, len, 0, NULL), ACMOE_OK);
    CHECK(memcmp(acmoe_lm_position_logits(lm, 2, len - 1), alone[2] + (len - 1) * vocab, sizeof(float) * vocab) == 0);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

static void test_lm_decode_batch_post_ln(void) { check_decode_batch(0); }
static void test_lm_decode_batch_pre_ln(void) { check_decode_batch(1); }

static void test_lm_decode_post_ln(void) { check_decode(0); }
static void test_lm_decode_pre_ln(void) { check_decode(1); }

/* After the first step, training steps and decoding allocate nothing. */
static void test_lm_steady_state_allocates_nothing(void) {
    acmoe_lm_desc d = tiny_desc("gfc", 0, 0);
    acmoe_ctx *ctx = test_context(2, 0, 0, 0);
    acmoe_lm *lm = NULL;
    int32_t tok[10], tgt[10];
    float loss;
    long before = 0;
    int step, len;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    if (!lm) return;
    tiny_batch(tok, tgt, 10, 31);
    for (step = 0; step < 4; step++) {
        if (step == 1) before = test_allocations;
        CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, &loss), ACMOE_OK);
        acmoe_lm_zero_grad(lm);
        CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_step(lm, ctx, NULL, NULL), ACMOE_OK);
    }
    acmoe_lm_freeze_ac_weights(lm, 1);
    for (len = 1; len <= 5; len++) CHECK_STATUS(acmoe_lm_decode(lm, ctx, tok, len, len - 1), ACMOE_OK);
    for (len = 1; len <= 5; len++) CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, tok, 5, 2, len, len - 1), ACMOE_OK);
    CHECKF(test_allocations == before, "%ld allocations in 3 steps and 10 decoded positions", test_allocations - before);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

const test_case lm_tests[] = {
    {"lm_patterns", test_lm_patterns},
    {"lm_moe_settings", test_lm_moe_settings},
    {"lm_grad_soft_moe", test_lm_grad_soft_moe},
    {"vision_gradients", test_vision_gradients},
    {"vision_input_gradient", test_vision_input_gradient},
    {"swin_gradients", test_swin_gradients},
    {"swin_tensor_gradients", test_swin_tensor_gradients},
    {"swin_rules", test_swin_rules},
    {"swin_checkpoint", test_swin_checkpoint},
    {"image_patches", test_image_patches},
    {"vision_learns", test_vision_learns},
    {"checkpoint_vision", test_checkpoint_vision},
    {"lm_soft_moe_is_causal", test_lm_soft_moe_is_causal},
    {"lm_bad_calls", test_lm_bad_calls},
    {"lm_grad_post_ln", test_lm_grad_post_ln},
    {"lm_grad_pre_ln_untied", test_lm_grad_pre_ln_untied},
    {"lm_learns", test_lm_learns},
    {"lm_deterministic", test_lm_deterministic},
    {"lm_last_times", test_lm_last_times},
    {"lm_loss_trajectory", test_lm_loss_trajectory},
    {"lm_decode_post_ln", test_lm_decode_post_ln},
    {"lm_decode_batch_post_ln", test_lm_decode_batch_post_ln},
    {"lm_decode_batch_pre_ln", test_lm_decode_batch_pre_ln},
    {"lm_decode_pre_ln", test_lm_decode_pre_ln},
    {"lm_steady_state_allocates_nothing", test_lm_steady_state_allocates_nothing},
    {"optimizer_schedules", test_optimizer_schedules},
    {"optimizer_adamw", test_optimizer_adamw},
    {"corpus_batches", test_corpus_batches},
    {"train_loop", test_train_loop},
    {"evaluate_corrupted", test_evaluate_corrupted},
    {"sample", test_sample},
    {"checkpoint_round_trip", test_checkpoint_round_trip},
    {"checkpoint_resume_is_exact", test_checkpoint_resume_is_exact},
    {"checkpoint_rejects_damage", test_checkpoint_rejects_damage},
    {"checkpoint_rejects_other_model", test_checkpoint_rejects_other_model},
    {0, 0},
};
