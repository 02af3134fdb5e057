/* Trains byte-level MoE language models on a text file and compares routers.

     train_lm --data data/fortunes.txt --compare ggc,ggg      the paper's AC layout against SMoE
     train_lm --compare ggc,ggg --seeds 3                     ... over three seeds, with the spread
     train_lm --data FILE --pattern gcc --steps 2000          one model
     train_lm --data builtin --steps 200                      a short embedded text, no file needed
     train_lm --save run.safetensors --steps 1000             ... then continue it exactly:
     train_lm --resume run.safetensors --steps 2000         (the model and training flags come
                                                              from the checkpoint)
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
#include <time.h>
#include <unistd.h>

#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"
#include "lm_options.h"

typedef lm_options options;

#define PROGRAM "train_lm"

/* The options from the command line, each flag in its range and the flags agreeing;
   anything else exits with status 2 before any data is read. */
static options parse_options(int argc, char **argv, cli *c) {
    options o = lm_options_defaults();
    char why[256];
    cli_init(c, PROGRAM, lm_flags, sizeof lm_flags / sizeof lm_flags[0]);
    cli_parse(c, argc, argv, &o);
    if (!lm_options_valid(&o, why, sizeof why)) cli_fail(PROGRAM, "%s", why);
    return o;
}

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

/* ---- training ---- */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void check(acmoe_status s, const char *what) {
    if (s == ACMOE_OK) return;
    fprintf(stderr, "train_lm: %s: %s\n", what, acmoe_status_string(s));
    exit(1);
}

typedef struct result {
    char pattern[64];
    double val_loss, val_loss_corrupted, tokens_per_second, imbalance;
    int steps_to_target;
} result;

static void print_progress(int interactive, int step, int steps, float loss, float lr, double tps, double eta) {
    if (interactive) {
        int filled = 30 * step / steps, i;
        printf("\r[");
        for (i = 0; i < 30; i++) putchar(i < filled ? '#' : '.');
        printf("] %d/%d loss %.3f lr %.1e %.1fk tok/s ETA %dm%02ds ", step, steps, loss, lr, tps / 1000.0,
               (int)eta / 60, (int)eta % 60);
    } else {
        printf("step %5d/%d  loss %.4f  lr %.2e  %.1fk tok/s  ETA %dm%02ds\n", step, steps, loss, lr, tps / 1000.0,
               (int)eta / 60, (int)eta % 60);
    }
    fflush(stdout);
}

/* An AC layer's weights in the last call: its clusters (the previous MoE layer's best
   experts), how many of them got fewer than two tokens (each flattens the other clusters'
   weights unless --ac-robust is on), and the mean gate of its top choice (1/k when the
   weights are flat and the router no longer discriminates). */
static void print_ac_summary(int layer, const acmoe_moe_stats *st, const acmoe_moe_stats *prev) {
    int count[256] = {0}, sparse = 0, c, t;
    double top_gate = 0.0;
    for (t = 0; t < prev->n_tokens; t++) {
        int label = prev->expert_index[(size_t)t * prev->top_k];
        if (label < 256) count[label]++;
    }
    for (c = 0; c < st->ac_clusters && c < 256; c++) sparse += count[c] < 2;
    for (t = 0; t < st->n_tokens; t++) top_gate += st->gate[(size_t)t * st->top_k];
    printf("  layer %d AC: %d clusters, %d with fewer than 2 tokens; W from %.3g to %.3g; mean top gate %.2f\n", layer,
           st->ac_clusters, sparse, st->ac_w_min, st->ac_w_max, st->n_tokens ? top_gate / st->n_tokens : 0.0);
}

/* Largest expert share over the mean share, worst MoE layer of the last step. */
static double load_imbalance(acmoe_lm *lm, int print) {
    double worst = 1.0;
    acmoe_moe_stats prev;
    int l, j, have_prev = 0;
    memset(&prev, 0, sizeof prev);
    for (l = 0; l < acmoe_lm_n_layers(lm); l++) {
        acmoe_moe_stats st = acmoe_moe_get_stats(acmoe_lm_moe(lm, l));
        int top = 0;
        if (st.n_experts < 2 || st.pairs == 0) continue;
        for (j = 0; j < st.n_experts; j++) top = st.tokens_per_expert[j] > top ? st.tokens_per_expert[j] : top;
        worst = fmax(worst, (double)top * st.n_experts / st.pairs);
        if (print) {
            printf("  layer %d load (%% of pairs):", l);
            for (j = 0; j < st.n_experts; j++) printf(" %.0f", 100.0 * st.tokens_per_expert[j] / st.pairs);
            printf("\n");
            if (st.ac_clusters > 0 && have_prev) print_ac_summary(l, &st, &prev);
        }
        prev = st, have_prev = 1;
    }
    return worst;
}

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
    acmoe_rng_seed(&rng, (uint64_t)o->seed + 7);
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

/* The checkpoint path of this run: --save itself, or with --compare, pattern-suffixed (and
   seed-suffixed with --seeds). The flag table bounds --save so that the path fits
   CHECKPOINT_PATH. */
#define CHECKPOINT_PATH 4096
static void checkpoint_path(const options *o, const char *pattern, long seed, char *path, size_t cap) {
    int length;
    if (o->compare && o->seeds > 1) length = snprintf(path, cap, "%s.%s.s%ld", o->save, pattern, seed);
    else if (o->compare) length = snprintf(path, cap, "%s.%s", o->save, pattern);
    else length = snprintf(path, cap, "%s", o->save);
    if (length < 0 || (size_t)length >= cap) cli_fail(PROGRAM, "--save %.40s...: too long a path", o->save);
}

/* What the training loop's events update: the progress display and the result. */
typedef struct run {
    const options *o;
    const char *pattern;
    long seed;
    result *r;
    int interactive;
} run;

static double bpc(double loss) { return loss / log(2.0); }

static int on_event(const acmoe_train_event *e, acmoe_lm *lm, void *user) {
    run *u = (run *)user;
    const options *o = u->o;
    if (e->kind == ACMOE_EVENT_STEP) {
        print_progress(u->interactive, (int)e->step, (int)e->steps, e->loss, e->lr, e->tokens_per_second, e->eta_seconds);
        u->r->tokens_per_second = e->tokens_per_second;
        return 0;
    }
    if (u->interactive) printf("\n");
    printf("  eval step %ld: val loss %.4f  bpc %.3f  perplexity %.2f", e->step, e->val_loss, bpc(e->val_loss),
           exp(e->val_loss));
    if (o->eval_corrupt > 0.0f)
        printf("  (%.0f%% of input damaged: bpc %.3f)", 100.0 * o->eval_corrupt, bpc(e->val_loss_corrupted));
    printf("\n");
    if (u->r->steps_to_target < 0 && bpc(e->val_loss) <= o->target_bpc) u->r->steps_to_target = (int)e->step;
    u->r->val_loss = e->val_loss;
    u->r->val_loss_corrupted = e->val_loss_corrupted;
    if (o->save) {
        char path[CHECKPOINT_PATH];
        checkpoint_path(o, u->pattern, u->seed, path, sizeof path);
        check(acmoe_lm_save(lm, path), path);
    }
    return 0;
}

/* Exits with status 2 when the flags describe no model the library makes (status 1 for
   other failures, such as memory). */
static acmoe_lm *create_model(const char *pattern, long seed, const options *o) {
    acmoe_lm_desc d;
    acmoe_lm *lm = NULL;
    acmoe_status s;
    memset(&d, 0, sizeof d);
    d.d_model = o->d_model, d.n_heads = o->heads, d.seq_len = o->seq, d.batch = o->batch, d.pattern = pattern;
    d.d_ff = o->d_ff, d.n_experts = o->experts, d.top_k = o->top_k, d.dropout = o->dropout, d.pre_ln = o->pre_ln;
    d.seed = (uint64_t)seed, d.untied_head = o->untied_head;
    moe_flags_apply(&o->moe, &d);
    s = acmoe_lm_create(&lm, &d);
    if (s == ACMOE_ERR_SHAPE || s == ACMOE_ERR_ARG) cli_fail(PROGRAM, "pattern %s with these flags: %s", pattern, acmoe_status_string(s));
    check(s, "model");
    return lm;
}

/* ---- resuming ---- */

/* The options of the checkpoint's run: its model's flags, and its training's where the
   checkpoint keeps them; the rest as o has them. */
static options options_of_checkpoint(acmoe_lm *lm, const options *o, int *has_training) {
    const acmoe_lm_desc d = acmoe_lm_settings(lm);
    const acmoe_train_desc t = acmoe_lm_train_settings(lm);
    options k = *o;
    k.pattern = d.pattern, k.batch = d.batch, k.seq = d.seq_len, k.d_model = d.d_model, k.heads = d.n_heads;
    k.experts = d.n_experts, k.top_k = d.top_k, k.d_ff = d.d_ff, k.pre_ln = d.pre_ln, k.untied_head = d.untied_head;
    k.dropout = d.dropout, k.moe = moe_flags_of_model(&d), k.seed = (long)d.seed;
    *has_training = t.optim.lr > 0.0f; /* all zero for a checkpoint that keeps no training options */
    if (!*has_training) return k;
    k.seed = (long)t.seed, k.lr = t.optim.lr, k.min_lr = t.optim.min_lr, k.weight_decay = t.optim.weight_decay;
    k.clip = t.optim.clip_norm, k.warmup = t.optim.warmup_steps;
    k.schedule = t.optim.schedule == ACMOE_SCHEDULE_COSINE ? "cosine" : "constant";
    return k;
}

/* The end of the run: the checkpoint's unless --steps says otherwise, which it may not
   under a cosine schedule, whose rate falls to --min-lr at that end. */
static int resumed_steps(const cli *c, const options *given, const acmoe_train_desc *t) {
    if (t->optim.total_steps < 1) return given->steps;
    if (!cli_given(c, "--steps")) return t->optim.total_steps;
    if (t->optim.schedule == ACMOE_SCHEDULE_COSINE && given->steps != t->optim.total_steps)
        cli_fail(PROGRAM, "--steps %d conflicts with the checkpoint's %d, where its cosine schedule ends", given->steps,
                 t->optim.total_steps);
    return given->steps;
}

/* The checkpoint's model, with o set to the checkpoint's run: the same model and training
   flags, so the resumed run is the run it continues. A flag given with another value, or a
   checkpoint that is not a byte-level language model, exits with status 2. */
static acmoe_lm *resume_run(options *o, const cli *c) {
    acmoe_lm *lm = NULL;
    acmoe_lm_desc d;
    acmoe_train_desc t;
    options k;
    int has_training;
    const acmoe_status s = acmoe_lm_load(&lm, o->resume);
    if (s != ACMOE_OK) cli_fail(PROGRAM, "--resume %s: %s", o->resume, acmoe_status_string(s));
    d = acmoe_lm_settings(lm), t = acmoe_lm_train_settings(lm);
    if (d.n_classes > 0 || d.vocab != 256) cli_fail(PROGRAM, "--resume %s: not a byte-level language model", o->resume);
    k = options_of_checkpoint(lm, o, &has_training);
    cli_refuse_conflicts(c, o, &k);
    k.steps = has_training ? resumed_steps(c, o, &t) : o->steps;
    *o = k;
    printf("resuming %s at step %ld of %d: pattern %s, seq %d, batch %d, seed %ld", o->resume, acmoe_lm_steps_taken(lm),
           o->steps, o->pattern, o->seq, o->batch, o->seed);
    if (has_training) printf(", lr %g, %s schedule, warmup %d from the checkpoint\n", o->lr, o->schedule, o->warmup);
    else printf(" from the checkpoint, which keeps no training flags: those given or their defaults\n");
    return lm;
}
/* Trains the resumed model, or a new one of the pattern and seed. */
static result train(const char *pattern, long seed, const options *o, const acmoe_corpus *c, acmoe_ctx *ctx,
                    int show_sample, acmoe_lm *resumed) {
    acmoe_train_desc t;
    acmoe_lm *lm = resumed ? resumed : create_model(pattern, seed, o);
    const char *model_pattern = acmoe_lm_settings(lm).pattern;
    result r;
    run u;
    size_t mem[4];
    memset(&r, 0, sizeof r);
    snprintf(r.pattern, sizeof r.pattern, "%.*s", MOE_PATTERN_MAX, model_pattern ? model_pattern : pattern);
    r.steps_to_target = -1;
    acmoe_lm_memory(lm, &mem[0], &mem[1], &mem[2], &mem[3]);
    printf("\n== pattern %s", r.pattern);
    if (o->seeds > 1) printf(", seed %ld", seed);
    printf(": %lu parameters; memory MiB: params %.1f, grads %.1f, Adam %.1f, activations %.1f\n",
           (unsigned long)acmoe_lm_param_count(lm), mem[0] / 1048576.0, mem[1] / 1048576.0, mem[2] / 1048576.0,
           mem[3] / 1048576.0);
    moe_print_settings(lm);
    memset(&t, 0, sizeof t);
    t.steps = o->steps, t.eval_every = o->eval_every, t.eval_batches = o->eval_batches, t.log_every = o->log_every;
    t.seed = (uint64_t)seed, t.eval_corrupt = o->eval_corrupt;
    t.optim.lr = o->lr, t.optim.warmup_steps = o->warmup, t.optim.clip_norm = o->clip;
    t.optim.weight_decay = o->weight_decay, t.optim.total_steps = o->steps, t.optim.min_lr = o->min_lr;
    t.optim.schedule = !strcmp(o->schedule, "cosine") ? ACMOE_SCHEDULE_COSINE : ACMOE_SCHEDULE_CONSTANT;
    u.o = o, u.pattern = r.pattern, u.seed = seed, u.r = &r, u.interactive = isatty(STDOUT_FILENO);
    t.on_event = on_event, t.user = &u;
    if (acmoe_lm_steps_taken(lm) >= o->steps) printf("  already at step %ld: nothing to train\n", acmoe_lm_steps_taken(lm));
    check(acmoe_lm_train(lm, ctx, c, &t), "training");
    r.imbalance = load_imbalance(lm, 1);
    moe_print_stability(lm);
    if (show_sample && o->sample > 0) {
        printf("  sample (temperature %.2f, top-k %d, top-p %.2f):\n", o->temperature, o->sample_top_k, o->sample_top_p);
        sample_text(lm, ctx, o);
    }
    acmoe_lm_destroy(lm);
    return r;
}

/* Mean and sample standard deviation of n values. */
static void mean_sd(const double *v, int n, double *mean, double *sd) {
    double sum = 0.0, sq = 0.0;
    int i;
    for (i = 0; i < n; i++) sum += v[i];
    *mean = sum / n;
    for (i = 0; i < n; i++) sq += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(sq / (n - 1)) : 0.0;
}

/* "mean (sd)" of n values, or the value alone. */
static void format_stat(char *out, size_t cap, const double *v, int n) {
    double mean, sd;
    mean_sd(v, n, &mean, &sd);
    if (n > 1) snprintf(out, cap, "%.3f (%.3f)", mean, sd);
    else snprintf(out, cap, "%.3f", mean);
}

/* Seed by seed, a's value less b's: their mean, spread and signs. */
static void print_paired(const char *a, const char *b, const char *what, const double *va, const double *vb,
                         int seeds) {
    double diff[LM_MAX_SEEDS], mean, sd;
    int s, lower = 0;
    for (s = 0; s < seeds; s++) diff[s] = va[s] - vb[s], lower += diff[s] < 0.0;
    mean_sd(diff, seeds, &mean, &sd);
    printf("%s - %s, %s: %+.3f bpc (sd %.3f over %d seeds); %s lower on %d of %d\n", a, b, what, mean, sd, seeds, a,
           lower, seeds);
}

/* One row per pattern: held-out bits per character (with several seeds, their mean and spread
   and each seed's value), the same with damaged input, steps to the target, speed and the
   worst expert imbalance; then, with several seeds, the differences paired by seed (same
   batches, same held-out text, same damage). */
static void print_comparison(result r[][LM_MAX_SEEDS], int n, const options *o) {
    static double clean[LM_MAX_PATTERNS][LM_MAX_SEEDS], damaged[LM_MAX_PATTERNS][LM_MAX_SEEDS];
    char head[32];
    int i, s;
    printf("\n== comparison (%d steps, batch %d x %d bytes, ", o->steps, o->batch, o->seq);
    if (o->seeds > 1) printf("seeds %ld-%ld; each seed's batches shared by every pattern)\n", o->seed, o->seed + o->seeds - 1);
    else printf("same seed and batches)\n");
    snprintf(head, sizeof head, "%.0f%% damaged", 100.0 * o->eval_corrupt);
    printf("%-10s %16s", "pattern", o->seeds > 1 ? "val bpc (sd)" : "val bpc");
    if (o->eval_corrupt > 0.0f) printf(" %16s", head);
    printf(" %12s %10s %12s", "steps to bpc", "tok/s", "max/mean load");
    if (o->seeds > 1) printf("  val bpc by seed");
    printf("\n");
    for (i = 0; i < n; i++) {
        double tps[LM_MAX_SEEDS], load[LM_MAX_SEEDS], tps_mean, load_mean, unused;
        char target[48], stat[32];
        int reached = 0, steps_sum = 0;
        for (s = 0; s < o->seeds; s++) {
            clean[i][s] = bpc(r[i][s].val_loss), damaged[i][s] = bpc(r[i][s].val_loss_corrupted);
            tps[s] = r[i][s].tokens_per_second, load[s] = r[i][s].imbalance;
            if (r[i][s].steps_to_target >= 0) reached++, steps_sum += r[i][s].steps_to_target;
        }
        mean_sd(tps, o->seeds, &tps_mean, &unused);
        mean_sd(load, o->seeds, &load_mean, &unused);
        if (reached == o->seeds) snprintf(target, sizeof target, "%d", steps_sum / reached);
        else if (reached) snprintf(target, sizeof target, "%d (%d of %d)", steps_sum / reached, reached, o->seeds);
        else snprintf(target, sizeof target, "not reached");
        format_stat(stat, sizeof stat, clean[i], o->seeds);
        printf("%-10s %16s", r[i][0].pattern, stat);
        if (o->eval_corrupt > 0.0f) format_stat(stat, sizeof stat, damaged[i], o->seeds), printf(" %16s", stat);
        printf(" %12s %10.0f %12.2f", target, tps_mean, load_mean);
        if (o->seeds > 1) {
            printf(" ");
            for (s = 0; s < o->seeds; s++) printf(" %.3f", clean[i][s]);
        }
        printf("\n");
    }
    printf("(steps to bpc: first evaluation at or below %.2f bits per character", o->target_bpc);
    printf(o->seeds > 1 ? ", mean over the seeds that reached it)\n" : ")\n");
    for (i = 1; i < n && o->seeds > 1; i++) {
        print_paired(r[0][0].pattern, r[i][0].pattern, "clean", clean[0], clean[i], o->seeds);
        if (o->eval_corrupt > 0.0f) print_paired(r[0][0].pattern, r[i][0].pattern, head, damaged[0], damaged[i], o->seeds);
    }
}

int main(int argc, char **argv) {
    static result results[LM_MAX_PATTERNS][LM_MAX_SEEDS];
    char patterns[LM_MAX_PATTERNS][MOE_PATTERN_MAX + 1], why[256];
    unsigned char *corpus_bytes;
    acmoe_corpus c;
    acmoe_ctx_desc cd;
    acmoe_ctx *ctx;
    acmoe_lm *resumed = NULL;
    cli flags_given;
    options o = parse_options(argc, argv, &flags_given);
    int n, i, s;
    if (o.resume) resumed = resume_run(&o, &flags_given);
    n = moe_split_patterns(o.compare ? o.compare : o.pattern, patterns, LM_MAX_PATTERNS, why, sizeof why);
    if (n == 0) cli_fail(PROGRAM, "%s", why); /* checked with the options; kept for a resumed pattern */
    c = load_corpus(o.data, &corpus_bytes);
    memset(&cd, 0, sizeof cd);
    cd.n_threads = o.threads;
    cd.clock = now_seconds;
    check(acmoe_ctx_create(&ctx, &cd), "context");
    printf("kernel path %s, %d threads\n", acmoe_isa_name(acmoe_ctx_settings(ctx).isa), acmoe_ctx_settings(ctx).n_threads);
    for (s = 0; s < o.seeds; s++) /* seed by seed, so an interrupted run has whole pairings */
        for (i = 0; i < n; i++)
            results[i][s] = train(patterns[i], o.seed + s, &o, &c, ctx, i == 0 && s == 0, i == 0 ? resumed : NULL);
    if (n > 1) print_comparison(results, n, &o);
    acmoe_ctx_destroy(ctx);
    acmoe_corpus_free(&c);
    free(corpus_bytes);
    return 0;
}
