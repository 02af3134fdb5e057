/* train_vit's flags: its options beside the run's (run_options.h), their table, the
   defaults and its rules between flags. Apart from train_vit.c so that the command-line
   fuzzer parses the same table. */
#ifndef ACMOE_EXAMPLES_VIT_OPTIONS_H
#define ACMOE_EXAMPLES_VIT_OPTIONS_H

#include "data.h"
#include "run_options.h"

typedef struct vit_options {
    run_options run;
    int patch;
} vit_options;

#define FLAG_OPTIONS vit_options
static const flag vit_flags[] = {
    FLAG("--data", OPT_STR, run.data, 1, 0, 0,
         "CSV of images: 64 pixels of 0..16 and the class per line; or builtin: drawn seven-segment digits"),
    FLAG("--patch", OPT_INT, patch, 1, DIGITS_SIDE, CLI_KEPT, "patch side in pixels, a divisor of 8 (sets --seq)"),
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
    o.patch = 2;
    return o;
}

/* The rules between flags: 1, or 0 with the first broken rule in why. */
static inline int vit_options_valid(const void *options, char *why, size_t cap) {
    const vit_options *o = (const vit_options *)options;
    if (DIGITS_SIDE % o->patch) return run_refuse(why, cap, "--patch divides 8");
    return run_options_valid(&o->run, why, cap);
}

static inline void vit_cli_init(cli *c) {
    run_cli_init(c, "train_vit", vit_flags, sizeof vit_flags / sizeof vit_flags[0], offsetof(vit_options, run),
                 vit_skipped_options);
    c->valid = vit_options_valid;
}

#endif
