/* A small SVG writer for plots, without dependencies: a canvas, axes with nice ticks,
   polylines, bands, bars with error bars, a legend, and text with XML's characters escaped.

     svg_axes axes = svg_axes_at(80, 40, 600, 300);
     svg_axes_include(&axes, x, y);            for every point drawn
     svg_axes_pad(&axes, 0.05);
     svg_begin(out, 760, 400);
     svg_draw_axes(out, &axes, "step", "loss", 1);
     svg_polyline(out, &axes, xs, ys, n, svg_color(0), NULL);
     svg_end(out);

   Data coordinates go through the axes; pixel coordinates (svg_line, svg_rect, svg_text)
   are drawn as given. Every function writes to out and returns nothing: a stream error
   shows in ferror(out). */
#ifndef ACMOE_SVG_H
#define ACMOE_SVG_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#define SVG_CHAR_WIDTH 7.8 /* a 12 px sans-serif character at its widest common size, for sizing legends */

/* Ten colours that stay apart (matplotlib's tab10); the index wraps. */
static inline const char *svg_color(int index) {
    static const char *const colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
                                         "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"};
    const int count = (int)(sizeof colors / sizeof colors[0]);
    return colors[((index % count) + count) % count];
}

/* Text with the characters XML reserves escaped, and control characters dropped (XML 1.0
   has no way to write them). */
static inline void svg_escape(FILE *out, const char *text) {
    for (; *text; text++) {
        const unsigned char c = (unsigned char)*text;
        if (c == '&') fputs("&amp;", out);
        else if (c == '<') fputs("&lt;", out);
        else if (c == '>') fputs("&gt;", out);
        else if (c == '\'') fputs("&apos;", out);
        else if (c == '"') fputs("&quot;", out);
        else if (c >= 0x20) fputc(c, out);
    }
}

static inline void svg_begin(FILE *out, int width, int height) {
    fprintf(out,
            "<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='%d' viewBox='0 0 %d %d' "
            "font-family='sans-serif' font-size='12'>\n",
            width, height, width, height);
    fprintf(out, "<rect width='100%%' height='100%%' fill='white'/>\n");
}

static inline void svg_end(FILE *out) { fputs("</svg>\n", out); }

/* Text at a pixel position; anchor is start, middle or end; attributes (may be "") go into
   the element as they are, e.g. "font-weight='bold'". */
static inline void svg_text(FILE *out, double x, double y, const char *anchor, const char *attributes,
                            const char *text) {
    fprintf(out, "<text x='%.1f' y='%.1f' text-anchor='%s' %s>", x, y, anchor, attributes);
    svg_escape(out, text);
    fputs("</text>\n", out);
}

/* svg_text of a printf format; the text is cut at SVG_TEXT_MAX bytes. */
#define SVG_TEXT_MAX 2048
#if defined(__GNUC__)
#define SVG_PRINTF_LIKE __attribute__((format(printf, 6, 7)))
#else
#define SVG_PRINTF_LIKE
#endif
static inline void svg_textf(FILE *out, double x, double y, const char *anchor, const char *attributes,
                             const char *format, ...) SVG_PRINTF_LIKE;
static inline void svg_textf(FILE *out, double x, double y, const char *anchor, const char *attributes,
                             const char *format, ...) {
    char text[SVG_TEXT_MAX];
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(text, sizeof text, format, arguments);
    va_end(arguments);
    svg_text(out, x, y, anchor, attributes, text);
}

/* A line between pixel positions; dash is a stroke-dasharray such as "4 3", or NULL. */
static inline void svg_line(FILE *out, double x1, double y1, double x2, double y2, const char *color, double width,
                            const char *dash) {
    fprintf(out, "<line x1='%.1f' y1='%.1f' x2='%.1f' y2='%.1f' stroke='%s' stroke-width='%.1f'", x1, y1, x2, y2, color,
            width);
    if (dash) fprintf(out, " stroke-dasharray='%s'", dash);
    fputs("/>\n", out);
}

/* A rectangle in pixels; fill or stroke may be "none". */
static inline void svg_rect(FILE *out, double x, double y, double width, double height, const char *fill,
                            const char *stroke) {
    fprintf(out, "<rect x='%.1f' y='%.1f' width='%.1f' height='%.1f' fill='%s' stroke='%s'/>\n", x, y, width, height,
            fill, stroke);
}

/* ---- axes: a pixel box and the data range it shows ---- */

typedef struct svg_axes {
    double left, top, right, bottom;   /* the plotting area, in pixels */
    double x_min, x_max, y_min, y_max; /* the data shown there */
} svg_axes;

/* Axes over a pixel box with an empty data range, for svg_axes_include to widen. */
static inline svg_axes svg_axes_at(double left, double top, double width, double height) {
    svg_axes axes;
    axes.left = left, axes.top = top, axes.right = left + width, axes.bottom = top + height;
    axes.x_min = axes.y_min = INFINITY, axes.x_max = axes.y_max = -INFINITY;
    return axes;
}

/* Widens the range to hold x and y; a coordinate that is not finite is left out. */
static inline void svg_axes_include(svg_axes *axes, double x, double y) {
    if (isfinite(x)) axes->x_min = fmin(axes->x_min, x), axes->x_max = fmax(axes->x_max, x);
    if (isfinite(y)) axes->y_min = fmin(axes->y_min, y), axes->y_max = fmax(axes->y_max, y);
}

/* Whether a range is too narrow for ticks to tell apart (rounding alone). */
static inline int svg_range_flat(double low, double high) { return high - low <= 1e-9 * fmax(fabs(low), fabs(high)); }

/* Gives an empty or (nearly) single-valued range some width, and pads y by fraction of its
   span on both sides so no line sits on the frame. */
static inline void svg_axes_pad(svg_axes *axes, double fraction) {
    double span;
    if (!(axes->x_max >= axes->x_min)) axes->x_min = 0.0, axes->x_max = 1.0;
    if (!(axes->y_max >= axes->y_min)) axes->y_min = 0.0, axes->y_max = 1.0;
    if (svg_range_flat(axes->x_min, axes->x_max)) axes->x_min -= 1.0, axes->x_max += 1.0;
    if (svg_range_flat(axes->y_min, axes->y_max)) {
        const double half = axes->y_min != 0.0 ? 0.05 * fabs(axes->y_min) : 0.5;
        axes->y_min -= half, axes->y_max += half;
    }
    span = axes->y_max - axes->y_min;
    axes->y_min -= fraction * span, axes->y_max += fraction * span;
}

static inline double svg_x(const svg_axes *axes, double x) {
    return axes->left + (x - axes->x_min) / (axes->x_max - axes->x_min) * (axes->right - axes->left);
}

static inline double svg_y(const svg_axes *axes, double y) {
    return axes->bottom - (y - axes->y_min) / (axes->y_max - axes->y_min) * (axes->bottom - axes->top);
}

/* A tick spacing of 1, 2 or 5 times a power of ten giving about `ticks` ticks over range. */
static inline double svg_tick_step(double range, int ticks) {
    const double raw = range > 0.0 ? range / (ticks > 0 ? ticks : 5) : 1.0, power = pow(10.0, floor(log10(raw)));
    const double ratio = raw / power;
    return ratio < 1.5 ? power : ratio < 3.5 ? 2.0 * power : ratio < 7.5 ? 5.0 * power : 10.0 * power;
}

/* Decimals that tell ticks spaced by step apart. */
static inline int svg_tick_decimals(double step) { return step >= 1.0 ? 0 : (int)ceil(-log10(step) - 1e-9); }

/* The multiples of step in [low, high]: the first's index into *first, and their count
   (none when they would be too many to draw). */
static inline int svg_tick_count(double low, double high, double step, double *first) {
    const double count = floor(high / step + 1e-9) - ceil(low / step) + 1.0;
    *first = ceil(low / step);
    return count >= 1.0 && count <= 200.0 ? (int)count : 0;
}

/* Ticks and labels under the frame; whole keeps the spacing at least 1 (for steps). */
static inline void svg_x_ticks(FILE *out, const svg_axes *axes, int whole) {
    const double raw = svg_tick_step(axes->x_max - axes->x_min, 2 + (int)((axes->right - axes->left) / 120.0));
    const double step = whole ? fmax(1.0, raw) : raw;
    const int decimals = svg_tick_decimals(step);
    double first;
    int i, count = svg_tick_count(axes->x_min, axes->x_max, step, &first);
    for (i = 0; i < count; i++) {
        const double v = (first + i) * step, x = svg_x(axes, v);
        char label[48];
        snprintf(label, sizeof label, "%.*f", decimals, fabs(v) < 1e-9 * step ? 0.0 : v);
        svg_line(out, x, axes->bottom, x, axes->bottom + 5, "#444", 1.0, NULL);
        svg_text(out, x, axes->bottom + 18, "middle", "", label);
    }
}

/* Ticks, labels and light grid lines across the frame. */
static inline void svg_y_ticks(FILE *out, const svg_axes *axes) {
    const double step = svg_tick_step(axes->y_max - axes->y_min, (int)((axes->bottom - axes->top) / 55.0));
    const int decimals = svg_tick_decimals(step);
    double first;
    int i, count = svg_tick_count(axes->y_min, axes->y_max, step, &first);
    for (i = 0; i < count; i++) {
        const double v = (first + i) * step, y = svg_y(axes, v);
        char label[48];
        snprintf(label, sizeof label, "%.*f", decimals, fabs(v) < 1e-9 * step ? 0.0 : v);
        svg_line(out, axes->left, y, axes->right, y, "#ddd", 1.0, NULL);
        svg_text(out, axes->left - 6, y + 4, "end", "", label);
    }
}

/* Names under the frame at x = 0, 1, ..., count - 1 (for categories). */
static inline void svg_category_ticks(FILE *out, const svg_axes *axes, const char *const *names, int count) {
    int i;
    for (i = 0; i < count; i++) svg_text(out, svg_x(axes, i), axes->bottom + 18, "middle", "", names[i]);
}

/* The axis names: x under the ticks, y turned along the left side. */
static inline void svg_axis_labels(FILE *out, const svg_axes *axes, const char *x_label, const char *y_label) {
    const double middle = 0.5 * (axes->top + axes->bottom), x = axes->left - 52;
    char turn[96];
    if (x_label) svg_text(out, 0.5 * (axes->left + axes->right), axes->bottom + 36, "middle", "", x_label);
    snprintf(turn, sizeof turn, "transform='rotate(-90 %.1f %.1f)'", x, middle);
    if (y_label) svg_text(out, x, middle, "middle", turn, y_label);
}

/* Frame, grid, ticks and axis names; x_label NULL leaves the x ticks to the caller. */
static inline void svg_draw_axes(FILE *out, const svg_axes *axes, const char *x_label, const char *y_label,
                                 int whole_x) {
    svg_y_ticks(out, axes);
    svg_rect(out, axes->left, axes->top, axes->right - axes->left, axes->bottom - axes->top, "none", "#444");
    if (x_label) svg_x_ticks(out, axes, whole_x);
    svg_axis_labels(out, axes, x_label, y_label);
}

/* ---- data drawn through the axes ---- */

/* A line through the points, broken where a value is not finite; a lone point gets a dot. */
static inline void svg_polyline(FILE *out, const svg_axes *axes, const double *x, const double *y, int count,
                                const char *color, const char *dash) {
    int i = 0;
    while (i < count) {
        int first, drawn = 0;
        for (; i < count && !(isfinite(x[i]) && isfinite(y[i])); i++) continue;
        first = i;
        for (; i < count && isfinite(x[i]) && isfinite(y[i]); i++) drawn++;
        if (drawn == 1)
            fprintf(out, "<circle cx='%.1f' cy='%.1f' r='3' fill='%s'/>\n", svg_x(axes, x[first]),
                    svg_y(axes, y[first]), color);
        if (drawn < 2) continue;
        fprintf(out, "<polyline fill='none' stroke='%s' stroke-width='2'", color);
        if (dash) fprintf(out, " stroke-dasharray='%s'", dash);
        fputs(" points='", out);
        for (; first < i; first++) fprintf(out, "%.1f,%.1f ", svg_x(axes, x[first]), svg_y(axes, y[first]));
        fputs("'/>\n", out);
    }
}

/* A shaded area between low and high over x (points with a value that is not finite are
   left out). */
static inline void svg_band(FILE *out, const svg_axes *axes, const double *x, const double *low, const double *high,
                            int count, const char *color, double opacity) {
    int i, drawn = 0;
    fprintf(out, "<path fill='%s' fill-opacity='%.2f' stroke='none' d='", color, opacity);
    for (i = 0; i < count; i++)
        if (isfinite(x[i]) && isfinite(low[i]) && isfinite(high[i]))
            fprintf(out, "%c%.1f %.1f ", drawn++ ? 'L' : 'M', svg_x(axes, x[i]), svg_y(axes, high[i]));
    for (i = count - 1; i >= 0; i--)
        if (isfinite(x[i]) && isfinite(low[i]) && isfinite(high[i]))
            fprintf(out, "L%.1f %.1f ", svg_x(axes, x[i]), svg_y(axes, low[i]));
    fputs(drawn ? "Z'/>\n" : "'/>\n", out);
}

/* The value bars grow from: 0 where the range holds it, else the nearer edge. */
static inline double svg_bar_base(const svg_axes *axes) {
    return axes->y_min > 0.0 ? axes->y_min : axes->y_max < 0.0 ? axes->y_max : 0.0;
}

/* A bar of value, centred offset pixels right of data x, width pixels wide. */
static inline void svg_bar(FILE *out, const svg_axes *axes, double x, double offset, double width, double value,
                           const char *color) {
    const double base = svg_y(axes, svg_bar_base(axes)), top = svg_y(axes, value);
    if (!isfinite(value)) return;
    svg_rect(out, svg_x(axes, x) + offset - 0.5 * width, fmin(base, top), width, fabs(base - top), color, "none");
}

/* A vertical bar from low to high with short caps, offset pixels right of data x. */
static inline void svg_error_bar(FILE *out, const svg_axes *axes, double x, double offset, double low, double high,
                                 const char *color) {
    const double px = svg_x(axes, x) + offset, y_low = svg_y(axes, low), y_high = svg_y(axes, high);
    if (!isfinite(low) || !isfinite(high) || low == high) return;
    svg_line(out, px, y_low, px, y_high, color, 1.2, NULL);
    svg_line(out, px - 3, y_low, px + 3, y_low, color, 1.2, NULL);
    svg_line(out, px - 3, y_high, px + 3, y_high, color, 1.2, NULL);
}

/* Characters in UTF-8 text (continuation bytes not counted), for sizing it. */
static inline int svg_text_length(const char *text) {
    int length = 0;
    for (; *text; text++) length += ((unsigned char)*text & 0xC0) != 0x80;
    return length;
}

/* The width in pixels of svg_legend's box for these names. */
static inline double svg_legend_width(const char *const *names, int count) {
    int i, longest = 0;
    for (i = 0; i < count; i++) longest = svg_text_length(names[i]) > longest ? svg_text_length(names[i]) : longest;
    return 44.0 + SVG_CHAR_WIDTH * longest;
}

/* A boxed legend with its top right corner at (right, top): a coloured line and a name per
   entry; dashes (NULL, or NULL entries, for solid) tell apart entries of one colour. */
static inline void svg_legend(FILE *out, double right, double top, const char *const *names, const char *const *colors,
                              const char *const *dashes, int count) {
    const double width = svg_legend_width(names, count);
    int i;
    if (count == 0) return;
    fprintf(out, "<rect x='%.1f' y='%.1f' width='%.1f' height='%d' fill='white' fill-opacity='0.85' stroke='#bbb'/>\n",
            right - width, top, width, 8 + 18 * count);
    for (i = 0; i < count; i++) {
        const double y = top + 17 + 18 * i;
        svg_line(out, right - width + 8, y - 4, right - width + 28, y - 4, colors[i], 3.0, dashes ? dashes[i] : NULL);
        svg_text(out, right - width + 34, y, "start", "", names[i]);
    }
}

/* Keeps what is drawn until svg_clip_end inside the axes' plotting area; id names the
   clip path and must be unique in the document. */
static inline void svg_clip_begin(FILE *out, const svg_axes *axes, const char *id) {
    fprintf(
        out,
        "<clipPath id='%s'><rect x='%.1f' y='%.1f' width='%.1f' height='%.1f'/></clipPath><g clip-path='url(#%s)'>\n",
        id, axes->left, axes->top, axes->right - axes->left, axes->bottom - axes->top, id);
}

static inline void svg_clip_end(FILE *out) { fputs("</g>\n", out); }

#endif
