#!/usr/bin/env bash
# ArcMini v4's first two levers on one lease of the offline GPU machine (issue #37), the more telling first in case
# the lease ends early. First the per-task TTT lever on the shipped v3 (models/ArcMini, task tokens on), ARC-AGI-2
# evaluation held out (v3: 1/120 without TTT, 4.5/120 after full TTT): --ttt per_task with each of PER_TASK
# ('token', 'lora'), the defaults of per_task_ttt.py (unmeasured), training capped at 3 minutes and each run at 330 s
# (--time-budget-s): how many of the 120 tasks adapt in that time (run_config.json's 'adapted', the log's per-step
# times) and the score. Then the data lever: the v3 recipe pretrained for the same short budget (STEPS optimizer
# steps of packed rows) with LEVELS re-arc samples per ARC-AGI-1 training task in the pool (0: v3's pool; the two
# ends first, then the middle), one after the other, each evaluated by the main job (no flags: greedy on 8 views,
# 8 scoring views) on ARC-AGI-1 evaluation (its demonstrations in training) and ARC-AGI-2 evaluation (held out: the
# pool shares no pair with it). Task tokens are off in these runs (re-arc samples have none of their own yet).
#
# What travels (64 MiB a call, the tree included): call 1 carries .lease (whl/: wheels of what the machine lacks;
# re_arc_250.tgz; input_arc.tgz) with the shipped ArcMini weights moved out of the tree (docs/GPU.md, "Lease
# notes"); call 2 carries nothing, the weights back in the tree (the per-task runs start from them):
#   call 1:                                        bash docs/gpu_run_ArcMini_v4.sh stash .lease
#   call 2, at once:                               bash docs/gpu_run_ArcMini_v4.sh start
#   then, each within the machine's warm window:   bash docs/gpu_run_ArcMini_v4.sh poll 540
# Knobs: STEPS (1500), LEVELS ("0 24 12": 24 draws of 6 + 1 are the most the 172 examples of re-arc's smallest
# task hold), TRAIN_ARGS (more run_finetuning_ArcMini.py flags), PER_TASK ("token lora";
# empty: none), PER_TASK_ARGS (more run_evaluation_ArcMini.py flags for them), SHAPES (empty: none): the width and
# depth sweep within the 64 MB cap, entries hidden:layers:heads:intermediate:steps, each trained with SHAPE_REARC
# re-arc samples per task (16) and evaluated on ARC-AGI-1 (demonstrations in training). Steps at equal compute
# (6 x parameters x tokens; v3: 15.1M parameters, 30 MB in bf16, at 2000 steps, about 2.7 minutes on one H200; the
# others 26.8M to 30.2M, 54 to 61 MB with 1000 task tokens, counted with grid_positions.create_grid_model):
#   LEVELS= PER_TASK= SHAPES="384:6:6:1536:2000 384:12:6:1536:1000 448:8:7:1792:1100 512:6:8:2048:1120" \
#       bash docs/gpu_run_ArcMini_v4.sh start        (about 11 minutes of training and 7 of evaluation)
# Planned time on one H200: the per-task runs at most 5.5 minutes each; v3's 7000 steps took 9.3 minutes, so 1500
# steps about 2 minutes (+ compilation) per level, and an evaluation about 1.7 (ARC-AGI-1) + 1.3 (ARC-AGI-2)
# minutes: 26 minutes for all, the third level the first to go where the lease is shorter.
set -uo pipefail
W=/tmp/lease_v4
R=$W/runs
LOG=$W/log
STEPS=${STEPS:-1500}
LEVELS=${LEVELS:-0 24 12}
TRAIN_ARGS=${TRAIN_ARGS:---num-workers 12}
PER_TASK=${PER_TASK-token lora}
PER_TASK_ARGS=${PER_TASK_ARGS:---ttt-max-minutes 3 --time-budget-s 330}
SHAPES=${SHAPES:-}
SHAPE_REARC=${SHAPE_REARC:-16}

stash() { mkdir -p "$W" && cp -r "$1"/. "$W"/ && ls -la "$W"; }

pipeline() {
    set -x
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$W"/whl/*.whl
    export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    mkdir -p input "$R" && tar xzf "$W"/re_arc_250.tgz -C input && tar xzf "$W"/input_arc.tgz -C input
    nvidia-smi --query-gpu=name,memory.total --format=csv
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
    echo PIPELINE DONE
}

collect() {  # the evaluations' results files (7 of the 8 files a call brings back: the per-task runs' in one, by
    # mode); run configs and logs in one file
    local out=${OUT:-/tmp/out}
    mkdir -p "$out"
    for n in $LEVELS; do
        for part in arc1 arc2; do cp "$R"/rearc$n/$part/results.json "$out"/rearc${n}_$part.results.json 2>/dev/null; done
    done
    python3 -c 'import json, os, sys; r = sys.argv[1]; print(json.dumps({m: json.load(open(f"{r}/pertask_{m}/results.json"))
        for m in sys.argv[2:] if os.path.exists(f"{r}/pertask_{m}/results.json")}))' "$R" $PER_TASK > "$out"/pertask.results.json
    python3 -c 'import json, os, sys; r = sys.argv[1]; print(json.dumps({s: json.load(open(f"{r}/shape_{s}/arc1/results.json"))
        for s in sys.argv[2:] if os.path.exists(f"{r}/shape_{s}/arc1/results.json")}))' "$R" $SHAPES > "$out"/shapes.results.json
    { for n in $LEVELS; do echo "== rearc$n run_config.json"; cat "$R"/rearc$n/ArcMini/run_config.json; done
      for mode in $PER_TASK; do echo "== pertask_$mode run_config.json"; cat "$R"/pertask_$mode/per_task_ttt_*/tasks/run_config.json; done
      for shape in $SHAPES; do echo "== shape_$shape run_config.json"; cat "$R"/shape_$shape/ArcMini/run_config.json; done
      echo "== pipeline"; tail -c 20000 "$LOG"
      for f in "$R"/*.log; do echo "== $f"; tail -c 8000 "$f"; done; } > "$out"/logs.txt 2>/dev/null
}

case "${1:-}" in
    stash) stash "$2" ;;
    start) mkdir -p "$W"; setsid nohup bash "$0" pipeline > "$LOG" 2>&1 < /dev/null & sleep 5; tail -n 5 "$LOG" ;;
    pipeline) pipeline || echo "PIPELINE DONE (failed: status $?)" ;;
    poll)
        for _ in $(seq "${2:-60}"); do grep -q "PIPELINE DONE" "$LOG" 2>/dev/null && break; sleep 1; done
        collect; tail -n 5 "$LOG"; for f in "$R"/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 2 "$f"; }; done ;;
    *) echo "usage: $0 stash DIR | start | poll SECONDS" >&2; exit 2 ;;
esac
