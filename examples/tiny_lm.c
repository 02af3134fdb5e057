/* A tiny byte-level language model with the paper's pattern "ggc" (two SMoE layers, then the
   AC router): trained on an embedded text, saved, loaded back and asked to continue a prompt.
   Usage: tiny_lm [checkpoint path, default tiny_lm.safetensors] */
#include <stdio.h>
#include <stdlib.h>

#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

enum { SEQ = 48, BATCH = 4, STEPS = 300, GENERATE = 40 };

static const char text[] = "the cat sat on the mat. the dog sat on the log. the cat saw the dog and the dog saw "
                           "the cat. a cat and a dog sat on a mat by a log. the dog ran to the cat on the mat. ";

static void check(acmoe_status s, const char *what) {
    if (s == ACMOE_OK) return;
    fprintf(stderr, "%s: %s\n", what, acmoe_status_string(s));
    exit(1);
}

static int report(const acmoe_train_event *e, acmoe_lm *lm, void *user) {
    (void)lm, (void)user;
    if (e->kind == ACMOE_EVENT_EVAL) printf("step %3ld  held-out loss %.3f nats per byte\n", e->step, e->val_loss);
    return 0;
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "tiny_lm.safetensors", *prompt = "the cat ";
    acmoe_lm_desc desc = {0};
    acmoe_train_desc train = {0};
    acmoe_corpus corpus;
    acmoe_ctx_desc ctx_desc = acmoe_ctx_defaults();
    acmoe_ctx *ctx;
    acmoe_lm *lm, *loaded;
    acmoe_rng rng;
    int32_t tokens[BATCH * SEQ], targets[BATCH * SEQ], next;
    float before, after, work[256];
    int len = 0, n;

    desc.d_model = 32, desc.n_heads = 2, desc.seq_len = SEQ, desc.batch = BATCH;
    desc.pattern = "ggc", desc.n_experts = 4, desc.d_ff = 32;
    train.steps = STEPS, train.eval_every = 100, train.eval_batches = 2, train.on_event = report;
    train.optim.lr = 3e-3f, train.optim.warmup_steps = 20;
    ctx_desc.n_threads = 1; /* a model this small gains nothing from more */
    check(acmoe_ctx_create(&ctx, &ctx_desc), "context");
    check(acmoe_corpus_view(&corpus, (const unsigned char *)text, sizeof text - 1, 0.2f), "corpus");
    check(acmoe_lm_create(&lm, &desc), "model");
    check(acmoe_lm_train(lm, ctx, &corpus, &train), "training");
    check(acmoe_lm_save(lm, path), "saving");
    check(acmoe_lm_load(&loaded, path), "loading");

    /* The same held-out batch through both models. The AC layer measures its weights on the
       batch; freezing keeps them, so that decoding can route one token at a time. */
    acmoe_rng_seed(&rng, 42);
    check(acmoe_corpus_batch(&corpus, ACMOE_SPLIT_VAL, &rng, BATCH, SEQ, tokens, targets), "batch");
    check(acmoe_lm_forward(lm, ctx, tokens, targets, BATCH, SEQ, 0, &before), "forward (trained)");
    check(acmoe_lm_forward(loaded, ctx, tokens, targets, BATCH, SEQ, 0, &after), "forward (loaded)");
    printf("held-out batch: loss %.4f before saving, %.4f after loading %s\n", before, after, path);
    if (before != after) return 1;
    acmoe_lm_freeze_ac_weights(loaded, 1);

    printf("generated: %s", prompt);
    for (; prompt[len]; len++) tokens[len] = (unsigned char)prompt[len];
    for (n = 0; n < GENERATE && len < SEQ; n++) { /* each call computes only the new position */
        check(acmoe_lm_decode(loaded, ctx, tokens, len, n == 0 ? 0 : len - 1), "decoding");
        check(acmoe_sample(acmoe_lm_logits(loaded) + (size_t)(len - 1) * 256, 256, 0.7f, 0, 0.95f, work, &rng, &next),
              "sampling");
        putchar(next >= 32 && next < 127 ? next : '?');
        tokens[len++] = next;
    }
    printf("\n");
    acmoe_lm_destroy(loaded);
    acmoe_lm_destroy(lm);
    acmoe_ctx_destroy(ctx);
    return 0;
}
