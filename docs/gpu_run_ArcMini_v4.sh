#!/usr/bin/env bash
# ArcMini v4 on one lease of the offline GPU machine (issue #37). The defaults are the next lease's plan, LONG held
# out: a v4 candidate pretrained from scratch for as long as a lease allows without any pair of ARC-AGI-1 evaluation
# (--no-eval-demos): the v3 recipe (task tokens, packed rows) with re-arc, one draw of each re-arc task per epoch out
# of 24 (--rearc-per-epoch 1: re-arc is about half the tokens, every epoch other draws), 10000 steps (v3: 7000;
# 14.6 minutes on one H100 with its preparation, measured); then on each evaluation set (ARC-AGI-1, ARC-AGI-2) the
# whole model test-time trained on its demonstrations for 1500 steps (--ttt full, as v3's held-out 26.6%) and the
# main job's search. With a refused start before it, LONG=8000:24:1 fits what is left. The model comes back
# (3 shards of at most 15 MB and one tar of the small files).
# The lease of 2026-12-07 16:46 (one H100) ran the same candidate with the evaluation demonstrations in the pool
# (LONG=10000:24:1 LONG_ARGS="--task-tokens --num-workers 12 --max-shard-mb 15 --max-minutes 14.5", no TTT):
# 30.5% on ARC-AGI-1 against v3's 32.25% (docs/RESULTS.md, "A v4 candidate at a full budget").
# The lease of 2026-12-07 15:00 (one H100) ran the knobs PER_TASK="token lora" and LEVELS="0 24" at STEPS=1500
# (docs/RESULTS.md, "ArcMini v4: the levers"): per-task TTT on the shipped v3, ARC-AGI-2 evaluation held out
# (--ttt per_task, per_task_ttt.py's defaults, training capped at 3 minutes, each run at 330 s), then the v3
# recipe without task tokens for 1500 steps with LEVELS re-arc samples per ARC-AGI-1 training task, each evaluated
# by the main job on both evaluation sets.
#
# What travels (64 MiB a call, the tree included): call 1 carries .lease (whl/: wheels of what the machine lacks;
# re_arc_250.tgz; input_arc.tgz) with the shipped ArcMini weights moved out of the tree (docs/GPU.md, "Lease
# notes"); call 2 carries nothing, the weights back in the tree (the per-task runs start from them):
#   once, here, on a fresh checkout:               BUILD_WHEELS=<script> REARC_TGZ=<file> bash docs/gpu_run_ArcMini_v4.sh prepare
#     (the carry folders: .lease as below, and .lease_p, the same without re-arc, for one-call leases)
#   call 1:                                        bash docs/gpu_run_ArcMini_v4.sh stash .lease
#   call 2, at once:                               bash docs/gpu_run_ArcMini_v4.sh start
#   then, each within the machine's warm window:   bash docs/gpu_run_ArcMini_v4.sh poll 540
# Knobs: LONG ("steps:re-arc samples:re-arc samples per epoch"; empty: none), LONG_ARC2 (empty: ARC-AGI-1 only), LONG_ARGS (more
# run_finetuning_ArcMini.py flags for it), LONG_EVAL_ARGS (more run_evaluation_ArcMini.py flags for its two
# evaluations; LONG_EVAL_ARGS="" with LONG_ARGS without --no-eval-demos is the main job's protocol), STEPS (1500), LEVELS (empty; "0 24 12" ran, "12" did not fit: 24
# draws of 6 + 1 are the most the 172 examples of re-arc's smallest task hold), TRAIN_ARGS (more run_finetuning_ArcMini.py flags), PER_TASK (empty; "token lora"
# ran; "full" is each task's own copy of the linear layers), PER_TASK_ARGS (more run_evaluation_ArcMini.py flags for them), SHAPES (empty: none): the width and
# depth sweep within the 64 MB cap, entries hidden:layers:heads:intermediate:steps, each trained with SHAPE_REARC
# re-arc samples per task (16) and evaluated on ARC-AGI-1 (demonstrations in training). Steps at equal compute
# (6 x parameters x tokens; v3: 15.1M parameters, 30 MB in bf16, at 2000 steps, about 2.7 minutes on one H200; the
# others 26.8M to 30.2M, 54 to 61 MB with 1000 task tokens, counted with grid_positions.create_grid_model):
#   LONG= SHAPES="384:6:6:1536:2000 384:12:6:1536:1000 448:8:7:1792:1100 512:6:8:2048:1120" \
#       bash docs/gpu_run_ArcMini_v4.sh start        (about 11 minutes of training and 7 of evaluation)
# Planned time of LONG on one H100: 14.6 minutes of training (measured, preparation and compilation included),
# about 4 of ARC-AGI-1 (1.8 of TTT, as v3's held-out run on an H200) and 3.5 of ARC-AGI-2: about 23 minutes; then
# MAIN_JOBS (empty): the shipped model's main job once per set of flags, timed, its results files back (the lease of
# 2026-12-07 23:31, one H100, one call carrying .lease_p with the weights in the tree, docs/GPU.md:
#   bash docs/gpu_run_ArcMini_v4.sh stash .lease_p && LONG= PROFILE= MAIN_JOBS="base:;graphs:--decode-graphs;..." \
#       bash docs/gpu_run_ArcMini_v4.sh start      -> docs/SPEED.md, "In the search, on one H100");
# a lease too short for LONG (about 15 device-minutes) measures the unmeasured `--ttt full+per_task` on ARC-AGI-2,
# held out, beside v3's 4.5 / 120 with `--ttt full` alone (3000 steps, 32 views; 6.6 minutes on one H200):
#   MAIN_JOBS="a2both:--challenges input/arc-prize-2025/arc-agi_evaluation_challenges.json --ttt full+per_task
#     --full-ttt-steps 3000 --full-ttt-args=--num-workers=8 --n-views 32" (one line; about 13 minutes on one H100);
# PROFILE (default 1; empty: none), at most 5 minutes: run_benchmark_inference.py of the shipped model's greedy search
# and DFS on 40 tasks, each also with --decode-graphs (decode steps replayed as CUDA graphs: the same candidates,
# checked), then --time-parts of each (every labelled part timed with the GPU synchronized; not --profile, whose
# reading stalled on the H100) and a decode step of 32, 128 and 320 rows on the growing cache, on fixed shapes and as
# a CUDA graph, the 8th file back.
set -uo pipefail
W=/tmp/lease_v4
R=$W/runs
LOG=$W/log
STEPS=${STEPS:-1500}
LONG=${LONG-10000:24:1}
LONG_ARGS=${LONG_ARGS:---no-eval-demos --task-tokens --num-workers 12 --max-shard-mb 15 --max-minutes 14.5}
LONG_EVAL_ARGS=${LONG_EVAL_ARGS---ttt full --full-ttt-steps 1500}
LONG_ARC2=${LONG_ARC2-1}   # empty: LONG is evaluated on ARC-AGI-1 only (a short lease)
LEVELS=${LEVELS-}
TRAIN_ARGS=${TRAIN_ARGS:---num-workers 12}
PER_TASK=${PER_TASK-}
PER_TASK_ARGS=${PER_TASK_ARGS:---ttt-max-minutes 3 --time-budget-s 330}
SHAPES=${SHAPES:-}
SHAPE_REARC=${SHAPE_REARC:-16}
PROFILE=${PROFILE-1}   # 1: last, the search profile of the shipped model (docs/SPEED.md, "Where a decode step goes")
MAIN_JOBS=${MAIN_JOBS-}  # "name:flags;name:flags;...": after the runs above, the main job (shipped model, all 400
                         # tasks) with each set of flags, timed from the start of its process to its end, alone on the card

prepare() {  # here, not on the lease: .lease (wheels, re-arc, the ARC data) and .lease_p (no re-arc), git-ignored
    set -e
    : "${BUILD_WHEELS:?a script that writes into the folder it is given the wheels the GPU machine lacks (docs/GPU.md)}"
    : "${REARC_TGZ:?a tarball of re-arc as input/ holds it, re_arc/metadata.json and re_arc/tasks/ (docs/RECIPES.md, Data)}"
    bash "$BUILD_WHEELS" .lease/whl
    cp "$REARC_TGZ" .lease/re_arc_250.tgz
    [ -d input/arc-prize-2025 ] || python3 training_code/arc_downloader.py
    tar czf .lease/input_arc.tgz -C input arc-prize-2024 arc-prize-2025
    mkdir -p .lease_p && cp -r .lease/whl .lease/input_arc.tgz .lease_p/
    du -sh .lease .lease_p
}

stash() { mkdir -p "$W" && cp -r "$1"/. "$W"/ && ls -la "$W"; }

pipeline() {
    set -x
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$W"/whl/*.whl
    export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    mkdir -p input "$R" && tar xzf "$W"/input_arc.tgz -C input || return 1
    [ -f "$W"/re_arc_250.tgz ] && { tar xzf "$W"/re_arc_250.tgz -C input || return 1; }
    nvidia-smi --query-gpu=name,memory.total --format=csv
    if [ -n "$LONG" ]; then
        IFS=: read -r steps samples per_epoch <<< "$LONG"
        local model="$R"/long/ArcMini
        python3 training_code/run_finetuning_ArcMini.py --max-steps "$steps" --rearc-samples "$samples" \
            --rearc-per-epoch "$per_epoch" $LONG_ARGS --save-model-path "$model" > "$R"/train_long.log 2>&1 &&
        python3 training_code/run_evaluation_ArcMini.py --model "$model" --no-report $LONG_EVAL_ARGS \
            --output-dir "$R"/long/arc1 > "$R"/eval_long.log 2>&1
        [ -n "$LONG_ARC2" ] && python3 training_code/run_evaluation_ArcMini.py --model "$model" --no-report \
            $LONG_EVAL_ARGS --challenges input/arc-prize-2025/arc-agi_evaluation_challenges.json \
            --output-dir "$R"/long/arc2 >> "$R"/eval_long.log 2>&1
    fi
    for mode in $PER_TASK; do
        python3 training_code/run_evaluation_ArcMini.py --model models/ArcMini --no-report \
            --challenges input/arc-prize-2025/arc-agi_evaluation_challenges.json --ttt per_task \
            --per-task-ttt-train "$mode" $PER_TASK_ARGS --output-dir "$R"/pertask_$mode > "$R"/eval_pertask_$mode.log 2>&1
    done
    for n in $LEVELS; do
        local model="$R"/rearc$n/ArcMini
        python3 training_code/run_finetuning_ArcMini.py --max-steps "$STEPS" --rearc-samples "$n" $TRAIN_ARGS \
            --save-model-path "$model" > "$R"/train_rearc$n.log 2>&1 || continue
        python3 training_code/run_evaluation_ArcMini.py --model "$model" --no-report \
            --output-dir "$R"/rearc$n/arc1 > "$R"/eval_rearc$n.log 2>&1
        python3 training_code/run_evaluation_ArcMini.py --model "$model" --no-report \
            --challenges input/arc-prize-2025/arc-agi_evaluation_challenges.json \
            --output-dir "$R"/rearc$n/arc2 >> "$R"/eval_rearc$n.log 2>&1
    done
    for shape in $SHAPES; do
        IFS=: read -r hidden layers heads inter steps <<< "$shape"
        local model="$R"/shape_$shape/ArcMini
        python3 training_code/run_finetuning_ArcMini.py --max-steps "$steps" --rearc-samples "$SHAPE_REARC" \
            --hidden-size "$hidden" --num-layers "$layers" --num-heads "$heads" --intermediate-size "$inter" \
            $TRAIN_ARGS --save-model-path "$model" > "$R"/train_shape_$shape.log 2>&1 || continue
        python3 training_code/run_evaluation_ArcMini.py --model "$model" --no-report \
            --output-dir "$R"/shape_$shape/arc1 > "$R"/eval_shape_$shape.log 2>&1
    done
    local main_jobs job name flags start rc
    IFS=';' read -ra main_jobs <<< "$MAIN_JOBS"
    mkdir -p "$R"/main
    for job in "${main_jobs[@]}"; do
        name=${job%%:*}; flags=${job#*:}; start=$EPOCHREALTIME
        python3 training_code/run_evaluation_ArcMini.py --no-report $flags --output-dir "$R"/main/$name \
            > "$R"/main_$name.log 2>&1
        rc=$?
        echo "$name ($flags): status $rc, $(python3 -c "print(round($EPOCHREALTIME - $start, 1))") s wall" \
            >> "$R"/main/wall.txt
    done
    if [ -n "$PROFILE" ]; then  # alone on the card, after every run: where a decode step of the main job's search goes
        timeout 300 python3 training_code/run_benchmark_inference.py --n-tasks 40 --n-views 8 \
            --samplers greedy greedy_graphs dfs_batched dfs_batched_graphs --no-scoring --time-parts --decode-steps 64 --decode-rows 32 128 320 --output "$R"/benchmark_inference_profile.json > "$R"/profile.log 2>&1
    fi
    echo PIPELINE DONE
}

collect() {  # the evaluations' results files (7 of the 8 files a call brings back: the per-task runs' in one, by
    # mode); run configs and logs in one file
    local out=${OUT:-/tmp/out}
    mkdir -p "$out"
    for n in $LEVELS; do
        for part in arc1 arc2; do cp "$R"/rearc$n/$part/results.json "$out"/rearc${n}_$part.results.json 2>/dev/null; done
    done
    [ -n "$PER_TASK" ] && python3 -c 'import json, os, sys; r = sys.argv[1]; print(json.dumps({m: json.load(open(f"{r}/pertask_{m}/results.json"))
        for m in sys.argv[2:] if os.path.exists(f"{r}/pertask_{m}/results.json")}))' "$R" $PER_TASK > "$out"/pertask.results.json
    [ -n "$SHAPES" ] && python3 -c 'import json, os, sys; r = sys.argv[1]; print(json.dumps({s: json.load(open(f"{r}/shape_{s}/arc1/results.json"))
        for s in sys.argv[2:] if os.path.exists(f"{r}/shape_{s}/arc1/results.json")}))' "$R" $SHAPES > "$out"/shapes.results.json
    cp "$R"/benchmark_inference_profile.json "$out"/ 2>/dev/null
    for d in "$R"/main/*/; do [ -f "$d"results.json ] && cp "$d"results.json "$out"/main_$(basename "$d").results.json; done
    if [ -n "$LONG" ]; then  # the model (its shards, the small files in one tar) and both evaluations
        for part in arc1 arc2; do cp "$R"/long/$part/results.json "$out"/long_$part.results.json 2>/dev/null; done
        if [ -f "$R"/long/ArcMini/run_config.json ]; then
            cp "$R"/long/ArcMini/*.safetensors "$out"/
            tar cf "$out"/long_model_small_files.tar --exclude '*.safetensors' -C "$R"/long ArcMini
        fi
    fi
    { [ -n "$LONG" ] && { echo "== long run_config.json"; cat "$R"/long/ArcMini/run_config.json; }
      for n in $LEVELS; do echo "== rearc$n run_config.json"; cat "$R"/rearc$n/ArcMini/run_config.json; done
      for mode in $PER_TASK; do echo "== pertask_$mode run_config.json"; cat "$R"/pertask_$mode/per_task_ttt_*/tasks/run_config.json; done
      for shape in $SHAPES; do echo "== shape_$shape run_config.json"; cat "$R"/shape_$shape/ArcMini/run_config.json; done
      [ -f "$R"/main/wall.txt ] && { echo "== main jobs, from the start of each process to its end"; cat "$R"/main/wall.txt
          for a in "$R"/main/*/submission.json; do for b in "$R"/main/*/submission.json; do [[ "$a" < "$b" ]] &&
              cmp -s "$a" "$b" && echo "the same submission.json: $a $b"; done; done; }
      echo "== pipeline"; tail -c 20000 "$LOG"
      for f in "$R"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v 'it/s]$' | tail -c 8000; done; } > "$out"/logs.txt 2>/dev/null
}

case "${1:-}" in
    prepare) prepare ;;
    stash) stash "$2" ;;
    start) mkdir -p "$W"; setsid nohup bash "$0" pipeline > "$LOG" 2>&1 < /dev/null & sleep 5; tail -n 5 "$LOG" ;;
    pipeline) pipeline || echo "PIPELINE DONE (failed: status $?)" ;;
    poll)
        for _ in $(seq "${2:-60}"); do grep -q "PIPELINE DONE" "$LOG" 2>/dev/null && break; sleep 1; done
        collect; tail -n 5 "$LOG"  # each log's last lines, without progress-bar redraws
        for f in "$R"/*.log; do [ -f "$f" ] && { echo "== $f"; tr '\r' '\n' < "$f" | grep -v 'it/s]$' | tail -n 2; }; done ;;
    *) echo "usage: $0 prepare | stash DIR | start | poll SECONDS" >&2; exit 2 ;;
esac
