/* The examples' data: a file read whole, or the reason it cannot be (missing, unreadable, a
   directory, empty); the digits CSV as images, or the line that is malformed and why; and
   IDX files (MNIST's format, Fashion-MNIST's) as images, or the file that is bad and why.
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

static inline int data_is_directory(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

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

/* ---- images: square, grey, 0..1, each with its class ---- */

#define DIGITS_SIDE 8 /* the digits CSV's images and the drawn ones */
#define DIGITS_PIXELS (DIGITS_SIDE * DIGITS_SIDE)
#define DIGITS_CLASSES 10

typedef struct dataset {
    float *pixels; /* [count][side * side] in 0..1 */
    int32_t *labels;
    int count, side; /* side 0 in an empty set: its first image's reader sets it */
    int room;        /* images the buffers hold */
} dataset;

static inline size_t dataset_pixels(const dataset *ds) { return (size_t)ds->side * (size_t)ds->side; }

/* Room for at least count images (the set's side set): 0 when memory runs out. */
static inline int dataset_reserve(dataset *ds, int count) {
    float *grown_pixels;
    int32_t *grown_labels;
    if (count <= ds->room) return 1;
    if ((size_t)count > ((size_t)-1) / sizeof(float) / dataset_pixels(ds)) return 0;
    grown_pixels = (float *)realloc(ds->pixels, sizeof(float) * dataset_pixels(ds) * (size_t)count);
    if (!grown_pixels) return 0;
    ds->pixels = grown_pixels;
    grown_labels = (int32_t *)realloc(ds->labels, sizeof(int32_t) * (size_t)count);
    if (!grown_labels) return 0;
    ds->labels = grown_labels;
    ds->room = count;
    return 1;
}

/* Adds an image of the set's side: 0 when memory runs out. */
static inline int dataset_add(dataset *ds, const float *pixels, int label) {
    if (ds->count == ds->room && !dataset_reserve(ds, ds->room + ds->room / 2 + 256)) return 0;
    memcpy(ds->pixels + (size_t)ds->count * dataset_pixels(ds), pixels, sizeof(float) * dataset_pixels(ds));
    ds->labels[ds->count++] = label;
    return 1;
}

static inline void dataset_free(dataset *ds) {
    free(ds->pixels), free(ds->labels);
    memset(ds, 0, sizeof *ds);
}

/* ---- the digits CSV: one image per line, 64 pixels of 0..16, then the class 0..9 ---- */

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

/* The images of a CSV's text (size bytes; NUL is no character of it) added to ds, empty or
   of 8 x 8 images: 1, or 0 with why (which names the line) for a malformed line or a text
   without images. */
static inline int digits_parse(const char *text, size_t size, dataset *ds, char *why, size_t cap) {
    const char *line = text, *end = text + size;
    long number = 1;
    char reason[128];
    if (ds->count == 0) ds->side = DIGITS_SIDE;
    if (ds->side != DIGITS_SIDE) {
        snprintf(why, cap, "digits are 8 x 8 images, the set's are %d x %d", ds->side, ds->side);
        return 0;
    }
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

/* ---- IDX files (MNIST's format): a big-endian header, then unsigned bytes ----
   Images: magic 0x00000803, then count, rows and columns, then the pixels row by row;
   labels: magic 0x00000801, then count, then a byte per image. */

#define IDX_IMAGES_MAGIC 0x00000803uL /* unsigned bytes in 3 dimensions */
#define IDX_LABELS_MAGIC 0x00000801uL /* unsigned bytes in 1 dimension */
#define IDX_SIDE_MAX 1024

static inline unsigned long idx_u32(const unsigned char *p) {
    return (unsigned long)p[0] << 24 | (unsigned long)p[1] << 16 | (unsigned long)p[2] << 8 | (unsigned long)p[3];
}

/* The dims dimensions of an IDX file's header (size bytes in all) into dim: 1, or 0 with
   why for another magic or a size other than the header's and its data's. */
static inline int idx_header(const unsigned char *bytes, size_t size, unsigned long magic, int dims, unsigned long *dim,
                             char *why, size_t cap) {
    const size_t header = 4 + 4 * (size_t)dims;
    double data = 1.0; /* exact wherever it could equal a size */
    char shape[64] = "";
    int i, used = 0;
    if (size < header) {
        snprintf(why, cap, "truncated: %lu bytes, shorter than its %lu-byte header", (unsigned long)size, (unsigned long)header);
        return 0;
    }
    if (idx_u32(bytes) != magic) {
        snprintf(why, cap, "bad magic 0x%08lx, not 0x%08lx (unsigned bytes in %d dimension%s)", idx_u32(bytes), magic, dims,
                 dims > 1 ? "s" : "");
        return 0;
    }
    for (i = 0; i < dims; i++) {
        dim[i] = idx_u32(bytes + 4 + 4 * i), data *= (double)dim[i];
        used += snprintf(shape + used, sizeof shape - (size_t)used, "%s%lu", i ? " x " : "", dim[i]);
    }
    if ((double)(size - header) != data) {
        snprintf(why, cap, "%s: %lu bytes, where its header's %s needs %.0f", (double)(size - header) < data ? "truncated" : "too long",
                 (unsigned long)size, shape, (double)header + data);
        return 0;
    }
    return 1;
}

/* An IDX file of images as a new set (ds empty): 1, or 0 with why. */
static inline int idx_parse_images(const unsigned char *bytes, size_t size, dataset *ds, char *why, size_t cap) {
    unsigned long dim[3];
    size_t i;
    if (!idx_header(bytes, size, IDX_IMAGES_MAGIC, 3, dim, why, cap)) return 0;
    if (dim[1] != dim[2]) {
        snprintf(why, cap, "images of %lu x %lu pixels, not square", dim[1], dim[2]);
        return 0;
    }
    if (dim[1] < 1 || dim[1] > IDX_SIDE_MAX || dim[0] < 1 || dim[0] > INT32_MAX) {
        snprintf(why, cap, "%lu images of %lu x %lu pixels: 1 or more of 1 to %d pixels a side expected", dim[0], dim[1],
                 dim[2], IDX_SIDE_MAX);
        return 0;
    }
    ds->side = (int)dim[1];
    if (!dataset_reserve(ds, (int)dim[0])) {
        snprintf(why, cap, "out of memory for %lu images", dim[0]);
        return 0;
    }
    ds->count = (int)dim[0];
    for (i = 0; i < (size_t)ds->count * dataset_pixels(ds); i++) ds->pixels[i] = (float)bytes[16 + i] / 255.0f;
    return 1;
}

/* An IDX file of labels, one for each of ds's images: 1, or 0 with why. */
static inline int idx_parse_labels(const unsigned char *bytes, size_t size, dataset *ds, const char *images, char *why,
                                   size_t cap) {
    unsigned long count;
    int i;
    if (!idx_header(bytes, size, IDX_LABELS_MAGIC, 1, &count, why, cap)) return 0;
    if (count != (unsigned long)ds->count) {
        snprintf(why, cap, "%lu labels for the %d images of %s", count, ds->count, images);
        return 0;
    }
    for (i = 0; i < ds->count; i++) {
        if (bytes[8 + i] >= DIGITS_CLASSES) {
            snprintf(why, cap, "label %d of image %d is not a class 0..%d", bytes[8 + i], i, DIGITS_CLASSES - 1);
            return 0;
        }
        ds->labels[i] = bytes[8 + i];
    }
    return 1;
}

/* The file name in the folder dir read whole, or NULL with why naming it. */
static inline unsigned char *idx_read(const char *dir, const char *name, size_t *size, char *why, size_t cap) {
    char path[4096], reason[256];
    const size_t length = strlen(dir);
    unsigned char *bytes;
    if (snprintf(path, sizeof path, "%s%s%s", dir, length && dir[length - 1] == '/' ? "" : "/", name) >= (int)sizeof path) {
        snprintf(why, cap, "%s: the path is too long", name);
        return NULL;
    }
    bytes = data_read_file(path, size, reason, sizeof reason);
    if (!bytes) snprintf(why, cap, "%s: %s", name, reason);
    return bytes;
}

/* The images and labels of the IDX files images and labels in dir as a new set (ds
   empty): 1, or 0 with why naming the file that is missing or bad; ds freed then. */
static inline int idx_load_pair(const char *dir, const char *images, const char *labels, dataset *ds, char *why,
                                size_t cap) {
    char reason[256];
    size_t size = 0;
    unsigned char *bytes = idx_read(dir, images, &size, why, cap);
    int ok = bytes && idx_parse_images(bytes, size, ds, reason, sizeof reason);
    if (bytes && !ok) snprintf(why, cap, "%s: %s", images, reason);
    free(bytes);
    if (ok) {
        bytes = idx_read(dir, labels, &size, why, cap);
        ok = bytes && idx_parse_labels(bytes, size, ds, images, reason, sizeof reason);
        if (bytes && !ok) snprintf(why, cap, "%s: %s", labels, reason);
        free(bytes);
    }
    if (!ok) dataset_free(ds);
    return ok;
}

/* The folder dir's IDX files as MNIST names them, split as they are: train-images-idx3-ubyte
   and train-labels-idx1-ubyte into train, t10k-* into test. 1, or 0 with why naming the
   file that is missing or bad, or the test images' side that is not the training images'. */
static inline int idx_load_split(const char *dir, dataset *train, dataset *test, char *why, size_t cap) {
    if (!idx_load_pair(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", train, why, cap)) return 0;
    if (!idx_load_pair(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", test, why, cap)) {
        dataset_free(train);
        return 0;
    }
    if (test->side == train->side) return 1;
    snprintf(why, cap, "t10k-images-idx3-ubyte: images of %d x %d pixels, the training images' are %d x %d", test->side,
             test->side, train->side, train->side);
    dataset_free(train), dataset_free(test);
    return 0;
}

#endif
