"""Two evaluations of the same tasks compared on what both reached: the test inputs that have candidates in both
results files (a run cut by its time budget leaves the rest without any), how many of them each run solves in its
two attempts and how many have the right answer among their candidates.

    python training_code/compare_results.py results/A.json results/B.json

Only runs with known solutions can be compared (`correct` is recorded per candidate).
"""
import argparse
import json

from input_checks import ArgumentParser, InputError


def candidates(path):
    """{test input: its candidates} of one results file; InputError where the file has none to compare."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f'{path}: cannot read a results file ({e})')
    table = record.get('candidates') if isinstance(record, dict) else None
    if not isinstance(table, dict):
        raise InputError(f'{path}: no "candidates" table (a results.json of run_evaluation_*.py)')
    bad = next((k for k, v in table.items() if not isinstance(v, list) or not all(isinstance(c, dict) for c in v)),
               None)
    if bad is not None:
        raise InputError(f'{path}: the candidates of {bad!r} are not a list of candidates (a damaged results file)')
    return table


def counts(table, inputs):
    """(solved in the two attempts, answer among the candidates) over the given test inputs."""
    solved = sum(any(c.get('correct') and c.get('attempt') in (1, 2) for c in table[k]) for k in inputs)
    found = sum(any(c.get('correct') for c in table[k]) for k in inputs)
    return solved, found


def compare(paths):
    """Rows (file, solved, found) on the test inputs every file reached, and their number."""
    tables = [candidates(p) for p in paths]
    common = set.intersection(*({k for k, v in t.items() if v} for t in tables))
    return [(p, *counts(t, common)) for p, t in zip(paths, tables)], len(common)


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('results', nargs='+', help='results.json files of evaluations of the same tasks')
    args = p.parse_args(argv)
    try:
        rows, n = compare(args.results)
    except InputError as e:
        p.error(str(e))
    print(f'{n} test inputs with candidates in every file')
    print('| results file | solved (top 2) | answer among the candidates |\n|---|---|---|')
    for path, solved, found in rows:
        print(f'| {path} | {solved} / {n} | {found} / {n} |')


if __name__ == '__main__':
    main()
