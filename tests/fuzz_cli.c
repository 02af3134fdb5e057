/* The examples' flag parser under libFuzzer (make fuzz-cli): each input is a command line,
   its arguments separated by NUL bytes after a first byte that picks the flag table
   (train_lm's when even, train_vit's when odd). Whatever the bytes, parsing must answer
   with a status; a command line it takes must leave every value in its flag's range, and
   then the program's rules between flags and the comparison a resumed run makes must answer
   too, without a crash or undefined behaviour (the target is built with those sanitizers).
   Built with FUZZ_SEEDS, the file is instead a program that writes command lines, valid and
   not, with every router letter in --pattern and --compare, into a folder: the fuzzer's
   first corpus. */
#define ACMOE_IMPLEMENTATION
#include "../acmoe.h"
#include "../examples/lm_options.h"
#include "../examples/vit_options.h"

#ifdef FUZZ_SEEDS
typedef struct seed {
    unsigned char table; /* 0: train_lm, 1: train_vit */
    const char *args[24];
} seed;

static const seed seeds[] = {
    {0, {"--pattern", "gsobxcuetwmnaf", "--steps", "100", "--lr", "0.001", "--seed", "7", "--data", "builtin"}},
    {0, {"--compare", "g,s,o,x,gc,u,e,m,ga,f", "--seeds", "3", "--schedule", "cosine", "--min-lr", "1e-5"}},
    {0, {"--pattern", "gcxum", "--activation", "gelu", "--ac-eps", "0.001", "--ac-clip", "8", "--ac-dispersion",
         "variance", "--usmoe-budget", "1.5", "--usmoe-rho", "0.3", "--usmoe-group", "position", "--soft-slots", "2",
         "--proj-dim", "4"}},
    {0, {"--resume", "run.safetensors", "--steps", "2000", "--seq", "64", "--prompt", "The ", "--sample-top-p", "0.9",
         "--log", "run.jsonl"}},
    {0, {"--steps", "4294967297", "--pattern", "ggggggggggggggggggggggggggggggggggggggggggggggggggggggggggggggggg"}},
    {1, {"--pattern", "gsobxcuetwmnaf", "--patch", "4", "--batch", "32", "--data", "builtin", "--save", "vit.safetensors"}},
    {1, {"--compare", "g,s,o,x,gc,u,e,m,ga,f", "--seeds", "2", "--ac-scaling", "postclip", "--dropout", "0.1"}},
    {1, {"--window", "2", "--compare", "gt|tw,ff|na", "--schedule", "constant", "--usmoe-group", "sequence"}},
    {1, {"--lr", "nan", "--seed", "0", "--patch", "3", "--help"}},
    {0, {"--dropout", "0.99", "--target-bpc", "8", "--ac-clip", "1000000"}}, /* bounds, one whose float lies past it */
};

/* The table's byte, then the arguments separated by NUL bytes. */
static int write_seed(const seed *s, const char *path) {
    FILE *f = fopen(path, "wb");
    int i, ok = f && fputc(s->table, f) != EOF;
    for (i = 0; ok && s->args[i]; i++) ok = (i == 0 || fputc('\0', f) != EOF) && fputs(s->args[i], f) != EOF;
    if (f && fclose(f) != 0) ok = 0;
    return ok;
}

int main(int argc, char **argv) {
    size_t i;
    if (argc != 2) {
        fprintf(stderr, "usage: fuzz_cli_seeds FOLDER\n");
        return 2;
    }
    for (i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/seed-%lu", argv[1], (unsigned long)i);
        if (!write_seed(&seeds[i], path)) {
            fprintf(stderr, "fuzz_cli_seeds: %s: cannot write\n", path);
            return 1;
        }
    }
    return 0;
}
#else
#define MAX_ARGS 64

/* Every value of a command line the parser took is in its flag's range. */
static void require_in_range(const cli *c, const void *options) {
    int f;
    for (f = 0; f < c->count; f++) {
        const flag *fl = &c->flags[f];
        if (fl->type == OPT_STR) {
            const char *text = *(const char *const *)((const char *)options + fl->offset);
            const double length = text ? (double)strlen(text) : 0.0;
            if (text && (length < fl->min || (fl->max > 0 && length > fl->max))) abort();
            continue;
        }
        if (!cli_in_range(fl, cli_number(fl, options))) abort();
    }
}

/* What a resumed run does with a command line: the first flag that differs from a
   checkpoint's (the defaults stand in for one), and both values as text. */
static void compare_with_checkpoint(const cli *c, const void *options, const void *kept) {
    char ours[64], theirs[64], range[128];
    const int f = cli_first_conflict(c, options, kept);
    if (f < 0) return;
    cli_format_value(&c->flags[f], options, ours, sizeof ours);
    cli_format_value(&c->flags[f], kept, theirs, sizeof theirs);
    cli_format_range(&c->flags[f], range, sizeof range);
}

/* A program's options: either struct, defaults, parsed, checked. */
typedef union program_options {
    lm_options lm;
    vit_options vit;
} program_options;

static void parse(int vit, int argc, char **argv) {
    program_options defaults, o;
    char why[256];
    cli c;
    if (vit) defaults.vit = vit_options_defaults(), vit_cli_init(&c);
    else defaults.lm = lm_options_defaults(), lm_cli_init(&c);
    o = defaults;
    if (cli_parse_args(&c, argc, argv, &o) != CLI_OK) return;
    require_in_range(&c, &o);
    if (c.valid(&o, why, sizeof why)) compare_with_checkpoint(&c, &o, &defaults);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    char *text, *argv[MAX_ARGS + 1], *p, *end;
    int argc = 0;
    if (size < 1) return 0;
    text = (char *)malloc(size); /* the arguments after the table's byte, and a NUL */
    if (!text) return 0;
    memcpy(text, data + 1, size - 1);
    text[size - 1] = '\0';
    argv[argc++] = (char *)"fuzz";
    for (p = text, end = text + size - 1; p < end && argc < MAX_ARGS; p += strlen(p) + 1) argv[argc++] = p;
    argv[argc] = NULL;
    parse(data[0] % 2, argc, argv);
    free(text);
    return 0;
}
#endif
