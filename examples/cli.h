/* Command-line flags of the examples: a table of flags, each a name, a type, the offset of
   its field in the program's `options` struct and a help line, parsed from "--name value"
   pairs; --help lists every flag with its default. */
#ifndef ACMOE_EXAMPLES_CLI_H
#define ACMOE_EXAMPLES_CLI_H

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { OPT_STR, OPT_INT, OPT_LONG, OPT_FLOAT } opt_type;

typedef struct flag {
    const char *name;
    opt_type type;
    size_t offset;
    const char *help;
} flag;

#define FLAG(name, type, field, help) {name, type, offsetof(options, field), help}

static void cli_print_value(const flag *f, const void *options) {
    const char *p = (const char *)options + f->offset;
    switch (f->type) {
    case OPT_STR: printf("%s", *(const char *const *)p ? *(const char *const *)p : "(none)"); break;
    case OPT_INT: printf("%d", *(const int *)p); break;
    case OPT_LONG: printf("%ld", *(const long *)p); break;
    case OPT_FLOAT: printf("%g", *(const float *)p); break;
    }
}

static int cli_set(void *options, const flag *f, const char *value) {
    char *end = NULL, *p = (char *)options + f->offset;
    switch (f->type) {
    case OPT_STR: *(const char **)p = value; return 1;
    case OPT_INT: *(int *)p = (int)strtol(value, &end, 10); break;
    case OPT_LONG: *(long *)p = strtol(value, &end, 10); break;
    case OPT_FLOAT: *(float *)p = strtof(value, &end); break;
    }
    return end && *end == '\0' && end != value;
}

/* Sets the fields of options, which hold the defaults, from argv. --help prints the flags
   and the defaults and exits; a bad flag or value exits with status 2. */
static void cli_parse(const char *program, int argc, char **argv, const flag *flags, size_t count, void *options) {
    int i;
    size_t f;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") && strcmp(argv[i], "-h")) continue;
        printf("usage: %s [flags]\n", program);
        for (f = 0; f < count; f++) {
            printf("  %-15s %s (default: ", flags[f].name, flags[f].help);
            cli_print_value(&flags[f], options);
            printf(")\n");
        }
        exit(0);
    }
    for (i = 1; i < argc; i += 2) { /* flag, value */
        for (f = 0; f < count; f++)
            if (!strcmp(argv[i], flags[f].name)) break;
        if (f == count || i + 1 >= argc || !cli_set(options, &flags[f], argv[i + 1])) {
            fprintf(stderr, "%s: bad flag or value at '%s' (see --help)\n", program, argv[i]);
            exit(2);
        }
    }
}

#endif
