"""Benchmark candidate generation on one card: the same model, tasks and views for every sampler.

    python training_code/run_benchmark_inference.py                    # ArcMini, 40 tasks x 16 views
    python training_code/run_benchmark_inference.py --smoke            # seconds on CPU, tiny local model

Samplers: `greedy` (batched argmax decode), `dfs1` (the seed's batch-1 DFS, best guess passed),
`dfs_batched` (batched_dfs over all prompts), and for models with ordinary 1-D positions also `generate`
greedy per view, beam 4 and sampling (generate() cannot pass grid positions). For each it prints wall time,
reply tokens/s (tokens of the returned candidates), candidates per view, the fraction of test inputs whose
correct answer is among the candidates, and the ratio of the time to `dfs1`'s. The floor: the FLOPs of one
prefill of every prompt plus its greedy reply (2 x parameters per token plus causal attention) over the card's
measured matmul peak (bf16 on CUDA). Weight bytes are not a floor here: the weights of a small model stay in
cache, and every token's weights are read once per batch. Results go to results/benchmark_inference_<card>.json.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arc_loader  # noqa: E402
import batched_dfs  # noqa: E402
import grid_positions  # noqa: E402
import inference_tools  # noqa: E402
import model_tools  # noqa: E402
from arc_downloader import load_arc  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLERS = ['greedy', 'dfs1', 'dfs_batched', 'generate_greedy', 'beam4', 'sample']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default=os.path.join(REPO, 'models', 'ArcMini'), help='model directory')
    p.add_argument('--preprompt', default='', help="the model's preprompt (ArcMini: none)")
    p.add_argument('--n-tasks', type=int, default=40, help='first N ARC-AGI-1 evaluation tasks')
    p.add_argument('--n-views', type=int, default=16, help='augmented views per test input')
    p.add_argument('--min-prob', type=float, default=0.09, help='DFS threshold')
    p.add_argument('--batch-size', type=int, default=64, help='rows per batched forward')
    p.add_argument('--max-tokens', type=int, default=8192, help='prompt + reply limit')
    p.add_argument('--samplers', nargs='+', default=SAMPLERS, choices=SAMPLERS, help='which samplers to time')
    p.add_argument('--output', default=None, help='json file (default: results/benchmark_inference_<card>.json)')
    p.add_argument('--smoke', action='store_true', help='seconds on CPU: tiny model, 2 tasks, 2 views')
    return p.parse_args(argv)


def prompts_of(args, tok):
    """(dataset, [(test key, view key, prompt ids)]) for the first n tasks, their views, as the evaluation builds them."""
    ds = load_arc('evaluation')
    bases = set(sorted(ds.challenge)[:args.n_tasks])
    ds = ds.change_keys([k for k in ds.keys if arc_loader.get_base_key(k) in bases])
    fmt = dict(arc_loader.FMT_OPTS, preprompt=args.preprompt, reply_end='\n' + tok.eos_token)
    args.ds, args.fmt = ds, fmt
    budget = args.max_tokens - arc_loader.max_new_tokens(fmt['reply_end'])
    items = []
    for key in ds.keys:
        for view in inference_tools.view_keys(ds, key, args.n_views, 10000):
            view, f = ds.get_task(view, budget, 'input', **fmt)
            items.append((key, view, tok(f['input'])['input_ids']))
    return ds, items


def run_sampler(name, model, tok, items, eos, max_new, args):
    """Per prompt: [(reply ids, NLL)]."""
    prompts = [p for _, _, p in items]
    if name == 'greedy':
        return [[r] if r else [] for r in batched_dfs.batched_greedy(model, prompts, eos, max_new, args.batch_size)]
    if name == 'dfs_batched':
        return batched_dfs.batched_dfs(model, prompts, eos, max_new, args.min_prob, batch_size=args.batch_size)
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
    mode = {'generate_greedy': 'greedy', 'beam4': 'beam', 'sample': 'sample'}[name]
    kw = {'num_beams': 4, 'num_return_sequences': 4} if mode == 'beam' else {}
    return [inference_tools.generate_candidates(model, p, eos, max_new, mode=mode, seed=i, **kw)
            for i, p in enumerate(prompts)]


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


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def floor_flops(model, items, greedy):
    """FLOPs of one prefill of each prompt plus its greedy reply: 2 N per token plus causal attention."""
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config.get_text_config()
    total = 0
    for (_, _, prompt), reply in zip(items, greedy):
        length = len(prompt) + (len(reply[0][0]) if reply else 0)
        total += 2 * n_params * length + 2 * cfg.num_hidden_layers * cfg.hidden_size * length * length
    return total


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        import smoke
        import tempfile
        args.model = smoke.make_tiny_arc_model(os.path.join(tempfile.mkdtemp(), 'tiny'), grid=True)
        args.n_tasks, args.n_views, args.min_prob, args.max_tokens = 2, 2, 0.2, 2048
    model, tok = model_tools.load_model(args.model, backend='transformers', max_seq_length=args.max_tokens)
    device = next(model.parameters()).device
    ds, items = prompts_of(args, tok)
    eos, max_new = tok.eos_token_id, arc_loader.max_new_tokens('\n' + tok.eos_token)
    samplers = [s for s in args.samplers if not (grid_positions.has_grid_positions(model) and s in SAMPLERS[3:])]
    rows, outputs = {}, {}
    for name in samplers:
        _sync(device)
        start = time.time()
        outputs[name] = run_sampler(name, model, tok, items, eos, max_new, args)
        _sync(device)
        rows[name] = summarize(name, outputs[name], items, ds, tok, time.time() - start)
    base = rows.get('dfs1', {}).get('seconds')
    for row in rows.values():
        row['time_vs_dfs1'] = row['seconds'] / base if base else None
    peak = measured_peak_flops(device)
    greedy = outputs.get('greedy') or run_sampler('greedy', model, tok, items, eos, max_new, args)
    floor_s = floor_flops(model, items, greedy) / peak
    report = {'card': torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu', 'model': args.model,
              'command': ' '.join(sys.argv), 'date': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
              'cpu_cores': os.cpu_count(),
              'prompts': len(items), 'test_inputs': len(ds.keys), 'samplers': rows,
              'settings': {k: v for k, v in vars(args).items() if k not in ('ds', 'fmt')},
              'measured_peak_tflops': peak / 1e12, 'flop_floor_s': floor_s,
              'time_over_floor': {k: v['seconds'] / floor_s for k, v in rows.items()}}
    print_table(report)
    out = args.output or os.path.join(REPO, 'results', f"benchmark_inference_{report['card'].replace(' ', '_')}.json")
    if not args.smoke:
        with open(out, 'w') as f:
            json.dump(report, f, indent=1)
        print(f'wrote {out}')
    return report


def summarize(name, outputs, items, ds, tok, seconds):
    found, n_cands, n_tokens = {}, 0, 0
    for (key, view, _), replies in zip(items, outputs):
        n_cands += len(replies)
        for ids, _ in replies:
            n_tokens += len(ids)
            found[key] = found.get(key, False) or ds.decode(tok.decode(ids), '\n', view)[1] is True
    return {'seconds': seconds, 'reply_tokens_per_s': n_tokens / seconds, 'candidates_per_view': n_cands / len(items),
            'correct_among_candidates': sum(found.values()) / len(ds.keys)}


def print_table(report):
    print(f"{report['prompts']} prompts ({report['test_inputs']} test inputs) on {report['card']}; measured peak "
          f"{report['measured_peak_tflops']:.1f} TFLOP/s; FLOP floor {report['flop_floor_s']:.2f} s")
    print(f"{'sampler':16s} {'seconds':>9s} {'tok/s':>9s} {'cand/view':>9s} {'found':>7s} {'vs dfs1':>8s} {'vs floor':>9s}")
    for name, r in report['samplers'].items():
        ratio = f"{r['time_vs_dfs1']:.2f}" if r['time_vs_dfs1'] else '-'
        print(f"{name:16s} {r['seconds']:9.2f} {r['reply_tokens_per_s']:9.1f} {r['candidates_per_view']:9.2f} "
              f"{100 * r['correct_among_candidates']:6.1f}% {ratio:>8s} {report['time_over_floor'][name]:9.1f}")


if __name__ == '__main__':
    main()
