/* Trains MoE vision encoders on small images and compares routers, on clean and on
   corrupted test images.

     train_vit --data data/digits.csv --compare ggg,ggc --seeds 3   the AC layout against SMoE
     train_vit --compare gmm,gma --seeds 3                          AC on Soft MoE against Soft MoE
     train_vit --pattern gmg --steps 2000                           one model, Soft MoE in layer 2
     train_vit --help                                               every flag and its default

   AC layers take the paper's vision options: 'c' layers (top-k) those of its Swin-MoE models
   by default (clip at 1.5 x the mean, scaling by the pre-clip mean, the weights reaching the
   experts; the --ac-* flags change them), 'a' layers (Soft MoE) those of its Soft MoE models
   (see acmoe_moe_router_preset). Soft MoE layers give each image its own slots.

   The data are the UCI handwritten digits as scikit-learn ships them: one image per CSV line,
   8 x 8 pixels of 0..16, then the digit (`make data/digits.csv` fetches Debian's copy).
   Without the file the program draws seven-segment digits, shifted and noisy, and says so.
   Every model trains on the same batches and is tested on the same held-out 20 %, clean,
   under Gaussian noise of two strengths, and with a blanked square (the same corrupted
   images for every model), so the comparison
   isolates the routers. Test images go through the model in fixed batches: AC layers weight
   features by statistics of the whole call, so a result depends on the batch it came in. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

#include "cli.h"
#include "moe_flags.h"

typedef struct options {
    const char *data, *pattern, *compare;
    int steps, batch, patch, d_model, heads, experts, top_k, d_ff, warmup, threads, seeds, pre_ln, log_every;
    long seed;
    float lr, weight_decay, clip, dropout;
    moe_flags moe;
} options;

static const flag flags[] = {
    FLAG("--data", OPT_STR, data, "CSV of images: 64 pixels of 0..16 and the class per line"),
    FLAG("--pattern", OPT_STR, pattern, "router per layer: g SMoE, c AC, s Switch, o cosine, x XMoE, u USMoE, e expert choice, m Soft MoE, a AC Soft MoE, f dense"),
    FLAG("--compare", OPT_STR, compare, "comma-separated patterns to train in turn and compare (overrides --pattern)"),
    FLAG("--steps", OPT_INT, steps, "training steps per model"),
    FLAG("--batch", OPT_INT, batch, "images per step (and per test call)"),
    FLAG("--patch", OPT_INT, patch, "patch side in pixels"),
    FLAG("--d-model", OPT_INT, d_model, "model width"),
    FLAG("--heads", OPT_INT, heads, "attention heads"),
    FLAG("--experts", OPT_INT, experts, "experts per MoE layer"),
    FLAG("--top-k", OPT_INT, top_k, "experts per patch"),
    FLAG("--d-ff", OPT_INT, d_ff, "expert hidden width"),
    MOE_FLAGS,
    FLAG("--pre-ln", OPT_INT, pre_ln, "1: pre-LN blocks (ViT); 0: post-LN"),
    FLAG("--dropout", OPT_FLOAT, dropout, "dropout on attention and FFN outputs"),
    FLAG("--lr", OPT_FLOAT, lr, "peak learning rate (AdamW)"),
    FLAG("--warmup", OPT_INT, warmup, "linear warmup steps, then cosine to zero"),
    FLAG("--weight-decay", OPT_FLOAT, weight_decay, "AdamW decay of weights"),
    FLAG("--clip", OPT_FLOAT, clip, "gradient clipping by global norm (0: off)"),
    FLAG("--seed", OPT_LONG, seed, "initialisation and batch order"),
    FLAG("--seeds", OPT_INT, seeds, "with --compare: seeds --seed, --seed + 1, ... (at most 16)"),
    FLAG("--threads", OPT_INT, threads, "threads (0: online CPUs)"),
    FLAG("--log-every", OPT_INT, log_every, "steps between progress lines"),
};

static options parse_options(int argc, char **argv) {
    options o;
    memset(&o, 0, sizeof o);
    o.data = "data/digits.csv";
    o.pattern = "ggc";
    o.steps = 1500, o.batch = 64, o.patch = 2, o.d_model = 64, o.heads = 4, o.experts = 8, o.top_k = 2;
    o.d_ff = 128, o.warmup = 100, o.seeds = 1, o.pre_ln = 1, o.log_every = 500, o.seed = 1;
    o.lr = 2e-3f, o.weight_decay = 0.05f, o.clip = 1.0f;
    o.moe = moe_flags_defaults(); /* with the AC options of the paper's Swin-MoE models */
    o.moe.ac_clip = 1.5f, o.moe.ac_scaling = "preclip", o.moe.ac_experts = 1;
    cli_parse("train_vit", argc, argv, flags, sizeof flags / sizeof flags[0], &o);
    moe_flags_check(&o.moe, "train_vit");
    if (o.steps < 1 || o.batch < 1 || o.patch < 1 || 8 % o.patch || o.seeds < 1 || o.seeds > 16 || o.log_every < 1) {
        fprintf(stderr, "train_vit: steps, batch, log-every and seeds (1-16) must be positive, patch divide 8\n");
        exit(2);
    }
    return o;
}

static void check(acmoe_status s, const char *what) {
    if (s == ACMOE_OK) return;
    fprintf(stderr, "train_vit: %s: %s\n", what, acmoe_status_string(s));
    exit(1);
}

/* ---- images ---- */

#define SIDE 8
#define PIXELS (SIDE * SIDE)
#define CLASSES 10

typedef struct dataset {
    float *pixels; /* [count][PIXELS] in 0..1 */
    int32_t *labels;
    int count;
} dataset;

static void dataset_add(dataset *ds, const float *pixels, int label) {
    if (ds->count % 256 == 0) {
        ds->pixels = (float *)realloc(ds->pixels, sizeof(float) * PIXELS * (size_t)(ds->count + 256));
        ds->labels = (int32_t *)realloc(ds->labels, sizeof(int32_t) * (size_t)(ds->count + 256));
        if (!ds->pixels || !ds->labels) exit(1);
    }
    memcpy(ds->pixels + (size_t)ds->count * PIXELS, pixels, sizeof(float) * PIXELS);
    ds->labels[ds->count++] = label;
}

/* The CSV's images; 0 for a missing file or any line that is neither blank nor 64 pixels of
   0..16 and a class. */
static int load_csv(const char *path, dataset *ds) {
    FILE *f = fopen(path, "r");
    char line[1024];
    if (!f) return 0;
    while (fgets(line, sizeof line, f)) {
        float pixels[PIXELS];
        char *p = line, *end;
        long v;
        int i;
        if (strspn(line, " \t\r\n") == strlen(line)) continue;
        for (i = 0; i <= PIXELS; i++, p = end + 1) {
            v = strtol(p, &end, 10);
            if (end == p || v < 0 || v > (i < PIXELS ? 16 : CLASSES - 1) || (i < PIXELS && *end != ',')) break;
            if (i < PIXELS) pixels[i] = (float)v / 16.0f;
        }
        if (i <= PIXELS) {
            fclose(f);
            return 0;
        }
        dataset_add(ds, pixels, (int)v);
    }
    fclose(f);
    return ds->count > 0;
}

/* Seven-segment digits: segments a-g as bits of each digit, drawn as strokes on the grid. */
static void draw_digit(acmoe_rng *rng, int digit, float *pixels) {
    static const unsigned char segments[CLASSES] = {0x3f, 0x06, 0x5b, 0x4f, 0x66, 0x6d, 0x7d, 0x07, 0x7f, 0x6f};
    static const int strokes[7][4] = {/* x0, y0, x1, y1 on a 4 x 6 glyph */
                                      {0, 0, 3, 0}, {3, 0, 3, 3}, {3, 3, 3, 5}, {0, 5, 3, 5},
                                      {0, 3, 0, 5}, {0, 0, 0, 3}, {0, 3, 3, 3}};
    const int dx = 1 + (int)acmoe_rng_below(rng, 3), dy = (int)acmoe_rng_below(rng, 3);
    int s, x, y;
    for (x = 0; x < PIXELS; x++) pixels[x] = 0.1f * acmoe_rng_uniform(rng);
    for (s = 0; s < 7; s++) {
        if (!(segments[digit] >> s & 1)) continue;
        for (y = strokes[s][1]; y <= strokes[s][3]; y++)
            for (x = strokes[s][0]; x <= strokes[s][2]; x++) pixels[(y + dy) * SIDE + x + dx] = 0.7f + 0.3f * acmoe_rng_uniform(rng);
    }
}

static void load_images(const char *path, dataset *ds) {
    acmoe_rng rng;
    float pixels[PIXELS];
    int i;
    memset(ds, 0, sizeof *ds);
    if (load_csv(path, ds)) {
        printf("images %s: %d\n", path, ds->count);
        return;
    }
    free(ds->pixels), free(ds->labels);
    memset(ds, 0, sizeof *ds);
    printf("images %s missing or not 8 x 8 digits: drawing 1800 seven-segment digits instead\n", path);
    acmoe_rng_seed(&rng, 7);
    for (i = 0; i < 1800; i++) {
        draw_digit(&rng, i % CLASSES, pixels);
        dataset_add(ds, pixels, i % CLASSES);
    }
}

/* The test images' corruptions: none, Gaussian noise of deviation 0.1 and 0.3 (pixels run
   from 0 to 1), and a blanked 3 x 3 square. */
#define CORRUPTIONS 4
static const char *const corruption_names[CORRUPTIONS] = {"clean", "noise 0.1", "noise 0.3", "blanked"};

static void corrupt(acmoe_rng *rng, int kind, float *pixels) {
    static const float deviation[3] = {0.0f, 0.1f, 0.3f};
    int i, x0 = (int)acmoe_rng_below(rng, SIDE - 2), y0 = (int)acmoe_rng_below(rng, SIDE - 2);
    if (kind == 1 || kind == 2)
        for (i = 0; i < PIXELS; i++) pixels[i] += deviation[kind] * acmoe_rng_normal(rng);
    if (kind == 3)
        for (i = 0; i < 9; i++) pixels[(y0 + i / 3) * SIDE + x0 + i % 3] = 0.0f;
}

/* A batch of images (by index) as patches. */
static void to_patches(const dataset *ds, const int *index, int count, int patch, float *out) {
    const size_t per_image = (size_t)PIXELS;
    int b;
    for (b = 0; b < count; b++)
        check(acmoe_image_patches(ds->pixels + (size_t)index[b] * per_image, SIDE, SIDE, 1, patch, out + b * per_image),
              "patches");
}

/* ---- training and testing ---- */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct result {
    char pattern[64];
    double accuracy[CORRUPTIONS], images_per_second;
} result;

/* Share of the test images (corrupted as kind says, the same way for every model) the
   model classifies right, in fixed batches. */
static double test_accuracy(acmoe_lm *lm, acmoe_ctx *ctx, const dataset *test, const options *o, int kind,
                            float *patches, int *index) {
    dataset corrupted = *test;
    acmoe_rng rng;
    int i, b, count, right = 0;
    corrupted.pixels = (float *)malloc(sizeof(float) * PIXELS * (size_t)test->count);
    if (!corrupted.pixels) exit(1);
    memcpy(corrupted.pixels, test->pixels, sizeof(float) * PIXELS * (size_t)test->count);
    acmoe_rng_seed(&rng, 1000 + (uint64_t)kind);
    for (i = 0; i < test->count; i++) corrupt(&rng, kind, corrupted.pixels + (size_t)i * PIXELS);
    for (i = 0; i < test->count; i += count) {
        count = test->count - i < o->batch ? test->count - i : o->batch;
        for (b = 0; b < count; b++) index[b] = i + b;
        to_patches(&corrupted, index, count, o->patch, patches);
        check(acmoe_lm_forward_patches(lm, ctx, patches, NULL, count, 0, NULL), "test");
        for (b = 0; b < count; b++) {
            const float *z = acmoe_lm_logits(lm) + (size_t)b * CLASSES;
            int c, best = 0;
            for (c = 1; c < CLASSES; c++) best = z[c] > z[best] ? c : best;
            right += best == test->labels[i + b];
        }
    }
    free(corrupted.pixels);
    return (double)right / test->count;
}

static result train_one(const options *o, const char *pattern, long seed, const dataset *train, const dataset *test,
                        acmoe_ctx *ctx) {
    acmoe_lm_desc d;
    acmoe_optim_desc opt;
    acmoe_lm *lm = NULL;
    acmoe_rng rng;
    result r;
    float *patches = (float *)malloc(sizeof(float) * PIXELS * (size_t)o->batch), loss = 0.0f;
    int32_t *labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)o->batch);
    int *index = (int *)malloc(sizeof(int) * (size_t)o->batch), step, b, k;
    double start;
    if (!patches || !labels || !index) exit(1);
    memset(&r, 0, sizeof r);
    snprintf(r.pattern, sizeof r.pattern, "%s", pattern);
    memset(&d, 0, sizeof d);
    d.n_classes = CLASSES, d.patch_dim = o->patch * o->patch, d.seq_len = PIXELS / d.patch_dim;
    d.d_model = o->d_model, d.n_heads = o->heads, d.batch = o->batch, d.pattern = pattern, d.d_ff = o->d_ff;
    d.n_experts = o->experts, d.top_k = o->top_k, d.pre_ln = o->pre_ln, d.seed = (uint64_t)seed;
    d.dropout = o->dropout;
    moe_flags_apply(&o->moe, &d);
    check(acmoe_lm_create(&lm, &d), "model");
    memset(&opt, 0, sizeof opt);
    opt.lr = o->lr, opt.warmup_steps = o->warmup, opt.schedule = ACMOE_SCHEDULE_COSINE, opt.total_steps = o->steps;
    opt.weight_decay = o->weight_decay, opt.clip_norm = o->clip;
    printf("\n== pattern %s, seed %ld: %lu parameters, %d patches of %d pixels per image\n", pattern, seed,
           (unsigned long)acmoe_lm_param_count(lm), d.seq_len, d.patch_dim);
    moe_print_settings(lm);
    acmoe_rng_seed(&rng, (uint64_t)seed * 7919u); /* the batch order: the same for every pattern */
    start = now_seconds();
    for (step = 1; step <= o->steps; step++) {
        for (b = 0; b < o->batch; b++) index[b] = (int)acmoe_rng_below(&rng, (uint32_t)train->count);
        for (b = 0; b < o->batch; b++) labels[b] = train->labels[index[b]];
        to_patches(train, index, o->batch, o->patch, patches);
        check(acmoe_lm_forward_patches(lm, ctx, patches, labels, o->batch, 1, &loss), "forward");
        acmoe_lm_zero_grad(lm);
        check(acmoe_lm_backward(lm, ctx), "backward");
        check(acmoe_lm_step(lm, ctx, &opt, NULL), "step");
        if (step % o->log_every == 0 || step == o->steps)
            printf("step %5d/%d  loss %.4f  lr %.2e\n", step, o->steps, loss, acmoe_lr_at(&opt, step));
    }
    r.images_per_second = (double)o->steps * o->batch / (now_seconds() - start);
    printf("  test accuracy:");
    for (k = 0; k < CORRUPTIONS; k++) {
        r.accuracy[k] = test_accuracy(lm, ctx, test, o, k, patches, index);
        printf("  %s %.1f %%", corruption_names[k], 100.0 * r.accuracy[k]);
    }
    printf("  (%.0f images/s in training)\n", r.images_per_second);
    acmoe_lm_destroy(lm);
    free(patches), free(labels), free(index);
    return r;
}

/* A fixed shuffle splits the images 80 / 20, the same for every run. */
static void split(const dataset *all, dataset *train, dataset *test) {
    acmoe_rng rng;
    int *order = (int *)malloc(sizeof(int) * (size_t)all->count), i;
    if (!order) exit(1);
    for (i = 0; i < all->count; i++) order[i] = i;
    acmoe_rng_seed(&rng, 12345);
    for (i = all->count - 1; i > 0; i--) {
        int j = (int)acmoe_rng_below(&rng, (uint32_t)i + 1), t = order[i];
        order[i] = order[j], order[j] = t;
    }
    memset(train, 0, sizeof *train), memset(test, 0, sizeof *test);
    for (i = 0; i < all->count; i++)
        dataset_add(i < all->count * 4 / 5 ? train : test, all->pixels + (size_t)order[i] * PIXELS, all->labels[order[i]]);
    free(order);
}

static void print_comparison(const result *r, int patterns, int seeds, const options *o) {
    int p, k, s;
    printf("\n== comparison (%d steps, batch %d, %d seed%s; test accuracy %%, mean (sd) over seeds)\n", o->steps,
           o->batch, seeds, seeds > 1 ? "s" : "");
    printf("%-10s", "pattern");
    for (k = 0; k < CORRUPTIONS; k++) printf(" %15s", corruption_names[k]);
    printf(" %10s\n", "images/s");
    for (p = 0; p < patterns; p++) {
        double speed = 0.0;
        printf("%-10s", r[p * seeds].pattern);
        for (k = 0; k < CORRUPTIONS; k++) {
            double mean = 0.0, var = 0.0;
            for (s = 0; s < seeds; s++) mean += r[p * seeds + s].accuracy[k] / seeds;
            for (s = 0; s < seeds; s++) var += pow(r[p * seeds + s].accuracy[k] - mean, 2) / (seeds > 1 ? seeds - 1 : 1);
            printf("    %5.1f (%4.1f)", 100.0 * mean, 100.0 * sqrt(var));
        }
        for (s = 0; s < seeds; s++) speed += r[p * seeds + s].images_per_second / seeds;
        printf(" %10.0f\n", speed);
    }
}

int main(int argc, char **argv) {
    options o = parse_options(argc, argv);
    acmoe_ctx_desc cd = acmoe_ctx_defaults();
    acmoe_ctx *ctx;
    dataset all, train, test;
    result results[16 * 16];
    char list[256], *name, *rest;
    int patterns = 0, seeds = o.compare ? o.seeds : 1, s;
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress as it comes, through pipes too */
    cd.n_threads = o.threads;
    check(acmoe_ctx_create(&ctx, &cd), "context");
    printf("kernel path %s, %d threads\n", acmoe_isa_name(acmoe_ctx_settings(ctx).isa), acmoe_ctx_settings(ctx).n_threads);
    load_images(o.data, &all);
    split(&all, &train, &test);
    printf("%d training and %d test images\n", train.count, test.count);
    snprintf(list, sizeof list, "%s", o.compare ? o.compare : o.pattern);
    for (name = strtok_r(list, ",", &rest); name && patterns < 16; name = strtok_r(NULL, ",", &rest), patterns++)
        for (s = 0; s < seeds; s++) results[patterns * seeds + s] = train_one(&o, name, o.seed + s, &train, &test, ctx);
    if (patterns > 1 || seeds > 1) print_comparison(results, patterns, seeds, &o);
    free(all.pixels), free(all.labels), free(train.pixels), free(train.labels), free(test.pixels), free(test.labels);
    acmoe_ctx_destroy(ctx);
    return 0;
}
