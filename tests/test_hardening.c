/* Hardening: bad options and sizes, NULL pointers, damaged and hostile checkpoint files,
   failing and racing writes, special files, every allocation failing in turn, and the
   training settings a checkpoint keeps. Each case pins one rule of the library's contract. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../acmoe.h"
#include "harness.h"

/* Everything these tests write goes into one folder, so leftover temporaries can be counted. */
#define WORK_DIR "build/hardening.d"
#define CKPT_NAME "model.safetensors"
#define CKPT WORK_DIR "/" CKPT_NAME

static void make_work_dir(void) {
    if (mkdir(WORK_DIR, 0777) != 0) CHECKF(errno == EEXIST, "mkdir %s: %s", WORK_DIR, strerror(errno));
}

/* The small model most cases use: 16 positions, 4 experts of width 6 over d_model 8. */
static acmoe_lm_desc small_desc(const char *pattern) {
    acmoe_lm_desc d;
    memset(&d, 0, sizeof d);
    d.vocab = 11, d.d_model = 8, d.n_heads = 2, d.seq_len = 16, d.batch = 2, d.pattern = pattern;
    d.d_ff = 6, d.n_experts = 4, d.top_k = 2, d.seed = 3;
    return d;
}

static acmoe_lm *small_model(const char *pattern, uint64_t seed) {
    acmoe_lm_desc d = small_desc(pattern);
    acmoe_lm *lm = NULL;
    d.seed = seed;
    CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
    return lm;
}

/* One forward and backward pass on a fixed batch, so the model has gradients. */
static void forward_backward(acmoe_lm *lm, acmoe_ctx *ctx) {
    int32_t tok[32], tgt[32];
    float loss;
    int i;
    for (i = 0; i < 32; i++) tok[i] = (i * 7) % 11, tgt[i] = (i * 5 + 3) % 11;
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 16, 1, &loss), ACMOE_OK);
    acmoe_lm_zero_grad(lm);
    CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
}

static int same_params(acmoe_lm *a, acmoe_lm *b) {
    const size_t n = acmoe_lm_param_count(a);
    return a && b && n == acmoe_lm_param_count(b) && memcmp(acmoe_lm_params(a), acmoe_lm_params(b), n * sizeof(float)) == 0;
}

/* Loads path and compares its parameters with want's. */
static int file_holds(const char *path, acmoe_lm *want) {
    acmoe_lm *got = NULL;
    int same = acmoe_lm_load(&got, path) == ACMOE_OK && same_params(got, want);
    acmoe_lm_destroy(got);
    return same;
}

/* ---- files in memory ---- */

typedef struct bytes {
    unsigned char *data;
    size_t size;
} bytes;

static bytes read_all(const char *path) {
    bytes b = {NULL, 0};
    FILE *f = fopen(path, "rb");
    long size;
    if (f && fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0) {
        b.data = (unsigned char *)malloc((size_t)size);
        b.size = fread(b.data, 1, (size_t)size, f);
    }
    if (f) fclose(f);
    CHECKF(b.size > 0, "cannot read %s", path);
    return b;
}

static void write_all(const char *path, const bytes *b) {
    FILE *f = fopen(path, "wb");
    CHECKF(f && fwrite(b->data, 1, b->size, f) == b->size, "cannot write %s", path);
    if (f) fclose(f);
}

static bytes copy_of(const bytes *b) {
    bytes c;
    c.size = b->size;
    c.data = (unsigned char *)malloc(b->size);
    memcpy(c.data, b->data, b->size);
    return c;
}

static int same_bytes(const bytes *a, const bytes *b) { return a->size == b->size && !memcmp(a->data, b->data, a->size); }

/* The checkpoint of a new small model of pattern, as saved. */
static bytes saved_checkpoint(const char *pattern) {
    acmoe_lm *lm = small_model(pattern, 3);
    bytes b = {NULL, 0};
    make_work_dir();
    CHECK_STATUS(acmoe_lm_save(lm, CKPT), ACMOE_OK);
    acmoe_lm_destroy(lm);
    b = read_all(CKPT);
    return b;
}

/* Writes b as the checkpoint file and loads it: the status; the model, if any, destroyed. */
static acmoe_status load_bytes(const bytes *b) {
    acmoe_lm *lm = NULL;
    acmoe_status s;
    write_all(CKPT, b);
    s = acmoe_lm_load(&lm, CKPT);
    CHECK((s == ACMOE_OK) == (lm != NULL));
    acmoe_lm_destroy(lm);
    return s;
}

/* ---- checkpoint surgery: safetensors is 8 bytes of header length, the header, the data ---- */

static size_t header_len(const bytes *b) {
    uint64_t len = 0;
    int i;
    for (i = 0; i < 8 && b->size >= 8; i++) len |= (uint64_t)b->data[i] << (8 * i);
    return (size_t)len;
}

static size_t data_start(const bytes *b) { return 8 + header_len(b); }

/* CRC-32C (Castagnoli, reflected, initial value and final xor all ones), bit by bit. */
static uint32_t crc32c(const unsigned char *p, size_t n) {
    uint32_t crc = 0xFFFFFFFFu;
    size_t i;
    int bit;
    for (i = 0; i < n; i++)
        for (crc ^= p[i], bit = 0; bit < 8; bit++) crc = crc & 1u ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
    return crc ^ 0xFFFFFFFFu;
}

/* Where the header's text `needle` starts, or NULL. */
static char *in_header(const bytes *b, const char *needle) {
    const size_t len = header_len(b), n = strlen(needle);
    size_t i;
    for (i = 8; i + n <= 8 + len; i++)
        if (!memcmp(b->data + i, needle, n)) return (char *)b->data + i;
    return NULL;
}

/* Replaces the header's first `from` with `to` and pads the header with spaces to a multiple
   of 8 bytes, as the writer does; 0 when `from` is not in the header. */
static int edit_header(bytes *b, const char *from, const char *to) {
    const size_t old_len = header_len(b), data = b->size - 8 - old_len, cut = strlen(from), put = strlen(to);
    char *at = in_header(b, from);
    size_t before, len, i;
    unsigned char *out;
    if (!at) return 0;
    before = (size_t)((unsigned char *)at - b->data);
    out = (unsigned char *)malloc(b->size + put + 8);
    memcpy(out, b->data, before);
    memcpy(out + before, to, put);
    memcpy(out + before + put, at + cut, 8 + old_len - before - cut);
    len = old_len - cut + put;
    while (len > 0 && out[8 + len - 1] == ' ') len--;
    while ((8 + len) % 8) out[8 + len++] = ' ';
    memcpy(out + 8 + len, b->data + 8 + old_len, data);
    for (i = 0; i < 8; i++) out[i] = (unsigned char)((uint64_t)len >> (8 * i));
    free(b->data);
    b->data = out;
    b->size = 8 + len + data;
    return 1;
}

/* Removes the metadata entry ,"key":"..." from the header; 0 when it is not there. */
static int remove_entry(bytes *b, const char *key) {
    char needle[80], entry[240];
    const char *at, *end;
    snprintf(needle, sizeof needle, ",\"%s\":\"", key);
    at = in_header(b, needle);
    if (!at || !(end = strchr(at + strlen(needle), '"')) || end - at + 2 > (long)sizeof entry) return 0;
    memcpy(entry, at, (size_t)(end - at + 1));
    entry[end - at + 1] = '\0';
    return edit_header(b, entry, "");
}

/* Writes the checksum of the data section into the header's data_crc32c. */
static void fix_crc(bytes *b) {
    char *at = in_header(b, "\"data_crc32c\":\""), hex[9];
    CHECK(at != NULL);
    if (!at) return;
    snprintf(hex, sizeof hex, "%08lx", (unsigned long)crc32c(b->data + data_start(b), b->size - data_start(b)));
    memcpy(at + strlen("\"data_crc32c\":\""), hex, 8);
}

/* Removes `cut` bytes at offset `at` of the data section and puts `put` zero bytes there. */
static void splice_data(bytes *b, size_t at, size_t cut, size_t put) {
    const size_t from = data_start(b) + at;
    unsigned char *out = (unsigned char *)calloc(b->size + put, 1);
    memcpy(out, b->data, from);
    memcpy(out + from + put, b->data + from + cut, b->size - from - cut);
    free(b->data);
    b->data = out;
    b->size = b->size - cut + put;
}

/* A tensor's data_offsets. */
static void tensor_offsets(const bytes *b, const char *name, unsigned long long *begin, unsigned long long *end) {
    char needle[80];
    const char *at;
    snprintf(needle, sizeof needle, "\"%s\":{", name);
    at = in_header(b, needle);
    *begin = *end = 0;
    at = at ? strstr(at, "\"data_offsets\":[") : NULL;
    CHECK(at && sscanf(at, "\"data_offsets\":[%llu,%llu]", begin, end) == 2);
}

/* Moves a tensor's data_offsets by delta bytes (negative: earlier). */
static int move_tensor(bytes *b, const char *name, long long delta) {
    unsigned long long begin, end;
    char from[80], to[80];
    tensor_offsets(b, name, &begin, &end);
    snprintf(from, sizeof from, "\"data_offsets\":[%llu,%llu]", begin, end);
    snprintf(to, sizeof to, "\"data_offsets\":[%llu,%llu]", begin + delta, end + delta);
    return edit_header(b, from, to);
}

/* Files named NAME.tmp... in dir: a save's temporaries left behind. */
static int temporaries(const char *dir, const char *name) {
    DIR *d = opendir(dir);
    struct dirent *e;
    const size_t len = strlen(name);
    int n = 0;
    while (d && (e = readdir(d)) != NULL)
        n += !strncmp(e->d_name, name, len) && !strncmp(e->d_name + len, ".tmp", 4);
    if (d) closedir(d);
    return n;
}

/* ---- child processes ---- */

/* Runs fn(arg) in a child process that is killed after `seconds`: its exit status, or -1
   when it died of a signal (a hang ends as SIGALRM). */
static int run_in_child(int (*fn)(void *), void *arg, unsigned seconds) {
    pid_t pid;
    int status;
    fflush(stdout), fflush(stderr);
    pid = fork();
    if (pid == 0) {
        alarm(seconds);
        _exit(fn(arg));
    }
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* A status as a child's exit code: 0 for ACMOE_OK, 8 for ACMOE_ERR_IO. */
static int exit_code(acmoe_status s) { return s > 0 ? 100 + s : -s; }

/* ==== A. A model's MoE sequence length is its own ==== */

/* Soft MoE groups follow the model's seq_len; another moe.seq_len overflowed the Soft MoE
   workspace on the first forward pass. Creation refuses it, and so does a checkpoint. */
static void test_moe_seq_len_is_the_models(void) {
    const char *patterns[2] = {"gmg", "gma"};
    const int wrong[3] = {1, 4, 17};
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    bytes good, bad;
    char to[40];
    int p, w;
    for (p = 0; p < 2; p++) {
        acmoe_lm_desc d = small_desc(patterns[p]);
        acmoe_lm *lm = NULL;
        for (w = 0; w < 3; w++) {
            d.moe.seq_len = wrong[w];
            CHECKF(acmoe_lm_create(&lm, &d) == ACMOE_ERR_ARG, "%s with moe.seq_len %d", patterns[p], wrong[w]);
            CHECK(lm == NULL);
            acmoe_lm_destroy(lm), lm = NULL; /* never run: it would write past its workspace */
        }
        for (w = 0; w <= 16; w += 16) { /* unset, or the model's own */
            d.moe.seq_len = w;
            CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
            if (lm) forward_backward(lm, ctx);
            acmoe_lm_destroy(lm), lm = NULL;
        }
    }
    good = saved_checkpoint("gmg");
    bad = copy_of(&good);
    CHECK(edit_header(&bad, "\"moe.seq_len\":\"16\"", "\"moe.seq_len\":\"16\"")); /* unchanged: loads */
    CHECK_STATUS(load_bytes(&bad), ACMOE_OK);
    for (w = 0; w < 3; w++) {
        free(bad.data);
        bad = copy_of(&good);
        snprintf(to, sizeof to, "\"moe.seq_len\":\"%d\"", wrong[w]);
        CHECK(edit_header(&bad, "\"moe.seq_len\":\"16\"", to));
        CHECKF(load_bytes(&bad) == ACMOE_ERR_FORMAT, "a checkpoint with moe.seq_len %d", wrong[w]);
    }
    free(good.data), free(bad.data);
    acmoe_ctx_destroy(ctx);
}

/* ==== B. Sizes ==== */

typedef struct size_case {
    int batch, seq_len, d_model, n_heads, vocab, d_ff, n_experts;
} size_case;

/* Descriptors whose size products overflow an int or exceed the limits: ACMOE_ERR_SHAPE,
   no model, no crash, no signed overflow (the sanitizer build checks that). */
static void test_sizes_that_overflow(void) {
    const size_case cases[] = {
        {1 << 20, 1 << 20, 8, 2, 11, 6, 4}, {2, 16, 1 << 30, 2, 11, 6, 4},     {2, 16, 1 << 10, 2, 1 << 30, 6, 4},
        {INT_MAX, INT_MAX, 8, 2, 11, 6, 4}, {2, INT_MAX, 8, 2, 11, 6, 4},      {INT_MAX, 1, 8, 2, 11, 6, 4},
        {2, 16, 1 << 16, 1, 1 << 16, 6, 4}, {2, 16, 8, 2, 11, 1 << 30, 4},     {2, 16, 8, 2, 11, 6, 1 << 30},
        {2, 16, 8, 2, INT_MAX, 6, 4},       {1 << 12, 1 << 12, 1 << 12, 1, 11, 6, 4},
    };
    int i;
    for (i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) {
        const size_case *c = &cases[i];
        acmoe_lm_desc d = small_desc("gmc");
        acmoe_lm *lm = NULL;
        d.batch = c->batch, d.seq_len = c->seq_len, d.d_model = c->d_model, d.n_heads = c->n_heads;
        d.vocab = c->vocab, d.d_ff = c->d_ff, d.n_experts = c->n_experts;
        CHECKF(acmoe_lm_create(&lm, &d) == ACMOE_ERR_SHAPE, "case %d: batch %d seq %d d_model %d vocab %d d_ff %d experts %d",
               i, c->batch, c->seq_len, c->d_model, c->vocab, c->d_ff, c->n_experts);
        CHECK(lm == NULL);
        acmoe_lm_destroy(lm);
    }
}

/* Layer options that multiply into huge sizes, and a vision encoder's: refused, no model. */
static void test_sizes_of_options(void) {
    acmoe_moe_desc m;
    acmoe_moe *layer = NULL;
    float p[4], g[4];
    int i;
    for (i = 0; i < 4; i++) {
        acmoe_lm_desc d = small_desc(i == 1 ? "gx" : "gm");
        acmoe_lm *lm = NULL;
        acmoe_status s;
        if (i == 0) d.moe.soft_slots = 1 << 30;
        if (i == 1) d.moe.proj_dim = 1 << 30;
        if (i == 2) d.n_classes = 4, d.patch_dim = 1 << 30;
        if (i == 3) d.n_classes = 1 << 30, d.patch_dim = 3;
        s = acmoe_lm_create(&lm, &d);
        CHECKF(s == ACMOE_ERR_SHAPE || s == ACMOE_ERR_ARG, "case %d: %s", i, acmoe_status_string(s));
        CHECK(lm == NULL);
        acmoe_lm_destroy(lm);
    }
    memset(&m, 0, sizeof m);
    m.d_model = 1 << 30, m.d_ff = 1 << 30, m.n_experts = 4, m.max_tokens = 1 << 30;
    CHECK(acmoe_moe_param_count(&m) == 0);
    CHECK(acmoe_moe_create(&layer, &m, p, g) != ACMOE_OK && layer == NULL);
}

/* A model whose step counter is full refuses another step and keeps its parameters (the
   counter is set through a checkpoint's "step"). */
static void test_step_counter_full(void) {
    bytes b = saved_checkpoint("gfc");
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_lm *lm = NULL;
    float *before;
    char to[48];
    size_t n;
    snprintf(to, sizeof to, "\"step\":\"%ld\"", LONG_MAX - 1);
    CHECK(edit_header(&b, "\"step\":\"0\"", to));
    write_all(CKPT, &b);
    CHECK_STATUS(acmoe_lm_load(&lm, CKPT), ACMOE_OK);
    if (lm) {
        n = acmoe_lm_param_count(lm);
        before = (float *)malloc(n * sizeof(float));
        forward_backward(lm, ctx);
        CHECK_STATUS(acmoe_lm_step(lm, ctx, NULL, NULL), ACMOE_OK);
        CHECK(acmoe_lm_steps_taken(lm) == LONG_MAX);
        memcpy(before, acmoe_lm_params(lm), n * sizeof(float));
        CHECK(acmoe_lm_step(lm, ctx, NULL, NULL) < 0);
        CHECK(acmoe_lm_steps_taken(lm) == LONG_MAX && !memcmp(before, acmoe_lm_params(lm), n * sizeof(float)));
        free(before);
    }
    acmoe_lm_destroy(lm);
    free(b.data);
    acmoe_ctx_destroy(ctx);
}

/* ==== C. Checkpoint format acmoe-lm-4 ==== */

/* data_crc32c is the CRC-32C of the data section in 8 lowercase hex digits, and one flipped
   bit anywhere in the data is refused. */
static void test_checkpoint_checksum(void) {
    bytes good = saved_checkpoint("gfc"), bad;
    const char *at = in_header(&good, "\"data_crc32c\":\"");
    const size_t start = data_start(&good), size = good.size - start;
    char want[32];
    size_t i, flips = 0, refused = 0;
    CHECK(crc32c((const unsigned char *)"123456789", 9) == 0xE3069283u); /* the standard check value */
    snprintf(want, sizeof want, "\"data_crc32c\":\"%08lx\"", (unsigned long)crc32c(good.data + start, size));
    CHECKF(at && !memcmp(at, want, strlen(want)), "want %s", want);
    bad = copy_of(&good);
    for (i = 0; i < size; i = i + 97 < size || i + 1 == size ? i + 97 : size - 1) { /* ... and the last byte */
        bad.data[start + i] ^= (unsigned char)(1u << (i % 8));
        refused += load_bytes(&bad) == ACMOE_ERR_FORMAT, flips++;
        bad.data[start + i] ^= (unsigned char)(1u << (i % 8));
    }
    CHECKF(refused == flips, "%lu of %lu flipped bits refused", (unsigned long)refused, (unsigned long)flips);
    CHECK_STATUS(load_bytes(&bad), ACMOE_OK);
    free(good.data), free(bad.data);
}

/* The tensors must tile the data exactly: overlapping offsets, a gap or trailing bytes are
   refused even with the checksum made right. */
static void test_checkpoint_tiling(void) {
    bytes good = saved_checkpoint("gfc"), b;
    unsigned long long m0, m1, v0, v1;
    char from[80], to[80];
    int edit;
    tensor_offsets(&good, "optimizer.adam_m", &m0, &m1);
    tensor_offsets(&good, "optimizer.adam_v", &v0, &v1);
    CHECK(m1 == v0 && data_start(&good) + v1 == good.size);
    for (edit = 0; edit < 6; edit++) {
        b = copy_of(&good);
        if (edit == 1) { /* adam_v over adam_m, the file as long as the rest */
            snprintf(from, sizeof from, "\"data_offsets\":[%llu,%llu]", v0, v1);
            snprintf(to, sizeof to, "\"data_offsets\":[%llu,%llu]", m0, m1);
            CHECK(edit_header(&b, from, to));
            splice_data(&b, v0, v1 - v0, 0);
        }
        if (edit == 2) { /* adam_v over the last float of adam_m */
            CHECK(move_tensor(&b, "optimizer.adam_v", -4));
            splice_data(&b, v1 - 4, 4, 0);
        }
        if (edit == 3) { /* a gap of one float before adam_v */
            CHECK(move_tensor(&b, "optimizer.adam_v", 4));
            splice_data(&b, v0, 0, 4);
        }
        if (edit == 4) splice_data(&b, v1, 0, 4); /* a trailing float */
        if (edit == 5) splice_data(&b, v1, 0, 1); /* a trailing byte */
        fix_crc(&b);
        CHECKF(load_bytes(&b) == (edit ? ACMOE_ERR_FORMAT : ACMOE_OK), "edit %d", edit);
        free(b.data);
    }
    free(good.data);
}

typedef struct header_edit {
    const char *from, *to;
} header_edit;

/* Repeated metadata keys or tensor names, unknown keys or tensors, and numbers not written
   as the writer writes them are refused; the same edits with the writer's text load. */
static void test_checkpoint_header_entries(void) {
    const header_edit edits[] = {
        {"\"pattern\":\"gfc\"", "\"pattern\":\"gfc\",\"pattern\":\"gfc\""},
        {"\"seed\":\"3\"", "\"seed\":\"3\",\"seed\":\"4\""},
        {"\"optimizer.adam_m\"", "\"optimizer.adam_v\""},
        {"\"format\":\"acmoe-lm-4\"", "\"format\":\"acmoe-lm-4\",\"colour\":\"blue\""},
        {"\"format\":\"acmoe-lm-4\"", "\"format\":\"acmoe-lm-4\",\"optim.momentum\":\"0.9\""},
        {"\"contents\":\"training\"", "\"contents\":\"weights\""},
        {"\"contents\":\"training\"", "\"contents\":\"everything\""},
        {"\"activation\":\"relu\"", "\"activation\":\"0\""},
        {"\"activation\":\"relu\"", "\"activation\":\"ReLU\""},
        {"\"moe.ac.scaling\":\"per-feature\"", "\"moe.ac.scaling\":\"per-feature \""},
        {"\"moe.ac_max_clusters\":\"4\"", "\"moe.ac_max_clusters\":\"2000000\""},
        {"\"dtype\":\"F32\"", "\"dtype\":\"F32\",\"extra\":\"1\""},
        {",\"optimizer.adam_m\"", ",\"bogus\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},\"optimizer.adam_m\""},
        {"\"seq_len\":\"16\"", "\"seq_len\":\"016\""},
        {"\"seq_len\":\"16\"", "\"seq_len\":\"+16\""},
        {"\"seq_len\":\"16\"", "\"seq_len\":\" 16\""},
        {"\"seq_len\":\"16\"", "\"seq_len\":\"16 \""},
        {"\"seq_len\":\"16\"", "\"seq_len\":\"16.0\""},
        {"\"seq_len\":\"16\"", "\"seq_len\":\"1.6e1\""},
        {"\"seq_len\":\"16\"", "\"seq_len\":\"0x10\""},
        {"\"seq_len\":\"16\"", "\"seq_len\":\"\""},
        {"\"step\":\"0\"", "\"step\":\"00\""},
        {"\"step\":\"0\"", "\"step\":\"-0\""},
        {"\"seed\":\"3\"", "\"seed\":\"03\""},
        {"\"dropout\":\"0\"", "\"dropout\":\"0.0\""},
        {"\"dropout\":\"0\"", "\"dropout\":\"0e0\""},
        {"\"dropout\":\"0\"", "\"dropout\":\"nan\""},
        {"\"data_crc32c\":\"", "\"data_crc32c\":\"0"},
    };
    bytes good = saved_checkpoint("gfc"), b;
    int i;
    for (i = 0; i < (int)(sizeof edits / sizeof edits[0]); i++) {
        b = copy_of(&good);
        CHECKF(edit_header(&b, edits[i].from, edits[i].from), "%s not in the header", edits[i].from); /* the writer's own text loads */
        CHECK_STATUS(load_bytes(&b), ACMOE_OK);
        CHECKF(edit_header(&b, edits[i].from, edits[i].to), "%s not in the header", edits[i].from);
        CHECKF(load_bytes(&b) == ACMOE_ERR_FORMAT, "%s loaded", edits[i].to);
        free(b.data);
    }
    free(good.data);
}

/* A header that describes a huge model in a small file is refused before the model is
   allocated: the whole load asks for less than 1 MB. */
static void test_checkpoint_huge_claim(void) {
    const header_edit edits[] = {
        {"\"vocab\":\"11\"", "\"vocab\":\"4194304\""},
        {"\"d_model\":\"8\"", "\"d_model\":\"16384\""},
        {"\"seq_len\":\"16\",", "\"seq_len\":\"1048576\","},
        {"\"n_experts\":\"4\"", "\"n_experts\":\"65536\""},
        {"\"d_ff\":\"6\"", "\"d_ff\":\"1048576\""},
        {"\"tok_emb.weight\":{\"dtype\":\"F32\",\"shape\":[11,8]", "\"tok_emb.weight\":{\"dtype\":\"F32\",\"shape\":[4194304,8]"},
    };
    bytes good = saved_checkpoint("gfc"), b;
    int i;
    for (i = 0; i < (int)(sizeof edits / sizeof edits[0]); i++) {
        unsigned long before;
        acmoe_status s;
        b = copy_of(&good);
        CHECKF(edit_header(&b, edits[i].from, edits[i].to), "%s not in the header", edits[i].from);
        before = test_allocated_bytes;
        s = load_bytes(&b);
        CHECKF(s == ACMOE_ERR_FORMAT, "%s: %s", edits[i].to, acmoe_status_string(s));
        CHECKF(test_allocated_bytes - before < (1ul << 20), "%s: %lu bytes requested", edits[i].to,
               test_allocated_bytes - before);
        free(b.data);
    }
    free(good.data);
}

/* Floats as formats 2 and 3 wrote them, with 9 significant digits. */
static void nine_digit_floats(bytes *b) {
    int table, i, count[2];
    const acmoe_option *options[2];
    options[0] = acmoe_model_options(&count[0]), options[1] = acmoe_optim_options(&count[1]);
    for (table = 0; table < 2; table++) {
        for (i = 0; i < count[table]; i++) {
            char from[96], to[96], *at, *end;
            if (options[table][i].type != ACMOE_OPTION_FLOAT) continue;
            snprintf(from, sizeof from, "\"%s\":\"", options[table][i].key);
            at = in_header(b, from);
            if (!at || !(end = strchr(at + strlen(from), '"')) || end - at >= 80) continue;
            memcpy(from, at, (size_t)(end - at + 1));
            from[end - at + 1] = '\0';
            snprintf(to, sizeof to, "\"%s\":\"%.9g\"", options[table][i].key,
                     (double)strtof(at + strlen(options[table][i].key) + 4, NULL));
            CHECK(edit_header(b, from, to));
        }
    }
}

/* Layer 1 of small_desc's model, dense, as formats 2 and 3 stored it: a one-expert MoE
   layer with a router (its tensors at the end of the data). */
static void legacy_dense_layer(bytes *b) {
    static const struct {
        const char *from, *to;
    } names[] = {
        {"\"layers.1.ffn.w1\":{\"dtype\":\"F32\",\"shape\":[6,8]", "\"layers.1.moe.experts.w1\":{\"dtype\":\"F32\",\"shape\":[1,6,8]"},
        {"\"layers.1.ffn.b1\":{\"dtype\":\"F32\",\"shape\":[6]", "\"layers.1.moe.experts.b1\":{\"dtype\":\"F32\",\"shape\":[1,6]"},
        {"\"layers.1.ffn.w2\":{\"dtype\":\"F32\",\"shape\":[8,6]", "\"layers.1.moe.experts.w2\":{\"dtype\":\"F32\",\"shape\":[1,8,6]"},
        {"\"layers.1.ffn.b2\":{\"dtype\":\"F32\",\"shape\":[8]", "\"layers.1.moe.experts.b2\":{\"dtype\":\"F32\",\"shape\":[1,8]"},
    };
    const size_t end = b->size - data_start(b);
    char router[256];
    int i;
    for (i = 0; i < 4; i++) CHECKF(edit_header(b, names[i].from, names[i].to), "%s", names[i].from);
    splice_data(b, end, 0, 9 * 4);
    snprintf(router, sizeof router,
             ",\"layers.1.moe.router.weight\":{\"dtype\":\"F32\",\"shape\":[1,8],\"data_offsets\":[%lu,%lu]},"
             "\"layers.1.moe.router.bias\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[%lu,%lu]},\"optimizer.adam_m\"",
             (unsigned long)end, (unsigned long)end + 32, (unsigned long)end + 32, (unsigned long)end + 36);
    CHECK(edit_header(b, ",\"optimizer.adam_m\"", router));
}

/* The acmoe-lm-4 header of a model without AC weights as format acmoe-lm-3 wrote it: no
   contents entry, enum values as numbers. */
static void to_format_3(bytes *b) {
    static const struct {
        const char *from, *to;
    } enums[] = {
        {"\"activation\":\"relu\"", "\"activation\":\"0\""},
        {"\"moe.group\":\"position\"", "\"moe.group\":\"3\""},
        {"\"moe.ac.scaling\":\"per-feature\"", "\"moe.ac.scaling\":\"1\""},
        {"\"moe.ac.dispersion\":\"mad\"", "\"moe.ac.dispersion\":\"1\""},
        {"\"moe.soft_input\":\"raw\"", "\"moe.soft_input\":\"0\""},
        {"\"optim.schedule\":\"constant\"", "\"optim.schedule\":\"0\""},
    };
    int i;
    CHECK(!in_header(b, "ac_weights"));
    CHECK(edit_header(b, "\"format\":\"acmoe-lm-4\"", "\"format\":\"acmoe-lm-3\""));
    CHECK(remove_entry(b, "contents"));
    for (i = 0; i < (int)(sizeof enums / sizeof enums[0]); i++) CHECKF(edit_header(b, enums[i].from, enums[i].to), "%s", enums[i].from);
    nine_digit_floats(b);
    if (in_header(b, "\"layers.1.ffn.w1\"")) legacy_dense_layer(b);
    fix_crc(b);
}

/* ... and as format acmoe-lm-2 wrote it: no checksum or training options, groups counted
   from the whole call. */
static void to_format_2(bytes *b) {
    static const char *const keys[] = {"data_crc32c", "train.seed", "optim.lr", "optim.beta1", "optim.beta2",
                                       "optim.eps", "optim.weight_decay", "optim.clip_norm", "optim.warmup_steps",
                                       "optim.schedule", "optim.total_steps", "optim.min_lr", "optim.sgd",
                                       "moe.soft_input", "moe.mix_k", "moe.no_router_bias",
                                       "moe.no_reprojection", "moe.gate_noise", "moe.importance_loss",
                                       "window"};
    int i;
    to_format_3(b);
    CHECK(edit_header(b, "\"format\":\"acmoe-lm-3\"", "\"format\":\"acmoe-lm-2\""));
    CHECK(edit_header(b, "\"moe.group\":\"3\"", "\"moe.group\":\"2\""));
    for (i = 0; i < (int)(sizeof keys / sizeof keys[0]); i++) CHECKF(remove_entry(b, keys[i]), "%s", keys[i]);
}

/* Files of the previous format still load, with their parameters and no training settings. */
static void test_checkpoint_format_2_loads(void) {
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_lm *lm = small_model("gfx", 5), *loaded = NULL; /* no AC weights: formats 2 and 3 had none */
    acmoe_optim_desc o;
    bytes b;
    memset(&o, 0, sizeof o);
    o.lr = 1e-2f;
    make_work_dir();
    forward_backward(lm, ctx);
    CHECK_STATUS(acmoe_lm_step(lm, ctx, &o, NULL), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_save(lm, CKPT), ACMOE_OK);
    b = read_all(CKPT);
    to_format_3(&b);
    write_all(CKPT, &b);
    CHECK_STATUS(acmoe_lm_load(&loaded, CKPT), ACMOE_OK);
    if (loaded) {
        acmoe_train_desc t = acmoe_lm_train_settings(loaded);
        CHECK(same_params(lm, loaded) && acmoe_lm_steps_taken(loaded) == 1 && t.optim.lr == 1e-2f);
        acmoe_lm_destroy(loaded);
        loaded = NULL;
    }
    free(b.data);
    CHECK_STATUS(acmoe_lm_save(lm, CKPT), ACMOE_OK);
    b = read_all(CKPT);
    to_format_2(&b);
    CHECK(!in_header(&b, "\"optim.") && !in_header(&b, "crc"));
    write_all(CKPT, &b);
    CHECK_STATUS(acmoe_lm_load(&loaded, CKPT), ACMOE_OK);
    if (loaded) {
        acmoe_train_desc t = acmoe_lm_train_settings(loaded);
        CHECK(same_params(lm, loaded) && acmoe_lm_steps_taken(loaded) == 1);
        CHECK(t.seed == 0 && t.optim.lr == 0.0f && t.optim.beta2 == 0.0f);
    }
    CHECK(edit_header(&b, "\"format\":\"acmoe-lm-2\"", "\"format\":\"acmoe-lm-1\""));
    CHECK_STATUS(load_bytes(&b), ACMOE_ERR_FORMAT);
    free(b.data);
    acmoe_lm_destroy(lm), acmoe_lm_destroy(loaded);
    acmoe_ctx_destroy(ctx);
}

/* ==== D. Saving ==== */

/* A model with a non-finite parameter or Adam moment is not saved: the file at the path
   stays as it was, and no new file appears. */
static void test_save_refuses_nonfinite(void) {
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_lm *lm = small_model("gfc", 3);
    const float bad_values[3] = {NAN, INFINITY, -INFINITY};
    float *p = acmoe_lm_params(lm), *g = acmoe_lm_grads(lm), kept;
    bytes before, after;
    size_t i, n = acmoe_lm_param_count(lm);
    int v, finite = 1;
    make_work_dir();
    remove(WORK_DIR "/never.safetensors");
    CHECK_STATUS(acmoe_lm_save(lm, CKPT), ACMOE_OK);
    before = read_all(CKPT);
    for (v = 0; v < 3; v++) {
        kept = p[n / 2], p[n / 2] = bad_values[v];
        CHECK_STATUS(acmoe_lm_save(lm, CKPT), ACMOE_ERR_NONFINITE);
        CHECK_STATUS(acmoe_lm_save(lm, WORK_DIR "/never.safetensors"), ACMOE_ERR_NONFINITE);
        p[n / 2] = kept;
    }
    /* squares of huge gradients overflow the second moment; the parameters stay finite */
    forward_backward(lm, ctx);
    for (i = 0; i < n; i++) g[i] = 1e30f;
    CHECK_STATUS(acmoe_lm_step(lm, ctx, NULL, NULL), ACMOE_OK);
    for (i = 0; i < n; i++) finite &= isfinite(p[i]) != 0;
    CHECK(finite);
    CHECK_STATUS(acmoe_lm_save(lm, CKPT), ACMOE_ERR_NONFINITE);
    after = read_all(CKPT);
    CHECK(same_bytes(&before, &after));
    CHECK(access(WORK_DIR "/never.safetensors", F_OK) != 0);
    CHECK(temporaries(WORK_DIR, CKPT_NAME) == 0 && temporaries(WORK_DIR, "never.safetensors") == 0);
    free(before.data), free(after.data);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

/* In a child whose files may not grow past half a checkpoint: save another model over CKPT. */
static int save_under_size_limit(void *arg) {
    const bytes *old = (const bytes *)arg;
    struct rlimit limit;
    acmoe_lm *other = small_model("gfc", 99);
    acmoe_status s = ACMOE_ERR_NOMEM;
    signal(SIGXFSZ, SIG_IGN); /* a write past the limit fails with EFBIG instead of killing */
    limit.rlim_cur = limit.rlim_max = (rlim_t)(old->size / 2);
    if (other && setrlimit(RLIMIT_FSIZE, &limit) == 0) s = acmoe_lm_save(other, CKPT);
    acmoe_lm_destroy(other);
    return exit_code(s);
}

/* A save that runs out of file size fails with ACMOE_ERR_IO and leaves the previous
   checkpoint, loadable and the same, and no temporary. */
static void test_save_file_size_limit(void) {
    acmoe_lm *lm = small_model("gfc", 3);
    bytes before, after;
    int code;
    make_work_dir();
    CHECK_STATUS(acmoe_lm_save(lm, CKPT), ACMOE_OK);
    before = read_all(CKPT);
    code = run_in_child(save_under_size_limit, &before, 60);
    CHECKF(code == exit_code(ACMOE_ERR_IO), "the save in the child ended with %d", code);
    after = read_all(CKPT);
    CHECK(same_bytes(&before, &after) && file_holds(CKPT, lm));
    CHECK(temporaries(WORK_DIR, CKPT_NAME) == 0);
    free(before.data), free(after.data);
    acmoe_lm_destroy(lm);
}

/* Links planted at the names a save might use point at a victim file and at a file that does
   not exist yet: the save succeeds, writes through none of them, and leaves them be. */
static void test_save_ignores_planted_links(void) {
    enum { n_links = 6 };
    acmoe_lm *lm = small_model("gfc", 3);
    char links[n_links][128];
    const char *victim = WORK_DIR "/victim", *absent = WORK_DIR "/created-through-a-link";
    const char *targets[2] = {"victim", "created-through-a-link"}; /* relative to the links' folder */
    const bytes precious = {(unsigned char *)"precious", 8};
    bytes after;
    int i;
    make_work_dir();
    write_all(victim, &precious);
    remove(absent), remove(CKPT);
    snprintf(links[0], sizeof links[0], "%s.tmp", CKPT);
    for (i = 1; i < n_links; i++) snprintf(links[i], sizeof links[i], "%s.tmp-%ld-%d", CKPT, (long)getpid(), i - 1);
    for (i = 0; i < n_links; i++) {
        remove(links[i]);
        CHECKF(symlink(targets[i % 2], links[i]) == 0, "symlink %s: %s", links[i], strerror(errno));
    }
    CHECK_STATUS(acmoe_lm_save(lm, CKPT), ACMOE_OK);
    after = read_all(victim);
    CHECK(same_bytes(&precious, &after));
    CHECK(access(absent, F_OK) != 0 && file_holds(CKPT, lm));
    for (i = 0; i < n_links; i++) CHECKF(remove(links[i]) == 0, "%s is gone", links[i]);
    CHECK(temporaries(WORK_DIR, CKPT_NAME) == 0);
    free(after.data);
    remove(victim);
    acmoe_lm_destroy(lm);
}

enum { concurrent_saves = 25 };

static int save_repeatedly(void *arg) {
    acmoe_lm *lm = (acmoe_lm *)arg;
    int i;
    for (i = 0; i < concurrent_saves; i++) {
        acmoe_status s = acmoe_lm_save(lm, CKPT);
        if (s != ACMOE_OK) return exit_code(s);
    }
    return 0;
}

/* Two processes save different models to one path at once while this one loads it: every
   load finds a whole checkpoint, the last file is one of the two, and no temporary is left. */
static void test_save_two_writers(void) {
    acmoe_lm *models[2];
    pid_t pids[2];
    int i, status, running = 2, loads = 0, bad_loads = 0;
    make_work_dir();
    models[0] = small_model("gfc", 3), models[1] = small_model("gfc", 4);
    CHECK_STATUS(acmoe_lm_save(models[0], CKPT), ACMOE_OK);
    fflush(stdout), fflush(stderr);
    for (i = 0; i < 2; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            alarm(120);
            _exit(save_repeatedly(models[i]));
        }
        CHECK(pids[i] > 0);
    }
    while (running) {
        acmoe_lm *got = NULL;
        acmoe_status s = acmoe_lm_load(&got, CKPT);
        loads++;
        bad_loads += s != ACMOE_OK || !(same_params(got, models[0]) || same_params(got, models[1]));
        acmoe_lm_destroy(got);
        for (i = 0; i < 2; i++) {
            if (pids[i] > 0 && waitpid(pids[i], &status, WNOHANG) == pids[i]) {
                CHECKF(WIFEXITED(status) && WEXITSTATUS(status) == 0, "writer %d ended with status %d", i, status);
                pids[i] = 0, running--;
            }
            if (pids[i] < 0) pids[i] = 0, running--;
        }
    }
    CHECKF(bad_loads == 0, "%d of %d loads during the saves failed", bad_loads, loads);
    CHECK(file_holds(CKPT, models[0]) || file_holds(CKPT, models[1]));
    CHECK(temporaries(WORK_DIR, CKPT_NAME) == 0);
    acmoe_lm_destroy(models[0]), acmoe_lm_destroy(models[1]);
}

/* Saving into a read-only folder, as a user the folder's permissions bind. */
static int save_into_read_only(void *arg) {
    const char *path = (const char *)arg;
    acmoe_lm *lm;
    int code;
    if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) return 98; /* root ignores permissions */
    lm = small_model("gfc", 3);
    code = lm ? exit_code(acmoe_lm_save(lm, path)) : 99;
    acmoe_lm_destroy(lm);
    return code;
}

/* A folder that is missing, read-only, or a path that is a folder or empty: ACMOE_ERR_IO. */
static void test_save_bad_places(void) {
    char folder[] = "/tmp/acmoe-read-only-XXXXXX", path[64];
    acmoe_lm *lm = small_model("gfc", 3);
    int code;
    make_work_dir();
    CHECK_STATUS(acmoe_lm_save(lm, WORK_DIR "/no/such/folder/x.safetensors"), ACMOE_ERR_IO);
    CHECK_STATUS(acmoe_lm_save(lm, WORK_DIR), ACMOE_ERR_IO);
    CHECK_STATUS(acmoe_lm_save(lm, ""), ACMOE_ERR_IO);
    CHECK(temporaries("build", "hardening.d") == 0);
    CHECK(mkdtemp(folder) != NULL && chmod(folder, 0555) == 0);
    snprintf(path, sizeof path, "%s/x.safetensors", folder);
    code = run_in_child(save_into_read_only, path, 60);
    CHECKF(code == exit_code(ACMOE_ERR_IO), "the save in the child ended with %d", code);
    CHECK(access(path, F_OK) != 0 && rmdir(folder) == 0);
    acmoe_lm_destroy(lm);
}

/* ==== E. Optimizer options ==== */

/* Each bad option is ACMOE_ERR_ARG with the parameters and the step count unchanged. */
static void test_step_refuses_bad_options(void) {
    enum { n_cases = 27 };
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_lm *lm = small_model("gfc", 3);
    acmoe_optim_desc o[n_cases];
    acmoe_train_desc t;
    acmoe_corpus c;
    static unsigned char text[300];
    const size_t n = acmoe_lm_param_count(lm);
    float *before = (float *)malloc(n * sizeof(float));
    int i;
    memset(o, 0, sizeof o);
    o[0].lr = INFINITY, o[1].lr = NAN, o[2].lr = -1e-3f, o[3].lr = -INFINITY;
    o[4].weight_decay = INFINITY, o[5].weight_decay = -0.1f, o[6].weight_decay = NAN;
    o[7].eps = -1e-8f, o[8].eps = INFINITY, o[9].eps = NAN;
    o[10].beta1 = 1.0f, o[11].beta1 = -0.1f, o[12].beta1 = NAN, o[13].beta2 = 1.0f, o[14].beta2 = -0.5f;
    o[15].beta2 = 2.0f, o[16].clip_norm = -1.0f, o[17].clip_norm = INFINITY, o[18].clip_norm = NAN;
    o[19].warmup_steps = -1, o[20].total_steps = -1, o[21].min_lr = -1e-5f, o[22].min_lr = INFINITY;
    o[23].min_lr = NAN, o[24].schedule = (acmoe_schedule)-1, o[25].schedule = ACMOE_SCHEDULE_COUNT;
    o[26].sgd = 1, o[26].lr = INFINITY;
    forward_backward(lm, ctx);
    memcpy(before, acmoe_lm_params(lm), n * sizeof(float));
    for (i = 0; i < n_cases; i++) {
        CHECKF(acmoe_lm_step(lm, ctx, &o[i], NULL) == ACMOE_ERR_ARG, "options %d", i);
        CHECKF(!memcmp(before, acmoe_lm_params(lm), n * sizeof(float)) && acmoe_lm_steps_taken(lm) == 0, "options %d", i);
    }
    for (i = 0; i < (int)sizeof text; i++) text[i] = (unsigned char)(i % 11);
    CHECK_STATUS(acmoe_corpus_view(&c, text, sizeof text, 0.2f), ACMOE_OK);
    memset(&t, 0, sizeof t);
    t.steps = 2, t.optim = o[0];
    CHECK_STATUS(acmoe_lm_train(lm, ctx, &c, &t), ACMOE_ERR_ARG);
    CHECK(!memcmp(before, acmoe_lm_params(lm), n * sizeof(float)) && acmoe_lm_steps_taken(lm) == 0);
    CHECK_STATUS(acmoe_lm_step(lm, ctx, NULL, NULL), ACMOE_OK); /* the defaults are good */
    free(before);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

/* ==== F. NULL pointers ==== */

/* The generator's calls on NULL: 0 when each returns what it should. */
static int draw_from_null(void *unused) {
    (void)unused;
    return (acmoe_rng_seed(NULL, 1) != ACMOE_ERR_NULL) | (acmoe_rng_u64(NULL) != 0) << 1 |
           (acmoe_rng_below(NULL, 5) != 0) << 2 | (acmoe_rng_uniform(NULL) != 0.0f) << 3 |
           (acmoe_rng_normal(NULL) != 0.0f) << 4;
}

/* Calls with a NULL pointer: ACMOE_ERR_NULL, or NULL, 0 or a zero struct from getters. */
static void test_null_pointers(void) {
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_lm *lm = small_model("gfc", 3), *out = NULL;
    acmoe_moe *layer = acmoe_lm_moe(lm, 0), *moe_out = NULL;
    acmoe_moe_desc md = acmoe_moe_settings(layer), mz;
    acmoe_lm_desc dz, ld = small_desc("gfc");
    acmoe_ctx_desc cz, cs;
    acmoe_moe_stats sz, ss;
    acmoe_train_desc tz, ts;
    acmoe_corpus corpus;
    acmoe_rng rng;
    acmoe_train_desc train;
    float f[64], loss, norm;
    int32_t tok[32], tgt[32], token;
    unsigned char text[64];
    double dloss;
    size_t a = 1, b = 1, c = 1, d = 1;
    int code;
    memset(f, 0, sizeof f), memset(tok, 0, sizeof tok), memset(tgt, 0, sizeof tgt), memset(text, 1, sizeof text);
    memset(&dz, 0, sizeof dz), memset(&mz, 0, sizeof mz), memset(&cz, 0, sizeof cz), memset(&sz, 0, sizeof sz);
    memset(&tz, 0, sizeof tz), memset(&train, 0, sizeof train);
    acmoe_rng_seed(&rng, 1);
    CHECK_STATUS(acmoe_corpus_view(&corpus, text, sizeof text, 0.25f), ACMOE_OK);
    /* generators */
    code = run_in_child(draw_from_null, NULL, 10); /* a draw that never ends must fail, not hang */
    CHECKF(code == 0, "draws from a NULL generator: %d", code);
    /* contexts and matmul */
    CHECK_STATUS(acmoe_ctx_create(NULL, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_ctx_set_isa(NULL, ACMOE_ISA_AUTO), ACMOE_ERR_NULL);
    cs = acmoe_ctx_settings(NULL);
    CHECK(!memcmp(&cs, &cz, sizeof cs));
    acmoe_ctx_destroy(NULL);
    CHECK_STATUS(acmoe_matmul(NULL, ACMOE_NN, 2, 2, 2, f, 2, f + 4, 2, f + 8, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 2, 2, NULL, 2, f + 4, 2, f + 8, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 2, 2, f, 2, NULL, 2, f + 8, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 2, 2, f, 2, f + 4, 2, NULL, 2, 0), ACMOE_ERR_NULL);
    /* routers and layers */
    CHECK_STATUS(acmoe_ac_route(NULL, NULL, 2, 4, tok, 1, f, 4, 2, tgt, f + 32, NULL, NULL, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_ac_route(NULL, f, 2, 4, NULL, 1, f, 4, 2, tgt, f + 32, NULL, NULL, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_ac_route(NULL, f, 2, 4, tok, 1, NULL, 4, 2, tgt, f + 32, NULL, NULL, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_ac_route(NULL, f, 2, 4, tok, 1, f, 4, 2, NULL, f + 32, NULL, NULL, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_ac_route(NULL, f, 2, 4, tok, 1, f, 4, 2, tgt, NULL, NULL, NULL, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_router_preset(NULL, 'g'), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_resolve(NULL, &mz), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_resolve(&md, NULL), ACMOE_ERR_NULL);
    CHECK(acmoe_moe_param_count(NULL) == 0);
    CHECK_STATUS(acmoe_moe_create(NULL, &md, f, f), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_create(&moe_out, NULL, f, f), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_create(&moe_out, &md, NULL, f), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_create(&moe_out, &md, f, NULL), ACMOE_ERR_NULL);
    CHECK(moe_out == NULL);
    acmoe_moe_destroy(NULL);
    CHECK_STATUS(acmoe_moe_init_params(NULL, &rng), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_init_params(layer, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_forward(NULL, ctx, f, 2, NULL, NULL, 0, f + 16), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_forward(layer, NULL, f, 2, NULL, NULL, 0, f + 16), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_forward(layer, ctx, NULL, 2, NULL, NULL, 0, f + 16), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_forward(layer, ctx, f, 2, NULL, NULL, 0, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_forward(layer, ctx, f, 2, NULL, NULL, 0, f + 16), ACMOE_OK); /* backward has work */
    CHECK_STATUS(acmoe_moe_backward(NULL, ctx, f, f + 16), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_backward(layer, NULL, f, f + 16), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_backward(layer, ctx, NULL, f + 16), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_backward(layer, ctx, f, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_moe_backward(layer, ctx, f, f + 32), ACMOE_OK);
    ss = acmoe_moe_last_stats(NULL);
    CHECK(!memcmp(&ss, &sz, sizeof ss));
    mz = acmoe_moe_settings(NULL);
    CHECK(mz.d_model == 0 && mz.n_experts == 0 && mz.max_tokens == 0);
    acmoe_moe_freeze_ac_weights(NULL, 1);
    /* models */
    CHECK_STATUS(acmoe_lm_create(NULL, &ld), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_create(&out, NULL), ACMOE_ERR_NULL);
    CHECK(out == NULL);
    acmoe_lm_destroy(NULL);
    ld = acmoe_lm_settings(NULL);
    CHECK(!memcmp(&ld, &dz, sizeof ld));
    CHECK(acmoe_lm_param_count(NULL) == 0 && acmoe_lm_params(NULL) == NULL && acmoe_lm_grads(NULL) == NULL);
    acmoe_lm_memory(NULL, &a, &b, &c, &d);
    CHECK(a == 0 && b == 0 && c == 0 && d == 0);
    acmoe_lm_memory(lm, NULL, NULL, NULL, NULL);
    CHECK_STATUS(acmoe_lm_forward(NULL, ctx, tok, tgt, 2, 16, 0, &loss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_forward(lm, NULL, tok, tgt, 2, 16, 0, &loss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, NULL, tgt, 2, 16, 0, &loss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 16, 0, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_vision_forward(NULL, ctx, f, tgt, 2, 0, &loss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_vision_forward(lm, NULL, f, tgt, 2, 0, &loss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_vision_forward(lm, ctx, NULL, tgt, 2, 0, &loss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_image_patches(NULL, 4, 4, 1, 2, f), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_image_patches(f, 4, 4, 1, 2, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_backward(NULL, ctx), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_backward(lm, NULL), ACMOE_ERR_NULL);
    acmoe_lm_zero_grad(NULL);
    CHECK(acmoe_lm_logits(NULL) == NULL && acmoe_lm_n_layers(NULL) == 0 && acmoe_lm_moe(NULL, 0) == NULL);
    CHECK_STATUS(acmoe_lm_decode(NULL, ctx, tok, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_decode(lm, NULL, tok, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_decode(lm, ctx, NULL, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_decode_batch(NULL, ctx, tok, 2, 1, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_decode_batch(lm, NULL, tok, 2, 1, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_decode_batch(lm, ctx, NULL, 2, 1, 2, 0), ACMOE_ERR_NULL);
    CHECK(acmoe_lm_position_logits(NULL, 0, 0) == NULL);
    acmoe_lm_freeze_ac_weights(NULL, 1);
    CHECK_STATUS(acmoe_sample(NULL, 4, 1.0f, 0, 1.0f, f, &rng, &token), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_sample(f, 4, 1.0f, 0, 1.0f, NULL, &rng, &token), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_sample(f, 4, 1.0f, 0, 1.0f, f + 8, NULL, &token), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_sample(f, 4, 1.0f, 0, 1.0f, f + 8, &rng, NULL), ACMOE_ERR_NULL);
    /* the optimizer (NULL options are the defaults) and checkpoints */
    CHECK(acmoe_lr_at(NULL, 0) > 0.0f);
    CHECK_STATUS(acmoe_lm_step(NULL, ctx, NULL, &norm), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_step(lm, NULL, NULL, &norm), ACMOE_ERR_NULL);
    CHECK(acmoe_lm_steps_taken(NULL) == 0);
    CHECK_STATUS(acmoe_lm_save(NULL, CKPT), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_save(lm, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_load(NULL, CKPT), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_load(&out, NULL), ACMOE_ERR_NULL);
    /* data and training */
    CHECK_STATUS(acmoe_corpus_view(NULL, text, sizeof text, 0.25f), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_corpus_view(&corpus, NULL, sizeof text, 0.25f), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_corpus_view(&corpus, text, sizeof text, 0.25f), ACMOE_OK);
    CHECK_STATUS(acmoe_corpus_load(NULL, CKPT, 0.25f), ACMOE_ERR_NULL);
    acmoe_corpus_destroy(NULL);
    CHECK_STATUS(acmoe_corpus_batch(NULL, ACMOE_SPLIT_TRAIN, &rng, 2, 4, tok, tgt), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_corpus_batch(&corpus, ACMOE_SPLIT_TRAIN, NULL, 2, 4, tok, tgt), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_corpus_batch(&corpus, ACMOE_SPLIT_TRAIN, &rng, 2, 4, NULL, tgt), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_corpus_batch(&corpus, ACMOE_SPLIT_TRAIN, &rng, 2, 4, tok, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_corpus_batch(&corpus, ACMOE_SPLIT_TRAIN, &rng, 0, 4, tok, tgt), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_corpus_batch(&corpus, ACMOE_SPLIT_TRAIN, &rng, 2, -1, tok, tgt), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_lm_evaluate(NULL, ctx, &corpus, 1, 1, &dloss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_evaluate(lm, NULL, &corpus, 1, 1, &dloss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_evaluate(lm, ctx, NULL, 1, 1, &dloss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_evaluate(lm, ctx, &corpus, 1, 1, NULL), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(NULL, ctx, &corpus, 1, 1, 0.5f, &dloss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(lm, NULL, &corpus, 1, 1, 0.5f, &dloss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(lm, ctx, NULL, 1, 1, 0.5f, &dloss), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_evaluate_corrupted(lm, ctx, &corpus, 1, 1, 0.5f, NULL), ACMOE_ERR_NULL);
    train.steps = 1;
    CHECK_STATUS(acmoe_lm_train(NULL, ctx, &corpus, &train), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_train(lm, NULL, &corpus, &train), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_train(lm, ctx, NULL, &train), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_lm_train(lm, ctx, &corpus, NULL), ACMOE_ERR_NULL);
    ts = acmoe_lm_train_settings(NULL);
    CHECK(!memcmp(&ts, &tz, sizeof ts));
    CHECK(acmoe_lm_steps_taken(lm) == 0);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

/* ==== G. Special and empty files ==== */

static int load_checkpoint_from(void *path) {
    acmoe_lm *lm = NULL;
    acmoe_status s = acmoe_lm_load(&lm, (const char *)path);
    acmoe_lm_destroy(lm);
    return exit_code(s);
}

static int load_corpus_from(void *path) {
    acmoe_corpus c;
    acmoe_status s = acmoe_corpus_load(&c, (const char *)path, 0.1f);
    if (s == ACMOE_OK) acmoe_corpus_destroy(&c);
    return exit_code(s);
}

/* A FIFO (opening one for reading waits for a writer), a folder and a device are not files
   to load: ACMOE_ERR_IO at once. An empty corpus is ACMOE_ERR_EMPTY. */
static void test_load_special_files(void) {
    const char *fifo = WORK_DIR "/fifo", *empty = WORK_DIR "/empty.txt";
    const char *places[3] = {WORK_DIR "/fifo", WORK_DIR, "/dev/null"};
    const bytes nothing = {(unsigned char *)"", 0};
    acmoe_corpus c;
    int i, code;
    make_work_dir();
    remove(fifo);
    CHECKF(mkfifo(fifo, 0600) == 0, "mkfifo: %s", strerror(errno));
    for (i = 0; i < 3; i++) {
        code = run_in_child(load_checkpoint_from, (void *)places[i], 20);
        CHECKF(code == exit_code(ACMOE_ERR_IO), "acmoe_lm_load(%s) ended with %d", places[i], code);
        code = run_in_child(load_corpus_from, (void *)places[i], 20);
        CHECKF(code == exit_code(ACMOE_ERR_IO), "acmoe_corpus_load(%s) ended with %d", places[i], code);
    }
    remove(fifo);
    write_all(empty, &nothing);
    CHECK_STATUS(acmoe_corpus_load(&c, empty, 0.1f), ACMOE_ERR_EMPTY);
    CHECK(c.bytes == NULL && c.owned == NULL);
    CHECK_STATUS(acmoe_corpus_view(&c, (const unsigned char *)"", 0, 0.1f), ACMOE_ERR_EMPTY);
    CHECK(ACMOE_ERR_EMPTY == -10 && strstr(acmoe_status_string(ACMOE_ERR_EMPTY), "empty") != NULL);
    remove(empty);
}

/* ==== I. Training settings ==== */

static int same_optim(const acmoe_optim_desc *a, const acmoe_optim_desc *b) {
    return a->lr == b->lr && a->beta1 == b->beta1 && a->beta2 == b->beta2 && a->eps == b->eps &&
           a->weight_decay == b->weight_decay && a->clip_norm == b->clip_norm && a->warmup_steps == b->warmup_steps &&
           a->schedule == b->schedule && a->total_steps == b->total_steps && a->min_lr == b->min_lr && a->sgd == b->sgd;
}

/* acmoe_lm_train_settings: zero for a new model; the options of the last step (defaults
   resolved) and the seed of the last training run; kept by a checkpoint. */
static void test_train_settings(void) {
    static unsigned char text[400];
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_lm *lm = small_model("gfc", 3), *loaded = NULL;
    acmoe_optim_desc zero, o, defaults;
    acmoe_train_desc t, got;
    acmoe_corpus c;
    int i;
    memset(&zero, 0, sizeof zero), memset(&defaults, 0, sizeof defaults);
    defaults.lr = 7e-4f, defaults.beta1 = 0.9f, defaults.beta2 = 0.999f, defaults.eps = 1e-8f;
    got = acmoe_lm_train_settings(lm);
    CHECK(got.seed == 0 && same_optim(&got.optim, &zero) && got.steps == 0 && got.on_event == NULL);
    forward_backward(lm, ctx);
    CHECK_STATUS(acmoe_lm_step(lm, ctx, NULL, NULL), ACMOE_OK);
    got = acmoe_lm_train_settings(lm);
    CHECK(got.seed == 0 && same_optim(&got.optim, &defaults));
    memset(&o, 0, sizeof o);
    o.lr = 2e-3f, o.beta1 = 0.8f, o.beta2 = 0.95f, o.eps = 1e-7f, o.weight_decay = 0.01f, o.clip_norm = 1.5f;
    o.warmup_steps = 3, o.schedule = ACMOE_SCHEDULE_COSINE, o.total_steps = 100, o.min_lr = 1e-5f;
    for (i = 0; i < (int)sizeof text; i++) text[i] = (unsigned char)(i % 7);
    CHECK_STATUS(acmoe_corpus_view(&c, text, sizeof text, 0.2f), ACMOE_OK);
    memset(&t, 0, sizeof t);
    t.steps = 3, t.seed = 4242, t.optim = o, t.eval_every = 100, t.eval_batches = 1;
    CHECK_STATUS(acmoe_lm_train(lm, ctx, &c, &t), ACMOE_OK);
    got = acmoe_lm_train_settings(lm);
    CHECK(got.seed == 4242 && same_optim(&got.optim, &o));
    make_work_dir();
    CHECK_STATUS(acmoe_lm_save(lm, CKPT), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_load(&loaded, CKPT), ACMOE_OK);
    got = acmoe_lm_train_settings(loaded);
    CHECK(got.seed == 4242 && same_optim(&got.optim, &o));
    o.sgd = 1, o.lr = 0.5f;
    forward_backward(loaded, ctx);
    CHECK_STATUS(acmoe_lm_step(loaded, ctx, &o, NULL), ACMOE_OK);
    got = acmoe_lm_train_settings(loaded);
    CHECK(got.seed == 4242 && same_optim(&got.optim, &o));
    acmoe_lm_destroy(lm), acmoe_lm_destroy(loaded);
    acmoe_ctx_destroy(ctx);
}

/* ==== H. Every allocation failing in turn ==== */

/* Calls attempt (which makes an object and, when it succeeds, destroys it) with allocation
   0, 1, 2, ... of the call failing, until a call succeeds without reaching the failure. Each
   must succeed or return ACMOE_ERR_NOMEM, and hold no memory afterwards. */
static void sweep(const char *what, acmoe_status (*attempt)(void *), void *env) {
    long n, failures_before = test_case_failures;
    /* first without a failure: it must succeed, and a context's new workers (which free their
       start-up arguments) have run by then */
    CHECKF(attempt(env) == ACMOE_OK, "%s fails with no allocation failing", what);
    for (n = 0; n < 100000 && test_case_failures - failures_before < 10; n++) {
        const long first = test_allocations, live = test_live_allocations;
        acmoe_status s;
        test_fail_allocation = first + n;
        s = attempt(env);
        test_fail_allocation = -1;
        CHECKF(test_live_allocations == live, "%s, allocation %ld failing: %ld blocks kept", what, n,
               test_live_allocations - live);
        if (s == ACMOE_OK && test_allocations <= first + n) return; /* no allocation failed */
        CHECKF(s == ACMOE_OK || s == ACMOE_ERR_NOMEM, "%s, allocation %ld failing: %s", what, n, acmoe_status_string(s));
        CHECKF(test_allocations > first + n, "%s failed (%s) before its allocation %ld", what, acmoe_status_string(s), n);
    }
    CHECKF(0, "%s: still failing after %ld allocations", what, n);
}

static acmoe_status attempt_ctx(void *threads) {
    acmoe_ctx_desc d;
    acmoe_ctx *ctx = NULL;
    acmoe_status s;
    memset(&d, 0, sizeof d);
    d.n_threads = *(int *)threads;
    s = acmoe_ctx_create(&ctx, &d);
    CHECK((s == ACMOE_OK) == (ctx != NULL));
    acmoe_ctx_destroy(ctx);
    return s;
}

static void test_alloc_fail_contexts(void) {
    int threads[3] = {1, 2, 3};
    int i;
    for (i = 0; i < 3; i++) sweep(threads[i] == 1 ? "acmoe_ctx_create, 1 thread" : "acmoe_ctx_create, threads", attempt_ctx, &threads[i]);
}

typedef struct layer_env {
    acmoe_moe_desc desc;
    float *params, *grads;
} layer_env;

static acmoe_status attempt_layer(void *arg) {
    layer_env *e = (layer_env *)arg;
    acmoe_moe *layer = NULL;
    acmoe_status s = acmoe_moe_create(&layer, &e->desc, e->params, e->grads);
    CHECK((s == ACMOE_OK) == (layer != NULL));
    acmoe_moe_destroy(layer);
    return s;
}

static acmoe_status attempt_ac_route(void *with_outputs) {
    enum { n = 6, d = 4, experts = 3 };
    float x[n * d], emb[experts * d], gate[n * 2], logits[n * experts], w[experts * d];
    int32_t prev[n], idx[n * 2];
    int i, rows = 0, outputs = *(int *)with_outputs;
    for (i = 0; i < n * d; i++) x[i] = (float)((i * 7) % 5) - 2.0f;
    for (i = 0; i < experts * d; i++) emb[i] = (float)((i * 3) % 4) - 1.5f;
    for (i = 0; i < n; i++) prev[i] = i % experts;
    return acmoe_ac_route(NULL, x, n, d, prev, 1, emb, experts, 2, idx, gate, outputs ? logits : NULL,
                          outputs ? w : NULL, outputs ? &rows : NULL);
}

/* Layers of every router letter, and the AC router alone. */
static void test_alloc_fail_layers(void) {
    layer_env e;
    int c, i, outputs[2] = {0, 1}, letters = 0;
    for (c = 'a'; c <= 'z'; c++) {
        char what[64];
        memset(&e.desc, 0, sizeof e.desc);
        e.desc.d_model = 8, e.desc.d_ff = 6, e.desc.n_experts = 4, e.desc.top_k = 2, e.desc.max_tokens = 32;
        e.desc.seq_len = 16;
        if (acmoe_moe_router_preset(&e.desc, (char)c) != ACMOE_OK) continue;
        letters++;
        e.params = (float *)calloc(acmoe_moe_param_count(&e.desc) + 1, sizeof(float));
        e.grads = (float *)calloc(acmoe_moe_param_count(&e.desc) + 1, sizeof(float));
        snprintf(what, sizeof what, "acmoe_moe_create, router '%c'", c);
        sweep(what, attempt_layer, &e);
        free(e.params), free(e.grads);
    }
    CHECK(letters >= 9);
    for (i = 0; i < 2; i++) sweep("acmoe_ac_route", attempt_ac_route, &outputs[i]);
}

static acmoe_status attempt_model(void *desc) {
    acmoe_lm *lm = NULL;
    acmoe_status s = acmoe_lm_create(&lm, (const acmoe_lm_desc *)desc);
    CHECK((s == ACMOE_OK) == (lm != NULL));
    acmoe_lm_destroy(lm);
    return s;
}

static void sweep_model(const char *pattern, int pre_ln, float dropout, int vision) {
    acmoe_lm_desc d = small_desc(pattern);
    char what[64];
    d.pre_ln = pre_ln, d.dropout = dropout;
    if (vision) d.n_classes = 4, d.patch_dim = 3;
    snprintf(what, sizeof what, "acmoe_lm_create, pattern %s%s", pattern, vision ? ", vision" : "");
    sweep(what, attempt_model, &d);
}

/* Models with a layer of every router letter (after an SMoE layer), with dropout, pre-LN,
   and a vision encoder. */
static void test_alloc_fail_models(void) {
    const char *patterns[] = {"gmg", "gca", "gcu", "gsof"};
    char pattern[3] = {'g', 0, 0};
    int i;
    for (i = 0; i < 4; i++) sweep_model(patterns[i], i & 1, i == 3 ? 0.1f : 0.0f, 0);
    for (i = 'a'; i <= 'z'; i++) {
        acmoe_moe_desc probe;
        memset(&probe, 0, sizeof probe);
        pattern[1] = (char)i;
        if (acmoe_moe_router_preset(&probe, (char)i) == ACMOE_OK) sweep_model(pattern, 0, 0.0f, 0);
    }
    sweep_model("gma", 1, 0.0f, 1);
}

static acmoe_status attempt_save(void *lm) {
    acmoe_status s = acmoe_lm_save((const acmoe_lm *)lm, CKPT);
    CHECK(temporaries(WORK_DIR, CKPT_NAME) == 0);
    return s;
}

static acmoe_status attempt_load(void *path) {
    acmoe_lm *lm = NULL;
    acmoe_status s = acmoe_lm_load(&lm, (const char *)path);
    CHECK((s == ACMOE_OK) == (lm != NULL));
    acmoe_lm_destroy(lm);
    return s;
}

static void test_alloc_fail_checkpoints(void) {
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_lm *lm = small_model("gca", 3);
    bytes b;
    make_work_dir();
    sweep("acmoe_lm_save", attempt_save, lm);
    CHECK(file_holds(CKPT, lm));
    sweep("acmoe_lm_load", attempt_load, (void *)CKPT);
    b = read_all(CKPT);
    to_format_2(&b);
    write_all(WORK_DIR "/format-2.safetensors", &b);
    sweep("acmoe_lm_load, format 2", attempt_load, (void *)(WORK_DIR "/format-2.safetensors"));
    remove(WORK_DIR "/format-2.safetensors");
    free(b.data);
    acmoe_lm_destroy(lm);
    lm = small_model("gfc", 3); /* with the AC weights of a forward pass */
    forward_backward(lm, ctx);
    CHECK_STATUS(acmoe_lm_save(lm, CKPT), ACMOE_OK);
    sweep("acmoe_lm_load, AC weights", attempt_load, (void *)CKPT);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
}

typedef struct training_env {
    acmoe_lm *lm;
    acmoe_ctx *ctx;
    acmoe_corpus corpus;
} training_env;

static acmoe_status attempt_corpus_load(void *path) {
    acmoe_corpus c;
    acmoe_status s = acmoe_corpus_load(&c, (const char *)path, 0.2f);
    if (s == ACMOE_OK) acmoe_corpus_destroy(&c);
    return s;
}

static acmoe_status attempt_evaluate(void *arg) {
    training_env *e = (training_env *)arg;
    double loss;
    return acmoe_lm_evaluate(e->lm, e->ctx, &e->corpus, 2, 7, &loss);
}

static acmoe_status attempt_evaluate_corrupted(void *arg) {
    training_env *e = (training_env *)arg;
    double loss;
    return acmoe_lm_evaluate_corrupted(e->lm, e->ctx, &e->corpus, 2, 7, 0.3f, &loss);
}

static acmoe_status attempt_train(void *arg) {
    training_env *e = (training_env *)arg;
    acmoe_train_desc t;
    memset(&t, 0, sizeof t);
    t.steps = acmoe_lm_steps_taken(e->lm) + 2, t.eval_every = 2, t.eval_batches = 1, t.seed = 5;
    return acmoe_lm_train(e->lm, e->ctx, &e->corpus, &t);
}

static void test_alloc_fail_training(void) {
    static unsigned char text[500];
    const char *path = WORK_DIR "/corpus.txt";
    bytes file;
    training_env e;
    int i;
    for (i = 0; i < (int)sizeof text; i++) text[i] = (unsigned char)(i % 11);
    file.data = text, file.size = sizeof text;
    make_work_dir();
    write_all(path, &file);
    sweep("acmoe_corpus_load", attempt_corpus_load, (void *)path);
    remove(path);
    e.ctx = test_context(2, 0, 0, 0);
    e.lm = small_model("gcu", 3);
    CHECK_STATUS(acmoe_corpus_view(&e.corpus, text, sizeof text, 0.2f), ACMOE_OK);
    sweep("acmoe_lm_evaluate", attempt_evaluate, &e);
    sweep("acmoe_lm_evaluate_corrupted", attempt_evaluate_corrupted, &e);
    sweep("acmoe_lm_train", attempt_train, &e);
    acmoe_lm_destroy(e.lm);
    acmoe_ctx_destroy(e.ctx);
}

const test_case hardening_tests[] = {
    {"hardening_moe_seq_len_is_the_models", test_moe_seq_len_is_the_models},
    {"hardening_sizes_that_overflow", test_sizes_that_overflow},
    {"hardening_sizes_of_options", test_sizes_of_options},
    {"hardening_step_counter_full", test_step_counter_full},
    {"hardening_checkpoint_checksum", test_checkpoint_checksum},
    {"hardening_checkpoint_tiling", test_checkpoint_tiling},
    {"hardening_checkpoint_header_entries", test_checkpoint_header_entries},
    {"hardening_checkpoint_huge_claim", test_checkpoint_huge_claim},
    {"hardening_checkpoint_format_2_loads", test_checkpoint_format_2_loads},
    {"hardening_save_refuses_nonfinite", test_save_refuses_nonfinite},
    {"hardening_save_file_size_limit", test_save_file_size_limit},
    {"hardening_save_ignores_planted_links", test_save_ignores_planted_links},
    {"hardening_save_two_writers", test_save_two_writers},
    {"hardening_save_bad_places", test_save_bad_places},
    {"hardening_step_refuses_bad_options", test_step_refuses_bad_options},
    {"hardening_null_pointers", test_null_pointers},
    {"hardening_load_special_files", test_load_special_files},
    {"hardening_train_settings", test_train_settings},
    {"hardening_alloc_fail_contexts_threads", test_alloc_fail_contexts},
    {"hardening_alloc_fail_layers", test_alloc_fail_layers},
    {"hardening_alloc_fail_models", test_alloc_fail_models},
    {"hardening_alloc_fail_checkpoints", test_alloc_fail_checkpoints},
    {"hardening_alloc_fail_training_threads", test_alloc_fail_training},
    {0, 0},
};
