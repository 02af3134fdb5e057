/* train_vit's flags: the options, their table with each flag's range, the defaults, and the
   rules between flags. Apart from train_vit.c so that the command-line fuzzer parses the
   same table. */
#ifndef ACMOE_EXAMPLES_VIT_OPTIONS_H
#define ACMOE_EXAMPLES_VIT_OPTIONS_H

#include "cli.h"
#include "data.h"
#include "moe_flags.h"

#define VIT_MAX_PATTERNS 16
#define VIT_MAX_SEEDS 16

typedef struct vit_options {
    const char *data, *pattern, *compare, *save, *resume;
    int steps, batch, patch, d_model, heads, experts, top_k, d_ff, warmup, threads, seeds, pre_ln, log_every, window;
    long seed;
    float lr, weight_decay, clip, dropout;
    moe_flags moe;
} vit_options;

/* The flags that shape a model or its training are CLI_KEPT: --resume takes them from the
   checkpoint. */
#define FLAG_OPTIONS vit_options
static const flag vit_flags[] = {
    FLAG("--data", OPT_STR, data, 1, 0, 0,
         "CSV of images: 64 pixels of 0..16 and the class per line; or builtin: drawn seven-segment digits"),
    FLAG("--pattern", OPT_STR, pattern, 1, MOE_PATTERN_MAX, CLI_KEPT,
         "router per layer: g SMoE, c AC, s Switch, o cosine, b StableMoE, x XMoE, u USMoE, t Swin-MoE gate, w AC Swin-MoE, e expert choice, m Soft MoE "
         "(vmoe), n Soft MoE (the paper's code), a AC Soft MoE, f dense"),
    FLAG("--compare", OPT_STR, compare, 1, VIT_MAX_PATTERNS * (MOE_PATTERN_MAX + 1) - 1, 0,
         "comma-separated patterns (at most 16) to train in turn and compare (overrides --pattern)"),
    FLAG("--steps", OPT_INT, steps, 1, INT_MAX, CLI_KEPT, "training steps per model (the cosine schedule's end)"),
    FLAG("--batch", OPT_INT, batch, 1, 65536, CLI_KEPT, "images per step (and per test call)"),
    FLAG("--patch", OPT_INT, patch, 1, DIGITS_SIDE, CLI_KEPT, "patch side in pixels, a divisor of 8"),
    FLAG("--d-model", OPT_INT, d_model, 1, MOE_WIDTH_MAX, CLI_KEPT, "model width"),
    FLAG("--heads", OPT_INT, heads, 1, MOE_WIDTH_MAX, CLI_KEPT, "attention heads, a divisor of --d-model"),
    FLAG("--experts", OPT_INT, experts, 1, MOE_WIDTH_MAX, CLI_KEPT, "experts per MoE layer"),
    FLAG("--top-k", OPT_INT, top_k, 1, MOE_WIDTH_MAX, CLI_KEPT, "experts per patch, at most --experts"),
    FLAG("--d-ff", OPT_INT, d_ff, 1, MOE_WIDTH_MAX, CLI_KEPT, "expert hidden width"),
    MOE_FLAGS,
    FLAG("--pre-ln", OPT_INT, pre_ln, 0, 1, CLI_KEPT, "1: pre-LN blocks (ViT); 0: post-LN"),
    FLAG("--window", OPT_INT, window, 0, 16, CLI_KEPT,
         "0: ViT-style encoder; above 0: Swin-style backbone, attention in windows of this many patches a side, "
         "stages split by '|' in the pattern (e.g. ff|tftw), pre-LN"),
    FLAG("--dropout", OPT_FLOAT, dropout, 0, 0.99, CLI_KEPT, "dropout on attention and FFN outputs"),
    FLAG("--lr", OPT_FLOAT, lr, 0, 10, CLI_ABOVE_MIN | CLI_KEPT, "peak learning rate (AdamW)"),
    FLAG("--warmup", OPT_INT, warmup, 0, INT_MAX, CLI_KEPT, "linear warmup steps (0: none), then cosine to zero"),
    FLAG("--weight-decay", OPT_FLOAT, weight_decay, 0, 1000, CLI_KEPT, "AdamW decay of weights"),
    FLAG("--clip", OPT_FLOAT, clip, 0, 1e6, CLI_KEPT, "gradient clipping by global norm (0: off)"),
    FLAG("--seed", OPT_LONG, seed, 1, INT_MAX - VIT_MAX_SEEDS + 1, CLI_KEPT, "initialisation and batch order"),
    FLAG("--seeds", OPT_INT, seeds, 1, VIT_MAX_SEEDS, 0, "with --compare: seeds --seed, --seed + 1, ..."),
    FLAG("--threads", OPT_INT, threads, 0, 1024, 0, "threads (0: online CPUs)"),
    FLAG("--log-every", OPT_INT, log_every, 1, INT_MAX, 0, "steps between progress lines (and checkpoints)"),
    FLAG("--save", OPT_STR, save, 1, 4000, 0,
         "checkpoint at each progress line (with --compare: one file per pattern and seed)"),
    FLAG("--resume", OPT_STR, resume, 1, 0, 0,
         "continue from this checkpoint, with its model and training flags, to its last step"),
};
#undef FLAG_OPTIONS

static inline vit_options vit_options_defaults(void) {
    vit_options o;
    memset(&o, 0, sizeof o);
    o.data = "data/digits.csv";
    o.pattern = "ggc";
    o.steps = 1500, o.batch = 64, o.patch = 2, o.d_model = 64, o.heads = 4, o.experts = 8, o.top_k = 2;
    o.d_ff = 128, o.warmup = 100, o.seeds = 1, o.pre_ln = 1, o.log_every = 500, o.seed = 1;
    o.lr = 2e-3f, o.weight_decay = 0.05f, o.clip = 1.0f;
    o.moe = moe_flags_defaults(); /* 'c' layers get AC options like the paper's Swin runs ('w' has them built in) */
    o.moe.ac_clip = 1.5f, o.moe.ac_scaling = "preclip", o.moe.ac_experts = 1;
    return o;
}

static inline int vit_refuse(char *why, size_t cap, const char *reason) {
    snprintf(why, cap, "%s", reason);
    return 0;
}

/* The rules between flags (the table checked each one's range): 1, or 0 with the first
   broken rule in why. */
static inline int vit_options_valid(const vit_options *o, char *why, size_t cap) {
    char patterns[VIT_MAX_PATTERNS][MOE_PATTERN_MAX + 1], reason[160];
    const int patterns_ok = o->compare ? moe_split_patterns(o->compare, patterns, VIT_MAX_PATTERNS, reason, sizeof reason)
                                       : moe_pattern_valid(o->pattern, strlen(o->pattern), reason, sizeof reason);
    if (!patterns_ok) {
        snprintf(why, cap, "%s: %s", o->compare ? "--compare" : "--pattern", reason);
        return 0;
    }
    if (!moe_flags_valid(&o->moe, why, cap)) return 0;
    if (DIGITS_SIDE % o->patch) return vit_refuse(why, cap, "--patch divides 8");
    if (!o->window && strchr(o->compare ? o->compare : o->pattern, '|'))
        return vit_refuse(why, cap, "stages ('|' in a pattern) need --window");
    if (o->window && !o->pre_ln) return vit_refuse(why, cap, "--window needs --pre-ln 1");
    if (o->resume && o->compare) return vit_refuse(why, cap, "--resume continues one model; it does not combine with --compare");
    if (o->seeds > 1 && !o->compare) return vit_refuse(why, cap, "--seeds above 1 needs --compare");
    if (o->d_model % o->heads) return vit_refuse(why, cap, "--heads divides --d-model");
    if (o->top_k > o->experts) return vit_refuse(why, cap, "--top-k is at most --experts");
    if (o->moe.usmoe_budget > (float)o->experts) return vit_refuse(why, cap, "--usmoe-budget is at most --experts");
    return 1;
}

#endif
