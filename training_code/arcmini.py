"""The ArcMini recipe as a library: its settings (the flags of run_finetuning_ArcMini.py, `arg_parser`), its task
pool, its data (packed rows or length-bucketed padded batches) and `train`, which takes the tasks and the settings
and returns the saved model's directory. run_finetuning_ArcMini.py parses the flags and calls it; the evaluation's
--ttt full calls it with the tasks to solve (their demonstration pairs only); run_benchmark_training.py times its
data and model.
"""
import argparse
import math
import os
import time

import numpy as np
import torch

import grid_positions
import input_checks
import model_tools
import packing
import run_record
import task_tokens
import training
from arc_downloader import load_arc
from arc_loader import DRAW_SEP, FMT_OPTS, ArcDataError, ArcDataset, count_tokens, exclude_overlapping, get_base_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMT = dict(FMT_OPTS, preprompt='')  # a from-scratch model needs no pretend-prompt
EVAL_DEMOS = 'arc1-eval-demos'
REARC = 're-arc'

# run_evaluation_ArcMini.py's defaults (its docstring gives the measurements), shared with run_ladder_ArcMini.py.
# backend: plain transformers + peft; unsloth's patches are made for large pretrained LLMs and add nothing here.
EVALUATION = dict(model=os.path.join(REPO, 'models', 'ArcMini'), output_dir='output_evaluation_ArcMini',
                  load_in_4bit=False, backend='transformers',
                  preprompt='', ttt='none', ttt_copies=8, ttt_r=32, ttt_alpha=16, ttt_batch_size=8, ttt_grad_accum=1,
                  ttt_lr=1e-3, ttt_embedding_lr=1e-4, ttt_warmup_steps=32, ttt_mask_first=1,
                  sampler='greedy', n_views=8, min_prob=0.09, n_score_views=8,
                  selection='mul_aug_prob', max_tokens=8192, smoke_grid=True,
                  full_ttt=True,  # --ttt full: the whole model trains on the tasks' demonstrations (`train`)
                  batched_per_task_ttt=True)  # --ttt per_task: per_task_ttt.py (its defaults there, unmeasured)
CPU_TASKS = 10  # a CPU run takes a subset unless --n-tasks says otherwise


def arg_parser(doc=None):
    """Every setting of the recipe, as a flag with its default (run_finetuning_ArcMini.py's command line)."""
    p = input_checks.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--init-model', default=None,
                   help='continue from this saved ArcMini (weights, tokenizer and task tokens; the shape flags are '
                        "ignored) instead of a fresh model; tasks without a task token get a copy of the generic one")
    g.add_argument('--hidden-size', type=input_checks.positive_int, default=384, help='width')
    g.add_argument('--num-layers', type=input_checks.positive_int, default=6, help='decoder layers')
    g.add_argument('--num-heads', type=input_checks.positive_int, default=6, help='attention heads (head_dim 64)')
    g.add_argument('--intermediate-size', type=input_checks.positive_int, default=1536, help='MLP width')
    g = p.add_argument_group('data')
    g.add_argument('--epochs', type=input_checks.positive_int, default=None,
                   help='passes over the task list (fresh augmentation each); default: enough for --max-steps '
                        '(packed rows), 260 (padded batches: 2000 steps of 4 x 32)')
    g.add_argument('--no-arc2', dest='arc2', action='store_false', help='leave out the ARC-AGI-2 training tasks')
    g.add_argument('--no-eval-demos', dest='eval_demos', action='store_false',
                   help='leave out the demonstration pairs of the ARC-AGI-1 evaluation tasks')
    g.add_argument('--rearc-samples', type=input_checks.nonnegative_int, default=0,
                   help='re-arc samples per ARC-AGI-1 training task in the pool, each --rearc-sizes demonstrations + '
                        "1 more pair drawn without replacement from that task's generated examples (0: none, v3's pool)")
    g.add_argument('--rearc-per-epoch', type=input_checks.positive_int, default=None,
                   help='re-arc draws of each task in one epoch (a pass over the pool), taken in turn from its '
                        '--rearc-samples draws, so that every epoch brings other draws at the same share of the '
                        'tokens (default: all of them in every epoch)')
    g.add_argument('--rearc-sizes', type=input_checks.positive_int, nargs='+', default=[6],
                   help='demonstrations of a re-arc sample (cycled over when several)')
    g.add_argument('--rearc-path', default=os.path.join(REPO, 'input', 're_arc'),
                   help='re-arc generator output (metadata.json, tasks/<id>.json; see docs/RECIPES.md, Data)')
    g.add_argument('--max-tokens', type=input_checks.positive_int, default=6144, help='sample length limit; examples are dropped to fit')
    g.add_argument('--ttt-challenges', default=None,
                   help='held-out test-time training of the whole model (needs --init-model): the pool is only the '
                        "demonstration pairs of this challenges file's tasks (their test outputs are never read)")
    g.add_argument('--task-tokens', action='store_true',
                   help="a learned token per task ('<task:ID>', an extra vocabulary row) first in each of its texts (one for "
                        "all the re-arc samples of a task)")
    g.add_argument('--task-token-dropout', type=input_checks.fraction, default=0.1,
                   help="with --task-tokens: share of samples given the generic token '<task:?>' instead, the start "
                        "of a task without a token of its own (new tasks at test time)")
    g = p.add_argument_group('training')
    g.add_argument('--no-packing', dest='packing', action='store_false',
                   help="padded length-bucketed batches of --batch-size (ArcMini v2's path) instead of packed rows")
    g.add_argument('--row-tokens', type=input_checks.positive_int, default=98304,
                   help='packed rows: tokens per GPU per step (samples back to back, attention inside each)')
    g.add_argument('--no-compile', dest='compile', action='store_false',
                   help='no torch.compile (it is used on CUDA with packed rows)')
    g.add_argument('--batch-size', type=input_checks.positive_int, default=32, help='padded batches: sequences per GPU per step (length-bucketed)')
    g.add_argument('--lr', type=input_checks.positive_float, default=1e-3, help='peak learning rate (embeddings too)')
    g.add_argument('--warmup-steps', type=input_checks.nonnegative_int, default=200, help='linear warmup')
    g.add_argument('--weight-decay', type=input_checks.nonnegative_float, default=0.1, help='AdamW weight decay')
    g.add_argument('--adam-beta2', type=input_checks.fraction, default=0.95, help='AdamW beta2')
    g.add_argument('--max-steps', type=input_checks.positive_int, default=2000, help='optimizer steps (the cosine schedule spans them)')
    g.add_argument('--max-minutes', type=input_checks.positive_float, default=None, help='stop, save and exit after this long')
    g.add_argument('--fit-schedule', action='store_true',
                   help='--max-minutes: a run that would not finish in time gets a cosine that ends in time (training.TimeLimit) '
                        'instead of being cut at its current rate (on a tiny model early in training, the cut run had the '
                        'lower loss: docs/RESULTS.md)')
    g.add_argument('--save-steps', type=input_checks.positive_int, default=250, help='checkpoint interval')
    g.add_argument('--num-workers', type=input_checks.nonnegative_int, default=4, help='DataLoader workers formatting samples')
    g.add_argument('--seed', type=int, default=0, help='seed of the model, the data order and augmentation')
    g.add_argument('--save-model-path', default=os.path.join(REPO, 'models', 'ArcMini'), help='output model directory')
    g.add_argument('--max-shard-mb', type=input_checks.positive_int, default=None,
                   help='save the weights in shards of at most this many MB (e.g. 15, to bring them back from a lent machine)')
    g.add_argument('--smoke', action='store_true', help='seconds on CPU: tiny model, 3 steps')
    return p


def settings(flags=()):
    """The recipe's settings: its defaults, changed by `flags` (a list of its command-line flags)."""
    return arg_parser().parse_args(list(flags))


def training_tasks(args):
    """The held-out test-time training set (--ttt-challenges: its demonstration pairs only), else the pretraining pool."""
    if args.ttt_challenges:
        return ArcDataset.load_from_json(args.ttt_challenges).remove_test_data()
    return pretraining_tasks(args)


def pretraining_tasks(args):
    """The task pool: ARC-AGI-1 training, leakage-free ARC-AGI-2 training, ARC-AGI-1 evaluation demonstrations,
    --rearc-samples re-arc samples per ARC-AGI-1 training task, and nothing that shares a grid pair with the
    ARC-AGI-2 evaluation set (held out: the Kaggle case; re-arc shares none with ARC-AGI-1 evaluation either).

    The evaluation demonstrations keep their task ids as names (their task tokens are the ones the evaluation
    looks up), as do the re-arc samples ('rearc-<task id>~<draw>': with --task-tokens, the draws of a task share one
    token); the other parts' names get the part as a prefix
    (ARC-AGI-2 re-uses ARC-AGI-1 ids)."""
    arc1_train, arc1_eval = load_arc('training'), load_arc('evaluation')
    arc2_eval = load_arc('evaluation', 'arc-prize-2025')
    held_out = lambda ds, name: exclude_overlapping(ds, arc2_eval, f'{name} (vs ARC-AGI-2 eval, held out)')  # noqa: E731
    parts = {'arc1-train': held_out(arc1_train, 'ARC-AGI-1 training').move_test_to_train()}
    if args.arc2:
        arc2 = exclude_overlapping(load_arc('training', 'arc-prize-2025'), arc1_eval, 'ARC-AGI-2 training (vs ARC-AGI-1 eval)')
        arc2 = exclude_overlapping(arc2, arc1_train, 'ARC-AGI-2 training (vs ARC-AGI-1 training, duplicates)')
        arc2 = held_out(arc2, 'ARC-AGI-2 training')
        parts['arc2-train'] = ArcDataset(arc2.challenge, arc2.solutions, arc2.keys).move_test_to_train()
    if args.eval_demos:
        parts[EVAL_DEMOS] = held_out(arc1_eval, 'ARC-AGI-1 evaluation').remove_test_data()
    if args.rearc_samples:
        parts[REARC] = rearc_samples(args, {'ARC-AGI-1 eval': arc1_eval, 'ARC-AGI-2 eval': arc2_eval})
    keep = (EVAL_DEMOS, REARC)
    challenge = {(k if name in keep else f'{name}-{k}'): v for name, ds in parts.items() for k, v in ds.challenge.items()}
    for name, ds in parts.items():
        print(f'{name}: {len(ds.challenge)} tasks')
    return ArcDataset(challenge, {}, sorted(challenge))


def rearc_samples(args, evaluation_sets):
    """--rearc-samples draws per re-arc task (--rearc-sizes demonstrations + 1 pair, all trained on as a task's
    demonstrations are), none sharing a grid pair with the evaluation sets."""
    if not os.path.exists(os.path.join(args.rearc_path, 'metadata.json')):
        raise input_checks.InputError(f'--rearc-path {args.rearc_path}: no re-arc data (metadata.json); see '
                                      'docs/RECIPES.md, Data')
    try:
        data = ArcDataset.load_from_rearc(args.rearc_path, n=args.rearc_samples, sizes=args.rearc_sizes,
                                          seed=args.seed, shuffle=False)
    except ArcDataError as e:  # more draws than a task's examples hold (250 a task: 22 draws of 6 + 1 at most)
        raise input_checks.InputError(f'--rearc-samples {args.rearc_samples}: {e}')
    for name, ev in evaluation_sets.items():
        data = exclude_overlapping(data, ev, f're-arc samples (vs {name})')
    return data.move_test_to_train()


def pool_task_ids(tasks, evaluation):
    """Task ids in token order: the evaluation tasks' first (the rows the saved model keeps), then the rest."""
    return sorted(tasks.challenge, key=lambda t: (t not in evaluation, t))


def eval_task_ids():
    return set(load_arc('evaluation').challenge)


def epoch_tasks(tasks, args, epoch):
    """The pool of one epoch: every task, but of each re-arc task only --rearc-per-epoch of its draws, the next
    ones in turn (draw d is in epoch e when (d - e * per_epoch) mod --rearc-samples < per_epoch)."""
    per_epoch, n = args.rearc_per_epoch, args.rearc_samples
    if not per_epoch or per_epoch >= n:
        return tasks

    def kept(key):
        base = get_base_key(key)
        return DRAW_SEP not in base or (int(base.rsplit(DRAW_SEP, 1)[1], 16) - epoch * per_epoch) % n < per_epoch
    return tasks.change_keys([k for k in tasks.keys if kept(k)])


def epoch_cycle(args):
    """Epochs after which epoch_tasks repeats itself."""
    per_epoch, n = args.rearc_per_epoch, args.rearc_samples
    return n // math.gcd(n, per_epoch) if per_epoch and per_epoch < n else 1


def bucketed_epochs(tasks, args, n_batches_per_bucket=32):
    """Epochs of augmented keys, shuffled, sorted by length inside buckets and cut into whole batches (a bucket's
    remainder moves on to the next bucket, so that every batch of the key list is one run of similar lengths),
    the batches of a bucket in random order: batches pad little."""
    rng = np.random.default_rng(args.seed)
    length = {b: count_tokens(tasks.fmt_task(b, **fmt_options(args))['text']) for b in tasks.challenge}
    keys, carry = [], []
    for epoch in range(args.epochs):
        aug = epoch_tasks(tasks, args, epoch).augment(seed=args.seed * 100003 + epoch, **augmentation(args)).keys
        aug = [aug[i] for i in rng.permutation(len(aug))]
        size = args.batch_size * n_batches_per_bucket
        for start in range(0, len(aug), size):
            bucket = sorted(carry + aug[start:start + size], key=lambda k: length[get_base_key(k)])
            whole = len(bucket) - len(bucket) % args.batch_size
            bucket, carry = bucket[:whole], bucket[whole:]
            batches = [bucket[i:i + args.batch_size] for i in range(0, whole, args.batch_size)]
            keys += [k for i in rng.permutation(len(batches)) for k in batches[i]]
    return tasks.change_keys(keys)


def fmt_options(args):
    return dict(FMT, task_token=args.task_tokens)


def augmentation(args):
    """Every sample: one random symmetry, all 10 colours permuted, shuffled examples (and the task token dropout)."""
    return dict(tp=True, rt=True, perm=True, shfl_ex=True, no_task_token=args.task_token_dropout * args.task_tokens)


def length_bounds(tasks, tok, max_tokens, fmt=FMT):
    """Token count of each key's samples at most: a symmetry of the square keeps or transposes every grid (the
    two counts), colours, example order and which task token change nothing, and examples are dropped to fit."""
    def n(key):
        return len(tok(tasks.fmt_task(key, **fmt)['text'])['input_ids'])
    return {k: min(max(n(k), n(k + '.tp')), max_tokens + 1) for k in tasks.keys}  # + 1: the BOS token


def packed_rows(tasks, args, tok, world=1):
    """Epochs of augmented keys (the padded path's augmentations), each epoch shuffled, cut in order into rows of
    --row-tokens (next fit on the length bounds); --epochs default: enough rows for --max-steps on `world` GPUs."""
    bound = length_bounds(tasks, tok, args.max_tokens, fmt_options(args))
    per_epoch = min(sum(bound[k] for k in epoch_tasks(tasks, args, e).keys) for e in range(epoch_cycle(args)))
    epochs = args.epochs or math.ceil(1.03 * args.max_steps * world * args.row_tokens / per_epoch) + 1
    rng, keys = np.random.default_rng(args.seed), []
    for epoch in range(epochs):
        aug = epoch_tasks(tasks, args, epoch).augment(seed=args.seed * 100003 + epoch, **augmentation(args)).keys
        keys += [aug[i] for i in rng.permutation(len(aug))]
    lengths = [bound[k.split('.')[0]] for k in keys]
    rows = packing.plan_rows(lengths, args.row_tokens)
    fill = sum(lengths) / (len(rows) * args.row_tokens)
    print(f'{len(keys)} samples over {epochs} epochs in {len(rows)} rows of {args.row_tokens} tokens '
          f'(at least {fill:.1%} filled by the length bounds)')
    if args.max_steps * world > len(rows):
        print(f'WARNING: {args.max_steps} steps x {world} GPUs need more than the {len(rows)} rows of {epochs} '
              'epochs: later steps re-read the same rows (raise --epochs)')
    return packing.PackedRows(training.FormattedKeys(tasks.change_keys(keys), tok, fmt_options(args), args.max_tokens), rows)


def padded_batches(tasks, args, tok, world=1):
    """ArcMini v2's data: length-bucketed padded batches of --batch-size sequences (--epochs: set by `resolved`)."""
    data = bucketed_epochs(tasks, args)
    print(f'{len(data.keys)} samples over {args.epochs} epochs')
    if args.max_steps * args.batch_size * world > len(data.keys):
        print(f'WARNING: {args.max_steps} steps of {args.batch_size} x {world} sequences need more than the '
              f'{len(data.keys)} samples of {args.epochs} epochs: later steps re-read the same augmented samples '
              '(raise --epochs)')
    return training.FormattedKeys(data, tok, fmt_options(args), args.max_tokens)


def resolved(args, tok):
    """The settings as this run uses them, a copy: --init-model's tokenizer decides --task-tokens, and padded
    batches default to 260 epochs (2000 steps of 4 x 32)."""
    epochs = args.epochs or (None if args.packing else 260)
    task_tokens_on = task_tokens.enabled(tok) if args.init_model else args.task_tokens
    return argparse.Namespace(**dict(vars(args), epochs=epochs, task_tokens=task_tokens_on))


def initial_model(args, tasks):
    """A fresh model (task tokens for the pool when asked), or --init-model with rows for the pool's new tasks (its
    task tokens decide --task-tokens)."""
    if args.init_model:
        model, tok = model_tools.load_model(args.init_model, backend='transformers', dtype=torch.float32)
        new = task_tokens.add_missing(model, tok, tasks.challenge)
        print(f'{args.init_model}: task tokens {"on" if task_tokens.enabled(tok) else "off"}, {new} new '
              f'(vocabulary {len(tok)})')
        return model, tok
    tok = model_tools.arc_tokenizer()
    if args.task_tokens:
        new = task_tokens.add_tokens(tok, pool_task_ids(tasks, eval_task_ids()))  # the generic token first
        print(f'task tokens: {len(new) - 1} for {len(tasks.challenge)} tasks (the draws of a re-arc task share one) '
              f'and the generic one (vocabulary {len(tok)})')
    model = grid_positions.create_grid_model(tok, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                             num_heads=args.num_heads, head_dim=args.hidden_size // args.num_heads,
                                             intermediate_size=args.intermediate_size,
                                             max_position_embeddings=args.max_tokens, seed=args.seed)
    return model, tok


def train(tasks, args, callbacks=(), save=True):
    """Train ArcMini on `tasks` (an ArcDataset: the pool, or the demonstration pairs of the tasks to solve) with the
    recipe's settings `args` (see `arg_parser`); returns the saved model's directory, --save-model-path.
    `callbacks`: more Trainer callbacks (the training benchmark's step timer); save=False: keep nothing (timing)."""
    start = time.time()
    model, tok = initial_model(args, tasks)
    args = resolved(args, tok)
    print(f'ArcMini: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters')
    world = int(os.environ.get('WORLD_SIZE', 1))
    batches = dict(grad_accum=1, max_steps=args.max_steps, mask_first_n_examples=1, sequential=True,
                   num_workers=args.num_workers)
    if args.packing:
        data = packed_rows(tasks, args, tok, world)
        batches = training.BatchSettings(batch_size=1, packing=args.row_tokens, **batches)
        kernels = training.KernelSettings(torch_compile=args.compile and torch.cuda.is_available())
        tokens_per_step = args.row_tokens * world
    else:
        data, tokens_per_step = padded_batches(tasks, args, tok, world), None
        batches, kernels = training.BatchSettings(batch_size=args.batch_size, **batches), training.KernelSettings()
    trainer = training.train_model(
        model, tok, data, args.save_model_path + '-checkpoints', optimizer_settings(args), batches,
        training.RunSettings(save_steps=args.save_steps, max_minutes=args.max_minutes, fit_schedule=args.fit_schedule,
                             logging_steps=25, seed=args.seed), kernels,
        callbacks=[training.ProgressLog(tokens_per_step), *callbacks])
    if save and trainer.is_world_process_zero():
        save_trained(trainer, tok, tasks, args, minutes=(time.time() - start) / 60)
    return args.save_model_path


def optimizer_settings(args):
    """The recipe's optimizer: AdamW at one learning rate for every weight, warmup steps, cosine."""
    return training.OptimizerSettings(lr=args.lr, embedding_lr=args.lr, warmup_steps=args.warmup_steps,
                                      scheduler='cosine', weight_decay=args.weight_decay, optim='adamw_torch',
                                      betas=(0.9, args.adam_beta2))


def save_trained(trainer, tok, tasks, args, minutes):
    """The trained model in bf16 on a GPU (float32 on a CPU), with its tokenizer and run_config.json; a fresh model
    with task tokens keeps only the evaluation tasks' rows."""
    settings = dict(vars(args), fmt=fmt_options(args), steps=trainer.state.global_step, minutes=minutes,
                    world_size=trainer.args.world_size, device=run_record.device_name())
    if args.task_tokens and not args.init_model:  # the pool's rows are of no use after training: keep the evaluation tasks'
        evaluation = eval_task_ids()
        kept = [t for t in pool_task_ids(tasks, evaluation) if t in evaluation]
        tok = task_tokens.keep_first(trainer.model, tok, model_tools.arc_tokenizer, kept)
    model_tools.save_model_and_tokenizer(args.save_model_path, model_tools.in_saving_dtype(trainer.model), tok,
                                         settings, max_shard_mb=args.max_shard_mb)
    print(f'saved {args.save_model_path} after {trainer.state.global_step} steps')
