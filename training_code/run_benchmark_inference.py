"""Benchmark candidate generation and scoring on one card: the same model, tasks and views for every method.

    python training_code/run_benchmark_inference.py                    # ArcMini, 3 tasks x 16 views
    python training_code/run_benchmark_inference.py --smoke            # seconds on CPU, tiny local model
    python training_code/run_benchmark_inference.py --n-tasks 40 --n-views 8 --samplers greedy dfs_batched \
        --no-scoring --profile                                         # also where a decode step's time goes

Every row is the evaluation's own task loop (candidates.TaskRunner and inference_run, search.Prompts: the same
prompts, task tokens included, and the same candidates as the main job) under one Search and Engine (`ROWS`), with
no cache and no scoring views. Rows: `greedy` (batched argmax decode on the growing cache, without
--decode-graphs), `greedy_guess` (the same in two searches, as
the evaluation's --guess-views: each test input's first view, then its other views following the first view's
grid as a guess, verified in one forward; checked to give greedy's candidates), `dfs1` (the seed's batch-1 DFS, best
guess passed), `dfs_batched` (batched_dfs over all prompts, without --decode-graphs), `dfs_batched_guess` (the same two searches as
greedy_guess; checked to give dfs_batched's candidates), `greedy_graphs` and `dfs_batched_graphs` (the same searches
with --decode-graphs, the evaluation's default on a GPU: each decode step on fixed shapes, on CUDA a replayed CUDA
graph; checked to give the plain rows' candidates, with the captures counted), and through model.generate per view `generate_greedy`,
`beam4` and `sample` (one sample per view, as --sampler sample), with grid positions passed at every step for grid
models. For each it prints wall time, reply tokens/s (of the decodable replies), decodable replies per view,
seconds per distinct candidate, the fraction of test inputs whose correct answer is among the candidates, and the
ratio of the time to `dfs1`'s. Scoring: the DFS candidates of every test input under --n-views scoring views, by
`score_replies` (each prompt prefilled alone, its replies batched on its cache) and by `batched_scores` (many
prompts per prefill): the evaluation's two scoring engines. Memory sizes default to the evaluation's.

The floor: prefill FLOPs (2 x parameters per prompt token plus causal attention) over the card's measured
matmul peak, plus decode bytes (each greedy reply token reads the KV cache of everything before it) over the
measured memory bandwidth. Weights are not counted: a small model's weights stay in cache and are read once
per batched step. The batched samplers also report their search counts (groups, rounds, forwards, decode steps)
and milliseconds per forward; `--profile` runs each once more under torch.profiler and breaks the time down by
the search's labelled parts, CPU ops and GPU kernels (`profile_sampler`; a window of --profile-forwards forwards
from the middle of a longer search); `--time-parts` runs each once more with the GPU synchronized around every
labelled part instead (`time_parts`: no profiler, so no events to read; a lease's calls could not wait for the
profiler's on a GPU). Results go to results/benchmark_inference_<card>.json.
"""
import argparse
import collections
import contextlib
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batched_dfs  # noqa: E402
import candidates  # noqa: E402
import decoding  # noqa: E402
import evaluation  # noqa: E402
import grid_positions  # noqa: E402
import input_checks  # noqa: E402
import model_tools  # noqa: E402
import run_record  # noqa: E402
import smoke  # noqa: E402
from run_record import (card_name, measured_bandwidth, measured_peak_flops, results_path,  # noqa: E402
                        sync as _sync, write_json)
from search import Engine, Prompts, Search, resolve_engine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {  # name: (Search fields, Engine fields), the evaluation's own choices (--sampler, --batch-views, ...)
    'greedy': ({'sampler': 'greedy'}, {'batch_views': True, 'decode_graphs': False}),
    'greedy_guess': ({'sampler': 'greedy'}, {'batch_views': True, 'guess_views': True, 'decode_graphs': False}),
    'dfs1': ({'sampler': 'dfs'}, {'batch_views': False, 'pass_guess': True}),
    'dfs_batched': ({'sampler': 'dfs'}, {'batch_views': True, 'decode_graphs': False}),
    'dfs_batched_guess': ({'sampler': 'dfs'}, {'batch_views': True, 'guess_views': True, 'decode_graphs': False}),
    'greedy_graphs': ({'sampler': 'greedy'}, {'batch_views': True, 'decode_graphs': True}),
    'dfs_batched_graphs': ({'sampler': 'dfs'}, {'batch_views': True, 'decode_graphs': True}),
    'generate_greedy': ({'sampler': 'greedy'}, {'batch_views': False}),
    'beam4': ({'sampler': 'beam', 'num_beams': 4}, {'batch_views': False}),
    'sample': ({'sampler': 'sample'}, {'batch_views': False}),
}
BATCHED = ('greedy', 'greedy_guess', 'dfs_batched', 'dfs_batched_guess', 'greedy_graphs', 'dfs_batched_graphs')


def parse_args(argv=None):
    p = input_checks.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos_int, pos_float = input_checks.positive_int, input_checks.positive_float
    p.add_argument('--model', default=os.path.join(REPO, 'models', 'ArcMini'), help='model directory')
    p.add_argument('--preprompt', default='', help="the model's preprompt (ArcMini: none)")
    p.add_argument('--challenges', default=None, help='Kaggle-format challenges json (default: ARC-AGI-1 evaluation)')
    p.add_argument('--n-tasks', type=pos_int, default=3, help='the first N tasks in id order')
    p.add_argument('--n-views', type=input_checks.int_between(1, input_checks.MAX_VIEWS), default=16, help='augmented views per test input (and scoring views)')
    p.add_argument('--min-prob', type=input_checks.dfs_threshold, default=0.09, help='DFS threshold')
    same = " (default: the evaluation's for this device, search.resolve_engine)"
    p.add_argument('--batch-size', type=pos_int, default=None, help='batched DFS and scoring: rows per forward' + same)
    p.add_argument('--kv-cache-gb', type=pos_float, default=None, help='batched DFS and scoring: KV cache per group' + same)
    p.add_argument('--prefill-tokens', type=pos_int, default=None, help='batched DFS and scoring: tokens per prefill' + same)
    p.add_argument('--max-tokens', type=pos_int, default=8192, help='prompt + reply limit')
    p.add_argument('--max-new-tokens', type=pos_int, default=None,
                   help='reply tokens a search may decode (default: a 30 x 30 grid\'s, as the evaluation)')
    p.add_argument('--nll-tol', type=input_checks.nonnegative_float, default=0.05,
                   help='dfs1 against dfs_batched: NLLs (nats, summed over a reply) may differ by this much (bf16 '
                        'rounding); a reply only one returned counts as borderline if its NLL is this close to the threshold')
    p.add_argument('--samplers', nargs='+', default=list(ROWS), choices=list(ROWS), help='which samplers to time')
    p.add_argument('--scoring', action=argparse.BooleanOptionalAction, default=True,
                   help='also time score_replies against batched_scores (batch-1 prefills: slow for many tasks)')
    p.add_argument('--profile', action='store_true',
                   help='run each batched sampler once more under torch.profiler: where a decode step\'s time goes '
                        '(the search\'s labelled parts, the top CPU ops, the top GPU kernels, GPU busy against wall)')
    p.add_argument('--time-parts', action='store_true',
                   help='run each batched sampler once more with the GPU synchronized around each labelled part of the '
                        'search (batched_dfs.timed_parts): which part a decode step waits for, without the profiler')
    p.add_argument('--decode-steps', type=input_checks.nonnegative_int, default=0,
                   help='also time this many decode steps of --decode-rows prompts three ways (decode_step_modes), '
                        "each the search's own: the growing cache, fixed shapes run eagerly, and on CUDA the fixed "
                        'step replayed as a CUDA graph')
    p.add_argument('--decode-rows', type=input_checks.positive_int, nargs='+', default=[256],
                   help='--decode-steps: rows per step (the first views of the tasks, right-padded; at most all of them), '
                        'one timing each: a step bound by launches costs the same whatever its rows')
    p.add_argument('--profile-forwards', type=input_checks.positive_int, default=300,
                   help='--profile: record this many forwards from the middle of a longer search (reading the events '
                        'of a whole GPU search takes minutes)')
    p.add_argument('--lora-r', type=input_checks.int_between(0, input_checks.MAX_LORA_RANK), default=0,
                   help="time the search through a shared TTT adapter of this rank (run_evaluation_SmolLM2.py's, "
                        "all projections + embeddings; 0: none), unmerged as peft runs it")
    p.add_argument('--merge-lora', action='store_true', help='--lora-r merged into the weights first, as the evaluation '
                   'now searches after the shared TTT (model_tools.merged_for_inference)')
    p.add_argument('--output', default=None, help='json file (default: results/benchmark_inference_<card>.json)')
    p.add_argument('--smoke', action='store_true', help='seconds on CPU: tiny model, 2 tasks, 2 views')
    args = p.parse_args(argv)
    if not args.smoke:  # a missing model or data file: one line before anything loads
        try:
            input_checks.check_model_path(args.model)
            if args.challenges and not os.path.isfile(args.challenges):
                raise input_checks.InputError(f'--challenges {args.challenges}: no such file')
        except input_checks.InputError as e:
            p.error(str(e))
    return args




def engine_of(args, model, sampler, **fields):
    """The Engine of a row: the memory flags given, else the evaluation's defaults for this device."""
    return resolve_engine(Engine(batch_size=args.batch_size, kv_cache_gb=args.kv_cache_gb,
                                 prefill_tokens=args.prefill_tokens, **fields), sampler, model)


@contextlib.contextmanager
def counted_searches(stats):
    """Add the batched searches' counts (groups, rounds, forwards, decode steps) to `stats` while inside."""
    real = batched_dfs.batched_dfs, batched_dfs.batched_greedy

    def counting(search):
        def run(*a, **kw):
            one = kw.pop('stats', None)
            one = {} if one is None else one  # the caller's own dict (dfs_batch_cached reads its unfinished prompts)
            out = search(*a, stats=one, **kw)
            for k, v in one.items():
                if k == 'graph_error':  # a failed CUDA graph capture (decode_graphs): the steps ran eagerly
                    stats[k] = v
                elif k != 'unfinished':
                    stats[k] = stats.get(k, 0) + v
            return out
        return run
    batched_dfs.batched_dfs, batched_dfs.batched_greedy = (counting(f) for f in real)
    try:
        yield
    finally:
        batched_dfs.batched_dfs, batched_dfs.batched_greedy = real


def run_sampler(name, model, prompts, ds, args, stats=None):
    """The candidates of a row as the evaluation's task loop makes them ({task: [records per test input]}), without
    scoring views or a cache. A batched search adds its counts (summed over its searches) to the dict `stats`."""
    search_fields, engine_fields = ROWS[name]
    search = Search(min_prob=args.min_prob, n_views=args.n_views, n_score_views=0, **search_fields)
    engine = engine_of(args, model, search.sampler, **engine_fields)
    runner = candidates.TaskRunner(model, 'benchmark', prompts, search, engine)
    with counted_searches({} if stats is None else stats):
        return candidates.inference_run(ds, runner, search, engine)


def per_view(results):
    """{(test input, view): [(grid, NLL)]}: the rows' candidates side by side (a view without candidates is absent)."""
    views = {}
    for base, tests in sorted(results.items()):
        for i, cands in enumerate(tests):
            for c in cands:
                for view, nll in c['scores_inf'].items():
                    views.setdefault((f'{base}_{i}', view), []).append((json.dumps(c['output']), nll))
    return views


def side_by_side(x, y):
    """Two rows' per_view candidates as two lists over every view either has (a view one row found nothing for,
    as bf16 rounding at the threshold can make, is an empty list there)."""
    keys = sorted(x.keys() | y.keys())
    return [x.get(k, []) for k in keys], [y.get(k, []) for k in keys]


PARTS = ('search.prefill', 'search.feed', 'decode.rows', 'decode.forward', 'decode.walk', 'search.results')


def profile_sampler(name, model, prompts, ds, args, forwards, top=12):
    """Where a batched sampler's time goes: one more run under torch.profiler.

    A search of more than --profile-forwards forwards (`forwards`: the timed run's) is recorded in a window of that
    many forwards of the model from the middle of the search (torch.profiler's schedule, stepped before every
    forward): the profiler's events of a whole GPU search took longer to read than a lease's call allows.
    parts: CPU milliseconds (inclusive) of the search's labelled parts (batched_dfs: prefill, feeding fed prefixes,
    per decode step the live-row bookkeeping with its one host sync, the forward, the walk's branch records,
    reading the results back), in all and per decode step (the window's decode forwards); cpu_ops: the ops of most
    self CPU time; gpu: the GPU's busy time (kernels and copies) against the wall time of the recording, and the
    kernels of most time. The profiler slows the CPU side, so compare the parts with each other, and the run's
    seconds with the unprofiled row.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule
    device = next(model.parameters()).device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    stats, window = {}, forwards > args.profile_forwards
    wait = (forwards - args.profile_forwards) // 2 if window else 0
    first, last = wait + 1, wait + 1 + args.profile_forwards  # the recorded steps (one warmup step before them)
    marks, read = {}, {}

    def events(p):  # what the recording holds (a window's events are gone once its cycle ends: read on trace ready)
        kernels = collections.Counter()
        for event in p.events():
            if event.device_type == DeviceType.CUDA:
                kernels[event.name] += event.time_range.elapsed_us() / 1e3
        read.update(averages=p.key_averages(), kernels=kernels)

    def step(*_):  # the profiler's step k begins at the k-th forward (step 0: before the first)
        k = prof.step_num + 1
        if k == last:  # before the step that reads the recording
            _sync(device)
            marks[k] = time.time()
        prof.step()
        if k == first:  # after the step that starts it
            _sync(device)
            marks[k] = time.time()
    _sync(device)
    start = time.time()
    with profile(activities=activities,
                 schedule=schedule(wait=wait, warmup=1, active=args.profile_forwards) if window else None,
                 on_trace_ready=events if window else None) as prof:
        hook = model.register_forward_pre_hook(step) if window else None
        try:
            run_sampler(name, model, prompts, ds, args, stats)
            _sync(device)
        finally:
            if hook is not None:
                hook.remove()
    end = time.time()
    wall = marks.get(last, end) - marks.get(first, start)
    if not window:
        events(prof)
    averages, kernels = read['averages'], read['kernels']
    steps = max(1, next((a.count for a in averages if a.key == 'decode.forward'), 0) if window
                else stats.get('decode_steps', 0))
    parts = {a.key: {'calls': a.count, 'cpu_ms': a.cpu_time_total / 1e3,
                     'cpu_ms_per_decode_step': a.cpu_time_total / 1e3 / steps} for a in averages if a.key in PARTS}
    ops = sorted((a for a in averages if a.key not in PARTS and not a.key.startswith('ProfilerStep')),
                 key=lambda a: -a.self_cpu_time_total)[:top]
    busy = sum(kernels.values())
    return {'wall_s': wall, 'search': stats, 'parts': parts,
            'recorded': {'forwards': min(forwards, args.profile_forwards), 'of_forwards': forwards,
                         'decode_steps': steps, 'window': window, 'run_s': end - start},
            'cpu_ops': [{'op': a.key, 'calls': a.count, 'self_cpu_ms': a.self_cpu_time_total / 1e3} for a in ops],
            'gpu': {'busy_s': busy / 1e3, 'busy_fraction': busy / 1e3 / wall, 'busy_ms_per_decode_step': busy / steps,
                    'kernels': [{'kernel': k, 'ms': v} for k, v in kernels.most_common(top)]} if kernels else None}


def time_parts(name, model, prompts, ds, args):
    """One more run of a batched sampler inside batched_dfs.timed_parts: each labelled part's calls, seconds and
    milliseconds per decode step, their sum and the run's wall time (both longer than the untimed run's: the syncs
    take away the overlap of CPU and GPU)."""
    device, stats = next(model.parameters()).device, {}
    _sync(device)
    start = time.time()
    with batched_dfs.timed_parts() as times:
        run_sampler(name, model, prompts, ds, args, stats)
    _sync(device)
    wall, steps = time.time() - start, stats.get('decode_steps', 0)
    parts = {label: {'calls': calls, 'seconds': seconds, 'ms_per_decode_step': 1000 * seconds / max(1, steps)}
             for label, (calls, seconds) in times.items()}
    return {'wall_s': wall, 'parts_s': sum(p['seconds'] for p in parts.values()), 'decode_steps': steps,
            'search': stats, 'parts': parts}


def print_parts(name, t):
    """time_parts' table, printed as soon as it is measured (a call cut short still shows it)."""
    print(f"parts of {name}, the GPU synchronized around each: {t['wall_s']:.2f} s wall, {t['parts_s']:.2f} s in "
          f"the parts, {t['decode_steps']} decode steps")
    print('| part | calls | seconds | ms / decode step |')
    print('|---|---|---|---|')
    for part, r in t['parts'].items():
        print(f"| {part} | {r['calls']} | {r['seconds']:.2f} | {r['ms_per_decode_step']:.3f} |", flush=True)


def decode_step_modes(model, prompt_ids, steps, prefill_tokens, warmup=3):
    """Milliseconds per decode step of the rows `prompt_ids` after their prefill, feeding the same tokens three ways,
    each the search's own: `growing` (batched_dfs' growing KV cache, the default on a CPU), `fixed` (batched_dfs.
    _FixedStep run eagerly: the buffers attended to whole, the shapes fixed) and, on CUDA, `graph` (the same step
    captured as a CUDA graph and replayed, the default on a GPU). Each way's next-token NLLs are compared with
    `growing`'s (largest absolute difference); a capture that fails records its error.

    One prefill, in slices of at most `prefill_tokens` rows x tokens as the search's (an unsliced prefill of 32
    long prompts took 24 GB on CPU); each way decodes behind the prompts in the group's buffers."""
    # the prefill too without autograd (it kept 24 GB of activations for 32 CPU rows), and the search's attention
    # kernels (decoding.eval_mode: not cuDNN's, which built a plan for every step of the growing cache: 50 to 70 ms)
    with torch.inference_mode(), decoding.eval_mode(model):
        return _decode_step_modes(model, prompt_ids, steps, prefill_tokens, warmup)


def _decode_step_modes(model, prompt_ids, steps, prefill_tokens, warmup):
    device, steps = next(model.parameters()).device, warmup + steps
    positions = grid_positions.Positions(model)
    group = batched_dfs._Group(model, prompt_ids, positions, steps, prefill_tokens)
    ids, mask = decoding.right_pad(prompt_ids, device)
    rows, width = ids.shape
    feed = ids[:, 0]  # every row's first prompt token at every step: any real token will do
    state, step_pos = group.state, []
    for k in range(steps):
        pos_k, state = positions.block(feed[:, None], state)
        step_pos.append(pos_k)
    out = {'rows': rows, 'prompt_width': width, 'steps_timed': steps - warmup, 'prefill_tokens': prefill_tokens}

    def timed(run_step):
        nlls = []
        for k in range(steps):
            if k == warmup:
                _sync(device)
                start = time.time()
            nlls.append(run_step(k).clone())  # a replayed graph's outputs are overwritten by its next replay
        _sync(device)
        return 1000 * (time.time() - start) / (steps - warmup), torch.stack(nlls).float()

    for way in ('growing', 'fixed', 'graph') if device.type == 'cuda' else ('growing', 'fixed'):
        counter, cache = {}, group.cache(None, steps)
        step = (batched_dfs._GrowingStep(model, cache, mask) if way == 'growing'
                else batched_dfs._FixedStep(model, cache, mask, counter))
        if way == 'fixed':
            step.capture = False
        ms, nll = timed(lambda k: step(feed, step_pos[k])[0])
        if way == 'graph' and 'graph_error' in counter:  # no capture: the steps ran eagerly
            out['graph_error'] = counter['graph_error']
        elif way == 'growing':
            out['growing_ms'], reference = ms, nll
        else:
            out[f'{way}_ms'], out[f'{way}_max_nll_diff'] = ms, (nll - reference).abs().max().item()
    return out


def floor_work(model, prompts, ds, args, greedy):
    """(prefill FLOPs, decode KV bytes) of one prefill of each view's prompt plus its greedy reply."""
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config.get_text_config()
    kv = batched_dfs.kv_bytes_per_token(model)
    replies = {view: len(prompts.reply(ds, view, c['output']))
               for tests in greedy.values() for cands in tests for c in cands for view in c['scores_inf']}
    flops = nbytes = 0
    for key in ds.keys:
        for view in candidates.view_keys(ds, key, args.n_views, Search.aug_seed):
            view, prompt = prompts.view(ds, view)
            n, r = len(prompt), replies.get(view, 0)
            flops += 2 * n_params * n + 2 * cfg.num_hidden_layers * cfg.hidden_size * n * n
            nbytes += kv * (n * r + r * (r - 1) // 2)
    return flops, nbytes


def score_methods(model, prompts, ds, results, args):
    """Time scoring the candidates of every test input under its scoring views (--n-views of them, the evaluation's
    scoring seed) in one call, batch-1 (score_replies) and batched (batched_scores): the evaluation's two scoring
    engines."""
    scorers = {}
    for name, batched in (('score_replies', False), ('batched_scores', True)):
        engine = engine_of(args, model, 'dfs', batch_scores=batched)
        runner = candidates.TaskRunner(model, 'benchmark', prompts, Search(), engine)
        groups = [([dict(c, scores_aug={}) for c in cands],
                   candidates.view_keys(ds, f'{base}_{i}', args.n_views, Search.score_seed))
                  for base, tests in sorted(results.items()) for i, cands in enumerate(tests)]
        device = next(model.parameters()).device
        _sync(device)
        start = time.time()
        runner.score_all(ds, groups)
        _sync(device)
        nlls = [n for cands, _ in groups for c in cands for n in c['scores_aug'].values()]
        scorers[name] = {'seconds': time.time() - start, 'nlls': nlls,
                         'prompts': {tuple(p) for cands, views in groups if cands
                                     for _, p in (prompts.view(ds, v, reply=False) for v in views)}}
    if not scorers['score_replies']['nlls']:
        return {}
    one, many = scorers['score_replies'], scorers['batched_scores']
    return {'pairs': len(one['nlls']), 'distinct_prompts': len(one['prompts']),
            'max_abs_nll_diff': max(abs(a - b) for a, b in zip(one['nlls'], many['nlls'])),
            **{name: {'seconds': r['seconds']} for name, r in scorers.items()}}


def load(args):
    """The model as the evaluation loads it (a task new to a model with task tokens gets the generic row), the
    first --n-tasks tasks with their solutions, as the evaluation reads them, and their prompts as it builds them."""
    ds = evaluation.load_eval_dataset(*evaluation.eval_files(args.challenges), n_tasks=args.n_tasks)
    spec = evaluation.ModelSettings(model=args.model, backend='transformers', load_in_4bit=False,
                                    max_tokens=args.max_tokens, preprompt=args.preprompt)
    model, tok = evaluation.load_model(spec, ds)
    if args.lora_r:  # a fresh adapter: its products cost the same as a trained one's
        model = model_tools.get_peft_model_arc(model, r=args.lora_r, lora_alpha=16, seed=0, backend='transformers')
        model = model_tools.merged_for_inference(model) if args.merge_lora else model.eval()
    return model, Prompts.of_model(tok, args.preprompt, args.max_tokens, args.max_new_tokens), ds


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        smoke.inference_benchmark(args)
    torch.manual_seed(0)
    model, prompts, ds = load(args)
    device = next(model.parameters()).device
    sizes = engine_of(args, model, 'greedy')  # once, from the free memory before any row: every row searches alike
    args.batch_size, args.kv_cache_gb, args.prefill_tokens = sizes.batch_size, sizes.kv_cache_gb, sizes.prefill_tokens
    rows, outputs = {}, {}
    for name in args.samplers:
        print(f'{name} ...', flush=True)
        _sync(device)
        start = time.time()
        stats = {}
        outputs[name] = run_sampler(name, model, prompts, ds, args, stats)
        _sync(device)
        rows[name] = summarize(outputs[name], prompts, ds, args.n_views, time.time() - start)
        if stats:
            rows[name]['search'] = stats
            rows[name]['ms_per_forward'] = 1000 * rows[name]['seconds'] / max(1, stats['forwards'])
        graphs = (f", {stats['graph_captures']} CUDA graph captures" if 'graph_captures' in stats else '') + \
            (f", a CUDA graph capture failed (the steps ran eagerly): {stats['graph_error']}" if 'graph_error' in stats else '')
        print(f"{name}: {rows[name]['seconds']:.2f} s" + (f", {stats['forwards']} forwards, {stats['decode_steps']} decode "
              f"steps, {rows[name]['ms_per_forward']:.2f} ms a forward" if stats else '') + graphs, flush=True)
    timed = {}
    for name in args.samplers:
        if args.time_parts and name in BATCHED:
            timed[name] = time_parts(name, model, prompts, ds, args)
            print_parts(name, timed[name])
    decode_steps = []
    if args.decode_steps:
        views = [v for key in ds.keys for v in candidates.view_keys(ds, key, args.n_views, Search.aug_seed)]
        for n in args.decode_rows:
            d = decode_step_modes(model, [prompts.view(ds, v)[1] for v in views[:n]], args.decode_steps,
                                  args.prefill_tokens)
            decode_steps.append(d)
            graph = (f", CUDA graph {d['graph_ms']:.3f} (NLLs within {d['graph_max_nll_diff']:.1e})" if 'graph_ms' in d
                     else f", CUDA graph failed: {d['graph_error']}" if 'graph_error' in d else '')
            print(f"decode steps of {d['rows']} rows (prompts up to {d['prompt_width']} tokens), ms a step: growing "
                  f"cache {d['growing_ms']:.3f}, fixed shapes {d['fixed_ms']:.3f} (NLLs within "
                  f"{d['fixed_max_nll_diff']:.1e}){graph}", flush=True)
    profiles = {name: profile_sampler(name, model, prompts, ds, args, rows[name]['search']['forwards'])
                for name in args.samplers if args.profile and name in BATCHED}
    base = rows.get('dfs1', {}).get('seconds')
    for row in rows.values():
        row['time_vs_dfs1'] = row['seconds'] / base if base else None
    views = {name: per_view(out) for name, out in outputs.items()}
    if 'dfs1' in outputs and 'dfs_batched' in outputs:
        rows['dfs_batched']['same_candidates_as_dfs1'] = same_candidates(
            *side_by_side(views['dfs1'], views['dfs_batched']), args.min_prob, args.nll_tol)
    for plain, variant in (('dfs_batched', 'dfs_batched_guess'), ('greedy', 'greedy_guess'),
                           ('dfs_batched', 'dfs_batched_graphs'), ('greedy', 'greedy_graphs')):
        if plain in outputs and variant in outputs:
            rows[variant][f'same_candidates_as_{plain}'] = same_candidates(
                *side_by_side(views[plain], views[variant]), args.min_prob if plain == 'dfs_batched' else None, args.nll_tol)
    scoring = score_methods(model, prompts, ds, outputs.get('dfs_batched') or outputs.get('dfs1') or {}, args) \
        if args.scoring else {}
    peak, bandwidth = measured_peak_flops(device), measured_bandwidth(device)
    greedy = outputs.get('greedy') or run_sampler('greedy', model, prompts, ds, args)
    flops, nbytes = floor_work(model, prompts, ds, args, greedy)
    floor_s = flops / peak + nbytes / bandwidth
    n_prompts = len(ds.keys) * args.n_views
    report = {'card': card_name(device), 'model': args.model, **run_record.header(),
              'cpu_cores': os.cpu_count(), 'prompts': n_prompts, 'test_inputs': len(ds.keys), 'samplers': rows,
              'scoring': scoring, 'settings': vars(args),
              'measured_peak_tflops': peak / 1e12, 'measured_bandwidth_gb_s': bandwidth / 1e9,
              'floor': {'prefill_tflop': flops / 1e12, 'decode_kv_gb': nbytes / 1e9,
                        'seconds': floor_s, 'compute_s': flops / peak, 'memory_s': nbytes / bandwidth},
              'time_over_floor': {k: v['seconds'] / floor_s for k, v in rows.items()}, 'profile': profiles,
              'timed_parts': timed, 'decode_steps': decode_steps}
    print_table(report)
    if not args.smoke:
        out = args.output or results_path('inference', report['card'])
        write_json(out, report)
        print(f'wrote {out}')
    return dict(report, candidates=outputs)  # the rows' candidates too, for a caller (not in the json)


def same_candidates(a, b, min_prob, tol):
    """How two samplers' candidates differ, with a tolerance for the rounding of bf16 (batched and batch-1 forwards
    sum in other orders): the largest NLL difference of a reply both returned, and the replies only one returned.
    A DFS reply's NLL only grows along its path, so a reply that one path kept (NLL at most -log min_prob) and the
    other pruned differs by rounding only if its NLL lies within `tol` of the threshold: such replies count as
    borderline (min_prob None, a greedy decode: none is). 'same': no other difference and every shared NLL within `tol`."""
    threshold = -math.log(min_prob) if min_prob else math.inf
    other = borderline = 0
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = {tuple(r): n for r, n in x}, {tuple(r): n for r, n in y}
        worst = max([worst] + [abs(x[r] - y[r]) for r in x.keys() & y.keys()])
        for r in x.keys() ^ y.keys():
            if x.get(r, y.get(r)) >= threshold - tol:
                borderline += 1
            else:
                other += 1
    return {'replies_only_in_one': other + borderline, 'borderline_replies': borderline, 'other_replies': other,
            'max_nll_diff': worst, 'nll_tolerance': tol, 'same': other == 0 and worst <= tol}


def summarize(results, prompts, ds, n_views, seconds):
    """A row's figures: reply tokens (of the decodable replies, re-encoded), decodable replies per view, distinct
    candidates, the share of test inputs whose answer is among them."""
    n_replies = n_tokens = distinct = found = 0
    for tests in results.values():
        for cands in tests:
            distinct += len(cands)
            found += any(c['correct'] is True for c in cands)
            for c in cands:
                n_replies += len(c['scores_inf'])
                n_tokens += sum(len(prompts.reply(ds, view, c['output'])) for view in c['scores_inf'])
    return {'seconds': seconds, 'reply_tokens_per_s': n_tokens / seconds,
            'candidates_per_view': n_replies / (len(ds.keys) * n_views), 'distinct_candidates': distinct,
            'seconds_per_candidate': seconds / max(1, distinct), 'correct_among_candidates': found / len(ds.keys)}


def print_table(report):
    floor = report['floor']
    print(f"{report['prompts']} prompts ({report['test_inputs']} test inputs) on {report['card']}; measured "
          f"{report['measured_peak_tflops']:.1f} TFLOP/s, {report['measured_bandwidth_gb_s']:.0f} GB/s; floor "
          f"{floor['seconds']:.2f} s ({floor['compute_s']:.2f} s prefill FLOPs + {floor['memory_s']:.2f} s decode KV reads)")
    print("| sampler | seconds | reply tok/s | cand/view | s/candidate | correct found | vs dfs1 | vs floor |")
    print('|---|---|---|---|---|---|---|---|')
    for name, r in report['samplers'].items():
        ratio = f"{r['time_vs_dfs1']:.3f}" if r['time_vs_dfs1'] else '-'
        print(f"| {name} | {r['seconds']:.2f} | {r['reply_tokens_per_s']:.1f} | {r['candidates_per_view']:.2f} | "
              f"{r['seconds_per_candidate']:.3f} | {100 * r['correct_among_candidates']:.1f}% | {ratio} | "
              f"{report['time_over_floor'][name]:.1f} |")
    for name, other in (('dfs_batched', 'dfs1'), ('dfs_batched_guess', 'dfs_batched'), ('greedy_guess', 'greedy')):
        same = report['samplers'].get(name, {}).get(f'same_candidates_as_{other}')
        if same:
            print(f"{name} vs {other}: {'same' if same['same'] else 'DIFFERENT'} within {same['nll_tolerance']} nats "
                  f"(largest NLL difference {same['max_nll_diff']:.2e}; replies only in one: {same['other_replies']} "
                  f"plus {same['borderline_replies']} at the threshold)")
    for name, prof in report['profile'].items():
        rec = prof['recorded']
        gpu = prof['gpu']
        busy = f"; GPU busy {gpu['busy_s']:.2f} s ({100 * gpu['busy_fraction']:.0f}%)" if gpu else ''
        print(f"profile of {name}: {rec['forwards']} of {rec['of_forwards']} forwards recorded, "
              f"{prof['wall_s']:.2f} s, {rec['decode_steps']} decode steps{busy}")
        print('| part | calls | CPU ms | CPU ms / decode step |')
        print('|---|---|---|---|')
        for part, r in prof['parts'].items():
            print(f"| {part} | {r['calls']} | {r['cpu_ms']:.1f} | {r['cpu_ms_per_decode_step']:.3f} |")
        print('top CPU ops: ' + ', '.join(f"{o['op']} {o['self_cpu_ms']:.0f} ms" for o in prof['cpu_ops'][:6]))
        if gpu:
            print('top kernels: ' + ', '.join(f"{k['kernel'][:60]} {k['ms']:.0f} ms" for k in gpu['kernels'][:6]))
    sc = report['scoring']
    if sc:
        print(f"scoring {sc['pairs']} pairs ({sc['distinct_prompts']} distinct prompts): score_replies "
              f"{sc['score_replies']['seconds']:.2f} s, batched_scores {sc['batched_scores']['seconds']:.2f} s, "
              f"max |NLL difference| {sc['max_abs_nll_diff']:.2e}")


if __name__ == '__main__':
    main()
