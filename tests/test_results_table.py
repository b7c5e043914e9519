"""The README's results table is the one training_code/make_results_table.py writes from results/*.json.

    python -m pytest -q tests/test_results_table.py
"""
import json
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


@pytest.mark.parametrize('make, problem', [
    (lambda p: None, 'cannot read it (No such file or directory)'),
    (lambda p: p.mkdir(), 'cannot read it (Is a directory)'),
    (lambda p: p.write_bytes(f'{mrt.START}\ncaf\xe9\n{mrt.END}\n'.encode('latin-1')), 'not UTF-8 text'),
    (lambda p: p.write_text('no table here\n'), 'expected one <!-- results-table:start')],
    ids=['missing', 'a folder', 'latin-1', 'no markers'])
def test_a_bad_readme_is_one_line_with_status_2(tmp_path, capsys, make, problem):
    readme = tmp_path / 'README.md'
    make(readme)
    for flags in ([], ['--check']):
        assert mrt.main(['--readme', str(readme), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f'make_results_table.py: error: --readme {readme}: {problem}') and err.count('\n') == 1


def test_a_readme_under_a_file_or_read_only_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / 'file').write_text('')
    assert mrt.main(['--readme', str(tmp_path / 'file' / 'README.md')]) == 2
    assert 'cannot read it (Not a directory)' in capsys.readouterr().err
    readme = tmp_path / 'README.md'
    readme.write_text(f'{mrt.START}\n| stale |\n{mrt.END}\n')
    real_open = open

    def read_only(path, mode='r', **kw):  # as on a read-only mount (root would write a chmod 444 file anyway)
        if 'w' in mode:
            raise PermissionError(13, 'Permission denied')
        return real_open(path, mode, **kw)
    monkeypatch.setattr(mrt, 'open', read_only, raising=False)
    assert mrt.main(['--readme', str(readme)]) == 2
    assert capsys.readouterr().err == f'make_results_table.py: error: --readme {readme}: cannot write it ' \
                                      '(Permission denied)\n'
    assert '| stale |' in readme.read_text()


def test_an_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        mrt.main(['--bogus'])
    assert exit_.value.code == 2 and capsys.readouterr().err.count('\n') == 1


def test_compare_results_counts_only_the_test_inputs_both_runs_reached(tmp_path, capsys):
    import json

    import compare_results

    right = dict(output=[[1]], correct=True)
    wrong = dict(output=[[2]], correct=False)
    a = {'t1_0': [dict(right, attempt=1)], 't2_0': [dict(wrong, attempt=1), dict(right, attempt=None)],
         't3_0': [dict(right, attempt=2)]}
    b = {'t1_0': [dict(wrong, attempt=1)], 't2_0': [dict(right, attempt=2)], 't3_0': []}  # t3: not reached
    paths = []
    for name, table in (('a', a), ('b', b)):
        paths.append(str(tmp_path / f'{name}.json'))
        with open(paths[-1], 'w') as f:
            json.dump(dict(score=1.0, candidates=table), f)
    rows, n = compare_results.compare(paths)
    assert n == 2 and rows == [(paths[0], 1, 2), (paths[1], 1, 1)]
    (tmp_path / 'bad.json').write_text('{"score": 1}')
    with pytest.raises(SystemExit) as e:
        compare_results.main([paths[0], str(tmp_path / 'bad.json')])
    assert e.value.code == 2 and 'bad.json: no "candidates" table' in capsys.readouterr().err


@pytest.mark.parametrize('table', [{'a_0': [1]}, {'a_0': {'x': 1}}, {'a_0': None}])
def test_compare_results_names_a_damaged_candidates_table_in_one_line(tmp_path, capsys, table):
    """Issue #35, third round: candidates that are not lists of dicts ended in an AttributeError traceback."""
    import compare_results
    path = tmp_path / 'r.json'
    path.write_text(json.dumps({'candidates': table}))
    with pytest.raises(SystemExit) as exit_:
        compare_results.main([str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "candidates of 'a_0'" in err and '\n' not in err, err
