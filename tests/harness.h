/* A small test harness: each TEST is one case; a case passes when none of its CHECKs fail. */
#ifndef ACMOE_TEST_HARNESS_H
#define ACMOE_TEST_HARNESS_H

#include <stdio.h>

typedef struct test_case {
    const char *name;
    void (*fn)(void);
} test_case;

extern int test_case_failures; /* CHECK failures in the running case */
extern long test_allocations;   /* calls of the library's allocator so far */
/* The library's allocator (impl.c): the call whose number (test_allocations before it) is
   test_fail_allocation returns NULL (-1: none); blocks now held; bytes ever requested. */
extern long test_fail_allocation;
extern long test_live_allocations;
extern unsigned long test_allocated_bytes;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            test_case_failures++;                                                        \
            fprintf(stderr, "    %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
        }                                                                                \
    } while (0)

/* CHECK with a printf-style explanation printed on failure. */
#define CHECKF(cond, ...)                                                                \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            test_case_failures++;                                                        \
            fprintf(stderr, "    %s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                \
            fprintf(stderr, "\n");                                                       \
        }                                                                                \
    } while (0)

#define CHECK_STATUS(expr, want) CHECKF((expr) == (want), "%s returned %d, expected %d", #expr, (int)(expr), (int)(want))

/* A context of n_threads (0: online CPUs) with cache blocks mc, kc, nc (0: defaults);
   checks that it was made. Defined with the implementation, in impl.c. */
struct acmoe_ctx *test_context(int n_threads, int mc, int kc, int nc);

/* Each test file exports one table, terminated by {0, 0}. */
extern const test_case foundation_tests[];
extern const test_case router_tests[];
extern const test_case moe_tests[];
extern const test_case lm_tests[];
extern const test_case hardening_tests[];
extern const test_case options_tests[];
extern const test_case internal_tests[]; /* in impl.c, beside the implementation */

#endif
