/* openblas_peer.c - the OpenBLAS peer of bench section 1: cblas_sgemm on the products of
   bench/matmul_shapes.h, at 1 and 2 threads, taking turns with acmoe_matmul on the same
   operands in the same process.

   Build and run from the repository root (`make bench-openblas`):
       gcc -std=c99 -O2 -Wall -Wextra -Wpedantic -Werror bench/openblas_peer.c \
           -o build/openblas_peer -ldl -lm -lpthread
       ./build/openblas_peer [--quick] [--library NAME] [--keep-coretype] [--isa NAME]

   OpenBLAS is loaded at run time (dlopen of libopenblas.so.0, or NAME), so the build needs no
   development package. Debian: apt-get install libopenblas0-pthread. Without it the program
   says so on one line and exits 0. Each product is timed as bench.c times acmoe_matmul: the
   same operands (row-major, packed, C overwritten: beta 0), warm-up runs, then the median of
   at least 5 runs and 0.15 s (--quick: 1 warm-up run, 3 runs and 0.02 s). A ratio of two
   libraries timed minutes apart carries the host's drift, as large as the differences it
   should show; so for each layout of each shape, at 1 thread then 2 (openblas_set_num_threads
   and an acmoe context of as many threads), the two take turns for 3 rounds (--quick: 1),
   the first to run alternating, and each library's figure is the median over the rounds.
   NN, NT and TN mean what they mean for acmoe_matmul: whether A, then B, is transposed in
   C = op(A) op(B). --isa avx2 on an AVX-512 CPU runs acmoe's AVX2 path beside OpenBLAS's
   AVX2 kernels (bench.c's --isa does the same for acmoe alone). */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#endif
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "matmul_shapes.h"

/* CBLAS's enum values (cblas.h), passed as the ints they are. */
enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112 };

/* The OpenBLAS calls this program makes; blasint is int in libopenblas.so.0 (the 64-bit
   integer build is libopenblas64.so.0). */
typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                         const float *b, int ldb, float beta, float *c, int ldc);
typedef void (*set_threads_fn)(int n_threads);
typedef int (*get_threads_fn)(void);
typedef char *(*get_string_fn)(void);

typedef struct openblas {
    sgemm_fn sgemm;
    set_threads_fn set_num_threads;
    get_threads_fn get_num_threads;
    get_string_fn get_config, get_corename;
} openblas;

/* How long to measure each case: bench.c's timing_plan_for, full and --quick. */
typedef struct timing_plan {
    int warmup, min_reps;
    double min_seconds;
    int rounds; /* turns of each library */
} timing_plan;

static const timing_plan full_plan = {2, 5, 0.15, 3}, quick_plan = {1, 3, 0.02, 1};

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *checked_malloc(size_t bytes) {
    void *p = malloc(bytes);
    if (!p) {
        fprintf(stderr, "openblas_peer: out of memory allocating %lu bytes\n", (unsigned long)bytes);
        exit(1);
    }
    return p;
}

static int compare_doubles(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static double median(double *values, int n) {
    qsort(values, (size_t)n, sizeof *values, compare_doubles);
    return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/* A symbol of the library as a function pointer. ISO C has no cast from void * to a function
   pointer; POSIX guarantees the two have the same representation, so the bytes are copied. */
static int load_symbol(void *lib, const char *name, void *fn, size_t fn_size) {
    void *sym = dlsym(lib, name);
    if (!sym || fn_size != sizeof sym) return 0;
    memcpy(fn, &sym, fn_size);
    return 1;
}

/* OpenBLAS 0.3.21 (Debian 12) does not know AMD's AVX-512 cores and takes its AVX2 kernels
   there, as it does where OPENBLAS_CORETYPE names an AVX2 core; the peer should run its best
   on the path acmoe runs, so on a CPU with AVX-512F it is asked (OPENBLAS_CORETYPE, read when
   the library loads) for its AVX-512 kernels, or for its AVX2 ones beside acmoe's AVX2 path,
   unless keep_coretype. The header line names the core it ran. */
static void choose_core(int keep_coretype, acmoe_isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (!keep_coretype && __builtin_cpu_supports("avx512f"))
        setenv("OPENBLAS_CORETYPE", isa == ACMOE_ISA_AVX2 ? "Haswell" : "SkylakeX", 1);
#else
    (void)keep_coretype, (void)isa;
#endif
}

/* Loads the library or says on one line why not (and how to install it), returning 0. */
static int openblas_load(openblas *ob, const char *library, int keep_coretype, acmoe_isa isa) {
    void *lib;
    choose_core(keep_coretype, isa);
    lib = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    const char *missing = NULL;
    if (!lib) {
        const char *why = dlerror();
        printf("OpenBLAS peer: OpenBLAS is not installed (%s); on Debian: apt-get install "
               "libopenblas0-pthread\n",
               why ? why : library);
        return 0;
    }
    if (!load_symbol(lib, "cblas_sgemm", &ob->sgemm, sizeof ob->sgemm)) missing = "cblas_sgemm";
    else if (!load_symbol(lib, "openblas_set_num_threads", &ob->set_num_threads, sizeof ob->set_num_threads))
        missing = "openblas_set_num_threads";
    else if (!load_symbol(lib, "openblas_get_num_threads", &ob->get_num_threads, sizeof ob->get_num_threads))
        missing = "openblas_get_num_threads";
    else if (!load_symbol(lib, "openblas_get_config", &ob->get_config, sizeof ob->get_config))
        missing = "openblas_get_config";
    else if (!load_symbol(lib, "openblas_get_corename", &ob->get_corename, sizeof ob->get_corename))
        missing = "openblas_get_corename";
    if (missing) {
        printf("OpenBLAS peer: OpenBLAS is not installed (%s has no %s: not OpenBLAS); on Debian: "
               "apt-get install libopenblas0-pthread\n",
               library, missing);
        return 0;
    }
    return 1;
}

/* A holds m * k floats and B k * n in every layout; only the leading dimensions differ. */
typedef struct operands {
    int m, n, k;
    float *a, *b, *c;
} operands;

/* Uniform in [-1, 1), from a fixed 64-bit LCG: the values do not matter, only that they are
   ordinary floats (no denormals, no overflow). */
static float *random_floats(unsigned long long *state, size_t count) {
    float *p = (float *)checked_malloc(count * sizeof *p);
    size_t i;
    for (i = 0; i < count; i++) {
        *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
        p[i] = (float)((double)(*state >> 40) / 16777216.0 * 2.0 - 1.0);
    }
    return p;
}

/* One library's product: cblas_sgemm when ob is set, else acmoe_matmul on ctx. */
typedef struct gemm_library {
    const openblas *ob;
    acmoe_ctx *ctx;
} gemm_library;

static acmoe_layout acmoe_layout_of(const char *layout) {
    if (layout[0] == 'T') return layout[1] == 'T' ? ACMOE_TT : ACMOE_TN;
    return layout[1] == 'T' ? ACMOE_NT : ACMOE_NN;
}

static void run_product(const gemm_library *lib, const char *layout, const operands *op) {
    int lda, ldb;
    matmul_leading_dims(layout, op->m, op->n, op->k, &lda, &ldb);
    if (lib->ob) {
        lib->ob->sgemm(CBLAS_ROW_MAJOR, layout[0] == 'T' ? CBLAS_TRANS : CBLAS_NO_TRANS,
                       layout[1] == 'T' ? CBLAS_TRANS : CBLAS_NO_TRANS, op->m, op->n, op->k, 1.0f, op->a, lda, op->b,
                       ldb, 0.0f, op->c, op->n);
        return;
    }
    if (acmoe_matmul(lib->ctx, acmoe_layout_of(layout), op->m, op->n, op->k, op->a, lda, op->b, ldb, op->c, op->n, 0) !=
        ACMOE_OK) {
        fprintf(stderr, "openblas_peer: acmoe_matmul failed\n");
        exit(1);
    }
}

/* bench.c's matmul_median_seconds for either library. */
static double median_seconds(const gemm_library *lib, const char *layout, const operands *op, const timing_plan *plan) {
    double times[MATMUL_MAX_REPS], start;
    int reps, i;
    for (i = 0; i < plan->warmup; i++) run_product(lib, layout, op);
    start = now_seconds();
    for (reps = 0; reps < MATMUL_MAX_REPS; reps++) {
        double t0 = now_seconds();
        if (reps >= plan->min_reps && t0 - start >= plan->min_seconds) break;
        run_product(lib, layout, op);
        times[reps] = now_seconds() - t0;
    }
    return median(times, reps);
}

/* Waits until a library's idle threads have stopped spinning (OpenBLAS's spin for a while
   after a call), so that they take no core from the other library's turn. */
static void settle(void) {
    struct timespec pause = {0, 250000000L};
    nanosleep(&pause, NULL);
}

/* GFLOP/s of OpenBLAS (gflops[0]) and acmoe (gflops[1]) on one product, the libraries taking
   turns, the first to run alternating from round to round; each the median over the rounds.
   threads > 1: a pause after each turn. */
static void paired_gflops(const gemm_library libs[2], const char *layout, const operands *op, const timing_plan *plan,
                          int threads, double gflops[2]) {
    double rates[2][16], flops = 2.0 * op->m * op->n * op->k;
    int r, turn;
    for (r = 0; r < plan->rounds; r++)
        for (turn = 0; turn < 2; turn++) {
            const int which = (r + turn) % 2;
            rates[which][r] = flops / median_seconds(&libs[which], layout, op, plan) * 1e-9;
            if (threads > 1) settle();
        }
    gflops[0] = median(rates[0], plan->rounds);
    gflops[1] = median(rates[1], plan->rounds);
}

/* Each layout on a small product against a plain loop that reads the operands as the layout
   names say: a wrong transpose flag or leading dimension would time some other product. */
static int layouts_agree(const gemm_library *lib) {
    enum { M = 3, N = 5, K = 4 };
    float a[M * K], b[K * N], c[M * N];
    operands op;
    int l, i, j, p;
    for (i = 0; i < M * K; i++) a[i] = (float)(i % 7) - 3.0f;
    for (i = 0; i < K * N; i++) b[i] = (float)(i % 5) - 2.0f;
    op.m = M, op.n = N, op.k = K, op.a = a, op.b = b, op.c = c;
    for (l = 0; l < MATMUL_LAYOUT_COUNT; l++) {
        const char *layout = matmul_layout_names[l];
        int lda, ldb;
        matmul_leading_dims(layout, M, N, K, &lda, &ldb);
        run_product(lib, layout, &op);
        for (i = 0; i < M; i++)
            for (j = 0; j < N; j++) {
                float want = 0.0f; /* small integers: exact in any order */
                for (p = 0; p < K; p++)
                    want += (layout[0] == 'T' ? a[p * lda + i] : a[i * lda + p]) *
                            (layout[1] == 'T' ? b[j * ldb + p] : b[p * ldb + j]);
                if (c[i * N + j] != want) {
                    fprintf(stderr, "openblas_peer: %s %s gives C[%d][%d] = %g, not %g\n",
                            lib->ob ? "cblas_sgemm" : "acmoe_matmul", layout, i, j,
                            (double)c[i * N + j], (double)want);
                    return 0;
                }
            }
    }
    return 1;
}

static void usage_and_exit(const char *program) {
    int isa;
    fprintf(stderr, "usage: %s [--quick] [--library NAME] [--keep-coretype] [--isa NAME]\n", program);
    fprintf(stderr, "  --quick          fewer, shorter repetitions (smoke test)\n");
    fprintf(stderr, "  --library NAME   the OpenBLAS to dlopen (default libopenblas.so.0)\n");
    fprintf(stderr, "  --keep-coretype  leave OPENBLAS_CORETYPE as it is (by default an AVX-512 CPU gets\n"
                    "                   OpenBLAS's AVX-512 kernels, its best; with --isa avx2, its AVX2 ones)\n");
    fprintf(stderr, "  --isa NAME       acmoe's kernel path, one this CPU supports:");
    for (isa = ACMOE_ISA_AUTO + 1; isa < ACMOE_ISA_COUNT; isa++)
        if (acmoe_isa_supported((acmoe_isa)isa)) fprintf(stderr, " %s", acmoe_isa_name((acmoe_isa)isa));
    fprintf(stderr, " (default: the best)\n");
    exit(2);
}

/* The kernel path called name, which this CPU must support. */
static acmoe_isa isa_named(const char *name, const char *program) {
    int isa;
    for (isa = ACMOE_ISA_AUTO + 1; isa < ACMOE_ISA_COUNT; isa++)
        if (strcmp(name, acmoe_isa_name((acmoe_isa)isa)) == 0 && acmoe_isa_supported((acmoe_isa)isa)) return (acmoe_isa)isa;
    usage_and_exit(program);
    return ACMOE_ISA_AUTO;
}

int main(int argc, char **argv) {
    const timing_plan *plan = &full_plan;
    const char *library = "libopenblas.so.0";
    int keep_coretype = 0;
    acmoe_isa isa = acmoe_cpu_isa();
    unsigned long long rng = 42;
    int threads[2], s, l, i;
    openblas ob;
    acmoe_ctx *contexts[2];
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) plan = &quick_plan;
        else if (strcmp(argv[i], "--library") == 0 && i + 1 < argc) library = argv[++i];
        else if (strcmp(argv[i], "--keep-coretype") == 0) keep_coretype = 1;
        else if (strcmp(argv[i], "--isa") == 0 && i + 1 < argc) isa = isa_named(argv[++i], argv[0]);
        else usage_and_exit(argv[0]);
    }
    if (!openblas_load(&ob, library, keep_coretype, isa)) return 0;
    /* The thread counts OpenBLAS takes when asked for 1 and 2. */
    for (i = 0; i < 2; i++) {
        ob.set_num_threads(i + 1);
        threads[i] = ob.get_num_threads();
    }
    for (i = 0; i < 2; i++) {
        acmoe_ctx_desc desc;
        memset(&desc, 0, sizeof desc); /* zeros: the path's own blocking, as the bench's contexts */
        desc.n_threads = i + 1;
        desc.isa = isa;
        if (acmoe_ctx_create(&contexts[i], &desc) != ACMOE_OK) {
            fprintf(stderr, "openblas_peer: acmoe_ctx_create failed\n");
            return 1;
        }
    }
    {
        gemm_library both[2];
        both[0].ob = &ob, both[0].ctx = NULL, both[1].ob = NULL, both[1].ctx = contexts[0];
        if (!layouts_agree(&both[0]) || !layouts_agree(&both[1])) return 1;
    }
    printf("OpenBLAS peer: %s; core %s; cblas_sgemm from %s\n", ob.get_config(), ob.get_corename(), library);
    printf("Kernel path: %s%s (acmoe)\n", acmoe_isa_name(isa), isa != acmoe_cpu_isa() ? " (--isa)" : "");
    printf("Threads: %d and %d (openblas_set_num_threads 1 and 2); median of at least %d runs and "
           "%.2f s after %d warm-up runs; %d round(s) of turns with acmoe_matmul\n",
           threads[0], threads[1], plan->min_reps, plan->min_seconds, plan->warmup, plan->rounds);
    printf("%5s %5s %5s  %-6s  %10s  %10s  %10s  %10s\n", "M", "N", "K", "layout", "1T GFLOP/s", "2T GFLOP/s",
           "acmoe 1T", "acmoe 2T");
    for (s = 0; s < MATMUL_SHAPE_COUNT; s++) {
        operands op;
        op.m = matmul_shapes[s][0];
        op.n = matmul_shapes[s][1];
        op.k = matmul_shapes[s][2];
        op.a = random_floats(&rng, (size_t)op.m * op.k);
        op.b = random_floats(&rng, (size_t)op.k * op.n);
        op.c = (float *)checked_malloc((size_t)op.m * op.n * sizeof *op.c);
        for (l = 0; l < MATMUL_LAYOUT_COUNT; l++) {
            const char *layout = matmul_layout_names[l];
            double gflops[2][2]; /* [thread count][OpenBLAS, acmoe] */
            int t;
            for (t = 0; t < 2; t++) {
                gemm_library libs[2];
                libs[0].ob = &ob, libs[0].ctx = NULL, libs[1].ob = NULL, libs[1].ctx = contexts[t];
                ob.set_num_threads(t + 1);
                paired_gflops(libs, layout, &op, plan, t + 1, gflops[t]);
            }
            printf("%5d %5d %5d  %-6s  %10.1f  %10.1f  %10.1f  %10.1f\n", op.m, op.n, op.k, layout, gflops[0][0],
                   gflops[1][0], gflops[0][1], gflops[1][1]);
            fflush(stdout);
        }
        free(op.a);
        free(op.b);
        free(op.c);
    }
    acmoe_ctx_destroy(contexts[0]);
    acmoe_ctx_destroy(contexts[1]);
    return 0;
}
