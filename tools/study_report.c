/* The report of a study of the AC router: which claims of "Tight Clusters Make Specialized
   Experts" its runs reproduce (faster convergence, robustness to corrupted input, better
   final quality, tighter clusters), and how often AC's clusters of fewer than 2 tokens occur and
   what the paper's weights for them cost against a "<router> robust" twin.

     study_report DIR OUTDIR

   DIR holds study.tsv (a header, then per run: id, experiment, router, baseline, seed and
   command, tab-separated), meta.txt (key: value lines) and per run <id>.jsonl, the --log of
   train_lm or train_vit, with <id>.done once the run finished. OUTDIR gets results.md,
   study/headline.md (the claims counted) and the plots study/NAME.svg.

   Only finished runs count. A router is compared with its baseline seed by seed (runs of
   one experiment and seed share batches and initialisation): the mean difference is a
   verdict when its 95 % confidence interval (Student's t over the seeds, at least two)
   leaves out zero. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "../examples/svg.h"

#define PROGRAM "study_report"
#define NAME_CAP 64        /* ids, experiments, routers, attacks and JSON keys, with the NUL */
#define NAME_CAP_TEXT "63" /* NAME_CAP - 1, for messages */
#define PATH_CAP 4096
#define MAX_RUNS 4096
#define MAX_EXPERIMENTS 32
#define MAX_ROUTERS 16       /* in the whole study: each keeps its colour in every plot */
#define MAX_SEEDS 64         /* per experiment */
#define MAX_LAYER 64         /* MoE layers are numbered 1..MAX_LAYER */
#define MAX_ATTACK_POINTS 64 /* (attack, strength) per experiment */
#define MAX_FIELDS 64        /* per log line */
#define MAX_META 256
#define MAX_CLAIM_ROWS 1024
#define MAX_COMPLAINTS 20 /* per file; the rest are counted */

/* ---- messages ---- */

#if defined(__GNUC__)
#define PRINTF_LIKE(format_index) __attribute__((format(printf, format_index, format_index + 1)))
#else
#define PRINTF_LIKE(format_index)
#endif

static void fail(const char *format, ...) PRINTF_LIKE(1);
static void fail(const char *format, ...) {
    va_list arguments;
    fputs(PROGRAM ": ", stderr);
    va_start(arguments, format);
    vfprintf(stderr, format, arguments);
    va_end(arguments);
    fputc('\n', stderr);
    exit(2);
}

/* A file being read, for messages that name file:line. */
typedef struct source {
    const char *path;
    long line;
    int complaints;
} source;

static void complain(source *from, const char *format, ...) PRINTF_LIKE(2);
static void complain(source *from, const char *format, ...) {
    va_list arguments;
    if (++from->complaints > MAX_COMPLAINTS) return;
    fprintf(stderr, PROGRAM ": %s:%ld: ", from->path, from->line);
    va_start(arguments, format);
    vfprintf(stderr, format, arguments);
    va_end(arguments);
    fputs(from->complaints == MAX_COMPLAINTS ? " (further problems in this file not shown)\n" : "\n", stderr);
}

/* The count of problems when some were not shown. */
static void complain_total(const source *from) {
    if (from->complaints > MAX_COMPLAINTS)
        fprintf(stderr, PROGRAM ": %s: %d problems in all\n", from->path, from->complaints);
}

static void *grow(void *items, size_t count, size_t size) {
    void *grown = count > ((size_t)-1) / 2 / size ? NULL : realloc(items, count * size);
    if (!grown) fail("out of memory");
    return grown;
}

/* ---- files ---- */

static void join_path(char *out, const char *directory, const char *name, const char *suffix) {
    const int length = snprintf(out, PATH_CAP, "%s/%s%s", directory, name, suffix);
    if (length < 0 || length >= PATH_CAP) fail("path too long: %s/%s%s", directory, name, suffix);
}

/* The whole file, NUL-terminated (a NUL byte inside becomes a space, so that its line is
   reported rather than the rest of the file lost), or NULL with *why set. */
static char *read_text(const char *path, const char **why) {
    FILE *file = fopen(path, "rb");
    char *text = NULL;
    size_t used = 0, capacity = 0;
    if (!file) return *why = strerror(errno), (char *)NULL;
    for (;;) {
        if (capacity - used < 2) capacity = capacity * 2 + 65536, text = (char *)grow(text, capacity, 1);
        used += fread(text + used, 1, capacity - used - 1, file);
        if (ferror(file) || feof(file)) break;
    }
    if (ferror(file)) {
        *why = strerror(errno), free(text), text = NULL;
    } else {
        size_t i;
        for (i = 0; i < used; i++) text[i] = text[i] ? text[i] : ' ';
        text[used] = '\0';
    }
    fclose(file);
    return text;
}

static int file_exists(const char *path) {
    struct stat status;
    return stat(path, &status) == 0;
}

static void make_directory(const char *path) {
    if (mkdir(path, 0777) != 0 && errno != EEXIST) fail("%s: %s", path, strerror(errno));
}

/* The next line from *cursor, NUL-terminated in place without its \r\n; NULL at the end. */
static char *next_line(char **cursor) {
    char *line = *cursor, *end;
    if (!*line) return NULL;
    end = line + strcspn(line, "\n");
    *cursor = *end ? end + 1 : end;
    *end = '\0';
    if (end > line && end[-1] == '\r') end[-1] = '\0';
    return line;
}

static int is_blank(const char *text) { return text[strspn(text, " \t")] == '\0'; }

/* Copies text into a NAME_CAP buffer; 0 when it does not fit or is empty. */
static int copy_name(char *out, const char *text) {
    const size_t length = strlen(text);
    if (length == 0 || length >= NAME_CAP) return 0;
    memcpy(out, text, length + 1);
    return 1;
}

/* ---- JSON lines: one flat object each (numbers, strings, literals, arrays of numbers) ---- */

enum { JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_LITERAL };

typedef struct json_field {
    char key[NAME_CAP];
    int kind;
    double number;       /* JSON_NUMBER */
    char text[NAME_CAP]; /* JSON_STRING, cut to fit */
    int array_count;     /* JSON_ARRAY: its numbers' count, sum and largest */
    double array_sum, array_max;
} json_field;

typedef struct json_object {
    int count;
    json_field fields[MAX_FIELDS];
} json_object;

static const char *skip_space(const char *at) { return at + strspn(at, " \t"); }

/* The value of a hexadecimal digit, -1 for another character. */
static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The string starting after its opening quote into out (cut to NAME_CAP; \u escapes beyond
   ASCII become '?'): where it ends, or NULL with *error. */
static const char *parse_string(const char *at, char *out, const char **error) {
    static const char escapes[] = "\"\\/bfnrt", meanings[] = "\"\\/\b\f\n\r\t";
    size_t used = 0;
    for (; *at != '"'; at++) {
        char c = *at;
        if (!c) return *error = "unterminated string", (const char *)NULL;
        if ((unsigned char)c < 0x20) return *error = "control character in a string", (const char *)NULL;
        if (c == '\\' && at[1] == 'u') {
            int code = 0, i;
            for (i = 2; i < 6; i++) {
                if (hex_value(at[i]) < 0) return *error = "bad \\u escape", (const char *)NULL;
                code = code * 16 + hex_value(at[i]);
            }
            c = code >= 0x20 && code < 0x80 ? (char)code : '?';
            at += 5;
        } else if (c == '\\') {
            const char *escape = at[1] ? strchr(escapes, at[1]) : NULL;
            if (!escape) return *error = "bad escape in a string", (const char *)NULL;
            c = meanings[escape - escapes], at++;
        }
        if (used + 1 < NAME_CAP) out[used++] = c;
    }
    out[used] = '\0';
    return at + 1;
}

static const char *parse_number(const char *at, double *value, const char **error) {
    char *end;
    if (*at != '-' && !(*at >= '0' && *at <= '9')) return *error = "expected a value", (const char *)NULL;
    *value = strtod(at, &end);
    return end;
}

static const char *parse_array(const char *at, json_field *field, const char **error) {
    field->kind = JSON_ARRAY, field->array_count = 0, field->array_sum = 0.0, field->array_max = -INFINITY;
    at = skip_space(at);
    if (*at == ']') return at + 1;
    for (;;) {
        double value;
        if (!(at = parse_number(skip_space(at), &value, error))) return *error = "array of other than numbers", at;
        field->array_count++, field->array_sum += value, field->array_max = fmax(field->array_max, value);
        at = skip_space(at);
        if (*at == ']') return at + 1;
        if (*at++ != ',') return *error = "expected ',' or ']' in an array", (const char *)NULL;
    }
}

static const char *parse_value(const char *at, json_field *field, const char **error) {
    static const char *const literals[] = {"null", "true", "false"};
    int i;
    if (*at == '"') return field->kind = JSON_STRING, parse_string(at + 1, field->text, error);
    if (*at == '[') return parse_array(at + 1, field, error);
    for (i = 0; i < 3; i++)
        if (!strncmp(at, literals[i], strlen(literals[i]))) return field->kind = JSON_LITERAL, at + strlen(literals[i]);
    field->kind = JSON_NUMBER;
    return parse_number(at, &field->number, error);
}

/* 1 when line is one flat JSON object, its fields in object; else 0 with *error. */
static int parse_object(const char *line, json_object *object, const char **error) {
    const char *at = skip_space(line);
    object->count = 0;
    if (*at != '{') return *error = "not a JSON object", 0;
    at = skip_space(at + 1);
    if (*at == '}') return *skip_space(at + 1) ? (*error = "text after the object", 0) : 1;
    for (;;) {
        json_field *field;
        if (object->count == MAX_FIELDS) return *error = "more fields than " PROGRAM " holds (64)", 0;
        field = &object->fields[object->count++];
        at = skip_space(at);
        if (*at != '"') return *error = "expected a key", 0;
        if (!(at = parse_string(at + 1, field->key, error))) return 0;
        at = skip_space(at);
        if (*at != ':') return *error = "expected ':' after a key", 0;
        if (!(at = parse_value(skip_space(at + 1), field, error))) return 0;
        at = skip_space(at);
        if (*at == '}') break;
        if (*at != ',') return *error = "expected ',' or '}'", 0;
        at++;
    }
    return *skip_space(at + 1) ? (*error = "text after the object", 0) : 1;
}

static const json_field *json_find(const json_object *object, const char *key, int kind) {
    int i;
    for (i = 0; i < object->count; i++)
        if (object->fields[i].kind == kind && !strcmp(object->fields[i].key, key)) return &object->fields[i];
    return NULL;
}

/* The number of key; NaN when missing, null or not a number. */
static double json_number(const json_object *object, const char *key) {
    const json_field *field = json_find(object, key, JSON_NUMBER);
    return field ? field->number : NAN;
}

static const char *json_text(const json_object *object, const char *key) {
    const json_field *field = json_find(object, key, JSON_STRING);
    return field ? field->text : NULL;
}

/* ---- the runs ---- */

enum { EVAL_CLEAN, EVAL_RANDOM_BYTES, EVAL_WORD_SWAP, EVAL_ACCURACY, EVAL_FIELDS };
static const char *const eval_keys[EVAL_FIELDS] = {"val_loss", "val_loss_corrupted", "val_loss_wordswap", "accuracy"};

enum {
    LAYER_IMBALANCE,
    LAYER_STABILITY,
    LAYER_TIGHTNESS_PLAIN,
    LAYER_TIGHTNESS_AC,
    LAYER_SMALL_CLUSTERS,
    LAYER_TOP_GATE,
    LAYER_MI,
    LAYER_FIELDS
};
/* LAYER_IMBALANCE comes from tokens_per_expert: the largest count over the mean. */
static const char *const layer_keys[LAYER_FIELDS] = {"tokens_per_expert", "router_stability", "tightness_plain",
                                                     "tightness_ac",      "small_clusters",   "top_gate_mean",
                                                     "mi_expert_class"};

enum { EVENT_EVAL, EVENT_LAYER, EVENT_ROBUST, EVENT_KINDS };

/* One logged measurement; its key is the step, and the layer (layer events) or the attack
   and strength (robust events). */
typedef struct record {
    long step;
    int layer;
    char tag[NAME_CAP]; /* the layer's router, or the attack */
    double strength;
    double value[LAYER_FIELDS]; /* EVAL_*, LAYER_*, or the robust accuracy in [0] */
} record;

typedef struct record_list {
    record *items; /* by step */
    int count, capacity;
} record_list;

typedef struct run {
    char id[NAME_CAP], baseline[NAME_CAP];
    const char *command;
    int experiment, slot, seed_index, finished;
    long seed, last_step;
    double throughput_sum; /* tokens per second over the step events, each step once */
    long throughput_count, throughput_step;
    record_list events[EVENT_KINDS];
} run;

/* A router of one experiment, and the one it is compared with. */
typedef struct router_slot {
    int router; /* index into router_names: its colour */
    char baseline[NAME_CAP];
    int baseline_slot; /* -1 for none */
} router_slot;

typedef struct attack_point {
    char attack[NAME_CAP];
    double strength;
} attack_point;

typedef struct experiment {
    char name[NAME_CAP], file_stem[NAME_CAP];
    int index, vision;             /* vision: accuracy; else bits per character */
    int has_accuracy, has_corrupt; /* the logs' say on vision */
    int n_slots, n_seeds, n_layers, n_attack_points;
    router_slot slots[MAX_ROUTERS];
    long seeds[MAX_SEEDS];
    int layers[MAX_LAYER];
    attack_point attack_points[MAX_ATTACK_POINTS];
} experiment;

static run runs[MAX_RUNS];
static int n_runs;
static experiment experiments[MAX_EXPERIMENTS];
static int n_experiments;
static char router_names[MAX_ROUTERS][NAME_CAP];
static int n_routers;
static run *run_table[MAX_EXPERIMENTS][MAX_ROUTERS][MAX_SEEDS];
static char *meta_lines[MAX_META];
static int n_meta;

static const char *router_name(const experiment *e, int slot) { return router_names[e->slots[slot].router]; }

/* The finished run of a router and seed, or NULL. */
static const run *finished_run(const experiment *e, int slot, int seed_index) {
    const run *found = run_table[e->index][slot][seed_index];
    return found && found->finished ? found : NULL;
}

static int same_key(const record *a, const record *b, int kind) {
    if (a->step != b->step || a->layer != b->layer) return 0;
    return kind != EVENT_ROBUST || (a->strength == b->strength && !strcmp(a->tag, b->tag));
}

/* Keeps the list in step order; a record with the key of one kept replaces it, as a
   resumed run logs its steps again and the last line wins. */
static void keep_record(record_list *list, const record *item, int kind) {
    int at = list->count, i;
    for (i = list->count - 1; i >= 0 && list->items[i].step >= item->step; i--) {
        if (same_key(&list->items[i], item, kind)) {
            list->items[i] = *item;
            return;
        }
        if (list->items[i].step > item->step) at = i;
    }
    if (list->count == list->capacity) {
        if (list->capacity > (1 << 28)) fail("more than %d records in one run", 1 << 28);
        list->capacity = list->capacity * 2 + 64;
        list->items = (record *)grow(list->items, (size_t)list->capacity, sizeof *list->items);
    }
    memmove(list->items + at + 1, list->items + at, (size_t)(list->count - at) * sizeof *list->items);
    list->items[at] = *item, list->count++;
}

static record new_record(long step) {
    record item;
    int i;
    memset(&item, 0, sizeof item);
    item.step = step;
    for (i = 0; i < LAYER_FIELDS; i++) item.value[i] = NAN;
    return item;
}

static void read_eval(run *r, const json_object *object, long step) {
    record item = new_record(step);
    int i;
    for (i = 0; i < EVAL_FIELDS; i++) item.value[i] = json_number(object, eval_keys[i]);
    keep_record(&r->events[EVENT_EVAL], &item, EVENT_EVAL);
}

static void read_layer(run *r, const json_object *object, long step, source *from) {
    const json_field *tokens = json_find(object, "tokens_per_expert", JSON_ARRAY);
    const double layer = json_number(object, "layer");
    const char *router = json_text(object, "router");
    record item = new_record(step);
    int i;
    if (!(layer >= 1 && layer <= MAX_LAYER && layer == floor(layer))) {
        complain(from, "layer event without a layer number 1..%d", MAX_LAYER);
        return;
    }
    item.layer = (int)layer;
    if (!copy_name(item.tag, router ? router : "?")) copy_name(item.tag, "?");
    for (i = 1; i < LAYER_FIELDS; i++) item.value[i] = json_number(object, layer_keys[i]);
    if (tokens && tokens->array_count > 0 && tokens->array_sum > 0.0)
        item.value[LAYER_IMBALANCE] = tokens->array_max / (tokens->array_sum / tokens->array_count);
    keep_record(&r->events[EVENT_LAYER], &item, EVENT_LAYER);
}

static void read_robust(run *r, const json_object *object, long step, source *from) {
    const char *attack = json_text(object, "attack");
    const double strength = json_number(object, "strength");
    record item = new_record(step);
    if (!attack || !copy_name(item.tag, attack)) {
        complain(from, "robust event without an attack name");
        return;
    }
    item.strength = isfinite(strength) ? strength : 0.0;
    item.value[0] = json_number(object, "accuracy");
    keep_record(&r->events[EVENT_ROBUST], &item, EVENT_ROBUST);
}

/* Throughput: a step logged again after a resume is counted once. */
static void read_step(run *r, const json_object *object, long step) {
    const double tokens_per_second = json_number(object, "tokens_per_second");
    if (step <= r->throughput_step || !isfinite(tokens_per_second)) return;
    r->throughput_step = step, r->throughput_sum += tokens_per_second, r->throughput_count++;
}

static void read_event(run *r, const json_object *object, source *from) {
    static const char *const kinds[] = {"step", "eval", "layer", "robust"};
    const char *event = json_text(object, "event");
    const double step = json_number(object, "step");
    int kind;
    if (!event) {
        complain(from, "no \"event\"");
        return;
    }
    for (kind = 0; kind < 4 && strcmp(event, kinds[kind]); kind++) continue;
    if (kind == 4) return; /* events this report does not use */
    if (!(step >= 0.0 && step <= 1e15)) {
        complain(from, "%s event without a step in 0..1e15", event);
        return;
    }
    if ((long)step > r->last_step) r->last_step = (long)step;
    if (kind == 0) read_step(r, object, (long)step);
    else if (kind == 1) read_eval(r, object, (long)step);
    else if (kind == 2) read_layer(r, object, (long)step, from);
    else read_robust(r, object, (long)step, from);
}

static void read_log(run *r, const char *directory) {
    static json_object object;
    char path[PATH_CAP];
    const char *why = NULL, *error = NULL;
    char *text, *cursor, *line;
    source from;
    join_path(path, directory, r->id, ".jsonl");
    from.path = path, from.line = 0, from.complaints = 0;
    if (!(text = read_text(path, &why))) {
        if (r->finished || errno != ENOENT) fprintf(stderr, PROGRAM ": %s: %s\n", path, why); /* else not begun */
        return;
    }
    for (cursor = text; (line = next_line(&cursor)) != NULL;) {
        from.line++;
        if (is_blank(line)) continue;
        if (parse_object(line, &object, &error)) read_event(r, &object, &from);
        else complain(&from, "%s; line skipped", error);
    }
    complain_total(&from);
    free(text);
}

/* ---- the manifest ---- */

static int find_name(char names[][NAME_CAP], int count, const char *name) {
    int i;
    for (i = 0; i < count; i++)
        if (!strcmp(names[i], name)) return i;
    return -1;
}

/* Letters, digits, '.', '-' and '_' of name, others as '_': a file name part. */
static void file_stem_of(char *out, const char *name) {
    size_t i;
    for (i = 0; name[i]; i++) {
        const char c = name[i];
        out[i] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.'
                     ? c
                     : '_';
    }
    out[i] = '\0';
    if (out[0] == '.') out[0] = '_';
}

static int experiment_of(const char *name, source *from) {
    int i;
    for (i = 0; i < n_experiments; i++)
        if (!strcmp(experiments[i].name, name)) return i;
    if (n_experiments == MAX_EXPERIMENTS) return complain(from, "more than %d experiments", MAX_EXPERIMENTS), -1;
    memset(&experiments[i], 0, sizeof experiments[i]);
    copy_name(experiments[i].name, name);
    file_stem_of(experiments[i].file_stem, name);
    experiments[i].index = i;
    return n_experiments++;
}

static int router_of(const char *name, source *from) {
    const int found = find_name(router_names, n_routers, name);
    if (found >= 0) return found;
    if (n_routers == MAX_ROUTERS) return complain(from, "more than %d routers", MAX_ROUTERS), -1;
    copy_name(router_names[n_routers], name);
    return n_routers++;
}

/* The experiment's slot of a router, made on first sight with the row's baseline. */
static int slot_of(experiment *e, int router, const char *baseline, source *from) {
    int i;
    for (i = 0; i < e->n_slots; i++)
        if (e->slots[i].router == router) {
            if (strcmp(e->slots[i].baseline, baseline))
                complain(from, "%s in %s: baseline %s, not %s as before; the first kept", router_names[router], e->name,
                         baseline, e->slots[i].baseline);
            return i;
        }
    if (e->n_slots == MAX_ROUTERS) return complain(from, "more than %d routers in %s", MAX_ROUTERS, e->name), -1;
    e->slots[i].router = router, e->slots[i].baseline_slot = -1;
    copy_name(e->slots[i].baseline, baseline);
    return e->n_slots++;
}

static int seed_of(experiment *e, long seed, source *from) {
    int i;
    for (i = 0; i < e->n_seeds; i++)
        if (e->seeds[i] == seed) return i;
    if (e->n_seeds == MAX_SEEDS) return complain(from, "more than %d seeds in %s", MAX_SEEDS, e->name), -1;
    e->seeds[e->n_seeds] = seed;
    return e->n_seeds++;
}

static int id_taken(const char *id) {
    int i;
    for (i = 0; i < n_runs; i++)
        if (!strcmp(runs[i].id, id)) return 1;
    return 0;
}

/* Splits a row at its first five tabs; the sixth field, the command, keeps any tabs. */
static int split_row(char *row, char **fields) {
    int i;
    fields[0] = row;
    for (i = 1; i < 6; i++) {
        char *tab = strchr(fields[i - 1], '\t');
        if (!tab) return 0;
        *tab = '\0', fields[i] = tab + 1;
    }
    return 1;
}

/* The row's run, or a message saying why it is skipped. */
static const char *check_row(run *r, char **fields) {
    char *end;
    if (!copy_name(r->id, fields[0]) || !copy_name(r->baseline, fields[3]) || !*fields[1] || !*fields[2] ||
        strlen(fields[1]) >= NAME_CAP || strlen(fields[2]) >= NAME_CAP)
        return "id, experiment, router and baseline must be 1.." NAME_CAP_TEXT " bytes";
    r->seed = strtol(fields[4], &end, 10);
    if (end == fields[4] || *end) return "the seed is not an integer";
    if (id_taken(r->id)) return "the id is taken by an earlier row";
    return NULL;
}

static void add_run(char **fields, source *from) {
    run *r = &runs[n_runs];
    const char *why;
    int e, router, slot, seed_index;
    memset(r, 0, sizeof *r);
    if ((why = check_row(r, fields)) != NULL) {
        complain(from, "%s; row skipped", why);
        return;
    }
    if ((e = experiment_of(fields[1], from)) < 0 || (router = router_of(fields[2], from)) < 0) return;
    if ((slot = slot_of(&experiments[e], router, r->baseline, from)) < 0) return;
    if ((seed_index = seed_of(&experiments[e], r->seed, from)) < 0) return;
    if (run_table[e][slot][seed_index]) {
        complain(from, "%s, %s, seed %ld is run %s already; row skipped", fields[1], fields[2], r->seed,
                 run_table[e][slot][seed_index]->id);
        return;
    }
    r->experiment = e, r->slot = slot, r->seed_index = seed_index;
    r->command = fields[5], r->throughput_step = -1;
    run_table[e][slot][seed_index] = r;
    n_runs++;
}

/* Each slot's baseline_slot from its baseline's name. */
static void link_baselines(void) {
    int e, s;
    for (e = 0; e < n_experiments; e++)
        for (s = 0; s < experiments[e].n_slots; s++) {
            router_slot *slot = &experiments[e].slots[s];
            int b;
            if (!strcmp(slot->baseline, "-")) continue;
            for (b = 0; b < experiments[e].n_slots && strcmp(router_name(&experiments[e], b), slot->baseline); b++)
                continue;
            if (b < experiments[e].n_slots && b != s) slot->baseline_slot = b;
            else
                fprintf(stderr,
                        PROGRAM ": %s: baseline %s of %s is no other router of the experiment; %s is compared "
                                "with nothing\n",
                        experiments[e].name, slot->baseline, router_names[slot->router], router_names[slot->router]);
        }
}

static char *read_manifest(const char *directory) {
    static char path[PATH_CAP];
    const char *why = NULL;
    char *text, *cursor, *row, *fields[6];
    source from;
    join_path(path, directory, "study.tsv", "");
    if (!(text = read_text(path, &why))) fail("%s: %s", path, why);
    from.path = path, from.line = 0, from.complaints = 0;
    for (cursor = text; (row = next_line(&cursor)) != NULL;) {
        if (++from.line == 1 || is_blank(row)) continue; /* the header */
        if (n_runs == MAX_RUNS) fail("%s:%ld: more than %d runs", path, from.line, MAX_RUNS);
        if (!split_row(row, fields))
            complain(&from, "expected 6 tab-separated fields (id experiment router baseline seed command)");
        else add_run(fields, &from);
    }
    complain_total(&from);
    if (n_runs == 0) fail("%s: no runs", path);
    link_baselines();
    return text;
}

static char *read_meta(const char *directory) {
    char path[PATH_CAP];
    const char *why = NULL;
    char *text, *cursor, *line;
    join_path(path, directory, "meta.txt", "");
    if (!(text = read_text(path, &why))) {
        fprintf(stderr, PROGRAM ": %s: %s\n", path, why);
        return NULL;
    }
    for (cursor = text; (line = next_line(&cursor)) != NULL;) {
        if (is_blank(line)) continue;
        if (n_meta == MAX_META) {
            fprintf(stderr, PROGRAM ": %s: more than %d lines; the rest left out\n", path, MAX_META);
            break;
        }
        meta_lines[n_meta++] = line;
    }
    return text;
}

/* The value of a meta.txt key, or NULL. */
static const char *meta_value(const char *key) {
    const size_t length = strlen(key);
    int i;
    for (i = 0; i < n_meta; i++)
        if (!strncmp(meta_lines[i], key, length) && meta_lines[i][length] == ':')
            return meta_lines[i] + length + 1 + strspn(meta_lines[i] + length + 1, " ");
    return NULL;
}

/* ---- what the runs hold: kind, layers and attacks of each experiment ---- */

static int compare_ints(const void *a, const void *b) {
    return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b);
}

static int compare_attack_points(const void *a, const void *b) {
    static const char *const order[] = {"clean", "noise", "fgsm", "pgd"};
    const attack_point *x = (const attack_point *)a, *y = (const attack_point *)b;
    int rank_x = 4, rank_y = 4, i;
    for (i = 0; i < 4; i++)
        rank_x = !strcmp(x->attack, order[i]) ? i : rank_x, rank_y = !strcmp(y->attack, order[i]) ? i : rank_y;
    if (rank_x != rank_y) return rank_x - rank_y;
    if (strcmp(x->attack, y->attack)) return strcmp(x->attack, y->attack);
    return (x->strength > y->strength) - (x->strength < y->strength);
}

static void note_layer(experiment *e, int layer) {
    int i;
    for (i = 0; i < e->n_layers; i++)
        if (e->layers[i] == layer) return;
    e->layers[e->n_layers++] = layer; /* at most MAX_LAYER: numbers are checked on reading */
}

static void note_attack_point(experiment *e, const record *item) {
    int i;
    for (i = 0; i < e->n_attack_points; i++)
        if (e->attack_points[i].strength == item->strength && !strcmp(e->attack_points[i].attack, item->tag)) return;
    if (e->n_attack_points == MAX_ATTACK_POINTS) {
        fprintf(stderr, PROGRAM ": %s: more than %d (attack, strength) points; %s %g left out\n", e->name,
                MAX_ATTACK_POINTS, item->tag, item->strength);
        return;
    }
    copy_name(e->attack_points[e->n_attack_points].attack, item->tag);
    e->attack_points[e->n_attack_points++].strength = item->strength;
}

static void survey_run(const run *r) {
    experiment *e = &experiments[r->experiment];
    int i;
    for (i = 0; i < r->events[EVENT_EVAL].count; i++) {
        const record *item = &r->events[EVENT_EVAL].items[i];
        e->has_accuracy |= isfinite(item->value[EVAL_ACCURACY]);
        e->has_corrupt |= isfinite(item->value[EVAL_RANDOM_BYTES]) || isfinite(item->value[EVAL_WORD_SWAP]);
    }
    e->has_accuracy |= r->events[EVENT_ROBUST].count > 0;
    if (!r->finished) return;
    for (i = 0; i < r->events[EVENT_LAYER].count; i++) note_layer(e, r->events[EVENT_LAYER].items[i].layer);
    for (i = 0; i < r->events[EVENT_ROBUST].count; i++) note_attack_point(e, &r->events[EVENT_ROBUST].items[i]);
}

static int compare_longs(const void *a, const void *b) {
    return (*(const long *)a > *(const long *)b) - (*(const long *)a < *(const long *)b);
}

/* Seeds in ascending order, the run table following them. */
static void sort_seeds(experiment *e) {
    run *by_seed[MAX_ROUTERS][MAX_SEEDS];
    long sorted[MAX_SEEDS];
    int s, i, j;
    memset(by_seed, 0, sizeof by_seed);
    memcpy(sorted, e->seeds, sizeof sorted);
    qsort(sorted, (size_t)e->n_seeds, sizeof sorted[0], compare_longs);
    for (s = 0; s < e->n_slots; s++)
        for (i = 0; i < e->n_seeds; i++) {
            for (j = 0; sorted[j] != e->seeds[i]; j++) continue;
            by_seed[s][j] = run_table[e->index][s][i];
            if (by_seed[s][j]) by_seed[s][j]->seed_index = j;
        }
    for (s = 0; s < e->n_slots; s++) memcpy(run_table[e->index][s], by_seed[s], sizeof by_seed[s]);
    memcpy(e->seeds, sorted, sizeof sorted);
}

static void read_runs(const char *directory) {
    char path[PATH_CAP];
    int i;
    for (i = 0; i < n_runs; i++) {
        join_path(path, directory, runs[i].id, ".done");
        runs[i].finished = file_exists(path);
        read_log(&runs[i], directory);
        survey_run(&runs[i]);
    }
    for (i = 0; i < n_experiments; i++) {
        experiment *e = &experiments[i];
        /* accuracy or attacks make it vision, corrupted text a language model; else the name
           says: lm-... for a language model */
        e->vision = e->has_accuracy || (!e->has_corrupt && strncmp(e->name, "lm", 2) != 0);
        qsort(experiments[i].layers, (size_t)experiments[i].n_layers, sizeof experiments[i].layers[0], compare_ints);
        qsort(experiments[i].attack_points, (size_t)experiments[i].n_attack_points,
              sizeof experiments[i].attack_points[0], compare_attack_points);
        sort_seeds(&experiments[i]);
    }
}

/* ---- values of a run ---- */

static const double bits_per_nat = 1.4426950408889634; /* 1 / ln 2 */

/* Bits per character from nats, or accuracy in percent. */
static double eval_value(const record *item, int field) {
    return field == EVAL_ACCURACY ? 100.0 * item->value[field] : item->value[field] * bits_per_nat;
}

/* The field at the last evaluation that has it. */
static double final_eval(const run *r, int field) {
    int i;
    for (i = r->events[EVENT_EVAL].count - 1; i >= 0; i--)
        if (isfinite(r->events[EVENT_EVAL].items[i].value[field]))
            return eval_value(&r->events[EVENT_EVAL].items[i], field);
    return NAN;
}

/* The first evaluation step at or past the target (below it when lower is better). */
static double steps_to_target(const run *r, int field, double target, int lower_is_better) {
    int i;
    for (i = 0; i < r->events[EVENT_EVAL].count; i++) {
        const double value = eval_value(&r->events[EVENT_EVAL].items[i], field);
        if (lower_is_better ? value <= target : value >= target) return (double)r->events[EVENT_EVAL].items[i].step;
    }
    return NAN;
}

/* Accuracy in percent under an attack at its last step. */
static double robust_value(const run *r, const char *attack, double strength) {
    int i;
    for (i = r->events[EVENT_ROBUST].count - 1; i >= 0; i--) {
        const record *item = &r->events[EVENT_ROBUST].items[i];
        if (item->strength == strength && !strcmp(item->tag, attack)) return 100.0 * item->value[0];
    }
    return NAN;
}

/* The records of a layer at the run's last layer step, or NULL. */
static const record *final_layer(const run *r, int layer) {
    const record_list *list = &r->events[EVENT_LAYER];
    int i;
    for (i = list->count - 1; i >= 0 && list->items[i].step == list->items[list->count - 1].step; i--)
        if (list->items[i].layer == layer) return &list->items[i];
    return NULL;
}

/* The last MoE layer's number, 0 for none. */
static int last_layer(const run *r) {
    int i, last = 0;
    for (i = 0; i < r->events[EVENT_LAYER].count; i++)
        last = r->events[EVENT_LAYER].items[i].layer > last ? r->events[EVENT_LAYER].items[i].layer : last;
    return last;
}

/* ---- measures: a number per run, and which way is better ---- */

enum { UNIT_BPC, UNIT_PERCENT, UNIT_STEPS, UNIT_RATIO, UNIT_COUNT, UNIT_BITS };
static const int unit_decimals[] = {3, 1, 0, 3, 1, 3};
static const char *const unit_suffix[] = {"", "%", "", "", "", ""};
static const char *const difference_suffix[] = {" bpc", " pp", " steps", "", "", " bits"};

enum { FROM_FINAL_EVAL, FROM_STEPS_TO_TARGET, FROM_ROBUST, FROM_ROBUST_MEAN, FROM_LAYERS };

typedef struct measure {
    int from, field, unit, lower_is_better;
    double target;              /* FROM_STEPS_TO_TARGET */
    const char *attack;         /* FROM_ROBUST(_MEAN) */
    double strength;            /* FROM_ROBUST */
    const experiment *attacked; /* FROM_ROBUST_MEAN: whose strengths of attack */
    unsigned long long layers;  /* FROM_LAYERS: bit L - 1 for layer L, averaged */
} measure;

static measure new_measure(int from, int field, int unit, int lower_is_better) {
    measure m;
    memset(&m, 0, sizeof m);
    m.from = from, m.field = field, m.unit = unit, m.lower_is_better = lower_is_better;
    return m;
}

static measure final_measure(const experiment *e, int field) {
    return new_measure(FROM_FINAL_EVAL, field, e->vision ? UNIT_PERCENT : UNIT_BPC, field != EVAL_ACCURACY);
}

static const int layer_units[LAYER_FIELDS] = {UNIT_RATIO, UNIT_RATIO, UNIT_RATIO, UNIT_RATIO,
                                              UNIT_COUNT, UNIT_RATIO, UNIT_BITS};

static measure layer_measure(int field, unsigned long long layers) {
    measure m = new_measure(FROM_LAYERS, field, layer_units[field], 1);
    m.layers = layers;
    return m;
}

/* Accuracy under the attack, the mean over its strengths above 0; NaN when one is missing. */
static double robust_mean(const run *r, const measure *m) {
    const experiment *e = m->attacked;
    double sum = 0.0;
    int i, count = 0;
    for (i = 0; i < e->n_attack_points; i++) {
        if (strcmp(e->attack_points[i].attack, m->attack) || e->attack_points[i].strength <= 0.0) continue;
        sum += robust_value(r, m->attack, e->attack_points[i].strength), count++;
    }
    return count ? sum / count : NAN;
}

/* The field's mean over the layers at the last layer step; NaN when a layer lacks it. */
static double layers_mean(const run *r, int field, unsigned long long layers) {
    double sum = 0.0;
    int layer, count = 0;
    for (layer = 1; layer <= MAX_LAYER; layer++) {
        const record *item;
        if (!(layers >> (layer - 1) & 1ULL)) continue;
        item = final_layer(r, layer);
        sum += item ? item->value[field] : NAN, count++;
    }
    return count ? sum / count : NAN;
}

static double measure_value(const run *r, const measure *m) {
    if (!r) return NAN;
    switch (m->from) {
    case FROM_FINAL_EVAL: return final_eval(r, m->field);
    case FROM_STEPS_TO_TARGET: return steps_to_target(r, m->field, m->target, m->lower_is_better);
    case FROM_ROBUST: return robust_value(r, m->attack, m->strength);
    case FROM_ROBUST_MEAN: return robust_mean(r, m);
    default: return layers_mean(r, m->field, m->layers);
    }
}

/* ---- statistics ---- */

typedef struct summary {
    int n;
    double mean, sd, low, high; /* sd: the sample's, NaN below two values */
} summary;

static summary summarise(const double *values, int count) {
    summary s;
    double squares = 0.0;
    int i;
    s.n = 0, s.mean = 0.0, s.low = INFINITY, s.high = -INFINITY;
    for (i = 0; i < count; i++)
        if (isfinite(values[i]))
            s.n++, s.mean += values[i], s.low = fmin(s.low, values[i]), s.high = fmax(s.high, values[i]);
    s.mean = s.n ? s.mean / s.n : NAN;
    for (i = 0; i < count; i++)
        if (isfinite(values[i])) squares += (values[i] - s.mean) * (values[i] - s.mean);
    s.sd = s.n > 1 ? sqrt(squares / (s.n - 1)) : NAN;
    if (!s.n) s.low = s.high = NAN;
    return s;
}

/* The measure of each seed's finished run of a slot (NaN for none). */
static void seed_values(const experiment *e, int slot, const measure *m, double *values) {
    int i;
    for (i = 0; i < e->n_seeds; i++) values[i] = measure_value(finished_run(e, slot, i), m);
}

static summary slot_summary(const experiment *e, int slot, const measure *m) {
    double values[MAX_SEEDS];
    seed_values(e, slot, m, values);
    return summarise(values, e->n_seeds);
}

enum { VERDICT_REPRODUCED, VERDICT_REVERSED, VERDICT_NOISE, VERDICT_ONE_SEED, VERDICT_NO_PAIRS, VERDICTS };
static const char *const verdict_names[VERDICTS] = {"reproduced", "reversed", "within noise", "one seed: no verdict",
                                                    "no paired seeds"};

/* Router minus baseline, seed by seed over the seeds both finished with a value. */
typedef struct paired {
    summary difference;
    int verdict;
} paired;

/* Student's t at 97.5 % for n - 1 degrees of freedom: the half-width of a two-sided 95 %
   interval in standard errors. */
static double t_quantile(int n) {
    static const double table[] = {12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262,
                                   2.228,  2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101};
    const int df = n - 1;
    return df <= (int)(sizeof table / sizeof table[0]) ? table[df - 1] : 1.96 + 2.4 / df;
}

static int verdict_of(summary d, int lower_is_better) {
    int exceeds;
    if (d.n == 0) return VERDICT_NO_PAIRS;
    if (d.n < 2) return VERDICT_ONE_SEED;
    exceeds = d.sd == 0.0 ? d.mean != 0.0 : fabs(d.mean) > t_quantile(d.n) * d.sd / sqrt((double)d.n);
    if (!exceeds) return VERDICT_NOISE;
    return (lower_is_better ? d.mean < 0.0 : d.mean > 0.0) ? VERDICT_REPRODUCED : VERDICT_REVERSED;
}

static paired compare(const experiment *e, int slot, int baseline_slot, const measure *m) {
    double router[MAX_SEEDS], baseline[MAX_SEEDS], differences[MAX_SEEDS];
    paired p;
    int i;
    seed_values(e, slot, m, router);
    seed_values(e, baseline_slot, m, baseline);
    for (i = 0; i < e->n_seeds; i++) differences[i] = router[i] - baseline[i]; /* NaN unless both */
    p.difference = summarise(differences, e->n_seeds);
    p.verdict = verdict_of(p.difference, m->lower_is_better);
    return p;
}

/* Whether a finished run of either slot has a value of the measure. */
static int has_data(const experiment *e, int slot, int baseline_slot, const measure *m) {
    return slot_summary(e, slot, m).n + slot_summary(e, baseline_slot, m).n > 0;
}

/* ---- text for the tables; each call returns one of a few rotating buffers ---- */

#define TEXT_CAP 2048

static char *scratch(void) {
    static char buffers[32][TEXT_CAP];
    static int next;
    next = (next + 1) % 32;
    buffers[next][0] = '\0';
    return buffers[next];
}

static void append(char *text, const char *format, ...) PRINTF_LIKE(2);
static void append(char *text, const char *format, ...) {
    const size_t used = strlen(text);
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(text + used, TEXT_CAP - used, format, arguments);
    va_end(arguments);
}

static const char *value_text(int unit, double value) {
    char *text = scratch();
    if (!isfinite(value)) return "-";
    append(text, "%.*f%s", unit_decimals[unit], value, unit_suffix[unit]);
    return text;
}

/* mean ± sd, the mean alone for one seed, "-" for none. */
static const char *summary_text(int unit, summary s) {
    char *text = scratch();
    if (s.n == 0) return "-";
    append(text, "%s", value_text(unit, s.mean));
    if (s.n > 1) append(text, " ± %.*f", unit_decimals[unit], s.sd);
    return text;
}

static const char *difference_text(int unit, summary d) {
    char *text = scratch();
    if (d.n == 0) return "-";
    append(text, "%+.*f%s (", unit_decimals[unit], d.mean, difference_suffix[unit]);
    if (d.n > 1) append(text, "sd %.*f, ", unit_decimals[unit], d.sd);
    append(text, "n %d)", d.n);
    return text;
}

/* "seed: value" of each finished seed; missing tells a finished run without the value. */
static const char *seeds_text(const experiment *e, int slot, const measure *m, const char *missing) {
    char *text = scratch();
    int i;
    for (i = 0; i < e->n_seeds; i++) {
        const run *r = finished_run(e, slot, i);
        const double value = measure_value(r, m);
        if (!r) continue;
        append(text, "%s%ld: ", *text ? ", " : "", e->seeds[i]);
        if (isfinite(value)) append(text, "%.*f%s", unit_decimals[m->unit], value, unit_suffix[m->unit]);
        else append(text, "%s", missing);
    }
    return *text ? text : "-";
}

/* Text for a markdown table cell: '|' escaped, line breaks as spaces. */
static const char *cell(const char *text) {
    char *out = scratch();
    size_t used = 0;
    for (; *text && used + 3 < TEXT_CAP; text++) {
        if (*text == '|') out[used++] = '\\';
        out[used++] = *text == '\n' ? ' ' : *text;
    }
    out[used] = '\0';
    return out;
}

static const char *attack_title(const char *attack) {
    if (!strcmp(attack, "noise")) return "Gaussian noise";
    if (!strcmp(attack, "fgsm")) return "FGSM";
    if (!strcmp(attack, "pgd")) return "PGD";
    return attack;
}

/* ---- convergence targets: the baseline's mean curve at fractions of its steps ---- */

typedef struct curve {
    int count;
    double *step, *mean, *low, *high; /* over the seeds, at each step any seed has */
} curve;

typedef struct step_value {
    double step, value;
} step_value;

static int by_step(const void *a, const void *b) {
    const double x = ((const step_value *)a)->step, y = ((const step_value *)b)->step;
    return (x > y) - (x < y);
}

/* The points of a run: an eval field, or a layer field of its last MoE layer. */
static int run_points(const run *r, int kind, int field, step_value *points) {
    const record_list *list = &r->events[kind];
    const int layer = kind == EVENT_LAYER ? last_layer(r) : 0;
    int i, count = 0;
    for (i = 0; i < list->count; i++) {
        const double value = kind == EVENT_EVAL ? eval_value(&list->items[i], field) : list->items[i].value[field];
        if (list->items[i].layer != layer || !isfinite(value)) continue;
        points[count].step = (double)list->items[i].step, points[count++].value = value;
    }
    return count;
}

static void curve_free(curve *c) {
    free(c->step), free(c->mean), free(c->low), free(c->high);
    memset(c, 0, sizeof *c);
}

/* The lowest, highest and mean value over the finished seeds at each step. */
static curve curve_of(const experiment *e, int slot, int kind, int field) {
    curve c;
    step_value *points;
    size_t capacity = 1;
    int i, count = 0, at = 0;
    memset(&c, 0, sizeof c);
    for (i = 0; i < e->n_seeds; i++)
        if (finished_run(e, slot, i)) capacity += (size_t)finished_run(e, slot, i)->events[kind].count;
    points = (step_value *)grow(NULL, capacity, sizeof *points);
    for (i = 0; i < e->n_seeds; i++)
        if (finished_run(e, slot, i)) count += run_points(finished_run(e, slot, i), kind, field, points + count);
    qsort(points, (size_t)count, sizeof *points, by_step);
    c.step = (double *)grow(NULL, capacity, sizeof(double)), c.mean = (double *)grow(NULL, capacity, sizeof(double));
    c.low = (double *)grow(NULL, capacity, sizeof(double)), c.high = (double *)grow(NULL, capacity, sizeof(double));
    while (at < count) {
        int seeds = 0;
        c.step[c.count] = points[at].step, c.mean[c.count] = 0.0, c.low[c.count] = c.high[c.count] = points[at].value;
        for (; at < count && points[at].step == c.step[c.count]; at++, seeds++) {
            c.mean[c.count] += points[at].value;
            c.low[c.count] = fmin(c.low[c.count], points[at].value),
            c.high[c.count] = fmax(c.high[c.count], points[at].value);
        }
        c.mean[c.count++] /= seeds;
    }
    free(points);
    return c;
}

/* The mean curve at a step, linear between evaluations, held beyond them. */
static double curve_at(const curve *c, double step) {
    int i;
    if (c->count == 0) return NAN;
    if (step <= c->step[0]) return c->mean[0];
    for (i = 1; i < c->count; i++)
        if (step <= c->step[i])
            return c->mean[i - 1] +
                   (c->mean[i] - c->mean[i - 1]) * (step - c->step[i - 1]) / (c->step[i] - c->step[i - 1]);
    return c->mean[c->count - 1];
}

/* The slot's steps: the most any finished seed logged. */
static long slot_steps(const experiment *e, int slot) {
    long most = 0;
    int i;
    for (i = 0; i < e->n_seeds; i++)
        if (finished_run(e, slot, i) && finished_run(e, slot, i)->last_step > most)
            most = finished_run(e, slot, i)->last_step;
    return most;
}

static const double target_fractions[3] = {0.25, 0.5, 0.75};
static const char *const fraction_names[3] = {"1/4", "1/2", "3/4"};

/* Clean bpc targets from the baseline's mean curve; 0 when it has none. */
static int convergence_targets(const experiment *e, int baseline_slot, double *targets) {
    curve c = curve_of(e, baseline_slot, EVENT_EVAL, EVAL_CLEAN);
    const long steps = slot_steps(e, baseline_slot);
    int i, found = c.count > 0;
    for (i = 0; i < 3; i++) targets[i] = curve_at(&c, target_fractions[i] * (double)steps);
    curve_free(&c);
    return found;
}

static measure convergence_measure(double target) {
    measure m = new_measure(FROM_STEPS_TO_TARGET, EVAL_CLEAN, UNIT_STEPS, 1);
    m.target = target;
    return m;
}

/* ---- layers a router changes: where its layer's router differs from the baseline's ---- */

/* The router logged for a layer by the slot's first finished seed that has it. */
static const char *layer_router(const experiment *e, int slot, int layer) {
    int i;
    for (i = 0; i < e->n_seeds; i++) {
        const record *item = finished_run(e, slot, i) ? final_layer(finished_run(e, slot, i), layer) : NULL;
        if (item) return item->tag;
    }
    return NULL;
}

/* The layers where slot's router differs from baseline_slot's; all shared ones when none does. */
static unsigned long long changed_layers(const experiment *e, int slot, int baseline_slot) {
    unsigned long long changed = 0, shared = 0;
    int i;
    for (i = 0; i < e->n_layers; i++) {
        const char *mine = layer_router(e, slot, e->layers[i]), *theirs = layer_router(e, baseline_slot, e->layers[i]);
        if (!mine || !theirs) continue;
        shared |= 1ULL << (e->layers[i] - 1);
        if (strcmp(mine, theirs)) changed |= 1ULL << (e->layers[i] - 1);
    }
    return changed ? changed : shared;
}

static const char *layers_text(unsigned long long layers) {
    char *text = scratch();
    int layer;
    for (layer = 1; layer <= MAX_LAYER; layer++)
        if (layers >> (layer - 1) & 1ULL) append(text, "%s%d", *text ? ", " : "", layer);
    return text;
}

/* ---- the claims ---- */

enum {
    CLAIM_CONVERGENCE,
    CLAIM_WORD_SWAP,
    CLAIM_RANDOM_BYTES,
    CLAIM_NOISE,
    CLAIM_FGSM,
    CLAIM_PGD,
    CLAIM_QUALITY,
    CLAIM_TIGHTNESS,
    CLAIMS
};
static const char *const claim_names[CLAIMS] = {
    "Faster convergence", "Robustness: word swap", "Robustness: random bytes", "Robustness: Gaussian noise",
    "Robustness: FGSM",   "Robustness: PGD",       "Better final quality",     "Tighter clusters"};

typedef struct claim_row {
    int claim;
    const experiment *where;
    int slot, baseline_slot, unit;
    char measure[TEXT_CAP]; /* what is compared, and both means */
    paired result;
} claim_row;

static claim_row claim_rows[MAX_CLAIM_ROWS];
static int n_claim_rows;

/* Routers the claims are about: AC and its variants (the name holds "AC"). */
static int is_ac_variant(const char *router) { return strstr(router, "AC") != NULL; }

static void add_claim(int claim, const experiment *e, int slot, const measure *m, const char *what) {
    const int baseline_slot = e->slots[slot].baseline_slot;
    claim_row *row;
    if (!has_data(e, slot, baseline_slot, m)) return;
    if (n_claim_rows == MAX_CLAIM_ROWS) fail("more than %d claim comparisons", MAX_CLAIM_ROWS);
    row = &claim_rows[n_claim_rows++];
    row->claim = claim, row->where = e, row->slot = slot, row->baseline_slot = baseline_slot, row->unit = m->unit;
    row->result = compare(e, slot, baseline_slot, m);
    snprintf(row->measure, sizeof row->measure, "%s: %s vs %s", what, summary_text(m->unit, slot_summary(e, slot, m)),
             summary_text(m->unit, slot_summary(e, baseline_slot, m)));
}

static void add_language_claims(const experiment *e, int slot) {
    const int baseline_slot = e->slots[slot].baseline_slot;
    double targets[3];
    measure m;
    char what[TEXT_CAP];
    if (convergence_targets(e, baseline_slot, targets)) {
        m = convergence_measure(targets[2]);
        snprintf(what, sizeof what, "steps to %.3f bpc (%s at 3/4 of %ld steps)", targets[2],
                 router_name(e, baseline_slot), slot_steps(e, baseline_slot));
        add_claim(CLAIM_CONVERGENCE, e, slot, &m, what);
    }
    m = final_measure(e, EVAL_WORD_SWAP), add_claim(CLAIM_WORD_SWAP, e, slot, &m, "word-swap bpc");
    m = final_measure(e, EVAL_RANDOM_BYTES), add_claim(CLAIM_RANDOM_BYTES, e, slot, &m, "random-byte bpc");
    m = final_measure(e, EVAL_CLEAN), add_claim(CLAIM_QUALITY, e, slot, &m, "clean bpc");
}

/* The strengths above 0 of an attack, as text. */
static const char *strengths_text(const experiment *e, const char *attack) {
    char *text = scratch();
    int i;
    for (i = 0; i < e->n_attack_points; i++)
        if (!strcmp(e->attack_points[i].attack, attack) && e->attack_points[i].strength > 0.0)
            append(text, "%s%g", *text ? ", " : "", e->attack_points[i].strength);
    return text;
}

static void add_vision_claims(const experiment *e, int slot) {
    static const char *const attacks[3] = {"noise", "fgsm", "pgd"};
    static const int claims[3] = {CLAIM_NOISE, CLAIM_FGSM, CLAIM_PGD};
    measure m;
    char what[TEXT_CAP];
    int i;
    for (i = 0; i < 3; i++) {
        if (!*strengths_text(e, attacks[i])) continue;
        m = new_measure(FROM_ROBUST_MEAN, 0, UNIT_PERCENT, 0);
        m.attack = attacks[i], m.attacked = e;
        snprintf(what, sizeof what, "accuracy, mean over strengths %s", strengths_text(e, attacks[i]));
        add_claim(claims[i], e, slot, &m, what);
    }
    m = final_measure(e, EVAL_ACCURACY), add_claim(CLAIM_QUALITY, e, slot, &m, "clean accuracy");
}

static void add_tightness_claims(const experiment *e, int slot) {
    const unsigned long long layers = changed_layers(e, slot, e->slots[slot].baseline_slot);
    measure m;
    char what[TEXT_CAP];
    if (!layers) return;
    m = layer_measure(LAYER_TIGHTNESS_PLAIN, layers);
    snprintf(what, sizeof what, "plain tightness, layer %s", layers_text(layers));
    add_claim(CLAIM_TIGHTNESS, e, slot, &m, what);
    m = layer_measure(LAYER_TIGHTNESS_AC, layers);
    snprintf(what, sizeof what, "AC-weighted tightness, layer %s", layers_text(layers));
    add_claim(CLAIM_TIGHTNESS, e, slot, &m, what);
}

static void collect_claims(void) {
    int e, s;
    for (e = 0; e < n_experiments; e++)
        for (s = 0; s < experiments[e].n_slots; s++) {
            if (experiments[e].slots[s].baseline_slot < 0 || !is_ac_variant(router_name(&experiments[e], s))) continue;
            if (experiments[e].vision) add_vision_claims(&experiments[e], s);
            else add_language_claims(&experiments[e], s);
            add_tightness_claims(&experiments[e], s);
        }
}

static void write_claims_table(FILE *out) {
    int claim, i;
    fputs("| Claim | Experiment | Comparison | Measure: router vs baseline | Difference (sd, n) | Verdict |\n"
          "|---|---|---|---|---|---|\n",
          out);
    for (claim = 0; claim < CLAIMS; claim++)
        for (i = 0; i < n_claim_rows; i++) {
            const claim_row *row = &claim_rows[i];
            if (row->claim != claim) continue;
            fprintf(out, "| %s | %s | ", claim_names[claim], cell(row->where->name));
            fprintf(out, "%s vs %s | ", cell(router_name(row->where, row->slot)),
                    cell(router_name(row->where, row->baseline_slot)));
            fprintf(out, "%s | %s | %s |\n", cell(row->measure), difference_text(row->unit, row->result.difference),
                    verdict_names[row->result.verdict]);
        }
    if (n_claim_rows == 0) fputs("| (no AC router with a baseline and finished runs) | | | | | |\n", out);
}

static void claim_counts(int claim, int counts[VERDICTS], int *total) {
    int i;
    for (i = 0; i < VERDICTS; i++) counts[i] = 0;
    *total = 0;
    for (i = 0; i < n_claim_rows; i++)
        if (claim_rows[i].claim == claim) counts[claim_rows[i].result.verdict]++, ++*total;
}

/* The claims grouped by how they fared: reproduced in most comparisons, in some, in none,
   and reversed (the AC router worse beyond noise) in at least one. */
static void write_plain_verdict(FILE *out) {
    static const char *groups[4] = {"Reproduced in most of its comparisons", "Reproduced in some",
                                    "Reproduced in none", "Reversed in at least one comparison"};
    int group, claim;
    if (!n_claim_rows) return;
    fputs("In short, at this scale:\n\n", out);
    for (group = 0; group < 4; group++) {
        int listed = 0;
        fprintf(out, "- %s: ", groups[group]);
        for (claim = 0; claim < CLAIMS; claim++) {
            int counts[VERDICTS], total, reproduced, member;
            claim_counts(claim, counts, &total);
            reproduced = counts[VERDICT_REPRODUCED];
            if (!total) continue;
            member = group == 0   ? 2 * reproduced > total
                     : group == 1 ? reproduced > 0 && 2 * reproduced <= total
                     : group == 2 ? reproduced == 0
                                  : counts[VERDICT_REVERSED] > 0;
            if (!member) continue;
            fprintf(out, "%s%s (%d of %d)", listed++ ? "; " : "", claim_names[claim],
                    group == 3 ? counts[VERDICT_REVERSED] : reproduced, total);
        }
        fputs(listed ? ".\n" : "none.\n", out);
    }
}

static void write_claim_summaries(FILE *out) {
    int claim;
    for (claim = 0; claim < CLAIMS; claim++) {
        int counts[VERDICTS], total;
        claim_counts(claim, counts, &total);
        fprintf(out, "- **%s**: ", claim_names[claim]);
        if (!total) {
            fputs("no comparison in this study.\n", out);
            continue;
        }
        fprintf(out, "reproduced in %d of %d comparison%s", counts[VERDICT_REPRODUCED], total, total == 1 ? "" : "s");
        fprintf(out, " (reversed in %d, within noise in %d, without a verdict in %d).\n", counts[VERDICT_REVERSED],
                counts[VERDICT_NOISE], counts[VERDICT_ONE_SEED] + counts[VERDICT_NO_PAIRS]);
    }
}

/* Per claim: how many comparisons reproduce it, reverse it or stay within noise, and
   where it reproduced: the README's table. */
static void write_headline(FILE *out) {
    int claim, i;
    fputs("| Claim | Comparisons | Reproduced | Reversed | Within noise | No verdict | Reproduced in |\n"
          "|---|---|---|---|---|---|---|\n",
          out);
    for (claim = 0; claim < CLAIMS; claim++) {
        int counts[VERDICTS], total, listed = 0;
        claim_counts(claim, counts, &total);
        if (!total) continue;
        fprintf(out, "| %s | %d | %d | %d | %d | %d | ", claim_names[claim], total, counts[VERDICT_REPRODUCED],
                counts[VERDICT_REVERSED], counts[VERDICT_NOISE], counts[VERDICT_ONE_SEED] + counts[VERDICT_NO_PAIRS]);
        for (i = 0; i < n_claim_rows; i++) {
            const claim_row *row = &claim_rows[i];
            if (row->claim != claim || row->result.verdict != VERDICT_REPRODUCED) continue;
            fprintf(out, "%s%s: %s vs %s", listed++ ? "; " : "", cell(row->where->name),
                    cell(router_name(row->where, row->slot)), cell(router_name(row->where, row->baseline_slot)));
        }
        fputs(listed ? " |\n" : "- |\n", out);
    }
    if (n_claim_rows == 0) fputs("| (no AC router with a baseline and finished runs) | | | | | | |\n", out);
}

/* ---- plots ---- */

#define PLOT_TOP 56
#define PLOT_LEFT 80
#define LEGEND_MAX (MAX_ROUTERS + 1)

typedef struct legend {
    int count;
    const char *names[LEGEND_MAX], *colors[LEGEND_MAX];
    char texts[LEGEND_MAX][NAME_CAP + 32];
} legend;

static void legend_add(legend *l, const char *name, const char *color) {
    if (l->count == LEGEND_MAX) return;
    snprintf(l->texts[l->count], sizeof l->texts[l->count], "%s", name);
    l->names[l->count] = l->texts[l->count], l->colors[l->count++] = color;
}

static double legend_width(const legend *l) { return l->count ? svg_legend_width(l->names, l->count) : 0.0; }

static const char *slot_color(const experiment *e, int slot) { return svg_color(e->slots[slot].router); }

static FILE *open_plot(const char *out_dir, const experiment *e, const char *kind, char *link) {
    char path[PATH_CAP], name[NAME_CAP + 32];
    FILE *out;
    snprintf(name, sizeof name, "study/%s-%s.svg", e->file_stem, kind);
    join_path(path, out_dir, name, "");
    if (!(out = fopen(path, "w"))) fail("%s: %s", path, strerror(errno));
    strcpy(link, name);
    return out;
}

static void close_plot(FILE *out, const char *link) {
    if (ferror(out) | fclose(out)) fail("%s: could not be written", link);
}

static void draw_title(FILE *out, const char *title, const char *subtitle) {
    svg_text(out, PLOT_LEFT, 22, "start", "font-weight='bold' font-size='14'", title);
    if (subtitle) svg_text(out, PLOT_LEFT, 40, "start", "fill='#555'", subtitle);
}

/* Curves: the band from the lowest to the highest seed and the mean line per router. */
static int plot_curves(const char *out_dir, const experiment *e, char *link) {
    const int field = e->vision ? EVAL_ACCURACY : EVAL_CLEAN;
    curve curves[MAX_ROUTERS];
    legend l;
    svg_axes axes;
    FILE *out;
    int s, i, drawn = 0, clipped = 0;
    long steps = 0;
    memset(&l, 0, sizeof l);
    for (s = 0; s < e->n_slots; s++) {
        curves[s] = curve_of(e, s, EVENT_EVAL, field);
        if (curves[s].count) legend_add(&l, router_name(e, s), slot_color(e, s)), drawn++;
        steps = curves[s].count && (long)curves[s].step[curves[s].count - 1] > steps
                    ? (long)curves[s].step[curves[s].count - 1]
                    : steps;
    }
    axes = svg_axes_at(PLOT_LEFT, PLOT_TOP, 860 - PLOT_LEFT - legend_width(&l) - 30, 330);
    for (s = 0; s < e->n_slots; s++)
        for (i = 0; i < curves[s].count; i++) {
            const int early = !e->vision && curves[s].step[i] < 0.1 * (double)steps && i + 1 < curves[s].count;
            svg_axes_include(&axes, curves[s].step[i], early ? NAN : curves[s].low[i]);
            svg_axes_include(&axes, curves[s].step[i], early ? NAN : curves[s].high[i]);
            clipped |= early;
        }
    if (drawn) {
        svg_axes_pad(&axes, 0.05);
        out = open_plot(out_dir, e, "curves", link);
        svg_begin(out, 860, 450);
        draw_title(
            out, e->vision ? "Test accuracy over training" : "Held-out clean bits per character over training",
            clipped
                ? "band: lowest to highest seed; line: mean over seeds; the first 10% of steps may run above the frame"
                : "band: lowest to highest seed; line: mean over seeds");
        svg_draw_axes(out, &axes, "step", e->vision ? "accuracy (%)" : "bits per character", 1);
        svg_clip_begin(out, &axes, "curves");
        for (s = 0; s < e->n_slots; s++)
            svg_band(out, &axes, curves[s].step, curves[s].low, curves[s].high, curves[s].count, slot_color(e, s),
                     0.18);
        for (s = 0; s < e->n_slots; s++)
            svg_polyline(out, &axes, curves[s].step, curves[s].mean, curves[s].count, slot_color(e, s), NULL);
        svg_clip_end(out);
        svg_legend(out, 850, PLOT_TOP, l.names, l.colors, NULL, l.count);
        svg_end(out);
        close_plot(out, link);
    }
    for (s = 0; s < e->n_slots; s++) curve_free(&curves[s]);
    return drawn > 0;
}

/* Bars: per group (an input or a layer) one bar per router with its seeds' range. */
typedef struct bar_chart {
    int groups, routers;
    const char *group_names[MAX_LAYER];
    summary values[MAX_LAYER][MAX_ROUTERS];
    const char *colors[MAX_ROUTERS];
} bar_chart;

static void draw_bars(FILE *out, const svg_axes *axes, const bar_chart *chart) {
    const double group_width = (axes->right - axes->left) / (chart->groups > 0 ? chart->groups : 1);
    const double bar = fmin(24.0, 0.8 * group_width / (chart->routers > 0 ? chart->routers : 1));
    int g, r;
    svg_category_ticks(out, axes, chart->group_names, chart->groups);
    for (g = 0; g < chart->groups; g++)
        for (r = 0; r < chart->routers; r++) {
            const summary *v = &chart->values[g][r];
            const double offset = (r - 0.5 * (chart->routers - 1)) * bar;
            if (!v->n) continue;
            svg_bar(out, axes, g, offset, 0.9 * bar, v->mean, chart->colors[r]);
            svg_error_bar(out, axes, g, offset, v->low, v->high, "#222");
        }
}

/* Axes over the bars' ranges; from 0 unless from_zero is 0. */
static svg_axes bar_axes(const bar_chart *chart, double left, double top, double width, double height, int from_zero) {
    svg_axes axes = svg_axes_at(left, top, width, height);
    int g, r;
    svg_axes_include(&axes, -0.5, from_zero ? 0.0 : NAN);
    svg_axes_include(&axes, chart->groups - 0.5, NAN);
    for (g = 0; g < chart->groups; g++)
        for (r = 0; r < chart->routers; r++)
            if (chart->values[g][r].n) {
                svg_axes_include(&axes, g, chart->values[g][r].low);
                svg_axes_include(&axes, g, chart->values[g][r].high);
            }
    svg_axes_pad(&axes, 0.08);
    if (from_zero && axes.y_min < 0.0 && chart->groups) axes.y_min = 0.0;
    return axes;
}

static int plot_language_robustness(const char *out_dir, const experiment *e, char *link) {
    static const int fields[3] = {EVAL_CLEAN, EVAL_RANDOM_BYTES, EVAL_WORD_SWAP};
    static const char *const names[3] = {"clean", "random bytes", "word swap"};
    static bar_chart chart;
    legend l;
    svg_axes axes;
    FILE *out;
    int i, s, any = 0;
    memset(&chart, 0, sizeof chart), memset(&l, 0, sizeof l);
    chart.routers = e->n_slots;
    for (i = 0; i < 3; i++) {
        measure m = final_measure(e, fields[i]);
        int present = 0;
        for (s = 0; s < e->n_slots; s++)
            chart.values[chart.groups][s] = slot_summary(e, s, &m), present |= chart.values[chart.groups][s].n > 0;
        if (present) chart.group_names[chart.groups++] = names[i], any |= i > 0;
    }
    if (!any) return 0;
    for (s = 0; s < e->n_slots; s++)
        chart.colors[s] = slot_color(e, s), legend_add(&l, router_name(e, s), slot_color(e, s));
    axes = bar_axes(&chart, PLOT_LEFT, PLOT_TOP, 860 - PLOT_LEFT - legend_width(&l) - 30, 330, 0);
    out = open_plot(out_dir, e, "robustness", link);
    svg_begin(out, 860, 450);
    draw_title(out, "Final held-out bits per character by input (lower is better)",
               "bar: mean over seeds; whisker: lowest to highest seed; the axis does not start at 0");
    svg_draw_axes(out, &axes, NULL, "bits per character", 0);
    draw_bars(out, &axes, &chart);
    svg_legend(out, 850, PLOT_TOP, l.names, l.colors, NULL, l.count);
    svg_end(out);
    close_plot(out, link);
    return 1;
}

/* The attacks of an experiment other than clean, in order; a panel each, at most 8. */
static int attack_kinds(const experiment *e, const char **kinds) {
    int i, count = 0;
    for (i = 0; i < e->n_attack_points; i++)
        if (strcmp(e->attack_points[i].attack, "clean") &&
            (count == 0 || strcmp(kinds[count - 1], e->attack_points[i].attack)))
            if (count < 8) kinds[count++] = e->attack_points[i].attack;
    return count;
}

/* One router's accuracy against strength under an attack, clean accuracy at strength 0. */
static int attack_series(const experiment *e, int slot, const char *attack, double *strength, summary *values) {
    int i, count = 0;
    for (i = 0; i < e->n_attack_points; i++) {
        const attack_point *point = &e->attack_points[i];
        measure m = new_measure(FROM_ROBUST, 0, UNIT_PERCENT, 0);
        const int clean = !strcmp(point->attack, "clean");
        if (!clean && strcmp(point->attack, attack)) continue;
        if (clean && (count > 0 || point->strength != 0.0)) continue;
        m.attack = point->attack, m.strength = point->strength;
        strength[count] = point->strength, values[count++] = slot_summary(e, slot, &m);
    }
    return count;
}

static void draw_attack_panel(FILE *out, const experiment *e, const char *attack, const svg_axes *y_range, double left,
                              double width, int first) {
    double strength[MAX_ATTACK_POINTS], mean[MAX_ATTACK_POINTS];
    summary values[MAX_ATTACK_POINTS];
    svg_axes axes = svg_axes_at(left, PLOT_TOP + 16, width, 300);
    int s, i, count;
    for (s = 0; s < e->n_slots; s++)
        for (i = 0, count = attack_series(e, s, attack, strength, values); i < count; i++)
            svg_axes_include(&axes, strength[i], NAN);
    axes.y_min = y_range->y_min, axes.y_max = y_range->y_max;
    svg_axes_pad(&axes, 0.0);
    axes.x_min -= 0.04 * (axes.x_max - axes.x_min), axes.x_max += 0.04 * (axes.x_max - axes.x_min);
    svg_text(out, 0.5 * (axes.left + axes.right), PLOT_TOP + 10, "middle", "font-weight='bold'", attack_title(attack));
    svg_draw_axes(out, &axes, "strength", first ? "accuracy (%)" : NULL, 0);
    for (s = 0; s < e->n_slots; s++) {
        const double offset = (s - 0.5 * (e->n_slots - 1)) * 3.0;
        count = attack_series(e, s, attack, strength, values);
        for (i = 0; i < count; i++) mean[i] = values[i].n ? values[i].mean : NAN;
        svg_polyline(out, &axes, strength, mean, count, slot_color(e, s), NULL);
        for (i = 0; i < count; i++)
            if (values[i].n)
                svg_error_bar(out, &axes, strength[i], offset, values[i].low, values[i].high, slot_color(e, s));
    }
}

static int plot_vision_robustness(const char *out_dir, const experiment *e, char *link) {
    const char *kinds[8];
    const int n_kinds = attack_kinds(e, kinds);
    double strength[MAX_ATTACK_POINTS], panel_width;
    summary values[MAX_ATTACK_POINTS];
    svg_axes y_range = svg_axes_at(0, 0, 1, 1);
    legend l;
    FILE *out;
    int k, s, i, count;
    if (!n_kinds) return 0;
    memset(&l, 0, sizeof l);
    for (s = 0; s < e->n_slots; s++) legend_add(&l, router_name(e, s), slot_color(e, s));
    for (k = 0; k < n_kinds; k++)
        for (s = 0; s < e->n_slots; s++)
            for (i = 0, count = attack_series(e, s, kinds[k], strength, values); i < count; i++)
                if (values[i].n) {
                    svg_axes_include(&y_range, 0.0, values[i].low);
                    svg_axes_include(&y_range, 0.0, values[i].high);
                }
    svg_axes_pad(&y_range, 0.06);
    panel_width = (1000 - PLOT_LEFT - legend_width(&l) - 30 - 40.0 * (n_kinds - 1)) / n_kinds;
    out = open_plot(out_dir, e, "robustness", link);
    svg_begin(out, 1000, 450);
    draw_title(out, "Test accuracy under attack against its strength (higher is better)",
               "line: mean over seeds; bars: lowest to highest seed; strength 0 is the clean test set");
    for (k = 0; k < n_kinds; k++)
        draw_attack_panel(out, e, kinds[k], &y_range, PLOT_LEFT + k * (panel_width + 40.0), panel_width, k == 0);
    svg_legend(out, 990, PLOT_TOP + 16, l.names, l.colors, NULL, l.count);
    svg_end(out);
    close_plot(out, link);
    return 1;
}

/* Load imbalance and router stability of each router's last MoE layer over training. */
static int plot_routing(const char *out_dir, const experiment *e, char *link) {
    static const int fields[2] = {LAYER_IMBALANCE, LAYER_STABILITY};
    static const char *const titles[2] = {"load imbalance (max / mean)", "router stability"};
    curve curves[2][MAX_ROUTERS];
    legend l;
    FILE *out = NULL;
    int p, s, drawn = 0;
    memset(&l, 0, sizeof l);
    for (s = 0; s < e->n_slots; s++) {
        char name[NAME_CAP + 32];
        int i, layer = 0;
        for (i = 0; i < e->n_seeds && !layer; i++)
            layer = finished_run(e, s, i) ? last_layer(finished_run(e, s, i)) : 0;
        for (p = 0; p < 2; p++) curves[p][s] = curve_of(e, s, EVENT_LAYER, fields[p]);
        if (!curves[0][s].count && !curves[1][s].count) continue;
        snprintf(name, sizeof name, "%s (layer %d)", router_name(e, s), layer);
        legend_add(&l, name, slot_color(e, s)), drawn++;
    }
    for (p = 0; p < 2 && drawn; p++) {
        svg_axes axes = svg_axes_at(PLOT_LEFT, PLOT_TOP + 16 + p * 250, 860 - PLOT_LEFT - legend_width(&l) - 30, 190);
        int i;
        for (s = 0; s < e->n_slots; s++)
            for (i = 0; i < curves[p][s].count; i++)
                svg_axes_include(&axes, curves[p][s].step[i], curves[p][s].mean[i]);
        svg_axes_pad(&axes, 0.06);
        if (!out) {
            out = open_plot(out_dir, e, "routing", link);
            svg_begin(out, 860, 560);
            draw_title(out, "Routing over training: each router's last MoE layer, mean over seeds", NULL);
        }
        svg_text(out, axes.left, axes.top - 6, "start", "font-weight='bold'", titles[p]);
        svg_draw_axes(out, &axes, "step", NULL, 1);
        for (s = 0; s < e->n_slots; s++)
            svg_polyline(out, &axes, curves[p][s].step, curves[p][s].mean, curves[p][s].count, slot_color(e, s), NULL);
    }
    if (out) {
        svg_legend(out, 850, PLOT_TOP + 16, l.names, l.colors, NULL, l.count);
        svg_end(out);
        close_plot(out, link);
    }
    for (p = 0; p < 2; p++)
        for (s = 0; s < e->n_slots; s++) curve_free(&curves[p][s]);
    return drawn > 0;
}

/* Tightness per layer: bars per router, plain and AC-weighted side by side. */
static int plot_tightness(const char *out_dir, const experiment *e, char *link) {
    static const int fields[2] = {LAYER_TIGHTNESS_PLAIN, LAYER_TIGHTNESS_AC};
    static const char *const titles[2] = {"plain (lower is tighter)", "AC-weighted (lower is tighter)"};
    static bar_chart charts[2];
    static char group_names[MAX_LAYER][24];
    legend l;
    FILE *out;
    int p, s, i, any = 0;
    memset(&l, 0, sizeof l);
    for (p = 0; p < 2; p++) {
        memset(&charts[p], 0, sizeof charts[p]);
        charts[p].routers = e->n_slots;
        for (i = 0; i < e->n_layers; i++) {
            const measure m = layer_measure(fields[p], 1ULL << (e->layers[i] - 1));
            snprintf(group_names[i], sizeof group_names[i], "layer %d", e->layers[i]);
            charts[p].group_names[i] = group_names[i];
            for (s = 0; s < e->n_slots; s++)
                charts[p].values[i][s] = slot_summary(e, s, &m), any |= charts[p].values[i][s].n > 0;
        }
        charts[p].groups = e->n_layers;
        for (s = 0; s < e->n_slots; s++) charts[p].colors[s] = slot_color(e, s);
    }
    if (!any) return 0;
    for (s = 0; s < e->n_slots; s++) legend_add(&l, router_name(e, s), slot_color(e, s));
    out = open_plot(out_dir, e, "tightness", link);
    svg_begin(out, 1000, 450);
    draw_title(out, "Cluster tightness per MoE layer at the last evaluation",
               "bar: mean over seeds; whisker: lowest to highest seed");
    for (p = 0; p < 2; p++) {
        const double width = (1000 - PLOT_LEFT - legend_width(&l) - 30 - 60) / 2.0;
        const svg_axes axes = bar_axes(&charts[p], PLOT_LEFT + p * (width + 60), PLOT_TOP + 16, width, 300, 1);
        svg_text(out, 0.5 * (axes.left + axes.right), PLOT_TOP + 10, "middle", "font-weight='bold'", titles[p]);
        svg_draw_axes(out, &axes, NULL, p == 0 ? "tightness ratio" : NULL, 0);
        draw_bars(out, &axes, &charts[p]);
    }
    svg_legend(out, 990, PLOT_TOP + 16, l.names, l.colors, NULL, l.count);
    svg_end(out);
    close_plot(out, link);
    return 1;
}

/* ---- results.md: the sections of an experiment ---- */

static int finished_count(const experiment *e, int slot) {
    int i, count = 0;
    for (i = 0; i < e->n_seeds; i++) count += finished_run(e, slot, i) != NULL;
    return count;
}

static void write_setup(FILE *md, const experiment *e) {
    int i, others = 0, unfinished = 0;
    fprintf(md, "### Setup\n\nThe commands of seed %ld:\n\n```sh\n", e->seeds[0]);
    for (i = 0; i < n_runs; i++)
        if (runs[i].experiment == e->index && runs[i].seed_index == 0) fprintf(md, "%s\n", runs[i].command);
    fputs("```\n\n", md);
    for (i = 0; i < n_runs; i++) others += runs[i].experiment == e->index && runs[i].seed_index != 0;
    if (others) {
        fputs("<details><summary>The commands of the other seeds</summary>\n\n```sh\n", md);
        for (i = 0; i < n_runs; i++)
            if (runs[i].experiment == e->index && runs[i].seed_index != 0) fprintf(md, "%s\n", runs[i].command);
        fputs("```\n\n</details>\n\n", md);
    }
    for (i = 0; i < n_runs; i++)
        if (runs[i].experiment == e->index && !runs[i].finished)
            fprintf(md, "%s%s (%s, seed %ld)",
                    unfinished++ ? ", " : "Not finished (left out of the tables and plots): ", runs[i].id,
                    router_names[e->slots[runs[i].slot].router], runs[i].seed);
    if (unfinished) fputs(".\n\n", md);
}

/* A slot's comparison with its baseline as two cells: difference and verdict. */
static const char *comparison_cells(const experiment *e, int slot, const measure *m) {
    char *text = scratch();
    paired p;
    if (e->slots[slot].baseline_slot < 0) return "- | -";
    p = compare(e, slot, e->slots[slot].baseline_slot, m);
    append(text, "%s | %s", difference_text(m->unit, p.difference), verdict_names[p.verdict]);
    return text;
}

static const char *baseline_cell(const experiment *e, int slot) {
    return e->slots[slot].baseline_slot >= 0 ? cell(router_name(e, e->slots[slot].baseline_slot)) : "-";
}

static double mean_throughput(const experiment *e, int slot) {
    double values[MAX_SEEDS];
    int i;
    for (i = 0; i < e->n_seeds; i++) {
        const run *r = finished_run(e, slot, i);
        values[i] = r && r->throughput_count ? r->throughput_sum / r->throughput_count : NAN;
    }
    return summarise(values, e->n_seeds).mean;
}

static void write_final_quality(FILE *md, const experiment *e) {
    const measure m = final_measure(e, e->vision ? EVAL_ACCURACY : EVAL_CLEAN);
    int s;
    fprintf(md,
            "### Final quality\n\n%s at the last evaluation; mean ± sample sd over the finished seeds; difference: "
            "router − baseline, paired by seed.\n\n",
            e->vision ? "Test accuracy" : "Held-out clean bits per character");
    fprintf(md, "| Router | Baseline | Seeds | %s | Per seed | Difference (sd, n) | Verdict | Steps | Tokens/s |\n",
            e->vision ? "Accuracy" : "Clean bpc");
    fputs("|---|---|---:|---:|---|---|---|---:|---:|\n", md);
    for (s = 0; s < e->n_slots; s++) {
        const double throughput = mean_throughput(e, s);
        fprintf(md, "| %s | %s | %d | %s | %s | %s | %ld | ", cell(router_name(e, s)), baseline_cell(e, s),
                finished_count(e, s), summary_text(m.unit, slot_summary(e, s, &m)), seeds_text(e, s, &m, "-"),
                comparison_cells(e, s, &m), slot_steps(e, s));
        if (isfinite(throughput)) fprintf(md, "%.0f |\n", throughput);
        else fputs("- |\n", md);
    }
    fputs("\n", md);
}

static void write_convergence_rows(FILE *md, const experiment *e, int baseline_slot, const double *targets) {
    int t, s;
    for (t = 0; t < 3; t++)
        for (s = 0; s < e->n_slots; s++) {
            const measure m = convergence_measure(targets[t]);
            summary steps;
            if (s != baseline_slot && e->slots[s].baseline_slot != baseline_slot) continue;
            steps = slot_summary(e, s, &m);
            fprintf(md, "| %.3f (%s) | %s | %s", targets[t], fraction_names[t], cell(router_name(e, s)),
                    value_text(UNIT_STEPS, steps.mean));
            if (steps.n < finished_count(e, s)) fprintf(md, " (%d of %d reached)", steps.n, finished_count(e, s));
            fprintf(md, " | %s | %s |\n", seeds_text(e, s, &m, "not reached"),
                    s == baseline_slot ? "- | -" : comparison_cells(e, s, &m));
        }
}

static void write_convergence(FILE *md, const experiment *e) {
    int b, s, written = 0;
    for (b = 0; b < e->n_slots; b++) {
        double targets[3];
        int compared = 0;
        for (s = 0; s < e->n_slots; s++) compared |= e->slots[s].baseline_slot == b;
        if (!compared || !convergence_targets(e, b, targets)) continue;
        if (!written++) fputs("### Convergence\n\n", md);
        fprintf(md,
                "Targets: %s's mean held-out clean bpc at 1/4, 1/2 and 3/4 of its %ld steps (%.3f, %.3f, %.3f bpc). "
                "Steps: the first evaluation at or below the target, mean over the seeds that reach it; difference "
                "over the seeds where both reach it (fewer steps favour the router).\n\n",
                cell(router_name(e, b)), slot_steps(e, b), targets[0], targets[1], targets[2]);
        fputs("| Target bpc | Router | Steps | Per seed | Difference (sd, n) | Verdict |\n|---|---|---:|---|---|---|\n",
              md);
        write_convergence_rows(md, e, b, targets);
        fputs("\n", md);
    }
}

static void write_language_robustness(FILE *md, const experiment *e) {
    static const int fields[2] = {EVAL_RANDOM_BYTES, EVAL_WORD_SWAP};
    static const char *const inputs[2] = {"random bytes damaged", "word swap"};
    int i, s, any = 0;
    for (i = 0; i < 2; i++) {
        const measure m = final_measure(e, fields[i]);
        for (s = 0; s < e->n_slots; s++) {
            if (!slot_summary(e, s, &m).n) continue;
            if (!any++)
                fputs("### Robustness\n\nHeld-out bits per character of corrupted text at the last evaluation "
                      "(lower is better).\n\n| Input | Router | bpc | Per seed | Difference (sd, n) | Verdict |\n"
                      "|---|---|---:|---|---|---|\n",
                      md);
            fprintf(md, "| %s | %s | %s | %s | %s |\n", inputs[i], cell(router_name(e, s)),
                    summary_text(m.unit, slot_summary(e, s, &m)), seeds_text(e, s, &m, "-"),
                    comparison_cells(e, s, &m));
        }
    }
    if (any) fputs("\n", md);
}

static void write_vision_robustness(FILE *md, const experiment *e) {
    int i, s;
    if (!e->n_attack_points) return;
    fputs("### Robustness\n\nTest accuracy under each attack after training (higher is better).\n\n"
          "| Attack | Strength | Router | Accuracy | Per seed | Difference (sd, n) | Verdict "
          "|\n|---|---:|---|---:|---|---|---|\n",
          md);
    for (i = 0; i < e->n_attack_points; i++)
        for (s = 0; s < e->n_slots; s++) {
            measure m = new_measure(FROM_ROBUST, 0, UNIT_PERCENT, 0);
            m.attack = e->attack_points[i].attack, m.strength = e->attack_points[i].strength;
            if (!slot_summary(e, s, &m).n) continue;
            fprintf(md, "| %s | %g | %s | %s | %s | %s |\n", cell(attack_title(m.attack)), m.strength,
                    cell(router_name(e, s)), summary_text(m.unit, slot_summary(e, s, &m)), seeds_text(e, s, &m, "-"),
                    comparison_cells(e, s, &m));
        }
    fputs("\n", md);
}

static void write_layer_rows(FILE *md, const experiment *e) {
    int s, i, f;
    for (s = 0; s < e->n_slots; s++)
        for (i = 0; i < e->n_layers; i++) {
            const char *router = layer_router(e, s, e->layers[i]);
            if (!router) continue;
            fprintf(md, "| %s | %d | %s |", cell(router_name(e, s)), e->layers[i], cell(router));
            for (f = 0; f < LAYER_FIELDS; f++) {
                const measure m = layer_measure(f, 1ULL << (e->layers[i] - 1));
                fprintf(md, " %s |", value_text(m.unit, slot_summary(e, s, &m).mean));
            }
            fputs("\n", md);
        }
}

static void write_tightness_rows(FILE *md, const experiment *e, int slot, int *written) {
    static const int fields[2] = {LAYER_TIGHTNESS_PLAIN, LAYER_TIGHTNESS_AC};
    static const char *const metrics[2] = {"plain", "AC-weighted"};
    const int b = e->slots[slot].baseline_slot;
    const unsigned long long layers = changed_layers(e, slot, b);
    int layer, f;
    for (layer = 1; layer <= MAX_LAYER; layer++)
        for (f = 0; f < 2 && (layers >> (layer - 1) & 1ULL); f++) {
            const measure m = layer_measure(fields[f], 1ULL << (layer - 1));
            if (!has_data(e, slot, b, &m)) continue;
            if (!(*written)++)
                fputs("Tightness against the baseline's same layer, paired by seed (lower is tighter):\n\n"
                      "| Comparison | Layer | Metric | Router | Baseline | Difference (sd, n) | Verdict |\n"
                      "|---|---:|---|---:|---:|---|---|\n",
                      md);
            fprintf(md, "| %s vs %s | %d | %s | %s | %s | %s |\n", cell(router_name(e, slot)), cell(router_name(e, b)),
                    layer, metrics[f], summary_text(m.unit, slot_summary(e, slot, &m)),
                    summary_text(m.unit, slot_summary(e, b, &m)), comparison_cells(e, slot, &m));
        }
}

static void write_layers(FILE *md, const experiment *e) {
    int s, written = 0;
    if (!e->n_layers) return;
    fputs("### Layers\n\nEach MoE layer at the last evaluation, mean over the finished seeds. Load imbalance: the "
          "busiest expert's tokens over the mean; tightness: a ratio, lower is tighter; small clusters: AC clusters "
          "with fewer than 2 tokens.\n\n"
          "| Router | Layer | Layer's router | Load imbalance | Router stability | Tightness (plain) | Tightness (AC) "
          "| Small clusters | Top gate mean | MI expert–class (bits) |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
          md);
    write_layer_rows(md, e);
    fputs("\n", md);
    for (s = 0; s < e->n_slots; s++)
        if (e->slots[s].baseline_slot >= 0 && is_ac_variant(router_name(e, s)))
            write_tightness_rows(md, e, s, &written);
    if (written) fputs("\n", md);
}

/* ---- results.md: the empty clusters of the AC layers ---- */

typedef struct cluster_counts {
    int evaluations, with_small; /* evaluations that log small_clusters; those with at least one */
    double small_sum, small_max;
} cluster_counts;

/* A layer's small clusters over every evaluation of the slot's finished seeds. */
static cluster_counts small_cluster_counts(const experiment *e, int slot, int layer) {
    cluster_counts c;
    int i, k;
    memset(&c, 0, sizeof c);
    for (i = 0; i < e->n_seeds; i++) {
        const run *r = finished_run(e, slot, i);
        for (k = 0; r && k < r->events[EVENT_LAYER].count; k++) {
            const record *item = &r->events[EVENT_LAYER].items[k];
            const double small = item->value[LAYER_SMALL_CLUSTERS];
            if (item->layer != layer || !isfinite(small)) continue;
            c.evaluations++, c.with_small += small >= 1.0, c.small_sum += small;
            c.small_max = fmax(c.small_max, small);
        }
    }
    return c;
}

static int slot_named(const experiment *e, const char *name, size_t length) {
    int s;
    for (s = 0; s < e->n_slots; s++)
        if (strlen(router_name(e, s)) == length && !strncmp(router_name(e, s), name, length)) return s;
    return -1;
}

/* For a slot "<name> robust", the slot "<name>"; else -1. */
static int paper_twin(const experiment *e, int slot) {
    static const char suffix[] = " robust";
    const char *name = router_name(e, slot);
    const size_t length = strlen(name), suffix_length = sizeof suffix - 1;
    if (length <= suffix_length || strcmp(name + length - suffix_length, suffix)) return -1;
    return slot_named(e, name, length - suffix_length);
}

/* Whether some slot is the robust twin of slot. */
static int has_robust_twin(const experiment *e, int slot) {
    int s;
    for (s = 0; s < e->n_slots; s++)
        if (paper_twin(e, s) == slot) return 1;
    return 0;
}

static void write_small_cluster_rows(FILE *md, const experiment *e, int *rows) {
    int s, i;
    for (s = 0; s < e->n_slots; s++)
        for (i = 0; i < e->n_layers; i++) {
            const int layer = e->layers[i];
            const cluster_counts c = small_cluster_counts(e, s, layer);
            const measure m = layer_measure(LAYER_TOP_GATE, 1ULL << (layer - 1));
            const char *router = layer_router(e, s, layer);
            if (!c.evaluations) continue;
            if (!(*rows)++)
                fputs("A small cluster: an AC cluster with fewer than 2 tokens in an evaluation call; the paper's code "
                      "gives it weights 1/eps, which flattens the other clusters' weights. Counted over every "
                      "evaluation of the finished seeds; top gate mean: the gate of each token's top choice (0.5 "
                      "under top-2: the router no longer discriminates), mean over the seeds.\n\n"
                      "| Router | Layer | Layer's router | Evaluations with a small cluster | Small clusters per "
                      "evaluation (max) | Top gate mean, last evaluation |\n|---|---:|---|---:|---:|---:|\n",
                      md);
            fprintf(md, "| %s | %d | %s | %.0f%% (%d of %d) | %.1f (%.0f) | %s |\n", cell(router_name(e, s)), layer,
                    cell(router ? router : "?"), 100.0 * c.with_small / c.evaluations, c.with_small, c.evaluations,
                    c.small_sum / c.evaluations, c.small_max, summary_text(m.unit, slot_summary(e, s, &m)));
        }
    if (*rows) fputs("\n", md);
}

static const char *const twin_verdict_names[VERDICTS] = {"paper's AC better", "robust better", "within noise",
                                                         "one seed: no verdict", "no paired seeds"};

static void write_twin_rows(FILE *md, const experiment *e) {
    const measure m = final_measure(e, e->vision ? EVAL_ACCURACY : EVAL_CLEAN);
    const char *what = e->vision ? "accuracy" : "clean bpc";
    int s, twins = 0;
    for (s = 0; s < e->n_slots; s++) {
        const int paper = paper_twin(e, s);
        paired p;
        if (paper < 0) continue;
        if (!twins++)
            fprintf(md,
                    "The cost: %s at the last evaluation with the paper's weights and in robust mode (small clusters "
                    "left out of the weights); difference: paper's − robust, paired by seed (%s is better).\n\n"
                    "| Paper's | Robust | Paper's %s | Robust %s | Difference (sd, n) | Verdict |\n"
                    "|---|---|---:|---:|---|---|\n",
                    e->vision ? "test accuracy" : "held-out clean bpc", e->vision ? "higher" : "lower", what, what);
        p = compare(e, paper, s, &m);
        fprintf(md, "| %s | %s | %s | %s | %s | %s |\n", cell(router_name(e, paper)), cell(router_name(e, s)),
                summary_text(m.unit, slot_summary(e, paper, &m)), summary_text(m.unit, slot_summary(e, s, &m)),
                difference_text(m.unit, p.difference), twin_verdict_names[p.verdict]);
    }
    if (twins) fputs("\n", md);
}

/* How often AC layers have clusters of fewer than 2 tokens, and what the paper's weights for them
   cost against robust mode. */
static void write_empty_clusters(FILE *md, const experiment *e) {
    int s, i, rows = 0, ac = 0, untwinned = 0;
    for (s = 0; s < e->n_slots; s++) ac |= is_ac_variant(router_name(e, s)) || paper_twin(e, s) >= 0;
    if (!ac) return;
    fputs("### Empty clusters\n\n", md);
    write_small_cluster_rows(md, e, &rows);
    if (!rows) fputs("No layer of these logs carries small_clusters (logs written before it was logged).\n\n", md);
    write_twin_rows(md, e);
    for (s = 0; s < e->n_slots; s++) {
        int logged = 0;
        for (i = 0; i < e->n_layers; i++) logged |= small_cluster_counts(e, s, e->layers[i]).evaluations > 0;
        if ((!logged && !is_ac_variant(router_name(e, s))) || paper_twin(e, s) >= 0 || has_robust_twin(e, s))
            continue;
        fprintf(md, "%s%s", untwinned++ ? ", " : "No robust twin (a router \"<name> robust\") for ",
                cell(router_name(e, s)));
    }
    if (untwinned) fprintf(md, ": %s cost is not measured.\n\n", untwinned == 1 ? "its" : "their");
}

static void write_plots(FILE *md, const char *out_dir, const experiment *e) {
    char link[NAME_CAP + 32];
    fputs("### Plots\n\n", md);
    if (plot_curves(out_dir, e, link))
        fprintf(md, "![%s: %s over training](%s)\n\n", e->name, e->vision ? "test accuracy" : "held-out bpc", link);
    if (e->vision ? plot_vision_robustness(out_dir, e, link) : plot_language_robustness(out_dir, e, link))
        fprintf(md, "![%s: robustness](%s)\n\n", e->name, link);
    if (plot_routing(out_dir, e, link))
        fprintf(md, "![%s: load imbalance and router stability](%s)\n\n", e->name, link);
    if (plot_tightness(out_dir, e, link)) fprintf(md, "![%s: cluster tightness per layer](%s)\n\n", e->name, link);
}

static void write_experiment(FILE *md, const char *out_dir, const experiment *e) {
    fprintf(md, "## %s (%s)\n\n", e->name, e->vision ? "vision: test accuracy" : "language model: bits per character");
    write_setup(md, e);
    write_final_quality(md, e);
    if (!e->vision) write_convergence(md, e);
    if (e->vision) write_vision_robustness(md, e);
    else write_language_robustness(md, e);
    write_layers(md, e);
    write_empty_clusters(md, e);
    write_plots(md, out_dir, e);
}

/* ---- results.md: the whole ---- */

static void write_overview(FILE *md) {
    const char *mode = meta_value("mode");
    int i, finished = 0;
    for (i = 0; i < n_runs; i++) finished += runs[i].finished;
    fprintf(
        md,
        "# Does the AC router reproduce?\n\nThe claims of \"Tight Clusters Make Specialized Experts\" tested on the "
        "runs of this study%s%s%s: %d run%s, %d finished and %d not finished, in %d experiment%s.",
        mode ? " (mode " : "", mode ? mode : "", mode ? ")" : "", n_runs, n_runs == 1 ? "" : "s", finished,
        n_runs - finished, n_experiments, n_experiments == 1 ? "" : "s");
    for (i = 0; i < n_experiments; i++) {
        const experiment *e = &experiments[i];
        long steps = 0;
        int s, k;
        for (s = 0; s < e->n_slots; s++) steps = slot_steps(e, s) > steps ? slot_steps(e, s) : steps;
        fprintf(md, " %s: ", e->name);
        for (s = 0; s < e->n_slots; s++) fprintf(md, "%s%s", s ? ", " : "", router_name(e, s));
        fprintf(md, "; seed%s ", e->n_seeds == 1 ? "" : "s");
        for (k = 0; k < e->n_seeds; k++) fprintf(md, "%s%ld", k ? ", " : "", e->seeds[k]);
        fprintf(md, "; up to %ld steps.", steps);
    }
    fputs(" Each AC router is compared with its baseline on the same seeds (shared batches and initialisation): a "
          "difference is a verdict (reproduced or reversed) when its 95 % confidence interval over the seeds (Student's t, "
          "at least two seeds) leaves out zero; otherwise it is within noise.\n\n",
          md);
}

/* meta.txt gains one block of "key: value" lines each time the study starts (a resumed study starts again),
   so the table has a row per start and a column per key. */
static int meta_key_length(const char *line) {
    const char *colon = strchr(line, ':');
    return colon ? (int)(colon - line) : (int)strlen(line);
}

static const char *meta_value_in(int first, int last, const char *key, int length) {
    int i;
    for (i = first; i < last; i++)
        if (meta_key_length(meta_lines[i]) == length && !strncmp(meta_lines[i], key, (size_t)length)) {
            const char *colon = meta_lines[i] + length;
            return *colon ? colon + 1 + strspn(colon + 1, " ") : "";
        }
    return "";
}

static int meta_block_end(int first) {
    int i, length = meta_key_length(meta_lines[first]);
    for (i = first + 1; i < n_meta; i++)
        if (meta_key_length(meta_lines[i]) == length && !strncmp(meta_lines[i], meta_lines[first], (size_t)length))
            break;
    return i;
}

static void write_machine(FILE *md) {
    int first, end, k;
    fputs("## Machine and commit\n\n", md);
    if (!n_meta) {
        fputs("No meta.txt in the study directory.\n", md);
        return;
    }
    end = meta_block_end(0);
    fputs("One row for each time the study was started or resumed.\n\n|", md);
    for (k = 0; k < end; k++) fprintf(md, " %.*s |", meta_key_length(meta_lines[k]), cell(meta_lines[k]));
    fputs("\n|", md);
    for (k = 0; k < end; k++) fputs("---|", md);
    fputs("\n", md);
    for (first = 0; first < n_meta; first = meta_block_end(first)) {
        fputs("|", md);
        for (k = 0; k < end; k++) {
            int length = meta_key_length(meta_lines[k]);
            fprintf(md, " %s |", cell(meta_value_in(first, meta_block_end(first), meta_lines[k], length)));
        }
        fputs("\n", md);
    }
}

static FILE *open_output(const char *out_dir, const char *name) {
    char path[PATH_CAP];
    FILE *out;
    join_path(path, out_dir, name, "");
    if (!(out = fopen(path, "w"))) fail("%s: %s", path, strerror(errno));
    return out;
}

static void close_output(FILE *out, const char *name) {
    if (ferror(out) | fclose(out)) fail("%s: could not be written", name);
}

static void write_report(const char *out_dir) {
    char study_dir[PATH_CAP];
    FILE *md, *headline;
    int i;
    make_directory(out_dir);
    join_path(study_dir, out_dir, "study", "");
    make_directory(study_dir);
    headline = open_output(out_dir, "study/headline.md");
    write_headline(headline);
    close_output(headline, "study/headline.md");
    md = open_output(out_dir, "results.md");
    write_overview(md);
    fputs("## Claims\n\n", md);
    write_claims_table(md);
    fputs("\n", md);
    write_claim_summaries(md);
    fputs("\n", md);
    write_plain_verdict(md);
    fputs("\n", md);
    for (i = 0; i < n_experiments; i++) write_experiment(md, out_dir, &experiments[i]);
    write_machine(md);
    close_output(md, "results.md");
}

int main(int argc, char **argv) {
    char *manifest, *meta;
    int i, k;
    if (argc != 3) {
        fprintf(argc == 2 && !strcmp(argv[1], "--help") ? stdout : stderr,
                "usage: " PROGRAM " DIR OUTDIR   (DIR: study.tsv, meta.txt, <id>.jsonl, <id>.done;\n"
                "       writes OUTDIR/results.md, OUTDIR/study/headline.md and OUTDIR/study/*.svg)\n");
        return argc == 2 && !strcmp(argv[1], "--help") ? 0 : 2;
    }
    manifest = read_manifest(argv[1]);
    meta = read_meta(argv[1]);
    read_runs(argv[1]);
    collect_claims();
    write_report(argv[2]);
    for (i = 0; i < n_runs; i++)
        for (k = 0; k < EVENT_KINDS; k++) free(runs[i].events[k].items);
    free(manifest), free(meta);
    return 0;
}
