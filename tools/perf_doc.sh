#!/bin/sh
# Writes docs/performance.md from runs of build/bench and of its peers: the OpenBLAS peer of
# section 1 (bench/openblas_peer.c, `make bench-openblas`) and, where /usr/bin/python3 (or
# $PYTHON) has PyTorch, the PyTorch peer of sections 2 to 4 (bench/pytorch_peer.py,
# `make bench-pytorch`).
#
#     tools/perf_doc.sh                 run the benchmarks, save their outputs in build/perf/
#     tools/perf_doc.sh LOG...          read saved outputs instead (build/perf/bench.log,
#                                       build/perf/openblas.log, build/perf/pytorch.log, or
#                                       any bench / peer output)
#
# Given several outputs of one kind (several runs), each figure of each row is the median of
# the runs that have it, and the doc says over how many runs. RUNS=N (default 1) makes the
# first form run everything N times, the bench and its peers taking turns run by run (run 1
# in build/perf/bench.log, openblas.log and pytorch.log; run i in bench-i.log and so on).
# Each output records that it took its turn, so a doc rebuilt from saved outputs says so too.
# On a CPU whose best path is AVX-512, each run also times section 1 and its OpenBLAS peer on
# the AVX2 path (bench-avx2.log, openblas-avx2.log; --isa avx2), the kernels AVX2-only
# machines run. QUICK=1 runs them with their short --quick timings (a smoke test). `make docs` and
# `make bench-compare` run the first form. POSIX sh and awk only; run from anywhere in the
# repository.
set -eu

cd "$(dirname "$0")/.."
OUT=${PERF_DOC_OUT:-docs/performance.md}
PERF=build/perf
MAKE=${MAKE:-make}
PYTHON=${PYTHON:-/usr/bin/python3}
RUNS=${RUNS:-1}
QUICK=${QUICK:-}

# "perf_doc:" lines start each saved output: what was measured, on what, when.
run_info() {
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    changed=$(git status --porcelain --untracked-files=no 2>/dev/null | awk '{printf "%s%s", sep, $NF; sep = ", "}')
    echo "perf_doc: commit $commit"
    if [ -n "$changed" ]; then echo "perf_doc: tree dirty: $changed"; else echo "perf_doc: tree clean"; fi
    echo "perf_doc: date $(date -u +%Y-%m-%d)"
    echo "perf_doc: compiler $(${CC:-cc} --version 2>/dev/null | head -n 1) ${CFLAGS:--O3}"
}

# Runs a benchmark command with the run's perf_doc lines into $1, replaced only once it ends.
save_run() {
    log=$1; shift
    { echo "$info"; "$@"; } > "$log.tmp"
    mv "$log.tmp" "$log"
}

pt_missing=""
if [ $# -eq 0 ]; then
    case $RUNS in
        '' | *[!0-9]* | 0*) echo "perf_doc: RUNS must be a whole number from 1, not '$RUNS'" >&2; exit 2 ;;
    esac
    bench_flags=""; pytorch_flags=""; long=" (several minutes)"
    if [ -n "$QUICK" ] && [ "$QUICK" != 0 ]; then bench_flags=--quick; pytorch_flags="--steps 2"; long=""; fi
    mkdir -p "$PERF"
    $MAKE --no-print-directory build/bench build/openblas_peer
    rm -f "$PERF"/bench-[0-9]*.log "$PERF"/openblas-[0-9]*.log "$PERF"/pytorch-[0-9]*.log "$PERF"/*-avx2*.log
    torch=1
    if ! "$PYTHON" -c "import torch" 2>/dev/null; then
        torch=0; pt_missing="$PYTHON has no PyTorch (apt-get install python3-torch)"
        echo "perf_doc: $pt_missing: no PyTorch figures" >&2
        rm -f "$PERF/pytorch.log"
    fi
    base_info=$(run_info)
    run=1; second=""
    while [ "$run" -le "$RUNS" ]; do
        if [ "$run" -eq 1 ]; then suffix=""; else suffix="-$run"; fi
        info="$base_info
perf_doc: turns run $run of $RUNS"
        echo "perf_doc: run $run of $RUNS: build/bench${bench_flags:+ $bench_flags}$long" >&2
        save_run "$PERF/bench$suffix.log" ./build/bench $bench_flags
        echo "perf_doc: run $run of $RUNS: the OpenBLAS peer (make bench-openblas)" >&2
        save_run "$PERF/openblas$suffix.log" ./build/openblas_peer $bench_flags
        set -- "$@" "$PERF/bench$suffix.log" "$PERF/openblas$suffix.log"
        if [ "$run" -eq 1 ] && grep -q '^Kernel path: *avx512' "$PERF/bench.log"; then second=avx2; fi
        if [ -n "$second" ]; then
            echo "perf_doc: run $run of $RUNS: section 1 and the OpenBLAS peer on the $second path" >&2
            save_run "$PERF/bench-$second$suffix.log" ./build/bench $bench_flags --section 1 --isa "$second"
            save_run "$PERF/openblas-$second$suffix.log" ./build/openblas_peer $bench_flags --isa "$second"
            set -- "$@" "$PERF/bench-$second$suffix.log" "$PERF/openblas-$second$suffix.log"
        fi
        if [ "$torch" -eq 1 ]; then
            echo "perf_doc: run $run of $RUNS: the PyTorch peer (make bench-pytorch)" >&2
            save_run "$PERF/pytorch$suffix.log" $MAKE -s --no-print-directory bench-pytorch PYTHON="$PYTHON" \
                PYTORCH_FLAGS="$pytorch_flags"
            set -- "$@" "$PERF/pytorch$suffix.log"
        fi
        run=$((run + 1))
    done
fi

for log in "$@"; do
    [ -r "$log" ] || { echo "perf_doc: cannot read $log" >&2; exit 1; }
done
# Outputs read without their perf_doc lines get the repository's state now, said as such.
now=$(run_info)
field() { printf '%s\n' "$now" | sed -n "s/^perf_doc: $1 //p"; }
mkdir -p "$(dirname "$OUT")"

awk -v nproc="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo '?')" -v now_commit="$(field commit)" \
    -v now_tree="$(field tree)" -v now_cc="$(field compiler)" -v pt_missing="$pt_missing" '
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function after(s, label) { return trim(substr(s, index(s, label) + length(label))) }
function num(s) { gsub(/[^0-9.+-]/, "", s); return s + 0 }
function fmt_rate(x) { return x >= 100000 ? sprintf("%.0fk", x / 1000) : x >= 10000 ? sprintf("%.1fk", x / 1000) : sprintf("%.0f", x) }
function pct(x) { return sprintf("%.1f %%", x) }
function ratio(a, b) { return b > 0 ? sprintf("%.2fx", a / b) : "" }
# Every figure is kept per run under a key (what, row, thread count) and read back as the
# median over the runs that have it: one run gives its own figure.
function add(key, v) { V[key, ++NV[key]] = v + 0 }
function has(key) { return (key in NV) }
function med(key,    n, i, j, x, a) {
    n = NV[key]
    for (i = 1; i <= n; i++) {
        x = V[key, i]
        for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]
        a[j + 1] = x
    }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
# A share of the measured peak is not a median of its own: the run gives the work of an item
# (share x the peak of that run / rate, the same in every run) and the share is taken again from
# the median rate and peak, so that rate, share and peak of a row agree with one another.
function add_work(key, rate, share_text, t) { if (rate + 0 > 0 && f_peak[t] > 0) add("work" SUBSEP key, num(share_text) / 100 * f_peak[t] / rate) }
function peak_share(key, rate, t, X,    peak) {
    peak = has("peak" X SUBSEP t) ? med("peak" X SUBSEP t) : 0
    return has("work" SUBSEP key) && peak > 0 ? 100 * rate * med("work" SUBSEP key) / peak : 0
}
# A row seen for the first time joins the end of its table.
function row(table, r) { if (!((table, r) in rows_seen)) { rows_seen[table, r] = 1; rows[table, ++nrows[table]] = r } }
# Distinct values in the order first seen, joined.
function note(list, v, sep) { if (v != "" && index(sep notes[list] sep, sep v sep) == 0) notes[list] = notes[list] (notes[list] == "" ? "" : sep) v }
# The peer share of peak: acmoe rate and share give the FLOP per item, the same for the peer.
function pt_share(share, rate, pt) { return rate > 0 ? pct(share * pt / rate) : "" }
function pt_cell(key, share, rate) { return has(key) ? fmt_rate(med(key)) " (" pt_share(share, rate, med(key)) ")" : "" }
function pt_ratio(acmoe, key) { return has(key) ? ratio(acmoe, med(key)) : "" }
# acmoe over OpenBLAS on row r at t threads (path X): from the turns of the two libraries in
# the peer when it timed acmoe too, else the bench figure a over the peer figure; 0 without a
# peer figure.
function ob_over(r, t, a, X,    k, ka) {
    k = "ob" X SUBSEP r SUBSEP t; ka = "obac" X SUBSEP r SUBSEP t
    if (!has(k) || med(k) <= 0) return 0
    return (has(ka) ? med(ka) : a) / med(k)
}
# How many runs the figures of a section are medians of: nb of the bench, np of its peer.
function say_runs(nb, np, peer,    said) { said = runs_said(nb, np, peer); if (said != "") print substr(said, 2) }
function runs_said(nb, np, peer) {
    if (nb <= 1 && np <= 1) return ""
    if (np == 0 || np == nb) return sprintf(" Each figure is the median of %d runs; shares and ratios are taken from the medians.", nb)
    return sprintf(" acmoe\047s figures are medians of %d run%s, %s\047s of %d; shares and ratios are taken from the medians.", nb, nb > 1 ? "s" : "", peer, np)
}

FNR == 1 {
    if (NR > 1) end_file()
    kind = ""; section = 0; ptt = 0; f_commit = ""; f_tree = ""; f_date = ""; f_cc = ""; f_bench = f_pt = f_ob = 0; f_peak[1] = f_peak[2] = 0
    alt = X = ""; counted = 0; f_turns = 0
}
/^perf_doc: / {
    key = $2; val = after($0, $2)
    if (key == "commit") f_commit = val
    else if (key == "tree") f_tree = val
    else if (key == "date") f_date = val
    else if (key == "compiler") f_cc = val
    else if (key == "turns") f_turns = 1
    next
}
/^Section [0-9]+: / { kind = "bench"; section = $2 + 0; ran[section] = 1; if (!f_bench) { runs_bench++; counted = 1 } f_bench = 1; sec_runs[section]++; next }
/^PyTorch [0-9]/ { kind = "pt"; pt_version = $2; sub(/,$/, "", pt_version); pt_blas = after($0, "BLAS"); next }
/^OpenBLAS peer: / {
    kind = "ob"
    if (/OpenBLAS is not installed/) ob_missing = after($0, "OpenBLAS peer:")
    else { main_ob_config = ob_config; ob_config = after($0, "OpenBLAS peer:") }
    next
}
# A run on another kernel path than the CPU\047s best (--isa): section 1 and its OpenBLAS peer,
# kept under keys of their own (X = "x"), not counted among the runs of the main path.
/^Kernel path:/ && index($0, "(--isa)") {
    alt = $3; X = "x"; alt_path = alt
    if (kind == "ob") { alt_ob_config = ob_config; ob_config = main_ob_config }
    else { if (counted) runs_bench--; counted = 0; f_bench = 0; sec_runs[section]--; runs_alt++ }
    next
}

kind == "bench" && /^CPU:/ { cpu = after($0, "CPU:"); next }
kind == "bench" && /^Kernel path:/ { isa = after($0, "Kernel path:"); next }
kind == "bench" && /^Threads:/ { online = $2; next }
kind == "bench" && /^Blocking:/ { B["blocking" X] = after($0, "Blocking:"); next }
kind == "bench" && /^FMA peak:/ { B["probe" X] = after($0, "FMA peak:"); next }
kind == "bench" && /per-core peak/ { f_peak[1] = $3; f_peak[2] = $9; add("peak" X SUBSEP 1, $3); add("peak" X SUBSEP 2, $9); next }
kind == "bench" && /^Peak memory:/ { if (X == "") { add("mem" SUBSEP section, $3); mem_unit[section] = $4 } next }
kind == "bench" && /median of at least [0-9]+/ { match($0, /median of at least [0-9]+/); reps = substr($0, RSTART + 19, RLENGTH - 19) + 0; next }

# Section 1: M N K layout 1T %peak 2T %peak 2T/1T
kind == "bench" && section == 1 && NF == 9 && $1 ~ /^[0-9]+$/ && $4 ~ /^[NT][NT]$/ {
    r = $1 " x " $2 " x " $3 " | " $4; row("mm" X, r)
    add("mm" X SUBSEP r SUBSEP 1, $5); add_work("mm" X SUBSEP r SUBSEP 1, $5, $6, 1)
    add("mm" X SUBSEP r SUBSEP 2, $7); add_work("mm" X SUBSEP r SUBSEP 2, $7, $8, 2)
    next
}
# Section 2: E k d ff T router 1T %peak routing 2T %peak routing 2T/1T
kind == "bench" && section == 2 && $1 ~ /^E[0-9]+$/ && NF == 13 {
    cfg = $1 " " $2 " " $3 " " $4 " " $5; row("cfg", cfg)
    r = cfg SUBSEP $6; row("moe", r)
    add("moe" SUBSEP r SUBSEP 1, $7); add_work("moe" SUBSEP r SUBSEP 1, $7, $8, 1); add("moert" SUBSEP r SUBSEP 1, num($9))
    add("moe" SUBSEP r SUBSEP 2, $10); add_work("moe" SUBSEP r SUBSEP 2, $10, $11, 2); add("moert" SUBSEP r SUBSEP 2, num($12))
    next
}
# AC over cosine: step +1.2% (1T) +1.1% (2T); routing share +2.2 (1T) +3.1 (2T) points
kind == "bench" && section == 2 && /AC over cosine: step .* routing share / {
    add("acs" SUBSEP cfg SUBSEP 1, num($5)); add("acs" SUBSEP cfg SUBSEP 2, num($7))
    add("acr" SUBSEP cfg SUBSEP 1, num($11)); add("acr" SUBSEP cfg SUBSEP 2, num($13))
    next
}
# Section 3
kind == "bench" && section == 3 && /^[12] threads?: [0-9]+ tokens\/s/ {
    t = $1 + 0; add("lm" SUBSEP t, $3); add("lmms" SUBSEP t, num($5))
    match($0, /[0-9.]+% of the measured peak/); add_work("lm" SUBSEP t, $3, substr($0, RSTART, RLENGTH - 22), t)
    match($0, /[0-9.]+ MFLOP a token/); lm_mflop = trim(substr($0, RSTART, RLENGTH - 13))
    next
}
kind == "bench" && section == 3 && /^[12] threads?: decoding/ { add("lmdec" SUBSEP ($1 + 0) SUBSEP 1, $4); next }
kind == "bench" && section == 3 && /^[12] threads?: batch decoding [0-9]+ sequences:/ { add("lmdec" SUBSEP ($1 + 0) SUBSEP ($5 + 0), $7); next }
# 1 thread: phases of a step (median of 7): attention 22.1 ms (47.3% of the measured peak), routing 1.2 ms, ...
kind == "bench" && section == 3 && /^[12] threads?: phases of a step/ {
    t = $1 + 0; n = split("attention routing experts optimizer rest", names, " ")
    for (i = 1; i <= n; i++) if (match($0, names[i] " [0-9.]+ ms")) add("lmph" SUBSEP names[i] SUBSEP t, num(substr($0, RSTART + length(names[i]), RLENGTH - length(names[i]))))
    if (match($0, /\([0-9.]+% of the measured peak/)) add("lmphsh" SUBSEP t, num(substr($0, RSTART, RLENGTH - 22)))
    next
}
kind == "bench" && section == 3 && /^memory plan MiB:/ { if (lm_mem == "") lm_mem = after($0, "memory plan MiB:"); next }
# Section 4: "ggc", 1 thread: 320 images/s, 20481 patches/s (100.0 ms a step; 2.7 MFLOP a patch, 58.8% of ...)
kind == "bench" && section == 4 && /^"[a-z|]+", [12] threads?: / {
    p = $1; gsub(/[",]/, "", p); t = $2 + 0; row("vis", p)
    add("vimg" SUBSEP p SUBSEP t, $4); add("vpatch" SUBSEP p SUBSEP t, $6); add("vms" SUBSEP p SUBSEP t, num($8))
    match($0, /[0-9.]+% of the measured peak/); add_work("vimg" SUBSEP p SUBSEP t, $4, substr($0, RSTART, RLENGTH - 22), t)
    match($0, /[0-9.]+ MFLOP a patch/); v_mflop[p] = trim(substr($0, RSTART, RLENGTH - 13))
    next
}

kind == "pt" && /tokens\/s on [0-9]+ thread/ && /^MoE layer/ { ptt = $(NF - 1) + 0; next }
kind == "pt" && $1 ~ /^E[0-9]+$/ && $NF == "tokens/s" { add("ptmoe" SUBSEP ($1 " " $2 " " $3 " " $4 " " $5) SUBSEP ptt, $6); f_pt = 1; next }
kind == "pt" && /^Training step/ { add("ptlm" SUBSEP ($(NF - 1) + 0), $(NF - 4)); f_pt = 1; next }
kind == "pt" && /^Vision training step/ {
    p = $4; gsub(/[",]/, "", p); add("ptvis" SUBSEP p SUBSEP ($(NF - 1) + 0), $(NF - 4)); f_pt = 1; next
}

# The OpenBLAS peer: M N K layout 1T 2T, then acmoe 1T 2T timed in turns with it
kind == "ob" && /^Threads: / { ob_threads = $2 " and " $4; match($0, /median of at least [0-9]+/); ob_reps = substr($0, RSTART + 19, RLENGTH - 19) + 0; next }
kind == "ob" && (NF == 6 || NF == 8) && $1 ~ /^[0-9]+$/ && $4 ~ /^[NT][NT]$/ {
    r = $1 " x " $2 " x " $3 " | " $4
    add("ob" X SUBSEP r SUBSEP 1, $5); add("ob" X SUBSEP r SUBSEP 2, $6); f_ob = 1
    if (NF == 8) { add("obac" X SUBSEP r SUBSEP 1, $7); add("obac" X SUBSEP r SUBSEP 2, $8) }
    next
}

# What each output says of its run (or, without perf_doc lines, the repository now).
function end_file() {
    files++; if (f_turns) turned++ # a run of a RUNS sequence: the bench and its peers took turns
    if (f_pt) runs_pt++
    if (f_ob && X == "") runs_ob++
    if (f_ob && X != "") runs_obx++
    if (!f_bench && !f_pt && !f_ob && X == "") return
    if (f_commit == "") { f_commit = now_commit; f_tree = now_tree; f_cc = now_cc; saved = 1 }
    note("commit", "`" f_commit "`, " (f_tree == "clean" ? "clean tree" : "uncommitted changes to " after(f_tree, "dirty:")), "; ")
    note("date", f_date, ", ")
    note("cc", f_cc, "; ")
}

END {
    end_file()
    if (!ran[1] && !ran[2] && !ran[3] && !ran[4]) { print "perf_doc: no bench output among the inputs" > "/dev/stderr"; exit 1 }
    pt_any = runs_pt > 0; ob_any = runs_ob > 0
    nmax = runs_bench; if (runs_ob > nmax) nmax = runs_ob; if (runs_pt > nmax) nmax = runs_pt
    peak1 = has("peak" SUBSEP 1) ? med("peak" SUBSEP 1) : 0; peak2 = has("peak" SUBSEP 2) ? med("peak" SUBSEP 2) : 0

    print "<!-- Generated by tools/perf_doc.sh (make docs, make bench-compare) from runs of build/bench"
    print "     and its OpenBLAS and PyTorch peers. Do not edit by hand: regenerate it. -->"
    print "# Performance"
    print ""
    if (nmax > 1) {
        printf "The figures below are medians of %d runs on a single host", nmax
        if (files == turned) print ", the bench and its peers taking turns run\nby run: each figure of a row is the median of that figure over the runs."
        else print ": each figure of a row is the\nmedian of that figure over the runs."
        print "They change with the host, with its load and with the version of the library, so a share of"
        print "the measured peak is given next to each rate: that share carries across machines, the rate"
        print "does not. `make bench-compare RUNS=" nmax "` runs the benchmarks again and rewrites this file."
    } else {
        print "The figures below come from a single run on a single host. They change with the host, with its"
        print "load and with the version of the library, so a share of the measured peak is given next to"
        print "each rate: that share carries across machines, the rate does not. `make docs` runs the"
        print "benchmarks again and rewrites this file; `make bench-compare RUNS=3` does the same with the"
        print "medians of three runs and prints the tables."
    }
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
    print "  finish; while it stays below 1.6 times the 1-thread rate, a sign that the second CPU was"
    print "  busy, the 2-thread loop runs up to 20 more times. The 1-thread figure is the per-core"
    print "  peak. Every share of peak below is a rate"
    if (nmax > 1) print "  against the median peak of the same thread count over the runs."
    else print "  against the peak of the same thread count measured in the same process."
    print "- **1. Matrix products.** `acmoe_matmul` on expert-sized, tall, deep and square products in"
    print "  the layouts NN, NT and TN (bench/matmul_shapes.h), in contexts of 1 and 2 threads. GFLOP/s"
    print "  count 2 M N K operations; each figure is the median of at least 5 runs and 0.25 s after 2"
    print "  warm-up runs."
    print "- **2. MoE layer.** Forward and backward pass of one layer (E experts, top-2, ReLU experts)"
    print "  with the SMoE, cosine and AC routers, which take turns one step at a time so that drifts in"
    print "  the host speed reach all three alike. Tokens/s are medians of at least 5 steps. The"
    print "  share of peak counts 6 operations per multiply-add of the forward products (the forward"
    print "  product and the two of its backward pass) for the experts and the router. Routing is the"
    print "  router forward and backward as a share of the step, from the layer\047s own clock."
    print "- **3. Language-model training step.** 3 layers \"ggc\", d 128, 8 heads, E16 top-2, 8"
    print "  sequences of 256 byte tokens: forward, backward and AdamW; median of at least 5 steps after 2"
    print "  warm-up steps. The share of peak counts the projections, attention (each query against the"
    print "  keys it sees), the feed-forward blocks and the output head. Decoding runs 1, 8 and 32"
    print "  sequences through their 256 positions in turn, the batch a position at a time, best of 3 passes."
    print "  Each position reads every sequence\047s cached keys and values (256 KiB a sequence and layer at"
    print "  full length): 32 sequences\047 24 MiB outgrow a last-level cache that 8 sequences\047 6 MiB fit,"
    print "  so on such a host 32 sequences decode fewer tokens a second than 8. More steps are then"
    print "  split by the model\047s own clocks (`acmoe_lm_last_times`): attention (scores, softmax and"
    print "  weighted values, its share of peak counting its own operations), routing and experts; the"
    print "  optimizer step is timed apart, and the rest (projections, norms, embeddings, head and"
    print "  loss) is what remains."
    print "- **4. Vision-encoder training step.** 3 pre-LN layers \"ggc\" (top-2) and \"gmg\" (Soft MoE,"
    print "  one slot per expert), d 128, 8 heads, E16, 32 images of 64 patches of 4 x 4 x 3."
    print "- **OpenBLAS peer of section 1.** bench/openblas_peer.c (`make bench-openblas`) loads the"
    print "  installed OpenBLAS at run time (Debian: libopenblas0-pthread) and times `cblas_sgemm` on the"
    print "  same products in the same layouts (row-major, C overwritten), with"
    print "  `openblas_set_num_threads` 1 and then 2 for each product, timed as section 1 times"
    print "  `acmoe_matmul`, taking turns with `acmoe_matmul` (a context of as many threads) on the same"
    print "  operands: 3 rounds, the first to run alternating, a pause of 0.25 s after each 2-thread"
    print "  turn so that idle threads have stopped spinning, each library\047s figure the median over"
    print "  the rounds. The acmoe/OpenBLAS ratios come from these turns rather than from the bench\047s"
    print "  figures, timed minutes earlier in another process, so that the host\047s drift does not enter"
    print "  them. It runs after the bench, in another process; its share of peak is against the"
    print "  bench\047s measured peak."
    print "- **PyTorch peer of sections 2 to 4.** bench/pytorch_peer.py builds the same layers and"
    print "  models in PyTorch (tokens sorted by expert, one `addmm` per expert, autograd; the SMoE"
    print "  router in section 2) and times the median of 10 steps after 3 warm-up steps, with PyTorch"
    print "  and its BLAS set to 1 and then 2 threads. It runs after the bench, in another process. Its"
    print "  share of peak applies the bench\047s FLOP count to its rate."
    if (nrows["mmx"] > 0) {
        printf "- **The %s path.** On a CPU whose best path is AVX-512, section 1 and its OpenBLAS peer\n", toupper(alt_path)
        printf "  run again on the %s path (`--isa %s`; OpenBLAS asked for its %s kernels with\n", toupper(alt_path), alt_path, toupper(alt_path)
        print "  OPENBLAS_CORETYPE), the shares against that path\047s own peak loop: the products of machines"
        print "  without AVX-512, measured on this one."
    }
    print ""
    print "A column acmoe/peer is acmoe\047s rate over the peer\047s at the same thread count: above 1x,"
    print "acmoe is faster. The host may run other work at the same time (a shared VM, other builds),"
    print "which shows as noise, mostly in the 2-thread figures."
    print ""
    print "## Run"
    print ""
    print "| | |"
    print "|---|---|"
    printf "| commit | %s |\n", notes["commit"]
    if (notes["date"] != "") printf "| date | %s |\n", notes["date"]
    if (saved) print "| source | saved outputs without their run\047s details; commit and tree as of generating this file |"
    printf "| CPU | %s, %s online CPUs |\n", cpu != "" ? cpu : "unknown", online != "" ? online : nproc
    if (isa != "") printf "| kernel path | %s; blocking %s |\n", isa, B["blocking"]
    if (peak1 > 0) {
        printf "| measured peak | **%.1f GFLOP/s per core** (1 thread); %.1f GFLOP/s on 2 threads (%.2fx) |\n", peak1, peak2, peak2 / peak1
        printf "| peak loop | %s |\n", B["probe"]
        if (online + 0 >= 2 && peak2 < 1.5 * peak1)
            printf "| note | the 2-thread peak is only %.2fx the 1-thread one: the second CPU was busy or shared while it was measured, so 2-thread shares are overstated |\n", peak2 / peak1
    }
    if (nmax > 1) printf "| runs | medians of %d runs of the bench, %d of the OpenBLAS peer, %d of the PyTorch peer%s |\n", runs_bench, runs_ob, runs_pt,
                         (runs_alt > 0 ? sprintf(", %d of section 1 and %d of its OpenBLAS peer on the %s path", runs_alt, runs_obx, toupper(alt_path)) : "")
    if ((reps > 0 && reps != 5) || (ob_reps > 0 && ob_reps != 5))
        printf "| mode | `--quick`: at least %d timed repetitions a figure, shorter than the method says |\n", (reps ? reps : ob_reps)
    if (notes["cc"] != "") printf "| compiler | %s |\n", notes["cc"]
    if (ob_any) printf "| OpenBLAS peer | %s; threads %s |\n", ob_config, ob_threads
    else if (ob_missing != "") printf "| OpenBLAS peer | none: %s |\n", ob_missing
    else print "| OpenBLAS peer | none: OpenBLAS was not measured in this run (`make bench-openblas`) |"
    if (has("peakx" SUBSEP 1))
        printf "| %s path | section 1 again with `--isa %s`: blocking %s; measured peak %.1f GFLOP/s per core, %.1f on 2 threads (%s); OpenBLAS peer: %s |\n",
               toupper(alt_path), alt_path, B["blockingx"], med("peakx" SUBSEP 1), med("peakx" SUBSEP 2), B["probex"], alt_ob_config != "" ? alt_ob_config : "none"
    if (pt_any) printf "| PyTorch peer | PyTorch %s, BLAS %s |\n", pt_version, pt_blas
    else if (pt_missing != "") printf "| PyTorch peer | none: %s |\n", pt_missing
    else print "| PyTorch peer | none: PyTorch was not measured in this run |"

    if (ran[1]) {
        print ""
        print "## 1. Matrix products"
        print ""
        if (ob_any) {
            print "GFLOP/s and share of the measured peak; the OpenBLAS peer\047s GFLOP/s (share), and acmoe over"
            print "OpenBLAS at each thread count, the two taking turns in the peer."; say_runs(sec_runs[1], runs_ob, "OpenBLAS")
        } else {
            print "GFLOP/s and share of the measured peak; no peer in this run."; say_runs(sec_runs[1], 0, "")
        }
        mm_table("", ob_any)
        if (has("mem" SUBSEP 1)) { print ""; printf "Resident peak of the section: %.1f %s.\n", med("mem" SUBSEP 1), mem_unit[1] }
    }
    if (nrows["mmx"] > 0) {
        print ""
        printf "## 1b. Matrix products on the %s path\n", toupper(alt_path)
        print ""
        printf "The same products on the %s path of this CPU (`build/bench --section 1 --isa %s`), the kernels\n", toupper(alt_path), alt_path
        printf "of machines without AVX-512, each share against that path\047s own measured peak (%.1f GFLOP/s\n", med("peakx" SUBSEP 1)
        printf "per core, %.1f on 2 threads)", med("peakx" SUBSEP 2)
        if (runs_obx > 0) printf "; the OpenBLAS peer runs its %s kernels beside them\n(`build/openblas_peer --isa %s`).", toupper(alt_path), alt_path
        else printf "; no OpenBLAS peer on this path in this run."
        print ""; say_runs(runs_alt, runs_obx, "OpenBLAS")
        mm_table("x", runs_obx > 0)
    }
    if (ran[2]) {
        print ""
        print "## 2. MoE layer forward + backward"
        print ""
        print "Tokens/s (E experts, top-k, d model width, ff expert width, T tokens a call). The peer runs"
        print "the SMoE router; the ratio is acmoe over PyTorch at the same thread count."; say_runs(sec_runs[2], runs_pt, "PyTorch")
        print ""
        hdr = "| config | router | 1T tokens/s | 1T share | routing | 2T tokens/s | 2T share | 2T/1T |"
        sep = "|---|---|---|---|---|---|---|---|"
        if (pt_any) { hdr = hdr " PyTorch 1T (share) | PyTorch 2T (share) | acmoe/PyTorch 1T | acmoe/PyTorch 2T |"; sep = sep "---|---|---|---|" }
        print hdr; print sep
        for (i = 1; i <= nrows["moe"]; i++) {
            r = rows["moe", i]; split(r, parts, SUBSEP); c = parts[1]; router = parts[2]
            r1 = med("moe" SUBSEP r SUBSEP 1); r2 = med("moe" SUBSEP r SUBSEP 2)
            p1 = peak_share("moe" SUBSEP r SUBSEP 1, r1, 1); p2 = peak_share("moe" SUBSEP r SUBSEP 2, r2, 2)
            line = sprintf("| %s | %s | %s | %s | %s | %s | %s | %s |", c, router, fmt_rate(r1), pct(p1), pct(med("moert" SUBSEP r SUBSEP 1)),
                           fmt_rate(r2), pct(p2), ratio(r2, r1))
            if (pt_any) {
                k1 = "ptmoe" SUBSEP c SUBSEP 1; k2 = "ptmoe" SUBSEP c SUBSEP 2
                if (router == "SMoE")
                    line = line sprintf(" %s | %s | %s | %s |", pt_cell(k1, p1, r1), pt_cell(k2, p2, r2), pt_ratio(r1, k1), pt_ratio(r2, k2))
                else line = line " | | | |"
            }
            print line
        }
        print ""
        print "AC router over cosine router, median of paired steps, and the difference of their routing shares:"
        print ""
        for (i = 1; i <= nrows["cfg"]; i++) {
            c = rows["cfg", i]
            if (has("acs" SUBSEP c SUBSEP 1))
                printf "- %s: step %+.1f%% (1T) %+.1f%% (2T); routing share %+.1f (1T) %+.1f (2T) points\n", c,
                       med("acs" SUBSEP c SUBSEP 1), med("acs" SUBSEP c SUBSEP 2), med("acr" SUBSEP c SUBSEP 1), med("acr" SUBSEP c SUBSEP 2)
        }
        if (has("mem" SUBSEP 2)) { print ""; printf "Resident peak of the section: %.1f %s.\n", med("mem" SUBSEP 2), mem_unit[2] }
    }
    if (ran[3]) {
        print ""
        print "## 3. Language-model training step"
        print ""
        printf "2048 tokens a step, %s MFLOP a token.\n", lm_mflop; say_runs(sec_runs[3], runs_pt, "PyTorch")
        print ""
        hdr = "| threads | tokens/s | ms a step | share of peak | decoding tokens/s: 1 / 8 / 32 sequences |"
        sep = "|---|---|---|---|---|"
        if (pt_any) { hdr = hdr " PyTorch tokens/s | PyTorch share | acmoe/PyTorch |"; sep = sep "---|---|---|" }
        print hdr; print sep
        for (t = 1; t <= 2; t++) {
            if (!has("lm" SUBSEP t)) continue
            rate = med("lm" SUBSEP t); sh = peak_share("lm" SUBSEP t, rate, t); k = "ptlm" SUBSEP t
            dec = ""
            for (seqs = 1; seqs <= 32; seqs *= 2) if (has("lmdec" SUBSEP t SUBSEP seqs)) dec = dec (dec == "" ? "" : " / ") fmt_rate(med("lmdec" SUBSEP t SUBSEP seqs))
            line = sprintf("| %d | %s | %.1f | %s | %s |", t, fmt_rate(rate), med("lmms" SUBSEP t), pct(sh), dec)
            if (pt_any) line = line (has(k) ? sprintf(" %s | %s | %s |", fmt_rate(med(k)), pt_share(sh, rate, med(k)), ratio(rate, med(k))) : " | | |")
            print line
        }
        if (has("lmph" SUBSEP "attention" SUBSEP 1)) {
            print ""
            print "Where a step\047s time goes, in ms (medians over steps of their own, so their sum need not"
            print "match the step time above):"
            print ""
            print "| threads | attention | attention share of peak | routing | experts | optimizer | the rest |"
            print "|---|---|---|---|---|---|---|"
            for (t = 1; t <= 2; t++) {
                if (!has("lmph" SUBSEP "attention" SUBSEP t)) continue
                printf "| %d | %.1f | %s | %.1f | %.1f | %.1f | %.1f |\n", t, med("lmph" SUBSEP "attention" SUBSEP t), pct(med("lmphsh" SUBSEP t)),
                       med("lmph" SUBSEP "routing" SUBSEP t), med("lmph" SUBSEP "experts" SUBSEP t), med("lmph" SUBSEP "optimizer" SUBSEP t), med("lmph" SUBSEP "rest" SUBSEP t)
            }
        }
        if (lm_mem != "") { print ""; print "Memory plan of the model (MiB" (sec_runs[3] == 1 ? "" : ", first run") "): " lm_mem "." }
        if (has("mem" SUBSEP 3)) { print ""; printf "Resident peak of the section: %.1f %s.\n", med("mem" SUBSEP 3), mem_unit[3] }
    }
    if (ran[4]) {
        print ""
        print "## 4. Vision-encoder training step"
        print ""
        print "2048 patches a step (32 images)."; say_runs(sec_runs[4], runs_pt, "PyTorch")
        print ""
        hdr = "| pattern | threads | images/s | patches/s | ms a step | MFLOP a patch | share of peak |"
        sep = "|---|---|---|---|---|---|---|"
        if (pt_any) { hdr = hdr " PyTorch images/s | PyTorch share | acmoe/PyTorch |"; sep = sep "---|---|---|" }
        print hdr; print sep
        for (i = 1; i <= nrows["vis"]; i++)
            for (t = 1; t <= 2; t++) {
                p = rows["vis", i]; kk = p SUBSEP t
                if (!has("vimg" SUBSEP kk)) continue
                img = med("vimg" SUBSEP kk); sh = peak_share("vimg" SUBSEP kk, img, t); k = "ptvis" SUBSEP kk
                line = sprintf("| `%s` | %d | %.0f | %s | %.1f | %s | %s |", p, t, img, fmt_rate(med("vpatch" SUBSEP kk)), med("vms" SUBSEP kk), v_mflop[p], pct(sh))
                if (pt_any) line = line (has(k) ? sprintf(" %.0f | %s | %s |", med(k), pt_share(sh, img, med(k)), ratio(img, med(k))) : " | | |")
                print line
            }
        if (has("mem" SUBSEP 4)) { print ""; printf "Resident peak of the section: %.1f %s.\n", med("mem" SUBSEP 4), mem_unit[4] }
    }
    goals()
}

# The table of section 1 on path X ("" the CPU\047s best, "x" the second path), with the OpenBLAS
# columns when with_ob.
function mm_table(X, with_ob,    hdr, sep, nlog, log1, log2, i, r, a1, a2, line, k1, k2, c1, c2, o1, o2, pk1, pk2) {
    print ""
    hdr = "| M x N x K | layout | 1T GFLOP/s | 1T share | 2T GFLOP/s | 2T share | 2T/1T |"
    sep = "|---|---|---|---|---|---|---|"
    if (with_ob) { hdr = hdr " OpenBLAS 1T (share) | OpenBLAS 2T (share) | acmoe/OpenBLAS 1T | acmoe/OpenBLAS 2T |"; sep = sep "---|---|---|---|" }
    print hdr; print sep
    pk1 = has("peak" X SUBSEP 1) ? med("peak" X SUBSEP 1) : 0; pk2 = has("peak" X SUBSEP 2) ? med("peak" X SUBSEP 2) : 0
    nlog = 0; log1 = log2 = 0
    for (i = 1; i <= nrows["mm" X]; i++) {
        r = rows["mm" X, i]; a1 = med("mm" X SUBSEP r SUBSEP 1); a2 = med("mm" X SUBSEP r SUBSEP 2)
        line = sprintf("| %s | %.1f | %s | %.1f | %s | %s |", r, a1, pct(peak_share("mm" X SUBSEP r SUBSEP 1, a1, 1, X)), a2,
                       pct(peak_share("mm" X SUBSEP r SUBSEP 2, a2, 2, X)), ratio(a2, a1))
        if (with_ob) {
            k1 = "ob" X SUBSEP r SUBSEP 1; k2 = "ob" X SUBSEP r SUBSEP 2
            c1 = has(k1) ? sprintf("%.1f (%s)", med(k1), pk1 > 0 ? pct(100 * med(k1) / pk1) : "") : ""
            c2 = has(k2) ? sprintf("%.1f (%s)", med(k2), pk2 > 0 ? pct(100 * med(k2) / pk2) : "") : ""
            o1 = ob_over(r, 1, a1, X); o2 = ob_over(r, 2, a2, X)
            line = line sprintf(" %s | %s | %s | %s |", c1, c2, o1 > 0 ? sprintf("%.2fx", o1) : "", o2 > 0 ? sprintf("%.2fx", o2) : "")
            if (o1 > 0 && o2 > 0) { nlog++; log1 += log(o1); log2 += log(o2) }
        }
        print line
    }
    if (nlog > 0) {
        print ""
        printf "acmoe over OpenBLAS, geometric mean over the %d products: %.2fx on 1 thread, %.2fx on 2 threads.\n", nlog, exp(log1 / nlog), exp(log2 / nlog)
    }
}

# The speed goals the library sets itself, each checked on the figures above: the worst case
# among the rows a goal covers, and whether it holds. A goal without its figures is left out.
function goal(text, worst, holds) {
    if (!goals_begun) {
        goals_begun = 1
        print ""; print "## Goals"; print ""
        print "Each goal against the figures above (medians where there were several runs): the worst"
        print "row it covers, and whether the goal holds on this host."
        print ""; print "| goal | worst case | holds |"; print "|---|---|---|"
    }
    printf "| %s | %s | %s |\n", text, worst, holds ? "yes" : "**no**"
}
function worse(value, where, lowest) { if (!(lowest in W) || value < W[lowest]) { W[lowest] = value; WHERE[lowest] = where } }
function goals(    i, r, t, c, k, a, sh, want, d, cfgs, shape, X, n, where, paths) {
    for (n = 0; n < 2; n++) {
        X = n ? "x" : ""; where = nrows["mmx"] > 0 ? ", " toupper(n ? alt_path : isa) : ""
        for (i = 1; i <= nrows["mm" X]; i++)
            for (t = 1; t <= 2; t++) {
                r = rows["mm" X, i]; a = med("mm" X SUBSEP r SUBSEP t)
                shape = r; sub(/ \| /, " ", shape)
                if (ob_over(r, t, a, X) > 0) worse(ob_over(r, t, a, X), shape " " t "T" where, "ob")
                if (r ~ /^(1024 x 1024 x 1024|2048 x 2048 x 2048) /) worse(peak_share("mm" X SUBSEP r SUBSEP t, a, t, X), shape " " t "T" where, "big")
            }
    }
    paths = nrows["mmx"] > 0 ? ", on the " toupper(isa) " and " toupper(alt_path) " paths" : ""
    if ("ob" in W) goal("matrix products at least OpenBLAS\047s rate, every shape and layout, 1 and 2 threads" paths, sprintf("%.2fx (%s)", W["ob"], WHERE["ob"]), W["ob"] >= 1.0)
    if ("big" in W) goal("matrix products at 85 % of the peak at 1024^3 and 2048^3, 1 and 2 threads" paths, sprintf("%s (%s)", pct(W["big"]), WHERE["big"]), W["big"] >= 85.0)
    for (i = 1; i <= nrows["cfg"]; i++)
        for (t = 1; t <= 2; t++) {
            c = rows["cfg", i]; r = c SUBSEP "SMoE"
            if (!has("moe" SUBSEP r SUBSEP t)) continue
            a = med("moe" SUBSEP r SUBSEP t); split(c, cfgs, " "); d = substr(cfgs[3], 2) + 0; want = d <= 128 ? 70 : 80
            worse(peak_share("moe" SUBSEP r SUBSEP t, a, t) - want, sprintf("%s %dT: %s", c, t, pct(peak_share("moe" SUBSEP r SUBSEP t, a, t))), "moe")
            k = "ptmoe" SUBSEP c SUBSEP t
            if (has(k) && med(k) > 0) worse(a / med(k), c " " t "T", "ptmoe")
            if (has("acs" SUBSEP c SUBSEP t)) worse(-med("acs" SUBSEP c SUBSEP t), c " " t "T", "ac")
        }
    if ("moe" in W) goal("MoE layer (SMoE) at 80 % of the peak, 70 % at d128, 1 and 2 threads", WHERE["moe"], W["moe"] >= 0)
    if ("ptmoe" in W) goal("MoE layer at least 1.5x PyTorch, every configuration, 1 and 2 threads", sprintf("%.2fx (%s)", W["ptmoe"], WHERE["ptmoe"]), W["ptmoe"] >= 1.5)
    if ("ac" in W) goal("AC router at most 3 % over the cosine router\047s step", sprintf("%+.1f %% (%s)", -W["ac"], WHERE["ac"]), W["ac"] >= -3.0)
    if (has("lm" SUBSEP 1)) {
        sh = peak_share("lm" SUBSEP 1, med("lm" SUBSEP 1), 1)
        goal("training step at 70 % of the peak on 1 thread", pct(sh), sh >= 70.0)
        for (t = 1; t <= 2; t++) if (has("ptlm" SUBSEP t) && med("ptlm" SUBSEP t) > 0) worse(med("lm" SUBSEP t) / med("ptlm" SUBSEP t), t "T", "ptlm")
        if ("ptlm" in W) goal("training step at least 3x PyTorch, 1 and 2 threads", sprintf("%.2fx (%s)", W["ptlm"], WHERE["ptlm"]), W["ptlm"] >= 3.0)
        if (has("lm" SUBSEP 2)) goal("training step on 2 threads at least 1.85x one", ratio(med("lm" SUBSEP 2), med("lm" SUBSEP 1)), med("lm" SUBSEP 2) >= 1.85 * med("lm" SUBSEP 1))
    }
}' "$@" > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "perf_doc: wrote $OUT" >&2
