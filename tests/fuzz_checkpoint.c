/* The checkpoint reader under libFuzzer (make fuzz): each input is written to a file and
   loaded, and whatever its bytes, acmoe_lm_load must answer with a status, without a crash,
   a leak or undefined behaviour (the target is built with those sanitizers); a model it
   loads must then take a training forward and backward pass. The allocator refuses blocks
   over FUZZ_MAX_BLOCK, as a machine with that much memory would: a header may describe a
   model too large for this one, and the answer must be ACMOE_ERR_NOMEM.
   Built with FUZZ_PATCH_CRC, the target first writes the right CRC-32C of the data into the
   input's data_crc32c, so that mutations get past the checksum to the header checks and the
   model code. Built with FUZZ_SEEDS, the file is instead a program that writes valid
   checkpoints of small models into a folder, the fuzzer's first corpus: one for each router
   letter and 'f', a vision encoder, and a model that has trained. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define FUZZ_MAX_BLOCK ((size_t)256 << 20)
#define ACMOE_MALLOC(sz) ((sz) > FUZZ_MAX_BLOCK ? NULL : malloc(sz))
#define ACMOE_REALLOC(p, sz) ((sz) > FUZZ_MAX_BLOCK ? NULL : realloc(p, sz))
#define ACMOE_FREE(p) free(p)
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

/* One training forward pass of at most 2 sequences of at most 8 positions (a vision
   encoder: 2 images), then the backward pass; the status of the first that fails. A loaded
   model has finite parameters, so its pass may only end in non-finite values, never in a
   refusal of the model itself. */
static acmoe_status train_pass(acmoe_lm *lm, acmoe_ctx *ctx) {
    const acmoe_lm_desc d = acmoe_lm_settings(lm);
    const int batch = d.batch < 2 ? d.batch : 2, seq = d.seq_len < 8 ? d.seq_len : 8;
    const size_t floats = d.n_classes ? (size_t)batch * d.seq_len * d.patch_dim : 0;
    float *patches = (float *)malloc(floats * sizeof(float) + 1), loss = 0.0f;
    int32_t tokens[16], targets[16];
    acmoe_status s;
    size_t i;
    for (i = 0; i < floats; i++) patches[i] = (float)((i * 7) % 13) / 13.0f - 0.5f;
    for (i = 0; i < 16; i++) {
        const int classes = d.n_classes ? d.n_classes : d.vocab;
        tokens[i] = (int32_t)((i * 7) % (size_t)classes), targets[i] = (int32_t)((i * 5 + 3) % (size_t)classes);
    }
    if (d.n_classes) s = acmoe_vision_forward(lm, ctx, patches, targets, batch, 1, &loss);
    else s = acmoe_lm_forward(lm, ctx, tokens, targets, batch, seq, 1, &loss);
    free(patches);
    if (s != ACMOE_OK) return s;
    acmoe_lm_zero_grad(lm);
    return acmoe_lm_backward(lm, ctx);
}

#ifdef FUZZ_SEEDS
/* Seed n: a tiny model of the given pattern; with "gma" a vision encoder, with "gfc" one
   after a training step. */
static acmoe_status write_seed(const char *folder, int n, const char *pattern, acmoe_ctx *ctx) {
    acmoe_lm_desc d;
    acmoe_lm *lm = NULL;
    char path[512];
    acmoe_status s;
    memset(&d, 0, sizeof d);
    d.vocab = 7, d.d_model = 4, d.n_heads = 2, d.seq_len = 4, d.batch = 2, d.pattern = pattern;
    d.d_ff = 4, d.n_experts = 3, d.top_k = 2, d.pre_ln = n & 1;
    if (!strcmp(pattern, "gma")) d.n_classes = 3, d.patch_dim = 4;
    if (!strcmp(pattern, "gfc")) d.dropout = 0.1f;
    snprintf(path, sizeof path, "%s/seed-%02d-%s.safetensors", folder, n, pattern);
    s = acmoe_lm_create(&lm, &d);
    if (s == ACMOE_OK) s = train_pass(lm, ctx);
    if (s == ACMOE_OK && !strcmp(pattern, "gfc")) s = acmoe_lm_step(lm, ctx, NULL, NULL);
    if (s == ACMOE_OK) s = acmoe_lm_save(lm, path);
    if (s != ACMOE_OK) fprintf(stderr, "fuzz_seeds: %s: %s\n", path, acmoe_status_string(s));
    acmoe_lm_destroy(lm);
    return s;
}

/* A one-layer model of each router letter (after an SMoE layer where the router needs the
   labels of one), a dense one, a vision encoder, and a trained one. */
static int write_seeds(const char *folder, acmoe_ctx *ctx) {
    static const char *const others[] = {"f", "gma", "gfc"};
    char pattern[3];
    int c, i, n = 0, failed = 0;
    for (c = 'a'; c <= 'z'; c++) {
        acmoe_moe_desc probe;
        memset(&probe, 0, sizeof probe);
        if (acmoe_moe_router_preset(&probe, (char)c) != ACMOE_OK) continue;
        pattern[0] = probe.router_input == ACMOE_INPUT_AC ? 'g' : (char)c;
        pattern[1] = probe.router_input == ACMOE_INPUT_AC ? (char)c : '\0', pattern[2] = '\0';
        failed |= write_seed(folder, n++, pattern, ctx) != ACMOE_OK;
    }
    for (i = 0; i < 3; i++) failed |= write_seed(folder, n++, others[i], ctx) != ACMOE_OK;
    return failed;
}

int main(int argc, char **argv) {
    acmoe_ctx *ctx = NULL;
    int failed;
    if (argc != 2) {
        fprintf(stderr, "usage: fuzz_seeds FOLDER\n");
        return 2;
    }
    if (acmoe_ctx_create(&ctx, NULL) != ACMOE_OK) return 1;
    failed = write_seeds(argv[1], ctx);
    acmoe_ctx_destroy(ctx);
    return failed;
}
#else
#ifdef FUZZ_PATCH_CRC
/* Writes the CRC-32C of the data section into the header's "data_crc32c" value, when the
   input has a header length within its size and that key in its header. */
static void patch_crc(unsigned char *data, size_t size) {
    static const char key[] = "\"data_crc32c\":\"";
    const size_t key_len = sizeof key - 1;
    uint64_t header = 0;
    uint32_t crc = 0xFFFFFFFFu;
    size_t i, at;
    int bit;
    char hex[9];
    for (i = 0; i < 8 && i < size; i++) header |= (uint64_t)data[i] << (8 * i);
    if (size < 8 || header > size - 8) return;
    for (at = 8; at + key_len + 8 <= 8 + header && memcmp(data + at, key, key_len); at++) continue;
    if (at + key_len + 8 > 8 + header) return;
    for (i = 8 + (size_t)header; i < size; i++)
        for (crc ^= data[i], bit = 0; bit < 8; bit++) crc = crc & 1u ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
    snprintf(hex, sizeof hex, "%08lx", (unsigned long)(crc ^ 0xFFFFFFFFu));
    memcpy(data + at + key_len, hex, 8);
}
#endif

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    static char path[64];
    static acmoe_ctx *ctx;
    acmoe_ctx_desc one_thread;
    unsigned char *copy = (unsigned char *)malloc(size + 1);
    acmoe_lm *lm = NULL;
    FILE *f;
    int written;
    memcpy(copy, data, size);
#ifdef FUZZ_PATCH_CRC
    patch_crc(copy, size);
#endif
    memset(&one_thread, 0, sizeof one_thread);
    one_thread.n_threads = 1;
    if (!ctx && acmoe_ctx_create(&ctx, &one_thread) != ACMOE_OK) abort();
    if (!path[0]) snprintf(path, sizeof path, "/tmp/acmoe-fuzz-%ld.safetensors", (long)getpid());
    f = fopen(path, "wb");
    written = f && fwrite(copy, 1, size, f) == size;
    if (f && fclose(f) != 0) written = 0;
    if (written && acmoe_lm_load(&lm, path) == ACMOE_OK) {
        acmoe_status s = train_pass(lm, ctx);
        if (s != ACMOE_OK && s != ACMOE_ERR_NONFINITE) {
            fprintf(stderr, "a loaded model refused its training pass: %s\n", acmoe_status_string(s));
            abort();
        }
        acmoe_lm_destroy(lm);
    }
    remove(path);
    free(copy);
    return 0;
}
#endif
