"""A results.json of run_evaluation_*.py made small enough to keep in results/: the per-view scores of every candidate
(scores_inf, scores_aug) and the grids of the candidates that were not submitted are dropped; each candidate keeps
whether it is correct, its attempt and its aggregate scores, so compare_results.py and make_results_table.py read
the file as before. A note says what was dropped, beside the note given here. With --rows, several runs of the
same tasks become one small file of rows (a curve, an A/B of engine settings): each run's score, summary, timings,
command and settings without its candidates, and which runs submitted the same attempts.

    python training_code/make_slim_results.py RUN/results.json results/NAME.json --note "what ran, on which card"
    python training_code/make_slim_results.py --rows A/results.json B/results.json results/NAME.json --names a b --note ...
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import input_checks as ic  # noqa: E402
from run_record import write_json  # noqa: E402

DROPPED = ('Per-view scores (scores_inf, scores_aug), and the grids of candidates not submitted, dropped from '
           '"candidates" by make_slim_results.py to keep the file small; "scores" holds their aggregates.')


def slim(results):
    """A copy of `results` (as `load` read it) without per-view scores and without the grids of candidates not
    submitted."""
    kept = {}
    for key, cands in results['candidates'].items():
        kept[key] = [{k: v for k, v in c.items()
                      if k not in ('scores_inf', 'scores_aug') and (k != 'output' or c.get('attempt'))}
                     for c in cands]
    return dict(results, candidates=kept)


def submitted(results):
    """{test input: its submitted grids by attempt} of a results file: two runs with equal ones submitted the same."""
    return {key: sorted((c['attempt'], c['output']) for c in cands if c.get('attempt'))
            for key, cands in results['candidates'].items()}


def rows(runs, names):
    """One row per run (name, results): everything but the candidates, and the earlier rows that submitted the same
    attempts for every test input (`same_attempts_as`)."""
    out, seen = [], []
    for name, results in zip(names, runs):
        attempts = submitted(results)
        row = {'name': name, **{k: v for k, v in results.items() if k != 'candidates'}}
        row['same_attempts_as'] = [other for other, theirs in seen if theirs == attempts]
        out.append(row)
        seen.append((name, attempts))
    return out


def load(path):
    """A results file with its "candidates" table; anything else ends the script with status 2 and one line."""
    try:
        with open(path) as f:
            results = json.load(f)
        if not isinstance(results.get('candidates'), dict):
            raise ic.InputError('no "candidates" table (a results.json of run_evaluation_*.py)')
        return results
    except (OSError, json.JSONDecodeError, ic.InputError) as e:
        print(f'make_slim_results.py: error: {path}: {e}', file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = ic.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('results', nargs='+', help='results.json of an evaluation (with --rows: of each run)')
    p.add_argument('output', help='the slim copy (e.g. results/<model>_<protocol>_<card>.json)')
    p.add_argument('--note', default='', help='what ran: training, protocol, card, command (kept in "note")')
    p.add_argument('--rows', action='store_true', help='one row per results file, without candidates')
    p.add_argument('--names', nargs='+', help='--rows: a name for each row (default: each file\'s folder name)')
    args = p.parse_args(argv)
    if len(args.results) > 1 and not args.rows:
        p.error('several results files need --rows')
    if args.names and len(args.names) != len(args.results):
        p.error(f'--names: {len(args.names)} names for {len(args.results)} results files')
    if args.rows:
        names = args.names or [os.path.basename(os.path.dirname(os.path.abspath(r))) for r in args.results]
        results = {'note': args.note, 'rows': rows([load(r) for r in args.results], names)}
    else:
        results = dict(slim(load(args.results[0])), note=' '.join(filter(None, [args.note, DROPPED])))
    write_json(args.output, results)
    print(f'{args.output}: {os.path.getsize(args.output) / 1e6:.2f} MB '
          f'(from {sum(os.path.getsize(r) for r in args.results) / 1e6:.2f} MB)')


if __name__ == '__main__':
    main()
