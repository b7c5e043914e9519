"""The README's results table is the one training_code/make_results_table.py writes from results/*.json.

    python -m pytest -q tests/test_results_table.py
"""
import os

import pytest

import make_results_table as mrt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_table_equals_the_results_files():
    with open(os.path.join(REPO, 'README.md')) as f:
        _, in_readme, _ = mrt.split_readme(f.read())
    assert in_readme == mrt.table(), 'run: python training_code/make_results_table.py'


def test_check_mode_fails_on_a_stale_table(tmp_path, capsys):
    readme = tmp_path / 'README.md'
    readme.write_text(f'intro\n{mrt.START}\n| stale |\n{mrt.END}\nrest\n')
    assert mrt.main(['--readme', str(readme), '--check']) == 1
    assert mrt.main(['--readme', str(readme)]) == 0  # rewrites the table between the markers, nothing else
    text = readme.read_text()
    assert text.startswith('intro\n') and text.endswith('\nrest\n') and '| stale |' not in text
    assert mrt.main(['--readme', str(readme), '--check']) == 0


def test_every_headline_row_comes_from_its_files():
    table = mrt.table()
    assert len(table.splitlines()) == 2 + len(mrt.HEADLINE)
    for entry in mrt.HEADLINE:
        assert os.path.exists(os.path.join(REPO, entry['results'])), entry['results']
        assert entry['protocol'] in (mrt.DEMOS, mrt.HELD_OUT)
    main_job = mrt.row(mrt.HEADLINE[0])
    assert '129 / 400 (32.25%)' in main_job and '`python training_code/run_evaluation_ArcMini.py`' in main_job


@pytest.mark.parametrize('value, text', [(129.0, '129'), (26.625, '26.63'), (0.8333, '0.83'), (3.75, '3.75')])
def test_number(value, text):
    assert mrt.number(value) == text
