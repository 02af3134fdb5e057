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

static const char *const colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"};
#define COLOR(i) colors[(i) % (int)(sizeof colors / sizeof colors[0])]

#define WIDTH 900
#define PLOT_LEFT 90
#define PLOT_RIGHT 870
#define PLOT_TOP 50
#define PLOT_BOTTOM 330

/* Text with the characters XML reserves escaped. */
static void print_text(const char *text) {
    for (; *text; text++) {
        if (*text == '&') printf("&amp;");
        else if (*text == '<') printf("&lt;");
        else if (*text == '>') printf("&gt;");
        else putchar(*text);
    }
}

/* A tick spacing of 1, 2 or 5 times a power of ten giving about five ticks over range. */
static double tick_step(double range) {
    const double raw = range > 0.0 ? range / 5.0 : 1.0, power = pow(10.0, floor(log10(raw)));
    return raw / power < 1.5 ? power : raw / power < 3.5 ? 2.0 * power : raw / power < 7.5 ? 5.0 * power : 10.0 * power;
}

typedef struct axes {
    double x0, x1, y0, y1; /* the data range drawn */
} axes;

static double to_x(const axes *a, double x) { return PLOT_LEFT + (x - a->x0) / (a->x1 - a->x0) * (PLOT_RIGHT - PLOT_LEFT); }
static double to_y(const axes *a, double y) { return PLOT_BOTTOM - (y - a->y0) / (a->y1 - a->y0) * (PLOT_BOTTOM - PLOT_TOP); }

static int by_step(const void *a, const void *b) {
    const long x = ((const point *)a)->step, y = ((const point *)b)->step;
    return (x > y) - (x < y);
}

/* The data range of every series, a little wider so no line sits on the frame. */
static axes loss_axes(void) {
    axes a;
    int i, p;
    a.x0 = a.y0 = INFINITY, a.x1 = a.y1 = -INFINITY;
    for (i = 0; i < n_series; i++)
        for (p = 0; p < all[i].n_points; p++) {
            a.x0 = fmin(a.x0, (double)all[i].points[p].step), a.x1 = fmax(a.x1, (double)all[i].points[p].step);
            a.y0 = fmin(a.y0, all[i].points[p].value), a.y1 = fmax(a.y1, all[i].points[p].value);
        }
    if (a.x1 <= a.x0) a.x0 -= 1.0, a.x1 += 1.0;
    if (a.y1 <= a.y0) a.y0 -= 0.5, a.y1 += 0.5;
    a.y0 -= 0.05 * (a.y1 - a.y0), a.y1 += 0.05 * (a.y1 - a.y0);
    return a;
}

/* Decimals that tell ticks spaced by step apart. */
static int tick_decimals(double step) { return step >= 1.0 ? 0 : (int)ceil(-log10(step) - 1e-9); }

static void draw_axes(const axes *a) {
    const double dx = fmax(1.0, tick_step(a->x1 - a->x0)), dy = tick_step(a->y1 - a->y0); /* steps are whole */
    const int decimals = tick_decimals(dy);
    double v;
    printf("<rect x='%d' y='%d' width='%d' height='%d' fill='none' stroke='#444'/>\n", PLOT_LEFT, PLOT_TOP,
           PLOT_RIGHT - PLOT_LEFT, PLOT_BOTTOM - PLOT_TOP);
    for (v = ceil(a->x0 / dx) * dx; v <= a->x1 + 1e-9 * dx; v += dx)
        printf("<line x1='%.1f' y1='%d' x2='%.1f' y2='%d' stroke='#444'/><text x='%.1f' y='%d' text-anchor='middle'>%.0f</text>\n",
               to_x(a, v), PLOT_BOTTOM, to_x(a, v), PLOT_BOTTOM + 5, to_x(a, v), PLOT_BOTTOM + 20, v);
    for (v = ceil(a->y0 / dy) * dy; v <= a->y1 + 1e-9 * dy; v += dy)
        printf("<line x1='%d' y1='%.1f' x2='%d' y2='%.1f' stroke='#ddd'/><text x='%d' y='%.1f' text-anchor='end'>%.*f</text>\n",
               PLOT_LEFT, to_y(a, v), PLOT_RIGHT, to_y(a, v), PLOT_LEFT - 6, to_y(a, v) + 4, decimals, v);
    printf("<text x='%d' y='%d' text-anchor='middle'>step</text>\n", (PLOT_LEFT + PLOT_RIGHT) / 2, PLOT_BOTTOM + 38);
    printf("<text x='14' y='%d' text-anchor='middle' transform='rotate(-90 14 %d)'>held-out loss</text>\n",
           (PLOT_TOP + PLOT_BOTTOM) / 2, (PLOT_TOP + PLOT_BOTTOM) / 2);
}

/* Each step's lowest, highest and mean value over the seeds, from the sorted points: the
   count of steps. */
static int summarise(const series *s, long *steps, double *low, double *high, double *mean) {
    int p = 0, n = 0;
    while (p < s->n_points) {
        int count = 0;
        steps[n] = s->points[p].step, low[n] = high[n] = s->points[p].value, mean[n] = 0.0;
        for (; p < s->n_points && s->points[p].step == steps[n]; p++, count++) {
            low[n] = fmin(low[n], s->points[p].value), high[n] = fmax(high[n], s->points[p].value);
            mean[n] += s->points[p].value;
        }
        mean[n++] /= count;
    }
    return n;
}

/* The band from the lowest to the highest seed, and the mean line. */
static void draw_series(series *s, const axes *a, const char *color) {
    static long steps[MAX_POINTS];
    static double low[MAX_POINTS], high[MAX_POINTS], mean[MAX_POINTS];
    int n, i;
    qsort(s->points, (size_t)s->n_points, sizeof s->points[0], by_step);
    n = summarise(s, steps, low, high, mean);
    printf("<path fill='%s' fill-opacity='0.18' stroke='none' d='", color);
    for (i = 0; i < n; i++) printf("%c%.1f %.1f ", i ? 'L' : 'M', to_x(a, (double)steps[i]), to_y(a, high[i]));
    for (i = n - 1; i >= 0; i--) printf("L%.1f %.1f ", to_x(a, (double)steps[i]), to_y(a, low[i]));
    printf("Z'/>\n<polyline fill='none' stroke='%s' stroke-width='2' points='", color);
    for (i = 0; i < n; i++) printf("%.1f,%.1f ", to_x(a, (double)steps[i]), to_y(a, mean[i]));
    printf("'/>\n");
}

static void draw_legend(void) {
    int i;
    for (i = 0; i < n_series; i++) {
        const int y = PLOT_TOP + 18 + 18 * i;
        printf("<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='%s' stroke-width='3'/>", PLOT_RIGHT - 330, y - 4,
               PLOT_RIGHT - 310, y - 4, COLOR(i));
        printf("<text x='%d' y='%d'>", PLOT_RIGHT - 304, y);
        print_text(all[i].pattern), printf(" ("), print_text(all[i].routers), printf(")</text>\n");
    }
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
    printf("<text x='%d' y='%d'>layer %d (", x, y - 6, layer->layer);
    print_text(layer->router), printf(")</text>\n");
    printf("<rect x='%d' y='%d' width='%d' height='%d' fill='none' stroke='#bbb'/>\n", x, y, CELL_WIDTH - 10, CELL_HEIGHT);
    printf("<text x='%d' y='%d' text-anchor='end' font-size='10'>top %.0f%%</text>\n", x + CELL_WIDTH - 12, y - 6,
           100.0 * top);
    for (j = 0; j < layer->n_experts; j++) {
        const double h = layer->share[j] / layer->seeds / top * CELL_HEIGHT;
        printf("<rect x='%.1f' y='%.1f' width='%.1f' height='%.1f' fill='%s'/>\n", x + j * bar + 0.1 * bar,
               y + CELL_HEIGHT - h, 0.8 * bar, h, color);
    }
    printf("<line x1='%d' y1='%.1f' x2='%d' y2='%.1f' stroke='#000' stroke-dasharray='4 3'/>\n", x,
           y + CELL_HEIGHT - even / top * CELL_HEIGHT, x + CELL_WIDTH - 10, y + CELL_HEIGHT - even / top * CELL_HEIGHT);
}

static void draw_loads(void) {
    int i, l;
    printf("<text x='%d' y='%d' font-weight='bold'>Load per expert at the last evaluation (share of routed pairs, "
           "mean over seeds; dashed: even share)</text>\n", PLOT_LEFT, LOADS_TOP - 30);
    for (i = 0; i < n_series; i++) {
        const int y = LOADS_TOP + i * ROW_HEIGHT;
        printf("<text x='%d' y='%d' fill='%s'>", PLOT_LEFT, y, COLOR(i));
        print_text(all[i].pattern), printf(" ("), print_text(all[i].routers), printf("), step %ld</text>\n", all[i].last_step);
        for (l = 0; l < all[i].n_layers; l++)
            draw_load_cell(&all[i].layers[l], PLOT_LEFT + l * CELL_WIDTH, y + 24, COLOR(i));
    }
}

static void draw(void) {
    const axes a = loss_axes();
    const int layers = most_layers(), width = layers * CELL_WIDTH + PLOT_LEFT + 30 > WIDTH ? layers * CELL_WIDTH + PLOT_LEFT + 30 : WIDTH;
    const int height = layers ? LOADS_TOP + n_series * ROW_HEIGHT + 10 : PLOT_BOTTOM + 50;
    int i;
    printf("<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='%d' font-family='sans-serif' font-size='12'>\n",
           width, height);
    printf("<rect width='100%%' height='100%%' fill='white'/>\n");
    printf("<text x='%d' y='28' font-weight='bold'>Held-out loss per pattern (band: lowest to highest seed; line: "
           "mean)</text>\n", PLOT_LEFT);
    draw_axes(&a);
    for (i = 0; i < n_series; i++) draw_series(&all[i], &a, COLOR(i));
    draw_legend();
    if (layers) draw_loads();
    printf("</svg>\n");
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
