"""The pipeline notebooks execute on CPU (nbclient) and write a complete, valid submission: on the 2024 layout
(ARC-AGI-1) with the shipped default model, on the 2025 layout (ARC-AGI-2) with a tiny stand-in model (the
layout is what is tested there, not the model), also when the time budget, or TTT's share of it, is far too small.

    python -m pytest -q tests/test_notebooks.py
"""
import json
import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

import smoke
from arc_downloader import arc_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = "['--n-views', '2', '--n-score-views', '2']"
pytestmark = pytest.mark.slow  # a notebook kernel and a run each
TINY_SEARCH = "'--n-score-views', '1', '--min-prob', '0.2', '--max-tokens', '4096'"
TINY = f"['--n-views', '1', {TINY_SEARCH}]"


def execute(name, tmp_path, **params):
    """Run a notebook with its first code cell's parameters overridden (as papermill would)."""
    nb = nbformat.read(os.path.join(REPO, 'kaggle_notebooks', name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    code[0].source += '\n' + '\n'.join(f'{k} = {v}' for k, v in params.items())
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    return '\n'.join(o.get('text', '') for c in code for o in c.get('outputs', []))


def kaggle_input(tmp_path, year, hidden_ids=False):
    """A stand-in for /kaggle/input with the competition folder arc-prize-<year>: the public evaluation files and a
    test file of 3 evaluation tasks (the placeholder), or of the same tasks under new ids (a hidden test set)."""
    data = tmp_path / 'input' / f'arc-prize-{year}'
    data.mkdir(parents=True)
    chal, sols = arc_paths('evaluation', f'arc-prize-{year}')
    shutil.copy(chal, data / 'arc-agi_evaluation_challenges.json')
    shutil.copy(sols, data / 'arc-agi_evaluation_solutions.json')
    tasks = json.load(open(chal))
    test = {(k[::-1] if hidden_ids else k): tasks[k] for k in sorted(tasks)[-3:]}
    (data / 'arc-agi_test_challenges.json').write_text(json.dumps(test))
    return data


def kaggle_params(tmp_path, **params):
    return dict(INPUT_DIR=repr(str(tmp_path / 'input')), REPO_DIR=repr(REPO), WHEELHOUSE=repr(str(tmp_path / 'none')),
                OUTPUT_DIR=repr(str(tmp_path / 'working')), **dict(dict(HELD_OUT_TTT='False'), **params))


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    """A tiny random model of ArcMini's architecture (grid positions): seconds per task on CPU."""
    return smoke.make_tiny_arc_model(str(tmp_path_factory.mktemp('tiny') / 'model'), grid=True)


@pytest.mark.parametrize('budget', ['None', '0'])
def test_kaggle_notebook_fake_mode(tmp_path, budget):
    kaggle_input(tmp_path, 2024)
    text = execute('arc-prize_kaggle.ipynb', tmp_path, **kaggle_params(
        tmp_path, COMPETITION_YEAR='2024', FAKE_MODE='True', FAKE_MODE_TASKS='2', TIME_BUDGET_S=budget,
        EXTRA_ARGS=FAST))
    assert 'fake mode' in text and 'complete and valid' in text
    sub = json.load(open(tmp_path / 'working' / 'submission.json'))
    assert len(sub) == 2
    if budget == '0':
        assert all(e['attempt_1'] == [[0]] for v in sub.values() for e in v)


def test_kaggle_notebook_hidden_test_mode(tmp_path):
    data = kaggle_input(tmp_path, 2024)
    execute('arc-prize_kaggle.ipynb', tmp_path, **kaggle_params(
        tmp_path, COMPETITION_YEAR='2024', FAKE_MODE='False', EXTRA_ARGS=FAST))
    assert set(json.load(open(tmp_path / 'working' / 'submission.json'))) == \
        set(json.load(open(data / 'arc-agi_test_challenges.json')))


@pytest.mark.parametrize('hidden', [False, True], ids=['placeholder', 'hidden'])
def test_kaggle_notebook_2025_layout(tmp_path, tiny_model, hidden):
    """ARC-AGI-2: the year found from the attached folder, fake mode from the test file's task ids."""
    data = kaggle_input(tmp_path, 2025, hidden_ids=hidden)
    text = execute('arc-prize_kaggle.ipynb', tmp_path, **kaggle_params(
        tmp_path, MODEL=repr(tiny_model), FAKE_MODE_TASKS='2', EXTRA_ARGS=TINY))
    assert str(data / 'arc-agi_test_challenges.json') in text and 'complete and valid' in text
    sub = json.load(open(tmp_path / 'working' / 'submission.json'))
    if hidden:
        assert 'fake mode' not in text and set(sub) == set(json.load(open(data / 'arc-agi_test_challenges.json')))
    else:
        public = sorted(json.load(open(data / 'arc-agi_evaluation_challenges.json')))
        assert 'fake mode' in text and sorted(sub) == public[:2]


def test_kaggle_notebook_ttt_out_of_time(tmp_path, tiny_model):
    """Shared TTT given no share of the budget stops after one step; search and scoring still run on every task."""
    data = kaggle_input(tmp_path, 2025, hidden_ids=True)
    ttt = "['--ttt', 'shared', '--ttt-copies', '4', '--ttt-batch-size', '1', '--ttt-optim', 'adamw_torch']"
    text = execute('arc-prize_kaggle.ipynb', tmp_path, **kaggle_params(
        tmp_path, COMPETITION_YEAR='2025', MODEL=repr(tiny_model), TIME_BUDGET_S='3600', TTT_SHARE='0',
        EXTRA_ARGS=f'{TINY} + {ttt}'))
    assert 'out of time at step 1 of 12' in text and 'complete and valid' in text
    out = tmp_path / 'working'
    assert os.path.exists(out / 'finetuned_model' / 'run_config.json')
    results = json.load(open(out / 'results.json'))
    assert results['settings']['ttt_max_minutes'] == 1e-6 and results['timings_s']['ttt'] > 0
    assert set(json.load(open(out / 'submission.json'))) == set(json.load(open(data / 'arc-agi_test_challenges.json')))


def test_kaggle_notebook_held_out_ttt_out_of_time(tmp_path, tiny_model):
    """The default for ArcMini, the held-out protocol: the whole model trains on the hidden tasks' demonstrations
    (--ttt full); given no share of the budget it stops after one step, and the submission is still complete."""
    data = kaggle_input(tmp_path, 2025, hidden_ids=True)
    full = "['--full-ttt-args', '--row-tokens 4096 --max-tokens 2048 --num-workers 0']"
    text = execute('arc-prize_kaggle.ipynb', tmp_path, **kaggle_params(
        tmp_path, COMPETITION_YEAR='2025', MODEL=repr(tiny_model), TIME_BUDGET_S='3600', TTT_SHARE='0',
        HELD_OUT_TTT='True', HELD_OUT_VIEWS='2', EXTRA_ARGS=f'[{TINY_SEARCH}] + {full}'))
    assert 'the whole model on the demonstration pairs of 3 tasks' in text and 'complete and valid' in text
    out = tmp_path / 'working'
    [model_dir] = out.glob('full_ttt_model_*[!s]')  # not its -checkpoints folder
    trained = json.load(open(model_dir / 'run_config.json'))['settings']
    assert trained['steps'] == 1 and trained['max_minutes'] == 1e-6
    results = json.load(open(out / 'results.json'))
    assert results['settings']['ttt'] == 'full' and results['timings_s']['ttt'] > 0
    assert results['settings']['n_views'] == 2  # HELD_OUT_VIEWS
    assert set(json.load(open(out / 'submission.json'))) == set(json.load(open(data / 'arc-agi_test_challenges.json')))


def test_updated_notebook(tmp_path):
    out = tmp_path / 'out'
    text = execute('arc-prize_updated.ipynb', tmp_path, REPO_DIR=repr(REPO), OUTPUT_DIR=repr(str(out)),
                   MAX_TASKS='2', EXTRA_ARGS=FAST)
    assert 'complete and valid' in text and len(json.load(open(out / 'submission.json'))) == 2


def test_updated_notebook_2025(tmp_path, tiny_model):
    out = tmp_path / 'out'
    text = execute('arc-prize_updated.ipynb', tmp_path, REPO_DIR=repr(REPO), OUTPUT_DIR=repr(str(out)),
                   COMPETITION_YEAR='2025', MODEL=repr(tiny_model), MAX_TASKS='1', EXTRA_ARGS=TINY)
    assert 'input/arc-prize-2025/arc-agi_evaluation_challenges.json' in text and 'complete and valid' in text
    assert len(json.load(open(out / 'submission.json'))) == 1


def test_kaggle_notebook_recipe_failure_still_submits(tmp_path):
    """The recipe raises (here: a damaged model folder, refused at load): the cause is printed and the notebook
    still ends with a complete, valid file of fallbacks; a file left by an earlier run is not taken for it."""
    data = kaggle_input(tmp_path, 2025, hidden_ids=True)
    broken = tmp_path / 'broken_model'
    broken.mkdir()
    (broken / 'config.json').write_text('{"model_type": ')
    (tmp_path / 'working').mkdir()
    (tmp_path / 'working' / 'submission.json').write_text('{"stale": [{"attempt_1": [[1]], "attempt_2": [[1]]}]}')
    text = execute('arc-prize_kaggle.ipynb', tmp_path, **kaggle_params(
        tmp_path, COMPETITION_YEAR='2025', MODEL=repr(str(broken)), EXTRA_ARGS=FAST))
    assert 'THE RECIPE FAILED' in text and 'complete and valid' in text and 'fallback attempts in 3 of 3' in text
    sub = json.load(open(tmp_path / 'working' / 'submission.json'))
    assert set(sub) == set(json.load(open(data / 'arc-agi_test_challenges.json')))
    assert all(e == {'attempt_1': [[0]], 'attempt_2': [[0]]} for v in sub.values() for e in v)


def test_kaggle_notebook_malformed_hidden_task(tmp_path, tiny_model):
    """One hidden task with a test entry that is no grid costs that task only."""
    data = kaggle_input(tmp_path, 2025, hidden_ids=True)
    path = data / 'arc-agi_test_challenges.json'
    tasks = json.load(open(path))
    bad = sorted(tasks)[0]
    tasks[bad]['test'] = [None]
    path.write_text(json.dumps(tasks))
    text = execute('arc-prize_kaggle.ipynb', tmp_path, **kaggle_params(
        tmp_path, COMPETITION_YEAR='2025', MODEL=repr(tiny_model), EXTRA_ARGS=TINY))
    assert 'THE RECIPE FAILED' not in text and 'complete and valid' in text
    sub = json.load(open(tmp_path / 'working' / 'submission.json'))
    assert set(sub) == set(tasks) and sub[bad] == [{'attempt_1': [[0]], 'attempt_2': [[0]]}]


@pytest.mark.parametrize('tasks', ['malformed', 'none'])
def test_kaggle_notebook_no_usable_hidden_task(tmp_path, tiny_model, tasks):
    """A hidden test file in which no task can be used (every one malformed, or none at all) is no placeholder:
    the notebook says why and writes fallback attempts for every task id the file names (it ran fake mode on the
    public evaluation tasks: a submission with none of the hidden ids)."""
    data = kaggle_input(tmp_path, 2025, hidden_ids=True)
    path = data / 'arc-agi_test_challenges.json'
    hidden = json.load(open(path))
    hidden = {k: dict(v, test=[None]) for k, v in hidden.items()} if tasks == 'malformed' else {}
    path.write_text(json.dumps(hidden))
    text = execute('arc-prize_kaggle.ipynb', tmp_path, **kaggle_params(
        tmp_path, COMPETITION_YEAR='2025', MODEL=repr(tiny_model), EXTRA_ARGS=TINY))
    assert 'fake mode' not in text and 'no usable task' in text and 'complete and valid' in text
    sub = json.load(open(tmp_path / 'working' / 'submission.json'))
    assert set(sub) == set(hidden) and all(v == [{'attempt_1': [[0]], 'attempt_2': [[0]]}] for v in sub.values())
