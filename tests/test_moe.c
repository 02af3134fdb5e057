/* MoE layer: finite-difference gradient checks for every router piece, activation and
   auxiliary loss, the selection rules' invariants, deterministic combine, and a
   steady-state step that allocates nothing. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../acmoe.h"
#include "harness.h"

/* A layer with its parameter and gradient buffers, an input batch and a loss direction. */
typedef struct fixture {
    acmoe_moe_desc desc;
    acmoe_moe *layer;
    acmoe_ctx *ctx;
    float *params, *grads, *saved;
    size_t n_params;
    int n;
    float *x, *out, *r, *dx;
    int32_t *prev;   /* previous-layer top-2, for the AC router */
    float *prev_gate; /* and its gates, for label mixing */
} fixture;

/* The small layer the tests share: d 6, d_ff 5, 4 experts, top-2, router by preset letter. */
static acmoe_moe_desc small_desc(char router, acmoe_activation act) {
    acmoe_moe_desc d;
    memset(&d, 0, sizeof d);
    d.d_model = 6;
    d.d_ff = 5;
    d.n_experts = 4;
    d.top_k = 2;
    d.max_tokens = 32;
    d.activation = act;
    d.proj_dim = 3;
    CHECK_STATUS(acmoe_moe_router_preset(&d, router), ACMOE_OK);
    return d;
}

static void fixture_make_desc(fixture *f, const acmoe_moe_desc *desc, int n, uint64_t seed) {
    acmoe_rng rng;
    int i, dm = desc->d_model;
    memset(f, 0, sizeof *f);
    f->desc = *desc;
    f->n = n;
    f->n_params = acmoe_moe_param_count(&f->desc);
    CHECK(f->n_params > 0);
    f->params = (float *)calloc(f->n_params, sizeof(float));
    f->grads = (float *)calloc(f->n_params, sizeof(float));
    f->saved = (float *)calloc(f->n_params, sizeof(float));
    f->x = (float *)calloc((size_t)n * dm, sizeof(float));
    f->out = (float *)calloc((size_t)n * dm, sizeof(float));
    f->r = (float *)calloc((size_t)n * dm, sizeof(float));
    f->dx = (float *)calloc((size_t)n * dm, sizeof(float));
    f->prev = (int32_t *)calloc((size_t)n * 2, sizeof(int32_t));
    f->prev_gate = (float *)calloc((size_t)n * 2, sizeof(float));
    f->ctx = test_context(1, 0, 0, 0);
    CHECK_STATUS(acmoe_moe_create(&f->layer, &f->desc, f->params, f->grads), ACMOE_OK);
    acmoe_rng_seed(&rng, seed);
    acmoe_moe_init_params(f->layer, &rng);
    for (i = 0; i < n * dm; i++) f->x[i] = acmoe_rng_normal(&rng);
    for (i = 0; i < n * dm; i++) f->r[i] = acmoe_rng_normal(&rng);
    for (i = 0; i < n; i++) { /* clusters of 2 to 4 tokens: no degenerate cluster */
        f->prev[2 * i] = i % 3;
        f->prev[2 * i + 1] = (i + 1) % 3;
        f->prev_gate[2 * i] = 0.7f;
        f->prev_gate[2 * i + 1] = 0.3f;
    }
}

static void fixture_make(fixture *f, char router, acmoe_activation act, int n, uint64_t seed) {
    acmoe_moe_desc d = small_desc(router, act);
    fixture_make_desc(f, &d, n, seed);
}

static void fixture_free(fixture *f) {
    acmoe_moe_destroy(f->layer);
    acmoe_ctx_destroy(f->ctx);
    free(f->params), free(f->grads), free(f->saved), free(f->x), free(f->out), free(f->r), free(f->dx);
    free(f->prev), free(f->prev_gate);
}

/* sum(out * r) plus the layer's auxiliary loss, in double; NAN when the forward call fails */
static double fixture_loss(fixture *f) {
    double loss;
    int i;
    if (acmoe_moe_forward(f->layer, f->ctx, f->x, f->n, f->prev, f->prev_gate, 2, f->out) != ACMOE_OK) return NAN;
    loss = acmoe_moe_last_stats(f->layer).aux_loss;
    for (i = 0; i < f->n * f->desc.d_model; i++) loss += (double)f->out[i] * f->r[i];
    return loss;
}

/* The routing of the last forward call (pair count, then the pairs), to notice a
   perturbation that changes it. */
#define ROUTING_MAX 256
static void routing_copy(fixture *f, int *routing) {
    acmoe_moe_stats st = acmoe_moe_last_stats(f->layer);
    int p;
    memset(routing, 0, sizeof(int) * ROUTING_MAX);
    routing[0] = st.pairs;
    for (p = 0; p < st.pairs && 2 * p + 2 < ROUTING_MAX; p++)
        routing[2 * p + 1] = st.pair_token[p], routing[2 * p + 2] = st.pair_expert[p];
}

/* Central difference of the loss along one float; NAN when the routing changes. */
static double central_difference_at(fixture *f, float *value, float h, const int *routing) {
    int now[ROUTING_MAX];
    float keep = *value;
    double up, down;
    int same;
    *value = keep + h;
    up = fixture_loss(f);
    routing_copy(f, now);
    same = memcmp(now, routing, sizeof now) == 0;
    memcpy(f->params, f->saved, sizeof(float) * f->n_params); /* undo the re-projection too */
    *value = keep - h;
    down = fixture_loss(f);
    routing_copy(f, now);
    same &= memcmp(now, routing, sizeof now) == 0;
    memcpy(f->params, f->saved, sizeof(float) * f->n_params);
    *value = keep;
    return same ? (up - down) / (2.0 * h) : NAN;
}

/* The difference at h and at h/2 agree where the loss is smooth; where they do not, a ReLU
   kink lies within h (NAN, like a routing change). */
static double central_difference(fixture *f, float *value, float h, const int *routing) {
    double wide = central_difference_at(f, value, h, routing), narrow = central_difference_at(f, value, h / 2, routing);
    if (isnan(wide) || isnan(narrow) || fabs(wide - narrow) > 1e-3 + 1e-2 * fabs(narrow)) return NAN;
    return narrow;
}

static int gradient_matches(double numeric, double analytic, const char *what, size_t i) {
    double err = fabs(numeric - analytic), scale = fmax(fabs(numeric), fabs(analytic));
    if (err <= 2e-3 + 2e-2 * scale) return 1;
    fprintf(stderr, "    %s[%zu]: numeric %.6g, analytic %.6g\n", what, i, numeric, analytic);
    return 0;
}

/* Checks every parameter and every input gradient against central differences. */
static void check_gradients_desc(const acmoe_moe_desc *desc, uint64_t seed) {
    fixture f;
    int routing[ROUTING_MAX];
    double base;
    size_t i;
    int bad = 0, skipped = 0, checked = 0;
    const float h = 1e-2f;
    fixture_make_desc(&f, desc, 12, seed);
    base = fixture_loss(&f); /* the first call re-projects embeddings and measures AC weights */
    CHECK(isfinite(base));
    acmoe_moe_freeze_ac_weights(f.layer, 1); /* W is a constant of the backward pass */
    base = fixture_loss(&f);
    memcpy(f.saved, f.params, sizeof(float) * f.n_params);
    routing_copy(&f, routing);
    memset(f.grads, 0, sizeof(float) * f.n_params);
    CHECK_STATUS(acmoe_moe_backward(f.layer, f.ctx, f.r, f.dx), ACMOE_OK);
    for (i = 0; i < f.n_params; i++) {
        double numeric = central_difference(&f, &f.params[i], h, routing);
        if (isnan(numeric)) {
            skipped++;
            continue;
        }
        checked++;
        bad += !gradient_matches(numeric, f.grads[i], "param", i);
    }
    for (i = 0; i < (size_t)f.n * f.desc.d_model; i++) {
        double numeric = central_difference(&f, &f.x[i], h, routing);
        if (isnan(numeric)) {
            skipped++;
            continue;
        }
        checked++;
        bad += !gradient_matches(numeric, f.dx[i], "dx", i);
    }
    CHECKF(bad == 0, "%d of %d gradients wrong", bad, checked);
    CHECKF(skipped * 10 < checked, "%d perturbations changed the routing", skipped);
    fixture_free(&f);
}

static void check_layer_gradients(char router, acmoe_activation act) {
    acmoe_moe_desc d = small_desc(router, act);
    check_gradients_desc(&d, 1000 + (uint64_t)router * 10 + (uint64_t)act);
}

static void test_grad_smoe_gelu(void) { check_layer_gradients('g', ACMOE_ACT_GELU); }
static void test_grad_smoe_relu(void) { check_layer_gradients('g', ACMOE_ACT_RELU); }
static void test_grad_swiglu(void) { check_layer_gradients('g', ACMOE_ACT_SWIGLU); }
static void test_grad_switch(void) { check_layer_gradients('s', ACMOE_ACT_GELU); }
static void test_grad_cosine(void) {
    check_layer_gradients('o', ACMOE_ACT_GELU);
    check_layer_gradients('b', ACMOE_ACT_GELU); /* StableMoE: the embeddings keep their norm */
}
static void test_grad_xmoe(void) { check_layer_gradients('x', ACMOE_ACT_GELU); }
static void test_grad_ac(void) { check_layer_gradients('c', ACMOE_ACT_GELU); }
static void test_grad_usmoe(void) { check_layer_gradients('u', ACMOE_ACT_GELU); }
static void test_grad_ac_usmoe(void) { check_layer_gradients('v', ACMOE_ACT_GELU); }
static void test_grad_expert_choice(void) { check_layer_gradients('e', ACMOE_ACT_GELU); }

/* The AC variants and the compositions no paper has: AC weights with Switch and USMoE
   selection, the weights reaching the experts, mixed labels; a width the input gradient's
   tiles take, and with 16 experts the router input's tiles. */
static void test_grad_ac_variants(void) {
    acmoe_moe_desc d = small_desc('c', ACMOE_ACT_GELU);
    d.router_select = ACMOE_SELECT_SWITCH;
    d.top_k = 1;
    check_gradients_desc(&d, 31);
    d = small_desc('c', ACMOE_ACT_GELU);
    d.router_select = ACMOE_SELECT_USMOE;
    check_gradients_desc(&d, 32);
    d = small_desc('c', ACMOE_ACT_GELU);
    d.ac_weight_experts = 1;
    d.ac_mix_labels = 1;
    check_gradients_desc(&d, 33);
    d = small_desc('c', ACMOE_ACT_GELU); /* a width of 16: the input gradient a tile at a time */
    d.d_model = 16;
    check_gradients_desc(&d, 34);
    d.ac_mix_labels = 1;
    check_gradients_desc(&d, 35);
    d.n_experts = 16; /* and the router input in tiles, never written out */
    check_gradients_desc(&d, 36);
    d.ac_mix_labels = 0;
    check_gradients_desc(&d, 37);
}

/* Soft MoE over the whole call, over sequences with two slots per expert, over positions,
   on projected input, and with the AC weights reaching the experts and mixed labels (the
   paper's Soft MoE variant). */
static void test_grad_soft(void) {
    acmoe_moe_desc d = small_desc('m', ACMOE_ACT_GELU);
    check_gradients_desc(&d, 81);
    d.group = ACMOE_GROUP_SEQUENCE;
    d.seq_len = 4;
    d.soft_slots = 2;
    check_gradients_desc(&d, 82);
    d.group = ACMOE_GROUP_POSITION;
    d.seq_len = 3;
    d.router_input = ACMOE_INPUT_PROJECTED;
    check_gradients_desc(&d, 83);
    d = small_desc('c', ACMOE_ACT_GELU);
    d.router_score = ACMOE_SCORE_SLOT;
    d.router_select = ACMOE_SELECT_SOFT;
    d.ac_weight_experts = 1;
    d.ac_mix_labels = 1;
    check_gradients_desc(&d, 84);
    d = small_desc('n', ACMOE_ACT_GELU); /* normalised tokens feed the score and the slots */
    d.group = ACMOE_GROUP_SEQUENCE;
    d.seq_len = 4;
    check_gradients_desc(&d, 85);
    d = small_desc('a', ACMOE_ACT_GELU); /* and their AC-weighted form */
    d.group = ACMOE_GROUP_SEQUENCE;
    d.seq_len = 4;
    d.soft_slots = 2;
    check_gradients_desc(&d, 86);
    d.ac_mix_labels = 0;
    check_gradients_desc(&d, 87);
}

/* The paper's Soft MoE layers (softmoe.py) on vectors worked out by hand from its formulas:
   one image of 4 tokens, d 3, 2 experts of one slot, mix_k 2, AC with and without label
   mixing and the baseline without AC. Expert e is made to compute (e + 1) v (ReLU experts
   shifted into their linear range), so the outputs are the combine-weighted slot inputs. */
static void check_soft_vectors(char router, int mix_labels, const double want[4][3], const int want_labels[4][2],
                               const double want_logits[4][2]) {
    static const float x[4 * 3] = {1, 2, 2, 2, 1, -2, -1, 0.5f, 1, 0, -3, 4};
    static const int32_t prev_idx[4 * 2] = {0, 1, 1, 0, 0, 1, 1, 0};
    static const float prev_logits[4][2] = {{0.9f, 0.1f}, {0.7f, 0.2f}, {1.5f, -0.5f}, {0.4f, -0.3f}};
    acmoe_moe_desc d;
    acmoe_moe *layer = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_moe_stats st;
    float params[64], grads[64], prev_gate[4 * 2], out[4 * 3], *w1, *b1, *w2, *b2;
    int t, q, e;
    memset(&d, 0, sizeof d);
    CHECK_STATUS(acmoe_moe_router_preset(&d, router), ACMOE_OK);
    d.d_model = 3, d.d_ff = 3, d.n_experts = 2, d.max_tokens = 4, d.mix_k = 2;
    d.group = ACMOE_GROUP_SEQUENCE, d.seq_len = 4, d.ac_mix_labels = mix_labels;
    CHECK(acmoe_moe_param_count(&d) == 2 * 3 + 1 + 2 * (9 + 3 + 9 + 3));
    memset(params, 0, sizeof params);
    CHECK_STATUS(acmoe_moe_create(&layer, &d, params, grads), ACMOE_OK);
    if (!layer) return;
    params[0] = 1, params[2] = 1, params[4] = 1, params[5] = -1; /* slot vectors (1,0,1), (0,1,-1) */
    params[6] = 1;                                              /* scale */
    w1 = params + 7, b1 = w1 + 18, w2 = b1 + 6, b2 = w2 + 18;
    for (e = 0; e < 2; e++)
        for (q = 0; q < 3; q++) {
            w1[e * 9 + q * 3 + q] = 1.0f, b1[e * 3 + q] = 10.0f;
            w2[e * 9 + q * 3 + q] = (float)(e + 1), b2[e * 3 + q] = -10.0f * (float)(e + 1);
        }
    for (t = 0; t < 4; t++) { /* the previous layer's gates: the softmax of its top slot logits */
        double a = exp(prev_logits[t][0]), b = exp(prev_logits[t][1]);
        prev_gate[2 * t] = (float)(a / (a + b)), prev_gate[2 * t + 1] = (float)(b / (a + b));
    }
    CHECK_STATUS(acmoe_moe_forward(layer, ctx, x, 4, prev_idx, prev_gate, 2, out), ACMOE_OK);
    st = acmoe_moe_last_stats(layer);
    CHECK(st.top_k == 2);
    for (t = 0; t < 4; t++) {
        double a = exp(want_logits[t][0]), b = exp(want_logits[t][1]);
        for (q = 0; q < 3; q++)
            CHECKF(fabs(out[t * 3 + q] - want[t][q]) < 2e-6, "%c, token %d: %g, want %g", router, t, out[t * 3 + q],
                   want[t][q]);
        CHECK(st.expert_index[2 * t] == want_labels[t][0] && st.expert_index[2 * t + 1] == want_labels[t][1]);
        CHECKF(fabs(st.gate[2 * t] - a / (a + b)) < 1e-6, "%c, token %d: gate %g", router, t, st.gate[2 * t]);
    }
    acmoe_moe_destroy(layer);
    acmoe_ctx_destroy(ctx);
}

/* The share of token pairs whose "same best expert" relation differs between the previous
   labels and this call's best experts, counted pair by pair. */
static double stability_by_pairs(const fixture *f, const acmoe_moe_stats *st) {
    int i, j, differ = 0;
    for (i = 0; i < f->n; i++)
        for (j = 0; j < f->n; j++)
            differ += (f->prev[2 * i] == f->prev[2 * j]) !=
                      (st->expert_index[i * st->top_k] == st->expert_index[j * st->top_k]);
    return (double)differ / ((double)f->n * f->n);
}

/* Router stability is the running average (0.8 old + 0.2 new) of that share, for a top-k
   layer and a Soft MoE one (whose labels are its best slots' experts). */
static void test_moe_router_stability(void) {
    static const char routers[2] = {'g', 'n'};
    int r;
    for (r = 0; r < 2; r++) {
        fixture f;
        double first, second, want;
        acmoe_moe_desc d = small_desc(routers[r], ACMOE_ACT_GELU);
        int i;
        d.mix_k = 2;
        fixture_make_desc(&f, &d, 12, 41);
        CHECK(isfinite(fixture_loss(&f)));
        {
            acmoe_moe_stats st = acmoe_moe_last_stats(f.layer);
            first = stability_by_pairs(&f, &st);
            CHECKF(fabs(st.router_stability - 0.2 * first) < 1e-6, "%c: %g, want %g", routers[r], st.router_stability,
                   0.2 * first);
            CHECK(first > 0.0); /* the labels i % 3 cannot all agree with 4 experts' choices */
        }
        for (i = 0; i < 12; i++) f.prev[2 * i] = (i * 7) % 4; /* other labels */
        CHECK(isfinite(fixture_loss(&f)));
        {
            acmoe_moe_stats st = acmoe_moe_last_stats(f.layer);
            second = stability_by_pairs(&f, &st);
            want = 0.8 * 0.2 * first + 0.2 * second;
            CHECKF(fabs(st.router_stability - want) < 1e-6, "%c: %g, want %g", routers[r], st.router_stability, want);
        }
        for (i = 0; i < 12; i++) f.prev[2 * i] = i % 2 ? 100000 + i % 3 : -1 - i % 5; /* past the table of pairs */
        CHECK(isfinite(fixture_loss(&f)));
        {
            acmoe_moe_stats st = acmoe_moe_last_stats(f.layer);
            want = 0.8 * want + 0.2 * stability_by_pairs(&f, &st);
            CHECKF(fabs(st.router_stability - want) < 1e-6, "%c: %g, want %g", routers[r], st.router_stability, want);
        }
        fixture_free(&f);
    }
}

/* within / between in double: tokens x [n][d] clustered by label [n] (stride k), weights w
   [rows][d] per cluster or none. */
static double tightness_by_hand(const float *x, int n, int d, const int32_t *label, int k, const float *w, int rows) {
    double mu[4][6] = {{0}}, within = 0.0, between = 0.0;
    int count[4] = {0}, t, a, b, q, pairs = 0, tokens = 0;
    for (t = 0; t < n; t++) {
        count[label[t * k]]++;
        for (q = 0; q < d; q++) mu[label[t * k]][q] += x[t * d + q];
    }
    for (a = 0; a < rows; a++)
        for (q = 0; q < d && count[a]; q++) mu[a][q] /= count[a];
    for (t = 0; t < n; t++) {
        double sq = 0.0;
        const int c = label[t * k];
        if (count[c] < 2) continue; /* no spread: left out */
        for (q = 0; q < d; q++) sq += (w ? w[c * d + q] : 1.0) * pow(x[t * d + q] - mu[c][q], 2);
        within += sqrt(sq), tokens++;
    }
    for (a = 0; a < rows; a++)
        for (b = a + 1; b < rows; b++) {
            double sq = 0.0;
            if (count[a] < 2 || count[b] < 2) continue;
            for (q = 0; q < d; q++) sq += (w ? 0.5 * (w[a * d + q] + w[b * d + q]) : 1.0) * pow(mu[a][q] - mu[b][q], 2);
            between += sqrt(sq), pairs++;
        }
    return (within / tokens) / (between / pairs);
}

/* Cluster tightness of an SMoE and a Soft MoE layer, plain and in the AC metric, against the
   formula by hand with the AC router's own weights (robust mode) for the same clusters, a
   cluster of one token left out; dense is refused. */
static void test_moe_tightness(void) {
    static const char routers[2] = {'g', 'n'};
    static const int sizes[2] = {24, 6};
    int r, z, singletons = 0;
    for (r = 0; r < 2; r++)
        for (z = 0; z < 2; z++) {
            const int n = sizes[z];
            fixture f;
            acmoe_tightness tight;
            acmoe_moe_desc d = small_desc(routers[r], ACMOE_ACT_GELU);
            acmoe_moe_stats st;
            float w[4 * 6];
            int32_t experts[24 * 2];
            float gates[24 * 2];
            int rows = 0, i, count[4] = {0};
            d.mix_k = 2;
            fixture_make_desc(&f, &d, n, 43 + (uint64_t)z);
            CHECK_STATUS(acmoe_moe_tightness(f.layer, &tight), ACMOE_ERR_ARG); /* no forward call yet */
            CHECK(isfinite(fixture_loss(&f)));
            CHECK_STATUS(acmoe_moe_tightness(f.layer, &tight), ACMOE_OK);
            st = acmoe_moe_last_stats(f.layer);
            for (i = 0; i < n; i++) {
                const int best = st.expert_index[i * st.top_k];
                rows = best + 1 > rows ? best + 1 : rows, count[best]++;
            }
            for (i = 0; i < 4; i++) singletons += count[i] == 1;
            {
                acmoe_ac_desc ac = acmoe_moe_settings(f.layer).ac;
                int w_rows = 0;
                ac.robust = 1;
                CHECK_STATUS(acmoe_ac_route(&ac, f.x, n, 6, st.expert_index, st.top_k, f.params, 4, 2, experts, gates,
                                            NULL, w, &w_rows),
                             ACMOE_OK);
                CHECK(w_rows == rows);
            }
            if (tight.clusters >= 2) {
                CHECKF(fabs(tight.plain - tightness_by_hand(f.x, n, 6, st.expert_index, st.top_k, NULL, rows)) < 1e-5,
                       "%c plain %g", routers[r], tight.plain);
                CHECKF(fabs(tight.ac - tightness_by_hand(f.x, n, 6, st.expert_index, st.top_k, w, rows)) < 1e-5,
                       "%c ac %g", routers[r], tight.ac);
                CHECK(fabs(tight.ac - tight.plain) > 1e-3); /* the weights matter on random features */
            } else {
                CHECK(tight.plain == 0.0f && tight.ac == 0.0f);
            }
            CHECK(z == 1 || tight.clusters >= 2);
            fixture_free(&f);
        }
    CHECK(singletons > 0); /* some case left a cluster out */
    {
        fixture f;
        acmoe_tightness tight;
        fixture_make(&f, 'f', ACMOE_ACT_GELU, 8, 44);
        CHECK(isfinite(fixture_loss(&f)));
        CHECK_STATUS(acmoe_moe_tightness(f.layer, &tight), ACMOE_ERR_ARG);
        CHECK_STATUS(acmoe_moe_tightness(NULL, &tight), ACMOE_ERR_NULL);
        fixture_free(&f);
    }
}

static void test_moe_soft_paper_vectors(void) {
    static const double mixed[4][3] = {{.188386, .353206, .569541}, {.397393, .525119, .351340},
                                       {.197576, .360764, .559947}, {.147170, .319304, .612571}};
    static const double mixed_logits[4][2] = {{.853318, -.160161}, {.708496, -.088036}, {.418037, -.502272},
                                              {.554399, -.942453}};
    static const int mixed_labels[4][2] = {{0, 1}, {1, 0}, {0, 1}, {0, 1}};
    static const double own[4][3] = {{.175559, .415267, .767471}, {.325980, .494315, .743688},
                                     {.193463, .424675, .764640}, {.199595, .427898, .763670}};
    static const double own_logits[4][2] = {{1.017215, -.272111}, {.453289, .159530}, {.496203, -.557828},
                                            {.327036, -.652403}};
    static const int own_labels[4][2] = {{0, 1}, {1, 0}, {0, 1}, {0, 1}};
    static const double plain[4][3] = {{.260883, .329377, .341242}, {.409032, .497095, .201782},
                                       {.309364, .384262, .295604}, {.192828, .252333, .405305}};
    static const double plain_logits[4][2] = {{.707107, 0}, {.707107, 0}, {0, -.235702}, {.565685, -.989949}};
    static const int plain_labels[4][2] = {{0, 1}, {1, 0}, {0, 1}, {0, 1}};
    check_soft_vectors('a', 1, mixed, mixed_labels, mixed_logits);
    check_soft_vectors('a', 0, own, own_labels, own_logits);
    check_soft_vectors('n', 0, plain, plain_labels, plain_logits);
}

/* The balance loss (plain and at temperature 0.3) and the z-loss, through backward. */
static void test_grad_aux_losses(void) {
    acmoe_moe_desc d = small_desc('g', ACMOE_ACT_GELU);
    d.balance_alpha = 0.5f;
    d.z_loss = 0.1f;
    check_gradients_desc(&d, 41);
    d = small_desc('o', ACMOE_ACT_GELU);
    d.balance_alpha = 0.5f;
    d.balance_temperature = 0.3f;
    check_gradients_desc(&d, 42);
}

/* Swin-MoE's gate (priority selection, the load and importance loss) through backward,
   without AC and with the AC weights on the whole input; a weight of 5 makes the loss's
   gradient large enough to check, and a capacity of 0.75 drops pairs. */
static void test_grad_priority(void) {
    acmoe_moe_desc d = small_desc('t', ACMOE_ACT_GELU);
    d.importance_loss = 5.0f;
    d.capacity = 0.75f;
    check_gradients_desc(&d, 51);
    d = small_desc('w', ACMOE_ACT_GELU);
    d.importance_loss = 5.0f;
    d.capacity = 0.75f;
    check_gradients_desc(&d, 52);
}

/* Swin-MoE's selection against the rule written out, in evaluation mode and in training
   mode (noise of deviation 1 / E, drawn token by token from the generator given): the
   top-2 by the full softmax of the noisy logits, gates those probabilities, then each
   expert's places given out by the tokens' best probability, first choices first, and those
   past 2 x floor(capacity x ceil(n / E)) dropped; and the load and importance loss. */
static void test_moe_priority_reference(void) {
    enum { N = 16, DM = 6, E = 4, K = 2 };
    int train;
    for (train = 0; train < 2; train++) {
        acmoe_moe_desc d = small_desc('t', ACMOE_ACT_GELU);
        fixture f;
        acmoe_rng noise, copy;
        acmoe_moe_stats st;
        double z[N][E], noisy[N][E], prob[N][E], clean[N][E], importance[E] = {0}, load[E] = {0}, loss;
        int top[N][K], order[N], place[E] = {0}, keep[N][K], t, j, r, i, pairs = 0, dropped = 0, bad = 0;
        const int cap = K * (int)(0.75 * ((N + E - 1) / E));
        d.capacity = 0.75f; /* 6 places an expert for 32 assignments: some are dropped */
        fixture_make_desc(&f, &d, N, 61 + (uint64_t)train);
        acmoe_rng_seed(&noise, 5);
        copy = noise;
        acmoe_moe_set_training(f.layer, train, &noise);
        CHECK(isfinite(fixture_loss(&f)));
        st = acmoe_moe_last_stats(f.layer);
        for (t = 0; t < N; t++) { /* logits: the router weight (no bias) comes first */
            double top_z = -1e30, sum = 0.0, sum_clean = 0.0, top_clean = -1e30;
            for (j = 0; j < E; j++) {
                z[t][j] = 0.0;
                for (i = 0; i < DM; i++) z[t][j] += (double)f.params[j * DM + i] * f.x[t * DM + i];
                noisy[t][j] = (float)z[t][j] + (train ? (1.0f / E) * acmoe_rng_normal(&copy) : 0.0f);
                top_z = fmax(top_z, noisy[t][j]), top_clean = fmax(top_clean, z[t][j]);
            }
            for (j = 0; j < E; j++) sum += prob[t][j] = exp(noisy[t][j] - top_z);
            for (j = 0; j < E; j++) sum_clean += clean[t][j] = exp(z[t][j] - top_clean);
            for (j = 0; j < E; j++) prob[t][j] /= sum, clean[t][j] /= sum_clean;
            for (r = 0; r < K; r++) { /* the best two by probability, ties to the lower index */
                int best = -1;
                for (j = 0; j < E; j++)
                    if ((r == 0 || j != top[t][0]) && (best < 0 || prob[t][j] > prob[t][best])) best = j;
                top[t][r] = best;
            }
            order[t] = t;
        }
        for (i = 1; i < N; i++) /* priority: the best probability, then the lower index */
            for (r = i; r > 0 && prob[order[r]][top[order[r]][0]] > prob[order[r - 1]][top[order[r - 1]][0]]; r--) {
                int swap = order[r];
                order[r] = order[r - 1], order[r - 1] = swap;
            }
        for (r = 0; r < K; r++)
            for (i = 0; i < N; i++) keep[order[i]][r] = place[top[order[i]][r]]++ < cap;
        for (t = 0; t < N; t++)
            for (r = 0; r < K; r++) {
                if (!keep[t][r]) {
                    dropped++;
                    continue;
                }
                bad += pairs >= st.pairs || st.pair_token[pairs] != t || st.pair_expert[pairs] != top[t][r] ||
                       fabs(st.pair_gate[pairs] - prob[t][top[t][r]]) > 1e-6;
                pairs++;
            }
        CHECKF(bad == 0 && pairs == st.pairs && dropped == st.dropped && dropped > 0,
               "train %d: %d of %d pairs differ, %d dropped (want %d)", train, bad, st.pairs, st.dropped, dropped);
        for (t = 0; t < N; t++) {
            double threshold = noisy[t][top[t][K - 1]];
            CHECK(st.expert_index[t * K] == top[t][0] && st.expert_index[t * K + 1] == top[t][1]);
            for (j = 0; j < E; j++) {
                importance[j] += clean[t][j];
                load[j] += 0.5 * erfc(-(clean[t][j] - threshold) / (0.25 * sqrt(2.0)));
            }
        }
        {
            double spread[2], *v[2], mean, var;
            v[0] = importance, v[1] = load;
            for (r = 0; r < 2; r++) {
                for (mean = 0.0, j = 0; j < E; j++) mean += v[r][j] / E;
                for (var = 0.0, j = 0; j < E; j++) var += (v[r][j] - mean) * (v[r][j] - mean) / (E - 1);
                spread[r] = var / (mean * mean + 1e-10);
            }
            loss = 0.01 * (spread[0] + spread[1]) / 2.0;
            CHECKF(fabs(st.aux_loss - loss) < 1e-6 + 1e-4 * loss, "train %d: aux loss %g, want %g", train, st.aux_loss, loss);
        }
        if (train) CHECK(memcmp(&noise, &copy, sizeof noise) == 0); /* one draw per logit, in order */
        fixture_free(&f);
    }
}

/* The forward pass against a plain evaluation of the formula, token by token. */
static void test_moe_forward_reference(void) {
    fixture f;
    acmoe_moe_stats st;
    const int dm = 6, ff = 5;
    int t, s, q, j, bad = 0, load[4] = {0};
    fixture_make(&f, 'g', ACMOE_ACT_RELU, 12, 7);
    CHECK(isfinite(fixture_loss(&f)));
    st = acmoe_moe_last_stats(f.layer);
    CHECK(st.n_tokens == 12 && st.top_k == 2 && st.n_experts == 4);
    for (t = 0; t < 12; t++) {
        /* parameters in layout order: router weights [4][6], bias [4], w1, b1, w2, b2 */
        const float *wr = f.params, *br = wr + 24, *w1 = br + 4, *b1 = w1 + 4 * ff * dm, *w2 = b1 + 4 * ff;
        const float *b2 = w2 + 4 * dm * ff, *x = f.x + t * dm;
        double z[4], top1 = -1e30, gsum = 0.0, want[6] = {0};
        int e0 = -1, e1 = -1;
        for (j = 0; j < 4; j++) {
            z[j] = br[j];
            for (q = 0; q < dm; q++) z[j] += (double)wr[j * dm + q] * x[q];
            if (z[j] > top1) top1 = z[j], e0 = j;
        }
        for (j = 0; j < 4; j++)
            if (j != e0 && (e1 < 0 || z[j] > z[e1])) e1 = j;
        CHECK(st.expert_index[2 * t] == e0 && st.expert_index[2 * t + 1] == e1);
        load[e0]++, load[e1]++;
        gsum = 1.0 + exp(z[e1] - z[e0]);
        for (s = 0; s < 2; s++) {
            int e = s ? e1 : e0, i;
            double gate = (s ? exp(z[e1] - z[e0]) : 1.0) / gsum, hid[5];
            CHECK(fabs(gate - st.gate[2 * t + s]) < 1e-5);
            for (i = 0; i < ff; i++) {
                hid[i] = b1[e * ff + i];
                for (q = 0; q < dm; q++) hid[i] += (double)w1[(e * ff + i) * dm + q] * x[q];
                if (hid[i] < 0) hid[i] = 0;
            }
            for (q = 0; q < dm; q++) {
                double y = b2[e * dm + q];
                for (i = 0; i < ff; i++) y += (double)w2[(e * dm + q) * ff + i] * hid[i];
                want[q] += gate * y;
            }
        }
        for (q = 0; q < dm; q++) bad += fabs(want[q] - f.out[t * dm + q]) > 1e-5 * (1 + fabs(want[q]));
    }
    CHECKF(bad == 0, "%d outputs differ", bad);
    for (j = 0; j < 4; j++) CHECK(st.tokens_per_expert[j] == load[j]);
    fixture_free(&f);
}

/* Soft MoE against a plain evaluation of its formula: 3 sequences of 4 tokens, 2 slots
   per expert; and the weights' invariants. */
static void test_moe_soft_reference(void) {
    enum { N = 12, DM = 6, FF = 5, E = 4, P = 2, S = E * P, LEN = 4 };
    acmoe_moe_desc d = small_desc('m', ACMOE_ACT_RELU);
    fixture f;
    acmoe_moe_stats st;
    const float *phi, *w1, *b1, *w2, *b2;
    double scale, xhat[N][DM], phat[S][DM], z[N][S], comb[N][S], disp[N][S], slot_in[3][S][DM], slot_out[3][S][DM];
    int t, c, q, i, g, j, bad = 0;
    d.group = ACMOE_GROUP_SEQUENCE;
    d.seq_len = LEN;
    d.soft_slots = P;
    fixture_make_desc(&f, &d, N, 91);
    /* parameters in layout order: slot vectors [S][6], scale, w1, b1, w2, b2 */
    phi = f.params, w1 = phi + S * DM + 1, b1 = w1 + E * FF * DM, w2 = b1 + E * FF, b2 = w2 + E * DM * FF;
    f.params[S * DM] = 2.5f; /* a scale other than its initial 1 */
    scale = f.params[S * DM];
    CHECK(isfinite(fixture_loss(&f)));
    st = acmoe_moe_last_stats(f.layer);
    for (t = 0; t < N; t++) { /* unit rows, logits, the combine softmax over the slots */
        double norm = 0.0, top = -1e30, sum = 0.0;
        for (q = 0; q < DM; q++) norm += (double)f.x[t * DM + q] * f.x[t * DM + q];
        for (q = 0; q < DM; q++) xhat[t][q] = f.x[t * DM + q] / sqrt(norm);
        for (c = 0; c < S; c++) {
            double pn = 0.0;
            for (q = 0; q < DM; q++) pn += (double)phi[c * DM + q] * phi[c * DM + q];
            for (q = 0; q < DM; q++) phat[c][q] = phi[c * DM + q] / sqrt(pn);
            z[t][c] = 0.0;
            for (q = 0; q < DM; q++) z[t][c] += scale * xhat[t][q] * phat[c][q];
            top = fmax(top, z[t][c]);
        }
        for (c = 0; c < S; c++) sum += comb[t][c] = exp(z[t][c] - top);
        for (c = 0; c < S; c++) comb[t][c] /= sum;
    }
    for (g = 0; g < 3; g++)
        for (c = 0; c < S; c++) { /* the dispatch softmax over the sequence, the slot's input */
            double sum = 0.0;
            for (i = 0; i < LEN; i++) sum += disp[g * LEN + i][c] = exp(z[g * LEN + i][c]);
            for (q = 0; q < DM; q++) slot_in[g][c][q] = 0.0;
            for (i = 0; i < LEN; i++) {
                disp[g * LEN + i][c] /= sum;
                for (q = 0; q < DM; q++) slot_in[g][c][q] += disp[g * LEN + i][c] * f.x[(g * LEN + i) * DM + q];
            }
            j = c / P; /* the slot's expert */
            for (q = 0; q < DM; q++) slot_out[g][c][q] = b2[j * DM + q];
            for (i = 0; i < FF; i++) {
                double h = b1[j * FF + i];
                for (q = 0; q < DM; q++) h += (double)w1[(j * FF + i) * DM + q] * slot_in[g][c][q];
                for (q = 0; q < DM && h > 0.0; q++) slot_out[g][c][q] += (double)w2[(j * DM + q) * FF + i] * h;
            }
        }
    for (t = 0; t < N; t++) {
        double col_sum = 0.0, row_sum = 0.0;
        for (q = 0; q < DM; q++) {
            double want = 0.0;
            for (c = 0; c < S; c++) want += comb[t][c] * slot_out[t / LEN][c][q];
            bad += fabs(want - f.out[t * DM + q]) > 1e-5 * (1.0 + fabs(want));
        }
        for (c = 0; c < S; c++) {
            bad += fabs(comb[t][c] - st.slot_combine[t * S + c]) > 1e-6 || fabs(disp[t][c] - st.slot_dispatch[t * S + c]) > 1e-6;
            row_sum += st.slot_combine[t * S + c];
            if (t % LEN == 0)
                for (i = 0, col_sum = 0.0; i < LEN; i++) col_sum += st.slot_dispatch[(t + i) * S + c];
            CHECK(t % LEN != 0 || fabs(col_sum - 1.0) < 1e-5);
        }
        CHECK(fabs(row_sum - 1.0) < 1e-5);
        { /* the next layer's labels: the experts of all S slots (mix_k 8) by logit, their
             combine weights renormalised over them */
            int taken[S] = {0}, r;
            CHECK(st.top_k == S);
            for (r = 0; r < S; r++) {
                int best = -1;
                for (c = 0; c < S; c++)
                    if (!taken[c] && (best < 0 || z[t][c] > z[t][best])) best = c;
                taken[best] = 1;
                CHECK(st.expert_index[t * S + r] == best / P);
                bad += fabs(st.gate[t * S + r] - comb[t][best]) > 1e-5;
            }
        }
    }
    CHECKF(bad == 0, "%d outputs or weights differ", bad);
    CHECK(st.n_slots == S && st.pairs == 0 && st.dropped == 0);
    for (j = 0; j < E; j++) CHECK(st.tokens_per_expert[j] == 3 * P);
    CHECK_STATUS(acmoe_moe_backward(f.layer, f.ctx, f.r, f.dx), ACMOE_OK);
    fixture_free(&f);
}

/* A Soft MoE token's output depends only on its group: with position groups, only on the
   tokens at its position (so causal models may use it), with sequence groups only on its
   sequence. */
static void test_moe_soft_groups(void) {
    static const acmoe_group groups[2] = {ACMOE_GROUP_POSITION, ACMOE_GROUP_SEQUENCE};
    int g, t, q;
    for (g = 0; g < 2; g++) {
        acmoe_moe_desc d = small_desc('m', ACMOE_ACT_RELU);
        fixture f;
        float before[12 * 6];
        int changed = 0, leaked = 0;
        d.group = groups[g];
        d.seq_len = 4; /* 3 sequences of 4 tokens */
        fixture_make_desc(&f, &d, 12, 95 + (uint64_t)g);
        CHECK(isfinite(fixture_loss(&f)));
        memcpy(before, f.out, sizeof before);
        for (q = 0; q < 6; q++) f.x[5 * 6 + q] += 1.0f; /* token 5: position 1 of sequence 1 */
        CHECK(isfinite(fixture_loss(&f)));
        for (t = 0; t < 12; t++) {
            int same_group = groups[g] == ACMOE_GROUP_POSITION ? t % 4 == 1 : t / 4 == 1;
            int differs = memcmp(before + t * 6, f.out + t * 6, sizeof(float) * 6) != 0;
            changed += same_group && differs;
            leaked += !same_group && differs;
        }
        CHECKF(leaked == 0 && changed == 3 + (groups[g] == ACMOE_GROUP_SEQUENCE),
               "group rule %d: %d tokens of other groups changed, %d of its own", g, leaked, changed);
        fixture_free(&f);
    }
}

/* Top-k gates sum to 1 and every token gets k pairs; one token works. */
static void test_moe_routing_invariants(void) {
    const char routers[4] = {'g', 'o', 'x', 'c'};
    int r, t, s, total;
    for (r = 0; r < 4; r++) {
        fixture f;
        acmoe_moe_stats st;
        fixture_make(&f, routers[r], ACMOE_ACT_RELU, 12, 11);
        CHECK(isfinite(fixture_loss(&f)));
        st = acmoe_moe_last_stats(f.layer);
        for (t = 0, total = 0; t < 12; t++) {
            float sum = 0.0f;
            for (s = 0; s < 2; s++) sum += st.gate[2 * t + s];
            CHECK(fabsf(sum - 1.0f) < 1e-5f && st.gate[2 * t] >= st.gate[2 * t + 1]);
        }
        for (s = 0; s < 4; s++) total += st.tokens_per_expert[s];
        CHECK(total == 24 && st.pairs == 24 && st.dropped == 0 && st.aux_loss == 0.0f);
        for (t = 0; t < 24; t++) CHECK(st.pair_token[t] == t / 2 && st.pair_expert[t] == st.expert_index[t]);
        if (routers[r] == 'c') CHECK(st.ac_clusters == 3 && st.ac_w_min > 0 && st.ac_w_max >= st.ac_w_mean);
        fixture_free(&f);
    }
    {
        fixture f;
        fixture_make(&f, 'g', ACMOE_ACT_RELU, 1, 12);
        CHECK(isfinite(fixture_loss(&f)));
        CHECK(acmoe_moe_last_stats(f.layer).n_tokens == 1);
        CHECK_STATUS(acmoe_moe_backward(f.layer, f.ctx, f.r, f.dx), ACMOE_OK);
        fixture_free(&f);
    }
}

/* USMoE: exactly round(budget |G|) pairs in every group, for each grouping, fractional
   budgets included; a token may get any number of experts. */
static void test_moe_usmoe_budget(void) {
    static const acmoe_group groups[3] = {ACMOE_GROUP_BATCH, ACMOE_GROUP_SEQUENCE, ACMOE_GROUP_POSITION};
    static const float budgets[2] = {2.0f, 1.25f};
    int g, b, p;
    for (g = 0; g < 3; g++)
        for (b = 0; b < 2; b++) {
            acmoe_moe_desc d = small_desc('u', ACMOE_ACT_RELU);
            acmoe_moe_stats st;
            fixture f;
            int per_group[12] = {0}, n_groups = groups[g] == ACMOE_GROUP_BATCH ? 1 : (groups[g] == ACMOE_GROUP_SEQUENCE ? 3 : 4);
            int size = 12 / n_groups, want = (int)floor(budgets[b] * size + 0.5);
            d.group = groups[g];
            d.usmoe_budget = budgets[b];
            d.seq_len = 4; /* 3 sequences of 4 tokens */
            fixture_make_desc(&f, &d, 12, 50 + (uint64_t)(g * 2 + b));
            CHECK(isfinite(fixture_loss(&f)));
            st = acmoe_moe_last_stats(f.layer);
            for (p = 0; p < st.pairs; p++) {
                int t = st.pair_token[p];
                per_group[groups[g] == ACMOE_GROUP_BATCH ? 0 : (groups[g] == ACMOE_GROUP_SEQUENCE ? t / 4 : t % 4)]++;
                CHECK(st.pair_gate[p] > 0.0f && st.pair_gate[p] < 1.0f);
            }
            for (p = 0; p < n_groups; p++) CHECKF(per_group[p] == want, "group %d: %d pairs, want %d", p, per_group[p], want);
            fixture_free(&f);
        }
    {
        acmoe_moe_desc d = small_desc('u', ACMOE_ACT_RELU);
        fixture f;
        d.group = ACMOE_GROUP_SEQUENCE;
        d.seq_len = 5;
        fixture_make_desc(&f, &d, 12, 59);
        CHECK_STATUS(acmoe_moe_forward(f.layer, f.ctx, f.x, 12, NULL, NULL, 0, f.out), ACMOE_ERR_SHAPE);
        fixture_free(&f);
    }
}

/* Expert choice: every expert takes exactly ceil(capacity n / E) tokens. */
static void test_moe_expert_choice_capacity(void) {
    fixture f;
    acmoe_moe_stats st;
    int j, p, seen[4][12] = {{0}};
    fixture_make(&f, 'e', ACMOE_ACT_RELU, 12, 61); /* capacity 2: 6 tokens per expert */
    CHECK(isfinite(fixture_loss(&f)));
    st = acmoe_moe_last_stats(f.layer);
    CHECK(st.pairs == 24);
    for (j = 0; j < 4; j++) CHECK(st.tokens_per_expert[j] == 6);
    for (p = 0; p < st.pairs; p++) seen[st.pair_expert[p]][st.pair_token[p]]++;
    for (j = 0; j < 4; j++)
        for (p = 0; p < 12; p++) CHECK(seen[j][p] <= 1);
    fixture_free(&f);
}

/* A capacity drops the pairs past it, later ranks first, and no expert exceeds it. */
static void test_moe_capacity_drops(void) {
    acmoe_moe_desc d = small_desc('g', ACMOE_ACT_RELU);
    fixture f;
    acmoe_moe_stats st;
    int j;
    d.capacity = 0.5f; /* ceil(0.5 * 12 * 2 / 4) = 3 pairs per expert */
    fixture_make_desc(&f, &d, 12, 71);
    CHECK(isfinite(fixture_loss(&f)));
    st = acmoe_moe_last_stats(f.layer);
    for (j = 0; j < 4; j++) CHECK(st.tokens_per_expert[j] <= 3);
    CHECK(st.dropped > 0 && st.pairs + st.dropped == 24);
    CHECK_STATUS(acmoe_moe_backward(f.layer, f.ctx, f.r, f.dx), ACMOE_OK);
    fixture_free(&f);
}

/* Switch routes one expert with the full-softmax probability as its gate. */
static void test_moe_switch_gate(void) {
    fixture f;
    acmoe_moe_stats st;
    int t;
    fixture_make(&f, 's', ACMOE_ACT_RELU, 12, 13);
    CHECK(isfinite(fixture_loss(&f)));
    st = acmoe_moe_last_stats(f.layer);
    CHECK(st.pairs == 12);
    for (t = 0; t < 12; t++) { /* the pair's gate is p; the hand-off gate, softmax over k = 1, is 1 */
        CHECK(st.pair_token[t] == t && st.pair_expert[t] == st.expert_index[t]);
        CHECK(st.pair_gate[t] > 0.25f && st.pair_gate[t] < 1.0f && st.gate[t] == 1.0f);
    }
    fixture_free(&f);
}

/* The same call twice, and on one thread or two, gives the same bits, backward included
   (AC, and Soft MoE over sequences). */
static void test_moe_deterministic(void) {
    const char routers[2] = {'c', 'm'};
    int r;
    for (r = 0; r < 2; r++) {
        acmoe_moe_desc d = small_desc(routers[r], ACMOE_ACT_GELU);
        fixture f;
        float first[12 * 6], first_dx[12 * 6], *first_grads;
        acmoe_ctx *two;
        d.group = ACMOE_GROUP_SEQUENCE;
        d.seq_len = 4;
        fixture_make_desc(&f, &d, 12, 17);
        first_grads = (float *)calloc(f.n_params, sizeof(float));
        CHECK(isfinite(fixture_loss(&f)));
        memcpy(first, f.out, sizeof first);
        CHECK_STATUS(acmoe_moe_backward(f.layer, f.ctx, f.r, f.dx), ACMOE_OK);
        memcpy(first_dx, f.dx, sizeof first_dx);
        memcpy(first_grads, f.grads, sizeof(float) * f.n_params);
        CHECK(isfinite(fixture_loss(&f)));
        CHECK(memcmp(first, f.out, sizeof first) == 0);
        two = test_context(2, 0, 0, 0);
        memset(f.grads, 0, sizeof(float) * f.n_params);
        CHECK_STATUS(acmoe_moe_forward(f.layer, two, f.x, 12, f.prev, NULL, 2, f.out), ACMOE_OK);
        CHECK_STATUS(acmoe_moe_backward(f.layer, two, f.r, f.dx), ACMOE_OK);
        CHECK(memcmp(first, f.out, sizeof first) == 0);
        CHECK(memcmp(first_dx, f.dx, sizeof first_dx) == 0);
        CHECK(memcmp(first_grads, f.grads, sizeof(float) * f.n_params) == 0);
        acmoe_ctx_destroy(two);
        free(first_grads);
        fixture_free(&f);
    }
}

/* Enough tokens for the AC statistics by blocks of tokens: the same weights and outputs on
   one, two and three threads, and the weights acmoe_ac_route gives for the same tokens and
   labels. */
static void test_moe_ac_blocks(void) {
    enum { n = 131, dm = 6 };
    acmoe_moe_desc d = small_desc('c', ACMOE_ACT_GELU);
    fixture f;
    float first_out[n * dm], first_w[3 * dm], route_w[3 * dm], gates[n * 2];
    int32_t experts[n * 2];
    const float *w;
    int rows = 0, threads;
    d.max_tokens = n;
    fixture_make_desc(&f, &d, n, 41);
    CHECK(isfinite(fixture_loss(&f)));
    memcpy(first_out, f.out, sizeof first_out);
    w = acmoe_moe_ac_weights(f.layer, &rows);
    CHECK(w != NULL && rows == 3);
    memcpy(first_w, w, sizeof first_w);
    for (threads = 2; threads <= 3; threads++) {
        acmoe_ctx *ctx = test_context(threads, 0, 0, 0);
        CHECK_STATUS(acmoe_moe_forward(f.layer, ctx, f.x, n, f.prev, f.prev_gate, 2, f.out), ACMOE_OK);
        w = acmoe_moe_ac_weights(f.layer, &rows);
        CHECKF(memcmp(first_out, f.out, sizeof first_out) == 0 && memcmp(first_w, w, sizeof first_w) == 0,
               "%d threads changed the bits", threads);
        acmoe_ctx_destroy(ctx);
    }
    {
        acmoe_ac_desc ac = acmoe_moe_settings(f.layer).ac;
        CHECK_STATUS(acmoe_ac_route(&ac, f.x, n, dm, f.prev, 2, f.params, 4, 2, experts, gates, NULL, route_w, &rows),
                     ACMOE_OK);
        CHECK(rows == 3 && memcmp(route_w, first_w, sizeof first_w) == 0);
    }
    fixture_free(&f);
}

/* A layer input large enough to be checked on two threads: a NaN or an infinity in either
   thread's part, at its first or last element, is refused; the clean input is not. */
static void test_moe_nonfinite_input_threads(void) {
    enum { N = 2048, D = 64 };
    const size_t count = (size_t)N * D, at[] = {0, count / 2 - 1, count / 2, count - 1};
    const float poison[] = {NAN, INFINITY, -INFINITY};
    acmoe_ctx *ctx = test_context(2, 0, 0, 0);
    acmoe_moe_desc desc;
    acmoe_moe *layer = NULL;
    acmoe_rng rng;
    float *params, *grads, *x = (float *)malloc(sizeof(float) * count), *out = (float *)malloc(sizeof(float) * count);
    size_t i, j, k;
    memset(&desc, 0, sizeof desc);
    desc.d_model = D, desc.d_ff = D, desc.n_experts = 4, desc.top_k = 2, desc.max_tokens = N;
    CHECK_STATUS(acmoe_moe_router_preset(&desc, 'g'), ACMOE_OK);
    params = (float *)malloc(sizeof(float) * acmoe_moe_param_count(&desc));
    grads = (float *)calloc(acmoe_moe_param_count(&desc), sizeof(float));
    CHECK_STATUS(acmoe_moe_create(&layer, &desc, params, grads), ACMOE_OK);
    acmoe_rng_seed(&rng, 5);
    acmoe_moe_init_params(layer, &rng);
    for (i = 0; i < count; i++) x[i] = 2.0f * acmoe_rng_uniform(&rng) - 1.0f;
    for (j = 0; j < sizeof at / sizeof at[0]; j++)
        for (k = 0; k < sizeof poison / sizeof poison[0]; k++) {
            const float keep = x[at[j]];
            x[at[j]] = poison[k];
            CHECK_STATUS(acmoe_moe_forward(layer, ctx, x, N, NULL, NULL, 0, out), ACMOE_ERR_NONFINITE);
            x[at[j]] = keep;
        }
    CHECK_STATUS(acmoe_moe_forward(layer, ctx, x, N, NULL, NULL, 0, out), ACMOE_OK);
    acmoe_moe_destroy(layer);
    acmoe_ctx_destroy(ctx);
    free(params), free(grads), free(x), free(out);
}

/* An AC layer checks its input as its statistics first read it, a block of tokens at a time:
   a NaN or an infinity at either end of x or of any block of tokens, on one thread or two,
   is refused, with the layer's AC weights and their row count as the last good call left
   them; the clean input passes and gives the same bits as before. */
static void test_moe_ac_nonfinite_input(void) {
    enum { N = 1030, D = 32, E = 4 };
    const float poison[] = {NAN, INFINITY, -INFINITY};
    fixture f;
    acmoe_moe_desc desc;
    acmoe_moe *layer;
    acmoe_rng rng;
    float *x, *out, *first = (float *)malloc(sizeof(float) * N * D), good_w[E * D];
    int32_t *prev;
    const float *w;
    int32_t keep_label[2];
    int threads, rows, good_rows, b, end, p, t;
    memset(&desc, 0, sizeof desc);
    desc.d_model = D, desc.d_ff = D, desc.n_experts = E, desc.top_k = 2, desc.max_tokens = N;
    CHECK_STATUS(acmoe_moe_router_preset(&desc, 'c'), ACMOE_OK);
    fixture_make_desc(&f, &desc, N, 9);
    layer = f.layer, x = f.x, out = f.out, prev = f.prev;
    acmoe_rng_seed(&rng, 9);
    for (t = 0; t < N; t++) prev[2 * t] = (int32_t)acmoe_rng_below(&rng, E), prev[2 * t + 1] = (prev[2 * t] + 1) % E;
    for (threads = 1; threads <= 2; threads++) {
        acmoe_ctx *ctx = test_context(threads, 0, 0, 0);
        CHECK_STATUS(acmoe_moe_forward(layer, ctx, x, N, prev, NULL, 2, out), ACMOE_OK);
        if (threads == 1) memcpy(first, out, sizeof(float) * N * D);
        CHECK(memcmp(first, out, sizeof(float) * N * D) == 0);
        w = acmoe_moe_ac_weights(layer, &good_rows);
        CHECK(w != NULL && good_rows == E);
        memcpy(good_w, w, sizeof good_w);
        keep_label[0] = prev[0], keep_label[1] = prev[1];
        prev[0] = E - 1, prev[1] = 0; /* so that a call that got as far as the counts would change them */
        for (b = 0; b < 8; b++)
            for (end = 0; end < 2; end++)
                for (p = 0; p < 3; p++) {
                    const size_t at = end ? (size_t)(N * (b + 1) / 8) * D - 1 : (size_t)(N * b / 8) * D;
                    const float keep = x[at];
                    x[at] = poison[p];
                    CHECK_STATUS(acmoe_moe_forward(layer, ctx, x, N, prev, NULL, 2, out), ACMOE_ERR_NONFINITE);
                    x[at] = keep;
                    w = acmoe_moe_ac_weights(layer, &rows);
                    CHECKF(rows == good_rows && memcmp(w, good_w, sizeof good_w) == 0,
                           "%d threads: a refused input at %zu changed the AC weights", threads, at);
                }
        prev[0] = keep_label[0], prev[1] = keep_label[1];
        acmoe_ctx_destroy(ctx);
    }
    fixture_free(&f);
    free(first);
}

static void test_moe_bad_input(void) {
    fixture f;
    acmoe_moe_desc d;
    acmoe_moe *layer = NULL;
    int32_t bad_prev[24];
    float grads[8];
    fixture_make(&f, 'c', ACMOE_ACT_RELU, 12, 19);
    CHECK_STATUS(acmoe_moe_forward(f.layer, f.ctx, f.x, 12, NULL, NULL, 2, f.out), ACMOE_ERR_NULL); /* AC needs labels */
    memcpy(bad_prev, f.prev, sizeof bad_prev);
    bad_prev[4] = 4; /* at or past ac_max_clusters (= n_experts) */
    CHECK_STATUS(acmoe_moe_forward(f.layer, f.ctx, f.x, 12, bad_prev, NULL, 2, f.out), ACMOE_ERR_ARG);
    bad_prev[4] = -1;
    CHECK_STATUS(acmoe_moe_forward(f.layer, f.ctx, f.x, 12, bad_prev, NULL, 2, f.out), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_moe_forward(f.layer, f.ctx, f.x, 33, f.prev, NULL, 2, f.out), ACMOE_ERR_SHAPE); /* > max_tokens */
    CHECK_STATUS(acmoe_moe_backward(f.layer, f.ctx, f.r, f.dx), ACMOE_ERR_ARG); /* no good forward yet */
    f.x[3] = NAN;
    CHECK_STATUS(acmoe_moe_forward(f.layer, f.ctx, f.x, 12, f.prev, NULL, 2, f.out), ACMOE_ERR_NONFINITE);
    f.x[3] = 0.5f;
    CHECK_STATUS(acmoe_moe_forward(f.layer, f.ctx, f.x, 12, f.prev, NULL, 2, f.out), ACMOE_OK);
    CHECK_STATUS(acmoe_moe_backward(f.layer, f.ctx, f.r, f.dx), ACMOE_OK);
    CHECK_STATUS(acmoe_moe_backward(f.layer, f.ctx, f.r, f.dx), ACMOE_ERR_ARG); /* caches spent */
    CHECK_STATUS(acmoe_moe_forward(f.layer, f.ctx, f.x, 0, NULL, NULL, 2, NULL), ACMOE_OK);
    d = f.desc;
    d.ac_mix_labels = 1;
    CHECK_STATUS(acmoe_moe_create(&layer, &d, f.params, f.grads), ACMOE_OK);
    CHECK_STATUS(acmoe_moe_forward(layer, f.ctx, f.x, 12, f.prev, NULL, 2, f.out), ACMOE_ERR_NULL); /* mixing needs gates */
    acmoe_moe_destroy(layer);
    layer = NULL;
    CHECK_STATUS(acmoe_moe_router_preset(&d, 'q'), ACMOE_ERR_ARG);
    d = f.desc;
    d.top_k = 5;
    CHECK_STATUS(acmoe_moe_create(&layer, &d, f.params, f.grads), ACMOE_ERR_SHAPE); /* k > E */
    CHECK(acmoe_moe_param_count(&d) == 0);
    d = f.desc;
    d.router_select = ACMOE_SELECT_COUNT;
    CHECK_STATUS(acmoe_moe_create(&layer, &d, f.params, f.grads), ACMOE_ERR_ARG);
    d = f.desc;
    d.usmoe_budget = -1.0f;
    CHECK_STATUS(acmoe_moe_create(&layer, &d, f.params, f.grads), ACMOE_ERR_ARG);
    d = f.desc;
    d.router_select = ACMOE_SELECT_USMOE;
    d.group = ACMOE_GROUP_POSITION; /* without seq_len */
    CHECK_STATUS(acmoe_moe_create(&layer, &d, f.params, f.grads), ACMOE_ERR_ARG);
    d = f.desc;
    d.max_tokens = 0;
    CHECK_STATUS(acmoe_moe_create(&layer, &d, f.params, f.grads), ACMOE_ERR_SHAPE);
    d = small_desc('m', ACMOE_ACT_RELU);
    d.router_score = ACMOE_SCORE_COSINE; /* Soft MoE needs the slot score */
    CHECK_STATUS(acmoe_moe_create(&layer, &d, f.params, f.grads), ACMOE_ERR_ARG);
    d = small_desc('g', ACMOE_ACT_RELU);
    d.router_score = ACMOE_SCORE_SLOT; /* and the slot score needs Soft MoE */
    CHECK_STATUS(acmoe_moe_create(&layer, &d, f.params, f.grads), ACMOE_ERR_ARG);
    d = small_desc('m', ACMOE_ACT_RELU);
    d.balance_alpha = 0.1f; /* no pairs to balance */
    CHECK_STATUS(acmoe_moe_create(&layer, &d, f.params, f.grads), ACMOE_ERR_ARG);
    d = small_desc('m', ACMOE_ACT_RELU);
    d.soft_slots = -2;
    CHECK_STATUS(acmoe_moe_create(&layer, &d, f.params, f.grads), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_moe_create(&layer, &f.desc, NULL, grads), ACMOE_ERR_NULL);
    CHECK(layer == NULL);
    fixture_free(&f);
}

/* After the first step, forward and backward allocate nothing. */
static void test_moe_step_allocates_nothing(void) {
    fixture f;
    long before;
    int step;
    fixture_make(&f, 'c', ACMOE_ACT_GELU, 32, 23);
    CHECK(isfinite(fixture_loss(&f)));
    CHECK_STATUS(acmoe_moe_backward(f.layer, f.ctx, f.r, f.dx), ACMOE_OK);
    before = test_allocations;
    for (step = 0; step < 3; step++) {
        CHECK(isfinite(fixture_loss(&f)));
        CHECK_STATUS(acmoe_moe_backward(f.layer, f.ctx, f.r, f.dx), ACMOE_OK);
    }
    CHECKF(test_allocations == before, "%ld allocations in 3 steps", test_allocations - before);
    fixture_free(&f);
}

const test_case moe_tests[] = {
    {"moe_forward_reference", test_moe_forward_reference},
    {"moe_routing_invariants", test_moe_routing_invariants},
    {"moe_usmoe_budget", test_moe_usmoe_budget},
    {"moe_expert_choice_capacity", test_moe_expert_choice_capacity},
    {"moe_capacity_drops", test_moe_capacity_drops},
    {"moe_switch_gate", test_moe_switch_gate},
    {"moe_soft_reference", test_moe_soft_reference},
    {"moe_soft_groups", test_moe_soft_groups},
    {"moe_soft_paper_vectors", test_moe_soft_paper_vectors},
    {"moe_router_stability", test_moe_router_stability},
    {"moe_tightness", test_moe_tightness},
    {"moe_priority_reference", test_moe_priority_reference},
    {"moe_grad_priority", test_grad_priority},
    {"moe_deterministic", test_moe_deterministic},
    {"moe_bad_input", test_moe_bad_input},
    {"moe_ac_blocks", test_moe_ac_blocks},
    {"moe_nonfinite_input_threads", test_moe_nonfinite_input_threads},
    {"moe_ac_nonfinite_input", test_moe_ac_nonfinite_input},
    {"moe_step_allocates_nothing", test_moe_step_allocates_nothing},
    {"moe_grad_smoe_gelu", test_grad_smoe_gelu},
    {"moe_grad_smoe_relu", test_grad_smoe_relu},
    {"moe_grad_swiglu", test_grad_swiglu},
    {"moe_grad_switch", test_grad_switch},
    {"moe_grad_cosine", test_grad_cosine},
    {"moe_grad_xmoe", test_grad_xmoe},
    {"moe_grad_ac", test_grad_ac},
    {"moe_grad_usmoe", test_grad_usmoe},
    {"moe_grad_ac_usmoe", test_grad_ac_usmoe},
    {"moe_grad_expert_choice", test_grad_expert_choice},
    {"moe_grad_ac_variants", test_grad_ac_variants},
    {"moe_grad_soft", test_grad_soft},
    {"moe_grad_aux_losses", test_grad_aux_losses},
    {0, 0},
};
