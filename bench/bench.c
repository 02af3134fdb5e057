/* bench.c - acmoe benchmarks.

   Build and run from the repository root:
       gcc -std=c99 -O2 -Wall -Wextra -Wpedantic -Werror -I. bench/bench.c -o build/bench \
           -lm -lpthread
       ./build/bench [--quick] [--section N] [--isa NAME]

   Section 1 (matmul) measures the FP32 FMA peak of the kernel path's instruction set, then
   the acmoe_matmul throughput of MoE-sized and square products on 1 and 2 threads, as a share
   of that measured peak. Section 2 times the MoE layer's forward and backward pass for three
   configurations and three routers, the routers taking turns step by step so that drifts in
   the host's speed reach all three alike; section 3 a language-model training step, its
   memory, and decoding 1, 8 and 32 sequences at once position by position; section 4 a vision-encoder training
   step with top-2 and with Soft MoE layers. Sections 2 to 4 also give each
   rate as a share of the measured peak, which carries across machines where the rate does
   not. Each section ends with its own resident peak. `make bench-pytorch` runs the PyTorch
   peer of sections 2 to 4 (bench/pytorch_peer.py), `make bench-openblas` the OpenBLAS peer of
   section 1 (bench/openblas_peer.c, on the products of bench/matmul_shapes.h), and
   `make bench-compare` all three. Built without -march: SIMD code here is compiled per
   function and only called when the CPU supports it. --isa runs every section on another
   kernel path the CPU supports (avx2 on an AVX-512 CPU, say), its peak measured with that
   path's instructions. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* clock_gettime, pthread barriers */
#endif
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#ifdef __GLIBC__
#include <malloc.h> /* malloc_trim */
#endif
#include <time.h>

#include "matmul_shapes.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define BENCH_X86 1
#include <immintrin.h>
#endif

/* ---- Options and helpers ---- */

typedef struct bench_options {
    int quick;   /* fewer and shorter repetitions, for smoke tests */
    int section; /* 0 runs every section */
} bench_options;

static acmoe_isa bench_isa; /* the kernel path of every context and of the peak: --isa, else the CPU's best */

/* How long to measure each case. */
typedef struct timing_plan {
    int warmup, min_reps;
    double min_seconds, peak_seconds;
} timing_plan;

static timing_plan timing_plan_for(const bench_options *opt) {
    static const timing_plan full = {2, 5, 0.25, 0.5}, quick = {1, 3, 0.02, 0.1};
    return opt->quick ? quick : full;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *checked_malloc(size_t bytes) {
    void *p = malloc(bytes);
    if (!p) {
        fprintf(stderr, "bench: out of memory allocating %lu bytes\n", (unsigned long)bytes);
        exit(1);
    }
    return p;
}

static void check_status(acmoe_status status, const char *what) {
    if (status == ACMOE_OK) return;
    fprintf(stderr, "bench: %s failed: %s\n", what, acmoe_status_string(status));
    exit(1);
}

static int compare_doubles(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* Median rather than mean: one descheduled run should not move the result. */
static double median(double *values, int n) {
    qsort(values, (size_t)n, sizeof *values, compare_doubles);
    return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/* The value after "key" and its colon in a /proc/cpuinfo line, or NULL. */
static char *cpuinfo_value(char *line, const char *key) {
    char *colon = strchr(line, ':');
    if (strncmp(line, key, strlen(key)) != 0 || !colon) return NULL;
    colon += 1 + strspn(colon + 1, " \t");
    colon[strcspn(colon, "\n")] = '\0';
    return colon;
}

/* The first CPU's data and unified caches, "L1d 32K, L2 1024K, L3 32768K", from sysfs. */
static void cpu_caches(char *out, size_t cap) {
    int index;
    out[0] = '\0';
    for (index = 0; index < 8; index++) {
        static const char *fields[3] = {"level", "type", "size"};
        char path[96], value[3][16]; /* level, type, size */
        int i, ok = 1;
        for (i = 0; i < 3 && ok; i++) {
            FILE *f;
            snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/%s", index, fields[i]);
            f = fopen(path, "r");
            ok = f && fgets(value[i], sizeof value[i], f);
            if (f) fclose(f);
            if (ok) value[i][strcspn(value[i], "\n")] = '\0';
        }
        if (!ok || strcmp(value[1], "Instruction") == 0) continue;
        snprintf(out + strlen(out), cap - strlen(out), "%sL%s%s %s", out[0] ? ", " : "", value[0],
                 strcmp(value[1], "Data") == 0 ? "d" : "", value[2]);
    }
}

/* The model name, with the family and model numbers and the caches that tell apart hosts a
   hypervisor names alike. */
static void print_cpu_model(void) {
    char line[512], model[256] = "", family[32] = "", number[32] = "", caches[160], detail[256] = "";
    FILE *f = fopen("/proc/cpuinfo", "r");
    while (f && fgets(line, sizeof line, f) && strcmp(line, "\n") != 0) { /* the first CPU's lines */
        const char *value;
        if ((value = cpuinfo_value(line, "model name")) != NULL) snprintf(model, sizeof model, "%s", value);
        else if ((value = cpuinfo_value(line, "cpu family")) != NULL) snprintf(family, sizeof family, "%s", value);
        else if ((value = cpuinfo_value(line, "model\t")) != NULL) snprintf(number, sizeof number, "%s", value);
    }
    if (f) fclose(f);
    cpu_caches(caches, sizeof caches);
    if (family[0]) snprintf(detail, sizeof detail, "family %s%s%s", family, number[0] ? ", model " : "", number);
    if (caches[0])
        snprintf(detail + strlen(detail), sizeof detail - strlen(detail), "%s%s", detail[0] ? "; " : "", caches);
    printf("CPU:          %s%s%s%s\n", model[0] ? model : "unknown", detail[0] ? " (" : "", detail,
           detail[0] ? ")" : "");
}

/* ---- Section 1: FMA peak ---- */

/* Independent accumulator chains: more than FMA latency times FMA ports (4 x 2 on current
   x86 cores), so the loop is bound by throughput, not latency. 12 plus two constants also
   fits the 16 ymm registers of AVX2 without spilling. */
#define FMA_CHAINS 12
/* The portable loop gets more: compilers vectorise it into 4-wide multiplies and adds whose
   chains are twice as long (multiply, then add). 24 stays in registers with gcc and clang. */
#define PORTABLE_CHAINS 24
#define PEAK_MAX_THREADS 2

/* Runs iters rounds of one multiply-add per chain and returns a value that depends on all of
   them. The multiplier and addend keep the accumulators near 1: no overflow, no denormals. */
typedef float (*fma_loop_fn)(long iters);

typedef struct fma_probe {
    const char *name;
    fma_loop_fn loop;
    int lanes;  /* floats per multiply-add */
    int chains; /* multiply-adds per round */
} fma_probe;

static float fma_loop_portable(long iters) {
    float acc[PORTABLE_CHAINS], sum = 0.0f;
    long it;
    int i;
    for (i = 0; i < PORTABLE_CHAINS; i++) acc[i] = (float)i;
    for (it = 0; it < iters; it++) {
        _Pragma("GCC unroll 24") for (i = 0; i < PORTABLE_CHAINS; i++)
            acc[i] = acc[i] * 0.999999f + 1e-6f;
    }
    for (i = 0; i < PORTABLE_CHAINS; i++) sum += acc[i];
    return sum;
}

#ifdef BENCH_X86
__attribute__((target("avx2,fma"))) static float fma_loop_avx2(long iters) {
    const __m256 mul = _mm256_set1_ps(0.999999f), add = _mm256_set1_ps(1e-6f);
    __m256 acc[FMA_CHAINS];
    float lanes[8], sum = 0.0f;
    long it;
    int i;
    for (i = 0; i < FMA_CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
    for (it = 0; it < iters; it++) {
        _Pragma("GCC unroll 16") for (i = 0; i < FMA_CHAINS; i++)
            acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
    }
    for (i = 1; i < FMA_CHAINS; i++) acc[0] = _mm256_add_ps(acc[0], acc[i]);
    _mm256_storeu_ps(lanes, acc[0]);
    for (i = 0; i < 8; i++) sum += lanes[i];
    return sum;
}

__attribute__((target("avx512f"))) static float fma_loop_avx512(long iters) {
    const __m512 mul = _mm512_set1_ps(0.999999f), add = _mm512_set1_ps(1e-6f);
    __m512 acc[FMA_CHAINS];
    float lanes[16], sum = 0.0f;
    long it;
    int i;
    for (i = 0; i < FMA_CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    for (it = 0; it < iters; it++) {
        _Pragma("GCC unroll 16") for (i = 0; i < FMA_CHAINS; i++)
            acc[i] = _mm512_fmadd_ps(acc[i], mul, add);
    }
    for (i = 1; i < FMA_CHAINS; i++) acc[0] = _mm512_add_ps(acc[0], acc[i]);
    _mm512_storeu_ps(lanes, acc[0]);
    for (i = 0; i < 16; i++) sum += lanes[i];
    return sum;
}
#endif

/* The FMA loop of the instruction set acmoe's kernels use on this CPU. Paths without one
   here (scalar, NEON) fall back to portable C, which is a reference, not a SIMD peak. */
static fma_probe fma_probe_for(acmoe_isa isa) {
    fma_probe probe = {"no SIMD peak measured; reference is a portable C multiply-add loop",
                       fma_loop_portable, 1, PORTABLE_CHAINS};
#ifdef BENCH_X86
    if (isa == ACMOE_ISA_AVX512 && acmoe_isa_supported(ACMOE_ISA_AVX512)) {
        probe.name = "AVX-512 _mm512_fmadd_ps";
        probe.loop = fma_loop_avx512;
        probe.lanes = 16;
        probe.chains = FMA_CHAINS;
    } else if (isa == ACMOE_ISA_AVX2 && acmoe_isa_supported(ACMOE_ISA_AVX2)) {
        probe.name = "AVX2 _mm256_fmadd_ps";
        probe.loop = fma_loop_avx2;
        probe.lanes = 8;
        probe.chains = FMA_CHAINS;
    }
#else
    (void)isa;
#endif
    return probe;
}

/* Stores the loop results so the compiler must compute them. */
static volatile float fma_sink;

typedef struct fma_job {
    fma_loop_fn loop;
    long iters;
    pthread_barrier_t *start;
    double t_start, t_end;
    float result;
} fma_job;

static void *fma_job_run(void *arg) {
    fma_job *job = (fma_job *)arg;
    pthread_barrier_wait(job->start);
    job->t_start = now_seconds();
    job->result = job->loop(job->iters);
    job->t_end = now_seconds();
    return NULL;
}

static double fma_loop_flops(const fma_probe *probe, long iters) {
    return 2.0 * (double)iters * probe->chains * probe->lanes;
}

/* Doubles the iteration count until a run is long enough to time, then scales it to the
   target. This also brings the core to its SIMD clock before the measured runs. */
static long fma_iters_for(const fma_probe *probe, double seconds) {
    long iters = 1 << 12;
    for (;;) {
        double t0 = now_seconds(), elapsed;
        fma_sink = probe->loop(iters);
        elapsed = now_seconds() - t0;
        if (elapsed > seconds / 8) return (long)((double)iters * seconds / elapsed) + 1;
        iters *= 2;
    }
}

/* Runs the loop on n_threads threads at once; returns their combined GFLOP/s. The rate is
   total work over the span from the first start to the last finish, not a sum of per-thread
   rates: threads that take turns on one core would each look fast on their own. */
static double fma_gflops(const fma_probe *probe, long iters, int n_threads) {
    pthread_t threads[PEAK_MAX_THREADS];
    fma_job jobs[PEAK_MAX_THREADS];
    pthread_barrier_t start;
    double first_start = 0.0, last_end = 0.0;
    int t;
    if (pthread_barrier_init(&start, NULL, (unsigned)n_threads) != 0) {
        fprintf(stderr, "bench: pthread_barrier_init failed\n");
        exit(1);
    }
    for (t = 0; t < n_threads; t++) {
        jobs[t].loop = probe->loop;
        jobs[t].iters = iters;
        jobs[t].start = &start;
        if (pthread_create(&threads[t], NULL, fma_job_run, &jobs[t]) != 0) {
            fprintf(stderr, "bench: pthread_create failed\n");
            exit(1);
        }
    }
    for (t = 0; t < n_threads; t++) {
        pthread_join(threads[t], NULL);
        fma_sink = jobs[t].result;
        if (t == 0 || jobs[t].t_start < first_start) first_start = jobs[t].t_start;
        if (t == 0 || jobs[t].t_end > last_end) last_end = jobs[t].t_end;
    }
    pthread_barrier_destroy(&start);
    return n_threads * fma_loop_flops(probe, iters) / (last_end - first_start) * 1e-9;
}

/* ---- Section 1: matmul throughput ---- */

/* The acmoe_layout of a layout name of bench/matmul_shapes.h, whose shapes and layouts this
   section shares with the OpenBLAS peer. */
static acmoe_layout layout_from_name(const char *name) {
    if (name[0] == 'T') return name[1] == 'T' ? ACMOE_TT : ACMOE_TN;
    return name[1] == 'T' ? ACMOE_NT : ACMOE_NN;
}

/* A holds M*K floats and B K*N in every layout; only the leading dimensions differ. */
typedef struct matmul_operands {
    int m, n, k;
    float *a, *b, *c;
} matmul_operands;

static float *random_floats(acmoe_rng *rng, size_t count) {
    float *p = (float *)checked_malloc(count * sizeof *p);
    size_t i;
    for (i = 0; i < count; i++) p[i] = 2.0f * acmoe_rng_uniform(rng) - 1.0f;
    return p;
}

static matmul_operands matmul_operands_create(acmoe_rng *rng, int m, int n, int k) {
    matmul_operands op;
    op.m = m;
    op.n = n;
    op.k = k;
    op.a = random_floats(rng, (size_t)m * k);
    op.b = random_floats(rng, (size_t)k * n);
    op.c = (float *)checked_malloc((size_t)m * n * sizeof *op.c);
    return op;
}

static void matmul_operands_destroy(matmul_operands *op) {
    free(op->a);
    free(op->b);
    free(op->c);
}

static void run_matmul(acmoe_ctx *ctx, const char *layout, const matmul_operands *op) {
    int lda, ldb;
    matmul_leading_dims(layout, op->m, op->n, op->k, &lda, &ldb);
    check_status(acmoe_matmul(ctx, layout_from_name(layout), op->m, op->n, op->k, op->a, lda, op->b,
                              ldb, op->c, op->n, 0),
                 "acmoe_matmul");
}

static double matmul_median_seconds(acmoe_ctx *ctx, const char *layout,
                                    const matmul_operands *op, const timing_plan *plan) {
    double times[MATMUL_MAX_REPS], start;
    int reps, i;
    for (i = 0; i < plan->warmup; i++) run_matmul(ctx, layout, op);
    start = now_seconds();
    for (reps = 0; reps < MATMUL_MAX_REPS; reps++) {
        double t0 = now_seconds();
        if (reps >= plan->min_reps && t0 - start >= plan->min_seconds) break;
        run_matmul(ctx, layout, op);
        times[reps] = now_seconds() - t0;
    }
    return median(times, reps);
}

/* A context of n_threads with the clock, so layers time their phases. */
static acmoe_ctx *context_with_threads(int n_threads) {
    acmoe_ctx_desc desc;
    acmoe_ctx *ctx;
    memset(&desc, 0, sizeof desc);
    desc.n_threads = n_threads;
    desc.isa = bench_isa;
    desc.clock = now_seconds;
    check_status(acmoe_ctx_create(&ctx, &desc), "acmoe_ctx_create");
    return ctx;
}

static void print_matmul_header(void) {
    printf("%5s %5s %5s  %-6s  %10s %6s  %10s %6s  %6s\n", "M", "N", "K", "layout", "1T GFLOP/s",
           "%peak", "2T GFLOP/s", "%peak", "2T/1T");
}

/* One table row: this layout of this shape on 1 and 2 threads. */
static void bench_matmul_case(acmoe_ctx *ctx[2], const double peak[2], const char *layout,
                              const matmul_operands *op, const timing_plan *plan) {
    double flops = 2.0 * op->m * op->n * op->k, gflops[2];
    int t;
    for (t = 0; t < 2; t++)
        gflops[t] = flops / matmul_median_seconds(ctx[t], layout, op, plan) * 1e-9;
    printf("%5d %5d %5d  %-6s  %10.1f %5.1f%%  %10.1f %5.1f%%  %5.2fx\n", op->m, op->n, op->k,
           layout, gflops[0], 100.0 * gflops[0] / peak[0], gflops[1],
           100.0 * gflops[1] / peak[1], gflops[1] / gflops[0]);
    fflush(stdout);
}

static void print_platform(acmoe_ctx *ctx[2]) {
    acmoe_ctx_desc s1 = acmoe_ctx_settings(ctx[0]), s2 = acmoe_ctx_settings(ctx[1]);
    print_cpu_model();
    printf("Kernel path:  %s%s\n", acmoe_isa_name(bench_isa), bench_isa != acmoe_cpu_isa() ? " (--isa)" : "");
    printf("Threads:      %d online CPUs (default context); measuring contexts of %d and %d\n",
           acmoe_ctx_defaults().n_threads, s1.n_threads, s2.n_threads);
    printf("Blocking:     mc=%d kc=%d nc=%d\n", s1.mc, s1.kc, s1.nc);
}

#define PEAK_RUNS 5
#define PEAK_EXTRA_RUNS 20   /* more 2-thread runs when the first ones found a busy second core */
#define PEAK_PAIR_EXPECTED 1.6 /* two cores of their own reach nearly twice one core's rate */

/* The FMA peak on 1 thread and on 2 concurrent threads, in GFLOP/s: the best of PEAK_RUNS
   runs, since a peak is an upper bound and a shared host only ever takes cycles away. A
   2-thread best far below twice the 1-thread one means the second CPU was busy for all of
   those runs (or shares a core with the first): the 2-thread loop runs again, and if it still
   falls short the 2-thread shares are flagged. It is measured once per process and printed
   where it is first needed. */
static const double *fma_peak(const timing_plan *plan) {
    static double peak[2];
    fma_probe probe;
    long iters;
    int run, t, extra = 0;
    if (peak[0] > 0.0) return peak;
    probe = fma_probe_for(bench_isa);
    iters = fma_iters_for(&probe, plan->peak_seconds / PEAK_RUNS);
    for (run = 0; run < PEAK_RUNS; run++)
        for (t = 0; t < 2; t++) {
            double gflops = fma_gflops(&probe, iters, t + 1);
            if (gflops > peak[t]) peak[t] = gflops;
        }
    for (; extra < PEAK_EXTRA_RUNS && peak[1] < PEAK_PAIR_EXPECTED * peak[0]; extra++) {
        double gflops = fma_gflops(&probe, iters, 2);
        if (gflops > peak[1]) peak[1] = gflops;
    }
    printf("FMA peak:     %s, %d accumulators, best of %d runs\n", probe.name, probe.chains, PEAK_RUNS + extra);
    printf("              1 thread %.1f GFLOP/s (per-core peak), 2 threads %.1f GFLOP/s (%.2fx)\n",
           peak[0], peak[1], peak[1] / peak[0]);
    if (peak[1] < PEAK_PAIR_EXPECTED * peak[0])
        printf("              warning: 2 threads never reached %.1fx of one: the second CPU was busy or\n"
               "              shares a core; 2-thread shares below are against this low figure\n",
               PEAK_PAIR_EXPECTED);
    return peak;
}

static void run_section_matmul(const bench_options *opt) {
    timing_plan plan = timing_plan_for(opt);
    acmoe_ctx *ctx[2];
    acmoe_rng rng;
    const double *peak;
    int s, l;
    ctx[0] = context_with_threads(1);
    ctx[1] = context_with_threads(2);
    acmoe_rng_seed(&rng, 42);
    print_platform(ctx);
    peak = fma_peak(&plan);
    printf("\n%%peak: 1T against the 1-thread peak, 2T against the 2-thread peak; median of "
           "at least %d runs\n",
           plan.min_reps);
    print_matmul_header();
    for (s = 0; s < MATMUL_SHAPE_COUNT; s++) {
        const int *shape = matmul_shapes[s];
        matmul_operands op = matmul_operands_create(&rng, shape[0], shape[1], shape[2]);
        for (l = 0; l < MATMUL_LAYOUT_COUNT; l++)
            bench_matmul_case(ctx, peak, matmul_layout_names[l], &op, &plan);
        matmul_operands_destroy(&op);
    }
    acmoe_ctx_destroy(ctx[0]);
    acmoe_ctx_destroy(ctx[1]);
}

/* ---- Compute limits ---- */

/* Floating-point operations of a training step per token, from the multiply-adds of its
   forward products: two operations each, and three products in all (the forward one and the
   two of its backward pass, for the input and the weight gradients). */
static double step_flops(double forward_macs) { return 6.0 * forward_macs; }

/* The share of the measured peak a rate of tokens/s uses: how close a step comes to doing
   nothing but multiply-adds. It carries across machines, unlike the rate itself. */
static double share_of_peak(double tokens_per_second, double flops_per_token, double peak_gflops) {
    return tokens_per_second * flops_per_token / (peak_gflops * 1e9);
}

/* ---- Section 2: MoE layer ---- */

typedef struct moe_config {
    int n_experts, top_k, d_model, d_ff, tokens;
} moe_config;

static const moe_config moe_configs[] = {
    {16, 2, 128, 128, 4096}, {16, 2, 352, 352, 4096}, {8, 2, 256, 1024, 2048}};
/* The experts' two products for each of top_k slots, and the router's scores. */
static double moe_flops_per_token(const moe_config *c) {
    return step_flops((double)c->top_k * 2.0 * c->d_model * c->d_ff + (double)c->n_experts * c->d_model);
}

static const char moe_routers[] = {'g', 'o', 'c'}; /* acmoe_moe_router_preset letters */
static const char *const moe_router_names[] = {"SMoE", "cosine", "AC"};

#define MOE_MAX_STEPS 200

/* One layer and its data, ready to step. */
typedef struct moe_bench {
    acmoe_moe *layer;
    float *params, *grads, *x, *dout, *out, *dx;
    int32_t *prev;
    int tokens;
} moe_bench;

static moe_bench moe_bench_create(const moe_config *c, char router, acmoe_rng *rng) {
    acmoe_moe_desc desc;
    moe_bench b;
    size_t n_params, act = (size_t)c->tokens * c->d_model, i;
    memset(&desc, 0, sizeof desc);
    desc.d_model = c->d_model;
    desc.d_ff = c->d_ff;
    desc.n_experts = c->n_experts;
    desc.top_k = c->top_k;
    desc.max_tokens = c->tokens;
    check_status(acmoe_moe_router_preset(&desc, router), "acmoe_moe_router_preset");
    n_params = acmoe_moe_param_count(&desc);
    b.tokens = c->tokens;
    b.params = (float *)checked_malloc(sizeof(float) * n_params);
    b.grads = (float *)checked_malloc(sizeof(float) * n_params);
    memset(b.grads, 0, sizeof(float) * n_params);
    check_status(acmoe_moe_create(&b.layer, &desc, b.params, b.grads), "acmoe_moe_create");
    acmoe_moe_init_params(b.layer, rng);
    b.x = random_floats(rng, act);
    b.dout = random_floats(rng, act);
    b.out = (float *)checked_malloc(sizeof(float) * act);
    b.dx = (float *)checked_malloc(sizeof(float) * act);
    b.prev = (int32_t *)checked_malloc(sizeof(int32_t) * (size_t)c->tokens * 2);
    for (i = 0; i < (size_t)c->tokens; i++) { /* a previous layer's top-2: two distinct experts */
        b.prev[2 * i] = (int32_t)acmoe_rng_below(rng, (uint32_t)c->n_experts);
        b.prev[2 * i + 1] = (b.prev[2 * i] + 1 + (int32_t)acmoe_rng_below(rng, (uint32_t)c->n_experts - 1)) % c->n_experts;
    }
    return b;
}

static void moe_bench_destroy(moe_bench *b) {
    acmoe_moe_destroy(b->layer);
    free(b->params), free(b->grads), free(b->x), free(b->dout), free(b->out), free(b->dx), free(b->prev);
}

static void moe_step(acmoe_ctx *ctx, moe_bench *b) {
    check_status(acmoe_moe_forward(b->layer, ctx, b->x, b->tokens, b->prev, NULL, 2, b->out), "acmoe_moe_forward");
    check_status(acmoe_moe_backward(b->layer, ctx, b->dout, b->dx), "acmoe_moe_backward");
}

#define MOE_ROUTERS ((int)(sizeof moe_routers / sizeof moe_routers[0]))

/* One config's routers measured in rounds of one step each, so that drifts in the host's
   speed (which move whole runs by 10 % and more) reach every router alike. Medians of the
   step seconds and of the share of each step spent routing, and the median of the rounds'
   AC over cosine step ratios. */
typedef struct moe_timing {
    double step[MOE_ROUTERS], routing_share[MOE_ROUTERS], ac_over_cosine;
} moe_timing;

static moe_timing moe_time_routers(acmoe_ctx *ctx, moe_bench *b, const timing_plan *plan) {
    double times[MOE_ROUTERS][MOE_MAX_STEPS], shares[MOE_ROUTERS][MOE_MAX_STEPS], ratios[MOE_MAX_STEPS];
    moe_timing m;
    double start;
    int reps, r, i;
    for (r = 0; r < MOE_ROUTERS; r++)
        for (i = 0; i < plan->warmup; i++) moe_step(ctx, &b[r]);
    start = now_seconds();
    for (reps = 0; reps < MOE_MAX_STEPS; reps++) {
        if (reps >= plan->min_reps && now_seconds() - start >= MOE_ROUTERS * plan->min_seconds) break;
        for (r = 0; r < MOE_ROUTERS; r++) {
            double t0 = now_seconds();
            moe_step(ctx, &b[r]);
            times[r][reps] = now_seconds() - t0;
            shares[r][reps] = acmoe_moe_last_stats(b[r].layer).seconds_routing / times[r][reps];
        }
        ratios[reps] = times[2][reps] / times[1][reps]; /* AC, cosine: see moe_routers */
    }
    for (r = 0; r < MOE_ROUTERS; r++) {
        m.routing_share[r] = median(shares[r], reps);
        m.step[r] = median(times[r], reps);
    }
    m.ac_over_cosine = median(ratios, reps);
    return m;
}

static void run_section_moe(const bench_options *opt) {
    timing_plan plan = timing_plan_for(opt);
    acmoe_ctx *ctx[2];
    acmoe_rng rng;
    const double *peak;
    size_t c;
    int t, r;
    ctx[0] = context_with_threads(1);
    ctx[1] = context_with_threads(2);
    acmoe_rng_seed(&rng, 7);
    peak = fma_peak(&plan);
    printf("\nMoE layer forward + backward, tokens/s (median of at least %d steps; the routers of a config\n"
           "take turns, one step each); %%peak = the share of the measured peak the experts' and router's\n"
           "products use at that rate; routing = router forward and backward as a share of the step\n",
           plan.min_reps);
    printf("%-26s %-7s %11s %6s %8s %11s %6s %8s %6s\n", "config", "router", "1T tok/s", "%peak", "routing",
           "2T tok/s", "%peak", "routing", "2T/1T");
    for (c = 0; c < sizeof moe_configs / sizeof moe_configs[0]; c++) {
        const moe_config *cfg = &moe_configs[c];
        moe_bench b[MOE_ROUTERS];
        moe_timing m[2];
        char name[64];
        snprintf(name, sizeof name, "E%d k%d d%d ff%d T%d", cfg->n_experts, cfg->top_k, cfg->d_model, cfg->d_ff,
                 cfg->tokens);
        for (r = 0; r < MOE_ROUTERS; r++) b[r] = moe_bench_create(cfg, moe_routers[r], &rng);
        for (t = 0; t < 2; t++) m[t] = moe_time_routers(ctx[t], b, &plan);
        for (r = 0; r < MOE_ROUTERS; r++) {
            printf("%-26s %-7s %11.0f %5.1f%% %7.1f%% %11.0f %5.1f%% %7.1f%% %5.2fx\n", name, moe_router_names[r],
                   cfg->tokens / m[0].step[r],
                   100.0 * share_of_peak(cfg->tokens / m[0].step[r], moe_flops_per_token(cfg), peak[0]),
                   100.0 * m[0].routing_share[r], cfg->tokens / m[1].step[r],
                   100.0 * share_of_peak(cfg->tokens / m[1].step[r], moe_flops_per_token(cfg), peak[1]),
                   100.0 * m[1].routing_share[r], m[0].step[r] / m[1].step[r]);
            moe_bench_destroy(&b[r]);
        }
        /* The routing shares come from one clock inside each step and isolate the AC router's
           own work; the step ratio pairs steps taken one after the other. */
        printf("%-26s AC over cosine: step %+.1f%% (1T) %+.1f%% (2T); routing share %+.1f (1T) %+.1f (2T) points\n",
               "", 100.0 * (m[0].ac_over_cosine - 1.0), 100.0 * (m[1].ac_over_cosine - 1.0),
               100.0 * (m[0].routing_share[2] - m[0].routing_share[1]),
               100.0 * (m[1].routing_share[2] - m[1].routing_share[1]));
        fflush(stdout);
    }
    acmoe_ctx_destroy(ctx[0]);
    acmoe_ctx_destroy(ctx[1]);
}

/* ---- Section 3: language-model training step ---- */

/* Resident memory now, in bytes, from /proc/self/statm (0 where there is none): the growth
   across a model's life is what it really touched, whatever ran before it. */
static double resident_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long size = 0, resident = 0;
    int ok = f && fscanf(f, "%lu %lu", &size, &resident) == 2;
    if (f) fclose(f);
    return ok ? (double)resident * (double)sysconf(_SC_PAGESIZE) : 0.0;
}

/* Seconds to decode positions 0..255 of batch sequences (tokens + b * 256) one position at
   a time, as a generator does: the best of three passes. The model's AC weights are frozen. */
static double decode_seconds(acmoe_lm *lm, acmoe_ctx *ctx, const int32_t *tokens, int batch) {
    double best = 0.0;
    int pass, len;
    for (pass = 0; pass < 3; pass++) {
        double t0 = now_seconds(), seconds;
        for (len = 1; len <= 256; len++)
            check_status(acmoe_lm_decode_batch(lm, ctx, tokens, 256, batch, len, len - 1), "acmoe_lm_decode_batch");
        seconds = now_seconds() - t0;
        if (pass == 0 || seconds < best) best = seconds;
    }
    return best;
}

enum { DECODE_BATCH_MAX = 32 };

/* Decoding 1, 8 and 32 sequences at once with a model of desc's shape that holds 32. */
static void print_decoding(const acmoe_lm_desc *desc, acmoe_ctx *ctx, int threads) {
    static const int batches[3] = {1, 8, DECODE_BATCH_MAX};
    acmoe_lm_desc d = *desc;
    acmoe_lm *lm;
    acmoe_rng rng;
    int32_t *tok = (int32_t *)checked_malloc(sizeof(int32_t) * 256 * DECODE_BATCH_MAX);
    int i;
    d.batch = DECODE_BATCH_MAX;
    check_status(acmoe_lm_create(&lm, &d), "acmoe_lm_create");
    acmoe_rng_seed(&rng, 6);
    for (i = 0; i < 256 * DECODE_BATCH_MAX; i++) tok[i] = (int32_t)acmoe_rng_below(&rng, 256);
    check_status(acmoe_lm_forward(lm, ctx, tok, NULL, DECODE_BATCH_MAX, 256, 0, NULL), "acmoe_lm_forward");
    acmoe_lm_freeze_ac_weights(lm, 1); /* measured by that pass */
    for (i = 0; i < 3; i++) {
        const double rate = batches[i] * 256.0 / decode_seconds(lm, ctx, tok, batches[i]);
        if (batches[i] == 1)
            printf("%d thread%s: decoding %.0f tokens/s (one sequence, every position of 256 in turn)\n", threads,
                   threads > 1 ? "s" : "", rate);
        else
            printf("%d thread%s: batch decoding %d sequences: %.0f tokens/s (every position of 256 in turn)\n",
                   threads, threads > 1 ? "s" : "", batches[i], rate);
    }
    acmoe_lm_destroy(lm);
    free(tok);
}

/* Each layer's attention: each query against the keys it sees ((seq_len + 1) / 2 on average)
   for the scores and again for the weighted values. */
static double lm_attention_macs_per_token(const acmoe_lm_desc *d) {
    return (double)strlen(d->pattern) * (d->seq_len + 1.0) * d->d_model;
}

/* Per layer: the query, key, value and output projections; the attention; the feed-forward
   block (dense, or top_k experts and the router). Then the output head. */
static double lm_flops_per_token(const acmoe_lm_desc *d) {
    double macs = (double)d->d_model * d->vocab + lm_attention_macs_per_token(d);
    const char *layer;
    for (layer = d->pattern; *layer; layer++) {
        double ffn = 2.0 * d->d_model * d->d_ff;
        macs += 4.0 * d->d_model * d->d_model;
        macs += *layer == 'f' ? ffn : d->top_k * ffn + (double)d->n_experts * d->d_model;
    }
    return step_flops(macs);
}

/* One training step (forward, backward, AdamW) of a model on a batch it knows. */
typedef void (*train_step_fn)(acmoe_lm *lm, acmoe_ctx *ctx, const void *batch);

/* The median seconds of a step after warm-up, over at least plan.min_reps steps and
   plan.min_seconds. */
static double median_step_seconds(acmoe_lm *lm, acmoe_ctx *ctx, const timing_plan *plan, train_step_fn step,
                                  const void *batch) {
    double times[MOE_MAX_STEPS], start;
    int reps;
    for (reps = 0, start = now_seconds(); reps < MOE_MAX_STEPS; reps++) {
        double t0 = now_seconds();
        if (reps >= plan->warmup + plan->min_reps && t0 - start >= plan->min_seconds) break;
        step(lm, ctx, batch);
        times[reps] = now_seconds() - t0;
    }
    return median(times + plan->warmup, reps - plan->warmup);
}

typedef struct token_batch {
    const int32_t *tokens, *targets;
} token_batch;

static void lm_forward_backward(acmoe_lm *lm, acmoe_ctx *ctx, const token_batch *b) {
    float loss;
    check_status(acmoe_lm_forward(lm, ctx, b->tokens, b->targets, 8, 256, 1, &loss), "acmoe_lm_forward");
    acmoe_lm_zero_grad(lm);
    check_status(acmoe_lm_backward(lm, ctx), "acmoe_lm_backward");
}

static void lm_step(acmoe_lm *lm, acmoe_ctx *ctx, const void *batch) {
    lm_forward_backward(lm, ctx, (const token_batch *)batch);
    check_status(acmoe_lm_step(lm, ctx, NULL, NULL), "acmoe_lm_step");
}

enum { PHASE_ATTENTION, PHASE_ROUTING, PHASE_EXPERTS, PHASE_OPTIMIZER, PHASE_REST, PHASES };

/* Where a training step's time goes, medians over reps more steps: the model's own clocks of
   its attention and feed-forward blocks (acmoe_lm_last_times), the optimizer step, and the
   rest (projections, norms, embeddings, the head and the loss). The attention's share of the
   peak counts its own FLOPs (attention_flops a step). */
static void print_step_phases(acmoe_lm *lm, acmoe_ctx *ctx, const token_batch *batch, int threads, int reps,
                              double attention_flops, double peak) {
    static const char *names[PHASES] = {"attention", "routing", "experts", "optimizer", "the rest"};
    double phases[PHASES][MOE_MAX_STEPS], ms[PHASES];
    int r, p;
    if (reps > MOE_MAX_STEPS) reps = MOE_MAX_STEPS;
    for (r = 0; r < reps; r++) {
        double t0 = now_seconds(), t1, t2;
        acmoe_lm_times times;
        lm_forward_backward(lm, ctx, batch);
        t1 = now_seconds();
        check_status(acmoe_lm_step(lm, ctx, NULL, NULL), "acmoe_lm_step");
        t2 = now_seconds();
        times = acmoe_lm_last_times(lm);
        phases[PHASE_ATTENTION][r] = times.attention, phases[PHASE_ROUTING][r] = times.routing;
        phases[PHASE_EXPERTS][r] = times.experts, phases[PHASE_OPTIMIZER][r] = t2 - t1;
        phases[PHASE_REST][r] = t1 - t0 - times.attention - times.routing - times.experts;
    }
    for (p = 0; p < PHASES; p++) ms[p] = 1e3 * median(phases[p], reps);
    printf("%d thread%s: phases of a step (median of %d): attention %.1f ms (%.1f%% of the measured peak)", threads,
           threads > 1 ? "s" : "", reps, ms[PHASE_ATTENTION], 100.0 * attention_flops / (1e6 * ms[PHASE_ATTENTION]) / peak);
    for (p = PHASE_ROUTING; p < PHASES; p++) printf(", %s %.1f ms", names[p], ms[p]);
    printf("\n");
}

static void run_section_training(const bench_options *opt) {
    timing_plan plan = timing_plan_for(opt);
    const double *peak = fma_peak(&plan);
    acmoe_lm_desc d;
    int t;
    memset(&d, 0, sizeof d);
    d.d_model = 128, d.n_heads = 8, d.seq_len = 256, d.batch = 8, d.pattern = "ggc", d.n_experts = 16, d.top_k = 2;
    printf("\nTraining step (forward + backward + AdamW), 3 layers \"ggc\", d 128, 8 heads, E16 top-2,\n"
           "seq 256 x batch 8 = 2048 tokens; median of at least %d steps\n", plan.min_reps);
    for (t = 1; t <= 2; t++) {
        acmoe_ctx *ctx = context_with_threads(t);
        acmoe_lm *lm;
        acmoe_rng rng;
        int32_t *tok = (int32_t *)checked_malloc(sizeof(int32_t) * 2048), *tgt = (int32_t *)checked_malloc(sizeof(int32_t) * 2048);
        acmoe_lm_desc resolved;
        token_batch batch;
        double step, flops, rss_before = resident_bytes();
        size_t mem[4];
        double rss_grown;
        int i;
        check_status(acmoe_lm_create(&lm, &d), "acmoe_lm_create");
        resolved = acmoe_lm_settings(lm);
        acmoe_rng_seed(&rng, 5);
        for (i = 0; i < 2048; i++) tok[i] = (int32_t)acmoe_rng_below(&rng, 256), tgt[i] = (int32_t)acmoe_rng_below(&rng, 256);
        batch.tokens = tok, batch.targets = tgt;
        step = median_step_seconds(lm, ctx, &plan, lm_step, &batch);
        acmoe_lm_memory(lm, &mem[0], &mem[1], &mem[2], &mem[3]);
        rss_grown = resident_bytes() - rss_before;
        flops = lm_flops_per_token(&resolved);
        printf("%d thread%s: %.0f tokens/s (%.1f ms a step; %.1f MFLOP a token, %.1f%% of the measured peak)\n",
               t, t > 1 ? "s" : "", 2048.0 / step, 1e3 * step, flops * 1e-6,
               100.0 * share_of_peak(2048.0 / step, flops, peak[t - 1]));
        if (t == 1)
            printf("memory plan MiB: params %.1f, grads %.1f, optimizer %.1f, activations %.1f = %.1f; "
                   "resident memory grew %.1f MiB from creating the model to its last step\n",
                   mem[0] / 1048576.0, mem[1] / 1048576.0, mem[2] / 1048576.0, mem[3] / 1048576.0,
                   (mem[0] + mem[1] + mem[2] + mem[3]) / 1048576.0, rss_grown / 1048576.0);
        print_step_phases(lm, ctx, &batch, t, plan.min_reps + 2, 2048.0 * step_flops(lm_attention_macs_per_token(&resolved)),
                          peak[t - 1]);
        acmoe_lm_destroy(lm);
        print_decoding(&d, ctx, t);
        acmoe_ctx_destroy(ctx);
        free(tok), free(tgt);
    }
}

/* ---- Section 4: vision-encoder training ---- */

enum { VISION_BATCH = 32, VISION_PATCHES = 64, VISION_PATCH_DIM = 48 }; /* 32 x 32 x 3 images, 4 x 4 patches */

typedef struct image_batch {
    const float *patches;
    const int32_t *labels;
} image_batch;

static void vision_step(acmoe_lm *lm, acmoe_ctx *ctx, const void *batch) {
    const image_batch *b = (const image_batch *)batch;
    float loss;
    check_status(acmoe_vision_forward(lm, ctx, b->patches, b->labels, VISION_BATCH, 1, &loss),
                 "acmoe_vision_forward");
    acmoe_lm_zero_grad(lm);
    check_status(acmoe_lm_backward(lm, ctx), "acmoe_lm_backward");
    check_status(acmoe_lm_step(lm, ctx, NULL, NULL), "acmoe_lm_step");
}

/* Per patch: the patch embedding; per layer the projections, every query against every key
   for the scores and the weighted values, and the feed-forward block: top_k experts and the
   router, or for Soft MoE the slot logits, dispatch and combine (slots x d each) and the
   experts' share of the slots (slots / patches of a whole expert pass). Then the head's
   share. */
static double vision_flops_per_patch(const acmoe_lm_desc *d) {
    const double dm = d->d_model, seq = d->seq_len, ffn = 2.0 * dm * d->d_ff, slots = d->n_experts;
    double macs = (double)d->patch_dim * dm + dm * d->n_classes / seq;
    const char *layer;
    for (layer = d->pattern; *layer; layer++) {
        macs += 4.0 * dm * dm + 2.0 * seq * dm;
        if (*layer == 'm' || *layer == 'a') macs += 3.0 * slots * dm + slots / seq * ffn;
        else macs += *layer == 'f' ? ffn : d->top_k * ffn + d->n_experts * dm;
    }
    return step_flops(macs);
}

static void run_section_vision(const bench_options *opt) {
    static const char *const patterns[2] = {"ggc", "gmg"};
    timing_plan plan = timing_plan_for(opt);
    const double *peak = fma_peak(&plan);
    const size_t floats = (size_t)VISION_BATCH * VISION_PATCHES * VISION_PATCH_DIM;
    float *patches = (float *)checked_malloc(sizeof(float) * floats);
    int32_t labels[VISION_BATCH];
    image_batch batch;
    acmoe_rng rng;
    size_t i;
    int p, t;
    acmoe_rng_seed(&rng, 6);
    for (i = 0; i < floats; i++) patches[i] = acmoe_rng_uniform(&rng);
    for (i = 0; i < VISION_BATCH; i++) labels[i] = (int32_t)acmoe_rng_below(&rng, 10);
    batch.patches = patches, batch.labels = labels;
    printf("\nVision-encoder training step (forward + backward + AdamW), 3 layers, d 128, 8 heads, E16 (top-2,\n"
           "or one Soft MoE slot each), 32 x 32 x 3 images in 64 patches of 4 x 4, batch 32 = 2048 patches;\n"
           "median of at least %d steps\n", plan.min_reps);
    for (p = 0; p < 2; p++)
        for (t = 1; t <= 2; t++) {
            acmoe_ctx *ctx = context_with_threads(t);
            acmoe_lm_desc d;
            acmoe_lm *lm;
            double step, flops;
            memset(&d, 0, sizeof d);
            d.n_classes = 10, d.patch_dim = VISION_PATCH_DIM, d.seq_len = VISION_PATCHES, d.batch = VISION_BATCH;
            d.d_model = 128, d.n_heads = 8, d.pattern = patterns[p], d.n_experts = 16, d.top_k = 2, d.pre_ln = 1;
            check_status(acmoe_lm_create(&lm, &d), "acmoe_lm_create");
            d = acmoe_lm_settings(lm);
            step = median_step_seconds(lm, ctx, &plan, vision_step, &batch);
            flops = vision_flops_per_patch(&d);
            printf("\"%s\", %d thread%s: %.0f images/s, %.0f patches/s (%.1f ms a step; %.1f MFLOP a patch, "
                   "%.1f%% of the measured peak)\n",
                   patterns[p], t, t > 1 ? "s" : "", VISION_BATCH / step, VISION_BATCH * VISION_PATCHES / step,
                   1e3 * step, flops * 1e-6, 100.0 * share_of_peak(VISION_BATCH * VISION_PATCHES / step, flops, peak[t - 1]));
            acmoe_lm_destroy(lm);
            acmoe_ctx_destroy(ctx);
        }
    free(patches);
}

/* ---- Driver ---- */

typedef struct bench_section {
    const char *name;
    void (*run)(const bench_options *opt);
} bench_section;

/* Section N is entry N-1. */
static const bench_section sections[] = {
    {"matmul", run_section_matmul},
    {"MoE layer", run_section_moe},
    {"language-model training", run_section_training},
    {"vision-encoder training", run_section_vision}};

#define SECTION_COUNT ((int)(sizeof sections / sizeof sections[0]))

static void usage_and_exit(const char *program) {
    int i;
    fprintf(stderr, "usage: %s [--quick] [--section N] [--isa NAME]\n", program);
    fprintf(stderr, "  --quick       fewer, shorter repetitions (smoke test)\n");
    fprintf(stderr, "  --section N   run only section N:");
    for (i = 0; i < SECTION_COUNT; i++) fprintf(stderr, " %d (%s)", i + 1, sections[i].name);
    fprintf(stderr, "\n  --isa NAME    the kernel path, one this CPU supports:");
    for (i = ACMOE_ISA_AUTO + 1; i < ACMOE_ISA_COUNT; i++)
        if (acmoe_isa_supported((acmoe_isa)i)) fprintf(stderr, " %s", acmoe_isa_name((acmoe_isa)i));
    fprintf(stderr, " (default %s)\n", acmoe_isa_name(acmoe_cpu_isa()));
    exit(2);
}

static bench_options parse_options(int argc, char **argv) {
    bench_options opt = {0, 0};
    int i;
    bench_isa = acmoe_cpu_isa();
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            opt.quick = 1;
        } else if (strcmp(argv[i], "--section") == 0 && i + 1 < argc) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*argv[i] == '\0' || *end != '\0' || n < 1 || n > SECTION_COUNT)
                usage_and_exit(argv[0]);
            opt.section = (int)n;
        } else if (strcmp(argv[i], "--isa") == 0 && i + 1 < argc) {
            int isa;
            ++i;
            for (isa = ACMOE_ISA_AUTO + 1; isa < ACMOE_ISA_COUNT; isa++)
                if (strcmp(argv[i], acmoe_isa_name((acmoe_isa)isa)) == 0) break;
            if (isa == ACMOE_ISA_COUNT || !acmoe_isa_supported((acmoe_isa)isa)) usage_and_exit(argv[0]);
            bench_isa = (acmoe_isa)isa;
        } else {
            usage_and_exit(argv[0]);
        }
    }
    return opt;
}

/* Each section's own resident peak: Linux resets the high-water mark (VmHWM) on writing 5 to
   /proc/self/clear_refs, after glibc has handed back the heap the sections before freed.
   Elsewhere the process's peak so far (ru_maxrss) stands in for it. */
static int reset_peak_memory(void) {
    FILE *f;
    int ok;
#ifdef __GLIBC__
    malloc_trim(0);
#endif
    f = fopen("/proc/self/clear_refs", "w");
    ok = f && fputs("5", f) >= 0;
    if (f) ok = fclose(f) == 0 && ok;
    return ok;
}

static void print_peak_memory(int was_reset) {
    struct rusage usage;
    char line[128];
    FILE *f = was_reset ? fopen("/proc/self/status", "r") : NULL;
    double kib = -1.0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %lf", &kib) == 1) break;
    if (f) fclose(f);
    if (kib >= 0.0) {
        printf("Peak memory:  %.1f MiB (resident high-water mark of this section)\n", kib / 1024.0);
    } else if (getrusage(RUSAGE_SELF, &usage) == 0) { /* ru_maxrss is in KiB on Linux */
        printf("Peak memory:  %.1f MiB (ru_maxrss, the process so far)\n", (double)usage.ru_maxrss / 1024.0);
    }
}

int main(int argc, char **argv) {
    bench_options opt = parse_options(argc, argv);
    int i;
    for (i = 0; i < SECTION_COUNT; i++) {
        if (opt.section && opt.section != i + 1) continue;
        int reset = reset_peak_memory();
        printf("Section %d: %s\n", i + 1, sections[i].name);
        sections[i].run(&opt);
        print_peak_memory(reset);
        printf("\n");
    }
    return 0;
}
