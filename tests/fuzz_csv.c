/* train_vit's digits CSV reader under libFuzzer (make fuzz-cli): each input is the text of a
   CSV. Whatever its bytes, the reader must answer with images or a reason, and the images
   it takes must hold pixels in 0..1 and classes in 0..9, without a crash, a leak or
   undefined behaviour (the target is built with those sanitizers). Built with FUZZ_SEEDS,
   the file is instead a program that writes CSVs, valid and not, into a folder: the
   fuzzer's first corpus. */
#include "../examples/data.h"

#ifdef FUZZ_SEEDS
/* A line of the CSV: pixel i of the image is (i * step) % 17, then the class. */
static void write_line(FILE *f, int step, int label, const char *end) {
    int i;
    for (i = 0; i < DIGITS_PIXELS; i++) fprintf(f, "%d,", i * step % 17);
    fprintf(f, "%d%s", label, end);
}

int main(int argc, char **argv) {
    const char *names[4] = {"one-image", "three-images", "blank-lines-crlf", "malformed"};
    int i, ok = 1;
    if (argc != 2) {
        fprintf(stderr, "usage: fuzz_csv_seeds FOLDER\n");
        return 2;
    }
    for (i = 0; i < 4 && ok; i++) {
        char path[512];
        FILE *f;
        snprintf(path, sizeof path, "%s/seed-%s.csv", argv[1], names[i]);
        f = fopen(path, "wb");
        if (!f) break;
        if (i == 0) write_line(f, 3, 7, "\n");
        if (i == 1) write_line(f, 1, 0, "\n"), write_line(f, 5, 9, "\n"), write_line(f, 16, 4, "");
        if (i == 2) fprintf(f, "\n  \n"), write_line(f, 2, 1, "\r\n"), fprintf(f, "\t\r\n"), write_line(f, 7, 2, " \r\n");
        if (i == 3) fprintf(f, "1,2,3\n0,17,x\n");
        ok = fclose(f) == 0;
    }
    if (i < 4 || !ok) {
        fprintf(stderr, "fuzz_csv_seeds: cannot write seed %d\n", i);
        return 1;
    }
    return 0;
}
#else
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    dataset ds;
    char why[256];
    int i;
    memset(&ds, 0, sizeof ds);
    why[0] = '\0';
    if (digits_parse((const char *)data, size, &ds, why, sizeof why)) {
        if (ds.count < 1) abort();
        for (i = 0; i < ds.count * DIGITS_PIXELS; i++)
            if (!(ds.pixels[i] >= 0.0f && ds.pixels[i] <= 1.0f)) abort();
        for (i = 0; i < ds.count; i++)
            if (ds.labels[i] < 0 || ds.labels[i] >= DIGITS_CLASSES) abort();
    } else if (!why[0]) {
        abort(); /* a refusal always says why */
    }
    dataset_free(&ds);
    return 0;
}
#endif
