"""Initial finetuning of Mistral-NeMo-Minitron-8B into the model of the 53.5-point ARC Prize 2024 submission.

    python training_code/run_finetuning_Nemo-full.py            # one H100, about a day; needs input/re_arc
    python training_code/run_finetuning_Nemo-full.py --smoke    # under a minute on CPU, tiny local stand-ins

Recipe (the ARC Prize 2024 submission): vocabulary shrunk to single characters; re-arc 644 epochs of 400 tasks with 6
demonstrations + 1 query each, mixed with the ARC-AGI-1 evaluation set (test pairs moved to the
demonstrations) x128 and ConceptARC x128; one random symmetry, colour permutation and example order per sample;
samples cut to 8192 tokens by dropping examples; 4-bit base + rsLoRA r=256 alpha=24 over attention and MLP
with embed_tokens and lm_head trained in full (lr 1e-4 / 1e-5), bs 4 x GA 2, warmup 25%, cosine, adamw_8bit,
first output not trained on. Writes <save-model-path>-lora and -merged (a stage whose output exists is skipped;
training resumes from its last checkpoint). This is the Kaggle model: it trains on the public evaluation set,
so do not score it there. Data: re-arc from Hodel's generator (`input/re_arc/metadata.json`, `tasks/<id>.json`,
at least 7 x 644 examples per task) and neoneye's arc-dataset-collection (ConceptARC) under input/.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetuning  # noqa: E402
import smoke  # noqa: E402
from arc_downloader import load_arc  # noqa: E402
from arc_loader import ArcDataset  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = finetuning.add_rearc_args(p, epochs=644, save_model_path=os.path.join(REPO, 'pretrained_models',
                                                                           'Mistral-NeMo-Minitron-Full'))
    g.add_argument('--conceptarc-path', default=os.path.join(REPO, 'input', 'arc-dataset-collection', 'dataset', 'ConceptARC'),
                   help='neoneye arc-dataset-collection ConceptARC folder')
    g.add_argument('--mix-repeats', type=int, default=128, help='repeats of the evaluation set and of ConceptARC')
    finetuning.add_lora_training_args(p, base_model='nvidia/Mistral-NeMo-Minitron-8B-Base', lora_r=256, lora_alpha=24,
                                      batch_size=4, grad_accum=2, warmup_ratio=0.25, max_tokens=8192)
    return p.parse_args(argv)


def build_training_data(args):
    """re-arc epochs mixed with the evaluation set and ConceptARC, one random augmentation per sample."""
    evaluation = load_arc('evaluation').move_test_to_train().repeat(args.mix_repeats)
    concept = ArcDataset.load_from_neoneye(args.conceptarc_path).move_test_to_train().repeat(args.mix_repeats)
    data = ArcDataset.load_from_rearc(args.rearc_path, n=args.rearc_epochs, sizes=args.rearc_sizes, seed=args.seed,
                                      mix_datasets={'evaluation': evaluation, 'concept': concept})
    return data.augment(seed=0, tp=True, rt=True, perm=True, shfl_ex=True)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        smoke.lora_finetuning(args, tempfile.mkdtemp(prefix='smoke_nemo_'), neoneye=True)
    return finetuning.lora_finetuning_stages(args, build_training_data(args), vars(args))


if __name__ == '__main__':
    main()
