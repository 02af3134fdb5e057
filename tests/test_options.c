/* The option table and what reads it: enum names, setting and formatting options by name,
   every option surviving a checkpoint, the AC weights a checkpoint keeps for decoding,
   weights-only files; token corpora; the examples' word-swap attack. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../acmoe.h"
#include "harness.h"
#include "../examples/wordswap.h"

#define OPTIONS_PATH "build/test_options.safetensors"

static acmoe_lm_desc small_desc(const char *pattern) {
    acmoe_lm_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.vocab = 13, desc.d_model = 8, desc.n_heads = 2, desc.seq_len = 6, desc.batch = 2, desc.pattern = pattern;
    desc.d_ff = 6, desc.n_experts = 4, desc.top_k = 2, desc.seed = 7;
    return desc;
}

static void small_batch(int32_t *tokens, int32_t *targets, int n) {
    int i;
    for (i = 0; i < n; i++) tokens[i] = (int32_t)((i * 5 + 1) % 13), targets[i] = (int32_t)((i * 3 + 2) % 13);
}

static void one_step(acmoe_lm *model, acmoe_ctx *ctx) {
    int32_t tokens[12], targets[12];
    acmoe_optim_desc optim;
    float loss;
    memset(&optim, 0, sizeof optim);
    optim.lr = 3e-3f, optim.warmup_steps = 2, optim.schedule = ACMOE_SCHEDULE_COSINE, optim.total_steps = 9;
    small_batch(tokens, targets, 12);
    CHECK_STATUS(acmoe_lm_forward(model, ctx, tokens, targets, 2, 6, 1, &loss), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_backward(model, ctx), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_step(model, ctx, &optim, NULL), ACMOE_OK);
}

static void test_enum_names(void) {
    int kind, value;
    for (kind = 0; kind < ACMOE_ENUM_COUNT; kind++) {
        int count = 0;
        while (acmoe_enum_name((acmoe_enum)kind, count)) count++;
        CHECKF(count >= 2, "enum %d has %d names", kind, count);
        for (value = 0; value < count; value++)
            CHECK(acmoe_enum_value((acmoe_enum)kind, acmoe_enum_name((acmoe_enum)kind, value)) == value);
        CHECK(acmoe_enum_name((acmoe_enum)kind, -1) == NULL);
    }
    CHECK(acmoe_enum_name(ACMOE_ENUM_ACTIVATION, ACMOE_ACT_COUNT) == NULL);
    CHECK(acmoe_enum_value(ACMOE_ENUM_ACTIVATION, "swiglu") == ACMOE_ACT_SWIGLU);
    CHECK(acmoe_enum_value(ACMOE_ENUM_GROUP, "position") == ACMOE_GROUP_POSITION);
    CHECK(acmoe_enum_value(ACMOE_ENUM_ROUTER_SELECT, "priority") == ACMOE_SELECT_PRIORITY);
    CHECK(acmoe_enum_value(ACMOE_ENUM_AC_SCALING, "Preclip") == -1);
    CHECK(acmoe_enum_value(ACMOE_ENUM_COUNT, "relu") == -1 && acmoe_enum_value(ACMOE_ENUM_ACTIVATION, NULL) == -1);
    CHECK(strcmp(acmoe_router_name('c'), "AC") == 0 && strcmp(acmoe_router_name('f'), "dense") == 0);
    CHECK(acmoe_router_name('q') == NULL && acmoe_router_name('\0') == NULL && acmoe_router_name('|') == NULL);
}

/* Every option by name: its own formatted value reads back, values outside its range or not
   of its type are refused and leave the descriptor alone. */
static void test_option_set_and_format(void) {
    static const char *const bad[] = {"", "x", "1e99", "nan", "inf", "-1", "2.5x"};
    const acmoe_option *options[2];
    int counts[2], table, i, j;
    options[0] = acmoe_model_options(&counts[0]);
    options[1] = acmoe_optim_options(&counts[1]);
    CHECK(counts[0] > 30 && counts[1] == 11);
    for (table = 0; table < 2; table++) {
        for (i = 0; i < counts[table]; i++) {
            const acmoe_option *o = &options[table][i];
            acmoe_lm_desc model_desc, before;
            acmoe_optim_desc optim_desc;
            void *desc = table ? (void *)&optim_desc : (void *)&model_desc;
            const size_t size = table ? sizeof optim_desc : sizeof model_desc;
            char text[64], again[64];
            memset(&model_desc, 0, sizeof model_desc), memset(&optim_desc, 0, sizeof optim_desc);
            CHECKF(o->key && o->help && o->max >= o->min, "option %s", o->key);
            for (j = 0; j < i; j++) CHECKF(strcmp(options[table][j].key, o->key), "%s twice", o->key);
            snprintf(text, sizeof text, o->type == ACMOE_OPTION_FLOAT ? "%.9g" : "%.0f", o->max);
            if (o->type == ACMOE_OPTION_ENUM) snprintf(text, sizeof text, "%s", acmoe_enum_name(o->names, (int)o->max));
            CHECKF(acmoe_option_set(o, desc, text) == ACMOE_OK, "%s = %s", o->key, text);
            acmoe_option_format(o, desc, again, sizeof again);
            CHECKF(o->type != ACMOE_OPTION_INT || strcmp(again, text) == 0, "%s: %s, then %s", o->key, text, again);
            memcpy(&before, desc, size);
            for (j = 0; j < (int)(sizeof bad / sizeof bad[0]); j++) {
                if (o->min < 0 && !strcmp(bad[j], "-1")) continue;
                CHECKF(acmoe_option_set(o, desc, bad[j]) == ACMOE_ERR_ARG, "%s = '%s' taken", o->key, bad[j]);
            }
            if (o->type == ACMOE_OPTION_INT && o->max > o->min)
                CHECKF(acmoe_option_set(o, desc, "0.5") == ACMOE_ERR_ARG, "%s = 0.5 taken", o->key);
            CHECKF(memcmp(&before, desc, size) == 0, "%s changed by a refused value", o->key);
        }
    }
    CHECK_STATUS(acmoe_option_set(NULL, &counts, "1"), ACMOE_ERR_NULL);
}

/* A value other than its default for each option a language model takes: each option in
   turn set so, the model saved and loaded must run with it. */
static const struct {
    const char *key, *value;
} distinct_values[] = {
    {"vocab", "17"}, {"d_model", "12"}, {"n_heads", "4"}, {"seq_len", "5"}, {"batch", "3"}, {"d_ff", "5"},
    {"n_experts", "5"}, {"top_k", "3"}, {"activation", "swiglu"}, {"pre_ln", "1"}, {"untied_head", "1"},
    {"dropout", "0.125"}, {"moe.proj_dim", "3"}, {"moe.capacity", "1.5"}, {"moe.usmoe_budget", "1.5"},
    {"moe.usmoe_rho", "0.25"}, {"moe.group", "batch"}, {"moe.seq_len", "6"}, {"moe.soft_slots", "2"},
    {"moe.balance_alpha", "0.01"}, {"moe.balance_temperature", "0.3"}, {"moe.z_loss", "0.001"},
    {"moe.ac_max_clusters", "3"}, {"moe.ac_weight_experts", "1"}, {"moe.ac_mix_labels", "0"}, {"moe.ac.eps", "0.001"},
    {"moe.ac.clip", "4"}, {"moe.ac.scaling", "preclip"}, {"moe.ac.dispersion", "variance"}, {"moe.ac.robust", "1"},
    {"moe.soft_input", "normalized"}, {"moe.mix_k", "2"}, {"moe.no_router_bias", "1"}, {"moe.no_reprojection", "1"},
    {"moe.gate_noise", "0.5"}, {"moe.importance_loss", "0.02"},
};

/* The vision options, and those a language model's layers never take, each with its model. */
static const char *const vision_only[] = {"n_classes", "patch_dim", "window"};

static const acmoe_option *option_named(const char *key) {
    int count, i;
    const acmoe_option *options = acmoe_model_options(&count);
    for (i = 0; i < count; i++)
        if (!strcmp(options[i].key, key)) return &options[i];
    return NULL;
}

static void check_survives(const acmoe_lm_desc *desc, const char *key, const char *value) {
    acmoe_lm *model = NULL, *loaded = NULL;
    const acmoe_option *o = option_named(key);
    char before[64], after[64];
    acmoe_status s = acmoe_lm_create(&model, desc);
    CHECKF(s == ACMOE_OK, "%s = %s: %s", key, value, acmoe_status_string(s));
    if (!model || !o) return;
    CHECK_STATUS(acmoe_lm_save(model, OPTIONS_PATH), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_load(&loaded, OPTIONS_PATH), ACMOE_OK);
    if (loaded) {
        acmoe_lm_desc a = acmoe_lm_settings(model), b = acmoe_lm_settings(loaded);
        int count, i;
        const acmoe_option *options = acmoe_model_options(&count);
        acmoe_option_format(o, &b, after, sizeof after);
        CHECKF(strcmp(after, value) == 0, "%s = %s loads as %s", key, value, after);
        for (i = 0; i < count; i++) { /* and every other option as the model resolved it */
            acmoe_option_format(&options[i], &a, before, sizeof before);
            acmoe_option_format(&options[i], &b, after, sizeof after);
            CHECKF(strcmp(before, after) == 0, "with %s = %s, %s: %s saved, %s loaded", key, value, options[i].key,
                   before, after);
        }
        CHECK(strcmp(a.pattern, b.pattern) == 0 && a.seed == b.seed);
    }
    acmoe_lm_destroy(model), acmoe_lm_destroy(loaded);
}

static void test_every_option_survives_checkpoint(void) {
    int count, i, j, covered = 0;
    const acmoe_option *options = acmoe_model_options(&count);
    for (i = 0; i < count; i++) {
        int listed = 0;
        for (j = 0; j < (int)(sizeof distinct_values / sizeof distinct_values[0]); j++)
            listed |= !strcmp(distinct_values[j].key, options[i].key);
        for (j = 0; j < (int)(sizeof vision_only / sizeof vision_only[0]); j++)
            listed |= !strcmp(vision_only[j], options[i].key);
        CHECKF(listed, "option %s has no test value", options[i].key);
    }
    for (j = 0; j < (int)(sizeof distinct_values / sizeof distinct_values[0]); j++) {
        const char *key = distinct_values[j].key, *value = distinct_values[j].value;
        const char *pattern = !strcmp(key, "moe.usmoe_budget") || !strcmp(key, "moe.usmoe_rho") ||
                                      !strcmp(key, "moe.group")
                                  ? "gu"
                              : !strncmp(key, "moe.soft", 8) || !strcmp(key, "moe.mix_k") ? "gm"
                              : !strcmp(key, "moe.gate_noise") || !strcmp(key, "moe.importance_loss") ? "tt"
                              : !strcmp(key, "moe.proj_dim") ? "gx"
                                                             : "gc";
        acmoe_lm_desc desc = small_desc(pattern);
        const acmoe_option *o = option_named(key);
        CHECKF(o != NULL, "no option %s", key);
        if (!o) continue;
        if (!strcmp(key, "moe.gate_noise")) desc.moe.importance_loss = 0.01f;
        if (!strcmp(key, "moe.importance_loss")) desc.moe.gate_noise = 1.0f;
        if (!strcmp(key, "moe.soft_input")) desc.pattern = "gm";
        CHECKF(acmoe_option_set(o, &desc, value) == ACMOE_OK, "%s = %s", key, value);
        check_survives(&desc, key, value);
        covered++;
    }
    { /* the vision options */
        acmoe_lm_desc desc = small_desc("ff|gc");
        desc.n_classes = 3, desc.patch_dim = 4, desc.window = 2, desc.seq_len = 16, desc.pre_ln = 1;
        check_survives(&desc, "window", "2");
        check_survives(&desc, "n_classes", "3");
        check_survives(&desc, "patch_dim", "4");
    }
    CHECK(covered == (int)(sizeof distinct_values / sizeof distinct_values[0]));
}

/* Options out of their table's range are refused by acmoe_lm_create and acmoe_lm_step. */
static void test_ranges_refused(void) {
    acmoe_lm_desc desc = small_desc("gc");
    acmoe_lm *model = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_optim_desc optim;
    desc.dropout = 0.995f;
    CHECK_STATUS(acmoe_lm_create(&model, &desc), ACMOE_ERR_ARG);
    desc = small_desc("gc");
    desc.moe.ac.robust = 2;
    CHECK_STATUS(acmoe_lm_create(&model, &desc), ACMOE_ERR_ARG);
    desc = small_desc("gc");
    desc.moe.ac.scaling = (acmoe_ac_scaling)7;
    CHECK_STATUS(acmoe_lm_create(&model, &desc), ACMOE_ERR_ARG);
    CHECK(model == NULL);
    desc = small_desc("gc");
    CHECK_STATUS(acmoe_lm_create(&model, &desc), ACMOE_OK);
    memset(&optim, 0, sizeof optim);
    optim.lr = 11.0f;
    if (model) CHECK_STATUS(acmoe_lm_step(model, ctx, &optim, NULL), ACMOE_ERR_ARG);
    acmoe_lm_destroy(model);
    acmoe_ctx_destroy(ctx);
}

/* Each float option takes the bounds it lists, typed as text, wherever it takes the middle of
   its range (some need other settings to be taken at all): the float nearest a bound such as
   0.99 lies just outside the bound's double and must still be taken. */
static int resolves_with(const acmoe_option *option, double value) {
    acmoe_lm_desc desc = small_desc("gc"), resolved;
    char text[64];
    snprintf(text, sizeof text, "%.17g", value);
    return acmoe_option_set(option, &desc, text) == ACMOE_OK && acmoe_lm_resolve(&desc, &resolved) == ACMOE_OK;
}

static void test_float_bounds_taken(void) {
    int count, i, tested = 0;
    const acmoe_option *options = acmoe_model_options(&count);
    for (i = 0; i < count; i++) {
        const acmoe_option *o = &options[i];
        if (o->type != ACMOE_OPTION_FLOAT || !resolves_with(o, 0.5 * (o->min + o->max))) continue;
        CHECKF(resolves_with(o, o->min) && resolves_with(o, o->max), "%s: a bound of %g to %g refused", o->key, o->min,
               o->max);
        tested++;
    }
    CHECK(tested >= 5);
}

/* A checkpoint keeps the AC weights: loaded and frozen, the model decodes, with the logits of
   the model it was saved from. Before freezing, decoding is refused with the reason. */
static void test_decode_after_load(void) {
    acmoe_lm_desc desc = small_desc("gcgc");
    acmoe_lm *model = NULL, *loaded = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    int32_t tokens[12];
    char why[200];
    int rows = 0;
    small_batch(tokens, tokens, 12);
    CHECK_STATUS(acmoe_lm_create(&model, &desc), ACMOE_OK);
    if (!model) return;
    CHECK(!acmoe_lm_decode_ready(model, why, sizeof why));
    CHECKF(strstr(why, "layer 2 (AC)") && strstr(why, "no AC weights"), "%s", why);
    one_step(model, ctx);
    CHECK(!acmoe_lm_decode_ready(model, why, sizeof why));
    CHECKF(strstr(why, "layer 2 (AC)") && strstr(why, "not frozen"), "%s", why);
    CHECK_STATUS(acmoe_lm_decode(model, ctx, tokens, 4, 0), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_lm_forward(model, ctx, tokens, NULL, 2, 6, 0, NULL), ACMOE_OK); /* W of the latest weights */
    CHECK(acmoe_moe_ac_weights(acmoe_lm_moe(model, 1), &rows) != NULL && rows >= 1 && rows <= 4);
    CHECK(acmoe_moe_ac_weights(acmoe_lm_moe(model, 0), &rows) == NULL && rows == 0);
    CHECK_STATUS(acmoe_lm_save(model, OPTIONS_PATH), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_load(&loaded, OPTIONS_PATH), ACMOE_OK);
    if (loaded) {
        int layer, a_rows, b_rows;
        for (layer = 1; layer < 4; layer += 2) {
            const float *a = acmoe_moe_ac_weights(acmoe_lm_moe(model, layer), &a_rows);
            const float *b = acmoe_moe_ac_weights(acmoe_lm_moe(loaded, layer), &b_rows);
            CHECK(a && b && a_rows == b_rows && memcmp(a, b, sizeof(float) * (size_t)a_rows * 8) == 0);
        }
        acmoe_lm_freeze_ac_weights(model, 1), acmoe_lm_freeze_ac_weights(loaded, 1);
        CHECKF(acmoe_lm_decode_ready(loaded, why, sizeof why), "%s", why);
        CHECK_STATUS(acmoe_lm_decode(model, ctx, tokens, 5, 0), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_decode(loaded, ctx, tokens, 5, 0), ACMOE_OK);
        CHECK(memcmp(acmoe_lm_logits(model), acmoe_lm_logits(loaded), sizeof(float) * 5 * 13) == 0);
    }
    acmoe_lm_destroy(model), acmoe_lm_destroy(loaded);
    acmoe_ctx_destroy(ctx);
}

/* AC weights are set only where they fit, and only finite and positive. */
static void test_set_ac_weights(void) {
    acmoe_lm_desc desc = small_desc("gc");
    acmoe_lm *model = NULL;
    float w[5 * 8];
    int i, rows;
    for (i = 0; i < 5 * 8; i++) w[i] = 0.5f + 0.01f * (float)i;
    CHECK_STATUS(acmoe_lm_create(&model, &desc), ACMOE_OK);
    if (!model) return;
    CHECK_STATUS(acmoe_moe_set_ac_weights(acmoe_lm_moe(model, 0), w, 2), ACMOE_ERR_ARG); /* not AC */
    CHECK_STATUS(acmoe_moe_set_ac_weights(acmoe_lm_moe(model, 1), w, 5), ACMOE_ERR_ARG); /* 4 clusters */
    CHECK_STATUS(acmoe_moe_set_ac_weights(acmoe_lm_moe(model, 1), w, 0), ACMOE_ERR_ARG);
    CHECK_STATUS(acmoe_moe_set_ac_weights(acmoe_lm_moe(model, 1), NULL, 2), ACMOE_ERR_NULL);
    w[3] = NAN;
    CHECK_STATUS(acmoe_moe_set_ac_weights(acmoe_lm_moe(model, 1), w, 2), ACMOE_ERR_NONFINITE);
    w[3] = 0.5f;
    CHECK(acmoe_moe_ac_weights(acmoe_lm_moe(model, 1), &rows) == NULL);
    CHECK_STATUS(acmoe_moe_set_ac_weights(acmoe_lm_moe(model, 1), w, 2), ACMOE_OK);
    CHECK(acmoe_moe_ac_weights(acmoe_lm_moe(model, 1), &rows) != NULL && rows == 2);
    acmoe_lm_freeze_ac_weights(model, 1);
    CHECK(acmoe_lm_decode_ready(model, NULL, 0));
    acmoe_lm_destroy(model);
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    long size;
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fclose(f);
    return size;
}

/* A weights-only file: the parameters, the settings and the AC weights, no Adam moments; the
   model it loads continues with fresh moments. */
static void test_weights_only(void) {
    acmoe_lm_desc desc = small_desc("gc");
    acmoe_lm *model = NULL, *loaded = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    long full, weights;
    CHECK_STATUS(acmoe_lm_create(&model, &desc), ACMOE_OK);
    if (!model) return;
    one_step(model, ctx);
    CHECK_STATUS(acmoe_lm_save(model, OPTIONS_PATH), ACMOE_OK);
    full = file_size(OPTIONS_PATH);
    CHECK_STATUS(acmoe_lm_save_weights(model, OPTIONS_PATH), ACMOE_OK);
    weights = file_size(OPTIONS_PATH);
    { /* the moments' data and their two header entries less */
        const long moments = 2 * (long)(acmoe_lm_param_count(model) * sizeof(float));
        CHECKF(weights > 0 && full - weights >= moments && full - weights < moments + 256, "%ld and %ld bytes", full,
               weights);
    }
    CHECK_STATUS(acmoe_lm_load(&loaded, OPTIONS_PATH), ACMOE_OK);
    if (loaded) {
        const size_t n = acmoe_lm_param_count(model);
        acmoe_train_desc a = acmoe_lm_train_settings(model), b = acmoe_lm_train_settings(loaded);
        CHECK(acmoe_lm_param_count(loaded) == n && acmoe_lm_steps_taken(loaded) == 1);
        CHECK(memcmp(acmoe_lm_params(model), acmoe_lm_params(loaded), n * sizeof(float)) == 0);
        CHECK(a.optim.lr == b.optim.lr && a.optim.schedule == b.optim.schedule);
        CHECK(acmoe_moe_ac_weights(acmoe_lm_moe(loaded, 1), NULL) != NULL);
        one_step(loaded, ctx); /* trains on, from zero moments */
        CHECK(acmoe_lm_steps_taken(loaded) == 2);
    }
    acmoe_lm_destroy(model), acmoe_lm_destroy(loaded);
    acmoe_ctx_destroy(ctx);
}

static void write_bytes(const char *path, const void *data, size_t size) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (!f) return;
    CHECK(fwrite(data, 1, size, f) == size);
    fclose(f);
}

/* A corpus of int32 token ids: batches of its tokens, a model of its vocabulary trains on
   it, and files that are not whole non-negative ids are refused. */
static void test_token_corpus(void) {
    int32_t ids[400], tokens[12], targets[12];
    acmoe_corpus corpus;
    acmoe_rng rng;
    acmoe_lm_desc desc = small_desc("gc");
    acmoe_lm *model = NULL;
    acmoe_ctx *ctx = test_context(1, 0, 0, 0);
    acmoe_train_desc train;
    double loss = 0.0;
    int i, t;
    for (i = 0; i < 400; i++) ids[i] = (int32_t)((i * 7) % 13); /* each id's successor is fixed */
    write_bytes(OPTIONS_PATH, ids, sizeof ids);
    CHECK_STATUS(acmoe_corpus_load_tokens(&corpus, OPTIONS_PATH, 0.25f), ACMOE_OK);
    CHECK(corpus.vocab == 13 && corpus.size == 400 && corpus.train_size == 300 && corpus.tokens && !corpus.bytes);
    acmoe_rng_seed(&rng, 1);
    CHECK_STATUS(acmoe_corpus_batch(&corpus, ACMOE_SPLIT_VAL, &rng, 2, 6, tokens, targets), ACMOE_OK);
    for (t = 0; t < 12; t++) CHECK(targets[t] == (tokens[t] + 7) % 13);
    CHECK_STATUS(acmoe_lm_create(&model, &desc), ACMOE_OK);
    memset(&train, 0, sizeof train);
    train.steps = 30, train.eval_every = 30, train.eval_batches = 2, train.seed = 1, train.optim.lr = 1e-2f;
    if (model) {
        CHECK_STATUS(acmoe_lm_train(model, ctx, &corpus, &train), ACMOE_OK);
        CHECK_STATUS(acmoe_lm_evaluate(model, ctx, &corpus, 4, 9, &loss), ACMOE_OK);
        CHECKF(loss < 2.0, "held-out loss %g after 30 steps on a fixed successor (uniform: 2.56)", loss);
    }
    acmoe_corpus_destroy(&corpus);
    CHECK(corpus.tokens == NULL && corpus.owned == NULL);
    ids[10] = 20; /* beyond the model's 13 */
    CHECK_STATUS(acmoe_corpus_view_tokens(&corpus, ids, 400, 0.5f), ACMOE_OK);
    if (model) CHECK_STATUS(acmoe_lm_evaluate(model, ctx, &corpus, 4, 9, &loss), ACMOE_ERR_ARG);
    ids[10] = -1;
    CHECK_STATUS(acmoe_corpus_view_tokens(&corpus, ids, 400, 0.5f), ACMOE_ERR_ARG);
    write_bytes(OPTIONS_PATH, ids, sizeof ids);
    CHECK_STATUS(acmoe_corpus_load_tokens(&corpus, OPTIONS_PATH, 0.5f), ACMOE_ERR_FORMAT);
    ids[10] = 3;
    write_bytes(OPTIONS_PATH, ids, 4 * 20 + 2);
    CHECK_STATUS(acmoe_corpus_load_tokens(&corpus, OPTIONS_PATH, 0.5f), ACMOE_ERR_FORMAT);
    write_bytes(OPTIONS_PATH, ids, 0);
    CHECK_STATUS(acmoe_corpus_load_tokens(&corpus, OPTIONS_PATH, 0.5f), ACMOE_ERR_EMPTY);
    CHECK(corpus.tokens == NULL && corpus.owned == NULL);
    acmoe_lm_destroy(model);
    acmoe_ctx_destroy(ctx);
}

/* acmoe_lm_resolve: the settings and the status of acmoe_lm_create, without a model. */
static void test_resolve(void) {
    static const char *const patterns[] = {"gc", "gfx", "gu", "gm", "tt", "na"};
    acmoe_lm_desc desc, resolved;
    acmoe_lm *model = NULL;
    int i, count, o;
    const acmoe_option *options = acmoe_model_options(&count);
    for (i = 0; i < 6; i++) {
        acmoe_status want, got;
        desc = small_desc(patterns[i]);
        if (i == 5) desc.top_k = 9; /* more than the experts: refused */
        want = acmoe_lm_create(&model, &desc);
        got = acmoe_lm_resolve(&desc, &resolved);
        CHECKF(got == want, "%s: resolve %d, create %d", patterns[i], (int)got, (int)want);
        if (model) {
            acmoe_lm_desc settings = acmoe_lm_settings(model);
            for (o = 0; o < count; o++) {
                char a[64], b[64];
                acmoe_option_format(&options[o], &settings, a, sizeof a);
                acmoe_option_format(&options[o], &resolved, b, sizeof b);
                CHECKF(strcmp(a, b) == 0, "%s: %s %s, resolved %s", patterns[i], options[o].key, a, b);
            }
            CHECK(strcmp(resolved.pattern, settings.pattern) == 0 && resolved.seed == settings.seed);
        }
        acmoe_lm_destroy(model);
        model = NULL;
    }
    CHECK_STATUS(acmoe_lm_resolve(NULL, &resolved), ACMOE_ERR_NULL);
    desc = small_desc(NULL);
    CHECK_STATUS(acmoe_lm_resolve(&desc, NULL), ACMOE_OK);
    CHECK_STATUS(acmoe_lm_resolve(&desc, &resolved), ACMOE_OK);
    CHECK(strcmp(resolved.pattern, "ggc") == 0 && resolved.moe.ac.clip == 10.0f);
}

/* The attack swaps max(2.5 % of a line's words, 1) non-stopwords per line for AAA: stopwords
   only as written in lower case, words with inner apostrophes whole, the same text for the
   same seed, and lines without a swappable word as they were. */
static void test_wordswap(void) {
    static const char text[] = "the cat sat on the mat\nThe and of\nand of the\n\n";
    const size_t size = sizeof text - 1;
    size_t out_size = 0, again_size = 0;
    unsigned char *out = wordswap_text((const unsigned char *)text, size, 0.025, 3, &out_size);
    unsigned char *again = wordswap_text((const unsigned char *)text, size, 0.025, 3, &again_size);
    char first[64];
    CHECK(out && again);
    if (!out || !again) return;
    CHECK(out_size == again_size && !memcmp(out, again, out_size));
    CHECK(out_size < sizeof first);
    memcpy(first, out, out_size), first[out_size] = '\0';
    CHECKF(!strcmp(first, "the AAA sat on the mat\nAAA and of\nand of the\n\n") ||
               !strcmp(first, "the cat AAA on the mat\nAAA and of\nand of the\n\n") ||
               !strcmp(first, "the cat sat on the AAA\nAAA and of\nand of the\n\n"),
           "%s", first);
    free(out), free(again);
    out = wordswap_text((const unsigned char *)"cat's toy", 9, 1.0, 1, &out_size);
    CHECK(out && out_size == 7 && !memcmp(out, "AAA AAA", 7)); /* a share of 1: every swappable word */
    free(out);
    out = wordswap_text((const unsigned char *)"we won't", 8, 0.5, 1, &out_size);
    CHECK(out && out_size == 8 && !memcmp(out, "we won't", 8)); /* stopwords only */
    free(out);
}

const test_case options_tests[] = {
    {"options_enum_names", test_enum_names},
    {"options_set_and_format", test_option_set_and_format},
    {"options_every_option_survives_checkpoint", test_every_option_survives_checkpoint},
    {"options_float_bounds_taken", test_float_bounds_taken},
    {"options_ranges_refused", test_ranges_refused},
    {"checkpoint_decode_after_load", test_decode_after_load},
    {"checkpoint_set_ac_weights", test_set_ac_weights},
    {"checkpoint_weights_only", test_weights_only},
    {"corpus_tokens", test_token_corpus},
    {"options_resolve", test_resolve},
    {"wordswap_attack", test_wordswap},
    {0, 0},
};
