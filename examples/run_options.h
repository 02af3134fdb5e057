/* What the training examples share on the command line: a run's options (patterns, steps,
   seeds, checkpoints, log) with their flag table, the model and optimizer descriptors that
   the library's flags set, the rules between flags, and what a resumed run takes from its
   checkpoint. A program's options struct starts with a run_options member named run and
   adds its own flags (run_cli_init puts them all in one parser). */
#ifndef ACMOE_EXAMPLES_RUN_OPTIONS_H
#define ACMOE_EXAMPLES_RUN_OPTIONS_H

#include "cli.h"
#include "patterns.h"

#define RUN_MAX_PATTERNS 16
#define RUN_MAX_SEEDS 16
#define RUN_PATH_MAX 4000 /* --save and --log, so that derived paths fit a buffer */

typedef struct run_options {
    const char *data, *pattern, *compare, *save, *resume, *log;
    int steps, threads, seeds, log_every;
    long seed;
    acmoe_lm_desc model;    /* the library's model flags; pattern and seed set per run */
    acmoe_optim_desc optim; /* the library's optimizer flags; total_steps is --steps */
} run_options;

/* The flags that shape a model or its training are CLI_KEPT: --resume takes them from the
   checkpoint. */
#define FLAG_OPTIONS run_options
static const flag run_flags[] = {
    FLAG("--pattern", OPT_STR, pattern, 1, MOE_PATTERN_MAX, CLI_KEPT,
         "router per layer, one letter each (listed below), stages split by '|' with --window"),
    FLAG("--compare", OPT_STR, compare, 1, RUN_MAX_PATTERNS * (MOE_PATTERN_MAX + 1) - 1, 0,
         "comma-separated patterns (at most 16) to train in turn and compare (overrides --pattern)"),
    FLAG("--steps", OPT_INT, steps, 1, INT_MAX, 0, "train until the model has taken this many steps"),
    FLAG("--seed", OPT_LONG, seed, 1, INT_MAX - RUN_MAX_SEEDS + 1, CLI_KEPT, "initialisation, dropout and batch order"),
    FLAG("--seeds", OPT_INT, seeds, 1, RUN_MAX_SEEDS, 0, "with --compare: train every pattern with seeds --seed, --seed + 1, ..."),
    FLAG("--threads", OPT_INT, threads, 0, 1024, 0, "threads (0: online CPUs)"),
    FLAG("--log-every", OPT_INT, log_every, 1, INT_MAX, 0, "steps between progress lines"),
    FLAG("--save", OPT_STR, save, 1, RUN_PATH_MAX, 0,
         "checkpoint after each evaluation (with --compare: one file per pattern, and per seed with --seeds)"),
    FLAG("--resume", OPT_STR, resume, 1, 0, 0, "continue from this checkpoint, with its model and training flags, up to --steps"),
    FLAG("--log", OPT_STR, log, 1, RUN_PATH_MAX, 0,
         "JSON lines of every progress step and evaluation (plot_log draws them)"),
};
#undef FLAG_OPTIONS

/* The run's defaults where the library's are not the examples'. */
static inline run_options run_options_defaults(void) {
    run_options o;
    memset(&o, 0, sizeof o);
    o.pattern = "ggc";
    o.seed = 1, o.seeds = 1;
    o.model.batch = 8, o.model.d_model = 128, o.model.n_heads = 8, o.model.d_ff = 128, o.model.n_experts = 16;
    o.model.top_k = 2;
    o.optim.lr = 2e-3f, o.optim.warmup_steps = 100, o.optim.clip_norm = 1.0f;
    return o;
}

static inline void run_print_letters(void);

/* One parser for a program's own flags, the run's, and the library's model and optimizer
   options but those whose key is among skip (options that do not apply to the program). */
static inline void run_cli_init(cli *c, const char *program, const flag *own, size_t count, size_t run_offset,
                                const char *const *skip) {
    int n_model, n_optim;
    const acmoe_option *model = acmoe_model_options(&n_model), *optim = acmoe_optim_options(&n_optim);
    cli_init(c, program);
    cli_add_flags(c, own, count, 0);
    cli_add_flags(c, run_flags, sizeof run_flags / sizeof run_flags[0], run_offset);
    cli_add_options(c, model, n_model, run_offset + offsetof(run_options, model), skip);
    cli_add_options(c, optim, n_optim, run_offset + offsetof(run_options, optim), skip);
    c->more_help = run_print_letters;
}

/* What each router letter stands for (--help). */
static inline void run_print_letters(void) {
    int letter, listed = 0;
    printf("router letters:");
    for (letter = 'a'; letter <= 'z'; letter++)
        if (acmoe_router_name((char)letter)) printf("%s %c %s", listed++ ? "," : "", letter, acmoe_router_name((char)letter));
    printf("\n");
}

static inline int run_refuse(char *why, size_t cap, const char *reason) {
    snprintf(why, cap, "%s", reason);
    return 0;
}

/* The rules between the run's flags (the table checked each one's range): 1, or 0 with the
   first broken rule in why. */
static inline int run_options_valid(const run_options *o, char *why, size_t cap) {
    char patterns[RUN_MAX_PATTERNS][MOE_PATTERN_MAX + 1], reason[160];
    const acmoe_lm_desc *m = &o->model;
    const int patterns_ok = o->compare ? moe_split_patterns(o->compare, patterns, RUN_MAX_PATTERNS, reason, sizeof reason)
                                       : moe_pattern_valid(o->pattern, strlen(o->pattern), reason, sizeof reason);
    if (!patterns_ok) {
        snprintf(why, cap, "%s: %s", o->compare ? "--compare" : "--pattern", reason);
        return 0;
    }
    if (!m->window && strchr(o->compare ? o->compare : o->pattern, '|'))
        return run_refuse(why, cap, "stages ('|' in a pattern) need --window (a Swin-style vision backbone)");
    if (m->window && !m->pre_ln) return run_refuse(why, cap, "--window needs --pre-ln 1");
    if (o->resume && o->compare) return run_refuse(why, cap, "--resume continues one model; it does not combine with --compare");
    if (o->seeds > 1 && !o->compare) return run_refuse(why, cap, "--seeds above 1 needs --compare");
    if (m->d_model % m->n_heads) return run_refuse(why, cap, "--heads divides --d-model");
    if (m->n_experts && m->top_k > m->n_experts) return run_refuse(why, cap, "--top-k is at most --experts");
    if (m->n_experts && m->moe.usmoe_budget > (float)m->n_experts)
        return run_refuse(why, cap, "--usmoe-budget is at most --experts");
    return 1;
}

/* The patterns of the run (--compare's, or --pattern alone); exits with status 2 for a bad
   list (checked with the options; kept for a resumed pattern). */
static inline int run_patterns(const run_options *o, const char *program, char out[][MOE_PATTERN_MAX + 1]) {
    char why[256];
    const int n = moe_split_patterns(o->compare ? o->compare : o->pattern, out, RUN_MAX_PATTERNS, why, sizeof why);
    if (n == 0) cli_fail(program, "%s", why);
    return n;
}

/* ---- resuming ---- */

/* The run a checkpoint's model continues: its model options, pattern and seed, and its
   optimizer options where it keeps them (1; 0 for a checkpoint that keeps none). The rest
   as run has them. */
static inline int run_of_checkpoint(const acmoe_lm *lm, run_options *run) {
    const acmoe_train_desc t = acmoe_lm_train_settings(lm);
    run->model = acmoe_lm_settings(lm);
    run->pattern = run->model.pattern, run->seed = (long)run->model.seed;
    if (!(t.optim.lr > 0.0f)) return 0; /* all zero for a checkpoint that keeps no training options */
    run->optim = t.optim;
    return 1;
}

/* The end of a resumed run: the checkpoint's unless --steps says otherwise, which it may
   not under a cosine schedule, whose rate falls to --min-lr at that end. */
static inline int run_resumed_steps(const cli *c, const run_options *given, const acmoe_optim_desc *kept) {
    if (kept->total_steps < 1) return given->steps;
    if (!cli_given(c, "--steps")) return kept->total_steps;
    if (kept->schedule == ACMOE_SCHEDULE_COSINE && given->steps != kept->total_steps)
        cli_fail(c->program, "--steps %d conflicts with the checkpoint's %d, where its cosine schedule ends", given->steps,
                 kept->total_steps);
    return given->steps;
}

/* Loads --resume's checkpoint; exits with status 2 when it does not load. */
static inline acmoe_lm *run_load_checkpoint(const run_options *o, const char *program) {
    acmoe_lm *lm = NULL;
    const acmoe_status s = acmoe_lm_load(&lm, o->resume);
    if (s != ACMOE_OK) cli_fail(program, "--resume %s: %s", o->resume, acmoe_status_string(s));
    return lm;
}

/* Says what the resumed run continues with. */
static inline void run_print_resumed(const run_options *o, const acmoe_lm *lm, int has_training) {
    printf("resuming %s at step %ld of %d: pattern %s, seq %d, batch %d, seed %ld", o->resume, acmoe_lm_steps_taken(lm),
           o->steps, o->pattern, o->model.seq_len, o->model.batch, o->seed);
    if (has_training)
        printf(", lr %g, %s schedule, warmup %d from the checkpoint\n", o->optim.lr,
               acmoe_enum_name(ACMOE_ENUM_SCHEDULE, (int)o->optim.schedule), o->optim.warmup_steps);
    else printf(" from the checkpoint, which keeps no training flags: those given or their defaults\n");
}

#endif
