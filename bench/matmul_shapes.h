/* matmul_shapes.h - the products of bench section 1, shared by bench/bench.c (acmoe_matmul)
   and bench/openblas_peer.c (OpenBLAS's cblas_sgemm), so both time the same list.

   Every shape is timed in every layout of matmul_layout_names, named as acmoe_matmul names
   them (acmoe.h, section 5): all matrices row-major; op(A) is m x k, A itself (m rows of k)
   for NN and NT or A transposed (A has k rows of m) for TN; op(B) is k x n, B itself (k rows
   of n) for NN and TN or B transposed (n rows of k) for NT. A holds m * k floats and B k * n
   in every layout; only the leading dimensions differ (matmul_leading_dims). */
#ifndef ACMOE_BENCH_MATMUL_SHAPES_H
#define ACMOE_BENCH_MATMUL_SHAPES_H

/* M, N, K: expert-sized products (a few hundred tokens through 352 -> 1408 -> 352 layers),
   tall and deep extremes, and square references. */
static const int matmul_shapes[][3] = {
    {64, 352, 352},     {256, 352, 352},  {512, 1408, 352}, {512, 352, 1408},
    {1024, 1024, 1024}, {4096, 128, 128}, {128, 128, 4096}, {2048, 2048, 2048}};

#define MATMUL_SHAPE_COUNT ((int)(sizeof matmul_shapes / sizeof matmul_shapes[0]))

/* The first letter says whether A is transposed, the second whether B is. */
static const char matmul_layout_names[][3] = {"NN", "NT", "TN"};

#define MATMUL_LAYOUT_COUNT ((int)(sizeof matmul_layout_names / sizeof matmul_layout_names[0]))

#define MATMUL_MAX_REPS 1000 /* bounds the time of the smallest shapes */

/* The leading dimensions of packed row-major operands of an m x n x k product in a layout. */
static void matmul_leading_dims(const char *layout, int m, int n, int k, int *lda, int *ldb) {
    *lda = layout[0] == 'T' ? m : k; /* A is k x m when transposed */
    *ldb = layout[1] == 'T' ? k : n; /* B is n x k when transposed */
}

#endif
