/* The MPI communicator under mpirun (make test-mpi, with 1, 2 and 4 ranks): the sum is the
   rank-order sum every rank can compute by hand, bit for bit, on every rank and every call;
   the exchange delivers each rank's counts in rank order; broadcast and barrier. Prints one
   line per rank and exits non-zero on any failure. */
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
    acmoe_comm_mpi_destroy(&comm);
    MPI_Finalize();
    return failures ? 1 : 0;
}
