/* What the training examples print and log: the progress bar and its ETA, each layer's
   router options, load and AC weights, comparisons over seeds (mean, spread, differences
   paired by seed), checkpoint paths, and the JSON lines of --log. Layers are numbered from
   1, as people count them. */
#ifndef ACMOE_EXAMPLES_REPORT_H
#define ACMOE_EXAMPLES_REPORT_H

#include <math.h>
#include <time.h>

#include "run_options.h"

static inline double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- progress ---- */

/* The seconds left when done of total steps took elapsed seconds (0 before the first). */
static inline double eta_seconds(double elapsed, long done, long total) {
    return done > 0 ? elapsed / (double)done * (double)(total - done) : 0.0;
}

/* A bar redrawn in place on a terminal, a line per call elsewhere; rate in units per
   second ("tok/s", "img/s"). */
static inline void print_progress(int interactive, long step, long steps, float loss, float lr, double rate,
                                  const char *unit, double eta) {
    if (interactive) {
        const int filled = steps > 0 ? (int)(30 * step / steps) : 30;
        int i;
        printf("\r[");
        for (i = 0; i < 30; i++) putchar(i < filled ? '#' : '.');
        printf("] %ld/%ld loss %.3f lr %.1e %.1fk %s ETA %dm%02ds ", step, steps, loss, lr, rate / 1000.0, unit,
               (int)eta / 60, (int)eta % 60);
    } else {
        printf("step %5ld/%ld  loss %.4f  lr %.2e  %.1fk %s  ETA %dm%02ds\n", step, steps, loss, lr, rate / 1000.0, unit,
               (int)eta / 60, (int)eta % 60);
    }
    fflush(stdout);
}

/* ---- layers ---- */

/* A line for each layer whose router has options of its own, as the layer resolved them. */
static inline void print_layer_settings(acmoe_lm *lm) {
    int l;
    for (l = 0; l < acmoe_lm_n_layers(lm); l++) {
        const acmoe_moe_desc m = acmoe_moe_settings(acmoe_lm_moe(lm, l));
        const int layer = l + 1;
        if (m.router_input == ACMOE_INPUT_AC)
            printf("  layer %d AC options: eps %g, clip %g, %s scaling, %s dispersion%s%s%s\n", layer, m.ac.eps, m.ac.clip,
                   acmoe_enum_name(ACMOE_ENUM_AC_SCALING, (int)m.ac.scaling),
                   acmoe_enum_name(ACMOE_ENUM_AC_DISPERSION, (int)m.ac.dispersion), m.ac.robust ? ", robust" : "",
                   m.ac_weight_experts ? ", weighted input to the experts" : "",
                   m.ac_mix_labels ? ", labels mixed by gate" : "");
        if (m.router_input == ACMOE_INPUT_PROJECTED) printf("  layer %d XMoE projection: %d wide\n", layer, m.proj_dim);
        if (m.router_select == ACMOE_SELECT_USMOE)
            printf("  layer %d USMoE: budget %g pairs per token of each %s, rho %g\n", layer, m.usmoe_budget,
                   m.group == ACMOE_GROUP_BATCH ? "call" : acmoe_enum_name(ACMOE_ENUM_GROUP, (int)m.group), m.usmoe_rho);
        if (m.router_select == ACMOE_SELECT_PRIORITY)
            printf("  layer %d Swin-MoE gate: noise %g / E in training, capacity %g, load and importance loss %g\n", layer,
                   m.gate_noise, m.capacity, m.importance_loss);
        if (m.router_select == ACMOE_SELECT_SOFT)
            printf("  layer %d Soft MoE: %d slot(s) per expert for each %s\n", layer, m.soft_slots,
                   m.group == ACMOE_GROUP_SEQUENCE ? "image" : "position");
    }
}

/* Calls visit for each layer of the model's pattern with its letter and whether an MoE
   layer comes before it in its stage (AC labels start afresh in each stage). */
typedef void (*layer_visitor)(acmoe_lm *lm, int layer, char letter, int after_moe, void *user);
static inline void visit_layers(acmoe_lm *lm, layer_visitor visit, void *user) {
    const char *pattern = acmoe_lm_settings(lm).pattern;
    int l = 0, seen_moe = 0;
    for (; *pattern; pattern++) {
        if (*pattern == '|') {
            seen_moe = 0;
            continue;
        }
        visit(lm, l++, *pattern, seen_moe, user);
        seen_moe |= *pattern != 'f';
    }
}

static inline void print_stability_of(acmoe_lm *lm, int layer, char letter, int after_moe, void *user) {
    int *printed = (int *)user;
    if (letter == 'f' || !after_moe) return;
    if (!(*printed)++) printf("  router stability (token pairs whose best-expert relation changed, running mean):");
    printf(" layer %d %.3f", layer + 1, acmoe_moe_last_stats(acmoe_lm_moe(lm, layer)).router_stability);
}

/* The router stability (see acmoe_moe_stats) of each MoE layer that has an MoE layer before
   it in its stage, on one line. */
static inline void print_stability(acmoe_lm *lm) {
    int printed = 0;
    visit_layers(lm, print_stability_of, &printed);
    if (printed) printf("\n");
}

/* The mean gate of each token's top choice in the last call (1/k when the router no longer
   discriminates between its k choices). */
static inline double mean_top_gate(const acmoe_moe_stats *st) {
    double sum = 0.0;
    int t;
    for (t = 0; t < st->n_tokens; t++) sum += st->gate[(size_t)t * st->top_k];
    return st->n_tokens ? sum / st->n_tokens : 0.0;
}

/* An AC layer's weights in the last call: its clusters (the previous MoE layer's best
   experts), how many of them got fewer than two tokens (each flattens the other clusters'
   weights unless --ac-robust is on), and its mean top gate. */
static inline void print_ac_summary(int layer, const acmoe_moe_stats *st) {
    printf("  layer %d AC: %d clusters, %d with fewer than 2 tokens; W from %.3g to %.3g; mean top gate %.2f\n", layer,
           st->ac_clusters, st->ac_small_clusters, st->ac_w_min, st->ac_w_max, mean_top_gate(st));
}

/* Largest expert share over the mean share, worst MoE layer of the last call; with print,
   each layer's load and AC weights. */
static inline double print_loads(acmoe_lm *lm, int print) {
    double worst = 1.0;
    int l, j;
    for (l = 0; l < acmoe_lm_n_layers(lm); l++) {
        const acmoe_moe_stats st = acmoe_moe_last_stats(acmoe_lm_moe(lm, l));
        int top = 0;
        if (st.n_experts < 2 || st.pairs == 0) continue;
        for (j = 0; j < st.n_experts; j++) top = st.tokens_per_expert[j] > top ? st.tokens_per_expert[j] : top;
        worst = fmax(worst, (double)top * st.n_experts / st.pairs);
        if (!print) continue;
        printf("  layer %d load (%% of pairs):", l + 1);
        for (j = 0; j < st.n_experts; j++) printf(" %.0f", 100.0 * st.tokens_per_expert[j] / st.pairs);
        printf("\n");
        if (st.ac_clusters > 0) print_ac_summary(l + 1, &st);
    }
    return worst;
}

/* ---- comparisons over seeds ---- */

/* Mean and sample standard deviation of n values. */
static inline void mean_sd(const double *v, int n, double *mean, double *sd) {
    double sum = 0.0, sq = 0.0;
    int i;
    for (i = 0; i < n; i++) sum += v[i];
    *mean = sum / n;
    for (i = 0; i < n; i++) sq += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(sq / (n - 1)) : 0.0;
}

/* "mean (sd)" of n values, or the value alone. */
static inline void format_stat(char *out, size_t cap, const double *v, int n) {
    double mean, sd;
    mean_sd(v, n, &mean, &sd);
    if (n > 1) snprintf(out, cap, "%.3f (%.3f)", mean, sd);
    else snprintf(out, cap, "%.3f", mean);
}

/* The widest label of n, for a table's first column. */
static inline int label_width(char labels[][PATTERN_LABEL_MAX], int n) {
    int i, width = 7; /* "pattern" */
    for (i = 0; i < n; i++) width = (int)strlen(labels[i]) > width ? (int)strlen(labels[i]) : width;
    return width;
}

/* Seed by seed, a's value less b's (a and b are patterns, named by their labels): their
   mean, spread and signs, in unit, which is better higher or lower. */
static inline void print_paired(const char *a, const char *b, const char *what, const double *va, const double *vb,
                                int seeds, const char *unit, int higher_is_better) {
    double diff[RUN_MAX_SEEDS], mean, sd;
    char label_a[PATTERN_LABEL_MAX], label_b[PATTERN_LABEL_MAX];
    int s, better = 0;
    for (s = 0; s < seeds; s++) {
        diff[s] = va[s] - vb[s];
        better += higher_is_better ? diff[s] > 0.0 : diff[s] < 0.0;
    }
    mean_sd(diff, seeds, &mean, &sd);
    pattern_label(a, label_a, sizeof label_a), pattern_label(b, label_b, sizeof label_b);
    printf("%s - %s, %s: %+.3f %s (sd %.3f over %d seeds); %s %s on %d of %d\n", label_a, label_b, what, mean, unit, sd,
           seeds, a, higher_is_better ? "higher" : "lower", better, seeds);
}

/* ---- checkpoints ---- */

/* The checkpoint path of a run: --save itself, or with --compare, pattern-suffixed (and
   seed-suffixed with --seeds). The flag table bounds --save so that the path fits
   CHECKPOINT_PATH. */
#define CHECKPOINT_PATH 4096
static inline void checkpoint_path(const run_options *o, const char *program, const char *pattern, long seed, char *path,
                                   size_t cap) {
    int length;
    if (o->compare && o->seeds > 1) length = snprintf(path, cap, "%s.%s.s%ld", o->save, pattern, seed);
    else if (o->compare) length = snprintf(path, cap, "%s.%s", o->save, pattern);
    else length = snprintf(path, cap, "%s", o->save);
    if (length < 0 || (size_t)length >= cap) cli_fail(program, "--save %.40s...: too long a path", o->save);
}

/* Saves the model where --save says, if it says. */
static inline void checkpoint_save(const run_options *o, const char *program, acmoe_lm *lm, const char *pattern,
                                   long seed) {
    char path[CHECKPOINT_PATH];
    acmoe_status s;
    if (!o->save) return;
    checkpoint_path(o, program, pattern, seed, path, sizeof path);
    s = acmoe_lm_save(lm, path);
    if (s == ACMOE_OK) return;
    fprintf(stderr, "%s: %s: %s\n", program, path, acmoe_status_string(s));
    exit(1);
}

/* ---- --log: JSON lines ---- */

/* Where a run's progress goes: the model it trains (pattern and seed), whether the output
   is a terminal, and the --log file (NULL for none). */
typedef struct run_report {
    const char *pattern;
    long seed;
    int interactive;
    FILE *log;
} run_report;

/* The --log file, or NULL without --log; one that cannot be written exits with status 2. */
static inline FILE *log_open(const run_options *o, const char *program) {
    FILE *f;
    if (!o->log) return NULL;
    f = fopen(o->log, o->resume ? "a" : "w"); /* a resumed run continues its log */
    if (!f) cli_fail(program, "--log %s: %s", o->log, strerror(errno));
    return f;
}

static inline void log_string(FILE *f, const char *text) {
    fputc('"', f);
    for (; *text; text++) {
        const unsigned char c = (unsigned char)*text;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

/* ,"key":value; null where JSON has no number for it. */
static inline void log_number(FILE *f, const char *key, double value) {
    if (isfinite(value)) fprintf(f, ",\"%s\":%.9g", key, value);
    else fprintf(f, ",\"%s\":null", key);
}

/* The start of an object: the event, the run (pattern, its routers, seed) and the step. */
static inline void log_begin(FILE *f, const char *event, const char *pattern, long seed, long step) {
    char routers[PATTERN_LABEL_MAX];
    pattern_routers(pattern, routers, sizeof routers);
    fprintf(f, "{\"event\":\"%s\",\"pattern\":", event);
    log_string(f, pattern);
    fprintf(f, ",\"routers\":");
    log_string(f, routers);
    fprintf(f, ",\"seed\":%ld,\"step\":%ld", seed, step);
}

static inline void log_end(FILE *f) {
    fputs("}\n", f);
    fflush(f); /* a run that is stopped keeps what it logged */
}

static inline void log_step(const run_report *r, long step, float loss, float lr, float grad_norm,
                            double tokens_per_second) {
    FILE *f = r->log;
    if (!f) return;
    log_begin(f, "step", r->pattern, r->seed, step);
    log_number(f, "loss", loss), log_number(f, "lr", lr), log_number(f, "grad_norm", grad_norm);
    log_number(f, "tokens_per_second", tokens_per_second);
    log_end(f);
}

/* An evaluation: count measures by name (val_loss first). */
static inline void log_eval_measures(const run_report *r, long step, const char *const *names, const double *values,
                                     int count) {
    FILE *f = r->log;
    int i;
    if (!f) return;
    log_begin(f, "eval", r->pattern, r->seed, step);
    for (i = 0; i < count; i++) log_number(f, names[i], values[i]);
    log_end(f);
}

/* An evaluation; corrupted_loss only when measured (corrupted). */
static inline void log_eval(const run_report *r, long step, double val_loss, int corrupted, double corrupted_loss) {
    static const char *const names[2] = {"val_loss", "val_loss_corrupted"};
    const double values[2] = {val_loss, corrupted_loss};
    log_eval_measures(r, step, names, values, corrupted ? 2 : 1);
}

typedef struct layer_log {
    const run_report *report;
    long step;
    const double *mutual_information; /* [layer], or NULL */
} layer_log;

static inline void log_layer_of(acmoe_lm *lm, int layer, char letter, int after_moe, void *user) {
    const layer_log *u = (const layer_log *)user;
    const acmoe_moe_stats st = acmoe_moe_last_stats(acmoe_lm_moe(lm, layer));
    FILE *f = u->report->log;
    acmoe_tightness tight;
    int j;
    if (letter == 'f') return;
    log_begin(f, "layer", u->report->pattern, u->report->seed, u->step);
    fprintf(f, ",\"layer\":%d,\"router\":", layer + 1);
    log_string(f, acmoe_router_name(letter));
    fprintf(f, ",\"pairs\":%d,\"dropped\":%d,\"tokens_per_expert\":[", st.pairs, st.dropped);
    for (j = 0; j < st.n_experts; j++) fprintf(f, "%s%d", j ? "," : "", st.tokens_per_expert[j]);
    fputc(']', f);
    log_number(f, "top_gate_mean", mean_top_gate(&st));
    if (acmoe_moe_tightness(acmoe_lm_moe(lm, layer), &tight) == ACMOE_OK && tight.clusters > 1) /* one: no ratio */
        log_number(f, "tightness_plain", tight.plain), log_number(f, "tightness_ac", tight.ac);
    if (st.ac_clusters > 0) {
        fprintf(f, ",\"ac_clusters\":%d,\"small_clusters\":%d", st.ac_clusters, st.ac_small_clusters);
        log_number(f, "ac_w_min", st.ac_w_min), log_number(f, "ac_w_max", st.ac_w_max);
        log_number(f, "ac_w_mean", st.ac_w_mean);
    }
    if (after_moe) log_number(f, "router_stability", st.router_stability);
    if (u->mutual_information) log_number(f, "mi_expert_class", u->mutual_information[layer]);
    log_end(f);
}

/* One object per MoE layer: its load per expert in the last call (an evaluation's), and
   its AC weights and router stability where it has them. Soft MoE layers count slots. */
static inline void log_layers(const run_report *r, acmoe_lm *lm, long step) {
    layer_log u;
    if (!r->log) return;
    u.report = r, u.step = step, u.mutual_information = NULL;
    visit_layers(lm, log_layer_of, &u);
}

/* The same, with each layer's mutual information between a token's best expert and its
   image's class, in bits ([layer], NaN where not measured). */
static inline void log_layers_with_classes(const run_report *r, acmoe_lm *lm, long step,
                                           const double *mutual_information) {
    layer_log u;
    if (!r->log) return;
    u.report = r, u.step = step, u.mutual_information = mutual_information;
    visit_layers(lm, log_layer_of, &u);
}

/* A test after training: the attack or corruption, its strength and the accuracy. */
static inline void log_robust(const run_report *r, long step, const char *attack, double strength, double accuracy) {
    FILE *f = r->log;
    if (!f) return;
    log_begin(f, "robust", r->pattern, r->seed, step);
    fprintf(f, ",\"attack\":");
    log_string(f, attack);
    fprintf(f, ",\"strength\":%g", strength); /* as given: 0.1, not its float's digits */
    log_number(f, "accuracy", accuracy);
    log_end(f);
}

#endif
