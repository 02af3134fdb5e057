/* The examples' data: a file read whole, or the reason it cannot be (missing, unreadable, a
   directory, empty), and the digits CSV as images, or the line that is malformed and why.
   A program trains on the data it carries only when --data names it (DATA_BUILTIN): a path
   that fails is an error, never a quiet switch to other data. */
#ifndef ACMOE_EXAMPLES_DATA_H
#define ACMOE_EXAMPLES_DATA_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define DATA_BUILTIN "builtin" /* --data's name for the data a program carries */

static inline int data_is_builtin(const char *path) { return !strcmp(path, DATA_BUILTIN); }

static inline unsigned char *data_fail(FILE *f, unsigned char *bytes, char *why, size_t cap, const char *reason) {
    snprintf(why, cap, "%s", reason);
    if (f) fclose(f);
    free(bytes);
    return NULL;
}

/* The bytes of the file at path, *size of them and a NUL after them, or NULL with the
   reason in why. Read in growing blocks, so pipes work too. */
static inline unsigned char *data_read_file(const char *path, size_t *size, char *why, size_t cap) {
    FILE *f = fopen(path, "rb");
    struct stat st;
    unsigned char *bytes = NULL;
    size_t have = 0, room = 0;
    if (!f) return data_fail(NULL, NULL, why, cap, strerror(errno));
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) return data_fail(f, NULL, why, cap, "is a directory");
    for (;;) {
        if (have + 1 >= room) {
            unsigned char *grown = room > ((size_t)-1) / 4 ? NULL : (unsigned char *)realloc(bytes, room * 2 + 65536);
            if (!grown) return data_fail(f, bytes, why, cap, "too large to hold in memory");
            bytes = grown, room = room * 2 + 65536;
        }
        have += fread(bytes + have, 1, room - 1 - have, f);
        if (ferror(f)) return data_fail(f, bytes, why, cap, strerror(errno));
        if (feof(f)) break;
    }
    fclose(f);
    if (have == 0) return data_fail(NULL, bytes, why, cap, "is empty");
    bytes[have] = '\0';
    *size = have;
    return bytes;
}

/* ---- the digits CSV: one image per line, 64 pixels of 0..16, then the class 0..9 ---- */

#define DIGITS_SIDE 8
#define DIGITS_PIXELS (DIGITS_SIDE * DIGITS_SIDE)
#define DIGITS_CLASSES 10

typedef struct dataset {
    float *pixels; /* [count][DIGITS_PIXELS] in 0..1 */
    int32_t *labels;
    int count;
} dataset;

/* 0 when memory runs out. */
static inline int dataset_add(dataset *ds, const float *pixels, int label) {
    if (ds->count % 256 == 0) {
        const size_t room = (size_t)ds->count + 256;
        float *grown_pixels = (float *)realloc(ds->pixels, sizeof(float) * DIGITS_PIXELS * room);
        int32_t *grown_labels;
        if (!grown_pixels) return 0;
        ds->pixels = grown_pixels;
        grown_labels = (int32_t *)realloc(ds->labels, sizeof(int32_t) * room);
        if (!grown_labels) return 0;
        ds->labels = grown_labels;
    }
    memcpy(ds->pixels + (size_t)ds->count * DIGITS_PIXELS, pixels, sizeof(float) * DIGITS_PIXELS);
    ds->labels[ds->count++] = label;
    return 1;
}

static inline void dataset_free(dataset *ds) {
    free(ds->pixels), free(ds->labels);
    memset(ds, 0, sizeof *ds);
}

static inline int digits_blank(char c) { return c == ' ' || c == '\t' || c == '\r'; }

/* The number at *p, blanks around it, at most max, up to a comma or the line's end at end;
   *p moves past them. DIGITS_COMMA or DIGITS_END for what ended it, or 0 with why. */
enum { DIGITS_COMMA = 1, DIGITS_END = 2 };
static inline int digits_read_value(const char **p, const char *end, int max, int *v, char *why, size_t cap) {
    const char *q = *p;
    int digits = 0;
    *v = 0;
    while (q < end && digits_blank(*q)) q++;
    for (; q < end && *q >= '0' && *q <= '9' && *v <= max; q++, digits++) *v = *v * 10 + (*q - '0');
    if (digits == 0) {
        snprintf(why, cap, "a number of 0 to %d expected, found %s", max, q == end ? "the line's end" : "other text");
        return 0;
    }
    if (*v > max) {
        snprintf(why, cap, "above %d", max);
        return 0;
    }
    while (q < end && digits_blank(*q)) q++;
    if (q < end && *q != ',') {
        snprintf(why, cap, "other text after a number");
        return 0;
    }
    *p = q < end ? q + 1 : q;
    return q < end ? DIGITS_COMMA : DIGITS_END;
}

/* The line [p, end) as an image: 1, 0 with why, or -1 for a blank line. */
static inline int digits_parse_line(const char *p, const char *end, float *pixels, int *label, char *why, size_t cap) {
    const char *q = p;
    char reason[96];
    int i, v, ended;
    while (q < end && digits_blank(*q)) q++;
    if (q == end) return -1;
    for (i = 0; i <= DIGITS_PIXELS; i++) {
        const int is_class = i == DIGITS_PIXELS;
        if (!(ended = digits_read_value(&p, end, is_class ? DIGITS_CLASSES - 1 : 16, &v, reason, sizeof reason))) {
            snprintf(why, cap, "value %d (%s): %s", i + 1, is_class ? "the class" : "a pixel", reason);
            return 0;
        }
        if (ended == DIGITS_END && !is_class) {
            snprintf(why, cap, "%d values, not %d pixels and a class", i + 1, DIGITS_PIXELS);
            return 0;
        }
        if (ended == DIGITS_COMMA && is_class) {
            snprintf(why, cap, "more than %d pixels and a class", DIGITS_PIXELS);
            return 0;
        }
        if (is_class) *label = v;
        else pixels[i] = (float)v / 16.0f;
    }
    return 1;
}

/* The images of a CSV's text (size bytes; NUL is no character of it) added to ds: 1, or 0
   with why (which names the line) for a malformed line or a text without images. */
static inline int digits_parse(const char *text, size_t size, dataset *ds, char *why, size_t cap) {
    const char *line = text, *end = text + size;
    long number = 1;
    char reason[128];
    for (; line < end; number++) {
        const char *stop = (const char *)memchr(line, '\n', (size_t)(end - line));
        float pixels[DIGITS_PIXELS];
        int label = 0, kind;
        if (!stop) stop = end;
        kind = digits_parse_line(line, stop, pixels, &label, reason, sizeof reason);
        if (kind == 0) {
            snprintf(why, cap, "line %ld: %s", number, reason);
            return 0;
        }
        if (kind == 1 && !dataset_add(ds, pixels, label)) {
            snprintf(why, cap, "out of memory at line %ld", number);
            return 0;
        }
        line = stop + 1;
    }
    if (ds->count == 0) snprintf(why, cap, "no images, only blank lines");
    return ds->count > 0;
}

/* The CSV at path as images: 1, or 0 with why. */
static inline int digits_load(const char *path, dataset *ds, char *why, size_t cap) {
    size_t size = 0;
    unsigned char *bytes = data_read_file(path, &size, why, cap);
    int ok = bytes && digits_parse((const char *)bytes, size, ds, why, cap);
    free(bytes);
    return ok;
}

#endif
