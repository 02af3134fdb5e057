/* Trains byte-level MoE language models on a text file and compares routers.

     train_lm --data data/fortunes.txt --compare ggc,ggg      the paper's AC layout against SMoE
     train_lm --compare ggc,ggg --seeds 3                     ... over three seeds, with the spread
     train_lm --data FILE --pattern gcc --steps 2000          one model
     train_lm --save run.safetensors --steps 1000             ... then continue it exactly:
     train_lm --resume run.safetensors --steps 2000
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
#include "cli.h"
#include "moe_flags.h"

/* ---- options ---- */

typedef struct options {
    const char *data, *pattern, *compare, *prompt, *save, *resume, *schedule;
    int steps, batch, seq, d_model, heads, experts, top_k, d_ff, warmup, threads, seeds;
    int eval_every, eval_batches, log_every, sample, sample_top_k, pre_ln, untied_head;
    long seed;
    float lr, min_lr, weight_decay, dropout, clip, target_bpc, temperature, eval_corrupt, sample_top_p;
    moe_flags moe;
} options;

static const flag flags[] = {
    FLAG("--data", OPT_STR, data, "text file to train on (bytes are tokens)"),
    FLAG("--pattern", OPT_STR, pattern, "router per layer: g SMoE, c AC, s Switch, o cosine, x XMoE, u USMoE, m Soft MoE, f dense"),
    FLAG("--compare", OPT_STR, compare, "comma-separated patterns to train in turn and compare (overrides --pattern)"),
    FLAG("--steps", OPT_INT, steps, "training steps per model"),
    FLAG("--batch", OPT_INT, batch, "sequences per step"),
    FLAG("--seq", OPT_INT, seq, "context length"),
    FLAG("--d-model", OPT_INT, d_model, "model width"),
    FLAG("--heads", OPT_INT, heads, "attention heads"),
    FLAG("--experts", OPT_INT, experts, "experts per MoE layer"),
    FLAG("--top-k", OPT_INT, top_k, "experts per token"),
    FLAG("--d-ff", OPT_INT, d_ff, "expert hidden width"),
    MOE_FLAGS,
    FLAG("--pre-ln", OPT_INT, pre_ln, "1: pre-LN blocks; 0: post-LN as in the paper"),
    FLAG("--untied-head", OPT_INT, untied_head, "1: an output head of its own; 0: the token embedding"),
    FLAG("--lr", OPT_FLOAT, lr, "peak learning rate (AdamW)"),
    FLAG("--warmup", OPT_INT, warmup, "linear warmup steps"),
    FLAG("--schedule", OPT_STR, schedule, "after warmup: constant (the reference) or cosine to --min-lr at --steps"),
    FLAG("--min-lr", OPT_FLOAT, min_lr, "final learning rate of the cosine schedule"),
    FLAG("--weight-decay", OPT_FLOAT, weight_decay, "AdamW decay of weights (not biases or norms)"),
    FLAG("--dropout", OPT_FLOAT, dropout, "dropout on attention and FFN outputs"),
    FLAG("--clip", OPT_FLOAT, clip, "gradient clipping by global norm (0: off)"),
    FLAG("--seed", OPT_LONG, seed, "initialisation, dropout and batch order"),
    FLAG("--seeds", OPT_INT, seeds, "with --compare: train every pattern with seeds --seed, --seed + 1, ... (at most 16)"),
    FLAG("--threads", OPT_INT, threads, "threads (0: online CPUs)"),
    FLAG("--eval-every", OPT_INT, eval_every, "steps between evaluations"),
    FLAG("--eval-batches", OPT_INT, eval_batches, "held-out batches per evaluation"),
    FLAG("--eval-corrupt", OPT_FLOAT, eval_corrupt,
         "evaluate also with this share of input bytes replaced by random ones, targets kept (0: off)"),
    FLAG("--target-bpc", OPT_FLOAT, target_bpc, "report the first evaluation at or below this"),
    FLAG("--log-every", OPT_INT, log_every, "steps between progress lines"),
    FLAG("--sample", OPT_INT, sample, "characters to generate after training (0: none)"),
    FLAG("--temperature", OPT_FLOAT, temperature, "sampling temperature"),
    FLAG("--sample-top-k", OPT_INT, sample_top_k, "sample among the k likeliest bytes (0: all)"),
    FLAG("--sample-top-p", OPT_FLOAT, sample_top_p, "then among the fewest likeliest holding this probability (1: all)"),
    FLAG("--prompt", OPT_STR, prompt, "text the sample starts from"),
    FLAG("--save", OPT_STR, save, "checkpoint after each evaluation (with --compare: one file per pattern)"),
    FLAG("--resume", OPT_STR, resume, "continue from this checkpoint up to --steps (model flags come from it)"),
};

static options default_options(void) {
    options o;
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

static options parse_options(int argc, char **argv) {
    options o = default_options();
    cli_parse("train_lm", argc, argv, flags, sizeof flags / sizeof flags[0], &o);
    return o;
}

/* ---- corpus ---- */

/* Used when the corpus file is missing, so the pipeline still runs end to end. */
static const char fallback_text[] =
    "A mixture of experts splits a layer into many small networks and lets a router send each "
    "token to a few of them. The router is a clustering: tokens that look alike go to the same "
    "expert, and the expert learns what those tokens need. When the clusters are loose the "
    "experts learn the same things twice; when they are tight each expert specialises. The "
    "adaptive clustering router measures how tightly each cluster sits along every feature and "
    "routes in a space where the tight features count for more.\n";

/* The corpus file, or the embedded text when it cannot be read. */
static acmoe_corpus load_corpus(const char *path) {
    acmoe_corpus c;
    acmoe_status s = acmoe_corpus_load(&c, path, 0.1f);
    if (s == ACMOE_OK) {
        printf("corpus %s: %lu bytes\n", path, (unsigned long)c.size);
        return c;
    }
    printf("corpus %s not available (%s): training on the embedded %lu-byte text instead\n", path,
           acmoe_status_string(s), (unsigned long)(sizeof fallback_text - 1));
    if (acmoe_corpus_view(&c, (const unsigned char *)fallback_text, sizeof fallback_text - 1, 0.1f) != ACMOE_OK) exit(1);
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

/* Generates text from the prompt. AC weights stay as the last evaluation measured them. */
static void sample_text(acmoe_lm *lm, acmoe_ctx *ctx, const options *o) {
    const int vocab = 256;
    int32_t *context = (int32_t *)calloc((size_t)o->seq, sizeof(int32_t)), next;
    float work[256];
    acmoe_rng rng;
    int len = 0, i, n, fresh = 1;
    acmoe_rng_seed(&rng, (uint64_t)o->seed + 7);
    acmoe_lm_freeze_ac_weights(lm, 1);
    for (i = 0; o->prompt[i] && len < o->seq; i++) context[len++] = (unsigned char)o->prompt[i];
    printf("%s", o->prompt);
    for (n = 0; n < o->sample && len > 0; n++) {
        predict(lm, ctx, context, len, fresh);
        check(acmoe_sample(acmoe_lm_logits(lm) + (size_t)(len - 1) * vocab, vocab, o->temperature, o->sample_top_k,
                           o->sample_top_p, work, &rng, &next),
              "sampling");
        putchar(isprint(next) || next == '\n' || next == '\t' ? next : '?'); /* keep the terminal sane */
        fresh = len == o->seq; /* a full context slides, and every position moves */
        if (fresh) memmove(context, context + 1, sizeof(int32_t) * (size_t)(--len));
        context[len++] = next;
    }
    printf("\n");
    free(context);
}

/* The checkpoint path of this run: --save itself, or with --compare, pattern-suffixed (and
   seed-suffixed with --seeds). */
static void checkpoint_path(const options *o, const char *pattern, long seed, char *path, size_t cap) {
    if (o->compare && o->seeds > 1) snprintf(path, cap, "%s.%s.s%ld", o->save, pattern, seed);
    else if (o->compare) snprintf(path, cap, "%s.%s", o->save, pattern);
    else snprintf(path, cap, "%s", o->save);
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
        char path[512];
        checkpoint_path(o, u->pattern, u->seed, path, sizeof path);
        check(acmoe_lm_save(lm, path), path);
    }
    return 0;
}

static acmoe_lm *create_or_resume(const char *pattern, long seed, const options *o) {
    acmoe_lm_desc d;
    acmoe_lm *lm = NULL;
    if (o->resume) {
        check(acmoe_lm_load(&lm, o->resume), o->resume);
        printf("resuming %s at step %ld (model flags come from the checkpoint)\n", o->resume, acmoe_lm_steps_taken(lm));
        return lm;
    }
    memset(&d, 0, sizeof d);
    d.d_model = o->d_model, d.n_heads = o->heads, d.seq_len = o->seq, d.batch = o->batch, d.pattern = pattern;
    d.d_ff = o->d_ff, d.n_experts = o->experts, d.top_k = o->top_k, d.dropout = o->dropout, d.pre_ln = o->pre_ln;
    d.seed = (uint64_t)seed, d.untied_head = o->untied_head;
    moe_flags_apply(&o->moe, &d);
    check(acmoe_lm_create(&lm, &d), "model");
    return lm;
}

static result train(const char *pattern, long seed, const options *o, const acmoe_corpus *c, acmoe_ctx *ctx,
                    int show_sample) {
    acmoe_train_desc t;
    acmoe_lm *lm = create_or_resume(pattern, seed, o);
    result r;
    run u;
    size_t mem[4];
    memset(&r, 0, sizeof r);
    snprintf(r.pattern, sizeof r.pattern, "%s", acmoe_lm_settings(lm).pattern);
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
    check(acmoe_lm_train(lm, ctx, c, &t), "training");
    r.imbalance = load_imbalance(lm, 1);
    if (show_sample && o->sample > 0) {
        printf("  sample (temperature %.2f, top-k %d, top-p %.2f):\n", o->temperature, o->sample_top_k, o->sample_top_p);
        sample_text(lm, ctx, o);
    }
    acmoe_lm_destroy(lm);
    return r;
}

#define MAX_PATTERNS 8
#define MAX_SEEDS 16

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
    double diff[MAX_SEEDS], mean, sd;
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
static void print_comparison(result r[][MAX_SEEDS], int n, const options *o) {
    static double clean[MAX_PATTERNS][MAX_SEEDS], damaged[MAX_PATTERNS][MAX_SEEDS];
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
        double tps[MAX_SEEDS], load[MAX_SEEDS], tps_mean, load_mean, unused;
        char target[32], stat[32];
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
    options o = parse_options(argc, argv);
    acmoe_corpus c;
    moe_flags_check(&o.moe, "train_lm");
    if (strcmp(o.schedule, "constant") && strcmp(o.schedule, "cosine")) {
        fprintf(stderr, "train_lm: --schedule is constant or cosine\n");
        return 2;
    }
    if (o.resume && o.compare) {
        fprintf(stderr, "train_lm: --resume continues one model; it does not combine with --compare\n");
        return 2;
    }
    if (!(o.temperature >= 0.0f) || o.sample_top_k < 0 || !(o.sample_top_p > 0.0f && o.sample_top_p <= 1.0f)) {
        fprintf(stderr, "train_lm: --temperature is at least 0, --sample-top-k at least 0, --sample-top-p in (0, 1]\n");
        return 2;
    }
    if (!(o.eval_corrupt >= 0.0f && o.eval_corrupt <= 1.0f)) {
        fprintf(stderr, "train_lm: --eval-corrupt is a share from 0 to 1\n");
        return 2;
    }
    if (o.seeds < 1 || o.seeds > MAX_SEEDS || (o.seeds > 1 && !o.compare)) {
        fprintf(stderr, "train_lm: --seeds is 1 to %d, and more than 1 only with --compare\n", MAX_SEEDS);
        return 2;
    }
    c = load_corpus(o.data);
    acmoe_ctx_desc cd;
    acmoe_ctx *ctx;
    static result results[MAX_PATTERNS][MAX_SEEDS];
    char patterns[MAX_PATTERNS][64];
    int n = 0, i, s;
    memset(&cd, 0, sizeof cd);
    cd.n_threads = o.threads;
    cd.clock = now_seconds;
    check(acmoe_ctx_create(&ctx, &cd), "context");
    printf("kernel path %s, %d threads\n", acmoe_isa_name(acmoe_ctx_settings(ctx).isa), acmoe_ctx_settings(ctx).n_threads);
    if (o.compare) { /* split the comma-separated list */
        const char *p = o.compare;
        while (*p && n < MAX_PATTERNS) {
            size_t len = strcspn(p, ",");
            snprintf(patterns[n++], sizeof patterns[0], "%.*s", (int)(len < 63 ? len : 63), p);
            p += len + (p[len] == ',');
        }
    } else {
        snprintf(patterns[n++], sizeof patterns[0], "%s", o.pattern);
    }
    for (s = 0; s < o.seeds; s++) /* seed by seed, so an interrupted run has whole pairings */
        for (i = 0; i < n; i++) results[i][s] = train(patterns[i], o.seed + s, &o, &c, ctx, i == 0 && s == 0);
    if (n > 1) print_comparison(results, n, &o);
    acmoe_ctx_destroy(ctx);
    acmoe_corpus_free(&c);
    return 0;
}
