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
