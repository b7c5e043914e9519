"""Evaluate the shipped default model, ArcMini (models/ArcMini), on the ARC-AGI-1 public evaluation set with its
best measured setting (ladder stage 4, results/ladder_ArcMini_4_x_NVIDIA_H100_80GB_HBM3.json): one shared LoRA
test-time trained on the demonstration pairs, greedy candidates from 8 augmented views, each scored under 8 other
views (product of experts, mul_aug_prob). `--ttt none --sampler dfs --n-views 16 --n-score-views 16` is the paper's
search (stage 5: lower for this model, whose right answers are often below the 9% threshold), and the default
on a CPU, where it does better on the first 10 tasks than greedy on 8 views.

    python training_code/run_evaluation_ArcMini.py                 # GPU: all 400 tasks; CPU: the first 10
    python training_code/run_evaluation_ArcMini.py --n-tasks 400   # every task, also on CPU (slow)
    python training_code/run_evaluation_ArcMini.py --smoke         # seconds, CPU, tiny local model

Works offline on a fresh clone (the model ships in the repo). With several GPUs the tasks are split over
them. Writes submission.json, results.json and report/ under --output-dir.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluation  # noqa: E402
import smoke  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# backend: plain transformers + peft; unsloth's patches are made for large pretrained LLMs and add nothing here.
RECIPE = dict(model=os.path.join(REPO, 'models', 'ArcMini'), output_dir='output_evaluation_ArcMini', load_in_4bit=False,
              backend='transformers',
              preprompt='', ttt='shared', ttt_copies=8, ttt_r=32, ttt_alpha=16, ttt_batch_size=8, ttt_grad_accum=1,
              ttt_lr=1e-3, ttt_embedding_lr=1e-4, ttt_warmup_steps=32, ttt_mask_first=1,
              sampler='greedy', n_views=8, min_prob=0.09, n_score_views=8,
              selection='mul_aug_prob', max_tokens=8192, smoke_grid=True)
CPU_TASKS = 10  # a CPU run takes a subset unless --n-tasks says otherwise
# Without a GPU: no TTT (on 2 cores one of its steps of 8 samples takes about 2 minutes) and DFS over 16 views with
# 16 scoring views, better and faster on the CPU subset than greedy on 8 (results/arcmini_cpu_first10*.json).
CPU_RECIPE = dict(RECIPE, ttt='none', sampler='dfs', n_views=16, n_score_views=16)


def main(argv=None):
    import torch

    recipe = RECIPE if torch.cuda.is_available() else CPU_RECIPE
    return evaluation.script_main(__doc__, recipe, __file__, argv, cpu_tasks=CPU_TASKS,
                                  smoke_overrides=smoke.evaluation_run)


if __name__ == '__main__':
    main()
