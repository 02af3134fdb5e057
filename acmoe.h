/* acmoe.h - v0.1.0 - Mixture-of-Experts on the CPU with the Adaptive Clustering router.
   MIT licence (see the end of the file).

   USAGE
     In exactly one C or C++ file:
         #define ACMOE_IMPLEMENTATION
         #include "acmoe.h"
     Everywhere else, include it without the define. Link with -lm -lpthread.

         acmoe_ctx *ctx;
         float a[2 * 3] = {1, 2, 3, 4, 5, 6}, b[3 * 2] = {1, 0, 0, 1, 1, 1}, c[2 * 2];
         if (acmoe_ctx_create(&ctx, NULL) != ACMOE_OK) return 1;
         acmoe_status s = acmoe_matmul(ctx, ACMOE_NN, 2, 2, 3, a, 3, b, 2, c, 2, 0);
         printf("%s: %g %g / %g %g\n", acmoe_status_string(s), c[0], c[1], c[2], c[3]);
         acmoe_ctx_destroy(ctx);

   OPTIONS (define before the #include that has ACMOE_IMPLEMENTATION, unless noted)
     ACMOE_IMPLEMENTATION   emit the implementation in this translation unit
     ACMOE_STATIC           make every function static (define before every #include)
     ACMOE_MALLOC(sz) ACMOE_REALLOC(p,sz) ACMOE_FREE(p)
                            replace the allocator; define all three or none
     ACMOE_ASSERT(x)        check for programmer errors (default: assert from <assert.h>)
     ACMOE_NO_SIMD          portable scalar kernels only
     ACMOE_NO_AVX512        never compile or choose the AVX-512 kernels
     ACMOE_NO_THREADS       build without pthreads; every context runs on the calling thread
                            (threads need pthreads and the GCC/Clang __atomic builtins)
     ACMOE_MPI              acmoe_comm_mpi, a communicator over MPI (define before every
                            #include; build with mpicc)

   CONTENTS
     Declarations (under the include guard), numbered as the sections below
     1. Platform and CPU features   feature detection, kernel paths
     2. Memory                      status strings, allocator
     3. Random numbers              xoshiro256** generator, uniform and normal draws
     4. Threads and contexts        thread pool, per-thread workspace, communicators
     5. Matrix multiplication       micro-kernels, column kernels, row kernels, packing, driver
     6. Shared pieces               finiteness, parameter directory, carving, init, biases, clocks
     7. Routers                     top-k gating, the Adaptive Clustering router
     8. MoE layer                   parameters, dispatch, experts, forward and backward, experts over ranks
     9. Transformer pieces          layer norm, self-attention (causal or not), cross-entropy
    10. Transformer models          options by name, language model, vision encoder, decoding, sampling
    11. Optimizer                   AdamW, learning-rate schedules, gradient clipping
    12. Checkpoints                 safetensors writer and validating reader
    13. Data and training loop      byte and token corpora, batches, evaluation (clean or damaged), the loop
     Licence

   GUARANTEES
     - No global mutable state: generators and thread pools belong to objects the caller owns.
     - Determinism: a matmul result depends only on the kernel path, the depth blocking (kc),
       the operand values, the layout and the sizes. Threads split the output into disjoint
       blocks and never split the reduction dimension, so 1 and N threads give bit-identical
       results, and a row or column of the output computed alone equals the same row or
       column of a larger product (so decoding one token at a time matches the full forward
       pass). MoE layers and attention give each expert or head to one thread, so whole
       training steps keep this: same seed, same kernel path, same bits, whatever the thread
       count.
     - No allocation inside a step: contexts, layers and models make their workspace when
       they are created (the training loop adds two token buffers before its first step).
     - Bad input returns a status and changes nothing; ACMOE_ASSERT is for programmer errors.
*/
#ifndef ACMOE_H
#define ACMOE_H

#include <stddef.h>
#include <stdint.h>
#ifdef ACMOE_MPI
#include <mpi.h> /* before the C linkage block: C++ MPI headers bring templates */
#endif

#define ACMOE_VERSION_MAJOR 0
#define ACMOE_VERSION_MINOR 1
#define ACMOE_VERSION_PATCH 0

#ifndef ACMOE_API
#ifdef ACMOE_STATIC
#define ACMOE_API static
#else
#define ACMOE_API extern
#endif
#endif

/* Alignment of parameter buffers and workspace, in bytes (one cache line, one zmm register). */
#define ACMOE_ALIGN 64

#ifdef __cplusplus
extern "C" {
#endif

/* ---- 2. Memory: statuses ---- */
typedef enum acmoe_status {
    ACMOE_STOPPED = 1,          /* not an error: a callback asked to stop */
    ACMOE_OK = 0,
    ACMOE_ERR_NULL = -1,        /* a required pointer was NULL */
    ACMOE_ERR_SHAPE = -2,       /* sizes or leading dimensions are negative or inconsistent */
    ACMOE_ERR_ARG = -3,         /* an option is out of range */
    ACMOE_ERR_NOMEM = -4,       /* an allocation failed */
    ACMOE_ERR_UNSUPPORTED = -5, /* this CPU or build lacks the requested feature */
    ACMOE_ERR_THREAD = -6,      /* a worker thread could not be started */
    ACMOE_ERR_NONFINITE = -7,   /* NaN or infinity in the input */
    ACMOE_ERR_IO = -8,          /* a file could not be opened, read or written */
    ACMOE_ERR_FORMAT = -9,      /* a file is truncated, corrupt or of another model */
    ACMOE_ERR_EMPTY = -10,      /* a file or an input holds no data */
    ACMOE_ERR_DIVERGED = -11    /* processes training one model hold different parameters */
} acmoe_status;

ACMOE_API const char *acmoe_status_string(acmoe_status status);

/* ---- 1. CPU features and kernel paths ---- */
typedef enum acmoe_isa {
    ACMOE_ISA_AUTO = 0, /* the best path this CPU and build support */
    ACMOE_ISA_SCALAR,   /* portable C, any CPU */
    ACMOE_ISA_AVX2,     /* x86-64 with AVX2 and FMA */
    ACMOE_ISA_AVX512,   /* x86-64 with AVX-512F */
    ACMOE_ISA_NEON,     /* aarch64 Advanced SIMD */
    ACMOE_ISA_COUNT
} acmoe_isa;

ACMOE_API const char *acmoe_isa_name(acmoe_isa isa);
ACMOE_API int acmoe_isa_supported(acmoe_isa isa);  /* by this CPU, OS and build */
ACMOE_API acmoe_isa acmoe_cpu_isa(void);           /* the best supported path */

/* ---- 3. Random numbers ----
   xoshiro256** (Blackman and Vigna), seeded through splitmix64. Normal draws use the
   Box-Muller transform and keep the second value of each pair, so the whole state is this
   struct: copy it to save and restore a stream. */
typedef struct acmoe_rng {
    uint64_t s[4];
    float spare;
    int has_spare;
} acmoe_rng;

ACMOE_API acmoe_status acmoe_rng_seed(acmoe_rng *rng, uint64_t seed);
ACMOE_API uint64_t acmoe_rng_u64(acmoe_rng *rng);
ACMOE_API uint32_t acmoe_rng_below(acmoe_rng *rng, uint32_t n); /* uniform in [0, n), n > 0 */
ACMOE_API float acmoe_rng_uniform(acmoe_rng *rng);              /* uniform in [0, 1) */
ACMOE_API float acmoe_rng_normal(acmoe_rng *rng);               /* mean 0, deviation 1 */

/* ---- 4. Contexts and communicators ----
   A context owns the thread pool, the kernel path and the matmul workspace. Use one context
   from one thread at a time; two contexts never interfere. Zero fields mean the defaults. */
typedef struct acmoe_ctx_desc {
    int n_threads; /* default: online CPUs; always 1 under ACMOE_NO_THREADS */
    acmoe_isa isa; /* default: acmoe_cpu_isa() */
    int mc, kc, nc; /* cache blocking of the matmul (rows, depth, columns); 0: the path's own */
    /* Optional monotonic clock in seconds. When set, layers time their phases (routing and
       experts) into their stats; the library itself never reads a clock. */
    double (*clock)(void);
    /* Optional ranks that share each batch (data parallelism): AC layers then take their
       statistics, cluster sizes, means and dispersions, over the tokens of every rank,
       summed in rank order, as one process with the whole batch would (every rank must make
       the same forward calls). NULL: the statistics of each call's own tokens, as the
       reference computes them on each GPU. */
    struct acmoe_comm *comm;
} acmoe_ctx_desc;

typedef struct acmoe_ctx acmoe_ctx;

ACMOE_API acmoe_ctx_desc acmoe_ctx_defaults(void);
ACMOE_API acmoe_status acmoe_ctx_create(acmoe_ctx **ctx, const acmoe_ctx_desc *desc);
ACMOE_API void acmoe_ctx_destroy(acmoe_ctx *ctx);
/* Another kernel path for the context's next calls; the blocking stays the one it was
   created with (the path's own when the desc left it 0). */
ACMOE_API acmoe_status acmoe_ctx_set_isa(acmoe_ctx *ctx, acmoe_isa isa);
ACMOE_API acmoe_ctx_desc acmoe_ctx_settings(const acmoe_ctx *ctx); /* resolved values */

/* A communicator: the collectives that training across processes needs, behind functions
   the caller fills (acmoe_comm_mpi fills them with MPI's under ACMOE_MPI). Every call is
   collective: each of the size ranks makes the same calls in the same order. */
typedef struct acmoe_comm acmoe_comm;
struct acmoe_comm {
    int rank, size; /* this process, 0 <= rank < size */
    void *user;
    /* data[count] becomes the sum of every rank's data, added in rank order, so that every
       rank gets the same bits, run after run. */
    acmoe_status (*sum)(acmoe_comm *comm, float *data, size_t count);
    /* Sends send_counts[q] floats to each rank q (taken from send in rank order) and receives
       recv_counts[q] from each rank q (stored in recv in rank order). */
    acmoe_status (*exchange)(acmoe_comm *comm, const float *send, const size_t *send_counts, float *recv,
                             const size_t *recv_counts);
    acmoe_status (*broadcast)(acmoe_comm *comm, void *data, size_t bytes, int root);
    acmoe_status (*barrier)(acmoe_comm *comm);
};

/* Rank 0 of 1: a sum and a broadcast leave the data as it is, an exchange copies. */
ACMOE_API acmoe_comm acmoe_comm_single(void);
#ifdef ACMOE_MPI
/* The ranks of *comm, which must outlive the communicator. The sum goes through a scratch
   buffer that grows on first use to the largest count summed (so a training step allocates
   only on its first call); acmoe_comm_mpi_destroy frees it. A failed MPI call is
   ACMOE_ERR_IO. */
ACMOE_API acmoe_status acmoe_comm_mpi(acmoe_comm *out, MPI_Comm *comm);
ACMOE_API void acmoe_comm_mpi_destroy(acmoe_comm *comm);
#endif

/* ---- 5. Matrix multiplication ----
   C[m][n] = op(A) op(B), or C += op(A) op(B) when accumulate is non-zero, all row-major with
   leading dimensions (elements between rows). op(A) is m x k: A itself (m rows of lda) for
   NN and NT, or A transposed (A has k rows of lda) for TN and TT. op(B) is k x n: B itself
   (k rows of ldb) for NN and TN, or B transposed (n rows of ldb) for NT and TT. For a linear
   layer Y = X W^T is NT, dX = dY W is NN and dW += dY^T X is TN. C must not overlap A or B.
   k = 0 sets C to zero (or leaves it unchanged when accumulating). */
typedef enum acmoe_layout { ACMOE_NN, ACMOE_NT, ACMOE_TN, ACMOE_TT } acmoe_layout;

ACMOE_API acmoe_status acmoe_matmul(acmoe_ctx *ctx, acmoe_layout layout, int m, int n, int k,
                                    const float *a, int lda, const float *b, int ldb, float *c,
                                    int ldc, int accumulate);

/* ---- 7. Routers: the Adaptive Clustering router ----
   "Tight Clusters Make Specialized Experts" (Nielsen et al., ICLR 2025), as its reference code
   computes it. Each token's cluster is its best expert in the previous MoE layer. Per cluster c
   and feature q the router measures how tightly the cluster's tokens sit (mean absolute
   deviation by default), weights W[c][q] = 1 / (dispersion + eps), clips and rescales W, and
   routes token i by logit[i][j] = sum_q x[i][q] W[c_i][q] Ehat[j][q] with Ehat the unit-norm
   expert embeddings. The statistics come from exactly the tokens of the call, so the routing
   of a token depends on the rest of the batch, in training and in evaluation alike. Zero
   fields of the descriptor mean the language-model defaults. */
typedef enum acmoe_ac_scaling {
    ACMOE_AC_SCALE_DEFAULT = 0,
    ACMOE_AC_SCALE_PER_FEATURE,  /* W[.][q] /= mean over clusters of W[.][q] (language models) */
    ACMOE_AC_SCALE_PRECLIP_MEAN, /* W /= mean of W before clipping (Swin-MoE vision) */
    ACMOE_AC_SCALE_POSTCLIP_MEAN /* W /= mean of W after clipping (Soft MoE vision) */
} acmoe_ac_scaling;

typedef enum acmoe_ac_dispersion {
    ACMOE_AC_DISP_DEFAULT = 0,
    ACMOE_AC_DISP_MAD,     /* mean absolute deviation (the paper) */
    ACMOE_AC_DISP_VARIANCE /* variance; W = 1 / (var + eps), never clipped or rescaled */
} acmoe_ac_dispersion;

typedef struct acmoe_ac_desc {
    float eps;  /* added to the dispersion: 1e-4 for MAD, 0.1 for variance */
    float clip; /* W is clipped at clip x its mean: 10 */
    acmoe_ac_scaling scaling;
    acmoe_ac_dispersion dispersion;
    /* The reference gives a cluster of 0 or 1 tokens a dispersion of 0, so weight 1/eps, which
       drags both means up and flattens every other cluster's weights. Robust mode (a deviation
       from the paper) leaves such clusters out of the means and gives them weight 1. */
    int robust;
} acmoe_ac_desc;

ACMOE_API acmoe_ac_desc acmoe_ac_defaults(void);

/* One routing decision on raw arrays, for users with their own framework. x is the router
   input [n][d]; prev_idx the previous layer's top-k [n][prev_k], column 0 its best expert;
   emb the expert embeddings [n_experts][d], used as given (no re-projection). Writes the
   top-k experts per token, sorted by logit with ties to the lower index, and their gates
   (softmax over the k logits). Optional outputs: logits [n][n_experts], and W [K][d] with
   K = 1 + max(prev_idx) (*w_rows_out = K). Non-finite logits of finite inputs are replaced
   by the smallest finite logit of the call, as in the reference; NaN or infinity in x or emb
   is ACMOE_ERR_NONFINITE. Allocates scratch (K*d + n_experts*d floats, more without
   logits_out); layers route through preallocated workspace instead. */
ACMOE_API acmoe_status acmoe_ac_route(const acmoe_ac_desc *desc, const float *x, int n, int d,
                                      const int32_t *prev_idx, int prev_k, const float *emb,
                                      int n_experts, int k, int32_t *idx_out, float *gate_out,
                                      float *logits_out, float *w_out, int *w_rows_out);

/* ---- 8. MoE layer ----
   out[t] = sum over the experts j routed to token t of gate[t][j] expert_j(x[t]), with
   expert_j(x) = W2_j act(W1_j x + b1_j) + b2_j. The (token, expert) pairs are counted per
   expert, gathered into one contiguous block per expert, run through one matmul per expert
   and combined in (token, rank) order, so results are deterministic. Parameters live in a
   buffer the caller owns (acmoe_moe_param_count floats, with a gradient buffer of the same
   size); the layer keeps views into it and a workspace for max_tokens tokens, so forward and
   backward allocate nothing.

   A router is three independent choices: what it looks at (input), how it scores experts
   (score) and how it turns scores into pairs and gates (select). The routers of the
   literature are combinations, set by acmoe_moe_router_preset():
     'g' SMoE        token,     linear, top-k with softmax over the k (GShard's top-2 gate)
     's' Switch      token,     linear, top-1 with the full-softmax probability as gate
     'o' cosine      token,     cosine, top-k: the AC router without W (re-projected like AC)
     'b' StableMoE   token,     cosine, top-k, the embeddings not re-projected (the reference's
                                        StableMoE gate)
     'x' XMoE        projected, cosine, top-k
     'c' AC          AC,        cosine, top-k (Adaptive Clustering, the paper's router)
   ("cosine" is the literature's name: the score is a dot product of the router input with
   unit-norm expert embeddings, the input itself not normalised.)
     'u' USMoE       token,     linear, unified score, top pairs of each group; no router
                                        bias, position groups (the USMoE code)
     'v' AC USMoE    AC,        cosine, USMoE's selection on the AC router's scores: a
                                        composition of the two papers no paper has run
     'e' expert      token,     linear, each expert takes its top tokens (non-causal)
     't' Swin-MoE    token,     linear, priority: Swin-MoE's gate (no bias, noise 1/E in
                                        training, capacity 1.25, load and importance loss
                                        0.01), the paper's Swin baseline
     'w' AC Swin-MoE AC,        linear, priority: 't' with the paper's AC options for Swin:
                                        weights on the whole MoE input, eps 1e-4, clip 1.5,
                                        pre-clip scaling
     'm' Soft MoE    token,     slot,   every token reaches every expert through slots; the
                                        slots mix the raw tokens (vmoe)
     'n' Soft MoE    token,     slot,   as the paper's code runs it: normalised tokens feed
                                        the score and the slots
     'a' AC Soft MoE AC,        slot,   'n' with the paper's AC options for it: statistics of
                                        the normalised tokens, weights that reach the
                                        slots, each token's W the mix of its previous top
                                        mix_k slots' rows, eps 0.35, clip 5, post-clip
                                        scaling
     'f' dense       token,     none,   dense: a plain feed-forward layer, every token through
                                        one expert with gate 1, no router parameters
   Other combinations are allowed, e.g. AC input with USMoE or Switch selection.

   Soft MoE (Puigcerver et al. 2024) has no pairs: each expert owns soft_slots slots per
   group, a slot's input is a mix of the group's tokens (dispatch: for each slot, a softmax
   over the group's tokens), and each token's output a mix of all slot outputs (combine: for
   each token, a softmax over the slots). Both softmaxes share the logits of the slot score.
   A token's output depends on its whole group, so Soft MoE is causal only with position
   groups. For the next layer's AC labels a Soft MoE layer reports each token's mix_k best
   slots by logit: their experts, and the softmax over their logits (its combine weights
   renormalised over them). */
typedef enum acmoe_router_input {
    ACMOE_INPUT_TOKEN = 0, /* the token itself */
    ACMOE_INPUT_PROJECTED, /* x R, R a learned d_model -> proj_dim projection (XMoE) */
    ACMOE_INPUT_AC,        /* x * W[label]: the Adaptive Clustering feature weights */
    ACMOE_INPUT_COUNT
} acmoe_router_input;

typedef enum acmoe_router_score {
    ACMOE_SCORE_LINEAR = 0, /* z = Wr u + b */
    ACMOE_SCORE_COSINE,     /* z_j = u . e_j / |e_j|: a dot product with unit-norm expert embeddings
                               (u is not normalised, so not a cosine similarity); e re-projected to
                               norm 1.5 each forward (XMoE and AC) unless no_reprojection */
    ACMOE_SCORE_SLOT,       /* z_s = scale (u / |u|) . (phi_s / |phi_s|), a learned vector
                               phi_s per slot and one learned scale: Soft MoE's score */
    ACMOE_SCORE_NONE,       /* no router: a dense layer (with ACMOE_SELECT_DENSE) */
    ACMOE_SCORE_COUNT
} acmoe_router_score;

typedef enum acmoe_router_select {
    ACMOE_SELECT_TOPK = 0,       /* top-k per token, gates softmax over the k */
    ACMOE_SELECT_SWITCH,         /* top-k per token, gates the full-softmax probabilities */
    ACMOE_SELECT_USMOE,          /* w = (1-rho) softmax(z) + rho (2/E) sigmoid(z); the top
                                    budget*|group| (token, expert) pairs of each group, gate w */
    ACMOE_SELECT_EXPERT_CHOICE,  /* expert j takes its top ceil(capacity*T/E) tokens by softmax
                                    probability, gate that probability; sees the whole call,
                                    so not for causal models */
    ACMOE_SELECT_SOFT,           /* Soft MoE over each group (see above); needs the slot
                                    score, and the slot score needs it */
    ACMOE_SELECT_PRIORITY,       /* Swin-MoE's (Tutel's): in training the logits get Gaussian
                                    noise of deviation gate_noise / E; top-k by the full softmax
                                    of those logits, gates those probabilities; each expert
                                    takes k x floor(capacity x ceil(n / E)) pairs (capacity
                                    default 1.25), the tokens in the order of their best
                                    probability, all first choices before any second */
    ACMOE_SELECT_DENSE,          /* a feed-forward layer: one expert, every token, gate 1, no
                                    router parameters ('f'); needs the score none, and it needs it */
    ACMOE_SELECT_COUNT
} acmoe_router_select;

/* What a Soft MoE layer's slots mix and its score reads. */
typedef enum acmoe_soft_input {
    ACMOE_SOFT_RAW = 0,    /* slots mix the tokens as they come, the score reads them L2-normalised
                              (Puigcerver et al. 2024, vmoe) */
    ACMOE_SOFT_NORMALIZED, /* the tokens are L2-normalised first and feed both the score and the
                              slots; with AC input the AC statistics are taken on the normalised
                              tokens and the weighted tokens feed both, not renormalised (the
                              paper's Soft MoE code, softmoe.py) */
    ACMOE_SOFT_INPUT_COUNT
} acmoe_soft_input;

/* The tokens that USMoE's pair budget and Soft MoE's slots are shared by. */
typedef enum acmoe_group {
    ACMOE_GROUP_DEFAULT = 0, /* position when seq_len is set (USMoE's language models group each
                                position across the batch), else the whole call */
    ACMOE_GROUP_BATCH,       /* all tokens of the call */
    ACMOE_GROUP_SEQUENCE,    /* each run of seq_len tokens (not causal) */
    ACMOE_GROUP_POSITION,    /* the tokens at one position across the sequences (causal) */
    ACMOE_GROUP_COUNT
} acmoe_group;

typedef enum acmoe_activation {
    ACMOE_ACT_RELU = 0, /* the paper's reference code */
    ACMOE_ACT_GELU,     /* exact (erf) form */
    ACMOE_ACT_SWIGLU,   /* W1 yields 2 d_ff: silu(gate half) * other half */
    ACMOE_ACT_COUNT
} acmoe_activation;

typedef struct acmoe_moe_desc {
    int d_model, d_ff, n_experts; /* required */
    int max_tokens;               /* required: the most tokens one forward call takes */
    int top_k;                    /* default 2 */
    acmoe_router_input router_input;
    acmoe_router_score router_score;
    acmoe_router_select router_select;
    acmoe_activation activation;
    int proj_dim;          /* projected input width, default 8 (XMoE) */
    float capacity;        /* top-k, Switch: at most ceil(capacity * n * k / E) pairs per expert,
                              later ranks and tokens dropped; 0 = no limit (the reference).
                              Expert choice: tokens per expert ceil(capacity * n / E), default 2 */
    float usmoe_budget;    /* USMoE pairs per token of a group, default top_k; fractional works */
    float usmoe_rho;       /* default 0.5 */
    acmoe_group group;     /* USMoE and Soft MoE */
    int no_router_bias;    /* linear score: z = Wr u without the bias (USMoE's gate) */
    int no_reprojection;   /* cosine score: embeddings keep their norm (StableMoE's gate) */
    float gate_noise;      /* priority selection: noise of deviation gate_noise / E on the logits
                              in training (acmoe_moe_set_training); default 0 ('t' and 'w': 1) */
    float importance_loss; /* weight of Tutel's load and importance loss (l_imp + l_load) / 2,
                              l = var / mean^2 of the experts' summed probabilities and of their
                              expected loads under the noise; needs gate_noise > 0; default 0 */
    int seq_len;           /* tokens per sequence, for sequence and position groups */
    int soft_slots;        /* Soft MoE: slots per expert and group, default 1 */
    acmoe_soft_input soft_input; /* Soft MoE: what the slots mix (see acmoe_soft_input) */
    int mix_k;             /* Soft MoE: the slots each token reports to the next layer, default 8
                              (at most the slot count) */
    float balance_alpha;   /* Switch balance loss alpha E sum f_j P_j; 0 = off (default);
                              the auxiliary losses and capacity do not apply to Soft MoE */
    float balance_temperature; /* P from softmax(z / T); default 1, the reference cosine runs 0.3 */
    float z_loss;          /* beta mean(logsumexp(z)^2); 0 = off (default) */
    int ac_max_clusters;   /* AC labels must be below this; default n_experts */
    int ac_weight_experts; /* AC: the experts see x * W[label] too (the vision variants) */
    int ac_mix_labels;     /* AC: a token's W row is the gate-weighted mix of its previous
                              experts' rows (the Soft MoE variant); needs prev_gate */
    acmoe_ac_desc ac;      /* AC options; zero fields: the language-model defaults */
} acmoe_moe_desc;

/* What the last forward call did, for inspection; arrays belong to the layer. */
typedef struct acmoe_moe_stats {
    int n_tokens, top_k, n_experts;
    const int32_t *expert_index;  /* [n_tokens][top_k] experts by score, best first: the
                                     next layer's labels (whatever the selection rule) */
    const float *gate;            /* [n_tokens][top_k] their softmax over the k */
                                  /* Soft MoE: top_k is the layer's resolved mix_k */
    const int *tokens_per_expert; /* [n_experts] pairs each expert processed */
    int pairs, dropped;           /* (token, expert) pairs processed; dropped by capacity */
    const int *pair_token;        /* [pairs] the routing itself, in (token, rank) order */
    const int *pair_expert;
    const float *pair_gate;
    float aux_loss;               /* balance and z losses, already scaled; 0 when off */
    int nonfinite_logits;         /* replaced by the smallest finite logit of the call */
    double seconds_routing;       /* last forward and backward, with a context clock */
    double seconds_experts;
    /* The share of token pairs (i, j) whose relation "same best expert" differs between the
       previous MoE layer and this one, as a running average over forward calls given the
       previous layer's labels (0.8 old + 0.2 new, from 0): lower is more stable. The form of
       the reference's router_stability (swin_transformer_cosa.py), over every token of the
       call. */
    float router_stability;
    int ac_clusters;              /* AC: rows of W (1 + the largest previous index) */
    int ac_small_clusters;        /* ... of clusters with fewer than 2 tokens (weights 1/eps) */
    float ac_w_min, ac_w_max, ac_w_mean;
    /* Soft MoE: there are no pairs; tokens_per_expert counts slots, expert_index holds the
       experts of each token's mix_k best slots by logit (an expert may come twice with
       several slots each), and gate is their combine weight renormalised over the mix_k */
    int n_slots;                  /* n_experts * soft_slots */
    const float *slot_dispatch;   /* [n_tokens][n_slots] each slot's softmax over its group */
    const float *slot_combine;    /* [n_tokens][n_slots] each token's softmax over the slots */
} acmoe_moe_stats;

typedef struct acmoe_moe acmoe_moe;

/* Sets the router fields of desc for one of the letters above; ACMOE_ERR_ARG otherwise. */
ACMOE_API acmoe_status acmoe_moe_router_preset(acmoe_moe_desc *desc, char letter);
ACMOE_API acmoe_status acmoe_moe_resolve(const acmoe_moe_desc *desc, acmoe_moe_desc *out);
ACMOE_API size_t acmoe_moe_param_count(const acmoe_moe_desc *desc); /* 0 for a bad desc */
ACMOE_API acmoe_status acmoe_moe_create(acmoe_moe **out, const acmoe_moe_desc *desc, float *params,
                                        float *grads);
ACMOE_API void acmoe_moe_destroy(acmoe_moe *layer);
/* PyTorch's defaults for the linear layers; orthogonal rows of norm 0.32 for embeddings. */
ACMOE_API acmoe_status acmoe_moe_init_params(acmoe_moe *layer, acmoe_rng *rng);
/* prev_idx, prev_gate [n][prev_k]: the previous MoE layer's stats.expert_index and .gate,
   needed by AC input (prev_gate only when mixing labels) and ignored otherwise. x must stay
   unchanged until the backward call. */
ACMOE_API acmoe_status acmoe_moe_forward(acmoe_moe *layer, acmoe_ctx *ctx, const float *x, int n,
                                         const int32_t *prev_idx, const float *prev_gate, int prev_k,
                                         float *out);
/* Adds the parameter gradients of the last forward call (and of its aux loss) to the gradient
   buffer and writes dx [n][d_model]. AC weights and labels are constants, as in the
   reference. One backward call per forward call: it reuses the forward caches, so a second
   call is ACMOE_ERR_ARG. */
ACMOE_API acmoe_status acmoe_moe_backward(acmoe_moe *layer, acmoe_ctx *ctx, const float *dout, float *dx);
ACMOE_API acmoe_moe_stats acmoe_moe_last_stats(const acmoe_moe *layer);
/* How tightly the last forward call's tokens sit around their experts, the paper's
   question: tokens clustered by their best expert, in the layer's input space, clusters of
   fewer than 2 tokens (no spread) left out. within is the mean distance from a token to its
   cluster's centroid, between the mean distance between two clusters' centroids; plain =
   within / between, lower is tighter. ac is the same ratio in the metric the AC router
   routes in: each cluster's feature weights W computed from these clusters with the layer's
   AC options in robust mode (any router; the left-out clusters would otherwise flatten the
   others' weights), a token measured with its cluster's weights and two centroids with the
   mean of theirs. Both are 0 with fewer than 2 clusters. Soft MoE: a token's expert is its
   best slot's. Reads the forward call's x, which must be unchanged; allocates its scratch.
   ACMOE_ERR_ARG for a dense layer or before any forward call. */
typedef struct acmoe_tightness {
    float plain, ac;
    int clusters; /* experts that are the best of 2 tokens or more */
} acmoe_tightness;
ACMOE_API acmoe_status acmoe_moe_tightness(const acmoe_moe *layer, acmoe_tightness *out);
/* The options the layer runs with, defaults resolved (all zero for NULL). */
ACMOE_API acmoe_moe_desc acmoe_moe_settings(const acmoe_moe *layer);
/* Frozen, the AC router keeps the weights W of the last unfrozen forward call instead of
   measuring the batch: for decoding a token at a time, where one token has no dispersion. */
ACMOE_API void acmoe_moe_freeze_ac_weights(acmoe_moe *layer, int frozen);
/* The AC weights W [*rows][d_model] the layer routes with: those of the last unfrozen forward
   call, or of acmoe_moe_set_ac_weights. NULL before either, and for a layer without AC input. */
ACMOE_API const float *acmoe_moe_ac_weights(const acmoe_moe *layer, int *rows);
/* Gives an AC layer the weights W [rows][d_model] (1 <= rows <= ac_max_clusters, finite and
   positive), as a checkpoint restores them, so that a frozen layer routes with them. */
ACMOE_API acmoe_status acmoe_moe_set_ac_weights(acmoe_moe *layer, const float *w, int rows);
/* Training mode: each forward call draws the gate noise (gate_noise) from *noise, which must
   outlive the calls; evaluation mode (train 0, the default) has none. A model sets it for
   each of its calls, with its own generator. */
ACMOE_API void acmoe_moe_set_training(acmoe_moe *layer, int train, acmoe_rng *noise);
/* Expert parallelism: the experts split over the ranks of comm in equal contiguous blocks
   (rank r runs experts r E/size to (r + 1) E/size - 1; size must divide E). Each rank routes
   its own tokens; each (token, expert) pair's row goes to the expert's rank in one exchange
   and its output comes back in another, forward and backward alike. An expert takes its
   rows in rank order, so a layer run this way gives the bits of one process running every
   rank's tokens, rank 0's first, through it: outputs, input gradients and the gradients of
   this rank's experts (the other experts' gradients stay untouched here). Router gradients
   are this rank's tokens'. Every rank holds every parameter and must make the same calls;
   each rank allocates room for size x max_tokens x top_k rows of its experts, here, once.
   Only per-token rules without capacity (top-k, Switch): ACMOE_ERR_UNSUPPORTED otherwise.
   NULL or a single rank: back to this process alone. */
ACMOE_API acmoe_status acmoe_moe_set_expert_ranks(acmoe_moe *layer, acmoe_comm *comm);
/* The ranks the experts are split over (NULL: none), and this rank's experts. */
ACMOE_API acmoe_comm *acmoe_moe_expert_ranks(const acmoe_moe *layer, int *first, int *count);

/* ---- 10. Transformer models: a language model, or a vision encoder ----
   A decoder-only transformer: token and learned absolute position embeddings, then per
   layer causal multi-head self-attention and an MoE feed-forward block, each with a residual
   connection and layer norm (post-LN as in the reference's Switch models, or pre-LN with a
   final norm), and an output head tied to the token embedding (or not). The pattern gives
   each layer's FFN by router letter (see acmoe_moe_router_preset) or 'f' for a dense FFN, so
   "ggc" is the paper's 3-layer AC model and "gfcfcf" a GLaM-style one. AC layers take their
   labels from the MoE layer before them (dense layers pass them through); the first MoE layer
   cannot be AC. Soft MoE layers ('m' and 'a') group the tokens at each position across the
   batch, the one grouping that keeps the model causal (a position's slots see no later
   position), and in a vision encoder each image's patches; USMoE and Soft MoE groups follow
   each call's sequence length. The model owns one parameter buffer with mirrored gradient
   and Adam moment buffers, and activations for batch x seq_len tokens: steps allocate
   nothing.

   Vision encoder: with n_classes > 0 the same transformer classifies images. Each sequence
   is one image's seq_len patches of patch_dim floats (acmoe_image_patches cuts them),
   embedded by a linear layer plus learned positions; attention sees every patch (no causal
   mask); the head classifies the mean of the last layer's rows (after the final norm, with
   pre-LN) into n_classes. vocab and untied_head do not apply. It trains with
   acmoe_vision_forward, acmoe_lm_backward and acmoe_lm_step, and saves and loads like a
   language model; the token calls, decoding and the corpus loop refuse it (ACMOE_ERR_ARG).

   Swin-style backbone (Liu et al. 2021, as the paper's Swin-MoE runs use it), with window >
   0: the seq_len patches form a square grid; the patch embedding is followed by a layer
   norm and no position embedding; the pattern's stages are separated by '|' ("ff|ftfw":
   two dense blocks, then a stage of four whose second and fourth are MoE, the fourth with
   AC). Each block is pre-LN with attention inside windows of window x window patches plus a
   learned relative position bias per head, the windows of every second block of a stage
   shifted by half a window (with the mask that keeps wrapped-around patches apart; a grid no
   larger than the window is one window, never shifted). Between stages a patch merging
   layer concatenates each 2 x 2 patches, normalises and maps them to twice the width, so a
   stage has a quarter of the patches, twice the width, heads and d_ff of the one before.
   AC labels start afresh in each stage, whose first MoE layer must not be AC. pre_ln must be
   set. Dropout and drop path do not apply inside windows (dropout still acts on the block
   outputs). */
typedef struct acmoe_lm_desc {
    int vocab;            /* default 256 (bytes) */
    int d_model, n_heads; /* required; n_heads divides d_model */
    int seq_len;          /* required: the context length */
    int batch;            /* sequences per step the workspace holds; default 1 */
    const char *pattern;  /* default "ggc" */
    int d_ff;             /* default d_model */
    int n_experts, top_k; /* defaults 16 and 2 */
    acmoe_activation activation;
    int pre_ln;           /* default post-LN */
    int untied_head;      /* default: the head is the token embedding */
    float dropout;        /* on the attention and FFN outputs in training; default 0 */
    uint64_t seed;        /* initialisation and dropout; default 1 */
    acmoe_moe_desc moe;   /* MoE options, each for the layers it applies to (AC options for
                             AC layers, capacity and auxiliary losses for all but Soft MoE);
                             sizes and router pieces come from the fields above and the
                             pattern */
    int n_classes;        /* vision encoder: the classes; 0 (default): a language model */
    int patch_dim;        /* vision encoder: floats per patch */
    int window;           /* vision encoder: > 0 makes it a Swin-style backbone with windows of
                             this side (see above); 0 (default): global attention */
} acmoe_lm_desc;

typedef struct acmoe_lm acmoe_lm;

ACMOE_API acmoe_status acmoe_lm_create(acmoe_lm **out, const acmoe_lm_desc *desc);
ACMOE_API void acmoe_lm_destroy(acmoe_lm *model);
ACMOE_API acmoe_lm_desc acmoe_lm_settings(const acmoe_lm *model); /* with defaults resolved */
/* Checks desc as acmoe_lm_create does, layer by layer, without making the model's buffers:
   the status acmoe_lm_create would return for a bad descriptor, and in *out (may be NULL) the
   options acmoe_lm_settings would show (pattern: desc's, or "ggc"). */
ACMOE_API acmoe_status acmoe_lm_resolve(const acmoe_lm_desc *desc, acmoe_lm_desc *out);
ACMOE_API size_t acmoe_lm_param_count(const acmoe_lm *model);
ACMOE_API float *acmoe_lm_params(acmoe_lm *model);
ACMOE_API float *acmoe_lm_grads(acmoe_lm *model);
/* The parameters of the tensor of this name (its checkpoint name, e.g. "layers.0.ln1.weight"),
   *count of them; its gradients sit at the same place of acmoe_lm_grads. NULL for none. */
ACMOE_API float *acmoe_lm_tensor(acmoe_lm *model, const char *name, size_t *count);
/* Bytes of parameters, gradients, Adam moments and activations. */
ACMOE_API void acmoe_lm_memory(const acmoe_lm *model, size_t *params, size_t *grads, size_t *optimizer,
                               size_t *activations);
/* tokens [batch][seq]; with targets (same shape), *loss is the mean cross-entropy plus the
   MoE layers' auxiliary losses. train turns dropout on. Logits stay for acmoe_lm_logits. */
ACMOE_API acmoe_status acmoe_lm_forward(acmoe_lm *model, acmoe_ctx *ctx, const int32_t *tokens,
                                        const int32_t *targets, int batch, int seq, int train,
                                        float *loss);
/* Vision encoder: patches [batch][seq_len][patch_dim]; with labels [batch], *loss is the mean
   cross-entropy plus the auxiliary losses. Logits [batch][n_classes] in acmoe_lm_logits. */
ACMOE_API acmoe_status acmoe_vision_forward(acmoe_lm *model, acmoe_ctx *ctx, const float *patches,
                                                const int32_t *labels, int batch, int train, float *loss);
/* An image [height][width][channels] cut into (height / patch) x (width / patch) patches, row
   by row, each patch x patch x channels floats in the image's order: patches [count][patch *
   patch * channels]. ACMOE_ERR_SHAPE unless patch divides both sides. */
ACMOE_API acmoe_status acmoe_image_patches(const float *image, int height, int width, int channels, int patch,
                                           float *patches);
/* Adds the gradients of the last forward call's loss to the gradient buffer. */
ACMOE_API acmoe_status acmoe_lm_backward(acmoe_lm *model, acmoe_ctx *ctx);
/* Vision encoder, after acmoe_lm_backward: the loss's gradient with respect to the patches
   of the forward call, d_patches [batch][seq_len][patch_dim], as adversarial attacks (FGSM,
   PGD) need. AC weights count as constants, as in the backward pass. ACMOE_ERR_ARG without
   a backward call since the last forward call. */
ACMOE_API acmoe_status acmoe_vision_input_grad(acmoe_lm *model, acmoe_ctx *ctx, float *d_patches);
ACMOE_API void acmoe_lm_zero_grad(acmoe_lm *model);
/* [batch * seq][vocab] sequence by sequence (position by position after acmoe_lm_decode_batch),
   or [batch][n_classes] */
ACMOE_API const float *acmoe_lm_logits(const acmoe_lm *model);
/* Incremental decoding of one sequence: the logits of positions [start, len) of tokens
   (in acmoe_lm_logits), reusing what the last call computed for positions before start, so
   each generated token costs one position rather than the whole context. tokens[0..start)
   must be the tokens of that call (checked), with no optimizer step in between; start = 0
   starts afresh. The logits equal those of acmoe_lm_forward on the same tokens, bit for
   bit. Every MoE layer must route each token on its own: ACMOE_ERR_ARG for USMoE, expert
   choice, a capacity limit, or AC weights not frozen (acmoe_lm_freeze_ac_weights after a
   forward pass that measured them). */
ACMOE_API acmoe_status acmoe_lm_decode(acmoe_lm *model, acmoe_ctx *ctx, const int32_t *tokens, int len, int start);
/* acmoe_lm_decode for batch independent sequences of one length at once, batch up to the
   model's, sequence b's tokens at tokens + b * ld (ld at least len): each generated position costs one matrix product for the whole
   batch rather than one per sequence, and each sequence's logits equal acmoe_lm_forward's on
   it alone, bit for bit. Read them with acmoe_lm_position_logits. Prompts of different
   lengths are decoded in groups of one length. */
ACMOE_API acmoe_status acmoe_lm_decode_batch(acmoe_lm *model, acmoe_ctx *ctx, const int32_t *tokens, int ld,
                                             int batch, int len, int start);
/* The logits [vocab] of one position of one sequence of the last forward or decoding call
   (whatever the layout of its rows), or NULL outside its batch and length. */
ACMOE_API const float *acmoe_lm_position_logits(const acmoe_lm *model, int sequence, int position);
/* Whether acmoe_lm_decode takes this model; if not, what is missing, in why (cap bytes, may
   be NULL), e.g. "layer 3 (AC): its AC weights are not frozen: call acmoe_lm_freeze_ac_weights". */
ACMOE_API int acmoe_lm_decode_ready(const acmoe_lm *model, char *why, size_t cap);
/* Draws *token from logits [vocab] with rng: softmax(logits / temperature) over the top_k
   largest logits (0: all), then over the smallest set of the likeliest of those whose
   probabilities add up to top_p or more (1: all); ties at either cut are kept. Temperature 0
   takes the largest logit (the first of equal ones). work: vocab floats of scratch.
   ACMOE_ERR_ARG for vocab < 1, temperature < 0, top_k < 0 or top_p outside (0, 1];
   ACMOE_ERR_NONFINITE for a logit that is not finite. */
ACMOE_API acmoe_status acmoe_sample(const float *logits, int vocab, float temperature, int top_k, float top_p,
                                    float *work, acmoe_rng *rng, int32_t *token);
ACMOE_API int acmoe_lm_n_layers(const acmoe_lm *model);
/* Where the last forward call and the backward call after it spent their time, with a
   context clock (zeros without one): the attention of every layer (scores, softmax and
   weighted values; not the projections), and the routing and the experts of every
   feed-forward block (acmoe_moe_last_stats summed over the layers). */
typedef struct acmoe_lm_times {
    double attention, routing, experts; /* seconds */
} acmoe_lm_times;
ACMOE_API acmoe_lm_times acmoe_lm_last_times(const acmoe_lm *model);
/* The MoE layer of layer i (its stats, its options); NULL for a bad index. */
ACMOE_API acmoe_moe *acmoe_lm_moe(acmoe_lm *model, int layer);
ACMOE_API void acmoe_lm_freeze_ac_weights(acmoe_lm *model, int frozen);

/* ---- 10. Transformer models: options by name ----
   Every option of a model and of its optimizer, listed once: the checkpoint metadata, the
   range checks of acmoe_lm_create and the examples' command-line flags all read this table.
   Enum values have names ("relu", "per-feature", ...); acmoe_enum_name and acmoe_enum_value
   map between the two. */
typedef enum acmoe_enum {
    ACMOE_ENUM_ACTIVATION = 0, /* acmoe_activation: relu gelu swiglu */
    ACMOE_ENUM_AC_SCALING,     /* acmoe_ac_scaling: default per-feature preclip postclip */
    ACMOE_ENUM_AC_DISPERSION,  /* acmoe_ac_dispersion: default mad variance */
    ACMOE_ENUM_GROUP,          /* acmoe_group: default batch sequence position */
    ACMOE_ENUM_SOFT_INPUT,     /* acmoe_soft_input: raw normalized */
    ACMOE_ENUM_ROUTER_INPUT,   /* acmoe_router_input: token projected ac */
    ACMOE_ENUM_ROUTER_SCORE,   /* acmoe_router_score: linear cosine slot none */
    ACMOE_ENUM_ROUTER_SELECT,  /* acmoe_router_select: topk switch usmoe expert-choice soft priority dense */
    ACMOE_ENUM_SCHEDULE,       /* acmoe_schedule: constant cosine */
    ACMOE_ENUM_COUNT
} acmoe_enum;

ACMOE_API const char *acmoe_enum_name(acmoe_enum kind, int value); /* NULL outside the enum */
ACMOE_API int acmoe_enum_value(acmoe_enum kind, const char *name);  /* -1 for no such name */
/* The router a pattern letter stands for ("SMoE", "AC", "Soft MoE (paper)", "dense" for 'f'),
   NULL for no router letter. */
ACMOE_API const char *acmoe_router_name(char letter);

typedef enum acmoe_option_type { ACMOE_OPTION_INT = 0, ACMOE_OPTION_FLOAT, ACMOE_OPTION_ENUM } acmoe_option_type;

typedef struct acmoe_option {
    const char *key;        /* its name in checkpoints, e.g. "moe.ac.eps" */
    const char *flag;       /* its command-line name without "--", e.g. "ac-eps"; NULL for none */
    acmoe_option_type type; /* an int, a float, or an enum of kind names */
    acmoe_enum names;
    size_t offset;          /* of the field in its descriptor */
    double min, max;        /* the values it takes (0 means the default where it has one) */
    int since;              /* the first checkpoint format that stores it */
    const char *help;
} acmoe_option;

/* The options of acmoe_lm_desc (sizes, MoE and AC options; pattern and seed are not in the
   table) and of acmoe_optim_desc; *count gets their number. */
ACMOE_API const acmoe_option *acmoe_model_options(int *count);
ACMOE_API const acmoe_option *acmoe_optim_options(int *count);
/* Sets the option in desc (an acmoe_lm_desc or acmoe_optim_desc, as its table says) from
   text: a number within the range, or an enum value's name. ACMOE_ERR_ARG, desc unchanged,
   for anything else. */
ACMOE_API acmoe_status acmoe_option_set(const acmoe_option *option, void *desc, const char *text);
/* Writes the option's value in desc as acmoe_option_set reads it (an enum by name, a float
   with the fewest digits that read back the same); the length, as snprintf. */
ACMOE_API int acmoe_option_format(const acmoe_option *option, const void *desc, char *text, size_t cap);

/* ---- 11. Optimizer ----
   AdamW with bias correction; no decay on biases and layer norms. The learning rate warms up
   linearly for warmup_steps, then stays constant (the reference) or follows a cosine to
   min_lr at total_steps. Gradients are clipped to a global norm of clip_norm first. */
typedef enum acmoe_schedule { ACMOE_SCHEDULE_CONSTANT = 0, ACMOE_SCHEDULE_COSINE, ACMOE_SCHEDULE_COUNT } acmoe_schedule;

typedef struct acmoe_optim_desc {
    float lr;           /* default 7e-4 */
    float beta1, beta2; /* defaults 0.9, 0.999 */
    float eps;          /* default 1e-8 */
    float weight_decay; /* default 0 */
    float clip_norm;    /* default 0: no clipping */
    int warmup_steps;   /* default 0 */
    acmoe_schedule schedule;
    int total_steps;    /* for the cosine schedule */
    float min_lr;
    int sgd;            /* plain SGD (lr, weight decay) instead of AdamW */
} acmoe_optim_desc;

ACMOE_API float acmoe_lr_at(const acmoe_optim_desc *opt, long step);
/* One update from the gradient buffer, split over the context's threads (same bits for any
   count); returns the gradient norm before clipping in *norm. */
ACMOE_API acmoe_status acmoe_lm_step(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_optim_desc *opt, float *norm);
ACMOE_API long acmoe_lm_steps_taken(const acmoe_lm *model);
/* The gradients averaged over the ranks of comm (summed in rank order, then divided by the
   rank count), for a loop of one's own in which each rank computed them on its share of a
   global batch. */
ACMOE_API acmoe_status acmoe_lm_reduce_grads(acmoe_lm *model, acmoe_comm *comm);
/* Expert parallelism for every routed MoE layer of the model (acmoe_moe_set_expert_ranks;
   dense layers stay whole on every rank); NULL: back to this process alone. With it,
   acmoe_lm_reduce_grads averages the replicated parameters' gradients over the ranks and
   leaves each expert's to its rank (already summed over every rank's tokens, divided by
   the rank count); acmoe_lm_step takes the gradient norm over every rank. Between two
   calls of acmoe_lm_gather_experts the experts of other ranks are stale here. */
ACMOE_API acmoe_status acmoe_lm_set_expert_ranks(acmoe_lm *model, acmoe_comm *comm);
/* Every expert's parameters and AdamW moments sent from its rank to all, so that every rank
   holds the whole model (before a save or a parameter check). */
ACMOE_API acmoe_status acmoe_lm_gather_experts(acmoe_lm *model);

/* ---- 12. Checkpoints ----
   safetensors: an 8-byte little-endian header length, a JSON header naming each tensor
   (dtype F32, shape, data_offsets) with the model configuration, the step, the dropout
   generator, the training options (acmoe_lm_train_settings) and a CRC-32C of the data in
   __metadata__, then the raw data. Weights keep their names and shapes, so other tools read
   them; the Adam moments are two more tensors (optimizer.adam_m and optimizer.adam_v), so a
   resumed run continues bit for bit.
   Saving never loses the last good file: it writes a new file beside path under a name of
   its own (created exclusively, never through a link), syncs it, renames it over path and
   syncs the directory; on any failure path is untouched and the new file removed. A model
   with a non-finite parameter or moment is ACMOE_ERR_NONFINITE, and nothing is written.
   Loading takes regular files only (ACMOE_ERR_IO for a directory or a FIFO) and checks the
   whole header before it allocates the model: every value as the writer prints it, no
   unknown, repeated or missing entry, tensors that tile the data exactly and are those of the
   model the configuration describes; then the checksum, then the data. Anything else is
   ACMOE_ERR_FORMAT. The metadata's format is "acmoe-lm-4": every option of
   acmoe_model_options and acmoe_optim_options as the model resolved it, enum values by name,
   and "contents": "training" (with the Adam moments) or "weights". An AC layer that has
   measured its weights stores them as "layers.i.moe.ac_weights" [clusters][width], so that a
   loaded model can freeze them and decode. Dense layers are "layers.i.ffn.*". Files of
   formats "acmoe-lm-3" and "acmoe-lm-2" (no checksum or training options) still load; earlier
   ones are refused. */
ACMOE_API acmoe_status acmoe_lm_save(const acmoe_lm *model, const char *path);
/* The weights alone (with the configuration and the AC weights; no Adam moments): a file for
   inference or for other tools, about a third of a full one. It loads with acmoe_lm_load;
   training from it starts with fresh Adam moments. */
ACMOE_API acmoe_status acmoe_lm_save_weights(const acmoe_lm *model, const char *path);
ACMOE_API acmoe_status acmoe_lm_load(acmoe_lm **out, const char *path);

/* ---- 13. Data and training loop ----
   A corpus is a stream of tokens: bytes (each byte a token, vocab 256) or int32 token ids
   (word-level, BPE or any other tokenizer's output). The first part trains, the last
   val_fraction evaluates. Batches are windows of seq + 1 tokens at random offsets (targets
   are the inputs shifted by one). Training and evaluation refuse a corpus whose vocab is
   larger than the model's (ACMOE_ERR_ARG). */
typedef struct acmoe_corpus {
    const unsigned char *bytes; /* a byte corpus, or NULL */
    const int32_t *tokens;      /* a token corpus, or NULL */
    size_t size, train_size;    /* in tokens */
    int vocab;                  /* 1 + the largest token */
    void *owned;                /* set by the load calls */
} acmoe_corpus;

typedef enum acmoe_split { ACMOE_SPLIT_TRAIN = 0, ACMOE_SPLIT_VAL } acmoe_split;

/* ACMOE_ERR_EMPTY for no bytes, ACMOE_ERR_SHAPE when a split would hold fewer than two. */
ACMOE_API acmoe_status acmoe_corpus_view(acmoe_corpus *c, const unsigned char *bytes, size_t size, float val_fraction);
/* A regular file's bytes (ACMOE_ERR_IO for a directory or a FIFO, ACMOE_ERR_EMPTY for an
   empty file). */
ACMOE_API acmoe_status acmoe_corpus_load(acmoe_corpus *c, const char *path, float val_fraction);
/* count token ids, each 0 or more (ACMOE_ERR_ARG otherwise). */
ACMOE_API acmoe_status acmoe_corpus_view_tokens(acmoe_corpus *c, const int32_t *tokens, size_t count,
                                                float val_fraction);
/* A regular file of little-endian int32 token ids: ACMOE_ERR_FORMAT for a length that is not
   a multiple of 4 or a negative id. */
ACMOE_API acmoe_status acmoe_corpus_load_tokens(acmoe_corpus *c, const char *path, float val_fraction);
ACMOE_API void acmoe_corpus_destroy(acmoe_corpus *c);
/* tokens, targets [batch][seq]; a split shorter than seq + 1 bytes repeats its last bytes. */
ACMOE_API acmoe_status acmoe_corpus_batch(const acmoe_corpus *c, acmoe_split split, acmoe_rng *rng, int batch,
                                          int seq, int32_t *tokens, int32_t *targets);

/* Mean held-out loss over `batches` batches drawn from a generator seeded by seed, so two
   models evaluated with the same seed see the same text. */
ACMOE_API acmoe_status acmoe_lm_evaluate(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_corpus *c, int batches,
                                         uint64_t seed, double *loss);
/* The same held-out text with damaged input: each input token is replaced, with probability
   corrupt (0 to 1), by one drawn uniformly from the vocabulary, while the targets stay the
   true next bytes, so the loss measures how well a model reads corrupted text. The damage
   comes from its own generator, also seeded by seed: two models see the same damaged text,
   and corrupt 0 gives acmoe_lm_evaluate's loss. */
ACMOE_API acmoe_status acmoe_lm_evaluate_corrupted(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_corpus *c, int batches,
                                                   uint64_t seed, float corrupt, double *loss);

typedef enum acmoe_event_kind { ACMOE_EVENT_STEP = 0, ACMOE_EVENT_EVAL } acmoe_event_kind;

/* What the training loop reports. Times need a context clock (acmoe_ctx_desc.clock). */
typedef struct acmoe_train_event {
    acmoe_event_kind kind;
    long step, steps;
    float loss, lr, grad_norm;      /* the step's */
    double val_loss;                /* ACMOE_EVENT_EVAL */
    double val_loss_corrupted;      /* ACMOE_EVENT_EVAL with eval_corrupt > 0 */
    double tokens_per_second, eta_seconds;
} acmoe_train_event;

typedef struct acmoe_train_desc {
    long steps;           /* train until the model has taken this many steps (resumes count) */
    int eval_every;       /* default 250; an evaluation also follows the last step */
    int eval_batches;     /* default 8 */
    int log_every;        /* default 50; a step event also follows the last step */
    uint64_t seed;        /* batches of step s come from a generator seeded by (seed, s) */
    uint64_t eval_seed;   /* default 12345 */
    float eval_corrupt;   /* > 0: each evaluation also takes the loss with this share of the input
                             tokens damaged (acmoe_lm_evaluate_corrupted); 0 to 1, default 0 */
    acmoe_optim_desc optim;
    /* Called for every event; a non-zero return stops the loop with ACMOE_STOPPED. */
    int (*on_event)(const acmoe_train_event *event, acmoe_lm *model, void *user);
    void *user;
    /* Data parallelism: NULL (or a communicator of one rank) trains in this process. Else
       every rank runs the loop with a model of the same desc and seed, whose batch is the
       global batch, drawn as one process would draw it; each rank trains on its share,
       batch / size sequences (size must divide the batch); the gradients are averaged over
       the ranks (in rank order, acmoe_lm_reduce_grads) before clipping and the update, so
       every rank holds the same parameters, and a checkpoint is one process's. Losses in events are the global batch's; evaluations split each
       global batch the same way, and check that the ranks' parameters agree
       (ACMOE_ERR_DIVERGED if not). Routers that see the whole call (AC statistics, USMoE,
       Soft MoE groups, expert choice, balance losses) see each rank's batch. */
    acmoe_comm *comm;
    /* With comm: also split the experts of every routed layer over the ranks
       (acmoe_lm_set_expert_ranks) for the loop's calls; each evaluation first gathers them
       (acmoe_lm_gather_experts), so the model is whole at every evaluation event and when
       the loop returns. */
    int expert_parallel;
} acmoe_train_desc;

/* Trains on the corpus with the model's batch and seq_len. Allocates only its two token
   buffers, before the first step. */
ACMOE_API acmoe_status acmoe_lm_train(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_corpus *c,
                                      const acmoe_train_desc *desc);
/* The options that shaped the model's training: optim as the last acmoe_lm_step resolved it,
   seed as the last acmoe_lm_train used it. Checkpoints keep them, so a resumed run can be the
   run it continues. All zero for a model that has not trained (or one loaded from a file of
   format acmoe-lm-2). */
ACMOE_API acmoe_train_desc acmoe_lm_train_settings(const acmoe_lm *model);

#ifdef __cplusplus
}
#endif
#endif /* ACMOE_H */

/* ========================================================================================== */
#if defined(ACMOE_IMPLEMENTATION) && !defined(ACMOE_IMPLEMENTATION_DONE)
#define ACMOE_IMPLEMENTATION_DONE

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(O_CLOEXEC) && defined(O_NOFOLLOW) && defined(O_DIRECTORY) /* POSIX 2008 is visible */
#define ACMOE__POSIX_FILES /* checkpoints replace files atomically and durably */
#endif
#endif

#ifndef ACMOE_ASSERT
#include <assert.h>
#define ACMOE_ASSERT(x) assert(x)
#endif

#if defined(ACMOE_MALLOC) && defined(ACMOE_REALLOC) && defined(ACMOE_FREE)
#elif !defined(ACMOE_MALLOC) && !defined(ACMOE_REALLOC) && !defined(ACMOE_FREE)
#include <stdlib.h>
#define ACMOE_MALLOC(sz) malloc(sz)
#define ACMOE_REALLOC(p, sz) realloc(p, sz)
#define ACMOE_FREE(p) free(p)
#else
#error "acmoe.h: define all of ACMOE_MALLOC, ACMOE_REALLOC and ACMOE_FREE, or none"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ========================================================================================== */
/* 1. Platform and CPU features                                                               */
/* ========================================================================================== */

#if defined(__GNUC__)
#define ACMOE__PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#define ACMOE__UNROLL _Pragma("GCC unroll 32")
#define ACMOE__UNROLL_DEPTH _Pragma("GCC unroll 4") /* amortises the loop's own instructions */
#define ACMOE__PREFETCH_WRITE(p) __builtin_prefetch((p), 1, 3)
#define ACMOE__PREFETCH_READ(p) __builtin_prefetch((p), 0, 3)
#define ACMOE__ALWAYS_INLINE __attribute__((always_inline)) inline /* helpers of kernels */
#else
#define ACMOE__PRINTF(fmt, args)
#define ACMOE__ALWAYS_INLINE
#define ACMOE__UNROLL
#define ACMOE__UNROLL_DEPTH
#define ACMOE__PREFETCH_WRITE(p) ((void)(p))
#define ACMOE__PREFETCH_READ(p) ((void)(p))
#endif

#if !defined(ACMOE_NO_SIMD) && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ACMOE__X86 1
#include <cpuid.h>
#include <immintrin.h>
#define ACMOE__TARGET_AVX2 __attribute__((target("avx2,fma")))
#ifndef ACMOE_NO_AVX512
#define ACMOE__HAVE_AVX512 1
#define ACMOE__TARGET_AVX512 __attribute__((target("avx512f")))
#endif
#endif

#if !defined(ACMOE_NO_SIMD) && defined(__aarch64__)
#define ACMOE__NEON 1
#include <arm_neon.h>
#endif

#define ACMOE__MIN(a, b) ((a) < (b) ? (a) : (b))
#define ACMOE__MAX(a, b) ((a) > (b) ? (a) : (b))

#ifdef ACMOE__X86
/* The CPU must have the feature and the OS must save its registers (XCR0 via xgetbv). */
static uint64_t acmoe__xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static int acmoe__x86_has(acmoe_isa isa) {
    unsigned a, b, c, d;
    uint64_t xcr0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!(c & (1u << 27)) || !(c & (1u << 12))) return 0; /* OSXSAVE, FMA */
    xcr0 = acmoe__xcr0();
    if ((xcr0 & 0x6) != 0x6) return 0; /* XMM and YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (isa == ACMOE_ISA_AVX2) return (b >> 5) & 1;
    return ((b >> 16) & 1) && (xcr0 & 0xe0) == 0xe0; /* AVX-512F; opmask and ZMM state */
}
#endif

ACMOE_API const char *acmoe_isa_name(acmoe_isa isa) {
    switch (isa) {
    case ACMOE_ISA_AUTO: return "auto";
    case ACMOE_ISA_SCALAR: return "scalar";
    case ACMOE_ISA_AVX2: return "avx2";
    case ACMOE_ISA_AVX512: return "avx512";
    case ACMOE_ISA_NEON: return "neon";
    default: return "unknown";
    }
}

ACMOE_API int acmoe_isa_supported(acmoe_isa isa) {
    switch (isa) {
    case ACMOE_ISA_SCALAR: return 1;
#ifdef ACMOE__X86
    case ACMOE_ISA_AVX2: return acmoe__x86_has(ACMOE_ISA_AVX2);
#endif
#ifdef ACMOE__HAVE_AVX512
    case ACMOE_ISA_AVX512: return acmoe__x86_has(ACMOE_ISA_AVX512);
#endif
#ifdef ACMOE__NEON
    case ACMOE_ISA_NEON: return 1;
#endif
    default: return 0;
    }
}

ACMOE_API acmoe_isa acmoe_cpu_isa(void) {
    static const acmoe_isa best_first[] = {ACMOE_ISA_AVX512, ACMOE_ISA_AVX2, ACMOE_ISA_NEON};
    size_t i;
    for (i = 0; i < sizeof best_first / sizeof best_first[0]; i++)
        if (acmoe_isa_supported(best_first[i])) return best_first[i];
    return ACMOE_ISA_SCALAR;
}

/* ========================================================================================== */
/* 2. Memory                                                                                  */
/* ========================================================================================== */

ACMOE_API const char *acmoe_status_string(acmoe_status status) {
    switch (status) {
    case ACMOE_STOPPED: return "stopped by the caller";
    case ACMOE_OK: return "ok";
    case ACMOE_ERR_NULL: return "a required pointer was NULL";
    case ACMOE_ERR_SHAPE: return "sizes or leading dimensions are negative or inconsistent";
    case ACMOE_ERR_ARG: return "an option is out of range";
    case ACMOE_ERR_NOMEM: return "out of memory";
    case ACMOE_ERR_UNSUPPORTED: return "not supported by this CPU or build";
    case ACMOE_ERR_THREAD: return "a worker thread could not be started";
    case ACMOE_ERR_NONFINITE: return "NaN or infinity in the input";
    case ACMOE_ERR_IO: return "a file could not be opened, read or written";
    case ACMOE_ERR_FORMAT: return "the file is truncated, corrupt or of another model";
    case ACMOE_ERR_EMPTY: return "the file or input is empty";
    case ACMOE_ERR_DIVERGED: return "the processes training one model hold different parameters";
    }
    return "unknown status";
}

/* No buffer the library sizes may come near the address space: sizes are checked against
   this in double before any size_t product is formed. */
#define ACMOE__MAX_BYTES ((double)((size_t)-1 / 4))

static size_t acmoe__align_up(size_t n) { return (n + (ACMOE_ALIGN - 1)) & ~(size_t)(ACMOE_ALIGN - 1); }

/* ACMOE_MALLOC promises only malloc's alignment: over-allocate and keep the original pointer
   just below the aligned block. */
static void *acmoe__aligned_alloc(size_t bytes) {
    unsigned char *raw, *p;
    if (bytes > (size_t)-1 - ACMOE_ALIGN - sizeof(void *)) return NULL;
    raw = (unsigned char *)ACMOE_MALLOC(bytes + ACMOE_ALIGN + sizeof(void *));
    if (!raw) return NULL;
    p = raw + sizeof(void *);
    p += (ACMOE_ALIGN - (uintptr_t)p % ACMOE_ALIGN) % ACMOE_ALIGN;
    memcpy(p - sizeof(void *), &raw, sizeof raw);
    return p;
}

static void acmoe__aligned_free(void *p) {
    void *raw;
    if (!p) return;
    memcpy(&raw, (unsigned char *)p - sizeof(void *), sizeof raw);
    ACMOE_FREE(raw);
}

/* ========================================================================================== */
/* 3. Random numbers                                                                          */
/* ========================================================================================== */

static uint64_t acmoe__splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t acmoe__rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

ACMOE_API acmoe_status acmoe_rng_seed(acmoe_rng *rng, uint64_t seed) {
    int i;
    if (!rng) return ACMOE_ERR_NULL;
    for (i = 0; i < 4; i++) rng->s[i] = acmoe__splitmix64(&seed);
    rng->spare = 0.0f;
    rng->has_spare = 0;
    return ACMOE_OK;
}

ACMOE_API uint64_t acmoe_rng_u64(acmoe_rng *rng) {
    uint64_t *s, out, t;
    if (!rng) return 0;
    s = rng->s;
    out = acmoe__rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = acmoe__rotl(s[3], 45);
    return out;
}

/* Lemire's multiply-and-reject: unbiased for every n. */
ACMOE_API uint32_t acmoe_rng_below(acmoe_rng *rng, uint32_t n) {
    uint64_t prod;
    uint32_t threshold;
    ACMOE_ASSERT(n > 0);
    if (!rng || n == 0) return 0;
    prod = (acmoe_rng_u64(rng) >> 32) * n;
    if ((uint32_t)prod < n) {
        threshold = (uint32_t)(0u - n) % n;
        while ((uint32_t)prod < threshold) prod = (acmoe_rng_u64(rng) >> 32) * n;
    }
    return (uint32_t)(prod >> 32);
}

ACMOE_API float acmoe_rng_uniform(acmoe_rng *rng) {
    return (float)(acmoe_rng_u64(rng) >> 40) * (1.0f / 16777216.0f);
}

ACMOE_API float acmoe_rng_normal(acmoe_rng *rng) {
    double u1, u2, radius;
    if (!rng) return 0.0f;
    if (rng->has_spare) {
        rng->has_spare = 0;
        return rng->spare;
    }
    u1 = (double)((acmoe_rng_u64(rng) >> 11) + 1) * (1.0 / 9007199254740992.0); /* (0, 1] */
    u2 = (double)(acmoe_rng_u64(rng) >> 11) * (1.0 / 9007199254740992.0);
    radius = sqrt(-2.0 * log(u1));
    rng->spare = (float)(radius * sin(6.283185307179586 * u2));
    rng->has_spare = 1;
    return (float)(radius * cos(6.283185307179586 * u2));
}

/* ========================================================================================== */
/* 4. Threads and contexts                                                                    */
/* ========================================================================================== */

/* A job runs fn(arg, tid, n) once on each of n threads; the caller is thread 0. */
typedef void (*acmoe__job_fn)(void *arg, int tid, int n);

#ifndef ACMOE_NO_THREADS
#include <pthread.h>
#include <unistd.h>

/* Workers spin a while after each job before they sleep on the condition variable, so the
   back-to-back products of a training step hand over in about a microsecond. */
typedef struct acmoe__pool {
    int n; /* threads including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    acmoe__job_fn fn; /* fn and arg are published by the release of generation */
    void *arg;
    unsigned generation; /* atomic: one more per job */
    int pending;         /* atomic: workers still inside the current job */
    int quit;            /* atomic */
    int sleepers;        /* guarded by mu */
} acmoe__pool;

#define ACMOE__SPIN_LIMIT 20000
#define ACMOE__LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define ACMOE__STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static void acmoe__cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

typedef struct acmoe__worker_arg {
    acmoe__pool *pool;
    int tid;
} acmoe__worker_arg;

static int acmoe__online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 1024 ? 1024 : (int)n);
}
#else
typedef struct acmoe__pool {
    int n;
} acmoe__pool;

static int acmoe__online_cpus(void) { return 1; }
#endif

/* Per-thread matmul workspace: packed blocks of A and B, a packed ragged B panel and one
   output tile for edges and transposed outputs. */
typedef struct acmoe__workspace {
    float *pack_a, *pack_b, *panel, *tile;
} acmoe__workspace;

/* What a product does to C once its sum is complete, while the tile is still in registers
   or cache, in this order: keeps it only where C held a positive value before (ReLU's
   gradient, C having held the activations), adds a bias to each row, writes the ReLU of the
   result (c where c > 0, else +0) to relu, which may be C itself, and adds the finished rows
   to column sums (a bias gradient). The arithmetic and order of the separate passes, so the
   same bits. */
typedef struct acmoe__epilogue {
    int relu_grad;     /* not with accumulate */
    const float *bias; /* one per column of C, or NULL */
    float *relu;       /* or NULL */
    ptrdiff_t ld_relu;
    float *column_sums; /* or NULL; rows in order only when one thread makes all of C */
} acmoe__epilogue;

typedef void (*acmoe__kernel_fn)(int kc, const float *const *a_rows, ptrdiff_t a_step,
                                 const float *b, ptrdiff_t b_step, float *c, ptrdiff_t c_step,
                                 int rows, int accumulate, const acmoe__epilogue *epilogue);
/* ACMOE__TALL_ROWS rows of A at a stride, one vector of columns (see acmoe__kernel_avx512_tall). */
#define ACMOE__TALL_ROWS 12
typedef void (*acmoe__tall_fn)(int kc, const float *a, ptrdiff_t a_rs, ptrdiff_t a_cs, const float *b, ptrdiff_t b_step,
                               float *c, ptrdiff_t c_step, int accumulate);

typedef struct acmoe__adam acmoe__adam; /* AdamW coefficients, with the row kernels */

/* One row of C, n columns (a multiple of 16; see acmoe__small_product). */
typedef void (*acmoe__one_row_fn)(int kc, const float *a, ptrdiff_t a_step, const float *b, ptrdiff_t b_step, float *c,
                                  int n, int accumulate);

typedef void (*acmoe__gemv_fn)(int kc, const float *a, ptrdiff_t a_step, const float *b, ptrdiff_t b_step,
                               ptrdiff_t b_col, float *c, ptrdiff_t c_step, ptrdiff_t c_col, int rows, int cols,
                               int accumulate);

/* A kernel path: mr x width micro-kernels, widest (nr) first; ragged last panels take the
   narrowest that covers them (an attention head of 16 should not pay for 64 columns). */
#define ACMOE__WIDTHS 3
typedef struct acmoe__kernel {
    acmoe_isa isa;
    int mr, nr;
    acmoe__kernel_fn fn[ACMOE__WIDTHS];
    int width[ACMOE__WIDTHS];
    float (*row_max)(const float *x, int n); /* the row kernels of the same path */
    float (*row_exp)(float *y, const float *x, int n, float shift, float scale);
    float (*row_sum)(const float *x, int n);
    float (*row_dot)(const float *a, const float *b, int n);
    void (*row_axpy)(float *y, const float *x, int n, float a); /* y += a x, a product then a sum */
    void (*row_scale)(float *y, const float *x, int n, float a); /* y = a x */
    void (*row_mul)(float *y, const float *a, const float *b, int n);     /* y = a b element by element */
    void (*row_mul_add)(float *y, const float *a, const float *b, int n); /* y += a b element by element */
    void (*row_deviation)(float *y, const float *x, const float *mu, int n, int squared); /* y += |x - mu| or ^2 */
    void (*row_relu)(float *y, const float *h, const float *g, size_t n); /* y = relu_grad(h, g) */
    void (*row_softmax_grad)(float *d, const float *e, int n, float dot, float scale);
    void (*row_adam)(float *p, const float *g, float *m, float *v, size_t n, const acmoe__adam *a);
    float (*row_layernorm)(float *xhat, float *y, const float *x, const float *add, const float *g,
                           const float *b, int n);
    void (*row_layernorm_backward)(float *dx, const float *dy, const float *xhat, const float *g, float rstd, int n,
                                   int accumulate);
    double (*sum_squares)(const float *x, size_t n); /* in double: see ACMOE__DEFINE_SUM_SQUARES */
    acmoe__gemv_fn gemv; /* up to gemv_cols output columns, gemv_rows rows at a time; NULL: the micro-kernels */
    int gemv_rows, gemv_cols;
    acmoe__tall_fn tall; /* products one vector wide (attention heads); NULL: the micro-kernels */
    int tall_width;
    acmoe__one_row_fn one_row; /* products of one row (decoding); NULL: the micro-kernels */
    void (*top16)(const float *z, int e, int k, int32_t *idx); /* top k of e <= 16; NULL: the scalar loop */
} acmoe__kernel;

struct acmoe_ctx {
    acmoe_ctx_desc desc;
    acmoe__kernel kernel;
    acmoe__pool pool;
    acmoe__workspace *ws; /* one per thread */
    void *ws_memory;
};

#ifndef ACMOE_NO_THREADS
/* Returns the generation of the next job (or of the stop) after `seen`. */
static unsigned acmoe__pool_wait(acmoe__pool *pool, unsigned seen) {
    unsigned g;
    int spin;
    for (spin = 0; spin < ACMOE__SPIN_LIMIT; spin++) {
        g = ACMOE__LOAD(&pool->generation);
        if (g != seen || ACMOE__LOAD(&pool->quit)) return g;
        acmoe__cpu_relax();
    }
    pthread_mutex_lock(&pool->mu);
    pool->sleepers++;
    while ((g = ACMOE__LOAD(&pool->generation)) == seen && !ACMOE__LOAD(&pool->quit))
        pthread_cond_wait(&pool->wake, &pool->mu);
    pool->sleepers--;
    pthread_mutex_unlock(&pool->mu);
    return g;
}

/* Wakes sleeping workers after generation or quit changed. Taking the mutex orders this with
   a worker that is between counting itself a sleeper and waiting. */
static void acmoe__pool_wake(acmoe__pool *pool) {
    pthread_mutex_lock(&pool->mu);
    if (pool->sleepers) pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
}

static void *acmoe__worker(void *p) {
    acmoe__worker_arg w = *(acmoe__worker_arg *)p;
    acmoe__pool *pool = w.pool;
    unsigned seen = 0;
    ACMOE_FREE(p);
    for (;;) {
        seen = acmoe__pool_wait(pool, seen);
        if (ACMOE__LOAD(&pool->quit)) break;
        pool->fn(pool->arg, w.tid, pool->n);
        __atomic_sub_fetch(&pool->pending, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}
#endif

static void acmoe__pool_stop(acmoe__pool *pool) {
#ifndef ACMOE_NO_THREADS
    int i;
    if (!pool->threads) return;
    ACMOE__STORE(&pool->quit, 1);
    acmoe__pool_wake(pool);
    for (i = 1; i < pool->n; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
    ACMOE_FREE(pool->threads);
    pool->threads = NULL;
#else
    (void)pool;
#endif
}

static acmoe_status acmoe__pool_start(acmoe__pool *pool, int n) {
#ifndef ACMOE_NO_THREADS
    int i;
    memset(pool, 0, sizeof *pool);
    pool->n = 1;
    if (n == 1) return ACMOE_OK;
    pool->threads = (pthread_t *)ACMOE_MALLOC(sizeof(pthread_t) * (size_t)n);
    if (!pool->threads) return ACMOE_ERR_NOMEM;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    for (i = 1; i < n; i++) {
        acmoe__worker_arg *w = (acmoe__worker_arg *)ACMOE_MALLOC(sizeof *w);
        if (!w) {
            acmoe__pool_stop(pool);
            return ACMOE_ERR_NOMEM;
        }
        w->pool = pool;
        w->tid = i;
        if (pthread_create(&pool->threads[i], NULL, acmoe__worker, w) != 0) {
            ACMOE_FREE(w);
            break;
        }
        pool->n = i + 1;
    }
    if (pool->n == n) return ACMOE_OK;
    acmoe__pool_stop(pool);
    return ACMOE_ERR_THREAD;
#else
    (void)n;
    pool->n = 1;
    return ACMOE_OK;
#endif
}

static void acmoe__pool_run(acmoe__pool *pool, int n, acmoe__job_fn fn, void *arg) {
#ifndef ACMOE_NO_THREADS
    if (n > 1) {
        ACMOE_ASSERT(n == pool->n);
        pool->fn = fn;
        pool->arg = arg;
        ACMOE__STORE(&pool->pending, n - 1);
        __atomic_add_fetch(&pool->generation, 1, __ATOMIC_ACQ_REL);
        acmoe__pool_wake(pool);
        fn(arg, 0, n);
        while (ACMOE__LOAD(&pool->pending) > 0) acmoe__cpu_relax();
        return;
    }
#else
    (void)pool;
#endif
    ACMOE_ASSERT(n == 1);
    (void)n;
    fn(arg, 0, 1);
}

/* The threads for a job of about `work` multiply-adds or element operations: the calling
   thread alone below the size where waking the others costs more than they save (decoding
   one token, say). Every job gives the same bits on any thread count. */
#define ACMOE__PARALLEL_WORK 32768.0
static int acmoe__threads_for(const acmoe_ctx *ctx, double work) {
    return work < ACMOE__PARALLEL_WORK ? 1 : ctx->desc.n_threads;
}

/* Work items handed out in turn to whichever thread asks next, so that a thread on a busy
   core takes fewer; each item is computed whole by one thread, so results do not depend on
   which thread takes it. */
static int acmoe__next_item(int *cursor) {
#ifdef ACMOE_NO_THREADS
    return (*cursor)++;
#else
    return __atomic_fetch_add(cursor, 1, __ATOMIC_RELAXED);
#endif
}

static acmoe_status acmoe__kernel_for(acmoe_isa isa, acmoe__kernel *out);

/* Largest micro-tile over all kernels, so the workspace fits whichever path is chosen later,
   and the units mc and nc are rounded to so that blocks hold whole micro-panels of any kernel. */
#define ACMOE__MR_MAX 6
#define ACMOE__NR_MAX 64
#define ACMOE__MC_UNIT 12
#define ACMOE__NC_UNIT 64

/* The depth and column blocking of a path. AVX2: a 384-deep micro-panel of B' fits the L1
   cache and the 352-wide model layers are one depth block. AVX-512: its micro-panels are four
   times as wide and come from L2 anyway, so a deeper block, which reads and writes C half as
   often, is faster on large products; nc halves so that the workspace keeps its size. */
static int acmoe__default_kc(acmoe_isa isa) { return isa == ACMOE_ISA_AVX512 ? 768 : 384; }
static int acmoe__default_nc(acmoe_isa isa) { return isa == ACMOE_ISA_AVX512 ? 2048 : 4096; }

/* The blocking stays 0, the path's own, so that a caller who then picks another path gets
   that path's blocking rather than this CPU's best path's. */
ACMOE_API acmoe_ctx_desc acmoe_ctx_defaults(void) {
    acmoe_ctx_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.n_threads = acmoe__online_cpus();
    desc.isa = acmoe_cpu_isa();
    return desc;
}

static acmoe_status acmoe__resolve_desc(const acmoe_ctx_desc *in, acmoe_ctx_desc *out) {
    acmoe_ctx_desc desc = acmoe_ctx_defaults();
    desc.mc = 192;
    desc.kc = acmoe__default_kc(desc.isa);
    desc.nc = acmoe__default_nc(desc.isa);
    if (in) {
        if (in->n_threads < 0 || in->mc < 0 || in->kc < 0 || in->nc < 0) return ACMOE_ERR_ARG;
        if ((int)in->isa < 0 || (int)in->isa >= ACMOE_ISA_COUNT) return ACMOE_ERR_ARG;
        if (in->n_threads) desc.n_threads = in->n_threads;
        if (in->isa) desc.isa = in->isa;
        desc.kc = in->kc ? in->kc : acmoe__default_kc(desc.isa);
        desc.nc = in->nc ? in->nc : acmoe__default_nc(desc.isa);
        if (in->mc) desc.mc = in->mc;
        desc.clock = in->clock, desc.comm = in->comm;
    }
    if (desc.n_threads > 1024 || desc.mc > 1 << 16 || desc.kc > 1 << 16 || desc.nc > 1 << 20) return ACMOE_ERR_ARG;
#ifdef ACMOE_NO_THREADS
    desc.n_threads = 1;
#endif
    desc.mc = (desc.mc + ACMOE__MC_UNIT - 1) / ACMOE__MC_UNIT * ACMOE__MC_UNIT;
    desc.nc = (desc.nc + ACMOE__NC_UNIT - 1) / ACMOE__NC_UNIT * ACMOE__NC_UNIT;
    *out = desc;
    return ACMOE_OK;
}

static int acmoe__pack_a_stride(int kc);

static acmoe_status acmoe__workspace_create(acmoe_ctx *ctx) {
    const acmoe_ctx_desc *resolved = &ctx->desc;
    size_t a = (size_t)resolved->mc * (size_t)acmoe__pack_a_stride(resolved->kc);
    size_t b = (size_t)resolved->nc * resolved->kc;
    size_t panel = (size_t)ACMOE__NR_MAX * resolved->kc, tile = ACMOE__MR_MAX * ACMOE__NR_MAX;
    size_t per_thread = acmoe__align_up((a + b + panel + tile) * sizeof(float) + 4 * ACMOE_ALIGN);
    unsigned char *p;
    int t;
    ctx->ws = (acmoe__workspace *)ACMOE_MALLOC(sizeof(acmoe__workspace) * (size_t)resolved->n_threads);
    ctx->ws_memory = acmoe__aligned_alloc(per_thread * (size_t)resolved->n_threads);
    if (!ctx->ws || !ctx->ws_memory) return ACMOE_ERR_NOMEM;
    p = (unsigned char *)ctx->ws_memory;
    for (t = 0; t < resolved->n_threads; t++, p += per_thread) {
        acmoe__workspace *w = &ctx->ws[t];
        w->pack_a = (float *)p;
        w->pack_b = (float *)(p + acmoe__align_up(a * sizeof(float)));
        w->panel = w->pack_b + acmoe__align_up(b * sizeof(float)) / sizeof(float);
        w->tile = w->panel + acmoe__align_up(panel * sizeof(float)) / sizeof(float);
    }
    return ACMOE_OK;
}

ACMOE_API void acmoe_ctx_destroy(acmoe_ctx *ctx) {
    if (!ctx) return;
    acmoe__pool_stop(&ctx->pool);
    acmoe__aligned_free(ctx->ws_memory);
    ACMOE_FREE(ctx->ws);
    ACMOE_FREE(ctx);
}

ACMOE_API acmoe_status acmoe_ctx_create(acmoe_ctx **out, const acmoe_ctx_desc *desc) {
    acmoe_ctx *ctx;
    acmoe_status s;
    if (!out) return ACMOE_ERR_NULL;
    *out = NULL;
    ctx = (acmoe_ctx *)ACMOE_MALLOC(sizeof *ctx);
    if (!ctx) return ACMOE_ERR_NOMEM;
    memset(ctx, 0, sizeof *ctx);
    ctx->pool.n = 1;
    s = acmoe__resolve_desc(desc, &ctx->desc);
    if (s == ACMOE_OK) s = acmoe__kernel_for(ctx->desc.isa, &ctx->kernel);
    if (s == ACMOE_OK) s = acmoe__workspace_create(ctx);
    if (s == ACMOE_OK) s = acmoe__pool_start(&ctx->pool, ctx->desc.n_threads);
    if (s != ACMOE_OK) {
        acmoe_ctx_destroy(ctx);
        return s;
    }
    *out = ctx;
    return ACMOE_OK;
}

ACMOE_API acmoe_status acmoe_ctx_set_isa(acmoe_ctx *ctx, acmoe_isa isa) {
    acmoe__kernel k;
    acmoe_status s;
    if (!ctx) return ACMOE_ERR_NULL;
    if ((int)isa < 0 || (int)isa >= ACMOE_ISA_COUNT) return ACMOE_ERR_ARG;
    s = acmoe__kernel_for(isa == ACMOE_ISA_AUTO ? acmoe_cpu_isa() : isa, &k);
    if (s != ACMOE_OK) return s;
    ctx->kernel = k;
    ctx->desc.isa = k.isa;
    return ACMOE_OK;
}

ACMOE_API acmoe_ctx_desc acmoe_ctx_settings(const acmoe_ctx *ctx) {
    acmoe_ctx_desc none;
    if (ctx) return ctx->desc;
    memset(&none, 0, sizeof none);
    return none;
}

static acmoe_status acmoe__single_sum(acmoe_comm *comm, float *data, size_t count) {
    (void)comm, (void)data, (void)count;
    return ACMOE_OK;
}

static acmoe_status acmoe__single_exchange(acmoe_comm *comm, const float *send, const size_t *send_counts, float *recv,
                                           const size_t *recv_counts) {
    (void)comm;
    if (send_counts[0] != recv_counts[0]) return ACMOE_ERR_SHAPE;
    if (send_counts[0]) memmove(recv, send, sizeof(float) * send_counts[0]);
    return ACMOE_OK;
}

static acmoe_status acmoe__single_broadcast(acmoe_comm *comm, void *data, size_t bytes, int root) {
    (void)comm, (void)data, (void)bytes;
    return root == 0 ? ACMOE_OK : ACMOE_ERR_ARG;
}

static acmoe_status acmoe__single_barrier(acmoe_comm *comm) {
    (void)comm;
    return ACMOE_OK;
}

ACMOE_API acmoe_comm acmoe_comm_single(void) {
    acmoe_comm comm;
    memset(&comm, 0, sizeof comm);
    comm.rank = 0, comm.size = 1;
    comm.sum = acmoe__single_sum, comm.exchange = acmoe__single_exchange;
    comm.broadcast = acmoe__single_broadcast, comm.barrier = acmoe__single_barrier;
    return comm;
}

#ifdef ACMOE_MPI
typedef struct acmoe__mpi {
    MPI_Comm *comm;
    float *scratch; /* the sum's: size chunks of the largest share */
    size_t scratch_floats;
    int *counts, *offsets; /* [size] each, in elements, for the v-collectives */
} acmoe__mpi;

/* The share [*first, *first + *count) of count elements that rank sums. */
static void acmoe__mpi_share(size_t count, int size, int rank, size_t *first, size_t *share) {
    *first = count * (size_t)rank / (size_t)size;
    *share = count * (size_t)(rank + 1) / (size_t)size - *first;
}

/* Each rank sums its share of every rank's data in rank order (one all-to-all), then every
   rank gathers the sums: the same bits everywhere, whatever MPI's own reduction order. */
static acmoe_status acmoe__mpi_sum(acmoe_comm *comm, float *data, size_t count) {
    acmoe__mpi *m = (acmoe__mpi *)comm->user;
    const int size = comm->size;
    int *shares = m->counts, *firsts = m->offsets, *mine = m->counts + size, *places = m->offsets + size;
    size_t first, share, i;
    int q;
    if (count > (size_t)INT_MAX) return ACMOE_ERR_SHAPE;
    acmoe__mpi_share(count, size, comm->rank, &first, &share);
    if (share * (size_t)size > m->scratch_floats) {
        float *grown = (float *)ACMOE_REALLOC(m->scratch, sizeof(float) * share * (size_t)size);
        if (!grown) return ACMOE_ERR_NOMEM;
        m->scratch = grown, m->scratch_floats = share * (size_t)size;
    }
    for (q = 0; q < size; q++) { /* to rank q its share of my data; from each rank my share of its */
        size_t f, n;
        acmoe__mpi_share(count, size, q, &f, &n);
        shares[q] = (int)n, firsts[q] = (int)f;
        mine[q] = (int)share, places[q] = (int)(share * (size_t)q);
    }
    if (MPI_Alltoallv(data, shares, firsts, MPI_FLOAT, m->scratch, mine, places, MPI_FLOAT, *m->comm) != MPI_SUCCESS)
        return ACMOE_ERR_IO;
    for (i = 0; i < share; i++) {
        float total = m->scratch[i];
        for (q = 1; q < size; q++) total += m->scratch[share * (size_t)q + i];
        data[first + i] = total;
    }
    return MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, data, shares, firsts, MPI_FLOAT, *m->comm) == MPI_SUCCESS
               ? ACMOE_OK
               : ACMOE_ERR_IO;
}

static acmoe_status acmoe__mpi_exchange(acmoe_comm *comm, const float *send, const size_t *send_counts, float *recv,
                                        const size_t *recv_counts) {
    acmoe__mpi *m = (acmoe__mpi *)comm->user;
    const int size = comm->size;
    int *send_offsets = m->offsets, *recv_offsets = m->offsets + size, *sends = m->counts, *recvs = m->counts + size;
    size_t sent = 0, received = 0;
    int q;
    for (q = 0; q < size; q++) {
        if (send_counts[q] > (size_t)INT_MAX || recv_counts[q] > (size_t)INT_MAX || sent > (size_t)INT_MAX ||
            received > (size_t)INT_MAX)
            return ACMOE_ERR_SHAPE;
        sends[q] = (int)send_counts[q], send_offsets[q] = (int)sent, sent += send_counts[q];
        recvs[q] = (int)recv_counts[q], recv_offsets[q] = (int)received, received += recv_counts[q];
    }
    return MPI_Alltoallv(send, sends, send_offsets, MPI_FLOAT, recv, recvs, recv_offsets, MPI_FLOAT, *m->comm) ==
                   MPI_SUCCESS
               ? ACMOE_OK
               : ACMOE_ERR_IO;
}

static acmoe_status acmoe__mpi_broadcast(acmoe_comm *comm, void *data, size_t bytes, int root) {
    acmoe__mpi *m = (acmoe__mpi *)comm->user;
    if (root < 0 || root >= comm->size) return ACMOE_ERR_ARG;
    if (bytes > (size_t)INT_MAX) return ACMOE_ERR_SHAPE;
    return MPI_Bcast(data, (int)bytes, MPI_BYTE, root, *m->comm) == MPI_SUCCESS ? ACMOE_OK : ACMOE_ERR_IO;
}

static acmoe_status acmoe__mpi_barrier(acmoe_comm *comm) {
    return MPI_Barrier(*((acmoe__mpi *)comm->user)->comm) == MPI_SUCCESS ? ACMOE_OK : ACMOE_ERR_IO;
}

ACMOE_API acmoe_status acmoe_comm_mpi(acmoe_comm *out, MPI_Comm *comm) {
    acmoe__mpi *m;
    int rank, size;
    if (!out || !comm) return ACMOE_ERR_NULL;
    memset(out, 0, sizeof *out);
    if (MPI_Comm_rank(*comm, &rank) != MPI_SUCCESS || MPI_Comm_size(*comm, &size) != MPI_SUCCESS) return ACMOE_ERR_IO;
    m = (acmoe__mpi *)ACMOE_MALLOC(sizeof *m + sizeof(int) * 4 * (size_t)size);
    if (!m) return ACMOE_ERR_NOMEM;
    memset(m, 0, sizeof *m);
    m->comm = comm, m->counts = (int *)(m + 1), m->offsets = m->counts + 2 * size;
    out->rank = rank, out->size = size, out->user = m;
    out->sum = acmoe__mpi_sum, out->exchange = acmoe__mpi_exchange;
    out->broadcast = acmoe__mpi_broadcast, out->barrier = acmoe__mpi_barrier;
    return ACMOE_OK;
}

ACMOE_API void acmoe_comm_mpi_destroy(acmoe_comm *comm) {
    acmoe__mpi *m = comm ? (acmoe__mpi *)comm->user : NULL;
    if (!m) return;
    ACMOE_FREE(m->scratch);
    ACMOE_FREE(m);
    comm->user = NULL;
}
#endif

/* ========================================================================================== */
/* 5. Matrix multiplication                                                                   */
/* ========================================================================================== */
/* BLIS structure. The product is first oriented: C' = A' B' is either C = op(A) op(B) or
   C^T = op(B)^T op(A)^T, whichever lets B' be read along its rows. The driver then walks
   column blocks (nc) of B', depth blocks (kc) and row blocks (mc) of A', and calls a
   micro-kernel for each mr x nr tile of C'. Large operands are packed into micro-panels;
   small ones are read in place (an expert that got 20 tokens should not pay for packing).
   Each micro-kernel is one template: mr rows broadcast from A' times nr/vlen vectors of B'. */

/* Kernel template. a_rows holds mr row pointers of A' (element p of row i at a_rows[i][p *
   a_step]); b advances b_step floats per depth step; the first rows rows of the mr x nr tile
   c (row stride c_step) are overwritten or accumulated, then the epilogue (may be NULL; its
   pointers at the tile's corner) is applied. */
#define ACMOE__DEFINE_KERNEL(NAME, TARGET, VEC, MR, NVEC, VLEN, LOAD, STORE, SET1, FMA, ADD, ZERO,  \
                             KEEP_POSITIVE)                                                         \
    TARGET static void NAME(int kc, const float *const *a_rows, ptrdiff_t a_step, const float *b, \
                            ptrdiff_t b_step, float *c, ptrdiff_t c_step, int rows, int accumulate, \
                            const acmoe__epilogue *epilogue) {                                      \
        const float *bias;                                                                          \
        float *relu, *sums;                                                                         \
        VEC acc[MR][NVEC], column[NVEC];                                                            \
        const float *ap[MR];                                                                        \
        ptrdiff_t ka = 0;                                                                           \
        int i, v, p;                                                                                \
        ACMOE__UNROLL for (i = 0; i < MR; i++) {                                                   \
            ap[i] = a_rows[i];                                                                      \
            ACMOE__UNROLL for (v = 0; v < NVEC; v++) {                                             \
                acc[i][v] = ZERO;                                                                   \
                if (i < rows) ACMOE__PREFETCH_WRITE(c + i * c_step + v * VLEN);                    \
            }                                                                                       \
        }                                                                                           \
        ACMOE__UNROLL_DEPTH for (p = 0; p < kc; p++, ka += a_step, b += b_step) {                  \
            VEC bv[NVEC];                                                                           \
            ACMOE__UNROLL for (v = 0; v < NVEC; v++) bv[v] = LOAD(b + v * VLEN);                   \
            ACMOE__UNROLL for (i = 0; i < MR; i++) {                                               \
                VEC av = SET1(ap[i][ka]);                                                           \
                ACMOE__UNROLL for (v = 0; v < NVEC; v++) acc[i][v] = FMA(av, bv[v], acc[i][v]);    \
            }                                                                                       \
        }                                                                                           \
        if (!epilogue) { /* the common case, kept free of the epilogue's tests */                 \
            ACMOE__UNROLL for (i = 0; i < MR; i++) {                                               \
                if (i == rows) break;                                                               \
                ACMOE__UNROLL for (v = 0; v < NVEC; v++) {                                         \
                    float *cp = c + i * c_step + v * VLEN;                                          \
                    STORE(cp, accumulate ? ADD(LOAD(cp), acc[i][v]) : acc[i][v]);                   \
                }                                                                                   \
            }                                                                                       \
            return;                                                                                 \
        }                                                                                           \
        bias = epilogue->bias, relu = epilogue->relu, sums = epilogue->column_sums;                \
        ACMOE__UNROLL for (v = 0; v < NVEC; v++) column[v] = sums ? LOAD(sums + v * VLEN) : ZERO;   \
        ACMOE__UNROLL for (i = 0; i < MR; i++) {                                                   \
            if (i == rows) break;                                                                   \
            ACMOE__UNROLL for (v = 0; v < NVEC; v++) {                                             \
                float *cp = c + i * c_step + v * VLEN;                                              \
                VEC sum = accumulate ? ADD(LOAD(cp), acc[i][v]) : acc[i][v];                        \
                if (epilogue->relu_grad) sum = KEEP_POSITIVE(LOAD(cp), sum);                        \
                if (bias) sum = ADD(sum, LOAD(bias + v * VLEN));                                    \
                STORE(cp, sum);                                                                     \
                if (relu) STORE(relu + i * epilogue->ld_relu + v * VLEN, KEEP_POSITIVE(sum, sum));  \
                if (sums) column[v] = ADD(column[v], sum);                                          \
            }                                                                                       \
        }                                                                                           \
        if (sums) ACMOE__UNROLL for (v = 0; v < NVEC; v++) STORE(sums + v * VLEN, column[v]);      \
    }

#define ACMOE__S_LOAD(p) (*(p))
#define ACMOE__S_STORE(p, x) (*(p) = (x))
#define ACMOE__S_SET1(x) (x)
#define ACMOE__S_FMA(a, b, c) ((a) * (b) + (c))
#define ACMOE__S_ADD(a, b) ((a) + (b))
#define ACMOE__S_KEEP_POSITIVE(h, g) ((h) > 0.0f ? (g) : 0.0f)
#define ACMOE__S_KERNEL(NAME, NVEC) \
    ACMOE__DEFINE_KERNEL(NAME, , float, 4, NVEC, 1, ACMOE__S_LOAD, ACMOE__S_STORE, ACMOE__S_SET1, \
                         ACMOE__S_FMA, ACMOE__S_ADD, 0.0f, ACMOE__S_KEEP_POSITIVE)
ACMOE__S_KERNEL(acmoe__kernel_scalar, 8)
ACMOE__S_KERNEL(acmoe__kernel_scalar_half, 4)
ACMOE__S_KERNEL(acmoe__kernel_scalar_quarter, 2)

/* 6 x 16 uses 12 of the 16 ymm registers for accumulators (the BLIS Haswell shape). */
#ifdef ACMOE__X86
#define ACMOE__AVX2_KEEP_POSITIVE(h, g) _mm256_and_ps(_mm256_cmp_ps((h), _mm256_setzero_ps(), _CMP_GT_OQ), (g))
#define ACMOE__AVX2_KERNEL(NAME, NVEC)                                                              \
    ACMOE__DEFINE_KERNEL(NAME, ACMOE__TARGET_AVX2, __m256, 6, NVEC, 8, _mm256_loadu_ps,             \
                         _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps,        \
                         _mm256_setzero_ps(), ACMOE__AVX2_KEEP_POSITIVE)
ACMOE__AVX2_KERNEL(acmoe__kernel_avx2, 2)
ACMOE__AVX2_KERNEL(acmoe__kernel_avx2_half, 1)
#endif

/* 6 x 64 uses 24 of the 32 zmm registers: 4 vector loads and 6 broadcasts feed 24 FMAs, which
   measured faster than the 8x32, 12x32 and 14x32 shapes. */
#ifdef ACMOE__HAVE_AVX512
#define ACMOE__AVX512_KEEP_POSITIVE(h, g) \
    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask((h), _mm512_setzero_ps(), _CMP_GT_OQ), (g))
#define ACMOE__AVX512_KERNEL(NAME, NVEC)                                                            \
    ACMOE__DEFINE_KERNEL(NAME, ACMOE__TARGET_AVX512, __m512, 6, NVEC, 16, _mm512_loadu_ps,          \
                         _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps,        \
                         _mm512_setzero_ps(), ACMOE__AVX512_KEEP_POSITIVE)
ACMOE__AVX512_KERNEL(acmoe__kernel_avx512, 4)
ACMOE__AVX512_KERNEL(acmoe__kernel_avx512_half, 2)
ACMOE__AVX512_KERNEL(acmoe__kernel_avx512_quarter, 1)

/* A product one vector wide keeps only mr chains in flight, fewer than the FMA units'
   latency covers, and loads a vector for every mr broadcasts. This kernel takes twice the
   rows, at a stride rather than from row pointers (twelve pointers would not stay in
   registers), with each element the same chain of multiply-adds as the micro-kernels'. */
ACMOE__TARGET_AVX512 static void acmoe__kernel_avx512_tall(int kc, const float *a, ptrdiff_t a_rs, ptrdiff_t a_cs,
                                                           const float *b, ptrdiff_t b_step, float *c,
                                                           ptrdiff_t c_step, int accumulate) {
    const float *base[ACMOE__TALL_ROWS / 3];
    const ptrdiff_t offset[3] = {0, a_rs, 2 * a_rs};
    __m512 acc[ACMOE__TALL_ROWS];
    int i, p;
    ACMOE__UNROLL for (i = 0; i < ACMOE__TALL_ROWS; i++) acc[i] = _mm512_setzero_ps();
    ACMOE__UNROLL for (i = 0; i < ACMOE__TALL_ROWS / 3; i++) base[i] = a + 3 * i * a_rs;
    for (p = 0; p < kc; p++, b += b_step) {
        const __m512 bv = _mm512_loadu_ps(b);
        const ptrdiff_t at = p * a_cs;
        ACMOE__UNROLL for (i = 0; i < ACMOE__TALL_ROWS; i++)
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(base[i / 3][offset[i % 3] + at]), bv, acc[i]);
    }
    ACMOE__UNROLL for (i = 0; i < ACMOE__TALL_ROWS; i++) {
        float *cp = c + i * c_step;
        _mm512_storeu_ps(cp, accumulate ? _mm512_add_ps(_mm512_loadu_ps(cp), acc[i]) : acc[i]);
    }
}
#endif

/* 6 x 16 uses 24 of the 32 q registers. */
#ifdef ACMOE__NEON
#define ACMOE__NEON_FMA(a, b, c) vfmaq_f32(c, a, b)
#define ACMOE__NEON_KEEP_POSITIVE(h, g) \
    vreinterpretq_f32_u32(vandq_u32(vcgtq_f32((h), vdupq_n_f32(0.0f)), vreinterpretq_u32_f32(g)))
#define ACMOE__NEON_KERNEL(NAME, NVEC)                                                              \
    ACMOE__DEFINE_KERNEL(NAME, , float32x4_t, 6, NVEC, 4, vld1q_f32, vst1q_f32, vdupq_n_f32,        \
                         ACMOE__NEON_FMA, vaddq_f32, vdupq_n_f32(0.0f), ACMOE__NEON_KEEP_POSITIVE)
ACMOE__NEON_KERNEL(acmoe__kernel_neon, 4)
ACMOE__NEON_KERNEL(acmoe__kernel_neon_half, 2)
ACMOE__NEON_KERNEL(acmoe__kernel_neon_quarter, 1)
#endif

/* One-row kernels: c (+)= a B for a single row of A' (a query decoding one position), where
   a micro-kernel would run mr rows and keep one. Columns go NVEC vectors at a time, widest
   first, so that a long row keeps as many chains in flight as the FMA latency needs; each
   element is the micro-kernels' chain of one multiply-add per depth step, in order, so the
   bits equal those of the same row in a product of many rows. */
#define ACMOE__ONE_ROW_BLOCKS(NVEC, VEC, VLEN, LOAD, STORE, SET1, FMA, ADD, ZERO)                  \
    for (; j + NVEC * VLEN <= n; j += NVEC * VLEN) {                                                \
        VEC acc[NVEC];                                                                              \
        const float *bp = b + j;                                                                    \
        ptrdiff_t ka = 0;                                                                           \
        ACMOE__UNROLL for (v = 0; v < NVEC; v++) acc[v] = ZERO;                                    \
        for (p = 0; p < kc; p++, ka += a_step, bp += b_step) {                                     \
            const VEC av = SET1(a[ka]);                                                             \
            ACMOE__UNROLL for (v = 0; v < NVEC; v++) acc[v] = FMA(av, LOAD(bp + v * VLEN), acc[v]); \
        }                                                                                           \
        ACMOE__UNROLL for (v = 0; v < NVEC; v++) {                                                 \
            float *cp = c + j + v * VLEN;                                                           \
            STORE(cp, accumulate ? ADD(LOAD(cp), acc[v]) : acc[v]);                                 \
        }                                                                                           \
    }
#define ACMOE__DEFINE_ONE_ROW(SFX, TARGET, VEC, VLEN, LOAD, STORE, SET1, FMA, ADD, ZERO)               \
    TARGET static void acmoe__one_row_##SFX(int kc, const float *a, ptrdiff_t a_step, const float *b, \
                                            ptrdiff_t b_step, float *c, int n, int accumulate) {     \
        int j = 0, p, v;                                                                            \
        ACMOE__ONE_ROW_BLOCKS(8, VEC, VLEN, LOAD, STORE, SET1, FMA, ADD, ZERO)                      \
        ACMOE__ONE_ROW_BLOCKS(4, VEC, VLEN, LOAD, STORE, SET1, FMA, ADD, ZERO)                      \
        ACMOE__ONE_ROW_BLOCKS(2, VEC, VLEN, LOAD, STORE, SET1, FMA, ADD, ZERO)                      \
        ACMOE__ONE_ROW_BLOCKS(1, VEC, VLEN, LOAD, STORE, SET1, FMA, ADD, ZERO)                      \
    }
#ifdef ACMOE__X86
ACMOE__DEFINE_ONE_ROW(avx2, ACMOE__TARGET_AVX2, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps,
                      _mm256_fmadd_ps, _mm256_add_ps, _mm256_setzero_ps())
#endif
#ifdef ACMOE__HAVE_AVX512
ACMOE__DEFINE_ONE_ROW(avx512, ACMOE__TARGET_AVX512, __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps,
                      _mm512_fmadd_ps, _mm512_add_ps, _mm512_setzero_ps())
#endif
#ifdef ACMOE__NEON
ACMOE__DEFINE_ONE_ROW(neon, , float32x4_t, 4, vld1q_f32, vst1q_f32, vdupq_n_f32, ACMOE__NEON_FMA, vaddq_f32,
                      vdupq_n_f32(0.0f))
#endif

/* Row kernels: the loops attention, the losses, the layer norms and the optimizer spend
   their time in. A row's maximum; y = exp((x - shift) * scale) with its sum (y may be x, or
   NULL for the sum alone); a sum and a dot product; an AdamW update; a layer norm's row
   forward and backward (see acmoe__layernorm). Vector paths keep one partial sum per lane
   and add the lanes in a fixed tree, so a path's results are fixed. Their exp of a is 2^t
   with t = a log2(e) folded into the scale: 2^n 2^f with |f| <= 1/2 and a degree-5 minimax
   polynomial (relative error about 2e-7, plus about 2e-7 |a| from rounding t), for
   arguments at most 0: every caller subtracts the row's maximum. */
#define ACMOE__EXP2_LO -125.0f /* keeps 2^n a normal number; 2^-125 is far below float epsilon */
#define ACMOE__LN_EPS 1e-5f

static float acmoe__row_max_scalar(const float *x, int n) {
    float top = x[0];
    int i;
    for (i = 1; i < n; i++) top = x[i] > top ? x[i] : top; /* fmaxf is a libm call */
    return top;
}

static float acmoe__row_exp_scalar(float *y, const float *x, int n, float shift, float scale) {
    float sum = 0.0f, e;
    int i;
    for (i = 0; i < n; i++) {
        e = expf((x[i] - shift) * scale);
        sum += e;
        if (y) y[i] = e;
    }
    return sum;
}

static float acmoe__row_sum_scalar(const float *x, int n) {
    float sum = 0.0f;
    int i;
    for (i = 0; i < n; i++) sum += x[i];
    return sum;
}

static float acmoe__row_dot_scalar(const float *a, const float *b, int n) {
    float sum = 0.0f;
    int i;
    for (i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static void acmoe__row_axpy_scalar(float *y, const float *x, int n, float a) {
    int i;
    for (i = 0; i < n; i++) y[i] += a * x[i];
}

static void acmoe__row_scale_scalar(float *y, const float *x, int n, float a) {
    int i;
    for (i = 0; i < n; i++) y[i] = a * x[i];
}

static void acmoe__row_mul_scalar(float *y, const float *a, const float *b, int n) {
    int i;
    for (i = 0; i < n; i++) y[i] = a[i] * b[i];
}

static void acmoe__row_mul_add_scalar(float *y, const float *a, const float *b, int n) {
    int i;
    for (i = 0; i < n; i++) y[i] += a[i] * b[i];
}

static void acmoe__row_deviation_scalar(float *y, const float *x, const float *mu, int n, int squared) {
    int i;
    for (i = 0; i < n; i++) {
        const float dev = x[i] - mu[i];
        y[i] += squared ? dev * dev : fabsf(dev);
    }
}

/* g where h > 0, else 0 (relu(h) is relu_grad(h, h)). Branch-free: the sign of a hidden
   unit is a coin flip, and a branch on it mispredicts half the time. */
static float acmoe__relu_grad(float h, float g) {
    uint32_t bits;
    memcpy(&bits, &g, sizeof bits);
    bits &= 0u - (uint32_t)(h > 0.0f);
    memcpy(&g, &bits, sizeof g);
    return g;
}

static void acmoe__row_relu_scalar(float *y, const float *h, const float *g, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) y[i] = acmoe__relu_grad(h[i], g[i]);
}

static void acmoe__row_softmax_grad_scalar(float *d, const float *e, int n, float dot, float scale) {
    int i;
    for (i = 0; i < n; i++) d[i] = e[i] * (d[i] - dot) * scale;
}

/* One AdamW step (see acmoe_lm_step) for n parameters p with gradients g and moments m, v:
   the gradient scaled by the clip factor, the moments, then the decoupled decay. */
struct acmoe__adam {
    float scale, beta1, beta2, lr, c1, c2, eps, decay;
};

static void acmoe__adam_one(float *p, float g, float *m, float *v, const acmoe__adam *a) {
    g *= a->scale;
    *m = a->beta1 * *m + (1.0f - a->beta1) * g;
    *v = a->beta2 * *v + (1.0f - a->beta2) * g * g;
    *p -= a->lr * (*m * a->c1 / (sqrtf(*v * a->c2) + a->eps) + a->decay * *p);
}

static void acmoe__row_adam_scalar(float *p, const float *g, float *m, float *v, size_t n, const acmoe__adam *a) {
    size_t i;
    for (i = 0; i < n; i++) acmoe__adam_one(p + i, g[i], m + i, v + i, a);
}

/* The lanes of a vector accumulator (or of partial sums kept apart so that additions do not
   wait on each other) added as a tree: the same fixed order every time, and a chain of
   log2(n) additions rather than n. */
static float acmoe__lanes_sum(float *lanes, int n) {
    int w, l;
    for (w = n / 2; w > 0; w /= 2)
        for (l = 0; l < w; l++) lanes[l] += lanes[l + w];
    return lanes[0];
}

/* xhat = (x + add - mean) / sqrt(var + eps) (add may be NULL) and y = xhat g + b; returns
   1 / sqrt(var + eps). */
static float acmoe__row_layernorm_scalar(float *xhat, float *y, const float *x, const float *add, const float *g,
                                         const float *b, int n) {
    float mean, rs;
    int i;
    if (add) {
        for (i = 0; i < n; i++) xhat[i] = x[i] + add[i];
        x = xhat;
    }
    mean = acmoe__row_sum_scalar(x, n) / (float)n;
    for (i = 0; i < n; i++) xhat[i] = x[i] - mean; /* centred, then scaled */
    rs = 1.0f / sqrtf(acmoe__row_dot_scalar(xhat, xhat, n) / (float)n + ACMOE__LN_EPS);
    for (i = 0; i < n; i++) {
        xhat[i] *= rs;
        y[i] = xhat[i] * g[i] + b[i];
    }
    return rs;
}

/* dx (written, or added to when accumulate) = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
   with dxhat = dy g; eight partial sums of each mean, as the AVX2 path keeps. */
static void acmoe__row_layernorm_backward_scalar(float *dx, const float *dy, const float *xhat, const float *g,
                                                 float rstd, int n, int accumulate) {
    float part_d[8] = {0}, part_dx[8] = {0}, mean_d, mean_dx;
    int i;
    for (i = 0; i < n; i++) {
        float dxhat = dy[i] * g[i];
        part_d[i % 8] += dxhat;
        part_dx[i % 8] += dxhat * xhat[i];
    }
    mean_d = acmoe__lanes_sum(part_d, 8) / (float)n;
    mean_dx = acmoe__lanes_sum(part_dx, 8) / (float)n;
    for (i = 0; i < n; i++) {
        float v = rstd * (dy[i] * g[i] - mean_d - xhat[i] * mean_dx);
        dx[i] = accumulate ? dx[i] + v : v;
    }
}

/* The sum of squares of n floats in double, in eight chains (element i in chain i mod 8)
   added in a fixed order. Each product is exact in double, so whether the compiler turns the
   chains into vector lanes (as each path's target lets it) or fuses a product into its sum,
   the bits are the same on every path. */
#define ACMOE__DEFINE_SUM_SQUARES(SFX, TARGET)                                                          \
    TARGET static double acmoe__sum_squares_##SFX(const float *x, size_t n) {                          \
        double s[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};                                          \
        size_t i;                                                                                        \
        int j;                                                                                           \
        for (i = 0; i + 8 <= n; i += 8)                                                                  \
            for (j = 0; j < 8; j++) s[j] += (double)x[i + j] * x[i + j];                                 \
        for (j = 0; i < n; i++, j++) s[j] += (double)x[i] * x[i];                                        \
        return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));                      \
    }
ACMOE__DEFINE_SUM_SQUARES(scalar, )

#define ACMOE__DEFINE_ROW_KERNELS(SFX, TARGET, VEC, VLEN, LOAD, STORE, SET1, ADD, SUB, MUL, DIV, SQRT, FMA, MAX,  \
                                  ROUND, LDEXP, HSUM, HMAX, KEEP_POSITIVE)                              \
    ACMOE__DEFINE_SUM_SQUARES(SFX, TARGET)                                                               \
    TARGET static VEC acmoe__exp2_##SFX(VEC t) {                                                         \
        VEC n, f, p;                                                                                     \
        t = MAX(t, SET1(ACMOE__EXP2_LO));                                                                \
        n = ROUND(t);                                                                                    \
        f = SUB(t, n); /* |f| <= 1/2 */                                                                  \
        p = FMA(SET1(1.3264727e-3f), f, SET1(9.6715127e-3f));                                            \
        p = FMA(p, f, SET1(5.5507337e-2f));                                                              \
        p = FMA(p, f, SET1(0.24022242f));                                                                \
        p = FMA(p, f, SET1(0.69314698f));                                                                \
        p = FMA(p, f, SET1(1.0f));                                                                       \
        return LDEXP(p, n);                                                                              \
    }                                                                                                    \
    TARGET static float acmoe__row_max_##SFX(const float *x, int n) {                                   \
        VEC m = SET1(x[0]);                                                                              \
        int i;                                                                                           \
        for (i = 0; i + VLEN <= n; i += VLEN) m = MAX(m, LOAD(x + i));                                   \
        if (i < n) m = MAX(m, acmoe__tail_load_##SFX(x + i, n - i, x[0]));                               \
        return HMAX(m);                                                                                  \
    }                                                                                                    \
    TARGET static float acmoe__row_exp_##SFX(float *y, const float *x, int n, float shift, float scale) { \
        const float to_base2 = (float)(scale * 1.4426950408889634); /* e^a = 2^(a log2 e) */             \
        VEC acc = SET1(0.0f), e;                                                                         \
        int i;                                                                                           \
        for (i = 0; i + VLEN <= n; i += VLEN) {                                                          \
            e = acmoe__exp2_##SFX(MUL(SUB(LOAD(x + i), SET1(shift)), SET1(to_base2)));                   \
            acc = ADD(acc, e);                                                                           \
            if (y) STORE(y + i, e);                                                                      \
        }                                                                                                \
        if (i < n) {                                                                                     \
            e = MUL(SUB(acmoe__tail_load_##SFX(x + i, n - i, shift), SET1(shift)), SET1(to_base2));      \
            e = acmoe__tail_keep_##SFX(acmoe__exp2_##SFX(e), n - i);                                     \
            acc = ADD(acc, e);                                                                           \
            if (y) acmoe__tail_store_##SFX(y + i, e, n - i);                                             \
        }                                                                                                \
        return HSUM(acc);                                                                                \
    }                                                                                                    \
    TARGET static float acmoe__row_sum_##SFX(const float *x, int n) {                                   \
        VEC acc = SET1(0.0f);                                                                            \
        int i;                                                                                           \
        for (i = 0; i + VLEN <= n; i += VLEN) acc = ADD(acc, LOAD(x + i));                               \
        if (i < n) acc = ADD(acc, acmoe__tail_load_##SFX(x + i, n - i, 0.0f));                           \
        return HSUM(acc);                                                                                \
    }                                                                                                    \
    TARGET static float acmoe__row_dot_##SFX(const float *a, const float *b, int n) {                   \
        VEC acc = SET1(0.0f);                                                                            \
        int i;                                                                                           \
        for (i = 0; i + VLEN <= n; i += VLEN) acc = FMA(LOAD(a + i), LOAD(b + i), acc);                 \
        if (i < n)                                                                                       \
            acc = FMA(acmoe__tail_load_##SFX(a + i, n - i, 0.0f), acmoe__tail_load_##SFX(b + i, n - i, 0.0f), acc); \
        return HSUM(acc);                                                                                \
    }                                                                                                    \
    TARGET static void acmoe__row_axpy_##SFX(float *y, const float *x, int n, float a) {                \
        int i;                                                                                           \
        for (i = 0; i + VLEN <= n; i += VLEN) STORE(y + i, ADD(LOAD(y + i), MUL(SET1(a), LOAD(x + i)))); \
        if (i < n) /* in vectors too: a compiler may fuse a scalar product and sum into an FMA */         \
            acmoe__tail_store_##SFX(y + i, ADD(acmoe__tail_load_##SFX(y + i, n - i, 0.0f),                \
                                               MUL(SET1(a), acmoe__tail_load_##SFX(x + i, n - i, 0.0f))), n - i); \
    }                                                                                                    \
    TARGET static void acmoe__row_scale_##SFX(float *y, const float *x, int n, float a) {               \
        int i;                                                                                           \
        for (i = 0; i + VLEN <= n; i += VLEN) STORE(y + i, MUL(SET1(a), LOAD(x + i)));                   \
        for (; i < n; i++) y[i] = a * x[i];                                                              \
    }                                                                                                    \
    TARGET static void acmoe__row_mul_##SFX(float *y, const float *a, const float *b, int n) {          \
        int i;                                                                                           \
        for (i = 0; i + VLEN <= n; i += VLEN) STORE(y + i, MUL(LOAD(a + i), LOAD(b + i)));               \
        for (; i < n; i++) y[i] = a[i] * b[i];                                                           \
    }                                                                                                    \
    TARGET static void acmoe__row_mul_add_##SFX(float *y, const float *a, const float *b, int n) {      \
        int i;                                                                                           \
        for (i = 0; i + VLEN <= n; i += VLEN) STORE(y + i, ADD(LOAD(y + i), MUL(LOAD(a + i), LOAD(b + i)))); \
        if (i < n)                                                                                       \
            acmoe__tail_store_##SFX(y + i, ADD(acmoe__tail_load_##SFX(y + i, n - i, 0.0f),                \
                                               MUL(acmoe__tail_load_##SFX(a + i, n - i, 0.0f),           \
                                                   acmoe__tail_load_##SFX(b + i, n - i, 0.0f))), n - i); \
    }                                                                                                    \
    TARGET static void acmoe__row_deviation_##SFX(float *y, const float *x, const float *mu, int n, int squared) { \
        int i;                                                                                           \
        VEC xi, mi, dev;                                                                                 \
        for (i = 0; i + VLEN <= n; i += VLEN) { /* |dev| as max(dev, -dev) */                            \
            xi = LOAD(x + i), mi = LOAD(mu + i), dev = SUB(xi, mi);                                      \
            STORE(y + i, ADD(LOAD(y + i), squared ? MUL(dev, dev) : MAX(dev, SUB(mi, xi))));             \
        }                                                                                                \
        if (i < n) {                                                                                     \
            xi = acmoe__tail_load_##SFX(x + i, n - i, 0.0f), mi = acmoe__tail_load_##SFX(mu + i, n - i, 0.0f); \
            dev = SUB(xi, mi);                                                                           \
            acmoe__tail_store_##SFX(y + i, ADD(acmoe__tail_load_##SFX(y + i, n - i, 0.0f),                \
                                               squared ? MUL(dev, dev) : MAX(dev, SUB(mi, xi))), n - i); \
        }                                                                                                \
    }                                                                                                    \
    TARGET static void acmoe__row_relu_##SFX(float *y, const float *h, const float *g, size_t n) {      \
        size_t i;                                                                                        \
        for (i = 0; i + VLEN <= n; i += VLEN) STORE(y + i, KEEP_POSITIVE(LOAD(h + i), LOAD(g + i)));     \
        for (; i < n; i++) y[i] = acmoe__relu_grad(h[i], g[i]);                                          \
    }                                                                                                    \
    TARGET static void acmoe__row_softmax_grad_##SFX(float *d, const float *e, int n, float dot, float scale) { \
        int i;                                                                                           \
        for (i = 0; i + VLEN <= n; i += VLEN)                                                            \
            STORE(d + i, MUL(MUL(LOAD(e + i), SUB(LOAD(d + i), SET1(dot))), SET1(scale)));               \
        if (i < n)                                                                                       \
            acmoe__tail_store_##SFX(d + i, MUL(MUL(acmoe__tail_load_##SFX(e + i, n - i, 0.0f),             \
                                                  SUB(acmoe__tail_load_##SFX(d + i, n - i, 0.0f), SET1(dot))), \
                                              SET1(scale)), n - i);                                      \
    }                                                                                                    \
    TARGET static void acmoe__row_adam_##SFX(float *p, const float *g, float *m, float *v, size_t n,      \
                                             const acmoe__adam *a) {                                     \
        size_t i;                                                                                        \
        for (i = 0; i + VLEN <= n; i += VLEN) { /* the operations of acmoe__adam_one, in its order */   \
            VEC gv = MUL(LOAD(g + i), SET1(a->scale)), pv = LOAD(p + i), mv, vv, step;                   \
            mv = ADD(MUL(SET1(a->beta1), LOAD(m + i)), MUL(SET1(1.0f - a->beta1), gv));                  \
            vv = ADD(MUL(SET1(a->beta2), LOAD(v + i)), MUL(MUL(SET1(1.0f - a->beta2), gv), gv));         \
            step = DIV(MUL(mv, SET1(a->c1)), ADD(SQRT(MUL(vv, SET1(a->c2))), SET1(a->eps)));             \
            step = ADD(step, MUL(SET1(a->decay), pv));                                                   \
            STORE(m + i, mv);                                                                            \
            STORE(v + i, vv);                                                                            \
            STORE(p + i, SUB(pv, MUL(SET1(a->lr), step)));                                               \
        }                                                                                                \
        for (; i < n; i++) acmoe__adam_one(p + i, g[i], m + i, v + i, a);                                \
    }                                                                                                    \
    /* The vector at x of a row with m floats left: whole, or its tail with zeros after it. */           \
    TARGET static VEC acmoe__part_load_##SFX(const float *x, int m) {                                    \
        return m >= VLEN ? LOAD(x) : acmoe__tail_load_##SFX(x, m, 0.0f);                                 \
    }                                                                                                    \
    TARGET static void acmoe__part_store_##SFX(float *y, VEC v, int m) {                                 \
        if (m >= VLEN) STORE(y, v);                                                                      \
        else acmoe__tail_store_##SFX(y, v, m);                                                           \
    }                                                                                                    \
    /* The scalar path's operations; the sums as row_sum and row_dot make them. */                       \
    TARGET static float acmoe__row_layernorm_##SFX(float *xhat, float *y, const float *x,                \
                                                   const float *add, const float *g, const float *b,     \
                                                   int n) {                                              \
        const float *in = add ? xhat : x;                                                                \
        VEC sum = SET1(0.0f), sq = SET1(0.0f), mean, c;                                                  \
        float rs;                                                                                        \
        int i;                                                                                           \
        for (i = 0; i < n; i += VLEN) {                                                                  \
            c = acmoe__part_load_##SFX(x + i, n - i);                                                    \
            if (add) {                                                                                   \
                c = ADD(c, acmoe__part_load_##SFX(add + i, n - i));                                      \
                acmoe__part_store_##SFX(xhat + i, c, n - i);                                             \
            }                                                                                            \
            sum = ADD(sum, c);                                                                           \
        }                                                                                                \
        mean = SET1(HSUM(sum) / (float)n);                                                               \
        for (i = 0; i < n; i += VLEN) {                                                                  \
            c = SUB(acmoe__part_load_##SFX(in + i, n - i), mean);                                        \
            if (n - i < VLEN) c = acmoe__tail_keep_##SFX(c, n - i);                                      \
            sq = FMA(c, c, sq);                                                                          \
            acmoe__part_store_##SFX(xhat + i, c, n - i);                                                 \
        }                                                                                                \
        rs = 1.0f / sqrtf(HSUM(sq) / (float)n + ACMOE__LN_EPS);                                          \
        for (i = 0; i < n; i += VLEN) {                                                                  \
            c = MUL(acmoe__part_load_##SFX(xhat + i, n - i), SET1(rs));                                  \
            acmoe__part_store_##SFX(xhat + i, c, n - i);                                                 \
            c = MUL(c, acmoe__part_load_##SFX(g + i, n - i));                                            \
            acmoe__part_store_##SFX(y + i, ADD(c, acmoe__part_load_##SFX(b + i, n - i)), n - i);         \
        }                                                                                                \
        return rs;                                                                                       \
    }                                                                                                    \
    TARGET static void acmoe__row_layernorm_backward_##SFX(float *dx, const float *dy,                   \
                                                           const float *xhat, const float *g, float rstd, \
                                                           int n, int accumulate) {                      \
        VEC sum_d = SET1(0.0f), sum_dx = SET1(0.0f), dxhat, mean_d, mean_dx, v;                          \
        int i;                                                                                           \
        for (i = 0; i < n; i += VLEN) {                                                                  \
            dxhat = MUL(acmoe__part_load_##SFX(dy + i, n - i), acmoe__part_load_##SFX(g + i, n - i));    \
            sum_d = ADD(sum_d, dxhat);                                                                   \
            sum_dx = ADD(sum_dx, MUL(dxhat, acmoe__part_load_##SFX(xhat + i, n - i)));                   \
        }                                                                                                \
        mean_d = SET1(HSUM(sum_d) / (float)n);                                                           \
        mean_dx = SET1(HSUM(sum_dx) / (float)n);                                                         \
        for (i = 0; i < n; i += VLEN) {                                                                  \
            dxhat = MUL(acmoe__part_load_##SFX(dy + i, n - i), acmoe__part_load_##SFX(g + i, n - i));    \
            v = SUB(SUB(dxhat, mean_d), MUL(acmoe__part_load_##SFX(xhat + i, n - i), mean_dx));          \
            v = MUL(SET1(rstd), v);                                                                      \
            if (accumulate) v = ADD(acmoe__part_load_##SFX(dx + i, n - i), v);                           \
            acmoe__part_store_##SFX(dx + i, v, n - i);                                                   \
        }                                                                                                \
    }

/* Ragged row ends: the first n < VLEN lanes loaded (the rest set to fill), stored, or kept
   (the rest zeroed), with masks where the instruction set has them. */
#ifdef ACMOE__X86
ACMOE__TARGET_AVX2 static __m256i acmoe__tail_mask_avx2(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
ACMOE__TARGET_AVX2 static __m256 acmoe__tail_load_avx2(const float *x, int n, float fill) {
    __m256i mask = acmoe__tail_mask_avx2(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(x, mask), _mm256_castsi256_ps(mask));
}
ACMOE__TARGET_AVX2 static void acmoe__tail_store_avx2(float *y, __m256 v, int n) {
    _mm256_maskstore_ps(y, acmoe__tail_mask_avx2(n), v);
}
ACMOE__TARGET_AVX2 static __m256 acmoe__tail_keep_avx2(__m256 v, int n) {
    return _mm256_and_ps(v, _mm256_castsi256_ps(acmoe__tail_mask_avx2(n)));
}
#define ACMOE__AVX2_ROUND(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define ACMOE__AVX2_POW2(n) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define ACMOE__AVX2_LDEXP(p, n) _mm256_mul_ps((p), ACMOE__AVX2_POW2(n))
/* A register's lanes added in the order of acmoe__lanes_sum (halves, then quarters, ...), or
   their maximum, without a trip through memory. */
ACMOE__TARGET_AVX2 static float acmoe__hsum_avx2(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}
ACMOE__TARGET_AVX2 static float acmoe__hmax_avx2(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}
ACMOE__DEFINE_ROW_KERNELS(avx2, ACMOE__TARGET_AVX2, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps,
                          _mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps, _mm256_div_ps, _mm256_sqrt_ps,
                          _mm256_fmadd_ps, _mm256_max_ps, ACMOE__AVX2_ROUND, ACMOE__AVX2_LDEXP, acmoe__hsum_avx2,
                          acmoe__hmax_avx2, ACMOE__AVX2_KEEP_POSITIVE)
#endif

#ifdef ACMOE__HAVE_AVX512
#define ACMOE__TAIL_MASK(n) ((__mmask16)((1u << (n)) - 1u))
ACMOE__TARGET_AVX512 static __m512 acmoe__tail_load_avx512(const float *x, int n, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), ACMOE__TAIL_MASK(n), x);
}
ACMOE__TARGET_AVX512 static void acmoe__tail_store_avx512(float *y, __m512 v, int n) {
    _mm512_mask_storeu_ps(y, ACMOE__TAIL_MASK(n), v);
}
ACMOE__TARGET_AVX512 static __m512 acmoe__tail_keep_avx512(__m512 v, int n) {
    return _mm512_maskz_mov_ps(ACMOE__TAIL_MASK(n), v);
}
/* The zero-masked forms with every lane set: g++ 12 warns about the unmasked ones'
   undefined pass-through. */
#define ACMOE__ALL16 ((__mmask16)0xFFFF)
#define ACMOE__ALL8 ((__mmask8)0xFF)
#define ACMOE__AVX512_ROUND(x) \
    _mm512_maskz_roundscale_ps(ACMOE__ALL16, (x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define ACMOE__AVX512_LDEXP(p, n) _mm512_maskz_scalef_ps(ACMOE__ALL16, (p), (n))
#define ACMOE__AVX512_HALF(v, i) _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(ACMOE__ALL8, _mm512_castps_pd(v), (i)))
ACMOE__TARGET_AVX512 static float acmoe__hsum_avx512(__m512 v) {
    __m256 h = _mm256_add_ps(ACMOE__AVX512_HALF(v, 0), ACMOE__AVX512_HALF(v, 1));
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}
ACMOE__TARGET_AVX512 static float acmoe__hmax_avx512(__m512 v) {
    __m256 h = _mm256_max_ps(ACMOE__AVX512_HALF(v, 0), ACMOE__AVX512_HALF(v, 1));
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}
#define ACMOE__AVX512_MAX(a, b) _mm512_maskz_max_ps(ACMOE__ALL16, (a), (b))
#define ACMOE__AVX512_SQRT(x) _mm512_maskz_sqrt_ps(ACMOE__ALL16, (x))
/* The top k of e <= 16 values in one register: the largest, ties to the lowest index (as
   acmoe__topk_softmax's loop), then that lane set to -inf. The loop's compare-and-keep
   chain costs more than twice as much for 16 experts. */
ACMOE__TARGET_AVX512 static void acmoe__top16_avx512(const float *z, int e, int k, int32_t *idx) {
    const __m512 gone = _mm512_set1_ps(-INFINITY);
    __m512 v = _mm512_mask_loadu_ps(gone, ACMOE__TAIL_MASK(e), z);
    int s, j;
    for (s = 0; s < k; s++) {
        const __m512 top = _mm512_set1_ps(acmoe__hmax_avx512(v));
        idx[s] = j = __builtin_ctz((unsigned)_mm512_cmp_ps_mask(v, top, _CMP_EQ_OQ));
        v = _mm512_mask_mov_ps(v, (__mmask16)(1u << j), gone);
    }
}
ACMOE__DEFINE_ROW_KERNELS(avx512, ACMOE__TARGET_AVX512, __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps,
                          _mm512_set1_ps, _mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps, _mm512_div_ps,
                          ACMOE__AVX512_SQRT, _mm512_fmadd_ps, ACMOE__AVX512_MAX, ACMOE__AVX512_ROUND,
                          ACMOE__AVX512_LDEXP, acmoe__hsum_avx512, acmoe__hmax_avx512, ACMOE__AVX512_KEEP_POSITIVE)
#endif

#ifdef ACMOE__NEON
static float32x4_t acmoe__tail_load_neon(const float *x, int n, float fill) {
    float lanes[4];
    int l;
    for (l = 0; l < 4; l++) lanes[l] = l < n ? x[l] : fill;
    return vld1q_f32(lanes);
}
static void acmoe__tail_store_neon(float *y, float32x4_t v, int n) {
    float lanes[4];
    vst1q_f32(lanes, v);
    memcpy(y, lanes, sizeof(float) * (size_t)n);
}
static float32x4_t acmoe__tail_keep_neon(float32x4_t v, int n) {
    float lanes[4];
    vst1q_f32(lanes, v);
    memset(lanes + n, 0, sizeof(float) * (size_t)(4 - n));
    return vld1q_f32(lanes);
}
#define ACMOE__NEON_LDEXP(p, n) \
    vmulq_f32((p), vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23)))
static float acmoe__hsum_neon(float32x4_t v) { return vpadds_f32(vadd_f32(vget_low_f32(v), vget_high_f32(v))); }
ACMOE__DEFINE_ROW_KERNELS(neon, , float32x4_t, 4, vld1q_f32, vst1q_f32, vdupq_n_f32, vaddq_f32, vsubq_f32,
                          vmulq_f32, vdivq_f32, vsqrtq_f32, ACMOE__NEON_FMA, vmaxq_f32, vrndnq_f32,
                          ACMOE__NEON_LDEXP, acmoe__hsum_neon, vmaxvq_f32, ACMOE__NEON_KEEP_POSITIVE)
#endif

/* Column kernels: products with a few output columns (decoding: one token, or an expert's
   few tokens), c (+)= A' B' for up to VLEN rows of A' that run along the depth (row stride
   a_step), cols columns of B' and C (b[p * b_step + j * b_col], c[i * c_step + j * c_col]).
   The micro-kernels would fill a few lanes of each vector; here VLEN rows are transposed in
   registers, VLEN depth steps at a time, once for all the columns, and each lane runs the
   micro-kernels' chain of one multiply-add per depth step, in order: the bits equal those of
   the same rows and columns in a product of many columns. */
#define ACMOE__DEFINE_GEMV_COLS(SFX, TARGET, VEC, VLEN, COLS, LOAD, STORE, SET1, FMA, ZERO)            \
    TARGET static void acmoe__gemv_##SFX##_##COLS(int kc, const float *a, ptrdiff_t a_step, const float *b, \
                                                  ptrdiff_t b_step, ptrdiff_t b_col, float *c,           \
                                                  ptrdiff_t c_step, ptrdiff_t c_col, int rows, int cols,  \
                                                  int accumulate) {                                      \
        VEC acc[COLS], r[VLEN];                                                                         \
        const float *column[COLS];                                                                      \
        float lanes[VLEN];                                                                              \
        int i, p, q, j;                                                                                 \
        /* columns past the last repeat it, dropped; column 0 is b as such, so that the                 \
           one-column kernel indexes b as directly as a kernel of one column would */                   \
        ACMOE__UNROLL for (j = 0; j < COLS; j++) {                                                     \
            acc[j] = ZERO;                                                                              \
            column[j] = j ? b + ACMOE__MIN(j, cols - 1) * b_col : b;                                    \
        }                                                                                               \
        for (p = 0; p < kc; p += VLEN) {                                                                \
            const int n = ACMOE__MIN(VLEN, kc - p);                                                     \
            for (i = 0; i < VLEN; i++) { /* rows past the last repeat it; their lanes are dropped */   \
                const float *row = a + ACMOE__MIN(i, rows - 1) * a_step + p;                            \
                r[i] = n == VLEN ? LOAD(row) : acmoe__tail_load_##SFX(row, n, 0.0f);                    \
            }                                                                                           \
            acmoe__transpose_regs_##SFX(r);                                                             \
            for (q = 0; q < n; q++)                                                                     \
                ACMOE__UNROLL for (j = 0; j < COLS; j++)                                               \
                    acc[j] = FMA(r[q], SET1(column[j][(p + q) * b_step]), acc[j]);                      \
        }                                                                                               \
        for (j = 0; j < cols; j++) {                                                                    \
            STORE(lanes, acc[j]);                                                                       \
            for (i = 0; i < rows; i++) {                                                                \
                float *cp = c + i * c_step + j * c_col;                                                 \
                *cp = accumulate ? *cp + lanes[i] : lanes[i];                                           \
            }                                                                                           \
        }                                                                                               \
    }
/* The kernel for 1, 2, 4 or 8 columns, the fewest that cover cols (a path's gemv_cols keeps
   to the ones its registers hold). */
#define ACMOE__DEFINE_GEMV(SFX, TARGET, VEC, VLEN, LOAD, STORE, SET1, FMA, ZERO)                         \
    ACMOE__DEFINE_GEMV_COLS(SFX, TARGET, VEC, VLEN, 1, LOAD, STORE, SET1, FMA, ZERO)                    \
    ACMOE__DEFINE_GEMV_COLS(SFX, TARGET, VEC, VLEN, 2, LOAD, STORE, SET1, FMA, ZERO)                    \
    ACMOE__DEFINE_GEMV_COLS(SFX, TARGET, VEC, VLEN, 4, LOAD, STORE, SET1, FMA, ZERO)                    \
    ACMOE__DEFINE_GEMV_COLS(SFX, TARGET, VEC, VLEN, 8, LOAD, STORE, SET1, FMA, ZERO)                    \
    static void acmoe__gemv_##SFX(int kc, const float *a, ptrdiff_t a_step, const float *b, ptrdiff_t b_step, \
                                  ptrdiff_t b_col, float *c, ptrdiff_t c_step, ptrdiff_t c_col, int rows,    \
                                  int cols, int accumulate) {                                                \
        const acmoe__gemv_fn fn = cols == 1   ? acmoe__gemv_##SFX##_1                                      \
                                  : cols <= 2 ? acmoe__gemv_##SFX##_2                                      \
                                  : cols <= 4 ? acmoe__gemv_##SFX##_4                                      \
                                              : acmoe__gemv_##SFX##_8;                                     \
        fn(kc, a, a_step, b, b_step, b_col, c, c_step, c_col, rows, cols, accumulate);                       \
    }

#ifdef ACMOE__X86
/* r[i] holds row i of an 8 x 8 block on entry and column i on return. */
ACMOE__TARGET_AVX2 static ACMOE__ALWAYS_INLINE void acmoe__transpose_regs_avx2(__m256 r[8]) {
    __m256 t[8], u[8];
    int i;
    for (i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
ACMOE__DEFINE_GEMV(avx2, ACMOE__TARGET_AVX2, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps,
                   _mm256_fmadd_ps, _mm256_setzero_ps())
#endif

#ifdef ACMOE__HAVE_AVX512
/* 128-bit lanes of two registers, in the zero-masked form (see ACMOE__ALL16) */
#define ACMOE__LANES(a, b, imm) _mm512_maskz_shuffle_f32x4(ACMOE__ALL16, (a), (b), (imm))

/* r[i] holds row i of a 16 x 16 block on entry and column i on return: pairs, then quads
   within 128-bit lanes, then the lanes across registers. */
ACMOE__TARGET_AVX512 static ACMOE__ALWAYS_INLINE void acmoe__transpose_regs_avx512(__m512 r[16]) {
    __m512 t[16], u[16];
    int i, q;
    for (i = 0; i < 8; i++) {
        t[2 * i] = _mm512_maskz_unpacklo_ps(ACMOE__ALL16, r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_maskz_unpackhi_ps(ACMOE__ALL16, r[2 * i], r[2 * i + 1]);
    }
    for (i = 0; i < 4; i++) { /* u[4i + q], lane l: column 4l + q of rows 4i .. 4i+3 */
        __m512d lo = _mm512_castps_pd(t[4 * i]), lo2 = _mm512_castps_pd(t[4 * i + 2]);
        __m512d hi = _mm512_castps_pd(t[4 * i + 1]), hi2 = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(ACMOE__ALL8, lo, lo2));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(ACMOE__ALL8, lo, lo2));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(ACMOE__ALL8, hi, hi2));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(ACMOE__ALL8, hi, hi2));
    }
    for (q = 0; q < 4; q++) { /* 128-bit lanes: even and odd ones of groups 0-1, then 2-3 */
        __m512 even = ACMOE__LANES(u[q], u[4 + q], 0x88), odd = ACMOE__LANES(u[q], u[4 + q], 0xDD);
        __m512 even2 = ACMOE__LANES(u[8 + q], u[12 + q], 0x88), odd2 = ACMOE__LANES(u[8 + q], u[12 + q], 0xDD);
        r[q] = ACMOE__LANES(even, even2, 0x88);
        r[4 + q] = ACMOE__LANES(odd, odd2, 0x88);
        r[8 + q] = ACMOE__LANES(even, even2, 0xDD);
        r[12 + q] = ACMOE__LANES(odd, odd2, 0xDD);
    }
}

ACMOE__DEFINE_GEMV(avx512, ACMOE__TARGET_AVX512, __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps,
                   _mm512_fmadd_ps, _mm512_setzero_ps())
#endif

#ifdef ACMOE__NEON
/* r[i] holds row i of a 4 x 4 block on entry and column i on return. */
static ACMOE__ALWAYS_INLINE void acmoe__transpose_regs_neon(float32x4_t r[4]) {
    float32x4x2_t ab = vtrnq_f32(r[0], r[1]), cd = vtrnq_f32(r[2], r[3]); /* a0 b0 a2 b2 | a1 b1 a3 b3 */
    r[0] = vcombine_f32(vget_low_f32(ab.val[0]), vget_low_f32(cd.val[0]));
    r[1] = vcombine_f32(vget_low_f32(ab.val[1]), vget_low_f32(cd.val[1]));
    r[2] = vcombine_f32(vget_high_f32(ab.val[0]), vget_high_f32(cd.val[0]));
    r[3] = vcombine_f32(vget_high_f32(ab.val[1]), vget_high_f32(cd.val[1]));
}
ACMOE__DEFINE_GEMV(neon, , float32x4_t, 4, vld1q_f32, vst1q_f32, vdupq_n_f32, ACMOE__NEON_FMA, vdupq_n_f32(0.0f))
#endif

#define ACMOE__ROW_KERNELS(SFX) \
    acmoe__row_max_##SFX, acmoe__row_exp_##SFX, acmoe__row_sum_##SFX, acmoe__row_dot_##SFX,                \
        acmoe__row_axpy_##SFX, acmoe__row_scale_##SFX, acmoe__row_mul_##SFX, acmoe__row_mul_add_##SFX,          \
        acmoe__row_deviation_##SFX,                                                                             \
        acmoe__row_relu_##SFX,                                                                                  \
        acmoe__row_softmax_grad_##SFX, acmoe__row_adam_##SFX, acmoe__row_layernorm_##SFX,                      \
        acmoe__row_layernorm_backward_##SFX, acmoe__sum_squares_##SFX

static acmoe_status acmoe__kernel_for(acmoe_isa isa, acmoe__kernel *out) {
    static const acmoe__kernel table[] = {
        {ACMOE_ISA_SCALAR, 4, 8, {acmoe__kernel_scalar, acmoe__kernel_scalar_half, acmoe__kernel_scalar_quarter},
         {8, 4, 2}, ACMOE__ROW_KERNELS(scalar), NULL, 0, 0, NULL, 0, NULL, NULL},
#ifdef ACMOE__X86 /* a ymm register is the narrowest AVX2 tile */
        {ACMOE_ISA_AVX2, 6, 16, {acmoe__kernel_avx2, acmoe__kernel_avx2_half, acmoe__kernel_avx2_half}, {16, 8, 8},
         ACMOE__ROW_KERNELS(avx2), acmoe__gemv_avx2, 8, 4, NULL, 0, acmoe__one_row_avx2, NULL},
#endif
#ifdef ACMOE__HAVE_AVX512
        {ACMOE_ISA_AVX512, 6, 64, {acmoe__kernel_avx512, acmoe__kernel_avx512_half, acmoe__kernel_avx512_quarter},
         {64, 32, 16}, ACMOE__ROW_KERNELS(avx512), acmoe__gemv_avx512, 16, 8, acmoe__kernel_avx512_tall, 16,
         acmoe__one_row_avx512, acmoe__top16_avx512},
#endif
#ifdef ACMOE__NEON
        {ACMOE_ISA_NEON, 6, 16, {acmoe__kernel_neon, acmoe__kernel_neon_half, acmoe__kernel_neon_quarter},
         {16, 8, 4}, ACMOE__ROW_KERNELS(neon), acmoe__gemv_neon, 4, 8, NULL, 0, acmoe__one_row_neon, NULL},
#endif
    };
    size_t i;
    if (!acmoe_isa_supported(isa)) return ACMOE_ERR_UNSUPPORTED;
    for (i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (table[i].isa == isa) {
            *out = table[i];
            return ACMOE_OK;
        }
    }
    return ACMOE_ERR_UNSUPPORTED;
}

/* The kernels of the host's best path, for the functions that take no context. */
static void acmoe__host_kernel(acmoe__kernel *out) {
    if (acmoe__kernel_for(acmoe_cpu_isa(), out) != ACMOE_OK) (void)acmoe__kernel_for(ACMOE_ISA_SCALAR, out);
}

/* dst[p * ld_dst + x] = src[x * ld_src + p] for x in [x0, x1), p in [p0, p1). */
static void acmoe__transpose_scalar(float *dst, ptrdiff_t ld_dst, const float *src, ptrdiff_t ld_src,
                                    int x0, int x1, int p0, int p1) {
    int x, p;
    for (x = x0; x < x1; x++)
        for (p = p0; p < p1; p++) dst[p * ld_dst + x] = src[x * ld_src + p];
}

#ifdef ACMOE__X86
/* One 8 x 8 block of the transpose above, in registers. */
ACMOE__TARGET_AVX2 static void acmoe__transpose8x8_avx2(float *dst, ptrdiff_t ld_dst, const float *src,
                                                     ptrdiff_t ld_src) {
    __m256 r[8];
    int i;
    for (i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * ld_src);
    acmoe__transpose_regs_avx2(r);
    for (i = 0; i < 8; i++) _mm256_storeu_ps(dst + i * ld_dst, r[i]);
}

#ifdef ACMOE__HAVE_AVX512
/* One 16 x 16 block: each source and destination row is one whole cache line when aligned,
   read or written once. Half lines (8 x 8 blocks) were written back and read again when the
   destination's rows alias in L1 (a packed A' of depth 128 or 512), and source rows a
   multiple of 4 KiB apart evicted each other between the halves. */
ACMOE__TARGET_AVX512 static void acmoe__transpose16x16_avx512(float *dst, ptrdiff_t ld_dst, const float *src,
                                                         ptrdiff_t ld_src) {
    __m512 r[16];
    int i;
    for (i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ld_src);
    acmoe__transpose_regs_avx512(r);
    for (i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * ld_dst, r[i]);
}
#endif

/* Blocks of size x size over x in [x0, x1), p in [p0, p1), both multiples of size. Many
   source rows are read side by side, too many streams for the hardware prefetcher when they
   come from memory (an expert's weights): each row is prefetched four lines ahead
   (transposes from memory ran 1.4-1.7x faster), and the start of the rows 32 below, for
   narrow blocks of many rows (an attention head's keys, 1.4x faster from L3). */
static void acmoe__transpose_blocks(int size, float *dst, ptrdiff_t ld_dst, const float *src, ptrdiff_t ld_src,
                                    int x0, int x1, int p0, int p1, int nx, int np) {
    int x, p, i;
    for (x = x0; x < x1; x += size)
        for (p = p0; p < p1; p += size) {
            if (p % 16 == 0 && p + 64 < np)
                for (i = 0; i < size; i++) ACMOE__PREFETCH_READ(src + (x + i) * ld_src + p + 64);
            if (p == 0 && x + 32 + size <= nx)
                for (i = 32; i < 32 + size; i++) ACMOE__PREFETCH_READ(src + (x + i) * ld_src);
#ifdef ACMOE__HAVE_AVX512
            if (size == 16) {
                acmoe__transpose16x16_avx512(dst + p * ld_dst + x, ld_dst, src + x * ld_src + p, ld_src);
                continue;
            }
#endif
            acmoe__transpose8x8_avx2(dst + p * ld_dst + x, ld_dst, src + x * ld_src + p, ld_src);
        }
}
#endif

/* The transpose in register blocks where the CPU has AVX2 (16 x 16 with AVX-512, then 8 x 8),
   scalar at the ragged edges. */
static void acmoe__transpose(acmoe_isa isa, float *dst, ptrdiff_t ld_dst, const float *src,
                             ptrdiff_t ld_src, int nx, int np) {
    int xb = 0, pb = 0;
#ifdef ACMOE__X86
    if (isa == ACMOE_ISA_AVX2 || isa == ACMOE_ISA_AVX512) {
        int x16 = 0, p16 = 0;
        xb = nx / 8 * 8;
        pb = np / 8 * 8;
#ifdef ACMOE__HAVE_AVX512
        if (isa == ACMOE_ISA_AVX512) {
            x16 = nx / 16 * 16;
            p16 = np / 16 * 16;
            acmoe__transpose_blocks(16, dst, ld_dst, src, ld_src, 0, x16, 0, p16, nx, np);
        }
#endif
        acmoe__transpose_blocks(8, dst, ld_dst, src, ld_src, 0, x16, p16, pb, nx, np);
        acmoe__transpose_blocks(8, dst, ld_dst, src, ld_src, x16, xb, 0, pb, nx, np);
    }
#else
    (void)isa;
#endif
    acmoe__transpose_scalar(dst, ld_dst, src, ld_src, 0, nx, pb, np);
    acmoe__transpose_scalar(dst, ld_dst, src, ld_src, xb, nx, 0, pb);
}

/* An nx x nk block (element (x, p) at src[x * sx + p * sk]) as whole rows contiguous along
   the depth, row x at dst + x * ld: one transpose from a source that runs across its rows,
   else a copy of each row. This is how A' is packed: rows a stride apart that does not
   alias in the cache (acmoe__pack_a_stride), measured faster than mr-row interleaved panels. */
static void acmoe__pack_rows(acmoe_isa isa, float *dst, ptrdiff_t ld, const float *src, ptrdiff_t sx, ptrdiff_t sk,
                             int nx, int nk) {
    int x;
    if (sk != 1) {
        acmoe__transpose(isa, dst, ld, src, sk, nk, nx);
        return;
    }
    for (x = 0; x < nx; x++) memcpy(dst + x * ld, src + x * sx, sizeof(float) * (size_t)nk);
}

/* The row stride of a packed A' of depth kc: whole cache lines, an odd number of them, so that
   consecutive rows fall in different L1 sets. The transpose that packs an A' running across
   its rows writes part of a line to each of many rows in turn; at an even number of lines
   (a depth of 128, 384 or 512) those rows shared few sets and their lines were evicted half
   written. */
static int acmoe__pack_a_stride(int kc) {
    const int lines = (kc + 15) / 16;
    return 16 * (lines % 2 ? lines : lines + 1);
}

/* Copy an nx x nk block (element (x, p) at src[x * sx + p * sk]) into panels of w along x:
   panel q holds rows q*w .. q*w+w-1 as dst[q*nk*w + p*w + x], zero-padded (B' for the
   micro-kernels; A' is packed by acmoe__pack_rows). */
static void acmoe__pack(acmoe_isa isa, float *dst, const float *src, ptrdiff_t sx, ptrdiff_t sk,
                        int nx, int nk, int w) {
    int x0, p;
    ACMOE_ASSERT((sx == 1 || sk == 1) && w > 1);
    if (sx == 1) { /* panel rows are contiguous in the source: read it in order, row by row
                      (panel by panel was 2-2.5x slower on weights coming from memory) */
        for (p = 0; p < nk; p++)
            for (x0 = 0; x0 < nx; x0 += w) {
                int wx = ACMOE__MIN(w, nx - x0);
                float *d = dst + (ptrdiff_t)x0 * nk + (ptrdiff_t)p * w;
                memcpy(d, src + p * sk + x0, sizeof(float) * (size_t)wx);
                if (wx < w) memset(d + wx, 0, sizeof(float) * (size_t)(w - wx));
            }
        return;
    }
    for (x0 = 0; x0 < nx; x0 += w, dst += (ptrdiff_t)nk * w) {
        int wx = ACMOE__MIN(w, nx - x0);
        acmoe__transpose(isa, dst, w, src + x0 * sx, sx, wx, nk);
        if (wx < w)
            for (p = 0; p < nk; p++) memset(dst + p * w + wx, 0, sizeof(float) * (size_t)(w - wx));
    }
}

static const acmoe__epilogue *acmoe__bias_epilogue(acmoe__epilogue *epilogue, const float *bias) {
    memset(epilogue, 0, sizeof *epilogue);
    epilogue->bias = bias;
    return epilogue;
}

/* The epilogue after ReLU's gradient on rows [r0, r1) and columns [c0, c1) of C (row
   stride ldc). */
static void acmoe__epilogue_rows(const acmoe__kernel *kern, const acmoe__epilogue *epilogue, float *c, ptrdiff_t ldc,
                                 int r0, int r1, int c0, int c1) {
    int r;
    for (r = r0; r < r1; r++) {
        float *row = c + r * ldc + c0;
        if (epilogue->bias) kern->row_axpy(row, epilogue->bias + c0, c1 - c0, 1.0f);
        if (epilogue->relu) kern->row_relu(epilogue->relu + r * epilogue->ld_relu + c0, row, row, (size_t)(c1 - c0));
        if (epilogue->column_sums) kern->row_axpy(epilogue->column_sums + c0, row, c1 - c0, 1.0f);
    }
}

/* One oriented product C' (+)= A' B' with element strides. */
typedef struct acmoe__gemm {
    int m, n, k;
    const float *a;
    ptrdiff_t a_rs, a_cs;
    const float *b;
    ptrdiff_t b_rs, b_cs;
    float *c;
    ptrdiff_t c_rs, c_cs;
    int accumulate, pack_a, pack_b;
    int tm, tn; /* thread grid */
    const acmoe__epilogue *epilogue; /* NULL: none */
    acmoe_ctx *ctx;
} acmoe__gemm;

/* ReLU's gradient on a tile before it is stored: kept where c > 0, else +0. */
static void acmoe__tile_mask(const float *c, ptrdiff_t rs, ptrdiff_t cs, float *tile, int tile_rs, int mr, int nr) {
    int i, j;
    for (i = 0; i < mr; i++)
        for (j = 0; j < nr; j++) tile[i * tile_rs + j] = acmoe__relu_grad(c[i * rs + j * cs], tile[i * tile_rs + j]);
}

/* c (+)= tile for an mr x nr corner of the output, row stride rs and column stride cs; the
   inner loop runs along whichever is contiguous in c. */
static void acmoe__tile_store(float *c, ptrdiff_t rs, ptrdiff_t cs, const float *tile, int tile_rs,
                              int mr, int nr, int accumulate) {
    int i, j;
    if (cs == 1) {
        for (i = 0; i < mr; i++)
            for (j = 0; j < nr; j++) c[i * rs + j] = accumulate ? c[i * rs + j] + tile[i * tile_rs + j] : tile[i * tile_rs + j];
    } else {
        for (j = 0; j < nr; j++)
            for (i = 0; i < mr; i++) c[j * cs + i * rs] = accumulate ? c[j * cs + i * rs] + tile[i * tile_rs + j] : tile[i * tile_rs + j];
    }
}

/* The epilogue on rows [i0, i1) and columns [j0, j1) of C', which is C or its transpose. */
static void acmoe__epilogue_block(const acmoe__gemm *g, int i0, int i1, int j0, int j1) {
    if (g->c_cs == 1)
        acmoe__epilogue_rows(&g->ctx->kernel, g->epilogue, g->c, g->c_rs, i0, i1, j0, j1);
    else
        acmoe__epilogue_rows(&g->ctx->kernel, g->epilogue, g->c, g->c_cs, j0, j1, i0, i1);
}

/* The narrowest kernel of the path that covers a panel of n <= nr columns. */
static int acmoe__kernel_index(const acmoe__kernel *kern, int n) {
    int w = ACMOE__WIDTHS - 1;
    while (kern->width[w] < n) w--;
    return w;
}

/* A (kc x nc) block of B' in panels of nr columns, and a ragged last panel as wide as the
   kernel that will read it. */
static void acmoe__pack_b(const acmoe__gemm *g, const acmoe__workspace *ws, int pc, int kc, int jc, int nc) {
    const acmoe__kernel *kern = &g->ctx->kernel;
    const int whole = nc / kern->nr * kern->nr;
    const float *src = g->b + pc * g->b_rs + jc * g->b_cs;
    acmoe__pack(kern->isa, ws->pack_b, src, g->b_cs, g->b_rs, whole, kc, kern->nr);
    if (whole < nc)
        acmoe__pack(kern->isa, ws->pack_b + (ptrdiff_t)whole * kc, src + whole * g->b_cs, g->b_cs, g->b_rs,
                    nc - whole, kc, kern->width[acmoe__kernel_index(kern, nc - whole)]);
}

/* Micro-tiles of one (mc x kc) by (kc x nc) block pair. */
static void acmoe__macro_block(const acmoe__gemm *g, const acmoe__workspace *ws, int ic, int mc,
                               int pc, int kc, int jc, int nc) {
    const acmoe__kernel *kern = &g->ctx->kernel;
    const int mr = kern->mr, nr = kern->nr, accumulate = g->accumulate || pc > 0, last = pc + kc == g->k;
    const ptrdiff_t a_ld = acmoe__pack_a_stride(kc); /* of packed A' */
    int ir, jr, i;
    for (jr = 0; jr < nc; jr += nr) {
        const int nrr = ACMOE__MIN(nr, nc - jr), w = acmoe__kernel_index(kern, nrr), width = kern->width[w];
        const acmoe__kernel_fn fn = kern->fn[w];
        const float *bp;
        ptrdiff_t b_step;
        if (g->pack_b) {
            bp = ws->pack_b + (ptrdiff_t)jr * kc;
            b_step = width;
        } else if (nrr == nr || (nrr == width && mc <= mr)) { /* whole, or read by one tile only */
            bp = g->b + pc * g->b_rs + (jc + jr);
            b_step = g->b_rs;
        } else { /* a ragged last panel, packed for the narrowest kernel that covers it */
            acmoe__pack(kern->isa, ws->panel, g->b + pc * g->b_rs + (jc + jr), 1, g->b_rs, nrr, kc, width);
            bp = ws->panel;
            b_step = width;
        }
        for (ir = 0; ir < mc; ir += mr) {
            int mrr = ACMOE__MIN(mr, mc - ir);
            const float *rows[ACMOE__MR_MAX];
            ptrdiff_t a_step;
            float *cp = g->c + (ic + ir) * g->c_rs + (jc + jr) * g->c_cs;
            /* rows past the edge repeat the last one; their results are dropped */
            for (i = 0; i < mr; i++) {
                int row = ir + ACMOE__MIN(i, mrr - 1);
                rows[i] = g->pack_a ? ws->pack_a + row * a_ld
                                    : g->a + (ic + row) * g->a_rs + pc * g->a_cs;
            }
            a_step = g->pack_a ? 1 : g->a_cs;
            if (nrr == width && g->c_cs == 1) { /* whole columns: straight into C */
                acmoe__epilogue corner, *finish = NULL;
                if (g->epilogue && last) {
                    corner = *g->epilogue;
                    if (corner.bias) corner.bias += jc + jr;
                    if (corner.relu) corner.relu += (ic + ir) * corner.ld_relu + jc + jr;
                    if (corner.column_sums) corner.column_sums += jc + jr;
                    finish = &corner;
                }
                fn(kc, rows, a_step, bp, b_step, cp, g->c_rs, mrr, accumulate, finish);
            } else {
                fn(kc, rows, a_step, bp, b_step, ws->tile, width, mr, 0, NULL);
                if (g->epilogue && last && g->epilogue->relu_grad)
                    acmoe__tile_mask(cp, g->c_rs, g->c_cs, ws->tile, width, mrr, nrr);
                acmoe__tile_store(cp, g->c_rs, g->c_cs, ws->tile, width, mrr, nrr, accumulate);
                if (g->epilogue && last) acmoe__epilogue_block(g, ic + ir, ic + ir + mrr, jc + jr, jc + jr + nrr);
            }
        }
    }
}

/* Rows [m0, m1) and columns [n0, n1) of a C' of a few columns with the path's column
   kernel, in the depth blocks of the blocked loops (a fresh chain per block, added to C
   after the first), so the bits match. */
static void acmoe__gemv_region(const acmoe__gemm *g, int m0, int m1, int n0, int n1) {
    const acmoe__kernel *kern = &g->ctx->kernel;
    const int kc = g->ctx->desc.kc;
    int i, pc;
    for (pc = 0; pc < g->k; pc += kc)
        for (i = m0; i < m1; i += kern->gemv_rows)
            kern->gemv(ACMOE__MIN(kc, g->k - pc), g->a + i * g->a_rs + pc, g->a_rs, g->b + pc * g->b_rs + n0 * g->b_cs,
                       g->b_rs, g->b_cs, g->c + i * g->c_rs + n0 * g->c_cs, g->c_rs, g->c_cs,
                       ACMOE__MIN(kern->gemv_rows, m1 - i), n1 - n0, g->accumulate || pc > 0);
}

/* The blocked loops over rows [m0, m1) and columns [n0, n1) of C'. */
static void acmoe__gemm_region(const acmoe__gemm *g, const acmoe__workspace *ws, int m0, int m1,
                               int n0, int n1) {
    const acmoe_ctx_desc *resolved = &g->ctx->desc;
    int jc, pc, ic;
    if (g->n <= g->ctx->kernel.gemv_cols && g->a_cs == 1 && !(g->epilogue && g->epilogue->relu_grad)) {
        acmoe__gemv_region(g, m0, m1, n0, n1);
        if (g->epilogue) acmoe__epilogue_block(g, m0, m1, n0, n1);
        return;
    }
    for (jc = n0; jc < n1; jc += resolved->nc) {
        int nc = ACMOE__MIN(resolved->nc, n1 - jc);
        for (pc = 0; pc < g->k; pc += resolved->kc) {
            int kc = ACMOE__MIN(resolved->kc, g->k - pc);
            if (g->pack_b) acmoe__pack_b(g, ws, pc, kc, jc, nc);
            for (ic = m0; ic < m1; ic += resolved->mc) {
                int mc = ACMOE__MIN(resolved->mc, m1 - ic);
                if (g->pack_a)
                    acmoe__pack_rows(g->ctx->kernel.isa, ws->pack_a, acmoe__pack_a_stride(kc),
                                     g->a + ic * g->a_rs + pc * g->a_cs, g->a_rs, g->a_cs, mc, kc);
                acmoe__macro_block(g, ws, ic, mc, pc, kc, jc, nc);
            }
        }
    }
}

/* Thread tid of tm x tn owns a block of whole micro-tiles. */
static void acmoe__gemm_job(void *arg, int tid, int n_threads) {
    const acmoe__gemm *g = (const acmoe__gemm *)arg;
    const int mr = g->ctx->kernel.mr, nr = g->ctx->kernel.nr;
    int ti = tid / g->tn, tj = tid % g->tn;
    int rows = ((g->m + mr - 1) / mr + g->tm - 1) / g->tm * mr;
    int cols = ((g->n + nr - 1) / nr + g->tn - 1) / g->tn * nr;
    int m0 = ACMOE__MIN(g->m, ti * rows), m1 = ACMOE__MIN(g->m, m0 + rows);
    int n0 = ACMOE__MIN(g->n, tj * cols), n1 = ACMOE__MIN(g->n, n0 + cols);
    (void)n_threads;
    if (m0 < m1 && n0 < n1) acmoe__gemm_region(g, &g->ctx->ws[tid], m0, m1, n0, n1);
}

/* Pick the thread grid tm x tn = n_threads whose blocks have the smallest half-perimeter:
   that is what each thread packs and reads. Small products run on one thread. */
static void acmoe__choose_grid(acmoe__gemm *g, int n_threads) {
    double flops = 2.0 * g->m * g->n * g->k, best = -1.0;
    int tm;
    g->tm = g->tn = 1;
    if (flops < 1 << 18) return;
    for (tm = 1; tm <= n_threads; tm++) {
        double cost;
        if (n_threads % tm) continue;
        cost = (double)g->m / tm + (double)g->n / (n_threads / tm);
        if (best < 0 || cost < best) {
            best = cost;
            g->tm = tm;
            g->tn = n_threads / tm;
        }
    }
}

/* Whether to compute C^T = op(B)^T op(A)^T instead of C. B' must run along its rows, so a
   B' without unit column stride is transposed while it is packed; a transposed C goes
   through the scalar tile store. Measured costs per element: 0.1 and 0.2 (relative; an
   NT product of 32 x 352 x 352 ran 1.3x faster transposed). */
static int acmoe__transpose_output(int m, int n, int k, ptrdiff_t a_rs, ptrdiff_t b_cs) {
    double normal = b_cs != 1 ? 0.1 * k * n : 0.0;
    double transposed = (a_rs != 1 ? 0.1 * k * m : 0.0) + 0.2 * m * n;
    return transposed < normal;
}

static int acmoe__check_ld(int rows, int cols, int ld) { return ld >= ACMOE__MAX(cols, 1) && rows >= 0; }

/* Whether B' rows of stride b_rs, which the kernel reads as they are, are packed for m rows
   of output. Kernels 64 wide read their micro-panels from L2 anyway: they pack only for many
   micro-tiles and a stride of a page or more (a TLB miss every depth step). Narrower kernels
   keep a micro-panel in L1 while the micro-tiles below it read it, but rows in place an even
   number of cache lines apart fall in a fraction of its sets and evict each other: they pack
   rows wider than the micro-panel for many micro-tiles, and rows a page or more apart for
   more than two. */
static int acmoe__pack_b_in_rows(const acmoe__kernel *kern, int m, ptrdiff_t b_rs) {
    const int many = m > 16 * kern->mr;
    if (kern->nr >= 64) return many && b_rs >= 1024;
    return b_rs >= 1024 ? m > 2 * kern->mr : many && b_rs > kern->nr;
}

/* Checks the arguments and plans the product: orientation and packing. Returns ACMOE_OK with
   *empty set when there is nothing left to multiply (empty output, or k = 0 handled). */
static acmoe_status acmoe__gemm_plan(acmoe_ctx *ctx, acmoe_layout layout, int m, int n, int k, const float *a,
                                     int lda, const float *b, int ldb, float *c, int ldc, int accumulate,
                                     const acmoe__epilogue *epilogue, acmoe__gemm *g, int *empty) {
    const int ta = layout == ACMOE_TN || layout == ACMOE_TT;
    const int tb = layout == ACMOE_NT || layout == ACMOE_TT;
    ptrdiff_t a_rs = ta ? 1 : lda, a_cs = ta ? lda : 1, b_rs = tb ? 1 : ldb, b_cs = tb ? ldb : 1;
    int i, column;
    *empty = 1;
    if (!ctx) return ACMOE_ERR_NULL;
    if ((int)layout < ACMOE_NN || (int)layout > ACMOE_TT) return ACMOE_ERR_ARG;
    if (m < 0 || n < 0 || k < 0) return ACMOE_ERR_SHAPE;
    if (!acmoe__check_ld(ta ? k : m, ta ? m : k, lda) || !acmoe__check_ld(tb ? n : k, tb ? k : n, ldb) ||
        !acmoe__check_ld(m, n, ldc))
        return ACMOE_ERR_SHAPE;
    if (m == 0 || n == 0) return ACMOE_OK;
    if (!c || (k > 0 && (!a || !b))) return ACMOE_ERR_NULL;
    if (k == 0) {
        if (!accumulate)
            for (i = 0; i < m; i++) memset(c + (ptrdiff_t)i * ldc, 0, sizeof(float) * (size_t)n);
        if (epilogue) acmoe__epilogue_rows(&ctx->kernel, epilogue, c, ldc, 0, m, 0, n);
        return ACMOE_OK;
    }
    /* the old C is ReLU's mask until the store of the one depth block */
    ACMOE_ASSERT(!epilogue || !epilogue->relu_grad || (!accumulate && k <= ctx->desc.kc));
    *empty = 0;
    memset(g, 0, sizeof *g);
    g->ctx = ctx;
    g->epilogue = epilogue;
    g->k = k;
    g->accumulate = accumulate != 0;
    /* one row of C whose transpose the column kernel reads in place (a query against its keys) */
    column = m == 1 && b_rs == 1 && ctx->kernel.gemv;
    if (!column && !acmoe__transpose_output(m, n, k, a_rs, b_cs)) {
        g->m = m, g->n = n, g->a = a, g->a_rs = a_rs, g->a_cs = a_cs, g->b = b, g->b_rs = b_rs, g->b_cs = b_cs;
        g->c = c, g->c_rs = ldc, g->c_cs = 1;
    } else {
        g->m = n, g->n = m, g->a = b, g->a_rs = b_cs, g->a_cs = b_rs, g->b = a, g->b_rs = a_cs, g->b_cs = a_rs;
        g->c = c, g->c_rs = 1, g->c_cs = ldc;
    }
    /* Packing pays when the packed block is reused across many micro-tiles. B' rows that run
       along the output's rows are what the kernel reads (see acmoe__pack_b_in_rows). A' rows
       that run along the depth are already what the kernel reads, unless their stride is a
       multiple of 1 KiB and rows alias in the cache. A' that runs across its rows is packed
       when its stride is a page or more, or for many micro-tiles; with micro-tiles 64 wide,
       only where the stride is also a multiple of 1 KiB: their depth step has the work to
       cover a fresh cache line of A' (the mr values side by side), and in place an expert's
       weight gradient of 352 x 352 x 512 ran faster, most of all on 2 threads, each of which
       packed all of A'. The narrower AVX2 tiles ran slower in place. */
    g->pack_b = g->b_cs != 1 || acmoe__pack_b_in_rows(&ctx->kernel, g->m, g->b_rs);
    if (g->a_cs == 1)
        g->pack_a = g->n > 4 * ctx->kernel.nr && g->a_rs % 256 == 0;
    else
        g->pack_a = g->a_cs >= 1024 ||
                    (g->n > 4 * ctx->kernel.nr && (ctx->kernel.nr < 64 || g->a_cs % 256 == 0));
    g->tm = g->tn = 1;
    return ACMOE_OK;
}

/* C (+)= op(A) op(B), then the epilogue on C (NULL: none), across the pool. */
static acmoe_status acmoe__matmul_then(acmoe_ctx *ctx, acmoe_layout layout, int m, int n, int k, const float *a,
                                       int lda, const float *b, int ldb, float *c, int ldc, int accumulate,
                                       const acmoe__epilogue *epilogue) {
    acmoe__gemm g;
    int empty;
    acmoe_status s;
    ACMOE_ASSERT(!epilogue || !epilogue->column_sums); /* threads would add to them at once */
    s = acmoe__gemm_plan(ctx, layout, m, n, k, a, lda, b, ldb, c, ldc, accumulate, epilogue, &g, &empty);
    if (s != ACMOE_OK || empty) return s;
    acmoe__choose_grid(&g, ctx->desc.n_threads);
    acmoe__pool_run(&ctx->pool, g.tm * g.tn, acmoe__gemm_job, &g);
    return ACMOE_OK;
}

ACMOE_API acmoe_status acmoe_matmul(acmoe_ctx *ctx, acmoe_layout layout, int m, int n, int k,
                                    const float *a, int lda, const float *b, int ldb, float *c,
                                    int ldc, int accumulate) {
    return acmoe__matmul_then(ctx, layout, m, n, k, a, lda, b, ldb, c, ldc, accumulate, NULL);
}

/* The same product on the calling thread, with pool thread tid's workspace: for work that
   is already split across the pool (one expert per thread). Same bits as acmoe_matmul. */
static acmoe_status acmoe__matmul_on_thread_then(acmoe_ctx *ctx, int tid, acmoe_layout layout, int m, int n, int k,
                                                 const float *a, int lda, const float *b, int ldb, float *c, int ldc,
                                                 int accumulate, const acmoe__epilogue *epilogue) {
    acmoe__gemm g;
    int empty;
    acmoe_status s = acmoe__gemm_plan(ctx, layout, m, n, k, a, lda, b, ldb, c, ldc, accumulate, epilogue, &g, &empty);
    if (s == ACMOE_OK && !empty) acmoe__gemm_region(&g, &ctx->ws[tid], 0, g.m, 0, g.n);
    return s;
}

static acmoe_status acmoe__matmul_on_thread(acmoe_ctx *ctx, int tid, acmoe_layout layout, int m, int n, int k,
                                            const float *a, int lda, const float *b, int ldb, float *c, int ldc,
                                            int accumulate) {
    return acmoe__matmul_on_thread_then(ctx, tid, layout, m, n, k, a, lda, b, ldb, c, ldc, accumulate, NULL);
}

/* For products whose shapes the caller guarantees, where a failure is a programmer error. */
#define ACMOE__CHECKED_PRODUCT(call)                                                                \
    do {                                                                                            \
        acmoe_status matmul_status_ = (call);                                                       \
        ACMOE_ASSERT(matmul_status_ == ACMOE_OK);                                                   \
        (void)matmul_status_;                                                                       \
    } while (0)
#define ACMOE__MATMUL_ON_THREAD(...) ACMOE__CHECKED_PRODUCT(acmoe__matmul_on_thread(__VA_ARGS__))
#define ACMOE__MATMUL_ON_THREAD_THEN(...) ACMOE__CHECKED_PRODUCT(acmoe__matmul_on_thread_then(__VA_ARGS__))

/* c (+)= a b for m rows of a (element (i, p) at a[i * a_rs + p * a_cs]), depth k, b's rows of
   n floats at stride b_rs, n a multiple of 16 (every path's kernel widths divide 16 or are
   multiples of it): the micro-kernels read the operands in place, the widest kernel that fits
   at each column, and a last single row takes the path's one-row kernel. Each element is one chain of k multiply-adds, as in acmoe_matmul with k
   within one depth block. For products too small to pay for packing (attention heads, a
   router's few experts). */
static void acmoe__small_product(const acmoe__kernel *kern, int m, int n, int k, const float *a, ptrdiff_t a_rs,
                                 ptrdiff_t a_cs, const float *b, ptrdiff_t b_rs, float *c, ptrdiff_t c_rs,
                                 int accumulate) {
    const float *rows[ACMOE__MR_MAX];
    int i0 = 0, j0, i, w;
    if (kern->tall && n == kern->tall_width)
        for (; i0 + ACMOE__TALL_ROWS <= m; i0 += ACMOE__TALL_ROWS)
            kern->tall(k, a + i0 * a_rs, a_rs, a_cs, b, b_rs, c + i0 * c_rs, c_rs, accumulate);
    for (; i0 < m; i0 += kern->mr) {
        const int mrr = ACMOE__MIN(kern->mr, m - i0);
        if (mrr == 1 && kern->one_row) {
            kern->one_row(k, a + i0 * a_rs, a_cs, b, b_rs, c + i0 * c_rs, n, accumulate);
            break;
        }
        for (i = 0; i < kern->mr; i++) rows[i] = a + (i0 + ACMOE__MIN(i, mrr - 1)) * a_rs;
        for (j0 = 0; j0 < n; j0 += kern->width[w]) {
            for (w = 0; kern->width[w] > n - j0; w++) continue;
            kern->fn[w](k, rows, a_cs, b + j0, b_rs, c + i0 * c_rs + j0, c_rs, mrr, accumulate, NULL);
        }
    }
}

/* ========================================================================================== */
/* 6. Shared pieces                                                                           */
/* ========================================================================================== */

/* What layers and models have in common: finiteness checks, parameter directories, workspace
   carving, initialisation, biases and phase clocks. */

/* An exponent of all ones is an infinity or a NaN. The test is OR-ed over the whole array,
   without an early exit, so that the compiler vectorises it (it runs on every layer's input). */
static int acmoe__all_finite(const float *x, size_t n) {
    uint32_t bad = 0, bits;
    size_t i;
    for (i = 0; i < n; i++) {
        memcpy(&bits, x + i, sizeof bits);
        bad |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    return !bad;
}

typedef struct acmoe__finite_job {
    const float *x;
    size_t n;
    int bad_parts; /* atomic */
} acmoe__finite_job;

static void acmoe__finite_job_run(void *arg, int tid, int n_threads) {
    acmoe__finite_job *job = (acmoe__finite_job *)arg;
    const size_t part = job->n / (size_t)n_threads, i0 = part * (size_t)tid;
    const size_t i1 = tid + 1 == n_threads ? job->n : i0 + part;
    if (!acmoe__all_finite(job->x + i0, i1 - i0)) acmoe__next_item(&job->bad_parts); /* an atomic count */
}

/* acmoe__all_finite on the pool's threads, for a layer's input: on one thread the check is
   time the other threads wait. */
static int acmoe__all_finite_on_pool(acmoe_ctx *ctx, const float *x, size_t n) {
    acmoe__finite_job job;
    if (n < ((size_t)1 << 16) || ctx->desc.n_threads == 1) return acmoe__all_finite(x, n);
    job.x = x, job.n = n, job.bad_parts = 0;
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__finite_job_run, &job);
    return job.bad_parts == 0;
}

/* A named parameter tensor: where it sits in a parameter buffer, its shape, and whether
   AdamW decays it (weights yes, biases and norms no). Layers and models list theirs in a
   directory, which the optimizer and checkpoints read. */
typedef struct acmoe__tensor_info {
    char name[64];
    size_t offset, count;
    int ndim, shape[3];
    unsigned char decay;
} acmoe__tensor_info;

typedef struct acmoe__directory {
    acmoe__tensor_info *entries; /* NULL while only counting */
    int count;
    char prefix[32];
    size_t base; /* where the listing layer starts in the model's buffer */
} acmoe__directory;

/* Places a tensor of shape s0 x s1 x s2 (ndim of them) at *used: views into params and
   grads when they exist, an entry in dir when it has room. */
static void acmoe__param_view(size_t *used, float *params, float *grads, float **p, float **g, acmoe__directory *dir,
                              const char *name, int decay, int ndim, int s0, int s1, int s2) {
    size_t count = (size_t)s0 * (size_t)(ndim > 1 ? s1 : 1) * (size_t)(ndim > 2 ? s2 : 1);
    if (params) *p = params + *used, *g = grads + *used;
    if (dir && dir->entries) {
        acmoe__tensor_info *t = &dir->entries[dir->count];
        snprintf(t->name, sizeof t->name, "%s%s", dir->prefix, name);
        t->offset = dir->base + *used;
        t->count = count;
        t->ndim = ndim;
        t->shape[0] = s0, t->shape[1] = s1, t->shape[2] = s2;
        t->decay = (unsigned char)decay;
    }
    if (dir) dir->count++;
    *used += count;
}

/* Next aligned block of bytes from *used; only counts while base is NULL. */
static void *acmoe__carve(unsigned char *base, size_t *used, size_t bytes) {
    void *p = base ? base + *used : NULL;
    *used += acmoe__align_up(bytes);
    return p;
}

/* U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for Linear weights and biases. */
static void acmoe__init_uniform(acmoe_rng *rng, float *p, size_t n, int fan_in) {
    float bound = 1.0f / sqrtf((float)fan_in);
    size_t i;
    for (i = 0; i < n; i++) p[i] = (2.0f * acmoe_rng_uniform(rng) - 1.0f) * bound;
}

/* Adds the time since *mark to *total and moves the mark (no-op without a context clock). */
static void acmoe__lap(const acmoe_ctx *ctx, double *mark, double *total) {
    double now;
    if (!ctx->desc.clock) return;
    now = ctx->desc.clock();
    *total += now - *mark;
    *mark = now;
}

static double acmoe__clock_start(const acmoe_ctx *ctx) { return ctx->desc.clock ? ctx->desc.clock() : 0.0; }

/* rows x cols += bias per column */
static void acmoe__add_bias(const acmoe__kernel *kern, float *x, int rows, int cols, const float *bias) {
    int r;
    for (r = 0; r < rows; r++) kern->row_axpy(x + (size_t)r * cols, bias, cols, 1.0f);
}

/* bias_grad += column sums of rows x cols */
static void acmoe__bias_grad(const acmoe__kernel *kern, const float *dy, int rows, int cols, float *bias_grad) {
    int r;
    for (r = 0; r < rows; r++) kern->row_axpy(bias_grad, dy + (size_t)r * cols, cols, 1.0f);
}

/* Column sums over many rows (the gain and bias gradients, the AC statistics) run over
   ACMOE__SUM_BLOCKS fixed blocks of rows: each block sums its rows into a partial row of its
   own, threads take whole blocks (the same rows their row-split pass has just written, so
   still in their cache), and the partials are then added in block order. The bits do not
   depend on the thread count. The partials live in the first thread's packing space, which is
   free between products. */
#define ACMOE__SUM_BLOCKS 32

/* The first row of block b of `blocks` blocks of rows. */
static int acmoe__block_row(int rows, int b, int blocks) { return (int)((long)rows * b / blocks); }

/* The blocks [*b0, *b1) of `blocks` thread tid of n_threads takes. */
static void acmoe__thread_blocks(int tid, int n_threads, int blocks, int *b0, int *b1) {
    *b0 = blocks * tid / n_threads, *b1 = blocks * (tid + 1) / n_threads;
}

/* Room for the partials of `blocks` blocks of `sums` column sums of cols each, or NULL when
   the packing space is too small (a context with very small blocking). */
static float *acmoe__sum_partials(acmoe_ctx *ctx, int blocks, int sums, int cols) {
    const size_t need = (size_t)blocks * (size_t)sums * (size_t)cols;
    return need <= (size_t)ctx->desc.kc * (size_t)ctx->desc.nc ? ctx->ws[0].pack_b : NULL;
}

/* y += the partials of blocks 0, 1, ... (cols floats each, stride floats apart), in order. */
static void acmoe__add_partials(const acmoe__kernel *kern, float *y, const float *partials, int blocks, int cols,
                                size_t stride) {
    int b;
    for (b = 0; b < blocks; b++) kern->row_axpy(y, partials + (size_t)b * stride, cols, 1.0f);
}

/* ========================================================================================== */
/* 7. Routers                                                                                 */
/* ========================================================================================== */

/* Top-k of each row of logits [n][e] (finite), sorted by value with ties to the lower index,
   and the softmax over the k selected values; kern (may be NULL) may select for e <= 16. */
static void acmoe__topk_softmax(const acmoe__kernel *kern, const float *logits, int n, int e, int k, int32_t *idx,
                                float *gate) {
    const int vector = kern && kern->top16 && e <= 16;
    int t, s, j;
    for (t = 0; t < n; t++) {
        const float *z = logits + (size_t)t * e;
        int32_t *it = idx + (size_t)t * k;
        float *gt = gate + (size_t)t * k, sum = 0.0f;
        if (vector) kern->top16(z, e, k, it);
        for (s = 0; s < k && !vector; s++) { /* selection: k passes, each the best not yet taken */
            int best = -1, prev;
            for (j = 0; j < e; j++) {
                for (prev = 0; prev < s && it[prev] != j; prev++) continue;
                if (prev == s && (best < 0 || z[j] > z[best])) best = j;
            }
            it[s] = best;
        }
        for (s = 0; s < k; s++) sum += gt[s] = expf(z[it[s]] - z[it[0]]);
        for (s = 0; s < k; s++) gt[s] /= sum;
    }
}

/* Replaces non-finite logits by the smallest finite one of the call (0 when none is). */
static void acmoe__replace_nonfinite(float *logits, size_t n) {
    float low = 0.0f;
    int found = 0;
    size_t i;
    for (i = 0; i < n; i++)
        if (isfinite(logits[i]) && (!found || logits[i] < low)) low = logits[i], found = 1;
    for (i = 0; i < n; i++)
        if (!isfinite(logits[i])) logits[i] = low;
}

ACMOE_API acmoe_ac_desc acmoe_ac_defaults(void) {
    acmoe_ac_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.eps = 1e-4f;
    desc.clip = 10.0f;
    desc.scaling = ACMOE_AC_SCALE_PER_FEATURE;
    desc.dispersion = ACMOE_AC_DISP_MAD;
    return desc;
}

static acmoe_status acmoe__ac_resolve(const acmoe_ac_desc *in, acmoe_ac_desc *out) {
    acmoe_ac_desc desc = acmoe_ac_defaults();
    if (in) {
        if (!(in->eps >= 0.0f) || !(in->clip >= 0.0f) || !isfinite(in->eps) || !isfinite(in->clip))
            return ACMOE_ERR_ARG;
        if ((int)in->scaling < 0 || (int)in->scaling > ACMOE_AC_SCALE_POSTCLIP_MEAN) return ACMOE_ERR_ARG;
        if ((int)in->dispersion < 0 || (int)in->dispersion > ACMOE_AC_DISP_VARIANCE) return ACMOE_ERR_ARG;
        if (in->dispersion) desc.dispersion = in->dispersion;
        if (desc.dispersion == ACMOE_AC_DISP_VARIANCE) desc.eps = 0.1f;
        if (in->eps > 0.0f) desc.eps = in->eps;
        if (in->clip > 0.0f) desc.clip = in->clip;
        if (in->scaling) desc.scaling = in->scaling;
        desc.robust = in->robust != 0;
    }
    *out = desc;
    return ACMOE_OK;
}

/* Tokens per cluster. */
static void acmoe__ac_counts(const int32_t *labels, int label_stride, int n, int k_rows, int *count) {
    int t;
    memset(count, 0, sizeof(int) * (size_t)k_rows);
    for (t = 0; t < n; t++) count[labels[(size_t)t * label_stride]]++;
}

/* The features [*lo, returned) of cluster c among the cells from (c0, q0) up to (c1, q1) in
   cluster-major order: none when the returned end is not past *lo. */
static int acmoe__ac_cell_columns(int c, int c0, int q0, int c1, int q1, int d, int *lo) {
    *lo = c == c0 ? q0 : 0;
    return c < c0 || c > c1 ? 0 : c == c1 ? q1 : d;
}

/* Per-cluster dispersion into w [k_rows][d] (mean absolute deviation or variance, two passes
   around the mean kept in mu), over the cells (cluster, feature) from (c0, q0) up to (c1, q1)
   in cluster-major order: cluster c0 from feature q0, the clusters between whole, cluster c1
   up to feature q1. Each cell sums its tokens in token order, so the split does not change
   the bits. */
static void acmoe__ac_dispersion(const acmoe_ac_desc *desc, const acmoe__kernel *kern, const float *x, int n, int d,
                                 const int32_t *labels, int label_stride, const int *count, float *mu, float *w,
                                 int c0, int q0, int c1, int q1) {
    const int variance = desc->dispersion == ACMOE_AC_DISP_VARIANCE;
    int t, c, q, lo, hi;
    for (c = c0; c <= c1; c++) {
        if ((hi = acmoe__ac_cell_columns(c, c0, q0, c1, q1, d, &lo)) <= lo) continue;
        memset(mu + (size_t)c * d + lo, 0, sizeof(float) * (size_t)(hi - lo));
        memset(w + (size_t)c * d + lo, 0, sizeof(float) * (size_t)(hi - lo));
    }
    for (t = 0; t < n; t++) {
        const int label = labels[(size_t)t * label_stride];
        if ((hi = acmoe__ac_cell_columns(label, c0, q0, c1, q1, d, &lo)) > lo) /* 1 x is x: a plain sum */
            kern->row_axpy(mu + (size_t)label * d + lo, x + (size_t)t * d + lo, hi - lo, 1.0f);
    }
    for (c = c0; c <= c1; c++)
        if ((hi = acmoe__ac_cell_columns(c, c0, q0, c1, q1, d, &lo)) > lo && count[c])
            for (q = lo; q < hi; q++) mu[(size_t)c * d + q] /= (float)count[c];
    for (t = 0; t < n; t++) {
        const int label = labels[(size_t)t * label_stride];
        const size_t row = (size_t)label * d;
        if ((hi = acmoe__ac_cell_columns(label, c0, q0, c1, q1, d, &lo)) > lo)
            kern->row_deviation(w + row + lo, x + (size_t)t * d + lo, mu + row + lo, hi - lo, variance);
    }
    for (c = c0; c <= c1; c++)
        if ((hi = acmoe__ac_cell_columns(c, c0, q0, c1, q1, d, &lo)) > lo && count[c])
            for (q = lo; q < hi; q++) w[(size_t)c * d + q] /= (float)count[c];
}

/* The first cell (cluster, block of 16 features) that starts at or after `work` tokens'
   features, the cells in cluster-major order. */
static int acmoe__ac_cell_at(const int *count, int k_rows, int d, double work) {
    const int blocks = (d + 15) / 16;
    double before = 0.0;
    int c;
    for (c = 0; c < k_rows; c++) {
        const double cluster = (double)count[c] * d;
        if (before + cluster > work) return c * blocks + (int)ceil((work - before) / (16.0 * count[c]));
        before += cluster;
    }
    return k_rows * blocks;
}

/* Part `part` of `parts` of the dispersion of every cell: the cells in cluster-major order,
   split at blocks of 16 features into parts of about the same number of tokens' features,
   so that a part reads only its clusters' rows of x (a split by features has every part read
   every row, and parts write next to each other). */
static void acmoe__ac_dispersion_part(const acmoe_ac_desc *desc, const acmoe__kernel *kern, const float *x, int n,
                                      int d, const int32_t *labels, int label_stride, int k_rows, const int *count,
                                      float *mu, float *w, int part, int parts) {
    const int blocks = (d + 15) / 16;
    const double total = (double)n * d; /* the counts sum to n */
    const int u0 = part == 0 ? 0 : acmoe__ac_cell_at(count, k_rows, d, total * part / parts);
    const int u1 = part == parts - 1 ? k_rows * blocks
                                     : acmoe__ac_cell_at(count, k_rows, d, total * (part + 1) / parts);
    if (u1 > u0)
        acmoe__ac_dispersion(desc, kern, x, n, d, labels, label_stride, count, mu, w, u0 / blocks,
                             ACMOE__MIN(d, u0 % blocks * 16), u1 / blocks, ACMOE__MIN(d, u1 % blocks * 16));
}

/* The AC statistics by ACMOE__AC_BLOCKS fixed blocks of tokens, as the column sums run (see
   ACMOE__SUM_BLOCKS), when their partials are no larger than x: each thread reads only its
   own runs of x, where the split by cells above has every thread read rows scattered over
   all of x (slower on two threads than on one). Four steps, each split across threads and
   finished by all before the next: 0 and 2 sum each block's tokens into its partials, of x
   and of the deviations from mu; 1 and 3 add a cluster's partials in block order into mu
   and w and divide by its count. Fewer blocks than the column sums take, as a block's
   partials are k_rows rows: zeroing and adding more of them cost more than they spread. */
#define ACMOE__AC_BLOCKS 8
typedef struct acmoe__ac_blocks {
    const acmoe__kernel *kern;
    const float *x;
    const int32_t *labels;
    const int *count;
    float *mu, *w, *partials; /* partials: ACMOE__AC_BLOCKS x k_rows x d */
    int *bad; /* step 0 counts here the blocks of x with a NaN or an infinity; NULL: no check */
    int n, d, label_stride, k_rows, variance;
} acmoe__ac_blocks;

static int acmoe__ac_by_blocks(int n, int k_rows) { return (long)ACMOE__AC_BLOCKS * k_rows <= (long)n; }

/* Blocks [b0, b1): the partial sums of x (step 0) or of the deviations (step 2). Step 0 can
   first check a block of x for NaN and infinity, the block then read again from the cache. */
static void acmoe__ac_block_sums(const acmoe__ac_blocks *s, int step, int b0, int b1) {
    const size_t d = (size_t)s->d, part_len = (size_t)s->k_rows * d;
    int b, t;
    for (b = b0; b < b1; b++) {
        float *part = s->partials + (size_t)b * part_len;
        const int t0 = acmoe__block_row(s->n, b, ACMOE__AC_BLOCKS), t1 = acmoe__block_row(s->n, b + 1, ACMOE__AC_BLOCKS);
        if (step == 0 && s->bad && !acmoe__all_finite(s->x + t0 * d, (size_t)(t1 - t0) * d)) acmoe__next_item(s->bad);
        memset(part, 0, sizeof(float) * part_len);
        for (t = t0; t < t1; t++) {
            const size_t at = (size_t)s->labels[(size_t)t * s->label_stride] * d;
            if (step == 0) /* 1 x is x: a plain sum */
                s->kern->row_axpy(part + at, s->x + t * d, s->d, 1.0f);
            else
                s->kern->row_deviation(part + at, s->x + t * d, s->mu + at, s->d, s->variance);
        }
    }
}

static acmoe__ac_blocks acmoe__ac_blocks_of(const acmoe_ac_desc *desc, const acmoe__kernel *kern, const float *x,
                                             int n, int d, const int32_t *labels, int label_stride, int k_rows,
                                             const int *count, float *mu, float *w, float *partials) {
    acmoe__ac_blocks s;
    s.kern = kern, s.x = x, s.labels = labels, s.count = count, s.mu = mu, s.w = w, s.partials = partials, s.bad = NULL;
    s.n = n, s.d = d, s.label_stride = label_stride, s.k_rows = k_rows;
    s.variance = desc->dispersion == ACMOE_AC_DISP_VARIANCE;
    return s;
}

/* Thread tid's share of step `step`. */
static void acmoe__ac_blocks_step(const acmoe__ac_blocks *s, int step, int tid, int n_threads) {
    const size_t d = (size_t)s->d;
    int b0, b1, c, q;
    if (step == 0 || step == 2) {
        acmoe__thread_blocks(tid, n_threads, ACMOE__AC_BLOCKS, &b0, &b1);
        acmoe__ac_block_sums(s, step, b0, b1);
        return;
    }
    for (c = (int)((long)s->k_rows * tid / n_threads); c < (int)((long)s->k_rows * (tid + 1) / n_threads); c++) {
        float *out = (step == 1 ? s->mu : s->w) + c * d;
        memset(out, 0, sizeof(float) * d);
        acmoe__add_partials(s->kern, out, s->partials + c * d, ACMOE__AC_BLOCKS, s->d, (size_t)s->k_rows * d);
        for (q = 0; q < s->d && s->count[c]; q++) out[q] /= (float)s->count[c];
    }
}

/* Mean of the rows of w [k_rows][d] that count (all rows, or in robust mode those of
   clusters with at least 2 tokens), at column q, or over all columns when q < 0. */
static float acmoe__ac_mean(const float *w, int k_rows, int d, const int *count, int robust, int q) {
    double sum = 0.0;
    long used = 0;
    int c, j;
    for (c = 0; c < k_rows; c++) {
        if (robust && count[c] < 2) continue;
        for (j = q < 0 ? 0 : q; j < (q < 0 ? d : q + 1); j++, used++) sum += w[(size_t)c * d + j];
    }
    return used ? (float)(sum / (double)used) : 1.0f;
}

/* The cluster weights W [k_rows][d] from the dispersion held in w, in place. */
static void acmoe__ac_weights(const acmoe_ac_desc *desc, float *w, int k_rows, int d, const int *count) {
    size_t i, total = (size_t)k_rows * d;
    int c, q;
    float mean, cap;
    for (i = 0; i < total; i++) w[i] = 1.0f / (w[i] + desc->eps);
    if (desc->dispersion == ACMOE_AC_DISP_MAD) {
        mean = acmoe__ac_mean(w, k_rows, d, count, desc->robust, -1);
        cap = desc->clip * mean;
        for (i = 0; i < total; i++) w[i] = ACMOE__MIN(w[i], cap);
        if (desc->scaling == ACMOE_AC_SCALE_PER_FEATURE) {
            for (q = 0; q < d; q++) {
                float fm = acmoe__ac_mean(w, k_rows, d, count, desc->robust, q);
                for (c = 0; c < k_rows; c++) w[(size_t)c * d + q] /= fm;
            }
        } else {
            float by = desc->scaling == ACMOE_AC_SCALE_PRECLIP_MEAN
                           ? mean
                           : acmoe__ac_mean(w, k_rows, d, count, desc->robust, -1);
            for (i = 0; i < total; i++) w[i] /= by;
        }
    }
    if (desc->robust)
        for (c = 0; c < k_rows; c++)
            for (q = 0; q < d && count[c] < 2; q++) w[(size_t)c * d + q] = 1.0f;
}

/* logits[t][j] = sum_q x[t][q] w[c_t][q] ehat[j][q], accumulated in float. */
static void acmoe__ac_logits(const float *x, int n, int d, const int32_t *labels, int label_stride,
                             const float *w, const float *ehat, int e, float *logits) {
    int t, j, q;
    for (t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * d, *wt = w + (size_t)labels[(size_t)t * label_stride] * d;
        for (j = 0; j < e; j++) {
            const float *ej = ehat + (size_t)j * d;
            float z = 0.0f;
            for (q = 0; q < d; q++) z += xt[q] * wt[q] * ej[q];
            logits[(size_t)t * e + j] = z;
        }
    }
}

/* Rows of emb scaled to unit norm (norms below 1e-4 count as 1e-4), and the norms when
   norms is not NULL. */
static void acmoe__unit_rows(const float *emb, int rows, int d, float *out, float *norms) {
    int j, q;
    for (j = 0; j < rows; j++) {
        const float *ej = emb + (size_t)j * d;
        double sq = 0.0;
        float norm, inv;
        for (q = 0; q < d; q++) sq += (double)ej[q] * ej[q];
        norm = (float)ACMOE__MAX(sqrt(sq), 1e-4);
        inv = 1.0f / norm;
        for (q = 0; q < d; q++) out[(size_t)j * d + q] = ej[q] * inv;
        if (norms) norms[j] = norm;
    }
}

/* The largest label, or -1 for a bad one (negative, or so large W could not be held). */
#define ACMOE__AC_MAX_CLUSTERS (1 << 20)
static int acmoe__max_label(const int32_t *idx, size_t count) {
    int32_t top = 0;
    size_t i;
    for (i = 0; i < count; i++) {
        if (idx[i] < 0 || idx[i] >= ACMOE__AC_MAX_CLUSTERS) return -1;
        top = ACMOE__MAX(top, idx[i]);
    }
    return top;
}

ACMOE_API acmoe_status acmoe_ac_route(const acmoe_ac_desc *desc, const float *x, int n, int d,
                                      const int32_t *prev_idx, int prev_k, const float *emb,
                                      int n_experts, int k, int32_t *idx_out, float *gate_out,
                                      float *logits_out, float *w_out, int *w_rows_out) {
    acmoe_ac_desc opt;
    acmoe_status s = acmoe__ac_resolve(desc, &opt);
    acmoe__kernel kern;
    int k_rows, top;
    size_t w_len, scratch_len, partial_len;
    float *scratch, *mu, *w, *ehat, *logits;
    int *count, step;
    if (s != ACMOE_OK) return s;
    if (n < 0 || d < 1 || prev_k < 1 || n_experts < 1 || k < 1 || k > n_experts) return ACMOE_ERR_SHAPE;
    if (!emb || (n > 0 && (!x || !prev_idx || !idx_out || !gate_out))) return ACMOE_ERR_NULL;
    top = acmoe__max_label(prev_idx, (size_t)n * prev_k);
    if (top < 0) return ACMOE_ERR_ARG;
    if (!acmoe__all_finite(x, (size_t)n * d) || !acmoe__all_finite(emb, (size_t)n_experts * d))
        return ACMOE_ERR_NONFINITE;
    k_rows = n > 0 ? top + 1 : 0;
    if (w_rows_out) *w_rows_out = k_rows;
    if (n == 0) return ACMOE_OK;
    w_len = (size_t)k_rows * d;
    partial_len = acmoe__ac_by_blocks(n, k_rows) ? ACMOE__AC_BLOCKS * w_len : 0;
    scratch_len = w_len * (w_out ? 1 : 2) + (size_t)n_experts * d + (logits_out ? 0 : (size_t)n * n_experts);
    scratch_len += partial_len;
    count = (int *)ACMOE_MALLOC(sizeof(int) * (size_t)k_rows + sizeof(float) * scratch_len);
    if (!count) return ACMOE_ERR_NOMEM;
    scratch = (float *)(count + k_rows);
    mu = scratch;
    w = w_out ? w_out : mu + w_len;
    ehat = (w_out ? mu : w) + w_len;
    logits = logits_out ? logits_out : ehat + (size_t)n_experts * d;
    acmoe__ac_counts(prev_idx, prev_k, n, k_rows, count);
    acmoe__host_kernel(&kern);
    if (partial_len) { /* the layer's order, so the bits are the layer's */
        const acmoe__ac_blocks blocks = acmoe__ac_blocks_of(&opt, &kern, x, n, d, prev_idx, prev_k, k_rows, count, mu,
                                                            w, scratch + scratch_len - partial_len);
        for (step = 0; step < 4; step++) acmoe__ac_blocks_step(&blocks, step, 0, 1);
    } else {
        acmoe__ac_dispersion_part(&opt, &kern, x, n, d, prev_idx, prev_k, k_rows, count, mu, w, 0, 1);
    }
    acmoe__ac_weights(&opt, w, k_rows, d, count);
    acmoe__unit_rows(emb, n_experts, d, ehat, NULL);
    acmoe__ac_logits(x, n, d, prev_idx, prev_k, w, ehat, n_experts, logits);
    acmoe__replace_nonfinite(logits, (size_t)n * n_experts);
    acmoe__topk_softmax(NULL, logits, n, n_experts, k, idx_out, gate_out);
    ACMOE_FREE(count);
    return ACMOE_OK;
}

/* ========================================================================================== */
/* 8. MoE layer                                                                               */
/* ========================================================================================== */

/* A (token, expert) candidate of a selection rule: higher key first, then lower index. */
typedef struct acmoe__candidate {
    float key;
    int index;
} acmoe__candidate;

/* Rows that experts run on: expert j's count[j] rows from row offset[j] of each buffer, the
   experts taken in the order of order (acmoe__order_rows). */
typedef struct acmoe__expert_rows {
    int *count, *offset, *order;
    float *xe, *h, *a, *ye; /* gathered inputs [.][d], hidden [.][h_width], [.][d_ff], outputs [.][d] */
} acmoe__expert_rows;

struct acmoe_moe {
    acmoe_moe_desc desc;
    int dr;        /* router input width: d_model, or proj_dim */
    int h_width;   /* width of W1's output: d_ff, or 2 d_ff for SwiGLU */
    int max_pairs; /* (token, expert) pairs one call can make; Soft MoE: slot rows */
    int lw;        /* logits per token: n_experts, or Soft MoE's slots */
    int label_k;   /* experts each token reports to the next layer: top_k, or Soft MoE's mix_k */
    /* parameter views and their gradients */
    float *wr, *br, *emb, *phi, *phi_scale, *proj, *w1, *b1, *w2, *b2;
    float *g_wr, *g_br, *g_emb, *g_phi, *g_phi_scale, *g_proj, *g_w1, *g_b1, *g_w2, *g_b2;
    /* workspace, sized for max_tokens */
    void *memory;
    size_t memory_bytes;
    float *xr, *dxr, *wmix;    /* router input, its gradient [T][dr]; mixed AC weights [T][d] */
    float *ehat, *dehat, *emb_norm; /* unit expert embeddings or slot vectors [lw][dr], norms */
    float *ehat_t;             /* AC with u in tiles: ehat transposed [dr][lw] */
    float *logits, *probs, *sig, *dz; /* [T][lw] (sig: USMoE only); Soft MoE: probs are the combine weights */
    float *uhat, *u_norm;      /* Soft MoE: unit router inputs [T][dr] and their norms */
    const float *score_in;     /* Soft MoE: the rows the slot score read (uhat, or xr) */
    float *du;                 /* Soft MoE, normalised input: the gradient of those rows [T][dm] */
    float *dispatch, *ddispatch; /* Soft MoE: dispatch weights and their gradients [T][lw] */
    float *slots;              /* Soft MoE: slot rows of each group in turn [max_pairs][d] */
    float *balance_q;          /* [T][E] softmax(z / T) of the balance loss */
    float *noisy;              /* [T][E] the logits with the gate noise (priority selection) */
    float *clean_probs;        /* [T][E] softmax of the logits without it (importance loss) */
    int32_t *top_idx;          /* [T][k] experts by score, for the next layer */
    float *top_gate;           /* [T][k] */
    int32_t *labels;           /* [T] AC cluster of each token */
    float *ac_w, *ac_mu;       /* [ac_max_clusters][d] */
    int *ac_count;             /* [ac_max_clusters] */
    int *mark;                 /* [T][E] selected pairs, for the group rules */
    acmoe__candidate *cand;    /* [T][E] selection scratch */
    int *pair_token, *pair_expert, *pair_rank, *pair_slot; /* [P], in (token, rank) order */
    float *pair_gate, *pair_dgate;
    int *count, *offset, *cursor, *slot_pair; /* per expert (offset: E + 1); [P] */
    int *order;                /* [E] the experts by decreasing row count */
    int *token_start;          /* [T + 1] first pair of each token */
    float *xe, *h, *a, *ye;    /* gathered rows [P][d], hidden [P][h_width], [P][d_ff], out [P][d] */
    /* the last forward call */
    const float *x;
    int n, cached, n_pairs, dropped, nonfinite, n_groups;
    int u_in_tiles; /* AC: u was never written to xr (see acmoe__ac_in_tiles) */
    float aux_loss;
    int ac_rows, ac_frozen, ac_ready;
    float router_stability;
    int training;         /* draw gate noise (acmoe_moe_set_training) */
    acmoe_rng *noise_rng; /* ... from this generator */
    double seconds_routing, seconds_experts;
    /* expert parallelism (acmoe_moe_set_expert_ranks): rows of this rank's experts from every
       rank, expert by expert, each expert's in rank order */
    acmoe_comm *ranks;
    void *ep_memory;
    acmoe__expert_rows owned;
    float *ep_stage;           /* rows in transit, rank by rank [size max_pairs][d] */
    float *ep_counts;          /* [2][E]: pairs per expert this rank sends; pairs it receives, rank by rank */
    int *ep_cursor;            /* [E] */
    size_t *ep_send, *ep_recv; /* [size] floats to and from each rank */
};

ACMOE_API acmoe_status acmoe_moe_router_preset(acmoe_moe_desc *desc, char letter) {
    static const struct {
        char letter;
        acmoe_router_input input;
        acmoe_router_score score;
        acmoe_router_select select;
    } presets[] = {
        {'g', ACMOE_INPUT_TOKEN, ACMOE_SCORE_LINEAR, ACMOE_SELECT_TOPK},
        {'s', ACMOE_INPUT_TOKEN, ACMOE_SCORE_LINEAR, ACMOE_SELECT_SWITCH},
        {'o', ACMOE_INPUT_TOKEN, ACMOE_SCORE_COSINE, ACMOE_SELECT_TOPK},
        {'b', ACMOE_INPUT_TOKEN, ACMOE_SCORE_COSINE, ACMOE_SELECT_TOPK},
        {'x', ACMOE_INPUT_PROJECTED, ACMOE_SCORE_COSINE, ACMOE_SELECT_TOPK},
        {'c', ACMOE_INPUT_AC, ACMOE_SCORE_COSINE, ACMOE_SELECT_TOPK},
        {'u', ACMOE_INPUT_TOKEN, ACMOE_SCORE_LINEAR, ACMOE_SELECT_USMOE},
        {'v', ACMOE_INPUT_AC, ACMOE_SCORE_COSINE, ACMOE_SELECT_USMOE},
        {'t', ACMOE_INPUT_TOKEN, ACMOE_SCORE_LINEAR, ACMOE_SELECT_PRIORITY},
        {'w', ACMOE_INPUT_AC, ACMOE_SCORE_LINEAR, ACMOE_SELECT_PRIORITY},
        {'e', ACMOE_INPUT_TOKEN, ACMOE_SCORE_LINEAR, ACMOE_SELECT_EXPERT_CHOICE},
        {'m', ACMOE_INPUT_TOKEN, ACMOE_SCORE_SLOT, ACMOE_SELECT_SOFT},
        {'n', ACMOE_INPUT_TOKEN, ACMOE_SCORE_SLOT, ACMOE_SELECT_SOFT},
        {'a', ACMOE_INPUT_AC, ACMOE_SCORE_SLOT, ACMOE_SELECT_SOFT},
        {'f', ACMOE_INPUT_TOKEN, ACMOE_SCORE_NONE, ACMOE_SELECT_DENSE},
    };
    size_t i;
    if (!desc) return ACMOE_ERR_NULL;
    for (i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        if (presets[i].letter != letter) continue;
        desc->router_input = presets[i].input;
        desc->router_score = presets[i].score;
        desc->router_select = presets[i].select;
        if (letter == 's') desc->top_k = 1;
        if (letter == 'f') desc->n_experts = desc->top_k = 1;
        if (letter == 'u') desc->no_router_bias = 1;
        if (letter == 'b') desc->no_reprojection = 1;
        if (letter == 't' || letter == 'w') { /* swin_transformer_cosa.py, config.py: Tutel's top gate */
            desc->no_router_bias = 1, desc->gate_noise = 1.0f, desc->importance_loss = 0.01f;
            if (desc->capacity == 0.0f) desc->capacity = 1.25f;
        }
        if (letter == 'w') { /* compute_cosa: mad, 1e-4, 1.5 x the pre-clip mean, whole MoE input */
            desc->ac_weight_experts = 1, desc->ac_mix_labels = 0;
            desc->ac.eps = 1e-4f, desc->ac.clip = 1.5f, desc->ac.scaling = ACMOE_AC_SCALE_PRECLIP_MEAN;
            desc->ac.dispersion = ACMOE_AC_DISP_MAD;
        }
        if (letter == 'm') desc->soft_input = ACMOE_SOFT_RAW;
        if (letter == 'n' || letter == 'a') desc->soft_input = ACMOE_SOFT_NORMALIZED;
        if (letter == 'a') { /* softmoe.py's AC layers: mad, mix_weights, eps 0.35, 5 x mean clip */
            desc->ac_weight_experts = 0; /* the weighted tokens reach the slots anyway */
            desc->ac_mix_labels = 1;
            desc->ac.eps = 0.35f, desc->ac.clip = 5.0f, desc->ac.scaling = ACMOE_AC_SCALE_POSTCLIP_MEAN;
            desc->ac.dispersion = ACMOE_AC_DISP_MAD;
        }
        return ACMOE_OK;
    }
    return ACMOE_ERR_ARG;
}

static int acmoe__valid_enum(int value, int count) { return value >= 0 && value < count; }

/* Whether the layer has no pairs to limit or balance: Soft MoE and dense layers. */
static int acmoe__routerless(const acmoe_moe_desc *desc) {
    return desc->router_select == ACMOE_SELECT_SOFT || desc->router_select == ACMOE_SELECT_DENSE;
}

/* Whether the selection rule shares its tokens by groups. */
static int acmoe__grouped(const acmoe_moe_desc *desc) {
    return desc->router_select == ACMOE_SELECT_USMOE || desc->router_select == ACMOE_SELECT_SOFT;
}

/* The groups of n tokens (at most, when n is not whole sequences). */
static int acmoe__group_count(const acmoe_moe_desc *desc, int n) {
    if (desc->group == ACMOE_GROUP_BATCH) return 1;
    return desc->group == ACMOE_GROUP_POSITION ? desc->seq_len : (n + desc->seq_len - 1) / desc->seq_len;
}

#define ACMOE__MAX_AUX_EXPERTS 1024 /* experts of a layer with the importance loss (its sums live on the stack) */

/* Whether every count the layer indexes by int fits one, and its buffers fit in memory:
   widths up to ACMOE__MAX_WIDTH, tokens times logits (which bounds the pairs and the slot
   rows) within an int. */
#define ACMOE__MAX_WIDTH (1 << 20)
static int acmoe__moe_sizes_fit(const acmoe_moe_desc *desc) {
    const double lw = (double)desc->n_experts * desc->soft_slots, widths = (double)desc->d_model + 2.0 * desc->d_ff + desc->proj_dim;
    if (desc->d_model > ACMOE__MAX_WIDTH || desc->d_ff > ACMOE__MAX_WIDTH || desc->proj_dim > ACMOE__MAX_WIDTH ||
        desc->n_experts > ACMOE__MAX_WIDTH || lw > 1e6 || (double)desc->max_tokens * lw > (double)INT32_MAX)
        return 0;
    /* the largest buffers: rows of every width for each (token, logit) pair, the parameters */
    return (double)desc->max_tokens * (lw + 4.0) * (widths + lw) < ACMOE__MAX_BYTES / 8.0 &&
           (double)desc->n_experts * (3.0 * desc->d_ff + 2.0) * desc->d_model + lw * widths < (double)INT32_MAX;
}

ACMOE_API acmoe_status acmoe_moe_resolve(const acmoe_moe_desc *in, acmoe_moe_desc *out) {
    acmoe_moe_desc desc;
    acmoe_status s;
    if (!in || !out) return ACMOE_ERR_NULL;
    desc = *in;
    if (!desc.top_k) desc.top_k = 2;
    if (!desc.proj_dim) desc.proj_dim = 8;
    if (!desc.ac_max_clusters) desc.ac_max_clusters = desc.n_experts;
    if (desc.capacity == 0.0f && desc.router_select == ACMOE_SELECT_EXPERT_CHOICE) desc.capacity = 2.0f;
    if (desc.capacity == 0.0f && desc.router_select == ACMOE_SELECT_PRIORITY) desc.capacity = 1.25f;
    if (desc.usmoe_budget == 0.0f) desc.usmoe_budget = (float)desc.top_k;
    if (desc.usmoe_rho == 0.0f) desc.usmoe_rho = 0.5f;
    if (desc.balance_temperature == 0.0f) desc.balance_temperature = 1.0f;
    if (!desc.soft_slots) desc.soft_slots = 1;
    if (!desc.mix_k) desc.mix_k = 8;
    if (desc.importance_loss > 0.0f && desc.n_experts > ACMOE__MAX_AUX_EXPERTS) return ACMOE_ERR_ARG;
    if (desc.group == ACMOE_GROUP_DEFAULT) desc.group = desc.seq_len > 0 ? ACMOE_GROUP_POSITION : ACMOE_GROUP_BATCH;
    if (desc.d_model < 1 || desc.d_ff < 1 || desc.n_experts < 1 || desc.max_tokens < 1 || desc.top_k < 1 ||
        desc.top_k > desc.n_experts || desc.proj_dim < 1 || desc.ac_max_clusters < 1 || desc.seq_len < 0 || desc.soft_slots < 1 ||
        !acmoe__moe_sizes_fit(&desc))
        return ACMOE_ERR_SHAPE;
    if (!acmoe__valid_enum((int)desc.router_input, ACMOE_INPUT_COUNT) ||
        !acmoe__valid_enum((int)desc.router_score, ACMOE_SCORE_COUNT) ||
        !acmoe__valid_enum((int)desc.router_select, ACMOE_SELECT_COUNT) ||
        !acmoe__valid_enum((int)desc.group, ACMOE_GROUP_COUNT) ||
        !acmoe__valid_enum((int)desc.soft_input, ACMOE_SOFT_INPUT_COUNT) || desc.mix_k < 1 ||
        !acmoe__valid_enum((int)desc.activation, ACMOE_ACT_COUNT))
        return ACMOE_ERR_ARG;
    if (!(desc.capacity >= 0.0f && desc.capacity <= 1e4f) ||
        !(desc.usmoe_budget >= 0.0f) ||
        (desc.router_select == ACMOE_SELECT_USMOE && !(desc.usmoe_budget > 0.0f && desc.usmoe_budget <= (float)desc.n_experts)) ||
        !(desc.usmoe_rho >= 0.0f && desc.usmoe_rho <= 1.0f) || !(desc.balance_alpha >= 0.0f && desc.balance_alpha < 1e6f) ||
        !(desc.balance_temperature > 0.0f && desc.balance_temperature < 1e6f) || !(desc.z_loss >= 0.0f && desc.z_loss < 1e6f) ||
        !(desc.gate_noise >= 0.0f && desc.gate_noise < 1e6f) || !(desc.importance_loss >= 0.0f && desc.importance_loss < 1e6f) ||
        (desc.importance_loss > 0.0f && (desc.gate_noise == 0.0f || desc.n_experts < 2)) ||
        desc.ac_max_clusters > ACMOE__AC_MAX_CLUSTERS)
        return ACMOE_ERR_ARG;
    if (desc.group != ACMOE_GROUP_BATCH && acmoe__grouped(&desc) && desc.seq_len < 1)
        return ACMOE_ERR_ARG; /* sequence and position groups need seq_len */
    if (desc.soft_input == ACMOE_SOFT_NORMALIZED && desc.router_input == ACMOE_INPUT_PROJECTED)
        return ACMOE_ERR_ARG; /* the slots take the score's input, so it must be d_model wide */
    if ((desc.router_select == ACMOE_SELECT_SOFT) != (desc.router_score == ACMOE_SCORE_SLOT) ||
        (desc.router_select == ACMOE_SELECT_DENSE) != (desc.router_score == ACMOE_SCORE_NONE) ||
        (desc.router_select == ACMOE_SELECT_DENSE &&
         (desc.n_experts != 1 || desc.top_k != 1 || desc.router_input != ACMOE_INPUT_TOKEN)) ||
        (acmoe__routerless(&desc) && (desc.capacity > 0.0f || desc.balance_alpha > 0.0f || desc.z_loss > 0.0f ||
                                   desc.gate_noise > 0.0f || desc.importance_loss > 0.0f)))
        return ACMOE_ERR_ARG;
    s = acmoe__ac_resolve(&in->ac, &desc.ac);
    if (s != ACMOE_OK) return s;
    *out = desc;
    return ACMOE_OK;
}

/* Lays the parameters out in params (or only counts them when params is NULL). */
static size_t acmoe__moe_params(acmoe_moe *layer, float *params, float *grads, acmoe__directory *dir) {
    const acmoe_moe_desc *desc = &layer->desc;
    const int e = desc->n_experts, dm = desc->d_model;
    size_t used = 0;
#define ACMOE__VIEW(field, name, decay, ndim, s0, s1, s2) \
    acmoe__param_view(&used, params, grads, &layer->field, &layer->g_##field, dir, name, decay, ndim, s0, s1, s2)
    if (desc->router_select == ACMOE_SELECT_DENSE) { /* one expert: plain linear layers */
        ACMOE__VIEW(w1, "w1", 1, 2, layer->h_width, dm, 0);
        ACMOE__VIEW(b1, "b1", 0, 1, layer->h_width, 0, 0);
        ACMOE__VIEW(w2, "w2", 1, 2, dm, desc->d_ff, 0);
        ACMOE__VIEW(b2, "b2", 0, 1, dm, 0, 0);
        return used;
    }
    if (desc->router_input == ACMOE_INPUT_PROJECTED) ACMOE__VIEW(proj, "router.proj", 1, 2, desc->proj_dim, dm, 0);
    if (desc->router_score == ACMOE_SCORE_LINEAR) {
        ACMOE__VIEW(wr, "router.weight", 1, 2, e, layer->dr, 0);
        if (!desc->no_router_bias) ACMOE__VIEW(br, "router.bias", 0, 1, e, 0, 0);
    } else if (desc->router_score == ACMOE_SCORE_SLOT) {
        ACMOE__VIEW(phi, "router.slots", 1, 2, layer->lw, layer->dr, 0);
        ACMOE__VIEW(phi_scale, "router.scale", 0, 1, 1, 0, 0);
    } else {
        ACMOE__VIEW(emb, "router.embedding", 1, 2, e, layer->dr, 0);
    }
    ACMOE__VIEW(w1, "experts.w1", 1, 3, e, layer->h_width, dm);
    ACMOE__VIEW(b1, "experts.b1", 0, 2, e, layer->h_width, 0);
    ACMOE__VIEW(w2, "experts.w2", 1, 3, e, dm, desc->d_ff);
    ACMOE__VIEW(b2, "experts.b2", 0, 2, e, dm, 0);
#undef ACMOE__VIEW
    return used;
}

/* Widths and the pair bound that follow from a resolved descriptor. */
static void acmoe__moe_shape(acmoe_moe *layer) {
    const acmoe_moe_desc *desc = &layer->desc;
    double per_token = desc->top_k;
    layer->dr = desc->router_input == ACMOE_INPUT_PROJECTED ? desc->proj_dim : desc->d_model;
    layer->h_width = desc->activation == ACMOE_ACT_SWIGLU ? 2 * desc->d_ff : desc->d_ff;
    layer->lw = desc->router_select == ACMOE_SELECT_SOFT ? desc->n_experts * desc->soft_slots : desc->n_experts;
    layer->label_k = desc->router_select == ACMOE_SELECT_SOFT ? ACMOE__MIN(desc->mix_k, layer->lw) : desc->top_k;
    if (desc->router_select == ACMOE_SELECT_SOFT) { /* every group's slots */
        layer->max_pairs = acmoe__group_count(desc, desc->max_tokens) * layer->lw;
        return;
    }
    /* group budgets round up to one pair per group, capacities to one token per expert */
    if (desc->router_select == ACMOE_SELECT_USMOE) per_token = (double)desc->usmoe_budget + 1.0;
    if (desc->router_select == ACMOE_SELECT_EXPERT_CHOICE) per_token = (double)desc->capacity + 1.0;
    per_token = ACMOE__MIN(per_token, (double)desc->n_experts);
    layer->max_pairs = (int)ACMOE__MIN(ceil(per_token * desc->max_tokens) + desc->n_experts, (double)desc->max_tokens * desc->n_experts);
}

/* The parameter count of a layer with this descriptor (0 for a bad one), listing its
   tensors in dir when given. */
static size_t acmoe__moe_directory(const acmoe_moe_desc *desc, acmoe__directory *dir) {
    acmoe_moe layer;
    memset(&layer, 0, sizeof layer);
    if (acmoe_moe_resolve(desc, &layer.desc) != ACMOE_OK) return 0;
    acmoe__moe_shape(&layer);
    return acmoe__moe_params(&layer, NULL, NULL, dir);
}

ACMOE_API size_t acmoe_moe_param_count(const acmoe_moe_desc *desc) { return acmoe__moe_directory(desc, NULL); }

/* Lays the workspace out in base (or only measures it when base is NULL). */
static size_t acmoe__moe_workspace(acmoe_moe *layer, unsigned char *base) {
    const acmoe_moe_desc *desc = &layer->desc;
    const size_t t = (size_t)desc->max_tokens, e = (size_t)desc->n_experts, p = (size_t)layer->max_pairs;
    const size_t k = (size_t)ACMOE__MAX(desc->top_k, layer->label_k);
    const size_t lw = (size_t)layer->lw, soft = desc->router_select == ACMOE_SELECT_SOFT;
    const size_t dm = (size_t)desc->d_model, dr = (size_t)layer->dr, kc = (size_t)desc->ac_max_clusters;
    const size_t f = sizeof(float), i = sizeof(int);
    size_t used = 0;
    layer->xr = (float *)acmoe__carve(base, &used, t * dr * f);
    layer->dxr = (float *)acmoe__carve(base, &used, t * dr * f);
    layer->wmix = (float *)acmoe__carve(base, &used, (desc->ac_mix_labels ? t * dm : 1) * f);
    layer->ehat = (float *)acmoe__carve(base, &used, lw * dr * f);
    layer->dehat = (float *)acmoe__carve(base, &used, lw * dr * f);
    layer->ehat_t = (float *)acmoe__carve(base, &used, lw * dr * f);
    layer->emb_norm = (float *)acmoe__carve(base, &used, lw * f);
    layer->logits = (float *)acmoe__carve(base, &used, t * lw * f);
    layer->probs = (float *)acmoe__carve(base, &used, t * lw * f);
    layer->sig = (float *)acmoe__carve(base, &used, (desc->router_select == ACMOE_SELECT_USMOE ? t * lw : 1) * f);
    layer->dz = (float *)acmoe__carve(base, &used, t * lw * f);
    layer->uhat = (float *)acmoe__carve(base, &used, (soft ? t * dr : 1) * f);
    layer->u_norm = (float *)acmoe__carve(base, &used, (soft ? t : 1) * f);
    layer->du = (float *)acmoe__carve(base, &used, (soft && desc->soft_input == ACMOE_SOFT_NORMALIZED ? t * dm : 1) * f);
    layer->dispatch = (float *)acmoe__carve(base, &used, (soft ? t * lw : 1) * f);
    layer->ddispatch = (float *)acmoe__carve(base, &used, (soft ? t * lw : 1) * f);
    layer->slots = (float *)acmoe__carve(base, &used, (soft ? p * dm : 1) * f);
    layer->balance_q = (float *)acmoe__carve(base, &used, (desc->balance_alpha > 0.0f ? t * e : 1) * f);
    layer->noisy = (float *)acmoe__carve(base, &used, (desc->router_select == ACMOE_SELECT_PRIORITY ? t * e : 1) * f);
    layer->clean_probs = (float *)acmoe__carve(base, &used, (desc->importance_loss > 0.0f ? t * e : 1) * f);
    layer->top_idx = (int32_t *)acmoe__carve(base, &used, t * k * sizeof(int32_t));
    layer->top_gate = (float *)acmoe__carve(base, &used, t * k * f);
    layer->labels = (int32_t *)acmoe__carve(base, &used, t * sizeof(int32_t));
    layer->ac_w = (float *)acmoe__carve(base, &used, (desc->router_input == ACMOE_INPUT_AC ? kc * dm : 1) * f);
    layer->ac_mu = (float *)acmoe__carve(base, &used, (desc->router_input == ACMOE_INPUT_AC ? kc * dm : 1) * f);
    layer->ac_count = (int *)acmoe__carve(base, &used, kc * i);
    layer->mark = (int *)acmoe__carve(base, &used, t * e * i);
    layer->cand = (acmoe__candidate *)acmoe__carve(base, &used, t * e * sizeof(acmoe__candidate));
    layer->pair_token = (int *)acmoe__carve(base, &used, p * i);
    layer->pair_expert = (int *)acmoe__carve(base, &used, p * i);
    layer->pair_rank = (int *)acmoe__carve(base, &used, p * i);
    layer->pair_slot = (int *)acmoe__carve(base, &used, p * i);
    layer->pair_gate = (float *)acmoe__carve(base, &used, p * f);
    layer->pair_dgate = (float *)acmoe__carve(base, &used, p * f);
    layer->count = (int *)acmoe__carve(base, &used, e * i);
    layer->offset = (int *)acmoe__carve(base, &used, (e + 1) * i);
    layer->cursor = (int *)acmoe__carve(base, &used, e * i);
    layer->order = (int *)acmoe__carve(base, &used, e * i);
    layer->slot_pair = (int *)acmoe__carve(base, &used, p * i);
    layer->token_start = (int *)acmoe__carve(base, &used, (t + 1) * i);
    layer->xe = (float *)acmoe__carve(base, &used, p * dm * f);
    layer->h = (float *)acmoe__carve(base, &used, p * (size_t)layer->h_width * f);
    layer->a = (float *)acmoe__carve(base, &used, p * (size_t)desc->d_ff * f);
    layer->ye = (float *)acmoe__carve(base, &used, p * dm * f);
    return used;
}

ACMOE_API void acmoe_moe_destroy(acmoe_moe *layer) {
    if (!layer) return;
    acmoe__aligned_free(layer->ep_memory);
    acmoe__aligned_free(layer->memory);
    ACMOE_FREE(layer);
}

ACMOE_API acmoe_status acmoe_moe_create(acmoe_moe **out, const acmoe_moe_desc *desc, float *params,
                                        float *grads) {
    acmoe_moe *layer;
    acmoe_status s;
    size_t bytes;
    if (!out || !desc || !params || !grads) return ACMOE_ERR_NULL;
    *out = NULL;
    layer = (acmoe_moe *)ACMOE_MALLOC(sizeof *layer);
    if (!layer) return ACMOE_ERR_NOMEM;
    memset(layer, 0, sizeof *layer);
    s = acmoe_moe_resolve(desc, &layer->desc);
    if (s != ACMOE_OK) {
        ACMOE_FREE(layer);
        return s;
    }
    acmoe__moe_shape(layer);
    acmoe__moe_params(layer, params, grads, NULL);
    layer->memory_bytes = bytes = acmoe__moe_workspace(layer, NULL);
    layer->memory = acmoe__aligned_alloc(bytes);
    if (!layer->memory) {
        ACMOE_FREE(layer);
        return ACMOE_ERR_NOMEM;
    }
    memset(layer->memory, 0, bytes);
    acmoe__moe_workspace(layer, (unsigned char *)layer->memory);
    *out = layer;
    return ACMOE_OK;
}

/* Orthonormal rows (or columns, when there are more rows than columns) times gain. */
static void acmoe__init_orthogonal(acmoe_rng *rng, float *p, int rows, int cols, float gain) {
    int by_rows = rows <= cols, n = by_rows ? rows : cols, len = by_rows ? cols : rows;
    ptrdiff_t stride = by_rows ? cols : 1, step = by_rows ? 1 : cols;
    int i, j, q;
    for (i = 0; i < rows * cols; i++) p[i] = acmoe_rng_normal(rng);
    for (i = 0; i < n; i++) { /* modified Gram-Schmidt over vectors i of length len */
        float *v = p + i * stride;
        double norm = 0.0;
        for (j = 0; j < i; j++) {
            const float *u = p + j * stride;
            double dot = 0.0;
            for (q = 0; q < len; q++) dot += (double)v[q * step] * u[q * step];
            for (q = 0; q < len; q++) v[q * step] -= (float)dot * u[q * step];
        }
        for (q = 0; q < len; q++) norm += (double)v[q * step] * v[q * step];
        for (q = 0; q < len; q++) v[q * step] /= (float)sqrt(norm);
    }
    for (i = 0; i < rows * cols; i++) p[i] *= gain;
}

ACMOE_API acmoe_status acmoe_moe_init_params(acmoe_moe *layer, acmoe_rng *rng) {
    const acmoe_moe_desc *desc;
    size_t e;
    if (!layer || !rng) return ACMOE_ERR_NULL;
    desc = &layer->desc;
    e = (size_t)desc->n_experts;
    if (layer->proj) acmoe__init_uniform(rng, layer->proj, (size_t)desc->proj_dim * desc->d_model, desc->d_model);
    if (layer->wr) acmoe__init_uniform(rng, layer->wr, e * layer->dr, layer->dr);
    if (layer->br) acmoe__init_uniform(rng, layer->br, e, layer->dr);
    if (layer->emb) acmoe__init_orthogonal(rng, layer->emb, desc->n_experts, layer->dr, 0.32f);
    if (layer->phi) acmoe__init_uniform(rng, layer->phi, (size_t)layer->lw * layer->dr, layer->dr);
    if (layer->phi_scale) *layer->phi_scale = 1.0f;
    acmoe__init_uniform(rng, layer->w1, e * layer->h_width * desc->d_model, desc->d_model);
    acmoe__init_uniform(rng, layer->b1, e * layer->h_width, desc->d_model);
    acmoe__init_uniform(rng, layer->w2, e * desc->d_model * desc->d_ff, desc->d_ff);
    acmoe__init_uniform(rng, layer->b2, e * desc->d_model, desc->d_ff);
    return ACMOE_OK;
}

ACMOE_API acmoe_moe_desc acmoe_moe_settings(const acmoe_moe *layer) {
    acmoe_moe_desc none;
    if (layer) return layer->desc;
    memset(&none, 0, sizeof none);
    return none;
}

ACMOE_API void acmoe_moe_set_training(acmoe_moe *layer, int train, acmoe_rng *noise) {
    if (!layer) return;
    layer->training = train != 0;
    layer->noise_rng = noise;
}

/* The first expert of a rank: each owns n_experts / size in a contiguous block. */
static int acmoe__first_expert(const acmoe_moe *layer, int rank) { return layer->desc.n_experts / layer->ranks->size * rank; }

/* Lays out the expert-parallel workspace for size ranks in base (or measures it). */
static size_t acmoe__ep_workspace(acmoe_moe *layer, int size, unsigned char *base) {
    const size_t e = (size_t)layer->desc.n_experts, rows = (size_t)size * (size_t)layer->max_pairs;
    const size_t dm = (size_t)layer->desc.d_model, f = sizeof(float), i = sizeof(int);
    size_t used = 0;
    layer->owned.count = (int *)acmoe__carve(base, &used, e * i);
    layer->owned.offset = (int *)acmoe__carve(base, &used, (e + 1) * i);
    layer->owned.order = (int *)acmoe__carve(base, &used, e * i);
    layer->ep_cursor = (int *)acmoe__carve(base, &used, e * i);
    layer->ep_counts = (float *)acmoe__carve(base, &used, 2 * e * f);
    layer->ep_send = (size_t *)acmoe__carve(base, &used, (size_t)size * sizeof(size_t));
    layer->ep_recv = (size_t *)acmoe__carve(base, &used, (size_t)size * sizeof(size_t));
    layer->owned.xe = (float *)acmoe__carve(base, &used, rows * dm * f);
    layer->owned.h = (float *)acmoe__carve(base, &used, rows * (size_t)layer->h_width * f);
    layer->owned.a = (float *)acmoe__carve(base, &used, rows * (size_t)layer->desc.d_ff * f);
    layer->owned.ye = (float *)acmoe__carve(base, &used, rows * dm * f);
    layer->ep_stage = (float *)acmoe__carve(base, &used, rows * dm * f);
    return used;
}

ACMOE_API acmoe_status acmoe_moe_set_expert_ranks(acmoe_moe *layer, acmoe_comm *comm) {
    const acmoe_moe_desc *desc;
    void *memory;
    if (!layer) return ACMOE_ERR_NULL;
    desc = &layer->desc;
    if (comm && (comm->size < 1 || comm->rank < 0 || comm->rank >= comm->size)) return ACMOE_ERR_ARG;
    if (comm && comm->size > 1) {
        if (!comm->exchange) return ACMOE_ERR_NULL;
        if ((desc->router_select != ACMOE_SELECT_TOPK && desc->router_select != ACMOE_SELECT_SWITCH) || desc->capacity > 0.0f)
            return ACMOE_ERR_UNSUPPORTED; /* rules that see the whole call's pairs */
        if (desc->n_experts % comm->size) return ACMOE_ERR_ARG;
        memory = acmoe__aligned_alloc(acmoe__ep_workspace(layer, comm->size, NULL));
        if (!memory) return ACMOE_ERR_NOMEM;
        acmoe__aligned_free(layer->ep_memory);
        layer->ep_memory = memory;
        acmoe__ep_workspace(layer, comm->size, (unsigned char *)memory);
        layer->ranks = comm;
    } else {
        acmoe__aligned_free(layer->ep_memory);
        layer->ep_memory = NULL, layer->ranks = NULL;
        memset(&layer->owned, 0, sizeof layer->owned);
    }
    layer->cached = 0; /* a backward call needs a forward call made the same way */
    return ACMOE_OK;
}

ACMOE_API acmoe_comm *acmoe_moe_expert_ranks(const acmoe_moe *layer, int *first, int *count) {
    const int n = layer ? layer->desc.n_experts : 0;
    if (first) *first = layer && layer->ranks ? acmoe__first_expert(layer, layer->ranks->rank) : 0;
    if (count) *count = layer && layer->ranks ? n / layer->ranks->size : n;
    return layer ? layer->ranks : NULL;
}

ACMOE_API void acmoe_moe_freeze_ac_weights(acmoe_moe *layer, int frozen) {
    if (layer) layer->ac_frozen = frozen != 0;
}

ACMOE_API const float *acmoe_moe_ac_weights(const acmoe_moe *layer, int *rows) {
    if (rows) *rows = 0;
    if (!layer || layer->desc.router_input != ACMOE_INPUT_AC || !layer->ac_ready) return NULL;
    if (rows) *rows = layer->ac_rows;
    return layer->ac_w;
}

ACMOE_API acmoe_status acmoe_moe_set_ac_weights(acmoe_moe *layer, const float *w, int rows) {
    const size_t count = (size_t)rows * (size_t)(layer ? layer->desc.d_model : 0);
    size_t i;
    if (!layer || !w) return ACMOE_ERR_NULL;
    if (layer->desc.router_input != ACMOE_INPUT_AC || rows < 1 || rows > layer->desc.ac_max_clusters) return ACMOE_ERR_ARG;
    for (i = 0; i < count; i++)
        if (!(w[i] > 0.0f && w[i] < INFINITY)) return ACMOE_ERR_NONFINITE;
    memcpy(layer->ac_w, w, count * sizeof(float));
    layer->ac_rows = rows;
    layer->ac_ready = 1;
    return ACMOE_OK;
}

/* ---- elementwise pieces ---- */

static float acmoe__gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678f)); }

static float acmoe__gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * 0.70710678f)) + x * 0.39894228f * expf(-0.5f * x * x);
}

static float acmoe__sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* a [rows][d_ff] = act(h [rows][h_width]), one loop per activation; ReLU runs in the
   epilogue of the product that makes h. */
static void acmoe__activate(acmoe_activation act, const float *h, float *a, int rows, int ff) {
    size_t i, n = (size_t)rows * ff;
    int r, c;
    if (act == ACMOE_ACT_GELU) {
        for (i = 0; i < n; i++) a[i] = acmoe__gelu(h[i]);
    } else { /* SwiGLU: the first half of each row gates the second */
        for (r = 0; r < rows; r++) {
            const float *g = h + (size_t)r * 2 * ff, *u = g + ff;
            for (c = 0; c < ff; c++) a[(size_t)r * ff + c] = g[c] * acmoe__sigmoid(g[c]) * u[c];
        }
    }
}

/* dh = da * act'(h), written over h */
static void acmoe__activate_backward(const acmoe__kernel *kern, acmoe_activation act, float *h, const float *da,
                                     int rows, int ff) {
    size_t i, n = (size_t)rows * ff;
    int r, c;
    if (act == ACMOE_ACT_RELU) {
        kern->row_relu(h, h, da, n);
    } else if (act == ACMOE_ACT_GELU) {
        for (i = 0; i < n; i++) h[i] = da[i] * acmoe__gelu_grad(h[i]);
    } else {
        for (r = 0; r < rows; r++) {
            float *g = h + (size_t)r * 2 * ff, *u = g + ff;
            for (c = 0; c < ff; c++) {
                float sg = acmoe__sigmoid(g[c]), silu = g[c] * sg, d = da[(size_t)r * ff + c];
                g[c] = d * u[c] * sg * (1.0f + g[c] * (1.0f - sg));
                u[c] = d * silu;
            }
        }
    }
}

/* Each row of z [rows][e] to its softmax over the row, scaled by 1 / temperature. */
static void acmoe__softmax_rows(const float *z, float *p, int rows, int e, float temperature) {
    int t, j;
    for (t = 0; t < rows; t++) {
        const float *zt = z + (size_t)t * e;
        float *pt = p + (size_t)t * e, top = zt[0], sum = 0.0f;
        for (j = 1; j < e; j++) top = ACMOE__MAX(top, zt[j]);
        for (j = 0; j < e; j++) sum += pt[j] = expf((zt[j] - top) / temperature);
        for (j = 0; j < e; j++) pt[j] /= sum;
    }
}

static int acmoe__count_nonfinite(const float *x, size_t n) {
    size_t i;
    int count = 0;
    for (i = 0; i < n; i++) count += !isfinite(x[i]);
    return count;
}

/* ---- router input and score ---- */

/* Re-projects the embedding rows to norm 1.5 (in place, no gradient, as the reference does
   every forward call) and writes their unit rows. A row already at norm 1.5 up to rounding
   is left alone, so repeated calls on unchanged parameters give the same bits. */
static void acmoe__reproject_embeddings(acmoe_moe *layer) {
    int j, q, dr = layer->dr;
    if (layer->desc.no_reprojection) {
        acmoe__unit_rows(layer->emb, layer->desc.n_experts, dr, layer->ehat, layer->emb_norm);
        return;
    }
    for (j = 0; j < layer->desc.n_experts; j++) {
        float *e = layer->emb + (size_t)j * dr;
        double sq = 0.0, norm;
        for (q = 0; q < dr; q++) sq += (double)e[q] * e[q];
        norm = sqrt(sq);
        if (fabs(norm - 1.5) > 1e-6) {
            const float scale = 1.5f / (float)ACMOE__MAX(norm, 1e-4);
            for (q = 0; q < dr; q++) e[q] *= scale;
        }
        layer->emb_norm[j] = 1.5f;
        for (q = 0; q < dr; q++) layer->ehat[(size_t)j * dr + q] = e[q] / 1.5f;
    }
}

typedef struct acmoe__ac_job {
    acmoe_moe *layer;
    const acmoe__kernel *kern;
    const float *x;
    int n;
    acmoe__ac_blocks blocks; /* by blocks when blocks.partials is set, else by cells */
    int step;
} acmoe__ac_job;

/* The dispersion: a step of it by blocks, or all of it with the cells split across threads. */
static void acmoe__ac_dispersion_job(void *arg, int tid, int n_threads) {
    const acmoe__ac_job *job = (const acmoe__ac_job *)arg;
    acmoe_moe *layer = job->layer;
    if (job->blocks.partials) {
        acmoe__ac_blocks_step(&job->blocks, job->step, tid, n_threads);
        return;
    }
    acmoe__ac_dispersion_part(&layer->desc.ac, job->kern, job->x, job->n, layer->desc.d_model, layer->labels, 1,
                              layer->ac_rows, layer->ac_count, layer->ac_mu, layer->ac_w, tid, n_threads);
}

/* Whether the tokens are normalised before anything else reads them (see acmoe_soft_input). */
static int acmoe__normalized_soft(const acmoe_moe *layer) {
    return layer->desc.router_select == ACMOE_SELECT_SOFT && layer->desc.soft_input == ACMOE_SOFT_NORMALIZED;
}

/* Whether the AC statistics check the layer's input for NaN and infinity as they first read
   it, a block of tokens at a time, sparing the layer a pass over x: AC weights measured on
   this call, in this process, by blocks of tokens (whatever the labels turn out to be). */
static int acmoe__ac_checks_input(const acmoe_moe *layer, acmoe_ctx *ctx, int n) {
    const acmoe_moe_desc *desc = &layer->desc;
    return desc->router_input == ACMOE_INPUT_AC && !acmoe__normalized_soft(layer) &&
           (!layer->ac_frozen || !layer->ac_ready) && !(ctx->desc.comm && ctx->desc.comm->size > 1) &&
           acmoe__ac_by_blocks(n, desc->ac_max_clusters) &&
           acmoe__sum_partials(ctx, ACMOE__AC_BLOCKS, desc->ac_max_clusters, desc->d_model) != NULL;
}

/* The AC statistics of the layer's labels, clusters [0, rows), on the pool's threads; with
   check (acmoe__ac_checks_input), ACMOE_ERR_NONFINITE for an input with a NaN or an infinity,
   found before the layer's counts and weights change. */
static acmoe_status acmoe__ac_layer_statistics(acmoe_moe *layer, acmoe_ctx *ctx, const float *x, int n, int rows,
                                               int check) {
    const int dm = layer->desc.d_model;
    float *partials = acmoe__ac_by_blocks(n, rows) ? acmoe__sum_partials(ctx, ACMOE__AC_BLOCKS, rows, dm) : NULL;
    acmoe__ac_job job;
    int bad = 0;
    job.layer = layer, job.kern = &ctx->kernel, job.x = x, job.n = n, job.step = 0;
    job.blocks = acmoe__ac_blocks_of(&layer->desc.ac, &ctx->kernel, x, n, dm, layer->labels, 1, rows,
                                     layer->ac_count, layer->ac_mu, layer->ac_w, partials);
    job.blocks.bad = check ? &bad : NULL;
    if (partials) { /* step 0 reads only x and the labels */
        acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__ac_dispersion_job, &job);
        if (bad) return ACMOE_ERR_NONFINITE;
        job.step = 1;
    }
    layer->ac_rows = rows;
    acmoe__ac_counts(layer->labels, 1, n, rows, layer->ac_count);
    do
        acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__ac_dispersion_job, &job);
    while (partials && ++job.step < 4);
    return ACMOE_OK;
}

/* The AC weights from statistics over the tokens of every rank of comm: cluster sizes, then
   the means, then the dispersions, each summed over the ranks in rank order. */
static acmoe_status acmoe__ac_global_weights(acmoe_moe *layer, acmoe_comm *comm, const float *x, int n) {
    const int dm = layer->desc.d_model, kc = layer->desc.ac_max_clusters;
    const int variance = layer->desc.ac.dispersion == ACMOE_AC_DISP_VARIANCE;
    float *sizes = layer->ac_w, *mu = layer->ac_mu, *w = layer->ac_w;
    acmoe_status s;
    int t, c, q, rows = 0;
    for (c = 0; c < kc; c++) sizes[c] = 0.0f;
    for (t = 0; t < n; t++) sizes[layer->labels[t]] += 1.0f;
    s = comm->sum(comm, sizes, (size_t)kc);
    for (c = 0; c < kc && s == ACMOE_OK; c++) layer->ac_count[c] = (int)sizes[c], rows = sizes[c] > 0.0f ? c + 1 : rows;
    if (s != ACMOE_OK) return s;
    memset(mu, 0, sizeof(float) * (size_t)rows * dm);
    for (t = 0; t < n; t++)
        for (q = 0; q < dm; q++) mu[(size_t)layer->labels[t] * dm + q] += x[(size_t)t * dm + q];
    if ((s = comm->sum(comm, mu, (size_t)rows * dm)) != ACMOE_OK) return s;
    for (c = 0; c < rows; c++)
        for (q = 0; q < dm && layer->ac_count[c]; q++) mu[(size_t)c * dm + q] /= (float)layer->ac_count[c];
    memset(w, 0, sizeof(float) * (size_t)rows * dm);
    for (t = 0; t < n; t++)
        for (q = 0; q < dm; q++) {
            const float dev = x[(size_t)t * dm + q] - mu[(size_t)layer->labels[t] * dm + q];
            w[(size_t)layer->labels[t] * dm + q] += variance ? dev * dev : fabsf(dev);
        }
    if ((s = comm->sum(comm, w, (size_t)rows * dm)) != ACMOE_OK) return s;
    for (c = 0; c < rows; c++)
        for (q = 0; q < dm && layer->ac_count[c]; q++) w[(size_t)c * dm + q] /= (float)layer->ac_count[c];
    layer->ac_rows = rows;
    acmoe__ac_weights(&layer->desc.ac, w, rows, dm, layer->ac_count);
    return ACMOE_OK;
}

/* AC: labels, the weights W (unless frozen) and, when mixing, each token's mix of its
   previous experts' rows by their gates. */
static acmoe_status acmoe__ac_token_weights(acmoe_moe *layer, acmoe_ctx *ctx, const float *x, int n,
                                            const int32_t *prev_idx, const float *prev_gate, int prev_k) {
    const int dm = layer->desc.d_model;
    int t, s, q, top;
    if (!prev_idx || (layer->desc.ac_mix_labels && !prev_gate)) return ACMOE_ERR_NULL;
    if (prev_k < 1) return ACMOE_ERR_SHAPE;
    top = acmoe__max_label(prev_idx, (size_t)n * prev_k);
    if (top < 0 || top >= layer->desc.ac_max_clusters) return ACMOE_ERR_ARG;
    if (layer->desc.ac_mix_labels && !acmoe__all_finite(prev_gate, (size_t)n * prev_k)) return ACMOE_ERR_NONFINITE;
    for (t = 0; t < n; t++) layer->labels[t] = prev_idx[(size_t)t * prev_k];
    if ((!layer->ac_frozen || !layer->ac_ready) && ctx->desc.comm && ctx->desc.comm->size > 1) {
        const acmoe_status status = acmoe__ac_global_weights(layer, ctx->desc.comm, x, n);
        if (status != ACMOE_OK) return status;
        layer->ac_ready = 1;
    } else if (!layer->ac_frozen || !layer->ac_ready) {
        const acmoe_status status = acmoe__ac_layer_statistics(layer, ctx, x, n, top + 1, acmoe__ac_checks_input(layer, ctx, n));
        if (status != ACMOE_OK) return status;
        acmoe__ac_weights(&layer->desc.ac, layer->ac_w, layer->ac_rows, dm, layer->ac_count);
        layer->ac_ready = 1;
    } else if (top >= layer->ac_rows) {
        return ACMOE_ERR_ARG; /* a frozen W has no row for this cluster */
    }
    for (t = 0; t < n && layer->desc.ac_mix_labels; t++) {
        float *w = layer->wmix + (size_t)t * dm;
        memset(w, 0, sizeof(float) * (size_t)dm);
        for (s = 0; s < prev_k; s++) {
            const float *row = layer->ac_w + (size_t)prev_idx[(size_t)t * prev_k + s] * dm;
            float g = prev_gate[(size_t)t * prev_k + s];
            for (q = 0; q < dm; q++) w[q] += g * row[q];
        }
    }
    return ACMOE_OK;
}

/* Token t's AC feature weights: its cluster's row of W, or the mix of its previous experts'
   rows. */
static const float *acmoe__token_weights(const acmoe_moe *layer, int t) {
    const size_t dm = (size_t)layer->desc.d_model;
    return layer->desc.ac_mix_labels ? layer->wmix + (size_t)t * dm : layer->ac_w + (size_t)layer->labels[t] * dm;
}

/* Rows of the AC tiles: tokens a tile of the router input's gradient (and of u) takes, two
   tiles in each thread's packing space, in widths the micro-kernels cover; 0 when they do not
   fit. */
static int acmoe__ac_input_grad_rows(const acmoe_moe *layer, const acmoe_ctx *ctx) {
    const int dm = layer->desc.d_model, rows = (int)((size_t)ctx->desc.mc * ctx->desc.kc / (2 * (size_t)dm));
    if (layer->desc.router_input != ACMOE_INPUT_AC || dm % 16) return 0;
    return rows < ctx->kernel.mr ? 0 : ACMOE__MIN(rows, 8 * ctx->kernel.mr) / ctx->kernel.mr * ctx->kernel.mr;
}

/* Whether the AC router input u = x * W[label] stays in tiles, never written out to xr: the
   logits and the embeddings' gradient take it a tile of tokens at a time, as the input's
   gradient does. Wants the cosine score, an expert count the micro-kernels' widths cover,
   experts that read x itself, and room for the tiles and for the gradient's partial sums. */
static int acmoe__ac_in_tiles(const acmoe_moe *layer, acmoe_ctx *ctx) {
    const acmoe_moe_desc *desc = &layer->desc;
    return desc->router_score == ACMOE_SCORE_COSINE && !desc->ac_weight_experts && desc->n_experts % 16 == 0 &&
           acmoe__ac_input_grad_rows(layer, ctx) > 0 &&
           acmoe__sum_partials(ctx, ACMOE__AC_BLOCKS, desc->n_experts, desc->d_model) != NULL;
}

/* u = x * W[label] for tokens [t, t + rows) into tile [rows][d]. */
static void acmoe__ac_input_tile(const acmoe_moe *layer, const acmoe__kernel *kern, const float *x, int t, int rows,
                                 float *tile) {
    const size_t dm = (size_t)layer->desc.d_model;
    int r;
    for (r = 0; r < rows; r++)
        kern->row_mul(tile + r * dm, x + (t + r) * dm, acmoe__token_weights(layer, t + r), (int)dm);
}

typedef struct acmoe__weights_job {
    const acmoe_moe *layer;
    const acmoe__kernel *kern;
    const float *x;
    float *out;
    int n, accumulate;
} acmoe__weights_job;

/* x [n][d] times each token's AC weights, added to out or written over it; tokens split
   across threads. */
static void acmoe__times_token_weights_job(void *arg, int tid, int n_threads) {
    const acmoe__weights_job *job = (const acmoe__weights_job *)arg;
    const acmoe_moe *layer = job->layer;
    const float *x = job->x;
    float *out = job->out;
    const int dm = layer->desc.d_model, accumulate = job->accumulate;
    int t, t1 = (int)((long)job->n * (tid + 1) / n_threads);
    for (t = (int)((long)job->n * tid / n_threads); t < t1; t++) {
        if (accumulate)
            job->kern->row_mul_add(out + (size_t)t * dm, x + (size_t)t * dm, acmoe__token_weights(layer, t), dm);
        else
            acmoe__ac_input_tile(layer, job->kern, x, t, 1, out + (size_t)t * dm);
    }
}

static void acmoe__times_token_weights(const acmoe_moe *layer, acmoe_ctx *ctx, const float *x, int n, float *out,
                                       int accumulate) {
    acmoe__weights_job job;
    job.layer = layer, job.kern = &ctx->kernel, job.x = x, job.out = out, job.n = n, job.accumulate = accumulate;
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__times_token_weights_job, &job);
}

/* The router input u [n][dr]: x itself, x R^T, or x * W[label]; for normalised Soft MoE the
   same of x / |x|. */
static acmoe_status acmoe__router_input(acmoe_moe *layer, acmoe_ctx *ctx, const float *x, int n, const int32_t *prev_idx,
                                        const float *prev_gate, int prev_k, const float **u) {
    const acmoe_moe_desc *desc = &layer->desc;
    acmoe_status s;
    if (acmoe__normalized_soft(layer)) {
        acmoe__unit_rows(x, n, desc->d_model, layer->uhat, layer->u_norm);
        x = layer->uhat;
    }
    *u = x;
    layer->u_in_tiles = 0;
    if (desc->router_input == ACMOE_INPUT_PROJECTED) {
        *u = layer->xr;
        return acmoe_matmul(ctx, ACMOE_NT, n, desc->proj_dim, desc->d_model, x, desc->d_model, layer->proj, desc->d_model, layer->xr,
                            desc->proj_dim, 0);
    }
    if (desc->router_input != ACMOE_INPUT_AC) return ACMOE_OK;
    s = acmoe__ac_token_weights(layer, ctx, x, n, prev_idx, prev_gate, prev_k);
    if (s != ACMOE_OK) return s;
    layer->u_in_tiles = acmoe__ac_in_tiles(layer, ctx);
    if (!layer->u_in_tiles) acmoe__times_token_weights(layer, ctx, x, n, layer->xr, 0);
    *u = layer->u_in_tiles ? x : layer->xr; /* in tiles, the score reads x and W */
    return ACMOE_OK;
}

/* Gradients through u = x / |x|: (du - u (u . du)) / |x|, added to g or written over it
   (g may be du). */
static void acmoe__unit_rows_backward(const float *unit, const float *norm, const float *du, int rows, int w,
                                      float *g, int accumulate) {
    int r, q;
    for (r = 0; r < rows; r++) {
        const float *u = unit + (size_t)r * w, *dr = du + (size_t)r * w;
        float *gr = g + (size_t)r * w, dot = 0.0f;
        for (q = 0; q < w; q++) dot += u[q] * dr[q];
        for (q = 0; q < w; q++) gr[q] = (accumulate ? gr[q] : 0.0f) + (dr[q] - u[q] * dot) / norm[r];
    }
}

typedef struct acmoe__ac_logits_job {
    acmoe_moe *layer;
    acmoe_ctx *ctx;
    const float *x;
    int tile_rows;
} acmoe__ac_logits_job;

/* The logits of thread tid's tokens, a tile of u at a time times ehat^T: each element the
   chain of multiply-adds the product over xr would make. */
static void acmoe__ac_logits_job_run(void *arg, int tid, int n_threads) {
    const acmoe__ac_logits_job *job = (const acmoe__ac_logits_job *)arg;
    acmoe_moe *layer = job->layer;
    const int dm = layer->desc.d_model, e = layer->desc.n_experts;
    float *tile = job->ctx->ws[tid].pack_a; /* free between products */
    const int t0 = (int)((long)layer->n * tid / n_threads), t1 = (int)((long)layer->n * (tid + 1) / n_threads);
    int t, rows;
    for (t = t0; t < t1; t += rows) {
        rows = ACMOE__MIN(job->tile_rows, t1 - t);
        acmoe__ac_input_tile(layer, &job->ctx->kernel, job->x, t, rows, tile);
        acmoe__small_product(&job->ctx->kernel, rows, e, dm, tile, dm, 1, layer->ehat_t, e, layer->logits + (size_t)t * e, e, 0);
    }
}

/* AC logits with u in tiles (acmoe__ac_in_tiles), from x. */
static void acmoe__ac_tile_logits(acmoe_moe *layer, acmoe_ctx *ctx, const float *x) {
    const int dm = layer->desc.d_model, e = layer->desc.n_experts;
    acmoe__ac_logits_job job;
    acmoe__transpose(ctx->kernel.isa, layer->ehat_t, e, layer->ehat, dm, e, dm);
    job.layer = layer, job.ctx = ctx, job.x = x, job.tile_rows = acmoe__ac_input_grad_rows(layer, ctx);
    acmoe__pool_run(&ctx->pool, acmoe__threads_for(ctx, (double)layer->n * dm * e), acmoe__ac_logits_job_run, &job);
}

/* Logits [n][lw] of the router input u. */
static acmoe_status acmoe__router_score(acmoe_moe *layer, acmoe_ctx *ctx, const float *u, int n) {
    const acmoe_moe_desc *desc = &layer->desc;
    acmoe_status s;
    if (desc->router_score == ACMOE_SCORE_SLOT) {
        size_t i;
        if (!acmoe__normalized_soft(layer)) acmoe__unit_rows(u, n, layer->dr, layer->uhat, layer->u_norm);
        layer->score_in = acmoe__normalized_soft(layer) ? u : layer->uhat; /* weighted rows stay as they are */
        acmoe__unit_rows(layer->phi, layer->lw, layer->dr, layer->ehat, layer->emb_norm);
        s = acmoe_matmul(ctx, ACMOE_NT, n, layer->lw, layer->dr, layer->score_in, layer->dr, layer->ehat, layer->dr, layer->logits, layer->lw, 0);
        for (i = 0; i < (size_t)n * layer->lw; i++) layer->logits[i] *= *layer->phi_scale;
        return s;
    }
    if (desc->router_score == ACMOE_SCORE_NONE) { /* the one expert's logit */
        memset(layer->logits, 0, sizeof(float) * (size_t)n);
        return ACMOE_OK;
    }
    if (desc->router_score == ACMOE_SCORE_LINEAR) {
        s = acmoe_matmul(ctx, ACMOE_NT, n, desc->n_experts, layer->dr, u, layer->dr, layer->wr, layer->dr, layer->logits, desc->n_experts, 0);
        if (s == ACMOE_OK && layer->br) acmoe__add_bias(&ctx->kernel, layer->logits, n, desc->n_experts, layer->br);
        return s;
    }
    acmoe__reproject_embeddings(layer);
    if (layer->u_in_tiles) {
        acmoe__ac_tile_logits(layer, ctx, u);
        return ACMOE_OK;
    }
    return acmoe_matmul(ctx, ACMOE_NT, n, desc->n_experts, layer->dr, u, layer->dr, layer->ehat, layer->dr, layer->logits, desc->n_experts, 0);
}

/* ---- selection: (token, expert, gate) pairs in (token, rank) order ---- */

static void acmoe__add_pair(acmoe_moe *layer, int t, int j, int rank, float gate) {
    int p = layer->n_pairs++;
    layer->pair_token[p] = t;
    layer->pair_expert[p] = j;
    layer->pair_rank[p] = rank;
    layer->pair_gate[p] = gate;
}

/* Top-k and Switch: the k best experts of each token. With a capacity, each expert takes
   pairs rank by rank, in token order, until it is full; the rest are dropped. */
static void acmoe__select_per_token(acmoe_moe *layer, int n) {
    const int e = layer->desc.n_experts, k = layer->desc.top_k, switch_gate = layer->desc.router_select == ACMOE_SELECT_SWITCH;
    int t, s, cap = layer->desc.capacity > 0.0f ? (int)ceil((double)layer->desc.capacity * n * k / e) : n * k;
    int *keep = layer->mark; /* [n][k] */
    memset(layer->count, 0, sizeof(int) * (size_t)e);
    for (s = 0; s < k; s++)
        for (t = 0; t < n; t++) {
            int j = layer->top_idx[(size_t)t * k + s];
            keep[(size_t)t * k + s] = layer->count[j] < cap;
            layer->count[j] += keep[(size_t)t * k + s];
        }
    layer->n_pairs = layer->dropped = 0;
    for (t = 0; t < n; t++)
        for (s = 0; s < k; s++) {
            int j = layer->top_idx[(size_t)t * k + s];
            if (!keep[(size_t)t * k + s]) {
                layer->dropped++;
                continue;
            }
            acmoe__add_pair(layer, t, j, s, switch_gate ? layer->probs[(size_t)t * e + j] : layer->top_gate[(size_t)t * k + s]);
        }
}

static int acmoe__candidate_order(const void *x, const void *y) {
    const acmoe__candidate *a = (const acmoe__candidate *)x, *b = (const acmoe__candidate *)y;
    if (a->key != b->key) return a->key > b->key ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

/* Marks the best `budget` of count candidates (indices into mark). */
static void acmoe__mark_best(acmoe__candidate *cand, int count, int budget, int *mark) {
    int i;
    qsort(cand, (size_t)count, sizeof *cand, acmoe__candidate_order);
    for (i = 0; i < budget && i < count; i++) mark[cand[i].index] = 1;
}

/* Pairs of the marked (token, expert) entries, each token's by descending gate. */
static void acmoe__pairs_from_marks(acmoe_moe *layer, int n, const float *gate_of) {
    const int e = layer->desc.n_experts;
    int t, j, c;
    layer->n_pairs = layer->dropped = 0;
    for (t = 0; t < n; t++) {
        int chosen = 0;
        for (j = 0; j < e; j++)
            if (layer->mark[(size_t)t * e + j]) {
                layer->cand[chosen].key = gate_of[(size_t)t * e + j];
                layer->cand[chosen++].index = j;
            }
        qsort(layer->cand, (size_t)chosen, sizeof *layer->cand, acmoe__candidate_order);
        for (c = 0; c < chosen; c++) acmoe__add_pair(layer, t, layer->cand[c].index, c, gate_of[(size_t)t * e + layer->cand[c].index]);
    }
}

/* Tokens of group g: (first, stride, count) for the group rule. */
static int acmoe__group(const acmoe_moe *layer, int n, int g, int *first, int *stride) {
    int len = layer->desc.seq_len;
    switch (layer->desc.group) {
    case ACMOE_GROUP_SEQUENCE: *first = g * len, *stride = 1; return g * len < n ? len : 0;
    case ACMOE_GROUP_POSITION: *first = g, *stride = len; return g < len ? n / len : 0;
    default: *first = 0, *stride = 1; return g == 0 ? n : 0;
    }
}

/* USMoE: w = (1 - rho) p + rho (2/E) sigmoid(z); the top round(budget |G|) pairs of each
   group by w, gate w. */
static void acmoe__select_usmoe(acmoe_moe *layer, int n) {
    const int e = layer->desc.n_experts;
    const float rho = layer->desc.usmoe_rho;
    float *w = layer->dz; /* forward scratch: the unified scores */
    int g, i, j, first, stride, size;
    size_t x;
    for (x = 0; x < (size_t)n * e; x++) {
        layer->sig[x] = acmoe__sigmoid(layer->logits[x]);
        w[x] = (1.0f - rho) * layer->probs[x] + rho * (2.0f / (float)e) * layer->sig[x];
    }
    memset(layer->mark, 0, sizeof(int) * (size_t)n * e);
    for (g = 0; (size = acmoe__group(layer, n, g, &first, &stride)) > 0; g++) {
        int count = 0, budget = (int)floor((double)layer->desc.usmoe_budget * size + 0.5);
        for (i = 0; i < size; i++)
            for (j = 0; j < e; j++) {
                int index = (first + i * stride) * e + j;
                layer->cand[count].key = w[index];
                layer->cand[count++].index = index;
            }
        acmoe__mark_best(layer->cand, count, budget, layer->mark);
    }
    acmoe__pairs_from_marks(layer, n, w);
}

/* Expert choice: expert j takes its ceil(capacity n / E) best tokens by probability. */
static void acmoe__select_expert_choice(acmoe_moe *layer, int n) {
    const int e = layer->desc.n_experts;
    int j, t, c = (int)ACMOE__MIN(ceil((double)layer->desc.capacity * n / e), (double)n);
    memset(layer->mark, 0, sizeof(int) * (size_t)n * e);
    for (j = 0; j < e; j++) {
        for (t = 0; t < n; t++) {
            layer->cand[t].key = layer->probs[(size_t)t * e + j];
            layer->cand[t].index = t * e + j;
        }
        acmoe__mark_best(layer->cand, n, c, layer->mark);
    }
    acmoe__pairs_from_marks(layer, n, layer->probs);
}

static int acmoe__label_pair_order(const void *x, const void *y) {
    const acmoe__candidate *a = (const acmoe__candidate *)x, *b = (const acmoe__candidate *)y;
    if (a->index != b->index) return a->index < b->index ? -1 : 1;
    return (a->key > b->key) - (a->key < b->key);
}

/* The sum of the squared lengths of the runs of equal keys in order (sorted) keys. */
static double acmoe__squared_runs(const acmoe__candidate *pairs, int n, int by_both) {
    double sum = 0.0;
    int i, run = 1;
    for (i = 1; i <= n; i++) {
        if (i < n && pairs[i].index == pairs[i - 1].index && (!by_both || pairs[i].key == pairs[i - 1].key)) {
            run++;
            continue;
        }
        sum += (double)run * run;
        run = 1;
    }
    return sum;
}

/* The sums of squared counts of the tokens per previous expert and per pair (previous expert,
   expert here), from a table of the pair counts in the layer's candidate scratch when the
   previous experts' indices fit it (else from the pairs sorted): 0 when they fit. */
static int acmoe__pair_counts(acmoe_moe *layer, int n, const int32_t *prev_idx, int prev_k, double *same_prev,
                              double *same_both) {
    const int e = layer->desc.n_experts;
    const size_t room = (size_t)layer->desc.max_tokens * e * sizeof(acmoe__candidate) / sizeof(int);
    int *counts = (int *)(void *)layer->cand, top = 0, t, p, j;
    for (t = 0; t < n; t++) {
        const int32_t prev = prev_idx[(size_t)t * prev_k];
        if (prev < 0 || (size_t)prev >= room / (size_t)e) return 1;
        top = ACMOE__MAX(top, prev);
    }
    memset(counts, 0, sizeof(int) * (size_t)(top + 1) * e);
    for (t = 0; t < n; t++) counts[(size_t)prev_idx[(size_t)t * prev_k] * e + layer->top_idx[(size_t)t * layer->label_k]]++;
    *same_prev = *same_both = 0.0;
    for (p = 0; p <= top; p++) {
        double row = 0.0;
        for (j = 0; j < e; j++) {
            const double count = counts[(size_t)p * e + j];
            row += count, *same_both += count * count;
        }
        *same_prev += row * row;
    }
    return 0;
}

/* Updates the running router stability from the previous layer's best experts and this
   layer's: the pairs that differ are those same in one layer only, so with the counts of
   tokens per previous expert, per expert here and per pair of both, differ = sum of the
   first squared + sum of the second squared - 2 x sum of the third squared. */
static void acmoe__update_stability(acmoe_moe *layer, int n, const int32_t *prev_idx, int prev_k) {
    acmoe__candidate *pairs = layer->cand; /* scratch once the selection is done */
    double same_prev, same_here, same_both;
    int t, j;
    if (!prev_idx || prev_k < 1 || n < 1) return;
    if (acmoe__pair_counts(layer, n, prev_idx, prev_k, &same_prev, &same_both)) {
        for (t = 0; t < n; t++) { /* (previous expert, expert here): here is exact in a float */
            pairs[t].index = prev_idx[(size_t)t * prev_k];
            pairs[t].key = (float)layer->top_idx[(size_t)t * layer->label_k];
        }
        qsort(pairs, (size_t)n, sizeof *pairs, acmoe__label_pair_order);
        same_prev = acmoe__squared_runs(pairs, n, 0);
        same_both = acmoe__squared_runs(pairs, n, 1);
    }
    memset(layer->cursor, 0, sizeof(int) * (size_t)layer->desc.n_experts); /* scratch once the dispatch is done */
    for (t = 0; t < n; t++) layer->cursor[layer->top_idx[(size_t)t * layer->label_k]]++;
    for (same_here = 0.0, j = 0; j < layer->desc.n_experts; j++) same_here += (double)layer->cursor[j] * layer->cursor[j];
    layer->router_stability = 0.8f * layer->router_stability +
                          0.2f * (float)((same_prev + same_here - 2.0 * same_both) / ((double)n * n));
}

/* The logits the priority rule selects by: with noise in training, the logits plus gate_noise
   / E times a normal draw, drawn token by token in order from the layer's generator. */
static void acmoe__noisy_logits(acmoe_moe *layer, int n) {
    const int e = layer->desc.n_experts;
    const size_t count = (size_t)n * e;
    const float deviation = layer->desc.gate_noise / (float)e;
    size_t i;
    if (!layer->training || !layer->noise_rng || layer->desc.gate_noise == 0.0f) {
        memcpy(layer->noisy, layer->logits, sizeof(float) * count);
        return;
    }
    for (i = 0; i < count; i++) layer->noisy[i] = layer->logits[i] + deviation * acmoe_rng_normal(layer->noise_rng);
}

/* Swin-MoE's (Tutel's) batch-prioritised capacity: every assignment of a token to its r-th
   expert takes the next place of that expert, the tokens in the order of their best
   probability (ties to the lower index) and rank by rank, whether it fits or not; those at
   places past k x floor(capacity x ceil(n / E)) are dropped. */
static void acmoe__select_priority(acmoe_moe *layer, int n) {
    const int e = layer->desc.n_experts, k = layer->desc.top_k;
    const int cap = k * (int)((double)layer->desc.capacity * (double)((n + e - 1) / e));
    int *keep = layer->mark, *place = layer->cursor; /* [n][k]; [E], scratch before the dispatch */
    int i, s, t;
    for (t = 0; t < n; t++) {
        layer->cand[t].key = layer->probs[(size_t)t * e + layer->top_idx[(size_t)t * k]];
        layer->cand[t].index = t;
    }
    qsort(layer->cand, (size_t)n, sizeof *layer->cand, acmoe__candidate_order);
    memset(place, 0, sizeof(int) * (size_t)e);
    for (s = 0; s < k; s++)
        for (i = 0; i < n; i++) {
            t = layer->cand[i].index;
            keep[(size_t)t * k + s] = place[layer->top_idx[(size_t)t * k + s]]++ < cap;
        }
    layer->n_pairs = layer->dropped = 0;
    for (t = 0; t < n; t++)
        for (s = 0; s < k; s++) {
            const int j = layer->top_idx[(size_t)t * k + s];
            if (keep[(size_t)t * k + s]) acmoe__add_pair(layer, t, j, s, layer->probs[(size_t)t * e + j]);
            else layer->dropped++;
        }
}

static void acmoe__token_range(const acmoe_moe *layer, int tid, int n_threads, int *t0, int *t1) {
    *t0 = (int)((long)layer->n * tid / n_threads);
    *t1 = (int)((long)layer->n * (tid + 1) / n_threads);
}

typedef struct acmoe__topk_job {
    const acmoe__kernel *kern;
    acmoe_moe *layer;
    const float *logits;
} acmoe__topk_job;

/* Each token's top k of its logits, tokens split across threads. */
static void acmoe__topk_job_run(void *arg, int tid, int n_threads) {
    const acmoe__topk_job *job = (const acmoe__topk_job *)arg;
    acmoe_moe *layer = job->layer;
    const int e = layer->desc.n_experts, k = layer->desc.top_k;
    int t0, t1;
    acmoe__token_range(layer, tid, n_threads, &t0, &t1);
    acmoe__topk_softmax(job->kern, job->logits + (size_t)t0 * e, t1 - t0, e, k, layer->top_idx + (size_t)t0 * k,
                        layer->top_gate + (size_t)t0 * k);
}

/* Top k of the layer's n tokens' logits. */
static void acmoe__topk(acmoe_moe *layer, acmoe_ctx *ctx, const float *logits) {
    acmoe__topk_job job;
    job.kern = &ctx->kernel, job.layer = layer, job.logits = logits;
    acmoe__pool_run(&ctx->pool, acmoe__threads_for(ctx, (double)layer->n * layer->desc.n_experts * layer->desc.top_k),
                    acmoe__topk_job_run, &job);
}

/* Top-k by score for the next layer, then the pairs of the selection rule. */
static void acmoe__select(acmoe_moe *layer, acmoe_ctx *ctx, int n) {
    const acmoe_router_select rule = layer->desc.router_select;
    if (rule == ACMOE_SELECT_SOFT) { /* no pairs; acmoe__soft_dispatch_job makes the weights */
        layer->n_groups = acmoe__group_count(&layer->desc, n);
        layer->n_pairs = layer->dropped = 0;
        return;
    }
    if (rule == ACMOE_SELECT_PRIORITY) { /* by the noisy probabilities: the next layer's labels too */
        acmoe__noisy_logits(layer, n);
        acmoe__topk(layer, ctx, layer->noisy);
        acmoe__softmax_rows(layer->noisy, layer->probs, n, layer->desc.n_experts, 1.0f);
        acmoe__select_priority(layer, n);
        return;
    }
    acmoe__topk(layer, ctx, layer->logits);
    /* full softmax: the gates of the other rules */
    if (rule != ACMOE_SELECT_TOPK) acmoe__softmax_rows(layer->logits, layer->probs, n, layer->desc.n_experts, 1.0f);
    if (rule == ACMOE_SELECT_USMOE) acmoe__select_usmoe(layer, n);
    else if (rule == ACMOE_SELECT_EXPERT_CHOICE) acmoe__select_expert_choice(layer, n);
    else acmoe__select_per_token(layer, n);
}

/* ---- auxiliary losses ---- */

/* var(v) / (mean(v)^2 + 1e-10) over the E experts (unbiased variance, as torch.var), and
   its gradient with respect to each v_j in grad. */
static float acmoe__spread(const double *v, int e, double *grad) {
    double mean = 0.0, var = 0.0, denom;
    int j;
    for (j = 0; j < e; j++) mean += v[j];
    mean /= e;
    for (j = 0; j < e; j++) var += (v[j] - mean) * (v[j] - mean);
    var /= e - 1;
    denom = mean * mean + 1e-10;
    for (j = 0; j < e; j++) grad[j] = (2.0 * (v[j] - mean) / (e - 1) * denom - var * 2.0 * mean / e) / (denom * denom);
    return (float)(var / denom);
}

/* Tutel's load and importance loss, weight (l_imp + l_load) / 2: importance_j the sum of the
   noise-free probabilities P_tj, load_j the sum of Phi((P_tj - threshold_t) / sigma) with
   sigma = gate_noise / E and threshold_t the noisy logit of token t's k-th choice (as
   Tutel's losses.py compares them). With grad, adds its logit gradients to dz. The sums
   are in double, so the result does not depend on the thread count. */
static float acmoe__importance_loss(acmoe_moe *layer, int n, int grad) {
    const int e = layer->desc.n_experts, k = layer->desc.top_k;
    const double sigma = (double)layer->desc.gate_noise / e, weight = 0.5 * (double)layer->desc.importance_loss;
    double importance[ACMOE__MAX_AUX_EXPERTS], load[ACMOE__MAX_AUX_EXPERTS];
    double d_importance[ACMOE__MAX_AUX_EXPERTS], d_load[ACMOE__MAX_AUX_EXPERTS];
    float *p = layer->clean_probs, loss;
    int t, j;
    acmoe__softmax_rows(layer->logits, p, n, e, 1.0f);
    memset(importance, 0, sizeof(double) * (size_t)e);
    memset(load, 0, sizeof(double) * (size_t)e);
    for (t = 0; t < n; t++) {
        const double threshold = layer->noisy[(size_t)t * e + layer->top_idx[(size_t)t * k + k - 1]];
        for (j = 0; j < e; j++) {
            importance[j] += p[(size_t)t * e + j];
            load[j] += 0.5 * erfc(-((double)p[(size_t)t * e + j] - threshold) / (sigma * sqrt(2.0)));
        }
    }
    loss = (float)weight * (acmoe__spread(importance, e, d_importance) + acmoe__spread(load, e, d_load));
    for (t = 0; grad && t < n; t++) {
        const double threshold = layer->noisy[(size_t)t * e + layer->top_idx[(size_t)t * k + k - 1]];
        float *dz = layer->dz + (size_t)t * e, gp[ACMOE__MAX_AUX_EXPERTS];
        const float *pt = p + (size_t)t * e;
        double dthreshold = 0.0, mean = 0.0;
        for (j = 0; j < e; j++) {
            const double u = ((double)pt[j] - threshold) / sigma;
            const double density = exp(-0.5 * u * u) / (sigma * sqrt(2.0 * 3.141592653589793));
            gp[j] = (float)(weight * (d_importance[j] + d_load[j] * density));
            dthreshold -= weight * d_load[j] * density;
            mean += (double)pt[j] * gp[j];
        }
        for (j = 0; j < e; j++) dz[j] += pt[j] * (float)(gp[j] - mean); /* through the softmax */
        dz[layer->top_idx[(size_t)t * k + k - 1]] += (float)dthreshold;   /* the noise is a constant */
    }
    return loss;
}

/* Balance loss alpha E sum_j f_j P_j, f_j the share of pairs expert j got (a constant) and
   P_j the mean of softmax(z / T); and the z-loss beta mean_t logsumexp(z_t)^2. With grad,
   adds their logit gradients to dz instead of returning the value. */
static float acmoe__aux_loss(acmoe_moe *layer, int n, int grad) {
    const acmoe_moe_desc *desc = &layer->desc;
    const int e = desc->n_experts;
    float loss = 0.0f;
    int t, j;
    if (desc->balance_alpha > 0.0f && layer->n_pairs > 0) {
        acmoe__softmax_rows(layer->logits, layer->balance_q, n, e, desc->balance_temperature);
        for (t = 0; t < n; t++) {
            const float *qt = layer->balance_q + (size_t)t * e;
            float mean = 0.0f;
            for (j = 0; j < e; j++) {
                float c = desc->balance_alpha * e * ((float)layer->count[j] / (float)layer->n_pairs) / (float)n;
                loss += c * qt[j];
                mean += qt[j] * c;
            }
            for (j = 0; grad && j < e; j++) {
                float c = desc->balance_alpha * e * ((float)layer->count[j] / (float)layer->n_pairs) / (float)n;
                layer->dz[(size_t)t * e + j] += qt[j] * (c - mean) / desc->balance_temperature;
            }
        }
    }
    if (desc->z_loss > 0.0f) {
        for (t = 0; t < n; t++) {
            const float *zt = layer->logits + (size_t)t * e;
            float top = zt[0], sum = 0.0f, lse;
            for (j = 1; j < e; j++) top = ACMOE__MAX(top, zt[j]);
            for (j = 0; j < e; j++) sum += expf(zt[j] - top);
            lse = top + logf(sum);
            loss += desc->z_loss * lse * lse / (float)n;
            for (j = 0; grad && j < e; j++) layer->dz[(size_t)t * e + j] += 2.0f * desc->z_loss / (float)n * lse * expf(zt[j] - lse);
        }
    }
    if (desc->importance_loss > 0.0f) loss += acmoe__importance_loss(layer, n, grad);
    return loss;
}

/* ---- experts ---- */

/* Counting sort of the pairs by expert, in pair order within each expert; and where each
   token's pairs start (pairs come in token order). Soft MoE: each expert's rows are its
   slots of each group in turn. */
static void acmoe__dispatch(acmoe_moe *layer) {
    const int e = layer->desc.n_experts;
    int p, j, t = 0;
    if (layer->desc.router_select == ACMOE_SELECT_SOFT) {
        for (j = 0; j <= e; j++) layer->offset[j] = j * layer->n_groups * layer->desc.soft_slots;
        for (j = 0; j < e; j++) layer->count[j] = layer->n_groups * layer->desc.soft_slots;
        return;
    }
    for (p = 0; p < layer->n_pairs; p++)
        while (t <= layer->pair_token[p]) layer->token_start[t++] = p;
    while (t <= layer->n) layer->token_start[t++] = layer->n_pairs;
    memset(layer->count, 0, sizeof(int) * (size_t)e);
    for (p = 0; p < layer->n_pairs; p++) layer->count[layer->pair_expert[p]]++;
    layer->offset[0] = 0;
    for (j = 0; j < e; j++) layer->offset[j + 1] = layer->offset[j] + layer->count[j], layer->cursor[j] = layer->offset[j];
    for (p = 0; p < layer->n_pairs; p++) {
        int slot = layer->cursor[layer->pair_expert[p]]++;
        layer->pair_slot[p] = slot;
        layer->slot_pair[slot] = p;
    }
}

/* The work of one forward or backward call, split across the context's threads: experts
   taken in turn (acmoe__order_rows), tokens in equal ranges. Each expert runs on one
   thread with that thread's matmul workspace, so results do not depend on the split. */
typedef struct acmoe__moe_job {
    acmoe_moe *layer;
    acmoe_ctx *ctx;
    const float *x, *dout;
    float *out, *dx;
    acmoe__expert_rows rows; /* the experts' jobs: the rows they run on */
    int gather;              /* ... gathered first from the pairs' tokens (else already there) */
    int next;                /* the next expert of rows.order */
} acmoe__moe_job;

/* The experts by decreasing row count (ties: the lower index): threads take them in this
   order, so the largest start first and the small ones fill the gaps. */
static void acmoe__order_rows(acmoe__expert_rows *rows, int n_experts) {
    int i, j;
    for (i = 0; i < n_experts; i++) {
        for (j = i; j > 0 && rows->count[rows->order[j - 1]] < rows->count[i]; j--) rows->order[j] = rows->order[j - 1];
        rows->order[j] = i;
    }
}

/* The rows of this process's pairs (or Soft MoE's slots). */
static acmoe__expert_rows acmoe__local_rows(acmoe_moe *layer) {
    acmoe__expert_rows rows;
    rows.count = layer->count, rows.offset = layer->offset, rows.order = layer->order;
    rows.xe = layer->xe, rows.h = layer->h, rows.a = layer->a, rows.ye = layer->ye;
    return rows;
}

/* About the multiply-adds of one pass over the experts' rows (acmoe__threads_for). */
static double acmoe__experts_work(const acmoe_moe *layer, const acmoe__expert_rows *rows) {
    double pairs = 0.0;
    int e;
    for (e = 0; e < layer->desc.n_experts; e++) pairs += rows->count[e];
    return 2.0 * pairs * layer->desc.d_model * layer->desc.d_ff;
}

/* The experts' input rows: x, or x * W[label] when the AC weights reach the experts; for
   normalised Soft MoE the rows the score read. */
static const float *acmoe__expert_input(const acmoe_moe *layer, const float *x) {
    if (acmoe__normalized_soft(layer)) return layer->score_in;
    return layer->desc.router_input == ACMOE_INPUT_AC && layer->desc.ac_weight_experts ? layer->xr : x;
}

/* Row r of expert j's input: its pair's token, or (Soft MoE) its slot's row. */
static const float *acmoe__expert_row(const acmoe_moe *layer, const float *in, int j, int r) {
    const size_t dm = (size_t)layer->desc.d_model;
    const int per = layer->desc.soft_slots;
    if (layer->desc.router_select == ACMOE_SELECT_SOFT) /* group r / per, slot r % per */
        return layer->slots + ((size_t)(r / per) * layer->lw + (size_t)j * per + r % per) * dm;
    return in + (size_t)layer->pair_token[layer->slot_pair[layer->offset[j] + r]] * dm;
}

/* Rows ahead that are fetched early where rows are read out of order: expert rows in token
   order (combining), or tokens' rows in expert order (gathering). */
#define ACMOE__PAIRS_AHEAD 4

/* Fetches a row of n floats, a cache line at a time. */
static void acmoe__prefetch_row(const float *row, size_t n) {
    size_t c;
    for (c = 0; c < n; c += 16) ACMOE__PREFETCH_READ(row + c);
}

/* Expert j's rows of this process, gathered into xe. */
static void acmoe__expert_gather(const acmoe_moe *layer, int j, const float *in) {
    const size_t dm = (size_t)layer->desc.d_model;
    float *xe = layer->xe + (size_t)layer->offset[j] * dm;
    int r;
    for (r = 0; r < layer->count[j]; r++) {
        if (r + ACMOE__PAIRS_AHEAD < layer->count[j])
            acmoe__prefetch_row(acmoe__expert_row(layer, in, j, r + ACMOE__PAIRS_AHEAD), dm);
        memcpy(xe + (size_t)r * dm, acmoe__expert_row(layer, in, j, r), sizeof(float) * dm);
    }
}

/* Expert j's activations: for ReLU written over its pre-activations h (the backward pass's
   mask h > 0 is the same as act(h) > 0, so h need not be kept), else in block->a. */
static float *acmoe__expert_activations(const acmoe_moe *layer, const acmoe__expert_rows *block, int j) {
    const size_t at = (size_t)block->offset[j];
    if (layer->desc.activation == ACMOE_ACT_RELU) return block->h + at * layer->h_width;
    return block->a + at * layer->desc.d_ff;
}

/* ye = W2 act(W1 xe + b1) + b2 on expert j's gathered rows. */
static void acmoe__expert_forward(acmoe_moe *layer, acmoe_ctx *ctx, int tid, const acmoe__expert_rows *block, int j) {
    const acmoe_moe_desc *desc = &layer->desc;
    const int dm = desc->d_model, ff = desc->d_ff, hw = layer->h_width, rows = block->count[j];
    const size_t at = (size_t)block->offset[j];
    float *xe = block->xe + at * dm, *h = block->h + at * hw, *ye = block->ye + at * dm;
    float *a = acmoe__expert_activations(layer, block, j);
    acmoe__epilogue first, second;
    acmoe__bias_epilogue(&first, layer->b1 + (size_t)j * hw);
    if (a == h) first.relu = h, first.ld_relu = hw;
    ACMOE__MATMUL_ON_THREAD_THEN(ctx, tid, ACMOE_NT, rows, hw, dm, xe, dm, layer->w1 + (size_t)j * hw * dm, dm, h, hw,
                                 0, &first);
    if (a != h) acmoe__activate(desc->activation, h, a, rows, ff);
    ACMOE__MATMUL_ON_THREAD_THEN(ctx, tid, ACMOE_NT, rows, dm, ff, a, ff, layer->w2 + (size_t)j * dm * ff, ff, ye, dm,
                                 0, acmoe__bias_epilogue(&second, layer->b2 + (size_t)j * dm));
}

static void acmoe__experts_forward_job(void *arg, int tid, int n_threads) {
    acmoe__moe_job *job = (acmoe__moe_job *)arg;
    acmoe_moe *layer = job->layer;
    int i;
    (void)n_threads;
    while ((i = acmoe__next_item(&job->next)) < layer->desc.n_experts) {
        const int j = job->rows.order[i];
        if (!job->rows.count[j]) continue;
        if (job->gather) acmoe__expert_gather(layer, j, acmoe__expert_input(layer, job->x));
        acmoe__expert_forward(layer, job->ctx, tid, &job->rows, j);
    }
}

/* Every expert's rows of this process gathered, for expert parallelism. */
static void acmoe__gather_job(void *arg, int tid, int n_threads) {
    acmoe__moe_job *job = (acmoe__moe_job *)arg;
    int i;
    (void)tid, (void)n_threads;
    while ((i = acmoe__next_item(&job->next)) < job->layer->desc.n_experts)
        acmoe__expert_gather(job->layer, job->layer->order[i], acmoe__expert_input(job->layer, job->x));
}

/* Fetches the expert row of pair p + ACMOE__PAIRS_AHEAD (if any) in rows of dm floats. */
static void acmoe__prefetch_pair_row(const acmoe_moe *layer, const float *rows, int p) {
    const size_t dm = (size_t)layer->desc.d_model;
    if (p + ACMOE__PAIRS_AHEAD < layer->n_pairs)
        acmoe__prefetch_row(rows + (size_t)layer->pair_slot[p + ACMOE__PAIRS_AHEAD] * dm, dm);
}

/* out[t] = sum of gate * expert output over t's pairs, in order. */
static void acmoe__combine_job(void *arg, int tid, int n_threads) {
    acmoe__moe_job *job = (acmoe__moe_job *)arg;
    const acmoe_moe *layer = job->layer;
    const int dm = layer->desc.d_model;
    int t, t0, t1, p;
    acmoe__token_range(layer, tid, n_threads, &t0, &t1);
    for (t = t0; t < t1; t++) {
        float *o = job->out + (size_t)t * dm;
        memset(o, 0, sizeof(float) * (size_t)dm);
        for (p = layer->token_start[t]; p < layer->token_start[t + 1]; p++) {
            const float *y = layer->ye + (size_t)layer->pair_slot[p] * dm;
            float g = layer->pair_gate[p];
            acmoe__prefetch_pair_row(layer, layer->ye, p);
            job->ctx->kernel.row_axpy(o, y, dm, g);
        }
    }
}

/* ---- Soft MoE: each group's products run on one thread, groups split across threads ---- */

/* Copies group g's slot rows from the experts' blocks into the group's block of slots (rows
   in slot order), or back. */
static void acmoe__soft_copy(const acmoe_moe *layer, int g, float *expert_rows, int to_slots) {
    const size_t dm = (size_t)layer->desc.d_model, bytes = sizeof(float) * dm * (size_t)layer->desc.soft_slots;
    const int per = layer->desc.soft_slots;
    int j;
    for (j = 0; j < layer->desc.n_experts; j++) {
        float *e = expert_rows + (size_t)(layer->offset[j] + g * per) * dm;
        float *s = layer->slots + ((size_t)g * layer->lw + (size_t)j * per) * dm;
        memcpy(to_slots ? s : e, to_slots ? e : s, bytes);
    }
}

/* One group's weights from the logits: the combine weights (each token's softmax over the
   slots), the dispatch weights (each slot's softmax over the group's tokens), and for the
   next layer each token's label_k best slots by logit, as their experts and the softmax
   over their logits. */
static void acmoe__soft_weights(acmoe_moe *layer, int first, int stride, int size) {
    const int S = layer->lw, per = layer->desc.soft_slots, k = layer->label_k;
    int i, j, c;
    for (c = 0; c < S; c++) {
        float top = -INFINITY, sum = 0.0f;
        for (i = 0; i < size; i++) top = ACMOE__MAX(top, layer->logits[(size_t)(first + i * stride) * S + c]);
        for (i = 0; i < size; i++) {
            size_t at = (size_t)(first + i * stride) * S + c;
            sum += layer->dispatch[at] = expf(layer->logits[at] - top);
        }
        for (i = 0; i < size; i++) layer->dispatch[(size_t)(first + i * stride) * S + c] /= sum;
    }
    for (i = 0; i < size; i++) {
        const size_t t = (size_t)(first + i * stride);
        acmoe__softmax_rows(layer->logits + t * S, layer->probs + t * S, 1, S, 1.0f);
        acmoe__topk_softmax(NULL, layer->logits + t * S, 1, S, k, layer->top_idx + t * k, layer->top_gate + t * k);
        for (j = 0; j < k; j++) layer->top_idx[t * k + (size_t)j] /= per; /* a slot's label is its expert */
    }
}

/* Each group's weights, then its slots: dispatch weights^T times the experts' input rows. */
static void acmoe__soft_dispatch_job(void *arg, int tid, int n_threads) {
    acmoe__moe_job *job = (acmoe__moe_job *)arg;
    acmoe_moe *layer = job->layer;
    const int S = layer->lw, dm = layer->desc.d_model;
    const float *in = acmoe__expert_input(layer, job->x);
    int g, first, stride, size;
    for (g = tid; g < layer->n_groups; g += n_threads) {
        size = acmoe__group(layer, layer->n, g, &first, &stride);
        acmoe__soft_weights(layer, first, stride, size);
        ACMOE__MATMUL_ON_THREAD(job->ctx, tid, ACMOE_TN, S, dm, size, layer->dispatch + (size_t)first * S, stride * S,
                                in + (size_t)first * dm, stride * dm, layer->slots + (size_t)g * S * dm, dm, 0);
    }
}

/* Each group's output: combine weights times the slot outputs. */
static void acmoe__soft_combine_job(void *arg, int tid, int n_threads) {
    acmoe__moe_job *job = (acmoe__moe_job *)arg;
    const acmoe_moe *layer = job->layer;
    const int S = layer->lw, dm = layer->desc.d_model;
    int g, first, stride, size;
    for (g = tid; g < layer->n_groups; g += n_threads) {
        size = acmoe__group(layer, layer->n, g, &first, &stride);
        acmoe__soft_copy(layer, g, layer->ye, 1);
        ACMOE__MATMUL_ON_THREAD(job->ctx, tid, ACMOE_NN, size, dm, S, layer->probs + (size_t)first * S, stride * S,
                                layer->slots + (size_t)g * S * dm, dm, job->out + (size_t)first * dm, stride * dm, 0);
    }
}

/* dz = the combine weights' logit gradients (each row a softmax backward of dout . slot
   outputs); then the slot outputs' gradients, combine^T dout, into the experts' rows. */
static void acmoe__soft_combine_backward_job(void *arg, int tid, int n_threads) {
    acmoe__moe_job *job = (acmoe__moe_job *)arg;
    acmoe_moe *layer = job->layer;
    const acmoe__kernel *kern = &job->ctx->kernel;
    const int S = layer->lw, dm = layer->desc.d_model;
    int g, i, first, stride, size;
    for (g = tid; g < layer->n_groups; g += n_threads) {
        float *slots = layer->slots + (size_t)g * S * dm;
        size = acmoe__group(layer, layer->n, g, &first, &stride);
        ACMOE__MATMUL_ON_THREAD(job->ctx, tid, ACMOE_NT, size, S, dm, job->dout + (size_t)first * dm, stride * dm,
                                slots, dm, layer->dz + (size_t)first * S, stride * S, 0);
        for (i = 0; i < size; i++) {
            const float *p = layer->probs + (size_t)(first + i * stride) * S;
            float *dz = layer->dz + (size_t)(first + i * stride) * S;
            kern->row_softmax_grad(dz, p, S, kern->row_dot(p, dz, S), 1.0f);
        }
        ACMOE__MATMUL_ON_THREAD(job->ctx, tid, ACMOE_TN, S, dm, size, layer->probs + (size_t)first * S, stride * S,
                                job->dout + (size_t)first * dm, stride * dm, slots, dm, 0);
        acmoe__soft_copy(layer, g, layer->ye, 0);
    }
}

/* From the slots' input gradients: dz += the dispatch weights' logit gradients (each slot a
   softmax backward over its group of x . slot gradient), and the experts' input gradients,
   dispatch times the slot gradients, added to dx (or written to dxr, to go through the AC
   weights). */
static void acmoe__soft_dispatch_backward_job(void *arg, int tid, int n_threads) {
    acmoe__moe_job *job = (acmoe__moe_job *)arg;
    acmoe_moe *layer = job->layer;
    const int S = layer->lw, dm = layer->desc.d_model;
    const float *in = acmoe__expert_input(layer, layer->x);
    float *din = in == layer->x ? job->dx : acmoe__normalized_soft(layer) ? layer->du : layer->dxr;
    int g, i, c, first, stride, size;
    for (g = tid; g < layer->n_groups; g += n_threads) {
        float *slots = layer->slots + (size_t)g * S * dm;
        size = acmoe__group(layer, layer->n, g, &first, &stride);
        acmoe__soft_copy(layer, g, layer->xe, 1);
        ACMOE__MATMUL_ON_THREAD(job->ctx, tid, ACMOE_NT, size, S, dm, in + (size_t)first * dm, stride * dm, slots, dm,
                                layer->ddispatch + (size_t)first * S, stride * S, 0);
        for (c = 0; c < S; c++) {
            float dot = 0.0f;
            for (i = 0; i < size; i++) {
                size_t at = (size_t)(first + i * stride) * S + c;
                dot += layer->dispatch[at] * layer->ddispatch[at];
            }
            for (i = 0; i < size; i++) {
                size_t at = (size_t)(first + i * stride) * S + c;
                layer->dz[at] += layer->dispatch[at] * (layer->ddispatch[at] - dot);
            }
        }
        ACMOE__MATMUL_ON_THREAD(job->ctx, tid, ACMOE_NN, size, dm, S, layer->dispatch + (size_t)first * S, stride * S, slots,
                                dm, din + (size_t)first * dm, stride * dm, din == job->dx);
    }
}

/* ---- expert parallelism: experts split over ranks, their rows exchanged ---- */

static void acmoe__experts_backward_job(void *arg, int tid, int n_threads);

/* Tells each rank how many of this rank's pairs go to each of its experts, and lays out the
   rows this rank's experts receive: expert by expert, each expert's in rank order, so that
   an expert sees its rows in the order one process with every rank's tokens (rank 0's
   first) would give them. */
static acmoe_status acmoe__ep_plan(acmoe_moe *layer) {
    acmoe_comm *comm = layer->ranks;
    const int e = layer->desc.n_experts, size = comm->size, per = e / size, first = acmoe__first_expert(layer, comm->rank);
    const size_t dm = (size_t)layer->desc.d_model;
    float *sent = layer->ep_counts, *got = sent + e;
    acmoe_status s;
    int q, j;
    for (j = 0; j < e; j++) sent[j] = (float)layer->count[j]; /* exact: counts stay far below 2^24 */
    for (q = 0; q < size; q++) layer->ep_send[q] = layer->ep_recv[q] = (size_t)per;
    if ((s = comm->exchange(comm, sent, layer->ep_send, got, layer->ep_recv)) != ACMOE_OK) return s;
    memset(layer->owned.count, 0, sizeof(int) * (size_t)e);
    for (q = 0; q < size; q++) {
        size_t rows = 0;
        for (j = 0; j < per; j++) layer->owned.count[first + j] += (int)got[q * per + j], rows += (size_t)got[q * per + j];
        layer->ep_recv[q] = rows * dm;
        layer->ep_send[q] = (size_t)(layer->offset[(q + 1) * per] - layer->offset[q * per]) * dm;
    }
    layer->owned.offset[0] = 0;
    for (j = 0; j < e; j++) layer->owned.offset[j + 1] = layer->owned.offset[j] + layer->owned.count[j];
    acmoe__order_rows(&layer->owned, e);
    return ACMOE_OK;
}

/* Moves the received rows between the stage (rank by rank) and an owned buffer (expert by
   expert). */
static void acmoe__ep_reorder(acmoe_moe *layer, float *owned_rows, int to_owned) {
    const int e = layer->desc.n_experts, size = layer->ranks->size, per = e / size;
    const int first = acmoe__first_expert(layer, layer->ranks->rank);
    const size_t dm = (size_t)layer->desc.d_model;
    const float *got = layer->ep_counts + e;
    size_t at = 0;
    int q, j;
    for (j = 0; j < per; j++) layer->ep_cursor[j] = layer->owned.offset[first + j];
    for (q = 0; q < size; q++)
        for (j = 0; j < per; j++) {
            const size_t rows = (size_t)got[q * per + j];
            float *stage = layer->ep_stage + at * dm, *own = owned_rows + (size_t)layer->ep_cursor[j] * dm;
            memcpy(to_owned ? own : stage, to_owned ? stage : own, sizeof(float) * rows * dm);
            layer->ep_cursor[j] += (int)rows, at += rows;
        }
}

/* This rank's rows (laid out by expert, so each owner's are contiguous) to their owners. */
static acmoe_status acmoe__ep_to_owners(acmoe_moe *layer, const float *local, float *owned_rows) {
    acmoe_status s = layer->ranks->exchange(layer->ranks, local, layer->ep_send, layer->ep_stage, layer->ep_recv);
    if (s == ACMOE_OK) acmoe__ep_reorder(layer, owned_rows, 1);
    return s;
}

/* ... and the owners' results back, each row to where it came from. */
static acmoe_status acmoe__ep_from_owners(acmoe_moe *layer, float *owned_rows, float *local) {
    acmoe__ep_reorder(layer, owned_rows, 0);
    return layer->ranks->exchange(layer->ranks, layer->ep_stage, layer->ep_recv, local, layer->ep_send);
}

/* The experts' forward pass: on this process's rows, or (expert parallelism) on the rows
   every rank sends this rank's experts, their outputs sent back. */
static acmoe_status acmoe__experts_forward(acmoe_moe *layer, acmoe_ctx *ctx, acmoe__moe_job *job) {
    acmoe_status s;
    job->rows = acmoe__local_rows(layer), job->gather = 1, job->next = 0;
    acmoe__order_rows(&job->rows, layer->desc.n_experts);
    if (!layer->ranks) {
        acmoe__pool_run(&ctx->pool, acmoe__threads_for(ctx, acmoe__experts_work(layer, &job->rows)),
                        acmoe__experts_forward_job, job);
        return ACMOE_OK;
    }
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__gather_job, job);
    s = acmoe__ep_plan(layer);
    if (s == ACMOE_OK) s = acmoe__ep_to_owners(layer, layer->xe, layer->owned.xe);
    if (s != ACMOE_OK) return s;
    job->rows = layer->owned, job->gather = 0, job->next = 0;
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__experts_forward_job, job);
    return acmoe__ep_from_owners(layer, layer->owned.ye, layer->ye);
}

/* The experts' backward pass from the output gradients in ye; the input gradients of this
   process's rows end in xe. */
static acmoe_status acmoe__experts_backward(acmoe_moe *layer, acmoe_ctx *ctx, acmoe__moe_job *job) {
    acmoe_status s;
    job->rows = layer->ranks ? layer->owned : acmoe__local_rows(layer), job->next = 0;
    if (!layer->ranks) {
        acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__experts_backward_job, job);
        return ACMOE_OK;
    }
    if ((s = acmoe__ep_to_owners(layer, layer->ye, layer->owned.ye)) != ACMOE_OK) return s;
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__experts_backward_job, job);
    return acmoe__ep_from_owners(layer, layer->owned.xe, layer->xe);
}

ACMOE_API acmoe_status acmoe_moe_forward(acmoe_moe *layer, acmoe_ctx *ctx, const float *x, int n,
                                         const int32_t *prev_idx, const float *prev_gate, int prev_k,
                                         float *out) {
    const acmoe_moe_desc *resolved;
    const float *u;
    acmoe_status s;
    acmoe__moe_job job;
    double mark;
    int soft;
    if (!layer || !ctx) return ACMOE_ERR_NULL;
    resolved = &layer->desc;
    soft = resolved->router_select == ACMOE_SELECT_SOFT;
    if (n < 0 || n > resolved->max_tokens) return ACMOE_ERR_SHAPE;
    if (acmoe__grouped(resolved) && resolved->group != ACMOE_GROUP_BATCH && (resolved->seq_len < 1 || n % resolved->seq_len))
        return ACMOE_ERR_SHAPE; /* groups need whole sequences */
    if (soft && (double)acmoe__group_count(resolved, n) * layer->lw > layer->max_pairs)
        return ACMOE_ERR_SHAPE; /* more slot rows than the workspace made at creation holds */
    if (n > 0 && (!x || !out)) return ACMOE_ERR_NULL;
    if (!acmoe__ac_checks_input(layer, ctx, n) && !acmoe__all_finite_on_pool(ctx, x, (size_t)n * resolved->d_model))
        return ACMOE_ERR_NONFINITE;
    layer->x = x;
    layer->n = n;
    layer->cached = 0; /* no backward until this call succeeds */
    layer->n_pairs = layer->dropped = 0;
    layer->aux_loss = 0.0f;
    layer->seconds_routing = layer->seconds_experts = 0.0;
    if (n == 0) return ACMOE_OK;
    mark = acmoe__clock_start(ctx);
    s = acmoe__router_input(layer, ctx, x, n, prev_idx, prev_gate, prev_k, &u);
    if (s == ACMOE_OK) s = acmoe__router_score(layer, ctx, u, n);
    if (s != ACMOE_OK) return s;
    layer->nonfinite = acmoe__count_nonfinite(layer->logits, (size_t)n * layer->lw);
    if (layer->nonfinite) acmoe__replace_nonfinite(layer->logits, (size_t)n * layer->lw);
    acmoe__select(layer, ctx, n);
    acmoe__dispatch(layer);
    layer->aux_loss = acmoe__aux_loss(layer, n, 0);
    acmoe__lap(ctx, &mark, &layer->seconds_routing);
    job.layer = layer, job.ctx = ctx, job.x = x, job.out = out, job.dout = NULL, job.dx = NULL, job.next = 0;
    if (soft) acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__soft_dispatch_job, &job);
    if ((s = acmoe__experts_forward(layer, ctx, &job)) != ACMOE_OK) return s;
    acmoe__pool_run(&ctx->pool, soft ? ctx->desc.n_threads : acmoe__threads_for(ctx, (double)n * layer->desc.d_model),
                    soft ? acmoe__soft_combine_job : acmoe__combine_job, &job);
    acmoe__update_stability(layer, n, prev_idx, prev_k); /* Soft MoE's labels come with its weights */
    acmoe__lap(ctx, &mark, &layer->seconds_experts);
    layer->cached = 1;
    return ACMOE_OK;
}

/* pair_dgate = <dout[t], expert output>; then the expert outputs become their gradients,
   gate * dout[t]. */
static void acmoe__combine_backward_job(void *arg, int tid, int n_threads) {
    acmoe__moe_job *job = (acmoe__moe_job *)arg;
    acmoe_moe *layer = job->layer;
    const int dm = layer->desc.d_model;
    int t0, t1, p;
    acmoe__token_range(layer, tid, n_threads, &t0, &t1);
    memset(job->dx + (size_t)t0 * dm, 0, sizeof(float) * (size_t)(t1 - t0) * dm); /* the sums dx gathers start here */
    for (p = layer->token_start[t0]; p < layer->token_start[t1]; p++) {
        const float *g = job->dout + (size_t)layer->pair_token[p] * dm;
        float *y = layer->ye + (size_t)layer->pair_slot[p] * dm, gate = layer->pair_gate[p];
        acmoe__prefetch_pair_row(layer, layer->ye, p);
        layer->pair_dgate[p] = job->ctx->kernel.row_dot(g, y, dm);
        job->ctx->kernel.row_scale(y, g, dm, gate);
    }
}

/* Expert j's backward on its gathered rows: parameter gradients, and the rows' input
   gradients written over xe. */
static void acmoe__expert_backward(acmoe_moe *layer, acmoe_ctx *ctx, int tid, const acmoe__expert_rows *block, int j) {
    const acmoe_moe_desc *desc = &layer->desc;
    const int dm = desc->d_model, ff = desc->d_ff, hw = layer->h_width, rows = block->count[j];
    const size_t at = (size_t)block->offset[j];
    float *dy = block->ye + at * dm, *a = block->a + at * ff, *h = block->h + at * hw, *xe = block->xe + at * dm;
    const float *w1 = layer->w1 + (size_t)j * hw * dm, *w2 = layer->w2 + (size_t)j * dm * ff;
    acmoe__epilogue relu_grad;
    acmoe__bias_grad(&ctx->kernel, dy, rows, dm, layer->g_b2 + (size_t)j * dm);
    ACMOE__MATMUL_ON_THREAD(ctx, tid, ACMOE_TN, dm, ff, rows, dy, dm, acmoe__expert_activations(layer, block, j), ff,
                            layer->g_w2 + (size_t)j * dm * ff, ff, 1);
    if (desc->activation == ACMOE_ACT_RELU && dm <= ctx->desc.kc) { /* dh straight over h, and b1's gradient */
        memset(&relu_grad, 0, sizeof relu_grad);
        relu_grad.relu_grad = 1, relu_grad.column_sums = layer->g_b1 + (size_t)j * hw;
        ACMOE__MATMUL_ON_THREAD_THEN(ctx, tid, ACMOE_NN, rows, ff, dm, dy, dm, w2, ff, h, hw, 0, &relu_grad);
    } else {
        ACMOE__MATMUL_ON_THREAD(ctx, tid, ACMOE_NN, rows, ff, dm, dy, dm, w2, ff, a, ff, 0); /* da */
        acmoe__activate_backward(&ctx->kernel, desc->activation, h, a, rows, ff); /* h becomes dh */
        acmoe__bias_grad(&ctx->kernel, h, rows, hw, layer->g_b1 + (size_t)j * hw);
    }
    ACMOE__MATMUL_ON_THREAD(ctx, tid, ACMOE_TN, hw, dm, rows, h, hw, xe, dm, layer->g_w1 + (size_t)j * hw * dm, dm, 1);
    ACMOE__MATMUL_ON_THREAD(ctx, tid, ACMOE_NN, rows, dm, hw, h, hw, w1, dm, xe, dm, 0); /* dxe */
}

static void acmoe__experts_backward_job(void *arg, int tid, int n_threads) {
    acmoe__moe_job *job = (acmoe__moe_job *)arg;
    acmoe_moe *layer = job->layer;
    int i;
    (void)n_threads;
    while ((i = acmoe__next_item(&job->next)) < layer->desc.n_experts) {
        const int j = job->rows.order[i];
        if (job->rows.count[j]) acmoe__expert_backward(layer, job->ctx, tid, &job->rows, j);
    }
}

/* dx[t] += the input gradients of t's rows, in pair order (times W[label] when the AC
   weights reached the experts). */
static void acmoe__scatter_job(void *arg, int tid, int n_threads) {
    acmoe__moe_job *job = (acmoe__moe_job *)arg;
    const acmoe_moe *layer = job->layer;
    const int dm = layer->desc.d_model, weighted = acmoe__expert_input(layer, layer->x) != layer->x;
    int t0, t1, p;
    acmoe__token_range(layer, tid, n_threads, &t0, &t1);
    for (p = layer->token_start[t0]; p < layer->token_start[t1]; p++) {
        const float *g = layer->xe + (size_t)layer->pair_slot[p] * dm;
        size_t row = (size_t)layer->pair_token[p] * dm;
        const float *w = weighted ? acmoe__token_weights(layer, layer->pair_token[p]) : NULL;
        acmoe__prefetch_pair_row(layer, layer->xe, p);
        if (w)
            job->ctx->kernel.row_mul_add(job->dx + row, g, w, dm);
        else
            job->ctx->kernel.row_axpy(job->dx + row, g, dm, 1.0f);
    }
}

/* dz [n][E] from the pair gate gradients, by the selection rule's gate function. */
static void acmoe__gate_backward(acmoe_moe *layer) {
    const int e = layer->desc.n_experts, k = layer->desc.top_k, n = layer->n;
    const acmoe_router_select rule = layer->desc.router_select;
    float *G = layer->dz; /* first the gate gradients, dense; then, row by row, the logit gradients */
    int t, s, j, p;
    memset(G, 0, sizeof(float) * (size_t)n * e);
    for (p = 0; p < layer->n_pairs; p++) G[(size_t)layer->pair_token[p] * e + layer->pair_expert[p]] = layer->pair_dgate[p];
    for (t = 0; t < n; t++) {
        float *gt = G + (size_t)t * e, mean = 0.0f;
        const float *pt = layer->probs + (size_t)t * e;
        if (rule == ACMOE_SELECT_TOPK) { /* softmax over the k selected logits */
            const int32_t *it = layer->top_idx + (size_t)t * k;
            const float *g = layer->top_gate + (size_t)t * k;
            for (s = 0; s < k; s++) mean += g[s] * gt[it[s]];
            for (s = 0; s < k; s++) gt[it[s]] = g[s] * (gt[it[s]] - mean);
            continue;
        }
        for (j = 0; j < e; j++) mean += pt[j] * gt[j];
        for (j = 0; j < e; j++) {
            float full = pt[j] * (gt[j] - mean), sig; /* the full softmax */
            if (rule != ACMOE_SELECT_USMOE) {
                gt[j] = full;
                continue;
            }
            sig = layer->sig[(size_t)t * e + j];
            gt[j] = (1.0f - layer->desc.usmoe_rho) * full + layer->desc.usmoe_rho * (2.0f / (float)e) * sig * (1.0f - sig) * gt[j];
        }
    }
}


static acmoe_status acmoe__router_input_backward(acmoe_moe *layer, acmoe_ctx *ctx, float *dx);

/* The slot score's gradients from dz [n][lw]: the scale's and the slot vectors' (through
   their normalisation), and in dxr the gradient of the rows it read. */
static acmoe_status acmoe__slot_score_backward(acmoe_moe *layer, acmoe_ctx *ctx) {
    const int n = layer->n, S = layer->lw, dr = layer->dr;
    const float scale = *layer->phi_scale;
    float dscale = 0.0f;
    size_t i;
    acmoe_status s = acmoe_matmul(ctx, ACMOE_NN, n, dr, S, layer->dz, S, layer->ehat, dr, layer->dxr, dr, 0);
    if (s == ACMOE_OK) s = acmoe_matmul(ctx, ACMOE_TN, S, dr, n, layer->dz, S, layer->score_in, dr, layer->dehat, dr, 0);
    if (s != ACMOE_OK) return s;
    for (i = 0; i < (size_t)n * dr; i++) { /* sum of dz * (score / scale) = sum over tokens of (dz ehat) . row */
        dscale += layer->dxr[i] * layer->score_in[i];
        layer->dxr[i] *= scale;
    }
    *layer->g_phi_scale += dscale;
    for (i = 0; i < (size_t)S * dr; i++) layer->dehat[i] *= scale;
    acmoe__unit_rows_backward(layer->ehat, layer->emb_norm, layer->dehat, S, dr, layer->g_phi, 1);
    return ACMOE_OK;
}

/* Normalised Soft MoE: the gradients of the rows the score read (dxr) and the slots mixed
   (du) are one gradient, which goes back through the AC weights (constants) and the
   normalisation into dx. */
static void acmoe__normalized_input_backward(acmoe_moe *layer, acmoe_ctx *ctx, float *dx) {
    const int n = layer->n, dm = layer->desc.d_model;
    const size_t count = (size_t)n * dm;
    size_t i;
    for (i = 0; i < count; i++) layer->du[i] += layer->dxr[i];
    if (layer->desc.router_input == ACMOE_INPUT_AC) acmoe__times_token_weights(layer, ctx, layer->du, n, layer->dxr, 0);
    acmoe__unit_rows_backward(layer->uhat, layer->u_norm, layer->desc.router_input == ACMOE_INPUT_AC ? layer->dxr : layer->du, n, dm, dx, 1);
}

/* AC input, scored against the expert embeddings: dx += (dz ehat) * W[label], a tile of
   rows at a time, so dz ehat (the router input's gradient) is never written out. Each
   element has the bits of the product and the pass it replaces. With u in tiles, the same
   tiles give the embeddings' gradient dz^T u, summed by ACMOE__AC_BLOCKS fixed blocks of
   tokens into partials (added in block order after the job, the same bits on any thread
   count); the tokens go by those blocks either way. */
typedef struct acmoe__ac_input_grad_job {
    acmoe_moe *layer;
    acmoe_ctx *ctx;
    float *dx;
    float *partials; /* with u in tiles: ACMOE__AC_BLOCKS x n_experts x d; else NULL */
    int tile_rows;
} acmoe__ac_input_grad_job;

static void acmoe__ac_input_grad_job_run(void *arg, int tid, int n_threads) {
    const acmoe__ac_input_grad_job *job = (const acmoe__ac_input_grad_job *)arg;
    const acmoe_moe *layer = job->layer;
    const acmoe__kernel *kern = &job->ctx->kernel;
    const int dm = layer->desc.d_model, e = layer->desc.n_experts;
    float *tile = job->ctx->ws[tid].pack_a, *u = tile + (size_t)job->tile_rows * dm; /* free between products */
    int b, b0, b1, t, t1, r, rows;
    acmoe__thread_blocks(tid, n_threads, ACMOE__AC_BLOCKS, &b0, &b1);
    for (b = b0; b < b1; b++) {
        float *part = job->partials ? job->partials + (size_t)b * e * dm : NULL;
        if (part) memset(part, 0, sizeof(float) * (size_t)e * dm);
        t1 = acmoe__block_row(layer->n, b + 1, ACMOE__AC_BLOCKS);
        for (t = acmoe__block_row(layer->n, b, ACMOE__AC_BLOCKS); t < t1; t += rows) {
            const float *dz = layer->dz + (size_t)t * e;
            rows = ACMOE__MIN(job->tile_rows, t1 - t);
            acmoe__small_product(kern, rows, dm, e, dz, e, 1, layer->ehat, dm, tile, dm, 0);
            for (r = 0; r < rows; r++)
                kern->row_mul_add(job->dx + (size_t)(t + r) * dm, tile + (size_t)r * dm,
                                  acmoe__token_weights(layer, t + r), dm);
            if (!part) continue;
            acmoe__ac_input_tile(layer, kern, layer->x, t, rows, u);
            acmoe__small_product(kern, e, dm, rows, dz, 1, e, u, dm, part, dm, 1);
        }
    }
}

/* The fused AC input gradient; with partials (u in tiles), dehat too. */
static void acmoe__ac_input_grad(acmoe_moe *layer, acmoe_ctx *ctx, float *dx, int tile_rows, float *partials) {
    const int dm = layer->desc.d_model, e = layer->desc.n_experts;
    acmoe__ac_input_grad_job job;
    job.layer = layer, job.ctx = ctx, job.dx = dx, job.partials = partials, job.tile_rows = tile_rows;
    acmoe__pool_run(&ctx->pool, acmoe__threads_for(ctx, (double)layer->n * dm * e), acmoe__ac_input_grad_job_run, &job);
    if (!partials) return;
    memset(layer->dehat, 0, sizeof(float) * (size_t)e * dm);
    acmoe__add_partials(&ctx->kernel, layer->dehat, partials, ACMOE__AC_BLOCKS, e * dm, (size_t)e * dm);
}

/* Router parameter gradients, and the router's part of dx (added to dx). */
static acmoe_status acmoe__router_backward(acmoe_moe *layer, acmoe_ctx *ctx, float *dx) {
    const acmoe_moe_desc *desc = &layer->desc;
    const int n = layer->n, e = desc->n_experts, dr = layer->dr;
    const int direct = desc->router_input == ACMOE_INPUT_TOKEN; /* du is dx's share itself */
    const float *u = direct ? layer->x : layer->xr, *scorer = desc->router_score == ACMOE_SCORE_LINEAR ? layer->wr : layer->ehat;
    float *du = direct ? dx : layer->dxr;
    acmoe_status s;
    int tile_rows;
    if (desc->router_score == ACMOE_SCORE_NONE) return ACMOE_OK;
    if (desc->router_score == ACMOE_SCORE_SLOT) {
        s = acmoe__slot_score_backward(layer, ctx);
        if (s != ACMOE_OK) return s;
        if (acmoe__normalized_soft(layer)) {
            acmoe__normalized_input_backward(layer, ctx, dx);
            return ACMOE_OK;
        }
        acmoe__unit_rows_backward(layer->uhat, layer->u_norm, layer->dxr, n, dr, du, direct);
        return direct ? ACMOE_OK : acmoe__router_input_backward(layer, ctx, dx);
    }
    if (layer->u_in_tiles && !acmoe__ac_in_tiles(layer, ctx)) { /* another context than the forward pass's */
        acmoe__times_token_weights(layer, ctx, layer->x, n, layer->xr, 0);
        layer->u_in_tiles = 0;
    }
    if (layer->u_in_tiles) {
        acmoe__ac_input_grad(layer, ctx, dx, acmoe__ac_input_grad_rows(layer, ctx),
                             acmoe__sum_partials(ctx, ACMOE__AC_BLOCKS, e, dr));
        acmoe__unit_rows_backward(layer->ehat, layer->emb_norm, layer->dehat, e, dr, layer->g_emb, 1);
        return ACMOE_OK;
    }
    if (desc->router_score == ACMOE_SCORE_LINEAR) {
        if (layer->br) acmoe__bias_grad(&ctx->kernel, layer->dz, n, e, layer->g_br);
        s = acmoe_matmul(ctx, ACMOE_TN, e, dr, n, layer->dz, e, u, dr, layer->g_wr, dr, 1);
    } else {
        s = acmoe_matmul(ctx, ACMOE_TN, e, dr, n, layer->dz, e, u, dr, layer->dehat, dr, 0);
        if (s == ACMOE_OK) acmoe__unit_rows_backward(layer->ehat, layer->emb_norm, layer->dehat, e, dr, layer->g_emb, 1);
    }
    if (s == ACMOE_OK && !direct && scorer == layer->ehat && (tile_rows = acmoe__ac_input_grad_rows(layer, ctx))) {
        acmoe__ac_input_grad(layer, ctx, dx, tile_rows, NULL);
        return ACMOE_OK;
    }
    if (s == ACMOE_OK) s = acmoe_matmul(ctx, ACMOE_NN, n, dr, e, layer->dz, e, scorer, dr, du, dr, direct);
    if (s != ACMOE_OK || direct) return s;
    return acmoe__router_input_backward(layer, ctx, dx);
}

/* dx += the gradient of the router input u (in dxr) through the projection or the AC
   weights (a constant). */
static acmoe_status acmoe__router_input_backward(acmoe_moe *layer, acmoe_ctx *ctx, float *dx) {
    const acmoe_moe_desc *desc = &layer->desc;
    const int n = layer->n, dm = desc->d_model, dr = layer->dr;
    acmoe_status s;
    if (desc->router_input == ACMOE_INPUT_PROJECTED) {
        s = acmoe_matmul(ctx, ACMOE_TN, dr, dm, n, layer->dxr, dr, layer->x, dm, layer->g_proj, dm, 1);
        return s == ACMOE_OK ? acmoe_matmul(ctx, ACMOE_NN, n, dm, dr, layer->dxr, dr, layer->proj, dm, dx, dm, 1) : s;
    }
    acmoe__times_token_weights(layer, ctx, layer->dxr, n, dx, 1); /* AC: W is a constant */
    return ACMOE_OK;
}

/* Soft MoE's backward pass: the combine weights and the slot outputs' gradients, the
   experts, the dispatch weights and the input's gradients, then the router with both
   softmaxes' logit gradients. */
static acmoe_status acmoe__soft_backward(acmoe_moe *layer, acmoe_ctx *ctx, const float *dout, float *dx) {
    acmoe__moe_job job;
    acmoe_status s;
    double mark = acmoe__clock_start(ctx);
    job.layer = layer, job.ctx = ctx, job.x = layer->x, job.out = NULL, job.dout = dout, job.dx = dx, job.next = 0;
    memset(dx, 0, sizeof(float) * (size_t)layer->n * layer->desc.d_model);
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__soft_combine_backward_job, &job);
    acmoe__experts_backward(layer, ctx, &job); /* in this process: never fails */
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__soft_dispatch_backward_job, &job);
    if (!acmoe__normalized_soft(layer) && acmoe__expert_input(layer, layer->x) != layer->x)
        acmoe__times_token_weights(layer, ctx, layer->dxr, layer->n, dx, 1);
    acmoe__lap(ctx, &mark, &layer->seconds_experts);
    s = acmoe__router_backward(layer, ctx, dx);
    acmoe__lap(ctx, &mark, &layer->seconds_routing);
    layer->cached = 0;
    return s;
}

ACMOE_API acmoe_status acmoe_moe_backward(acmoe_moe *layer, acmoe_ctx *ctx, const float *dout, float *dx) {
    acmoe__moe_job job;
    acmoe_status s;
    double mark;
    if (!layer || !ctx) return ACMOE_ERR_NULL;
    if (layer->n == 0) return ACMOE_OK;
    if (!layer->cached) return ACMOE_ERR_ARG; /* no successful forward call since the last backward */
    if (!dout || !dx) return ACMOE_ERR_NULL;
    if (layer->desc.router_select == ACMOE_SELECT_SOFT) return acmoe__soft_backward(layer, ctx, dout, dx);
    mark = acmoe__clock_start(ctx);
    job.layer = layer, job.ctx = ctx, job.x = layer->x, job.out = NULL, job.dout = dout, job.dx = dx, job.next = 0;
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__combine_backward_job, &job);
    acmoe__lap(ctx, &mark, &layer->seconds_experts);
    acmoe__gate_backward(layer);
    acmoe__aux_loss(layer, layer->n, 1);
    s = acmoe__router_backward(layer, ctx, dx);
    acmoe__lap(ctx, &mark, &layer->seconds_routing);
    if (s == ACMOE_OK || layer->ranks) { /* the other ranks wait for this one's rows */
        acmoe_status experts = acmoe__experts_backward(layer, ctx, &job);
        if (s == ACMOE_OK) s = experts;
        if (s == ACMOE_OK) acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__scatter_job, &job);
    }
    acmoe__lap(ctx, &mark, &layer->seconds_experts);
    layer->cached = 0; /* backward overwrote the cached activations */
    return s;
}

/* Why the layer's route of a token depends on the other tokens of the call (so that a token
   cannot be decoded alone), or NULL when it does not. */
static const char *acmoe__moe_not_per_token(const acmoe_moe *layer) {
    if (acmoe__grouped(&layer->desc)) return "it routes groups of tokens together";
    if (layer->desc.router_select == ACMOE_SELECT_EXPERT_CHOICE) return "its experts choose among the call's tokens";
    if (layer->desc.capacity > 0.0f) return "its capacity limit counts the call's tokens";
    if (layer->desc.router_input == ACMOE_INPUT_AC && !layer->ac_ready)
        return "it has no AC weights: run a forward pass (or load a checkpoint saved after one), then call "
               "acmoe_lm_freeze_ac_weights";
    if (layer->desc.router_input == ACMOE_INPUT_AC && !layer->ac_frozen)
        return "its AC weights are not frozen: call acmoe_lm_freeze_ac_weights";
    return NULL;
}

/* The tokens per sequence of the next calls, which sequence and position groups follow;
   the model sets it for each call (a Swin stage has its own). */
static void acmoe__moe_set_seq_len(acmoe_moe *layer, int seq_len) { layer->desc.seq_len = seq_len; }

/* The bytes of the layer's workspace, and the auxiliary loss of its last forward call. */
static size_t acmoe__moe_memory_bytes(const acmoe_moe *layer) { return layer->memory_bytes; }
static float acmoe__moe_aux_loss(const acmoe_moe *layer) { return layer->aux_loss; }

/* The stats without the AC weight summary, which reads all of W: what the next layer needs
   on every forward call. */
static acmoe_moe_stats acmoe__moe_routing_stats(const acmoe_moe *layer) {
    acmoe_moe_stats st;
    memset(&st, 0, sizeof st);
    st.n_tokens = layer->n;
    st.top_k = layer->label_k;
    st.n_experts = layer->desc.n_experts;
    st.expert_index = layer->top_idx;
    st.gate = layer->top_gate;
    st.tokens_per_expert = layer->count;
    st.pairs = layer->n_pairs;
    st.dropped = layer->dropped;
    st.pair_token = layer->pair_token;
    st.pair_expert = layer->pair_expert;
    st.pair_gate = layer->pair_gate;
    st.aux_loss = layer->aux_loss;
    st.router_stability = layer->router_stability;
    st.nonfinite_logits = layer->nonfinite;
    st.seconds_routing = layer->seconds_routing;
    st.seconds_experts = layer->seconds_experts;
    if (layer->desc.router_select == ACMOE_SELECT_SOFT) {
        st.n_slots = layer->lw;
        st.slot_dispatch = layer->dispatch;
        st.slot_combine = layer->probs;
    }
    return st;
}

ACMOE_API acmoe_moe_stats acmoe_moe_last_stats(const acmoe_moe *layer) {
    acmoe_moe_stats st;
    if (!layer) {
        memset(&st, 0, sizeof st);
        return st;
    }
    st = acmoe__moe_routing_stats(layer);
    if (layer->desc.router_input == ACMOE_INPUT_AC && layer->ac_ready) {
        size_t i, total = (size_t)layer->ac_rows * layer->desc.d_model;
        double sum = 0.0;
        st.ac_clusters = layer->ac_rows;
        st.ac_w_min = st.ac_w_max = layer->ac_w[0];
        for (i = 0; i < total; i++) {
            st.ac_w_min = ACMOE__MIN(st.ac_w_min, layer->ac_w[i]);
            st.ac_w_max = ACMOE__MAX(st.ac_w_max, layer->ac_w[i]);
            sum += layer->ac_w[i];
        }
        st.ac_w_mean = (float)(sum / (double)total);
        for (i = 0; i < (size_t)layer->ac_rows; i++) st.ac_small_clusters += layer->ac_count[i] < 2;
    }
    return st;
}

/* sqrt(sum_q w_q (a_q - b_q)^2), with w_q the mean of wa and wb (both NULL: plain). */
static double acmoe__weighted_distance(const float *a, const float *b, const float *wa, const float *wb, int d) {
    double sum = 0.0;
    int q;
    for (q = 0; q < d; q++) {
        const double dev = (double)a[q] - b[q], w = wa ? 0.5 * ((double)wa[q] + wb[q]) : 1.0;
        sum += w * dev * dev;
    }
    return sqrt(sum);
}

/* within / between for the clusters mu, count, with weights w [E][d] or none. */
static float acmoe__tightness_ratio(const acmoe_moe *layer, const float *mu, const int *count, const float *w) {
    const int d = layer->desc.d_model, e = layer->desc.n_experts;
    double within = 0.0, between = 0.0;
    long pairs = 0;
    int t, a, b;
    long tokens = 0;
    for (t = 0; t < layer->n; t++) {
        const int c = layer->top_idx[(size_t)t * layer->label_k];
        const float *wc = w ? w + (size_t)c * d : NULL;
        if (count[c] < 2) continue;
        within += acmoe__weighted_distance(layer->x + (size_t)t * d, mu + (size_t)c * d, wc, wc, d);
        tokens++;
    }
    for (a = 0; a < e; a++)
        for (b = a + 1; b < e; b++) {
            if (count[a] < 2 || count[b] < 2) continue;
            between += acmoe__weighted_distance(mu + (size_t)a * d, mu + (size_t)b * d, w ? w + (size_t)a * d : NULL,
                                                w ? w + (size_t)b * d : NULL, d);
            pairs++;
        }
    if (!pairs || between <= 0.0) return 0.0f; /* one cluster: no spread between clusters */
    return (float)((within / (double)tokens) / (between / (double)pairs));
}

ACMOE_API acmoe_status acmoe_moe_tightness(const acmoe_moe *layer, acmoe_tightness *out) {
    const int d = layer ? layer->desc.d_model : 0, e = layer ? layer->desc.n_experts : 0;
    acmoe_ac_desc ac;
    acmoe__kernel kern;
    float *mu, *w;
    int *count, c, rows = 0;
    if (!layer || !out) return ACMOE_ERR_NULL;
    memset(out, 0, sizeof *out);
    if (layer->desc.router_select == ACMOE_SELECT_DENSE || !layer->x || layer->n < 1)
        return ACMOE_ERR_ARG;
    if (acmoe__ac_resolve(&layer->desc.ac, &ac) != ACMOE_OK) return ACMOE_ERR_ARG;
    ac.robust = 1;
    count = (int *)ACMOE_MALLOC(sizeof(int) * (size_t)e + sizeof(float) * 2 * (size_t)e * d);
    if (!count) return ACMOE_ERR_NOMEM;
    mu = (float *)(count + e), w = mu + (size_t)e * d;
    acmoe__ac_counts(layer->top_idx, layer->label_k, layer->n, e, count);
    for (c = 0; c < e; c++) out->clusters += count[c] > 1, rows = count[c] > 0 ? c + 1 : rows;
    acmoe__host_kernel(&kern);
    acmoe__ac_dispersion_part(&ac, &kern, layer->x, layer->n, d, layer->top_idx, layer->label_k, rows, count, mu, w, 0,
                              1);
    acmoe__ac_weights(&ac, w, rows, d, count); /* rows as the AC router has them: up to the largest label */
    out->plain = acmoe__tightness_ratio(layer, mu, count, NULL);
    out->ac = acmoe__tightness_ratio(layer, mu, count, w);
    ACMOE_FREE(count);
    return ACMOE_OK;
}

/* ========================================================================================== */
/* 9. Transformer pieces                                                                      */
/* ========================================================================================== */

/* Layer norm over rows split across threads; the backward pass sums the gain and bias
   gradients by blocks of rows as it goes, or, when there is no room for the partials, in a
   pass of its own split by columns (every sum then runs over the rows in order). */
typedef struct acmoe__ln_job {
    const acmoe__kernel *kern;
    const float *x, *add, *dy, *g, *b, *rstd_in, *xhat_in;
    float *xhat, *rstd, *y, *dg, *db, *dx;
    const float *from; /* backward: dx = from + the input gradient (from may be dx); NULL: dx = the gradient */
    float *partials;   /* backward: per block, the gain's then the bias's partial gradient; or NULL */
    int rows, d;
} acmoe__ln_job;

/* y = (x - mean) / sqrt(var + eps) * g + b, keeping xhat and 1 / sqrt(var + eps); x is the
   sum x + add when add is given (a residual sum that is needed only here). */
static void acmoe__layernorm_rows(void *arg, int tid, int n_threads) {
    const acmoe__ln_job *j = (const acmoe__ln_job *)arg;
    const size_t d = (size_t)j->d;
    int r, r1 = (int)((long)j->rows * (tid + 1) / n_threads);
    for (r = (int)((long)j->rows * tid / n_threads); r < r1; r++)
        j->rstd[r] = j->kern->row_layernorm(j->xhat + r * d, j->y + r * d, j->x + r * d, j->add ? j->add + r * d : NULL,
                                            j->g, j->b, j->d);
}

/* dx of each row, block by block, and the blocks' partial gain and bias gradients when there
   is room for them. */
static void acmoe__layernorm_backward_rows(void *arg, int tid, int n_threads) {
    const acmoe__ln_job *j = (const acmoe__ln_job *)arg;
    const size_t d = (size_t)j->d;
    int b, b0, b1, r;
    acmoe__thread_blocks(tid, n_threads, ACMOE__SUM_BLOCKS, &b0, &b1);
    for (b = b0; b < b1; b++) {
        float *dg = j->partials ? j->partials + (size_t)b * 2 * d : NULL, *db = dg ? dg + d : NULL;
        const int r1 = acmoe__block_row(j->rows, b + 1, ACMOE__SUM_BLOCKS);
        if (dg) memset(dg, 0, sizeof(float) * 2 * d);
        for (r = acmoe__block_row(j->rows, b, ACMOE__SUM_BLOCKS); r < r1; r++) {
            if (dg) {
                j->kern->row_mul_add(dg, j->dy + r * d, j->xhat_in + r * d, j->d);
                j->kern->row_axpy(db, j->dy + r * d, j->d, 1.0f);
            }
            if (j->from && j->from != j->dx) memcpy(j->dx + r * d, j->from + r * d, sizeof(float) * d);
            j->kern->row_layernorm_backward(j->dx + r * d, j->dy + r * d, j->xhat_in + r * d, j->g, j->rstd_in[r],
                                            j->d, j->from != NULL);
        }
    }
}

/* dg and db accumulate, columns split across threads. */
static void acmoe__layernorm_backward_columns(void *arg, int tid, int n_threads) {
    const acmoe__ln_job *j = (const acmoe__ln_job *)arg;
    const int d = j->d, q0 = (int)((long)d * tid / n_threads), q1 = (int)((long)d * (tid + 1) / n_threads);
    int r;
    for (r = 0; r < j->rows; r++) {
        const float *dyr = j->dy + (size_t)r * d + q0;
        j->kern->row_mul_add(j->dg + q0, dyr, j->xhat_in + (size_t)r * d + q0, q1 - q0);
        j->kern->row_axpy(j->db + q0, dyr, q1 - q0, 1.0f);
    }
}

static void acmoe__layernorm(acmoe_ctx *ctx, const float *x, const float *add, int rows, int d, const float *g,
                             const float *b, float *xhat, float *rstd, float *y) {
    acmoe__ln_job j;
    memset(&j, 0, sizeof j);
    j.kern = &ctx->kernel, j.x = x, j.add = add, j.g = g, j.b = b, j.xhat = xhat, j.rstd = rstd, j.y = y;
    j.rows = rows, j.d = d;
    acmoe__pool_run(&ctx->pool, acmoe__threads_for(ctx, (double)rows * d), acmoe__layernorm_rows, &j);
}

/* dx from dy: the input gradient, or from plus it (from may be dx itself); dg and db
   accumulate. */
static void acmoe__layernorm_backward(acmoe_ctx *ctx, const float *dy, const float *xhat, const float *rstd, int rows,
                                      int d, const float *g, float *dg, float *db, float *dx, const float *from) {
    acmoe__ln_job j;
    memset(&j, 0, sizeof j);
    j.kern = &ctx->kernel, j.dy = dy, j.xhat_in = xhat, j.rstd_in = rstd, j.g = g, j.dg = dg, j.db = db, j.dx = dx;
    j.rows = rows, j.d = d, j.from = from, j.partials = acmoe__sum_partials(ctx, ACMOE__SUM_BLOCKS, 2, d);
    acmoe__pool_run(&ctx->pool, acmoe__threads_for(ctx, (double)rows * d), acmoe__layernorm_backward_rows, &j);
    if (!j.partials) {
        acmoe__pool_run(&ctx->pool, acmoe__threads_for(ctx, (double)rows * d), acmoe__layernorm_backward_columns, &j);
        return;
    }
    acmoe__add_partials(j.kern, dg, j.partials, ACMOE__SUM_BLOCKS, d, (size_t)2 * d);
    acmoe__add_partials(j.kern, db, j.partials + d, ACMOE__SUM_BLOCKS, d, (size_t)2 * d);
}

/* Attention runs one (sequence, head) pair per thread at a time, in strips of query rows
   (mr, or the rows of the path's kernel for products one vector wide): a strip's scores
   against its keys, their exponentials, and the products with the values, all in a
   per-thread scratch that stays in cache. A head is a few columns (16 at
   d 128 and 8 heads), too narrow for packing to pay: the micro-kernels read every operand in
   place, from the q, k, v rows themselves or from copies made once per pair (rows padded to
   a multiple of ACMOE__ATTENTION_PAD, and keys and values transposed where a product runs
   along them). Causal, a strip's scores reach only its last row's keys, so no product is
   spent above the diagonal but the strip's own corner; without the mask (an encoder) every
   row sees every key. The probabilities are recomputed, with the same bits, in the backward
   pass from each row's maximum and inverse sum, which the forward pass keeps (two floats a
   row and head): storing the probabilities themselves would cost batch x heads x seq^2 / 2
   floats per layer (10 MB at seq 256, batch 8 and 8 heads; 0.5 GB at seq 2048). The backward
   pass takes query rows a block at a time, so that each block's key and value gradients are
   one product per strip of keys. */
#define ACMOE__ATTENTION_BLOCK 64
#define ACMOE__ATTENTION_PAD 16 /* every path's kernel widths divide it or are multiples of it */
#define ACMOE__STRIP_MAX ACMOE__MAX(ACMOE__MR_MAX, ACMOE__TALL_ROWS)

/* Query rows a strip takes: as many as the products one head wide take at once. */
static int acmoe__strip_rows(const acmoe__kernel *kern) { return kern->tall ? ACMOE__TALL_ROWS : kern->mr; }

static int acmoe__pad_up(int n) {
    return (n + ACMOE__ATTENTION_PAD - 1) / ACMOE__ATTENTION_PAD * ACMOE__ATTENTION_PAD;
}

/* One pair's scratch: the keys transposed (kt, dh rows of sp) and as padded rows (kr, sp rows
   of hp); the values transposed (vt) for the backward pass; xr: the values' rows in the forward
   pass, the queries' rows in the backward; p and dp: a block of probabilities and their
   gradients (row stride sp); g: the block's output gradient rows divided by their sums;
   dk, dv: the key and value gradients; tile: a strip's output rows. */
typedef struct acmoe__attention_scratch {
    float *kt, *vt, *kr, *xr, *p, *dp, *g, *dk, *dv, *tile;
    int sp, hp; /* padded sequence length and head width */
} acmoe__attention_scratch;

static size_t acmoe__attention_layout(int seq, int dh, float *base, acmoe__attention_scratch *s) {
    const size_t sp = (size_t)acmoe__pad_up(seq), hp = (size_t)acmoe__pad_up(dh);
    const size_t block = (size_t)ACMOE__MIN(seq, ACMOE__ATTENTION_BLOCK) * sp;
    const size_t sizes[10] = {dh * sp, dh * sp, sp * hp, sp * hp, block, block,
                              (size_t)ACMOE__ATTENTION_BLOCK * hp, sp * hp, sp * hp, ACMOE__STRIP_MAX * hp};
    float **parts[10];
    size_t used = 0;
    int i;
    parts[0] = &s->kt, parts[1] = &s->vt, parts[2] = &s->kr, parts[3] = &s->xr, parts[4] = &s->p;
    parts[5] = &s->dp, parts[6] = &s->g, parts[7] = &s->dk, parts[8] = &s->dv, parts[9] = &s->tile;
    for (i = 0; i < 10; i++) {
        if (base) *parts[i] = base + used;
        used += sizes[i];
    }
    s->sp = (int)sp, s->hp = (int)hp;
    return used;
}

/* Scratch floats for one thread (one (sequence, head) pair at a time). */
static size_t acmoe__attention_work(int seq, int dh) {
    acmoe__attention_scratch s;
    return acmoe__attention_layout(seq, dh, NULL, &s);
}

/* y = x times its row's factor (1 without factors) for n rows of dh floats, and zeros up to
   width (row strides ldy and ldx). Rows far apart defeat the hardware prefetcher, so the
   rows 32 below are fetched ahead. */
static void acmoe__scale_rows(const acmoe__kernel *kern, float *y, size_t ldy, const float *x, size_t ldx, int n, int dh,
                              int width, const float *factor) {
    int r;
    for (r = 0; r < n; r++) {
        float *yr = y + (size_t)r * ldy;
        if (r + 32 < n) {
            ACMOE__PREFETCH_READ(x + (size_t)(r + 32) * ldx);
            ACMOE__PREFETCH_WRITE(y + (size_t)(r + 32) * ldy);
        }
        kern->row_scale(yr, x + (size_t)r * ldx, dh, factor ? factor[r] : 1.0f);
        if (width > dh) memset(yr + dh, 0, sizeof(float) * (size_t)(width - dh));
    }
}

/* t = x^T for n rows of dh floats (row stride ldx), zero-padded to sp columns. */
static void acmoe__transpose_padded(acmoe_isa isa, float *t, int sp, const float *x, size_t ldx, int n, int dh) {
    int c;
    acmoe__transpose(isa, t, sp, x, (ptrdiff_t)ldx, n, dh);
    for (c = 0; c < dh; c++) memset(t + (size_t)c * sp + n, 0, sizeof(float) * (size_t)(sp - n));
}

/* Keys query row i sees: 0..i when causal, else all seq. */
static int acmoe__row_keys(int causal, int seq, int i) { return causal ? i + 1 : seq; }

/* The exponentials of rows [i0, i1) of the scores s (row stride ld, first row i0) in place,
   scaled and less the row's maximum, over the keys each row sees; a causal row's columns
   from i + 1 up to zero_end are zeroed for the products that read past its diagonal. inv[r]
   is the inverse of row i0 + r's sum, so the softmax is the row times it. With saved, a
   [max, inv] pair per row: the forward pass writes its rows' there; the backward pass reads
   them back (the same exponentials, without the maximum's pass or the sum's). */
static void acmoe__attention_softmax(const acmoe__kernel *kern, float *s, int ld, int i0, int i1, int zero_end,
                                     int causal, int seq, float scale, float *inv, float *saved, int backward) {
    int i;
    for (i = i0; i < i1; i++) {
        float *row = s + (size_t)(i - i0) * ld;
        const int keys = acmoe__row_keys(causal, seq, i);
        if (backward) {
            kern->row_exp(row, row, keys, saved[2 * i], scale);
            inv[i - i0] = saved[2 * i + 1];
        } else {
            const float top = kern->row_max(row, keys);
            inv[i - i0] = 1.0f / kern->row_exp(row, row, keys, top, scale);
            if (saved) saved[2 * i] = top, saved[2 * i + 1] = inv[i - i0];
        }
        if (zero_end > keys) memset(row + keys, 0, sizeof(float) * (size_t)(zero_end - keys));
    }
}

/* The softmax backward of the same rows, from their exponentials e and dp, the gradient of
   their probabilities divided by the row sums: dp becomes the gradient of the scaled scores,
   zeroed past the diagonal up to zero_end. dot[r] is row r's sum of e dp, which equals its
   output row times its divided output gradient row (dh products rather than a row of keys). */
static void acmoe__attention_softmax_backward(const acmoe__kernel *kern, const float *e, float *dp, int ld, int i0,
                                              int i1, int zero_end, int causal, int seq, const float *dot,
                                              float scale) {
    int i;
    for (i = i0; i < i1; i++) {
        float *dr = dp + (size_t)(i - i0) * ld;
        const int keys = acmoe__row_keys(causal, seq, i);
        kern->row_softmax_grad(dr, e + (size_t)(i - i0) * ld, keys, dot[i - i0], scale);
        if (zero_end > keys) memset(dr + keys, 0, sizeof(float) * (size_t)(zero_end - keys));
    }
}

/* Attention runs one (sequence, head) pair per thread at a time, so results do not depend on
   the thread count; as many threads take part as there are scratch slots. Each thread first
   takes its own run of consecutive pairs (the sequences whose rows its share of the
   projections wrote, still in its cache), then helps with the others' runs, so that a
   thread on a busy core holds no one up. */
#define ACMOE__PAIR_RUNS 64
typedef struct acmoe__attention_job {
    acmoe_ctx *ctx;
    const float *qkv, *dout;
    float *work, *out, *dqkv; /* work: acmoe__attention_work floats per slot; out is read
                                 in the backward pass */
    float *stats; /* a [max, inv] pair per row of each pair, written forward and read backward; or NULL */
    const float *cache; /* decoding a batch: see acmoe__attention_shape */
    int batch, seq, d, heads, slots;
    int seq_len;     /* decoding: the longest sequence, the cache's */
    int ld, out_ld;  /* floats from one position's row to the next in qkv and dqkv, and in out and dout */
    int start;  /* forward: query rows [start, seq) of each sequence; earlier rows are kept */
    int causal; /* a row sees only the keys up to its own */
    int runs;   /* runs of pairs, one per taking thread (at most ACMOE__PAIR_RUNS) */
    int next[ACMOE__PAIR_RUNS]; /* the next (sequence, head) pair of each run */
} acmoe__attention_job;

/* Splits the pairs into a run for each of the threads that take part. */
static void acmoe__attention_runs(acmoe__attention_job *j, int threads) {
    int r;
    j->runs = ACMOE__MAX(1, ACMOE__MIN(ACMOE__MIN(threads, j->slots), ACMOE__PAIR_RUNS));
    for (r = 0; r < j->runs; r++) j->next[r] = (int)((long)j->batch * j->heads * r / j->runs);
}

/* The next pair for thread tid: from its own run, then from the runs after it; batch x heads
   when none is left. */
static int acmoe__attention_next_pair(acmoe__attention_job *j, int tid) {
    const int total = j->batch * j->heads;
    int r;
    for (r = 0; r < j->runs; r++) {
        const int run = (tid + r) % j->runs, end = (int)((long)total * (run + 1) / j->runs);
        const int pair = acmoe__next_item(&j->next[run]);
        if (pair < end) return pair;
    }
    return total;
}

/* The keys a strip of query rows below i1 reaches. */
static int acmoe__strip_keys(const acmoe__attention_job *j, int i1) { return j->causal ? i1 : j->seq; }

/* Decoding a batch, the floats of one sequence's keys and values in the cache: d rows of
   keys transposed, each padded_up(seq_len) long, then seq_len rows of d values. */
static size_t acmoe__decoding_span(int d, int seq_len) { return (size_t)d * (size_t)(acmoe__pad_up(seq_len) + seq_len); }

/* One pair's operands: q, k, v (row stride 3d) and their gradients, its output or output
   gradient rows (row stride d), the transposed keys kt, and its scratch. In the forward pass,
   where a head is as wide as its padding, the kernels read q, k and v rows in place (qr, kr,
   vr at row stride ld); otherwise, and always in the backward pass, they read compact padded
   copies in the scratch (its score products ran slower on query rows 3d apart). Decoding a
   batch, the queries are the new rows (from position q_first) and kt and v are in the cache. */
typedef struct acmoe__attention_pair {
    const float *q, *k, *v, *qr, *kr, *vr, *kt;
    float *dq, *dk, *dv;
    size_t out, ld;              /* offset of the pair's first output row in out or dout; row stride of qr, kr, vr */
    ptrdiff_t q_ld, v_ld, kt_ld; /* row strides of q, v and kt */
    int q_first;                 /* the position of q's first row */
    acmoe__attention_scratch s;
} acmoe__attention_pair;

static acmoe__attention_pair acmoe__attention_pair_at(const acmoe__attention_job *j, int pair, int tid) {
    const int b = pair / j->heads, h = pair % j->heads, dh = j->d / j->heads;
    const size_t base = (size_t)(j->cache ? b : b * j->seq) * 3 * j->d + (size_t)h * dh;
    acmoe__attention_pair P;
    P.q = j->qkv + base, P.k = P.q + j->d, P.v = P.q + 2 * j->d;
    P.dq = j->dqkv ? j->dqkv + base : NULL, P.dk = P.dq ? P.dq + j->d : NULL, P.dv = P.dq ? P.dq + 2 * j->d : NULL;
    P.out = (size_t)(j->cache ? b : b * j->seq) * j->d + (size_t)h * dh;
    acmoe__attention_layout(j->seq, dh, j->work + (size_t)tid * acmoe__attention_work(j->seq, dh), &P.s);
    P.q_ld = j->ld, P.v_ld = j->ld, P.q_first = 0, P.kt = P.s.kt, P.kt_ld = P.s.sp;
    if (j->cache) {
        const float *cached = j->cache + (size_t)b * acmoe__decoding_span(j->d, j->seq_len);
        P.k = NULL, P.q_first = j->start, P.kt_ld = acmoe__pad_up(j->seq_len);
        P.kt = cached + (size_t)h * dh * P.kt_ld;
        P.v = cached + (size_t)j->d * P.kt_ld + (size_t)h * dh, P.v_ld = j->d;
    }
    if (P.s.hp == dh && !j->dqkv) {
        P.qr = P.q, P.kr = P.k, P.vr = P.v, P.ld = (size_t)(j->cache ? j->d : j->ld);
    } else { /* the backward pass copies q into xr; the forward pass, v */
        P.qr = P.vr = P.s.xr, P.kr = P.s.kr, P.ld = (size_t)P.s.hp;
    }
    return P;
}

/* The exponentials of query rows [i0, i1) (the keys the strip reaches) into p, zeroed past
   the diagonal up to zero_end, and the inverses of their sums, the scores from the
   transposed keys kt. */
static void acmoe__attention_exp(const acmoe__attention_job *j, const acmoe__attention_pair *P, int pair, int i0,
                                 int i1, int zero_end, float *p, float *inv) {
    const acmoe__kernel *kern = &j->ctx->kernel;
    const int dh = j->d / j->heads, keys = acmoe__strip_keys(j, i1);
    float *saved = j->stats ? j->stats + (size_t)pair * j->seq * 2 : NULL;
    acmoe__small_product(kern, i1 - i0, acmoe__pad_up(keys), dh, P->q + (size_t)(i0 - P->q_first) * P->q_ld, P->q_ld,
                         1, P->kt, P->kt_ld, p, P->s.sp, 0);
    acmoe__attention_softmax(kern, p, P->s.sp, i0, i1, zero_end, j->causal, j->seq, 1.0f / sqrtf((float)dh), inv,
                             saved, saved && j->dqkv);
}

/* softmax(q k^T / sqrt(dh)) v per pair, strip by strip: the exponentials times v, then each
   output row divided by its sum (dh products rather than a row of probabilities). */
static void acmoe__attention_forward_job(void *arg, int tid, int n_threads) {
    acmoe__attention_job *j = (acmoe__attention_job *)arg;
    const acmoe__kernel *kern = &j->ctx->kernel;
    const int dh = j->d / j->heads, ld = j->ld, workers = ACMOE__MIN(n_threads, j->slots);
    float inv[ACMOE__STRIP_MAX];
    int pair, i0, i1;
    if (tid >= workers) return;
    while ((pair = acmoe__attention_next_pair(j, tid)) < j->batch * j->heads) {
        const acmoe__attention_pair P = acmoe__attention_pair_at(j, pair, tid);
        const acmoe__attention_scratch *s = &P.s;
        if (!j->cache) acmoe__transpose_padded(kern->isa, s->kt, s->sp, P.k, (size_t)ld, j->seq, dh);
        if (P.vr == s->xr) acmoe__scale_rows(kern, s->xr, (size_t)s->hp, P.v, (size_t)P.v_ld, j->seq, dh, s->hp, NULL);
        for (i0 = j->start; i0 < j->seq; i0 = i1) {
            i1 = ACMOE__MIN(j->seq, i0 + acmoe__strip_rows(kern));
            acmoe__attention_exp(j, &P, pair, i0, i1, i1, s->p, inv);
            acmoe__small_product(kern, i1 - i0, s->hp, acmoe__strip_keys(j, i1), s->p, s->sp, 1, P.vr, (ptrdiff_t)P.ld,
                                 s->tile, s->hp, 0);
            acmoe__scale_rows(kern, j->out + P.out + (size_t)i0 * j->out_ld, (size_t)j->out_ld, s->tile, (size_t)s->hp, i1 - i0, dh, dh,
                              inv);
        }
    }
}

/* One block's strips of the backward pass: the exponentials, the divided output gradients
   g, the probability gradients G V^T turned into score gradients, and dq = dS k. */
static void acmoe__attention_backward_strips(const acmoe__attention_job *j, const acmoe__attention_pair *P, int pair,
                                             int b0, int b1) {
    const acmoe__kernel *kern = &j->ctx->kernel;
    const acmoe__attention_scratch *s = &P->s;
    const int dh = j->d / j->heads, ld = j->ld;
    const float scale = 1.0f / sqrtf((float)dh);
    float inv[ACMOE__STRIP_MAX], dot[ACMOE__STRIP_MAX];
    int i0, i1, r, keys;
    for (i0 = b0; i0 < b1; i0 = i1) {
        float *p = s->p + (size_t)(i0 - b0) * s->sp, *dp = s->dp + (size_t)(i0 - b0) * s->sp;
        float *g = s->g + (size_t)(i0 - b0) * s->hp;
        const float *o = j->out + P->out + (size_t)i0 * j->out_ld;
        i1 = ACMOE__MIN(b1, i0 + acmoe__strip_rows(kern));
        keys = acmoe__strip_keys(j, i1);
        acmoe__attention_exp(j, P, pair, i0, i1, b1, p, inv);
        acmoe__scale_rows(kern, g, (size_t)s->hp, j->dout + P->out + (size_t)i0 * j->out_ld, (size_t)j->out_ld, i1 - i0, dh, s->hp,
                          inv);
        for (r = 0; r < i1 - i0; r++) dot[r] = kern->row_dot(o + (size_t)r * j->out_ld, g + (size_t)r * s->hp, dh);
        acmoe__small_product(kern, i1 - i0, acmoe__pad_up(keys), dh, g, s->hp, 1, s->vt, s->sp, dp, s->sp, 0);
        acmoe__attention_softmax_backward(kern, p, dp, s->sp, i0, i1, b1, j->causal, j->seq, dot, scale);
        acmoe__small_product(kern, i1 - i0, s->hp, keys, dp, s->sp, 1, P->kr, (ptrdiff_t)P->ld, s->tile, s->hp, 0);
        acmoe__scale_rows(kern, P->dq + (size_t)i0 * ld, (size_t)ld, s->tile, (size_t)s->hp, i1 - i0, dh, dh, NULL);
    }
}

/* The key and value gradients' share of query rows [b0, b1): dv += P^T g and dk += dS^T q
   over the keys the block reaches; causal, each strip of keys from its first row on (rows
   above it are zero). */
static void acmoe__attention_backward_keys(const acmoe__attention_job *j, const acmoe__attention_pair *P, int b0,
                                           int b1) {
    const acmoe__kernel *kern = &j->ctx->kernel;
    const acmoe__attention_scratch *s = &P->s;
    const int keys = acmoe__strip_keys(j, b1);
    int k0, k1;
    for (k0 = 0; k0 < keys; k0 = k1) {
        const int first = j->causal ? ACMOE__MAX(b0, k0) - b0 : 0, depth = b1 - b0 - first;
        const size_t at = (size_t)first * s->sp + (size_t)k0;
        /* keys before the block (every key, without the mask) take every row */
        k1 = !j->causal ? keys : k0 < b0 ? b0 : ACMOE__MIN(b1, k0 + acmoe__strip_rows(kern));
        acmoe__small_product(kern, k1 - k0, s->hp, depth, s->p + at, 1, s->sp, s->g + (size_t)first * s->hp, s->hp,
                             s->dv + (size_t)k0 * s->hp, s->hp, 1);
        acmoe__small_product(kern, k1 - k0, s->hp, depth, s->dp + at, 1, s->sp, P->qr + (size_t)(b0 + first) * P->ld,
                             (ptrdiff_t)P->ld, s->dk + (size_t)k0 * s->hp, s->hp, 1);
    }
}

/* dqkv from dout, pair by pair, block by block. Blocks run last first and add to zeroed key
   and value gradients, so every sum has the order it had when the last block wrote them. */
static void acmoe__attention_backward_job(void *arg, int tid, int n_threads) {
    acmoe__attention_job *j = (acmoe__attention_job *)arg;
    const acmoe__kernel *kern = &j->ctx->kernel;
    const int dh = j->d / j->heads, ld = j->ld, seq = j->seq, workers = ACMOE__MIN(n_threads, j->slots);
    int pair, b0;
    if (tid >= workers) return;
    while ((pair = acmoe__attention_next_pair(j, tid)) < j->batch * j->heads) {
        acmoe__attention_pair P = acmoe__attention_pair_at(j, pair, tid);
        const acmoe__attention_scratch *s = &P.s;
        acmoe__transpose_padded(kern->isa, s->kt, s->sp, P.k, (size_t)ld, seq, dh);
        acmoe__transpose_padded(kern->isa, s->vt, s->sp, P.v, (size_t)ld, seq, dh);
        acmoe__scale_rows(kern, s->kr, (size_t)s->hp, P.k, (size_t)ld, seq, dh, s->hp, NULL);
        acmoe__scale_rows(kern, s->xr, (size_t)s->hp, P.q, (size_t)ld, seq, dh, s->hp, NULL);
        P.q = s->xr, P.q_ld = s->hp; /* the scores read compact rows */
        memset(s->dk, 0, sizeof(float) * (size_t)seq * s->hp);
        memset(s->dv, 0, sizeof(float) * (size_t)seq * s->hp);
        for (b0 = (seq - 1) / ACMOE__ATTENTION_BLOCK * ACMOE__ATTENTION_BLOCK; b0 >= 0; b0 -= ACMOE__ATTENTION_BLOCK) {
            const int b1 = ACMOE__MIN(seq, b0 + ACMOE__ATTENTION_BLOCK);
            acmoe__attention_backward_strips(j, &P, pair, b0, b1);
            acmoe__attention_backward_keys(j, &P, b0, b1);
        }
        acmoe__scale_rows(kern, P.dk, (size_t)ld, s->dk, (size_t)s->hp, seq, dh, dh, NULL);
        acmoe__scale_rows(kern, P.dv, (size_t)ld, s->dv, (size_t)s->hp, seq, dh, dh, NULL);
    }
}

/* The sizes of a call and the row strides they imply: rows sequence by sequence; or, decoding
   a batch (cache set), qkv rows of the new positions only and out rows, position by position
   (the sequences' rows of one position together), each sequence's keys and values in cache
   (acmoe__decoding_span floats apart). */
static void acmoe__attention_shape(acmoe__attention_job *j, int batch, int seq, const float *cache, int seq_len, int d,
                                   int heads) {
    j->batch = batch, j->seq = seq, j->d = d, j->heads = heads, j->cache = cache, j->seq_len = seq_len;
    j->ld = 3 * d * (cache ? batch : 1), j->out_ld = d * (cache ? batch : 1);
}

/* Multi-head attention, causal or not: qkv [n][3d] (queries, keys, values of each token) to
   the positions [start, seq) of each sequence of out [n][d], laid out as
   acmoe__attention_shape says; work holds slots times acmoe__attention_work floats, one
   scratch for each thread that takes part. stats, when given (batch x heads x seq x 2
   floats), keeps each row's softmax maximum and inverse sum for the backward pass. */
static void acmoe__attention_forward(acmoe_ctx *ctx, const float *qkv, int batch, int seq, const float *cache,
                                     int seq_len, int start, int causal, int d, int heads, float *work, int slots,
                                     float *out, float *stats) {
    acmoe__attention_job j;
    int threads;
    memset(&j, 0, sizeof j);
    j.ctx = ctx, j.qkv = qkv, j.work = work, j.out = out, j.stats = stats;
    acmoe__attention_shape(&j, batch, seq, cache, seq_len, d, heads);
    j.start = start, j.causal = causal, j.slots = slots;
    threads = acmoe__threads_for(ctx, 2.0 * batch * (seq - start) * seq * d);
    acmoe__attention_runs(&j, threads);
    acmoe__pool_run(&ctx->pool, threads, acmoe__attention_forward_job, &j);
}

/* dqkv [n][3d] from dout [n][d] and the forward call's out and stats (or NULL: the row
   statistics are measured again, with the same bits). */
static void acmoe__attention_backward(acmoe_ctx *ctx, const float *qkv, float *out, const float *dout, int batch,
                                      int seq, int causal, int d, int heads, float *work, int slots, float *dqkv,
                                      float *stats) {
    acmoe__attention_job j;
    memset(&j, 0, sizeof j);
    j.ctx = ctx, j.qkv = qkv, j.out = out, j.dout = dout, j.work = work, j.dqkv = dqkv, j.stats = stats;
    acmoe__attention_shape(&j, batch, seq, NULL, 0, d, heads);
    j.causal = causal, j.slots = slots;
    acmoe__attention_runs(&j, ctx->desc.n_threads);
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__attention_backward_job, &j);
}

typedef struct acmoe__ce_job {
    const acmoe__kernel *kern;
    float *logits, *row_loss;
    const int32_t *targets;
    int n, vocab, grad;
} acmoe__ce_job;

/* Rows split over threads: each row's loss, and with grad its logits become their gradient
   (softmax - one-hot) / n. */
static void acmoe__cross_entropy_job(void *arg, int tid, int n_threads) {
    const acmoe__ce_job *j = (const acmoe__ce_job *)arg;
    const int vocab = j->vocab, t1 = (int)((long)j->n * (tid + 1) / n_threads);
    int t, c;
    for (t = (int)((long)j->n * tid / n_threads); t < t1; t++) {
        float *z = j->logits + (size_t)t * vocab, top = j->kern->row_max(z, vocab), target = z[j->targets[t]];
        float sum = j->kern->row_exp(j->grad ? z : NULL, z, vocab, top, 1.0f), inv; /* z: exp, in place */
        j->row_loss[t] = logf(sum) + top - target;
        if (!j->grad) continue;
        inv = 1.0f / (sum * (float)j->n);
        for (c = 0; c < vocab; c++) z[c] *= inv;
        z[j->targets[t]] -= 1.0f / (float)j->n;
    }
}

/* Mean cross-entropy of logits [n][vocab] against targets, summed row by row in order so the
   value does not depend on the thread count. */
static float acmoe__cross_entropy(acmoe_ctx *ctx, float *logits, const int32_t *targets, int n, int vocab, int grad,
                                  float *row_loss) {
    acmoe__ce_job j;
    double total = 0.0;
    int t;
    j.kern = &ctx->kernel, j.logits = logits, j.row_loss = row_loss, j.targets = targets;
    j.n = n, j.vocab = vocab, j.grad = grad;
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__cross_entropy_job, &j);
    for (t = 0; t < n; t++) total += row_loss[t];
    return (float)(total / n);
}

/* ========================================================================================== */
/* 10. Transformer models                                                                     */
/* ========================================================================================== */

typedef struct acmoe__block {
    char letter; /* router preset, or 'f' for a dense FFN */
    int stage, width, heads, tokens; /* tokens per sequence; Swin stages shrink them, widen the rest */
    int grid, window, shift;         /* Swin: the stage's grid side, the window side (0: global), its shift */
    int n;                           /* rows of the last call */
    float *rel_bias, *g_rel_bias;    /* Swin: [(2 window - 1)^2][heads] */
    float *probs;                    /* Swin: the last call's attention probabilities, window by window */
    float *w_qkv, *b_qkv, *w_o, *b_o, *ln1_g, *ln1_b, *ln2_g, *ln2_b;
    float *g_w_qkv, *g_b_qkv, *g_w_o, *g_b_o, *g_ln1_g, *g_ln1_b, *g_ln2_g, *g_ln2_b;
    acmoe_moe *moe;
    /* activations [n][..] of the last forward call */
    const float *x_in;
    float *attn_in, *qkv, *att, *a, *xhat1, *rstd1, *h, *moe_in, *m, *xhat2, *rstd2, *y;
    float *att_stats; /* each attention row's softmax maximum and inverse sum (not Swin) */
    unsigned char *keep_a, *keep_m; /* dropout masks */
} acmoe__block;

/* Swin's patch merging between two stages: each 2 x 2 patches concatenated (cat, 4C wide),
   normalised, mapped to 2C without bias (out). */
typedef struct acmoe__merge {
    float *ln_g, *ln_b, *w, *g_ln_g, *g_ln_b, *g_w;
    float *cat, *xhat, *rstd, *normed, *out;
} acmoe__merge;

#define ACMOE__MAX_STAGES 8
#define ACMOE__MAX_WINDOW 16 /* Swin's window side: a window's rows fit on the stack */

/* ---- options by name: the one table of every option ---- */

static const char *const acmoe__enum_names[ACMOE_ENUM_COUNT][8] = {
    {"relu", "gelu", "swiglu", NULL},
    {"default", "per-feature", "preclip", "postclip", NULL},
    {"default", "mad", "variance", NULL},
    {"default", "batch", "sequence", "position", NULL},
    {"raw", "normalized", NULL},
    {"token", "projected", "ac", NULL},
    {"linear", "cosine", "slot", "none", NULL},
    {"topk", "switch", "usmoe", "expert-choice", "soft", "priority", "dense", NULL},
    {"constant", "cosine", NULL},
};

static int acmoe__enum_count(acmoe_enum kind) {
    int n = 0;
    while (acmoe__enum_names[kind][n]) n++;
    return n;
}

ACMOE_API const char *acmoe_enum_name(acmoe_enum kind, int value) {
    if ((int)kind < 0 || kind >= ACMOE_ENUM_COUNT || value < 0 || value >= acmoe__enum_count(kind)) return NULL;
    return acmoe__enum_names[kind][value];
}

ACMOE_API int acmoe_enum_value(acmoe_enum kind, const char *name) {
    int i;
    if ((int)kind < 0 || kind >= ACMOE_ENUM_COUNT || !name) return -1;
    for (i = 0; acmoe__enum_names[kind][i]; i++)
        if (!strcmp(acmoe__enum_names[kind][i], name)) return i;
    return -1;
}

ACMOE_API const char *acmoe_router_name(char letter) {
    static const char letters[] = "gsobxcuvetwmnaf";
    static const char *const names[] = {"SMoE",     "Switch",   "cosine",      "StableMoE", "XMoE",
                                        "AC",       "USMoE",    "AC USMoE",    "expert choice", "Swin-MoE",
                                        "AC Swin-MoE", "Soft MoE", "Soft MoE (paper)", "AC Soft MoE", "dense"};
    const char *at = letter ? strchr(letters, letter) : NULL;
    return at ? names[at - letters] : NULL;
}

#define ACMOE__W (1 << 20) /* the widest layer, the most tokens (acmoe__lm_sizes_fit has the joint limits) */
#define ACMOE__OPTION(key, flag, type, names, owner, member, low, high, since, help) \
    {key, flag, ACMOE_OPTION_##type, ACMOE_ENUM_##names, offsetof(owner, member), low, high, since, help}
#define ACMOE__MODEL(key, flag, type, names, member, low, high, since, help) \
    ACMOE__OPTION(key, flag, type, names, acmoe_lm_desc, member, low, high, since, help)
#define ACMOE__OPTIM(key, flag, type, names, member, low, high, help) \
    ACMOE__OPTION(key, flag, type, names, acmoe_optim_desc, member, low, high, 3, help)

static const acmoe_option acmoe__model_options[] = {
    ACMOE__MODEL("vocab", NULL, INT, COUNT, vocab, 0, 1 << 24, 2, "token ids (0: 256, bytes)"),
    ACMOE__MODEL("d_model", "d-model", INT, COUNT, d_model, 1, ACMOE__W, 2, "model width"),
    ACMOE__MODEL("n_heads", "heads", INT, COUNT, n_heads, 1, ACMOE__W, 2, "attention heads, a divisor of the width"),
    ACMOE__MODEL("seq_len", "seq", INT, COUNT, seq_len, 1, ACMOE__W, 2, "context length (patches of an image)"),
    ACMOE__MODEL("batch", "batch", INT, COUNT, batch, 0, ACMOE__W, 2, "sequences per step (0: 1)"),
    ACMOE__MODEL("d_ff", "d-ff", INT, COUNT, d_ff, 0, ACMOE__W, 2, "expert hidden width (0: the model width)"),
    ACMOE__MODEL("n_experts", "experts", INT, COUNT, n_experts, 0, ACMOE__W, 2, "experts per MoE layer (0: 16)"),
    ACMOE__MODEL("top_k", "top-k", INT, COUNT, top_k, 0, ACMOE__W, 2, "experts per token (0: 2)"),
    ACMOE__MODEL("activation", "activation", ENUM, ACTIVATION, activation, 0, ACMOE_ACT_COUNT - 1, 2,
                 "expert activation: relu (the paper), gelu or swiglu"),
    ACMOE__MODEL("pre_ln", "pre-ln", INT, COUNT, pre_ln, 0, 1, 2, "1: pre-LN blocks; 0: post-LN as in the paper"),
    ACMOE__MODEL("untied_head", "untied-head", INT, COUNT, untied_head, 0, 1, 2,
                 "1: an output head of its own; 0: the token embedding"),
    ACMOE__MODEL("dropout", "dropout", FLOAT, COUNT, dropout, 0, 0.99, 2, "dropout on attention and FFN outputs"),
    ACMOE__MODEL("moe.proj_dim", "proj-dim", INT, COUNT, moe.proj_dim, 0, ACMOE__W, 2,
                 "XMoE: width of the router's projection (0: 8)"),
    ACMOE__MODEL("moe.capacity", "capacity", FLOAT, COUNT, moe.capacity, 0, 1e4, 2,
                 "expert capacity factor with token dropping (0: no limit, or the router's own)"),
    ACMOE__MODEL("moe.usmoe_budget", "usmoe-budget", FLOAT, COUNT, moe.usmoe_budget, 0, ACMOE__W, 2,
                 "USMoE: (token, expert) pairs per token of a group, at most the experts (0: top-k)"),
    ACMOE__MODEL("moe.usmoe_rho", "usmoe-rho", FLOAT, COUNT, moe.usmoe_rho, 0, 1, 2,
                 "USMoE: share of the sigmoid score (0: 0.5)"),
    ACMOE__MODEL("moe.group", "usmoe-group", ENUM, GROUP, moe.group, 0, ACMOE_GROUP_COUNT - 1, 2,
                 "USMoE: the tokens sharing a budget: the call (batch), each sequence, or each position "
                 "(causal; the default)"),
    ACMOE__MODEL("moe.seq_len", NULL, INT, COUNT, moe.seq_len, 0, ACMOE__W, 2, "the model's seq_len, or 0"),
    ACMOE__MODEL("moe.soft_slots", "soft-slots", INT, COUNT, moe.soft_slots, 0, ACMOE__W, 2,
                 "Soft MoE: slots per expert and group (0: 1)"),
    ACMOE__MODEL("moe.balance_alpha", "balance-alpha", FLOAT, COUNT, moe.balance_alpha, 0, 1e5, 2,
                 "Switch load-balancing loss weight (0: off, as in the paper)"),
    ACMOE__MODEL("moe.balance_temperature", "balance-temp", FLOAT, COUNT, moe.balance_temperature, 0, 1e5, 2,
                 "temperature of the balance loss's softmax (0: 1)"),
    ACMOE__MODEL("moe.z_loss", "z-loss", FLOAT, COUNT, moe.z_loss, 0, 1e5, 2, "router z-loss weight (0: off)"),
    ACMOE__MODEL("moe.ac_max_clusters", NULL, INT, COUNT, moe.ac_max_clusters, 0, ACMOE__W, 2,
                 "AC: labels below this (0: the experts)"),
    ACMOE__MODEL("moe.ac_weight_experts", "ac-experts", INT, COUNT, moe.ac_weight_experts, 0, 1, 2,
                 "AC ('c' layers): 1: the experts see the weighted input too"),
    ACMOE__MODEL("moe.ac_mix_labels", NULL, INT, COUNT, moe.ac_mix_labels, 0, 1, 2,
                 "AC: a token's weights mix its previous experts' rows"),
    ACMOE__MODEL("moe.ac.eps", "ac-eps", FLOAT, COUNT, moe.ac.eps, 0, 1e6, 2,
                 "AC ('c' layers): added to the dispersion (0: 1e-4 for mad, 0.1 for variance)"),
    ACMOE__MODEL("moe.ac.clip", "ac-clip", FLOAT, COUNT, moe.ac.clip, 0, 1e6, 2,
                 "AC ('c' layers): weights clipped at this multiple of their mean (0: 10)"),
    ACMOE__MODEL("moe.ac.scaling", "ac-scaling", ENUM, AC_SCALING, moe.ac.scaling, 0, 3, 2,
                 "AC ('c' layers): weights divided by their mean per feature (per-feature, the default), or by "
                 "their mean before (preclip) or after (postclip) clipping"),
    ACMOE__MODEL("moe.ac.dispersion", "ac-dispersion", ENUM, AC_DISPERSION, moe.ac.dispersion, 0, 2, 2,
                 "AC ('c' layers): mad (the paper, the default), or variance (weights neither clipped nor scaled)"),
    ACMOE__MODEL("moe.ac.robust", "ac-robust", INT, COUNT, moe.ac.robust, 0, 1, 2,
                 "1: AC weights leave out clusters of 0 or 1 tokens (not the paper's); 0: as the paper"),
    ACMOE__MODEL("n_classes", NULL, INT, COUNT, n_classes, 0, ACMOE__W, 2, "vision encoder: classes (0: a language model)"),
    ACMOE__MODEL("patch_dim", NULL, INT, COUNT, patch_dim, 0, ACMOE__W, 2, "vision encoder: floats per patch"),
    ACMOE__MODEL("moe.soft_input", NULL, ENUM, SOFT_INPUT, moe.soft_input, 0, ACMOE_SOFT_INPUT_COUNT - 1, 3,
                 "Soft MoE: what the slots mix"),
    ACMOE__MODEL("moe.mix_k", NULL, INT, COUNT, moe.mix_k, 0, ACMOE__W, 3,
                 "Soft MoE: the slots each token reports to the next layer (0: 8)"),
    ACMOE__MODEL("moe.no_router_bias", NULL, INT, COUNT, moe.no_router_bias, 0, 1, 3, "linear score without bias"),
    ACMOE__MODEL("moe.no_reprojection", NULL, INT, COUNT, moe.no_reprojection, 0, 1, 3,
                 "cosine score: embeddings keep their norm"),
    ACMOE__MODEL("moe.gate_noise", NULL, FLOAT, COUNT, moe.gate_noise, 0, 1e5, 3,
                 "priority selection: gate noise deviation times the experts, in training"),
    ACMOE__MODEL("moe.importance_loss", NULL, FLOAT, COUNT, moe.importance_loss, 0, 1e5, 3,
                 "weight of the load and importance loss"),
    ACMOE__MODEL("window", "window", INT, COUNT, window, 0, ACMOE__MAX_WINDOW, 3,
                 "vision encoder: Swin windows of this side, stages split by '|' in the pattern (0: global "
                 "attention)"),
};

static const acmoe_option acmoe__optim_options[] = {
    ACMOE__OPTIM("optim.lr", "lr", FLOAT, COUNT, lr, 0, 10, "peak learning rate (0: 7e-4)"),
    ACMOE__OPTIM("optim.beta1", NULL, FLOAT, COUNT, beta1, 0, 0.9999999, "Adam beta1 (0: 0.9)"),
    ACMOE__OPTIM("optim.beta2", NULL, FLOAT, COUNT, beta2, 0, 0.9999999, "Adam beta2 (0: 0.999)"),
    ACMOE__OPTIM("optim.eps", NULL, FLOAT, COUNT, eps, 0, 1, "Adam epsilon (0: 1e-8)"),
    ACMOE__OPTIM("optim.weight_decay", "weight-decay", FLOAT, COUNT, weight_decay, 0, 1000,
                 "AdamW decay of weights (not biases or norms)"),
    ACMOE__OPTIM("optim.clip_norm", "clip", FLOAT, COUNT, clip_norm, 0, 1e6, "gradient clipping by global norm (0: off)"),
    ACMOE__OPTIM("optim.warmup_steps", "warmup", INT, COUNT, warmup_steps, 0, INT_MAX, "linear warmup steps (0: none)"),
    ACMOE__OPTIM("optim.schedule", "schedule", ENUM, SCHEDULE, schedule, 0, ACMOE_SCHEDULE_COUNT - 1,
                 "after warmup: constant (the reference) or cosine to the final learning rate"),
    ACMOE__OPTIM("optim.total_steps", NULL, INT, COUNT, total_steps, 0, INT_MAX, "the cosine schedule's length"),
    ACMOE__OPTIM("optim.min_lr", "min-lr", FLOAT, COUNT, min_lr, 0, 10, "final learning rate of the cosine schedule"),
    ACMOE__OPTIM("optim.sgd", NULL, INT, COUNT, sgd, 0, 1, "1: plain SGD instead of AdamW"),
};
#define ACMOE__N_MODEL_OPTIONS ((int)(sizeof acmoe__model_options / sizeof acmoe__model_options[0]))
#define ACMOE__N_OPTIM_OPTIONS ((int)(sizeof acmoe__optim_options / sizeof acmoe__optim_options[0]))

ACMOE_API const acmoe_option *acmoe_model_options(int *count) {
    if (count) *count = ACMOE__N_MODEL_OPTIONS;
    return acmoe__model_options;
}

ACMOE_API const acmoe_option *acmoe_optim_options(int *count) {
    if (count) *count = ACMOE__N_OPTIM_OPTIONS;
    return acmoe__optim_options;
}

/* Whether value is one the option takes. A float option is judged as its float field holds
   it: the float nearest a bound such as 0.99 lies just outside the bound's double. */
static int acmoe__option_fits(const acmoe_option *o, double value) {
    if (o->type == ACMOE_OPTION_FLOAT)
        return fabs(value) <= FLT_MAX && (float)value >= (float)o->min && (float)value <= (float)o->max;
    return value >= o->min && value <= o->max && value == floor(value);
}

ACMOE_API acmoe_status acmoe_option_set(const acmoe_option *o, void *desc, const char *text) {
    char *field, *end;
    double value;
    if (!o || !desc || !text) return ACMOE_ERR_NULL;
    field = (char *)desc + o->offset;
    if (o->type == ACMOE_OPTION_ENUM) {
        const int v = acmoe_enum_value(o->names, text);
        if (v < 0 || !acmoe__option_fits(o, v)) return ACMOE_ERR_ARG;
        memcpy(field, &v, sizeof v);
        return ACMOE_OK;
    }
    value = strtod(text, &end);
    if (!*text || *end || !isfinite(value) || !acmoe__option_fits(o, value)) return ACMOE_ERR_ARG;
    if (o->type == ACMOE_OPTION_INT) {
        const int v = (int)value;
        memcpy(field, &v, sizeof v);
    } else {
        const float v = (float)value;
        memcpy(field, &v, sizeof v);
    }
    return ACMOE_OK;
}

/* The shortest of f's %g forms that reads back as f ("0.01", not "0.00999999978"; "10", not
   "1e+01"). */
static int acmoe__format_float(float f, char *text, size_t cap) {
    char digits[32], best[32];
    int precision;
    snprintf(best, sizeof best, "%.9g", (double)f); /* always reads back */
    for (precision = 1; precision < 9; precision++) {
        snprintf(digits, sizeof digits, "%.*g", precision, (double)f);
        if (strtof(digits, NULL) == f && strlen(digits) < strlen(best)) strcpy(best, digits);
    }
    return snprintf(text, cap, "%s", best);
}

ACMOE_API int acmoe_option_format(const acmoe_option *o, const void *desc, char *text, size_t cap) {
    const char *field;
    const char *name;
    int i;
    float f;
    if (!o || !desc) return -1;
    field = (const char *)desc + o->offset;
    if (o->type == ACMOE_OPTION_FLOAT) {
        memcpy(&f, field, sizeof f);
        return acmoe__format_float(f, text, cap);
    }
    memcpy(&i, field, sizeof i);
    name = o->type == ACMOE_OPTION_ENUM ? acmoe_enum_name(o->names, i) : NULL;
    return name ? snprintf(text, cap, "%s", name) : snprintf(text, cap, "%d", i);
}

/* Whether every option of the table has a value it takes in desc. */
static int acmoe__options_fit(const acmoe_option *options, int count, const void *desc) {
    int i;
    for (i = 0; i < count; i++) {
        const char *field = (const char *)desc + options[i].offset;
        double value;
        if (options[i].type == ACMOE_OPTION_FLOAT) {
            float f;
            memcpy(&f, field, sizeof f);
            value = f;
        } else {
            int v;
            memcpy(&v, field, sizeof v);
            value = v;
        }
        if (!acmoe__option_fits(&options[i], value)) return 0;
    }
    return 1;
}


struct acmoe_lm {
    acmoe_lm_desc desc;
    char pattern[64];
    int n_layers, n_stages;
    acmoe__block blocks[63];
    acmoe__merge merges[ACMOE__MAX_STAGES - 1]; /* after stage s, into stage s + 1 */
    float *pn_g, *pn_b, *g_pn_g, *g_pn_b, *embedded, *pn_xhat, *pn_rstd; /* Swin: the patch norm */
    float *att_ds; /* Swin: the score gradients of one block's backward, for the bias gradient */
    size_t n_params, activation_bytes;
    float *params, *grads, *adam_m, *adam_v;
    acmoe__directory dir; /* every parameter tensor, by name */
    void *memory;
    float *tok_emb, *pos_emb, *head, *lnf_g, *lnf_b;
    float *g_tok_emb, *g_pos_emb, *g_head, *g_lnf_g, *g_lnf_b;
    float *patch_w, *patch_b, *head_b, *g_patch_w, *g_patch_b, *g_head_b; /* vision encoder */
    float *patches, *pooled; /* vision encoder: the last call's patches, the pooled rows */
    const float *d_embedded; /* vision encoder: the last backward's gradient of the embedded patches */
    float *x0, *yf, *xhatf, *rstdf, *logits, *row_loss;
    float *dy, *dx, *t1, *t2, *t3, *datt, *dqkv, *att_work;
    int att_slots; /* attention scratch slots in att_work */
    double seconds_attention; /* the last forward and backward, with a context clock */
    double *grad_sq; /* the squared gradient norm by chunk */
    int32_t *tokens, *targets;
    acmoe_rng rng;
    int batch, seq, n, dropped, cached;
    int training; /* of the last forward call: dropout and gate noise */
    int start;       /* the first row the last forward computed (decoding) */
    int interleaved; /* rows position by position (decoding a batch), else sequence by sequence */
    long steps;
    long cache_step; /* the optimizer step the activations were computed at */
    acmoe_optim_desc optim; /* as the last step resolved it, for acmoe_lm_train_settings */
    uint64_t train_seed;    /* of the last acmoe_lm_train call */
    acmoe_comm *expert_ranks; /* expert parallelism (acmoe_lm_set_expert_ranks), or NULL */
};

/* A model tensor: a view into the buffers and an entry in the directory. */
static void acmoe__lm_view(acmoe_lm *model, size_t *used, const char *name, int decay, int ndim, int s0, int s1,
                           float **p, float **g) {
    acmoe__param_view(used, model->params, model->grads, p, g, &model->dir, name, decay, ndim, s0, s1, 0);
}

static acmoe_moe_desc acmoe__lm_moe_desc(const acmoe_lm *model, const acmoe__block *block) {
    const char letter = block->letter;
    acmoe_moe_desc m = model->desc.moe;
    m.d_model = block->width;
    m.d_ff = model->desc.d_ff * (block->width / model->desc.d_model); /* Swin stages widen it with the width */
    m.activation = model->desc.activation;
    m.max_tokens = model->desc.batch * block->tokens;
    m.n_experts = model->desc.n_experts;
    m.top_k = model->desc.top_k;
    m.seq_len = block->tokens;
    acmoe_moe_router_preset(&m, letter);
    if (m.router_select == ACMOE_SELECT_SOFT) /* the one causal grouping for text, each image by itself */
        m.group = model->desc.n_classes ? ACMOE_GROUP_SEQUENCE : ACMOE_GROUP_POSITION;
    if (acmoe__routerless(&m)) { /* no pairs to limit or balance */
        m.capacity = m.balance_alpha = m.z_loss = 0.0f;
        m.gate_noise = m.importance_loss = 0.0f;
    }
    return m;
}

/* The first block of stage s. */
static const acmoe__block *acmoe__stage_first(const acmoe_lm *model, int s) {
    int i = 0;
    while (i < model->n_layers - 1 && model->blocks[i].stage < s) i++;
    return &model->blocks[i];
}

/* The width of the last block: what the final norm and the head see. */
static int acmoe__top_width(const acmoe_lm *model) { return model->blocks[model->n_layers - 1].width; }

/* One block's attention and norms, named layers.i. in the directory. */
static void acmoe__block_params(acmoe_lm *model, acmoe__block *block, size_t *used) {
    const int d = block->width, span = 2 * block->window - 1;
    acmoe__lm_view(model, used, "attn.qkv.weight", 1, 2, 3 * d, d, &block->w_qkv, &block->g_w_qkv);
    acmoe__lm_view(model, used, "attn.qkv.bias", 0, 1, 3 * d, 0, &block->b_qkv, &block->g_b_qkv);
    acmoe__lm_view(model, used, "attn.out.weight", 1, 2, d, d, &block->w_o, &block->g_w_o);
    acmoe__lm_view(model, used, "attn.out.bias", 0, 1, d, 0, &block->b_o, &block->g_b_o);
    if (block->window) acmoe__lm_view(model, used, "attn.rel_bias", 0, 2, span * span, block->heads, &block->rel_bias, &block->g_rel_bias);
    acmoe__lm_view(model, used, "ln1.weight", 0, 1, d, 0, &block->ln1_g, &block->g_ln1_g);
    acmoe__lm_view(model, used, "ln1.bias", 0, 1, d, 0, &block->ln1_b, &block->g_ln1_b);
    acmoe__lm_view(model, used, "ln2.weight", 0, 1, d, 0, &block->ln2_g, &block->g_ln2_g);
    acmoe__lm_view(model, used, "ln2.bias", 0, 1, d, 0, &block->ln2_b, &block->g_ln2_b);
}

/* Swin's patch merging after stage s: norm and reduction of 4 C into 2 C, named merges.s. */
static void acmoe__merge_params(acmoe_lm *model, int s, int c, size_t *used) {
    acmoe__merge *merge = &model->merges[s];
    snprintf(model->dir.prefix, sizeof model->dir.prefix, "merges.%d.", s);
    acmoe__lm_view(model, used, "norm.weight", 0, 1, 4 * c, 0, &merge->ln_g, &merge->g_ln_g);
    acmoe__lm_view(model, used, "norm.bias", 0, 1, 4 * c, 0, &merge->ln_b, &merge->g_ln_b);
    acmoe__lm_view(model, used, "reduction.weight", 1, 2, 2 * c, 4 * c, &merge->w, &merge->g_w);
    model->dir.prefix[0] = '\0';
}

/* Lays the parameters out and lists them in the directory (or only counts both while
   model->params is NULL). */
static size_t acmoe__lm_params(acmoe_lm *model) {
    const int d = model->desc.d_model, v = model->desc.vocab, top = acmoe__top_width(model);
    size_t used = 0;
    int i;
    model->dir.count = 0;
    model->dir.prefix[0] = '\0';
    if (model->desc.n_classes) {
        acmoe__lm_view(model, &used, "patch_emb.weight", 1, 2, d, model->desc.patch_dim, &model->patch_w, &model->g_patch_w);
        acmoe__lm_view(model, &used, "patch_emb.bias", 0, 1, d, 0, &model->patch_b, &model->g_patch_b);
    } else {
        acmoe__lm_view(model, &used, "tok_emb.weight", 1, 2, v, d, &model->tok_emb, &model->g_tok_emb);
    }
    if (model->desc.window) {
        acmoe__lm_view(model, &used, "patch_norm.weight", 0, 1, d, 0, &model->pn_g, &model->g_pn_g);
        acmoe__lm_view(model, &used, "patch_norm.bias", 0, 1, d, 0, &model->pn_b, &model->g_pn_b);
    } else {
        acmoe__lm_view(model, &used, "pos_emb.weight", 1, 2, model->desc.seq_len, d, &model->pos_emb, &model->g_pos_emb);
    }
    for (i = 0; i < model->n_layers; i++) {
        acmoe__block *block = &model->blocks[i];
        acmoe_moe_desc md = acmoe__lm_moe_desc(model, block);
        if (i > 0 && block->stage != block[-1].stage) acmoe__merge_params(model, block[-1].stage, block[-1].width, &used);
        snprintf(model->dir.prefix, sizeof model->dir.prefix, "layers.%d.", i);
        acmoe__block_params(model, block, &used);
        snprintf(model->dir.prefix, sizeof model->dir.prefix, block->letter == 'f' ? "layers.%d.ffn." : "layers.%d.moe.", i);
        model->dir.base = used;
        if (model->params && acmoe_moe_create(&block->moe, &md, model->params + used, model->grads + used) != ACMOE_OK) block->moe = NULL;
        used += acmoe__moe_directory(&md, &model->dir);
        model->dir.base = 0;
        model->dir.prefix[0] = '\0';
    }
    if (model->desc.pre_ln) {
        acmoe__lm_view(model, &used, "ln_f.weight", 0, 1, top, 0, &model->lnf_g, &model->g_lnf_g);
        acmoe__lm_view(model, &used, "ln_f.bias", 0, 1, top, 0, &model->lnf_b, &model->g_lnf_b);
    }
    if (model->desc.n_classes) {
        acmoe__lm_view(model, &used, "head.weight", 1, 2, model->desc.n_classes, top, &model->head, &model->g_head);
        acmoe__lm_view(model, &used, "head.bias", 0, 1, model->desc.n_classes, 0, &model->head_b, &model->g_head_b);
    } else if (model->desc.untied_head) {
        acmoe__lm_view(model, &used, "head.weight", 1, 2, v, d, &model->head, &model->g_head);
    } else if (model->params) {
        model->head = model->tok_emb, model->g_head = model->g_tok_emb;
    }
    return used;
}

/* The gradient norm sums fixed chunks in parallel and adds the chunk sums in order, so it
   does not depend on the thread count. */
#define ACMOE__NORM_CHUNK 16384
static size_t acmoe__chunks(size_t n) { return (n + ACMOE__NORM_CHUNK - 1) / ACMOE__NORM_CHUNK; }

/* A block's queries, keys and values, n rows of width d, or a language model's decoding cache. */
static size_t acmoe__qkv_floats(const acmoe_lm *model, size_t n, int d) {
    const size_t cache = (size_t)model->desc.batch * acmoe__decoding_span(d, model->desc.seq_len);
    return model->desc.n_classes ? n * 3 * d : ACMOE__MAX(n * 3 * d, cache);
}

/* Lays the activations out in base (or only measures them when base is NULL). */
static size_t acmoe__lm_activations(acmoe_lm *model, unsigned char *base) {
    const size_t f = sizeof(float);
    const size_t att_work = model->desc.window ? 0 : (size_t)model->att_slots * acmoe__attention_work(model->desc.seq_len, model->desc.d_model / model->desc.n_heads);
    const int drop = model->desc.dropout > 0.0f, pre = model->desc.pre_ln, vision = model->desc.n_classes > 0;
    size_t used = 0, n, d, window_probs = 0;
    int i, s;
    for (i = 0; i < model->n_layers; i++) {
        acmoe__block *block = &model->blocks[i];
        const size_t rows = (size_t)model->desc.batch * block->tokens, area = (size_t)block->window * block->window;
        n = rows, d = (size_t)block->width; /* this block's, in a Swin stage */
        block->probs = block->window ? (float *)acmoe__carve(base, &used, rows * block->heads * area * f) : NULL;
        window_probs = ACMOE__MAX(window_probs, rows * block->heads * area);
        block->attn_in = pre ? (float *)acmoe__carve(base, &used, n * d * f) : NULL;
        block->qkv = (float *)acmoe__carve(base, &used, acmoe__qkv_floats(model, n, (int)d) * f);
        block->att = (float *)acmoe__carve(base, &used, n * d * f);
        block->att_stats = (float *)acmoe__carve(base, &used, (block->window ? 1 : n * (size_t)block->heads * 2) * f);
        block->a = (float *)acmoe__carve(base, &used, n * d * f);
        block->xhat1 = (float *)acmoe__carve(base, &used, n * d * f);
        block->rstd1 = (float *)acmoe__carve(base, &used, n * f);
        block->h = (float *)acmoe__carve(base, &used, n * d * f);
        block->moe_in = pre ? (float *)acmoe__carve(base, &used, n * d * f) : NULL;
        block->m = (float *)acmoe__carve(base, &used, n * d * f);
        block->xhat2 = (float *)acmoe__carve(base, &used, n * d * f);
        block->rstd2 = (float *)acmoe__carve(base, &used, n * f);
        block->y = (float *)acmoe__carve(base, &used, n * d * f);
        block->keep_a = drop ? (unsigned char *)acmoe__carve(base, &used, n * d) : NULL;
        block->keep_m = drop ? (unsigned char *)acmoe__carve(base, &used, n * d) : NULL;
    }
    for (s = 0; s + 1 < model->n_stages; s++) { /* each merge: 4 C wide rows of the next stage's count */
        acmoe__merge *merge = &model->merges[s];
        const acmoe__block *next = acmoe__stage_first(model, s + 1);
        const size_t rows = (size_t)model->desc.batch * next->tokens, wide = 2 * (size_t)next->width;
        merge->cat = (float *)acmoe__carve(base, &used, rows * wide * f);
        merge->xhat = (float *)acmoe__carve(base, &used, rows * wide * f);
        merge->rstd = (float *)acmoe__carve(base, &used, rows * f);
        merge->normed = (float *)acmoe__carve(base, &used, rows * wide * f);
        merge->out = (float *)acmoe__carve(base, &used, rows * (size_t)next->width * f);
    }
    n = (size_t)model->desc.batch * model->desc.seq_len, d = (size_t)model->desc.d_model; /* the widest rows: the first stage's */
    model->embedded = model->desc.window ? (float *)acmoe__carve(base, &used, n * d * f) : NULL;
    model->pn_xhat = model->desc.window ? (float *)acmoe__carve(base, &used, n * d * f) : NULL;
    model->pn_rstd = model->desc.window ? (float *)acmoe__carve(base, &used, n * f) : NULL;
    model->att_ds = model->desc.window ? (float *)acmoe__carve(base, &used, window_probs * f) : NULL;
    model->x0 = (float *)acmoe__carve(base, &used, n * d * f);
    model->yf = (float *)acmoe__carve(base, &used, n * d * f);
    model->xhatf = (float *)acmoe__carve(base, &used, n * d * f);
    model->rstdf = (float *)acmoe__carve(base, &used, n * f);
    model->logits = (float *)acmoe__carve(base, &used,
                                      (vision ? (size_t)model->desc.batch * model->desc.n_classes : n * (size_t)model->desc.vocab) * f);
    model->patches = (float *)acmoe__carve(base, &used, (vision ? n * (size_t)model->desc.patch_dim : 1) * f);
    model->pooled = (float *)acmoe__carve(base, &used, (vision ? (size_t)model->desc.batch * acmoe__top_width(model) : 1) * f);
    model->row_loss = (float *)acmoe__carve(base, &used, n * f);
    model->grad_sq = (double *)acmoe__carve(base, &used, acmoe__chunks(model->n_params) * sizeof(double));
    model->dy = (float *)acmoe__carve(base, &used, n * d * f);
    model->dx = (float *)acmoe__carve(base, &used, n * d * f);
    model->t1 = (float *)acmoe__carve(base, &used, n * d * f);
    model->t2 = (float *)acmoe__carve(base, &used, n * d * f);
    model->t3 = (float *)acmoe__carve(base, &used, n * d * f);
    model->datt = (float *)acmoe__carve(base, &used, n * d * f);
    model->dqkv = (float *)acmoe__carve(base, &used, n * 3 * d * f);
    model->att_work = (float *)acmoe__carve(base, &used, att_work * f);
    model->tokens = (int32_t *)acmoe__carve(base, &used, n * sizeof(int32_t));
    model->targets = (int32_t *)acmoe__carve(base, &used, n * sizeof(int32_t));
    return used;
}

/* Whether every size product of the model fits the types that hold it: token counts and
   widths within an int, the parameters within a checkpoint's int shapes, every buffer far
   from the address space. Computed in double, before any of it is formed in an integer. */
static int acmoe__lm_sizes_fit(const acmoe_lm_desc *desc, int stages) {
    const double width = (double)desc->d_model * (1 << (stages - 1)), tokens = (double)desc->batch * desc->seq_len;
    const double layers = (double)strlen(desc->pattern);
    const double rows = (double)desc->vocab + desc->n_classes + desc->patch_dim + desc->seq_len;
    const double experts = (double)desc->n_experts * (3.0 * desc->d_ff + 3.0) * (width + 1.0);
    const double router = ((double)desc->n_experts * ACMOE__MAX(desc->moe.soft_slots, 1) + desc->moe.proj_dim + 1.0) * (width + 1.0);
    const double params = rows * (width + 1.0) * 2.0 + layers * (4.0 * width * width + 9.0 * width + experts + router);
    const double activations = tokens * (layers * 20.0 * width + (double)desc->vocab + desc->patch_dim + 20.0 * width);
    if (width > ACMOE__MAX_WIDTH || (double)desc->d_ff * (1 << (stages - 1)) > ACMOE__MAX_WIDTH || desc->vocab > (1 << 24) ||
        desc->n_classes > (1 << 24) || desc->patch_dim > ACMOE__MAX_WIDTH || desc->n_experts > ACMOE__MAX_WIDTH ||
        tokens > (double)(1 << 24) || 3.0 * width * tokens > (double)INT32_MAX)
        return 0;
    return params < (double)INT32_MAX && 4.0 * (params + activations) < ACMOE__MAX_BYTES;
}

/* The MoE fields that the model sets from its own are unset or equal to them: the layers'
   sizes, and the sequence length that their groups follow. */
static int acmoe__lm_moe_sizes_agree(const acmoe_lm_desc *desc) {
    const acmoe_moe_desc *m = &desc->moe;
    return (!m->d_model || m->d_model == desc->d_model) && (!m->d_ff || m->d_ff == desc->d_ff) &&
           (!m->n_experts || m->n_experts == desc->n_experts) && (!m->top_k || m->top_k == desc->top_k) &&
           (!m->max_tokens || m->max_tokens == desc->batch * desc->seq_len) && (!m->seq_len || m->seq_len == desc->seq_len);
}

/* The stages of a pattern: one more than its '|'. */
static int acmoe__pattern_stages(const char *pattern) {
    int stages = 1;
    for (; *pattern; pattern++) stages += *pattern == '|';
    return stages;
}

/* The side of a square grid of n patches, or 0. */
static int acmoe__grid_side(int n) {
    int side = (int)(sqrt((double)n) + 0.5);
    return side * side == n ? side : 0;
}

/* Whether the Swin stages fit the patches: a square grid that halves stage by stage, each
   stage's grid a whole number of windows (or within one window). */
static int acmoe__swin_grid_fits(const acmoe_lm_desc *desc, int stages) {
    int side = acmoe__grid_side(desc->seq_len), s;
    if (!side) return 0;
    for (s = 0; s < stages; s++, side /= 2) {
        if (side < 1 || (s + 1 < stages && side % 2)) return 0;
        if (side > desc->window && side % desc->window) return 0;
    }
    return 1;
}

/* Each block's stage and geometry: one stage of the model's sizes, or Swin's stages. */
static void acmoe__lm_geometry(acmoe_lm *model) {
    const int grid = model->desc.window ? acmoe__grid_side(model->desc.seq_len) : 0;
    int i, l = 0, stage = 0, in_stage = 0;
    for (i = 0; model->pattern[i]; i++) {
        acmoe__block *block;
        if (model->pattern[i] == '|') {
            stage++, in_stage = 0;
            continue;
        }
        block = &model->blocks[l++];
        block->letter = model->pattern[i];
        block->stage = stage;
        block->width = model->desc.d_model << stage;
        block->heads = model->desc.n_heads << stage;
        block->grid = grid >> stage;
        block->tokens = model->desc.window ? block->grid * block->grid : model->desc.seq_len;
        block->window = model->desc.window ? ACMOE__MIN(model->desc.window, block->grid) : 0;
        block->shift = block->window && block->grid > block->window && in_stage % 2 ? block->window / 2 : 0;
        in_stage++;
    }
    model->n_layers = l;
    model->n_stages = stage + 1;
}

/* Defaults, and the checks a pattern must pass. */
/* The MoE options with their defaults as a layer of the model resolves them (the router
   letters' own settings apply on top), so that settings and checkpoints show the values the
   layers run with. Where the options alone do not resolve, they stay as given and the layers
   report the error. */
static void acmoe__lm_moe_defaults(acmoe_lm_desc *desc) {
    acmoe_moe_desc m = desc->moe, r;
    m.d_model = desc->d_model, m.d_ff = desc->d_ff, m.n_experts = desc->n_experts, m.top_k = desc->top_k;
    m.max_tokens = desc->batch * desc->seq_len, m.activation = desc->activation;
    if (acmoe_moe_resolve(&m, &r) != ACMOE_OK) return;
    r.d_model = desc->moe.d_model, r.d_ff = desc->moe.d_ff, r.n_experts = desc->moe.n_experts, r.top_k = desc->moe.top_k;
    r.max_tokens = desc->moe.max_tokens, r.activation = desc->moe.activation;
    r.router_input = desc->moe.router_input, r.router_score = desc->moe.router_score;
    r.router_select = desc->moe.router_select;
    desc->moe = r;
}

static acmoe_status acmoe__lm_resolve(const acmoe_lm_desc *in, acmoe_lm_desc *out, char *pattern) {
    acmoe_lm_desc desc = *in;
    int i, seen_moe = 0, stages;
    if (!desc.vocab) desc.vocab = 256;
    if (!desc.batch) desc.batch = 1;
    if (!desc.pattern) desc.pattern = "ggc";
    if (!desc.d_ff) desc.d_ff = desc.d_model;
    if (!desc.n_experts) desc.n_experts = 16;
    if (!desc.top_k) desc.top_k = 2;
    if (!desc.seed) desc.seed = 1;
    if (desc.n_classes < 0 || (desc.n_classes > 0 && desc.patch_dim < 1)) return ACMOE_ERR_SHAPE;
    if (desc.n_classes) desc.vocab = 0, desc.untied_head = 0;
    else desc.patch_dim = 0;
    if ((!desc.n_classes && desc.vocab < 2) || desc.d_model < 1 || desc.n_heads < 1 || desc.d_model % desc.n_heads || desc.seq_len < 1 ||
        desc.batch < 1 || desc.d_ff < 1 || desc.n_experts < 1 || desc.top_k < 1 || desc.top_k > desc.n_experts)
        return ACMOE_ERR_SHAPE;
    if (strlen(desc.pattern) < 1 || strlen(desc.pattern) > 63) return ACMOE_ERR_ARG;
    stages = acmoe__pattern_stages(desc.pattern);
    if (desc.window < 0 || (desc.window && (!desc.n_classes || !desc.pre_ln)) || (!desc.window && stages > 1) ||
        stages > ACMOE__MAX_STAGES)
        return ACMOE_ERR_ARG;
    if (desc.window > ACMOE__MAX_WINDOW || (desc.window && !acmoe__swin_grid_fits(&desc, stages))) return ACMOE_ERR_SHAPE;
    if (!acmoe__lm_sizes_fit(&desc, stages)) return ACMOE_ERR_SHAPE;
    if (!(desc.dropout >= 0.0f && desc.dropout < 1.0f)) return ACMOE_ERR_ARG;
    if (!acmoe__lm_moe_sizes_agree(&desc) || !acmoe__options_fit(acmoe__model_options, ACMOE__N_MODEL_OPTIONS, in))
        return ACMOE_ERR_ARG;
    desc.moe.seq_len = desc.seq_len;
    acmoe__lm_moe_defaults(&desc);
    for (i = 0; desc.pattern[i]; i++) {
        acmoe_moe_desc probe;
        char c = desc.pattern[i];
        memset(&probe, 0, sizeof probe);
        if (c == '|') { /* a new stage: its labels start afresh, and no stage is empty */
            if (i == 0 || desc.pattern[i - 1] == '|' || !desc.pattern[i + 1]) return ACMOE_ERR_ARG;
            seen_moe = 0;
            continue;
        }
        if (c == 'f') continue;
        if (acmoe_moe_router_preset(&probe, c) != ACMOE_OK) return ACMOE_ERR_ARG;
        if (!seen_moe && probe.router_input == ACMOE_INPUT_AC) return ACMOE_ERR_ARG; /* no labels yet */
        seen_moe = 1;
    }
    strcpy(pattern, desc.pattern);
    desc.pattern = pattern;
    *out = desc;
    return ACMOE_OK;
}

ACMOE_API void acmoe_lm_destroy(acmoe_lm *model) {
    int i;
    if (!model) return;
    for (i = 0; i < model->n_layers; i++) acmoe_moe_destroy(model->blocks[i].moe);
    acmoe__aligned_free(model->params);
    acmoe__aligned_free(model->memory);
    ACMOE_FREE(model->dir.entries);
    ACMOE_FREE(model);
}

static void acmoe__lm_init(acmoe_lm *model) {
    const size_t d = (size_t)model->desc.d_model, top = (size_t)acmoe__top_width(model);
    acmoe_rng *rng = &model->rng;
    size_t i;
    int l;
    if (model->desc.n_classes) {
        acmoe__init_uniform(rng, model->patch_w, d * model->desc.patch_dim, model->desc.patch_dim);
        acmoe__init_uniform(rng, model->patch_b, d, model->desc.patch_dim);
        for (i = 0; i < (size_t)model->desc.n_classes * top; i++) model->head[i] = 0.02f * acmoe_rng_normal(rng);
    } else {
        for (i = 0; i < (size_t)model->desc.vocab * d; i++) model->tok_emb[i] = 0.02f * acmoe_rng_normal(rng);
    }
    for (i = 0; model->pos_emb && i < (size_t)model->desc.seq_len * d; i++) model->pos_emb[i] = 0.02f * acmoe_rng_normal(rng);
    for (i = 0; model->pn_g && i < d; i++) model->pn_g[i] = 1.0f;
    for (l = 0; l < model->n_layers; l++) {
        acmoe__block *block = &model->blocks[l];
        const size_t w = (size_t)block->width, span = 2 * (size_t)block->window - 1;
        acmoe__init_uniform(rng, block->w_qkv, 3 * w * w, (int)w);
        acmoe__init_uniform(rng, block->w_o, w * w, (int)w);
        for (i = 0; block->window && i < span * span * (size_t)block->heads; i++) block->rel_bias[i] = 0.02f * acmoe_rng_normal(rng);
        for (i = 0; i < w; i++) block->ln1_g[i] = block->ln2_g[i] = 1.0f;
        acmoe_moe_init_params(block->moe, rng);
        if (l + 1 < model->n_layers && block[1].stage != block->stage) { /* the merge after this stage */
            acmoe__merge *merge = &model->merges[block->stage];
            acmoe__init_uniform(rng, merge->w, 2 * w * 4 * w, 4 * (int)w);
            for (i = 0; i < 4 * w; i++) merge->ln_g[i] = 1.0f;
        }
    }
    for (i = 0; model->lnf_g && i < top; i++) model->lnf_g[i] = 1.0f;
    if (model->desc.untied_head)
        for (i = 0; i < (size_t)model->desc.vocab * d; i++) model->head[i] = 0.02f * acmoe_rng_normal(rng);
}

/* The model's resolved options, layers and parameter directory, without parameters or
   activations: all a checkpoint is checked against before anything large is allocated. */
static acmoe_status acmoe__lm_plan(acmoe_lm **out, const acmoe_lm_desc *desc) {
    acmoe_lm *model = (acmoe_lm *)ACMOE_MALLOC(sizeof *model);
    acmoe_status s;
    int i;
    *out = NULL;
    if (!model) return ACMOE_ERR_NOMEM;
    memset(model, 0, sizeof *model);
    s = acmoe__lm_resolve(desc, &model->desc, model->pattern);
    if (s == ACMOE_OK) acmoe__lm_geometry(model);
    for (i = 0; s == ACMOE_OK && i < model->n_layers; i++) {
        acmoe_moe_desc md = acmoe__lm_moe_desc(model, &model->blocks[i]);
        if (!acmoe_moe_param_count(&md)) s = ACMOE_ERR_ARG; /* the MoE options do not fit these sizes */
    }
    if (s == ACMOE_OK) {
        model->n_params = acmoe__lm_params(model); /* counts parameters and directory entries */
        if (model->n_params > (size_t)INT32_MAX) s = ACMOE_ERR_SHAPE; /* a checkpoint's shapes are int */
    }
    if (s == ACMOE_OK) {
        model->dir.entries = (acmoe__tensor_info *)ACMOE_MALLOC(sizeof(acmoe__tensor_info) * (size_t)model->dir.count);
        s = model->dir.entries ? ACMOE_OK : ACMOE_ERR_NOMEM;
    }
    if (s != ACMOE_OK) {
        acmoe_lm_destroy(model);
        return s;
    }
    acmoe__lm_params(model); /* names and shapes only: no parameters yet */
    *out = model;
    return ACMOE_OK;
}

/* Parameters, layers and activations for a planned model, all zero. */
static acmoe_status acmoe__lm_build(acmoe_lm *model) {
    size_t bytes;
    int i;
    model->params = (float *)acmoe__aligned_alloc(4 * model->n_params * sizeof(float));
    /* attention scratch for each CPU, or each (sequence, head) pair if there are fewer */
    model->att_slots = ACMOE__MIN(model->desc.batch * model->desc.n_heads, acmoe__online_cpus());
    model->activation_bytes = bytes = acmoe__lm_activations(model, NULL);
    model->memory = acmoe__aligned_alloc(bytes);
    if (!model->params || !model->memory) return ACMOE_ERR_NOMEM;
    memset(model->params, 0, 4 * model->n_params * sizeof(float));
    model->grads = model->params + model->n_params;
    model->adam_m = model->grads + model->n_params;
    model->adam_v = model->adam_m + model->n_params;
    acmoe__lm_params(model);
    for (i = 0; i < model->n_layers; i++)
        if (!model->blocks[i].moe) return ACMOE_ERR_NOMEM;
    memset(model->memory, 0, bytes);
    acmoe__lm_activations(model, (unsigned char *)model->memory);
    acmoe_rng_seed(&model->rng, model->desc.seed);
    return ACMOE_OK;
}

ACMOE_API acmoe_status acmoe_lm_create(acmoe_lm **out, const acmoe_lm_desc *desc) {
    acmoe_lm *model;
    acmoe_status s;
    if (!out || !desc) return ACMOE_ERR_NULL;
    s = acmoe__lm_plan(out, desc);
    if (s != ACMOE_OK) return s;
    model = *out;
    s = acmoe__lm_build(model);
    if (s != ACMOE_OK) {
        acmoe_lm_destroy(model);
        *out = NULL;
        return s;
    }
    acmoe__lm_init(model);
    return ACMOE_OK;
}

ACMOE_API acmoe_status acmoe_lm_resolve(const acmoe_lm_desc *desc, acmoe_lm_desc *out) {
    acmoe_lm *model;
    acmoe_status s;
    if (!desc) return ACMOE_ERR_NULL;
    s = acmoe__lm_plan(&model, desc);
    if (s != ACMOE_OK) return s;
    if (out) {
        *out = model->desc;
        out->pattern = desc->pattern ? desc->pattern : "ggc"; /* the plan's copy goes with it */
    }
    acmoe_lm_destroy(model);
    return ACMOE_OK;
}

ACMOE_API acmoe_lm_desc acmoe_lm_settings(const acmoe_lm *model) {
    acmoe_lm_desc none;
    if (model) return model->desc;
    memset(&none, 0, sizeof none);
    return none;
}
ACMOE_API size_t acmoe_lm_param_count(const acmoe_lm *model) { return model ? model->n_params : 0; }
ACMOE_API float *acmoe_lm_params(acmoe_lm *model) { return model ? model->params : NULL; }
ACMOE_API float *acmoe_lm_grads(acmoe_lm *model) { return model ? model->grads : NULL; }

ACMOE_API float *acmoe_lm_tensor(acmoe_lm *model, const char *name, size_t *count) {
    int i;
    if (!model || !name) return NULL;
    for (i = 0; i < model->dir.count; i++) {
        if (strcmp(model->dir.entries[i].name, name)) continue;
        if (count) *count = model->dir.entries[i].count;
        return model->params + model->dir.entries[i].offset;
    }
    return NULL;
}
ACMOE_API const float *acmoe_lm_logits(const acmoe_lm *model) { return model ? model->logits : NULL; }
ACMOE_API int acmoe_lm_n_layers(const acmoe_lm *model) { return model ? model->n_layers : 0; }

ACMOE_API acmoe_lm_times acmoe_lm_last_times(const acmoe_lm *model) {
    acmoe_lm_times times;
    int i;
    memset(&times, 0, sizeof times);
    if (!model) return times;
    times.attention = model->seconds_attention;
    for (i = 0; i < model->n_layers; i++) {
        times.routing += model->blocks[i].moe->seconds_routing;
        times.experts += model->blocks[i].moe->seconds_experts;
    }
    return times;
}

ACMOE_API acmoe_moe *acmoe_lm_moe(acmoe_lm *model, int layer) {
    return model && layer >= 0 && layer < model->n_layers ? model->blocks[layer].moe : NULL;
}

ACMOE_API void acmoe_lm_freeze_ac_weights(acmoe_lm *model, int frozen) {
    int i;
    for (i = 0; model && i < model->n_layers; i++) acmoe_moe_freeze_ac_weights(model->blocks[i].moe, frozen);
}

ACMOE_API void acmoe_lm_memory(const acmoe_lm *model, size_t *params, size_t *grads, size_t *optimizer,
                               size_t *activations) {
    size_t bytes = model ? model->n_params * sizeof(float) : 0, moe = 0;
    int i;
    for (i = 0; model && i < model->n_layers; i++) moe += acmoe__moe_memory_bytes(model->blocks[i].moe);
    if (params) *params = bytes;
    if (grads) *grads = bytes;
    if (optimizer) *optimizer = 2 * bytes;
    if (activations) *activations = model ? model->activation_bytes + moe : 0;
}

ACMOE_API void acmoe_lm_zero_grad(acmoe_lm *model) {
    if (model) memset(model->grads, 0, model->n_params * sizeof(float));
}

/* Dropout on x [count] in training: keep with probability 1 - p, scaled by 1 / (1 - p). */
static void acmoe__dropout(acmoe_lm *model, float *x, unsigned char *keep, size_t count) {
    const float p = model->desc.dropout, scale = 1.0f / (1.0f - p);
    size_t i;
    for (i = 0; i < count; i++) {
        keep[i] = acmoe_rng_uniform(&model->rng) >= p;
        x[i] = keep[i] ? x[i] * scale : 0.0f;
    }
}

/* The gradient through dropout: dy itself when nothing was dropped, else written to dx. */
static const float *acmoe__dropout_backward(const acmoe_lm *model, const float *dy, const unsigned char *keep, float *dx,
                                           size_t count) {
    const float scale = 1.0f / (1.0f - model->desc.dropout);
    size_t i;
    if (!model->dropped) return dy;
    for (i = 0; i < count; i++) dx[i] = keep[i] ? dy[i] * scale : 0.0f;
    return dx;
}

/* Element-wise passes over a [rows][cols] array split across threads by rows; the bias
   gradient, a sum over rows, by blocks of rows (or by columns when there is no room for the
   partials). Every element gets the same arithmetic whatever the thread count. */
typedef enum {
    ACMOE__ROWS_ADD,        /* y = a + b */
    ACMOE__ROWS_ACCUMULATE, /* y += a */
    ACMOE__ROWS_ADD_BIAS,   /* y[r] += a, a bias of cols */
    ACMOE__ROWS_BIAS_GRAD   /* y += the sum of the rows of a; y has cols */
} acmoe__rows_op;

typedef struct acmoe__rows_job {
    const acmoe__kernel *kern;
    acmoe__rows_op op;
    float *y;
    const float *a, *b;
    float *partials; /* the bias gradient's, per block; NULL: split by columns */
    int rows, cols;
} acmoe__rows_job;

/* The bias gradient's share of a thread: its blocks' partial sums, or its columns' sums. */
static void acmoe__bias_grad_share(const acmoe__rows_job *j, int tid, int n_threads) {
    const size_t cols = (size_t)j->cols;
    int b, b0, b1, r;
    if (!j->partials) {
        const int q0 = (int)((long)j->cols * tid / n_threads), q1 = (int)((long)j->cols * (tid + 1) / n_threads);
        for (r = 0; r < j->rows; r++) j->kern->row_axpy(j->y + q0, j->a + (size_t)r * cols + q0, q1 - q0, 1.0f);
        return;
    }
    acmoe__thread_blocks(tid, n_threads, ACMOE__SUM_BLOCKS, &b0, &b1);
    for (b = b0; b < b1; b++) {
        float *sum = j->partials + (size_t)b * cols;
        const int r1 = acmoe__block_row(j->rows, b + 1, ACMOE__SUM_BLOCKS);
        memset(sum, 0, sizeof(float) * cols);
        for (r = acmoe__block_row(j->rows, b, ACMOE__SUM_BLOCKS); r < r1; r++)
            j->kern->row_axpy(sum, j->a + (size_t)r * cols, j->cols, 1.0f);
    }
}

static void acmoe__rows_job_run(void *arg, int tid, int n_threads) {
    const acmoe__rows_job *j = (const acmoe__rows_job *)arg;
    const int k0 = (int)((long)j->rows * tid / n_threads), k1 = (int)((long)j->rows * (tid + 1) / n_threads);
    const size_t i0 = (size_t)k0 * j->cols, i1 = (size_t)k1 * j->cols;
    size_t i;
    int r;
    switch (j->op) {
    case ACMOE__ROWS_ADD:
        for (i = i0; i < i1; i++) j->y[i] = j->a[i] + j->b[i];
        break;
    case ACMOE__ROWS_ACCUMULATE:
        for (r = k0; r < k1; r++) j->kern->row_axpy(j->y + (size_t)r * j->cols, j->a + (size_t)r * j->cols, j->cols, 1.0f);
        break;
    case ACMOE__ROWS_ADD_BIAS:
        acmoe__add_bias(j->kern, j->y + i0, k1 - k0, j->cols, j->a);
        break;
    case ACMOE__ROWS_BIAS_GRAD:
        acmoe__bias_grad_share(j, tid, n_threads);
        break;
    }
}

static void acmoe__rows(acmoe_ctx *ctx, acmoe__rows_op op, float *y, const float *a, const float *b, int rows,
                        int cols) {
    acmoe__rows_job j;
    j.kern = &ctx->kernel, j.op = op, j.y = y, j.a = a, j.b = b, j.rows = rows, j.cols = cols;
    j.partials = op == ACMOE__ROWS_BIAS_GRAD ? acmoe__sum_partials(ctx, ACMOE__SUM_BLOCKS, 1, cols) : NULL;
    acmoe__pool_run(&ctx->pool, acmoe__threads_for(ctx, (double)rows * cols), acmoe__rows_job_run, &j);
    if (j.partials) acmoe__add_partials(j.kern, y, j.partials, ACMOE__SUM_BLOCKS, cols, (size_t)cols);
}

/* ---- Swin: attention inside shifted windows, and patch merging ---- */

/* The row of the patch at place p of window w of image b: windows and places row by row
   in the grid rolled back by the shift. */
static size_t acmoe__window_row(const acmoe__block *block, int b, int w, int p) {
    const int per_side = block->grid / block->window;
    const int y = ((w / per_side) * block->window + p / block->window + block->shift) % block->grid;
    const int x = ((w % per_side) * block->window + p % block->window + block->shift) % block->grid;
    return (size_t)b * block->tokens + (size_t)y * block->grid + (size_t)x;
}

/* The region of a coordinate of the rolled grid: in the last window, the patches before and
   after grid - shift came from opposite sides of the image. */
static int acmoe__window_region(const acmoe__block *block, int rolled) {
    if (!block->shift || rolled < block->grid - block->window) return 0;
    return rolled < block->grid - block->shift ? 1 : 2;
}

/* Where the relative position of places i and j sits in the bias table. */
static int acmoe__window_offset(const acmoe__block *block, int i, int j) {
    const int ws = block->window;
    return (i / ws - j / ws + ws - 1) * (2 * ws - 1) + (i % ws - j % ws + ws - 1);
}

/* What a score of place i against place j of window w (of an image) gets added: head h's
   relative position bias, and -100 between regions of a shifted window (the reference's
   mask). */
static float acmoe__window_bias(const acmoe__block *block, int w, int i, int j, int h) {
    const int ws = block->window, per_side = block->grid / ws;
    float bias = block->rel_bias[(size_t)acmoe__window_offset(block, i, j) * block->heads + h];
    if (block->shift) {
        const int y0 = (w / per_side) * ws, x0 = (w % per_side) * ws;
        const int ri = acmoe__window_region(block, y0 + i / ws) * 3 + acmoe__window_region(block, x0 + i % ws);
        const int rj = acmoe__window_region(block, y0 + j / ws) * 3 + acmoe__window_region(block, x0 + j % ws);
        if (ri != rj) bias -= 100.0f;
    }
    return bias;
}

typedef struct acmoe__window_job {
    acmoe_lm *model;
    acmoe__block *block;
    int backward;
} acmoe__window_job;

static int acmoe__windows_per_image(const acmoe__block *block) { return (block->grid / block->window) * (block->grid / block->window); }

static float acmoe__dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
    int i;
    for (i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* One head of one window: the probabilities p [area][area] and the output rows. */
static void acmoe__window_head(acmoe__block *block, const size_t *rows, int w, int h, float *p) {
    const int area = block->window * block->window, d = block->width, dh = d / block->heads;
    const float scale = 1.0f / sqrtf((float)dh);
    int i, j, q;
    for (i = 0; i < area; i++) {
        const float *qi = block->qkv + rows[i] * 3 * d + (size_t)h * dh;
        float *pi = p + (size_t)i * area, top = -INFINITY, sum = 0.0f, *out = block->att + rows[i] * d + (size_t)h * dh;
        for (j = 0; j < area; j++) {
            pi[j] = acmoe__dot(qi, block->qkv + rows[j] * 3 * d + d + (size_t)h * dh, dh) * scale +
                    acmoe__window_bias(block, w, i, j, h);
            top = ACMOE__MAX(top, pi[j]);
        }
        for (j = 0; j < area; j++) sum += pi[j] = expf(pi[j] - top);
        for (j = 0; j < area; j++) pi[j] /= sum;
        for (q = 0; q < dh; q++) out[q] = 0.0f;
        for (j = 0; j < area; j++)
            for (q = 0; q < dh; q++) out[q] += pi[j] * block->qkv[rows[j] * 3 * d + 2 * (size_t)d + (size_t)h * dh + q];
    }
}


/* One head of one window backward, from the output gradients in model->datt: the score
   gradients ds (kept for the bias gradient) and the head's q, k, v gradients, written. */
static void acmoe__window_head_backward(acmoe_lm *model, acmoe__block *block, const size_t *rows, int h, const float *p,
                                        float *ds) {
    const int area = block->window * block->window, d = block->width, dh = d / block->heads;
    const float scale = 1.0f / sqrtf((float)dh);
    const size_t col = (size_t)h * dh;
    int i, j, q;
    for (i = 0; i < area; i++) {
        const float *g = model->datt + rows[i] * d + col, *pi = p + (size_t)i * area;
        float *dsi = ds + (size_t)i * area, mean = 0.0f;
        for (j = 0; j < area; j++) mean += pi[j] * (dsi[j] = acmoe__dot(g, block->qkv + rows[j] * 3 * d + 2 * (size_t)d + col, dh));
        for (j = 0; j < area; j++) dsi[j] = pi[j] * (dsi[j] - mean);
    }
    for (i = 0; i < area; i++) { /* dq_i = scale sum_j ds_ij k_j, dk_i = scale sum_j ds_ji q_j, dv_i = sum_j p_ji g_j */
        float *dq = model->dqkv + rows[i] * 3 * d + col, *dk = dq + d, *dv = dq + 2 * d;
        for (q = 0; q < dh; q++) dq[q] = dk[q] = dv[q] = 0.0f;
        for (j = 0; j < area; j++) {
            const float *qj = block->qkv + rows[j] * 3 * d + col, *kj = qj + d, *gj = model->datt + rows[j] * d + col;
            const float a = ds[(size_t)i * area + j] * scale, b = ds[(size_t)j * area + i] * scale, c = p[(size_t)j * area + i];
            for (q = 0; q < dh; q++) dq[q] += a * kj[q], dk[q] += b * qj[q], dv[q] += c * gj[q];
        }
    }
}

/* The windows split across threads, each window's heads on one thread, forward or backward. */
static void acmoe__window_job_run(void *arg, int tid, int n_threads) {
    const acmoe__window_job *job = (const acmoe__window_job *)arg;
    acmoe__block *block = job->block;
    const int area = block->window * block->window, per = acmoe__windows_per_image(block), windows = job->model->batch * per;
    size_t rows[ACMOE__MAX_WINDOW * ACMOE__MAX_WINDOW];
    int w, h, i;
    for (w = (int)((long)windows * tid / n_threads); w < (int)((long)windows * (tid + 1) / n_threads); w++) {
        for (i = 0; i < area; i++) rows[i] = acmoe__window_row(block, w / per, w % per, i);
        for (h = 0; h < block->heads; h++) {
            const size_t at = ((size_t)w * block->heads + h) * area * area;
            if (job->backward) acmoe__window_head_backward(job->model, block, rows, h, block->probs + at, job->model->att_ds + at);
            else acmoe__window_head(block, rows, w % per, h, block->probs + at);
        }
    }
}

static void acmoe__window_attention(acmoe_ctx *ctx, acmoe_lm *model, acmoe__block *block) {
    acmoe__window_job job;
    job.model = model, job.block = block, job.backward = 0;
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__window_job_run, &job);
}

/* The backward pass of the window attention: dqkv from datt, then the bias gradient summed
   window by window in order (the same bits for any thread count). */
static void acmoe__window_attention_backward(acmoe_ctx *ctx, acmoe_lm *model, acmoe__block *block) {
    const int area = block->window * block->window, windows = model->batch * acmoe__windows_per_image(block);
    acmoe__window_job job;
    int w, h, i, j;
    job.model = model, job.block = block, job.backward = 1;
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__window_job_run, &job);
    for (w = 0; w < windows; w++)
        for (h = 0; h < block->heads; h++) {
            const float *ds = model->att_ds + ((size_t)w * block->heads + h) * area * area;
            for (i = 0; i < area; i++)
                for (j = 0; j < area; j++)
                    block->g_rel_bias[(size_t)acmoe__window_offset(block, i, j) * block->heads + h] += ds[(size_t)i * area + j];
        }
}

/* The rows of merged patch r of the stage s grid (side `grid`, images of tokens patches):
   its 2 x 2 sources in the reference's order, (2y, 2x), (2y + 1, 2x), (2y, 2x + 1), (2y + 1,
   2x + 1). */
static void acmoe__merge_sources(int grid, int r, size_t *source) {
    const int half = grid / 2, b = r / (half * half), y = r / half % half, x = r % half;
    const size_t base = (size_t)b * grid * grid;
    source[0] = base + (size_t)(2 * y) * grid + 2 * x, source[1] = source[0] + grid;
    source[2] = source[0] + 1, source[3] = source[1] + 1;
}

/* Patch merging after stage s, from its output rows x: concatenate, normalise, reduce. */
static acmoe_status acmoe__merge_forward(acmoe_ctx *ctx, acmoe_lm *model, int s, const float *x) {
    acmoe__merge *merge = &model->merges[s];
    const acmoe__block *from = acmoe__stage_first(model, s);
    const int c = from->width, rows = model->batch * (from->grid / 2) * (from->grid / 2);
    size_t source[4];
    int r, k;
    for (r = 0; r < rows; r++) {
        acmoe__merge_sources(from->grid, r, source);
        for (k = 0; k < 4; k++)
            memcpy(merge->cat + ((size_t)r * 4 + k) * c, x + source[k] * c, sizeof(float) * (size_t)c);
    }
    acmoe__layernorm(ctx, merge->cat, NULL, rows, 4 * c, merge->ln_g, merge->ln_b, merge->xhat, merge->rstd, merge->normed);
    return acmoe_matmul(ctx, ACMOE_NT, rows, 2 * c, 4 * c, merge->normed, 4 * c, merge->w, 4 * c, merge->out, 2 * c, 0);
}

/* Its backward pass: from dy (of out) to dx (of stage s's output rows), through t2 and t3. */
static acmoe_status acmoe__merge_backward(acmoe_ctx *ctx, acmoe_lm *model, int s, const float *dy, float *dx) {
    acmoe__merge *merge = &model->merges[s];
    const acmoe__block *from = acmoe__stage_first(model, s);
    const int c = from->width, rows = model->batch * (from->grid / 2) * (from->grid / 2);
    float *dnormed = model->t2, *dcat = model->t3;
    size_t source[4];
    int r, k;
    acmoe_status st = acmoe_matmul(ctx, ACMOE_TN, 2 * c, 4 * c, rows, dy, 2 * c, merge->normed, 4 * c, merge->g_w, 4 * c, 1);
    if (st == ACMOE_OK) st = acmoe_matmul(ctx, ACMOE_NN, rows, 4 * c, 2 * c, dy, 2 * c, merge->w, 4 * c, dnormed, 4 * c, 0);
    if (st != ACMOE_OK) return st;
    acmoe__layernorm_backward(ctx, dnormed, merge->xhat, merge->rstd, rows, 4 * c, merge->ln_g, merge->g_ln_g, merge->g_ln_b, dcat, NULL);
    for (r = 0; r < rows; r++) {
        acmoe__merge_sources(from->grid, r, source);
        for (k = 0; k < 4; k++)
            memcpy(dx + source[k] * c, dcat + ((size_t)r * 4 + k) * c, sizeof(float) * (size_t)c);
    }
    return ACMOE_OK;
}

/* Decoding a batch: the new rows' keys and values (qkv, position by position) into each
   sequence's cache in block->qkv, the keys transposed (acmoe__decoding_span), so that
   attention reads the keys of every step without transposing them again. */
static void acmoe__decoding_cache(const acmoe_lm *model, acmoe__block *block, const float *qkv) {
    const int d = block->width, seq_len = model->desc.seq_len, keys_ld = acmoe__pad_up(seq_len);
    int r, c;
    for (r = model->start; r < model->n; r++) {
        const int b = r % model->batch, pos = r / model->batch;
        const float *row = qkv + (size_t)(r - model->start) * 3 * d;
        float *cached = block->qkv + (size_t)b * acmoe__decoding_span(d, seq_len);
        for (c = 0; c < d; c++) cached[(size_t)c * keys_ld + pos] = row[d + c];
        memcpy(cached + (size_t)d * keys_ld + (size_t)pos * d, row + 2 * d, sizeof(float) * (size_t)d);
    }
}

/* One block forward over rows [model->start, model->n) (rows before it are kept from the last call);
   prev carries the last MoE layer's routing to the next. */
static acmoe_status acmoe__block_forward(acmoe_lm *model, acmoe_ctx *ctx, acmoe__block *block, const float *x,
                                         acmoe_moe_stats *prev, int *have_prev) {
    const int d = block->width, r0 = model->start, rows = block->n - r0, pre = model->desc.pre_ln;
    const size_t o = (size_t)r0 * d, count = (size_t)rows * d;
    acmoe__epilogue qkv_bias, o_bias;
    acmoe_status s;
    double mark;
    block->x_in = x;
    if (pre)
        acmoe__layernorm(ctx, x + o, NULL, rows, d, block->ln1_g, block->ln1_b, block->xhat1 + o, block->rstd1 + r0, block->attn_in + o);
    float *qkv = model->interleaved ? model->dqkv : block->qkv + 3 * o; /* decoding: the new rows, then the cache */
    s = acmoe__matmul_then(ctx, ACMOE_NT, rows, 3 * d, d, (pre ? block->attn_in : x) + o, d, block->w_qkv, d, qkv,
                           3 * d, 0, acmoe__bias_epilogue(&qkv_bias, block->b_qkv));
    if (s != ACMOE_OK) return s;
    if (model->interleaved) acmoe__decoding_cache(model, block, qkv);
    mark = acmoe__clock_start(ctx);
    if (block->window) acmoe__window_attention(ctx, model, block);
    else if (model->interleaved)
        acmoe__attention_forward(ctx, qkv, model->batch, model->seq, block->qkv, model->desc.seq_len, r0 / model->batch,
                                 1, d, block->heads, model->att_work, model->att_slots, block->att, NULL);
    else
        acmoe__attention_forward(ctx, block->qkv, model->batch, model->seq, NULL, 0, r0, !model->desc.n_classes, d,
                                 block->heads, model->att_work, model->att_slots, block->att, block->att_stats);
    acmoe__lap(ctx, &mark, &model->seconds_attention);
    s = acmoe__matmul_then(ctx, ACMOE_NT, rows, d, d, block->att + o, d, block->w_o, d, block->a + o, d, 0,
                           acmoe__bias_epilogue(&o_bias, block->b_o));
    if (s != ACMOE_OK) return s;
    if (model->dropped) acmoe__dropout(model, block->a + o, block->keep_a + o, count);
    if (pre) {
        acmoe__rows(ctx, ACMOE__ROWS_ADD, block->h + o, x + o, block->a + o, rows, d);
        acmoe__layernorm(ctx, block->h + o, NULL, rows, d, block->ln2_g, block->ln2_b, block->xhat2 + o, block->rstd2 + r0, block->moe_in + o);
    } else {
        acmoe__layernorm(ctx, x + o, block->a + o, rows, d, block->ln1_g, block->ln1_b, block->xhat1 + o, block->rstd1 + r0, block->h + o);
    }
    acmoe__moe_set_seq_len(block->moe, model->desc.window ? block->tokens : model->seq); /* groups follow this call's sequences */
    acmoe_moe_set_training(block->moe, model->training, &model->rng);
    s = acmoe_moe_forward(block->moe, ctx, (pre ? block->moe_in : block->h) + o, rows, *have_prev ? prev->expert_index : NULL,
                          *have_prev ? prev->gate : NULL, *have_prev ? prev->top_k : 0, block->m + o);
    if (s != ACMOE_OK) return s;
    if (block->letter != 'f') *prev = acmoe__moe_routing_stats(block->moe), *have_prev = 1;
    if (model->dropped) acmoe__dropout(model, block->m + o, block->keep_m + o, count);
    if (pre) acmoe__rows(ctx, ACMOE__ROWS_ADD, block->y + o, block->h + o, block->m + o, rows, d);
    else acmoe__layernorm(ctx, block->h + o, block->m + o, rows, d, block->ln2_g, block->ln2_b, block->xhat2 + o, block->rstd2 + r0, block->y + o);
    return ACMOE_OK;
}

/* A forward call over batch sequences of seq positions, from position start of each (start > 0
   with one sequence, or interleaved). */
static void acmoe__lm_begin(acmoe_lm *model, int batch, int seq, int start, int interleaved, int train) {
    model->batch = batch, model->seq = seq, model->n = batch * seq;
    model->interleaved = interleaved, model->start = interleaved ? start * batch : start;
    model->cached = 0;
    model->d_embedded = NULL;
    model->cache_step = -1; /* no decoding from these activations unless this call succeeds */
    model->dropped = train && model->desc.dropout > 0.0f;
    model->training = train != 0;
}

/* The blocks from the embedded rows x0, and the final norm with pre-LN: *top is the last
   rows, *aux the MoE layers' auxiliary losses. */
static acmoe_status acmoe__lm_trunk(acmoe_lm *model, acmoe_ctx *ctx, const float **top, float *aux) {
    const int d = acmoe__top_width(model), start = model->start;
    acmoe_moe_stats prev;
    const float *x = model->x0;
    int i, have_prev = 0, rows;
    acmoe_status s = ACMOE_OK;
    memset(&prev, 0, sizeof prev);
    *aux = 0.0f;
    model->seconds_attention = 0.0;
    for (i = 0; i < model->n_layers && s == ACMOE_OK; i++) {
        acmoe__block *block = &model->blocks[i];
        block->n = model->desc.window ? model->batch * block->tokens : model->n;
        if (i > 0 && block->stage != block[-1].stage) { /* Swin: merge the patches; labels start afresh */
            s = acmoe__merge_forward(ctx, model, block[-1].stage, x);
            if (s != ACMOE_OK) return s;
            x = model->merges[block[-1].stage].out;
            have_prev = 0;
        }
        s = acmoe__block_forward(model, ctx, block, x, &prev, &have_prev);
        x = block->y;
        *aux += acmoe__moe_aux_loss(block->moe);
    }
    if (s != ACMOE_OK) return s;
    rows = model->blocks[model->n_layers - 1].n;
    if (model->desc.pre_ln) {
        acmoe__layernorm(ctx, x + (size_t)start * d, NULL, rows - start, d, model->lnf_g, model->lnf_b,
                         model->xhatf + (size_t)start * d, model->rstdf + start, model->yf + (size_t)start * d);
        x = model->yf;
    }
    *top = x;
    return ACMOE_OK;
}

/* The row of position pos of sequence b in the last forward call's layout. */
static size_t acmoe__lm_row(const acmoe_lm *model, int b, int pos) {
    return model->interleaved ? (size_t)pos * model->batch + b : (size_t)b * model->seq + pos;
}

/* The first layer's input, rows [start, n) split across threads: a token's embedding plus
   its position's; or, for a vision encoder, x0 holding the patches' projections, plus the
   patch bias and the position's embedding. Row i is at position i / batch when interleaved,
   else i % seq. */
typedef struct acmoe__embed_job {
    acmoe_lm *model;
    int batch, seq, interleaved;
} acmoe__embed_job;

static void acmoe__embed_job_run(void *arg, int tid, int n_threads) {
    const acmoe__embed_job *j = (const acmoe__embed_job *)arg;
    const acmoe_lm *model = j->model;
    const int d = model->desc.d_model, rows = model->n - model->start;
    const int i1 = model->start + (int)((long)rows * (tid + 1) / n_threads);
    int i, q;
    for (i = model->start + (int)((long)rows * tid / n_threads); i < i1; i++) {
        const float *pe = model->pos_emb + (size_t)(j->interleaved ? i / j->batch : i % j->seq) * d;
        float *x = model->x0 + (size_t)i * d;
        if (model->desc.n_classes) {
            for (q = 0; q < d; q++) x[q] += model->patch_b[q] + pe[q];
        } else {
            const float *te = model->tok_emb + (size_t)model->tokens[i] * d;
            for (q = 0; q < d; q++) x[q] = te[q] + pe[q];
        }
    }
}

static void acmoe__embed(acmoe_lm *model, acmoe_ctx *ctx, int batch, int seq, int interleaved) {
    acmoe__embed_job j;
    j.model = model, j.batch = batch, j.seq = seq, j.interleaved = interleaved;
    acmoe__pool_run(&ctx->pool, acmoe__threads_for(ctx, (double)(model->n - model->start) * model->desc.d_model),
                    acmoe__embed_job_run, &j);
}

/* The forward pass over positions [start, seq) of each sequence of tokens (sequence b's at
   tokens + b * ld); start > 0
   (decoding) keeps the activations of earlier positions from the last call. Interleaved, the
   rows go position by position, so that a decoding call's new rows lie together. */
static acmoe_status acmoe__lm_run(acmoe_lm *model, acmoe_ctx *ctx, const int32_t *tokens, const int32_t *targets,
                                  int ld, int batch, int seq, int start, int interleaved, int train, float *loss) {
    const int d = model->desc.d_model;
    const float *x;
    int i, b;
    float aux;
    acmoe_status s;
    for (b = 0; b < batch; b++)
        for (i = 0; i < seq; i++)
            if (tokens[(size_t)b * ld + i] < 0 || tokens[(size_t)b * ld + i] >= model->desc.vocab) return ACMOE_ERR_ARG;
    for (i = 0; targets && i < batch * seq; i++)
        if (targets[i] < 0 || targets[i] >= model->desc.vocab) return ACMOE_ERR_ARG;
    acmoe__lm_begin(model, batch, seq, start, interleaved, train);
    for (b = 0; b < batch; b++)
        for (i = 0; i < seq; i++) model->tokens[acmoe__lm_row(model, b, i)] = tokens[(size_t)b * ld + i];
    if (targets) memcpy(model->targets, targets, sizeof(int32_t) * (size_t)model->n);
    acmoe__embed(model, ctx, batch, seq, interleaved);
    s = acmoe__lm_trunk(model, ctx, &x, &aux);
    if (s != ACMOE_OK) return s;
    start = model->start;
    s = acmoe_matmul(ctx, ACMOE_NT, model->n - start, model->desc.vocab, d, x + (size_t)start * d, d, model->head, d,
                     model->logits + (size_t)start * model->desc.vocab, model->desc.vocab, 0);
    if (s != ACMOE_OK) return s;
    model->cache_step = model->steps;
    if (targets) {
        *loss = acmoe__cross_entropy(ctx, model->logits, model->targets, model->n, model->desc.vocab, 0, model->row_loss) + aux;
        model->cached = 1;
    }
    return ACMOE_OK;
}

ACMOE_API acmoe_status acmoe_lm_forward(acmoe_lm *model, acmoe_ctx *ctx, const int32_t *tokens,
                                        const int32_t *targets, int batch, int seq, int train,
                                        float *loss) {
    if (!model || !ctx || !tokens) return ACMOE_ERR_NULL;
    if (model->desc.n_classes) return ACMOE_ERR_ARG; /* a vision encoder takes patches */
    if (batch < 1 || seq < 1 || batch > model->desc.batch || seq > model->desc.seq_len) return ACMOE_ERR_SHAPE;
    if (targets && !loss) return ACMOE_ERR_NULL;
    return acmoe__lm_run(model, ctx, tokens, targets, seq, batch, seq, 0, 0, train, loss);
}

ACMOE_API acmoe_status acmoe_image_patches(const float *image, int height, int width, int channels, int patch,
                                           float *patches) {
    int py, px, r;
    size_t row;
    if (!image || !patches) return ACMOE_ERR_NULL;
    if (height < 1 || width < 1 || channels < 1 || patch < 1 || height % patch || width % patch) return ACMOE_ERR_SHAPE;
    row = (size_t)patch * channels; /* one patch row is contiguous in the image */
    for (py = 0; py < height / patch; py++)
        for (px = 0; px < width / patch; px++)
            for (r = 0; r < patch; r++, patches += row)
                memcpy(patches, image + (((size_t)py * patch + r) * width + (size_t)px * patch) * channels,
                       sizeof(float) * row);
    return ACMOE_OK;
}

/* A vision encoder's pooling, sequences split across threads: each sequence's mean row of x
   into pooled [batch][d], adding its rows in order; backward, each sequence's pooled gradient
   over its rows of dx. */
typedef struct acmoe__mean_job {
    const float *x;
    float *pooled, *dx;
    int batch, seq, d, backward;
} acmoe__mean_job;

static void acmoe__mean_job_run(void *arg, int tid, int n_threads) {
    const acmoe__mean_job *j = (const acmoe__mean_job *)arg;
    const size_t d = (size_t)j->d;
    int b, i, q, b1 = (int)((long)j->batch * (tid + 1) / n_threads);
    for (b = (int)((long)j->batch * tid / n_threads); b < b1; b++) {
        float *p = j->pooled + (size_t)b * d;
        for (i = 0; j->backward && i < j->seq; i++)
            for (q = 0; q < j->d; q++) j->dx[((size_t)b * j->seq + i) * d + q] = p[q] / (float)j->seq;
        if (j->backward) continue;
        memset(p, 0, sizeof(float) * d);
        for (i = 0; i < j->seq; i++)
            for (q = 0; q < j->d; q++) p[q] += j->x[((size_t)b * j->seq + i) * d + q];
        for (q = 0; q < j->d; q++) p[q] /= (float)j->seq;
    }
}

static void acmoe__mean_rows(acmoe_ctx *ctx, const float *x, int batch, int seq, int d, float *pooled, float *dx) {
    acmoe__mean_job j;
    j.x = x, j.pooled = pooled, j.dx = dx, j.batch = batch, j.seq = seq, j.d = d, j.backward = dx != NULL;
    acmoe__pool_run(&ctx->pool, acmoe__threads_for(ctx, (double)batch * seq * d), acmoe__mean_job_run, &j);
}

ACMOE_API acmoe_status acmoe_vision_forward(acmoe_lm *model, acmoe_ctx *ctx, const float *patches,
                                                const int32_t *labels, int batch, int train, float *loss) {
    int d, seq, pd, i;
    const float *top;
    float aux;
    acmoe_status s;
    if (!model || !ctx || !patches) return ACMOE_ERR_NULL;
    if (!model->desc.n_classes) return ACMOE_ERR_ARG; /* a language model takes tokens */
    if (batch < 1 || batch > model->desc.batch) return ACMOE_ERR_SHAPE;
    if (labels && !loss) return ACMOE_ERR_NULL;
    d = model->desc.d_model, seq = model->desc.seq_len, pd = model->desc.patch_dim;
    for (i = 0; labels && i < batch; i++)
        if (labels[i] < 0 || labels[i] >= model->desc.n_classes) return ACMOE_ERR_ARG;
    if (!acmoe__all_finite(patches, (size_t)batch * seq * pd)) return ACMOE_ERR_NONFINITE;
    acmoe__lm_begin(model, batch, seq, 0, 0, train);
    memcpy(model->patches, patches, sizeof(float) * (size_t)model->n * pd);
    if (labels) memcpy(model->targets, labels, sizeof(int32_t) * (size_t)batch);
    s = acmoe_matmul(ctx, ACMOE_NT, model->n, d, pd, model->patches, pd, model->patch_w, pd, model->desc.window ? model->embedded : model->x0,
                     d, 0);
    if (s != ACMOE_OK) return s;
    if (model->desc.window) { /* Swin: the patch norm, no position embedding */
        acmoe__rows(ctx, ACMOE__ROWS_ADD_BIAS, model->embedded, model->patch_b, NULL, model->n, d);
        acmoe__layernorm(ctx, model->embedded, NULL, model->n, d, model->pn_g, model->pn_b, model->pn_xhat, model->pn_rstd, model->x0);
    } else {
        acmoe__embed(model, ctx, batch, seq, 0);
    }
    s = acmoe__lm_trunk(model, ctx, &top, &aux);
    if (s != ACMOE_OK) return s;
    d = acmoe__top_width(model), seq = model->blocks[model->n_layers - 1].tokens;
    acmoe__mean_rows(ctx, top, batch, seq, d, model->pooled, NULL);
    s = acmoe_matmul(ctx, ACMOE_NT, batch, model->desc.n_classes, d, model->pooled, d, model->head, d, model->logits, model->desc.n_classes, 0);
    if (s != ACMOE_OK) return s;
    acmoe__add_bias(&ctx->kernel, model->logits, batch, model->desc.n_classes, model->head_b);
    if (labels) {
        *loss = acmoe__cross_entropy(ctx, model->logits, model->targets, batch, model->desc.n_classes, 0, model->row_loss) + aux;
        model->cached = 1;
    }
    return ACMOE_OK;
}

ACMOE_API int acmoe_lm_decode_ready(const acmoe_lm *model, char *why, size_t cap) {
    int i;
    if (why && cap) why[0] = '\0';
    if (!model) return 0;
    if (model->desc.n_classes) {
        if (why) snprintf(why, cap, "a vision encoder does not decode");
        return 0;
    }
    for (i = 0; i < model->n_layers; i++) {
        const char *reason = acmoe__moe_not_per_token(model->blocks[i].moe);
        if (!reason) continue;
        if (why) snprintf(why, cap, "layer %d (%s): %s", i + 1, acmoe_router_name(model->blocks[i].letter), reason);
        return 0;
    }
    return 1;
}

/* Whether the last forward call kept positions [0, start) of the batch sequences of tokens
   (sequence b's at tokens + b * ld): computed since the last optimizer step, from the same tokens, in a layout that
   puts new positions after them. */
static int acmoe__lm_kept(const acmoe_lm *model, const int32_t *tokens, int ld, int batch, int start) {
    int b, i;
    if (model->cache_step != model->steps || model->batch != batch || model->seq < start) return 0;
    if (batch > 1 && !model->interleaved) return 0;
    for (b = 0; b < batch; b++)
        for (i = 0; i < start; i++)
            if (model->tokens[acmoe__lm_row(model, b, i)] != tokens[(size_t)b * ld + i]) return 0;
    return 1;
}

ACMOE_API acmoe_status acmoe_lm_decode_batch(acmoe_lm *model, acmoe_ctx *ctx, const int32_t *tokens, int ld,
                                             int batch, int len, int start) {
    if (!model || !ctx || !tokens) return ACMOE_ERR_NULL;
    if (model->desc.n_classes) return ACMOE_ERR_ARG;
    if (batch < 1 || batch > model->desc.batch || len < 1 || len > model->desc.seq_len || start < 0 || start >= len ||
        ld < len)
        return ACMOE_ERR_SHAPE;
    if (start > 0 && !acmoe__lm_kept(model, tokens, ld, batch, start)) return ACMOE_ERR_ARG;
    if (!acmoe_lm_decode_ready(model, NULL, 0)) return ACMOE_ERR_ARG;
    return acmoe__lm_run(model, ctx, tokens, NULL, ld, batch, len, start, 1, 0, NULL);
}

ACMOE_API acmoe_status acmoe_lm_decode(acmoe_lm *model, acmoe_ctx *ctx, const int32_t *tokens, int len, int start) {
    return acmoe_lm_decode_batch(model, ctx, tokens, len, 1, len, start);
}

ACMOE_API const float *acmoe_lm_position_logits(const acmoe_lm *model, int sequence, int position) {
    if (!model || model->desc.n_classes || sequence < 0 || sequence >= model->batch || position < 0 ||
        position >= model->seq)
        return NULL;
    return model->logits + acmoe__lm_row(model, sequence, position) * (size_t)model->desc.vocab;
}

/* Floats as unsigned integers in the same order (the negative ones reversed below the rest). */
static uint32_t acmoe__float_order(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

/* The largest key (acmoe__float_order) among v's n values such that the values at or above
   it weigh at least need, each weighing 1, or its value with by_value: the k-th largest for
   need k, the nucleus of top-p for need p times the sum. Bisection on the keys, 32 passes at
   most, so any vocabulary takes no scratch. */
static uint32_t acmoe__cut_key(const float *v, int n, double need, int by_value) {
    uint32_t lo = UINT32_MAX, hi = 0;
    int j;
    for (j = 0; j < n; j++) {
        const uint32_t key = acmoe__float_order(v[j]);
        lo = ACMOE__MIN(lo, key), hi = ACMOE__MAX(hi, key);
    }
    while (lo < hi) { /* every value weighs at least need at or above lo */
        const uint32_t mid = lo + (hi - lo) / 2 + 1;
        double weight = 0.0;
        for (j = 0; j < n; j++)
            if (acmoe__float_order(v[j]) >= mid) weight += by_value ? (double)v[j] : 1.0;
        if (weight >= need) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* work[j] = e^((logits[j] - top) / temperature) where logits[j]'s key is at least cut, else
   0; returns their sum. */
static double acmoe__sample_weights(const float *logits, int vocab, float top, float temperature, uint32_t cut,
                                    float *work) {
    double total = 0.0;
    int j;
    for (j = 0; j < vocab; j++) {
        work[j] = acmoe__float_order(logits[j]) >= cut ? expf((logits[j] - top) / temperature) : 0.0f;
        total += work[j];
    }
    return total;
}

ACMOE_API acmoe_status acmoe_sample(const float *logits, int vocab, float temperature, int top_k, float top_p,
                                    float *work, acmoe_rng *rng, int32_t *token) {
    uint32_t cut = 0;
    double total, r;
    int j, best = 0;
    if (!logits || !work || !rng || !token) return ACMOE_ERR_NULL;
    if (vocab < 1 || !(temperature >= 0.0f) || top_k < 0 || !(top_p > 0.0f && top_p <= 1.0f)) return ACMOE_ERR_ARG;
    if (!acmoe__all_finite(logits, (size_t)vocab)) return ACMOE_ERR_NONFINITE;
    for (j = 1; j < vocab; j++) best = logits[j] > logits[best] ? j : best;
    *token = best;
    if (temperature == 0.0f) return ACMOE_OK;
    if (top_k > 0 && top_k < vocab) cut = acmoe__cut_key(logits, vocab, top_k, 0);
    total = acmoe__sample_weights(logits, vocab, logits[best], temperature, cut, work);
    if (top_p < 1.0f) {
        cut = acmoe__cut_key(work, vocab, top_p * total, 1);
        for (j = 0, total = 0.0; j < vocab; j++) {
            if (acmoe__float_order(work[j]) < cut) work[j] = 0.0f;
            total += work[j];
        }
    }
    r = (double)acmoe_rng_uniform(rng) * total;
    for (j = 0; j < vocab; j++) { /* the last kept token takes what rounding leaves of r */
        if (work[j] == 0.0f) continue;
        *token = (int32_t)j;
        if (r < work[j]) break;
        r -= work[j];
    }
    return ACMOE_OK;
}

/* The embeddings' gradients from the first layer's input gradient dx: each thread takes a
   range of token ids and a range of positions, whole rows, and adds the rows of dx to them
   in token order, so every element adds the tokens in order, whatever the thread count. */
typedef struct acmoe__embedding_job {
    acmoe_lm *model;
    const acmoe__kernel *kern;
    const float *dx;
} acmoe__embedding_job;

static void acmoe__embedding_grad_job(void *arg, int tid, int n_threads) {
    const acmoe__embedding_job *j = (const acmoe__embedding_job *)arg;
    acmoe_lm *model = j->model;
    const acmoe__kernel *kern = j->kern;
    const int d = model->desc.d_model, seq = model->seq, vocab = model->desc.vocab;
    const int p0 = (int)((long)seq * tid / n_threads), p1 = (int)((long)seq * (tid + 1) / n_threads);
    const int v0 = (int)((long)vocab * tid / n_threads), v1 = (int)((long)vocab * (tid + 1) / n_threads);
    int i, p;
    for (p = p0; model->g_pos_emb && p < p1; p++)
        for (i = p; i < model->n; i += seq) kern->row_axpy(model->g_pos_emb + (size_t)p * d, j->dx + (size_t)i * d, d, 1.0f);
    for (i = 0; !model->desc.n_classes && i < model->n; i++)
        if (model->tokens[i] >= v0 && model->tokens[i] < v1)
            kern->row_axpy(model->g_tok_emb + (size_t)model->tokens[i] * d, j->dx + (size_t)i * d, d, 1.0f);
}

/* One block backward: dy (gradient of its output, used up as scratch) to dx (of its input). */
static acmoe_status acmoe__block_backward(acmoe_lm *model, acmoe_ctx *ctx, acmoe__block *block, float *dy, float *dx) {
    const int d = block->width, n = block->n, pre = model->desc.pre_ln;
    const size_t count = (size_t)n * d;
    float *tmp = model->t2, *dmoe = model->t3;
    float *dres = pre ? dy : model->t1; /* the gradient of the residual stream between the halves */
    const float *g;
    acmoe_status s;
    double mark;
    /* the FFN half */
    if (!pre) acmoe__layernorm_backward(ctx, dy, block->xhat2, block->rstd2, n, d, block->ln2_g, block->g_ln2_g, block->g_ln2_b, dres, NULL);
    s = acmoe_moe_backward(block->moe, ctx, acmoe__dropout_backward(model, dres, block->keep_m, tmp, count), dmoe);
    if (s != ACMOE_OK) return s;
    if (pre) acmoe__layernorm_backward(ctx, dmoe, block->xhat2, block->rstd2, n, d, block->ln2_g, block->g_ln2_g, block->g_ln2_b, dres, dres);
    else acmoe__rows(ctx, ACMOE__ROWS_ACCUMULATE, dres, dmoe, NULL, n, d);
    /* the attention half; post-LN goes through LN1 first, into dx: the gradient of x + a */
    if (!pre) {
        acmoe__layernorm_backward(ctx, dres, block->xhat1, block->rstd1, n, d, block->ln1_g, block->g_ln1_g, block->g_ln1_b, dx, NULL);
        dres = dx;
    }
    g = acmoe__dropout_backward(model, dres, block->keep_a, tmp, count);
    acmoe__rows(ctx, ACMOE__ROWS_BIAS_GRAD, block->g_b_o, g, NULL, n, d);
    s = acmoe_matmul(ctx, ACMOE_TN, d, d, n, g, d, block->att, d, block->g_w_o, d, 1);
    if (s == ACMOE_OK) s = acmoe_matmul(ctx, ACMOE_NN, n, d, d, g, d, block->w_o, d, model->datt, d, 0);
    if (s != ACMOE_OK) return s;
    mark = acmoe__clock_start(ctx);
    if (block->window) acmoe__window_attention_backward(ctx, model, block);
    else acmoe__attention_backward(ctx, block->qkv, block->att, model->datt, model->batch, model->seq, !model->desc.n_classes, d, block->heads,
                                   model->att_work, model->att_slots, model->dqkv, block->att_stats);
    acmoe__lap(ctx, &mark, &model->seconds_attention);
    acmoe__rows(ctx, ACMOE__ROWS_BIAS_GRAD, block->g_b_qkv, model->dqkv, NULL, n, 3 * d);
    s = acmoe_matmul(ctx, ACMOE_TN, 3 * d, d, n, model->dqkv, 3 * d, pre ? block->attn_in : block->x_in, d, block->g_w_qkv, d, 1);
    if (s != ACMOE_OK) return s;
    if (pre) {
        s = acmoe_matmul(ctx, ACMOE_NN, n, d, 3 * d, model->dqkv, 3 * d, block->w_qkv, d, tmp, d, 0);
        if (s != ACMOE_OK) return s;
        acmoe__layernorm_backward(ctx, tmp, block->xhat1, block->rstd1, n, d, block->ln1_g, block->g_ln1_g, block->g_ln1_b, dx, dres);
        return ACMOE_OK;
    }
    return acmoe_matmul(ctx, ACMOE_NN, n, d, 3 * d, model->dqkv, 3 * d, block->w_qkv, d, dx, d, 1); /* dx holds dres */
}

/* The language model's head: the logits' gradients, the head's, and dy. */
static acmoe_status acmoe__lm_head_backward(acmoe_lm *model, acmoe_ctx *ctx) {
    const int d = model->desc.d_model;
    const float *top = model->desc.pre_ln ? model->yf : model->blocks[model->n_layers - 1].y;
    acmoe_status s;
    acmoe__cross_entropy(ctx, model->logits, model->targets, model->n, model->desc.vocab, 1, model->row_loss);
    s = acmoe_matmul(ctx, ACMOE_TN, model->desc.vocab, d, model->n, model->logits, model->desc.vocab, top, d, model->g_head, d, 1);
    if (s != ACMOE_OK) return s;
    return acmoe_matmul(ctx, ACMOE_NN, model->n, d, model->desc.vocab, model->logits, model->desc.vocab, model->head, d, model->dy, d, 0);
}

/* The vision head: the logits' gradients, the head's, and dy, each sequence's pooled
   gradient spread over its rows. */
static acmoe_status acmoe__vision_head_backward(acmoe_lm *model, acmoe_ctx *ctx) {
    const acmoe__block *last = &model->blocks[model->n_layers - 1];
    const int d = last->width, classes = model->desc.n_classes, seq = last->tokens;
    float *dpooled = model->t1;
    acmoe_status s;
    acmoe__cross_entropy(ctx, model->logits, model->targets, model->batch, classes, 1, model->row_loss);
    acmoe__bias_grad(&ctx->kernel, model->logits, model->batch, classes, model->g_head_b);
    s = acmoe_matmul(ctx, ACMOE_TN, classes, d, model->batch, model->logits, classes, model->pooled, d, model->g_head, d, 1);
    if (s == ACMOE_OK)
        s = acmoe_matmul(ctx, ACMOE_NN, model->batch, d, classes, model->logits, classes, model->head, d, dpooled, d, 0);
    if (s != ACMOE_OK) return s;
    acmoe__mean_rows(ctx, NULL, model->batch, seq, d, dpooled, model->dy);
    return ACMOE_OK;
}

ACMOE_API acmoe_status acmoe_lm_backward(acmoe_lm *model, acmoe_ctx *ctx) {
    const int d = model ? model->desc.d_model : 0, top = model ? acmoe__top_width(model) : 0;
    float *dy, *dx, *swap;
    acmoe__embedding_job job;
    int i;
    acmoe_status s;
    if (!model || !ctx) return ACMOE_ERR_NULL;
    if (!model->cached) return ACMOE_ERR_ARG; /* needs a forward call with targets first */
    model->cached = 0;
    s = model->desc.n_classes ? acmoe__vision_head_backward(model, ctx) : acmoe__lm_head_backward(model, ctx);
    if (s != ACMOE_OK) return s;
    dy = model->dy, dx = model->dx;
    if (model->desc.pre_ln) {
        acmoe__layernorm_backward(ctx, dy, model->xhatf, model->rstdf, model->blocks[model->n_layers - 1].n, top, model->lnf_g, model->g_lnf_g,
                                  model->g_lnf_b, dx, NULL);
        swap = dy, dy = dx, dx = swap;
    }
    for (i = model->n_layers - 1; i >= 0 && s == ACMOE_OK; i--) {
        acmoe__block *block = &model->blocks[i];
        s = acmoe__block_backward(model, ctx, block, dy, dx);
        swap = dy, dy = dx, dx = swap;
        if (s == ACMOE_OK && i > 0 && block->stage != block[-1].stage) { /* Swin: back through the merge */
            s = acmoe__merge_backward(ctx, model, block[-1].stage, dy, dx);
            swap = dy, dy = dx, dx = swap;
        }
    }
    if (s != ACMOE_OK) return s;
    if (model->desc.window) { /* the patch norm */
        acmoe__layernorm_backward(ctx, dy, model->pn_xhat, model->pn_rstd, model->n, d, model->pn_g, model->g_pn_g, model->g_pn_b, dx, NULL);
        swap = dy, dy = dx, dx = swap;
    }
    job.model = model, job.kern = &ctx->kernel, job.dx = dy;
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__embedding_grad_job, &job);
    if (!model->desc.n_classes) return ACMOE_OK;
    model->d_embedded = dy;
    acmoe__rows(ctx, ACMOE__ROWS_BIAS_GRAD, model->g_patch_b, dy, NULL, model->n, d);
    return acmoe_matmul(ctx, ACMOE_TN, d, model->desc.patch_dim, model->n, dy, d, model->patches, model->desc.patch_dim, model->g_patch_w,
                        model->desc.patch_dim, 1);
}

ACMOE_API acmoe_status acmoe_vision_input_grad(acmoe_lm *model, acmoe_ctx *ctx, float *d_patches) {
    if (!model || !ctx || !d_patches) return ACMOE_ERR_NULL;
    if (!model->desc.n_classes || !model->d_embedded) return ACMOE_ERR_ARG;
    return acmoe_matmul(ctx, ACMOE_NN, model->n, model->desc.patch_dim, model->desc.d_model, model->d_embedded,
                        model->desc.d_model, model->patch_w, model->desc.patch_dim, d_patches, model->desc.patch_dim, 0);
}

/* ========================================================================================== */
/* 11. Optimizer                                                                              */
/* ========================================================================================== */

static acmoe_optim_desc acmoe__optim_resolve(const acmoe_optim_desc *in) {
    acmoe_optim_desc o;
    memset(&o, 0, sizeof o);
    if (in) o = *in;
    if (o.lr == 0.0f) o.lr = 7e-4f;
    if (o.beta1 == 0.0f) o.beta1 = 0.9f;
    if (o.beta2 == 0.0f) o.beta2 = 0.999f;
    if (o.eps == 0.0f) o.eps = 1e-8f;
    return o;
}

/* Every option of the resolved options in its range (a step with any other could fill the
   model with NaN). */
static int acmoe__optim_valid(const acmoe_optim_desc *o) {
    return acmoe__options_fit(acmoe__optim_options, ACMOE__N_OPTIM_OPTIONS, o) && o->lr > 0.0f && o->eps > 0.0f;
}

ACMOE_API float acmoe_lr_at(const acmoe_optim_desc *in, long step) {
    acmoe_optim_desc o = acmoe__optim_resolve(in);
    double progress;
    if (step < o.warmup_steps) return o.lr * (float)(step + 1) / (float)o.warmup_steps; /* step + 1 fits: an int */
    if (o.schedule != ACMOE_SCHEDULE_COSINE || o.total_steps <= o.warmup_steps) return o.lr;
    progress = ACMOE__MIN(1.0, ((double)step - o.warmup_steps) / ((double)o.total_steps - o.warmup_steps));
    return o.min_lr + 0.5f * (o.lr - o.min_lr) * (float)(1.0 + cos(3.141592653589793 * progress));
}

typedef struct acmoe__grad_sq_job {
    acmoe_lm *model;
    const acmoe__kernel *kern;
} acmoe__grad_sq_job;

/* The gradient norm: chunk sums in parallel, added in order. */
static void acmoe__grad_sq_job_run(void *arg, int tid, int n_threads) {
    const acmoe__grad_sq_job *job = (const acmoe__grad_sq_job *)arg;
    acmoe_lm *model = job->model;
    size_t c;
    for (c = (size_t)tid; c < acmoe__chunks(model->n_params); c += (size_t)n_threads)
        model->grad_sq[c] = job->kern->sum_squares(model->grads + c * ACMOE__NORM_CHUNK,
                                                   ACMOE__MIN(ACMOE__NORM_CHUNK, model->n_params - c * ACMOE__NORM_CHUNK));
}

typedef struct acmoe__update_job {
    acmoe_lm *model;
    const acmoe__kernel *kern;
    const acmoe_optim_desc *o;
    float lr, scale, c1, c2;
} acmoe__update_job;

/* The update of parameters [i0, i1) of each thread's share, tensor by tensor (for the decay). */
static void acmoe__update_job_run(void *arg, int tid, int n_threads) {
    const acmoe__update_job *job = (const acmoe__update_job *)arg;
    acmoe_lm *model = job->model;
    const acmoe_optim_desc *o = job->o;
    const size_t i0 = model->n_params * (size_t)tid / (size_t)n_threads, i1 = model->n_params * (size_t)(tid + 1) / (size_t)n_threads;
    int t;
    for (t = 0; t < model->dir.count; t++) {
        const acmoe__tensor_info *info = &model->dir.entries[t];
        const float decay = info->decay ? o->weight_decay : 0.0f, lr = job->lr;
        size_t i, start = ACMOE__MAX(info->offset, i0), end = ACMOE__MIN(info->offset + info->count, i1);
        acmoe__adam a;
        if (start >= end) continue;
        if (o->sgd) {
            for (i = start; i < end; i++) model->params[i] -= lr * (model->grads[i] * job->scale + decay * model->params[i]);
            continue;
        }
        a.scale = job->scale, a.beta1 = o->beta1, a.beta2 = o->beta2, a.lr = lr, a.c1 = job->c1, a.c2 = job->c2;
        a.eps = o->eps, a.decay = decay;
        job->kern->row_adam(model->params + start, model->grads + start, model->adam_m + start, model->adam_v + start, end - start, &a);
    }
}

/* Where layer i's experts' parameters start and end in the model's buffer (w1, b1, w2 and b2
   follow each other), when they are split over ranks; 0 and 0 otherwise. */
static void acmoe__expert_span(const acmoe_lm *model, int i, size_t *start, size_t *end) {
    const acmoe_moe *layer = model->blocks[i].moe;
    *start = *end = 0;
    if (!layer || !layer->ranks) return;
    *start = (size_t)(layer->w1 - model->params);
    *end = (size_t)(layer->b2 - model->params) + (size_t)layer->desc.n_experts * layer->desc.d_model;
}

/* The squared gradient norm over every rank under expert parallelism, from this rank's sum
   of squares over all its gradients, *sq: rank 0 counts the replicated parameters (the same
   on every rank) and its experts, the others only their experts; added in rank order. */
static acmoe_status acmoe__expert_grad_sq(const acmoe_lm *model, double *sq) {
    acmoe_comm *comm = model->expert_ranks;
    acmoe_status s;
    float share;
    int i;
    if (comm->rank > 0) {
        double experts = 0.0;
        for (i = 0; i < model->n_layers; i++) {
            size_t start, end, k;
            acmoe__expert_span(model, i, &start, &end);
            for (k = start; k < end; k++) experts += (double)model->grads[k] * model->grads[k];
        }
        *sq = experts; /* another rank's experts' gradients are zero here */
    }
    share = (float)*sq;
    s = comm->sum(comm, &share, 1);
    *sq = share;
    return s;
}

ACMOE_API acmoe_status acmoe_lm_step(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_optim_desc *desc, float *norm) {
    acmoe_optim_desc o = acmoe__optim_resolve(desc);
    acmoe__update_job job;
    acmoe__grad_sq_job norm_job;
    double sq = 0.0, global_norm;
    size_t i;
    if (!model || !ctx) return ACMOE_ERR_NULL;
    if (!acmoe__optim_valid(&o)) return ACMOE_ERR_ARG;
    if (model->steps == LONG_MAX) return ACMOE_ERR_ARG; /* the step counter is full */
    norm_job.model = model, norm_job.kern = &ctx->kernel;
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__grad_sq_job_run, &norm_job);
    for (i = 0; i < acmoe__chunks(model->n_params); i++) sq += model->grad_sq[i];
    if (model->expert_ranks) {
        acmoe_status s = acmoe__expert_grad_sq(model, &sq);
        if (s != ACMOE_OK) return s;
    }
    global_norm = sqrt(sq);
    if (norm) *norm = (float)global_norm;
    if (!isfinite(sq)) return ACMOE_ERR_NONFINITE; /* nothing is updated */
    job.model = model, job.kern = &ctx->kernel, job.o = &o;
    job.scale = o.clip_norm > 0.0f && global_norm > o.clip_norm ? o.clip_norm / (float)global_norm : 1.0f;
    job.lr = acmoe_lr_at(&o, model->steps);
    model->steps++;
    model->optim = o;
    job.c1 = 1.0f / (1.0f - powf(o.beta1, (float)model->steps));
    job.c2 = 1.0f / (1.0f - powf(o.beta2, (float)model->steps));
    acmoe__pool_run(&ctx->pool, ctx->desc.n_threads, acmoe__update_job_run, &job);
    return ACMOE_OK;
}

ACMOE_API long acmoe_lm_steps_taken(const acmoe_lm *model) { return model ? model->steps : 0; }

ACMOE_API acmoe_status acmoe_lm_reduce_grads(acmoe_lm *model, acmoe_comm *comm) {
    acmoe_status s = ACMOE_OK;
    size_t i, from = 0, start, end;
    int layer;
    if (!model || !comm) return ACMOE_ERR_NULL;
    if (comm->size < 1 || comm->rank < 0 || comm->rank >= comm->size) return ACMOE_ERR_ARG;
    if (comm->size == 1) return ACMOE_OK;
    for (layer = 0; layer < model->n_layers && s == ACMOE_OK; layer++) { /* layers lie in order */
        acmoe__expert_span(model, layer, &start, &end);
        if (end == 0) continue;
        if (start > from) s = comm->sum(comm, model->grads + from, start - from);
        from = end; /* an expert's gradient is whole on its rank already */
    }
    if (s == ACMOE_OK && from < model->n_params) s = comm->sum(comm, model->grads + from, model->n_params - from);
    for (i = 0; i < model->n_params && s == ACMOE_OK; i++) model->grads[i] /= (float)comm->size;
    return s;
}

ACMOE_API acmoe_status acmoe_lm_set_expert_ranks(acmoe_lm *model, acmoe_comm *comm) {
    acmoe_status s = ACMOE_OK;
    int i;
    if (!model) return ACMOE_ERR_NULL;
    for (i = 0; i < model->n_layers && s == ACMOE_OK; i++)
        if (model->blocks[i].moe && model->blocks[i].letter != 'f') s = acmoe_moe_set_expert_ranks(model->blocks[i].moe, comm);
    if (s != ACMOE_OK) comm = NULL; /* all or none */
    for (i = 0; i < model->n_layers && !comm; i++)
        if (model->blocks[i].moe) acmoe_moe_set_expert_ranks(model->blocks[i].moe, NULL);
    model->expert_ranks = comm && comm->size > 1 ? comm : NULL;
    model->cached = 0;
    return s;
}

/* Broadcasts from rank root its block of count rows of width floats, from the first, of
   the tensor at offset in each of the model's parameter and moment buffers. */
static acmoe_status acmoe__send_rows(acmoe_lm *model, acmoe_comm *comm, int root, size_t offset, int first, int count,
                                     size_t width) {
    float *const buffers[3] = {model->params, model->adam_m, model->adam_v};
    acmoe_status s = ACMOE_OK;
    int b;
    for (b = 0; b < 3 && s == ACMOE_OK; b++)
        s = comm->broadcast(comm, buffers[b] + offset + (size_t)first * width, sizeof(float) * width * (size_t)count, root);
    return s;
}

ACMOE_API acmoe_status acmoe_lm_gather_experts(acmoe_lm *model) {
    acmoe_comm *comm;
    acmoe_status s = ACMOE_OK;
    int i, q;
    if (!model) return ACMOE_ERR_NULL;
    comm = model->expert_ranks;
    for (i = 0; i < model->n_layers && comm && s == ACMOE_OK; i++) {
        const acmoe_moe *layer = model->blocks[i].moe;
        size_t dm, hw, ff;
        if (!layer || !layer->ranks) continue;
        dm = (size_t)layer->desc.d_model, hw = (size_t)layer->h_width, ff = (size_t)layer->desc.d_ff;
        for (q = 0; q < comm->size && s == ACMOE_OK; q++) {
            const int per = layer->desc.n_experts / comm->size, first = per * q;
            s = acmoe__send_rows(model, comm, q, (size_t)(layer->w1 - model->params), first, per, hw * dm);
            if (s == ACMOE_OK) s = acmoe__send_rows(model, comm, q, (size_t)(layer->b1 - model->params), first, per, hw);
            if (s == ACMOE_OK) s = acmoe__send_rows(model, comm, q, (size_t)(layer->w2 - model->params), first, per, dm * ff);
            if (s == ACMOE_OK) s = acmoe__send_rows(model, comm, q, (size_t)(layer->b2 - model->params), first, per, dm);
        }
    }
    return s;
}

ACMOE_API acmoe_train_desc acmoe_lm_train_settings(const acmoe_lm *model) {
    acmoe_train_desc desc;
    memset(&desc, 0, sizeof desc);
    if (!model) return desc;
    desc.seed = model->train_seed;
    desc.optim = model->optim;
    return desc;
}

/* ========================================================================================== */
/* 12. Checkpoints                                                                            */
/* ========================================================================================== */

#define ACMOE__HEADER_MAX (1u << 20) /* a header larger than this is not one of ours */
#define ACMOE__MAX_TENSORS 4096      /* more than any model has */
#define ACMOE__MAX_META 64

#define ACMOE__FORMAT 4 /* the version acmoe_lm_save writes: "acmoe-lm-4" */

/* The other metadata keys of each format version: the first five from 2 on, the next two
   from 3, contents from 4. */
static const char *const acmoe__state_keys[] = {"format", "pattern",     "seed",    "step",
                                                "rng",    "data_crc32c", "train.seed", "contents"};
static int acmoe__state_key_count(int version) { return version >= 4 ? 8 : version >= 3 ? 7 : 5; }

/* What a file holds besides the weights: the whole training state, or nothing more. */
typedef enum { ACMOE__CONTENTS_TRAINING = 0, ACMOE__CONTENTS_WEIGHTS } acmoe__contents;

/* The AC weights a model's layer i routes with, when it has measured them (format 4 on):
   stored, so that a loaded model can freeze them and decode. */
static const float *acmoe__saved_ac_weights(const acmoe_lm *model, int i, int *rows, int *width) {
    *width = acmoe_moe_settings(model->blocks[i].moe).d_model;
    return acmoe_moe_ac_weights(model->blocks[i].moe, rows);
}

static void acmoe__ac_weights_name(char *name, size_t cap, int layer) {
    snprintf(name, cap, "layers.%d.moe.ac_weights", layer);
}

static int acmoe__little_endian(void) {
    const uint32_t probe = 1;
    unsigned char first;
    memcpy(&first, &probe, 1);
    return first == 1;
}

/* CRC-32C (Castagnoli, reflected): the checksum of a checkpoint's data section. The table
   is built for each use, so no state outlives a call. */
typedef struct acmoe__crc32c {
    uint32_t table[256], value;
} acmoe__crc32c;

static void acmoe__crc_begin(acmoe__crc32c *crc) {
    uint32_t i, r;
    int bit;
    for (i = 0; i < 256; i++) {
        for (r = i, bit = 0; bit < 8; bit++) r = r & 1u ? (r >> 1) ^ 0x82F63B78u : r >> 1;
        crc->table[i] = r;
    }
    crc->value = 0xFFFFFFFFu;
}

static void acmoe__crc_add(acmoe__crc32c *crc, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    uint32_t v = crc->value;
    size_t i;
    for (i = 0; i < n; i++) v = crc->table[(v ^ p[i]) & 0xFFu] ^ (v >> 8);
    crc->value = v;
}

static uint32_t acmoe__crc_value(const acmoe__crc32c *crc) { return crc->value ^ 0xFFFFFFFFu; }

/* The checksum of the data section a save writes: the tensors in directory order, the AC
   weights by layer, then the Adam moments of a training state. */
static uint32_t acmoe__data_crc(const acmoe_lm *model, acmoe__contents contents) {
    acmoe__crc32c crc;
    int i, rows, width;
    acmoe__crc_begin(&crc);
    for (i = 0; i < model->dir.count; i++)
        acmoe__crc_add(&crc, model->params + model->dir.entries[i].offset, model->dir.entries[i].count * sizeof(float));
    for (i = 0; i < model->n_layers; i++) {
        const float *w = acmoe__saved_ac_weights(model, i, &rows, &width);
        if (w) acmoe__crc_add(&crc, w, (size_t)rows * width * sizeof(float));
    }
    if (contents == ACMOE__CONTENTS_TRAINING)
        acmoe__crc_add(&crc, model->adam_m, 2 * model->n_params * sizeof(float)); /* adam_v follows adam_m */
    return acmoe__crc_value(&crc);
}

/* ---- files: regular ones only, and replaced whole ---- */

/* Opens path for reading if it is a regular file, *size its length. A FIFO, a device or a
   directory is ACMOE_ERR_IO at once (opening a FIFO would wait for a writer). */
static acmoe_status acmoe__open_regular(const char *path, FILE **f, uint64_t *size) {
#ifdef ACMOE__POSIX_FILES
    struct stat info;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return ACMOE_ERR_IO;
    if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode) || info.st_size < 0 ||
        (uint64_t)info.st_size > (uint64_t)LONG_MAX || !(*f = fdopen(fd, "rb"))) {
        close(fd);
        return ACMOE_ERR_IO;
    }
    *size = (uint64_t)info.st_size;
    return ACMOE_OK;
#else
    long n;
    *f = fopen(path, "rb");
    if (!*f) return ACMOE_ERR_IO;
    if (fseek(*f, 0, SEEK_END) != 0 || (n = ftell(*f)) < 0 || fseek(*f, 0, SEEK_SET) != 0) {
        fclose(*f);
        return ACMOE_ERR_IO;
    }
    *size = (uint64_t)n;
    return ACMOE_OK;
#endif
}

/* A new file beside path, named path.tmp-PID-N with the first N no one holds, created
   exclusively: a file or a link already there is never opened or followed. */
static acmoe_status acmoe__create_temp(const char *path, char *tmp, size_t cap, FILE **f) {
#ifdef ACMOE__POSIX_FILES
    int attempt, fd;
    for (attempt = 0; attempt < 1000; attempt++) {
        snprintf(tmp, cap, "%s.tmp-%ld-%d", path, (long)getpid(), attempt);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
        if (fd < 0 && errno == EEXIST) continue;
        if (fd < 0) return ACMOE_ERR_IO;
        if ((*f = fdopen(fd, "wb")) != NULL) return ACMOE_OK;
        close(fd);
        remove(tmp);
        return ACMOE_ERR_IO;
    }
    return ACMOE_ERR_IO;
#else
    snprintf(tmp, cap, "%s.tmp", path);
    *f = fopen(tmp, "wb");
    return *f ? ACMOE_OK : ACMOE_ERR_IO;
#endif
}

/* Flushes f to the disk and closes it; ok is whether every write before succeeded. */
static acmoe_status acmoe__close_durably(FILE *f, int ok) {
    ok = ok && fflush(f) == 0 && !ferror(f);
#ifdef ACMOE__POSIX_FILES
    ok = ok && fsync(fileno(f)) == 0;
#endif
    if (fclose(f) != 0) ok = 0;
    return ok ? ACMOE_OK : ACMOE_ERR_IO;
}

/* Makes a rename in path's directory durable. A file system that cannot sync directories
   (EINVAL) has nothing to flush. */
static acmoe_status acmoe__sync_directory(const char *path, char *scratch) {
#ifdef ACMOE__POSIX_FILES
    char *slash;
    int fd, ok;
    strcpy(scratch, path);
    slash = strrchr(scratch, '/');
    if (!slash) strcpy(scratch, ".");
    else slash[slash == scratch] = '\0'; /* keep the root's own slash */
    fd = open(scratch, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return ACMOE_ERR_IO;
    ok = fsync(fd) == 0 || errno == EINVAL;
    close(fd);
    return ok ? ACMOE_OK : ACMOE_ERR_IO;
#else
    (void)path, (void)scratch;
    return ACMOE_OK;
#endif
}

/* Replaces path with what write puts into a new file, or leaves path as it was: the file is
   written beside it under a name of its own, synced, renamed over path, and the directory
   synced; on any failure the new file is removed. */
static acmoe_status acmoe__replace_file(const char *path, int (*write)(FILE *f, const void *arg), const void *arg) {
    const size_t cap = strlen(path) + 48;
    char *tmp = (char *)ACMOE_MALLOC(cap);
    FILE *f = NULL;
    acmoe_status s;
    if (!tmp) return ACMOE_ERR_NOMEM;
    s = acmoe__create_temp(path, tmp, cap, &f);
    if (s == ACMOE_OK) s = acmoe__close_durably(f, write(f, arg));
    if (s == ACMOE_OK && rename(tmp, path) != 0) s = ACMOE_ERR_IO;
    if (s == ACMOE_OK) s = acmoe__sync_directory(path, tmp);
    else if (f) remove(tmp);
    ACMOE_FREE(tmp);
    return s;
}

/* ---- writer ---- */

/* A growing text buffer; a failed allocation is remembered and reported at the end. */
typedef struct acmoe__text {
    char *data;
    size_t len, cap;
    int failed;
} acmoe__text;

static void acmoe__text_add(acmoe__text *t, const char *fmt, ...) ACMOE__PRINTF(2, 3);

static void acmoe__text_add(acmoe__text *t, const char *fmt, ...) {
    va_list args;
    int n;
    if (t->failed) return;
    for (;;) {
        va_start(args, fmt);
        n = vsnprintf(t->data ? t->data + t->len : NULL, t->data ? t->cap - t->len : 0, fmt, args);
        va_end(args);
        if (n < 0) {
            t->failed = 1;
            return;
        }
        if (t->data && t->len + (size_t)n < t->cap) break;
        {
            size_t cap = (t->cap + (size_t)n + 1) * 2;
            char *grown = (char *)ACMOE_REALLOC(t->data, cap);
            if (!grown) {
                t->failed = 1;
                return;
            }
            t->data = grown;
            t->cap = cap;
        }
    }
    t->len += (size_t)n;
}

static void acmoe__header_tensor(acmoe__text *t, const char *name, int ndim, const int *shape, size_t begin,
                                 size_t count) {
    int i;
    acmoe__text_add(t, ",\"%s\":{\"dtype\":\"F32\",\"shape\":[", name);
    for (i = 0; i < ndim; i++) acmoe__text_add(t, "%s%d", i ? "," : "", shape[i]);
    acmoe__text_add(t, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)begin,
                    (unsigned long long)(begin + count * 4));
}

/* Each field of base as "name":"value", ints in decimal, floats with the digits that give
   the same float back. */
static void acmoe__header_options(acmoe__text *t, const acmoe_option *options, int count, const void *desc) {
    char value[64];
    int i;
    for (i = 0; i < count; i++) {
        acmoe_option_format(&options[i], desc, value, sizeof value);
        acmoe__text_add(t, ",\"%s\":\"%s\"", options[i].key, value);
    }
}

/* The JSON header, padded with spaces to a multiple of 8 bytes as safetensors does. */
static void acmoe__header(const acmoe_lm *model, acmoe__contents contents, uint32_t crc, acmoe__text *t) {
    const acmoe_rng *r = &model->rng;
    char name[64];
    uint32_t spare;
    size_t at = 0;
    int i, rows, width, n_params = (int)model->n_params;
    memcpy(&spare, &r->spare, sizeof spare);
    acmoe__text_add(t, "{\"__metadata__\":{\"format\":\"acmoe-lm-%d\",\"contents\":\"%s\",\"pattern\":\"%s\","
                       "\"seed\":\"%llu\",\"step\":\"%ld\",\"rng\":\"",
                    ACMOE__FORMAT, contents == ACMOE__CONTENTS_TRAINING ? "training" : "weights", model->pattern,
                    (unsigned long long)model->desc.seed, model->steps);
    for (i = 0; i < 4; i++) acmoe__text_add(t, "%016llx", (unsigned long long)r->s[i]);
    acmoe__text_add(t, " %08lx %d\",\"data_crc32c\":\"%08lx\",\"train.seed\":\"%llu\"", (unsigned long)spare,
                    r->has_spare, (unsigned long)crc, (unsigned long long)model->train_seed);
    acmoe__header_options(t, acmoe__model_options, ACMOE__N_MODEL_OPTIONS, &model->desc);
    acmoe__header_options(t, acmoe__optim_options, ACMOE__N_OPTIM_OPTIONS, &model->optim);
    acmoe__text_add(t, "}");
    for (i = 0; i < model->dir.count; i++, at += model->dir.entries[i - 1].count * 4) {
        const acmoe__tensor_info *e = &model->dir.entries[i];
        acmoe__header_tensor(t, e->name, e->ndim, e->shape, at, e->count);
    }
    for (i = 0; i < model->n_layers; i++) {
        int shape[2];
        if (!acmoe__saved_ac_weights(model, i, &rows, &width)) continue;
        shape[0] = rows, shape[1] = width;
        acmoe__ac_weights_name(name, sizeof name, i);
        acmoe__header_tensor(t, name, 2, shape, at, (size_t)rows * width);
        at += (size_t)rows * width * 4;
    }
    if (contents == ACMOE__CONTENTS_TRAINING) {
        acmoe__header_tensor(t, "optimizer.adam_m", 1, &n_params, at, model->n_params);
        acmoe__header_tensor(t, "optimizer.adam_v", 1, &n_params, at + model->n_params * 4, model->n_params);
    }
    acmoe__text_add(t, "}");
    while (!t->failed && (8 + t->len) % 8) acmoe__text_add(t, " ");
}

typedef struct acmoe__checkpoint_out {
    const acmoe_lm *model;
    acmoe__contents contents;
    const acmoe__text *header;
} acmoe__checkpoint_out;

/* The length, the header and the data; whether every write succeeded. */
static int acmoe__write_checkpoint(FILE *f, const void *arg) {
    const acmoe__checkpoint_out *out = (const acmoe__checkpoint_out *)arg;
    const acmoe_lm *model = out->model;
    unsigned char len[8];
    int i, ok, rows, width;
    for (i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)out->header->len >> (8 * i));
    ok = fwrite(len, 1, 8, f) == 8 && fwrite(out->header->data, 1, out->header->len, f) == out->header->len;
    for (i = 0; ok && i < model->dir.count; i++) {
        const acmoe__tensor_info *e = &model->dir.entries[i];
        ok = fwrite(model->params + e->offset, sizeof(float), e->count, f) == e->count;
    }
    for (i = 0; ok && i < model->n_layers; i++) {
        const float *w = acmoe__saved_ac_weights(model, i, &rows, &width);
        if (w) ok = fwrite(w, sizeof(float), (size_t)rows * width, f) == (size_t)rows * width;
    }
    if (out->contents == ACMOE__CONTENTS_WEIGHTS) return ok;
    return ok && fwrite(model->adam_m, sizeof(float), 2 * model->n_params, f) == 2 * model->n_params;
}

static acmoe_status acmoe__save(const acmoe_lm *model, const char *path, acmoe__contents contents) {
    acmoe__text header;
    acmoe__checkpoint_out out;
    acmoe_status s;
    if (!model || !path) return ACMOE_ERR_NULL;
    if (!*path) return ACMOE_ERR_IO;
    if (!acmoe__little_endian()) return ACMOE_ERR_UNSUPPORTED;
    if (!acmoe__all_finite(model->params, model->n_params) ||
        (contents == ACMOE__CONTENTS_TRAINING && !acmoe__all_finite(model->adam_m, 2 * model->n_params)))
        return ACMOE_ERR_NONFINITE; /* a file load would refuse must not replace a good one */
    memset(&header, 0, sizeof header);
    acmoe__header(model, contents, acmoe__data_crc(model, contents), &header);
    out.model = model, out.contents = contents, out.header = &header;
    s = header.failed ? ACMOE_ERR_NOMEM : acmoe__replace_file(path, acmoe__write_checkpoint, &out);
    ACMOE_FREE(header.data);
    return s;
}

ACMOE_API acmoe_status acmoe_lm_save(const acmoe_lm *model, const char *path) {
    return acmoe__save(model, path, ACMOE__CONTENTS_TRAINING);
}

ACMOE_API acmoe_status acmoe_lm_save_weights(const acmoe_lm *model, const char *path) {
    return acmoe__save(model, path, ACMOE__CONTENTS_WEIGHTS);
}

/* ---- reader ---- */

typedef struct acmoe__stored_tensor {
    char name[64];
    int ndim, shape[3];
    uint64_t begin, end;
} acmoe__stored_tensor;

typedef struct acmoe__parsed {
    char keys[ACMOE__MAX_META][48], values[ACMOE__MAX_META][160];
    int n_meta, n_tensors, cap_tensors;
    int nomem; /* parsing stopped for want of memory, not for the file */
    acmoe__stored_tensor *tensors;
} acmoe__parsed;

typedef struct acmoe__json {
    const char *p, *end;
} acmoe__json;

static void acmoe__json_space(acmoe__json *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static int acmoe__json_take(acmoe__json *j, char c) {
    acmoe__json_space(j);
    if (j->p >= j->end || *j->p != c) return 0;
    j->p++;
    return 1;
}

/* A string of printable ASCII without escapes other than \" and \\ (all ours are), into
   out of cap bytes. */
static int acmoe__json_string(acmoe__json *j, char *out, size_t cap) {
    size_t n = 0;
    if (!acmoe__json_take(j, '"')) return 0;
    while (j->p < j->end && *j->p != '"') {
        char c = *j->p++;
        if (c == '\\') {
            if (j->p >= j->end || (*j->p != '"' && *j->p != '\\')) return 0;
            c = *j->p++;
        }
        if ((unsigned char)c < 0x20 || n + 1 >= cap) return 0;
        out[n++] = c;
    }
    if (j->p >= j->end) return 0;
    j->p++;
    out[n] = '\0';
    return 1;
}

/* A decimal without sign or leading zeros (as written), below 10^19. */
static int acmoe__json_uint(acmoe__json *j, uint64_t *v) {
    int digits = 0;
    *v = 0;
    acmoe__json_space(j);
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
        if (++digits > 19 || (digits == 2 && *v == 0)) return 0;
        *v = *v * 10 + (uint64_t)(*j->p++ - '0');
    }
    return digits > 0;
}

/* [u, u, ...] with at most max entries. */
static int acmoe__json_uints(acmoe__json *j, uint64_t *v, int max, int *count) {
    *count = 0;
    if (!acmoe__json_take(j, '[')) return 0;
    if (acmoe__json_take(j, ']')) return 1;
    do {
        if (*count >= max || !acmoe__json_uint(j, &v[(*count)++])) return 0;
    } while (acmoe__json_take(j, ','));
    return acmoe__json_take(j, ']');
}

static const char *acmoe__meta(const acmoe__parsed *m, const char *key) {
    int i;
    for (i = 0; i < m->n_meta; i++)
        if (!strcmp(m->keys[i], key)) return m->values[i];
    return NULL;
}

/* String pairs, each key once. */
static int acmoe__parse_metadata(acmoe__json *j, acmoe__parsed *out) {
    if (!acmoe__json_take(j, '{')) return 0;
    if (acmoe__json_take(j, '}')) return 1;
    do {
        char *key = out->keys[out->n_meta];
        if (out->n_meta >= ACMOE__MAX_META) return 0;
        if (!acmoe__json_string(j, key, sizeof out->keys[0]) || acmoe__meta(out, key) || !acmoe__json_take(j, ':') ||
            !acmoe__json_string(j, out->values[out->n_meta], sizeof out->values[0]))
            return 0;
        out->n_meta++;
    } while (acmoe__json_take(j, ','));
    return acmoe__json_take(j, '}');
}

static int acmoe__parse_tensor(acmoe__json *j, acmoe__stored_tensor *t) {
    char key[32], dtype[16];
    uint64_t v[3];
    int n, seen = 0, i, bit;
    if (!acmoe__json_take(j, '{')) return 0;
    do {
        if (!acmoe__json_string(j, key, sizeof key) || !acmoe__json_take(j, ':')) return 0;
        bit = !strcmp(key, "dtype") ? 1 : !strcmp(key, "shape") ? 2 : !strcmp(key, "data_offsets") ? 4 : 0;
        if (!bit || (seen & bit)) return 0; /* unknown or repeated */
        seen |= bit;
        if (bit == 1) {
            if (!acmoe__json_string(j, dtype, sizeof dtype) || strcmp(dtype, "F32")) return 0;
        } else if (bit == 2) {
            if (!acmoe__json_uints(j, v, 3, &n) || n < 1) return 0;
            for (i = 0; i < n; i++) {
                if (v[i] > (uint64_t)INT32_MAX) return 0;
                t->shape[i] = (int)v[i];
            }
            t->ndim = n;
        } else {
            if (!acmoe__json_uints(j, v, 2, &n) || n != 2 || v[1] < v[0]) return 0;
            t->begin = v[0], t->end = v[1];
        }
    } while (acmoe__json_take(j, ','));
    return acmoe__json_take(j, '}') && seen == 7;
}

static acmoe__stored_tensor *acmoe__find_tensor(acmoe__parsed *m, const char *name) {
    int i;
    for (i = 0; i < m->n_tensors; i++)
        if (!strcmp(m->tensors[i].name, name)) return &m->tensors[i];
    return NULL;
}

/* Room for one more tensor; 0 past ACMOE__MAX_TENSORS or without memory (out->nomem). */
static int acmoe__tensor_room(acmoe__parsed *out) {
    acmoe__stored_tensor *grown;
    int cap;
    if (out->n_tensors < out->cap_tensors) return 1;
    cap = out->cap_tensors ? 2 * out->cap_tensors : 64;
    if (cap > ACMOE__MAX_TENSORS) return 0;
    grown = (acmoe__stored_tensor *)ACMOE_REALLOC(out->tensors, sizeof *grown * (size_t)cap);
    if (!grown) return !(out->nomem = 1);
    out->tensors = grown, out->cap_tensors = cap;
    return 1;
}

/* The whole header: metadata and tensors, each name once, nothing else. */
static int acmoe__parse_header(const char *text, size_t len, acmoe__parsed *out) {
    acmoe__json j;
    char name[64];
    int seen_metadata = 0;
    j.p = text, j.end = text + len;
    if (!acmoe__json_take(&j, '{')) return 0;
    do {
        if (!acmoe__json_string(&j, name, sizeof name) || !acmoe__json_take(&j, ':')) return 0;
        if (!strcmp(name, "__metadata__")) {
            if (seen_metadata++ || !acmoe__parse_metadata(&j, out)) return 0;
            continue;
        }
        if (acmoe__find_tensor(out, name) || !acmoe__tensor_room(out)) return 0;
        memset(&out->tensors[out->n_tensors], 0, sizeof out->tensors[0]);
        strcpy(out->tensors[out->n_tensors].name, name);
        if (!acmoe__parse_tensor(&j, &out->tensors[out->n_tensors++])) return 0;
    } while (acmoe__json_take(&j, ','));
    if (!acmoe__json_take(&j, '}')) return 0;
    acmoe__json_space(&j);
    return j.p == j.end;
}

static int acmoe__begin_order(const void *a, const void *b) {
    const acmoe__stored_tensor *x = (const acmoe__stored_tensor *)a, *y = (const acmoe__stored_tensor *)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

/* Whether the tensors tile the data section exactly, as safetensors requires: in the order
   of their offsets each starts where the one before ends, the first at 0, the last at the
   end of the file, each as long as its shape says. No overlap, gap or trailing byte. */
static int acmoe__layout_exact(acmoe__parsed *m, uint64_t data_size) {
    uint64_t at = 0;
    int i, q;
    qsort(m->tensors, (size_t)m->n_tensors, sizeof m->tensors[0], acmoe__begin_order);
    for (i = 0; i < m->n_tensors; i++) {
        const acmoe__stored_tensor *t = &m->tensors[i];
        uint64_t floats = 1;
        for (q = 0; q < t->ndim; q++) {
            if (t->shape[q] && floats > data_size / 4 / (uint64_t)t->shape[q]) return 0;
            floats *= (uint64_t)t->shape[q];
        }
        if (t->begin != at || t->end - t->begin != floats * 4) return 0;
        at = t->end;
    }
    return at == data_size;
}

/* ---- metadata: every value as the writer prints it, or the file is refused ---- */

static int acmoe__canonical_long(const char *text, long low, long high, long *v) {
    char back[32], *end;
    long x;
    if (!text || !*text) return 0;
    x = strtol(text, &end, 10);
    snprintf(back, sizeof back, "%ld", x);
    if (*end || strcmp(back, text) || x < low || x > high) return 0;
    *v = x;
    return 1;
}

static int acmoe__canonical_u64(const char *text, uint64_t *v) {
    char back[32], *end;
    unsigned long long x;
    if (!text || !*text) return 0;
    x = strtoull(text, &end, 10);
    snprintf(back, sizeof back, "%llu", x);
    if (*end || strcmp(back, text)) return 0;
    *v = (uint64_t)x;
    return 1;
}

/* width lowercase hex digits at text as a number. */
static int acmoe__parse_hex(const char *text, int width, uint64_t *v) {
    int i;
    *v = 0;
    for (i = 0; i < width; i++) {
        char c = text[i];
        int digit = c >= '0' && c <= '9' ? c - '0' : (c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1);
        if (digit < 0) return 0;
        *v = (*v << 4) | (uint64_t)digit;
    }
    return 1;
}

/* An option's value as the writer prints it: format 4 names enum values, earlier formats
   wrote them as numbers. */
static int acmoe__option_from_metadata(const acmoe_option *o, const char *text, int version, void *desc) {
    char back[64];
    if (!text) return 0;
    if (o->type == ACMOE_OPTION_ENUM && version < 4) {
        long v;
        if (!acmoe__canonical_long(text, INT32_MIN, INT32_MAX, &v)) return 0;
        snprintf(back, sizeof back, "%s", acmoe_enum_name(o->names, (int)v) ? acmoe_enum_name(o->names, (int)v) : "");
        text = back;
        if (!*text) return 0;
    }
    if (acmoe_option_set(o, desc, text) != ACMOE_OK) return 0;
    if (o->type == ACMOE_OPTION_ENUM) return 1;
    acmoe_option_format(o, desc, back, sizeof back);
    if (o->type == ACMOE_OPTION_FLOAT && version < 4) { /* earlier formats wrote 9 digits */
        float f;
        memcpy(&f, (const char *)desc + o->offset, sizeof f);
        snprintf(back, sizeof back, "%.9g", (double)f);
    }
    return !strcmp(back, text);
}

/* The options of this format version from the metadata; the others stay zero. */
static int acmoe__options_from_metadata(const acmoe__parsed *m, const acmoe_option *options, int count, int version,
                                        void *desc) {
    int i;
    for (i = 0; i < count; i++)
        if (options[i].since <= version &&
            !acmoe__option_from_metadata(&options[i], acmoe__meta(m, options[i].key), version, desc))
            return 0;
    return 1;
}

static int acmoe__option_named(const acmoe_option *options, int count, int version, const char *key) {
    int i;
    for (i = 0; i < count; i++)
        if (options[i].since <= version && !strcmp(options[i].key, key)) return 1;
    return 0;
}

/* Whether key belongs to the metadata of this format version. */
static int acmoe__known_key(const char *key, int version) {
    int i;
    for (i = 0; i < acmoe__state_key_count(version); i++)
        if (!strcmp(acmoe__state_keys[i], key)) return 1;
    return acmoe__option_named(acmoe__model_options, ACMOE__N_MODEL_OPTIONS, version, key) ||
           (version >= 3 && acmoe__option_named(acmoe__optim_options, ACMOE__N_OPTIM_OPTIONS, version, key));
}

/* What the metadata says besides the step and the generator. */
typedef struct acmoe__checkpoint_meta {
    int version;
    acmoe__contents contents;
    acmoe_lm_desc desc; /* pattern points into the parsed metadata */
    uint64_t train_seed;
    acmoe_optim_desc optim;
    uint32_t crc;
} acmoe__checkpoint_meta;

static int acmoe__meta_from_parsed(const acmoe__parsed *m, acmoe__checkpoint_meta *out) {
    const char *format = acmoe__meta(m, "format"), *crc = acmoe__meta(m, "data_crc32c");
    const char *contents = acmoe__meta(m, "contents");
    uint64_t v;
    int i;
    memset(out, 0, sizeof *out);
    if (!format) return 0;
    out->version = !strcmp(format, "acmoe-lm-4")   ? 4
                   : !strcmp(format, "acmoe-lm-3") ? 3
                   : !strcmp(format, "acmoe-lm-2") ? 2
                                                   : 0;
    if (!out->version) return 0;
    for (i = 0; i < m->n_meta; i++)
        if (!acmoe__known_key(m->keys[i], out->version)) return 0;
    if (!acmoe__options_from_metadata(m, acmoe__model_options, ACMOE__N_MODEL_OPTIONS, out->version, &out->desc) ||
        !acmoe__canonical_u64(acmoe__meta(m, "seed"), &out->desc.seed) || !acmoe__meta(m, "pattern"))
        return 0;
    out->desc.pattern = acmoe__meta(m, "pattern");
    if (out->version < 3) { /* its groups counted from the whole call, before the default */
        if (out->desc.moe.group >= 0 && out->desc.moe.group < ACMOE_GROUP_POSITION) out->desc.moe.group = (acmoe_group)(out->desc.moe.group + 1);
        return 1;
    }
    if (out->version >= 4) {
        if (!contents || (strcmp(contents, "training") && strcmp(contents, "weights"))) return 0;
        out->contents = strcmp(contents, "training") ? ACMOE__CONTENTS_WEIGHTS : ACMOE__CONTENTS_TRAINING;
    }
    if (!crc || strlen(crc) != 8 || !acmoe__parse_hex(crc, 8, &v)) return 0;
    out->crc = (uint32_t)v;
    return acmoe__canonical_u64(acmoe__meta(m, "train.seed"), &out->train_seed) &&
           acmoe__options_from_metadata(m, acmoe__optim_options, ACMOE__N_OPTIM_OPTIONS, out->version, &out->optim);
}

/* The step and the dropout generator: "s0s1s2s3 spare has_spare", 16, 8 and 1 digits. */
static int acmoe__state_from_metadata(const acmoe__parsed *m, acmoe_lm *model) {
    const char *text = acmoe__meta(m, "rng");
    uint64_t spare;
    uint32_t bits;
    int i;
    if (!acmoe__canonical_long(acmoe__meta(m, "step"), 0, LONG_MAX, &model->steps) || !text || strlen(text) != 75)
        return 0;
    for (i = 0; i < 4; i++)
        if (!acmoe__parse_hex(text + 16 * i, 16, &model->rng.s[i])) return 0;
    if (text[64] != ' ' || !acmoe__parse_hex(text + 65, 8, &spare) || text[73] != ' ') return 0;
    if (text[74] != '0' && text[74] != '1') return 0;
    bits = (uint32_t)spare;
    memcpy(&model->rng.spare, &bits, sizeof bits);
    model->rng.has_spare = text[74] - '0';
    return 1;
}

/* ---- checks against the planned model, then the data ---- */

static int acmoe__stored_is_shape(const int *stored, int ndim, const int *shape) {
    int i;
    for (i = 0; i < ndim; i++)
        if (stored[i] != shape[i]) return 0;
    return 1;
}

static int acmoe__stored_is(const acmoe__stored_tensor *t, int ndim, const int *shape) {
    return t && t->ndim == ndim && acmoe__stored_is_shape(t->shape, ndim, shape);
}

/* The stored tensor of a planned one. Formats 2 and 3 kept a dense layer as a one-expert MoE
   layer: "layers.i.moe.experts.w1" [1][..] for "layers.i.ffn.w1" [..]. */
static const acmoe__stored_tensor *acmoe__stored_param(acmoe__parsed *m, int version, const acmoe__tensor_info *e) {
    const char *ffn = strstr(e->name, ".ffn.");
    char legacy[96];
    const acmoe__stored_tensor *t;
    if (version >= 4 || !ffn) return acmoe__stored_is(t = acmoe__find_tensor(m, e->name), e->ndim, e->shape) ? t : NULL;
    snprintf(legacy, sizeof legacy, "%.*s.moe.experts.%s", (int)(ffn - e->name), e->name, ffn + 5);
    t = acmoe__find_tensor(m, legacy);
    return t && t->ndim == e->ndim + 1 && t->shape[0] == 1 && acmoe__stored_is_shape(t->shape + 1, e->ndim, e->shape)
               ? t
               : NULL;
}

/* The router tensors formats 2 and 3 stored for the dense layers, which are left unread. */
static int acmoe__legacy_router_tensors(const acmoe__parsed *m, const acmoe_lm *model, int version) {
    int i, j, count = 0;
    for (i = 0; version < 4 && i < model->n_layers; i++) {
        char prefix[48];
        if (model->blocks[i].letter != 'f') continue;
        snprintf(prefix, sizeof prefix, "layers.%d.moe.router.", i);
        for (j = 0; j < m->n_tensors; j++) count += !strncmp(m->tensors[j].name, prefix, strlen(prefix));
    }
    return count;
}

/* The stored AC weights of the planned model's layer i, NULL for none; whether any stored
   ones have a shape the layer takes ([rows][width], rows at most its clusters) in *fits. */
static const acmoe__stored_tensor *acmoe__stored_ac_weights(acmoe__parsed *m, const acmoe_lm *model, int i, int *fits) {
    char name[64];
    const acmoe__stored_tensor *t;
    acmoe_moe_desc planned, md;
    acmoe__ac_weights_name(name, sizeof name, i);
    t = acmoe__find_tensor(m, name);
    if (!t) return NULL;
    planned = acmoe__lm_moe_desc(model, &model->blocks[i]); /* the layers do not exist yet */
    if (acmoe_moe_resolve(&planned, &md) != ACMOE_OK) md.router_input = ACMOE_INPUT_TOKEN;
    if (model->blocks[i].letter == 'f' || md.router_input != ACMOE_INPUT_AC || t->ndim != 2 || t->shape[0] < 1 ||
        t->shape[0] > md.ac_max_clusters || t->shape[1] != md.d_model)
        *fits = 0;
    return t;
}

/* Whether the file holds exactly the planned model's tensors, each of its planned shape (the
   layout check already tied shapes to sizes), AC weights that fit their layers, and the Adam
   moments of a training state. */
static int acmoe__tensors_match_plan(acmoe__parsed *m, const acmoe_lm *model, int version, acmoe__contents contents) {
    const int n_params = (int)model->n_params;
    int i, fits = 1, count = model->dir.count + acmoe__legacy_router_tensors(m, model, version);
    for (i = 0; i < model->dir.count; i++)
        if (!acmoe__stored_param(m, version, &model->dir.entries[i])) return 0;
    for (i = 0; i < model->n_layers; i++) count += acmoe__stored_ac_weights(m, model, i, &fits) != NULL;
    if (contents == ACMOE__CONTENTS_WEIGHTS) return fits && m->n_tensors == count;
    return fits && acmoe__stored_is(acmoe__find_tensor(m, "optimizer.adam_m"), 1, &n_params) &&
           acmoe__stored_is(acmoe__find_tensor(m, "optimizer.adam_v"), 1, &n_params) && m->n_tensors == count + 2;
}

/* The checksum of the data section, read in blocks. */
static acmoe_status acmoe__check_crc(FILE *f, long data_start, uint64_t data_size, uint32_t want) {
    const size_t block = 1 << 16;
    unsigned char *buffer = (unsigned char *)ACMOE_MALLOC(block);
    acmoe__crc32c crc;
    acmoe_status s = ACMOE_OK;
    if (!buffer) return ACMOE_ERR_NOMEM;
    acmoe__crc_begin(&crc);
    if (fseek(f, data_start, SEEK_SET) != 0) s = ACMOE_ERR_IO;
    while (s == ACMOE_OK && data_size > 0) {
        size_t n = (size_t)ACMOE__MIN((uint64_t)block, data_size);
        if (fread(buffer, 1, n, f) != n) s = ACMOE_ERR_FORMAT;
        acmoe__crc_add(&crc, buffer, n);
        data_size -= n;
    }
    ACMOE_FREE(buffer);
    if (s == ACMOE_OK && acmoe__crc_value(&crc) != want) s = ACMOE_ERR_FORMAT;
    return s;
}

static acmoe_status acmoe__read_floats(FILE *f, long data_start, const acmoe__stored_tensor *t, float *dst,
                                       size_t count) {
    if (fseek(f, data_start + (long)t->begin, SEEK_SET) != 0) return ACMOE_ERR_IO;
    return fread(dst, sizeof(float), count, f) == count ? ACMOE_OK : ACMOE_ERR_FORMAT;
}

/* Layer i's stored AC weights into the layer, through a buffer of their own. */
static acmoe_status acmoe__read_ac_weights(FILE *f, long data_start, acmoe__parsed *m, acmoe_lm *model, int i) {
    int fits = 1;
    const acmoe__stored_tensor *t = acmoe__stored_ac_weights(m, model, i, &fits);
    size_t count;
    float *w;
    acmoe_status s;
    if (!t) return ACMOE_OK;
    count = (size_t)t->shape[0] * (size_t)t->shape[1];
    w = (float *)ACMOE_MALLOC(count * sizeof(float));
    if (!w) return ACMOE_ERR_NOMEM;
    s = acmoe__read_floats(f, data_start, t, w, count);
    if (s == ACMOE_OK && acmoe_moe_set_ac_weights(model->blocks[i].moe, w, t->shape[0]) != ACMOE_OK) s = ACMOE_ERR_FORMAT;
    ACMOE_FREE(w);
    return s;
}

static acmoe_status acmoe__read_tensors(FILE *f, long data_start, acmoe__parsed *m, acmoe_lm *model, int version,
                                        acmoe__contents contents) {
    acmoe_status s = ACMOE_OK;
    int i;
    for (i = 0; s == ACMOE_OK && i < model->dir.count; i++) {
        const acmoe__tensor_info *e = &model->dir.entries[i];
        s = acmoe__read_floats(f, data_start, acmoe__stored_param(m, version, e), model->params + e->offset, e->count);
    }
    for (i = 0; s == ACMOE_OK && i < model->n_layers; i++) s = acmoe__read_ac_weights(f, data_start, m, model, i);
    if (contents == ACMOE__CONTENTS_TRAINING) {
        if (s == ACMOE_OK)
            s = acmoe__read_floats(f, data_start, acmoe__find_tensor(m, "optimizer.adam_m"), model->adam_m, model->n_params);
        if (s == ACMOE_OK)
            s = acmoe__read_floats(f, data_start, acmoe__find_tensor(m, "optimizer.adam_v"), model->adam_v, model->n_params);
    }
    if (s == ACMOE_OK && (!acmoe__all_finite(model->params, model->n_params) || !acmoe__all_finite(model->adam_m, 2 * model->n_params)))
        s = ACMOE_ERR_FORMAT;
    return s;
}

/* Reads the header of a file of size bytes into m; *data_start and *data_size locate the data. */
static acmoe_status acmoe__read_header(FILE *f, uint64_t size, acmoe__parsed *m, long *data_start,
                                       uint64_t *data_size) {
    unsigned char len[8];
    uint64_t header_len = 0;
    char *text;
    int i, ok;
    if (size < 8 || fread(len, 1, 8, f) != 8) return ACMOE_ERR_FORMAT;
    for (i = 0; i < 8; i++) header_len |= (uint64_t)len[i] << (8 * i);
    if (header_len < 2 || header_len > ACMOE__HEADER_MAX || header_len > size - 8) return ACMOE_ERR_FORMAT;
    text = (char *)ACMOE_MALLOC((size_t)header_len);
    if (!text) return ACMOE_ERR_NOMEM;
    ok = fread(text, 1, (size_t)header_len, f) == header_len && acmoe__parse_header(text, (size_t)header_len, m);
    ACMOE_FREE(text);
    *data_start = 8 + (long)header_len;
    *data_size = size - 8 - header_len;
    return ok ? ACMOE_OK : m->nomem ? ACMOE_ERR_NOMEM : ACMOE_ERR_FORMAT;
}

/* The model of a parsed header. Everything the header says is checked against the file and
   against the model it describes before the model's parameters are allocated; the data's
   checksum before they are read. */
static acmoe_status acmoe__load_model(FILE *f, long data_start, uint64_t data_size, acmoe__parsed *m, acmoe_lm **out) {
    acmoe__checkpoint_meta meta;
    acmoe_lm *model = NULL;
    acmoe_status s;
    if (!acmoe__layout_exact(m, data_size) || !acmoe__meta_from_parsed(m, &meta)) return ACMOE_ERR_FORMAT;
    s = acmoe__lm_plan(&model, &meta.desc);
    if (s != ACMOE_OK) return s == ACMOE_ERR_NOMEM ? s : ACMOE_ERR_FORMAT;
    if (!acmoe__tensors_match_plan(m, model, meta.version, meta.contents)) s = ACMOE_ERR_FORMAT;
    if (s == ACMOE_OK && meta.version >= 3) s = acmoe__check_crc(f, data_start, data_size, meta.crc);
    if (s == ACMOE_OK) s = acmoe__lm_build(model);
    if (s == ACMOE_OK && !acmoe__state_from_metadata(m, model)) s = ACMOE_ERR_FORMAT;
    if (s == ACMOE_OK) s = acmoe__read_tensors(f, data_start, m, model, meta.version, meta.contents);
    if (s != ACMOE_OK) {
        acmoe_lm_destroy(model);
        return s;
    }
    model->train_seed = meta.train_seed;
    model->optim = meta.optim;
    *out = model;
    return ACMOE_OK;
}

ACMOE_API acmoe_status acmoe_lm_load(acmoe_lm **out, const char *path) {
    acmoe__parsed m;
    FILE *f;
    long data_start = 0;
    uint64_t size = 0, data_size = 0;
    acmoe_status s;
    if (!out || !path) return ACMOE_ERR_NULL;
    *out = NULL;
    if (!acmoe__little_endian()) return ACMOE_ERR_UNSUPPORTED;
    s = acmoe__open_regular(path, &f, &size);
    if (s != ACMOE_OK) return s;
    memset(&m, 0, sizeof m);
    s = acmoe__read_header(f, size, &m, &data_start, &data_size);
    if (s == ACMOE_OK) s = acmoe__load_model(f, data_start, data_size, &m, out);
    ACMOE_FREE(m.tensors);
    fclose(f);
    return s;
}

/* ========================================================================================== */
/* 13. Data and training loop                                                                 */
/* ========================================================================================== */

/* The splits of size tokens; each needs two, a token and its target. */
static acmoe_status acmoe__corpus_split(acmoe_corpus *c, size_t size, float val_fraction) {
    c->size = size;
    c->train_size = size - (size_t)((double)size * val_fraction);
    return c->train_size >= 2 && size - c->train_size >= 2 ? ACMOE_OK : ACMOE_ERR_SHAPE;
}

ACMOE_API acmoe_status acmoe_corpus_view(acmoe_corpus *c, const unsigned char *bytes, size_t size, float val_fraction) {
    size_t i;
    if (!c || !bytes) return ACMOE_ERR_NULL;
    if (!(val_fraction > 0.0f && val_fraction < 1.0f)) return ACMOE_ERR_ARG;
    if (size == 0) return ACMOE_ERR_EMPTY;
    memset(c, 0, sizeof *c);
    c->bytes = bytes;
    for (i = 0; i < size; i++) c->vocab = ACMOE__MAX(c->vocab, bytes[i] + 1);
    return acmoe__corpus_split(c, size, val_fraction);
}

ACMOE_API acmoe_status acmoe_corpus_view_tokens(acmoe_corpus *c, const int32_t *tokens, size_t count,
                                                float val_fraction) {
    size_t i;
    int32_t top = 0;
    if (!c || !tokens) return ACMOE_ERR_NULL;
    if (!(val_fraction > 0.0f && val_fraction < 1.0f)) return ACMOE_ERR_ARG;
    if (count == 0) return ACMOE_ERR_EMPTY;
    for (i = 0; i < count; i++) {
        if (tokens[i] < 0 || tokens[i] == INT32_MAX) return ACMOE_ERR_ARG;
        top = ACMOE__MAX(top, tokens[i]);
    }
    memset(c, 0, sizeof *c);
    c->tokens = tokens;
    c->vocab = top + 1;
    return acmoe__corpus_split(c, count, val_fraction);
}

/* A regular file's contents in a buffer of its own, *size bytes. */
static acmoe_status acmoe__read_file(const char *path, unsigned char **data, uint64_t *size) {
    FILE *f;
    acmoe_status s = acmoe__open_regular(path, &f, size);
    *data = NULL;
    if (s != ACMOE_OK) return s;
    if (*size == 0) s = ACMOE_ERR_EMPTY;
    else if (*size > (uint64_t)ACMOE__MAX_BYTES) s = ACMOE_ERR_NOMEM;
    else if (!(*data = (unsigned char *)ACMOE_MALLOC((size_t)*size))) s = ACMOE_ERR_NOMEM;
    else if (fread(*data, 1, (size_t)*size, f) != (size_t)*size) s = ACMOE_ERR_IO;
    fclose(f);
    return s;
}

ACMOE_API acmoe_status acmoe_corpus_load(acmoe_corpus *c, const char *path, float val_fraction) {
    uint64_t size = 0;
    unsigned char *bytes = NULL;
    acmoe_status s;
    if (!c || !path) return ACMOE_ERR_NULL;
    memset(c, 0, sizeof *c);
    if (!(val_fraction > 0.0f && val_fraction < 1.0f)) return ACMOE_ERR_ARG;
    s = acmoe__read_file(path, &bytes, &size);
    if (s == ACMOE_OK) s = acmoe_corpus_view(c, bytes, (size_t)size, val_fraction);
    if (s != ACMOE_OK) {
        ACMOE_FREE(bytes);
        memset(c, 0, sizeof *c);
        return s;
    }
    c->owned = bytes;
    return ACMOE_OK;
}

ACMOE_API acmoe_status acmoe_corpus_load_tokens(acmoe_corpus *c, const char *path, float val_fraction) {
    uint64_t size = 0;
    unsigned char *bytes = NULL;
    acmoe_status s;
    size_t i;
    if (!c || !path) return ACMOE_ERR_NULL;
    memset(c, 0, sizeof *c);
    if (!(val_fraction > 0.0f && val_fraction < 1.0f)) return ACMOE_ERR_ARG;
    if (!acmoe__little_endian()) return ACMOE_ERR_UNSUPPORTED;
    s = acmoe__read_file(path, &bytes, &size);
    if (s == ACMOE_OK && size % 4) s = ACMOE_ERR_FORMAT;
    for (i = 0; s == ACMOE_OK && i < size; i += 4)
        if (bytes[i + 3] & 0x80u) s = ACMOE_ERR_FORMAT; /* a negative id */
    /* the buffer came from the allocator, so it is aligned for int32 */
    if (s == ACMOE_OK) s = acmoe_corpus_view_tokens(c, (const int32_t *)(void *)bytes, (size_t)size / 4, val_fraction);
    if (s == ACMOE_ERR_ARG) s = ACMOE_ERR_FORMAT;
    if (s != ACMOE_OK) {
        ACMOE_FREE(bytes);
        memset(c, 0, sizeof *c);
        return s;
    }
    c->owned = bytes;
    return ACMOE_OK;
}

ACMOE_API void acmoe_corpus_destroy(acmoe_corpus *c) {
    if (!c) return;
    ACMOE_FREE(c->owned);
    memset(c, 0, sizeof *c);
}

ACMOE_API acmoe_status acmoe_corpus_batch(const acmoe_corpus *c, acmoe_split split, acmoe_rng *rng, int batch,
                                          int seq, int32_t *tokens, int32_t *targets) {
    size_t from, to, len, span;
    int b, t;
    if (!c || (!c->bytes && !c->tokens) || !rng || !tokens || !targets) return ACMOE_ERR_NULL;
    if (split != ACMOE_SPLIT_TRAIN && split != ACMOE_SPLIT_VAL) return ACMOE_ERR_ARG;
    if (batch < 1 || seq < 1 || c->train_size > c->size) return ACMOE_ERR_SHAPE;
    from = split == ACMOE_SPLIT_VAL ? c->train_size : 0, to = split == ACMOE_SPLIT_VAL ? c->size : c->train_size;
    len = to - from, span = len > (size_t)seq + 1 ? len - (size_t)seq - 1 : 0;
    if (len < 2) return ACMOE_ERR_SHAPE; /* a token and its target */
    for (b = 0; b < batch; b++) {
        size_t start = span ? (size_t)acmoe_rng_below(rng, (uint32_t)ACMOE__MIN(span, (size_t)UINT32_MAX)) : 0;
        for (t = 0; t < seq; t++) {
            size_t at = ACMOE__MIN(start + (size_t)t, len - 2);
            tokens[(size_t)b * seq + t] = c->tokens ? c->tokens[from + at] : c->bytes[from + at];
            targets[(size_t)b * seq + t] = c->tokens ? c->tokens[from + at + 1] : c->bytes[from + at + 1];
        }
    }
    return ACMOE_OK;
}

/* The two token buffers of a batch of the model's size. */
/* The ranks a loop's batches are shared among: this one and their count (0 of 1 alone). */
typedef struct acmoe__share {
    int rank, size;
} acmoe__share;

static acmoe__share acmoe__share_of(const acmoe_comm *comm) {
    acmoe__share share;
    share.rank = comm ? comm->rank : 0, share.size = comm ? comm->size : 1;
    return share;
}

/* Room for a global batch, the model's batch. */
static acmoe_status acmoe__batch_buffers(const acmoe_lm *model, int32_t **tokens, int32_t **targets) {
    size_t n = (size_t)model->desc.batch * model->desc.seq_len;
    *tokens = (int32_t *)ACMOE_MALLOC(sizeof(int32_t) * n * 2);
    *targets = *tokens ? *tokens + n : NULL;
    return *tokens ? ACMOE_OK : ACMOE_ERR_NOMEM;
}

/* Each of n tokens replaced, with probability corrupt, by one uniform in [0, vocab). */
static void acmoe__corrupt_tokens(int32_t *tokens, size_t n, float corrupt, int vocab, acmoe_rng *rng) {
    size_t i;
    for (i = 0; i < n; i++)
        if (acmoe_rng_uniform(rng) < corrupt) tokens[i] = (int32_t)acmoe_rng_below(rng, (uint32_t)vocab);
}

/* The mean of a loss over the ranks (the global batch's, when each rank's batch is as
   large). */
static acmoe_status acmoe__mean_over_ranks(acmoe_comm *comm, double *loss) {
    float value = (float)*loss;
    acmoe_status s;
    if (!comm || comm->size == 1) return ACMOE_OK;
    s = comm->sum(comm, &value, 1);
    *loss = (double)value / comm->size;
    return s;
}

/* Mean loss over batches from the validation split, with inputs damaged as
   acmoe_lm_evaluate_corrupted describes; tokens and targets are scratch for a global batch,
   of which this rank takes its share. */
static acmoe_status acmoe__evaluate(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_corpus *c, int batches, uint64_t seed,
                                    float corrupt, acmoe__share share, int32_t *tokens, int32_t *targets, double *loss) {
    const int batch = model->desc.batch / share.size, seq = model->desc.seq_len;
    const size_t n = (size_t)model->desc.batch * seq, mine = (size_t)batch * seq * (size_t)share.rank;
    acmoe_rng rng, damage;
    double total = 0.0;
    int i;
    acmoe_rng_seed(&rng, seed);
    acmoe_rng_seed(&damage, ~seed); /* a stream of its own: the batches stay those of the clean text */
    for (i = 0; i < batches; i++) {
        float l;
        acmoe_status s;
        s = acmoe_corpus_batch(c, ACMOE_SPLIT_VAL, &rng, model->desc.batch, seq, tokens, targets);
        if (s != ACMOE_OK) return s;
        if (corrupt > 0.0f) acmoe__corrupt_tokens(tokens, n, corrupt, model->desc.vocab, &damage);
        s = acmoe_lm_forward(model, ctx, tokens + mine, targets + mine, batch, seq, 0, &l);
        if (s != ACMOE_OK) return s;
        total += l;
    }
    *loss = total / batches;
    return ACMOE_OK;
}

ACMOE_API acmoe_status acmoe_lm_evaluate_corrupted(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_corpus *c, int batches,
                                                   uint64_t seed, float corrupt, double *loss) {
    int32_t *tokens, *targets;
    acmoe_status s;
    if (!model || !ctx || !c || (!c->bytes && !c->tokens) || !loss) return ACMOE_ERR_NULL;
    if (batches < 1 || model->desc.n_classes || !(corrupt >= 0.0f && corrupt <= 1.0f) || c->vocab > model->desc.vocab)
        return ACMOE_ERR_ARG;
    s = acmoe__batch_buffers(model, &tokens, &targets);
    if (s == ACMOE_OK) s = acmoe__evaluate(model, ctx, c, batches, seed, corrupt, acmoe__share_of(NULL), tokens, targets, loss);
    ACMOE_FREE(tokens);
    return s;
}

ACMOE_API acmoe_status acmoe_lm_evaluate(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_corpus *c, int batches,
                                         uint64_t seed, double *loss) {
    return acmoe_lm_evaluate_corrupted(model, ctx, c, batches, seed, 0.0f, loss);
}

/* Fills the timing fields of an event from the context clock. */
static void acmoe__event_times(const acmoe_ctx *ctx, acmoe_train_event *e, double seconds, long trained, size_t tokens) {
    if (!ctx->desc.clock || trained == 0 || seconds <= 0.0) return;
    e->tokens_per_second = (double)trained * (double)tokens / seconds;
    e->eta_seconds = seconds / (double)trained * (double)(e->steps - e->step);
}

/* Whether every rank holds this rank's parameters: rank 0's checksum against each one's. */
static acmoe_status acmoe__ranks_agree(const acmoe_lm *model, acmoe_comm *comm) {
    acmoe__crc32c crc;
    uint32_t mine, first;
    float differ;
    acmoe_status s;
    if (!comm || comm->size == 1) return ACMOE_OK;
    acmoe__crc_begin(&crc);
    acmoe__crc_add(&crc, model->params, sizeof(float) * model->n_params);
    mine = first = acmoe__crc_value(&crc);
    s = comm->broadcast(comm, &first, sizeof first, 0);
    differ = mine != first ? 1.0f : 0.0f;
    if (s == ACMOE_OK) s = comm->sum(comm, &differ, 1); /* every rank learns whether any differs */
    return s != ACMOE_OK ? s : differ > 0.0f ? ACMOE_ERR_DIVERGED : ACMOE_OK;
}

/* One step on this rank's share of the global batch of step e->step: e->loss is the global
   batch's, the update the same on every rank. */
static acmoe_status acmoe__train_step(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_corpus *c, const acmoe_train_desc *desc,
                                      int32_t *tokens, int32_t *targets, acmoe_train_event *e) {
    const acmoe__share share = acmoe__share_of(desc->comm);
    const int batch = model->desc.batch / share.size, seq = model->desc.seq_len;
    const size_t mine = (size_t)batch * seq * (size_t)share.rank;
    double loss = 0.0;
    acmoe_rng rng;
    acmoe_status s;
    acmoe_rng_seed(&rng, desc->seed * 1000003u + (uint64_t)e->step);
    s = acmoe_corpus_batch(c, ACMOE_SPLIT_TRAIN, &rng, model->desc.batch, seq, tokens, targets);
    e->lr = acmoe_lr_at(&desc->optim, model->steps);
    if (s == ACMOE_OK) s = acmoe_lm_forward(model, ctx, tokens + mine, targets + mine, batch, seq, 1, &e->loss);
    if (s == ACMOE_OK) acmoe_lm_zero_grad(model), s = acmoe_lm_backward(model, ctx);
    if (s == ACMOE_OK && desc->comm) s = acmoe_lm_reduce_grads(model, desc->comm);
    if (s == ACMOE_OK) loss = e->loss, s = acmoe__mean_over_ranks(desc->comm, &loss), e->loss = (float)loss;
    return s == ACMOE_OK ? acmoe_lm_step(model, ctx, &desc->optim, &e->grad_norm) : s;
}

/* The evaluation event's losses, on every rank's share of the same global batches. */
static acmoe_status acmoe__train_evaluation(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_corpus *c,
                                            const acmoe_train_desc *desc, int32_t *tokens, int32_t *targets,
                                            acmoe_train_event *e) {
    const acmoe__share share = acmoe__share_of(desc->comm);
    acmoe_status s = acmoe_lm_gather_experts(model);
    if (s == ACMOE_OK) s = acmoe__ranks_agree(model, desc->comm);
    e->kind = ACMOE_EVENT_EVAL;
    if (s == ACMOE_OK)
        s = acmoe__evaluate(model, ctx, c, desc->eval_batches, desc->eval_seed, 0.0f, share, tokens, targets, &e->val_loss);
    if (s == ACMOE_OK) s = acmoe__mean_over_ranks(desc->comm, &e->val_loss);
    if (s == ACMOE_OK && desc->eval_corrupt > 0.0f)
        s = acmoe__evaluate(model, ctx, c, desc->eval_batches, desc->eval_seed, desc->eval_corrupt, share, tokens, targets,
                            &e->val_loss_corrupted);
    if (s == ACMOE_OK && desc->eval_corrupt > 0.0f) s = acmoe__mean_over_ranks(desc->comm, &e->val_loss_corrupted);
    return s;
}

ACMOE_API acmoe_status acmoe_lm_train(acmoe_lm *model, acmoe_ctx *ctx, const acmoe_corpus *c,
                                      const acmoe_train_desc *desc) {
    acmoe_train_desc resolved;
    int32_t *tokens, *targets;
    acmoe_status s;
    double seconds = 0.0;
    long trained = 0;
    size_t batch_tokens;
    if (!model || !ctx || !c || (!c->bytes && !c->tokens) || !desc) return ACMOE_ERR_NULL;
    if (model->desc.n_classes || c->vocab > model->desc.vocab) return ACMOE_ERR_ARG; /* tokens the model has no row for */
    resolved = *desc;
    if (!resolved.eval_every) resolved.eval_every = 250;
    if (!resolved.eval_batches) resolved.eval_batches = 8;
    if (!resolved.log_every) resolved.log_every = 50;
    if (!resolved.eval_seed) resolved.eval_seed = 12345;
    if (resolved.steps < 0 || resolved.eval_every < 1 || resolved.eval_batches < 1 || resolved.log_every < 1) return ACMOE_ERR_ARG;
    if (!(resolved.eval_corrupt >= 0.0f && resolved.eval_corrupt <= 1.0f)) return ACMOE_ERR_ARG;
    if (resolved.comm && (resolved.comm->size < 1 || resolved.comm->rank < 0 || resolved.comm->rank >= resolved.comm->size ||
                          model->desc.batch % resolved.comm->size))
        return ACMOE_ERR_ARG; /* each rank takes an equal share of the batch */
    batch_tokens = (size_t)model->desc.batch / (size_t)acmoe__share_of(resolved.comm).size * model->desc.seq_len;
    resolved.optim = acmoe__optim_resolve(&desc->optim);
    if (!acmoe__optim_valid(&resolved.optim)) return ACMOE_ERR_ARG;
    model->train_seed = resolved.seed;
    s = acmoe__batch_buffers(model, &tokens, &targets);
    if (s == ACMOE_OK && resolved.expert_parallel && resolved.comm) s = acmoe_lm_set_expert_ranks(model, resolved.comm);
    while (s == ACMOE_OK && model->steps < resolved.steps) {
        acmoe_train_event e;
        double start = acmoe__clock_start(ctx);
        memset(&e, 0, sizeof e);
        e.step = model->steps + 1, e.steps = resolved.steps;
        s = acmoe__train_step(model, ctx, c, &resolved, tokens, targets, &e);
        if (s != ACMOE_OK) break;
        acmoe__lap(ctx, &start, &seconds);
        trained++;
        acmoe__event_times(ctx, &e, seconds, trained, batch_tokens);
        if ((e.step % resolved.log_every == 0 || e.step == resolved.steps) && resolved.on_event && resolved.on_event(&e, model, resolved.user))
            s = ACMOE_STOPPED;
        if (s == ACMOE_OK && (e.step % resolved.eval_every == 0 || e.step == resolved.steps)) {
            s = acmoe__train_evaluation(model, ctx, c, &resolved, tokens, targets, &e);
            if (s == ACMOE_OK && resolved.on_event && resolved.on_event(&e, model, resolved.user)) s = ACMOE_STOPPED;
        }
    }
    if (model->expert_ranks) {
        if (s == ACMOE_OK || s == ACMOE_STOPPED) { /* every rank is here */
            acmoe_status gathered = acmoe_lm_gather_experts(model);
            if (gathered != ACMOE_OK) s = gathered;
        }
        acmoe_lm_set_expert_ranks(model, NULL);
    }
    ACMOE_FREE(tokens);
    return s;
}

#ifdef __cplusplus
}
#endif
#endif /* ACMOE_IMPLEMENTATION */

/*
MIT License

Copyright (c) 2026 the acmoe authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT
OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
*/
