/* The checkpoint reader under libFuzzer (make fuzz): each input is written to a file and
   loaded, and whatever its bytes, acmoe_lm_load must answer with a status, without a crash,
   a leak or undefined behaviour (the target is built with those sanitizers). Built with
   FUZZ_SEEDS, the file is instead a program that writes valid checkpoints of several kinds
   of model into a folder, the fuzzer's first corpus. */
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

#include <stdio.h>
#include <unistd.h>

#ifdef FUZZ_SEEDS
int main(int argc, char **argv) {
    const char *patterns[4] = {"gc", "gm", "gfc", "ga"};
    int i;
    if (argc != 2) {
        fprintf(stderr, "usage: fuzz_seeds FOLDER\n");
        return 2;
    }
    for (i = 0; i < 4; i++) {
        acmoe_lm_desc d;
        acmoe_lm *lm;
        char path[512];
        acmoe_status s;
        memset(&d, 0, sizeof d);
        d.vocab = 11, d.d_model = 8, d.n_heads = 2, d.seq_len = 5, d.batch = 2, d.pattern = patterns[i];
        d.d_ff = 6, d.n_experts = 4, d.top_k = 2, d.pre_ln = i & 1;
        if (patterns[i][1] == 'a') d.n_classes = 3, d.patch_dim = 4; /* a vision encoder */
        snprintf(path, sizeof path, "%s/seed-%s.safetensors", argv[1], patterns[i]);
        s = acmoe_lm_create(&lm, &d);
        if (s == ACMOE_OK) s = acmoe_lm_save(lm, path), acmoe_lm_destroy(lm);
        if (s != ACMOE_OK) {
            fprintf(stderr, "fuzz_seeds: %s: %s\n", path, acmoe_status_string(s));
            return 1;
        }
    }
    return 0;
}
#else
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    static char path[64];
    acmoe_lm *lm = NULL;
    FILE *f;
    if (!path[0]) snprintf(path, sizeof path, "/tmp/acmoe-fuzz-%ld.safetensors", (long)getpid());
    f = fopen(path, "wb");
    if (!f) return 0;
    if (fwrite(data, 1, size, f) != size) size = 0;
    if (fclose(f) == 0 && size > 0 && acmoe_lm_load(&lm, path) == ACMOE_OK) acmoe_lm_destroy(lm);
    remove(path);
    return 0;
}
#endif
