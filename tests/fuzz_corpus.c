/* The corpus reader under libFuzzer (make fuzz): each input is written to a file and read
   with acmoe_corpus_load, with a held-out fraction from 0 to 0.99 chosen by its first byte;
   whatever the bytes, the answer is a status, without a crash, a leak or undefined behaviour.
   A corpus it reads must hold exactly the file's bytes, split as asked, and give batches of
   both splits, of sizes chosen by the next bytes, whose tokens and targets are bytes of that
   split. Built with FUZZ_SEEDS, the file is instead a program that writes a few texts into a
   folder, the fuzzer's first corpus. */
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#ifdef FUZZ_SEEDS
int main(int argc, char **argv) {
    static const char *const texts[] = {"a", "ab", "abc", "Hello, world.\n", "\x01\x02\x00\xff\xfe\n\n\n",
                                        "Tight clusters make specialized experts.\nA second line of text.\n"};
    int i;
    if (argc != 2) {
        fprintf(stderr, "usage: fuzz_corpus-seeds FOLDER\n");
        return 2;
    }
    for (i = 0; i < (int)(sizeof texts / sizeof texts[0]); i++) {
        char path[512];
        FILE *f;
        const size_t len = i == 4 ? 8 : strlen(texts[i]);
        snprintf(path, sizeof path, "%s/seed-%d.txt", argv[1], i);
        f = fopen(path, "wb");
        if (!f || fwrite(texts[i], 1, len, f) != len || fclose(f) != 0) return 1;
    }
    return 0;
}
#else
/* Whether every token and target of a batch is a byte of [from, to) of the corpus. */
static int batch_within(const acmoe_corpus *c, size_t from, size_t to, const int32_t *tokens,
                        const int32_t *targets, size_t n) {
    int seen[256] = {0};
    size_t i;
    for (i = from; i < to; i++) seen[c->bytes[i]] = 1;
    for (i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] > 255 || targets[i] < 0 || targets[i] > 255 || !seen[tokens[i]] ||
            !seen[targets[i]])
            return 0;
    return 1;
}

/* Batches of both splits: refused only for a split of fewer than two bytes. */
static void check_batches(const acmoe_corpus *c, const unsigned char *data, size_t size) {
    const int batch = 1 + data[1 % size] % 4, seq = 1 + data[2 % size] % 64;
    int32_t tokens[4 * 64], targets[4 * 64];
    acmoe_rng rng;
    int split;
    acmoe_rng_seed(&rng, size);
    for (split = 0; split < 2; split++) {
        const size_t from = split ? c->train_size : 0, to = split ? c->size : c->train_size;
        acmoe_status s = acmoe_corpus_batch(c, (acmoe_split)split, &rng, batch, seq, tokens, targets);
        if (s == ACMOE_ERR_SHAPE && to - from < 2) continue;
        if (s != ACMOE_OK || !batch_within(c, from, to, tokens, targets, (size_t)batch * seq)) abort();
    }
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    static char path[64];
    const float val_fraction = size ? (float)(data[0] % 100) / 100.0f : 0.1f;
    acmoe_corpus c;
    acmoe_status s;
    FILE *f;
    int written;
    if (!path[0]) snprintf(path, sizeof path, "/tmp/acmoe-fuzz-corpus-%ld.txt", (long)getpid());
    f = fopen(path, "wb");
    written = f && fwrite(data, 1, size, f) == size;
    if (f && fclose(f) != 0) written = 0;
    s = written ? acmoe_corpus_load(&c, path, val_fraction) : ACMOE_ERR_IO;
    if (s == ACMOE_OK) {
        if (c.size != size || memcmp(c.bytes, data, size) || c.train_size > c.size) abort();
        check_batches(&c, data, size);
        acmoe_corpus_destroy(&c);
    } else if (written && !(s == ACMOE_ERR_EMPTY && size == 0) && s != ACMOE_ERR_ARG && s != ACMOE_ERR_SHAPE) {
        abort(); /* a readable file is refused only for being empty or too short to split, or the fraction */
    }
    remove(path);
    return 0;
}
#endif
