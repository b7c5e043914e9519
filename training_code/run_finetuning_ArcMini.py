"""Train the repo's default model, ArcMini, from scratch: a small Qwen3.5-architecture decoder whose rotary
positions run over (grid, row, column), with the seed's text format, collator and trainer.

    python training_code/run_finetuning_ArcMini.py                              # one GPU
    torchrun --nproc_per_node 4 training_code/run_finetuning_ArcMini.py --max-minutes 10 --num-workers 8
                                    # data-parallel over 4 GPUs (NCCL): 2000 steps, about 10 minutes on 4 x H100
    python training_code/run_finetuning_ArcMini.py --task-tokens --max-steps 7000 --num-workers 12
                                    # the shipped v3: one H200, about 9 minutes
    python training_code/run_finetuning_ArcMini.py --init-model models/ArcMini --ttt-challenges C.json --lr 3e-4 \
        --max-steps 800 --warmup-steps 50           # held out: the whole model trains on C.json's demonstrations
    python training_code/run_finetuning_ArcMini.py --smoke                      # seconds on CPU

Data, leakage-free for the ARC-AGI-1 evaluation: the 400 ARC-AGI-1 training tasks and the ARC-AGI-2 training
tasks (test pairs moved to the demonstrations), minus every task that shares a grid pair with the ARC-AGI-1
evaluation set or, for ARC-AGI-2, with ARC-AGI-1 training (duplicates); plus the *demonstration pairs only*
of the 400 ARC-AGI-1 evaluation tasks, which is test-time training by another name (their test outputs are
never seen); and nothing that shares a grid pair with the ARC-AGI-2 evaluation set, which stays held out.
Every sample: one random symmetry, a random permutation of all 10 colours and a shuffled example order; with
--task-tokens the task's own token first (the generic one for --task-token-dropout of them); loss on every output
but the first; samples cut to --max-tokens by dropping examples. Rows are packed (or batches length-bucketed).
--init-model with --ttt-challenges is held-out test-time training: the same loop on one file's demonstrations. The run checkpoints every --save-steps and resumes from the last checkpoint in its folder,
and --max-minutes stops it in time on a machine lent for minutes. Writes --save-model-path (weights,
tokenizer, run_config.json). The recipe itself (flags, data, training) is arcmini.py's.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arc_loader  # noqa: E402
import arcmini  # noqa: E402
import input_checks  # noqa: E402
import smoke  # noqa: E402


def main(argv=None):
    parser = arcmini.arg_parser(__doc__)
    args = parser.parse_args(argv)
    if args.ttt_challenges and not args.init_model:
        parser.exit(2, f'{parser.prog}: error: --ttt-challenges trains a pretrained model: give --init-model\n')
    head_dim = args.hidden_size // args.num_heads  # grid_positions' rotary halves need an even one
    if not args.init_model and (head_dim < 2 or head_dim % 2):
        parser.error(f'--hidden-size {args.hidden_size} / --num-heads {args.num_heads}: a head of {head_dim} '
                     'dimensions; it must be even (e.g. 384 / 6 = 64)')
    if args.smoke:
        smoke.arcmini_training(args)
    try:  # checked before the model is built: one line, status 2
        if args.init_model:
            input_checks.check_model_path(args.init_model)
        tasks = arcmini.training_tasks(args)
    except (input_checks.InputError, arc_loader.ArcDataError) as e:
        parser.exit(2, f'{parser.prog}: error: {e}\n'.replace('--model ', '--init-model ', 1))
    return arcmini.train(tasks, args)


if __name__ == '__main__':
    main()
