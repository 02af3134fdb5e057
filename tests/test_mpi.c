/* The MPI communicator under mpirun (make test-mpi, with 1, 2 and 4 ranks): the sum is the
   rank-order sum every rank can compute by hand, bit for bit, on every rank and every call;
   the exchange delivers each rank's counts in rank order; broadcast and barrier. Then
   data-parallel training against one process on the same global batch; an expert-parallel
   layer against the same layer in one process, bit for bit, and expert-parallel training.
   Prints lines per rank and exits non-zero on any failure. */
#define ACMOE_MPI
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define EXPECT(cond)                                                                   \
    do {                                                                               \
        if (!(cond)) failures++, fprintf(stderr, "%s:%d: %s failed\n", __FILE__, __LINE__, #cond); \
    } while (0)

/* Rank r's value at i: sizes apart, so that the order of the additions shows in the bits. */
static float value_of(int rank, size_t i) { return (float)(sin((double)i * (rank + 1)) * pow(10.0, rank % 4) + 1e-3 * rank); }

static void check_sum(acmoe_comm *comm, size_t count) {
    float *data = (float *)malloc(sizeof(float) * (count + 1)), *again = (float *)malloc(sizeof(float) * (count + 1));
    size_t i;
    int q;
    for (i = 0; i < count; i++) data[i] = again[i] = value_of(comm->rank, i);
    EXPECT(comm->sum(comm, data, count) == ACMOE_OK);
    EXPECT(comm->sum(comm, again, count) == ACMOE_OK);
    for (i = 0; i < count; i++) {
        float want = value_of(0, i);
        for (q = 1; q < comm->size; q++) want += value_of(q, i);
        EXPECT(memcmp(&data[i], &want, sizeof want) == 0);
        EXPECT(memcmp(&again[i], &want, sizeof want) == 0);
    }
    free(data), free(again);
}

/* Rank r sends r + q + 1 floats r * 1000 + q * 10 + j to rank q. */
static void check_exchange(acmoe_comm *comm) {
    const int size = comm->size, r = comm->rank;
    size_t send_counts[64] = {0}, recv_counts[64] = {0}, sent = 0, got = 0, j;
    static float send[64 * 80], recv[64 * 80];
    int q;
    for (q = 0; q < size; q++) {
        send_counts[q] = (size_t)(r + q + 1), recv_counts[q] = (size_t)(q + r + 1);
        for (j = 0; j < send_counts[q]; j++) send[sent++] = (float)(r * 1000 + q * 10 + (int)j);
    }
    EXPECT(comm->exchange(comm, send, send_counts, recv, recv_counts) == ACMOE_OK);
    for (q = 0; q < size; q++)
        for (j = 0; j < recv_counts[q]; j++) EXPECT(recv[got++] == (float)(q * 1000 + r * 10 + (int)j));
}

/* ---- data parallelism ---- */

static const char text[] =
    "A mixture of experts splits a layer into many small networks and lets a router send each token to a few of "
    "them. The router is a clustering: tokens that look alike go to the same expert, and the expert learns what "
    "those tokens need. When the clusters are loose the experts learn the same things twice; when they are tight "
    "each expert specialises.\n";

#define STEPS 20
#define GLOBAL_BATCH 8

typedef struct losses {
    float step[STEPS + 1];
    double val[STEPS + 1];
    int split; /* layers whose experts were split over the ranks at the first step */
} losses;

static int record(const acmoe_train_event *e, acmoe_lm *model, void *user) {
    losses *l = (losses *)user;
    int i;
    if (e->kind == ACMOE_EVENT_STEP && e->step == 1)
        for (i = 0; i < 3; i++) l->split += acmoe_moe_expert_ranks(acmoe_lm_moe(model, i), NULL, NULL) != NULL;
    if (e->kind == ACMOE_EVENT_STEP) l->step[e->step] = e->loss;
    else l->val[e->step] = e->val_loss;
    return 0;
}

/* A small language model of the pattern trained for STEPS steps on a global batch of
   GLOBAL_BATCH sequences: alone (comm NULL) or shared among the ranks of comm, with AC
   statistics over every rank's tokens when global, and the experts split over the ranks
   when experts. */
static acmoe_lm *train(acmoe_comm *comm, const char *pattern, int global, int experts, losses *l) {
    acmoe_lm_desc d;
    acmoe_train_desc t;
    acmoe_corpus corpus;
    acmoe_ctx *ctx;
    acmoe_ctx_desc cd = acmoe_ctx_defaults();
    acmoe_lm *model = NULL;
    memset(&d, 0, sizeof d), memset(&t, 0, sizeof t), memset(l, 0, sizeof *l);
    d.d_model = 16, d.n_heads = 2, d.d_ff = 16, d.n_experts = 4, d.top_k = 2, d.seq_len = 16;
    d.batch = GLOBAL_BATCH, d.pattern = pattern, d.seed = 5;
    d.moe.ac.robust = 1; /* the paper's 1/eps weights of a lone token's cluster would magnify the
                            last bit of the statistics' sum order into other routing decisions */
    cd.comm = global ? comm : NULL;
    t.steps = STEPS, t.eval_every = 5, t.eval_batches = 2, t.log_every = 1, t.seed = 9, t.eval_corrupt = 0.1f;
    t.optim.lr = 3e-3f, t.optim.warmup_steps = 2, t.optim.clip_norm = 1.0f;
    t.on_event = record, t.user = l, t.comm = comm, t.expert_parallel = experts;
    EXPECT(acmoe_corpus_view(&corpus, (const unsigned char *)text, sizeof text - 1, 0.2f) == ACMOE_OK);
    EXPECT(acmoe_ctx_create(&ctx, &cd) == ACMOE_OK);
    EXPECT(acmoe_lm_create(&model, &d) == ACMOE_OK);
    EXPECT(acmoe_lm_train(model, ctx, &corpus, &t) == ACMOE_OK);
    acmoe_ctx_destroy(ctx);
    return model;
}

/* Every step's global loss and every evaluation within 1e-5 of one process training on the
   same global batch; twice the same bits; the same parameters on every rank. SMoE with a
   dense layer, and AC with its statistics over every rank's tokens. */
static void check_data_parallel(acmoe_comm *comm, const char *pattern, int global, int experts) {
    losses alone, shared, again;
    acmoe_lm *one = train(NULL, pattern, 0, 0, &alone), *model = train(comm, pattern, global, experts, &shared),
             *twice = train(comm, pattern, global, experts, &again);
    float checksum = 0.0f;
    size_t i;
    int step;
    EXPECT(shared.split == (experts && comm->size > 1 ? 2 : 0)); /* the two routed layers */
    EXPECT(acmoe_moe_expert_ranks(acmoe_lm_moe(model, 0), NULL, NULL) == NULL); /* whole again */
    for (step = 1; step <= STEPS; step++) {
        EXPECT(fabsf(shared.step[step] - alone.step[step]) <= 1e-5f * fabsf(alone.step[step]));
        EXPECT(fabs(shared.val[step] - alone.val[step]) <= 1e-5 * fabs(alone.val[step]));
        EXPECT(memcmp(&shared.step[step], &again.step[step], sizeof(float)) == 0);
    }
    EXPECT(memcmp(acmoe_lm_params(model), acmoe_lm_params(twice), sizeof(float) * acmoe_lm_param_count(model)) == 0);
    for (i = 0; i < acmoe_lm_param_count(model); i++) checksum += acmoe_lm_params(model)[i] * (float)(i % 7 + 1);
    {
        float first = checksum;
        EXPECT(comm->broadcast(comm, &first, sizeof first, 0) == ACMOE_OK);
        EXPECT(memcmp(&first, &checksum, sizeof first) == 0);
    }
    acmoe_lm_destroy(one), acmoe_lm_destroy(model), acmoe_lm_destroy(twice);
}

/* ---- expert parallelism ---- */

#define LAYER_TOKENS 24 /* per rank */
#define LAYER_EXPERTS 4

static void fill(float *v, size_t n, uint64_t seed) {
    acmoe_rng rng;
    size_t i;
    acmoe_rng_seed(&rng, seed);
    for (i = 0; i < n; i++) v[i] = acmoe_rng_normal(&rng);
}

/* A layer of router letter with its experts split over the ranks, each rank forwarding its
   LAYER_TOKENS tokens of a global batch, against the same layer running every rank's tokens
   in this process: the same bits for the outputs, the input gradients and this rank's
   experts' gradients; zero for the other experts'; router gradients summed over the ranks
   within 1e-5. */
static void check_expert_layer(acmoe_comm *comm, char letter) {
    const int dm = 12, ff = 10, e = LAYER_EXPERTS, n = LAYER_TOKENS, all = n * comm->size;
    const size_t router = (size_t)e * dm + e, mine = (size_t)comm->rank * n * dm;
    acmoe_moe_desc d;
    acmoe_moe *one, *split;
    acmoe_ctx *ctx;
    acmoe_rng rng;
    size_t count, i, part[4], at;
    float *p, *g_one, *g_split, *x, *dout, *out_one, *out_split, *dx_one, *dx_split, scale = 0.0f;
    int first, per, k;
    memset(&d, 0, sizeof d);
    d.d_model = dm, d.d_ff = ff, d.n_experts = e, d.top_k = 2, d.max_tokens = all;
    EXPECT(acmoe_moe_router_preset(&d, letter) == ACMOE_OK);
    count = acmoe_moe_param_count(&d);
    p = (float *)calloc(count * 3 + (size_t)all * dm * 6, sizeof(float));
    g_one = p + count, g_split = g_one + count, x = g_split + count, dout = x + (size_t)all * dm;
    out_one = dout + (size_t)all * dm, out_split = out_one + (size_t)all * dm;
    dx_one = out_split + (size_t)all * dm, dx_split = dx_one + (size_t)all * dm;
    fill(x, (size_t)all * dm, 21), fill(dout, (size_t)all * dm, 22);
    EXPECT(acmoe_ctx_create(&ctx, NULL) == ACMOE_OK);
    EXPECT(acmoe_moe_create(&one, &d, p, g_one) == ACMOE_OK);
    d.max_tokens = n;
    EXPECT(acmoe_moe_create(&split, &d, p, g_split) == ACMOE_OK);
    acmoe_rng_seed(&rng, 3);
    EXPECT(acmoe_moe_init_params(one, &rng) == ACMOE_OK);
    EXPECT(acmoe_moe_set_expert_ranks(split, comm) == ACMOE_OK);
    EXPECT(acmoe_moe_expert_ranks(split, &first, &per) == (comm->size > 1 ? comm : NULL));
    EXPECT(first == comm->rank * e / comm->size && per == e / comm->size);
    EXPECT(acmoe_moe_forward(one, ctx, x, all, NULL, NULL, 0, out_one) == ACMOE_OK);
    EXPECT(acmoe_moe_backward(one, ctx, dout, dx_one) == ACMOE_OK);
    for (k = 0; k < 2; k++) { /* twice: the second call reuses the workspace */
        memset(g_split, 0, sizeof(float) * count);
        EXPECT(acmoe_moe_forward(split, ctx, x + mine, n, NULL, NULL, 0, out_split) == ACMOE_OK);
        EXPECT(acmoe_moe_backward(split, ctx, dout + mine, dx_split) == ACMOE_OK);
        EXPECT(memcmp(out_split, out_one + mine, sizeof(float) * n * dm) == 0);
        EXPECT(memcmp(dx_split, dx_one + mine, sizeof(float) * n * dm) == 0);
    }
    part[0] = (size_t)ff * dm, part[1] = (size_t)ff, part[2] = (size_t)dm * ff, part[3] = (size_t)dm; /* w1 b1 w2 b2 */
    for (at = router, k = 0; k < 4; at += part[k] * e, k++)
        for (i = 0; i < part[k] * e; i++) {
            const int expert = (int)(i / part[k]);
            if (expert >= first && expert < first + per) EXPECT(memcmp(&g_split[at + i], &g_one[at + i], sizeof(float)) == 0);
            else EXPECT(g_split[at + i] == 0.0f);
        }
    EXPECT(comm->sum(comm, g_split, router) == ACMOE_OK);
    for (i = 0; i < router; i++) scale = fmaxf(scale, fabsf(g_one[i]));
    for (i = 0; i < router; i++) EXPECT(fabsf(g_split[i] - g_one[i]) <= 1e-5f * scale);
    acmoe_moe_destroy(split);
    if (comm->size > 1) { /* rules that see the whole call, and experts that do not divide */
        EXPECT(acmoe_moe_router_preset(&d, 'u') == ACMOE_OK);
        EXPECT(acmoe_moe_create(&split, &d, p, g_split) == ACMOE_OK);
        EXPECT(acmoe_moe_set_expert_ranks(split, comm) == ACMOE_ERR_UNSUPPORTED);
        acmoe_moe_destroy(split);
        EXPECT(acmoe_moe_router_preset(&d, letter) == ACMOE_OK);
        d.n_experts = e - 1;
        EXPECT(acmoe_moe_create(&split, &d, p, g_split) == ACMOE_OK);
        EXPECT(acmoe_moe_set_expert_ranks(split, comm) == ACMOE_ERR_ARG);
        EXPECT(acmoe_moe_expert_ranks(split, NULL, NULL) == NULL);
        acmoe_moe_destroy(split);
    }
    acmoe_moe_destroy(one), acmoe_ctx_destroy(ctx), free(p);
}

int main(int argc, char **argv) {
    MPI_Comm world = MPI_COMM_WORLD;
    acmoe_comm comm;
    char word[16] = "";
    MPI_Init(&argc, &argv);
    EXPECT(acmoe_comm_mpi(&comm, &world) == ACMOE_OK);
    if (comm.size > 64) MPI_Abort(world, 2);
    check_sum(&comm, 1001);
    check_sum(&comm, 1);  /* fewer values than ranks: some ranks sum none */
    check_sum(&comm, 0);
    check_sum(&comm, 70000); /* the scratch grows */
    check_exchange(&comm);
    if (comm.rank == comm.size - 1) strcpy(word, "from the last");
    EXPECT(comm.broadcast(&comm, word, sizeof word, comm.size - 1) == ACMOE_OK);
    EXPECT(strcmp(word, "from the last") == 0);
    EXPECT(comm.broadcast(&comm, word, sizeof word, comm.size) == ACMOE_ERR_ARG);
    EXPECT(comm.barrier(&comm) == ACMOE_OK);
    printf("rank %d of %d: %s\n", comm.rank, comm.size, failures ? "FAILED" : "sum, exchange, broadcast and barrier ok");
    if (GLOBAL_BATCH % comm.size == 0) {
        check_data_parallel(&comm, "gfg", 0, 0);
        check_data_parallel(&comm, "gfc", 1, 0);
        printf("rank %d of %d: %s\n", comm.rank, comm.size,
               failures ? "FAILED" : "data-parallel training matches one process, twice the same bits");
    }
    if (LAYER_EXPERTS % comm.size == 0 && GLOBAL_BATCH % comm.size == 0) {
        check_expert_layer(&comm, 'g');
        check_expert_layer(&comm, 's');
        check_data_parallel(&comm, "gfg", 0, 1);
        check_data_parallel(&comm, "gfc", 1, 1);
        printf("rank %d of %d: %s\n", comm.rank, comm.size,
               failures ? "FAILED" : "expert-parallel layer the same bits as one process, training within 1e-5");
    }
    acmoe_comm_mpi_destroy(&comm);
    MPI_Finalize();
    return failures ? 1 : 0;
}
