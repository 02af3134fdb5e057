/* bench_mpi: training across processes, measured (make bench-mpi runs it under mpirun with 1
   and 2 ranks). For one language model it times training steps alone, data-parallel and
   expert-parallel, and counts what each step sends: bytes each rank sends to the others and
   collective calls, with the seconds spent inside them. It also measures the communicator's
   latency and bandwidth, so that the cost model of docs/parallel.md can be checked against
   the same run. Prints one line per measurement on rank 0; --markdown prints them as the
   rows docs/parallel.md is built from.

     mpirun -np 2 build/bench_mpi [--steps 8] [--markdown]
*/
#define _POSIX_C_SOURCE 200809L
#define ACMOE_MPI
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void check(acmoe_status s, const char *what) {
    if (s == ACMOE_OK) return;
    fprintf(stderr, "bench_mpi: %s: %s\n", what, acmoe_status_string(s));
    MPI_Abort(MPI_COMM_WORLD, 1);
}

/* ---- a communicator that counts what passes through another ---- */

typedef struct counted {
    acmoe_comm *inner;
    double bytes, seconds; /* bytes this rank sends to the others; seconds inside the calls */
    long calls;
} counted;

static acmoe_status counted_sum(acmoe_comm *comm, float *data, size_t count) {
    counted *c = (counted *)comm->user;
    const double start = now_seconds(), share = (double)count / comm->size;
    acmoe_status s = c->inner->sum(c->inner, data, count);
    /* acmoe_comm_mpi: every rank sends the others their shares, then its summed share to all */
    c->bytes += 4.0 * ((double)count - share + share * (comm->size - 1));
    c->seconds += now_seconds() - start, c->calls++;
    return s;
}

static acmoe_status counted_exchange(acmoe_comm *comm, const float *send, const size_t *send_counts, float *recv,
                                     const size_t *recv_counts) {
    counted *c = (counted *)comm->user;
    const double start = now_seconds();
    acmoe_status s = c->inner->exchange(c->inner, send, send_counts, recv, recv_counts);
    int q;
    for (q = 0; q < comm->size; q++)
        if (q != comm->rank) c->bytes += 4.0 * (double)send_counts[q];
    c->seconds += now_seconds() - start, c->calls++;
    return s;
}

static acmoe_status counted_broadcast(acmoe_comm *comm, void *data, size_t bytes, int root) {
    counted *c = (counted *)comm->user;
    const double start = now_seconds();
    acmoe_status s = c->inner->broadcast(c->inner, data, bytes, root);
    if (comm->rank == root) c->bytes += (double)bytes * (comm->size - 1);
    c->seconds += now_seconds() - start, c->calls++;
    return s;
}

static acmoe_status counted_barrier(acmoe_comm *comm) {
    counted *c = (counted *)comm->user;
    return c->inner->barrier(c->inner);
}

static acmoe_comm counting(acmoe_comm *inner, counted *c) {
    acmoe_comm comm = *inner;
    memset(c, 0, sizeof *c);
    c->inner = inner;
    comm.user = c;
    comm.sum = counted_sum, comm.exchange = counted_exchange;
    comm.broadcast = counted_broadcast, comm.barrier = counted_barrier;
    return comm;
}

/* ---- the communicator's own costs ---- */

/* Seconds per call of a sum of count floats: the median of reps. */
static double sum_seconds(acmoe_comm *comm, float *data, size_t count, int reps) {
    double t[64], tmp;
    int i, j;
    for (i = 0; i < reps; i++) {
        double start;
        comm->barrier(comm);
        start = now_seconds();
        check(comm->sum(comm, data, count), "sum");
        t[i] = now_seconds() - start;
        check(comm->broadcast(comm, &t[i], sizeof t[i], 0), "broadcast"); /* rank 0's clock for all */
    }
    for (i = 1; i < reps; i++)
        for (j = i; j > 0 && t[j - 1] > t[j]; j--) tmp = t[j], t[j] = t[j - 1], t[j - 1] = tmp;
    return t[reps / 2];
}

/* ---- training steps ---- */

typedef struct measure {
    double seconds, comm_seconds, bytes;
    long calls;
} measure;

/* Per step: the median over steps of wall time; comm seconds, bytes and calls their mean. */
static measure run_steps(acmoe_lm_desc d, acmoe_comm *world, int mode, int steps, int threads) {
    counted c;
    acmoe_comm comm = counting(world, &c);
    acmoe_comm *ranks = mode ? &comm : NULL;
    const int size = mode ? world->size : 1, rank = mode ? world->rank : 0;
    const int batch = d.batch / size, seq = d.seq_len;
    acmoe_ctx_desc cd = acmoe_ctx_defaults();
    acmoe_optim_desc opt;
    acmoe_ctx *ctx;
    acmoe_lm *model;
    acmoe_rng rng;
    int32_t *tokens = (int32_t *)malloc(sizeof(int32_t) * (size_t)d.batch * seq * 2), *targets;
    double t[64], tmp;
    measure m;
    int step, i, j;
    memset(&opt, 0, sizeof opt), memset(&m, 0, sizeof m);
    targets = tokens + (size_t)d.batch * seq;
    cd.n_threads = threads;
    check(acmoe_ctx_create(&ctx, &cd), "context");
    check(acmoe_lm_create(&model, &d), "model");
    if (mode == 2) check(acmoe_lm_set_expert_ranks(model, ranks), "expert ranks");
    acmoe_rng_seed(&rng, 7);
    for (step = -2; step < steps; step++) { /* two steps to warm up */
        const size_t mine = (size_t)batch * seq * (size_t)rank;
        double start, bytes = c.bytes, inside = c.seconds;
        long calls = c.calls;
        float loss, norm;
        for (i = 0; i < d.batch * seq; i++) tokens[i] = (int32_t)acmoe_rng_below(&rng, 256), targets[i] = (int32_t)acmoe_rng_below(&rng, 256);
        world->barrier(world);
        start = now_seconds();
        check(acmoe_lm_forward(model, ctx, tokens + mine, targets + mine, batch, seq, 1, &loss), "forward");
        acmoe_lm_zero_grad(model);
        check(acmoe_lm_backward(model, ctx), "backward");
        if (ranks) check(acmoe_lm_reduce_grads(model, ranks), "reduce");
        check(acmoe_lm_step(model, ctx, &opt, &norm), "step");
        if (step < 0) continue;
        t[step] = now_seconds() - start;
        m.bytes += (c.bytes - bytes) / steps, m.comm_seconds += (c.seconds - inside) / steps;
        m.calls += (c.calls - calls);
    }
    for (i = 1; i < steps; i++)
        for (j = i; j > 0 && t[j - 1] > t[j]; j--) tmp = t[j], t[j] = t[j - 1], t[j - 1] = tmp;
    m.seconds = t[steps / 2];
    m.calls /= steps;
    check(world->broadcast(world, &m, sizeof m, 0), "broadcast"); /* rank 0's figures */
    acmoe_lm_destroy(model), acmoe_ctx_destroy(ctx), free(tokens);
    return m;
}

/* ---- the cost model ----
   A step on N nodes, each with the cores of this machine and the model's whole batch per
   step (weak scaling): the compute of one node alone, plus the collectives. A collective of
   m messages sending b bytes per rank takes m alpha + b / bandwidth. Data parallelism sums
   every gradient once; expert parallelism sums the replicated ones and, in each routed
   layer, exchanges the pair counts and four times the rows (out and back, forward and
   backward), each rank keeping 1/N of its rows. Routing is taken as uniform. */
typedef struct shape {
    double params, expert_params, tokens, layers, top_k, d_model;
} shape;

static shape shape_of(const acmoe_lm_desc *d) {
    shape s;
    acmoe_lm *model;
    const double e = d->n_experts, dm = d->d_model, ff = d->d_ff;
    check(acmoe_lm_create(&model, d), "model");
    s.params = (double)acmoe_lm_param_count(model);
    acmoe_lm_destroy(model);
    s.layers = (double)strlen(d->pattern);
    s.expert_params = s.layers * e * (2.0 * dm * ff + ff + dm);
    s.tokens = (double)d->batch * d->seq_len, s.top_k = d->top_k, s.d_model = dm;
    return s;
}

/* Seconds of one step's collectives on n nodes; *bytes the bytes each rank sends. */
static double comm_model(const shape *s, double tokens, int expert, int n, double alpha, double bandwidth, double *bytes) {
    const double others = (n - 1.0) / n, summed = expert ? s->params - s->expert_params : s->params;
    double messages = 2.0 * (n - 1), sent = 4.0 * summed * 2.0 * others;
    if (n == 1) return *bytes = 0.0;
    if (expert) {
        messages += 2.0 * (n - 1) + 5.0 * s->layers * (n - 1); /* the norm's sum; counts and rows */
        sent += 4.0 * s->layers * 4.0 * tokens * s->top_k * s->d_model * others;
    }
    *bytes = sent;
    return messages * alpha + sent / bandwidth;
}

/* The model against this run's collectives, then its predictions for N nodes. */
static void print_model(const acmoe_lm_desc *demo, const acmoe_comm *world, const measure *runs, double latency,
                        double big, size_t big_count, double alone_ms) {
    static const int nodes[5] = {1, 2, 8, 64, 512};
    static const double links[2][2] = {{1.25e9, 20e-6}, {12.5e9, 5e-6}}; /* 10 and 100 Gb/s */
    const int n = world->size;
    const double alpha = latency / (2.0 * (n - 1));
    const double bandwidth = 4.0 * (double)big_count * 2.0 * (n - 1) / n / (big - 2.0 * (n - 1) * alpha);
    acmoe_lm_desc larger = *demo;
    shape shapes[2];
    double bytes;
    int m, k, l, q;
    larger.n_experts = demo->n_experts * 10;
    shapes[0] = shape_of(demo), shapes[1] = shape_of(&larger);
    printf("\nThe model on this run (alpha %.2f us per message, %.2f GB/s):\n\n", 1e6 * alpha, bandwidth / 1e9);
    printf("| mode | collectives ms, model | measured | MB sent per rank, model | measured |\n|---|---|---|---|---|\n");
    for (m = 1; m < 3; m++) {
        const double model_ms = 1e3 * comm_model(&shapes[0], shapes[0].tokens / n, m == 2, n, alpha, bandwidth, &bytes);
        printf("| %s | %.1f | %.1f | %.2f | %.2f |\n", m == 1 ? "data-parallel" : "expert-parallel", model_ms,
               1e3 * runs[m].comm_seconds, bytes / 1e6, runs[m].bytes / 1e6);
    }
    for (k = 0; k < 2; k++) {
        printf("\n%s (E %d): %.2fM parameters, %.2fM of them in experts; %.0f tokens and %.0f ms of compute per "
               "node and step.\n\n", k ? "Ten times the experts" : "The measured model", k ? larger.n_experts : demo->n_experts,
               shapes[k].params / 1e6, shapes[k].expert_params / 1e6, shapes[k].tokens, alone_ms);
        printf("| link | nodes | data-parallel step ms | efficiency | MB per rank | expert-parallel step ms | efficiency | "
               "MB per rank |\n|---|---|---|---|---|---|---|---|\n");
        for (l = 0; l < 2; l++)
            for (q = 0; q < 5; q++) {
                double dp_bytes, ep_bytes;
                const double dp = alone_ms + 1e3 * comm_model(&shapes[k], shapes[k].tokens, 0, nodes[q], links[l][1], links[l][0], &dp_bytes);
                const double ep = alone_ms + 1e3 * comm_model(&shapes[k], shapes[k].tokens, 1, nodes[q], links[l][1], links[l][0], &ep_bytes);
                printf("| %.0f Gb/s, %.0f us | %d | %.1f | %.0f%% | %.1f | %.1f | %.0f%% | %.1f |\n", links[l][0] * 8e-9,
                       links[l][1] * 1e6, nodes[q], dp, 100.0 * alone_ms / dp, dp_bytes / 1e6, ep, 100.0 * alone_ms / ep,
                       ep_bytes / 1e6);
            }
    }
}

int main(int argc, char **argv) {
    static const char *const mode_names[3] = {"alone", "data-parallel", "expert-parallel"};
    MPI_Comm mpi_world = MPI_COMM_WORLD;
    acmoe_comm world;
    acmoe_lm_desc d;
    float *scratch;
    double latency, big;
    const size_t big_count = (size_t)1 << 22;
    measure runs[3];
    double alone_ms = 0.0;
    int steps = 8, markdown = 0, i, mode, cores = 2;
    MPI_Init(&argc, &argv);
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--cores") && i + 1 < argc) cores = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--markdown")) markdown = 1;
        else if (!strcmp(argv[i], "--alone-ms") && i + 1 < argc) alone_ms = atof(argv[++i]);
        else {
            fprintf(stderr, "usage: mpirun -np N bench_mpi [--steps 1..64] [--cores C] [--markdown] [--alone-ms MS]\n");
            return 2;
        }
    }
    if (steps < 1 || steps > 64 || cores < 1) return 2;
    check(acmoe_comm_mpi(&world, &mpi_world), "MPI communicator");
    if (world.rank > 0 && !freopen("/dev/null", "w", stdout)) return 1;
    /* the demo's SMoE model (make demo: train_lm's defaults, pattern ggg) */
    memset(&d, 0, sizeof d);
    d.d_model = 128, d.n_heads = 8, d.d_ff = 128, d.n_experts = 16, d.top_k = 2, d.seq_len = 128, d.batch = 8;
    d.pattern = "ggg", d.seed = 1;
    scratch = (float *)calloc(big_count, sizeof(float));
    latency = sum_seconds(&world, scratch, 1, 31);
    big = sum_seconds(&world, scratch, big_count, 7);
    if (markdown) {
        printf("| ranks | sum of 1 float | sum of %.0f MB |\n|---|---|---|\n", 4.0 * big_count / 1e6);
        printf("| %d | %.1f us | %.2f ms (%.2f GB/s sent per rank) |\n\n", world.size, 1e6 * latency, 1e3 * big,
               world.size > 1 ? 4.0 * big_count * 2.0 * (world.size - 1) / world.size / big / 1e9 : 0.0);
        printf("| ranks | mode | step ms | tokens/s | in collectives ms | calls | MB sent per rank |\n");
        printf("|---|---|---|---|---|---|---|\n");
    } else {
        printf("bench_mpi: %d rank(s), %d thread(s) each; sum of 1 float %.1f us, of %.0f MB %.2f ms\n", world.size,
               cores / world.size > 0 ? cores / world.size : 1, 1e6 * latency, 4.0 * big_count / 1e6, 1e3 * big);
    }
    for (mode = world.size > 1 ? 1 : 0; mode < (world.size > 1 ? 3 : 1); mode++) {
        const int threads = cores / world.size > 0 ? cores / world.size : 1;
        measure m = runs[mode] = run_steps(d, &world, mode, steps, threads);
        const double tokens = (double)d.batch * d.seq_len / m.seconds;
        if (markdown)
            printf("| %d | %s | %.1f | %.0f | %.1f | %ld | %.2f |\n", world.size, mode_names[mode], 1e3 * m.seconds, tokens,
                   1e3 * m.comm_seconds, m.calls, m.bytes / 1e6);
        else
            printf("  %-16s step %7.1f ms, %7.0f tokens/s; collectives %6.1f ms in %ld calls, %7.2f MB sent per rank\n",
                   mode_names[mode], 1e3 * m.seconds, tokens, 1e3 * m.comm_seconds, m.calls, m.bytes / 1e6);
    }
    if (markdown && world.size > 1 && alone_ms > 0.0) print_model(&d, &world, runs, latency, big, big_count, alone_ms);
    free(scratch);
    acmoe_comm_mpi_destroy(&world);
    MPI_Finalize();
    return 0;
}
