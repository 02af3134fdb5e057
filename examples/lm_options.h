/* train_lm's flags: its options beside the run's (run_options.h), their table, the defaults
   and its rules between flags. Apart from train_lm.c so that the command-line fuzzer parses
   the same table. */
#ifndef ACMOE_EXAMPLES_LM_OPTIONS_H
#define ACMOE_EXAMPLES_LM_OPTIONS_H

#include "data.h"
#include "run_options.h"

typedef struct lm_options {
    run_options run;
    const char *prompt;
    int eval_every, eval_batches, sample, sample_top_k, data_parallel, expert_parallel;
    float target_bpc, temperature, eval_corrupt, eval_wordswap, sample_top_p;
} lm_options;

#define FLAG_OPTIONS lm_options
static const flag lm_flags[] = {
    FLAG("--data", OPT_STR, run.data, 1, 0, 0, "text file to train on (bytes are tokens), or builtin: a short embedded text"),
    FLAG("--eval-every", OPT_INT, eval_every, 1, INT_MAX, 0, "steps between evaluations"),
    FLAG("--eval-batches", OPT_INT, eval_batches, 1, 65536, 0, "held-out batches per evaluation"),
    FLAG("--eval-corrupt", OPT_FLOAT, eval_corrupt, 0, 1, 0,
         "evaluate also with this share of input bytes replaced by random ones, targets kept (0: off)"),
    FLAG("--eval-wordswap", OPT_FLOAT, eval_wordswap, 0, 1, 0,
         "evaluate also on the held-out text with this share of each line's non-stopwords made AAA (0: off)"),
    FLAG("--target-bpc", OPT_FLOAT, target_bpc, 0, 8, 0, "report the first evaluation at or below this"),
    FLAG("--sample", OPT_INT, sample, 0, INT_MAX, 0, "characters to generate after training (0: none)"),
    FLAG("--temperature", OPT_FLOAT, temperature, 0, 100, 0, "sampling temperature (0: the likeliest byte)"),
    FLAG("--sample-top-k", OPT_INT, sample_top_k, 0, 256, 0, "sample among the k likeliest bytes (0: all)"),
    FLAG("--sample-top-p", OPT_FLOAT, sample_top_p, 0, 1, CLI_ABOVE_MIN,
         "then among the fewest likeliest holding this probability (1: all)"),
    FLAG("--prompt", OPT_STR, prompt, 1, 0, 0, "text the sample starts from (its last --seq bytes are the context)"),
    FLAG("--data-parallel", OPT_INT, data_parallel, 0, 1, 0,
         "1: under mpirun, each rank trains on its share of every --batch (an MPI build: make build/train_lm_mpi)"),
    FLAG("--expert-parallel", OPT_INT, expert_parallel, 0, 1, 0,
         "1: as --data-parallel, and each MoE layer's experts split over the ranks (--experts a multiple of them)"),
};
#undef FLAG_OPTIONS

/* The library's options that a language model does not take. */
static const char *const lm_skipped_options[] = {"window", NULL};

static inline lm_options lm_options_defaults(void) {
    lm_options o;
    memset(&o, 0, sizeof o);
    o.run = run_options_defaults();
    o.run.data = "data/fortunes.txt";
    o.run.steps = 2500, o.run.log_every = 50, o.run.model.seq_len = 128;
    o.eval_every = 250, o.eval_batches = 8, o.sample = 300, o.sample_top_k = 20;
    o.target_bpc = 2.9f, o.temperature = 0.8f, o.eval_corrupt = 0.1f, o.sample_top_p = 1.0f;
    o.prompt = "The ";
    return o;
}

/* The rules between flags: 1, or 0 with the first broken rule in why. */
static inline int lm_options_valid(const void *options, char *why, size_t cap) {
    return run_options_valid(&((const lm_options *)options)->run, why, cap);
}

static inline void lm_cli_init(cli *c) {
    run_cli_init(c, "train_lm", lm_flags, sizeof lm_flags / sizeof lm_flags[0], offsetof(lm_options, run),
                 lm_skipped_options);
    c->valid = lm_options_valid;
}

#endif
