#!/bin/sh
# Writes docs/performance.md from one run of build/bench and, where /usr/bin/python3 (or
# $PYTHON) has PyTorch, of its peer bench/pytorch_peer.py (`make bench-pytorch`).
#
#     tools/perf_doc.sh                 run the benchmarks, save their outputs in build/perf/
#     tools/perf_doc.sh LOG...          read saved outputs instead (build/perf/bench.log,
#                                       build/perf/pytorch.log, or any bench / peer output)
#
# `make docs` runs the first form. POSIX sh and awk only; run from anywhere in the repository.
set -eu

cd "$(dirname "$0")/.."
OUT=${PERF_DOC_OUT:-docs/performance.md}
PERF=build/perf
MAKE=${MAKE:-make}
PYTHON=${PYTHON:-/usr/bin/python3}

# "perf_doc:" lines start each saved output: what was measured, on what, when.
run_info() {
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    changed=$(git status --porcelain --untracked-files=no 2>/dev/null | awk '{printf "%s%s", sep, $NF; sep = ", "}')
    echo "perf_doc: commit $commit"
    if [ -n "$changed" ]; then echo "perf_doc: tree dirty: $changed"; else echo "perf_doc: tree clean"; fi
    echo "perf_doc: date $(date -u +%Y-%m-%d)"
    echo "perf_doc: compiler $(${CC:-cc} --version 2>/dev/null | head -n 1) ${CFLAGS:--O3}"
}

if [ $# -eq 0 ]; then
    mkdir -p "$PERF"
    $MAKE --no-print-directory build/bench
    info=$(run_info)
    echo "perf_doc: running build/bench (several minutes)" >&2
    { echo "$info"; ./build/bench; } > "$PERF/bench.log.tmp"
    mv "$PERF/bench.log.tmp" "$PERF/bench.log"
    set -- "$PERF/bench.log"
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "perf_doc: running the PyTorch peer (make bench-pytorch)" >&2
        { echo "$info"; $MAKE -s --no-print-directory bench-pytorch PYTHON="$PYTHON"; } > "$PERF/pytorch.log.tmp"
        mv "$PERF/pytorch.log.tmp" "$PERF/pytorch.log"
        set -- "$@" "$PERF/pytorch.log"
    else
        echo "perf_doc: $PYTHON has no PyTorch: no peer figures" >&2
        rm -f "$PERF/pytorch.log"
    fi
fi

for log in "$@"; do
    [ -r "$log" ] || { echo "perf_doc: cannot read $log" >&2; exit 1; }
done
# Outputs read without their perf_doc lines get the repository's state now, said as such.
now=$(run_info)
field() { printf '%s\n' "$now" | sed -n "s/^perf_doc: $1 //p"; }
mkdir -p "$(dirname "$OUT")"

awk -v nproc="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo '?')" -v now_commit="$(field commit)" \
    -v now_tree="$(field tree)" -v now_cc="$(field compiler)" '
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function after(s, label) { return trim(substr(s, index(s, label) + length(label))) }
function num(s) { gsub(/[^0-9.+-]/, "", s); return s + 0 }
function fmt_rate(x) { return x >= 100000 ? sprintf("%.0fk", x / 1000) : x >= 10000 ? sprintf("%.1fk", x / 1000) : sprintf("%.0f", x) }
function pct(x) { return sprintf("%.1f %%", x) }
function ratio(a, b) { return b > 0 ? sprintf("%.2fx", a / b) : "" }
# PyTorch share of peak: acmoe rate and share give the FLOP per item, the same for the peer.
function pt_share(share, rate, pt) { return rate > 0 ? pct(share * pt / rate) : "" }
function pt_cell(a, k, t, share, rate) { return ((k, t) in a) ? fmt_rate(a[k, t]) " (" pt_share(share, rate, a[k, t]) ")" : "" }

FNR == 1 { kind = ""; section = 0; ptt = 0 }
/^perf_doc: / {
    key = $2; val = after($0, $2)
    if (key == "commit") info_commit = val
    else if (key == "tree") info_tree = val
    else if (key == "date") info_date = val
    else if (key == "compiler") info_cc = val
    next
}
/^Section [0-9]+: / { kind = "bench"; section = $2 + 0; ran[section] = 1; next }
/^PyTorch [0-9]/ { kind = "pt"; pt_version = $2; sub(/,$/, "", pt_version); pt_blas = after($0, "BLAS"); next }

kind == "bench" && /^CPU:/ { cpu = after($0, "CPU:"); next }
kind == "bench" && /^Kernel path:/ { isa = after($0, "Kernel path:"); next }
kind == "bench" && /^Threads:/ { online = $2; next }
kind == "bench" && /^Blocking:/ { blocking = after($0, "Blocking:"); next }
kind == "bench" && /^FMA peak:/ { probe = after($0, "FMA peak:"); next }
kind == "bench" && /per-core peak/ {
    peak1 = $3 + 0; peak2 = $9 + 0; next
}
kind == "bench" && /^Peak memory:/ { mem[section] = $3 " " $4; next }
kind == "bench" && /median of at least [0-9]+/ { match($0, /median of at least [0-9]+/); reps = substr($0, RSTART + 19, RLENGTH - 19) + 0; next }

# Section 1: M N K layout 1T %peak 2T %peak 2T/1T
kind == "bench" && section == 1 && NF == 9 && $1 ~ /^[0-9]+$/ && $4 ~ /^[NT][NT]$/ {
    n1++; mm[n1] = sprintf("| %s x %s x %s | %s | %.1f | %s | %.1f | %s | %s |", $1, $2, $3, $4, $5, pct(num($6)), $7, pct(num($8)), $9)
    next
}
# Section 2: E k d ff T router 1T %peak routing 2T %peak routing 2T/1T
kind == "bench" && section == 2 && $1 ~ /^E[0-9]+$/ && NF == 13 {
    cfg = $1 " " $2 " " $3 " " $4 " " $5
    if (!(cfg in cfg_seen)) { cfg_seen[cfg] = 1; ncfg++; cfgs[ncfg] = cfg }
    n2++; m_cfg[n2] = cfg; m_router[n2] = $6
    m_r1[n2] = $7; m_p1[n2] = num($8); m_rt1[n2] = pct(num($9)); m_r2[n2] = $10; m_p2[n2] = num($11); m_rt2[n2] = pct(num($12)); m_sp[n2] = $13
    next
}
kind == "bench" && section == 2 && /AC over cosine:/ { acc[cfg] = after($0, "AC over cosine:"); next }
# Section 3
kind == "bench" && section == 3 && /^[12] threads?: [0-9]+ tokens\/s/ {
    t = $1 + 0; lm_rate[t] = $3; lm_ms[t] = $5; sub(/^\(/, "", lm_ms[t])
    match($0, /[0-9.]+% of the measured peak/); lm_share[t] = num(substr($0, RSTART, RLENGTH - 22))
    match($0, /[0-9.]+ MFLOP a token/); lm_mflop = trim(substr($0, RSTART, RLENGTH - 13))
    next
}
kind == "bench" && section == 3 && /^[12] threads?: decoding/ { lm_dec[$1 + 0] = $4; next }
kind == "bench" && section == 3 && /^memory plan MiB:/ { lm_mem = after($0, "memory plan MiB:"); next }
# Section 4: "ggc", 1 thread: 320 images/s, 20481 patches/s (100.0 ms a step; 2.7 MFLOP a patch, 58.8% of ...)
kind == "bench" && section == 4 && /^"[a-z|]+", [12] threads?: / {
    p = $1; gsub(/[",]/, "", p); t = $2 + 0
    if (!(p in vis_seen)) { vis_seen[p] = 1; nvis++; vis[nvis] = p }
    v_img[p, t] = $4; v_patch[p, t] = $6; v_ms[p, t] = $8; sub(/^\(/, "", v_ms[p, t])
    match($0, /[0-9.]+% of the measured peak/); v_share[p, t] = num(substr($0, RSTART, RLENGTH - 22))
    match($0, /[0-9.]+ MFLOP a patch/); v_mflop[p] = trim(substr($0, RSTART, RLENGTH - 13))
    next
}

kind == "pt" && /tokens\/s on [0-9]+ thread/ && /^MoE layer/ { ptt = $(NF - 1) + 0; next }
kind == "pt" && $1 ~ /^E[0-9]+$/ && $NF == "tokens/s" { pt_moe[$1 " " $2 " " $3 " " $4 " " $5, ptt] = $6; pt_any = 1; next }
kind == "pt" && /^Training step/ { t = $(NF - 1) + 0; pt_lm[t] = $(NF - 4); pt_any = 1; next }
kind == "pt" && /^Vision training step/ {
    p = $4; gsub(/[",]/, "", p); t = $(NF - 1) + 0; pt_vis[p, t] = $(NF - 4); pt_any = 1; next
}

END {
    if (!ran[1] && !ran[2] && !ran[3] && !ran[4]) { print "perf_doc: no bench output among the inputs" > "/dev/stderr"; exit 1 }
    if (info_commit == "") {
        info_commit = now_commit; info_tree = now_tree; info_date = ""; info_cc = now_cc; saved = 1
    }
    tree = info_tree == "clean" ? "clean tree" : "uncommitted changes to " after(info_tree, "dirty:")

    print "<!-- Generated by tools/perf_doc.sh (make docs) from one run of build/bench and its PyTorch"
    print "     peer. Do not edit by hand: regenerate it. -->"
    print "# Performance"
    print ""
    print "The figures below come from a single run on a single host. They change with the host, with its"
    print "load and with the version of the library, so a share of the measured peak is given next to"
    print "each rate: that share carries across machines, the rate does not. `make docs` runs the"
    print "benchmarks again and rewrites this file."
    print ""
    print "## Method"
    print ""
    print "`build/bench` (bench/bench.c, `make bench`) has four sections."
    print ""
    print "- **Peak.** The FP32 fused multiply-add peak is measured with a register-only loop of the"
    print "  instruction set the library picked on this CPU (12 independent accumulator chains of"
    print "  `_mm512_fmadd_ps` or `_mm256_fmadd_ps`; a portable C loop on other paths, which is a"
    print "  reference rather than a SIMD peak), on 1 thread and on 2 threads at once, best of 5 runs."
    print "  The 2-thread rate is the total work over the span from the first start to the last"
    print "  finish. The 1-thread figure is the per-core peak. Every share of peak below is a rate"
    print "  against the peak of the same thread count measured in the same process."
    print "- **1. Matrix products.** `acmoe_matmul` on expert-sized, tall, deep and square products in"
    print "  the layouts NN, NT and TN, in contexts of 1 and 2 threads. GFLOP/s count 2 M N K"
    print "  operations; each figure is the median of at least 5 runs and 0.25 s after 2 warm-up runs."
    print "- **2. MoE layer.** Forward and backward pass of one layer (E experts, top-2, ReLU experts)"
    print "  with the SMoE, cosine and AC routers, which take turns one step at a time so that drifts in"
    print "  the host speed reach all three alike. Tokens/s are medians of at least 5 steps. The"
    print "  share of peak counts 6 operations per multiply-add of the forward products (the forward"
    print "  product and the two of its backward pass) for the experts and the router. Routing is the"
    print "  router forward and backward as a share of the step, from the layer\047s own clock."
    print "- **3. Language-model training step.** 3 layers \"ggc\", d 128, 8 heads, E16 top-2, 8"
    print "  sequences of 256 byte tokens: forward, backward and AdamW; median of at least 5 steps after 2"
    print "  warm-up steps. The share of peak counts the projections, attention (each query against the"
    print "  keys it sees), the feed-forward blocks and the output head. Decoding is one sequence, each"
    print "  of its 256 positions in turn, best of 3 passes."
    print "- **4. Vision-encoder training step.** 3 pre-LN layers \"ggc\" (top-2) and \"gmg\" (Soft MoE,"
    print "  one slot per expert), d 128, 8 heads, E16, 32 images of 64 patches of 4 x 4 x 3."
    print "- **Peer.** bench/pytorch_peer.py builds the same layers and models in PyTorch (tokens sorted"
    print "  by expert, one `addmm` per expert, autograd; the SMoE router in section 2) and times the"
    print "  median of 10 steps after 3 warm-up steps, with PyTorch and its BLAS set to 1 and then 2"
    print "  threads. It runs after the bench, in another process. Its share of peak applies the bench\047s"
    print "  FLOP count to its rate. Section 1 has no peer in this run."
    print ""
    print "The host may run other work at the same time (a shared VM, other builds), which shows as"
    print "noise, mostly in the 2-thread figures."
    print ""
    print "## Run"
    print ""
    print "| | |"
    print "|---|---|"
    printf "| commit | `%s`, %s |\n", info_commit, tree
    if (info_date != "") printf "| date | %s |\n", info_date
    if (saved) print "| source | saved bench outputs; commit and tree as of generating this file |"
    printf "| CPU | %s, %s online CPUs |\n", cpu != "" ? cpu : "unknown", online != "" ? online : nproc
    if (isa != "") printf "| kernel path | %s; blocking %s |\n", isa, blocking
    if (peak1 > 0) {
        printf "| measured peak | **%.1f GFLOP/s per core** (1 thread); %.1f GFLOP/s on 2 threads (%.2fx) |\n", peak1, peak2, peak2 / peak1
        printf "| peak loop | %s |\n", probe
        if (online + 0 >= 2 && peak2 < 1.5 * peak1)
            printf "| note | the 2-thread peak is only %.2fx the 1-thread one: the second CPU was busy or shared while it was measured, so 2-thread shares are overstated |\n", peak2 / peak1
    }
    if (reps > 0 && reps != 5) printf "| mode | `--quick`: at least %d timed repetitions a figure, shorter than the method says |\n", reps
    if (info_cc != "") printf "| compiler | %s |\n", info_cc
    if (pt_any) printf "| peer | PyTorch %s, BLAS %s |\n", pt_version, pt_blas
    else print "| peer | none: PyTorch was not measured in this run |"

    if (ran[1]) {
        print ""
        print "## 1. Matrix products"
        print ""
        print "GFLOP/s and share of the measured peak; no peer."
        print ""
        print "| M x N x K | layout | 1T GFLOP/s | 1T share | 2T GFLOP/s | 2T share | 2T/1T |"
        print "|---|---|---|---|---|---|---|"
        for (i = 1; i <= n1; i++) print mm[i]
        if (mem[1] != "") { print ""; print "Resident peak of the section: " mem[1] "." }
    }
    if (ran[2]) {
        print ""
        print "## 2. MoE layer forward + backward"
        print ""
        print "Tokens/s (E experts, top-k, d model width, ff expert width, T tokens a call). The peer runs"
        print "the SMoE router; the ratio is acmoe over PyTorch at the same thread count."
        print ""
        hdr = "| config | router | 1T tokens/s | 1T share | routing | 2T tokens/s | 2T share | 2T/1T |"
        sep = "|---|---|---|---|---|---|---|---|"
        if (pt_any) { hdr = hdr " PyTorch 1T (share) | PyTorch 2T (share) | vs PyTorch 1T | 2T |"; sep = sep "---|---|---|---|" }
        print hdr; print sep
        for (i = 1; i <= n2; i++) {
            c = m_cfg[i]
            line = sprintf("| %s | %s | %s | %s | %s | %s | %s | %s |", c, m_router[i], fmt_rate(m_r1[i]), pct(m_p1[i]), m_rt1[i], fmt_rate(m_r2[i]), pct(m_p2[i]), m_sp[i])
            if (pt_any) {
                if (m_router[i] == "SMoE")
                    line = line sprintf(" %s | %s | %s | %s |", pt_cell(pt_moe, c, 1, m_p1[i], m_r1[i]), pt_cell(pt_moe, c, 2, m_p2[i], m_r2[i]),
                                        ((c, 1) in pt_moe) ? ratio(m_r1[i], pt_moe[c, 1]) : "", ((c, 2) in pt_moe) ? ratio(m_r2[i], pt_moe[c, 2]) : "")
                else line = line " | | | |"
            }
            print line
        }
        print ""
        print "AC router over cosine router, median of paired steps, and the difference of their routing shares:"
        print ""
        for (i = 1; i <= ncfg; i++) printf "- %s: %s\n", cfgs[i], acc[cfgs[i]]
        if (mem[2] != "") { print ""; print "Resident peak of the section: " mem[2] "." }
    }
    if (ran[3]) {
        print ""
        print "## 3. Language-model training step"
        print ""
        printf "2048 tokens a step, %s MFLOP a token.\n", lm_mflop
        print ""
        hdr = "| threads | tokens/s | ms a step | share of peak | decoding tokens/s |"
        sep = "|---|---|---|---|---|"
        if (pt_any) { hdr = hdr " PyTorch tokens/s | PyTorch share | vs PyTorch |"; sep = sep "---|---|---|" }
        print hdr; print sep
        for (t = 1; t <= 2; t++) {
            if (!(t in lm_rate)) continue
            line = sprintf("| %d | %s | %s | %s | %s |", t, fmt_rate(lm_rate[t]), lm_ms[t], pct(lm_share[t]), fmt_rate(lm_dec[t]))
            if (pt_any) line = line ((t in pt_lm) ? sprintf(" %s | %s | %s |", fmt_rate(pt_lm[t]), pt_share(lm_share[t], lm_rate[t], pt_lm[t]), ratio(lm_rate[t], pt_lm[t])) : " | | |")
            print line
        }
        if (lm_mem != "") { print ""; print "Memory plan of the model (MiB): " lm_mem "." }
        if (mem[3] != "") { print ""; print "Resident peak of the section: " mem[3] "." }
    }
    if (ran[4]) {
        print ""
        print "## 4. Vision-encoder training step"
        print ""
        print "2048 patches a step (32 images)."
        print ""
        hdr = "| pattern | threads | images/s | patches/s | ms a step | MFLOP a patch | share of peak |"
        sep = "|---|---|---|---|---|---|---|"
        if (pt_any) { hdr = hdr " PyTorch images/s | PyTorch share | vs PyTorch |"; sep = sep "---|---|---|" }
        print hdr; print sep
        for (i = 1; i <= nvis; i++)
            for (t = 1; t <= 2; t++) {
                p = vis[i]
                if (!((p, t) in v_img)) continue
                line = sprintf("| `%s` | %d | %s | %s | %s | %s | %s |", p, t, v_img[p, t], fmt_rate(v_patch[p, t]), v_ms[p, t], v_mflop[p], pct(v_share[p, t]))
                if (pt_any) line = line (((p, t) in pt_vis) ? sprintf(" %s | %s | %s |", pt_vis[p, t], pt_share(v_share[p, t], v_img[p, t], pt_vis[p, t]), ratio(v_img[p, t], pt_vis[p, t])) : " | | |")
                print line
            }
        if (mem[4] != "") { print ""; print "Resident peak of the section: " mem[4] "." }
    }
}' "$@" > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "perf_doc: wrote $OUT" >&2
