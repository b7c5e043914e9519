"""Evaluate NeMo-Minitron-8B ReArc1200 on the ARC-AGI-1 public evaluation set with per-task test-time training
(the ICML 2025 paper's setting, 71.6% there).

    python training_code/run_evaluation_Nemo-ReArc1200_per_task_ttt.py \
        --model da-fr/Mistral-NeMo-Minitron-8B-ARChitects-ReArc1200-bnb-4bit
    python training_code/run_evaluation_Nemo-ReArc1200_per_task_ttt.py --smoke   # seconds, CPU, tiny local model

Recipe (the ICML 2025 paper's): for every task a fresh LoRA (r=32, alpha=16, embeddings in full) trained on its
demonstration pairs: the 8 symmetries x 8 copies, each with its own colours and example order (64 samples, bs 1,
warmup 32 steps, lr 1e-4, embeddings 1e-5, cosine, first output not trained on). TTT is lazy: a task whose
results are in the cache is not trained again. Then 16 views, DFS at 0.09, the same 16 scoring views for every
candidate of a task, attempts ordered by the product of the scoring-view probabilities (`mul_aug_prob`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluation  # noqa: E402
import smoke  # noqa: E402

RECIPE = dict(model='da-fr/Mistral-NeMo-Minitron-8B-ARChitects-ReArc1200-bnb-4bit',
              output_dir='output_evaluation_Nemo-ReArc1200_per_task_ttt', ttt='per_task', ttt_copies=8, ttt_r=32,
              ttt_alpha=16, ttt_batch_size=1, ttt_grad_accum=1, ttt_warmup_steps=32, ttt_mask_first=1, n_views=16,
              min_prob=0.09, n_score_views=16, selection='mul_aug_prob', max_tokens=8192)


def main(argv=None):
    return evaluation.script_main(__doc__, RECIPE, __file__, argv, smoke_overrides=smoke.evaluation_run)


if __name__ == '__main__':
    main()
