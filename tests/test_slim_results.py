"""make_slim_results.py: the copy of a results file kept in results/ counts what the full file counts."""
import json

import pytest

import compare_results
import make_slim_results


def results_file(path):
    grid = [[1, 2], [3, 4]]
    cand = lambda correct, attempt: {'output': grid, 'correct': correct, 'attempt': attempt, 'scores': {'s': 1.0},
                                     'scores_inf': {'v0': 0.5}, 'scores_aug': {'v1': 0.25}}
    table = {'a_0': [cand(False, 1), cand(False, 2), cand(True, None)],  # right answer found, not submitted
             'b_0': [cand(True, 1), cand(False, None)], 'c_0': []}
    path.write_text(json.dumps({'score': 1.0, 'n_tasks': 3, 'candidates': table}))
    return str(path)


def test_the_slim_copy_counts_what_the_full_file_counts(tmp_path):
    full = results_file(tmp_path / 'results.json')
    make_slim_results.main([full, str(tmp_path / 'slim.json'), '--note', 'what ran'])
    slim = json.load(open(tmp_path / 'slim.json'))
    rows, n = compare_results.compare([full, str(tmp_path / 'slim.json')])
    assert n == 2 and rows[0][1:] == rows[1][1:] == (1, 2)
    kept = [c for cands in slim['candidates'].values() for c in cands]
    assert not any('scores_inf' in c or 'scores_aug' in c for c in kept)
    assert all(('output' in c) == (c['attempt'] is not None) and 'scores' in c for c in kept)
    assert slim['note'].startswith('what ran ') and slim['score'] == 1.0


@pytest.mark.parametrize('content, problem', [('{"score": 1}', 'no "candidates" table'), ('{', 'Expecting')])
def test_a_file_without_candidates_is_one_line_with_status_2(tmp_path, capsys, content, problem):
    (tmp_path / 'r.json').write_text(content)
    with pytest.raises(SystemExit) as e:
        make_slim_results.main([str(tmp_path / 'r.json'), str(tmp_path / 'out.json')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f'make_slim_results.py: error: {tmp_path / "r.json"}: ')
    assert problem in err and err.count('\n') == 1 and not (tmp_path / 'out.json').exists()


def test_rows_keep_each_runs_numbers_and_say_which_submitted_the_same(tmp_path):
    a, b, c = (results_file(tmp_path / f'{n}.json') for n in 'abc')
    other = json.load(open(c))
    other['candidates']['b_0'][0]['output'] = [[9]]  # c submits another grid for b_0
    other['timings_s'] = {'generate': 1.5}
    (tmp_path / 'c.json').write_text(json.dumps(other))
    make_slim_results.main(['--rows', a, b, c, str(tmp_path / 'rows.json'), '--names', 'base', 'graphs', 'other',
                            '--note', 'A/B'])
    out = json.load(open(tmp_path / 'rows.json'))
    assert out['note'] == 'A/B' and [r['name'] for r in out['rows']] == ['base', 'graphs', 'other']
    assert [r['same_attempts_as'] for r in out['rows']] == [[], ['base'], []]
    assert all('candidates' not in r and r['score'] == 1.0 for r in out['rows'])
    assert out['rows'][2]['timings_s'] == {'generate': 1.5}


def test_several_files_need_rows_and_names_must_match(tmp_path, capsys):
    a, b = (results_file(tmp_path / f'{n}.json') for n in 'ab')
    for argv in ([a, b, str(tmp_path / 'o.json')], ['--rows', a, b, str(tmp_path / 'o.json'), '--names', 'x']):
        with pytest.raises(SystemExit) as e:
            make_slim_results.main(argv)
        assert e.value.code == 2
    assert 'several results files need --rows' in capsys.readouterr().err
