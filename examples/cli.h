/* Command-line flags of the examples: a table of flags, each a name, a type, the offset of
   its field in the program's options struct, its range and a help line, parsed from
   "--name value" pairs. A value outside its flag's range is refused as it is read, with the
   flag's name, so a program sees only values it can use; --help lists every flag with its
   default and range. cli_parse_args answers with a status and a message (the fuzzer calls
   it); cli_parse prints them and exits. The helpers here and in the other headers of the
   examples are static inline, as a program need not use all of them. */
#ifndef ACMOE_EXAMPLES_CLI_H
#define ACMOE_EXAMPLES_CLI_H

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { OPT_STR, OPT_INT, OPT_LONG, OPT_FLOAT } opt_type;

#define CLI_ABOVE_MIN 1u /* the range leaves out its minimum: (min, max] */
#define CLI_KEPT 2u      /* shapes a run: a resumed run takes it from the checkpoint */

typedef struct flag {
    const char *name;
    opt_type type;
    size_t offset;
    double min, max; /* the value's range; for a string, its length (max 0: any) */
    unsigned attrs;
    const char *help;
} flag;

/* A table defines FLAG_OPTIONS as its options struct before listing its flags. */
#define FLAG(name, type, field, min, max, attrs, help) \
    { name, type, offsetof(FLAG_OPTIONS, field), min, max, attrs, help }

#define CLI_MAX_FLAGS 96
enum { CLI_OK = 0, CLI_HELP = 1, CLI_BAD = 2 };

typedef struct cli {
    const char *program;
    const flag *flags;
    int count;
    unsigned char given[CLI_MAX_FLAGS]; /* given[i]: flags[i] was on the command line */
    char error[256];                    /* why cli_parse_args refused the command line */
} cli;

static inline void cli_init(cli *c, const char *program, const flag *flags, size_t count) {
    if (count > CLI_MAX_FLAGS) abort(); /* a table longer than given[] */
    memset(c, 0, sizeof *c);
    c->program = program, c->flags = flags, c->count = (int)count;
}

static inline int cli_find(const cli *c, const char *name) {
    int i;
    for (i = 0; i < c->count; i++)
        if (!strcmp(name, c->flags[i].name)) return i;
    return -1;
}

static inline int cli_given(const cli *c, const char *name) {
    const int i = cli_find(c, name);
    return i >= 0 && c->given[i];
}

static inline int cli_refuse(cli *c, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(c->error, sizeof c->error, format, args);
    va_end(args);
    return CLI_BAD;
}

static inline int cli_in_range(const flag *f, double v) {
    const int above_min = f->attrs & CLI_ABOVE_MIN ? v > f->min : v >= f->min;
    return above_min && v <= f->max;
}

/* The range as --help and the messages say it; empty for a string of any length. */
static inline void cli_format_range(const flag *f, char *out, size_t cap) {
    const char *low = f->attrs & CLI_ABOVE_MIN ? "above" : "at least";
    if (f->type == OPT_STR && f->max > 0) snprintf(out, cap, "%.0f to %.0f characters", f->min, f->max);
    else if (f->type == OPT_STR) snprintf(out, cap, "%s", "");
    else if (f->type != OPT_FLOAT && f->max >= INT_MAX) snprintf(out, cap, "%s %.0f", low, f->min);
    else if (f->type != OPT_FLOAT) snprintf(out, cap, "%.0f to %.0f", f->min, f->max);
    else if (f->attrs & CLI_ABOVE_MIN) snprintf(out, cap, "above %.10g, at most %.10g", f->min, f->max);
    else snprintf(out, cap, "%.10g to %.10g", f->min, f->max);
}

static inline int cli_out_of_range(cli *c, const flag *f, const char *value) {
    char range[64];
    cli_format_range(f, range, sizeof range);
    if (f->type == OPT_STR && f->max > 0)
        return cli_refuse(c, "%s takes %s, not %lu", f->name, range, (unsigned long)strlen(value));
    if (f->type == OPT_STR) return cli_refuse(c, "%s takes a value that is not empty", f->name);
    return cli_refuse(c, "%s %.40s is out of range: %s", f->name, value, range);
}

/* A whole decimal number that fills the text. */
static inline int cli_read_integer(const char *text, long long *v) {
    char *end = NULL;
    errno = 0;
    *v = strtoll(text, &end, 10);
    return errno == 0 && end != text && *end == '\0';
}

/* A finite number that fills the text. */
static inline int cli_read_real(const char *text, double *v) {
    char *end = NULL;
    errno = 0;
    *v = strtod(text, &end);
    return errno == 0 && end != text && *end == '\0' && isfinite(*v);
}

static inline int cli_set_number(cli *c, const flag *f, const char *value, char *field) {
    long long whole = 0;
    double real = 0.0;
    if (f->type == OPT_FLOAT) {
        if (!cli_read_real(value, &real)) {
            if (errno == ERANGE) return cli_out_of_range(c, f, value);
            return cli_refuse(c, "%s takes a finite number, not '%.40s'", f->name, value);
        }
        /* the range holds for the float the program gets, not only for the text's double */
        if (!cli_in_range(f, real) || !cli_in_range(f, (double)(float)real)) return cli_out_of_range(c, f, value);
        *(float *)field = (float)real;
        return CLI_OK;
    }
    if (!cli_read_integer(value, &whole)) {
        if (errno == ERANGE) return cli_out_of_range(c, f, value);
        return cli_refuse(c, "%s takes a whole number, not '%.40s'", f->name, value);
    }
    if (!cli_in_range(f, (double)whole)) return cli_out_of_range(c, f, value);
    if (f->type == OPT_INT) *(int *)field = (int)whole;
    else *(long *)field = (long)whole;
    return CLI_OK;
}

static inline int cli_set(cli *c, const flag *f, const char *value, void *options) {
    char *field = (char *)options + f->offset;
    const size_t length = strlen(value);
    if (f->type != OPT_STR) return cli_set_number(c, f, value, field);
    if ((double)length < f->min || (f->max > 0 && (double)length > f->max)) return cli_out_of_range(c, f, value);
    *(const char **)field = value;
    return CLI_OK;
}

/* Sets the fields of options, which hold the defaults, from argv, and records which flags
   were given. CLI_HELP for --help or -h, CLI_BAD with c->error for an unknown flag, a flag
   without its value or a value out of range. */
static inline int cli_parse_args(cli *c, int argc, char **argv, void *options) {
    int i, f;
    for (i = 1; i < argc; i += 2) { /* flag, value */
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return CLI_HELP;
        f = cli_find(c, argv[i]);
        if (f < 0) return cli_refuse(c, "unknown flag '%.40s'", argv[i]);
        if (i + 1 >= argc) return cli_refuse(c, "%s needs a value", argv[i]);
        if (cli_set(c, &c->flags[f], argv[i + 1], options) != CLI_OK) return CLI_BAD;
        c->given[f] = 1;
    }
    return CLI_OK;
}

/* The value of flag f in options as text. */
static inline void cli_format_value(const flag *f, const void *options, char *out, size_t cap) {
    const char *p = (const char *)options + f->offset;
    switch (f->type) {
    case OPT_STR: snprintf(out, cap, "%s", *(const char *const *)p ? *(const char *const *)p : "(none)"); break;
    case OPT_INT: snprintf(out, cap, "%d", *(const int *)p); break;
    case OPT_LONG: snprintf(out, cap, "%ld", *(const long *)p); break;
    case OPT_FLOAT: snprintf(out, cap, "%g", *(const float *)p); break;
    }
}

/* Whether flag f has the same value in options a and b. */
static inline int cli_same_value(const flag *f, const void *a, const void *b) {
    const char *p = (const char *)a + f->offset, *q = (const char *)b + f->offset;
    switch (f->type) {
    case OPT_STR: {
        const char *x = *(const char *const *)p, *y = *(const char *const *)q;
        return x == y || (x && y && !strcmp(x, y));
    }
    case OPT_INT: return *(const int *)p == *(const int *)q;
    case OPT_LONG: return *(const long *)p == *(const long *)q;
    case OPT_FLOAT: return *(const float *)p == *(const float *)q;
    }
    return 0;
}

static inline void cli_print_help(const cli *c, const void *options) {
    int f;
    char range[64], value[64];
    printf("usage: %s [flags]\n", c->program);
    for (f = 0; f < c->count; f++) {
        cli_format_range(&c->flags[f], range, sizeof range);
        cli_format_value(&c->flags[f], options, value, sizeof value);
        printf("  %-15s %s (default: %s%s%s)\n", c->flags[f].name, c->flags[f].help, value, *range ? "; " : "", range);
    }
}

/* Exits with status 2 and the reason on stderr. */
static inline void cli_fail(const char *program, const char *format, ...) {
    va_list args;
    fprintf(stderr, "%s: ", program);
    va_start(args, format);
    vfprintf(stderr, format, args);
    va_end(args);
    fprintf(stderr, "\n");
    exit(2);
}

/* The first CLI_KEPT flag given on the command line (whose options are given) with another
   value than kept has, the options of the run that a checkpoint continues; -1 for none. */
static inline int cli_first_conflict(const cli *c, const void *given, const void *kept) {
    int f;
    for (f = 0; f < c->count; f++)
        if (c->flags[f].attrs & CLI_KEPT && c->given[f] && !cli_same_value(&c->flags[f], given, kept)) return f;
    return -1;
}

/* Exits with status 2 naming that flag and both values, if there is one. */
static inline void cli_refuse_conflicts(const cli *c, const void *given, const void *kept) {
    char ours[64], theirs[64];
    const int f = cli_first_conflict(c, given, kept);
    if (f < 0) return;
    cli_format_value(&c->flags[f], given, ours, sizeof ours);
    cli_format_value(&c->flags[f], kept, theirs, sizeof theirs);
    cli_fail(c->program, "%s %s conflicts with the checkpoint's %s (a resumed run keeps the flags it was trained with)",
             c->flags[f].name, ours, theirs);
}

/* cli_parse_args for a program: --help prints the flags and exits; a bad command line
   exits with status 2. */
static inline void cli_parse(cli *c, int argc, char **argv, void *options) {
    const int status = cli_parse_args(c, argc, argv, options);
    if (status == CLI_HELP) {
        cli_print_help(c, options);
        exit(0);
    }
    if (status != CLI_OK) cli_fail(c->program, "%s (see --help)", c->error);
}

#endif
