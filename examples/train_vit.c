/* Trains MoE vision encoders on small images and compares routers, on clean and on
   corrupted test images.

     train_vit --data data/digits.csv --compare ggg,ggc --seeds 3   the AC layout against SMoE
     train_vit --compare gmm,gma --seeds 3                          AC on Soft MoE against Soft MoE
     train_vit --pattern gmg --steps 2000                           one model, Soft MoE in layer 2
     train_vit --data builtin --pattern ggc                         drawn digits, no file needed
     train_vit --save vit.safetensors --steps 1000                  ... then continue it exactly:
     train_vit --resume vit.safetensors                             (the model and training flags
                                                                    come from the checkpoint)
     train_vit --help                                               every flag and its default

   AC layers take the paper's vision options: 'c' layers (top-k) those of its Swin-MoE models
   by default (clip at 1.5 x the mean, scaling by the pre-clip mean, the weights reaching the
   experts; the --ac-* flags change them), 'a' layers (Soft MoE) those of its Soft MoE models
   (see acmoe_moe_router_preset). Soft MoE layers give each image its own slots.

   The data are the UCI handwritten digits as scikit-learn ships them: one image per CSV line,
   8 x 8 pixels of 0..16, then the digit (`make data/digits.csv` fetches Debian's copy).
   `--data builtin` draws seven-segment digits instead, shifted and noisy; a file that is
   missing or malformed is an error.
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
#include "vit_options.h"

typedef vit_options options;

#define PROGRAM "train_vit"
#define SIDE DIGITS_SIDE
#define PIXELS DIGITS_PIXELS
#define CLASSES DIGITS_CLASSES

/* The options from the command line, each flag in its range and the flags agreeing;
   anything else exits with status 2 before any data is read. */
static options parse_options(int argc, char **argv, cli *c) {
    options o = vit_options_defaults();
    char why[256];
    cli_init(c, PROGRAM, vit_flags, sizeof vit_flags / sizeof vit_flags[0]);
    cli_parse(c, argc, argv, &o);
    if (!vit_options_valid(&o, why, sizeof why)) cli_fail(PROGRAM, "%s", why);
    return o;
}

static void check(acmoe_status s, const char *what) {
    if (s == ACMOE_OK) return;
    fprintf(stderr, "train_vit: %s: %s\n", what, acmoe_status_string(s));
    exit(1);
}

/* ---- images ---- */

static void add_image(dataset *ds, const float *pixels, int label) {
    if (!dataset_add(ds, pixels, label)) check(ACMOE_ERR_NOMEM, "images");
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

/* The images --data names: drawn digits, or a CSV's; one that cannot be read, is malformed
   or holds too few images for the split exits with status 2. */
static void load_images(const char *path, dataset *ds) {
    acmoe_rng rng;
    float pixels[PIXELS];
    char why[256];
    int i;
    memset(ds, 0, sizeof *ds);
    if (data_is_builtin(path)) {
        printf("images: 1800 drawn seven-segment digits (--data builtin)\n");
        acmoe_rng_seed(&rng, 7);
        for (i = 0; i < 1800; i++) {
            draw_digit(&rng, i % CLASSES, pixels);
            add_image(ds, pixels, i % CLASSES);
        }
        return;
    }
    if (!digits_load(path, ds, why, sizeof why))
        cli_fail(PROGRAM, "--data %s: %s (--data " DATA_BUILTIN " draws seven-segment digits)", path, why);
    if (ds->count < 2)
        cli_fail(PROGRAM, "--data %s: %d image; the split into training and test images needs at least 2", path, ds->count);
    printf("images %s: %d\n", path, ds->count);
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

/* Exits with status 2 when the flags describe no model the library makes (status 1 for
   other failures, such as memory). */
static acmoe_lm *create_model(const options *o, const char *pattern, long seed) {
    acmoe_lm_desc d;
    acmoe_lm *lm = NULL;
    acmoe_status s;
    memset(&d, 0, sizeof d);
    d.n_classes = CLASSES, d.patch_dim = o->patch * o->patch, d.seq_len = PIXELS / d.patch_dim;
    d.d_model = o->d_model, d.n_heads = o->heads, d.batch = o->batch, d.pattern = pattern, d.d_ff = o->d_ff;
    d.n_experts = o->experts, d.top_k = o->top_k, d.pre_ln = o->pre_ln, d.seed = (uint64_t)seed;
    d.dropout = o->dropout, d.window = o->window;
    moe_flags_apply(&o->moe, &d);
    s = acmoe_lm_create(&lm, &d);
    if (s == ACMOE_ERR_SHAPE || s == ACMOE_ERR_ARG) cli_fail(PROGRAM, "pattern %s with these flags: %s", pattern, acmoe_status_string(s));
    check(s, "model");
    return lm;
}

/* The checkpoint path of a model: --save itself, or with --compare, pattern- and
   seed-suffixed. The flag table bounds --save so that the path fits CHECKPOINT_PATH. */
#define CHECKPOINT_PATH 4096
static void checkpoint_path(const options *o, const char *pattern, long seed, char *path, size_t cap) {
    const int length = o->compare ? snprintf(path, cap, "%s.%s.s%ld", o->save, pattern, seed)
                                  : snprintf(path, cap, "%s", o->save);
    if (length < 0 || (size_t)length >= cap) cli_fail(PROGRAM, "--save %.40s...: too long a path", o->save);
}

/* Trains the model up to --steps from the step it has taken; its batches come from a
   generator seeded by the seed, the same for every pattern (and for a resumed run, which
   draws the batches of the steps taken again). Images per second. */
static double train_steps(acmoe_lm *lm, acmoe_ctx *ctx, const options *o, const char *pattern, long seed,
                          const dataset *train, float *patches, int32_t *labels, int *index) {
    const long first = acmoe_lm_steps_taken(lm) + 1;
    acmoe_optim_desc opt;
    acmoe_rng rng;
    char path[CHECKPOINT_PATH];
    float loss = 0.0f;
    long step, draw;
    int b;
    double start;
    memset(&opt, 0, sizeof opt);
    opt.lr = o->lr, opt.warmup_steps = o->warmup, opt.schedule = ACMOE_SCHEDULE_COSINE, opt.total_steps = o->steps;
    opt.weight_decay = o->weight_decay, opt.clip_norm = o->clip;
    acmoe_rng_seed(&rng, (uint64_t)seed * 7919u);
    for (draw = 0; draw < (first - 1) * o->batch; draw++) acmoe_rng_below(&rng, (uint32_t)train->count);
    start = now_seconds();
    for (step = first; step <= o->steps; step++) {
        for (b = 0; b < o->batch; b++) index[b] = (int)acmoe_rng_below(&rng, (uint32_t)train->count);
        for (b = 0; b < o->batch; b++) labels[b] = train->labels[index[b]];
        to_patches(train, index, o->batch, o->patch, patches);
        check(acmoe_lm_forward_patches(lm, ctx, patches, labels, o->batch, 1, &loss), "forward");
        acmoe_lm_zero_grad(lm);
        check(acmoe_lm_backward(lm, ctx), "backward");
        check(acmoe_lm_step(lm, ctx, &opt, NULL), "step");
        if (step % o->log_every && step != o->steps) continue;
        printf("step %5ld/%d  loss %.4f  lr %.2e\n", step, o->steps, loss, acmoe_lr_at(&opt, step));
        if (!o->save) continue;
        checkpoint_path(o, pattern, seed, path, sizeof path);
        check(acmoe_lm_save(lm, path), path);
    }
    if (first > o->steps) printf("  already at step %ld: nothing to train\n", first - 1);
    return first > o->steps ? 0.0 : (double)(o->steps - first + 1) * o->batch / (now_seconds() - start);
}

/* Trains the resumed model, or a new one of the pattern and seed, and tests it. */
static result train_one(const options *o, const char *pattern, long seed, const dataset *train, const dataset *test,
                        acmoe_ctx *ctx, acmoe_lm *resumed) {
    acmoe_lm *lm = resumed ? resumed : create_model(o, pattern, seed);
    const acmoe_lm_desc d = acmoe_lm_settings(lm);
    result r;
    float *patches = (float *)malloc(sizeof(float) * PIXELS * (size_t)o->batch);
    int32_t *labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)o->batch);
    int *index = (int *)malloc(sizeof(int) * (size_t)o->batch), k;
    if (!patches || !labels || !index) check(ACMOE_ERR_NOMEM, "batch");
    memset(&r, 0, sizeof r);
    snprintf(r.pattern, sizeof r.pattern, "%.*s", MOE_PATTERN_MAX, pattern);
    printf("\n== pattern %s, seed %ld: %lu parameters, %d patches of %d pixels per image\n", pattern, seed,
           (unsigned long)acmoe_lm_param_count(lm), d.seq_len, d.patch_dim);
    moe_print_settings(lm);
    r.images_per_second = train_steps(lm, ctx, o, pattern, seed, train, patches, labels, index);
    moe_print_stability(lm);
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

/* ---- resuming ---- */

/* The options of the checkpoint's run: its model's flags, and its training's where the
   checkpoint keeps them (the seed is the model's: it also orders the batches); the rest as
   o has them. */
static options options_of_checkpoint(const acmoe_lm_desc *d, const acmoe_train_desc *t, const options *o) {
    options k = *o;
    k.pattern = d->pattern, k.batch = d->batch, k.patch = (int)sqrt((double)d->patch_dim), k.d_model = d->d_model;
    k.heads = d->n_heads, k.experts = d->n_experts, k.top_k = d->top_k, k.d_ff = d->d_ff, k.pre_ln = d->pre_ln;
    k.dropout = d->dropout, k.moe = moe_flags_of_model(d), k.seed = (long)d->seed, k.window = d->window;
    if (!(t->optim.lr > 0.0f)) return k; /* all zero for a checkpoint that keeps no training options */
    k.lr = t->optim.lr, k.warmup = t->optim.warmup_steps, k.weight_decay = t->optim.weight_decay;
    k.clip = t->optim.clip_norm, k.steps = t->optim.total_steps;
    return k;
}

/* The checkpoint's model, with o set to the checkpoint's run, so that the resumed run is
   the run it continues. A flag given with another value, or a checkpoint of another kind
   of model, exits with status 2. */
static acmoe_lm *resume_run(options *o, const cli *c) {
    acmoe_lm *lm = NULL;
    acmoe_lm_desc d;
    acmoe_train_desc t;
    options k;
    const acmoe_status s = acmoe_lm_load(&lm, o->resume);
    int patch;
    if (s != ACMOE_OK) cli_fail(PROGRAM, "--resume %s: %s", o->resume, acmoe_status_string(s));
    d = acmoe_lm_settings(lm), t = acmoe_lm_train_settings(lm);
    patch = (int)sqrt((double)d.patch_dim);
    if (d.n_classes != CLASSES || patch * patch != d.patch_dim || SIDE % patch || d.seq_len * d.patch_dim != PIXELS)
        cli_fail(PROGRAM, "--resume %s: not a classifier of 8 x 8 images into 10 classes", o->resume);
    k = options_of_checkpoint(&d, &t, o);
    cli_refuse_conflicts(c, o, &k);
    *o = k;
    printf("resuming %s at step %ld of %d: pattern %s, batch %d, patch %d, seed %ld", o->resume,
           acmoe_lm_steps_taken(lm), o->steps, o->pattern, o->batch, o->patch, o->seed);
    if (t.optim.lr > 0.0f) printf(", lr %g, warmup %d from the checkpoint\n", o->lr, o->warmup);
    else printf(" from the checkpoint, which keeps no training flags: those given or their defaults\n");
    return lm;
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
        add_image(i < all->count * 4 / 5 ? train : test, all->pixels + (size_t)order[i] * PIXELS, all->labels[order[i]]);
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
    static result results[VIT_MAX_PATTERNS * VIT_MAX_SEEDS];
    char patterns[VIT_MAX_PATTERNS][MOE_PATTERN_MAX + 1], why[256];
    acmoe_ctx_desc cd = acmoe_ctx_defaults();
    acmoe_ctx *ctx;
    acmoe_lm *resumed = NULL;
    dataset all, train, test;
    cli flags_given;
    options o = parse_options(argc, argv, &flags_given);
    int n, p, s;
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress as it comes, through pipes too */
    if (o.resume) resumed = resume_run(&o, &flags_given);
    n = moe_split_patterns(o.compare ? o.compare : o.pattern, patterns, VIT_MAX_PATTERNS, why, sizeof why);
    if (n == 0) cli_fail(PROGRAM, "%s", why); /* checked with the options; kept for a resumed pattern */
    load_images(o.data, &all);
    split(&all, &train, &test);
    cd.n_threads = o.threads;
    check(acmoe_ctx_create(&ctx, &cd), "context");
    printf("kernel path %s, %d threads\n", acmoe_isa_name(acmoe_ctx_settings(ctx).isa), acmoe_ctx_settings(ctx).n_threads);
    printf("%d training and %d test images\n", train.count, test.count);
    for (p = 0; p < n; p++)
        for (s = 0; s < o.seeds; s++)
            results[p * o.seeds + s] = train_one(&o, patterns[p], o.seed + s, &train, &test, ctx, p == 0 ? resumed : NULL);
    if (n > 1 || o.seeds > 1) print_comparison(results, n, o.seeds, &o);
    dataset_free(&all), dataset_free(&train), dataset_free(&test);
    acmoe_ctx_destroy(ctx);
    return 0;
}
