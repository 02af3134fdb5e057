/* The one translation unit of the test suite that holds the implementation. Its allocator
   counts calls, so tests can prove that a steady-state step allocates nothing. */
#include <stdlib.h>

long test_allocations;

static void *counting_malloc(size_t bytes) {
    test_allocations++;
    return malloc(bytes);
}

#define ACMOE_MALLOC(sz) counting_malloc(sz)
#define ACMOE_REALLOC(p, sz) (test_allocations++, realloc(p, sz))
#define ACMOE_FREE(p) free(p)
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
   exactly, each exp of a float argument to 1e-6 relative, sums and dot products to 1e-5 of
   their magnitude. */
static void check_row_kernels(const acmoe__kernel *k, acmoe_rng *rng, int n) {
    float x[1000], y[1000], b[1000], top = -1e30f, got;
    double sum = 0.0, dot = 0.0, magnitude = 0.0;
    const float scale = 0.7f;
    const char *path = acmoe_isa_name(k->isa);
    int i, exp_failures = 0;
    for (i = 0; i < n; i++) {
        x[i] = 35.0f * acmoe_rng_uniform(rng) - 30.0f;
        b[i] = 2.0f * acmoe_rng_uniform(rng) - 1.0f;
        top = x[i] > top ? x[i] : top;
        dot += (double)x[i] * b[i];
        magnitude += fabs((double)x[i] * b[i]);
    }
    CHECKF(k->row_max(x, n) == top, "%s, n %d", path, n);
    got = k->row_dot(x, b, n);
    CHECKF(fabs(got - dot) <= 1e-5 * magnitude, "%s, n %d: dot %g, want %g", path, n, got, dot);
    got = k->row_exp(y, x, n, top, scale);
    for (i = 0; i < n; i++) {
        float argument = (x[i] - top) * scale; /* rounded as the kernels round it */
        double want = exp((double)argument);
        sum += want;
        exp_failures += !(fabs(y[i] - want) <= 1e-6 * want);
    }
    CHECKF(exp_failures == 0, "%s, n %d: %d exp values off", path, n, exp_failures);
    CHECKF(fabs(got - sum) <= 1e-5 * sum, "%s, n %d: sum %g, want %g", path, n, got, sum);
    CHECK(k->row_exp(NULL, x, n, top, scale) == got); /* the sum alone: the same bits */
    CHECK(k->row_exp(x, x, n, top, scale) == got);    /* in place */
    for (i = 0; i < n; i++) CHECK(x[i] == y[i]);
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

const test_case internal_tests[] = {
    {"row_kernels", test_row_kernels},
    {0, 0},
};
