"""Everything `--smoke` changes, in one place: the stand-ins for the smoke runs and the tests (a tiny "pretrained"
model with a byte-level BPE tokenizer, a tiny ARC model, tiny re-arc / neoneye folders, all built locally from
ARC tasks so that nothing is downloaded), and each script's smoke overrides of its flags, which the scripts call.
The library modules never import this one.
"""
import json
import os
import tempfile

import torch

import run_record
from arc_downloader import load_arc
from arc_loader import FMT_OPTS


# The special tokens of SmolLM2's tokenizer as make_base_SmolLM2.py sets them: eos is not '</s>'.
SMOLLM2_SPECIALS = dict(specials=('<|endoftext|>', '<|im_start|>', '<|im_end|>'), bos='<|im_start|>',
                        eos='<|im_end|>', pad='<|endoftext|>', unk='<|endoftext|>')


def make_bpe_tokenizer(texts, vocab_size=320, specials=('<s>', '</s>', '<pad>'), bos='<s>', eos='</s>', pad='<pad>',
                       unk=None):
    """A byte-level BPE tokenizer like a pretrained LLM's (newline is the byte token 'Ċ'), with BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A {bos} $B',
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   **({'unk_token': unk} if unk else {}))


def make_tiny_base_model(path, arch='mistral', hidden_size=64, num_layers=2, seed=0, dtype=None, smollm2=False,
                         **config):
    """Save a tiny randomly initialised causal LM + BPE tokenizer at `path` (a stand-in for an 8B download).

    `smollm2`: shaped like make_base_SmolLM2.py's model (Llama, tied embeddings, SmolLM2's special tokens, eos
    '<|im_end|>'); else Mistral-like with '</s>' as eos. `config` overrides config fields (num_attention_heads,
    intermediate_size, ...) for larger random stand-ins; `dtype` (e.g. torch.bfloat16) is the dtype the weights are
    built and saved in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    if os.path.exists(os.path.join(path, 'config.json')):
        return path
    ds = load_arc('training')
    texts = [ds.fmt_task(k, **FMT_OPTS)['text'] for k in ds.keys[:40]] + ['The quick brown fox! 0123456789 ?.:,;*']
    tok = make_bpe_tokenizer(texts, **(SMOLLM2_SPECIALS if smollm2 else {}))
    fields = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=16384, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=smollm2)
    if smollm2:
        arch = 'llama'
    config = AutoConfig.for_model(arch, **dict(fields, **config))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **({} if dtype is None else {'dtype': dtype}))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_arc_model(path, grid=False, hidden_size=64, num_layers=2, seed=0, with_task_tokens=False):
    """Save a tiny random model with the ARC tokenizer at `path`: Llama, or the grid-position model; with the
    generic task token (task_tokens.py) if asked."""
    import model_tools
    import task_tokens
    if os.path.exists(os.path.join(path, run_record.RUN_CONFIG)):
        return path
    tok = model_tools.arc_tokenizer()
    if with_task_tokens:
        task_tokens.add_tokens(tok, [])
    if grid:
        import grid_positions
        model = grid_positions.create_grid_model(tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
                                                 head_dim=16, intermediate_size=2 * hidden_size, seed=seed)
    else:
        model = model_tools.create_model(tok, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    model_tools.save_model_and_tokenizer(path, model, tok, {'smoke': True, 'grid': grid})
    return path


def make_fake_rearc(path, n_tasks=4, n_examples=21):
    """A re-arc-layout folder (metadata.json, tasks/<id>.json) whose examples repeat real ARC training pairs."""
    ds = load_arc('training')
    os.makedirs(os.path.join(path, 'tasks'), exist_ok=True)
    ids = sorted(ds.challenge)[:n_tasks]
    for tid in ids:
        task = ds.challenge[tid]
        pairs = task['train'] + [{'input': t['input'], 'output': s} for t, s in zip(task['test'], ds.solutions[tid])]
        with open(os.path.join(path, 'tasks', f'{tid}.json'), 'w') as f:
            json.dump([pairs[i % len(pairs)] for i in range(n_examples)], f)
    with open(os.path.join(path, 'metadata.json'), 'w') as f:
        json.dump({tid: {} for tid in ids}, f)
    return path


def make_fake_neoneye(path, n_tasks=3):
    """A neoneye arc-dataset-collection layout (data/<group>/<name>.json) from ARC evaluation tasks."""
    ds = load_arc('evaluation')
    folder = os.path.join(path, 'data', 'smoke')
    os.makedirs(folder, exist_ok=True)
    for tid in sorted(ds.challenge)[:n_tasks]:
        task = ds.challenge[tid]
        test = [{'input': t['input'], 'output': s} for t, s in zip(task['test'], ds.solutions[tid])]
        with open(os.path.join(folder, f'{tid}.json'), 'w') as f:
            json.dump({'train': task['train'], 'test': test}, f)
    return path


# --------------------------------------------------------------------------------------------------
# The scripts' --smoke overrides: seconds on a CPU. On a GPU the evaluation and LoRA smoke runs keep --backend
# (e.g. unsloth) and 4-bit, so that the GPU path is smoke-tested too.


def evaluation_run(args):
    """run_evaluation_*.py: a tiny local stand-in model (with task tokens for ArcMini's batched per-task TTT), 2
    tasks, 2 views, 2 TTT steps (LoRA, full or per task)."""
    args.output_dir = os.path.join(args.output_dir, 'smoke')
    per_task = args.batched_per_task_ttt and 'per_task' in args.ttt  # its token mode needs task tokens
    args.model = make_tiny_arc_model(os.path.join(args.output_dir, 'tiny_model' + '_task_tokens' * per_task),
                                     grid=args.smoke_grid, with_task_tokens=per_task)
    args.n_tasks = args.n_tasks or 2
    if not torch.cuda.device_count():
        args.backend, args.load_in_4bit = 'transformers', False
    args.n_views, args.n_score_views = min(args.n_views, 2), min(args.n_score_views, 2)
    args.min_prob, args.ttt_copies, args.ttt_max_steps = max(args.min_prob, 0.2), 1, 2
    args.max_tokens = min(args.max_tokens, 4096)
    args.full_ttt_steps = 2  # --ttt full: two steps of short rows
    args.per_task_ttt_steps, args.per_task_ttt_copies, args.per_task_ttt_batch_size = 2, 1, 2  # batched per task
    args.full_ttt_args = f'--row-tokens 4096 --max-tokens 2048 --num-workers 0 {args.full_ttt_args}'.strip()
    return args


def make_tiny_shrunk_smollm2(path):
    """A tiny SmolLM2-shaped model with its vocabulary shrunk to the format's characters, saved as the finetuning
    recipe saves its merged model: the stand-in for run_evaluation_SmolLM2.py's model."""
    import model_tools
    if os.path.exists(os.path.join(path, run_record.RUN_CONFIG)):
        return path
    base = make_tiny_base_model(path + '-base', smollm2=True)
    model, tok = model_tools.load_model(base, backend='transformers')
    model_tools.keep_single_char_tokens(model, tok, keep=model_tools.FORMAT_CHARS)
    model_tools.save_model_and_tokenizer(path, model, tok, {'smoke': True, 'smollm2': True})
    return path


def smollm2_evaluation_run(args):
    """run_evaluation_SmolLM2.py: evaluation_run with a tiny shrunk SmolLM2-shaped model."""
    evaluation_run(args)
    args.model = make_tiny_shrunk_smollm2(os.path.join(args.output_dir, 'tiny_smollm2'))
    return args


def lora_finetuning(args, root, neoneye, smollm2=False):
    """run_finetuning_Nemo-full.py / -Llama-rearc.py / -SmolLM2.py: tiny local model (SmolLM2-shaped for the last),
    re-arc (and ConceptARC) under root, 2 steps."""
    args.base_model = make_tiny_base_model(os.path.join(root, 'base_model'), arch='mistral', smollm2=smollm2)
    args.rearc_path = make_fake_rearc(os.path.join(root, 're_arc'))
    if neoneye:
        args.conceptarc_path = make_fake_neoneye(os.path.join(root, 'conceptarc'))
        args.mix_repeats = 2
    if smollm2:
        args.mix_repeats = 1  # the real ARC training tasks, once
    args.save_model_path = os.path.join(root, os.path.basename(args.save_model_path))
    args.rearc_epochs, args.rearc_sizes, args.max_tokens = 2, [3], min(args.max_tokens, 4096)
    if not torch.cuda.is_available():
        args.backend, args.load_in_4bit, args.optim = 'transformers', False, 'adamw_torch'
    args.lora_r, args.max_steps, args.batch_size, args.grad_accum = 8, 2, 2, 1
    if smollm2:
        args.row_tokens, args.num_workers = args.max_tokens + 1, 0  # --method full: one sample a row at most
    return args


def arcmini_training(args):
    """run_finetuning_ArcMini.py (and the ArcMini rows of the training benchmark): a tiny model, 3 steps."""
    args.hidden_size, args.num_layers, args.num_heads, args.intermediate_size = 64, 2, 4, 128
    args.epochs, args.batch_size, args.max_steps, args.warmup_steps = 1, 2, 3, 1
    args.max_tokens, args.num_workers, args.save_steps, args.row_tokens = 2048, 0, 2, 4096
    args.save_model_path = os.path.join(tempfile.mkdtemp(prefix='smoke_arcmini_'), 'ArcMini')
    return args


def training_benchmark(args):
    """run_benchmark_training.py: tiny batches and LoRA model, 2 timed steps, the json in a temporary folder."""
    args.batch_size, args.max_tokens, args.large_batch_size, args.warmup_steps, args.steps = 2, 2048, 3, 1, 2
    args.row_tokens = 4096
    args.lora_shape, args.lora_batch_size, args.lora_warmup_steps, args.lora_steps = [64, 2, 4, 2, 128], 2, 1, 2
    args.full_row_tokens = 4096
    args.output = args.output or os.path.join(tempfile.mkdtemp(prefix='smoke_bench_train_'), 'benchmark_training.json')
    if not torch.cuda.is_available():
        args.skip = sorted(set(args.skip) | {'compile'})  # inductor takes about a minute on a CPU
    return args


def inference_benchmark(args):
    """run_benchmark_inference.py: a tiny local grid model, 2 tasks, 2 views, small memory limits, 40 reply tokens."""
    args.model = make_tiny_arc_model(os.path.join(tempfile.mkdtemp(), 'tiny'), grid=True)
    args.n_tasks, args.n_views, args.min_prob, args.max_tokens = 2, 2, 0.2, 2048
    args.kv_cache_gb, args.prefill_tokens = 0.01, 4096
    args.max_new_tokens = 40  # the untrained model never ends a reply: a path would run a 30 x 30 grid's length
    return args
