/* Runs every test case and ends with the line "N passed, N failed". Arguments are
   substrings: when given, only cases whose name contains one of them run. */
#include <stdlib.h>
#include <string.h>

#include "harness.h"

int test_case_failures;

static const test_case *const suites[] = {foundation_tests, internal_tests, router_tests, moe_tests, lm_tests,
                                          hardening_tests};

static int selected(const char *name, int argc, char **argv) {
    int i;
    if (argc < 2) return 1;
    for (i = 1; i < argc; i++)
        if (strstr(name, argv[i])) return 1;
    return 0;
}

int main(int argc, char **argv) {
    int passed = 0, failed = 0;
    size_t s;
    const test_case *t;
    for (s = 0; s < sizeof suites / sizeof suites[0]; s++) {
        for (t = suites[s]; t->name; t++) {
            if (!selected(t->name, argc, argv)) continue;
            test_case_failures = 0;
            t->fn();
            if (test_case_failures) {
                failed++;
                printf("FAIL %s\n", t->name);
            } else {
                passed++;
                printf("ok   %s\n", t->name);
            }
            fflush(stdout);
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
