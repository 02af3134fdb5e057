/* train_vit's flags: its options beside the run's (run_options.h), their table, the
   defaults and its rules between flags. Apart from train_vit.c so that the command-line
   fuzzer parses the same table. */
#ifndef ACMOE_EXAMPLES_VIT_OPTIONS_H
#define ACMOE_EXAMPLES_VIT_OPTIONS_H

#include "data.h"
#include "run_options.h"

#define VIT_PATCH_MAX 64
#define VIT_GRID_MAX 7 /* the default patch leaves at most 7 x 7 patches */

#define VIT_LIST_MAX 8 /* noise deviations, attack budgets */

typedef struct vit_options {
    run_options run;
    int patch; /* 0: by the images' side (vit_patch_for) */
    const char *noise, *attack_eps; /* comma-separated lists (vit_list) */
    int attack_images;
} vit_options;

#define FLAG_OPTIONS vit_options
static const flag vit_flags[] = {
    FLAG("--data", OPT_STR, run.data, 1, 0, 0,
         "CSV of images: 64 pixels of 0..16 and the class per line; a folder of IDX files, split into train-* and "
         "t10k-* (Fashion-MNIST); or builtin: drawn seven-segment digits"),
    FLAG("--patch", OPT_INT, patch, 0, VIT_PATCH_MAX, CLI_KEPT,
         "patch side in pixels, a divisor of the images' side (sets --seq); 0: 2 for 8 x 8 images, 4 for 28 x 28"),
    FLAG("--noise", OPT_STR, noise, 1, 200, 0,
         "deviations of the Gaussian noise the test images get, comma-separated (pixels run from 0 to 1)"),
    FLAG("--attack-eps", OPT_STR, attack_eps, 1, 200, 0,
         "L-inf budgets of FGSM and PGD attacks after training, in 1/255 of the pixel range, comma-separated"),
    FLAG("--attack-images", OPT_INT, attack_images, 1, INT_MAX, 0, "test images the attacks run on (the first ones)"),
};
#undef FLAG_OPTIONS

/* The library's options that an image classifier does not take: its context is the
   patches of an image (--patch), its head is its own. */
static const char *const vit_skipped_options[] = {"seq_len", "untied_head", NULL};

static inline vit_options vit_options_defaults(void) {
    vit_options o;
    memset(&o, 0, sizeof o);
    o.run = run_options_defaults();
    o.run.data = "data/digits.csv";
    o.run.steps = 1500, o.run.log_every = 500;
    o.run.model.batch = 64, o.run.model.d_model = 64, o.run.model.n_heads = 4, o.run.model.n_experts = 8;
    o.run.model.pre_ln = 1;
    /* 'c' layers get AC options like the paper's Swin runs ('w' has them built in) */
    o.run.model.moe.ac.clip = 1.5f, o.run.model.moe.ac.scaling = ACMOE_AC_SCALE_PRECLIP_MEAN;
    o.run.model.moe.ac_weight_experts = 1;
    o.run.optim.weight_decay = 0.05f, o.run.optim.schedule = ACMOE_SCHEDULE_COSINE;
    o.patch = 0;
    o.noise = "0.1,0.3", o.attack_eps = NULL, o.attack_images = 1000;
    return o;
}

/* The numbers of a comma-separated list, each in [low, high], into out (at most
   VIT_LIST_MAX): their count, or -1 with why. NULL is an empty list. */
static inline int vit_list(const char *flag, const char *text, double low, double high, float *out, char *why,
                           size_t cap) {
    int count = 0;
    while (text && *text) {
        char *end;
        const double value = strtod(text, &end);
        if (end == text || !(value >= low && value <= high) || (*end && *end != ',')) {
            snprintf(why, cap, "%s %s: a comma-separated list of numbers from %g to %g", flag, text, low, high);
            return -1;
        }
        if (count == VIT_LIST_MAX) {
            snprintf(why, cap, "%s: at most %d values", flag, VIT_LIST_MAX);
            return -1;
        }
        out[count++] = (float)value;
        text = *end ? end + 1 : end;
    }
    return count;
}

/* The rules between flags: 1, or 0 with the first broken rule in why. --patch is checked
   against the images (vit_patch_for) once they are read. */
static inline int vit_options_valid(const void *options, char *why, size_t cap) {
    const vit_options *o = (const vit_options *)options;
    float values[VIT_LIST_MAX];
    if (vit_list("--noise", o->noise, 0.0, 10.0, values, why, cap) < 0) return 0;
    if (vit_list("--attack-eps", o->attack_eps, 0.0, 255.0, values, why, cap) < 0) return 0;
    return run_options_valid(&o->run, why, cap);
}

/* The patch side for images of side pixels: patch, or for 0 the smallest divisor of side
   that leaves at most VIT_GRID_MAX x VIT_GRID_MAX patches (2 for 8 x 8, 4 for 28 x 28).
   0 with why when patch does not divide side. */
static inline int vit_patch_for(int patch, int side, char *why, size_t cap) {
    if (patch == 0)
        for (patch = 1; side % patch || side / patch > VIT_GRID_MAX; patch++) continue;
    if (side % patch == 0) return patch;
    snprintf(why, cap, "--patch %d does not divide the images' side, %d", patch, side);
    return 0;
}

static inline void vit_cli_init(cli *c) {
    run_cli_init(c, "train_vit", vit_flags, sizeof vit_flags / sizeof vit_flags[0], offsetof(vit_options, run),
                 vit_skipped_options);
    c->valid = vit_options_valid;
}

#endif
