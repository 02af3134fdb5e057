#!/usr/bin/python3
"""Whole-model check of acmoe against PyTorch, in llm.c's manner.

    /usr/bin/python3 tools/reference_check.py build/reference [CASE ...]

For every case that build/reference_dump (tools/reference_dump.c) wrote into the directory,
this script reads the checkpoint NAME.safetensors (weights and configuration), rebuilds the
same model in PyTorch in float64, runs the batch saved beside it (NAME.batch.safetensors)
with autograd, and compares with what acmoe computed in float32: the logits, the loss, and
the gradient of every parameter (NAME.grads.safetensors, under the parameters' names).

Relative error of a tensor a (acmoe) against its reference b (this script):
    max_i |a_i - b_i| / max_i |b_i|,
the largest difference over the largest reference magnitude of the whole tensor; where the
reference is all zeros (the router of a dense layer has no gradient) it is max_i |a_i|. A case
passes when every tensor's relative error is at most 1e-4. Discrete choices (top-k, labels,
the pairs a USMoE group keeps) carry no gradient; the smallest gap the reference saw at a cut
is printed when it is under 1e-6, since a near tie could pick differently in float32.

The backbone is acmoe's own (acmoe.h section 9): token and learned position embeddings, or
a linear patch embedding for a vision encoder; causal multi-head attention with a fused qkv
([q | k | v], head h in columns h*dh..(h+1)*dh of each, scores scaled by 1/sqrt(dh)), or
unmasked for a vision encoder; layer norm with eps 1e-5, post-LN (h = LN1(x + attn(x)),
y = LN2(h + moe(h))) or pre-LN with a final norm; the head tied to the token embedding or
not; a vision encoder classifies the mean of its last rows. Experts are
W2 act(W1 x + b1) + b2 as in the AC reference's _Expert (language-modeling/custom_transformer.py
lines 11-33 of Fsoft-AIC/Tight-Clusters-Make-Specialized-Experts). The authors' language-model
block is not acmoe's (their MoE wrapper adds its own residual and LayerNorm, models.py:663,
inside the block's, :1156, and attention has relative position keys and a cache): this checks
acmoe's backbone around the authors' routers.

The routers are written from the authors' code paths, not from acmoe.h (one function each,
registered in GATES by router letter; a backbone is one function in BACKBONES):
  g  SMoE      language-modeling/custom_gates.py:783-833 (CustomNaiveGate_Balance_SMoE) and
               the gate-weighted sum of custom_layers.py:348-356
  c  AC        custom_gates.py:1007-1335 (COSAGate_Balance, use_var=True, mad=True as the
               language-model runs set them: the scripts/pretraining acmoe and cosa scripts pass
               --use-var --mad, all but wikitext-103/glam/small/acmoe-s.sh)
  u  USMoE     USMoE/Training_scratch/custom_transformer.py:41-91 of giangdip2410/USMoE
  m  Soft MoE  softmoe-image-classification/softmoe.py:92-180 (SoftMoELayerWrapper, normalize,
               no AC), Fsoft-AIC/Tight-Clusters-Make-Specialized-Experts
  f  dense FFN (acmoe's one-expert layer; the labels pass it, as past models.py:1168-1171)
Where acmoe.h disagrees with those (DISAGREEMENTS below), the case fails, and the script also
prints the error of acmoe.h's reading, so that the rest of the model is still checked.

Exit status: 0 when every case passes, 1 when one fails, 2 for a missing or unreadable input.
Needs PyTorch (Debian: python3-torch) and numpy; reads safetensors with json and numpy.
"""

import glob
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

TOLERANCE = 1e-4
LN_EPS = 1e-5
torch.set_default_dtype(torch.float64)


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


class Ctx:
    """One forward pass: sizes, options from the checkpoint, and what the gates observed."""

    def __init__(self, meta, batch, seq, vision, acmoe_reading):
        self.batch, self.seq, self.vision = batch, seq, vision
        self.n_experts = int(meta["n_experts"])
        self.top_k = int(meta["top_k"])
        self.activation = int(meta["activation"])
        self.group = int(meta["moe.group"])  # ACMOE_GROUP_BATCH, _SEQUENCE, _POSITION
        self.soft_slots = int(meta["moe.soft_slots"]) or 1
        self.usmoe_budget = float(meta["moe.usmoe_budget"]) or float(self.top_k)
        self.usmoe_rho = float(meta["moe.usmoe_rho"]) or 0.5
        self.acmoe_reading = acmoe_reading  # follow acmoe.h where it disagrees with the authors
        self.min_gap = math.inf  # the smallest gap seen at a discrete cut
        self.seen = set()  # paths of the gates this pass took that a check should cover

    def cut(self, sorted_values, k):
        """Records the gap between the k-th and (k+1)-th of values sorted in descending order."""
        if k < sorted_values.shape[-1]:
            gap = (sorted_values[..., k - 1] - sorted_values[..., k]).min().item()
            scale = max(sorted_values.abs().max().item(), 1e-30)
            self.min_gap = min(self.min_gap, gap / scale)


class Routing:
    """A layer's routing as the next layer reads it: idx [n, k] best expert first, gate [n, k]."""

    def __init__(self, idx, gate):
        self.idx, self.gate = idx, gate


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


# Where acmoe.h and the authors' code differ, by letter: the case fails, and the reading of
# acmoe.h (ctx.acmoe_reading) is checked as well.
DISAGREEMENTS = {
    "u": "the USMoE gate has no bias (giangdip2410/USMoE USMoE/Training_scratch/custom_transformer.py:37, "
         "nn.Linear(d_model, num_experts, bias=False)); acmoe.h's 'u' scores with router.weight and router.bias",
    "m": "Soft MoE forms its slots from the L2-normalised tokens (softmoe.py:115 rebinds x to F.normalize(x), "
         "then :170 xs = einsum(x, d)), so the experts see unit rows; acmoe.h forms them from the raw tokens",
}


@gate("g", "SMoE")
def gate_smoe(P, x, prev, ctx):
    # custom_gates.py:812 gate = self.gate(inp), a Linear with bias (:786); :821-823 top-k;
    # :826 softmax over the k selected logits; no balance loss (g_blance False in the LM runs)
    z = x @ P["router.weight"].T + P["router.bias"]
    val, idx = topk_best_first(ctx, z, ctx.top_k)
    score = F.softmax(val, dim=-1)
    return combine_topk(P, x, idx, score, ctx), Routing(idx, score)


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
    return combine_topk(P, x, idx, score, ctx), Routing(idx, score)


def make_finite(z):
    """_make_finite (custom_gates.py:1327-1332): non-finite scores become the smallest finite."""
    ok = torch.isfinite(z)
    if bool(ok.all()):
        return z
    return torch.where(ok, z, z[ok].min())


def group_rows(ctx, n):
    """Token indices [groups, members] of acmoe's grouping (moe.group) for n = batch * seq."""
    order = torch.arange(n).reshape(ctx.batch, ctx.seq)
    if ctx.group == 2:  # by position: the authors' layout, [qlen, bsz] (see gate_usmoe)
        return order.T.contiguous()
    if ctx.group == 1:  # by sequence
        return order
    return order.reshape(1, n)  # the whole call


@gate("u", "USMoE")
def gate_usmoe(P, x, prev, ctx):
    # FMoETransformerMLP.forward of USMoE/Training_scratch/custom_transformer.py:41-91. Its
    # hidden states are [qlen, bsz, d] (Transformer-XL: mem_transformer.py:964, data_utils.py:50),
    # so "batch_size, sequence_length" (:42) are (qlen, bsz) and the top-k over
    # reshape(batch_size, -1) (:51-55) picks bsz * top_k (token, expert) pairs among the tokens
    # of each position: the position groups of acmoe (moe.group 2).
    E = ctx.n_experts
    z = x @ P["router.weight"].T  # :45, nn.Linear(d_model, E, bias=False) (:37)
    if ctx.acmoe_reading:
        z = z + P["router.bias"]
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
    return out, Routing(idx, F.softmax(val, dim=-1))


@gate("m", "Soft MoE")
def gate_soft(P, x, prev, ctx):
    # SoftMoELayerWrapper.forward (softmoe.py:92-180), normalize=True, acmoe=False, on groups
    # [b, m, d]: each image in a vision encoder; in a language model the tokens of one position
    # across the batch (acmoe's causal grouping: row g holds position g of every sequence)
    n, d = x.shape
    groups = torch.arange(n).reshape(ctx.batch, ctx.seq)
    if not ctx.vision:
        groups = groups.T.contiguous()
    X = x[groups]  # [b, m, d]
    Xn = F.normalize(X, dim=2)  # :115 (eps 1e-12)
    per = ctx.soft_slots
    # phi [d, n, p] normalised over d (:116); acmoe stores it as rows [n * p, d], slot j * p + c
    phi = P["router.scale"] * F.normalize(P["router.slots"], dim=1)
    logits = torch.einsum("bmd,sd->bms", Xn, phi)  # :130
    dispatch = F.softmax(logits, dim=1)  # :163, over the group's tokens
    combine = F.softmax(logits, dim=2)  # :164, over all slots
    src = X if ctx.acmoe_reading else Xn
    xs = torch.einsum("bmd,bms->bsd", src, dispatch)  # :170
    ys = torch.stack([expert(P, s // per, xs[:, s, :], ctx) for s in range(xs.shape[1])], dim=1)  # :173-175
    y = torch.einsum("bsd,bms->bmd", ys, combine)  # :178
    out = torch.zeros_like(x).index_add(0, groups.reshape(-1), y.reshape(-1, d))
    # labels for a next layer (:142-143 take the top slots of the logits, slot // p): the experts
    # by the combine weight of their slots, which for one slot per expert is the same order
    mass = combine.reshape(-1, ctx.n_experts, per).sum(dim=2).detach()
    val, idx = torch.topk(mass.log(), ctx.top_k, dim=-1, sorted=True)
    routing_rows = torch.empty(n, ctx.top_k, dtype=torch.long)
    routing_rows[groups.reshape(-1)] = idx
    gates = torch.empty(n, ctx.top_k)
    gates[groups.reshape(-1)] = F.softmax(val, dim=-1)
    return out, Routing(routing_rows, gates)


class Unsupported(Exception):
    """A configuration the reference does not cover."""


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
        M = {k[len("moe."):]: v for k, v in L.items() if k.startswith("moe.")}

        def attn(h):
            return attention(h, L["attn.qkv.weight"], L["attn.qkv.bias"], L["attn.out.weight"],
                             L["attn.out.bias"], ctx.batch, ctx.seq, heads, causal)

        fn = GATES[letter][1]
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
    return logits, F.cross_entropy(logits, targets.reshape(-1)), ctx


@backbone("vision encoder", lambda meta: int(meta.get("n_classes", "0")) > 0)
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
    return logits, F.cross_entropy(logits, labels), ctx


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
    zero = ["dropout", "moe.capacity", "moe.balance_alpha", "moe.z_loss", "moe.ac.eps", "moe.ac.clip",
            "moe.ac.scaling", "moe.ac.dispersion", "moe.ac.robust", "moe.ac_weight_experts", "moe.ac_mix_labels"]
    for key in zero:
        if float(meta.get(key, "0")) != 0.0:
            raise Unsupported("%s = %s (the reference runs have none)" % (key, meta[key]))
    for letter in meta["pattern"]:
        if letter not in GATES:
            raise Unsupported("router '%s' has no reference gate yet" % letter)


def run(meta, params, data, acmoe_reading):
    """Forward and backward in float64: (logits, loss, {name: grad}, ctx)."""
    P = {name: torch.tensor(v.astype(np.float64), requires_grad=True)
         for name, v in params.items() if not name.startswith("optimizer.")}
    ctx_for = lambda batch, seq, vision: Ctx(meta, batch, seq, vision, acmoe_reading)  # noqa: E731
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
    routers = ", ".join(GATES[c][0] if c in GATES else "'%s'?" % c for c in pattern)
    label = "%-20s %-5s (%s)" % (name, pattern, routers)
    try:
        supported(meta)
        ref = run(meta, params, data, acmoe_reading=False)
    except Unsupported as e:
        print("%s  FAIL  not covered: %s" % (label, e))
        return False
    err, where = compare(data, grads_c, ref)
    ok = err <= TOLERANCE
    line = "%s  %s  largest relative error %.2e (%s)" % (label, "ok  " if ok else "FAIL", err, where)
    if ref[3].min_gap < 1e-6:
        line += "; smallest gap at a top-k cut %.1e" % ref[3].min_gap
    if ref[3].seen:
        line += " [%s]" % ", ".join(sorted(ref[3].seen))
    print(line)
    differ = sorted(set(c for c in pattern if c in DISAGREEMENTS))
    if differ:
        alt_err, alt_where = compare(data, grads_c, run(meta, params, data, acmoe_reading=True))
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
