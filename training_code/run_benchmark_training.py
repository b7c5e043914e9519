"""Benchmark training throughput on one card: the measured bf16 matmul peak, ArcMini steps, LoRA on a ~1B model.

    python training_code/run_benchmark_training.py            # one GPU, about 5 minutes
    python training_code/run_benchmark_training.py --smoke    # seconds on CPU, tiny models

Peak: run_record.measured_peak_flops (8192^3 bf16 matmuls after warmup). ArcMini: the model and data of
run_finetuning_ArcMini.py (its sizes; length-bucketed batches of augmented ARC samples, FormattedKeys, loss on the
outputs but the first, grid positions), trained as its Trainer does: float32 weights under bf16 autocast on CUDA,
AdamW of training.make_optimizer with the recipe's lr, decay and betas, gradients clipped at 1.0. Batches are
built before the clock starts, so plain-loop rows time the model step alone: --warmup-steps steps (and compilation),
then --steps timed. Rows: the recipe's padded batches; the same under torch.compile(dynamic=True); the same samples
packed into rows of <= --pack-tokens tokens whose text positions restart per sample, so that transformers' sdpa path
builds a block-diagonal causal mask (needs use_cache=False; checked against the padded loss in float32; Qwen3.5 has no
flex_attention, flash-attn is not installed); a larger batch; the recipe's own path, training.train_model (HF
Trainer, DataLoader workers). LoRA: a random Mistral of Llama-3.2-1B's shape (smoke.make_tiny_base_model, saved once
so both backends load the same weights), vocabulary shrunk, LoRA and optimizer of run_finetuning_Llama-rearc.py (r,
alpha, rsLoRA, attention + MLP, embeddings in full, 4-bit base, adamw_8bit; unsloth's gradient checkpointing on its
path only) through training.train_model, after the same model trained in full as run_finetuning_SmolLM2.py
--method full trains it (float32 weights under bf16 autocast, packed rows of --full-row-tokens tokens, varlen
attention, torch.compile on CUDA, the recipe's optimizer); transformers+peft first, unsloth last (its import patches
transformers).
MFU = (6 N + 12 layers width seq) x real tokens/s / peak; N = parameters less the input embedding (lm_head kept, LoRA
adapters not), seq = mean real sample length; on LoRA rows 6 N overstates the work (no base-weight gradients).
Writes results/benchmark_training_<card>.json after every section.
"""
import argparse
import contextlib
import functools
import gc
import math
import os
import sys
import tempfile
import time
import traceback

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arcmini  # noqa: E402
import finetuning  # noqa: E402
import grid_positions  # noqa: E402
import input_checks  # noqa: E402
import model_tools  # noqa: E402
import packing  # noqa: E402
import run_record  # noqa: E402
import smoke  # noqa: E402
import training  # noqa: E402
from arc_downloader import load_arc  # noqa: E402
from arc_loader import FMT_OPTS, text_format  # noqa: E402
from run_record import card_name, measured_peak_flops, results_path, write_json  # noqa: E402

SKIPPABLE = ('fast', 'compile', 'packed', 'large', 'trainer', 'cudnn', 'lora', 'full')
# What a LoRA backend may fail with on a new stack (unsloth's API, bitsandbytes): recorded as 'failed: ...'.
BACKEND_ERRORS = (ImportError, NotImplementedError, RuntimeError, TypeError, ValueError, AttributeError)


def parse_args(argv=None):
    recipe = arcmini.settings()
    p = input_checks.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos_int = input_checks.positive_int
    g = p.add_argument_group('ArcMini (model, optimizer, data: run_finetuning_ArcMini.py defaults)')
    g.add_argument('--batch-size', type=pos_int, default=recipe.batch_size, help="sequences per step (the recipe's; the shipped model used 48)")
    g.add_argument('--max-tokens', type=pos_int, default=recipe.max_tokens, help="sample length limit (the recipe's; the shipped model used 6144)")
    g.add_argument('--large-batch-size', type=pos_int, default=2 * recipe.batch_size, help='batch of the larger-batch row')
    g.add_argument('--pack-tokens', type=pos_int, default=None, help='row capacity of the packed row (default: --max-tokens)')
    g.add_argument('--row-tokens', type=pos_int, default=recipe.row_tokens, help="the fast path's tokens per step (the recipe's)")
    g.add_argument('--warmup-steps', type=pos_int, default=5, help='untimed steps first (compilation happens here)')
    g.add_argument('--steps', type=pos_int, default=30, help='timed steps')
    g = p.add_argument_group('LoRA on a random Mistral (LoRA and optimizer: run_finetuning_Llama-rearc.py defaults)')
    g.add_argument('--lora-shape', type=pos_int, nargs=5, default=[2048, 16, 32, 8, 8192], metavar=('WIDTH', 'LAYERS', 'HEADS', 'KV', 'MLP'),
                   help="width, layers, heads, kv heads, MLP width (Llama-3.2-1B's: 0.97B without its vocabulary)")
    g.add_argument('--lora-model', default=None, help='a saved pretrained model to take instead of the random Mistral '
                   '(e.g. pretrained_models/SmolLM2-135M of make_base_SmolLM2.py; --lora-shape is then ignored)')
    g.add_argument('--lora-seq', type=pos_int, default=2048, help='sample length limit (samples that cannot fit are left out)')
    g.add_argument('--lora-batch-size', type=pos_int, default=4, help='sequences per step')
    g.add_argument('--lora-warmup-steps', type=pos_int, default=3, help='untimed steps first')
    g.add_argument('--lora-steps', type=pos_int, default=10, help='timed steps')
    g.add_argument('--full-row-tokens', type=pos_int, default=32768,
                   help="the full-finetuning row's tokens per packed row (run_finetuning_SmolLM2.py --method full's)")
    g.add_argument('--backends', nargs='*', default=['transformers', 'unsloth'], choices=['transformers', 'unsloth'],
                   help='LoRA backends, run in this order (unsloth last: importing it patches transformers); none: '
                        'the section runs its full-finetuning row alone')
    g = p.add_argument_group('run')
    g.add_argument('--skip', nargs='*', default=[], choices=SKIPPABLE, help='rows or sections to leave out')
    g.add_argument('--seed', type=int, default=0, help='seed of the models, the data order and augmentation')
    g.add_argument('--output', default=None, help='json file (default: results/benchmark_training_<card>.json)')
    g.add_argument('--smoke', action='store_true', help='seconds on CPU: tiny models, 2 timed steps, json to a temp dir')
    args = p.parse_args(argv)
    if args.lora_model and 'lora' not in args.skip and not args.smoke:  # one line before the ArcMini rows run
        try:
            input_checks.check_model_path(args.lora_model)
        except input_checks.InputError as e:
            p.error(str(e).replace('--model ', '--lora-model ', 1))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        smoke.training_benchmark(args)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    out = args.output or results_path('training', card_name(device))
    report = {'card': card_name(device), **run_record.header(), 'cpu_cores': os.cpu_count(),
              'git_commit': run_record.git_commit(), 'versions': run_record.package_versions(),
              'settings': dict(vars(args)), 'rows': {}, 'section_s': {},
              'mfu': '(6 N + 12 layers width seq) x real tokens/s / measured peak; N = parameters less input embedding'}
    with tempfile.TemporaryDirectory(prefix='bench_train_') as scratch:
        with section('peak', report, out):
            report['measured_peak_tflops'] = measured_peak_flops(device) / 1e12
        save = functools.partial(write_json, out, report, indent=1, default=str)
        bench = dict(args=args, device=device, peak=report['measured_peak_tflops'] * 1e12, scratch=scratch,
                     record=functools.partial(record, report['rows'], save))
        with section('arcmini', report, out):
            arcmini_rows(**bench)
        if 'lora' not in args.skip:
            with section('lora', report, out):
                lora_rows(**bench)
    print_table(report)
    print(f'wrote {out}')
    return report


@contextlib.contextmanager
def section(name, report, out):
    """Time a section and rewrite the json after it, so that a later failure keeps what was measured."""
    print(f'== {name} ...', flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    start = time.perf_counter()
    yield
    report['section_s'][name] = time.perf_counter() - start
    print(f"== {name}: {report['section_s'][name]:.1f} s", flush=True)
    write_json(out, report, indent=1, default=str)


def record(rows, save, name, measure, errors=(torch.OutOfMemoryError,)):
    """rows[name] = measure() and save; an expected failure of a variant is recorded as its row, and the run goes on."""
    print(f'-- {name}', flush=True)
    fresh_memory_stats()
    try:
        rows[name] = measure()
    except errors as e:
        traceback.print_exc()
        rows[name] = {'status': f'failed: {type(e).__name__}: {str(e)[:300]}'}
    fresh_memory_stats()
    save()


def arcmini_rows(args, device, peak, scratch, record):
    recipe = arcmini.settings()
    if args.smoke:
        smoke.arcmini_training(recipe)
        recipe.arc2 = False  # its leakage filter alone takes seconds
    recipe.max_tokens, recipe.seed, tok = args.max_tokens, args.seed, model_tools.arc_tokenizer()
    model = functools.partial(new_arcmini, recipe, tok)
    config = model('meta').config
    shape = model_shape(config)
    print(f'ArcMini: N = {shape[0] / 1e6:.2f}M non-embedding parameters, {shape[1]} layers x {shape[2]}')
    collator = training.InputMaskingDataCollator(
        tok, mask_first_n_examples=1, position_fn=lambda ids: grid_positions.position_ids_for(config, ids))

    def collate(batches):
        return [to_device(collator([{'input_ids': x} for x in b]), device) for b in batches]

    tasks = arcmini.training_tasks(recipe)
    data, samples = recipe_samples(tasks, recipe, args.batch_size, tok, args)
    padded = collate(samples)
    run = functools.partial(plain_row, args=args, recipe=recipe, device=device, shape=shape, peak=peak)
    record('arcmini padded (recipe step)', lambda: run(model(device), padded, samples))
    if 'packed' not in args.skip:
        packed = [to_device(pack(b, args.pack_tokens or args.max_tokens, collator, config, tok.pad_token_id), device)
                  for b in samples]
        record('arcmini packed (sdpa, block-diagonal mask)', lambda: packed_row(model(device), padded[0], packed, samples, run))
        del packed
    if 'large' not in args.skip:
        big = recipe_samples(tasks, recipe, args.large_batch_size, tok, args)[1]
        record(f'arcmini padded, batch {args.large_batch_size}', lambda: run(model(device), collate(big), big))
    if 'fast' not in args.skip:
        record('arcmini recipe fast path (HF Trainer, packed rows, varlen attention'
               + (', torch.compile)' if device.type == 'cuda' else ')'),
               lambda: fast_row(model, tok, recipe, tasks, args, os.path.join(scratch, 'fast'), shape, peak, device),
               errors=(torch._dynamo.exc.TorchDynamoException, torch.OutOfMemoryError, RuntimeError))
    if 'trainer' not in args.skip:
        for cudnn in (False,) if 'cudnn' in args.skip else (False, True):  # the recipe keeps cuDNN's attention off
            # the row keeps its name of results/benchmark_training_*.json (train_model is training.train_model now)
            record('arcmini HF Trainer (model_tools.train_model)' + (', cuDNN attention' if cudnn else ''),
                   lambda: trainer_row(
                       model('cpu'), tok, training.FormattedKeys(data, tok, arcmini.FMT, args.max_tokens),
                       [len(x) for b in samples for x in b], args.batch_size, args.warmup_steps, args.steps,
                       os.path.join(scratch, f'arcmini{int(cudnn)}'), shape, peak, device,
                       arcmini.optimizer_settings(recipe), args.seed, recipe.num_workers,
                       training.KernelSettings(cudnn_attention=cudnn)))
    if 'compile' not in args.skip:  # last: its compilation is the slowest part of the section
        record('arcmini padded + torch.compile', lambda: compiled(run(torch.compile(model(device), dynamic=True), padded, samples)),
               errors=(torch._dynamo.exc.TorchDynamoException, torch.OutOfMemoryError))


def new_arcmini(recipe, tok, device):
    with torch.device(device):
        return grid_positions.create_grid_model(
            tok, hidden_size=recipe.hidden_size, num_layers=recipe.num_layers, num_heads=recipe.num_heads,
            head_dim=recipe.hidden_size // recipe.num_heads, intermediate_size=recipe.intermediate_size,
            max_position_embeddings=recipe.max_tokens, seed=recipe.seed)


def recipe_samples(tasks, recipe, batch_size, tok, args):
    """(bucketed dataset, token ids of its first warmup + steps batches), in the recipe's order."""
    n = (args.warmup_steps + args.steps) * batch_size
    recipe.batch_size, recipe.epochs = batch_size, math.ceil(n / len(tasks.keys))
    data = arcmini.bucketed_epochs(tasks, recipe)
    formatted = training.FormattedKeys(data, tok, arcmini.FMT, args.max_tokens)
    ids = [formatted[i]['input_ids'] for i in range(n)]
    return data, [ids[i:i + batch_size] for i in range(0, n, batch_size)]


def pack(samples, capacity, collator, config, pad_id):
    """Samples in order into rows of <= capacity tokens; text positions restart per sample, so sdpa masks blocks."""
    rows = [[]]
    for x in samples:
        if rows[-1] and sum(map(len, rows[-1])) + len(x) > capacity:
            rows.append([])
        rows[-1].append(x)
    length, ids, labels, positions = max(sum(map(len, r)) for r in rows), [], [], []
    for r in rows:
        pad = length - sum(map(len, r))
        ids.append(torch.tensor(sum(r, []) + [pad_id] * pad))
        labels.append(torch.tensor(sum((collator.labels(x) for x in r), []) + [-100] * pad))
        text = torch.cat([torch.arange(len(x)) for x in r] + [torch.arange(pad)])  # the padding: one more sequence
        grid = [grid_positions.position_ids_for(config, torch.tensor([x]))[:, 0] for x in r]
        positions.append(torch.cat([text[None], torch.cat(grid + [torch.zeros(3, pad, dtype=torch.long)], dim=1)]))
    # use_cache=False: with a cache, transformers skips the packed-sequence detection (plain causal mask)
    return {'input_ids': torch.stack(ids), 'labels': torch.stack(labels), 'position_ids': torch.stack(positions, dim=1),
            'use_cache': False}


def packed_row(model, padded, packed, samples, run):
    with torch.no_grad():  # float32, no autocast: the packed rows must give the padded batch's loss
        diff = abs(model(**padded).loss.item() - model(**packed[0]).loss.item())
    rows_per_step = sum(len(b['input_ids']) for b in packed) / len(packed)
    return dict(run(model, packed, samples), loss_diff_vs_padded=diff, rows_per_step=rows_per_step)


def compiled(row):
    from torch._dynamo.utils import counters
    row.update(graphs=counters['stats']['unique_graphs'], graph_breaks=sum(counters['graph_break'].values()))
    torch._dynamo.reset()
    return row


def plain_row(model, batches, samples, args, recipe, device, shape, peak):
    """What the Trainer's step does, in a plain loop over ready batches; the throughput of the timed steps."""
    optimizer = training.make_optimizer(model, lr=recipe.lr, embedding_lr=recipe.lr, weight_decay=recipe.weight_decay,
                                        betas=(0.9, recipe.adam_beta2))
    model.train()
    with model_tools.attention_without_cudnn():  # as the recipe's train_model
        return _plain_steps(model, optimizer, batches, samples, args, device, shape, peak)


def _plain_steps(model, optimizer, batches, samples, args, device, shape, peak):
    marks = [time.perf_counter()]
    for i, batch in enumerate(batches):
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=device.type == 'cuda'):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i + 1 in (args.warmup_steps, len(batches)):
            sync()
            marks.append(time.perf_counter())
    timed, lengths = batches[args.warmup_steps:], [len(x) for b in samples[args.warmup_steps:] for x in b]
    return dict(throughput(marks[2] - marks[1], len(timed), lengths, sum(b['input_ids'].numel() for b in timed),
                           shape, peak), batch=len(samples[0]), warmup_s=marks[1] - marks[0], final_loss=loss.item())


class StepTimer(transformers.TrainerCallback):
    """Time stamps at the start and at every step end (after a CUDA sync); nothing is saved, so the clock sees
    training only."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.marks.append(time.perf_counter())
        control.should_save = False
        return control


def trainer_row(model, tok, dataset, lengths, batch_size, warmup, steps, out_dir, shape, peak, device, optimizer,
                seed, num_workers=0, kernels=training.KernelSettings()):
    """training.train_model for warmup + steps steps over `dataset` in order (the recipe's `optimizer`, the outputs
    but the first trained on); lengths: its samples' token counts."""
    timer = StepTimer()
    training.train_model(model, tok, dataset, out_dir, optimizer,
                         training.BatchSettings(batch_size=batch_size, grad_accum=1, max_steps=warmup + steps,
                                                mask_first_n_examples=1, sequential=True, num_workers=num_workers),
                         training.RunSettings(save_steps=10 ** 9, resume=False, logging_steps=10 ** 9, seed=seed),
                         kernels, callbacks=[timer])
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)][warmup:warmup + steps]
    return dict(throughput(timer.marks[warmup + steps] - timer.marks[warmup], steps, sum(batches, []),
                           sum(max(b) * len(b) for b in batches), shape, peak),
                batch=batch_size, warmup_s=timer.marks[warmup] - timer.marks[0])


def fast_row(model, tok, recipe, tasks, args, out_dir, shape, peak, device):
    """The recipe itself (arcmini.train: packed rows, HF Trainer, torch.compile on CUDA) for warmup + steps steps,
    timed like trainer_row; first the loss of one packed row against the same samples padded (float32 weights, no
    autocast; the varlen kernel runs in bf16)."""
    settings = argparse.Namespace(**dict(
        vars(recipe), row_tokens=args.row_tokens, max_steps=args.warmup_steps + args.steps, packing=True, seed=args.seed,
        epochs=None,  # enough epochs for the steps (the padded rows' recipe_samples set one for their batches)
        save_steps=10 ** 9, save_model_path=os.path.join(out_dir, 'arcmini')))
    rows = arcmini.packed_rows(tasks, settings, tok)  # the rows train() makes, for their lengths and the loss check
    # the rows of the timed steps, as the Trainer feeds them (in order, from the start again after the last)
    timed = [rows.rows[i % len(rows.rows)] for i in range(args.warmup_steps, args.warmup_steps + args.steps)]
    lengths = [len(rows.samples[j]['input_ids']) for r in timed for j in r]
    loss_diff = packed_loss_diff(model(device), tok, [rows.samples[j]['input_ids'] for j in rows.rows[0]],
                                 args.row_tokens, device)
    timer = StepTimer()
    arcmini.train(tasks, settings, callbacks=[timer], save=False)
    w, n = args.warmup_steps, args.steps
    return dict(throughput(timer.marks[w + n] - timer.marks[w], n, lengths, n * args.row_tokens, shape, peak),
                batch=f'{args.row_tokens} tokens', warmup_s=timer.marks[w] - timer.marks[0],
                loss_diff_vs_padded=loss_diff, compiled=device.type == 'cuda' and settings.compile)


def packed_loss_diff(model, tok, samples, capacity, device):
    """|loss(padded batch) - loss(packed row)| for the same samples (the first 8 of a row)."""
    samples = samples[:8]
    position_fn = training._position_fn(model)
    labeler = training.InputMaskingDataCollator(tok, mask_first_n_examples=1, position_fn=position_fn)
    packed = packing.PackedCollator(labeler.labels, tok.pad_token_id, capacity, position_fn)([samples])
    with torch.no_grad():
        padded_loss = model(**to_device(labeler([{'input_ids': s} for s in samples]), device)).loss.item()
        model.set_attn_implementation(packing.register_varlen_attention())
        packed_loss = model(**to_device(packed, device)).loss.item()
    del model
    return abs(padded_loss - packed_loss)


def lora_rows(args, device, peak, scratch, record):
    recipe = finetuning.lora_settings(**finetuning.LLAMA_REARC)  # run_finetuning_Llama-rearc.py's
    width, layers, heads, kv_heads, mlp = args.lora_shape
    path = args.lora_model or smoke.make_tiny_base_model(
        os.path.join(scratch, 'mistral'), arch='mistral', hidden_size=width, num_layers=layers, seed=args.seed,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=mlp,
        dtype=torch.bfloat16 if device.type == 'cuda' else None)
    data, keys = load_arc('training').augment(seed=args.seed, tp=True, rt=True, perm=True, shfl_ex=True), []
    for key in data.keys:
        try:  # examples are dropped to fit --lora-seq; a task whose query and one example cannot fit is left out
            keys.append(data.get_task(key, args.lora_seq, 'text', **FMT_OPTS)[0])
        except ValueError:
            continue
    data_all = data.change_keys(keys)
    data = data.change_keys(keys[:(args.lora_warmup_steps + args.lora_steps) * args.lora_batch_size])
    if 'full' not in args.skip:  # every weight, as run_finetuning_SmolLM2.py --method full; before unsloth's patches
        record('full transformers (packed rows)', lambda: full_row(path, recipe, data_all, args, device, peak, scratch))
    for backend in args.backends:
        if backend == 'unsloth' and device.type != 'cuda':
            record('lora unsloth', lambda: {'status': 'skipped: unsloth needs a CUDA GPU'})
        else:
            record(f'lora {backend}', lambda: lora_row(backend, path, recipe, data, args, device, peak, scratch),
                   errors=BACKEND_ERRORS)


def lora_row(backend, path, recipe, data, args, device, peak, scratch):
    start, cuda = time.perf_counter(), device.type == 'cuda'
    model, tok = model_tools.load_model(path, backend=backend, load_in_4bit=recipe.load_in_4bit and cuda,
                                        max_seq_length=args.lora_seq)
    model_tools.keep_single_char_tokens(model, tok, keep=model_tools.FORMAT_CHARS)
    model = model_tools.get_peft_model_arc(model, r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                                           lora_dropout=recipe.lora_dropout, seed=args.seed, backend=backend)
    fmt = text_format(tok.eos_token)  # replies end with the model's own eos, as the recipes train
    load_s, dataset = time.perf_counter() - start, training.FormattedKeys(data, tok, fmt, args.lora_seq)
    config = transformers.AutoConfig.from_pretrained(path)
    config.vocab_size = len(tok)  # N as trained: the shrunk vocabulary
    row = trainer_row(model, tok, dataset, [len(dataset[i]['input_ids']) for i in range(len(dataset))],
                      args.lora_batch_size, args.lora_warmup_steps, args.lora_steps, os.path.join(scratch, backend),
                      model_shape(config), peak, device,
                      training.OptimizerSettings(lr=recipe.lr, embedding_lr=recipe.embedding_lr,
                                                 optim=recipe.optim if cuda else 'adamw_torch'), args.seed)
    return dict(row, load_s=load_s, load_in_4bit=recipe.load_in_4bit and cuda, lora_r=recipe.lora_r,
                gradient_checkpointing='unsloth' if backend == 'unsloth' else 'off')


def full_row(path, recipe, data, args, device, peak, scratch):
    """Every weight of the shrunk model trained as finetuning.full_finetuning_stage trains it, on packed rows of
    `data`'s samples, for the LoRA rows' warmup + timed steps."""
    start, cuda = time.perf_counter(), device.type == 'cuda'
    model, tok = model_tools.load_model(path, backend='transformers', dtype=torch.float32, max_seq_length=args.lora_seq)
    model_tools.keep_single_char_tokens(model, tok, keep=model_tools.FORMAT_CHARS)
    rows, _ = finetuning.packed_samples(data, tok, args.lora_seq, args.full_row_tokens, args.seed)
    load_s, w, n = time.perf_counter() - start, args.lora_warmup_steps, args.lora_steps
    config = transformers.AutoConfig.from_pretrained(path)
    config.vocab_size = len(tok)  # N as trained: the shrunk vocabulary
    timer = StepTimer()
    training.train_model(model, tok, rows, os.path.join(scratch, 'full'),
                         training.OptimizerSettings(lr=recipe.lr, embedding_lr=recipe.embedding_lr,
                                                    optim=recipe.optim if cuda else 'adamw_torch'),
                         training.BatchSettings(batch_size=1, grad_accum=1, max_steps=w + n, mask_first_n_examples=1,
                                                sequential=True, packing=args.full_row_tokens),
                         training.RunSettings(save_steps=10 ** 9, resume=False, logging_steps=10 ** 9, seed=args.seed),
                         training.KernelSettings(torch_compile=cuda), callbacks=[timer])
    timed = [rows.rows[i % len(rows.rows)] for i in range(w, w + n)]  # the Trainer feeds the rows in order
    lengths = [len(rows.samples[j]['input_ids']) for r in timed for j in r]
    return dict(throughput(timer.marks[w + n] - timer.marks[w], n, lengths, n * args.full_row_tokens,
                           model_shape(config), peak),
                batch=f'{args.full_row_tokens} tokens', warmup_s=timer.marks[w] - timer.marks[0], load_s=load_s,
                compiled=cuda, optim=recipe.optim if cuda else 'adamw_torch')


def model_shape(config):
    """(N = parameters less the input embedding, layers, width), counted on the meta device (quantization aside)."""
    config = config.get_text_config()
    with torch.device('meta'):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in meta.parameters()) - meta.get_input_embeddings().weight.numel()
    return n, config.num_hidden_layers, config.hidden_size


def throughput(seconds, steps, lengths, padded_tokens, shape, peak):
    """Rates of `steps` timed steps over samples of `lengths` real tokens (padded_tokens with padding); MFU; memory."""
    (n, layers, width), real, seq = shape, sum(lengths), sum(lengths) / len(lengths)
    return {'status': 'ok', 'steps': steps, 's_per_step': seconds / steps, 'samples_per_s': len(lengths) / seconds,
            'real_tokens_per_s': real / seconds, 'padded_tokens_per_s': padded_tokens / seconds, 'mean_seq': seq,
            'pad_fraction': 1 - real / padded_tokens, 'n_non_embedding': n,
            'mfu': (6 * n + 12 * layers * width * seq) * real / seconds / peak,
            'peak_mem_gib': torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None}


def to_device(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fresh_memory_stats():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def print_table(report):
    print(f"\n{report['card']}: measured peak {report['measured_peak_tflops']:.1f} TFLOP/s; seconds per section: "
          + ', '.join(f'{k} {v:.0f}' for k, v in report['section_s'].items()))
    cols = ['status', 'batch', 'steps', 's_per_step', 'samples_per_s', 'real_tokens_per_s', 'padded_tokens_per_s',
            'mean_seq', 'pad_fraction', 'peak_mem_gib', 'mfu', 'warmup_s']
    print('| row | ' + ' | '.join(cols) + ' |\n|' + '---|' * (len(cols) + 1))
    for name, row in report['rows'].items():
        cells = ['-' if v is None else f'{v:.3g}' if isinstance(v, float) else str(v) for v in map(row.get, cols)]
        print(f'| {name} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
