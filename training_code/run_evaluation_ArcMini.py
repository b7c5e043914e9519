"""Evaluate the shipped default model, ArcMini (models/ArcMini), on the ARC-AGI-1 public evaluation set:
candidates by DFS over 16 augmented views, each scored under 16 other views (product of experts).

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
              preprompt='', ttt='none', ttt_copies=8, ttt_r=32, ttt_alpha=16, ttt_batch_size=1, ttt_grad_accum=1,
              ttt_warmup_steps=32, ttt_mask_first=1, n_views=16, min_prob=0.09, n_score_views=16,
              selection='mul_aug_prob', max_tokens=8192, smoke_grid=True)
CPU_TASKS = 10  # a CPU run takes a subset unless --n-tasks says otherwise


def main(argv=None):
    return evaluation.script_main(__doc__, RECIPE, __file__, argv, cpu_tasks=CPU_TASKS,
                                  smoke_overrides=smoke.evaluation_run)


if __name__ == '__main__':
    main()
