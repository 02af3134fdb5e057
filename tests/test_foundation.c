/* Foundation: status codes, memory, random numbers, contexts and matmul. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../acmoe.h"
#include "harness.h"

/* ---- helpers ---- */

static void fill_uniform(acmoe_rng *rng, float *x, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) x[i] = 2.0f * acmoe_rng_uniform(rng) - 1.0f;
}

/* The ISA paths this CPU can run, scalar first. */
static int supported_isas(acmoe_isa *out) {
    int n = 0, i;
    for (i = ACMOE_ISA_SCALAR; i < ACMOE_ISA_COUNT; i++)
        if (acmoe_isa_supported((acmoe_isa)i)) out[n++] = (acmoe_isa)i;
    return n;
}

static const char *layout_name(acmoe_layout l) {
    static const char *names[] = {"NN", "NT", "TN", "TT"};
    return names[l];
}

/* A matmul problem with operands laid out for its layout, padded leading dimensions. */
typedef struct problem {
    acmoe_layout layout;
    int m, n, k, lda, ldb, ldc;
    float *a, *b, *c0; /* c0: the values C holds before an accumulating call */
} problem;

static void problem_make(problem *p, acmoe_rng *rng, acmoe_layout layout, int m, int n, int k, int pad) {
    int ta = layout == ACMOE_TN || layout == ACMOE_TT, tb = layout == ACMOE_NT || layout == ACMOE_TT;
    size_t a_rows = (size_t)(ta ? k : m), b_rows = (size_t)(tb ? n : k);
    p->layout = layout;
    p->m = m, p->n = n, p->k = k;
    p->lda = (ta ? m : k) + pad;
    p->ldb = (tb ? k : n) + pad;
    p->ldc = n + pad;
    p->a = (float *)malloc(sizeof(float) * (a_rows * (size_t)p->lda + 1));
    p->b = (float *)malloc(sizeof(float) * (b_rows * (size_t)p->ldb + 1));
    p->c0 = (float *)malloc(sizeof(float) * ((size_t)m * (size_t)p->ldc + 1));
    fill_uniform(rng, p->a, a_rows * (size_t)p->lda);
    fill_uniform(rng, p->b, b_rows * (size_t)p->ldb);
    fill_uniform(rng, p->c0, (size_t)m * (size_t)p->ldc);
}

static void problem_free(problem *p) {
    free(p->a);
    free(p->b);
    free(p->c0);
}

static float op_a(const problem *p, int i, int q) {
    int ta = p->layout == ACMOE_TN || p->layout == ACMOE_TT;
    return ta ? p->a[(size_t)q * p->lda + i] : p->a[(size_t)i * p->lda + q];
}

static float op_b(const problem *p, int q, int j) {
    int tb = p->layout == ACMOE_NT || p->layout == ACMOE_TT;
    return tb ? p->b[(size_t)j * p->ldb + q] : p->b[(size_t)q * p->ldb + j];
}

/* |c - exact| <= gamma_(k+1) * (sum |a b| + |c0|): the float error bound of any summation
   order, with the exact value taken in double. */
static int entry_ok(const problem *p, const float *c, int accumulate, int i, int j) {
    double ref = accumulate ? p->c0[(size_t)i * p->ldc + j] : 0.0, mag = fabs(ref), got, tol;
    int q;
    for (q = 0; q < p->k; q++) {
        double t = (double)op_a(p, i, q) * (double)op_b(p, q, j);
        ref += t;
        mag += fabs(t);
    }
    got = c[(size_t)i * p->ldc + j];
    tol = (p->k + 2) * 1.2e-7 * mag + 1e-30;
    if (fabs(got - ref) <= tol) return 1;
    fprintf(stderr, "    %s m=%d n=%d k=%d acc=%d: C[%d][%d] = %.9g, reference %.9g\n",
            layout_name(p->layout), p->m, p->n, p->k, accumulate, i, j, got, ref);
    return 0;
}

/* Checks every entry of small outputs; of large ones, the border rows and columns and a
   random sample (each entry costs k in the reference). */
static int result_ok(const problem *p, const float *c, int accumulate, acmoe_rng *rng) {
    int i, j, s;
    if ((double)p->m * p->n * p->k <= 4e6) {
        for (i = 0; i < p->m; i++)
            for (j = 0; j < p->n; j++)
                if (!entry_ok(p, c, accumulate, i, j)) return 0;
    } else {
        for (i = 0; i < p->m; i++)
            if (!entry_ok(p, c, accumulate, i, 0) || !entry_ok(p, c, accumulate, i, p->n - 1)) return 0;
        for (j = 0; j < p->n; j++)
            if (!entry_ok(p, c, accumulate, 0, j) || !entry_ok(p, c, accumulate, p->m - 1, j)) return 0;
        for (s = 0; s < 400; s++)
            if (!entry_ok(p, c, accumulate, (int)acmoe_rng_below(rng, (uint32_t)p->m),
                          (int)acmoe_rng_below(rng, (uint32_t)p->n)))
                return 0;
    }
    /* padding between rows is never written */
    for (i = 0; i < p->m; i++)
        for (j = p->n; j < p->ldc; j++)
            if (c[(size_t)i * p->ldc + j] != p->c0[(size_t)i * p->ldc + j]) return 0;
    return 1;
}

/* ACMOE_TEST_QUICK in the environment (sanitizer and emulator runs) skips the largest shapes. */
static int quick_mode(void) { return getenv("ACMOE_TEST_QUICK") != NULL; }

/* Runs one problem in both modes on every ISA path of ctx's CPU, or on the best one only;
   returns failures. */
static int check_problem(acmoe_ctx *ctx, const problem *p, acmoe_rng *rng, int best_only) {
    acmoe_isa isas[ACMOE_ISA_COUNT];
    int n_isa = best_only ? 1 : supported_isas(isas), v, accumulate, failures = 0;
    if (best_only) isas[0] = acmoe_cpu_isa();
    size_t c_len = (size_t)p->m * (size_t)p->ldc;
    float *c = (float *)malloc(sizeof(float) * (c_len + 1));
    for (v = 0; v < n_isa; v++) {
        CHECK_STATUS(acmoe_ctx_set_isa(ctx, isas[v]), ACMOE_OK);
        for (accumulate = 0; accumulate <= 1; accumulate++) {
            acmoe_status s;
            memcpy(c, p->c0, sizeof(float) * c_len);
            s = acmoe_matmul(ctx, p->layout, p->m, p->n, p->k, p->a, p->lda, p->b, p->ldb, c, p->ldc, accumulate);
            if (s != ACMOE_OK || !result_ok(p, c, accumulate, rng)) {
                fprintf(stderr, "    failed on the %s path (status %d)\n", acmoe_isa_name(isas[v]), (int)s);
                failures++;
            }
        }
    }
    CHECK_STATUS(acmoe_ctx_set_isa(ctx, ACMOE_ISA_AUTO), ACMOE_OK);
    free(c);
    return failures;
}

/* One shape in all four layouts; returns failures. */
static int check_layouts(acmoe_ctx *ctx, acmoe_rng *rng, int m, int n, int k, int pad, int best_only) {
    int layout, failures = 0;
    for (layout = ACMOE_NN; layout <= ACMOE_TT; layout++) {
        problem p;
        problem_make(&p, rng, (acmoe_layout)layout, m, n, k, pad);
        failures += check_problem(ctx, &p, rng, best_only);
        problem_free(&p);
    }
    return failures;
}

/* ---- status and CPU ---- */

static void test_status_strings(void) {
    static const acmoe_status all[] = {ACMOE_STOPPED, ACMOE_OK, ACMOE_ERR_NULL, ACMOE_ERR_SHAPE, ACMOE_ERR_ARG,
                                       ACMOE_ERR_NOMEM, ACMOE_ERR_UNSUPPORTED, ACMOE_ERR_THREAD, ACMOE_ERR_NONFINITE,
                                       ACMOE_ERR_IO, ACMOE_ERR_FORMAT, ACMOE_ERR_EMPTY, ACMOE_ERR_DIVERGED};
    size_t i, j, n = sizeof all / sizeof all[0];
    for (i = 0; i < n; i++) {
        CHECK(acmoe_status_string(all[i]) && strlen(acmoe_status_string(all[i])) > 1);
        for (j = 0; j < i; j++) CHECK(strcmp(acmoe_status_string(all[i]), acmoe_status_string(all[j])) != 0);
        CHECK(all[i] == ACMOE_OK || all[i] == ACMOE_STOPPED || all[i] < 0);
    }
    CHECK(strcmp(acmoe_status_string((acmoe_status)-999), "unknown status") == 0);
}

static void test_cpu_isa(void) {
    acmoe_isa best = acmoe_cpu_isa();
    CHECK(acmoe_isa_supported(ACMOE_ISA_SCALAR));
    CHECK(acmoe_isa_supported(best));
    CHECK(!acmoe_isa_supported(ACMOE_ISA_AUTO));
    CHECK(!acmoe_isa_supported(ACMOE_ISA_COUNT));
#if defined(__x86_64__)
    CHECK(!acmoe_isa_supported(ACMOE_ISA_NEON));
#if !defined(ACMOE_NO_SIMD) && !defined(ACMOE_NO_AVX512)
    CHECK(best == ACMOE_ISA_AVX512 || best == ACMOE_ISA_AVX2 || best == ACMOE_ISA_SCALAR);
#endif
#elif defined(__aarch64__) && !defined(ACMOE_NO_SIMD)
    CHECK(best == ACMOE_ISA_NEON);
    CHECK(!acmoe_isa_supported(ACMOE_ISA_AVX2));
#endif
    /* run under an emulated CPU, the caller says which path its features allow */
    if (getenv("ACMOE_EXPECT_ISA"))
        CHECKF(strcmp(acmoe_isa_name(best), getenv("ACMOE_EXPECT_ISA")) == 0, "detected %s", acmoe_isa_name(best));
    CHECK(strcmp(acmoe_isa_name(ACMOE_ISA_AVX512), "avx512") == 0);
    CHECK(strcmp(acmoe_isa_name(ACMOE_ISA_COUNT), "unknown") == 0);
}

/* ---- random numbers ---- */

static void test_rng_known_answers(void) {
    /* xoshiro256** from state {1, 2, 3, 4}: the generator's published first outputs. */
    acmoe_rng rng;
    static const uint64_t from_1234[4] = {11520ull, 0ull, 1509978240ull, 1215971899390074240ull};
    static const uint64_t seed_42[4] = {0x15780b2e0c2ec716ull, 0x6104d9866d113a7eull,
                                        0xae17533239e499a1ull, 0xecb8ad4703b360a1ull};
    int i;
    memset(&rng, 0, sizeof rng);
    rng.s[0] = 1, rng.s[1] = 2, rng.s[2] = 3, rng.s[3] = 4;
    for (i = 0; i < 4; i++) CHECK(acmoe_rng_u64(&rng) == from_1234[i]);
    /* seeding: splitmix64 fills the state (splitmix64 of seed 0 starts 0xe220a8397b1dcdaf) */
    acmoe_rng_seed(&rng, 0);
    CHECK(rng.s[0] == 0xe220a8397b1dcdafull);
    acmoe_rng_seed(&rng, 42);
    for (i = 0; i < 4; i++) CHECK(acmoe_rng_u64(&rng) == seed_42[i]);
}

static void test_rng_distributions(void) {
    acmoe_rng rng, copy;
    double sum = 0, sum2 = 0, nsum = 0, nsum2 = 0, nsum4 = 0;
    int counts[7] = {0}, i, n = 200000, in_range = 1;
    acmoe_rng_seed(&rng, 7);
    for (i = 0; i < n; i++) {
        float u = acmoe_rng_uniform(&rng), z = acmoe_rng_normal(&rng);
        uint32_t b = acmoe_rng_below(&rng, 7);
        in_range &= u >= 0.0f && u < 1.0f && b < 7 && isfinite(z);
        sum += u, sum2 += (double)u * u;
        nsum += z, nsum2 += (double)z * z, nsum4 += (double)z * z * z * z;
        counts[b]++;
    }
    CHECK(in_range);
    CHECKF(fabs(sum / n - 0.5) < 0.005, "uniform mean %g", sum / n);
    CHECKF(fabs(sum2 / n - sum / n * (sum / n) - 1.0 / 12) < 0.002, "uniform variance");
    CHECKF(fabs(nsum / n) < 0.01, "normal mean %g", nsum / n);
    CHECKF(fabs(nsum2 / n - 1.0) < 0.02, "normal variance %g", nsum2 / n);
    CHECKF(fabs(nsum4 / n - 3.0) < 0.1, "normal kurtosis %g", nsum4 / n);
    for (i = 0; i < 7; i++) CHECKF(abs(counts[i] - n / 7) < n / 70, "below(7) count %d", counts[i]);
    /* the struct is the whole state, pending normal included */
    acmoe_rng_seed(&rng, 99);
    (void)acmoe_rng_normal(&rng);
    copy = rng;
    for (i = 0; i < 5; i++) CHECK(acmoe_rng_normal(&rng) == acmoe_rng_normal(&copy));
    CHECK(acmoe_rng_below(&rng, 1) == 0);
    acmoe_rng_seed(&copy, 100);
    CHECK(acmoe_rng_u64(&copy) != acmoe_rng_u64(&rng));
}

/* ---- contexts ---- */

static void test_ctx_desc(void) {
    acmoe_ctx_desc d = acmoe_ctx_defaults(), got, scalar;
    acmoe_ctx *ctx = NULL;
    CHECK(d.n_threads >= 1 && d.isa == acmoe_cpu_isa() && d.mc == 0 && d.kc == 0 && d.nc == 0);
    CHECK_STATUS(acmoe_ctx_create(&ctx, NULL), ACMOE_OK);
    got = acmoe_ctx_settings(ctx);
    CHECK(got.n_threads == d.n_threads && got.isa == d.isa && got.mc > 0 && got.kc > 0 && got.nc > 0);
    acmoe_ctx_destroy(ctx);
    /* defaults with another path: that path's blocking, as from a zeroed desc */
    d.isa = ACMOE_ISA_SCALAR;
    CHECK_STATUS(acmoe_ctx_create(&ctx, &d), ACMOE_OK);
    got = acmoe_ctx_settings(ctx);
    acmoe_ctx_destroy(ctx);
    memset(&d, 0, sizeof d);
    d.isa = ACMOE_ISA_SCALAR;
    CHECK_STATUS(acmoe_ctx_create(&ctx, &d), ACMOE_OK);
    scalar = acmoe_ctx_settings(ctx);
    CHECK(got.mc == scalar.mc && got.kc == scalar.kc && got.nc == scalar.nc);
    acmoe_ctx_destroy(ctx);
    memset(&d, 0, sizeof d);
    d.n_threads = -1;
    CHECK_STATUS(acmoe_ctx_create(&ctx, &d), ACMOE_ERR_ARG);
    CHECK(ctx == NULL);
    d.n_threads = 0;
    d.isa = ACMOE_ISA_COUNT;
    CHECK_STATUS(acmoe_ctx_create(&ctx, &d), ACMOE_ERR_ARG);
#if defined(__x86_64__)
    d.isa = ACMOE_ISA_NEON;
#else
    d.isa = ACMOE_ISA_AVX512;
#endif
    CHECK_STATUS(acmoe_ctx_create(&ctx, &d), ACMOE_ERR_UNSUPPORTED);
    CHECK_STATUS(acmoe_ctx_create(NULL, NULL), ACMOE_ERR_NULL);
    d.isa = ACMOE_ISA_SCALAR;
    d.mc = 5; /* rounded up to whole micro-panels */
    CHECK_STATUS(acmoe_ctx_create(&ctx, &d), ACMOE_OK);
    got = acmoe_ctx_settings(ctx);
    CHECK(got.isa == ACMOE_ISA_SCALAR && got.mc >= 5 && got.mc % 12 == 0);
    CHECK_STATUS(acmoe_ctx_set_isa(ctx, ACMOE_ISA_COUNT), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_ctx_set_isa(ctx, d.isa == ACMOE_ISA_SCALAR ? ACMOE_ISA_AUTO : d.isa), ACMOE_OK);
    CHECK(acmoe_ctx_settings(ctx).isa == acmoe_cpu_isa());
    CHECK_STATUS(acmoe_ctx_set_isa(NULL, ACMOE_ISA_SCALAR), ACMOE_ERR_NULL);
    acmoe_ctx_destroy(ctx);
    acmoe_ctx_destroy(NULL);
}

/* ---- matmul ---- */

static void test_matmul_tiny_exact(void) {
    /* small integers: every path must give the exact answer */
    float a[2 * 3] = {1, 2, 3, 4, 5, 6}, b[3 * 2] = {1, 0, 0, 1, 1, 1}, c[4];
    float want_nn[4] = {4, 5, 10, 11}, bt[2 * 3] = {1, 0, 1, 0, 1, 1};
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_isa isas[ACMOE_ISA_COUNT];
    int n = supported_isas(isas), v;
    for (v = 0; v < n; v++) {
        CHECK_STATUS(acmoe_ctx_set_isa(ctx, isas[v]), ACMOE_OK);
        CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 2, 3, a, 3, b, 2, c, 2, 0), ACMOE_OK);
        CHECK(memcmp(c, want_nn, sizeof c) == 0);
        CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NT, 2, 2, 3, a, 3, bt, 3, c, 2, 1), ACMOE_OK);
        CHECK(c[0] == 8 && c[1] == 10 && c[2] == 20 && c[3] == 22);
    }
    acmoe_ctx_destroy(ctx);
}

static void test_matmul_random_shapes(void) {
    acmoe_ctx *ctx = test_context(2, 0, 0, 0);
    acmoe_rng rng;
    int trial, failures = 0;
    acmoe_rng_seed(&rng, 1234);
    for (trial = 0; trial < 36; trial++) {
        /* a third of the trials stay tiny: edges of every micro-tile */
        int span = trial % 3 == 0 ? 20 : 300;
        int m = 1 + (int)acmoe_rng_below(&rng, (uint32_t)span), n = 1 + (int)acmoe_rng_below(&rng, (uint32_t)span);
        int k = 1 + (int)acmoe_rng_below(&rng, (uint32_t)span), pad = (int)acmoe_rng_below(&rng, 3);
        failures += check_layouts(ctx, &rng, m, n, k, pad, 0);
    }
    CHECKF(failures == 0, "%d failing runs", failures);
    acmoe_ctx_destroy(ctx);
}

/* Every bench and model shape, checked by sampling. */
static void test_matmul_model_shapes(void) {
    static const int shapes[][3] = {{64, 352, 352},   {256, 352, 352},   {512, 1408, 352}, {512, 352, 1408},
                                    {1024, 1024, 1024}, {4096, 128, 128}, {128, 128, 4096}, {2048, 2048, 2048},
                                    {20, 352, 352},   {352, 20, 352},    {352, 352, 20},   {1, 1024, 1},
                                    {48, 1024, 96}};
    acmoe_ctx *ctx = test_context(2, 0, 0, 0);
    acmoe_rng rng;
    size_t s;
    int failures = 0;
    acmoe_rng_seed(&rng, 99);
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        /* products of a GFLOP or more run on the best path only, and not in quick mode */
        int big = (double)shapes[s][0] * shapes[s][1] * shapes[s][2] >= 5e8;
        if (big && quick_mode()) continue;
        failures += check_layouts(ctx, &rng, shapes[s][0], shapes[s][1], shapes[s][2], 0, big);
    }
    CHECKF(failures == 0, "%d failing runs", failures);
    acmoe_ctx_destroy(ctx);
}

/* Tiny cache blocks: many column, depth and row blocks even for small products. */
static void test_matmul_small_blocks(void) {
    acmoe_ctx *ctx = test_context(3, 24, 7, 96);
    acmoe_rng rng;
    int trial, failures = 0;
    acmoe_rng_seed(&rng, 5);
    for (trial = 0; trial < 8; trial++) {
        int m = 1 + (int)acmoe_rng_below(&rng, 250), n = 1 + (int)acmoe_rng_below(&rng, 250);
        int k = 1 + (int)acmoe_rng_below(&rng, 60);
        failures += check_layouts(ctx, &rng, m, n, k, 1, 0);
    }
    CHECKF(failures == 0, "%d failing runs", failures);
    acmoe_ctx_destroy(ctx);
}

/* 1, 2 and 3 threads give the same bits on every path. */
static void test_matmul_thread_determinism(void) {
    static const int shapes[][3] = {{300, 280, 260}, {64, 352, 352}, {1000, 96, 200}, {20, 500, 100}, {7, 9, 1000}};
    acmoe_ctx *ctx[3];
    acmoe_isa isas[ACMOE_ISA_COUNT];
    acmoe_rng rng;
    int n_isa = supported_isas(isas), t, v, layout, same = 1;
    size_t s;
    for (t = 0; t < 3; t++) ctx[t] = test_context(t + 1, 0, 0, 0);
    acmoe_rng_seed(&rng, 3);
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        for (layout = ACMOE_NN; layout <= ACMOE_TT; layout++) {
            problem p;
            size_t len;
            float *c[3];
            problem_make(&p, &rng, (acmoe_layout)layout, shapes[s][0], shapes[s][1], shapes[s][2], 0);
            len = (size_t)p.m * p.ldc;
            for (v = 0; v < n_isa; v++) {
                for (t = 0; t < 3; t++) {
                    c[t] = (float *)malloc(sizeof(float) * len);
                    memcpy(c[t], p.c0, sizeof(float) * len);
                    CHECK_STATUS(acmoe_ctx_set_isa(ctx[t], isas[v]), ACMOE_OK);
                    CHECK_STATUS(acmoe_matmul(ctx[t], p.layout, p.m, p.n, p.k, p.a, p.lda, p.b, p.ldb, c[t], p.ldc, 1),
                                 ACMOE_OK);
                }
                for (t = 1; t < 3; t++) {
                    if (memcmp(c[0], c[t], sizeof(float) * len) != 0) {
                        fprintf(stderr, "    %s %dx%dx%d on %s: %d threads differ from 1\n", layout_name(p.layout),
                                p.m, p.n, p.k, acmoe_isa_name(isas[v]), t + 1);
                        same = 0;
                    }
                }
                for (t = 0; t < 3; t++) free(c[t]);
            }
            problem_free(&p);
        }
    }
    CHECK(same);
    for (t = 0; t < 3; t++) acmoe_ctx_destroy(ctx[t]);
}

/* A few output rows (or columns) alone get the bits they get among many: decoding one token,
   or an expert a few, at a time relies on it. Blocks of 1, 3 and 8 rows or columns (the
   column kernels take up to 8); depth blocks of 96 make the depth of 500 span several. */
static int rows_alone_match(acmoe_ctx *ctx, const problem *p, const float *c, int accumulate) {
    static const int widths[3] = {1, 3, 8};
    const int ta = p->layout == ACMOE_TN || p->layout == ACMOE_TT, tb = p->layout == ACMOE_NT || p->layout == ACMOE_TT;
    float *few = (float *)malloc(sizeof(float) * 8 * (size_t)(p->m > p->n ? p->m : p->n));
    int i, j, x, y, w, ok = 1;
    for (w = 0; w < 3; w++) {
        const int width = widths[w];
        for (i = 0; i + width <= p->m; i += 7) { /* rows i..: those rows of A with all of B */
            for (y = 0; y < width; y++)
                memcpy(few + (size_t)y * p->n, p->c0 + (size_t)(i + y) * p->ldc, sizeof(float) * (size_t)p->n);
            CHECK_STATUS(acmoe_matmul(ctx, p->layout, width, p->n, p->k, p->a + (ta ? (size_t)i : (size_t)i * p->lda),
                                      p->lda, p->b, p->ldb, few, p->n, accumulate), ACMOE_OK);
            for (y = 0; y < width; y++)
                ok &= memcmp(few + (size_t)y * p->n, c + (size_t)(i + y) * p->ldc, sizeof(float) * (size_t)p->n) == 0;
        }
        for (j = 0; j + width <= p->n; j += 11) { /* columns j..: all of A with those columns of B */
            for (x = 0; x < p->m; x++)
                for (y = 0; y < width; y++) few[(size_t)x * width + y] = p->c0[(size_t)x * p->ldc + j + y];
            CHECK_STATUS(acmoe_matmul(ctx, p->layout, p->m, width, p->k, p->a, p->lda,
                                      p->b + (tb ? (size_t)j * p->ldb : (size_t)j), p->ldb, few, width, accumulate),
                         ACMOE_OK);
            for (x = 0; x < p->m; x++)
                ok &= memcmp(few + (size_t)x * width, c + (size_t)x * p->ldc + j, sizeof(float) * (size_t)width) == 0;
        }
    }
    free(few);
    return ok;
}

static void test_matmul_rows_alone(void) {
    static const int shapes[][3] = {{40, 70, 500}, {20, 384, 128}, {300, 17, 33}};
    acmoe_ctx *ctx = test_context(1, 0, 96, 0);
    acmoe_isa isas[ACMOE_ISA_COUNT];
    acmoe_rng rng;
    int n_isa = supported_isas(isas), v, layout, accumulate, failures = 0;
    size_t s;
    acmoe_rng_seed(&rng, 8);
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        for (layout = ACMOE_NN; layout <= ACMOE_TT; layout++) {
            problem p;
            float *c;
            problem_make(&p, &rng, (acmoe_layout)layout, shapes[s][0], shapes[s][1], shapes[s][2], 3);
            c = (float *)malloc(sizeof(float) * (size_t)p.m * p.ldc);
            for (v = 0; v < n_isa; v++) {
                CHECK_STATUS(acmoe_ctx_set_isa(ctx, isas[v]), ACMOE_OK);
                for (accumulate = 0; accumulate < 2; accumulate++) {
                    memcpy(c, p.c0, sizeof(float) * (size_t)p.m * p.ldc);
                    CHECK_STATUS(acmoe_matmul(ctx, p.layout, p.m, p.n, p.k, p.a, p.lda, p.b, p.ldb, c, p.ldc, accumulate),
                                 ACMOE_OK);
                    if (!rows_alone_match(ctx, &p, c, accumulate)) {
                        fprintf(stderr, "    %s %dx%dx%d on %s: a row or column alone differs\n", layout_name(p.layout),
                                p.m, p.n, p.k, acmoe_isa_name(isas[v]));
                        failures++;
                    }
                }
            }
            free(c);
            problem_free(&p);
        }
    }
    CHECKF(failures == 0, "%d failing runs", failures);
    acmoe_ctx_destroy(ctx);
}

static void test_matmul_bad_input(void) {
    float a[12] = {0}, b[12] = {0}, c[12];
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    size_t i;
    CHECK_STATUS(acmoe_matmul(NULL, ACMOE_NN, 2, 2, 2, a, 2, b, 2, c, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_matmul(ctx, (acmoe_layout)7, 2, 2, 2, a, 2, b, 2, c, 2, 0), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, -1, 2, 2, a, 2, b, 2, c, 2, 0), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 2, -2, a, 2, b, 2, c, 2, 0), ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 3, 2, a, 2, b, 2, c, 3, 0), ACMOE_ERR_SHAPE); /* ldb < n */
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 3, 4, a, 3, b, 3, c, 3, 0), ACMOE_ERR_SHAPE); /* lda < k */
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_TN, 4, 2, 2, a, 3, b, 2, c, 2, 0), ACMOE_ERR_SHAPE); /* lda < m */
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NT, 2, 2, 3, a, 3, b, 2, c, 2, 0), ACMOE_ERR_SHAPE); /* ldb < k */
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 3, 2, a, 2, b, 3, c, 2, 0), ACMOE_ERR_SHAPE); /* ldc < n */
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 2, 2, NULL, 2, b, 2, c, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 2, 2, a, 2, NULL, 2, c, 2, 0), ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 2, 2, a, 2, b, 2, NULL, 2, 0), ACMOE_ERR_NULL);
    /* empty products: m or n of 0 touch nothing; k of 0 zeroes C or leaves it when accumulating */
    for (i = 0; i < 12; i++) c[i] = 5.0f;
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 0, 3, 2, NULL, 2, NULL, 3, NULL, 3, 0), ACMOE_OK);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 3, 0, 2, a, 2, b, 1, c, 1, 0), ACMOE_OK);
    CHECK(c[0] == 5.0f);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 3, 0, NULL, 1, NULL, 3, c, 4, 1), ACMOE_OK);
    CHECK(c[0] == 5.0f && c[6] == 5.0f);
    CHECK_STATUS(acmoe_matmul(ctx, ACMOE_NN, 2, 3, 0, NULL, 1, NULL, 3, c, 4, 0), ACMOE_OK);
    CHECK(c[0] == 0.0f && c[2] == 0.0f && c[3] == 5.0f && c[4] == 0.0f && c[6] == 0.0f && c[7] == 5.0f);
    acmoe_ctx_destroy(ctx);
}

/* The single-process communicator: rank 0 of 1, a sum and a broadcast change nothing, an
   exchange copies its one count, and another root or a count mismatch is refused. */
static void test_comm_single(void) {
    acmoe_comm comm = acmoe_comm_single();
    float data[3] = {1.5f, -2.0f, 3.25f}, out[3] = {0, 0, 0};
    size_t counts[1] = {3}, fewer[1] = {2};
    char byte = 'x';
    CHECK(comm.rank == 0 && comm.size == 1);
    CHECK_STATUS(comm.sum(&comm, data, 3), ACMOE_OK);
    CHECK(data[0] == 1.5f && data[1] == -2.0f && data[2] == 3.25f);
    CHECK_STATUS(comm.exchange(&comm, data, counts, out, counts), ACMOE_OK);
    CHECK(memcmp(data, out, sizeof data) == 0);
    CHECK_STATUS(comm.exchange(&comm, data, counts, out, fewer), ACMOE_ERR_SHAPE);
    CHECK_STATUS(comm.broadcast(&comm, &byte, 1, 0), ACMOE_OK);
    CHECK_STATUS(comm.broadcast(&comm, &byte, 1, 1), ACMOE_ERR_ARG);
    CHECK(byte == 'x');
    CHECK_STATUS(comm.barrier(&comm), ACMOE_OK);
}

const test_case foundation_tests[] = {
    {"status_strings", test_status_strings},
    {"cpu_isa", test_cpu_isa},
    {"rng_known_answers", test_rng_known_answers},
    {"rng_distributions", test_rng_distributions},
    {"ctx_desc", test_ctx_desc},
    {"comm_single", test_comm_single},
    {"matmul_tiny_exact", test_matmul_tiny_exact},
    {"matmul_random_shapes", test_matmul_random_shapes},
    {"matmul_model_shapes", test_matmul_model_shapes},
    {"matmul_small_blocks", test_matmul_small_blocks},
    {"matmul_thread_determinism", test_matmul_thread_determinism},
    {"matmul_rows_alone", test_matmul_rows_alone},
    {"matmul_bad_input", test_matmul_bad_input},
    {0, 0},
};
