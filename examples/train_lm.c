/* Trains byte-level MoE language models on a text file and compares routers.

     train_lm --data data/fortunes.txt --compare ggc,ggg      the paper's AC layout against SMoE
     train_lm --compare ggc,ggg --seeds 3                     ... over three seeds, with the spread
     train_lm --data FILE --pattern gcc --steps 2000          one model
     train_lm --data builtin --steps 200                      a short embedded text, no file needed
     train_lm --save run.safetensors --steps 1000             ... then continue it exactly:
     train_lm --resume run.safetensors --steps 2000         (the model and training flags come
                                                              from the checkpoint)
     train_lm --compare ggc,ggg --seeds 3 --log run.jsonl     ... with JSON lines that
     plot_log run.jsonl > run.svg                               plot_log draws
     mpirun -np 4 train_lm_mpi --data-parallel 1 --batch 32   four processes, 8 sequences each
     mpirun -np 2 train_lm_mpi --expert-parallel 1            ... and half the experts each
                                                              (train_lm built with ACMOE_MPI)
     train_lm --help                                          every flag and its default

   Each model sees the same batches (same seed) and is evaluated on the same held-out 10 % of
   the text, so the comparison isolates the routers; with --seeds, every seed is such a
   pairing, and the differences are reported seed by seed. */
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"
#include "lm_options.h"
#include "report.h"
#include "wordswap.h"

typedef lm_options options;

#define PROGRAM "train_lm"

/* ---- corpus ---- */

/* --data builtin: a text to try the pipeline end to end without a corpus file. */
static const char builtin_text[] =
    "A mixture of experts splits a layer into many small networks and lets a router send each "
    "token to a few of them. The router is a clustering: tokens that look alike go to the same "
    "expert, and the expert learns what those tokens need. When the clusters are loose the "
    "experts learn the same things twice; when they are tight each expert specialises. The "
    "adaptive clustering router measures how tightly each cluster sits along every feature and "
    "routes in a space where the tight features count for more.\n";

#define VAL_FRACTION 0.1f
#define MIN_CORPUS 20 /* bytes: two for each split of 90 / 10 */

/* The corpus --data names: the builtin text, or a file read whole into *owned. A file
   that cannot be read or is too short exits with status 2. */
static acmoe_corpus load_corpus(const char *path, unsigned char **owned) {
    acmoe_corpus c;
    char why[256];
    size_t size = 0;
    *owned = NULL;
    if (data_is_builtin(path)) {
        printf("corpus: the builtin %lu-byte text (--data builtin)\n", (unsigned long)(sizeof builtin_text - 1));
        if (acmoe_corpus_view(&c, (const unsigned char *)builtin_text, sizeof builtin_text - 1, VAL_FRACTION) != ACMOE_OK)
            exit(1);
        return c;
    }
    *owned = data_read_file(path, &size, why, sizeof why);
    if (!*owned) cli_fail(PROGRAM, "--data %s: %s (--data " DATA_BUILTIN " trains on a short embedded text)", path, why);
    if (acmoe_corpus_view(&c, *owned, size, VAL_FRACTION) != ACMOE_OK)
        cli_fail(PROGRAM, "--data %s: %lu bytes, fewer than the %d a training and a held-out part need", path,
                 (unsigned long)size, MIN_CORPUS);
    printf("corpus %s: %lu bytes\n", path, (unsigned long)size);
    return c;
}

/* ---- processes ---- */

#ifdef ACMOE_MPI
static MPI_Comm world;
static acmoe_comm ranks;
#endif

/* The ranks that share each batch under --data-parallel or --expert-parallel (NULL: this
   process alone). Ranks other than 0 print nothing and write no log or checkpoint: their
   model is rank 0's. */
static acmoe_comm *share_batches(options *o) {
    if (!o->data_parallel && !o->expert_parallel) return NULL;
#ifdef ACMOE_MPI
    world = MPI_COMM_WORLD;
    if (acmoe_comm_mpi(&ranks, &world) != ACMOE_OK) cli_fail(PROGRAM, "--data-parallel: MPI has no communicator");
    if (o->run.model.batch % ranks.size)
        cli_fail(PROGRAM, "--data-parallel: --batch %d is not a multiple of the %d ranks", o->run.model.batch, ranks.size);
    if (o->expert_parallel && o->run.model.n_experts % ranks.size)
        cli_fail(PROGRAM, "--expert-parallel: --experts %d is not a multiple of the %d ranks", o->run.model.n_experts,
                 ranks.size);
    if (ranks.rank > 0) {
        if (!freopen("/dev/null", "w", stdout)) exit(1);
        o->run.log = NULL, o->run.save = NULL;
    }
    return &ranks;
#else
    cli_fail(PROGRAM, "--%s needs a build with MPI (make build/train_lm_mpi, then mpirun)",
             o->expert_parallel ? "expert-parallel" : "data-parallel");
    return NULL;
#endif
}

/* ---- training ---- */

static void check(acmoe_status s, const char *what) {
    if (s == ACMOE_OK) return;
    fprintf(stderr, "train_lm: %s: %s\n", what, acmoe_status_string(s));
    exit(1);
}

typedef struct result {
    char pattern[64];
    double val_loss, val_loss_corrupted, val_loss_wordswap, tokens_per_second, imbalance;
    int steps_to_target;
} result;

/* The logits of the context's last position: decoding one new position at a time where
   every router allows it, else a forward pass over the whole context. */
static void predict(acmoe_lm *lm, acmoe_ctx *ctx, const int32_t *context, int len, int fresh) {
    if (acmoe_lm_decode(lm, ctx, context, len, fresh ? 0 : len - 1) == ACMOE_OK) return;
    check(acmoe_lm_forward(lm, ctx, context, NULL, 1, len, 0, NULL), "sampling");
}

/* Generates text from the prompt, in the model's context length (a resumed model's may
   differ from --seq's default). AC weights stay as the last evaluation measured them. */
static void sample_text(acmoe_lm *lm, acmoe_ctx *ctx, const options *o) {
    const int vocab = 256, seq = acmoe_lm_settings(lm).seq_len;
    const size_t prompt_length = strlen(o->prompt);
    const char *context_start = o->prompt + (prompt_length > (size_t)seq ? prompt_length - (size_t)seq : 0);
    int32_t *context = (int32_t *)calloc((size_t)seq, sizeof(int32_t)), next;
    float work[256];
    acmoe_rng rng;
    int len = 0, n, fresh = 1;
    if (!context) exit(1);
    acmoe_rng_seed(&rng, (uint64_t)o->run.seed + 7);
    acmoe_lm_freeze_ac_weights(lm, 1);
    for (; *context_start; context_start++) context[len++] = (unsigned char)*context_start;
    printf("%s", o->prompt);
    for (n = 0; n < o->sample; n++) {
        predict(lm, ctx, context, len, fresh);
        check(acmoe_sample(acmoe_lm_logits(lm) + (size_t)(len - 1) * vocab, vocab, o->temperature, o->sample_top_k,
                           o->sample_top_p, work, &rng, &next),
              "sampling");
        putchar(isprint(next) || next == '\n' || next == '\t' ? next : '?'); /* keep the terminal sane */
        fresh = len == seq; /* a full context slides, and every position moves */
        if (fresh) memmove(context, context + 1, sizeof(int32_t) * (size_t)(--len));
        context[len++] = next;
    }
    printf("\n");
    free(context);
}

/* What the training loop's events update: the progress display and the result; and what
   the word-swap evaluation needs. */
typedef struct run {
    const options *o;
    run_report report;
    result *r;
    acmoe_ctx *ctx;
    const acmoe_corpus *attacked; /* NULL without --eval-wordswap */
} run;

static acmoe_comm *shared; /* the ranks under --data-parallel or --expert-parallel, or NULL */

#define EVAL_SEED 12345 /* the training loop's default: every evaluation sees the same text */

/* The held-out text under the word-swap attack as a corpus whose held-out part is all of
   it, in *owned; NULL without --eval-wordswap. */
static const acmoe_corpus *attack_corpus(const acmoe_corpus *c, const options *o, acmoe_corpus *attacked,
                                         unsigned char **owned) {
    size_t size = 0;
    *owned = NULL;
    if (o->eval_wordswap <= 0.0f) return NULL;
    *owned = wordswap_text(c->bytes + c->train_size, c->size - c->train_size, o->eval_wordswap, EVAL_SEED, &size);
    if (!*owned) check(ACMOE_ERR_NOMEM, "word-swap text");
    memset(attacked, 0, sizeof *attacked);
    attacked->bytes = *owned, attacked->size = size, attacked->train_size = 0, attacked->vocab = 256;
    printf("word-swap attack: %.1f%% of each held-out line's words (at least one) that are not stopwords made " WORDSWAP_TOKEN
           "; %lu held-out bytes become %lu\n",
           100.0 * o->eval_wordswap, (unsigned long)(c->size - c->train_size), (unsigned long)size);
    return attacked;
}

static double bpc(double loss) { return loss / log(2.0); }

static int on_event(const acmoe_train_event *e, acmoe_lm *lm, void *user) {
    run *u = (run *)user;
    const options *o = u->o;
    if (e->kind == ACMOE_EVENT_STEP) {
        print_progress(u->report.interactive, e->step, e->steps, e->loss, e->lr, e->tokens_per_second, "tok/s",
                       e->eta_seconds);
        log_step(&u->report, e->step, e->loss, e->lr, e->grad_norm, e->tokens_per_second);
        u->r->tokens_per_second = e->tokens_per_second;
        return 0;
    }
    if (u->report.interactive) printf("\n");
    printf("  eval step %ld: val loss %.4f  bpc %.3f  perplexity %.2f", e->step, e->val_loss, bpc(e->val_loss),
           exp(e->val_loss));
    if (o->eval_corrupt > 0.0f)
        printf("  (%.0f%% of input damaged: bpc %.3f)", 100.0 * o->eval_corrupt, bpc(e->val_loss_corrupted));
    if (u->r->steps_to_target < 0 && bpc(e->val_loss) <= o->target_bpc) u->r->steps_to_target = (int)e->step;
    u->r->val_loss = e->val_loss;
    u->r->val_loss_corrupted = e->val_loss_corrupted;
    log_layers(&u->report, lm, e->step); /* the layers' stats are the clean evaluation's */
    u->r->val_loss_wordswap = NAN;
    if (u->attacked) {
        check(acmoe_lm_evaluate(lm, u->ctx, u->attacked, o->eval_batches, EVAL_SEED, &u->r->val_loss_wordswap),
              "word-swap evaluation");
        printf("  (word swap: bpc %.3f)", bpc(u->r->val_loss_wordswap));
    }
    printf("\n");
    {
        static const char *const names[3] = {"val_loss", "val_loss_corrupted", "val_loss_wordswap"};
        const double values[3] = {e->val_loss, o->eval_corrupt > 0.0f ? e->val_loss_corrupted : NAN,
                                  u->r->val_loss_wordswap};
        log_eval_measures(&u->report, e->step, names, values, 3);
    }
    checkpoint_save(&o->run, PROGRAM, lm, u->report.pattern, u->report.seed);
    return 0;
}

/* Exits with status 2 when the flags describe no model the library makes (status 1 for
   other failures, such as memory). */
static acmoe_lm *create_model(const char *pattern, long seed, const options *o) {
    acmoe_lm_desc d = o->run.model;
    acmoe_lm *lm = NULL;
    acmoe_status s;
    d.pattern = pattern, d.seed = (uint64_t)seed;
    s = acmoe_lm_create(&lm, &d);
    if (s == ACMOE_ERR_SHAPE || s == ACMOE_ERR_ARG) cli_fail(PROGRAM, "pattern %s with these flags: %s", pattern, acmoe_status_string(s));
    check(s, "model");
    return lm;
}

/* ---- resuming ---- */

/* The checkpoint's model, with o set to the checkpoint's run: the same model and training
   flags, so the resumed run is the run it continues. A flag given with another value, or a
   checkpoint that is not a byte-level language model, exits with status 2. */
static acmoe_lm *resume_run(options *o, const cli *c) {
    acmoe_lm *lm = run_load_checkpoint(&o->run, PROGRAM);
    const acmoe_lm_desc d = acmoe_lm_settings(lm);
    options k = *o;
    int has_training;
    if (d.n_classes > 0 || d.vocab != 256) cli_fail(PROGRAM, "--resume %s: not a byte-level language model",
                                                    o->run.resume);
    has_training = run_of_checkpoint(lm, &k.run);
    cli_refuse_conflicts(c, o, &k);
    if (has_training) k.run.steps = run_resumed_steps(c, &o->run, &k.run.optim);
    *o = k;
    run_print_resumed(&o->run, lm, has_training);
    return lm;
}

/* Trains the resumed model, or a new one of the pattern and seed. */
static result train(const char *pattern, long seed, const options *o, const acmoe_corpus *c,
                    const acmoe_corpus *attacked, acmoe_ctx *ctx, int show_sample, acmoe_lm *resumed, FILE *log) {
    acmoe_train_desc t;
    acmoe_lm *lm = resumed ? resumed : create_model(pattern, seed, o);
    const char *model_pattern = acmoe_lm_settings(lm).pattern;
    char label[PATTERN_LABEL_MAX];
    result r;
    run u;
    size_t mem[4];
    memset(&r, 0, sizeof r);
    snprintf(r.pattern, sizeof r.pattern, "%.*s", MOE_PATTERN_MAX, model_pattern ? model_pattern : pattern);
    r.steps_to_target = -1;
    acmoe_lm_memory(lm, &mem[0], &mem[1], &mem[2], &mem[3]);
    pattern_label(r.pattern, label, sizeof label);
    printf("\n== pattern %s", label);
    if (o->run.seeds > 1) printf(", seed %ld", seed);
    printf(": %lu parameters; memory MiB: params %.1f, grads %.1f, Adam %.1f, activations %.1f\n",
           (unsigned long)acmoe_lm_param_count(lm), mem[0] / 1048576.0, mem[1] / 1048576.0, mem[2] / 1048576.0,
           mem[3] / 1048576.0);
    print_layer_settings(lm);
    memset(&t, 0, sizeof t);
    t.steps = o->run.steps, t.eval_every = o->eval_every, t.eval_batches = o->eval_batches;
    t.log_every = o->run.log_every, t.seed = (uint64_t)seed, t.eval_corrupt = o->eval_corrupt;
    t.optim = o->run.optim, t.optim.total_steps = o->run.steps;
    t.comm = shared, t.expert_parallel = o->expert_parallel;
    u.o = o, u.r = &r, u.ctx = ctx, u.attacked = attacked;
    u.report.pattern = r.pattern, u.report.seed = seed, u.report.interactive = isatty(STDOUT_FILENO), u.report.log = log;
    t.on_event = on_event, t.user = &u;
    if (acmoe_lm_steps_taken(lm) >= o->run.steps)
        printf("  already at step %ld: nothing to train\n", acmoe_lm_steps_taken(lm));
    check(acmoe_lm_train(lm, ctx, c, &t), "training");
    r.imbalance = print_loads(lm, 1);
    print_stability(lm);
    if (show_sample && o->sample > 0) {
        printf("  sample (temperature %.2f, top-k %d, top-p %.2f):\n", o->temperature, o->sample_top_k, o->sample_top_p);
        sample_text(lm, ctx, o);
    }
    acmoe_lm_destroy(lm);
    return r;
}

/* Steps to the target over the seeds: their mean, and how many reached it if not all. */
static void format_target(const result *r, int seeds, char *out, size_t cap) {
    int s, reached = 0, steps_sum = 0;
    for (s = 0; s < seeds; s++)
        if (r[s].steps_to_target >= 0) reached++, steps_sum += r[s].steps_to_target;
    if (reached == seeds) snprintf(out, cap, "%d", steps_sum / reached);
    else if (reached) snprintf(out, cap, "%d (%d of %d)", steps_sum / reached, reached, seeds);
    else snprintf(out, cap, "not reached");
}

/* One row per pattern, named with its routers: held-out bits per character (with several
   seeds, their mean and spread and each seed's value), the same with damaged input, steps
   to the target, speed and the worst expert imbalance; then, with several seeds, the
   differences paired by seed (same batches, same held-out text, same damage). */
static void print_comparison(result r[][RUN_MAX_SEEDS], int n, const options *o) {
    static double clean[RUN_MAX_PATTERNS][RUN_MAX_SEEDS], damaged[RUN_MAX_PATTERNS][RUN_MAX_SEEDS],
        swapped[RUN_MAX_PATTERNS][RUN_MAX_SEEDS];
    static char labels[RUN_MAX_PATTERNS][PATTERN_LABEL_MAX];
    const int seeds = o->run.seeds;
    char head[32];
    int i, s, width;
    for (i = 0; i < n; i++) pattern_label(r[i][0].pattern, labels[i], sizeof labels[i]);
    width = label_width(labels, n);
    printf("\n== comparison (%d steps, batch %d x %d bytes, ", o->run.steps, o->run.model.batch, o->run.model.seq_len);
    if (seeds > 1) printf("seeds %ld-%ld; each seed's batches shared by every pattern)\n", o->run.seed, o->run.seed + seeds - 1);
    else printf("same seed and batches)\n");
    snprintf(head, sizeof head, "%.0f%% damaged", 100.0 * o->eval_corrupt);
    printf("%-*s %16s", width, "pattern", seeds > 1 ? "val bpc (sd)" : "val bpc");
    if (o->eval_corrupt > 0.0f) printf(" %16s", head);
    if (o->eval_wordswap > 0.0f) printf(" %16s", "word swap");
    printf(" %12s %10s %12s", "steps to bpc", "tok/s", "max/mean load");
    if (seeds > 1) printf("  val bpc by seed");
    printf("\n");
    for (i = 0; i < n; i++) {
        double tps[RUN_MAX_SEEDS], load[RUN_MAX_SEEDS], tps_mean, load_mean, unused;
        char target[48], stat[32];
        for (s = 0; s < seeds; s++) {
            clean[i][s] = bpc(r[i][s].val_loss), damaged[i][s] = bpc(r[i][s].val_loss_corrupted);
            swapped[i][s] = bpc(r[i][s].val_loss_wordswap);
            tps[s] = r[i][s].tokens_per_second, load[s] = r[i][s].imbalance;
        }
        mean_sd(tps, seeds, &tps_mean, &unused);
        mean_sd(load, seeds, &load_mean, &unused);
        format_target(r[i], seeds, target, sizeof target);
        format_stat(stat, sizeof stat, clean[i], seeds);
        printf("%-*s %16s", width, labels[i], stat);
        if (o->eval_corrupt > 0.0f) format_stat(stat, sizeof stat, damaged[i], seeds), printf(" %16s", stat);
        if (o->eval_wordswap > 0.0f) format_stat(stat, sizeof stat, swapped[i], seeds), printf(" %16s", stat);
        printf(" %12s %10.0f %12.2f", target, tps_mean, load_mean);
        if (seeds > 1) {
            printf(" ");
            for (s = 0; s < seeds; s++) printf(" %.3f", clean[i][s]);
        }
        printf("\n");
    }
    printf("(steps to bpc: first evaluation at or below %.2f bits per character", o->target_bpc);
    printf(seeds > 1 ? ", mean over the seeds that reached it)\n" : ")\n");
    for (i = 1; i < n && seeds > 1; i++) {
        print_paired(r[0][0].pattern, r[i][0].pattern, "clean", clean[0], clean[i], seeds, "bpc", 0);
        if (o->eval_corrupt > 0.0f)
            print_paired(r[0][0].pattern, r[i][0].pattern, head, damaged[0], damaged[i], seeds, "bpc", 0);
        if (o->eval_wordswap > 0.0f)
            print_paired(r[0][0].pattern, r[i][0].pattern, "word swap", swapped[0], swapped[i], seeds, "bpc", 0);
    }
}

int main(int argc, char **argv) {
    static result results[RUN_MAX_PATTERNS][RUN_MAX_SEEDS];
    char patterns[RUN_MAX_PATTERNS][MOE_PATTERN_MAX + 1];
    unsigned char *corpus_bytes, *attacked_bytes;
    acmoe_corpus c, attacked_corpus;
    const acmoe_corpus *attacked;
    acmoe_ctx_desc cd = acmoe_ctx_defaults();
    acmoe_ctx *ctx;
    acmoe_lm *resumed = NULL;
    cli flags_given;
    options o = lm_options_defaults();
    FILE *log;
    int n, i, s;
#ifdef ACMOE_MPI
    MPI_Init(&argc, &argv);
#endif
    lm_cli_init(&flags_given);
    cli_parse(&flags_given, argc, argv, &o); /* a bad command line exits before any data is read */
    if (o.run.resume) resumed = resume_run(&o, &flags_given);
    shared = share_batches(&o);
    n = run_patterns(&o.run, PROGRAM, patterns);
    c = load_corpus(o.run.data, &corpus_bytes);
    attacked = attack_corpus(&c, &o, &attacked_corpus, &attacked_bytes);
    log = log_open(&o.run, PROGRAM);
    cd.n_threads = o.run.threads;
    cd.clock = now_seconds; /* rates and layer timings */
    check(acmoe_ctx_create(&ctx, &cd), "context");
    printf("kernel path %s, %d threads\n", acmoe_isa_name(acmoe_ctx_settings(ctx).isa), acmoe_ctx_settings(ctx).n_threads);
    for (s = 0; s < o.run.seeds; s++) /* seed by seed, so an interrupted run has whole pairings */
        for (i = 0; i < n; i++)
            results[i][s] =
                train(patterns[i], o.run.seed + s, &o, &c, attacked, ctx, i == 0 && s == 0, i == 0 ? resumed : NULL, log);
    if (n > 1) print_comparison(results, n, &o);
    if (log) fclose(log);
    acmoe_ctx_destroy(ctx);
    acmoe_corpus_destroy(&c);
    free(corpus_bytes), free(attacked_bytes);
#ifdef ACMOE_MPI
    if (shared) acmoe_comm_mpi_destroy(shared);
    MPI_Finalize();
#endif
    return 0;
}
