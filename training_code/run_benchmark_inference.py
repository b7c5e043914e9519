"""Benchmark candidate generation and scoring on one card: the same model, tasks and views for every method.

    python training_code/run_benchmark_inference.py                    # ArcMini, 3 tasks x 16 views
    python training_code/run_benchmark_inference.py --smoke            # seconds on CPU, tiny local model
    python training_code/run_benchmark_inference.py --n-tasks 40 --n-views 8 --samplers greedy dfs_batched \
        --no-scoring --profile                                         # also where a decode step's time goes

Samplers: `greedy` (batched argmax decode), `greedy_guess` (the same in two searches, as the evaluation's
--guess-views: each test input's first view, then its other views following the first view's reply as a guess,
verified in one forward; checked to give greedy's replies), `dfs1` (the seed's batch-1 DFS, best guess passed),
`dfs_batched` (batched_dfs over all prompts), `dfs_batched_guess` (the same two searches as greedy_guess; checked to
give dfs_batched's candidates), and `generate` greedy per view, beam 4 and sampling (4 samples per view), with grid positions passed at every step for grid models. For each it prints wall time, reply
tokens/s (tokens of the returned candidates), candidates per view, seconds per distinct candidate, the
fraction of test inputs whose correct answer is among the candidates, and the ratio of the time to `dfs1`'s.
Scoring: the DFS candidates of every test input under 16 scoring views, by `score_replies` (each prompt
prefilled alone, its replies batched on its cache) and by `batched_scores` (many prompts per prefill).

The floor: prefill FLOPs (2 x parameters per prompt token plus causal attention) over the card's measured
matmul peak, plus decode bytes (each greedy reply token reads the KV cache of everything before it) over the
measured memory bandwidth. Weights are not counted: a small model's weights stay in cache and are read once
per batched step. The batched samplers also report their search counts (groups, rounds, forwards, decode steps)
and milliseconds per forward; `--profile` runs each once more under torch.profiler and breaks the time down by
the search's labelled parts, CPU ops and GPU kernels (`profile_sampler`). Results go to
results/benchmark_inference_<card>.json.
"""
import argparse
import collections
import functools
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arc_loader  # noqa: E402
import batched_dfs  # noqa: E402
import candidates  # noqa: E402
import inference_tools  # noqa: E402
import model_tools  # noqa: E402
import run_record  # noqa: E402
import smoke  # noqa: E402
from arc_downloader import load_arc  # noqa: E402
from run_record import card_name, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLERS = ['greedy', 'greedy_guess', 'dfs1', 'dfs_batched', 'dfs_batched_guess', 'generate_greedy', 'beam4', 'sample4']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default=os.path.join(REPO, 'models', 'ArcMini'), help='model directory')
    p.add_argument('--preprompt', default='', help="the model's preprompt (ArcMini: none)")
    p.add_argument('--n-tasks', type=int, default=3, help='first N ARC-AGI-1 evaluation tasks')
    p.add_argument('--n-views', type=int, default=16, help='augmented views per test input (and scoring views)')
    p.add_argument('--min-prob', type=float, default=0.09, help='DFS threshold')
    p.add_argument('--batch-size', type=int, default=256, help='batched DFS and scoring: rows per forward')
    p.add_argument('--kv-cache-gb', type=float, default=16.0, help='batched DFS and scoring: KV cache per group')
    p.add_argument('--prefill-tokens', type=int, default=262144, help='batched DFS and scoring: tokens per prefill')
    p.add_argument('--max-tokens', type=int, default=8192, help='prompt + reply limit')
    p.add_argument('--max-new-tokens', type=int, default=None,
                   help='reply tokens a search may decode (default: a 30 x 30 grid\'s, as the evaluation)')
    p.add_argument('--nll-tol', type=float, default=0.05,
                   help='dfs1 against dfs_batched: NLLs (nats, summed over a reply) may differ by this much (bf16 '
                        'rounding); a reply only one returned counts as borderline if its NLL is this close to the threshold')
    p.add_argument('--samplers', nargs='+', default=SAMPLERS, choices=SAMPLERS, help='which samplers to time')
    p.add_argument('--scoring', action=argparse.BooleanOptionalAction, default=True,
                   help='also time score_replies against batched_scores (batch-1 prefills: slow for many tasks)')
    p.add_argument('--profile', action='store_true',
                   help='run each batched sampler once more under torch.profiler: where a decode step\'s time goes '
                        '(the search\'s labelled parts, the top CPU ops, the top GPU kernels, GPU busy against wall)')
    p.add_argument('--output', default=None, help='json file (default: results/benchmark_inference_<card>.json)')
    p.add_argument('--smoke', action='store_true', help='seconds on CPU: tiny model, 2 tasks, 2 views')
    return p.parse_args(argv)


def prompts_of(args, tok):
    """(dataset, [(test key, view key, prompt ids)]) for the first n tasks, their views, as the evaluation builds them."""
    ds = load_arc('evaluation').first_tasks(args.n_tasks)
    fmt = dict(arc_loader.FMT_OPTS, preprompt=args.preprompt, reply_end='\n' + tok.eos_token)
    args.ds, args.fmt = ds, fmt
    budget = args.max_tokens - arc_loader.max_new_tokens(fmt['reply_end'])
    items = []
    for key in ds.keys:
        for view in candidates.view_keys(ds, key, args.n_views, 10000):
            view, f = ds.get_task(view, budget, 'input', **fmt)
            items.append((key, view, tok(f['input'])['input_ids']))
    return ds, items


BATCHED = ('greedy', 'greedy_guess', 'dfs_batched', 'dfs_batched_guess')


def run_sampler(name, model, tok, items, eos, max_new, args, stats=None):
    """Per prompt: [(reply ids, NLL)]. A batched sampler adds its search counts (groups, rounds, forwards,
    decode steps; summed over its searches) to the dict `stats`."""
    prompts = [p for _, _, p in items]
    stats = {} if stats is None else stats

    def counted(search):
        def run(ps, guesses=None):
            one = {}
            out = search(model, ps, eos, max_new, guesses=guesses, stats=one, **args.limits)
            for k, v in one.items():
                stats[k] = stats.get(k, 0) + v
            return out
        return run
    greedy = counted(batched_dfs.batched_greedy)
    dfs = counted(functools.partial(batched_dfs.batched_dfs, min_prob=args.min_prob))
    if name in ('greedy', 'dfs_batched'):
        return (greedy if name == 'greedy' else dfs)(prompts)
    if name in ('greedy_guess', 'dfs_batched_guess'):  # as --guess-views: each test input's first view, then the rest
        return guided(greedy if name == 'greedy_guess' else dfs, tok, items, args)
    if name == 'dfs1':  # as the evaluation runs it: the best answer so far of a test input is the next view's guess
        out, best = [], {}
        for key, view, prompt in items:
            guess = None
            if key in best:
                guess = tok(args.ds.fmt_task(view, reply=best[key], **args.fmt)['reply'], add_special_tokens=False)['input_ids']
            out.append(inference_tools.dfs(model, prompt, eos, max_new, args.min_prob, guess=guess))
            grids = [args.ds.decode(tok.decode(ids), '\n', view)[0] for ids, _ in out[-1][:1]]
            if grids and grids[0] is not None and key not in best:
                best[key] = grids[0]
        return out
    mode = {'generate_greedy': 'greedy', 'beam4': 'beam', 'sample4': 'sample'}[name]
    kw = {'num_beams': 4, 'num_return_sequences': 4} if mode == 'beam' else {}
    kw = {'num_return_sequences': 4} if mode == 'sample' else kw
    return [inference_tools.generate_candidates(model, p, eos, max_new, mode=mode, seed=i, **kw)
            for i, p in enumerate(prompts)]


def guided(search, tok, items, args):
    """A batched search `search(prompts, guesses=None)` in two: the first view of every test input, then the other
    views, each following the first view's most probable grid re-encoded under it (the results do not depend on
    the guesses)."""
    first = {}
    for i, (key, _, _) in enumerate(items):
        first.setdefault(key, i)
    heads = sorted(first.values())
    out = dict(zip(heads, search([items[i][2] for i in heads])))
    best = {}
    for i in heads:
        key, view, _ = items[i]
        grids = [args.ds.decode(tok.decode(ids), '\n', view)[0] for ids, _ in out[i]]
        best[key] = next((g for g in grids if g is not None), None)
    rest = [i for i in range(len(items)) if i not in out]
    guesses = [None if best[items[i][0]] is None else
               tok(args.ds.fmt_reply(items[i][1], best[items[i][0]], **args.fmt), add_special_tokens=False)['input_ids']
               for i in rest]
    out.update(zip(rest, search([items[i][2] for i in rest], guesses)))
    return [out[i] for i in range(len(items))]


PARTS = ('search.prefill', 'search.feed', 'decode.rows', 'decode.forward', 'decode.walk', 'search.results')


def profile_sampler(name, model, tok, items, eos, max_new, args, top=12):
    """Where a batched sampler's time goes: one more run under torch.profiler.

    parts: CPU milliseconds (inclusive) of the search's labelled parts (batched_dfs: prefill, feeding fed prefixes,
    per decode step the live-row bookkeeping with its one host sync, the forward, the walk's branch records,
    reading the results back), in all and per decode step; cpu_ops: the ops of most self CPU time; gpu: the GPU's
    busy time (kernels and copies) against the wall time, and the kernels of most time. The profiler slows the CPU
    side, so compare the parts with each other, and the run's seconds with the unprofiled row.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    device = next(model.parameters()).device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    stats = {}
    _sync(device)
    start = time.time()
    with profile(activities=activities) as prof:
        run_sampler(name, model, tok, items, eos, max_new, args, stats)
        _sync(device)
    wall = time.time() - start
    steps = max(1, stats.get('decode_steps', 0))
    averages = prof.key_averages()
    parts = {a.key: {'calls': a.count, 'cpu_ms': a.cpu_time_total / 1e3,
                     'cpu_ms_per_decode_step': a.cpu_time_total / 1e3 / steps} for a in averages if a.key in PARTS}
    ops = sorted((a for a in averages if a.key not in PARTS), key=lambda a: -a.self_cpu_time_total)[:top]
    kernels = collections.Counter()
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            kernels[event.name] += event.time_range.elapsed_us() / 1e3
    busy = sum(kernels.values())
    return {'wall_s': wall, 'search': stats, 'parts': parts,
            'cpu_ops': [{'op': a.key, 'calls': a.count, 'self_cpu_ms': a.self_cpu_time_total / 1e3} for a in ops],
            'gpu': {'busy_s': busy / 1e3, 'busy_fraction': busy / 1e3 / wall, 'busy_ms_per_decode_step': busy / steps,
                    'kernels': [{'kernel': k, 'ms': v} for k, v in kernels.most_common(top)]} if kernels else None}


def measured_peak_flops(device):
    """bf16 (CUDA) or float32 (CPU) matmul FLOP/s measured on this device."""
    n, dtype = (8192, torch.bfloat16) if device.type == 'cuda' else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start, reps = time.time(), 10
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.time() - start)


def results_path(kind, card):
    """results/benchmark_<kind>_<card>.json, spaces in the card name replaced by underscores."""
    return os.path.join(REPO, 'results', f"benchmark_{kind}_{card.replace(' ', '_')}.json")


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def measured_bandwidth(device):
    """Bytes/s of a large on-device copy (read + write), the card's practical memory bandwidth."""
    n = 2 ** 28 if device.type == 'cuda' else 2 ** 24
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    start, reps = time.time(), 10
    for _ in range(reps):
        b.copy_(a)
    _sync(device)
    return 2 * 4 * n * reps / (time.time() - start)


def floor_work(model, items, greedy):
    """(prefill FLOPs, decode KV bytes) of one prefill of each prompt plus its greedy reply."""
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config.get_text_config()
    kv = batched_dfs.kv_bytes_per_token(model)
    flops = nbytes = 0
    for (_, _, prompt), reply in zip(items, greedy):
        n, r = len(prompt), (len(reply[0][0]) if reply else 0)
        flops += 2 * n_params * n + 2 * cfg.num_hidden_layers * cfg.hidden_size * n * n
        nbytes += kv * (n * r + r * (r - 1) // 2)
    return flops, nbytes


def score_methods(model, tok, items, outputs, args):
    """Time score_replies and batched_scores on the DFS candidates of every test input under its scoring views."""
    ds, fmt, budget = args.ds, args.fmt, args.max_tokens - arc_loader.max_new_tokens(args.fmt['reply_end'])
    cands = {}
    for (key, view, _), replies in zip(items, outputs):
        for ids, _ in replies:
            grid = ds.decode(tok.decode(ids), '\n', view)[0]
            if grid is not None:
                cands.setdefault(key, {})[grid.tobytes() + bytes(grid.shape)] = grid
    prompts, replies = [], []
    for key, grids in cands.items():
        for grid in grids.values():
            for view in candidates.view_keys(ds, key, args.n_views, 0):
                view, f = ds.get_task(view, budget, 'input', reply=grid, **fmt)
                prompts.append(tok(f['input'])['input_ids'])
                replies.append(tok(f['reply'], add_special_tokens=False)['input_ids'])
    if not prompts:
        return {}
    device, rows = next(model.parameters()).device, {}
    for name, fn in (('score_replies', lambda: inference_tools.score_replies(model, prompts, replies)),
                     ('batched_scores', lambda: batched_dfs.batched_scores(model, prompts, replies, **args.limits))):
        _sync(device)
        start = time.time()
        rows[name] = {'nlls': fn()}
        _sync(device)
        rows[name]['seconds'] = time.time() - start
    diff = max(abs(a - b) for a, b in zip(rows['score_replies']['nlls'], rows['batched_scores']['nlls']))
    return {'pairs': len(prompts), 'distinct_prompts': len({tuple(p) for p in prompts}), 'max_abs_nll_diff': diff,
            **{name: {'seconds': r['seconds']} for name, r in rows.items()}}


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        smoke.inference_benchmark(args)
    torch.manual_seed(0)
    model, tok = model_tools.load_model(args.model, backend='transformers', max_seq_length=args.max_tokens)
    device = next(model.parameters()).device
    args.limits = batched_dfs.memory_limits(model, args.kv_cache_gb, args.batch_size, args.prefill_tokens)
    ds, items = prompts_of(args, tok)
    eos, max_new = tok.eos_token_id, args.max_new_tokens or arc_loader.max_new_tokens('\n' + tok.eos_token)
    rows, outputs = {}, {}
    for name in args.samplers:
        print(f'{name} ...', flush=True)
        _sync(device)
        start = time.time()
        stats = {}
        outputs[name] = run_sampler(name, model, tok, items, eos, max_new, args, stats)
        _sync(device)
        rows[name] = summarize(outputs[name], items, ds, tok, time.time() - start)
        if stats:
            rows[name]['search'] = stats
            rows[name]['ms_per_forward'] = 1000 * rows[name]['seconds'] / max(1, stats['forwards'])
    profiles = {name: profile_sampler(name, model, tok, items, eos, max_new, args)
                for name in args.samplers if args.profile and name in BATCHED}
    base = rows.get('dfs1', {}).get('seconds')
    for row in rows.values():
        row['time_vs_dfs1'] = row['seconds'] / base if base else None
    if 'dfs1' in outputs and 'dfs_batched' in outputs:
        rows['dfs_batched']['same_candidates_as_dfs1'] = same_candidates(outputs['dfs1'], outputs['dfs_batched'],
                                                                          args.min_prob, args.nll_tol)
    for plain, guessed in (('dfs_batched', 'dfs_batched_guess'), ('greedy', 'greedy_guess')):
        if plain in outputs and guessed in outputs:
            rows[guessed][f'same_candidates_as_{plain}'] = same_candidates(
                outputs[plain], outputs[guessed], args.min_prob if plain == 'dfs_batched' else None, args.nll_tol)
    scoring = score_methods(model, tok, items, outputs.get('dfs_batched') or outputs.get('dfs1') or [], args) \
        if args.scoring else {}
    peak, bandwidth = measured_peak_flops(device), measured_bandwidth(device)
    greedy = outputs.get('greedy') or run_sampler('greedy', model, tok, items, eos, max_new, args)
    flops, nbytes = floor_work(model, items, greedy)
    floor_s = flops / peak + nbytes / bandwidth
    report = {'card': card_name(device), 'model': args.model, **run_record.header(),
              'cpu_cores': os.cpu_count(), 'prompts': len(items), 'test_inputs': len(ds.keys), 'samplers': rows,
              'scoring': scoring, 'settings': {k: v for k, v in vars(args).items() if k not in ('ds', 'fmt')},
              'measured_peak_tflops': peak / 1e12, 'measured_bandwidth_gb_s': bandwidth / 1e9,
              'floor': {'prefill_tflop': flops / 1e12, 'decode_kv_gb': nbytes / 1e9,
                        'seconds': floor_s, 'compute_s': flops / peak, 'memory_s': nbytes / bandwidth},
              'time_over_floor': {k: v['seconds'] / floor_s for k, v in rows.items()}, 'profile': profiles}
    print_table(report)
    if not args.smoke:
        out = args.output or results_path('inference', report['card'])
        write_json(out, report)
        print(f'wrote {out}')
    return report


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


def summarize(outputs, items, ds, tok, seconds):
    found, n_cands, n_tokens, distinct = {}, 0, 0, set()
    for (key, view, _), replies in zip(items, outputs):
        n_cands += len(replies)
        for ids, _ in replies:
            n_tokens += len(ids)
            grid, correct, _ = ds.decode(tok.decode(ids), '\n', view)
            found[key] = found.get(key, False) or correct is True
            if grid is not None:
                distinct.add((key, grid.tobytes(), grid.shape))
    return {'seconds': seconds, 'reply_tokens_per_s': n_tokens / seconds, 'candidates_per_view': n_cands / len(items),
            'distinct_candidates': len(distinct), 'seconds_per_candidate': seconds / max(1, len(distinct)),
            'correct_among_candidates': sum(found.values()) / len(ds.keys)}


def print_table(report):
    floor = report['floor']
    print(f"{report['prompts']} prompts ({report['test_inputs']} test inputs) on {report['card']}; measured "
          f"{report['measured_peak_tflops']:.1f} TFLOP/s, {report['measured_bandwidth_gb_s']:.0f} GB/s; floor "
          f"{floor['seconds']:.2f} s ({floor['compute_s']:.2f} s prefill FLOPs + {floor['memory_s']:.2f} s decode KV reads)")
    print(f"| sampler | seconds | reply tok/s | cand/view | s/candidate | correct found | vs dfs1 | vs floor |")
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
        steps = prof['search'].get('decode_steps', 0)
        gpu = prof['gpu']
        busy = f"; GPU busy {gpu['busy_s']:.2f} s ({100 * gpu['busy_fraction']:.0f}%)" if gpu else ''
        print(f"profile of {name}: {prof['wall_s']:.2f} s under the profiler, {steps} decode steps{busy}")
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
