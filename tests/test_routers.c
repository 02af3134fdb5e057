/* Routers: the AC router against the worked vectors of AC-ROUTER-SPEC.md, its variants,
   top-k invariants and bad input. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../acmoe.h"
#include "harness.h"

/* The spec's case 1: d = 3, 4 experts, 8 tokens in clusters 0, 0, 0, 2, 2, 1, 1, 1. */
static const float spec_x[8 * 3] = {.5f, -1, 2,   .7f, -.8f, 1, .6f, -1.2f, 3,  -1, .3f, .2f,
                                    -1.4f, .1f, 0, 0,  2,   -1, .4f, 1,    -2, -.2f, 1.5f, .5f};
static const int32_t spec_labels[8] = {0, 0, 0, 2, 2, 1, 1, 1};
static const float spec_emb[4 * 3] = {1, 0, 0, 0, 2, 0, 0, 0, 3, 1, 1, 1};

static int close_to(const float *got, const float *want, int n, float tol) {
    int i, ok = 1;
    for (i = 0; i < n; i++) {
        if (fabsf(got[i] - want[i]) > tol * (1.0f + fabsf(want[i]))) {
            fprintf(stderr, "    [%d] = %.7g, expected %.7g\n", i, got[i], want[i]);
            ok = 0;
        }
    }
    return ok;
}

/* Routes the spec tokens (the first n) with desc; returns the status. */
static acmoe_status route_spec(const acmoe_ac_desc *desc, int n, int32_t *idx, float *gate, float *logits,
                               float *w, int *w_rows) {
    return acmoe_ac_route(desc, spec_x, n, 3, spec_labels, 1, spec_emb, 4, 2, idx, gate, logits, w, w_rows);
}

static void test_ac_spec_case1(void) {
    static const float want_w[9] = {1.836006f, 1.097622f, 0.356674f, 0.551380f, 0.439247f,
                                    0.267516f, 0.612614f, 1.463131f, 2.375810f};
    static const float want_logits0[4] = {0.918003f, -1.097622f, 0.713349f, 0.308149f};
    static const float want_logits3[4] = {-0.612614f, 0.438939f, 0.475162f, 0.174064f};
    int32_t idx[16];
    float gate[16], logits[32], w[9], sum;
    int rows = -1, t;
    CHECK_STATUS(route_spec(NULL, 8, idx, gate, logits, w, &rows), ACMOE_OK);
    CHECK(rows == 3);
    CHECK(close_to(w, want_w, 9, 1e-5f));
    CHECK(close_to(logits, want_logits0, 4, 1e-5f));
    CHECK(close_to(logits + 12, want_logits3, 4, 1e-5f));
    CHECK(idx[0] == 0 && idx[1] == 2 && idx[6] == 2 && idx[7] == 1);
    CHECK(fabsf(gate[0] - 0.550986f) < 1e-5f && fabsf(gate[1] - 0.449014f) < 1e-5f);
    CHECK(fabsf(gate[6] - 0.509055f) < 1e-5f && fabsf(gate[7] - 0.490945f) < 1e-5f);
    for (t = 0; t < 8; t++) { /* invariants: gates sum to 1, sorted, distinct experts */
        sum = gate[2 * t] + gate[2 * t + 1];
        CHECK(fabsf(sum - 1.0f) < 1e-6f && gate[2 * t] >= gate[2 * t + 1] && idx[2 * t] != idx[2 * t + 1]);
    }
}

/* Cluster 1 a singleton: the reference's pathology, kept by default. */
static void test_ac_spec_case2_singleton(void) {
    static const float want_default[9] = {0.004484f, 0.002244f, 0.000449f, 2.994f, 2.995f,
                                          2.997f,    0.001496f, 0.002992f, 0.002994f};
    static const float want_robust[9] = {1.499625f, 0.8572652f, 0.2610623f, 1, 1, 1, 0.5003747f, 1.142735f, 1.738938f};
    acmoe_ac_desc robust;
    int32_t idx[12];
    float gate[12], w[9];
    int i, ok = 1;
    CHECK_STATUS(route_spec(NULL, 6, idx, gate, NULL, w, NULL), ACMOE_OK);
    for (i = 0; i < 9; i++) ok &= fabsf(w[i] - want_default[i]) <= 5e-4f * fabsf(want_default[i]) + 1e-6f;
    CHECK(ok);
    CHECK(fabsf(gate[0] - 0.5f) < 0.01f); /* flattened gates, as the spec warns */
    memset(&robust, 0, sizeof robust);
    robust.robust = 1;
    CHECK_STATUS(route_spec(&robust, 6, idx, gate, NULL, w, NULL), ACMOE_OK);
    CHECK(close_to(w, want_robust, 9, 1e-5f));
}

/* The vision variants and the variance ablation, against an independent evaluation of the
   reference formulas. */
static void test_ac_variants(void) {
    static const float want_pre[9] = {1.5f, 1.171583f, 0.2344572f, 0.7031608f, 0.4688442f,
                                      0.1758495f, 0.7812508f, 1.5f, 1.5f};
    static const float want_post[9] = {1.372879f, 1.183516f, 0.5626553f, 0.9996692f, 0.8371213f,
                                       0.4617306f, 1.04006f, 1.271184f, 1.271184f};
    static const float want_var[9] = {9.375f, 7.894737f, 1.304348f, 6.164384f, 3.75f,
                                      0.8653846f, 7.142857f, 9.090909f, 9.090909f};
    acmoe_ac_desc d;
    int32_t idx[16];
    float gate[16], w[9];
    memset(&d, 0, sizeof d);
    d.clip = 1.5f;
    d.scaling = ACMOE_AC_SCALE_PRECLIP_MEAN; /* Swin-MoE */
    CHECK_STATUS(route_spec(&d, 8, idx, gate, NULL, w, NULL), ACMOE_OK);
    CHECK(close_to(w, want_pre, 9, 1e-5f));
    d.eps = 0.35f;
    d.clip = 5.0f;
    d.scaling = ACMOE_AC_SCALE_POSTCLIP_MEAN; /* Soft MoE */
    CHECK_STATUS(route_spec(&d, 8, idx, gate, NULL, w, NULL), ACMOE_OK);
    CHECK(close_to(w, want_post, 9, 1e-5f));
    memset(&d, 0, sizeof d);
    d.dispersion = ACMOE_AC_DISP_VARIANCE; /* eps defaults to 0.1 */
    CHECK_STATUS(route_spec(&d, 8, idx, gate, NULL, w, NULL), ACMOE_OK);
    CHECK(close_to(w, want_var, 9, 1e-5f));
    d = acmoe_ac_defaults();
    CHECK(d.eps == 1e-4f && d.clip == 10.0f && d.scaling == ACMOE_AC_SCALE_PER_FEATURE && !d.robust);
}

/* K counts every column of prev_idx: a second column reaching expert 5 adds three empty
   clusters, and the labels still come from column 0. */
static void test_ac_two_previous_columns(void) {
    static const float want_w_head[9] = {0.002993065f, 0.001497853f, 0.0002998289f, 0.0008988619f, 0.0005994108f,
                                         0.0002248801f, 0.0009986856f, 0.001996639f, 0.001997162f};
    int32_t prev[16], idx[16];
    float gate[16], w[18];
    int rows = 0, t;
    for (t = 0; t < 8; t++) prev[2 * t] = spec_labels[t], prev[2 * t + 1] = t == 4 ? 5 : 0;
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 8, 3, prev, 2, spec_emb, 4, 2, idx, gate, NULL, w, &rows), ACMOE_OK);
    CHECK(rows == 6);
    CHECK(close_to(w, want_w_head, 9, 1e-4f));
    CHECK(fabsf(w[9] - 1.99837f) < 1e-4f && fabsf(w[17] - 1.999159f) < 1e-4f);
    CHECK(idx[0] == 0 && idx[1] == 2 && fabsf(gate[0] - 0.5002242f) < 1e-5f);
    CHECK(idx[10] == 1 && idx[11] == 3 && fabsf(gate[10] - 0.5001591f) < 1e-5f);
}

/* Optional outputs change nothing; k = E, one token, and ties to the lower index. */
static void test_ac_shapes(void) {
    int32_t idx_a[32], idx_b[32], idx4[4], label0 = 0;
    float gate_a[32], gate_b[32], gate4[4], logits[32], w[9], sum = 0.0f, tie_emb[2 * 3] = {0, 0, 1, 0, 0, 1};
    int i;
    CHECK_STATUS(route_spec(NULL, 8, idx_a, gate_a, NULL, NULL, NULL), ACMOE_OK);
    CHECK_STATUS(route_spec(NULL, 8, idx_b, gate_b, logits, w, &i), ACMOE_OK);
    CHECK(memcmp(idx_a, idx_b, 16 * sizeof idx_a[0]) == 0 && memcmp(gate_a, gate_b, 16 * sizeof gate_a[0]) == 0);
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 8, 3, spec_labels, 1, spec_emb, 4, 4, idx_a, gate_a, NULL, NULL, NULL),
                 ACMOE_OK);
    for (i = 0; i < 4; i++) sum += gate_a[i];
    CHECK(fabsf(sum - 1.0f) < 1e-6f && idx_a[0] == 0 && idx_a[1] == 2 && idx_a[2] == 3 && idx_a[3] == 1);
    /* one token: its own cluster of one, weight 1e4 everywhere, scaled back to 1 */
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 1, 3, &label0, 1, spec_emb, 4, 1, idx4, gate4, NULL, NULL, NULL), ACMOE_OK);
    CHECK(idx4[0] == 2 && gate4[0] == 1.0f); /* x = (.5, -1, 2) points at expert 2 */
    /* two identical experts: the lower index wins */
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 1, 3, &label0, 1, tie_emb, 2, 1, idx4, gate4, NULL, NULL, NULL), ACMOE_OK);
    CHECK(idx4[0] == 0);
    /* no tokens: nothing to do, no clusters */
    CHECK_STATUS(acmoe_ac_route(NULL, NULL, 0, 3, NULL, 1, spec_emb, 4, 2, NULL, NULL, NULL, NULL, &i), ACMOE_OK);
    CHECK(i == 0);
}

/* Logits that overflow become the smallest finite logit of the call. */
static void test_ac_nonfinite_logits(void) {
    float x[2 * 3] = {3e38f, 3e38f, 3e38f, 1, -2, 0.5f}, emb[2 * 3] = {1, 1, 1, 1, 0, 0}, logits[4], gate[2];
    int32_t labels[2] = {0, 1}, idx[2];
    acmoe_ac_desc robust;
    memset(&robust, 0, sizeof robust);
    robust.robust = 1; /* two one-token clusters: W = 1, the logits are plain cosine scores */
    CHECK_STATUS(acmoe_ac_route(&robust, x, 2, 3, labels, 1, emb, 2, 1, idx, gate, logits, NULL, NULL), ACMOE_OK);
    /* token 0 against expert 0 overflows (3 * 3e38 / sqrt 3); the smallest finite logit is
       token 1 against expert 0, (1 - 2 + 0.5) / sqrt 3 */
    CHECKF(fabsf(logits[2] + 0.2886751f) < 1e-6f && fabsf(logits[3] - 1.0f) < 1e-6f, "%g %g", logits[2], logits[3]);
    CHECK(logits[0] == logits[2]);
    CHECK(logits[1] == 3e38f && idx[0] == 1 && idx[1] == 1);
}

static void test_ac_bad_input(void) {
    int32_t idx[16], bad_labels[8] = {0, 0, -1, 2, 2, 1, 1, 1};
    float gate[16], x_nan[8 * 3], emb_inf[4 * 3];
    acmoe_ac_desc d;
    memcpy(x_nan, spec_x, sizeof x_nan);
    x_nan[7] = NAN;
    memcpy(emb_inf, spec_emb, sizeof emb_inf);
    emb_inf[0] = INFINITY;
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 8, 3, spec_labels, 1, spec_emb, 4, 5, idx, gate, NULL, NULL, NULL),
                 ACMOE_ERR_SHAPE); /* k > E */
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 8, 3, spec_labels, 1, spec_emb, 4, 0, idx, gate, NULL, NULL, NULL),
                 ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, -1, 3, spec_labels, 1, spec_emb, 4, 2, idx, gate, NULL, NULL, NULL),
                 ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 8, 0, spec_labels, 1, spec_emb, 4, 2, idx, gate, NULL, NULL, NULL),
                 ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 8, 3, spec_labels, 0, spec_emb, 4, 2, idx, gate, NULL, NULL, NULL),
                 ACMOE_ERR_SHAPE);
    CHECK_STATUS(acmoe_ac_route(NULL, x_nan, 8, 3, spec_labels, 1, spec_emb, 4, 2, idx, gate, NULL, NULL, NULL),
                 ACMOE_ERR_NONFINITE);
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 8, 3, spec_labels, 1, emb_inf, 4, 2, idx, gate, NULL, NULL, NULL),
                 ACMOE_ERR_NONFINITE);
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 8, 3, bad_labels, 1, spec_emb, 4, 2, idx, gate, NULL, NULL, NULL),
                 ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_ac_route(NULL, NULL, 8, 3, spec_labels, 1, spec_emb, 4, 2, idx, gate, NULL, NULL, NULL),
                 ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 8, 3, spec_labels, 1, NULL, 4, 2, idx, gate, NULL, NULL, NULL),
                 ACMOE_ERR_NULL);
    CHECK_STATUS(acmoe_ac_route(NULL, spec_x, 8, 3, spec_labels, 1, spec_emb, 4, 2, NULL, gate, NULL, NULL, NULL),
                 ACMOE_ERR_NULL);
    memset(&d, 0, sizeof d);
    d.eps = -1.0f;
    CHECK_STATUS(route_spec(&d, 8, idx, gate, NULL, NULL, NULL), ACMOE_ERR_ARG);
    d.eps = NAN;
    CHECK_STATUS(route_spec(&d, 8, idx, gate, NULL, NULL, NULL), ACMOE_ERR_ARG);
    d.eps = 0.0f;
    d.scaling = (acmoe_ac_scaling)9;
    CHECK_STATUS(route_spec(&d, 8, idx, gate, NULL, NULL, NULL), ACMOE_ERR_ARG);
    d.scaling = ACMOE_AC_SCALE_DEFAULT;
    d.dispersion = (acmoe_ac_dispersion)-1;
    CHECK_STATUS(route_spec(&d, 8, idx, gate, NULL, NULL, NULL), ACMOE_ERR_ARG);
    CHECK(strlen(acmoe_status_string(ACMOE_ERR_NONFINITE)) > 1);
}

const test_case router_tests[] = {
    {"ac_spec_case1", test_ac_spec_case1},
    {"ac_spec_case2_singleton", test_ac_spec_case2_singleton},
    {"ac_variants", test_ac_variants},
    {"ac_two_previous_columns", test_ac_two_previous_columns},
    {"ac_shapes", test_ac_shapes},
    {"ac_nonfinite_logits", test_ac_nonfinite_logits},
    {"ac_bad_input", test_ac_bad_input},
    {0, 0},
};
