/* The MPI communicator under mpirun (make test-mpi, with 1, 2 and 4 ranks): the sum is the
   rank-order sum every rank can compute by hand, bit for bit, on every rank and every call;
   the exchange delivers each rank's counts in rank order; broadcast and barrier. Then
   data-parallel training against one process on the same global batch. Prints lines per
   rank and exits non-zero on any failure. */
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
} losses;

static int record(const acmoe_train_event *e, acmoe_lm *model, void *user) {
    losses *l = (losses *)user;
    (void)model;
    if (e->kind == ACMOE_EVENT_STEP) l->step[e->step] = e->loss;
    else l->val[e->step] = e->val_loss;
    return 0;
}

/* A small language model of the pattern trained for STEPS steps on a global batch of
   GLOBAL_BATCH sequences: alone (comm NULL) or shared among the ranks of comm, with AC
   statistics over every rank's tokens when global. */
static acmoe_lm *train(acmoe_comm *comm, const char *pattern, int global, losses *l) {
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
    t.on_event = record, t.user = l, t.comm = comm;
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
static void check_data_parallel(acmoe_comm *comm, const char *pattern, int global) {
    losses alone, shared, again;
    acmoe_lm *one = train(NULL, pattern, 0, &alone), *model = train(comm, pattern, global, &shared),
             *twice = train(comm, pattern, global, &again);
    float checksum = 0.0f;
    size_t i;
    int step;
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
        check_data_parallel(&comm, "gfg", 0);
        check_data_parallel(&comm, "gfc", 1);
        printf("rank %d of %d: %s\n", comm.rank, comm.size,
               failures ? "FAILED" : "data-parallel training matches one process, twice the same bits");
    }
    acmoe_comm_mpi_destroy(&comm);
    MPI_Finalize();
    return failures ? 1 : 0;
}
