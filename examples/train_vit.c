/* Trains MoE vision encoders on small images and compares routers, on clean and on
   corrupted test images.

     train_vit --data data/digits.csv --compare ggg,ggc --seeds 3   the AC layout against SMoE
     train_vit --compare gmm,gma --seeds 3                          AC on Soft MoE against Soft MoE
     train_vit --pattern gmg --steps 2000                           one model, Soft MoE in layer 2
     train_vit --data builtin --pattern ggc                         drawn digits, no file needed
     train_vit --data data/fashion-mnist --pattern ggc --steps 300  28 x 28 clothes, 4 x 4 patches
     train_vit --save vit.safetensors --steps 1000                  ... then continue it exactly:
     train_vit --resume vit.safetensors                             (the model and training flags
                                                                    come from the checkpoint)
     train_vit --compare ggg,ggc --log vit.jsonl                    JSON lines for plot_log
     train_vit --help                                               every flag and its default

   AC layers take the paper's vision options: 'c' layers (top-k) those of its Swin-MoE models
   by default (clip at 1.5 x the mean, scaling by the pre-clip mean, the weights reaching the
   experts; the --ac-* flags change them), 'a' layers (Soft MoE) those of its Soft MoE models
   (see acmoe_moe_router_preset). Soft MoE layers give each image its own slots.

   The data are the UCI handwritten digits as scikit-learn ships them: one image per CSV line,
   8 x 8 pixels of 0..16, then the digit (`make data/digits.csv` fetches Debian's copy); or
   a folder of IDX files, MNIST's format, such as Fashion-MNIST's 28 x 28 images of clothes
   (`make data/fashion-mnist`). `--data builtin` draws seven-segment digits instead, shifted
   and noisy; a file that is missing or malformed is an error. The patches follow the
   images: --patch divides their side, and its default leaves at most 7 x 7 patches.
   Every model trains on the same batches and is tested on the same held-out images: the
   IDX files' own t10k-* set, or a fixed 20 % of the others; clean, under Gaussian noise of
   two strengths, and with a blanked square (the same corrupted images for every model),
   so the comparison isolates the routers. Test images go through the model in fixed
   batches: AC layers weight features by statistics of the whole call, so a result depends
   on the batch it came in. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"
#include "attacks.h"
#include "report.h"
#include "vit_options.h"

typedef vit_options options;

#define PROGRAM "train_vit"
#define CLASSES DIGITS_CLASSES

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
    for (x = 0; x < DIGITS_PIXELS; x++) pixels[x] = 0.1f * acmoe_rng_uniform(rng);
    for (s = 0; s < 7; s++) {
        if (!(segments[digit] >> s & 1)) continue;
        for (y = strokes[s][1]; y <= strokes[s][3]; y++)
            for (x = strokes[s][0]; x <= strokes[s][2]; x++) pixels[(y + dy) * DIGITS_SIDE + x + dx] = 0.7f + 0.3f * acmoe_rng_uniform(rng);
    }
}

/* 1800 drawn digits, the same every run. */
static void draw_digits(dataset *ds) {
    acmoe_rng rng;
    float pixels[DIGITS_PIXELS];
    int i;
    ds->side = DIGITS_SIDE;
    acmoe_rng_seed(&rng, 7);
    for (i = 0; i < 1800; i++) {
        draw_digit(&rng, i % CLASSES, pixels);
        add_image(ds, pixels, i % CLASSES);
    }
}

/* A fixed shuffle splits the images 80 / 20, the same for every run (train and test empty). */
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
    train->side = test->side = all->side;
    for (i = 0; i < all->count; i++)
        add_image(i < all->count * 4 / 5 ? train : test, all->pixels + (size_t)order[i] * dataset_pixels(all),
                  all->labels[order[i]]);
    free(order);
}

/* The IDX files of the folder path, split as they are; exits with status 2 when one is
   missing or bad. */
static void load_idx_folder(const char *path, dataset *train, dataset *test) {
    char why[512];
    if (!idx_load_split(path, train, test, why, sizeof why))
        cli_fail(PROGRAM, "--data %s: %s (a folder is read as MNIST's IDX files, train-* and t10k-*)",
                 path, why);
    printf("images %s: IDX files of %d x %d pixels, split into training and test images as they are\n", path, train->side,
           train->side);
}

/* Drawn digits or a CSV's, split 80 / 20; data that cannot be read, is malformed or holds
   too few images for the split exits with status 2. */
static void load_and_split(const char *path, dataset *train, dataset *test) {
    dataset all;
    char why[512];
    memset(&all, 0, sizeof all);
    if (data_is_builtin(path)) {
        printf("images: 1800 drawn seven-segment digits (--data builtin)\n");
        draw_digits(&all);
    } else if (!digits_load(path, &all, why, sizeof why)) {
        cli_fail(PROGRAM, "--data %s: %s (--data " DATA_BUILTIN " draws seven-segment digits)", path, why);
    } else {
        printf("images %s: %d\n", path, all.count);
    }
    if (all.count < 2)
        cli_fail(PROGRAM, "--data %s: %d image; the split into training and test images needs at least 2", path, all.count);
    split(&all, train, test);
    dataset_free(&all);
}

/* The training and test images --data names. */
static void load_images(const char *path, dataset *train, dataset *test) {
    memset(train, 0, sizeof *train), memset(test, 0, sizeof *test);
    if (!data_is_builtin(path) && data_is_directory(path)) load_idx_folder(path, train, test);
    else load_and_split(path, train, test);
}

/* The test images' corruptions: none, Gaussian noise of each --noise deviation (pixels run
   from 0 to 1), and a blanked square of 3/8 the side (3 x 3 of 8 x 8, 10 x 10 of 28 x 28).
   Kind 0 is clean, kinds 1 to noise_count the noises, the last one the blanked square. */
#define CORRUPTIONS_MAX (VIT_LIST_MAX + 2)

typedef struct tests {
    float noise[VIT_LIST_MAX], eps[VIT_LIST_MAX];
    int noise_count, eps_count;
} tests;

static int corruption_count(const tests *t) { return t->noise_count + 2; }
static int is_blanked(const tests *t, int kind) { return kind == t->noise_count + 1; }

static void corruption_name(const tests *t, int kind, char *out, size_t cap) {
    if (kind == 0) snprintf(out, cap, "clean");
    else if (is_blanked(t, kind)) snprintf(out, cap, "blanked");
    else snprintf(out, cap, "noise %g", t->noise[kind - 1]);
}

static void corrupt(acmoe_rng *rng, const tests *t, int kind, int side, float *pixels) {
    const int blank = side * 3 / 8 > 0 ? side * 3 / 8 : 1, pixel_count = side * side;
    const uint32_t corners = (uint32_t)(side - blank + 1);
    int i, x0 = (int)acmoe_rng_below(rng, corners), y0 = (int)acmoe_rng_below(rng, corners);
    if (kind > 0 && !is_blanked(t, kind))
        for (i = 0; i < pixel_count; i++) pixels[i] += t->noise[kind - 1] * acmoe_rng_normal(rng);
    if (is_blanked(t, kind))
        for (i = 0; i < blank * blank; i++) pixels[(y0 + i / blank) * side + x0 + i % blank] = 0.0f;
}

/* A batch of images (by index) as patches. */
static void to_patches(const dataset *ds, const int *index, int count, int patch, float *out) {
    const size_t per_image = dataset_pixels(ds);
    int b;
    for (b = 0; b < count; b++)
        check(acmoe_image_patches(ds->pixels + (size_t)index[b] * per_image, ds->side, ds->side, 1, patch, out + b * per_image),
              "patches");
}

/* ---- training and testing ---- */

typedef struct result {
    char pattern[MOE_PATTERN_MAX + 1];
    double accuracy[CORRUPTIONS_MAX], fgsm[VIT_LIST_MAX], pgd[VIT_LIST_MAX], images_per_second, imbalance;
} result;

/* A batch's room: patches, labels and the images' indices. */
typedef struct batch {
    float *patches;
    int32_t *labels;
    int *index;
} batch;

static batch batch_create(int size, size_t pixels_per_image) {
    batch b;
    b.patches = (float *)malloc(sizeof(float) * pixels_per_image * (size_t)size);
    b.labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)size);
    b.index = (int *)malloc(sizeof(int) * (size_t)size);
    if (!b.patches || !b.labels || !b.index) check(ACMOE_ERR_NOMEM, "batch");
    return b;
}

static void batch_free(batch *b) { free(b->patches), free(b->labels), free(b->index); }

/* The test images corrupted as kind says, the same way for every model. */
static dataset corrupted_copy(const dataset *test, const tests *t, int kind) {
    dataset corrupted = *test;
    acmoe_rng rng;
    const size_t pixels = dataset_pixels(test);
    int i;
    corrupted.pixels = (float *)malloc(sizeof(float) * pixels * (size_t)test->count);
    if (!corrupted.pixels) check(ACMOE_ERR_NOMEM, "test images");
    memcpy(corrupted.pixels, test->pixels, sizeof(float) * pixels * (size_t)test->count);
    acmoe_rng_seed(&rng, 1000 + (uint64_t)kind);
    for (i = 0; i < test->count; i++) corrupt(&rng, t, kind, test->side, corrupted.pixels + (size_t)i * pixels);
    return corrupted;
}

/* How often each MoE layer sends a token of each class to each expert first: joint counts
   [layer][expert][class], for the mutual information between expert and class. */
#define MI_LAYERS 64
#define MI_EXPERTS 256
typedef struct expert_classes {
    double count[MI_LAYERS][MI_EXPERTS][CLASSES];
    const int32_t *labels; /* of the images of the last call */
    int images;
} expert_classes;

static void count_expert_classes(acmoe_lm *lm, int layer, char letter, int after_moe, void *user) {
    expert_classes *counts = (expert_classes *)user;
    const acmoe_moe_stats st = acmoe_moe_last_stats(acmoe_lm_moe(lm, layer));
    int t;
    (void)after_moe;
    if (letter == 'f' || layer >= MI_LAYERS || st.n_experts > MI_EXPERTS || st.n_tokens < counts->images) return;
    for (t = 0; t < st.n_tokens; t++)
        counts->count[layer][st.expert_index[(size_t)t * st.top_k]][counts->labels[t / (st.n_tokens / counts->images)]]++;
}

/* I(expert; class) in bits of each layer's counts (NaN for a layer without any). */
static void mutual_information(const expert_classes *counts, int layers, double *out) {
    int l, e, c;
    for (l = 0; l < layers && l < MI_LAYERS; l++) {
        double total = 0.0, by_class[CLASSES] = {0}, mi = 0.0;
        for (e = 0; e < MI_EXPERTS; e++)
            for (c = 0; c < CLASSES; c++) total += counts->count[l][e][c], by_class[c] += counts->count[l][e][c];
        for (e = 0; e < MI_EXPERTS && total > 0.0; e++) {
            double by_expert = 0.0;
            for (c = 0; c < CLASSES; c++) by_expert += counts->count[l][e][c];
            for (c = 0; c < CLASSES; c++) {
                const double joint = counts->count[l][e][c] / total;
                if (joint > 0.0) mi += joint * log2(joint / ((by_expert / total) * (by_class[c] / total)));
            }
        }
        out[l] = total > 0.0 ? mi : NAN;
    }
}

/* Share of the test images (corrupted as kind says) the model classifies right, and their
   mean loss in *loss, in fixed batches; with counts, each layer's expert-class counts. */
static double test_accuracy(acmoe_lm *lm, acmoe_ctx *ctx, const dataset *test, const options *o, const tests *t,
                            int kind, batch *room, double *loss, expert_classes *counts) {
    dataset corrupted = corrupted_copy(test, t, kind);
    const int size = o->run.model.batch;
    int i, b, count, right = 0;
    double loss_sum = 0.0;
    for (i = 0; i < test->count; i += count) {
        float batch_loss = 0.0f;
        count = test->count - i < size ? test->count - i : size;
        for (b = 0; b < count; b++) room->index[b] = i + b, room->labels[b] = test->labels[i + b];
        to_patches(&corrupted, room->index, count, o->patch, room->patches);
        check(acmoe_vision_forward(lm, ctx, room->patches, room->labels, count, 0, &batch_loss), "test");
        loss_sum += (double)batch_loss * count;
        if (counts) counts->labels = room->labels, counts->images = count, visit_layers(lm, count_expert_classes, counts);
        for (b = 0; b < count; b++) {
            const float *z = acmoe_lm_logits(lm) + (size_t)b * CLASSES;
            int c, best = 0;
            for (c = 1; c < CLASSES; c++) best = z[c] > z[best] ? c : best;
            right += best == test->labels[i + b];
        }
    }
    free(corrupted.pixels);
    if (loss) *loss = loss_sum / test->count;
    return (double)right / test->count;
}

/* Exits with status 2 when the flags describe no model the library makes (status 1 for
   other failures, such as memory). */
static acmoe_lm *create_model(const options *o, const char *pattern, long seed, int side) {
    acmoe_lm_desc d = o->run.model;
    acmoe_lm *lm = NULL;
    acmoe_status s;
    d.n_classes = CLASSES, d.patch_dim = o->patch * o->patch, d.seq_len = side * side / d.patch_dim;
    d.pattern = pattern, d.seed = (uint64_t)seed;
    s = acmoe_lm_create(&lm, &d);
    if (s == ACMOE_ERR_SHAPE || s == ACMOE_ERR_ARG) cli_fail(PROGRAM, "pattern %s with these flags: %s", pattern, acmoe_status_string(s));
    check(s, "model");
    return lm;
}

/* What a training run reports to: the display, the log, the checkpoints. */
typedef struct run {
    const options *o;
    const tests *t;
    run_report report;
    const dataset *test;
    batch *room;
} run;

/* At each progress point: the bar, the clean test loss and accuracy (the curve plot_log
   draws), each layer's expert-class information, and a checkpoint. */
static void report_step(const run *u, acmoe_lm *lm, acmoe_ctx *ctx, long step, float loss, float lr, float norm,
                         double images_per_second, double eta) {
    static const char *const names[2] = {"val_loss", "accuracy"};
    static expert_classes counts;
    const options *o = u->o;
    const int patches = u->test->side * u->test->side / (o->patch * o->patch);
    double test_loss = 0.0, accuracy, information[MI_LAYERS], measures[2];
    print_progress(u->report.interactive, step, o->run.steps, loss, lr, images_per_second, "img/s", eta);
    log_step(&u->report, step, loss, lr, norm, images_per_second * patches);
    memset(&counts, 0, sizeof counts);
    accuracy = test_accuracy(lm, ctx, u->test, o, u->t, 0, u->room, &test_loss, &counts);
    mutual_information(&counts, acmoe_lm_n_layers(lm), information);
    if (u->report.interactive) printf("\n");
    printf("  test step %ld: loss %.4f  accuracy %.1f %%\n", step, test_loss, 100.0 * accuracy);
    measures[0] = test_loss, measures[1] = accuracy;
    log_eval_measures(&u->report, step, names, measures, 2);
    log_layers_with_classes(&u->report, lm, step, information); /* the layers' stats are the test call's */
    checkpoint_save(&o->run, PROGRAM, lm, u->report.pattern, u->report.seed);
}

/* Share of the first --attack-images test images the model still classifies right under the
   attack with budget eps (in 1/255 of the pixel range), in fixed batches; PGD's starts come
   from a generator of fixed seed, the same for every model. */
static double attack_accuracy(acmoe_lm *lm, acmoe_ctx *ctx, const dataset *test, const options *o, attack_kind kind,
                              float eps, batch *room) {
    const int size = o->run.model.batch, images = o->attack_images < test->count ? o->attack_images : test->count;
    const size_t values = (size_t)size * dataset_pixels(test);
    float *x = (float *)malloc(sizeof(float) * values), *grad = (float *)malloc(sizeof(float) * values);
    int32_t *guess = (int32_t *)malloc(sizeof(int32_t) * (size_t)size);
    acmoe_rng rng;
    int i, b, count, right = 0;
    if (!x || !grad || !guess) check(ACMOE_ERR_NOMEM, "attack");
    acmoe_rng_seed(&rng, 4242);
    for (i = 0; i < images; i += count) {
        count = images - i < size ? images - i : size;
        for (b = 0; b < count; b++) room->index[b] = i + b;
        to_patches(test, room->index, count, o->patch, room->patches);
        check(attack_batch(lm, ctx, kind, eps / 255.0f, room->patches, count, CLASSES, x, grad, guess, &rng), "attack");
        check(acmoe_vision_forward(lm, ctx, x, NULL, count, 0, NULL), "attacked test");
        attack_predictions(lm, count, CLASSES, guess);
        for (b = 0; b < count; b++) right += guess[b] == test->labels[i + b];
    }
    acmoe_lm_zero_grad(lm); /* the attacks' gradients are not the model's */
    free(x), free(grad), free(guess);
    return images ? (double)right / images : 0.0;
}

/* After training: accuracy on each corruption of the test images and under each attack,
   printed and logged. */
static void test_robustness(acmoe_lm *lm, acmoe_ctx *ctx, const run *u, result *r) {
    const tests *t = u->t;
    const long step = acmoe_lm_steps_taken(lm);
    char name[32];
    int k;
    printf("  test accuracy:");
    for (k = 0; k < corruption_count(t); k++) {
        r->accuracy[k] = test_accuracy(lm, ctx, u->test, u->o, t, k, u->room, NULL, NULL);
        corruption_name(t, k, name, sizeof name);
        printf("  %s %.1f %%", name, 100.0 * r->accuracy[k]);
        log_robust(&u->report, step, k == 0 ? "clean" : is_blanked(t, k) ? "blanked" : "noise",
                   k == 0 || is_blanked(t, k) ? 0.0 : t->noise[k - 1], r->accuracy[k]);
    }
    printf("  (%.0f images/s in training)\n", r->images_per_second);
    if (!t->eps_count) return;
    printf("  under attack (first %d test images; budget in 1/255):", u->o->attack_images);
    for (k = 0; k < t->eps_count; k++) {
        r->fgsm[k] = attack_accuracy(lm, ctx, u->test, u->o, ATTACK_FGSM, t->eps[k], u->room);
        r->pgd[k] = attack_accuracy(lm, ctx, u->test, u->o, ATTACK_PGD, t->eps[k], u->room);
        printf("  FGSM %g %.1f %%, PGD %g %.1f %%", t->eps[k], 100.0 * r->fgsm[k], t->eps[k], 100.0 * r->pgd[k]);
        log_robust(&u->report, step, "fgsm", t->eps[k], r->fgsm[k]);
        log_robust(&u->report, step, "pgd", t->eps[k], r->pgd[k]);
    }
    printf("\n");
}

/* Trains the model up to --steps from the step it has taken; its batches come from a
   generator seeded by the seed, the same for every pattern (and for a resumed run, which
   draws the batches of the steps taken again). Images per second. */
static double train_steps(acmoe_lm *lm, acmoe_ctx *ctx, const run *u, const dataset *train, batch *room) {
    const options *o = u->o;
    const int size = o->run.model.batch;
    const long first = acmoe_lm_steps_taken(lm) + 1, steps = o->run.steps;
    acmoe_optim_desc opt = o->run.optim;
    acmoe_rng rng;
    float loss = 0.0f, norm = 0.0f;
    long step, draw;
    int b;
    double start = now_seconds(), busy = 0.0;
    opt.total_steps = (int)steps;
    acmoe_rng_seed(&rng, (uint64_t)u->report.seed * 7919u);
    for (draw = 0; draw < (first - 1) * size; draw++) acmoe_rng_below(&rng, (uint32_t)train->count);
    for (step = first; step <= steps; step++) {
        for (b = 0; b < size; b++) room->index[b] = (int)acmoe_rng_below(&rng, (uint32_t)train->count);
        for (b = 0; b < size; b++) room->labels[b] = train->labels[room->index[b]];
        to_patches(train, room->index, size, o->patch, room->patches);
        check(acmoe_vision_forward(lm, ctx, room->patches, room->labels, size, 1, &loss), "forward");
        acmoe_lm_zero_grad(lm);
        check(acmoe_lm_backward(lm, ctx), "backward");
        check(acmoe_lm_step(lm, ctx, &opt, &norm), "step");
        if (step % o->run.log_every && step != steps) continue;
        busy += now_seconds() - start; /* the tests at progress points are not training time */
        report_step(u, lm, ctx, step, loss, acmoe_lr_at(&opt, step), norm, (double)(step - first + 1) * size / busy,
                    eta_seconds(busy, step - first + 1, steps - first + 1));
        start = now_seconds();
    }
    if (first > steps) printf("  already at step %ld: nothing to train\n", first - 1);
    return first > steps ? 0.0 : (double)(steps - first + 1) * size / busy;
}

/* Trains the resumed model, or a new one of the pattern and seed, and tests it. */
static result train_one(const options *o, const tests *t, const char *pattern, long seed, const dataset *train,
                        const dataset *test, acmoe_ctx *ctx, acmoe_lm *resumed, FILE *log) {
    acmoe_lm *lm = resumed ? resumed : create_model(o, pattern, seed, train->side);
    const acmoe_lm_desc d = acmoe_lm_settings(lm);
    batch room = batch_create(o->run.model.batch, dataset_pixels(train));
    char label[PATTERN_LABEL_MAX];
    result r;
    run u;
    memset(&r, 0, sizeof r);
    snprintf(r.pattern, sizeof r.pattern, "%.*s", MOE_PATTERN_MAX, pattern);
    pattern_label(pattern, label, sizeof label);
    printf("\n== pattern %s, seed %ld: %lu parameters, %d patches of %d pixels per image\n", label, seed,
           (unsigned long)acmoe_lm_param_count(lm), d.seq_len, d.patch_dim);
    print_layer_settings(lm);
    u.o = o, u.t = t, u.test = test, u.room = &room;
    u.report.pattern = r.pattern, u.report.seed = seed, u.report.interactive = isatty(STDOUT_FILENO), u.report.log = log;
    r.images_per_second = train_steps(lm, ctx, &u, train, &room);
    test_robustness(lm, ctx, &u, &r);
    test_accuracy(lm, ctx, test, o, t, 0, &room, NULL, NULL); /* the layers' stats of a clean test call */
    r.imbalance = print_loads(lm, 1);
    print_stability(lm);
    acmoe_lm_destroy(lm);
    batch_free(&room);
    return r;
}

/* ---- resuming ---- */

/* The checkpoint's model, with o set to the checkpoint's run, so that the resumed run is
   the run it continues. A flag given with another value, or a checkpoint of another kind
   of model or of images of another side, exits with status 2. */
static acmoe_lm *resume_run(options *o, const cli *c, int side) {
    acmoe_lm *lm = run_load_checkpoint(&o->run, PROGRAM);
    const acmoe_lm_desc d = acmoe_lm_settings(lm);
    const int patch = (int)sqrt((double)d.patch_dim);
    options k = *o;
    int has_training;
    if (d.n_classes != CLASSES || patch * patch != d.patch_dim || side % patch || d.seq_len * d.patch_dim != side * side)
        cli_fail(PROGRAM, "--resume %s: not a classifier of %d x %d images into %d classes", o->run.resume, side, side,
                 CLASSES);
    has_training = run_of_checkpoint(lm, &k.run);
    k.patch = patch;
    cli_refuse_conflicts(c, o, &k);
    if (has_training) k.run.steps = run_resumed_steps(c, &o->run, &k.run.optim);
    *o = k;
    run_print_resumed(&o->run, lm, has_training);
    return lm;
}

/* The measures of a comparison: accuracy on each corruption, then under each attack. */
#define MEASURES_MAX (CORRUPTIONS_MAX + 2 * VIT_LIST_MAX)
static int measures_of(const tests *t, const result *r, double *values, char names[][32]) {
    int k, n = 0;
    for (k = 0; k < corruption_count(t); k++, n++) {
        if (names) corruption_name(t, k, names[n], 32);
        if (values) values[n] = 100.0 * r->accuracy[k];
    }
    for (k = 0; k < t->eps_count; k++, n += 2) {
        if (names) snprintf(names[n], 32, "FGSM %g", t->eps[k]), snprintf(names[n + 1], 32, "PGD %g", t->eps[k]);
        if (values) values[n] = 100.0 * r->fgsm[k], values[n + 1] = 100.0 * r->pgd[k];
    }
    return n;
}

/* One row per pattern, named with its routers: test accuracy per corruption and attack,
   mean (sd) over the seeds, speed and the worst expert imbalance; then, with several seeds,
   each pattern against the first, paired by seed (same batches, same test images,
   corruptions and attack starts). */
static void print_comparison(result r[][RUN_MAX_SEEDS], int patterns, const options *o, const tests *t) {
    static double accuracy[RUN_MAX_PATTERNS][MEASURES_MAX][RUN_MAX_SEEDS];
    static char labels[RUN_MAX_PATTERNS][PATTERN_LABEL_MAX];
    char names[MEASURES_MAX][32];
    const int seeds = o->run.seeds, measures = measures_of(t, &r[0][0], NULL, names);
    int p, k, s, column;
    for (p = 0; p < patterns; p++) pattern_label(r[p][0].pattern, labels[p], sizeof labels[p]);
    column = label_width(labels, patterns);
    printf("\n== comparison (%d steps, batch %d, %d seed%s; test accuracy %%, mean (sd) over seeds)\n", o->run.steps,
           o->run.model.batch, seeds, seeds > 1 ? "s" : "");
    printf("%-*s", column, "pattern");
    for (k = 0; k < measures; k++) printf(" %15s", names[k]);
    printf(" %10s %13s\n", "images/s", "max/mean load");
    for (p = 0; p < patterns; p++) {
        double speed[RUN_MAX_SEEDS], load[RUN_MAX_SEEDS], values[MEASURES_MAX], mean, sd;
        printf("%-*s", column, labels[p]);
        for (s = 0; s < seeds; s++) {
            measures_of(t, &r[p][s], values, NULL);
            for (k = 0; k < measures; k++) accuracy[p][k][s] = values[k];
        }
        for (k = 0; k < measures; k++) {
            mean_sd(accuracy[p][k], seeds, &mean, &sd);
            printf("    %5.1f (%4.1f)", mean, sd);
        }
        for (s = 0; s < seeds; s++) speed[s] = r[p][s].images_per_second, load[s] = r[p][s].imbalance;
        mean_sd(speed, seeds, &mean, &sd);
        printf(" %10.0f", mean);
        mean_sd(load, seeds, &mean, &sd);
        printf(" %13.2f\n", mean);
    }
    for (p = 1; p < patterns && seeds > 1; p++)
        for (k = 0; k < measures; k++)
            print_paired(r[0][0].pattern, r[p][0].pattern, names[k], accuracy[0][k], accuracy[p][k], seeds, "points", 1);
}

int main(int argc, char **argv) {
    static result results[RUN_MAX_PATTERNS][RUN_MAX_SEEDS];
    char patterns[RUN_MAX_PATTERNS][MOE_PATTERN_MAX + 1];
    acmoe_ctx_desc cd = acmoe_ctx_defaults();
    acmoe_ctx *ctx;
    acmoe_lm *resumed = NULL;
    dataset train, test;
    cli flags_given;
    options o = vit_options_defaults();
    FILE *log;
    char why[256];
    tests t;
    int n, p, s;
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress as it comes, through pipes too */
    vit_cli_init(&flags_given);
    cli_parse(&flags_given, argc, argv, &o); /* a bad command line exits before any data is read */
    t.noise_count = vit_list("--noise", o.noise, 0.0, 10.0, t.noise, why, sizeof why);
    t.eps_count = vit_list("--attack-eps", o.attack_eps, 0.0, 255.0, t.eps, why, sizeof why);
    load_images(o.run.data, &train, &test);
    if (o.run.resume) resumed = resume_run(&o, &flags_given, train.side);
    if (!(o.patch = vit_patch_for(o.patch, train.side, why, sizeof why))) cli_fail(PROGRAM, "%s", why);
    n = run_patterns(&o.run, PROGRAM, patterns);
    log = log_open(&o.run, PROGRAM);
    cd.n_threads = o.run.threads;
    cd.clock = now_seconds; /* layer timings */
    check(acmoe_ctx_create(&ctx, &cd), "context");
    printf("kernel path %s, %d threads\n", acmoe_isa_name(acmoe_ctx_settings(ctx).isa), acmoe_ctx_settings(ctx).n_threads);
    printf("%d training and %d test images\n", train.count, test.count);
    for (s = 0; s < o.run.seeds; s++) /* seed by seed, so an interrupted run has whole pairings */
        for (p = 0; p < n; p++)
            results[p][s] =
                train_one(&o, &t, patterns[p], o.run.seed + s, &train, &test, ctx, p == 0 ? resumed : NULL, log);
    if (n > 1 || o.run.seeds > 1) print_comparison(results, n, &o, &t);
    if (log) fclose(log);
    dataset_free(&train), dataset_free(&test);
    acmoe_ctx_destroy(ctx);
    return 0;
}
