"""The peer of `make bench` sections 2 to 4 in PyTorch, for measuring it on the same machine.

    python3 bench/pytorch_peer.py [--threads N] [--section 2|3|4]

Debian: apt-get install python3-torch libopenblas0-pthread (Debian's PyTorch 1.13 calls the
system BLAS, the reference one unless OpenBLAS is installed). The script sets the thread
count of PyTorch and of OpenBLAS itself; the environment variables OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS and OMP_WAIT_POLICY override it. It builds the same layers and the same
model as the bench (E experts, top-2, ReLU experts with biases; 3 layers "ggc", post-LN,
learned positions, tied head, AdamW; and the vision encoder of section 4, pre-LN, with top-2
or Soft MoE layers) the way a tuned PyTorch CPU implementation does: tokens sorted by expert,
one addmm per expert, index_add_ to combine, autograd for the backward pass.
"""
import argparse
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--section", type=int, default=0,
                   help="2 (MoE layer), 3 (training step), 4 (vision training step) or 0 (all)")
    p.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    p.add_argument("--keep-coretype", action="store_true",
                   help="leave OPENBLAS_CORETYPE as it is (by default an AVX-512 CPU gets OpenBLAS's AVX-512 kernels)")
    return p.parse_args()


def cpu_has_avx512f():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


ARGS = parse_args()
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
# OpenMP threads that spin between operations take the cores from OpenBLAS's own threads
# (2 threads measured 2-3x slower than 1 without this)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenBLAS 0.3.21 takes its AVX2 kernels on AMD's AVX-512 cores (or where OPENBLAS_CORETYPE
# says so); the peer runs its best, as bench/openblas_peer.c does
if not ARGS.keep_coretype and cpu_has_avx512f():
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
import torch  # noqa: E402  (after the thread variables, which the libraries read when loaded)
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.manual_seed(1)


class MoE(nn.Module):
    """Top-k MoE FFN; router 'g' is linear with bias, 'c' the AC router (cosine against
    re-normalised embeddings, features weighted by the previous layer's clusters)."""

    def __init__(self, d, ff, experts, k, router="g"):
        super().__init__()
        self.k, self.experts, self.router = k, experts, router
        if router == "g":
            self.gate = nn.Linear(d, experts)
        else:
            self.emb = nn.Parameter(torch.nn.init.orthogonal_(torch.empty(experts, d), gain=0.32))
        # one parameter per expert: indexing a stacked tensor costs a whole-tensor gradient per expert
        self.w1 = nn.ParameterList(nn.Parameter(torch.randn(ff, d) / d ** 0.5) for _ in range(experts))
        self.b1 = nn.ParameterList(nn.Parameter(torch.zeros(ff)) for _ in range(experts))
        self.w2 = nn.ParameterList(nn.Parameter(torch.randn(d, ff) / ff ** 0.5) for _ in range(experts))
        self.b2 = nn.ParameterList(nn.Parameter(torch.zeros(d)) for _ in range(experts))

    def ac_logits(self, x, labels):
        with torch.no_grad():
            self.emb.mul_(1.5 / self.emb.norm(dim=1, keepdim=True))
            xd = x.detach()
            rows = int(labels.max()) + 1
            count = torch.bincount(labels, minlength=rows).clamp(min=1).unsqueeze(1).to(x.dtype)
            mean = torch.zeros(rows, x.shape[1]).index_add_(0, labels, xd) / count
            mad = torch.zeros(rows, x.shape[1]).index_add_(0, labels, (xd - mean[labels]).abs()) / count
            w = 1.0 / (mad + 1e-4)
            w = w.clamp(max=10.0 * float(w.mean()))
            w = w / w.mean(dim=0, keepdim=True)
        unit = self.emb / self.emb.norm(dim=1, keepdim=True).clamp(min=1e-4)
        return (x * w[labels]) @ unit.t()

    def forward(self, x, prev=None):
        logits = self.gate(x) if self.router == "g" else self.ac_logits(x, prev[:, 0])
        top, idx = logits.topk(self.k, dim=1)
        gate = top.softmax(dim=1).reshape(-1)
        order = idx.reshape(-1).argsort()
        counts = torch.bincount(idx.reshape(-1), minlength=self.experts).tolist()
        token = order // self.k
        outs = []
        for j, xe in enumerate(torch.split(x.index_select(0, token), counts)):  # split: no per-slice gradient
            if counts[j]:
                h = F.relu(torch.addmm(self.b1[j], xe, self.w1[j].t()))
                outs.append(torch.addmm(self.b2[j], h, self.w2[j].t()))
        y = torch.cat(outs) * gate[order].unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, token, y), idx


class SoftMoE(nn.Module):
    """Soft MoE over each image: one slot per expert, unit inputs and slot vectors times a
    learned scale; dispatch is each slot's softmax over the image's patches, combine each
    patch's softmax over the slots."""

    def __init__(self, d, ff, experts):
        super().__init__()
        self.experts = experts
        self.phi = nn.Parameter(torch.randn(experts, d) / d ** 0.5)
        self.scale = nn.Parameter(torch.ones(()))
        self.w1 = nn.ParameterList(nn.Parameter(torch.randn(ff, d) / d ** 0.5) for _ in range(experts))
        self.b1 = nn.ParameterList(nn.Parameter(torch.zeros(ff)) for _ in range(experts))
        self.w2 = nn.ParameterList(nn.Parameter(torch.randn(d, ff) / ff ** 0.5) for _ in range(experts))
        self.b2 = nn.ParameterList(nn.Parameter(torch.zeros(d)) for _ in range(experts))

    def forward(self, x, batch, seq):
        xs = x.view(batch, seq, -1)
        logits = self.scale * F.normalize(xs, dim=2) @ F.normalize(self.phi, dim=1).t()  # [B, seq, S]
        slots = logits.softmax(dim=1).transpose(1, 2) @ xs  # [B, S, d]
        outs = [torch.addmm(self.b2[j], F.relu(torch.addmm(self.b1[j], slots[:, j], self.w1[j].t())), self.w2[j].t())
                for j in range(self.experts)]
        return (logits.softmax(dim=2) @ torch.stack(outs, dim=1)).reshape(batch * seq, -1)


class Block(nn.Module):
    def __init__(self, d, heads, experts, k, router):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.moe = MoE(d, d, experts, k, router)

    def forward(self, x, batch, seq, prev):
        d = x.shape[1]
        dh = d // self.heads
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, dh).permute(2, 0, 3, 1, 4).reshape(3, -1, seq, dh)
        if getattr(self, "mask", None) is None or self.mask.shape[-1] != seq:  # additive causal mask
            self.mask = torch.full((seq, seq), float("-inf")).triu(1)
        # scale and mask inside one batched matmul (PyTorch 1.13 has no fused attention)
        att = torch.baddbmm(self.mask, q, k.transpose(1, 2), alpha=dh ** -0.5).softmax(dim=-1) @ v
        att = att.view(batch, self.heads, seq, dh).transpose(1, 2).reshape(batch * seq, d)
        x = self.ln1(x + self.out(att))
        m, idx = self.moe(x, prev)
        return self.ln2(x + m), idx


class VisionBlock(nn.Module):
    """Pre-LN encoder block: attention over every patch, then a top-2 ('g', 'c') or Soft MoE
    ('m') feed-forward block."""

    def __init__(self, d, heads, experts, k, router):
        super().__init__()
        self.heads, self.router = heads, router
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.moe = SoftMoE(d, d, experts) if router == "m" else MoE(d, d, experts, k, router)

    def forward(self, x, batch, seq, prev):
        d = x.shape[1]
        dh = d // self.heads
        q, k, v = self.qkv(self.ln1(x)).view(batch, seq, 3, self.heads, dh).permute(2, 0, 3, 1, 4).reshape(3, -1, seq, dh)
        att = (torch.bmm(q, k.transpose(1, 2)) * dh ** -0.5).softmax(dim=-1) @ v
        x = x + self.out(att.view(batch, self.heads, seq, dh).transpose(1, 2).reshape(batch * seq, d))
        if self.router == "m":
            return x + self.moe(self.ln2(x), batch, seq), prev
        m, idx = self.moe(self.ln2(x), prev)
        return x + m, idx


class Vision(nn.Module):
    def __init__(self, pattern, patch_dim=48, patches=64, d=128, heads=8, experts=16, k=2, classes=10):
        super().__init__()
        self.embed, self.pos = nn.Linear(patch_dim, d), nn.Parameter(torch.randn(patches, d) * 0.02)
        self.blocks = nn.ModuleList(VisionBlock(d, heads, experts, k, r) for r in pattern)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, patches, labels):
        batch, seq, _ = patches.shape
        x = (self.embed(patches) + self.pos).reshape(batch * seq, -1)
        prev = None
        for b in self.blocks:
            x, prev = b(x, batch, seq, prev)
        return F.cross_entropy(self.head(self.ln(x).view(batch, seq, -1).mean(dim=1)), labels)


class LM(nn.Module):
    def __init__(self, vocab=256, d=128, heads=8, seq=256, experts=16, k=2, pattern="ggc"):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, experts, k, r) for r in pattern)

    def forward(self, tokens, targets):
        batch, seq = tokens.shape
        x = (self.tok(tokens) + self.pos.weight[:seq]).reshape(batch * seq, -1)
        prev = None
        for b in self.blocks:
            x, prev = b(x, batch, seq, prev)
        return F.cross_entropy(x @ self.tok.weight.t(), targets.reshape(-1))


def median_seconds(step, steps):
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def section_moe():
    print("MoE layer forward + backward (router g), tokens/s on %d thread(s)" % ARGS.threads)
    for experts, d, ff, tokens in ((16, 128, 128, 4096), (16, 352, 352, 4096), (8, 256, 1024, 2048)):
        layer = MoE(d, ff, experts, 2)
        x = torch.randn(tokens, d, requires_grad=True)
        dy = torch.randn(tokens, d)

        def step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            out, _ = layer(x)
            out.backward(dy)

        s = median_seconds(step, ARGS.steps)
        print("E%d k2 d%d ff%d T%d  %9.0f tokens/s" % (experts, d, ff, tokens, tokens / s))


def training_step_seconds(model, *batch):
    """Median seconds of a training step (forward, backward, AdamW) of model on batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)  # one kernel per step, not per tensor

    def step():
        opt.zero_grad(set_to_none=True)
        model(*batch).backward()
        opt.step()

    return median_seconds(step, ARGS.steps)


def section_training():
    tokens = torch.randint(0, 256, (8, 256))
    targets = torch.randint(0, 256, (8, 256))
    s = training_step_seconds(LM(), tokens, targets)
    print("Training step, 3 layers \"ggc\", d 128, 8 heads, E16 top-2, 8 x 256 tokens: %.0f tokens/s on %d thread(s)"
          % (2048 / s, ARGS.threads))


def section_vision():
    patches = torch.rand(32, 64, 48)
    labels = torch.randint(0, 10, (32,))
    for pattern in ("ggc", "gmg"):
        s = training_step_seconds(Vision(pattern), patches, labels)
        print("Vision training step \"%s\", d 128, 8 heads, E16, 32 images of 64 patches: %.0f images/s on %d thread(s)"
              % (pattern, 32 / s, ARGS.threads))


if __name__ == "__main__":
    print("PyTorch %s, BLAS %s (OPENBLAS_CORETYPE %s)" % (torch.__version__, os.path.realpath("/usr/lib/x86_64-linux-gnu/libblas.so.3"),
                                                           os.environ.get("OPENBLAS_CORETYPE", "unset")))
    if ARGS.section in (0, 2):
        section_moe()
    if ARGS.section in (0, 3):
        section_training()
    if ARGS.section in (0, 4):
        section_vision()
    sys.stdout.flush()
