"""Evaluate the Llama-3.2-3B ReArc model on the ARC-AGI-1 public evaluation set with test-time training (2024).

    python training_code/run_evaluation_Llama-rearc_with_ttt.py --model da-fr/Llama-3.2-3B-ARChitects-ReArc-bnb-4bit
    python training_code/run_evaluation_Llama-rearc_with_ttt.py --smoke      # seconds, CPU, tiny local model

Recipe (the ARC Prize 2024 submission): one LoRA (r=64, alpha=16, embeddings in full) shared by all tasks, trained on their
demonstration pairs only, 48 repeats each with one random symmetry, colour permutation and example order (bs 2 x
GA 2, lr 1e-4, embeddings 1e-5, warmup 25%, cosine, all outputs trained on); then 16 views per test input, DFS at
0.1, 8 scoring views, attempts ordered by `mul_all_prob`. The adapter is saved in <output-dir>/finetuned_model
and reused when the run is restarted.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluation  # noqa: E402
import smoke  # noqa: E402

RECIPE = dict(model='da-fr/Llama-3.2-3B-ARChitects-ReArc-bnb-4bit', output_dir='output_evaluation_Llama-rearc_with_ttt',
              ttt='shared', ttt_copies=48, ttt_r=64, ttt_alpha=16, ttt_batch_size=2, ttt_grad_accum=2,
              ttt_warmup_ratio=0.25, ttt_mask_first=0, n_views=16, min_prob=0.1, n_score_views=8,
              selection='mul_all_prob', max_tokens=8192)


def main(argv=None):
    return evaluation.script_main(__doc__, RECIPE, __file__, argv, smoke_overrides=smoke.evaluation_run)


if __name__ == '__main__':
    main()
