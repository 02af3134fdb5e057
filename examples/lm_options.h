/* train_lm's flags: the options, their table with each flag's range, the defaults, and the
   rules between flags. Apart from train_lm.c so that the command-line fuzzer parses the
   same table. */
#ifndef ACMOE_EXAMPLES_LM_OPTIONS_H
#define ACMOE_EXAMPLES_LM_OPTIONS_H

#include "cli.h"
#include "data.h"
#include "moe_flags.h"

#define LM_MAX_PATTERNS 8
#define LM_MAX_SEEDS 16

typedef struct lm_options {
    const char *data, *pattern, *compare, *prompt, *save, *resume, *schedule;
    int steps, batch, seq, d_model, heads, experts, top_k, d_ff, warmup, threads, seeds;
    int eval_every, eval_batches, log_every, sample, sample_top_k, pre_ln, untied_head;
    long seed;
    float lr, min_lr, weight_decay, dropout, clip, target_bpc, temperature, eval_corrupt, sample_top_p;
    moe_flags moe;
} lm_options;

/* The flags that shape a model or its training are CLI_KEPT: --resume takes them from the
   checkpoint. */
#define FLAG_OPTIONS lm_options
static const flag lm_flags[] = {
    FLAG("--data", OPT_STR, data, 1, 0, 0, "text file to train on (bytes are tokens), or builtin: a short embedded text"),
    FLAG("--pattern", OPT_STR, pattern, 1, MOE_PATTERN_MAX, CLI_KEPT,
         "router per layer: g SMoE, c AC, s Switch, o cosine, b StableMoE, x XMoE, u USMoE, t Swin-MoE gate, w AC Swin-MoE, m Soft MoE (vmoe), n Soft MoE "
         "(the paper's code), a AC Soft MoE, f dense"),
    FLAG("--compare", OPT_STR, compare, 1, LM_MAX_PATTERNS * (MOE_PATTERN_MAX + 1) - 1, 0,
         "comma-separated patterns (at most 8) to train in turn and compare (overrides --pattern)"),
    FLAG("--steps", OPT_INT, steps, 1, INT_MAX, 0, "train until the model has taken this many steps"),
    FLAG("--batch", OPT_INT, batch, 1, 65536, CLI_KEPT, "sequences per step"),
    FLAG("--seq", OPT_INT, seq, 1, 65536, CLI_KEPT, "context length"),
    FLAG("--d-model", OPT_INT, d_model, 1, MOE_WIDTH_MAX, CLI_KEPT, "model width"),
    FLAG("--heads", OPT_INT, heads, 1, MOE_WIDTH_MAX, CLI_KEPT, "attention heads, a divisor of --d-model"),
    FLAG("--experts", OPT_INT, experts, 1, MOE_WIDTH_MAX, CLI_KEPT, "experts per MoE layer"),
    FLAG("--top-k", OPT_INT, top_k, 1, MOE_WIDTH_MAX, CLI_KEPT, "experts per token, at most --experts"),
    FLAG("--d-ff", OPT_INT, d_ff, 1, MOE_WIDTH_MAX, CLI_KEPT, "expert hidden width"),
    MOE_FLAGS,
    FLAG("--pre-ln", OPT_INT, pre_ln, 0, 1, CLI_KEPT, "1: pre-LN blocks; 0: post-LN as in the paper"),
    FLAG("--untied-head", OPT_INT, untied_head, 0, 1, CLI_KEPT, "1: an output head of its own; 0: the token embedding"),
    FLAG("--lr", OPT_FLOAT, lr, 0, 10, CLI_ABOVE_MIN | CLI_KEPT, "peak learning rate (AdamW)"),
    FLAG("--warmup", OPT_INT, warmup, 0, INT_MAX, CLI_KEPT, "linear warmup steps (0: none)"),
    FLAG("--schedule", OPT_STR, schedule, 1, 0, CLI_KEPT,
         "after warmup: constant (the reference) or cosine to --min-lr at --steps"),
    FLAG("--min-lr", OPT_FLOAT, min_lr, 0, 10, CLI_KEPT, "final learning rate of the cosine schedule"),
    FLAG("--weight-decay", OPT_FLOAT, weight_decay, 0, 1000, CLI_KEPT, "AdamW decay of weights (not biases or norms)"),
    FLAG("--dropout", OPT_FLOAT, dropout, 0, 0.99, CLI_KEPT, "dropout on attention and FFN outputs"),
    FLAG("--clip", OPT_FLOAT, clip, 0, 1e6, CLI_KEPT, "gradient clipping by global norm (0: off)"),
    FLAG("--seed", OPT_LONG, seed, 1, INT_MAX - LM_MAX_SEEDS + 1, CLI_KEPT, "initialisation, dropout and batch order"),
    FLAG("--seeds", OPT_INT, seeds, 1, LM_MAX_SEEDS, 0,
         "with --compare: train every pattern with seeds --seed, --seed + 1, ..."),
    FLAG("--threads", OPT_INT, threads, 0, 1024, 0, "threads (0: online CPUs)"),
    FLAG("--eval-every", OPT_INT, eval_every, 1, INT_MAX, 0, "steps between evaluations"),
    FLAG("--eval-batches", OPT_INT, eval_batches, 1, 65536, 0, "held-out batches per evaluation"),
    FLAG("--eval-corrupt", OPT_FLOAT, eval_corrupt, 0, 1, 0,
         "evaluate also with this share of input bytes replaced by random ones, targets kept (0: off)"),
    FLAG("--target-bpc", OPT_FLOAT, target_bpc, 0, 8, 0, "report the first evaluation at or below this"),
    FLAG("--log-every", OPT_INT, log_every, 1, INT_MAX, 0, "steps between progress lines"),
    FLAG("--sample", OPT_INT, sample, 0, INT_MAX, 0, "characters to generate after training (0: none)"),
    FLAG("--temperature", OPT_FLOAT, temperature, 0, 100, 0, "sampling temperature (0: the likeliest byte)"),
    FLAG("--sample-top-k", OPT_INT, sample_top_k, 0, 256, 0, "sample among the k likeliest bytes (0: all)"),
    FLAG("--sample-top-p", OPT_FLOAT, sample_top_p, 0, 1, CLI_ABOVE_MIN,
         "then among the fewest likeliest holding this probability (1: all)"),
    FLAG("--prompt", OPT_STR, prompt, 1, 0, 0, "text the sample starts from (its last --seq bytes are the context)"),
    FLAG("--save", OPT_STR, save, 1, 4000, 0, "checkpoint after each evaluation (with --compare: one file per pattern)"),
    FLAG("--resume", OPT_STR, resume, 1, 0, 0,
         "continue from this checkpoint, with its model and training flags, up to --steps"),
};
#undef FLAG_OPTIONS

static inline lm_options lm_options_defaults(void) {
    lm_options o;
    memset(&o, 0, sizeof o);
    o.data = "data/fortunes.txt";
    o.pattern = "ggc";
    o.steps = 2500, o.batch = 8, o.seq = 128, o.d_model = 128, o.heads = 8, o.experts = 16, o.top_k = 2;
    o.d_ff = 128, o.warmup = 100, o.eval_every = 250, o.eval_batches = 8, o.log_every = 50, o.sample = 300;
    o.sample_top_k = 20, o.seed = 1, o.seeds = 1, o.lr = 2e-3f, o.clip = 1.0f, o.target_bpc = 2.9f, o.temperature = 0.8f;
    o.eval_corrupt = 0.1f, o.sample_top_p = 1.0f;
    o.prompt = "The ";
    o.moe = moe_flags_defaults();
    o.schedule = "constant";
    return o;
}

static inline int lm_refuse(char *why, size_t cap, const char *reason) {
    snprintf(why, cap, "%s", reason);
    return 0;
}

/* The rules between flags (the table checked each one's range): 1, or 0 with the first
   broken rule in why. */
static inline int lm_options_valid(const lm_options *o, char *why, size_t cap) {
    char patterns[LM_MAX_PATTERNS][MOE_PATTERN_MAX + 1], reason[160];
    const int patterns_ok = o->compare ? moe_split_patterns(o->compare, patterns, LM_MAX_PATTERNS, reason, sizeof reason)
                                       : moe_pattern_valid(o->pattern, strlen(o->pattern), reason, sizeof reason);
    if (!patterns_ok) {
        snprintf(why, cap, "%s: %s", o->compare ? "--compare" : "--pattern", reason);
        return 0;
    }
    if (!moe_flags_valid(&o->moe, why, cap)) return 0;
    if (strcmp(o->schedule, "constant") && strcmp(o->schedule, "cosine"))
        return lm_refuse(why, cap, "--schedule is constant or cosine");
    if (o->resume && o->compare) return lm_refuse(why, cap, "--resume continues one model; it does not combine with --compare");
    if (o->seeds > 1 && !o->compare) return lm_refuse(why, cap, "--seeds above 1 needs --compare");
    if (o->d_model % o->heads) return lm_refuse(why, cap, "--heads divides --d-model");
    if (o->top_k > o->experts) return lm_refuse(why, cap, "--top-k is at most --experts");
    if (o->moe.usmoe_budget > (float)o->experts) return lm_refuse(why, cap, "--usmoe-budget is at most --experts");
    return 1;
}

#endif
