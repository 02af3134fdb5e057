/* Command-line flags of the examples: tables of flags, each a name, a type, the offset of
   its field in the program's options struct, its range and a help line, parsed from
   "--name value" pairs. A program's own flags come from its tables; the model's and the
   optimizer's from the library's option table (acmoe_model_options, acmoe_optim_options),
   each setting its field of an acmoe_lm_desc or acmoe_optim_desc inside the program's
   options. A value outside its flag's range is refused as it is read, with the flag's name,
   so a program sees only values it can use; --help lists every flag with its default and
   range. cli_parse_args answers with a status and a message (the fuzzer calls it);
   cli_parse prints them and exits. The helpers here and in the other headers of the
   examples are static inline, as a program need not use all of them. */
#ifndef ACMOE_EXAMPLES_CLI_H
#define ACMOE_EXAMPLES_CLI_H

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../acmoe.h"

/* OPT_LIBRARY: an option of the library's table, parsed and printed by the library. */
typedef enum { OPT_STR, OPT_INT, OPT_LONG, OPT_FLOAT, OPT_LIBRARY } opt_type;

#define CLI_ABOVE_MIN 1u /* the range leaves out its minimum: (min, max] */
#define CLI_KEPT 2u      /* shapes a run: a resumed run takes it from the checkpoint */

typedef struct flag {
    const char *name;
    opt_type type;
    size_t offset;
    double min, max; /* the value's range; for a string, its length (max 0: any) */
    unsigned attrs;
    const char *help;
    const acmoe_option *option; /* OPT_LIBRARY: the library's entry */
} flag;

/* A table defines FLAG_OPTIONS as its options struct before listing its flags. */
#define FLAG(name, type, field, min, max, attrs, help) \
    { name, type, offsetof(FLAG_OPTIONS, field), min, max, attrs, help, NULL }

#define CLI_MAX_FLAGS 96
#define CLI_NAME_MAX 32
enum { CLI_OK = 0, CLI_HELP = 1, CLI_BAD = 2 };

typedef struct cli {
    const char *program;
    flag flags[CLI_MAX_FLAGS];
    char names[CLI_MAX_FLAGS][CLI_NAME_MAX]; /* "--" and the library's flag names */
    int count;
    unsigned char given[CLI_MAX_FLAGS]; /* given[i]: flags[i] was on the command line */
    char error[256];                    /* why cli_parse_args refused the command line */
    /* Optional: the rules between flags (1, or 0 with the first broken one in why), and
       what --help says after the flags. */
    int (*valid)(const void *options, char *why, size_t cap);
    void (*more_help)(void);
} cli;

static inline void cli_init(cli *c, const char *program) {
    memset(c, 0, sizeof *c);
    c->program = program;
}

/* Adds a table of flags whose offsets count from base in the options. */
static inline void cli_add_flags(cli *c, const flag *flags, size_t count, size_t base) {
    size_t i;
    if (count > (size_t)(CLI_MAX_FLAGS - c->count)) abort(); /* more flags than given[] holds */
    for (i = 0; i < count; i++) {
        c->flags[c->count] = flags[i];
        c->flags[c->count++].offset += base;
    }
}

/* Whether key is one of the NULL-terminated keys. */
static inline int cli_key_among(const char *key, const char *const *keys) {
    for (; keys && *keys; keys++)
        if (!strcmp(key, *keys)) return 1;
    return 0;
}

/* Adds every option of a library table that has a flag, but those whose key is among
   skip: each sets its field of the descriptor at base in the options. They shape a run,
   so a resumed run takes them from its checkpoint (CLI_KEPT). */
static inline void cli_add_options(cli *c, const acmoe_option *options, int count, size_t base,
                                   const char *const *skip) {
    int i;
    for (i = 0; i < count; i++) {
        const acmoe_option *o = &options[i];
        flag *f = &c->flags[c->count];
        if (!o->flag || cli_key_among(o->key, skip)) continue;
        if (c->count == CLI_MAX_FLAGS || strlen(o->flag) + 3 > CLI_NAME_MAX) abort(); /* the room is ours to size */
        snprintf(c->names[c->count], CLI_NAME_MAX, "--%s", o->flag);
        f->name = c->names[c->count], f->type = OPT_LIBRARY, f->offset = base + o->offset;
        f->min = o->min, f->max = o->max, f->attrs = CLI_KEPT, f->help = o->help, f->option = o;
        c->count++;
    }
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

static inline int cli_is_float(const flag *f) {
    return f->type == OPT_FLOAT || (f->type == OPT_LIBRARY && f->option->type == ACMOE_OPTION_FLOAT);
}

/* A float flag is judged as its float field holds it: the float nearest a bound such as
   0.99 lies just outside the bound's double. */
static inline int cli_in_range(const flag *f, double v) {
    double low = f->min, high = f->max;
    int above_min;
    if (cli_is_float(f)) {
        if (!(fabs(v) <= FLT_MAX)) return 0;
        v = (float)v, low = (float)low, high = (float)high;
    }
    above_min = f->attrs & CLI_ABOVE_MIN ? v > low : v >= low;
    return above_min && v <= high;
}

static inline int cli_is_enum(const flag *f) { return f->type == OPT_LIBRARY && f->option->type == ACMOE_OPTION_ENUM; }

/* An enum option's names: "relu, gelu or swiglu". */
static inline void cli_format_names(const flag *f, char *out, size_t cap) {
    int v, used = 0;
    out[0] = '\0';
    for (v = (int)f->min; v <= (int)f->max && used >= 0 && (size_t)used < cap; v++) {
        const char *name = acmoe_enum_name(f->option->names, v);
        const char *glue = v == (int)f->min ? "" : v == (int)f->max ? " or " : ", ";
        used += snprintf(out + used, cap - (size_t)used, "%s%s", glue, name ? name : "?");
    }
}

/* The range as --help and the messages say it; empty for a string of any length. */
static inline void cli_format_range(const flag *f, char *out, size_t cap) {
    const char *low = f->attrs & CLI_ABOVE_MIN ? "above" : "at least";
    if (f->type == OPT_STR && f->max > 0) snprintf(out, cap, "%.0f to %.0f characters", f->min, f->max);
    else if (f->type == OPT_STR) snprintf(out, cap, "%s", "");
    else if (cli_is_enum(f)) cli_format_names(f, out, cap);
    else if (!cli_is_float(f) && f->max >= INT_MAX) snprintf(out, cap, "%s %.0f", low, f->min);
    else if (!cli_is_float(f)) snprintf(out, cap, "%.0f to %.0f", f->min, f->max);
    else if (f->attrs & CLI_ABOVE_MIN) snprintf(out, cap, "above %.10g, at most %.10g", f->min, f->max);
    else snprintf(out, cap, "%.10g to %.10g", f->min, f->max);
}

static inline int cli_out_of_range(cli *c, const flag *f, const char *value) {
    char range[128];
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
        if (!cli_in_range(f, real)) return cli_out_of_range(c, f, value); /* as the float it becomes */
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

/* The descriptor (acmoe_lm_desc or acmoe_optim_desc) a library flag's field is in. */
static inline void *cli_desc(const flag *f, const void *options) {
    return (char *)options + f->offset - f->option->offset;
}

/* A library option, set by the library; the message says why it refused the value. */
static inline int cli_set_option(cli *c, const flag *f, const char *value, void *options) {
    char names[128];
    long long whole;
    double real;
    if (cli_is_enum(f)) {
        if (acmoe_option_set(f->option, cli_desc(f, options), value) == ACMOE_OK) return CLI_OK;
        cli_format_names(f, names, sizeof names);
        return cli_refuse(c, "%s takes %s, not '%.40s'", f->name, names, value);
    }
    if (!cli_is_float(f) && !cli_read_integer(value, &whole)) {
        if (errno == ERANGE) return cli_out_of_range(c, f, value);
        return cli_refuse(c, "%s takes a whole number, not '%.40s'", f->name, value);
    }
    if (cli_is_float(f) && !cli_read_real(value, &real)) {
        if (errno == ERANGE) return cli_out_of_range(c, f, value);
        return cli_refuse(c, "%s takes a finite number, not '%.40s'", f->name, value);
    }
    if (acmoe_option_set(f->option, cli_desc(f, options), value) != ACMOE_OK) return cli_out_of_range(c, f, value);
    return CLI_OK;
}

static inline int cli_set(cli *c, const flag *f, const char *value, void *options) {
    char *field = (char *)options + f->offset;
    const size_t length = strlen(value);
    if (f->type == OPT_LIBRARY) return cli_set_option(c, f, value, options);
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
    case OPT_LIBRARY: acmoe_option_format(f->option, cli_desc(f, options), out, cap); break;
    }
}

/* Whether flag f has the same value in options a and b. */
static inline int cli_same_value(const flag *f, const void *a, const void *b) {
    const char *p = (const char *)a + f->offset, *q = (const char *)b + f->offset;
    char x[64], y[64];
    switch (f->type) {
    case OPT_LIBRARY: /* the library writes each value as the shortest text that reads back the same */
        cli_format_value(f, a, x, sizeof x), cli_format_value(f, b, y, sizeof y);
        return !strcmp(x, y);
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

/* The value of a number flag in options, for range checks. */
static inline double cli_number(const flag *f, const void *options) {
    const char *p = (const char *)options + f->offset;
    if (cli_is_float(f)) return *(const float *)p;
    if (f->type == OPT_LONG) return (double)*(const long *)p;
    return *(const int *)p; /* ints, and the library's ints and enums */
}

static inline void cli_print_help(const cli *c, const void *options) {
    int f;
    char range[128], value[64];
    printf("usage: %s [flags]\n", c->program);
    for (f = 0; f < c->count; f++) {
        cli_format_range(&c->flags[f], range, sizeof range);
        cli_format_value(&c->flags[f], options, value, sizeof value);
        printf("  %-15s %s (default: %s%s%s)\n", c->flags[f].name, c->flags[f].help, value, *range ? "; " : "", range);
    }
    if (c->more_help) c->more_help();
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

/* cli_parse_args for a program: --help prints the flags and exits; a bad command line, or
   flags that break a rule between them, exit with status 2. */
static inline void cli_parse(cli *c, int argc, char **argv, void *options) {
    const int status = cli_parse_args(c, argc, argv, options);
    char why[256];
    if (status == CLI_HELP) {
        cli_print_help(c, options);
        exit(0);
    }
    if (status != CLI_OK) cli_fail(c->program, "%s (see --help)", c->error);
    if (c->valid && !c->valid(options, why, sizeof why)) cli_fail(c->program, "%s", why);
}

#endif
