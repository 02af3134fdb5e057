/* Adversarial attacks on a vision encoder under an L-inf budget eps, from the gradient of
   the loss with respect to its input (acmoe_vision_input_grad), as the paper's vision code
   runs them with cleverhans: the labels attacked are the model's own predictions on the
   clean images; FGSM takes one step of eps along the gradient's sign; PGD starts at a
   uniform draw in the eps-ball, takes 20 steps of 0.15 eps and projects back into the ball
   after each. Inputs are not clipped to the pixel range, as there. AC layers weight
   features by statistics of the whole batch, so an attack sees the batch it is run on. */
#ifndef ACMOE_EXAMPLES_ATTACKS_H
#define ACMOE_EXAMPLES_ATTACKS_H

#include <stdlib.h>
#include <string.h>

#define PGD_STEPS 20
#define PGD_STEP_SHARE 0.15f

typedef enum attack_kind { ATTACK_FGSM = 0, ATTACK_PGD } attack_kind;

/* The best class of each image of the last forward call. */
static inline void attack_predictions(const acmoe_lm *lm, int count, int classes, int32_t *out) {
    int b, c;
    for (b = 0; b < count; b++) {
        const float *z = acmoe_lm_logits(lm) + (size_t)b * classes;
        int best = 0;
        for (c = 1; c < classes; c++) best = z[c] > z[best] ? c : best;
        out[b] = best;
    }
}

/* x += step * sign(the loss's gradient at x for the labels). */
static inline acmoe_status attack_ascend(acmoe_lm *lm, acmoe_ctx *ctx, float *x, const int32_t *labels, int count,
                                         float step, float *grad, size_t values) {
    float loss;
    size_t i;
    acmoe_status s = acmoe_vision_forward(lm, ctx, x, labels, count, 0, &loss);
    if (s == ACMOE_OK) s = acmoe_lm_backward(lm, ctx);
    if (s == ACMOE_OK) s = acmoe_vision_input_grad(lm, ctx, grad);
    for (i = 0; i < values && s == ACMOE_OK; i++) x[i] += grad[i] > 0.0f ? step : grad[i] < 0.0f ? -step : 0.0f;
    return s;
}

/* The patches x0 [count][values / count] attacked into x; grad and guess are scratch
   ([values] and [count]); rng draws PGD's start. The model's gradients are left dirty
   (acmoe_lm_zero_grad before training it again). */
static inline acmoe_status attack_batch(acmoe_lm *lm, acmoe_ctx *ctx, attack_kind kind, float eps, const float *x0,
                                        int count, int classes, float *x, float *grad, int32_t *guess, acmoe_rng *rng) {
    const acmoe_lm_desc desc = acmoe_lm_settings(lm);
    const size_t values = (size_t)count * desc.seq_len * desc.patch_dim;
    acmoe_status s = acmoe_vision_forward(lm, ctx, x0, NULL, count, 0, NULL);
    size_t i;
    int step;
    if (s != ACMOE_OK) return s;
    attack_predictions(lm, count, classes, guess);
    memcpy(x, x0, sizeof(float) * values);
    if (kind == ATTACK_FGSM) return attack_ascend(lm, ctx, x, guess, count, eps, grad, values);
    for (i = 0; i < values; i++) x[i] += eps * (2.0f * acmoe_rng_uniform(rng) - 1.0f);
    for (step = 0; step < PGD_STEPS && s == ACMOE_OK; step++) {
        s = attack_ascend(lm, ctx, x, guess, count, PGD_STEP_SHARE * eps, grad, values);
        for (i = 0; i < values; i++) {
            const float low = x0[i] - eps, high = x0[i] + eps;
            x[i] = x[i] < low ? low : x[i] > high ? high : x[i];
        }
    }
    return s;
}

#endif
