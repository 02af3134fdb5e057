/* Two MoE layers on raw arrays, for users with their own framework: an SMoE layer ('g') and
   an Adaptive Clustering layer ('c') after it. The AC layer's labels are the first layer's
   choices: stats.expert_index, each token's experts best first. Then one forward and backward
   pass through both, and the AC routing alone with acmoe_ac_route. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

/* Enough tokens that every cluster has several: the reference gives a cluster of one token
   weight 1 / eps, which flattens the others (acmoe_ac_desc.robust avoids that). */
enum { N = 64, D = 8, D_FF = 16, E = 4, K = 2 };

static void check(acmoe_status s, const char *what) {
    if (s == ACMOE_OK) return;
    fprintf(stderr, "%s: %s\n", what, acmoe_status_string(s));
    exit(1);
}

/* A layer of router letter `letter`, its parameters drawn from rng. */
static acmoe_moe *make_layer(char letter, acmoe_rng *rng, float **params, float **grads) {
    acmoe_moe_desc desc = {0};
    acmoe_moe *layer;
    size_t count;
    desc.d_model = D, desc.d_ff = D_FF, desc.n_experts = E, desc.max_tokens = N, desc.top_k = K;
    check(acmoe_moe_router_preset(&desc, letter), "router preset");
    count = acmoe_moe_param_count(&desc);
    *params = (float *)calloc(count, sizeof(float)), *grads = (float *)calloc(count, sizeof(float));
    if (!*params || !*grads) check(ACMOE_ERR_NOMEM, "parameters");
    check(acmoe_moe_create(&layer, &desc, *params, *grads), "layer");
    check(acmoe_moe_init_params(layer, rng), "initialisation");
    printf("layer '%c': %zu parameters\n", letter, count);
    return layer;
}

int main(void) {
    static float x[N * D], h[N * D], out[N * D], dh[N * D], dx[N * D], emb[E * D], gate[N * K], w[E * D];
    float *p1, *g1, *p2, *g2;
    int32_t idx[N * K];
    acmoe_ctx *ctx;
    acmoe_rng rng;
    acmoe_moe *smoe, *ac;
    acmoe_moe_stats s1, s2;
    acmoe_ac_desc ac_desc = acmoe_ac_defaults();
    double loss = 0, dx_norm = 0;
    int i, w_rows;

    acmoe_rng_seed(&rng, 1);
    check(acmoe_ctx_create(&ctx, NULL), "context");
    smoe = make_layer('g', &rng, &p1, &g1);
    ac = make_layer('c', &rng, &p2, &g2);
    for (i = 0; i < N * D; i++) x[i] = acmoe_rng_normal(&rng);

    /* Forward: the SMoE layer needs no labels; the AC layer reads h = x + SMoE(x), with the
       SMoE layer's choices as its labels. */
    check(acmoe_moe_forward(smoe, ctx, x, N, NULL, NULL, 0, h), "SMoE forward");
    for (i = 0; i < N * D; i++) h[i] += x[i];
    s1 = acmoe_moe_last_stats(smoe);
    check(acmoe_moe_forward(ac, ctx, h, N, s1.expert_index, s1.gate, s1.top_k, out), "AC forward");
    s2 = acmoe_moe_last_stats(ac);
    printf("token  SMoE experts  -> AC experts (gates)\n");
    for (i = 0; i < 4; i++)
        printf("%5d  %d %d           -> %d %d (%.3f %.3f)\n", i, s1.expert_index[i * K], s1.expert_index[i * K + 1],
               s2.expert_index[i * K], s2.expert_index[i * K + 1], s2.gate[i * K], s2.gate[i * K + 1]);
    printf("AC layer: %d clusters from the SMoE layer's labels, feature weights mean %.2f, max %.2f\n", s2.ac_clusters,
           s2.ac_w_mean, s2.ac_w_max);

    /* Backward for the loss sum(out^2) / 2, whose gradient is out itself: the AC layer first,
       its input gradient dh then through the SMoE layer plus the residual's dh. Parameter
       gradients land in g1 and g2. */
    for (i = 0; i < N * D; i++) loss += 0.5 * out[i] * out[i];
    check(acmoe_moe_backward(ac, ctx, out, dh), "AC backward");
    check(acmoe_moe_backward(smoe, ctx, dh, dx), "SMoE backward");
    for (i = 0; i < N * D; i++) dx_norm += (double)(dx[i] + dh[i]) * (dx[i] + dh[i]);
    printf("loss %.4f, |d loss / dx| %.4f\n", loss, sqrt(dx_norm));

    /* The AC router alone: the same labels, expert embeddings of our own. */
    for (i = 0; i < E * D; i++) emb[i] = acmoe_rng_normal(&rng);
    check(acmoe_ac_route(&ac_desc, h, N, D, s1.expert_index, s1.top_k, emb, E, K, idx, gate, NULL, w, &w_rows),
          "acmoe_ac_route");
    printf("acmoe_ac_route: token 0 (cluster %d) -> experts %d %d, gates %.3f %.3f; W has %d rows\n",
           s1.expert_index[0], idx[0], idx[1], gate[0], gate[1], w_rows);

    acmoe_moe_destroy(ac);
    acmoe_moe_destroy(smoe);
    free(p1), free(g1), free(p2), free(g2);
    acmoe_ctx_destroy(ctx);
    return 0;
}
