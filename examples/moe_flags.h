/* The MoE layers' options as flags, shared by the training examples. A program's options
   struct holds a moe_flags member named moe and lists MOE_FLAGS in its flag table (cli.h);
   moe_flags_check refuses bad values before any work, moe_flags_apply sets a model's
   options from the flags, and moe_print_settings shows what each layer runs with. */
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
static const char *const moe_groups[] = {"batch", "sequence", "position"}; /* from ACMOE_GROUP_BATCH */
#define MOE_CHOICES(names) (int)(sizeof names / sizeof names[0])

#define MOE_FLAGS                                                                                                \
    FLAG("--activation", OPT_STR, moe.activation, "expert activation: relu (the paper), gelu or swiglu"),          \
    FLAG("--capacity", OPT_FLOAT, moe.capacity, "expert capacity factor with token dropping (0: no limit)"),       \
    FLAG("--balance-alpha", OPT_FLOAT, moe.balance_alpha, "Switch load-balancing loss weight (0: off, as in the paper)"), \
    FLAG("--balance-temp", OPT_FLOAT, moe.balance_temp, "temperature of the balance loss's softmax"),              \
    FLAG("--z-loss", OPT_FLOAT, moe.z_loss, "router z-loss weight (0: off)"),                                     \
    FLAG("--ac-eps", OPT_FLOAT, moe.ac_eps, "AC ('c' layers): added to the dispersion (0: 1e-4 for mad, 0.1 for variance)"), \
    FLAG("--ac-clip", OPT_FLOAT, moe.ac_clip, "AC ('c' layers): weights clipped at this multiple of their mean"), \
    FLAG("--ac-scaling", OPT_STR, moe.ac_scaling,                                                                 \
         "AC ('c' layers): weights divided by their mean per feature (per-feature), or by their mean before "     \
         "(preclip) or after (postclip) clipping"),                                                               \
    FLAG("--ac-dispersion", OPT_STR, moe.ac_dispersion,                                                           \
         "AC ('c' layers): mad (the paper), or variance (weights neither clipped nor scaled)"),                   \
    FLAG("--ac-experts", OPT_INT, moe.ac_experts, "AC ('c' layers): 1: the experts see the weighted input too"),  \
    FLAG("--ac-robust", OPT_INT, moe.ac_robust,                                                                   \
         "1: AC weights leave out clusters of 0 or 1 tokens (not the paper's); 0: as the paper"),                 \
    FLAG("--usmoe-budget", OPT_FLOAT, moe.usmoe_budget, "USMoE: (token, expert) pairs per token of a group (0: --top-k)"), \
    FLAG("--usmoe-rho", OPT_FLOAT, moe.usmoe_rho, "USMoE: share of the sigmoid score, in (0, 1]"),                \
    FLAG("--usmoe-group", OPT_STR, moe.usmoe_group,                                                               \
         "USMoE: the tokens sharing a budget: the call (batch), each sequence, or each position (causal)"),       \
    FLAG("--soft-slots", OPT_INT, moe.soft_slots, "Soft MoE: slots per expert and group"),                        \
    FLAG("--proj-dim", OPT_INT, moe.proj_dim, "XMoE: width of the router's projection")

/* The library's defaults ('a' layers keep the AC options of the paper's Soft MoE models
   whatever these say: see acmoe_moe_router_preset). */
static moe_flags moe_flags_defaults(void) {
    moe_flags f;
    memset(&f, 0, sizeof f);
    f.activation = "relu", f.ac_scaling = "per-feature", f.ac_dispersion = "mad", f.usmoe_group = "batch";
    f.balance_temp = 1.0f, f.ac_clip = 10.0f, f.usmoe_rho = 0.5f, f.soft_slots = 1, f.proj_dim = 8;
    return f;
}

/* The index of name among count names, or -1. */
static int moe_choice(const char *name, const char *const *names, int count) {
    int i;
    for (i = 0; i < count; i++)
        if (!strcmp(name, names[i])) return i;
    return -1;
}

static void moe_require(int ok, const char *program, const char *message) {
    if (ok) return;
    fprintf(stderr, "%s: %s\n", program, message);
    exit(2);
}

/* Exits with status 2 and the rule a flag broke; the library checks the rest (such as the
   USMoE budget against the number of experts) when the model is made. */
static void moe_flags_check(const moe_flags *f, const char *program) {
    moe_require(moe_choice(f->activation, moe_activations, MOE_CHOICES(moe_activations)) >= 0, program,
                "--activation is relu, gelu or swiglu");
    moe_require(moe_choice(f->ac_scaling, moe_scalings, MOE_CHOICES(moe_scalings)) >= 0, program,
                "--ac-scaling is per-feature, preclip or postclip");
    moe_require(moe_choice(f->ac_dispersion, moe_dispersions, MOE_CHOICES(moe_dispersions)) >= 0, program,
                "--ac-dispersion is mad or variance");
    moe_require(moe_choice(f->usmoe_group, moe_groups, MOE_CHOICES(moe_groups)) >= 0, program,
                "--usmoe-group is batch, sequence or position");
    moe_require(f->capacity >= 0.0f && f->balance_alpha >= 0.0f && f->z_loss >= 0.0f && f->ac_eps >= 0.0f &&
                    f->usmoe_budget >= 0.0f,
                program, "--capacity, --balance-alpha, --z-loss, --ac-eps and --usmoe-budget are at least 0");
    moe_require(f->balance_temp > 0.0f && f->ac_clip > 0.0f && f->soft_slots > 0 && f->proj_dim > 0, program,
                "--balance-temp, --ac-clip, --soft-slots and --proj-dim are above 0");
    moe_require(f->usmoe_rho > 0.0f && f->usmoe_rho <= 1.0f, program, "--usmoe-rho is in (0, 1]");
}

static void moe_flags_apply(const moe_flags *f, acmoe_lm_desc *d) {
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
static void moe_print_settings(acmoe_lm *lm) {
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
        if (m.router_select == ACMOE_SELECT_SOFT)
            printf("  layer %d Soft MoE: %d slot(s) per expert for each %s\n", l, m.soft_slots,
                   m.group == ACMOE_GROUP_SEQUENCE ? "image" : "position");
    }
}

#endif
