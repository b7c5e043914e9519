"""Evaluate the Llama-3.2-3B ReArc model on the ARC-AGI-1 public evaluation set, without test-time training.

    python training_code/run_evaluation_Llama-rearc_without_ttt.py --model da-fr/Llama-3.2-3B-ARChitects-ReArc-bnb-4bit
    python training_code/run_evaluation_Llama-rearc_without_ttt.py --smoke      # seconds, CPU, tiny local model

Recipe (the ARC Prize 2024 submission): 16 views per test input (8 symmetries x 2 colour/example permutations), DFS at
probability 0.1 with the best guess followed first, every candidate scored under 8 views, attempts ordered by
the product of all probabilities (`mul_all_prob`). Writes submission.json, results.json and report/.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluation  # noqa: E402
import smoke  # noqa: E402

RECIPE = dict(model='da-fr/Llama-3.2-3B-ARChitects-ReArc-bnb-4bit', output_dir='output_evaluation_Llama-rearc_without_ttt',
              ttt='none', n_views=16, min_prob=0.1, n_score_views=8, selection='mul_all_prob', max_tokens=8192)


def main(argv=None):
    return evaluation.script_main(__doc__, RECIPE, __file__, argv, smoke_overrides=smoke.evaluation_run)


if __name__ == '__main__':
    main()
