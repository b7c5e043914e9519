"""Initial finetuning of Llama-3.2-3B on re-arc only (the model that never saw the evaluation set).

    python training_code/run_finetuning_Llama-rearc.py            # one H100; needs input/re_arc
    python training_code/run_finetuning_Llama-rearc.py --smoke    # under a minute on CPU, tiny local stand-ins

Recipe (the ARC Prize 2024 submission): as run_finetuning_Nemo-full.py but base `chuanli11/Llama-3.2-3B-Instruct-uncensored`,
re-arc 368 epochs with 6 demonstrations + 1 query, nothing mixed in, no token limit (128000). The seed's
script raised a NameError (undefined `arc_data_path`) before doing anything; here every path is a flag.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetuning  # noqa: E402
import smoke  # noqa: E402
from arc_loader import ArcDataset  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    finetuning.add_rearc_args(p, epochs=368, save_model_path=os.path.join(REPO, 'pretrained_models', 'Llama-3.2-3B-ReArc'))
    finetuning.add_lora_training_args(p, **finetuning.LLAMA_REARC)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        smoke.lora_finetuning(args, tempfile.mkdtemp(prefix='smoke_llama_'), neoneye=False)
    data = ArcDataset.load_from_rearc(args.rearc_path, n=args.rearc_epochs, sizes=args.rearc_sizes, seed=args.seed)
    data = data.augment(seed=0, tp=True, rt=True, perm=True, shfl_ex=True)
    return finetuning.lora_finetuning_stages(args, data, vars(args))


if __name__ == '__main__':
    main()
