#!/usr/bin/python3
"""Whole-model check of acmoe against PyTorch, in llm.c's manner.

    /usr/bin/python3 tools/reference_check.py build/reference [CASE ...]

For every case that build/reference_dump (tools/reference_dump.c) wrote into the directory,
this script reads the checkpoint NAME.safetensors (weights and configuration), rebuilds the
same model in PyTorch in float64, runs the batch saved beside it (NAME.batch.safetensors)
with autograd, and compares with what acmoe computed in float32: the logits, the loss (the
cross-entropy plus the layers' auxiliary losses: Swin-MoE's load and importance loss), and
the gradient of every parameter (NAME.grads.safetensors, under the parameters' names).

Relative error of a tensor a (acmoe) against its reference b (this script):
    max_i |a_i - b_i| / max_i |b_i|,
the largest difference over the largest reference magnitude of the whole tensor; where the
reference is all zeros (the router of a dense layer has no gradient) it is max_i |a_i|. A case
passes when every tensor's relative error is at most 1e-4. Discrete choices (top-k, labels,
the pairs a USMoE group keeps, the assignments a capacity drops) carry no gradient; the smallest gap the reference saw at a cut
is printed when it is under 1e-6, since a near tie could pick differently in float32.

The backbone is acmoe's own (acmoe.h section 9): token and learned position embeddings, or
a linear patch embedding for a vision encoder; causal multi-head attention with a fused qkv
([q | k | v], head h in columns h*dh..(h+1)*dh of each, scores scaled by 1/sqrt(dh)), or
unmasked for a vision encoder; layer norm with eps 1e-5, post-LN (h = LN1(x + attn(x)),
y = LN2(h + moe(h))) or pre-LN with a final norm; the head tied to the token embedding or
not; a vision encoder classifies the mean of its last rows. The Swin backbone (window > 0) is
built as the authors' image-classification/models/swin_transformer_cosa.py builds it (function
swin below, with line numbers): patch embedding and its norm, stages split by '|' in the
pattern, pre-LN blocks with attention in windows shifted by half a window on odd blocks of a
stage (the -100 mask), patch merging into twice the width, heads and d_ff, AC labels afresh in
each stage; its relative position bias is acmoe's (DISAGREEMENTS below). Experts
are W2 act(W1 x + b1) + b2 as in the AC reference's _Expert (language-modeling/custom_transformer.py
lines 11-33 of Fsoft-AIC/Tight-Clusters-Make-Specialized-Experts), for every router (the
Swin-MoE runs freeze b2 at 0 and drop 10 % of the hidden units, the USMoE experts have no
biases: backbone choices, like the block). The authors' language-model
block is not acmoe's (their MoE wrapper adds its own residual and LayerNorm, models.py:663,
inside the block's, :1156, and attention has relative position keys and a cache): this checks
acmoe's backbone around the authors' routers.

The routers are written from the authors' code paths, not from acmoe.h (one function each,
registered in GATES by router letter; a backbone is one function in BACKBONES). Files of
Fsoft-AIC/Tight-Clusters-Make-Specialized-Experts at 4762d61 unless named otherwise:
  g  SMoE      language-modeling/custom_gates.py:783-833 (CustomNaiveGate_Balance_SMoE) and
               the gate-weighted sum of custom_layers.py:348-356
  b  StableMoE custom_gates.py:1336-1410 (CustomNaiveGate_Balance_StableMoE: the embeddings
               not re-projected, :1372-1375, 1398-1403)
  c  AC        custom_gates.py:1007-1335 (COSAGate_Balance, use_var=True, mad=True as the
               language-model runs set them: the scripts/pretraining acmoe and cosa scripts pass
               --use-var --mad, all but wikitext-103/glam/small/acmoe-s.sh)
  u  USMoE     USMoE/Training_scratch/custom_transformer.py:37-91 of giangdip2410/USMoE at
               70d6447 (gate without bias, the top pairs of each position across the batch)
  m  Soft MoE  acmoe's documented 'm', not the authors': google-research/vmoe's form
               (vmoe/projects/soft_moe/router.py:56-100 normalises a copy of the tokens for the
               logits; vmoe/nn/vit_moe.py:108-120 dispatches the raw tokens to the slots)
  n  Soft MoE  softmoe-image-classification/softmoe.py:92-180 (SoftMoELayerWrapper, normalize,
               no AC: the normalised tokens feed the logits and the slots)
  a  AC Soft MoE  softmoe.py:92-180 with acmoe=True and compute_acmoe :184-289 (mad, mix_weights)
  t  Swin-MoE  image-classification/models/swin_transformer_cosa.py:38-96 (MoEMlp: Tutel's top
               gate, capacity 1.25, gate_noise 1, batch-prioritised routing, the load and
               importance loss), models/gates/top.py:6-22, models/impls/moe_layer.py:270-297,
               fast_dispatch.py:138-208, losses.py:21-43; the loss weight 0.01 (config.py,
               swin_transformer_cosa.py forward)
  w  AC Swin-MoE  't' on the block's MoE input weighted by compute_cosa
               (swin_transformer_cosa.py:414-419, 477-572: mad, no mix_weights)
  f  dense FFN (acmoe's one-expert layer; the labels pass it, as past models.py:1168-1171)
The Soft MoE layers group each image's tokens in a vision encoder (a Swin stage's patches of
each image) and each position's tokens across the batch in a language model (acmoe's causal
grouping). The authors' Soft MoE takes
topk(mix_k = 8) over the slots (softmoe.py:142), which raises with fewer than 8 slots; acmoe
and this reference take min(mix_k, slots). A noisy gate (t, w) in training adds the normal
draws the dump recorded (noise.layers.N) times gate_noise / E; in evaluation it has none.
Where acmoe.h's routers disagree with those (DISAGREEMENTS below), the case fails, and the
script also prints the error of acmoe.h's reading, so that the rest of the model is still
checked; a documented deviation of a backbone is printed under each of its cases.

Exit status: 0 when every case passes, 1 when one fails, 2 for a missing or unreadable input.
Needs PyTorch (Debian: python3-torch) and numpy; reads safetensors with json and numpy.
"""

import glob
import json
import math
import os
import struct
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F

TOLERANCE = 1e-4
LN_EPS = 1e-5
torch.set_default_dtype(torch.float64)
warnings.filterwarnings("ignore", message="index_reduce")  # beta in PyTorch 1.13; the authors call it


# ---------------------------------------------------------------------------------------------
# safetensors, read with json and numpy

DTYPES = {"F32": np.float32, "I32": np.int32, "F64": np.float64, "I64": np.int64}


def read_safetensors(path):
    """(metadata, {name: numpy array}) of a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + length
    tensors = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]
        arr = np.frombuffer(blob[base + begin:base + end], dtype=DTYPES[t["dtype"]])
        tensors[name] = arr.reshape(t["shape"]).copy()
    return meta, tensors


# ---------------------------------------------------------------------------------------------
# Routing context: what a gate needs besides its parameters and input


ACTIVATIONS = ["relu", "gelu", "swiglu"]  # acmoe_enum_name(ACMOE_ENUM_ACTIVATION, i)
GROUPS = ["default", "batch", "sequence", "position"]  # ACMOE_ENUM_GROUP


def enum_value(names, text):
    """An enum by the name acmoe-lm-4 metadata stores."""
    return names.index(text)


def layer_tensors(L):
    """A layer's FFN tensors by their names after "moe.": a dense layer's ("ffn.w1" [f, d], ...)
    as the one expert of an MoE layer ("experts.w1" [1, f, d], ...)."""
    M = {k[len("moe."):]: v for k, v in L.items() if k.startswith("moe.")}
    M.update({"experts." + k[len("ffn."):]: v.unsqueeze(0) for k, v in L.items() if k.startswith("ffn.")})
    return M


class Ctx:
    """One forward pass: sizes, options from the checkpoint, and what the gates observed."""

    def __init__(self, meta, batch, seq, vision, acmoe_reading, training=False, noise=None):
        self.batch, self.seq, self.vision = batch, seq, vision
        self.n_experts = int(meta["n_experts"])
        self.top_k = int(meta["top_k"])
        self.activation = enum_value(ACTIVATIONS, meta["activation"])
        # default (position: a model always knows its sequence length), batch, sequence, position
        self.group = enum_value(GROUPS, meta["moe.group"])
        self.soft_slots = int(meta["moe.soft_slots"]) or 1
        self.mix_k = int(meta.get("moe.mix_k", "0")) or 8
        self.usmoe_budget = float(meta["moe.usmoe_budget"]) or float(self.top_k)
        self.usmoe_rho = float(meta["moe.usmoe_rho"]) or 0.5
        self.acmoe_reading = acmoe_reading  # follow acmoe.h where it disagrees with the authors
        self.training = training  # the gate noise of 't' and 'w'
        self.noise = noise or {}  # layer -> [n, E] standard normal draws
        self.layer = -1  # the layer being run
        self.aux = []  # the layers' auxiliary losses, weighted
        self.min_gap = math.inf  # the smallest gap seen at a discrete cut
        self.seen = set()  # paths of the gates this pass took that a check should cover

    def cut(self, sorted_values, k):
        """Records the gap between the k-th and (k+1)-th of values sorted in descending order."""
        if k < sorted_values.shape[-1]:
            gap = (sorted_values[..., k - 1] - sorted_values[..., k]).min().item()
            scale = max(sorted_values.abs().max().item(), 1e-30)
            self.min_gap = min(self.min_gap, gap / scale)


class Routing:
    """A layer's routing as the next layer reads it: idx [n, k] best expert first, vals [n, k]
    their raw scores (logits), gate [n, k] the softmax of vals (acmoe's stats.gate)."""

    def __init__(self, idx, vals):
        self.idx, self.vals = idx, vals.detach()
        self.gate = F.softmax(self.vals, dim=-1)


def activate(ctx, h):
    if ctx.activation == 0:  # ReLU: the LM reference, models.py:584 (nn.ReLU then dropout)
        return torch.relu(h)
    if ctx.activation == 1:  # exact GELU: softmoe.py:359, the experts' act_layer nn.GELU
        return F.gelu(h)
    g, u = h.chunk(2, dim=-1)  # SwiGLU (acmoe's option): silu of the first half times the second
    return F.silu(g) * u


def expert(P, j, rows, ctx):
    """_Expert of custom_transformer.py:11-33: htoh4 (with bias), activation, h4toh (with bias)."""
    h = rows @ P["experts.w1"][j].T + P["experts.b1"][j]
    return activate(ctx, h) @ P["experts.w2"][j].T + P["experts.b2"][j]


def combine_pairs(P, x, tok, exp, weight, ctx):
    """sum over the pairs (token, expert, weight) of weight * expert(x[token])."""
    out = torch.zeros_like(x)
    for j in range(P["experts.w1"].shape[0]):
        sel = (exp == j).nonzero(as_tuple=True)[0]
        if len(sel):
            t = tok[sel]
            out = out.index_add(0, t, weight[sel, None] * expert(P, j, x[t], ctx))
    return out


def combine_topk(P, x, idx, score, ctx):
    """custom_layers.py:348-356: each token's k expert outputs weighted by gate_score (bmm)."""
    n, k = idx.shape
    tok = torch.arange(n).repeat_interleave(k)
    return combine_pairs(P, x, tok, idx.reshape(-1), score.reshape(-1), ctx)


def topk_best_first(ctx, z, k):
    """torch.topk over the experts. The authors pass sorted=False; on CUDA, for k = 2 and no tie,
    that returns the best expert first (the k-1 values above the k-th in index order, then the
    k-th), and column 0 is what COSAGate_Balance reads as the label (custom_gates.py:1215).
    Sorting makes that explicit and device independent."""
    val, idx = torch.topk(z, k, dim=-1, largest=True, sorted=True)
    ctx.cut(torch.sort(z.detach(), dim=-1, descending=True)[0], k)
    return val, idx


# ---------------------------------------------------------------------------------------------
# Gates, one function per router letter: fn(P, x, prev, ctx) -> (out, Routing or None).
# P holds the layer's MoE tensors by their names after "layers.N.moe.", x is [n, d_model] in
# acmoe's token order (sequence by sequence), prev the routing of the MoE layer before.

GATES = {}


def gate(letter, name):
    def register(fn):
        GATES[letter] = (name, fn)
        return fn

    return register


# Where acmoe.h and the authors' code differ. A router's (keyed by its letter) fails the case,
# and the reading of acmoe.h (ctx.acmoe_reading) is checked as well: none today. A backbone's
# (keyed "backbone NAME") is a documented deviation of acmoe's backbone, which this script
# builds in acmoe's form (a checkpoint has no weights for the authors' form): printed under
# each case of that backbone, not a failure.
DISAGREEMENTS = {
    "backbone Swin": "the relative position bias is Swin-V1's learned table [(2w-1)^2][heads] "
                     "(layers.I.attn.rel_bias); the authors' WindowAttention computes the table from "
                     "Swin-V2's continuous position bias MLP cpb_mlp (Linear(2, 512), ReLU, Linear(512, "
                     "heads)) on log-spaced relative coordinates (swin_transformer_cosa.py L158-179, "
                     "L213-217); the index (dy+w-1)(2w-1)+(dx+w-1) is theirs (L181-192)",
}


@gate("g", "SMoE")
def gate_smoe(P, x, prev, ctx):
    # custom_gates.py:812 gate = self.gate(inp), a Linear with bias (:786); :821-823 top-k;
    # :826 softmax over the k selected logits; no balance loss (g_blance False in the LM runs)
    z = x @ P["router.weight"].T + P["router.bias"]
    val, idx = topk_best_first(ctx, z, ctx.top_k)
    score = F.softmax(val, dim=-1)
    return combine_topk(P, x, idx, score, ctx), Routing(idx, val)


@gate("b", "StableMoE")
def gate_stablemoe(P, x, prev, ctx):
    # CustomNaiveGate_Balance_StableMoE.forward (custom_gates.py:1372-1396): the dot product with
    # the unit embeddings (_cosine :1398-1403, the input not normalised, eps 1e-4), no
    # re-projection to norm 1.5 (which XMoE and AC do), _make_finite, top-k, softmax over the k
    z = x @ F.normalize(P["router.embedding"], p=2.0, dim=1, eps=1e-4).T
    z = make_finite(z)
    val, idx = topk_best_first(ctx, z, ctx.top_k)
    score = F.softmax(val, dim=-1)
    return combine_topk(P, x, idx, score, ctx), Routing(idx, val)


@gate("f", "dense")
def gate_dense(P, x, prev, ctx):
    # acmoe's dense FFN is a one-expert layer with gate 1; the authors' dense layers
    # (models.py:1168-1171) leave gate_top_k_idx to the next MoE layer untouched
    return expert(P, 0, x, ctx), None


def ac_weights_lm(ctx, tokens, labels, k_rows):
    """COSAGate_Balance.compute_W_var with mad=True (custom_gates.py:1210-1287): per cluster and
    feature the mean absolute deviation around the cluster mean (index_reduce 'mean' with
    include_self=False: a cluster without tokens keeps 0), W = 1 / (MAD + 1e-4) (:1278), clipped
    at 10 x its mean (:1281-1283), divided by each feature's mean over the clusters (:1287)."""
    d = tokens.shape[1]
    count = torch.zeros(k_rows).index_add(0, labels, torch.ones(len(labels)))
    safe = count.clamp(min=1)[:, None]
    mean = torch.zeros(k_rows, d).index_add(0, labels, tokens) / safe  # :1253
    centred = (tokens - mean[labels]).abs()  # :1254
    mad = torch.zeros(k_rows, d).index_add(0, labels, centred) / safe  # :1255
    w = 1.0 / (mad + 1e-4)
    if bool((count < 2).any()):
        ctx.seen.add("AC cluster of <2 tokens")
    if bool((w > 10.0 * w.mean()).any()):
        ctx.seen.add("AC clip bound")
    w = torch.clamp(w, max=10.0 * w.mean())
    return w / w.mean(dim=0)


@gate("c", "AC")
def gate_ac(P, x, prev, ctx):
    # COSAGate_Balance.forward, the "xmoe base" branch (custom_gates.py:1090-1120), use_var=True
    emb = P["router.embedding"]
    with torch.no_grad():  # :1093-1097 re-projection to norm 1.5, in place, no gradient
        emb.mul_(1.5 / emb.norm(p=2.0, dim=1, keepdim=True))
    with torch.no_grad():  # :1215-1217 labels = column 0 of the previous top-k, K = 1 + max of all
        labels = prev.idx[:, 0]
        w = ac_weights_lm(ctx, x.detach(), labels, int(prev.idx.max().item()) + 1)[labels]  # :1322
    ehat = F.normalize(emb, p=2.0, dim=1, eps=1e-4)  # _cosa_dot :1131
    z = (x * w) @ ehat.T  # :1124 W from compute_W_var, :1132-1134
    z = make_finite(z)  # :1100
    val, idx = topk_best_first(ctx, z, ctx.top_k)  # :1109-1112
    score = F.softmax(val, dim=-1)  # :1114
    return combine_topk(P, x, idx, score, ctx), Routing(idx, val)


def make_finite(z):
    """_make_finite (custom_gates.py:1327-1332): non-finite scores become the smallest finite."""
    ok = torch.isfinite(z)
    if bool(ok.all()):
        return z
    return torch.where(ok, z, z[ok].min())


def group_rows(ctx, n):
    """Token indices [groups, members] of acmoe's grouping (moe.group) for n = batch * seq."""
    order = torch.arange(n).reshape(ctx.batch, ctx.seq)
    if ctx.group in (0, 3):  # default and position: the authors' layout, [qlen, bsz] (see gate_usmoe)
        return order.T.contiguous()
    if ctx.group == 2:  # by sequence
        return order
    return order.reshape(1, n)  # the whole call


@gate("u", "USMoE")
def gate_usmoe(P, x, prev, ctx):
    # FMoETransformerMLP.forward of USMoE/Training_scratch/custom_transformer.py:41-91. Its
    # hidden states are [qlen, bsz, d] (Transformer-XL: mem_transformer.py:964, data_utils.py:50),
    # so "batch_size, sequence_length" (:42) are (qlen, bsz) and the top-k over
    # reshape(batch_size, -1) (:51-55) picks bsz * top_k (token, expert) pairs among the tokens
    # of each position: acmoe's default groups. Other groups (moe.group) take the same rule.
    E = ctx.n_experts
    z = x @ P["router.weight"].T  # :45, nn.Linear(d_model, E, bias=False) (:37)
    rho = ctx.usmoe_rho  # self.rate = 0.5 (:39)
    w = (1 - rho) * F.softmax(z, dim=1) + rho * torch.sigmoid(z) * 2.0 / E  # :46-49
    groups = group_rows(ctx, x.shape[0])
    members = groups.shape[1]
    budget = ctx.usmoe_budget * members
    if abs(budget - round(budget)) > 1e-6:
        raise Unsupported("a fractional USMoE budget (the authors take top_k pairs per token)")
    flat = w[groups].reshape(groups.shape[0], members * E)  # :51
    _, pick = torch.topk(flat, int(round(budget)), dim=-1, sorted=True)  # :52-55
    ctx.cut(torch.sort(flat.detach(), dim=-1, descending=True)[0], int(round(budget)))
    tok = groups.gather(1, torch.div(pick, E, rounding_mode="floor")).reshape(-1)
    exp = (pick % E).reshape(-1)
    out = combine_pairs(P, x, tok, exp, w[tok, exp], ctx)  # :75-88, weight w, not renormalised
    # the authors' layer hands no labels on; acmoe gives the next layer the top-k by logit
    val, idx = torch.topk(z.detach(), ctx.top_k, dim=-1, sorted=True)
    return out, Routing(idx, val)


def soft_groups(ctx, n):
    """Token indices [groups, members] of a Soft MoE layer: each image in a vision encoder; in
    a language model the tokens of one position across the batch (acmoe's causal grouping)."""
    groups = torch.arange(n).reshape(ctx.batch, ctx.seq)
    return groups if ctx.vision else groups.T.contiguous()


def vmoe_normalize(x, dim):
    """vmoe/projects/soft_moe/router.py:36-38: x * rsqrt(sum x^2 + 1e-6)."""
    return x * torch.rsqrt(x.square().sum(dim=dim, keepdim=True) + 1e-6)


def cluster_mad(tokens, labels, k_rows):
    """softmoe.py:211-213 and swin_transformer_cosa.py:495-497: each cluster's mean and then mean
    absolute deviation per feature, index_reduce 'mean' without self (empty clusters keep 0)."""
    d = tokens.shape[1]
    mean = torch.zeros(k_rows, d).index_reduce(0, labels, tokens, "mean", include_self=False)
    centred = (tokens - mean[labels]).abs()
    return torch.zeros(k_rows, d).index_reduce(0, labels, centred, "mean", include_self=False)


def compute_acmoe(ctx, tokens, prev):
    """SoftMoELayerWrapper.compute_acmoe (softmoe.py:184-289) with mad and mix_weights: labels
    the previous layer's best (column 0, :200), K = 1 + the largest of all its columns (:206),
    W = 1 / (MAD + 0.35) (:216), clipped at 5 x its mean (:219-226), divided by its mean after
    the clip (:242); each token's row the mix of the rows of its previous columns by the softmax
    of their raw scores (:265-283). No gradient (:195)."""
    with torch.no_grad():
        A = prev.idx
        labels = A[:, 0]
        count = torch.bincount(labels, minlength=int(A.max().item()) + 1)
        if bool((count < 2).any()):
            ctx.seen.add("AC cluster of <2 tokens")
        w = 1.0 / (cluster_mad(tokens.detach(), labels, int(A.max().item()) + 1) + 0.35)
        if bool((w > 5.0 * w.mean()).any()):
            ctx.seen.add("AC clip bound")
        w = torch.clamp(w, max=5.0 * w.mean())
        w = w / w.mean()
        mix = F.softmax(prev.vals, dim=1)  # :270-271
        return (w[A] * mix[:, :, None]).sum(dim=1)  # :275-283


def soft_moe(P, x, prev, ctx, form):
    """SoftMoELayerWrapper.forward (softmoe.py:92-180) on acmoe's groups [b, m, d]; form 'm' is
    vmoe's (the raw tokens reach the slots), 'n' the authors' without AC, 'a' with AC."""
    n, d = x.shape
    per = ctx.soft_slots
    if form == "m":  # vmoe router.py:59, 75, 80-91: normalised copies for the logits only
        xn = vmoe_normalize(x, 1)
        logits = P["router.scale"] * (xn @ vmoe_normalize(P["router.slots"], 1).T)
        src = x  # vit_moe.py:108-120: the dispatcher mixes the block's input
    else:
        src = F.normalize(x, dim=1)  # :115 (eps 1e-12)
        # phi [d, n, p] normalised over d and scaled (:116); acmoe stores it as rows [n * p, d],
        # slot j * p + c, the order of logits.view(b, m, n * p) (:134)
        phi = P["router.scale"] * F.normalize(P["router.slots"], dim=1)
        if form == "a":  # :120-123: the weighted tokens replace the normalised ones everywhere
            src = src * compute_acmoe(ctx, src, prev)
        logits = src @ phi.T  # :130
    groups = soft_groups(ctx, n)
    Lg = logits[groups]  # [b, m, n * p]
    dispatch = F.softmax(Lg, dim=1)  # :163, over the group's tokens
    combine = F.softmax(Lg, dim=2)  # :164, over all slots
    xs = torch.einsum("bmd,bms->bsd", src[groups], dispatch)  # :170
    ys = torch.stack([expert(P, s // per, xs[:, s, :], ctx) for s in range(xs.shape[1])], dim=1)  # :173-175
    y = torch.einsum("bsd,bms->bmd", ys, combine)  # :178
    out = torch.zeros_like(x).index_add(0, groups.reshape(-1), y.reshape(-1, d))
    # :142-143: the mix_k best slots by logit, their experts (slot // p) and raw logits
    mix_k = min(ctx.mix_k, logits.shape[1])
    vals, slots = torch.topk(logits.detach(), mix_k, dim=1, sorted=True)
    ctx.cut(torch.sort(logits.detach(), dim=1, descending=True)[0], 1)
    return out, Routing(torch.div(slots, per, rounding_mode="floor"), vals)


@gate("m", "Soft MoE (vmoe)")
def gate_soft_vmoe(P, x, prev, ctx):
    return soft_moe(P, x, prev, ctx, "m")


@gate("n", "Soft MoE")
def gate_soft(P, x, prev, ctx):
    return soft_moe(P, x, prev, ctx, "n")


@gate("a", "AC Soft MoE")
def gate_soft_ac(P, x, prev, ctx):
    return soft_moe(P, x, prev, ctx, "a")


GATE_NOISE, CAPACITY_FACTOR, AUX_LOSS_WEIGHT = 1.0, 1.25, 0.01  # config.py defaults, the yaml


def compute_cosa(ctx, tokens, prev):
    """SwinTransformerBlock.compute_cosa (swin_transformer_cosa.py:477-572) with mad, no
    mix_weights: labels column 0 of the previous top-k (:486), K = 1 + the largest of both
    columns (:490), W = 1 / (MAD + 1e-4) (:505), clipped at 1.5 x its mean (:508-515), divided
    by that pre-clip mean (:531); each token takes its cluster's row (:570). No gradient."""
    with torch.no_grad():
        labels = prev.idx[:, 0]
        k_rows = int(prev.idx.max().item()) + 1
        if bool((torch.bincount(labels, minlength=k_rows) < 2).any()):
            ctx.seen.add("AC cluster of <2 tokens")
        w = 1.0 / (cluster_mad(tokens.detach(), labels, k_rows) + 1e-4)
        w_mean = w.mean()
        if bool((w > 1.5 * w_mean).any()):
            ctx.seen.add("AC clip bound")
        w = torch.clamp(w, max=1.5 * w_mean)
        return (w / w_mean)[labels]


def load_importance_loss(scores_wo_noise, topk_logits, num_global_experts, gate_noise):
    """losses.py:21-43 (torch.var unbiased)."""
    normal = torch.distributions.normal.Normal(torch.tensor([0.0]), torch.tensor([gate_noise / num_global_experts]))
    threshold = topk_logits[:, -1].view(-1, 1)
    load = normal.cdf(scores_wo_noise - threshold).sum(0)
    l_load = load.var() / (load.mean() ** 2 + 1e-10)
    importance = scores_wo_noise.sum(0)
    l_imp = importance.var() / (importance.mean() ** 2 + 1e-10)
    return (l_imp + l_load) / 2.0


def swin_moe(P, x, prev, ctx, ac):
    """MoEMlp (swin_transformer_cosa.py:38-96) = Tutel's MOELayer.forward over the call's tokens."""
    n, E, k = x.shape[0], ctx.n_experts, ctx.top_k
    if ac:  # :414-419: the whole MoE input weighted, the gate and the experts see w * x
        x = x * compute_cosa(ctx, x, prev)
    logits = x @ P["router.weight"].T  # gates/top.py:10, 20-22: Linear without bias, fp32
    if ctx.training:  # moe_layer.py:273-276, the draws the dump recorded standing for randn_like
        if ctx.layer not in ctx.noise:
            raise Unsupported("layer %d: training mode without the recorded gate noise" % ctx.layer)
        z = torch.from_numpy(ctx.noise[ctx.layer].astype(np.float64))
        logits_w_noise = logits + GATE_NOISE * z / E
    else:
        logits_w_noise = logits
    scores = F.softmax(logits_w_noise, dim=1)  # :278
    # extract_critical (fast_dispatch.py:143-208), batch_prioritized_routing, normalize_gate False
    topk_values, topk_indices = torch.topk(scores, k, dim=1)  # :148, sorted
    ctx.cut(torch.sort(scores.detach(), dim=1, descending=True)[0], k)
    masks = [F.one_hot(topk_indices[:, r], E) for r in range(k)]  # :151-153
    gates = [(scores * m).sum(dim=1) for m in masks]  # :155, full-softmax probabilities
    l_loss = load_importance_loss(F.softmax(logits, dim=1), logits_w_noise.gather(1, topk_indices), E,
                                  GATE_NOISE)  # moe_layer.py:282-284
    # :159-175: locations in the order of the best probability (torch.argsort; ties to the lower
    # index here, as acmoe), second choices after all first choices of their expert
    order = torch.sort(-scores.detach().max(dim=1)[0], stable=True)[1]
    inverse = torch.argsort(order)

    def location(mask):  # compute_sorted_location :138-141, fast_cumsum_sub_one
        sorted_mask = mask[order]
        return ((torch.cumsum(sorted_mask, dim=0) - 1) * sorted_mask)[inverse]

    locations, base = [], torch.zeros(E, dtype=torch.long)
    for r in range(k):
        locations.append((location(masks[r]) + base * masks[r]).sum(dim=1))
        base = base + masks[r].sum(dim=0)
    capacity = k * int(CAPACITY_FACTOR * ((n + E - 1) // E))  # :192-194
    keep = [loc < capacity for loc in locations]  # the Tutel kernel skips locations >= capacity
    dropped = sum(int((~kr).sum().item()) for kr in keep)
    if dropped:
        ctx.seen.add("capacity drops")
    if bool((~keep[0] & ~keep[-1]).any()):
        ctx.seen.add("token dropped by all choices")
    tok = torch.cat([torch.arange(n)[kr] for kr in keep])
    exp = torch.cat([topk_indices[:, r][keep[r]] for r in range(k)])
    wgt = torch.cat([gates[r][keep[r]] for r in range(k)])
    out = combine_pairs(P, x, tok, exp, wgt, ctx)  # fast_encode / decode, is_postscore
    ctx.aux.append(AUX_LOSS_WEIGHT * l_loss)  # summed over blocks, times 0.01
    # the next layer's labels: topk_indices (moe_layer.py:344-345); acmoe's gates for them are
    # the softmax over the k noisy logits
    return out, Routing(topk_indices, logits_w_noise.gather(1, topk_indices))


@gate("t", "Swin-MoE")
def gate_swin(P, x, prev, ctx):
    return swin_moe(P, x, prev, ctx, ac=False)


@gate("w", "AC Swin-MoE")
def gate_swin_ac(P, x, prev, ctx):
    return swin_moe(P, x, prev, ctx, ac=True)


class Unsupported(Exception):
    """A configuration the reference does not cover."""


class Mismatch(Exception):
    """A checkpoint whose tensors are not the ones the reference's model has."""


# ---------------------------------------------------------------------------------------------
# Backbone pieces (acmoe's model, acmoe.h section 9)


def layer_norm(x, g, b):
    return F.layer_norm(x, (x.shape[-1],), g, b, eps=LN_EPS)


def attention(x, W, b, Wo, bo, batch, seq, heads, causal):
    n, d = x.shape
    dh = d // heads
    qkv = (x @ W.T + b).reshape(batch, seq, 3, heads, dh)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [batch, heads, seq, dh]
    s = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if causal:
        s = s.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), float("-inf"))
    a = (F.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(n, d)
    return a @ Wo.T + bo


def trunk(P, meta, x, ctx, causal):
    """The blocks, each attention then its MoE feed-forward layer, and the final norm."""
    pre = int(meta["pre_ln"]) != 0
    heads = int(meta["n_heads"])
    prev = None
    for i, letter in enumerate(meta["pattern"]):
        L = {k[len("layers.%d." % i):]: v for k, v in P.items() if k.startswith("layers.%d." % i)}
        M = layer_tensors(L)

        def attn(h):
            return attention(h, L["attn.qkv.weight"], L["attn.qkv.bias"], L["attn.out.weight"],
                             L["attn.out.bias"], ctx.batch, ctx.seq, heads, causal)

        fn = GATES[letter][1]
        ctx.layer = i
        if pre:
            h = x + attn(layer_norm(x, L["ln1.weight"], L["ln1.bias"]))
            m, routing = fn(M, layer_norm(h, L["ln2.weight"], L["ln2.bias"]), prev, ctx)
            x = h + m
        else:
            h = layer_norm(x + attn(x), L["ln1.weight"], L["ln1.bias"])
            m, routing = fn(M, h, prev, ctx)
            x = layer_norm(h + m, L["ln2.weight"], L["ln2.bias"])
        if routing is not None:
            prev = routing
    if pre:
        x = layer_norm(x, P["ln_f.weight"], P["ln_f.bias"])
    return x


# ---------------------------------------------------------------------------------------------
# Backbones: fn(P, meta, batch, ctx_for) -> (logits, loss), chosen by their predicate


BACKBONES = []


def backbone(name, applies):
    def register(fn):
        BACKBONES.append((name, applies, fn))
        return fn

    return register


@backbone("language model", lambda meta: int(meta.get("n_classes", "0")) == 0)
def language_model(P, meta, data, ctx_for):
    tokens = torch.from_numpy(data["tokens"].astype(np.int64))
    targets = torch.from_numpy(data["targets"].astype(np.int64))
    batch, seq = tokens.shape
    ctx = ctx_for(batch, seq, False)
    x = P["tok_emb.weight"][tokens.reshape(-1)] + P["pos_emb.weight"][:seq].repeat(batch, 1)
    x = trunk(P, meta, x, ctx, causal=True)
    head = P["head.weight"] if int(meta["untied_head"]) else P["tok_emb.weight"]
    logits = x @ head.T
    return logits, F.cross_entropy(logits, targets.reshape(-1)) + sum(ctx.aux), ctx


@backbone("vision encoder", lambda meta: int(meta.get("n_classes", "0")) > 0 and int(meta.get("window", "0")) == 0)
def vision_encoder(P, meta, data, ctx_for):
    patches = torch.from_numpy(data["patches"].astype(np.float64))
    labels = torch.from_numpy(data["labels"].astype(np.int64))
    batch, seq, pd = patches.shape
    ctx = ctx_for(batch, seq, True)
    x = patches.reshape(-1, pd) @ P["patch_emb.weight"].T + P["patch_emb.bias"]
    x = x + P["pos_emb.weight"][:seq].repeat(batch, 1)
    x = trunk(P, meta, x, ctx, causal=False)
    pooled = x.reshape(batch, seq, -1).mean(dim=1)
    logits = pooled @ P["head.weight"].T + P["head.bias"]
    return logits, F.cross_entropy(logits, labels) + sum(ctx.aux), ctx


# The Swin backbone (window > 0), as swin_transformer_cosa.py of the authors builds it, in the
# names of acmoe's checkpoint: PatchEmbed with its norm (L767-805; a linear layer on the given
# patches stands for the convolution, "patch_emb", then "patch_norm"), no absolute position
# embedding (ape False), BasicLayer stages (L645-753) of pre-LN SwinTransformerBlocks (L376-472),
# PatchMerging between stages (L596-642), the final norm, the mean over the patches, the head
# (L967-987). The relative position bias is acmoe's table (DISAGREEMENTS["backbone Swin"]).


def window_partition(x, ws):
    """L99-111: [B, H, W, C] -> [B * nW, ws, ws, C], windows row by row."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)


def window_reverse(windows, ws, H, W):
    """L114-128."""
    B = int(windows.shape[0] / (H * W / ws / ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def relative_position_index(ws):
    """L181-191: (dy + ws - 1) * (2 ws - 1) + (dx + ws - 1), d = coordinate of i - of j."""
    coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def shift_mask(grid, ws, shift):
    """L342-361: the 9 regions of the rolled grid, -100 between different regions of a window."""
    img_mask = torch.zeros((1, grid, grid, 1))
    slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    cnt = 0
    for h in slices:
        for w in slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = window_partition(img_mask, ws).view(-1, ws * ws)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def window_attention(L, x, B, grid, ws, shift, heads):
    """SwinTransformerBlock.forward L383-405 around WindowAttention.forward L200-232, on the
    normed rows x [B * grid^2, C]: roll by (-shift, -shift), partition, attention with q scaled
    by head_dim^-0.5, the relative position bias and the mask, reverse, roll back, proj."""
    C = x.shape[1]
    x = x.view(B, grid, grid, C)
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    xw = window_partition(x, ws).view(-1, ws * ws, C)
    B_, N, _ = xw.shape
    qkv = (xw @ L["attn.qkv.weight"].T + L["attn.qkv.bias"]).reshape(B_, N, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    q = q * (C // heads) ** -0.5
    attn = q @ k.transpose(-2, -1)
    table = L["attn.rel_bias"]  # [(2 ws - 1)^2, heads], where the authors have cpb_mlp(...)
    bias = table[relative_position_index(ws).view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()
    attn = attn + bias.unsqueeze(0)
    if shift:
        mask = shift_mask(grid, ws, shift)
        nW = mask.shape[0]
        attn = attn.view(B_ // nW, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, N, N)
    attn = F.softmax(attn, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B_, N, C)
    out = out @ L["attn.out.weight"].T + L["attn.out.bias"]  # proj
    x = window_reverse(out.view(-1, ws, ws, C), ws, grid, grid)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x.reshape(B * grid * grid, C)


def patch_merging(M, x, B, grid):
    """PatchMerging.forward L612-634: x0 = [0::2, 0::2], x1 = [1::2, 0::2], x2 = [0::2, 1::2],
    x3 = [1::2, 1::2] (row first), concatenated, LayerNorm(4C), Linear(4C, 2C) without bias."""
    C = x.shape[1]
    x = x.view(B, grid, grid, C)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    x = layer_norm(x.reshape(-1, 4 * C), M["norm.weight"], M["norm.bias"])
    return x @ M["reduction.weight"].T


def swin_layout(meta):
    """Stages from the pattern's '|': [(letters, grid, window, width, heads)], and the parameter
    names and shapes that layout has besides the MoE layers' (acmoe's names)."""
    d, heads, window = int(meta["d_model"]), int(meta["n_heads"]), int(meta["window"])
    seq, pd, classes = int(meta["seq_len"]), int(meta["patch_dim"]), int(meta["n_classes"])
    grid = int(round(math.sqrt(seq)))
    if grid * grid != seq:
        raise Unsupported("seq_len %d is not a square grid" % seq)
    stages, names = [], {"patch_emb.weight": (d, pd), "patch_emb.bias": (d,), "patch_norm.weight": (d,),
                         "patch_norm.bias": (d,)}
    i = 0
    for s, letters in enumerate(meta["pattern"].split("|")):
        g, c = grid >> s, d << s
        ws = min(window, g)  # L314-317: a grid no larger than the window is one window
        stages.append((letters, g, ws, c, heads << s))
        if s > 0:
            names.update({"merges.%d.norm.weight" % (s - 1): (2 * c,), "merges.%d.norm.bias" % (s - 1): (2 * c,),
                          "merges.%d.reduction.weight" % (s - 1): (c, 2 * c)})
        for _ in letters:
            for t, shape in (("attn.qkv.weight", (3 * c, c)), ("attn.qkv.bias", (3 * c,)), ("attn.out.weight", (c, c)),
                             ("attn.out.bias", (c,)), ("attn.rel_bias", ((2 * ws - 1) ** 2, heads << s)),
                             ("ln1.weight", (c,)), ("ln1.bias", (c,)), ("ln2.weight", (c,)), ("ln2.bias", (c,))):
                names["layers.%d.%s" % (i, t)] = shape
            i += 1
    top = d << (len(stages) - 1)
    names.update({"ln_f.weight": (top,), "ln_f.bias": (top,), "head.weight": (classes, top), "head.bias": (classes,)})
    return stages, names


@backbone("Swin", lambda meta: int(meta.get("n_classes", "0")) > 0 and int(meta.get("window", "0")) > 0)
def swin(P, meta, data, ctx_for):
    stages, names = swin_layout(meta)
    have = {k: tuple(v.shape) for k, v in P.items() if ".moe." not in k and ".ffn." not in k}
    if have != names:
        raise Mismatch("the checkpoint's tensors are not the Swin layout's: missing %s, unexpected %s" % (
            sorted((k, v) for k, v in names.items() if have.get(k) != v),
            sorted((k, v) for k, v in have.items() if names.get(k) != v)))
    if int(meta["pre_ln"]) == 0:
        raise Unsupported("a Swin backbone without pre_ln")
    window = int(meta["window"])
    patches = torch.from_numpy(data["patches"].astype(np.float64))
    labels = torch.from_numpy(data["labels"].astype(np.int64))
    batch, seq, pd = patches.shape
    ctx = ctx_for(batch, seq, True)
    x = patches.reshape(-1, pd) @ P["patch_emb.weight"].T + P["patch_emb.bias"]
    x = layer_norm(x, P["patch_norm.weight"], P["patch_norm.bias"])  # PatchEmbed.norm L801-802
    i = 0
    for s, (letters, grid, ws, width, heads) in enumerate(stages):
        if s > 0:  # the downsample of the stage before (L750-751)
            M = {k[len("merges.%d." % (s - 1)):]: v for k, v in P.items() if k.startswith("merges.%d." % (s - 1))}
            x = patch_merging(M, x, batch, stages[s - 1][1])
        ctx.seq = grid * grid  # a Soft MoE layer groups each image's patches of this stage
        prev = None  # L973-976: each stage starts without labels
        for j, letter in enumerate(letters):
            L = {k[len("layers.%d." % i):]: v for k, v in P.items() if k.startswith("layers.%d." % i)}
            Mo = layer_tensors(L)
            shift = ws // 2 if j % 2 == 1 and grid > window else 0  # L700, L314-317
            ctx.layer = i
            h = x + window_attention(L, layer_norm(x, L["ln1.weight"], L["ln1.bias"]), batch, grid, ws, shift, heads)
            m, routing = GATES[letter][1](Mo, layer_norm(h, L["ln2.weight"], L["ln2.bias"]), prev, ctx)
            x = h + m  # L410-472
            if routing is not None:
                prev = routing
            i += 1
    x = layer_norm(x, P["ln_f.weight"], P["ln_f.bias"])  # L979-981
    pooled = x.reshape(batch, stages[-1][1] ** 2, -1).mean(dim=1)
    logits = pooled @ P["head.weight"].T + P["head.bias"]  # L986
    return logits, F.cross_entropy(logits, labels) + sum(ctx.aux), ctx


# ---------------------------------------------------------------------------------------------
# The check


def relative_error(a, b):
    """max |a - b| / max |b| over the tensor; max |a| where b is all zeros."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = np.abs(b).max() if b.size else 0.0
    diff = np.abs(a - b).max() if b.size else 0.0
    return diff / scale if scale > 0 else diff


def supported(meta):
    """Raises Unsupported for options the authors' code paths here do not have."""
    zero = ["dropout", "moe.capacity", "moe.balance_alpha", "moe.z_loss", "moe.ac.robust", "moe.ac_weight_experts",
            "moe.ac_mix_labels", "moe.no_router_bias", "moe.no_reprojection", "moe.gate_noise", "moe.importance_loss"]
    for key in zero:
        if float(meta.get(key, "0")) != 0.0:
            raise Unsupported("%s = %s (the reference runs have none)" % (key, meta[key]))
    # the AC options as the language-model defaults resolve them (the router letters' own apply on top)
    defaults = {"moe.ac.eps": "0.0001", "moe.ac.clip": "10", "moe.ac.scaling": "per-feature", "moe.ac.dispersion": "mad"}
    for key, value in defaults.items():
        if meta.get(key) != value:
            raise Unsupported("%s = %s (the reference runs have %s)" % (key, meta.get(key), value))
    for letter in meta["pattern"].replace("|", ""):
        if letter not in GATES:
            raise Unsupported("router '%s' has no reference gate yet" % letter)


def run(meta, params, bmeta, data, acmoe_reading):
    """Forward and backward in float64: (logits, loss, {name: grad}, ctx)."""
    P = {name: torch.tensor(v.astype(np.float64), requires_grad=True)
         for name, v in params.items() if not name.startswith("optimizer.") and not name.endswith(".ac_weights")}
    training = bmeta.get("train", "1") == "1"
    noise = {int(name[len("noise.layers."):]): v for name, v in data.items() if name.startswith("noise.layers.")}
    ctx_for = lambda batch, seq, vision: Ctx(meta, batch, seq, vision, acmoe_reading, training, noise)  # noqa: E731
    fn = [f for _, applies, f in BACKBONES if applies(meta)][0]
    logits, loss, ctx = fn(P, meta, data, ctx_for)
    loss.backward()
    grads = {name: (t.grad.numpy() if t.grad is not None else np.zeros(t.shape)) for name, t in P.items()}
    return logits.detach().numpy(), loss.item(), grads, ctx


def compare(data, grads_c, ref):
    """The largest relative error of the case and the tensor it is in."""
    logits, loss, grads, _ = ref
    worst = [(relative_error(data["logits"], logits), "logits"),
             (relative_error(data["loss"][0], loss), "loss")]
    for name, g in grads.items():
        worst.append((relative_error(grads_c[name], g), "grad " + name))
    return max(worst)


def check_case(directory, name):
    meta, params = read_safetensors(os.path.join(directory, name + ".safetensors"))
    gmeta, grads_c = read_safetensors(os.path.join(directory, name + ".grads.safetensors"))
    bmeta, data = read_safetensors(os.path.join(directory, name + ".batch.safetensors"))
    pattern = meta["pattern"]
    routers = " | ".join(", ".join(GATES[c][0] if c in GATES else "'%s'?" % c for c in stage)
                         for stage in pattern.split("|"))
    label = "%-20s %-5s (%s)" % (name, pattern, routers)
    try:
        supported(meta)
        ref = run(meta, params, bmeta, data, acmoe_reading=False)
    except Unsupported as e:
        print("%s  FAIL  not covered: %s" % (label, e))
        return False
    except Mismatch as e:
        print("%s  FAIL  %s" % (label, e))
        return False
    err, where = compare(data, grads_c, ref)
    ok = err <= TOLERANCE
    line = "%s  %s  largest relative error %.2e (%s)" % (label, "ok  " if ok else "FAIL", err, where)
    if ref[3].min_gap < 1e-6:
        line += "; smallest gap at a top-k cut %.1e" % ref[3].min_gap
    if ref[3].seen:
        line += " [%s]" % ", ".join(sorted(ref[3].seen))
    print(line)
    for bname, applies, _ in BACKBONES:
        if applies(meta) and "backbone " + bname in DISAGREEMENTS:
            print("    acmoe's backbone differs from the authors' (documented; the reference builds acmoe's): %s"
                  % DISAGREEMENTS["backbone " + bname])
    differ = sorted(set(c for c in pattern if c in DISAGREEMENTS))
    if differ:
        alt_err, alt_where = compare(data, grads_c, run(meta, params, bmeta, data, acmoe_reading=True))
        for c in differ:
            print("    acmoe.h differs from the authors: %s" % DISAGREEMENTS[c])
        print("    with acmoe.h's reading instead: largest relative error %.2e (%s)" % (alt_err, alt_where))
    return ok


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    directory = argv[1]
    names = argv[2:] or sorted(os.path.basename(p)[:-len(".batch.safetensors")]
                               for p in glob.glob(os.path.join(directory, "*.batch.safetensors")))
    if not names:
        print("reference_check: no cases in %s (run build/reference_dump %s first)" % (directory, directory),
              file=sys.stderr)
        return 2
    print("acmoe against PyTorch %s (float64 reference; relative error max|a-b|/max|b| per tensor, "
          "at most %g)" % (torch.__version__, TOLERANCE))
    failed = 0
    for name in names:
        try:
            failed += not check_case(directory, name)
        except (OSError, ValueError, struct.error) as e:
            print("%s: cannot read the case: %s" % (name, e))
            return 2
    print("%d case(s), %d passed, %d failed" % (len(names), len(names) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
