"""The ablation ladder of the seed's report, measured on ArcMini over the ARC-AGI-1 public evaluation set:

    1. pretrained      greedy on 2 augmented views, the two most probable answers (no scoring views)
    2. + TTT           the same after test-time training (one shared LoRA on the demonstration pairs)
    3. + candidates    greedy on 8 augmented views, candidates ranked by their generation probability
    4. + AugScore      every candidate scored under 8 other views, ranked by the product (mul_aug_prob)
    5. + DFS           DFS at 0.09 over 16 views, 16 scoring views (the main job's settings, with TTT)

    python training_code/run_ladder_ArcMini.py                      # GPU: all 400 tasks
    python training_code/run_ladder_ArcMini.py --smoke              # seconds on CPU, tiny local model

Every stage is one run of run_evaluation_ArcMini.py in one run directory: the TTT adapter is trained once
(stage 2) and reused, the disk cache serves what a stage shares with an earlier one, and a killed ladder
resumes. Each stage's results.json is kept as <output-dir>/ladder/<n>.json, so a ladder can be run in parts
(--stages); the table of every stage found there (top-2 score, correct among candidates, seconds per stage)
goes to results/ladder_ArcMini_<card>.json unless --smoke.
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arcmini  # noqa: E402
import evaluation  # noqa: E402
import run_record  # noqa: E402
import smoke  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = ['--sampler', 'greedy', '--selection', 'max_gen_prob', '--n-score-views', '0']
STAGES = [
    ('pretrained', ['--ttt', 'none', *GREEDY, '--n-views', '2']),
    ('+ TTT', ['--ttt', 'shared', *GREEDY, '--n-views', '2']),
    ('+ candidates from 8 views', ['--ttt', 'shared', *GREEDY, '--n-views', '8']),
    ('+ AugScore (8 views, product)', ['--ttt', 'shared', '--sampler', 'greedy', '--n-views', '8',
                                       '--n-score-views', '8', '--selection', 'mul_aug_prob']),
    ('+ DFS 0.09, 16 views, 16 scoring views', ['--ttt', 'shared', '--sampler', 'dfs', '--min-prob', '0.09',
                                                '--n-views', '16', '--n-score-views', '16',
                                                '--selection', 'mul_aug_prob']),
    # Not in the default ladder: greedy over 16 views with 16 scoring views, for a model whose right answers are
    # often below DFS's 9% (greedy always answers).
    ('greedy 16 views, 16 scoring views (instead of DFS)', ['--ttt', 'shared', '--sampler', 'greedy', '--n-views', '16',
                                                           '--n-score-views', '16', '--selection', 'mul_aug_prob']),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--output-dir', default='output_ladder_ArcMini', help='run directory shared by the stages')
    p.add_argument('--n-tasks', type=int, default=None, help='first N tasks (default: all; 10 on CPU)')
    p.add_argument('--stages', type=int, nargs='*', default=[1, 2, 3, 4, 5],
                   help='which stages to run (1-5; 6: greedy instead of DFS); none: only tabulate the stages found')
    p.add_argument('--ttt-args', default='--ttt-batch-size 8 --ttt-lr 1e-3 --ttt-embedding-lr 1e-4',
                   help='test-time training flags of run_evaluation_ArcMini.py for stages 2-5 (one string)')
    p.add_argument('--eval-args', default='--no-report',
                   help='further flags for every stage, e.g. memory limits of the batched search (one string)')
    p.add_argument('--output', default=None, help='json file (default: results/ladder_ArcMini_<card>.json)')
    p.add_argument('--smoke', action='store_true', help='seconds on CPU: tiny local model, 2 tasks')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ladder_dir = os.path.join(args.output_dir, 'ladder')
    os.makedirs(ladder_dir, exist_ok=True)
    wall = {}
    for n in args.stages:
        name, flags = STAGES[n - 1]
        argv = ['--output-dir', args.output_dir, *flags, *args.eval_args.split()]
        argv += args.ttt_args.split() if '--ttt' in flags and flags[flags.index('--ttt') + 1] != 'none' else []
        argv += ['--n-tasks', str(args.n_tasks)] if args.n_tasks else []
        argv += ['--smoke', '--batch-views'] if args.smoke else []  # batched greedy: a tiny random model never stops
        print(f'\n=== stage {n}: {name}\n    run_evaluation_ArcMini.py {" ".join(argv)}', flush=True)
        start = time.time()
        evaluate(argv)
        wall[n] = time.time() - start
        run_dir = os.path.join(args.output_dir, 'smoke') if args.smoke else args.output_dir
        shutil.copyfile(os.path.join(run_dir, 'results.json'), os.path.join(ladder_dir, f'{n}.json'))
    rows = []  # every stage measured in this run directory, also by an earlier call (a ladder run in parts)
    for n, (name, _) in enumerate(STAGES, 1):
        path = os.path.join(ladder_dir, f'{n}.json')
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
            rows.append({'stage': n, 'name': name, 'command': res['command'], 'date': res['date'],
                         'score': res['score'], 'n_tasks': res['n_tasks'],
                         'correct_found': res['summary'].get('correct_found'), 'timings_s': res['timings_s'],
                         'wall_s': wall.get(n), 'device': res['device']})
    report = {**run_record.header(), 'model': model_dir(args), 'model_trained': model_identity(model_dir(args)),
              'stages': rows}
    print_table(rows)
    if not args.smoke:
        card = rows[-1]['device'].replace(' ', '_') if rows else 'none'
        out = args.output or os.path.join(REPO, 'results', f'ladder_ArcMini_{card}.json')
        run_record.write_json(out, report)
        print(f'wrote {out}')
    return report


def evaluate(argv):
    """One run of run_evaluation_ArcMini.py (its recipe, arcmini.EVALUATION; its path for multi-GPU workers)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'run_evaluation_ArcMini.py')
    return evaluation.script_main(f'{script}: one stage of the ladder', arcmini.EVALUATION, script, argv,
                                  cpu_tasks=arcmini.CPU_TASKS, smoke_overrides=smoke.evaluation_run)


def model_dir(args):
    """The evaluated model: --model in --eval-args, else the recipe's."""
    flags = args.eval_args.split()
    return flags[flags.index('--model') + 1] if '--model' in flags[:-1] else arcmini.EVALUATION['model']


def model_identity(model):
    """When and by which command the evaluated model was trained (from its run_config.json), to tell ladders apart."""
    path = os.path.join(model, run_record.RUN_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    return {k: cfg.get(k) for k in ('date', 'argv', 'git_commit')}


def gpu_seconds(timings):
    """(TTT, generation, scoring) in GPU-seconds: a multi-GPU run's workers report theirs as gpu_s_*, summed over
    the GPUs (the shared adapter is trained on one GPU before they start); a one-GPU run's own timings are that."""
    if timings.get('gpus', 1) > 1:
        return (timings.get('gpu_s_ttt_shared', 0) + timings.get('gpu_s_ttt', 0), timings.get('gpu_s_generate', 0),
                timings.get('gpu_s_score', 0))
    return timings.get('ttt', 0), timings.get('generate', 0), timings.get('score', 0)


def print_table(rows):
    print('| stage | top-2 score | correct among candidates | GPU-seconds: TTT / generation / scoring | wall seconds (GPUs) |')
    print('|---|---|---|---|---|')
    for r in rows:
        t, pct = r['timings_s'], 100 * r['score'] / r['n_tasks'] if r['score'] is not None else float('nan')
        found = 100 * r['correct_found'] if r['correct_found'] is not None else float('nan')
        ttt, gen, score = gpu_seconds(t)
        print(f"| {r['stage']}. {r['name']} | {r['score']:.2f} / {r['n_tasks']} ({pct:.1f}%) | {found:.1f}% | "
              f"{ttt:.0f} / {gen:.0f} / {score:.0f} | {t.get('total', 0):.0f} ({t.get('gpus', 1)}) |")


if __name__ == '__main__':
    main()
