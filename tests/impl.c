/* The one translation unit of the test suite that holds the implementation. Its allocator
   counts calls, bytes and live blocks, so tests can prove that a steady-state step allocates
   nothing and that every object gives back what it took; and it can fail one chosen call, so
   tests can walk an entry point through each of its allocations failing. The counters are
   atomic: worker threads free their start-up arguments. */
#include <stdlib.h>

long test_allocations;
long test_fail_allocation = -1;
long test_live_allocations;
unsigned long test_allocated_bytes;

/* Counts a request of bytes; whether it is the one chosen to fail. */
static int allocation_fails(size_t bytes) {
    const long call = __atomic_fetch_add(&test_allocations, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&test_allocated_bytes, (unsigned long)bytes, __ATOMIC_RELAXED);
    return call == __atomic_load_n(&test_fail_allocation, __ATOMIC_RELAXED);
}

static void *counting_malloc(size_t bytes) {
    void *p;
    if (allocation_fails(bytes)) return NULL;
    p = malloc(bytes);
    if (p) __atomic_add_fetch(&test_live_allocations, 1, __ATOMIC_RELAXED);
    return p;
}

static void *counting_realloc(void *old, size_t bytes) {
    void *p;
    if (allocation_fails(bytes)) return NULL;
    p = realloc(old, bytes);
    if (p && !old) __atomic_add_fetch(&test_live_allocations, 1, __ATOMIC_RELAXED);
    return p;
}

static void counting_free(void *p) {
    if (p) __atomic_sub_fetch(&test_live_allocations, 1, __ATOMIC_RELAXED);
    free(p);
}

#define ACMOE_MALLOC(sz) counting_malloc(sz)
#define ACMOE_REALLOC(p, sz) counting_realloc(p, sz)
#define ACMOE_FREE(p) counting_free(p)
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

#include "harness.h"

struct acmoe_ctx *test_context(int n_threads, int mc, int kc, int nc) {
    acmoe_ctx_desc d;
    acmoe_ctx *ctx = NULL;
    memset(&d, 0, sizeof d);
    d.n_threads = n_threads, d.mc = mc, d.kc = kc, d.nc = nc;
    CHECK_STATUS(acmoe_ctx_create(&ctx, &d), ACMOE_OK);
    return ctx;
}

/* ---- Kernels below the public API, tested here where their definitions are visible ---- */

#include <math.h>

/* One path's row kernels on n values against plain double-precision loops: the maximum
   exactly, each exp of a float argument a to 1e-6 relative (the scalar path; the vector paths
   fold the scale into the base-2 exponent, so that rounding adds 2e-7 |a|), sums, exp sums and
   dot products to 1e-5 of their magnitude; the softmax gradient, y += a x, y += a b and y = a b
   element by element, y = a x and the ReLU mask against the plain float formulas, exactly. */
static void check_row_kernels(const acmoe__kernel *k, acmoe_rng *rng, int n) {
    float x[1000], y[1000], b[1000], top = -1e30f, got;
    const float zero = 0.0f;
    double sum = 0.0, dot = 0.0, magnitude = 0.0, total = 0.0, total_magnitude = 0.0;
    const float scale = 0.7f;
    const char *path = acmoe_isa_name(k->isa);
    int i, s, exp_failures = 0;
    for (i = 0; i < n; i++) {
        x[i] = 35.0f * acmoe_rng_uniform(rng) - 30.0f;
        b[i] = 2.0f * acmoe_rng_uniform(rng) - 1.0f;
        top = x[i] > top ? x[i] : top;
        dot += (double)x[i] * b[i];
        magnitude += fabs((double)x[i] * b[i]);
        total += b[i];
        total_magnitude += fabs(b[i]);
    }
    got = k->row_sum(b, n);
    CHECKF(fabs(got - total) <= 1e-5 * total_magnitude, "%s, n %d: sum %g, want %g", path, n, got, total);
    CHECKF(k->row_max(x, n) == top, "%s, n %d", path, n);
    got = k->row_dot(x, b, n);
    CHECKF(fabs(got - dot) <= 1e-5 * magnitude, "%s, n %d: dot %g, want %g", path, n, got, dot);
    got = k->row_exp(y, x, n, top, scale);
    for (i = 0; i < n; i++) {
        float argument = (x[i] - top) * scale; /* rounded as the scalar path rounds it */
        double want = exp((double)argument), rounding = k->isa == ACMOE_ISA_SCALAR ? 0.0 : 2e-7 * -argument;
        sum += want;
        exp_failures += !(fabs(y[i] - want) <= (1e-6 + rounding) * want);
    }
    CHECKF(exp_failures == 0, "%s, n %d: %d exp values off", path, n, exp_failures);
    CHECKF(fabs(got - sum) <= 1e-5 * sum, "%s, n %d: sum %g, want %g", path, n, got, sum);
    CHECK(k->row_exp(NULL, x, n, top, scale) == got); /* the sum alone: the same bits */
    CHECK(k->row_exp(x, x, n, top, scale) == got);    /* in place */
    for (i = 0; i < n; i++) CHECK(x[i] == y[i]);
    /* the softmax gradient: the same operations in the same order, so exactly the formula */
    memcpy(y, b, sizeof(float) * (size_t)n);
    k->row_softmax_grad(y, x, n, 0.3f, scale);
    for (i = 0; i < n; i++) exp_failures += y[i] != x[i] * (b[i] - 0.3f) * scale;
    CHECKF(exp_failures == 0, "%s, n %d: %d softmax gradients off", path, n, exp_failures);
    /* y += a x: a product then a sum, exactly */
    memcpy(y, b, sizeof(float) * (size_t)n);
    exp_failures = 0;
    k->row_axpy(y, x, n, -0.3f);
    for (i = 0; i < n; i++) exp_failures += y[i] != b[i] + -0.3f * x[i];
    CHECKF(exp_failures == 0, "%s, n %d: %d axpy values off", path, n, exp_failures);
    memcpy(y, b, sizeof(float) * (size_t)n);
    exp_failures = 0;
    k->row_mul_add(y, x, b, n);
    for (i = 0; i < n; i++) exp_failures += y[i] != b[i] + x[i] * b[i];
    CHECKF(exp_failures == 0, "%s, n %d: %d multiply-add values off", path, n, exp_failures);
    exp_failures = 0;
    k->row_mul(y, x, b, n);
    for (i = 0; i < n; i++) exp_failures += y[i] != x[i] * b[i];
    CHECKF(exp_failures == 0, "%s, n %d: %d products off", path, n, exp_failures);
    for (s = 0; s < 2; s++) { /* y += |x - b| or (x - b)^2: a difference, its magnitude or square, a sum */
        memcpy(y, b, sizeof(float) * (size_t)n);
        exp_failures = 0;
        k->row_deviation(y, x, b, n, s);
        for (i = 0; i < n; i++) {
            const float dev = x[i] - b[i];
            exp_failures += y[i] != b[i] + (s ? dev * dev : fabsf(dev));
        }
        CHECKF(exp_failures == 0, "%s, n %d: %d deviations off (squared %d)", path, n, exp_failures, s);
    }
    { /* the sum of squares: the bits of eight double chains added in pairs, on every path */
        double chain[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        for (i = 0; i < n; i++) chain[i % 8] += (double)b[i] * b[i];
        CHECKF(k->sum_squares(b, (size_t)n) ==
                   ((chain[0] + chain[1]) + (chain[2] + chain[3])) + ((chain[4] + chain[5]) + (chain[6] + chain[7])),
               "%s, n %d: sum of squares", path, n);
    }
    exp_failures = 0;
    k->row_scale(y, x, n, -0.3f);
    for (i = 0; i < n; i++) exp_failures += y[i] != -0.3f * x[i];
    CHECKF(exp_failures == 0, "%s, n %d: %d scaled values off", path, n, exp_failures);
    /* b where x (signed zeros and NaN among it) is positive, else +0, bit for bit */
    for (i = 0; i < n; i++) x[i] = i % 7 == 3 ? (i % 2 ? -0.0f : 0.0f) : i % 11 == 5 ? NAN : x[i] + 15.0f;
    exp_failures = 0;
    k->row_relu(y, x, b, (size_t)n);
    for (i = 0; i < n; i++) exp_failures += memcmp(&y[i], x[i] > 0.0f ? &b[i] : &zero, sizeof(float)) != 0;
    CHECKF(exp_failures == 0, "%s, n %d: %d relu values off", path, n, exp_failures);
}

static void test_row_kernels(void) {
    acmoe_rng rng;
    float far[3] = {0.0f, -200.0f, -1e30f}, e[3];
    int isa, n;
    acmoe_rng_seed(&rng, 11);
    for (isa = 0; isa < ACMOE_ISA_COUNT; isa++) {
        acmoe__kernel k;
        if (acmoe__kernel_for((acmoe_isa)isa, &k) != ACMOE_OK) continue;
        for (n = 1; n <= 70; n++) check_row_kernels(&k, &rng, n);
        check_row_kernels(&k, &rng, 256);
        check_row_kernels(&k, &rng, 1000);
        /* arguments far below the maximum underflow to (almost) nothing, never to NaN */
        CHECK(k.row_exp(e, far, 3, 0.0f, 1.0f) == 1.0f + e[1] + e[2]);
        CHECKF(e[0] == 1.0f && e[1] >= 0.0f && e[1] < 1e-37f && e[2] >= 0.0f && e[2] < 1e-37f, "%s: %g %g %g",
               acmoe_isa_name(k.isa), e[0], e[1], e[2]);
    }
}

/* Attention of one (sequence, head) pair in double precision, causal or not: out, and the
   gradients dq, dk, dv (row stride ld) from dout. */
static void reference_attention(const float *q, const float *k, const float *v, const float *dout, int ld, int seq,
                                int dh, int causal, double *out, double *dq, double *dk, double *dv) {
    double *p = (double *)malloc(sizeof(double) * (size_t)seq * seq), *dp = (double *)malloc(sizeof(double) * (size_t)seq);
    const double scale = 1.0 / sqrt((double)dh);
    int i, c, x;
    memset(dq, 0, sizeof(double) * (size_t)seq * dh), memset(dk, 0, sizeof(double) * (size_t)seq * dh);
    memset(dv, 0, sizeof(double) * (size_t)seq * dh);
    for (i = 0; i < seq; i++) {
        const int keys = causal ? i + 1 : seq;
        double top = -1e300, sum = 0.0, dot = 0.0;
        for (c = 0; c < keys; c++) {
            double sc = 0.0;
            for (x = 0; x < dh; x++) sc += (double)q[i * ld + x] * k[c * ld + x];
            p[i * seq + c] = sc * scale;
            top = fmax(top, sc * scale);
        }
        for (c = 0; c < keys; c++) sum += p[i * seq + c] = exp(p[i * seq + c] - top);
        for (x = 0; x < dh; x++) out[i * dh + x] = 0.0;
        for (c = 0; c < keys; c++) {
            p[i * seq + c] /= sum;
            for (x = 0; x < dh; x++) out[i * dh + x] += p[i * seq + c] * v[c * ld + x];
        }
        for (c = 0; c < keys; c++) { /* dP, then through the softmax */
            dp[c] = 0.0;
            for (x = 0; x < dh; x++) dp[c] += (double)dout[i * dh + x] * v[c * ld + x];
            dot += p[i * seq + c] * dp[c];
        }
        for (c = 0; c < keys; c++) {
            double ds = p[i * seq + c] * (dp[c] - dot) * scale;
            for (x = 0; x < dh; x++) {
                dv[c * dh + x] += p[i * seq + c] * dout[i * dh + x];
                dq[i * dh + x] += ds * k[c * ld + x];
                dk[c * dh + x] += ds * q[i * ld + x];
            }
        }
    }
    free(p), free(dp);
}

static int close_to(float got, double want) { return fabs(got - want) <= 1e-4 * fabs(want) + 1e-5; }

/* Attention against the reference at a length of several blocks with a ragged end, for a
   head of width d / heads, on every kernel path, with the same bits on 1 and 2 threads, with
   the backward pass measuring the row statistics again (1 thread) or reading the forward
   pass's (2 threads), and (causal) when the forward pass starts at a later row (decoding). */
static void check_attention(int d, int heads, int causal) {
    enum { batch = 2, seq = ACMOE__ATTENTION_BLOCK * 2 + 23, n = batch * seq };
    const int dh = d / heads;
    const size_t work = 2 * acmoe__attention_work(seq, dh); /* a scratch slot for each of 2 threads */
    float *qkv = (float *)malloc(sizeof(float) * n * 3 * d), *dout = (float *)malloc(sizeof(float) * n * d);
    float *out[2], *dqkv[2], *scratch = (float *)malloc(sizeof(float) * work);
    float *dout_pair = (float *)malloc(sizeof(float) * seq * dh);
    float *stats[2];
    double *ref = (double *)malloc(sizeof(double) * 4 * seq * dh);
    acmoe_ctx *ctx[2];
    acmoe_rng rng;
    int isa, t, b, h, i, x, bad;
    acmoe_rng_seed(&rng, 12);
    stats[0] = NULL, stats[1] = (float *)malloc(sizeof(float) * n * heads * 2);
    for (i = 0; i < n * 3 * d; i++) qkv[i] = 2.0f * acmoe_rng_uniform(&rng) - 1.0f;
    for (i = 0; i < n * d; i++) dout[i] = 2.0f * acmoe_rng_uniform(&rng) - 1.0f;
    for (t = 0; t < 2; t++) {
        ctx[t] = test_context(t + 1, 0, 0, 0);
        out[t] = (float *)malloc(sizeof(float) * n * d);
        dqkv[t] = (float *)malloc(sizeof(float) * n * 3 * d);
    }
    for (isa = 0; isa < ACMOE_ISA_COUNT; isa++) {
        if (!acmoe_isa_supported((acmoe_isa)isa)) continue;
        bad = 0;
        for (t = 0; t < 2; t++) {
            CHECK_STATUS(acmoe_ctx_set_isa(ctx[t], (acmoe_isa)isa), ACMOE_OK);
            acmoe__attention_forward(ctx[t], qkv, batch, seq, NULL, 0, 0, causal, d, heads, scratch, 2, out[t], stats[t]);
            acmoe__attention_backward(ctx[t], qkv, out[t], dout, batch, seq, causal, d, heads, scratch, 2, dqkv[t],
                                      stats[t]);
        }
        CHECK(memcmp(out[0], out[1], sizeof(float) * n * d) == 0);
        /* from row 100 on, or the last row alone (decoding), the rest kept, on 2 threads with one
           scratch slot (so one thread takes every pair): the same bits as the whole pass */
        for (i = 100; causal && i < seq; i += seq - 1 - 100) {
            memcpy(out[1], out[0], sizeof(float) * n * d);
            for (b = 0; b < batch; b++) memset(out[1] + ((size_t)b * seq + i) * d, 0, sizeof(float) * (seq - i) * d);
            acmoe__attention_forward(ctx[1], qkv, batch, seq, NULL, 0, i, causal, d, heads, scratch, 1, out[1], NULL);
            CHECKF(memcmp(out[0], out[1], sizeof(float) * n * d) == 0, "%s path, from row %d",
                   acmoe_isa_name((acmoe_isa)isa), i);
        }
        CHECK(memcmp(dqkv[0], dqkv[1], sizeof(float) * n * 3 * d) == 0);
        for (b = 0; b < batch; b++) {
            for (h = 0; h < heads; h++) {
                const float *q = qkv + (size_t)b * seq * 3 * d + h * dh, *got = dqkv[0] + (size_t)b * seq * 3 * d + h * dh;
                double *o = ref, *dq = ref + seq * dh, *dk = dq + seq * dh, *dv = dk + seq * dh;
                for (i = 0; i < seq; i++)
                    for (x = 0; x < dh; x++) dout_pair[i * dh + x] = dout[((size_t)b * seq + i) * d + h * dh + x];
                reference_attention(q, q + d, q + 2 * d, dout_pair, 3 * d, seq, dh, causal, o, dq, dk, dv);
                for (i = 0; i < seq; i++) {
                    for (x = 0; x < dh; x++) {
                        bad += !close_to(out[0][((size_t)b * seq + i) * d + h * dh + x], o[i * dh + x]);
                        bad += !close_to(got[(size_t)i * 3 * d + x], dq[i * dh + x]);
                        bad += !close_to(got[(size_t)i * 3 * d + d + x], dk[i * dh + x]);
                        bad += !close_to(got[(size_t)i * 3 * d + 2 * d + x], dv[i * dh + x]);
                    }
                }
            }
        }
        CHECKF(bad == 0, "%s path, head width %d%s: %d values off", acmoe_isa_name((acmoe_isa)isa), dh,
               causal ? "" : " without the mask", bad);
    }
    for (t = 0; t < 2; t++) acmoe_ctx_destroy(ctx[t]), free(out[t]), free(dqkv[t]);
    free(qkv), free(dout), free(scratch), free(ref), free(dout_pair), free(stats[1]);
}

/* Heads of one padded width, of a ragged one, and wider than the widest micro-kernel; and
   attention without the causal mask (an encoder's). */
static void test_attention_blocks(void) {
    check_attention(32, 2, 1);
    check_attention(40, 2, 1);
    check_attention(72, 1, 1);
    check_attention(32, 2, 0);
    check_attention(40, 2, 0);
}

/* A path's kernel for products one vector wide gives the bits of its micro-kernels: rows of
   A along the depth (a_cs 1) and across it (a_rs 1), written over C and added to it. */
static void test_tall_kernel(void) {
    enum { K = 37, ROWS = ACMOE__TALL_ROWS };
    float a[ROWS * K], b[K * 64], want[ROWS * 64], got[ROWS * 64];
    acmoe_rng rng;
    int isa, layout, accumulate, i, w, tested = 0;
    acmoe_rng_seed(&rng, 21);
    for (i = 0; i < ROWS * K; i++) a[i] = 2.0f * acmoe_rng_uniform(&rng) - 1.0f;
    for (i = 0; i < K * 64; i++) b[i] = 2.0f * acmoe_rng_uniform(&rng) - 1.0f;
    for (isa = 0; isa < ACMOE_ISA_COUNT; isa++) {
        acmoe__kernel k;
        if (acmoe__kernel_for((acmoe_isa)isa, &k) != ACMOE_OK || !k.tall) continue;
        for (w = 0; k.width[w] != k.tall_width; w++) continue;
        for (layout = 0; layout < 2; layout++)
            for (accumulate = 0; accumulate < 2; accumulate++) {
                const ptrdiff_t a_rs = layout ? 1 : K, a_cs = layout ? ROWS : 1;
                const float *rows[ACMOE__MR_MAX];
                int r0, r;
                for (i = 0; i < ROWS * 64; i++) want[i] = got[i] = (float)(i % 13) - 6.0f;
                for (r0 = 0; r0 < ROWS; r0 += k.mr) {
                    for (r = 0; r < k.mr; r++) rows[r] = a + (r0 + r) * a_rs;
                    k.fn[w](K, rows, a_cs, b, 64, want + r0 * 64, 64, k.mr, accumulate, NULL);
                }
                k.tall(K, a, a_rs, a_cs, b, 64, got, 64, accumulate);
                CHECKF(memcmp(want, got, sizeof want) == 0, "%s, layout %d, accumulate %d", acmoe_isa_name(k.isa),
                       layout, accumulate);
                tested++;
            }
    }
    CHECK(tested == (acmoe_isa_supported(ACMOE_ISA_AVX512) ? 4 : 0));
}

/* A path's transpose moves every element and writes nothing else, for sizes made of 16 x 16
   blocks, 8 x 8 blocks and ragged edges, with leading dimensions wider than the block. */
static void test_transpose(void) {
    enum { MAX = 41, LD = 45 };
    static const int sizes[] = {1, 7, 8, 15, 16, 17, 24, 32, 41};
    enum { SIZES = (int)(sizeof sizes / sizeof sizes[0]) };
    float src[MAX * LD], dst[MAX * LD];
    int isa, xi, pi, x, p, tested = 0;
    for (x = 0; x < MAX * LD; x++) src[x] = (float)x;
    for (isa = 0; isa < ACMOE_ISA_COUNT; isa++) {
        if (!acmoe_isa_supported((acmoe_isa)isa)) continue;
        for (xi = 0; xi < SIZES; xi++)
            for (pi = 0; pi < SIZES; pi++) {
                const int nx = sizes[xi], np = sizes[pi];
                int wrong = 0;
                for (x = 0; x < MAX * LD; x++) dst[x] = -1.0f;
                acmoe__transpose((acmoe_isa)isa, dst, LD, src, LD, nx, np);
                for (p = 0; p < MAX; p++)
                    for (x = 0; x < LD; x++)
                        wrong += dst[p * LD + x] != (p < np && x < nx ? src[x * LD + p] : -1.0f);
                CHECKF(wrong == 0, "%s, %d x %d: %d elements wrong", acmoe_isa_name((acmoe_isa)isa), nx, np, wrong);
                tested++;
            }
    }
    CHECK(tested >= SIZES * SIZES);
}

/* A product's epilogue gives the bits of the separate passes: ReLU's gradient against the old
   C, the bias, the ReLU written aside, and column sums added in row order; on every path,
   for whole and ragged tiles, a transposed output, one column, no depth, and (without the
   mask) several depth blocks; and across two threads the bits of one. */
static void test_epilogue(void) {
    enum { M = 23, N = 100, K = 40 };
    static const int shapes[][4] = {{M, N, K, ACMOE_NT}, {M, 64, K, ACMOE_NN}, {5, 1, K, ACMOE_NN},
                                    {1, 48, K, ACMOE_NT}, {M, 36, K, ACMOE_TN}, {M, N, 0, ACMOE_NN}};
    float a[M * K], b[K * N], bias[N], old[M * N], want[M * N], got[M * N], relu_want[M * N], relu_got[M * N];
    float sums_want[N], sums_got[N];
    acmoe_ctx *ctx[3];
    acmoe_rng rng;
    int isa, shape, mode, i, j, tested = 0;
    acmoe_rng_seed(&rng, 31);
    for (i = 0; i < M * K; i++) a[i] = 2.0f * acmoe_rng_uniform(&rng) - 1.0f;
    for (i = 0; i < K * N; i++) b[i] = 2.0f * acmoe_rng_uniform(&rng) - 1.0f;
    for (i = 0; i < N; i++) bias[i] = 2.0f * acmoe_rng_uniform(&rng) - 1.0f;
    for (i = 0; i < M * N; i++) old[i] = i % 3 ? 2.0f * acmoe_rng_uniform(&rng) - 1.0f : (i % 2 ? 0.0f : -0.0f);
    ctx[0] = test_context(1, 0, K, 0);  /* one depth block */
    ctx[1] = test_context(1, 0, 16, 0); /* three */
    ctx[2] = test_context(2, 0, 16, 0);
    for (isa = ACMOE_ISA_SCALAR; isa < ACMOE_ISA_COUNT; isa++) {
        if (!acmoe_isa_supported((acmoe_isa)isa)) continue;
        for (i = 0; i < 3; i++) CHECK_STATUS(acmoe_ctx_set_isa(ctx[i], (acmoe_isa)isa), ACMOE_OK);
        for (shape = 0; shape < (int)(sizeof shapes / sizeof shapes[0]); shape++)
            for (mode = 0; mode < 3; mode++) { /* mask; bias and ReLU; all of it */
                const int m = shapes[shape][0], n = shapes[shape][1], k = shapes[shape][2];
                const acmoe_layout layout = (acmoe_layout)shapes[shape][3];
                const int lda = layout == ACMOE_TN ? m : k + !k, ldb = layout == ACMOE_NT ? k + !k : n;
                acmoe_ctx *one = ctx[mode == 1 ? 1 : 0];
                acmoe__epilogue epilogue;
                memset(&epilogue, 0, sizeof epilogue);
                epilogue.relu_grad = mode != 1;
                if (mode) epilogue.bias = bias, epilogue.relu = relu_got, epilogue.ld_relu = n;
                epilogue.column_sums = sums_got;
                CHECK_STATUS(acmoe_matmul(one, layout, m, n, k, a, lda, b, ldb, want, n, 0), ACMOE_OK);
                for (j = 0; j < n; j++) sums_want[j] = sums_got[j] = (float)j;
                for (i = 0; i < m; i++)
                    for (j = 0; j < n; j++) {
                        float *c = &want[i * n + j];
                        if (epilogue.relu_grad) *c = old[i * n + j] > 0.0f ? *c : 0.0f;
                        if (mode) *c = *c + bias[j], relu_want[i * n + j] = *c > 0.0f ? *c : 0.0f;
                        sums_want[j] = sums_want[j] + *c;
                    }
                memcpy(got, old, sizeof got);
                CHECK_STATUS(acmoe__matmul_on_thread_then(one, 0, layout, m, n, k, a, lda, b, ldb, got, n, 0, &epilogue),
                             ACMOE_OK);
                CHECKF(memcmp(want, got, sizeof(float) * m * n) == 0 && memcmp(sums_want, sums_got, sizeof(float) * n) == 0 &&
                           (!mode || memcmp(relu_want, relu_got, sizeof(float) * m * n) == 0),
                       "%s, %d x %d x %d, layout %d, mode %d", acmoe_isa_name((acmoe_isa)isa), m, n, k, (int)layout, mode);
                if (mode == 1) { /* across the pool, without the column sums */
                    epilogue.column_sums = NULL;
                    memset(relu_got, 0, sizeof relu_got);
                    CHECK_STATUS(acmoe__matmul_then(ctx[2], layout, m, n, k, a, lda, b, ldb, got, n, 0, &epilogue), ACMOE_OK);
                    CHECKF(memcmp(want, got, sizeof(float) * m * n) == 0 && memcmp(relu_want, relu_got, sizeof(float) * m * n) == 0,
                           "%s, %d x %d x %d, two threads", acmoe_isa_name((acmoe_isa)isa), m, n, k);
                }
                tested++;
            }
    }
    CHECK(tested >= 18);
    for (i = 0; i < 3; i++) acmoe_ctx_destroy(ctx[i]);
}

/* A path's top-k selection gives the scalar loop's indices and gates, ties (repeated values,
   signed zeros) to the lower index, for every count of experts up to 16 and every k. */
static void test_top16(void) {
    enum { N = 64 };
    float z[N * 16], gate[N * 16], want_gate[N * 16];
    int32_t idx[N * 16], want_idx[N * 16];
    acmoe_rng rng;
    int isa, e, k, i, tested = 0;
    acmoe_rng_seed(&rng, 23);
    for (isa = 0; isa < ACMOE_ISA_COUNT; isa++) {
        acmoe__kernel kern;
        if (acmoe__kernel_for((acmoe_isa)isa, &kern) != ACMOE_OK || !kern.top16) continue;
        for (e = 1; e <= 16; e++)
            for (k = 1; k <= e; k++) {
                for (i = 0; i < N * e; i++) {
                    const float u = acmoe_rng_uniform(&rng);
                    z[i] = i % 3 ? (float)(int)(6.0f * u) - 3.0f : u < 0.5f ? -0.0f : 4.0f * u - 2.0f;
                }
                acmoe__topk_softmax(NULL, z, N, e, k, want_idx, want_gate);
                acmoe__topk_softmax(&kern, z, N, e, k, idx, gate);
                CHECKF(memcmp(idx, want_idx, sizeof(int32_t) * N * k) == 0 && memcmp(gate, want_gate, sizeof(float) * N * k) == 0,
                       "%s, e %d, k %d", acmoe_isa_name(kern.isa), e, k);
                tested++;
            }
    }
    CHECK(tested == (acmoe_isa_supported(ACMOE_ISA_AVX512) ? 136 : 0));
}

/* The AdamW row kernel of every path against the plain formula in double precision, on
   runs of every length from 0 to 24 (vector bodies and tails). */
static void test_row_adam(void) {
    enum { runs = 40, n = runs * 25 };
    static float p[n], g[n], m[n], v[n];
    acmoe__adam a;
    acmoe_rng rng;
    int isa, i, bad;
    a.scale = 0.8f, a.beta1 = 0.9f, a.beta2 = 0.99f, a.lr = 1e-2f, a.c1 = 2.5f, a.c2 = 7.0f, a.eps = 1e-8f, a.decay = 0.1f;
    for (isa = 0; isa < ACMOE_ISA_COUNT; isa++) {
        acmoe__kernel k;
        if (acmoe__kernel_for((acmoe_isa)isa, &k) != ACMOE_OK) continue;
        acmoe_rng_seed(&rng, 13);
        for (i = 0; i < n; i++) {
            p[i] = acmoe_rng_normal(&rng), g[i] = acmoe_rng_normal(&rng);
            m[i] = 0.1f * acmoe_rng_normal(&rng), v[i] = 0.01f * acmoe_rng_uniform(&rng);
        }
        bad = 0;
        for (i = 0; i < runs; i++)
            k.row_adam(p + i * 25, g + i * 25, m + i * 25, v + i * 25, (size_t)i % 25, &a);
        acmoe_rng_seed(&rng, 13);
        for (i = 0; i < n; i++) {
            double pi = acmoe_rng_normal(&rng), gi = a.scale * acmoe_rng_normal(&rng);
            double mi = 0.1f * acmoe_rng_normal(&rng), vi = 0.01f * acmoe_rng_uniform(&rng);
            if (i % 25 < i / 25 % 25) { /* updated: the first i % 25 of each run of 25 */
                mi = a.beta1 * mi + (1.0 - a.beta1) * gi;
                vi = a.beta2 * vi + (1.0 - a.beta2) * gi * gi;
                pi -= a.lr * (mi * a.c1 / (sqrt(vi * a.c2) + a.eps) + a.decay * pi);
            }
            bad += !(fabs(p[i] - pi) <= 1e-5 * fabs(pi) + 1e-6 && fabs(m[i] - mi) <= 1e-5 * fabs(mi) + 1e-7 &&
                     fabs(v[i] - vi) <= 1e-5 * vi + 1e-10);
        }
        CHECKF(bad == 0, "%s path: %d parameters off", acmoe_isa_name((acmoe_isa)isa), bad);
    }
}

/* One layer-norm row of n values in double precision: xhat, y and 1 / sqrt(var + eps) of
   x + add, and dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) with dxhat = dy g. */
static double reference_layernorm_row(const float *x, const float *add, const float *g, const float *b,
                                      const float *dy, int n, double *xhat, double *y, double *dx) {
    double mean = 0.0, var = 0.0, rstd, mean_d = 0.0, mean_dx = 0.0;
    int i;
    for (i = 0; i < n; i++) mean += (double)x[i] + (add ? add[i] : 0.0f);
    mean /= n;
    for (i = 0; i < n; i++) xhat[i] = (double)x[i] + (add ? add[i] : 0.0f) - mean, var += xhat[i] * xhat[i];
    rstd = 1.0 / sqrt(var / n + 1e-5);
    for (i = 0; i < n; i++) {
        xhat[i] *= rstd, y[i] = xhat[i] * g[i] + b[i];
        mean_d += (double)dy[i] * g[i], mean_dx += (double)dy[i] * g[i] * xhat[i];
    }
    for (i = 0; i < n; i++) dx[i] = rstd * ((double)dy[i] * g[i] - mean_d / n - xhat[i] * mean_dx / n);
    return rstd;
}

/* The layer-norm row kernels of every path against the reference: rows of every length from
   1 to 40 and of 128, with and without a residual input, the gradient written and added to. */
static void test_row_layernorm(void) {
    enum { max_n = 128 };
    float x[max_n], add[max_n], g[max_n], b[max_n], dy[max_n], xhat[max_n], y[max_n], dx[max_n], rstd;
    double want_xhat[max_n], want_y[max_n], want_dx[max_n], want_rstd;
    acmoe_rng rng;
    int isa, n, i, with_add, bad;
    acmoe_rng_seed(&rng, 17);
    for (isa = 0; isa < ACMOE_ISA_COUNT; isa++) {
        acmoe__kernel k;
        if (acmoe__kernel_for((acmoe_isa)isa, &k) != ACMOE_OK) continue;
        for (n = 1; n <= max_n; n = n == 40 ? max_n : n + 1) {
            for (with_add = 0; with_add < 2; with_add++) {
                for (i = 0; i < n; i++) {
                    x[i] = 3.0f * acmoe_rng_normal(&rng) + 1.0f, add[i] = acmoe_rng_normal(&rng);
                    g[i] = 1.0f + 0.5f * acmoe_rng_normal(&rng), b[i] = 0.5f * acmoe_rng_normal(&rng);
                    dy[i] = acmoe_rng_normal(&rng), dx[i] = 1.0f;
                }
                want_rstd = reference_layernorm_row(x, with_add ? add : NULL, g, b, dy, n, want_xhat, want_y, want_dx);
                rstd = k.row_layernorm(xhat, y, x, with_add ? add : NULL, g, b, n);
                k.row_layernorm_backward(dx, dy, xhat, g, rstd, n, with_add); /* added to ones, or written */
                bad = !(fabs(rstd - want_rstd) <= 1e-5 * want_rstd);
                for (i = 0; i < n; i++)
                    bad += !(fabs(xhat[i] - want_xhat[i]) <= 1e-5 && fabs(y[i] - want_y[i]) <= 1e-5 * (1.0 + fabs(want_y[i])) &&
                             fabs(dx[i] - with_add - want_dx[i]) <= 1e-4 * (1.0 + fabs(want_dx[i])));
                CHECKF(bad == 0, "%s path, n %d, residual %d: %d values off", acmoe_isa_name(k.isa), n, with_add, bad);
            }
        }
    }
}

/* The gain, bias and bias-only column sums of a layer norm's backward pass, by blocks of rows:
   against double-precision sums for row counts below, at and above the block count, the
   same bits on 1, 2 and 3 threads, and close to them where the context's packing space is
   too small for the partials (the pass split by columns). Every sum starts from a nonzero
   value, as the gradients accumulate. */
static void test_column_sums(void) {
    enum { d = 24, max_rows = 300, contexts = 4 };
    const int row_counts[4] = {1, ACMOE__SUM_BLOCKS - 3, ACMOE__SUM_BLOCKS, max_rows};
    float *dy = (float *)malloc(sizeof(float) * max_rows * d), *xhat = (float *)malloc(sizeof(float) * max_rows * d);
    float *dx = (float *)malloc(sizeof(float) * max_rows * d), rstd[max_rows], g[d];
    float sums[contexts][3][d];
    double want[3][d];
    acmoe_ctx *ctx[contexts];
    acmoe_rng rng;
    int c, r, q, s, rows, bad;
    acmoe_rng_seed(&rng, 23);
    for (c = 0; c < 3; c++) ctx[c] = test_context(c + 1, 0, 0, 0);
    ctx[3] = test_context(2, 8, 4, 16); /* a depth block of 4: no room for the partials */
    CHECK(acmoe__sum_partials(ctx[0], ACMOE__SUM_BLOCKS, 2, d) != NULL &&
          acmoe__sum_partials(ctx[3], ACMOE__SUM_BLOCKS, 1, d) == NULL);
    for (r = 0; r < max_rows * d; r++) dy[r] = acmoe_rng_normal(&rng), xhat[r] = acmoe_rng_normal(&rng);
    for (r = 0; r < max_rows; r++) rstd[r] = 1.0f + acmoe_rng_uniform(&rng);
    for (q = 0; q < d; q++) g[q] = acmoe_rng_normal(&rng);
    for (s = 0; s < 4; s++) {
        rows = row_counts[s];
        for (q = 0; q < d; q++) {
            want[0][q] = want[1][q] = want[2][q] = 0.5;
            for (r = 0; r < rows; r++) {
                want[0][q] += (double)dy[r * d + q] * xhat[r * d + q];
                want[1][q] += dy[r * d + q], want[2][q] += dy[r * d + q];
            }
        }
        for (c = 0; c < contexts; c++) {
            for (q = 0; q < d; q++) sums[c][0][q] = sums[c][1][q] = sums[c][2][q] = 0.5f;
            acmoe__layernorm_backward(ctx[c], dy, xhat, rstd, rows, d, g, sums[c][0], sums[c][1], dx, NULL);
            acmoe__rows(ctx[c], ACMOE__ROWS_BIAS_GRAD, sums[c][2], dy, NULL, rows, d);
            for (bad = 0, q = 0; q < 3 * d; q++)
                bad += !(fabs(sums[c][q / d][q % d] - want[q / d][q % d]) <= 1e-5 * rows);
            CHECKF(bad == 0, "%d rows, context %d: %d sums off", rows, c, bad);
        }
        CHECKF(memcmp(sums[0], sums[1], sizeof sums[0]) == 0 && memcmp(sums[0], sums[2], sizeof sums[0]) == 0,
               "%d rows: the thread count changed the bits", rows);
    }
    for (c = 0; c < contexts; c++) acmoe_ctx_destroy(ctx[c]);
    free(dy), free(xhat), free(dx);
}

/* Tokens for the AC statistics tests: cluster 0 takes about half, cluster 2 none, labels
   read with a stride of 2; x drawn around 1; the host's kernels and the default options. */
static void ac_statistics_setup(uint64_t seed, int n, int k_rows, int32_t *labels, int *count, float *x, int x_count,
                                acmoe__kernel *kern, acmoe_ac_desc *desc) {
    acmoe_rng rng;
    int t, c, i;
    acmoe_rng_seed(&rng, seed);
    acmoe__host_kernel(kern);
    memset(desc, 0, sizeof *desc);
    CHECK_STATUS(acmoe__ac_resolve(desc, desc), ACMOE_OK);
    for (t = 0; t < n; t++) {
        c = t % 2 ? 0 : 1 + (int)acmoe_rng_below(&rng, (uint32_t)k_rows - 1);
        labels[2 * t] = c == 2 ? 3 : c, labels[2 * t + 1] = 2;
    }
    acmoe__ac_counts(labels, 2, n, k_rows, count);
    for (i = 0; i < x_count; i++) x[i] = 3.0f * acmoe_rng_normal(&rng) + 1.0f;
}

/* The AC dispersion in parts (one a thread): every cell (cluster, feature) written by exactly
   one part, with the bits of plain float sums in token order, whatever the number of parts;
   clusters of no tokens, a dominant cluster, a ragged last block of features, labels read
   with a stride; mean absolute deviation and variance. No part holds more than its share of
   the tokens' features and one block of the largest cluster. */
static void test_ac_dispersion_parts(void) {
    enum { n = 203, k_rows = 7, max_d = 37, max_parts = 5 };
    const int widths[3] = {1, 16, max_d};
    const float untouched = -1234.5f;
    static float x[n * max_d], mu[k_rows * max_d], w[k_rows * max_d], want_mu[k_rows * max_d], want_w[k_rows * max_d];
    float got_mu[k_rows * max_d], got_w[k_rows * max_d];
    int32_t labels[2 * n];
    int count[k_rows], writers[k_rows * max_d], t, c, q, i, v, parts, part, bad, largest = 0;
    acmoe__kernel kern;
    acmoe_ac_desc desc;
    ac_statistics_setup(29, n, k_rows, labels, count, x, n * max_d, &kern, &desc);
    CHECK(count[2] == 0 && count[0] > n / 3 && count[k_rows - 1] > 0);
    for (c = 0; c < k_rows; c++) largest = count[c] > largest ? count[c] : largest;
    for (i = 0; i < 6; i++) {
        const int d = widths[i % 3];
        desc.dispersion = i < 3 ? ACMOE_AC_DISP_MAD : ACMOE_AC_DISP_VARIANCE;
        memset(want_mu, 0, sizeof want_mu), memset(want_w, 0, sizeof want_w);
        for (t = 0; t < n; t++)
            for (q = 0; q < d; q++) want_mu[labels[2 * t] * d + q] += x[t * d + q];
        for (c = 0; c < k_rows; c++)
            for (q = 0; q < d && count[c]; q++) want_mu[c * d + q] /= (float)count[c];
        for (t = 0; t < n; t++)
            for (q = 0; q < d; q++) {
                const float dev = x[t * d + q] - want_mu[labels[2 * t] * d + q];
                want_w[labels[2 * t] * d + q] += i < 3 ? fabsf(dev) : dev * dev;
            }
        for (c = 0; c < k_rows; c++)
            for (q = 0; q < d && count[c]; q++) want_w[c * d + q] /= (float)count[c];
        for (parts = 1; parts <= max_parts; parts++) {
            memset(writers, 0, sizeof writers);
            for (part = 0; part < parts; part++) {
                long work = 0;
                for (v = 0; v < k_rows * d; v++) mu[v] = w[v] = untouched;
                acmoe__ac_dispersion_part(&desc, &kern, x, n, d, labels, 2, k_rows, count, mu, w, part, parts);
                for (v = 0; v < k_rows * d; v++)
                    if (mu[v] != untouched || w[v] != untouched)
                        writers[v]++, got_mu[v] = mu[v], got_w[v] = w[v], work += count[v / d];
                CHECKF(work <= (long)n * d / parts + 16L * largest, "d %d, part %d of %d: %ld of %d tokens' features",
                       d, part, parts, work, n * d);
            }
            for (bad = 0, v = 0; v < k_rows * d; v++) bad += writers[v] != 1;
            CHECKF(bad == 0, "d %d, %d parts: %d cells not written by exactly one part", d, parts, bad);
            CHECKF(memcmp(got_mu, want_mu, sizeof(float) * k_rows * d) == 0 &&
                       memcmp(got_w, want_w, sizeof(float) * k_rows * d) == 0,
                   "d %d, %d parts, %s: not the plain sums' bits", d, parts, i < 3 ? "MAD" : "variance");
        }
    }
}

/* The AC statistics by blocks of tokens, their steps run as by 1 to 5 threads: the bits of
   plain float sums within each block in token order, then over the blocks in block order,
   whatever the thread count; a dominant cluster, a cluster of no tokens, a ragged last
   block of features, labels read with a stride; mean absolute deviation and variance. */
static void test_ac_statistics_blocks(void) {
    enum { n = 203, k_rows = 5, max_d = 37, max_threads = 5 };
    const int widths[3] = {1, 16, max_d};
    static float x[n * max_d], partials[ACMOE__AC_BLOCKS * k_rows * max_d];
    static float block_sum[ACMOE__AC_BLOCKS][k_rows * max_d];
    float mu[k_rows * max_d], w[k_rows * max_d], want_mu[k_rows * max_d], want_w[k_rows * max_d];
    int32_t labels[2 * n];
    int count[k_rows], t, q, i, b, step, threads, tid;
    acmoe__kernel kern;
    acmoe_ac_desc desc;
    ac_statistics_setup(31, n, k_rows, labels, count, x, n * max_d, &kern, &desc);
    CHECK(count[2] == 0 && acmoe__ac_by_blocks(n, k_rows) && !acmoe__ac_by_blocks(n, n / ACMOE__AC_BLOCKS + 1));
    for (i = 0; i < 6; i++) {
        const int d = widths[i % 3], variance = i >= 3;
        acmoe__ac_blocks blocks;
        float *want[2];
        want[0] = want_mu, want[1] = want_w;
        desc.dispersion = variance ? ACMOE_AC_DISP_VARIANCE : ACMOE_AC_DISP_MAD;
        blocks = acmoe__ac_blocks_of(&desc, &kern, x, n, d, labels, 2, k_rows, count, mu, w, partials);
        for (step = 0; step < 2; step++) { /* the means, then the dispersions around them */
            for (b = 0; b < ACMOE__AC_BLOCKS; b++) {
                float sum[k_rows * max_d] = {0};
                const int t1 = acmoe__block_row(n, b + 1, ACMOE__AC_BLOCKS);
                for (t = acmoe__block_row(n, b, ACMOE__AC_BLOCKS); t < t1; t++)
                    for (q = 0; q < d; q++) {
                        const int at = labels[2 * t] * d + q;
                        const float dev = x[t * d + q] - want_mu[at];
                        sum[at] += step == 0 ? x[t * d + q] : variance ? dev * dev : fabsf(dev);
                    }
                for (q = 0; q < k_rows * d; q++) block_sum[b][q] = sum[q];
            }
            for (q = 0; q < k_rows * d; q++) {
                float total = 0.0f;
                for (b = 0; b < ACMOE__AC_BLOCKS; b++) total += block_sum[b][q];
                want[step][q] = count[q / d] ? total / (float)count[q / d] : total;
            }
        }
        for (threads = 1; threads <= max_threads; threads++) {
            memset(mu, 0xff, sizeof mu), memset(w, 0xff, sizeof w);
            for (step = 0; step < 4; step++)
                for (tid = 0; tid < threads; tid++) acmoe__ac_blocks_step(&blocks, step, tid, threads);
            CHECKF(memcmp(mu, want_mu, sizeof(float) * k_rows * d) == 0 &&
                       memcmp(w, want_w, sizeof(float) * k_rows * d) == 0,
                   "d %d, %d threads, %s: not the block sums' bits", d, threads, variance ? "variance" : "MAD");
        }
    }
}

/* The largest |got - want| over n floats, relative to the largest |want|. */
static double relative_gap(const float *got, const float *want, size_t n) {
    double gap = 0.0, scale = 1e-30;
    size_t i;
    for (i = 0; i < n; i++) {
        const double g = fabs((double)got[i] - want[i]), w = fabs((double)want[i]);
        if (g > gap) gap = g;
        if (w > scale) scale = w;
    }
    return gap / scale;
}

/* AC with its router input in tiles (acmoe__ac_in_tiles): the logits have the bits of the
   product over the input written out, and the embeddings' gradient is that product's to
   rounding; one thread and two give the same bits; a context without room for the tiles
   writes the input out, in the forward pass, or in the backward pass of a layer whose
   forward pass kept it in tiles. */
static void test_ac_tiles(void) {
    enum { n = 400, dm = 32, e = 16 };
    static float x[n * dm], dout[n * dm], out[n * dm], dx[n * dm], first_out[n * dm], first_dx[n * dm];
    static float logits[n * e], want_logits[n * e], want_dehat[e * dm];
    acmoe_ctx *ctx[3];
    acmoe_moe_desc d;
    acmoe_moe *layer = NULL;
    acmoe_rng rng;
    float *params, *grads, *first_grads;
    int32_t prev[n * 2];
    size_t count, i;
    int t, c;
    memset(&d, 0, sizeof d);
    d.d_model = dm, d.d_ff = 16, d.n_experts = e, d.top_k = 2, d.max_tokens = n;
    CHECK_STATUS(acmoe_moe_router_preset(&d, 'c'), ACMOE_OK);
    count = acmoe_moe_param_count(&d);
    params = (float *)malloc(sizeof(float) * count);
    grads = (float *)calloc(count, sizeof(float));
    first_grads = (float *)malloc(sizeof(float) * count);
    CHECK_STATUS(acmoe_moe_create(&layer, &d, params, grads), ACMOE_OK);
    acmoe_rng_seed(&rng, 61);
    acmoe_moe_init_params(layer, &rng);
    for (i = 0; i < (size_t)n * dm; i++) x[i] = acmoe_rng_normal(&rng), dout[i] = acmoe_rng_normal(&rng);
    for (t = 0; t < n; t++) prev[2 * t] = (int32_t)acmoe_rng_below(&rng, e), prev[2 * t + 1] = (prev[2 * t] + 1) % e;
    ctx[0] = test_context(1, 0, 0, 0);
    ctx[1] = test_context(2, 0, 0, 0);
    ctx[2] = test_context(1, 12, 4, 16); /* no room for two tiles of 6 rows */
    CHECK_STATUS(acmoe_moe_forward(layer, ctx[0], x, n, prev, NULL, 2, first_out), ACMOE_OK);
    CHECK(layer->u_in_tiles && acmoe__ac_input_grad_rows(layer, ctx[0]) < n / ACMOE__AC_BLOCKS);
    memcpy(logits, layer->logits, sizeof logits);
    CHECK_STATUS(acmoe_moe_backward(layer, ctx[0], dout, first_dx), ACMOE_OK);
    memcpy(first_grads, grads, sizeof(float) * count);
    /* the same products over u written out */
    acmoe__times_token_weights(layer, ctx[0], x, n, layer->xr, 0);
    CHECK_STATUS(acmoe_matmul(ctx[0], ACMOE_NT, n, e, dm, layer->xr, dm, layer->ehat, dm, want_logits, e, 0), ACMOE_OK);
    CHECK_STATUS(acmoe_matmul(ctx[0], ACMOE_TN, e, dm, n, layer->dz, e, layer->xr, dm, want_dehat, dm, 0), ACMOE_OK);
    CHECK(memcmp(logits, want_logits, sizeof logits) == 0);
    CHECKF(relative_gap(layer->dehat, want_dehat, (size_t)e * dm) < 1e-5, "embedding gradient off by %g",
           relative_gap(layer->dehat, want_dehat, (size_t)e * dm));
    for (c = 1; c < 3; c++) {
        memset(grads, 0, sizeof(float) * count);
        CHECK_STATUS(acmoe_moe_forward(layer, ctx[c], x, n, prev, NULL, 2, out), ACMOE_OK);
        CHECK(layer->u_in_tiles == (c == 1));
        CHECK_STATUS(acmoe_moe_backward(layer, ctx[c], dout, dx), ACMOE_OK);
        if (c == 1)
            CHECK(memcmp(out, first_out, sizeof out) == 0 && memcmp(dx, first_dx, sizeof dx) == 0 &&
                  memcmp(grads, first_grads, sizeof(float) * count) == 0);
        else
            CHECK(relative_gap(out, first_out, (size_t)n * dm) < 1e-5 && relative_gap(dx, first_dx, (size_t)n * dm) < 1e-5 &&
                  relative_gap(grads, first_grads, count) < 1e-5);
    }
    memset(grads, 0, sizeof(float) * count); /* forward in tiles, backward on a context without them */
    CHECK_STATUS(acmoe_moe_forward(layer, ctx[0], x, n, prev, NULL, 2, out), ACMOE_OK);
    CHECK(layer->u_in_tiles);
    CHECK_STATUS(acmoe_moe_backward(layer, ctx[2], dout, dx), ACMOE_OK);
    CHECK(!layer->u_in_tiles && relative_gap(dx, first_dx, (size_t)n * dm) < 1e-5 &&
          relative_gap(grads, first_grads, count) < 1e-5);
    for (c = 0; c < 3; c++) acmoe_ctx_destroy(ctx[c]);
    acmoe_moe_destroy(layer);
    free(params), free(grads), free(first_grads);
}

/* Dropout's backward pass against finite differences along a random direction: dense
   layers (no routing decision to hold still), with the model's generator rewound before
   every forward pass so each one drops the same units; post-LN and pre-LN. */
static void test_lm_dropout_gradient(void) {
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    int32_t tok[10], tgt[10];
    int pre, i;
    for (i = 0; i < 10; i++) tok[i] = (i * 7) % 11, tgt[i] = (i * 5 + 3) % 11;
    for (pre = 0; pre < 2; pre++) {
        acmoe_lm_desc d;
        acmoe_lm *lm = NULL;
        acmoe_rng start, rng;
        float loss = 0.0f, *params, *saved, *dir;
        double dot = 0.0, up, down, numeric;
        const float h = 2e-4f; /* small: the direction moves every parameter at once */
        size_t n, c;
        memset(&d, 0, sizeof d);
        d.vocab = 11, d.d_model = 8, d.n_heads = 2, d.seq_len = 5, d.batch = 2, d.pattern = "ff", d.d_ff = 6;
        d.activation = ACMOE_ACT_GELU, d.pre_ln = pre, d.dropout = 0.3f, d.seed = 3;
        CHECK_STATUS(acmoe_lm_create(&lm, &d), ACMOE_OK);
        if (!lm) continue;
        n = acmoe_lm_param_count(lm), params = acmoe_lm_params(lm);
        saved = (float *)malloc(sizeof(float) * n), dir = (float *)malloc(sizeof(float) * n);
        memcpy(saved, params, sizeof(float) * n);
        start = lm->rng;
        CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, &loss), ACMOE_OK);
        acmoe_lm_zero_grad(lm);
        CHECK_STATUS(acmoe_lm_backward(lm, ctx), ACMOE_OK);
        acmoe_rng_seed(&rng, 4);
        for (c = 0; c < n; c++) dir[c] = acmoe_rng_normal(&rng), dot += (double)dir[c] * acmoe_lm_grads(lm)[c];
        for (c = 0; c < n; c++) params[c] = saved[c] + h * dir[c];
        lm->rng = start;
        CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, &loss), ACMOE_OK);
        up = loss;
        for (c = 0; c < n; c++) params[c] = saved[c] - h * dir[c];
        lm->rng = start;
        CHECK_STATUS(acmoe_lm_forward(lm, ctx, tok, tgt, 2, 5, 1, &loss), ACMOE_OK);
        down = loss;
        numeric = (up - down) / (2.0 * h);
        CHECKF(fabs(numeric - dot) <= 1e-2 * fabs(dot) + 1e-3, "pre-LN %d: numeric %.6g, analytic %.6g", pre, numeric,
               dot);
        free(saved), free(dir);
        acmoe_lm_destroy(lm);
    }
    acmoe_ctx_destroy(ctx);
}

/* Damaged tokens: none at share 0, about the share times (vocab - 1) / vocab changed
   otherwise (within four standard deviations), every new token inside the vocabulary. */
static void test_corrupt_tokens(void) {
    enum { n = 100000, vocab = 10 };
    static int32_t tok[n];
    const float shares[3] = {0.0f, 0.3f, 1.0f};
    acmoe_rng rng;
    int s, i;
    acmoe_rng_seed(&rng, 17);
    for (s = 0; s < 3; s++) {
        const double changes = shares[s] * (vocab - 1) / vocab; /* a drawn token can equal the old one */
        const double expect = n * changes, sd = sqrt(n * changes * (1.0 - changes));
        int changed = 0, inside = 1;
        memset(tok, 0, sizeof tok);
        acmoe__corrupt_tokens(tok, n, shares[s], vocab, &rng);
        for (i = 0; i < n; i++) changed += tok[i] != 0, inside &= tok[i] >= 0 && tok[i] < vocab;
        CHECKF(inside && fabs(changed - expect) <= 4.0 * sd, "share %g: %d changed, %g expected", shares[s], changed,
               expect);
    }
}

const test_case internal_tests[] = {
    {"row_kernels", test_row_kernels},
    {"attention_blocks", test_attention_blocks},
    {"tall_kernel", test_tall_kernel},
    {"transpose", test_transpose},
    {"epilogue", test_epilogue},
    {"top16", test_top16},
    {"row_adam", test_row_adam},
    {"row_layernorm", test_row_layernorm},
    {"column_sums", test_column_sums},
    {"ac_dispersion_parts", test_ac_dispersion_parts},
    {"ac_statistics_blocks", test_ac_statistics_blocks},
    {"ac_tiles", test_ac_tiles},
    {"lm_dropout_gradient", test_lm_dropout_gradient},
    {"corrupt_tokens", test_corrupt_tokens},
    {0, 0},
};
