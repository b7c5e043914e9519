"""The pipeline notebooks execute on CPU (nbclient) with the shipped default model on a few tasks and write a
complete, valid submission, also when the time budget is far too small.

    python -m pytest -q tests/test_notebooks.py
"""
import json
import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from arc_downloader import arc_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = "['--n-views', '2', '--n-score-views', '2']"
pytestmark = pytest.mark.slow  # a notebook kernel and a run each


def execute(name, tmp_path, **params):
    """Run a notebook with its first code cell's parameters overridden (as papermill would)."""
    nb = nbformat.read(os.path.join(REPO, 'kaggle_notebooks', name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    code[0].source += '\n' + '\n'.join(f'{k} = {v}' for k, v in params.items())
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    return '\n'.join(o.get('text', '') for c in code for o in c.get('outputs', []))


def kaggle_data(tmp_path):
    """A stand-in for /kaggle/input/arc-prize-2024: a test file plus the evaluation files."""
    data = tmp_path / 'arc-prize-2024'
    data.mkdir()
    chal, sols = arc_paths('evaluation')
    shutil.copy(chal, data / 'arc-agi_evaluation_challenges.json')
    shutil.copy(sols, data / 'arc-agi_evaluation_solutions.json')
    tasks = json.load(open(chal))
    (data / 'arc-agi_test_challenges.json').write_text(json.dumps({k: tasks[k] for k in sorted(tasks)[-3:]}))
    return data


@pytest.mark.parametrize('budget', ['None', '0'])
def test_kaggle_notebook_fake_mode(tmp_path, budget):
    data, out = kaggle_data(tmp_path), tmp_path / 'working'
    text = execute('arc-prize-2024_kaggle.ipynb', tmp_path, REPO_DIR=repr(REPO), WHEELHOUSE=repr(str(tmp_path / 'none')),
                   DATA_DIR=repr(str(data)), OUTPUT_DIR=repr(str(out)), FAKE_MODE='True', FAKE_MODE_TASKS='2',
                   TIME_BUDGET_S=budget, EXTRA_ARGS=FAST)
    assert 'fake mode' in text and 'complete and valid' in text
    sub = json.load(open(out / 'submission.json'))
    assert len(sub) == 2
    if budget == '0':
        assert all(e['attempt_1'] == [[0]] for v in sub.values() for e in v)


def test_kaggle_notebook_hidden_test_mode(tmp_path):
    data, out = kaggle_data(tmp_path), tmp_path / 'working'
    execute('arc-prize-2024_kaggle.ipynb', tmp_path, REPO_DIR=repr(REPO), WHEELHOUSE=repr(str(tmp_path / 'none')),
            DATA_DIR=repr(str(data)), OUTPUT_DIR=repr(str(out)), FAKE_MODE='False', EXTRA_ARGS=FAST)
    assert set(json.load(open(out / 'submission.json'))) == set(json.load(open(data / 'arc-agi_test_challenges.json')))


def test_updated_notebook(tmp_path):
    out = tmp_path / 'out'
    text = execute('arc-prize-2024_updated.ipynb', tmp_path, REPO_DIR=repr(REPO), OUTPUT_DIR=repr(str(out)),
                   MAX_TASKS='2', EXTRA_ARGS=FAST)
    assert 'complete and valid' in text and len(json.load(open(out / 'submission.json'))) == 2
