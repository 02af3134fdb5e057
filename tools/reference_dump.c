/* reference_dump: small acmoe models, each trained a few steps and then run forward and
   backward on one fixed batch, saved for tools/reference_check.py to rebuild in PyTorch.

   usage: reference_dump OUTDIR

   For each case NAME it writes three safetensors files into OUTDIR:
     NAME.safetensors        the checkpoint (acmoe_lm_save)
     NAME.grads.safetensors  the checkpoint's own header with the gradient buffer in place of
                             the parameters (the data of a checkpoint is the parameter buffer in
                             order, checked here byte for byte), so each gradient sits under its
                             parameter's name; the moments are zeros, the CRC is not the data's,
                             and acmoe_lm_load refuses it
     NAME.batch.safetensors  the batch (tokens and targets, or patches and labels, as I32 and
                             F32), the logits and the loss of the forward call, in training
                             mode the standard normal draws of each noisy gate (noise.layers.N,
                             [the layer's rows][experts]), and in __metadata__ the case's name, routers
                             and mode (train 1 or 0)
   The checked call runs in training mode unless the case says otherwise. acmoe.h does not
   hand out the gate noise it draws, so the draws are replayed here from a copy of the model's
   generator (its rng field: the dump includes the implementation) and checked bit for bit
   against each layer's noisy logits (its noisy and logits fields) before they are saved.
   Build: cc -std=c99 -D_POSIX_C_SOURCE=200809L -O2 -Wall -Wextra -Wpedantic -Werror -I. \
          tools/reference_dump.c -o build/reference_dump -lm -lpthread */
#define ACMOE_IMPLEMENTATION
#include "acmoe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ref_case {
    const char *name, *pattern, *routers;
    int vision, pre_ln, untied_head;
    acmoe_activation activation;
    acmoe_group group; /* USMoE */
    int check_batch;   /* sequences of the checked batch (0: batch) */
    int experts, batch, seq; /* 0: EXPERTS, BATCH, SEQ */
    int eval;          /* the checked call in evaluation mode (no gate noise) */
    int window;        /* > 0: the Swin backbone with windows of this side (seq a square grid) */
} ref_case;

/* Every router letter but 's', 'o', 'x' and 'e' (no reference gate yet), on the transformer
   and on the Swin backbone. */
static const ref_case cases[] = {
    {.name = "lm_ggc", .pattern = "ggc", .routers = "SMoE, SMoE, AC"},
    {.name = "lm_gcc", .pattern = "gcc", .routers = "SMoE, AC, AC"},
    {.name = "lm_ggu", .pattern = "ggu", .routers = "SMoE, SMoE, USMoE by default (position)"},
    {.name = "lm_ggu_batch", .pattern = "ggu", .routers = "SMoE, SMoE, USMoE by batch", .group = ACMOE_GROUP_BATCH},
    {.name = "lm_gbc", .pattern = "gbc", .routers = "SMoE, StableMoE, AC"},
    {.name = "lm_gmg", .pattern = "gmg", .routers = "SMoE, Soft MoE (vmoe) by position, SMoE"},
    {.name = "lm_gna", .pattern = "gna", .routers = "SMoE, Soft MoE by position, AC Soft MoE by position"},
    {.name = "lm_ggc_preln_untied", .pattern = "ggc", .routers = "SMoE, SMoE, AC; pre-LN, untied head, GELU",
     .pre_ln = 1, .untied_head = 1, .activation = ACMOE_ACT_GELU},
    {.name = "lm_gfcc_preln", .pattern = "gfcc", .routers = "SMoE, dense, AC, AC; pre-LN", .pre_ln = 1},
    /* one sequence of 8 tokens over 4 clusters: clusters of 0 or 1 token */
    {.name = "lm_gcc_one_sequence", .pattern = "gcc", .routers = "SMoE, AC, AC; one sequence", .check_batch = 1},
    {.name = "vit_ggg", .pattern = "ggg", .routers = "SMoE, SMoE, SMoE; vision", .vision = 1, .pre_ln = 1,
     .activation = ACMOE_ACT_GELU},
    {.name = "vit_gmg", .pattern = "gmg", .routers = "SMoE, Soft MoE (vmoe) by image, SMoE; vision", .vision = 1,
     .pre_ln = 1, .activation = ACMOE_ACT_GELU},
    {.name = "vit_gnn", .pattern = "gnn", .routers = "SMoE, Soft MoE, Soft MoE; vision", .vision = 1, .pre_ln = 1,
     .activation = ACMOE_ACT_GELU},
    {.name = "vit_gna", .pattern = "gna", .routers = "SMoE, Soft MoE, AC Soft MoE; vision", .vision = 1,
     .pre_ln = 1, .activation = ACMOE_ACT_GELU},
    /* acmoe allows an AC Soft MoE layer after any MoE layer; the authors' follow a Soft MoE one */
    {.name = "vit_gaa", .pattern = "gaa", .routers = "SMoE, AC Soft MoE, AC Soft MoE; vision", .vision = 1,
     .pre_ln = 1, .activation = ACMOE_ACT_GELU},
    {.name = "vit_ggc", .pattern = "ggc", .routers = "SMoE, SMoE, AC; vision", .vision = 1, .pre_ln = 1,
     .activation = ACMOE_ACT_GELU},
    {.name = "vit_ggc_postln", .pattern = "ggc", .routers = "SMoE, SMoE, AC; vision, post-LN", .vision = 1},
    /* 12 clusters over 512 patches: with at most one cluster of fewer than 2 tokens, some W
       reaches 10 x its mean and the clip binds (with 4 it never can: W <= 4 x its mean) */
    {.name = "vit_gcc_12_experts", .pattern = "gcc", .routers = "SMoE, AC, AC; vision, 12 experts", .vision = 1,
     .pre_ln = 1, .experts = 12, .batch = 16, .seq = 32},
    /* Swin-MoE's gates over 128 patches: 2 x floor(1.25 x 32) = 80 places per expert for 256
       assignments over 4 experts, so an expert with more than 80 drops some (the check reports
       "capacity drops"); in training with the noise replayed, and in evaluation */
    {.name = "vit_gtw", .pattern = "gtw", .routers = "SMoE, Swin-MoE, AC Swin-MoE; vision, training", .vision = 1,
     .pre_ln = 1, .activation = ACMOE_ACT_GELU, .batch = 8, .seq = 16},
    {.name = "vit_gtw_eval", .pattern = "gtw", .routers = "SMoE, Swin-MoE, AC Swin-MoE; vision, evaluation",
     .vision = 1, .pre_ln = 1, .activation = ACMOE_ACT_GELU, .batch = 8, .seq = 16, .eval = 1},
    {.name = "vit_ttw", .pattern = "ttw", .routers = "Swin-MoE, Swin-MoE, AC Swin-MoE; vision, training",
     .vision = 1, .pre_ln = 1, .activation = ACMOE_ACT_GELU, .batch = 8, .seq = 16},
    /* The Swin backbone on 8 x 8 patches with windows of 2: stage 0 on the 8 x 8 grid, stage 1
       on 4 x 4 (both with their second block shifted), a stage 2 on 2 x 2 (one window, no
       shift) */
    {.name = "swin_gt_tw", .pattern = "gt|tw", .routers = "SMoE, Swin-MoE | Swin-MoE, AC Swin-MoE; Swin, training",
     .vision = 1, .pre_ln = 1, .activation = ACMOE_ACT_GELU, .batch = 8, .seq = 64, .window = 2},
    {.name = "swin_gt_tw_eval", .pattern = "gt|tw",
     .routers = "SMoE, Swin-MoE | Swin-MoE, AC Swin-MoE; Swin, evaluation", .vision = 1, .pre_ln = 1,
     .activation = ACMOE_ACT_GELU, .batch = 8, .seq = 64, .window = 2, .eval = 1},
    {.name = "swin_ff_nf", .pattern = "ff|nf", .routers = "dense, dense | Soft MoE, dense; Swin", .vision = 1,
     .pre_ln = 1, .activation = ACMOE_ACT_GELU, .batch = 4, .seq = 64, .window = 2},
    {.name = "swin_ff_na_tw", .pattern = "ff|na|tw",
     .routers = "dense, dense | Soft MoE, AC Soft MoE | Swin-MoE, AC Swin-MoE; Swin, training", .vision = 1,
     .pre_ln = 1, .activation = ACMOE_ACT_GELU, .batch = 4, .seq = 64, .window = 2},
};

enum { BATCH = 3, SEQ = 8, VOCAB = 32, D_MODEL = 16, HEADS = 2, D_FF = 24, EXPERTS = 4, TOP_K = 2 };
enum { PATCH_DIM = 12, CLASSES = 5, TRAIN_STEPS = 3, MAX_TOKENS = 512 };

static int fail(const char *what, const char *name, acmoe_status s) {
    fprintf(stderr, "reference_dump: %s: %s: %s\n", name, what, acmoe_status_string(s));
    return 1;
}

/* A safetensors file of a few tensors, written in the order given. */
typedef struct st_tensor {
    const char *name, *dtype;
    int ndim, shape[3];
    const void *data;
} st_tensor;

static size_t st_bytes(const st_tensor *t) {
    size_t n = 4;
    int i;
    for (i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

static int st_write(const char *path, const st_tensor *t, int count, const char *metadata) {
    char header[4096];
    size_t len, at = 0;
    unsigned char len8[8];
    int i, j, ok;
    FILE *f;
    len = (size_t)snprintf(header, sizeof header, "{\"__metadata__\":{%s}", metadata);
    for (i = 0; i < count && len < sizeof header; i++) {
        len += (size_t)snprintf(header + len, sizeof header - len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", t[i].name,
                                t[i].dtype);
        for (j = 0; j < t[i].ndim && len < sizeof header; j++)
            len += (size_t)snprintf(header + len, sizeof header - len, "%s%d", j ? "," : "", t[i].shape[j]);
        if (len < sizeof header)
            len += (size_t)snprintf(header + len, sizeof header - len, "],\"data_offsets\":[%lu,%lu]}",
                                    (unsigned long)at, (unsigned long)(at + st_bytes(&t[i])));
        at += st_bytes(&t[i]);
    }
    if (len < sizeof header) len += (size_t)snprintf(header + len, sizeof header - len, "}");
    while (len < sizeof header - 1 && (8 + len) % 8) header[len++] = ' ';
    if (len >= sizeof header - 1) return 0;
    f = fopen(path, "wb");
    if (!f) return 0;
    for (i = 0; i < 8; i++) len8[i] = (unsigned char)((unsigned long long)len >> (8 * i));
    ok = fwrite(len8, 1, 8, f) == 8 && fwrite(header, 1, len, f) == len;
    for (i = 0; ok && i < count; i++) ok = fwrite(t[i].data, 1, st_bytes(&t[i]), f) == st_bytes(&t[i]);
    return fclose(f) == 0 && ok;
}

enum { MAX_NOISY = 4, MAX_EXPERTS = 16 };

/* The standard normal draws of the checked call's noisy gates: the generator as it was before
   the call (replay), drawn layer by layer in order, each draw checked against the layer's noisy
   logits, logits + (gate_noise / E) z, bit for bit. Returns the number of noisy layers, or -1. */
static int replay_noise(acmoe_lm *lm, acmoe_rng *replay, float draws[][MAX_TOKENS * MAX_EXPERTS], int layer_of[]) {
    int i, count = 0;
    size_t j;
    for (i = 0; i < lm->n_layers; i++) {
        const acmoe_moe *m = lm->blocks[i].moe;
        const int e = m->desc.n_experts, n = lm->blocks[i].n; /* a Swin stage has its own rows */
        const float deviation = m->desc.gate_noise / (float)e;
        if (m->desc.router_select != ACMOE_SELECT_PRIORITY || m->desc.gate_noise == 0.0f || !m->training) continue;
        if (count == MAX_NOISY || e > MAX_EXPERTS) return -1;
        for (j = 0; j < (size_t)n * e; j++) {
            draws[count][j] = acmoe_rng_normal(replay);
            if (m->noisy[j] != m->logits[j] + deviation * draws[count][j]) {
                fprintf(stderr, "reference_dump: layer %d: the replayed gate noise is not the layer's\n", i);
                return -1;
            }
        }
        layer_of[count++] = i;
    }
    return count;
}

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *data = NULL;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0) {
        data = (unsigned char *)malloc((size_t)n);
        if (data && fread(data, 1, (size_t)n, f) != (size_t)n) free(data), data = NULL;
        *size = (size_t)n;
    }
    fclose(f);
    return data;
}

/* The gradient file: the checkpoint with the gradient buffer over the parameter data (and
   zeros over the AC weights and moments after it), after checking that the data is the
   parameter buffer as it was saved (params), in order. */
static int write_grads(const char *checkpoint, const char *path, const float *params, const float *grads, size_t n) {
    size_t size = 0, header_len = 0, start;
    unsigned char *data = read_file(checkpoint, &size);
    int i, ok;
    FILE *f;
    if (!data || size < 8) return free(data), 0;
    for (i = 0; i < 8; i++) header_len |= (size_t)data[i] << (8 * i);
    start = 8 + header_len;
    ok = size >= start + 3 * n * sizeof(float) && !memcmp(data + start, params, n * sizeof(float));
    if (!ok) {
        fprintf(stderr, "reference_dump: %s: the data is not the parameter buffer in order\n", checkpoint);
        return free(data), 0;
    }
    memcpy(data + start, grads, n * sizeof(float));
    memset(data + start + n * sizeof(float), 0, size - start - n * sizeof(float)); /* AC weights, moments */
    f = fopen(path, "wb");
    ok = f && fwrite(data, 1, size, f) == size;
    if (f && fclose(f) != 0) ok = 0;
    free(data);
    return ok;
}

/* Creates the case's model, trains it TRAIN_STEPS steps on random batches (so that no parameter
   is at its initial value), saves it, then runs forward and backward on one more batch and saves
   the gradients and the batch. */
static int run_case(const ref_case *c, acmoe_ctx *ctx, const char *dir) {
    static int32_t tokens[MAX_TOKENS], targets[MAX_TOKENS], labels[MAX_TOKENS];
    static float patches[MAX_TOKENS * PATCH_DIM], logits[MAX_TOKENS * VOCAB];
    static float draws[MAX_NOISY][MAX_TOKENS * MAX_EXPERTS];
    static char noise_names[MAX_NOISY][32];
    int layer_of[MAX_NOISY], noisy = 0, train;
    acmoe_rng replay;
    const int seq = c->seq ? c->seq : SEQ, max_batch = c->batch ? c->batch : BATCH;
    acmoe_lm_desc d;
    acmoe_lm *lm;
    acmoe_optim_desc opt;
    acmoe_rng rng;
    acmoe_status s;
    char path[1024], grads[1024], meta[512];
    float loss = 0.0f, norm, *saved;
    int step, i, batch = max_batch, n_logits;
    st_tensor t[4 + MAX_NOISY];

    if (max_batch * seq > MAX_TOKENS) return fail("size", c->name, ACMOE_ERR_SHAPE);
    memset(&d, 0, sizeof d);
    d.vocab = VOCAB, d.d_model = D_MODEL, d.n_heads = HEADS, d.seq_len = seq, d.batch = max_batch;
    d.pattern = c->pattern, d.d_ff = D_FF, d.n_experts = c->experts ? c->experts : EXPERTS, d.top_k = TOP_K;
    d.activation = c->activation, d.pre_ln = c->pre_ln, d.untied_head = c->untied_head;
    d.seed = 7;
    d.moe.group = c->group;
    d.window = c->window;
    if (c->vision) d.n_classes = CLASSES, d.patch_dim = PATCH_DIM;
    s = acmoe_lm_create(&lm, &d);
    if (s != ACMOE_OK) return fail("create", c->name, s);
    memset(&opt, 0, sizeof opt);
    opt.lr = 1e-2f;
    acmoe_rng_seed(&rng, 2024);
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, c->name);
    snprintf(grads, sizeof grads, "%s/%s.grads.safetensors", dir, c->name);
    saved = (float *)malloc(sizeof(float) * acmoe_lm_param_count(lm));
    for (step = 0; step <= TRAIN_STEPS && saved; step++) {
        if (step == TRAIN_STEPS) {
            /* the checkpoint holds the parameters as the checked forward call finds them, before
               it re-projects the cosine routers' embeddings (the reference does that itself) */
            s = acmoe_lm_save(lm, path);
            if (s != ACMOE_OK) break;
            memcpy(saved, acmoe_lm_params(lm), sizeof(float) * acmoe_lm_param_count(lm));
            if (c->check_batch) batch = c->check_batch;
        }
        for (i = 0; i < batch * seq; i++) {
            tokens[i] = (int32_t)acmoe_rng_below(&rng, VOCAB);
            targets[i] = (int32_t)acmoe_rng_below(&rng, VOCAB);
        }
        for (i = 0; i < batch * seq * PATCH_DIM; i++) patches[i] = acmoe_rng_normal(&rng);
        for (i = 0; i < batch; i++) labels[i] = (int32_t)acmoe_rng_below(&rng, CLASSES);
        acmoe_lm_zero_grad(lm);
        train = step < TRAIN_STEPS || !c->eval;
        replay = lm->rng;
        s = c->vision ? acmoe_vision_forward(lm, ctx, patches, labels, batch, train, &loss)
                      : acmoe_lm_forward(lm, ctx, tokens, targets, batch, seq, train, &loss);
        if (s == ACMOE_OK && step == TRAIN_STEPS && (noisy = replay_noise(lm, &replay, draws, layer_of)) < 0)
            s = ACMOE_ERR_ARG;
        n_logits = c->vision ? batch * CLASSES : batch * seq * VOCAB;
        /* the backward pass turns the logits into their gradients, in place */
        if (s == ACMOE_OK) memcpy(logits, acmoe_lm_logits(lm), sizeof(float) * (size_t)n_logits);
        if (s == ACMOE_OK) s = acmoe_lm_backward(lm, ctx);
        if (s == ACMOE_OK && step < TRAIN_STEPS) s = acmoe_lm_step(lm, ctx, &opt, &norm);
        if (s != ACMOE_OK) break;
    }
    if (!saved) s = ACMOE_ERR_NOMEM;
    if (s == ACMOE_OK && !write_grads(path, grads, saved, acmoe_lm_grads(lm), acmoe_lm_param_count(lm)))
        s = ACMOE_ERR_IO;
    free(saved);
    if (s != ACMOE_OK) {
        acmoe_lm_destroy(lm);
        return fail("training, checkpoint or gradient file", c->name, s);
    }
    memset(t, 0, sizeof t);
    if (c->vision) {
        t[0].name = "patches", t[0].dtype = "F32", t[0].ndim = 3, t[0].data = patches;
        t[0].shape[0] = batch, t[0].shape[1] = seq, t[0].shape[2] = PATCH_DIM;
        t[1].name = "labels", t[1].dtype = "I32", t[1].ndim = 1, t[1].shape[0] = batch, t[1].data = labels;
        t[2].shape[0] = batch, t[2].shape[1] = CLASSES;
    } else {
        t[0].name = "tokens", t[0].dtype = "I32", t[0].ndim = 2, t[0].data = tokens;
        t[0].shape[0] = batch, t[0].shape[1] = seq;
        t[1].name = "targets", t[1].dtype = "I32", t[1].ndim = 2, t[1].data = targets;
        t[1].shape[0] = batch, t[1].shape[1] = seq;
        t[2].shape[0] = batch * seq, t[2].shape[1] = VOCAB;
    }
    t[2].name = "logits", t[2].dtype = "F32", t[2].ndim = 2, t[2].data = logits;
    t[3].name = "loss", t[3].dtype = "F32", t[3].ndim = 1, t[3].shape[0] = 1, t[3].data = &loss;
    for (i = 0; i < noisy; i++) {
        snprintf(noise_names[i], sizeof noise_names[i], "noise.layers.%d", layer_of[i]);
        t[4 + i].name = noise_names[i], t[4 + i].dtype = "F32", t[4 + i].ndim = 2, t[4 + i].data = draws[i];
        t[4 + i].shape[0] = lm->blocks[layer_of[i]].n, t[4 + i].shape[1] = lm->blocks[layer_of[i]].moe->desc.n_experts;
    }
    snprintf(meta, sizeof meta, "\"case\":\"%s\",\"pattern\":\"%s\",\"routers\":\"%s\",\"train\":\"%d\"", c->name,
             c->pattern, c->routers, !c->eval);
    snprintf(path, sizeof path, "%s/%s.batch.safetensors", dir, c->name);
    if (!st_write(path, t, 4 + noisy, meta)) {
        acmoe_lm_destroy(lm);
        return fail("batch file", c->name, ACMOE_ERR_IO);
    }
    printf("%-22s %-5s loss %.6f, %lu parameters\n", c->name, c->pattern, (double)loss,
           (unsigned long)acmoe_lm_param_count(lm));
    acmoe_lm_destroy(lm);
    return 0;
}

int main(int argc, char **argv) {
    acmoe_ctx *ctx;
    acmoe_status s;
    size_t i;
    int failed = 0;
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
        return 2;
    }
    s = acmoe_ctx_create(&ctx, NULL);
    if (s != ACMOE_OK) return fail("context", "-", s);
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) failed |= run_case(&cases[i], ctx, argv[1]);
    acmoe_ctx_destroy(ctx);
    return failed;
}
