"""Evaluate the finetuned SmolLM2-135M (run_finetuning_SmolLM2.py) with the seed's test-time training, DFS and
product-of-experts scoring: the seed's own system on a real pretrained LLM. Held out: the model never trained on
a pair of either evaluation set, so ARC-AGI-1 and ARC-AGI-2 evaluation are both scored under that protocol.

    python training_code/run_evaluation_SmolLM2.py                       # ARC-AGI-1 evaluation, one shared LoRA
    python training_code/run_evaluation_SmolLM2.py --ttt per_task        # a fresh LoRA per task (the paper)
    python training_code/run_evaluation_SmolLM2.py --ttt none            # before TTT
    python training_code/run_evaluation_SmolLM2.py \
        --challenges input/arc-prize-2025/arc-agi_evaluation_challenges.json     # ARC-AGI-2 evaluation
    python training_code/run_evaluation_SmolLM2.py --smoke               # seconds, CPU, tiny SmolLM2-shaped model

Recipe (the ARC Prize 2024 submission's, as run_evaluation_Llama-rearc_with_ttt.py): one LoRA (r=64, alpha=16,
embeddings in full) shared by all tasks, trained on their demonstration pairs only, 48 repeats each with one
random symmetry, colour permutation and example order (bs 2 x GA 2, lr 1e-4, embeddings 1e-5, warmup 25%,
cosine, all outputs trained on); then 16 views per test input, DFS at 0.1, 8 scoring views, attempts ordered by
`mul_all_prob`. `--ttt per_task` trains a fresh adapter per task instead, with these LoRA settings (the paper's
per-task values are in run_evaluation_Nemo-ReArc1200_per_task_ttt.py). One difference from the 8B recipes: the
model loads in bf16, not 4-bit (212 MB; 4-bit only slows a model this small). The shared adapter is saved in
<output-dir>/finetuned_model and reused on restart.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluation  # noqa: E402
import smoke  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = dict(model=os.path.join(REPO, 'pretrained_models', 'SmolLM2-135M-ARC-merged'),
              output_dir='output_evaluation_SmolLM2', load_in_4bit=False, ttt='shared', ttt_copies=48, ttt_r=64,
              ttt_alpha=16, ttt_batch_size=2, ttt_grad_accum=2, ttt_warmup_ratio=0.25, ttt_mask_first=0,
              n_views=16, min_prob=0.1, n_score_views=8, selection='mul_all_prob', max_tokens=8192)


def main(argv=None):
    return evaluation.script_main(__doc__, RECIPE, __file__, argv, smoke_overrides=smoke.smollm2_evaluation_run)


if __name__ == '__main__':
    main()
