"""The evaluation run shared by the run_evaluation_<model>.py scripts: load the model, test-time train on the
demonstration pairs, generate candidates over augmented views, score them under other views (product of
experts), select two attempts, write submission.json, results.json and a report.

Each script only sets its recipe's defaults in `evaluation_arg_parser` and calls `script_main`.
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import arc_loader
import batched_dfs
import candidates
import input_checks
import model_tools
import per_task_ttt
import run_record
import selection
import task_tokens
import training
from arc_downloader import arc_paths
from run_record import write_json
from search import SAMPLERS, Engine, Prompts, Search, format_options, resolve_engine


def evaluation_arg_parser(doc, **recipe):
    """All knobs of an evaluation run; `recipe` sets the defaults of one run_evaluation_<model>.py script (the
    search's own defaults are search.Search's)."""
    p = input_checks.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    _search_flags(p.add_argument_group('search: what the candidates are and how they are scored and selected'), recipe)
    _engine_flags(p.add_argument_group('engine: speed only, the same candidates (defaults from the device and '
                                       'the sampler, search.resolve_engine)'))
    _ttt_flags(p.add_argument_group('test-time training on the demonstration pairs'), recipe)
    _run_flags(p.add_argument_group('run: paths, model, outputs, budget'), recipe)
    p.set_defaults(smoke_grid=recipe.get('smoke_grid', False), batched_per_task_ttt=recipe.get('batched_per_task_ttt', False))
    return p


def _search_flags(g, recipe):
    """The fields of search.Search, and --selection."""
    d, pos_int, views = Search(), input_checks.positive_int, input_checks.MAX_VIEWS
    g.add_argument('--sampler', default=recipe.get('sampler', d.sampler), choices=list(SAMPLERS), help='DFS or a generate() baseline')
    g.add_argument('--min-prob', type=input_checks.dfs_threshold, default=recipe.get('min_prob', d.min_prob), help='DFS: keep every reply above this probability')
    g.add_argument('--num-beams', type=pos_int, default=d.num_beams, help='beam search width (--sampler beam)')
    g.add_argument('--n-views', type=input_checks.int_between(1, views), default=recipe.get('n_views', d.n_views), help='augmented views per test input (8 D8 x colour/example permutations)')
    g.add_argument('--aug-seed', type=int, default=d.aug_seed, help='seed of the generation views')
    g.add_argument('--n-score-views', type=input_checks.int_between(0, views), default=recipe.get('n_score_views', d.n_score_views),
                   help='views ("experts") scoring every candidate (0: none, for a selection by generation probability)')
    g.add_argument('--score-seed', type=int, default=d.score_seed, help='seed of the scoring views')
    g.add_argument('--selection', default=recipe.get('selection', 'mul_all_prob'), choices=list(selection.score_algos),
                   help='selection.py score that orders the attempts (default: %(default)s)')


def _engine_flags(g):
    """The fields of search.Engine: they change only the speed."""
    d, pos_int, nonneg_int = Engine(), input_checks.positive_int, input_checks.nonnegative_int
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument('--batch-views', action=bool_flag, default=d.batch_views,
                   help='batched DFS or greedy: all views of many tasks per search (same results as batch-1; default: on a '
                        'GPU, and on a CPU for --sampler greedy; on 2 CPU cores batch-1 DFS with guesses is faster)')
    g.add_argument('--guess-views', action=bool_flag, default=d.guess_views,
                   help="batched DFS or greedy: search each test input's first view, then its other views following the first view's "
                        "best grid first (guessed continuations: the same candidates up to bf16 rounding; speed only, and slower "
                        "on one H200: greedy, 400 tasks, 8 views, 102 s of generation against 62 s)")
    g.add_argument('--pass-guess', action=bool_flag, default=d.pass_guess, help='batch-1 DFS: follow the best reply so far first')
    g.add_argument('--batch-scores', action=bool_flag, default=d.batch_scores,
                   help='score the candidates of many tasks in batched forwards (same NLLs as batch-1 within float error; '
                        'default: on a GPU only, on 2 CPU cores scoring each test input on its own is faster)')
    sized = ' (default: from the free GPU memory, batched_dfs.default_memory; CPU: %s)'
    cpu = batched_dfs.CPU_MEMORY
    g.add_argument('--batch-size', type=pos_int, default=d.batch_size, help='batched DFS and scoring: rows per forward pass'
                   + sized % cpu['batch_size'])
    g.add_argument('--kv-cache-gb', type=input_checks.positive_float, default=d.kv_cache_gb, help='batched DFS and scoring: '
                   'KV cache of one group of prompts, the peak is about 2.5x' + sized % cpu['kv_cache_gb'])
    g.add_argument('--prefill-tokens', type=pos_int, default=d.prefill_tokens, help='batched DFS and scoring: tokens per '
                   'prefill forward' + sized % cpu['prefill_tokens'])
    g.add_argument('--decode-graphs', action=bool_flag, default=d.decode_graphs,
                   help='batched DFS and greedy: each decode step on fixed shapes (the KV buffers attended to whole), '
                        'captured as a CUDA graph and replayed (batched_dfs._FixedStep; the same candidates; one H100, '
                        '400 tasks: generation 1.4 to 1.6 times faster, docs/SPEED.md; default: on a GPU, off on a CPU)')
    g.add_argument('--prefetch-tasks', type=nonneg_int, default=d.prefetch_tasks, help='batched DFS: search this many tasks '
                   'at once (shared model; 0: one test input at a time)' + sized % cpu['prefetch_tasks'])
    g.add_argument('--score-batch-size', type=pos_int, default=d.score_batch_size, help='batch-1 scoring: replies per forward')


def _ttt_flags(g, recipe):
    """Test-time training: TTTSettings, and --ttt full's trainer."""
    add = lambda name, **kw: g.add_argument(name, **kw)  # noqa: E731
    pos_int, nonneg_int = input_checks.positive_int, input_checks.nonnegative_int
    add('--ttt', default=recipe.get('ttt', 'none'), choices=['none', 'shared', 'per_task', 'full', 'full+per_task'],
        help='none, one adapter for all tasks (2024), a fresh adapter per task (paper; ArcMini: batched over tasks, '
             'per_task_ttt.py, --per-task-ttt-*), or full: the whole model trains on the demonstration pairs of the '
             'tasks to solve, the held-out protocol (recipes with a full-model trainer: ArcMini); full+per_task: '
             'full, then per task (ArcMini)')
    add('--ttt-copies', type=input_checks.int_between(1, input_checks.MAX_TTT_COPIES), default=recipe.get('ttt_copies', 48), help='shared: repeats of each task (one random D8 view each); per_task: copies of the 8 D8 views')
    add('--ttt-r', type=input_checks.int_between(1, input_checks.MAX_LORA_RANK), default=recipe.get('ttt_r', 64), help='LoRA rank')
    add('--ttt-alpha', type=pos_int, default=recipe.get('ttt_alpha', 16), help='LoRA alpha (rsLoRA)')
    add('--ttt-batch-size', type=pos_int, default=recipe.get('ttt_batch_size', 2), help='per-device batch size')
    add('--ttt-grad-accum', type=pos_int, default=recipe.get('ttt_grad_accum', 2), help='gradient accumulation steps')
    add('--ttt-lr', type=input_checks.positive_float, default=recipe.get('ttt_lr', 1e-4), help='LoRA learning rate')
    add('--ttt-embedding-lr', type=input_checks.nonnegative_float, default=recipe.get('ttt_embedding_lr', 1e-5), help='learning rate of embed_tokens and lm_head')
    add('--ttt-warmup-ratio', type=input_checks.fraction, default=recipe.get('ttt_warmup_ratio', 0.25), help='warmup fraction (ignored if --ttt-warmup-steps)')
    add('--ttt-warmup-steps', type=nonneg_int, default=recipe.get('ttt_warmup_steps', 0), help='warmup steps')
    add('--ttt-weight-decay', type=input_checks.nonnegative_float, default=0.0, help='weight decay')
    add('--ttt-optim', default='adamw_8bit', help="optimizer ('adamw_8bit' falls back to adamw_torch without CUDA)")
    add('--ttt-mask-first', type=nonneg_int, default=recipe.get('ttt_mask_first', 0), help='demonstration outputs not trained on, from the first')
    add('--ttt-max-steps', type=input_checks.steps_or_all, default=-1, help='stop TTT after this many steps (-1: one epoch)')
    add('--ttt-max-minutes', type=input_checks.positive_float, default=None,
        help='stop each TTT run after this many minutes, its schedule unfinished, and go on: a time budget '
             'covers TTT too (the notebooks pass a share of theirs; default: no limit)')
    add('--full-ttt-steps', type=pos_int, default=recipe.get('full_ttt_steps', 2000),
        help='--ttt full: optimizer steps of packed rows (default: %(default)s)')
    add('--full-ttt-lr', type=input_checks.positive_float, default=recipe.get('full_ttt_lr', 3e-4),
        help='--ttt full: peak learning rate, cosine schedule (default: %(default)s)')
    add('--full-ttt-warmup-steps', type=nonneg_int, default=recipe.get('full_ttt_warmup_steps', 100),
        help='--ttt full: linear warmup steps (default: %(default)s)')
    add('--full-ttt-args', default='', help="--ttt full: more flags for run_finetuning_ArcMini.py, one string "
        "(e.g. '--num-workers 12 --seed 1'; its seed is 0 unless given here)")
    _per_task_ttt_flags(add, recipe)


def _per_task_ttt_flags(add, recipe):
    """The batched per-task TTT (per_task_ttt.Settings; recipes with `batched_per_task_ttt`: ArcMini); its
    seed is --seed, its LoRA alpha --ttt-alpha, its masked outputs --ttt-mask-first, its time limit
    --ttt-max-minutes."""
    pos_int, pt, d = input_checks.positive_int, 'batched --ttt per_task', per_task_ttt.Settings()
    add('--per-task-ttt-train', default=recipe.get('per_task_ttt_train', d.train), choices=list(per_task_ttt.MODES),
        help=f"{pt}: what each task trains: its task token's embedding row, a LoRA of its own, or its own copy of "
             "every linear layer but the head, full (default: %(default)s)")
    add('--per-task-ttt-steps', type=input_checks.int_between(1, input_checks.MAX_TTT_STEPS), default=recipe.get('per_task_ttt_steps', d.steps),
        help=f'{pt}: optimizer steps, every task the same (default: %(default)s)')
    add('--per-task-ttt-lr', type=input_checks.positive_float, default=recipe.get('per_task_ttt_lr', d.lr),
        help=f'{pt}: peak learning rate, cosine schedule (default: ' + ', '.join(
            f'{v:g} {k}' for k, v in per_task_ttt.DEFAULT_LR.items()) + ')')
    add('--per-task-ttt-copies', type=input_checks.int_between(1, input_checks.MAX_TTT_COPIES), default=recipe.get('per_task_ttt_copies', d.copies),
        help=f'{pt}: copies of the 8 D8 views of each leave-one-out query (default: %(default)s)')
    add('--per-task-ttt-batch-size', type=input_checks.int_between(1, input_checks.MAX_TTT_BATCH), default=recipe.get('per_task_ttt_batch_size', d.batch_size),
        help=f"{pt}: samples of each task per step (default: %(default)s)")
    add('--per-task-ttt-r', type=input_checks.int_between(1, input_checks.MAX_LORA_RANK),
        default=recipe.get('per_task_ttt_r', d.r), help=f'{pt}: LoRA rank (default: %(default)s)')
    add('--per-task-ttt-tasks', type=pos_int, default=recipe.get('per_task_ttt_tasks', d.tasks_per_group),
        help=f'{pt}: tasks trained together (memory: full needs about 0.24 GB a task for ArcMini); a group cut by '
             'the time limit stays on the base model (default: %(default)s)')
    add('--per-task-adapters', default=None, help=argparse.SUPPRESS)  # the per-task LoRAs or layers, for the workers


def _run_flags(g, recipe):
    """Paths, the model and how it loads, outputs, seeds, GPUs and the time budget."""
    add = lambda name, **kw: g.add_argument(name, **kw)  # noqa: E731
    pos_int = input_checks.positive_int
    add('--model', default=recipe['model'], help='model directory or hub id (default: %(default)s)')
    add('--challenges', default=None, help='Kaggle-format challenges json (default: ARC-AGI-1 evaluation in input/)')
    add('--solutions', default=None, help='solutions json for scoring (default: the one beside --challenges, if any)')
    add('--output-dir', default=recipe['output_dir'], help='run directory: cache, adapter, submission (default: %(default)s)')
    add('--n-tasks', type=pos_int, default=None, help='only the first N tasks in id order (default: all)')
    add('--skip-bad', action='store_true', help='leave out malformed tasks (with a warning) instead of stopping')
    add('--backend', default=recipe.get('backend', 'auto'), choices=['auto', 'unsloth', 'transformers'], help='loader (auto: unsloth on CUDA if installed; default: %(default)s)')
    add('--load-in-4bit', action=argparse.BooleanOptionalAction, default=recipe.get('load_in_4bit', True), help='4-bit weights (CUDA only)')
    add('--max-tokens', type=pos_int, default=recipe.get('max_tokens', 8192), help='prompt + reply token limit; examples are dropped to fit')
    add('--preprompt', default=recipe.get('preprompt', arc_loader.PREPROMPT), help='text before the first example (the seed: 48 letters)')
    add('--report', action=argparse.BooleanOptionalAction, default=True, help='write report/ (pictures and tables)')
    add('--report-only-failed', action='store_true', help='pictures only for tasks not solved')
    add('--seed', type=input_checks.nonnegative_int, default=42, help='seed of TTT data and training')
    add('--gpus', type=pos_int, default=None, help='split the tasks over this many GPUs, one process each (default: all visible)')
    add('--time-budget-s', type=input_checks.nonnegative_float, default=None, help='wall-clock budget: tasks not started in time get fallback attempts')
    add('--deadline', type=float, default=None, help=argparse.SUPPRESS)  # absolute time, passed to the workers
    add('--shard', default=None, help=argparse.SUPPRESS)  # 'i/n': set for the worker processes of a multi-GPU run
    add('--smoke', action='store_true', help='seconds-long CPU run: tiny local model, 2 tasks, few views')
    add('--debug', action='store_true', help='an input error shows its traceback, not only its one line')


def script_main(doc, recipe, script, argv=None, cpu_tasks=None, *, smoke_overrides):
    """The body of every run_evaluation_<model>.py: parse with the recipe's defaults, smoke or not, check, run.

    Every argument and path is checked before the model loads; an input error (argument, path, ARC file, a
    second run in the same --output-dir) ends the script with status 2 and one line (--debug: the traceback).
    cpu_tasks: without a GPU, the default evaluation set is cut to its first cpu_tasks tasks (a file given with
    --challenges is always solved whole). smoke_overrides (smoke.evaluation_run) shrinks a --smoke run; the script
    passes it, so that this library module never imports smoke.py. --ttt full is refused unless the recipe says
    `full_ttt=True` (a model arcmini.train can go on training: ArcMini), --ttt full+per_task unless it also says
    `batched_per_task_ttt=True` (per_task_ttt.py, which --ttt per_task then uses too).
    """
    parser = evaluation_arg_parser(doc, **recipe)
    args = parser.parse_args(argv)
    try:
        if args.smoke:
            smoke_overrides(args)
        elif cpu_tasks and args.n_tasks is None and args.challenges is None and not _visible_gpus():
            args.n_tasks = cpu_tasks
            print(f'no GPU: evaluating the first {cpu_tasks} tasks only (--n-tasks for more)')
        input_checks.check_model_path(args.model)
        input_checks.check_scoring(args.n_score_views, args.selection, selection.SCORES_WITHOUT_SCORING_VIEWS)
        input_checks.check_token_budget(args.max_tokens, arc_loader.max_new_tokens())
        input_checks.check_output_dir(args.output_dir, report=args.report)
        input_checks.check_shell_words('--full-ttt-args', args.full_ttt_args)
        if 'per_task' in args.ttt and args.batched_per_task_ttt and args.per_task_ttt_train == 'lora':
            input_checks.check_lora_rank('--per-task-ttt-r', args.per_task_ttt_r, args.model)
        trainers = {'full': recipe.get('full_ttt'), 'full+per_task': recipe.get('full_ttt') and args.batched_per_task_ttt}
        if not trainers.get(args.ttt, True):
            raise input_checks.InputError(f'--ttt {args.ttt}: {os.path.basename(script)} has no full-model trainer '
                                          '(or no batched per-task one; ArcMini has both: run_evaluation_ArcMini.py)')
        # the parent of a multi-GPU run holds the lock for its workers
        with input_checks.output_dir_lock(args.output_dir) if args.shard is None else contextlib.nullcontext():
            return run_evaluation(args, script=os.path.abspath(script), argv=argv if argv is not None else sys.argv[1:])
    except (input_checks.InputError, arc_loader.ArcDataError) as e:
        if args.debug:
            raise
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    except KeyboardInterrupt:
        if args.debug:
            raise
        parser.exit(130, f'\n{parser.prog}: interrupted. The searches and scores finished so far are saved in '
                         f'{os.path.join(args.output_dir, "inference_cache")}: the same command resumes from them.\n')


def eval_files(challenges=None, solutions=None):
    """(challenges file, solutions file or None): the ARC-AGI-1 evaluation set in input/ by default; a solutions
    file beside a `*_challenges*` file is found by name."""
    if challenges is None:
        challenges, default_solutions = arc_paths('evaluation')
        return challenges, solutions or default_solutions
    if solutions is None and '_challenges' in challenges:
        guess = challenges.replace('_challenges', '_solutions')
        solutions = guess if os.path.exists(guess) else None
    return challenges, solutions


def load_eval_dataset(challenges, solutions=None, n_tasks=None, skip_bad=False):
    """The tasks to solve (the first n_tasks ids of the file) and their solutions when a solutions file is given;
    a malformed task raises arc_loader.ArcDataError, or with skip_bad is left out with a warning (the submission
    still answers it, with fallback attempts: write_submission)."""
    dataset = arc_loader.ArcDataset.load_from_json(challenges, skip_bad=skip_bad)
    if n_tasks is not None:  # the first ids of the file, malformed ones included: the tasks the submission answers
        dataset = dataset.only_tasks(arc_loader.submission_slots(challenges, n_tasks))
    if not dataset.challenge:
        named = len(arc_loader.submission_slots(challenges, n_tasks))
        raise arc_loader.ArcDataError(f'{challenges}: no tasks to solve ' + (f'(all {named} are malformed)' if named
                                                                              else '(the file holds none)'))
    if solutions is not None:
        dataset = dataset.load_solutions(solutions, skip_bad=skip_bad)
        unscored = len(dataset.challenge) - len(dataset.solutions)
        if unscored:
            print(f'{unscored} tasks without valid solutions in {solutions}: solved, and scored as not solved')
    print(f'{len(dataset.challenge)} tasks, {len(dataset.keys)} test inputs from {challenges}'
          + (f' (solutions: {solutions})' if solutions else ' (no solutions: not scored)'))
    return dataset


# ---- settings of the stages ----------------------------------------------------------------------

def settings_from_args(cls, args):
    """A frozen group of settings (ModelSettings, TTTSettings, search.Search, search.Engine) from the parsed
    arguments of `evaluation_arg_parser` named as its fields; a field without a flag (Engine.cache_only, set by
    the run) keeps its default."""
    given = vars(args)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})


class _FromArgs:
    """A group of settings whose fields are named as the arguments of `evaluation_arg_parser` (one default each,
    there)."""

    @classmethod
    def from_args(cls, args):
        """The fields of this group, from the parsed arguments of the same names."""
        return settings_from_args(cls, args)


@dataclasses.dataclass(frozen=True)
class ModelSettings(_FromArgs):
    """Which model, how it is loaded, and the prompt format around it."""
    model: str
    backend: str
    load_in_4bit: bool
    max_tokens: int
    preprompt: str
    per_task_adapters: str = None  # a folder of per-task LoRAs or layers (per_task_ttt.py), merged task by task in the search


@dataclasses.dataclass(frozen=True)
class TTTSettings(_FromArgs):
    """Test-time training; `asdict` of it (every --ttt* flag and --seed) is part of the per-task cache key and
    of the saved adapter's run_config.json."""
    ttt: str
    ttt_copies: int
    ttt_r: int
    ttt_alpha: int
    ttt_batch_size: int
    ttt_grad_accum: int
    ttt_lr: float
    ttt_embedding_lr: float
    ttt_warmup_ratio: float
    ttt_warmup_steps: int
    ttt_weight_decay: float
    ttt_optim: str
    ttt_mask_first: int
    ttt_max_steps: int
    seed: int
    ttt_max_minutes: float = None  # a time limit, like run time not part of the adapter's identity

    def identity(self):
        """What names the adapter: every field but the time limit (the per-task cache key, run_config.json)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != 'ttt_max_minutes'}


def load_model(spec, dataset):
    """The model and tokenizer; a model with task tokens gets a copy of its generic row for each task it lacks."""
    model, tok = model_tools.load_model(spec.model, backend=spec.backend, load_in_4bit=spec.load_in_4bit,
                                        max_seq_length=spec.max_tokens)
    input_checks.check_encodable('--preprompt', spec.preprompt, tok)
    new = task_tokens.add_missing(model, tok, dataset.challenge)
    if new:
        print(f'task tokens: {new} of {len(dataset.challenge)} tasks are new to the model (generic row copied)')
    return model, tok


# ---- test-time training --------------------------------------------------------------------------

def ttt_texts(dataset, bases, ttt, max_tokens, fmt_opts, per_task):
    """Training texts from the demonstration pairs only (the test outputs are never seen)."""
    demos = arc_loader.ArcDataset({b: dataset.challenge[b] for b in bases}).remove_test_data()
    if per_task:  # the paper: the 8 symmetries x n copies, each with its own colours and example order
        aug = demos.augment(ttt.seed, tp='all', rt='all', n=ttt.ttt_copies, perm=True, shfl_ex=True)
    else:  # 2024: n repeats of every task, one random symmetry each
        aug = demos.repeat(ttt.ttt_copies, seed=ttt.seed).augment(ttt.seed, tp=True, rt=True, perm=True, shfl_ex=True)
    aug = aug.repeat(1, seed=ttt.seed)  # shuffled
    texts, too_long = aug.texts_within(max_tokens, **fmt_opts)
    if too_long:
        print(f'TTT: {too_long} of {len(aug.keys)} samples left out: longer than {max_tokens} tokens even with one '
              'demonstration')
    return texts


def train_ttt_adapter(model, tok, texts, ttt, backend, output_dir, resume):
    """A fresh LoRA (embeddings in full) trained on the texts; returns the peft model."""
    model = model_tools.get_peft_model_arc(model, r=ttt.ttt_r, lora_alpha=ttt.ttt_alpha, seed=ttt.seed,
                                           backend=backend)
    training.train_model(
        model, tok, texts, output_dir,
        training.OptimizerSettings(lr=ttt.ttt_lr, embedding_lr=ttt.ttt_embedding_lr, warmup_ratio=ttt.ttt_warmup_ratio,
                                   warmup_steps=ttt.ttt_warmup_steps or None, weight_decay=ttt.ttt_weight_decay,
                                   optim=ttt.ttt_optim),
        training.BatchSettings(batch_size=ttt.ttt_batch_size, grad_accum=ttt.ttt_grad_accum, epochs=1,
                               max_steps=ttt.ttt_max_steps, mask_first_n_examples=ttt.ttt_mask_first),
        training.RunSettings(save_steps=200 if resume else 10**9, resume=resume, max_minutes=ttt.ttt_max_minutes,
                             logging_steps=50, seed=ttt.seed))
    if torch.cuda.is_available():  # the training's cached blocks back to the card, for the search's KV cache (and
        gc.collect()               # another process on the same card)
        torch.cuda.empty_cache()
    return model


def shared_ttt(model, tok, dataset, ttt, spec, fmt_opts, output_dir):
    """One adapter for all tasks (2024), saved in the run directory and reused when the run is restarted."""
    path = os.path.join(output_dir, 'finetuned_model')
    if os.path.exists(os.path.join(path, run_record.RUN_CONFIG)):
        print(f'TTT: loading the adapter trained earlier from {path}')
        return model_tools.load_adapter(model, path)
    texts = ttt_texts(dataset, sorted(dataset.challenge), ttt, spec.max_tokens, fmt_opts, per_task=False)
    print(f'TTT: {len(texts)} samples from the demonstration pairs of {len(dataset.challenge)} tasks')
    model = train_ttt_adapter(model, tok, texts, ttt, spec.backend, path + '-checkpoints', resume=True)
    model_tools.save_adapter(path, model, tok, ttt.identity())
    return model


def per_task_runner(base_model, prompts, dataset, ttt, spec, search, engine, output_dir, cache, timings):
    """runner_for_task for per-task TTT: a fresh adapter per task, trained only if the cache misses."""
    base_id = candidates.model_fingerprint(base_model)

    def runner_for_task(base):
        state = {}

        def get_model():
            if 'model' not in state:
                start = time.time()
                texts = ttt_texts(dataset, [base], ttt, spec.max_tokens, prompts.fmt_opts, per_task=True)
                out = os.path.join(output_dir, 'ttt_tmp')
                state['model'] = train_ttt_adapter(base_model, prompts.tok, texts, ttt, spec.backend, out, resume=False)
                timings['ttt'] = timings.get('ttt', 0.0) + time.time() - start
            return state['model']

        def done():  # restore the base model for the next task
            if 'model' in state:
                state.pop('model').unload()

        model_id = candidates.cache_key([base_id, ttt.identity(), base])[:16]
        return candidates.TaskRunner(get_model, model_id, prompts, search, engine, cache, timings), done
    return runner_for_task


# ---- candidates and their scores -----------------------------------------------------------------

def solve(dataset, spec, ttt, search, engine, sorting_algo, output_dir, timings, deadline=None):
    """Load the model, (TTT), generate and score every test input's candidates: (results, EvalTool, the engine
    as resolved).

    engine.cache_only: compute nothing, only read what worker processes put in the disk cache. `deadline`: tasks
    not started by then (time.time() seconds) are left out (fallback attempts).
    """
    start = time.time()
    model, tok = load_model(spec, dataset)
    timings['load'] = time.time() - start
    prompts = Prompts.of_model(tok, spec.preprompt, spec.max_tokens)
    cache = candidates.DiskCache(os.path.join(output_dir, 'inference_cache'))
    if spec.per_task_adapters:  # LoRAs or layer copies trained per task before the search, batched over tasks
        engine = resolve_engine(engine, search.sampler, model)
        runners = per_task_ttt.adapter_runners(model, spec.per_task_adapters, prompts, search, engine, cache, timings)
    elif ttt.ttt == 'per_task':  # a fresh adapter per task, trained inside the task loop
        engine = resolve_engine(engine, search.sampler, model)
        runners = per_task_runner(model, prompts, dataset, ttt, spec, search, engine, output_dir, cache, timings)
    else:
        if ttt.ttt == 'shared':
            start = time.time()
            adapted = shared_ttt(model, tok, dataset, ttt, spec, prompts.fmt_opts, output_dir)
            model = model_tools.merged_for_inference(adapted)
            if model is not adapted:
                print('TTT: the adapter merged into the weights for the search')
            timings['ttt'] = time.time() - start
        engine = resolve_engine(engine, search.sampler, model)
        runners = candidates.TaskRunner(model, candidates.model_fingerprint(model), prompts, search, engine, cache,
                                        timings)
    tool = selection.EvalTool(n_guesses=2, sorting_algo=sorting_algo, print_func=tqdm.write)  # under the bar
    known = bool(dataset.solutions) or None

    def callback(cands, name, value, seconds):
        tool.process_result(cands, name, value, solution_known=known)['seconds'] = seconds

    results = candidates.inference_run(dataset, runners, search, engine, callback=callback, deadline=deadline)
    resumed = cache.resumed_line()
    if resumed and not engine.cache_only:  # cache_only collects what the workers computed: nothing is resumed there
        print(resumed)
    cache.close()
    return results, tool, engine


# ---- outputs -------------------------------------------------------------------------------------

def _attempt(rank):
    """1 and 2 for the submitted attempts, None for the other candidates."""
    return rank + 1 if rank < 2 else None


def results_table(ranked, tool):
    """Every candidate of every test input in submission order, its attempt number (1, 2; None: not submitted)
    and its scores under each selection method."""
    table = {}
    for base, tests in ranked.items():
        for i, cands in enumerate(tests):
            table[f'{base}_{i}'] = [dict(c, attempt=_attempt(j), scores={a: f(c) for a, f in tool.algos.items()})
                                    for j, c in enumerate(cands)]
    return table


def write_report(report_dir, dataset, ranked, tool, n_score_views, only_failed, run=None):
    import visualize
    records = []
    for rec in tool.records:
        base, i = rec['name'].rsplit('_', 1)
        cands = ranked[base][int(i)] if base in ranked else []  # skipped tasks have no results
        sols = dataset.solutions.get(base)
        records.append(dict(rec, n_views=n_score_views, solution=sols[int(i)] if sols else None,
                            candidates=[{'output': c['output'], 'correct': c['correct'], 'attempt': _attempt(j),
                                         'score': tool.algos[tool.sorting_algo](c)} for j, c in enumerate(cands[:4])]))
    path = visualize.write_report(report_dir, records, tasks=dataset.challenge, summary=tool.summary(),
                                  only_failed=only_failed, run=run)
    print(f'report: {path}')


# ---- the run -------------------------------------------------------------------------------------

def full_model_ttt(args, dataset):
    """--ttt full: the whole model trained on the demonstration pairs of the tasks to solve (their test outputs
    are never read) by the ArcMini recipe (arcmini.train), saved in the run directory under a name keyed by the
    starting weights, the tasks and the settings; returns its path. A finished model is reused; an unfinished run
    resumes from its checkpoints. --ttt-max-minutes stops the training early and keeps what it learnt."""
    import arcmini
    model, _ = model_tools.load_model(args.model, backend='transformers')
    key = candidates.cache_key([candidates.model_fingerprint(model), sorted(dataset.challenge), args.full_ttt_steps,
                                args.full_ttt_lr, args.full_ttt_warmup_steps, args.full_ttt_args])[:12]
    del model
    path = os.path.join(args.output_dir, f'full_ttt_model_{key}')
    if os.path.exists(os.path.join(path, run_record.RUN_CONFIG)):
        print(f'TTT: using the model trained earlier in {path}')
        return path
    demos = arc_loader.ArcDataset({b: {'train': t['train'], 'test': [{'input': x['input']} for x in t['test']]}
                                   for b, t in dataset.challenge.items()}).remove_test_data()
    recipe = arcmini.settings(shlex.split(args.full_ttt_args))  # the recipe's own seed (0) unless given, as measured
    overrides = dict(init_model=args.model, save_model_path=path, max_steps=args.full_ttt_steps, lr=args.full_ttt_lr,
                     warmup_steps=args.full_ttt_warmup_steps, max_minutes=args.ttt_max_minutes or recipe.max_minutes)
    print(f'TTT: the whole model on the demonstration pairs of {len(dataset.challenge)} tasks')
    return arcmini.train(demos, argparse.Namespace(**dict(vars(recipe), **overrides)))


def ttt_before_the_search(args, dataset, deadline, timings):
    """--ttt full, per_task (batched: per_task_ttt.py) or full+per_task, before the tasks are split: args.model
    (and args.per_task_adapters) become what the search uses; returns the flags that tell the workers so."""
    if args.ttt in ('full', 'full+per_task'):
        start = time.time()
        args.model = full_model_ttt(args, dataset)
        timings['ttt'] = time.time() - start
    if args.ttt in ('per_task', 'full+per_task'):
        start = time.time()
        args.model, args.per_task_adapters = per_task_ttt.evaluation_ttt(args, dataset, deadline)
        timings['ttt_per_task'] = time.time() - start
    return ['--model', args.model, '--ttt', 'none'] + (['--per-task-adapters', args.per_task_adapters]
                                                       if args.per_task_adapters else [])


def run_evaluation(args, script=None, argv=None):
    """Load the tasks, (TTT), candidates, scores, select two attempts, write submission.json + results.json
    (+ report); returns the score.

    The method is `solve` between loading the tasks and writing. A multi-GPU run (several GPUs and the calling
    `script` known) wraps it: `run_workers` starts one process per GPU (`--shard i/n`), which solves its share of
    the tasks into the shared disk cache, then this process solves again from the cache only. The time budget
    only decides which tasks are started (the others get fallback attempts).
    """
    t_start, timings = time.time(), {}
    startup = run_record.process_age_s()
    if startup is not None:  # from the process start to here: the interpreter, the imports and the checks
        timings['startup'] = startup
    os.makedirs(args.output_dir, exist_ok=True)
    if args.shard is None:  # a run that fails must not leave the previous run's files looking like its own
        for name in ('submission.json', 'results.json'):
            if os.path.exists(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
                print(f"removed the previous run's {name} from {args.output_dir} (this run writes its own)")
    np.random.seed(args.seed)  # only for libraries that draw from the global stream; ours take seeds
    deadline = args.deadline  # set by the parent of a worker process
    if deadline is None and args.time_budget_s is not None:
        deadline = t_start + args.time_budget_s
    spec, ttt = ModelSettings.from_args(args), TTTSettings.from_args(args)
    search, engine = settings_from_args(Search, args), settings_from_args(Engine, args)
    challenges, solutions = eval_files(args.challenges, args.solutions)
    dataset = load_eval_dataset(challenges, solutions, args.n_tasks, args.skip_bad)
    if args.shard is None and (args.ttt in ('full', 'full+per_task') or args.ttt == 'per_task' and args.batched_per_task_ttt):
        argv = list(argv or []) + ttt_before_the_search(args, dataset, deadline, timings)
        spec, ttt = ModelSettings.from_args(args), dataclasses.replace(ttt, ttt='none')
    method = (spec, ttt, search, engine, args.selection, args.output_dir, timings)
    if args.shard is not None:  # a worker: its share into the cache, its stage times to a file for the parent
        solve(shard_of(dataset, args.shard), *method, deadline=deadline)
        write_json(os.path.join(args.output_dir, f"shard_{args.shard.replace('/', '_of_')}.json"), timings)
        return None
    n_gpus = _visible_gpus() if args.gpus is None else args.gpus
    if n_gpus > 1 and script is not None:  # the workers compute; this process then only collects from the cache
        timings.update(run_workers(dataset, script, argv or [], n_gpus, deadline, spec, ttt, args.output_dir))
        collect = (spec, ttt, search, dataclasses.replace(engine, cache_only=True), *method[4:])
        results, tool, engine = solve(dataset, *collect)
    else:
        results, tool, engine = solve(dataset, *method, deadline=deadline)
    ranked = selection.order_attempts(results, args.selection)  # the first two of each test input are the attempts
    slots = arc_loader.submission_slots(challenges, args.n_tasks) if args.skip_bad else None
    submission = write_submission(args.output_dir, dataset, ranked, slots)
    age = run_record.process_age_s()
    if age is not None:  # from the process start: imports and loading included
        timings['process_start_to_submission'] = age
    check_against_file(submission, challenges, args.n_tasks, args.skip_bad)
    report = dict(only_failed=args.report_only_failed, n_score_views=args.n_score_views) if args.report else None
    settings = dict(vars(args), engine=dataclasses.asdict(engine))  # the engine as resolved for this device
    return finish(args.output_dir, dataset, submission, ranked, tool, timings, t_start, args.model, settings, report)


def _visible_gpus():
    import torch
    return torch.cuda.device_count()


def shard_of(dataset, shard):
    """Every n-th task (in id order) for worker i of n; the whole dataset when shard is None."""
    if shard is None:
        return dataset
    i, n = (int(x) for x in shard.split('/'))
    bases = set(sorted(dataset.challenge)[i::n])
    keys = [k for k in dataset.keys if arc_loader.get_base_key(k) in bases]
    return arc_loader.ArcDataset(dataset.challenge, dataset.solutions, keys, is_fake=dataset.is_fake, is_orig=True)


def run_workers(dataset, script, argv, n_gpus, deadline, spec, ttt, output_dir):
    """One worker process per GPU over its share of the tasks; returns their summed stage times (GPU-seconds)."""
    start = time.time()
    if ttt.ttt == 'shared':  # train the one adapter first, so that every worker loads the same one
        model, tok = load_model(spec, dataset)
        shared_ttt(model, tok, dataset, ttt, spec, format_options(spec.preprompt, tok), output_dir)
        del model
    ttt_seconds = time.time() - start
    procs = []
    for i in range(n_gpus):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i))
        cmd = [sys.executable, script, *argv, '--shard', f'{i}/{n_gpus}']
        cmd += ['--deadline', str(deadline)] if deadline is not None else []
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):  # the submission still gets written: unfinished tasks get fallback attempts
        print(f'WARNING: evaluation workers exited with codes {codes}; their unfinished tasks get fallbacks '
              '(a rerun resumes from the cache)')
    gpu_seconds = {'ttt_shared': ttt_seconds}
    for i in range(n_gpus):
        path = os.path.join(output_dir, f'shard_{i}_of_{n_gpus}.json')
        for stage, secs in (json.load(open(path)) if os.path.exists(path) else {}).items():
            gpu_seconds[stage] = gpu_seconds.get(stage, 0.0) + secs
    return {'workers_wall': time.time() - start, 'gpus': n_gpus,
            **{f'gpu_s_{k}': v for k, v in gpu_seconds.items()}}


def write_submission(output_dir, dataset, ranked, slots=None):
    """submission.json: the first two candidates of every test input (fallback [[0]]), and with `slots`
    (arc_loader.submission_slots, --skip-bad) fallbacks for the tasks that were skipped as malformed; returns it
    as read back."""
    submission = dataset.get_submission(ranked)
    if slots is not None:
        submission, filled = arc_loader.complete_submission(submission, slots)
        skipped = [t for t in filled if t not in dataset.challenge]
        if skipped:
            print(f'fallback attempts for {len(skipped)} malformed tasks (--skip-bad): {skipped[:5]}')
    path = os.path.join(output_dir, 'submission.json')
    write_json(path, submission)
    with open(path) as f:
        return json.load(f)


def check_against_file(submission, challenges, n_tasks, skip_bad):
    """Raise ValueError unless the submission answers exactly the tasks asked for: those of the challenges file,
    read again (the first n_tasks ids; under skip_bad the malformed ones too, as Kaggle scores them), not the
    run's own dataset."""
    if skip_bad:
        slots = arc_loader.submission_slots(challenges, n_tasks)
        if set(submission) != set(slots) or arc_loader.complete_submission(submission, slots)[1]:
            raise ValueError(f'submission: not a complete, valid answer to the {len(slots)} tasks of {challenges}')
        return
    asked = arc_loader.ArcDataset.load_from_json(challenges)
    arc_loader.check_submission(submission, asked.first_tasks(n_tasks) if n_tasks else asked)


def finish(output_dir, dataset, submission, ranked, tool, timings, t_start, model, settings, report=None):
    """Score the submission, write results.json and (report: its options) the report; print the score."""
    sub_path = os.path.join(output_dir, 'submission.json')
    unsolvable_as_zero = bool(settings.get('skip_bad'))  # --skip-bad: a task whose solutions were bad
    score = dataset.validate_submission(submission, unsolvable_as_zero) if dataset.solutions else None
    timings['total'] = time.time() - t_start
    summary = tool.summary()
    write_json(os.path.join(output_dir, 'results.json'), {
        'score': score, 'n_tasks': len(dataset.challenge), 'model': model, 'selection': tool.sorting_algo,
        'summary': summary, 'timings_s': timings, 'peak_rss_gb': run_record.peak_rss_gb(),
        **run_record.header(), 'settings': settings, 'candidates': results_table(ranked, tool)})
    if report is not None:
        run = {'model': model, 'selection': tool.sorting_algo, 'command': ' '.join(sys.argv), 'settings': settings}
        write_report(os.path.join(output_dir, 'report'), dataset, ranked, tool, report['n_score_views'],
                     report['only_failed'], run)
    tool.print_summary()
    if score is not None:
        print(f'score: {score:.2f} of {len(dataset.challenge)} tasks ({100 * score / len(dataset.challenge):.2f}%); '
              f"correct among candidates: {100 * summary['correct_found']:.2f}%")
    print('timings (s): ' + ', '.join(f'{k} {v:.1f}' for k, v in timings.items())
          + f'; peak memory of this process {run_record.peak_rss_gb():.2f} GB')
    print(f'wrote {sub_path}')
    return score
