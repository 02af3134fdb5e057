/* The MoE layers' options as flags, shared by the training examples. A program's options
   struct holds a moe_flags member named moe and lists MOE_FLAGS in its flag table (cli.h),
   which checks their ranges; moe_flags_valid checks the named choices and moe_split_patterns
   the router patterns before any work, moe_flags_apply sets a model's options from the
   flags, moe_flags_of_model reads them back from a model, and moe_print_settings shows what
   each layer runs with. */
#ifndef ACMOE_EXAMPLES_MOE_FLAGS_H
#define ACMOE_EXAMPLES_MOE_FLAGS_H

typedef struct moe_flags {
    const char *activation, *ac_scaling, *ac_dispersion, *usmoe_group;
    float capacity, balance_alpha, balance_temp, z_loss, ac_eps, ac_clip, usmoe_budget, usmoe_rho;
    int ac_robust, ac_experts, soft_slots, proj_dim;
} moe_flags;

/* The choices of the named options, in the order of the library's enums. */
static const char *const moe_activations[] = {"relu", "gelu", "swiglu"}; /* from ACMOE_ACT_RELU */
static const char *const moe_scalings[] = {"per-feature", "preclip", "postclip"}; /* from ..._PER_FEATURE */
static const char *const moe_dispersions[] = {"mad", "variance"}; /* from ACMOE_AC_DISP_MAD */
static const char *const moe_groups[] = {"default", "batch", "sequence", "position"}; /* from ACMOE_GROUP_DEFAULT */
#define MOE_CHOICES(names) (int)(sizeof names / sizeof names[0])

#define MOE_WIDTH_MAX 1048576 /* the library's widest layer */
#define MOE_PATTERN_MAX 63     /* router letters (layers) the library takes */

/* The MoE flags shape a model, so a resumed run takes them from its checkpoint (CLI_KEPT). */
#define MOE_FLAGS                                                                                                \
    FLAG("--activation", OPT_STR, moe.activation, 1, 0, CLI_KEPT, "expert activation: relu (the paper), gelu or swiglu"), \
    FLAG("--capacity", OPT_FLOAT, moe.capacity, 0, 1e4, CLI_KEPT,                                                  \
         "expert capacity factor with token dropping (0: no limit)"),                                              \
    FLAG("--balance-alpha", OPT_FLOAT, moe.balance_alpha, 0, 1e5, CLI_KEPT,                                        \
         "Switch load-balancing loss weight (0: off, as in the paper)"),                                           \
    FLAG("--balance-temp", OPT_FLOAT, moe.balance_temp, 0, 1e5, CLI_ABOVE_MIN | CLI_KEPT,                          \
         "temperature of the balance loss's softmax"),                                                             \
    FLAG("--z-loss", OPT_FLOAT, moe.z_loss, 0, 1e5, CLI_KEPT, "router z-loss weight (0: off)"),                    \
    FLAG("--ac-eps", OPT_FLOAT, moe.ac_eps, 0, 1e6, CLI_KEPT,                                                      \
         "AC ('c' layers): added to the dispersion (0: 1e-4 for mad, 0.1 for variance)"),                          \
    FLAG("--ac-clip", OPT_FLOAT, moe.ac_clip, 0, 1e6, CLI_ABOVE_MIN | CLI_KEPT,                                    \
         "AC ('c' layers): weights clipped at this multiple of their mean"),                                       \
    FLAG("--ac-scaling", OPT_STR, moe.ac_scaling, 1, 0, CLI_KEPT,                                                  \
         "AC ('c' layers): weights divided by their mean per feature (per-feature), or by their mean before "     \
         "(preclip) or after (postclip) clipping"),                                                               \
    FLAG("--ac-dispersion", OPT_STR, moe.ac_dispersion, 1, 0, CLI_KEPT,                                           \
         "AC ('c' layers): mad (the paper), or variance (weights neither clipped nor scaled)"),                   \
    FLAG("--ac-experts", OPT_INT, moe.ac_experts, 0, 1, CLI_KEPT,                                                 \
         "AC ('c' layers): 1: the experts see the weighted input too"),                                           \
    FLAG("--ac-robust", OPT_INT, moe.ac_robust, 0, 1, CLI_KEPT,                                                   \
         "1: AC weights leave out clusters of 0 or 1 tokens (not the paper's); 0: as the paper"),                 \
    FLAG("--usmoe-budget", OPT_FLOAT, moe.usmoe_budget, 0, MOE_WIDTH_MAX, CLI_KEPT,                               \
         "USMoE: (token, expert) pairs per token of a group, at most --experts (0: --top-k)"),                    \
    FLAG("--usmoe-rho", OPT_FLOAT, moe.usmoe_rho, 0, 1, CLI_ABOVE_MIN | CLI_KEPT, "USMoE: share of the sigmoid score"), \
    FLAG("--usmoe-group", OPT_STR, moe.usmoe_group, 1, 0, CLI_KEPT,                                               \
         "USMoE: the tokens sharing a budget: the call (batch), each sequence, or each position (causal; "       \
         "the default)"),       \
    FLAG("--soft-slots", OPT_INT, moe.soft_slots, 1, MOE_WIDTH_MAX, CLI_KEPT, "Soft MoE: slots per expert and group"), \
    FLAG("--proj-dim", OPT_INT, moe.proj_dim, 1, MOE_WIDTH_MAX, CLI_KEPT, "XMoE: width of the router's projection")

/* The library's defaults ('a' layers keep the AC options of the paper's Soft MoE models
   whatever these say: see acmoe_moe_router_preset). */
static inline moe_flags moe_flags_defaults(void) {
    moe_flags f;
    memset(&f, 0, sizeof f);
    f.activation = "relu", f.ac_scaling = "per-feature", f.ac_dispersion = "mad", f.usmoe_group = "default";
    f.balance_temp = 1.0f, f.ac_clip = 10.0f, f.usmoe_rho = 0.5f, f.soft_slots = 1, f.proj_dim = 8;
    return f;
}

/* The index of name among count names, or -1. */
static inline int moe_choice(const char *name, const char *const *names, int count) {
    int i;
    for (i = 0; i < count; i++)
        if (!strcmp(name, names[i])) return i;
    return -1;
}

/* The name of choice index among count names; "unset" for one outside them. */
static inline const char *moe_choice_name(int index, const char *const *names, int count) {
    return index >= 0 && index < count ? names[index] : "unset";
}

/* Whether the named flags are among their choices (the flag table checks the ranges of
   the rest); else the first that is not, in why. */
static inline int moe_flags_valid(const moe_flags *f, char *why, size_t cap) {
    const char *broken = NULL;
    if (moe_choice(f->activation, moe_activations, MOE_CHOICES(moe_activations)) < 0)
        broken = "--activation is relu, gelu or swiglu";
    else if (moe_choice(f->ac_scaling, moe_scalings, MOE_CHOICES(moe_scalings)) < 0)
        broken = "--ac-scaling is per-feature, preclip or postclip";
    else if (moe_choice(f->ac_dispersion, moe_dispersions, MOE_CHOICES(moe_dispersions)) < 0)
        broken = "--ac-dispersion is mad or variance";
    else if (moe_choice(f->usmoe_group, moe_groups, MOE_CHOICES(moe_groups)) < 0)
        broken = "--usmoe-group is default, batch, sequence or position";
    if (broken) snprintf(why, cap, "%s", broken);
    return broken == NULL;
}

/* Whether a pattern is 1 to 63 router letters, or stages of them split by '|', whose AC
   layers ('c', 'a', 'w') each follow an MoE layer of their stage, whose choices are their
   clusters; else why not. */
static inline int moe_pattern_valid(const char *pattern, size_t length, char *why, size_t cap) {
    size_t i;
    int seen_moe = 0;
    if (length < 1 || length > MOE_PATTERN_MAX) {
        snprintf(why, cap, "a pattern is 1 to %d router letters, not %lu", MOE_PATTERN_MAX, (unsigned long)length);
        return 0;
    }
    for (i = 0; i < length; i++) {
        const char letter = pattern[i];
        if (letter == '|') { /* a new stage: labels start afresh */
            if (i == 0 || i + 1 == length || pattern[i - 1] == '|') {
                snprintf(why, cap, "pattern '%.*s': an empty stage", (int)length, pattern);
                return 0;
            }
            seen_moe = 0;
            continue;
        }
        if (!letter || !strchr("gsobxcuetwmnaf", letter)) {
            snprintf(why, cap, "pattern '%.*s': '%c' is no router (g s o b x c u e t w m n a f)", (int)length, pattern,
                     letter ? letter : '?');
            return 0;
        }
        if ((letter == 'c' || letter == 'a' || letter == 'w') && !seen_moe) {
            snprintf(why, cap, "pattern '%.*s': an AC layer ('%c') needs an MoE layer before it", (int)length, pattern,
                     letter);
            return 0;
        }
        seen_moe |= letter != 'f';
    }
    return 1;
}

/* Splits a comma-separated list of at most max patterns into out. The count, or 0 with the
   reason in why. */
static inline int moe_split_patterns(const char *list, char out[][MOE_PATTERN_MAX + 1], int max, char *why, size_t cap) {
    const char *p = list;
    int n = 0;
    for (;;) {
        const size_t length = strcspn(p, ",");
        if (n == max) {
            snprintf(why, cap, "at most %d patterns, not more", max);
            return 0;
        }
        if (!moe_pattern_valid(p, length, why, cap)) return 0;
        memcpy(out[n], p, length);
        out[n++][length] = '\0';
        if (!p[length]) return n;
        p += length + 1;
    }
}

/* The flags a model was made with, from its settings (a checkpoint's model). */
static inline moe_flags moe_flags_of_model(const acmoe_lm_desc *d) {
    const acmoe_moe_desc *m = &d->moe;
    moe_flags f;
    memset(&f, 0, sizeof f);
    f.activation = moe_choice_name((int)d->activation, moe_activations, MOE_CHOICES(moe_activations));
    f.ac_scaling = moe_choice_name((int)m->ac.scaling - ACMOE_AC_SCALE_PER_FEATURE, moe_scalings, MOE_CHOICES(moe_scalings));
    f.ac_dispersion =
        moe_choice_name((int)m->ac.dispersion - ACMOE_AC_DISP_MAD, moe_dispersions, MOE_CHOICES(moe_dispersions));
    f.usmoe_group = moe_choice_name((int)m->group, moe_groups, MOE_CHOICES(moe_groups));
    f.capacity = m->capacity, f.balance_alpha = m->balance_alpha, f.balance_temp = m->balance_temperature;
    f.z_loss = m->z_loss, f.usmoe_budget = m->usmoe_budget, f.usmoe_rho = m->usmoe_rho;
    f.soft_slots = m->soft_slots, f.proj_dim = m->proj_dim, f.ac_experts = m->ac_weight_experts;
    f.ac_eps = m->ac.eps, f.ac_clip = m->ac.clip, f.ac_robust = m->ac.robust;
    return f;
}

static inline void moe_flags_apply(const moe_flags *f, acmoe_lm_desc *d) {
    acmoe_moe_desc *m = &d->moe;
    d->activation = (acmoe_activation)moe_choice(f->activation, moe_activations, MOE_CHOICES(moe_activations));
    m->capacity = f->capacity, m->balance_alpha = f->balance_alpha, m->balance_temperature = f->balance_temp;
    m->z_loss = f->z_loss, m->usmoe_budget = f->usmoe_budget, m->usmoe_rho = f->usmoe_rho;
    m->group = (acmoe_group)moe_choice(f->usmoe_group, moe_groups, MOE_CHOICES(moe_groups));
    m->soft_slots = f->soft_slots, m->proj_dim = f->proj_dim, m->ac_weight_experts = f->ac_experts;
    m->ac.eps = f->ac_eps, m->ac.clip = f->ac_clip, m->ac.robust = f->ac_robust;
    m->ac.scaling = (acmoe_ac_scaling)(ACMOE_AC_SCALE_PER_FEATURE +
                                       moe_choice(f->ac_scaling, moe_scalings, MOE_CHOICES(moe_scalings)));
    m->ac.dispersion = (acmoe_ac_dispersion)(ACMOE_AC_DISP_MAD + moe_choice(f->ac_dispersion, moe_dispersions,
                                                                            MOE_CHOICES(moe_dispersions)));
}

/* A line for each layer whose router has options of its own, as the layer resolved them. */
static inline void moe_print_settings(acmoe_lm *lm) {
    int l;
    for (l = 0; l < acmoe_lm_n_layers(lm); l++) {
        const acmoe_moe_desc m = acmoe_moe_settings(acmoe_lm_moe(lm, l));
        if (m.router_input == ACMOE_INPUT_AC)
            printf("  layer %d AC options: eps %g, clip %g, %s scaling, %s dispersion%s%s%s\n", l, m.ac.eps, m.ac.clip,
                   moe_scalings[m.ac.scaling - ACMOE_AC_SCALE_PER_FEATURE],
                   moe_dispersions[m.ac.dispersion - ACMOE_AC_DISP_MAD], m.ac.robust ? ", robust" : "",
                   m.ac_weight_experts ? ", weighted input to the experts" : "",
                   m.ac_mix_labels ? ", labels mixed by gate" : "");
        if (m.router_input == ACMOE_INPUT_PROJECTED) printf("  layer %d XMoE projection: %d wide\n", l, m.proj_dim);
        if (m.router_select == ACMOE_SELECT_USMOE)
            printf("  layer %d USMoE: budget %g pairs per token of each %s, rho %g\n", l, m.usmoe_budget,
                   m.group == ACMOE_GROUP_BATCH ? "call" : moe_groups[m.group], m.usmoe_rho);
        if (m.router_select == ACMOE_SELECT_PRIORITY)
            printf("  layer %d Swin-MoE gate: noise %g / E in training, capacity %g, load and importance loss %g\n", l,
                   m.gate_noise, m.capacity, m.importance_loss);
        if (m.router_select == ACMOE_SELECT_SOFT)
            printf("  layer %d Soft MoE: %d slot(s) per expert for each %s\n", l, m.soft_slots,
                   m.group == ACMOE_GROUP_SEQUENCE ? "image" : "position");
    }
}

/* The router stability (see acmoe_moe_stats) of each MoE layer that has an MoE layer before
   it in its stage, on one line. */
static inline void moe_print_stability(acmoe_lm *lm) {
    const char *pattern = acmoe_lm_settings(lm).pattern;
    int l = 0, seen_moe = 0, printed = 0;
    for (; *pattern; pattern++) {
        acmoe_moe_stats st;
        if (*pattern == '|') { /* a new stage: labels start afresh */
            seen_moe = 0;
            continue;
        }
        st = acmoe_moe_get_stats(acmoe_lm_moe(lm, l));
        if (*pattern != 'f' && seen_moe++) {
            if (!printed++) printf("  router stability (token pairs whose best-expert relation changed, running mean):");
            printf(" layer %d %.3f", l, st.router_stability);
        }
        l++;
    }
    if (printed) printf("\n");
}

#endif
