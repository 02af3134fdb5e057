/* Runs every test case and ends with the line "N passed, N failed". Arguments are
   substrings: when given, only cases whose name contains one of them run; an argument
   -SUBSTRING leaves out the cases whose name contains SUBSTRING. */
#include <stdlib.h>
#include <string.h>

#include "harness.h"

int test_case_failures;

static const test_case *const suites[] = {foundation_tests, internal_tests, router_tests, moe_tests, lm_tests,
                                          hardening_tests, options_tests};

static int selected(const char *name, int argc, char **argv) {
    int i, wanted = 1;
    for (i = 1; i < argc; i++)
        if (argv[i][0] != '-') wanted = 0; /* named cases only */
    for (i = 1; i < argc; i++) {
        if (argv[i][0] == '-' && strstr(name, argv[i] + 1)) return 0;
        if (argv[i][0] != '-' && strstr(name, argv[i])) wanted = 1;
    }
    return wanted;
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
