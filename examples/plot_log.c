/* Draws the JSON lines of train_lm or train_vit --log as an SVG, without dependencies:

     train_lm --compare ggc,ggg --seeds 3 --log run.jsonl
     plot_log run.jsonl > run.svg

   The first panel has the held-out loss of each pattern over the steps: a band from the
   lowest to the highest seed and a line through their mean, the legend naming each
   pattern's routers. The second has, for each pattern and MoE layer, each expert's share of
   the routed pairs at the last evaluation (mean over the seeds), beside the even share. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data.h"
#include "svg.h"

#define PROGRAM "plot_log"
#define MAX_PATTERNS 16
#define MAX_POINTS 4096 /* evaluations per pattern, over all seeds */
#define MAX_LAYERS 63
#define MAX_EXPERTS 256
#define TEXT_MAX 1280

typedef struct point {
    long step;
    double value;
} point;

/* The expert shares of one MoE layer at the last evaluation, summed over seeds. */
typedef struct layer_load {
    int layer, n_experts, seeds;
    char router[64];
    double share[MAX_EXPERTS];
} layer_load;

typedef struct series {
    char pattern[64], routers[TEXT_MAX];
    int n_points, n_layers;
    point points[MAX_POINTS];
    long last_step; /* of the layer loads kept */
    layer_load layers[MAX_LAYERS];
} series;

static series all[MAX_PATTERNS];
static int n_series;

static void fail(const char *what) {
    fprintf(stderr, PROGRAM ": %s\n", what);
    exit(2);
}

/* ---- reading the log ---- */

/* Where the value of "key" starts in the line, or NULL. */
static const char *json_value(const char *line, const char *key) {
    char quoted[64];
    const char *at;
    snprintf(quoted, sizeof quoted, "\"%s\":", key);
    at = strstr(line, quoted);
    return at ? at + strlen(quoted) : NULL;
}

/* The string value of key into out (escapes other than \uXXXX kept as their letter);
   0 when there is none. */
static int json_string(const char *line, const char *key, char *out, size_t cap) {
    const char *p = json_value(line, key);
    size_t used = 0;
    if (!p || *p++ != '"') return 0;
    for (; *p && *p != '"' && used + 1 < cap; p++) {
        if (*p == '\\' && p[1] == 'u' && strlen(p) >= 6) p += 5, out[used++] = '?';
        else if (*p == '\\' && p[1]) out[used++] = *++p;
        else out[used++] = *p;
    }
    out[used] = '\0';
    return 1;
}

/* The number value of key; NaN for none or null. */
static double json_number(const char *line, const char *key) {
    const char *p = json_value(line, key);
    char *end;
    double v;
    if (!p) return NAN;
    v = strtod(p, &end);
    return end == p ? NAN : v;
}

/* The series of the line's pattern, made on first sight; NULL beyond MAX_PATTERNS. */
static series *series_of(const char *line) {
    char pattern[64];
    int i;
    if (!json_string(line, "pattern", pattern, sizeof pattern)) return NULL;
    for (i = 0; i < n_series; i++)
        if (!strcmp(all[i].pattern, pattern)) return &all[i];
    if (n_series == MAX_PATTERNS) return NULL;
    memcpy(all[n_series].pattern, pattern, sizeof pattern);
    if (!json_string(line, "routers", all[n_series].routers, sizeof all[n_series].routers))
        snprintf(all[n_series].routers, sizeof all[n_series].routers, "?");
    return &all[n_series++];
}

static void read_eval(series *s, const char *line) {
    const double step = json_number(line, "step"), loss = json_number(line, "val_loss");
    if (isnan(step) || !isfinite(loss) || s->n_points == MAX_POINTS) return;
    s->points[s->n_points].step = (long)step;
    s->points[s->n_points++].value = loss;
}

/* A layer's load at an evaluation: a later one replaces what was kept, the same step of
   another seed adds to it. */
static void read_layer(series *s, const char *line) {
    const long step = (long)json_number(line, "step");
    const int number = (int)json_number(line, "layer");
    const char *p = json_value(line, "tokens_per_expert");
    double counts[MAX_EXPERTS], total = 0.0;
    layer_load *layer = NULL;
    int i, n = 0;
    if (!p || *p++ != '[' || number < 1) return;
    while (n < MAX_EXPERTS && *p && *p != ']') {
        char *end;
        counts[n] = strtod(p, &end);
        if (end == p) return;
        total += counts[n++];
        p = *end == ',' ? end + 1 : end;
    }
    if (step > s->last_step) s->last_step = step, s->n_layers = 0;
    if (step < s->last_step || total <= 0.0) return;
    for (i = 0; i < s->n_layers; i++) layer = s->layers[i].layer == number ? &s->layers[i] : layer;
    if (!layer && s->n_layers == MAX_LAYERS) return;
    if (!layer) {
        layer = &s->layers[s->n_layers++];
        memset(layer, 0, sizeof *layer);
        layer->layer = number, layer->n_experts = n;
        if (!json_string(line, "router", layer->router, sizeof layer->router)) snprintf(layer->router, 2, "?");
    }
    if (layer->n_experts != n) return;
    for (i = 0; i < n; i++) layer->share[i] += counts[i] / total;
    layer->seeds++;
}

static void read_log(char *text) {
    char *line = text, *next;
    for (; *line; line = next) {
        char event[16];
        series *s;
        next = line + strcspn(line, "\n");
        if (*next) *next++ = '\0';
        if (!json_string(line, "event", event, sizeof event) || !(s = series_of(line))) continue;
        if (!strcmp(event, "eval")) read_eval(s, line);
        else if (!strcmp(event, "layer")) read_layer(s, line);
    }
}

/* ---- drawing ---- */

#define WIDTH 900
#define PLOT_LEFT 90
#define PLOT_RIGHT 870
#define PLOT_TOP 50
#define PLOT_BOTTOM 330

static int by_step(const void *a, const void *b) {
    const long x = ((const point *)a)->step, y = ((const point *)b)->step;
    return (x > y) - (x < y);
}

/* The data range of every series, a little wider so no line sits on the frame. */
static svg_axes loss_axes(void) {
    svg_axes axes = svg_axes_at(PLOT_LEFT, PLOT_TOP, PLOT_RIGHT - PLOT_LEFT, PLOT_BOTTOM - PLOT_TOP);
    int i, p;
    for (i = 0; i < n_series; i++)
        for (p = 0; p < all[i].n_points; p++)
            svg_axes_include(&axes, (double)all[i].points[p].step, all[i].points[p].value);
    svg_axes_pad(&axes, 0.05);
    return axes;
}

/* Each step's lowest, highest and mean value over the seeds, from the sorted points: the
   count of steps. */
static int summarise(const series *s, double *steps, double *low, double *high, double *mean) {
    int p = 0, n = 0;
    while (p < s->n_points) {
        int count = 0;
        steps[n] = (double)s->points[p].step, low[n] = high[n] = s->points[p].value, mean[n] = 0.0;
        for (; p < s->n_points && (double)s->points[p].step == steps[n]; p++, count++) {
            low[n] = fmin(low[n], s->points[p].value), high[n] = fmax(high[n], s->points[p].value);
            mean[n] += s->points[p].value;
        }
        mean[n++] /= count;
    }
    return n;
}

/* The band from the lowest to the highest seed, and the mean line. */
static void draw_series(series *s, const svg_axes *axes, const char *color) {
    static double steps[MAX_POINTS], low[MAX_POINTS], high[MAX_POINTS], mean[MAX_POINTS];
    int n;
    qsort(s->points, (size_t)s->n_points, sizeof s->points[0], by_step);
    n = summarise(s, steps, low, high, mean);
    svg_band(stdout, axes, steps, low, high, n, color, 0.18);
    svg_polyline(stdout, axes, steps, mean, n, color, NULL);
}

/* Each pattern named with its routers, e.g. "ggc (SMoE, SMoE, AC)". */
static void draw_legend(void) {
    static char labels[MAX_PATTERNS][64 + TEXT_MAX + 4];
    const char *names[MAX_PATTERNS], *colors[MAX_PATTERNS];
    int i;
    for (i = 0; i < n_series; i++) {
        strcat(strcat(strcat(strcpy(labels[i], all[i].pattern), " ("), all[i].routers), ")");
        names[i] = labels[i], colors[i] = svg_color(i);
    }
    svg_legend(stdout, PLOT_RIGHT - 8, PLOT_TOP + 4, names, colors, NULL, n_series);
}

/* ---- the load panel: a small bar chart per pattern and MoE layer ---- */

#define CELL_WIDTH 200
#define CELL_HEIGHT 90
#define LOADS_TOP (PLOT_BOTTOM + 90)
#define ROW_HEIGHT (CELL_HEIGHT + 50)

static int most_layers(void) {
    int i, most = 0;
    for (i = 0; i < n_series; i++) most = all[i].n_layers > most ? all[i].n_layers : most;
    return most;
}

/* Bars of each expert's share, scaled to the largest share of the cell, and a dashed
   line at the even share 1 / experts. */
static void draw_load_cell(const layer_load *layer, int x, int y, const char *color) {
    const double even = 1.0 / layer->n_experts, bar = (double)(CELL_WIDTH - 10) / layer->n_experts;
    double top = even;
    int j;
    for (j = 0; j < layer->n_experts; j++) top = fmax(top, layer->share[j] / layer->seeds);
    svg_textf(stdout, x, y - 6, "start", "", "layer %d (%s)", layer->layer, layer->router);
    svg_rect(stdout, x, y, CELL_WIDTH - 10, CELL_HEIGHT, "none", "#bbb");
    svg_textf(stdout, x + CELL_WIDTH - 12, y - 6, "end", "font-size='10'", "top %.0f%%", 100.0 * top);
    for (j = 0; j < layer->n_experts; j++) {
        const double h = layer->share[j] / layer->seeds / top * CELL_HEIGHT;
        svg_rect(stdout, x + j * bar + 0.1 * bar, y + CELL_HEIGHT - h, 0.8 * bar, h, color, "none");
    }
    svg_line(stdout, x, y + CELL_HEIGHT - even / top * CELL_HEIGHT, x + CELL_WIDTH - 10,
             y + CELL_HEIGHT - even / top * CELL_HEIGHT, "#000", 1.0, "4 3");
}

static void draw_loads(void) {
    int i, l;
    svg_text(stdout, PLOT_LEFT, LOADS_TOP - 30, "start", "font-weight='bold'",
             "Load per expert at the last evaluation (share of routed pairs, mean over seeds; dashed: even share)");
    for (i = 0; i < n_series; i++) {
        const int y = LOADS_TOP + i * ROW_HEIGHT;
        char fill[32];
        snprintf(fill, sizeof fill, "fill='%s'", svg_color(i));
        svg_textf(stdout, PLOT_LEFT, y, "start", fill, "%s (%s), step %ld", all[i].pattern, all[i].routers,
                  all[i].last_step);
        for (l = 0; l < all[i].n_layers; l++)
            draw_load_cell(&all[i].layers[l], PLOT_LEFT + l * CELL_WIDTH, y + 24, svg_color(i));
    }
}

static void draw(void) {
    const svg_axes axes = loss_axes();
    const int layers = most_layers(), width = layers * CELL_WIDTH + PLOT_LEFT + 30 > WIDTH ? layers * CELL_WIDTH + PLOT_LEFT + 30 : WIDTH;
    const int height = layers ? LOADS_TOP + n_series * ROW_HEIGHT + 10 : PLOT_BOTTOM + 50;
    int i;
    svg_begin(stdout, width, height);
    svg_text(stdout, PLOT_LEFT, 28, "start", "font-weight='bold'",
             "Held-out loss per pattern (band: lowest to highest seed; line: mean)");
    svg_draw_axes(stdout, &axes, "step", "held-out loss", 1);
    for (i = 0; i < n_series; i++) draw_series(&all[i], &axes, svg_color(i));
    draw_legend();
    if (layers) draw_loads();
    svg_end(stdout);
}

int main(int argc, char **argv) {
    char why[256];
    size_t size = 0;
    unsigned char *text;
    int i, evaluations = 0;
    if (argc != 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fprintf(stderr, "usage: plot_log LOG.jsonl > PLOT.svg   (the --log of train_lm or train_vit)\n");
        return argc == 2 ? 0 : 2;
    }
    text = data_read_file(argv[1], &size, why, sizeof why);
    if (!text) {
        fprintf(stderr, PROGRAM ": %s: %s\n", argv[1], why);
        return 2;
    }
    read_log((char *)text);
    free(text);
    for (i = 0; i < n_series; i++) evaluations += all[i].n_points;
    if (evaluations == 0) fail("no evaluations in the log (\"event\":\"eval\" lines)");
    draw();
    return 0;
}
