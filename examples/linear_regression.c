/* Fits a linear layer Y = X W^T to a hidden linear map by gradient descent, with the three
   products every layer of acmoe uses: forward Y = X W^T (NT), weight gradient dW = dY^T X (TN)
   and input gradient dX = dY W (NN, shown for completeness). */
#include <stdio.h>
#include <stdlib.h>

#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

enum { N_SAMPLES = 4096, D_IN = 64, D_OUT = 16, STEPS = 200 };

static void check(acmoe_status s, const char *what) {
    if (s == ACMOE_OK) return;
    fprintf(stderr, "%s: %s\n", what, acmoe_status_string(s));
    exit(1);
}

int main(void) {
    static float x[N_SAMPLES * D_IN], y[N_SAMPLES * D_OUT], w_true[D_OUT * D_IN];
    static float w[D_OUT * D_IN], pred[N_SAMPLES * D_OUT], dw[D_OUT * D_IN], dx[N_SAMPLES * D_IN];
    acmoe_ctx *ctx;
    acmoe_rng rng;
    int step, i;
    acmoe_rng_seed(&rng, 1);
    check(acmoe_ctx_create(&ctx, NULL), "context");
    printf("kernel path %s, %d threads\n", acmoe_isa_name(acmoe_ctx_settings(ctx).isa),
           acmoe_ctx_settings(ctx).n_threads);
    for (i = 0; i < N_SAMPLES * D_IN; i++) x[i] = acmoe_rng_normal(&rng);
    for (i = 0; i < D_OUT * D_IN; i++) w_true[i] = acmoe_rng_normal(&rng) * 0.5f;
    check(acmoe_matmul(ctx, ACMOE_NT, N_SAMPLES, D_OUT, D_IN, x, D_IN, w_true, D_IN, y, D_OUT, 0), "targets");
    for (i = 0; i < N_SAMPLES * D_OUT; i++) y[i] += 0.01f * acmoe_rng_normal(&rng);

    for (step = 0; step <= STEPS; step++) {
        double loss = 0.0;
        check(acmoe_matmul(ctx, ACMOE_NT, N_SAMPLES, D_OUT, D_IN, x, D_IN, w, D_IN, pred, D_OUT, 0), "forward");
        for (i = 0; i < N_SAMPLES * D_OUT; i++) { /* mean squared error and its gradient */
            float r = pred[i] - y[i];
            loss += (double)r * r;
            pred[i] = 2.0f * r / N_SAMPLES;
        }
        if (step % 40 == 0) printf("step %3d  mse %.6f\n", step, loss / (N_SAMPLES * D_OUT));
        check(acmoe_matmul(ctx, ACMOE_TN, D_OUT, D_IN, N_SAMPLES, pred, D_OUT, x, D_IN, dw, D_IN, 0), "dW");
        check(acmoe_matmul(ctx, ACMOE_NN, N_SAMPLES, D_IN, D_OUT, pred, D_OUT, w, D_IN, dx, D_IN, 0), "dX");
        for (i = 0; i < D_OUT * D_IN; i++) w[i] -= 0.1f * dw[i];
    }
    acmoe_ctx_destroy(ctx);
    return 0;
}
