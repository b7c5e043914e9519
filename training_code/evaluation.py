"""The evaluation run shared by the run_evaluation_<model>.py scripts: load the model, test-time train on the
demonstration pairs, generate candidates over augmented views, score them under other views (product of
experts), select two attempts, write submission.json, results.json and a report.

Each script only sets its recipe's defaults in `evaluation_arg_parser` and calls `run_evaluation`.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import arc_loader
import batched_dfs
import inference_tools
import model_tools
import selection
from arc_downloader import arc_paths, write_json


def evaluation_arg_parser(doc, **recipe):
    """All knobs of an evaluation run; `recipe` sets the defaults of one run_evaluation_<model>.py script."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = lambda group, name, **kw: group.add_argument(name, **kw)  # noqa: E731
    g = p.add_argument_group('paths')
    add(g, '--model', default=recipe['model'], help='model directory or hub id (default: %(default)s)')
    add(g, '--challenges', default=None, help='Kaggle-format challenges json (default: ARC-AGI-1 evaluation in input/)')
    add(g, '--solutions', default=None, help='solutions json for scoring (default: the one beside --challenges, if any)')
    add(g, '--output-dir', default=recipe['output_dir'], help='run directory: cache, adapter, submission (default: %(default)s)')
    add(g, '--n-tasks', type=int, default=None, help='only the first N tasks in id order (default: all)')
    g = p.add_argument_group('model')
    add(g, '--backend', default=recipe.get('backend', 'auto'), choices=['auto', 'unsloth', 'transformers'], help='loader (auto: unsloth on CUDA if installed; default: %(default)s)')
    add(g, '--load-in-4bit', action=argparse.BooleanOptionalAction, default=recipe.get('load_in_4bit', True), help='4-bit weights (CUDA only)')
    add(g, '--max-tokens', type=int, default=recipe.get('max_tokens', 8192), help='prompt + reply token limit; examples are dropped to fit')
    add(g, '--preprompt', default=recipe.get('preprompt', arc_loader.PREPROMPT), help='text before the first example (the seed: 48 letters)')
    g = p.add_argument_group('test-time training on the demonstration pairs')
    add(g, '--ttt', default=recipe.get('ttt', 'none'), choices=['none', 'shared', 'per_task'], help='none, one adapter for all tasks (2024), or a fresh adapter per task (paper)')
    add(g, '--ttt-copies', type=int, default=recipe.get('ttt_copies', 48), help='shared: repeats of each task (one random D8 view each); per_task: copies of the 8 D8 views')
    add(g, '--ttt-r', type=int, default=recipe.get('ttt_r', 64), help='LoRA rank')
    add(g, '--ttt-alpha', type=int, default=recipe.get('ttt_alpha', 16), help='LoRA alpha (rsLoRA)')
    add(g, '--ttt-batch-size', type=int, default=recipe.get('ttt_batch_size', 2), help='per-device batch size')
    add(g, '--ttt-grad-accum', type=int, default=recipe.get('ttt_grad_accum', 2), help='gradient accumulation steps')
    add(g, '--ttt-lr', type=float, default=1e-4, help='LoRA learning rate')
    add(g, '--ttt-embedding-lr', type=float, default=1e-5, help='learning rate of embed_tokens and lm_head')
    add(g, '--ttt-warmup-ratio', type=float, default=recipe.get('ttt_warmup_ratio', 0.25), help='warmup fraction (ignored if --ttt-warmup-steps)')
    add(g, '--ttt-warmup-steps', type=int, default=recipe.get('ttt_warmup_steps', 0), help='warmup steps')
    add(g, '--ttt-weight-decay', type=float, default=0.0, help='weight decay')
    add(g, '--ttt-optim', default='adamw_8bit', help="optimizer ('adamw_8bit' falls back to adamw_torch without CUDA)")
    add(g, '--ttt-mask-first', type=int, default=recipe.get('ttt_mask_first', 0), help='demonstration outputs not trained on, from the first')
    add(g, '--ttt-max-steps', type=int, default=-1, help='stop TTT after this many steps (-1: one epoch)')
    add(g, '--ttt-max-minutes', type=float, default=None,
        help='stop each TTT run (> 0) after this many minutes, its schedule unfinished, and go on: a time budget '
             'covers TTT too (the notebooks pass a share of theirs; default: no limit)')
    g = p.add_argument_group('candidate generation')
    add(g, '--n-views', type=int, default=recipe.get('n_views', 16), help='augmented views per test input (8 D8 x colour/example permutations)')
    add(g, '--sampler', default='dfs', choices=['dfs', 'greedy', 'sample', 'beam'], help='DFS or a generate() baseline')
    add(g, '--min-prob', type=float, default=recipe.get('min_prob', 0.1), help='DFS: keep every reply above this probability')
    add(g, '--num-beams', type=int, default=4, help='beam search width (--sampler beam)')
    add(g, '--pass-guess', action=argparse.BooleanOptionalAction, default=True, help='batch-1 DFS: follow the best reply so far first (speed only)')
    add(g, '--batch-views', action=argparse.BooleanOptionalAction, default=None,
        help='batched DFS and scoring: all views of many tasks per search (same results as batch-1; default: on a '
             'GPU only, on 2 CPU cores batch-1 DFS with guesses is faster)')
    add(g, '--batch-size', type=int, default=256, help='batched DFS and scoring: rows per forward pass')
    add(g, '--kv-cache-gb', type=float, default=4.0, help='batched DFS and scoring: KV cache of one group of prompts (the peak is about 2.5x)')
    add(g, '--prefill-tokens', type=int, default=32768, help='batched DFS and scoring: tokens per prefill forward')
    add(g, '--prefetch-tasks', type=int, default=100, help='batched DFS: search this many tasks at once (shared model; 0: one test input at a time)')
    add(g, '--aug-seed', type=int, default=10000, help='seed of the generation views')
    g = p.add_argument_group('scoring and selection')
    add(g, '--n-score-views', type=int, default=recipe.get('n_score_views', 8), help='views ("experts") scoring every candidate')
    add(g, '--score-seed', type=int, default=0, help='seed of the scoring views')
    add(g, '--selection', default=recipe.get('selection', 'mul_all_prob'), help='selection.py score that orders the attempts')
    add(g, '--score-batch-size', type=int, default=8, help='scoring forward batch size')
    g = p.add_argument_group('output')
    add(g, '--report', action=argparse.BooleanOptionalAction, default=True, help='write report/ (pictures and tables)')
    add(g, '--report-only-failed', action='store_true', help='pictures only for tasks not solved')
    add(g, '--seed', type=int, default=42, help='seed of TTT data and training')
    add(g, '--gpus', type=int, default=None, help='split the tasks over this many GPUs, one process each (default: all visible)')
    add(g, '--time-budget-s', type=float, default=None, help='wall-clock budget: tasks not started in time get fallback attempts')
    add(g, '--deadline', type=float, default=None, help=argparse.SUPPRESS)  # absolute time, passed to the workers
    add(g, '--shard', default=None, help=argparse.SUPPRESS)  # 'i/n': set for the worker processes of a multi-GPU run
    add(g, '--smoke', action='store_true', help='seconds-long CPU run: tiny local model, 2 tasks, few views')
    p.set_defaults(smoke_grid=recipe.get('smoke_grid', False))
    return p




def script_main(doc, recipe, script, argv=None, cpu_tasks=None):
    """The body of every run_evaluation_<model>.py: parse with the recipe's defaults, smoke or not, run."""
    args = evaluation_arg_parser(doc, **recipe).parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    elif cpu_tasks and args.n_tasks is None and not _visible_gpus():
        args.n_tasks = cpu_tasks
        print(f'no GPU: evaluating the first {cpu_tasks} tasks only (--n-tasks for more)')
    return run_evaluation(args, script=os.path.abspath(script), argv=argv if argv is not None else sys.argv[1:])


def apply_smoke(args):
    """Shrink a run to seconds on CPU: a tiny local stand-in model, 2 tasks, 2 views, 2 TTT steps."""
    import smoke
    args.output_dir = os.path.join(args.output_dir, 'smoke')
    args.model = smoke.make_tiny_arc_model(os.path.join(args.output_dir, 'tiny_model'), grid=args.smoke_grid)
    args.n_tasks = args.n_tasks or 2
    if not _visible_gpus():  # on a GPU the smoke run keeps --backend (e.g. unsloth) and 4-bit
        args.backend, args.load_in_4bit = 'transformers', False
    args.n_views, args.n_score_views = min(args.n_views, 2), min(args.n_score_views, 2)
    args.min_prob, args.ttt_copies, args.ttt_max_steps = max(args.min_prob, 0.2), 1, 2
    args.max_tokens = min(args.max_tokens, 4096)
    return args


def load_eval_dataset(args):
    """The tasks to solve (first --n-tasks in id order) and their solutions when a solutions file exists."""
    challenges, solutions = args.challenges, args.solutions
    if challenges is None:
        challenges, default_solutions = arc_paths('evaluation')
        solutions = solutions or default_solutions
    elif solutions is None and '_challenges' in challenges:
        guess = challenges.replace('_challenges', '_solutions')
        solutions = guess if os.path.exists(guess) else None
    dataset = arc_loader.ArcDataset.load_from_json(challenges)
    if solutions is not None:
        dataset = dataset.load_solutions(solutions)
    if args.n_tasks is not None:
        bases = sorted(dataset.challenge)[:args.n_tasks]
        dataset = dataset.change_keys([k for k in dataset.keys if arc_loader.get_base_key(k) in set(bases)])
        dataset = arc_loader.ArcDataset(dataset.challenge, dataset.solutions, dataset.keys,
                                        is_fake=dataset.is_fake, is_orig=True)
    print(f'{len(dataset.challenge)} tasks, {len(dataset.keys)} test inputs from {challenges}'
          + (f' (solutions: {solutions})' if solutions else ' (no solutions: not scored)'))
    return dataset


# ---- test-time training --------------------------------------------------------------------------

def ttt_texts(dataset, bases, args, fmt_opts, per_task):
    """Training texts from the demonstration pairs only (the test outputs are never seen)."""
    demos = arc_loader.ArcDataset({b: dataset.challenge[b] for b in bases}).remove_test_data()
    if per_task:  # the paper: the 8 symmetries x n copies, each with its own colours and example order
        aug = demos.augment(args.seed, tp='all', rt='all', n=args.ttt_copies, perm=True, shfl_ex=True)
    else:  # 2024: n repeats of every task, one random symmetry each
        aug = demos.repeat(args.ttt_copies, seed=args.seed).augment(args.seed, tp=True, rt=True, perm=True, shfl_ex=True)
    aug = aug.repeat(1, seed=args.seed)  # shuffled
    return [f['text'] for f in aug.as_list(args.max_tokens, 'text', **fmt_opts)]


def ttt_settings(args):
    """The TTT flags that name an adapter (cache keys); the time limit is left out, as run time is."""
    return {k: v for k, v in vars(args).items() if k.startswith('ttt') and k != 'ttt_max_minutes'} | {'seed': args.seed}


def train_ttt_adapter(model, tok, texts, args, output_dir, resume):
    """A fresh LoRA (embeddings in full) trained on the texts; returns the peft model."""
    model = model_tools.get_peft_model_arc(model, r=args.ttt_r, lora_alpha=args.ttt_alpha, seed=args.seed,
                                           backend=args.backend)
    model_tools.train_model(
        model, tok, texts, output_dir, batch_size=args.ttt_batch_size, grad_accum=args.ttt_grad_accum, epochs=1,
        lr=args.ttt_lr, embedding_lr=args.ttt_embedding_lr, warmup_ratio=args.ttt_warmup_ratio,
        warmup_steps=args.ttt_warmup_steps or None, weight_decay=args.ttt_weight_decay, optim=args.ttt_optim,
        mask_first_n_examples=args.ttt_mask_first, max_steps=args.ttt_max_steps, max_minutes=args.ttt_max_minutes,
        save_steps=200 if resume else 10**9, seed=args.seed, resume=resume, logging_steps=50)
    return model


def shared_ttt(model, tok, dataset, args, fmt_opts):
    """One adapter for all tasks (2024), saved in the run directory and reused when the run is restarted."""
    path = os.path.join(args.output_dir, 'finetuned_model')
    if os.path.exists(os.path.join(path, model_tools.RUN_CONFIG)):
        print(f'TTT: loading the adapter trained earlier from {path}')
        return model_tools.load_adapter(model, path)
    texts = ttt_texts(dataset, sorted(dataset.challenge), args, fmt_opts, per_task=False)
    print(f'TTT: {len(texts)} samples from the demonstration pairs of {len(dataset.challenge)} tasks')
    model = train_ttt_adapter(model, tok, texts, args, path + '-checkpoints', resume=True)
    model_tools.save_adapter(path, model, tok, ttt_settings(args))
    return model


def per_task_runner(base_model, tok, dataset, args, fmt_opts, cache, timings, cache_only=False):
    """runner_for_task for per-task TTT: a fresh adapter per task, trained only if the cache misses."""
    base_id = inference_tools.model_fingerprint(base_model)

    def runner_for_task(base):
        state = {}

        def get_model():
            if 'model' not in state:
                start = time.time()
                texts = ttt_texts(dataset, [base], args, fmt_opts, per_task=True)
                out = os.path.join(args.output_dir, 'ttt_tmp')
                state['model'] = train_ttt_adapter(base_model, tok, texts, args, out, resume=False)
                timings['ttt'] = timings.get('ttt', 0.0) + time.time() - start
            return state['model']

        def done():  # restore the base model for the next task
            if 'model' in state:
                state.pop('model').unload()

        model_id = inference_tools.cache_key([base_id, ttt_settings(args), base])[:16]
        limits = batched_dfs.memory_limits(base_model, args.kv_cache_gb, args.batch_size, args.prefill_tokens)
        return make_runner(get_model, tok, model_id, args, fmt_opts, cache, timings, cache_only, limits), done
    return runner_for_task


def make_runner(get_model, tok, model_id, args, fmt_opts, cache, timings, cache_only=False, limits=None):
    sampler_opts = {'num_beams': args.num_beams, 'num_return_sequences': args.num_beams} if args.sampler == 'beam' else {}
    return inference_tools.TaskRunner(
        get_model, tok, model_id, fmt_opts, max_tokens=args.max_tokens,
        max_new_tokens=arc_loader.max_new_tokens(fmt_opts['reply_end'], fmt_opts['lines_sep']),
        sampler=args.sampler, min_prob=args.min_prob, sampler_opts=sampler_opts, pass_guess=args.pass_guess,
        cache=cache, score_batch_size=args.score_batch_size, timings=timings, cache_only=cache_only,
        batch_views=args.batch_views if args.batch_views is not None else _visible_gpus() > 0, batch_limits=limits)


# ---- outputs -------------------------------------------------------------------------------------

def results_table(results, tool):
    """Every candidate of every test input with its scores under each selection method."""
    table = {}
    for base, tests in results.items():
        for i, cands in enumerate(tests):
            table[f'{base}_{i}'] = [dict(c, scores={a: f(c) for a, f in tool.algos.items()}) for c in cands]
    return table


def write_report(args, dataset, results, tool):
    import visualize
    records = []
    for rec in tool.records:
        base, i = rec['name'].rsplit('_', 1)
        cands = results[base][int(i)] if base in results else []  # skipped tasks have no results
        sols = dataset.solutions.get(base)
        records.append(dict(rec, n_views=args.n_score_views, solution=sols[int(i)] if sols else None,
                            candidates=[{'output': c['output'], 'correct': c['correct'],
                                         'score': tool.algos[tool.sorting_algo](c)} for c in cands[:4]]))
    path = visualize.write_report(os.path.join(args.output_dir, 'report'), records, tasks=dataset.challenge,
                                  summary=tool.summary(), only_failed=args.report_only_failed)
    print(f'report: {path}')


# ---- the run -------------------------------------------------------------------------------------

def run_evaluation(args, script=None, argv=None):
    """Load, (TTT), infer, score, select, write submission.json + results.json (+ report); returns the score.

    With several GPUs (and the calling `script` known) the tasks are split over one worker process per GPU,
    which fill the shared disk cache; this process then collects every result from the cache.
    """
    t_start, timings = time.time(), {}
    os.makedirs(args.output_dir, exist_ok=True)
    np.random.seed(args.seed)  # only for libraries that draw from the global stream; ours take seeds
    if args.deadline is None and args.time_budget_s is not None:
        args.deadline = t_start + args.time_budget_s
    n_gpus = _visible_gpus() if args.gpus is None else args.gpus
    cache_only = args.shard is None and n_gpus > 1 and script is not None
    if cache_only:  # the workers compute; this process then only collects from the cache
        timings.update(run_shards(args, script, argv or [], n_gpus))
    dataset = shard_of(load_eval_dataset(args), args.shard)
    start = time.time()
    model, tok = model_tools.load_model(args.model, backend=args.backend, load_in_4bit=args.load_in_4bit,
                                        max_seq_length=args.max_tokens)
    timings['load'] = time.time() - start
    fmt_opts = dict(arc_loader.FMT_OPTS, preprompt=args.preprompt, reply_end='\n' + tok.eos_token)
    cache = inference_tools.DiskCache(os.path.join(args.output_dir, 'inference_cache'))
    tool = selection.EvalTool(n_guesses=2, sorting_algo=args.selection)
    prefetch = None
    if args.ttt == 'per_task':
        runner_for_task = per_task_runner(model, tok, dataset, args, fmt_opts, cache, timings, cache_only)
    else:
        if args.ttt == 'shared':
            start = time.time()
            model = shared_ttt(model, tok, dataset, args, fmt_opts)
            timings['ttt'] = time.time() - start
        limits = batched_dfs.memory_limits(model, args.kv_cache_gb, args.batch_size, args.prefill_tokens)
        runner = make_runner(model, tok, inference_tools.model_fingerprint(model), args, fmt_opts, cache, timings,
                             cache_only, limits)
        runner_for_task = lambda base: (runner, None)  # noqa: E731
        if runner.batch_views and not cache_only and args.prefetch_tasks > 0:
            prefetch = runner
    known = bool(dataset.solutions) or None

    def callback(cands, name, value, seconds):
        tool.process_result(cands, name, value, solution_known=known)['seconds'] = seconds

    results = inference_tools.inference_run(dataset, runner_for_task, args.n_views, args.aug_seed,
                                            args.n_score_views, args.score_seed, callback=callback,
                                            deadline=None if cache_only else args.deadline, prefetch=prefetch,
                                            prefetch_tasks=max(1, args.prefetch_tasks))
    cache.close()
    if args.shard is not None:  # a worker: its results are in the cache; the parent writes the outputs
        write_json(os.path.join(args.output_dir, f"shard_{args.shard.replace('/', '_of_')}.json"), timings)
        return None
    return finish(args, dataset, results, tool, timings, t_start)


def _device_name():
    import torch
    n = torch.cuda.device_count()
    return f'{n} x {torch.cuda.get_device_name(0)}' if n else f'CPU ({os.cpu_count()} cores)'


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


def run_shards(args, script, argv, n_gpus):
    """One worker process per GPU over its share of the tasks; returns their summed stage times (GPU-seconds)."""
    start = time.time()
    if args.ttt == 'shared':  # train the one adapter first, so that every worker loads the same one
        model, tok = model_tools.load_model(args.model, backend=args.backend, load_in_4bit=args.load_in_4bit,
                                            max_seq_length=args.max_tokens)
        fmt_opts = dict(arc_loader.FMT_OPTS, preprompt=args.preprompt, reply_end='\n' + tok.eos_token)
        shared_ttt(model, tok, load_eval_dataset(args), args, fmt_opts)
        del model
    ttt_seconds = time.time() - start
    procs = []
    for i in range(n_gpus):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i))
        cmd = [sys.executable, script, *argv, '--shard', f'{i}/{n_gpus}']
        cmd += ['--deadline', str(args.deadline)] if args.deadline is not None else []
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):  # the submission still gets written: unfinished tasks get fallback attempts
        print(f'WARNING: evaluation workers exited with codes {codes}; their unfinished tasks get fallbacks '
              '(a rerun resumes from the cache)')
    gpu_seconds = {'ttt_shared': ttt_seconds}
    for i in range(n_gpus):
        path = os.path.join(args.output_dir, f'shard_{i}_of_{n_gpus}.json')
        for stage, secs in (json.load(open(path)) if os.path.exists(path) else {}).items():
            gpu_seconds[stage] = gpu_seconds.get(stage, 0.0) + secs
    return {'workers_wall': time.time() - start, 'gpus': n_gpus,
            **{f'gpu_s_{k}': v for k, v in gpu_seconds.items()}}


def finish(args, dataset, results, tool, timings, t_start):
    """Write and re-validate submission.json, results.json and the report; print the score."""
    sub_path = os.path.join(args.output_dir, 'submission.json')
    write_json(sub_path, dataset.get_submission(results))
    with open(sub_path) as f:
        submission = json.load(f)
    arc_loader.check_submission(submission, dataset)
    score = dataset.validate_submission(submission) if dataset.solutions else None
    timings['total'] = time.time() - t_start
    summary = tool.summary()
    write_json(os.path.join(args.output_dir, 'results.json'), {
        'score': score, 'n_tasks': len(dataset.challenge), 'summary': summary, 'timings_s': timings,
        'command': ' '.join(sys.argv), 'device': _device_name(), 'date': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
        'settings': vars(args), 'candidates': results_table(results, tool)})
    if args.report:
        write_report(args, dataset, results, tool)
    if score is not None:
        print(f'score: {score:.2f} of {len(dataset.challenge)} tasks ({100 * score / len(dataset.challenge):.2f}%); '
              f"correct among candidates: {100 * summary['correct_found']:.2f}%")
    print('timings (s): ' + ', '.join(f'{k} {v:.1f}' for k, v in timings.items()))
    print(f'wrote {sub_path}')
    return score
