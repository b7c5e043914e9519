"""A results.json of run_evaluation_*.py made small enough to keep in results/: the per-view scores of every candidate
(scores_inf, scores_aug) and the grids of the candidates that were not submitted are dropped; each candidate keeps
whether it is correct, its attempt and its aggregate scores, so compare_results.py and make_results_table.py read
the file as before. A note says what was dropped, beside the note given here.

    python training_code/make_slim_results.py RUN/results.json results/NAME.json --note "what ran, on which card"
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
    """A copy of `results` without per-view scores and without the grids of candidates not submitted."""
    if not isinstance(results.get('candidates'), dict):
        raise ic.InputError('no "candidates" table (a results.json of run_evaluation_*.py)')
    kept = {}
    for key, cands in results['candidates'].items():
        kept[key] = [{k: v for k, v in c.items()
                      if k not in ('scores_inf', 'scores_aug') and (k != 'output' or c.get('attempt'))}
                     for c in cands]
    return dict(results, candidates=kept)


def main(argv=None):
    p = ic.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('results', help='results.json of an evaluation')
    p.add_argument('output', help='the slim copy (e.g. results/<model>_<protocol>_<card>.json)')
    p.add_argument('--note', default='', help='what ran: training, protocol, card, command (kept in "note")')
    args = p.parse_args(argv)
    try:
        with open(args.results) as f:
            results = slim(json.load(f))
    except (OSError, json.JSONDecodeError, ic.InputError) as e:
        print(f'make_slim_results.py: error: {args.results}: {e}', file=sys.stderr)
        sys.exit(2)
    results['note'] = ' '.join(filter(None, [args.note, DROPPED]))
    write_json(args.output, results)
    print(f'{args.output}: {os.path.getsize(args.output) / 1e6:.2f} MB (from {os.path.getsize(args.results) / 1e6:.2f} MB)')


if __name__ == '__main__':
    main()
