#!/usr/bin/env bash
# The study behind docs/results.md: which of the paper's claims (faster convergence,
# robustness to corrupted input, better quality, tighter clusters) hold at CPU scale, measured
# with the authors' protocols. `make study` runs the quick mode, `make study FULL=1` the full
# one, `make test-study` the tiny one that checks the pipeline.
#
#   tools/study.sh MODE DIR OUTDIR     MODE quick, full or tiny; runs in DIR, report in OUTDIR
#
# Every run is one command (train_lm or train_vit) with its own log, DIR/ID.jsonl. A finished
# run leaves DIR/ID.done and is never repeated; an interrupted one resumes from its last
# checkpoint (DIR/ckpt/ID.safetensors, saved at each evaluation). Stop it at any moment and
# run the same command again. The report (build/study_report) reads DIR and writes
# OUTDIR/results.md and OUTDIR/study/*.svg, whatever has finished so far.
set -u

mode=${1:-quick}
dir=${2:-build/study-$mode}
outdir=${3:-docs}
case $mode in quick | full | tiny) ;; *)
    echo "usage: tools/study.sh quick|full|tiny [DIR] [OUTDIR]" >&2
    exit 2
    ;;
esac
B=${B:-build}
threads=${THREADS:-0}
text=${STUDY_TEXT:-data/linux-doc.txt} # the largest English text Debian has; fortunes without it
[ -f "$text" ] || text=data/fortunes.txt
images=${STUDY_IMAGES:-data/fashion-mnist}
vision=1
if [ "$mode" != tiny ] && [ ! -d "$images" ]; then
    echo "study: no $images (make data/fashion-mnist fetches it): the vision experiments are left out" >&2
    vision=0
fi
mkdir -p "$dir/ckpt" "$outdir" || exit 1

# ---- the runs ----
# Columns of DIR/study.tsv: id, experiment, router, the router it is compared with (- for a
# baseline), seed, command. work[] holds each run's size (tokens or images it trains on) for
# the ETA.
ids=() experiments=() commands=() work=()
manifest="$dir/study.tsv.tmp"
printf 'id\texperiment\trouter\tbaseline\tseed\tcommand\n' > "$manifest"

add_run() { # experiment router baseline seed work command...
    local experiment=$1 router=$2 baseline=$3 seed=$4 size=$5
    shift 5
    local id
    id="$experiment-$(printf '%s' "$router" | tr 'A-Z ' 'a-z-')-s$seed"
    local command="$*"
    command=${command%"${command##*[! ]}"} # without the trailing blanks of empty flags
    ids+=("$id") experiments+=("$experiment") commands+=("$command") work+=("$size")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$experiment" "$router" "$baseline" "$seed" "$command" >> "$manifest"
}

# Language models. The reference's small Switch-style layout (acmoe-s.sh: sgsgsc, d 128, 8
# heads, 16 experts of 128, top-2, post-LN, dropout 0.7, Adam at 7e-4 after 3,000 warmup
# steps, then constant, no clipping, no weight decay, 3,072 tokens per routing call), and the
# GLaM-style one (glam/small/acmoe-s.sh: sgsfscsfscsf, MoE and dense layers alternating, AC
# in the later MoE layers, d 144, dropout 0.1; its 12,288 tokens per call cut to the same
# 3,072 at CPU scale), with SMoE and both AC modes. Held-out bits per character, with 10 % of
# the input bytes damaged and with the reference's word swap (2.5 % of each line's
# non-stopwords made AAA).
lm_runs() { # layout seed steps warmup eval_every eval_batches model flags...
    local layout=$1 seed=$2 steps=$3 warmup=$4 every=$5 batches=$6
    shift 6
    local model="$*" router baseline pattern extra tokens_per_step
    tokens_per_step=$(($(flag_value --batch "$model") * $(flag_value --seq "$model")))
    while IFS=, read -r router baseline pattern extra; do
        [ -n "$router" ] || continue
        add_run "lm-$layout" "$router" "$baseline" "$seed" $((steps * tokens_per_step)) \
            "$B/train_lm --data $text --pattern '$pattern' $model --steps $steps --warmup $warmup" \
            "--eval-every $every --eval-batches $batches --eval-corrupt 0.1 --eval-wordswap 0.025" \
            "--seed $seed --threads $threads --sample 0 --log-every 100 $extra"
    done < <(lm_routers "$layout")
}

# router,baseline,pattern,extra flags: per layout, the baseline first.
lm_routers() {
    if [ "$1" = glam ]; then # the paper's GLaM comparison: AC in the later MoE layers against SMoE
        printf '%s\n' "SMoE,-,gfgfgf," "AC,SMoE,gfcfcf," "AC robust,SMoE,gfcfcf,--ac-robust 1"
        return
    fi
    printf '%s\n' "SMoE,-,ggg," "AC,SMoE,ggc," "AC robust,SMoE,ggc,--ac-robust 1" "XMoE,SMoE,xxx," \
        "StableMoE,SMoE,bbb," "USMoE,SMoE,uuu," "AC USMoE,USMoE,uuv,"
}

flag_value() { # --flag "flags..." : the value after --flag
    local want=$1 previous=
    for word in $2; do
        [ "$previous" = "$want" ] && echo "$word" && return
        previous=$word
    done
}

# Vision: Fashion-MNIST (28 x 28, the package's own 60,000 / 10,000 split), a ViT-style
# encoder (4 x 4 patches) and a Swin-style backbone (2 x 2 patches, windows of 7, a dense
# stage then an MoE stage whose MoE and dense blocks alternate as in the reference's
# Swin-MoE), each with SMoE against AC and Soft MoE against AC Soft MoE. AdamW with the
# reference's decay 0.1 and clipping at 3, cosine schedule. After training: accuracy clean,
# under Gaussian noise and a blanked square, and under FGSM and PGD.
vision_runs() { # backbone seed steps every noise eps attacked model flags...
    local backbone=$1 seed=$2 steps=$3 every=$4 noise=$5 eps=$6 attacked=$7
    shift 7
    [ "$vision" = 1 ] || return 0
    local model="$*" router baseline pattern tokens=49
    [ "$backbone" = swin ] && tokens=196 # the first stage's patches
    while IFS=, read -r router baseline pattern; do
        [ -n "$router" ] || continue
        add_run "$backbone" "$router" "$baseline" "$seed" $((steps * $(flag_value --batch "$model") * tokens)) \
            "$B/train_vit --data $images --pattern '$pattern' $model --steps $steps --log-every $every" \
            "--noise $noise --attack-eps $eps --attack-images $attacked --seed $seed --threads $threads"
    done < <(vision_routers "$backbone")
}

vision_routers() {
    if [ "$1" = swin ]; then
        printf '%s\n' "Swin-MoE,-,ff|tftf" "AC Swin-MoE,Swin-MoE,ff|tfwf" "Soft MoE,-,ff|nfnf" "AC Soft MoE,Soft MoE,ff|nfaf"
    else
        printf '%s\n' "SMoE,-,ggg" "AC,SMoE,ggc" "Soft MoE,-,gnn" "AC Soft MoE,Soft MoE,gna"
    fi
}

vision_optim="--lr 1e-3 --weight-decay 0.1 --clip 3 --schedule cosine --batch 64"
vit_model="--d-model 64 --heads 4 --d-ff 128 --experts 8 --top-k 2 --patch 4 $vision_optim"
swin_model="--d-model 16 --heads 2 --d-ff 32 --experts 8 --top-k 2 --patch 2 --window 7 --pre-ln 1 $vision_optim"
tiny_vision="--d-model 16 --heads 2 --d-ff 16 --experts 4 --top-k 2 --batch 8"

switch_model="--d-model 128 --heads 8 --d-ff 128 --experts 16 --top-k 2 --pre-ln 0 --dropout 0.7 --lr 7e-4 --clip 0 --batch 12 --seq 256"
glam_model="--d-model 144 --heads 8 --d-ff 144 --experts 16 --top-k 2 --pre-ln 0 --dropout 0.1 --lr 7e-4 --clip 0 --batch 12 --seq 256"
tiny_model="--d-model 16 --heads 2 --d-ff 16 --experts 4 --top-k 2 --dropout 0.1 --lr 3e-3 --clip 0 --batch 2 --seq 32"

# Seed by seed, so that a study stopped early has whole pairings of every experiment.
case $mode in
full)
    for seed in 1 2 3; do
        lm_runs switch $seed 5000 3000 500 16 "$switch_model"
        lm_runs glam $seed 3000 1500 500 16 "$glam_model"
        vision_runs vit $seed 3000 500 0.05,0.1,0.2,0.4 1,2,4,8 1000 "$vit_model --warmup 300"
        vision_runs swin $seed 1500 500 0.05,0.1,0.2,0.4 1,2,4,8 500 "$swin_model --warmup 150"
    done
    ;;
quick)
    lm_runs switch 1 600 300 100 8 "$switch_model"
    lm_runs glam 1 300 150 100 8 "$glam_model"
    vision_runs vit 1 600 200 0.1,0.3 2,8 256 "$vit_model --warmup 60"
    vision_runs swin 1 300 150 0.1,0.3 2,8 256 "$swin_model --warmup 30"
    ;;
tiny)
    text=builtin images=builtin
    for seed in 1 2; do
        lm_runs switch $seed 6 2 3 1 "$tiny_model"
        vision_runs vit $seed 4 2 0.2 4 16 "$tiny_vision"
    done
    ;;
esac

mv "$manifest" "$dir/study.tsv"

# ---- the machine ----
# One block per invocation: a study resumed on another day, host or commit says so.
{
    echo "mode: $mode"
    echo "started: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- acmoe.h examples tools 2>/dev/null || echo ' (with local changes)')"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //') ($(nproc) online; $(if grep -qw avx512f /proc/cpuinfo; then echo avx512f; elif grep -qw avx2 /proc/cpuinfo; then echo avx2; else echo 'no AVX2'; fi))"
    echo "threads: $([ "$threads" = 0 ] && nproc || echo "$threads")"
    echo "text: $text$([ -f "$text" ] && echo " ($(wc -c < "$text") bytes)")"
    echo "images: $images"
} >> "$dir/meta.txt"

# ---- running them ----
total_work=0 done_work=0 runs_done=0
for i in "${!ids[@]}"; do
    total_work=$((total_work + work[i]))
    if [ -f "$dir/${ids[i]}.done" ]; then done_work=$((done_work + work[i])) runs_done=$((runs_done + 1)); fi
done

duration() { printf '%dh%02dm' $(($1 / 3600)) $(($1 % 3600 / 60)); }

# The time the runs left will take: each experiment's at the rate (seconds per unit of
# work) its runs finished here have shown, or at the rate of all finished here.
declare -A seconds_of work_of
eta() {
    local j rate_seconds rate_work left=0 all_seconds=0 all_work=0 experiment
    for experiment in "${!work_of[@]}"; do
        all_seconds=$((all_seconds + seconds_of[$experiment])) all_work=$((all_work + work_of[$experiment]))
    done
    [ "$all_work" -gt 0 ] || { echo "unknown until a run finishes"; return; }
    for j in "${!ids[@]}"; do
        [ -f "$dir/${ids[j]}.done" ] && continue
        experiment=${experiments[j]}
        rate_seconds=${seconds_of[$experiment]:-$all_seconds} rate_work=${work_of[$experiment]:-$all_work}
        left=$((left + work[j] * rate_seconds / rate_work))
    done
    duration "$left"
}

for i in "${!ids[@]}"; do
    id=${ids[i]}
    [ -f "$dir/$id.done" ] && continue
    run_started=$(date +%s)
    echo "== study $mode: run $((runs_done + 1)) of ${#ids[@]}, $id ($((100 * done_work / total_work))% of the work done; ETA $(eta))"
    checkpoint="$dir/ckpt/$id.safetensors"
    command="${commands[i]} --save $checkpoint --log $dir/$id.jsonl"
    [ -f "$checkpoint" ] && command="$command --resume $checkpoint" && echo "   resuming from $checkpoint"
    echo "   $command"
    eval "$command" >> "$dir/$id.out" 2>&1
    status=$?
    if [ $status -ge 128 ]; then
        echo "study: stopped during $id; the same command resumes it from its last checkpoint" >&2
        exit $status
    elif [ $status -ne 0 ]; then
        echo "study: $id failed with status $status; its output is in $dir/$id.out (the last lines below)" >&2
        tail -n 5 "$dir/$id.out" >&2
        exit 1
    fi
    touch "$dir/$id.done"
    rm -f "$checkpoint"
    done_work=$((done_work + work[i])) runs_done=$((runs_done + 1))
    experiment=${experiments[i]}
    seconds_of[$experiment]=$((${seconds_of[$experiment]:-0} + $(date +%s) - run_started))
    work_of[$experiment]=$((${work_of[$experiment]:-0} + work[i]))
done

echo "== study $mode: ${#ids[@]} runs finished in $dir; writing $outdir/results.md"
"$B/study_report" "$dir" "$outdir" || exit 1
