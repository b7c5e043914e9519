"""The evaluation run end to end on CPU: a tiny model that has memorised two real ARC tasks under the views
the run uses, so DFS finds real candidates; resume from the cache, byte-identical reruns, TTT variants.

    python -m pytest -q tests/test_evaluation.py
"""
import importlib
import json
import os

import pytest
import torch

import arc_loader
import candidates
import evaluation
import inference_tools
import model_tools
import training
from arc_downloader import arc_paths

pytestmark = pytest.mark.slow  # the memorised model trains for a minute; every test runs the evaluation
N_VIEWS, N_SCORE = 2, 2
RUN_ARGS = ['--backend', 'transformers', '--no-load-in-4bit', '--n-views', str(N_VIEWS), '--n-score-views',
            str(N_SCORE), '--min-prob', '0.05', '--max-tokens', '2048', '--preprompt', '']


def small_tasks(n=2):
    chal, sols = arc_paths('evaluation')
    ds = arc_loader.ArcDataset.load_from_json(chal).load_solutions(sols)
    single = [b for b, t in ds.challenge.items() if len(t['test']) == 1]
    bases = sorted(single, key=lambda b: len(ds.fmt_task(f'{b}_0', preprompt='')['text']))[:n]
    return {b: ds.challenge[b] for b in bases}, {b: ds.solutions[b] for b in bases}


@pytest.fixture(scope='module')
def memorised(tmp_path_factory):
    """(model dir, challenges file): a tiny Llama trained on exactly the prompts + answers the run will see."""
    root = tmp_path_factory.mktemp('eval')
    chal, sols = small_tasks()
    chal_path, sol_path = root / 'x_challenges.json', root / 'x_solutions.json'
    chal_path.write_text(json.dumps(chal))
    sol_path.write_text(json.dumps(sols))
    ds = arc_loader.ArcDataset(chal, sols)
    fmt = dict(arc_loader.FMT_OPTS, preprompt='')
    keys = []
    for key in ds.keys:
        keys += candidates.view_keys(ds, key, N_VIEWS, 10000) + candidates.view_keys(ds, key, N_SCORE, 0)
    texts = [ds.fmt_task(k, **fmt)['text'] for k in keys]
    tok = model_tools.arc_tokenizer()
    model = model_tools.create_model(tok, hidden_size=96, num_layers=2, num_heads=4, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    training.train_model(model, tok, texts * 8, str(root / 'ckpt'),
                         training.OptimizerSettings(lr=3e-3, embedding_lr=3e-3, warmup_ratio=0.0),
                         training.BatchSettings(batch_size=4, grad_accum=1, epochs=12, mask_first_n_examples=0),
                         training.RunSettings(save_steps=10**6, logging_steps=1000, resume=False))
    torch.set_num_threads(threads)
    model_tools.save_model_and_tokenizer(str(root / 'model'), model, tok, {'test': 'memorised'})
    return str(root / 'model'), str(chal_path)


def run(model_dir, challenges, out_dir, *extra):
    script = importlib.import_module('run_evaluation_Llama-rearc_without_ttt')
    argv = ['--model', model_dir, '--challenges', challenges, '--output-dir', str(out_dir), *RUN_ARGS, *extra]
    return script.main(argv)


def test_end_to_end_solves_memorised_tasks(memorised, tmp_path):
    model_dir, chal = memorised
    score = run(model_dir, chal, tmp_path)
    assert score == pytest.approx(2.0)
    results = json.loads((tmp_path / 'results.json').read_text())
    cands = results['candidates']
    assert len(cands) == 2 and all(any(c['correct'] for c in v) for v in cands.values())
    first = next(iter(cands.values()))[0]
    assert len(first['scores_aug']) == N_SCORE and first['scores_inf'] and 'mul_all_prob' in first['scores']
    sub = json.loads((tmp_path / 'submission.json').read_text())
    assert set(sub) == set(json.loads(open(chal).read()))
    assert (tmp_path / 'report' / 'index.html').exists() and (tmp_path / 'report' / 'accuracy.png').exists()
    # what made the submission, and which candidates it holds
    assert results['model'] == model_dir and results['selection'] == 'mul_all_prob' == results['settings']['selection']
    for name, tests in cands.items():
        base, i = name.rsplit('_', 1)
        assert [c['attempt'] for c in tests[:3]] == [1, 2, None][:len(tests)]
        assert sub[base][int(i)]['attempt_1'] == tests[0]['output']
    page = (tmp_path / 'report' / 'index.html').read_text()
    assert model_dir in page and 'mul_all_prob (attempts 1 and 2' in page


@pytest.mark.parametrize('mode', ['batch1', 'views', 'all_tasks'])
def test_rerun_resumes_from_cache_and_is_byte_identical(memorised, tmp_path, monkeypatch, capsys, mode):
    # batch1: one view at a time; views: a batched DFS per test input; all_tasks: one batched DFS over the views
    # of every task, in groups of N_VIEWS prompts, each saved when done.
    import batched_dfs
    model_dir, chal = memorised
    flags = {'batch1': ['--no-batch-views'], 'views': ['--batch-views', '--prefetch-tasks', '0'],
             'all_tasks': ['--batch-views', '--batch-size', str(N_VIEWS)]}[mode]
    calls = {'prompts': 0}
    module, name = (inference_tools, 'dfs') if mode == 'batch1' else (batched_dfs, 'batched_dfs')
    real = getattr(module, name)

    def counted():
        calls['prompts'] += 1
        if kill_after is not None and calls['prompts'] >= kill_after:
            raise KeyboardInterrupt('killed')

    def counting(model, prompts, *a, **kw):
        if mode == 'batch1':
            counted()
            return real(model, prompts, *a, **kw)
        save = kw['callback']
        kw['callback'] = lambda idx, res: [save(idx, res)] + [counted() for _ in idx]  # killed after a saved group
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(module, name, counting)
    kill_after = N_VIEWS + (mode == 'batch1')  # batched: the first group is saved; batch-1: a task is done
    with pytest.raises(SystemExit) as exit_:  # the kill reads as Ctrl-C: status 130 and how to resume
        run(model_dir, chal, tmp_path / 'a', *flags)
    assert exit_.value.code == 130
    kill_after, calls['prompts'] = None, 0
    run(model_dir, chal, tmp_path / 'a', *flags)
    assert calls['prompts'] == N_VIEWS  # only the unfinished half is generated again
    calls['prompts'] = 0
    capsys.readouterr()
    run(model_dir, chal, tmp_path / 'a', *flags)
    assert calls['prompts'] == 0  # everything from the cache, and the run says so
    out = capsys.readouterr().out
    n = 2 * N_VIEWS  # two tasks of one test input
    assert f'resumed: {n} of {n} candidate searches and ' in out and ' scores came from the cache' in out
    assert out.count("* task '") == 2 and out.count('<- selection') == 1  # a line per test input, one table
    run(model_dir, chal, tmp_path / 'b', *flags)  # a fresh run directory: same seeds, same bytes
    assert (tmp_path / 'a' / 'submission.json').read_bytes() == (tmp_path / 'b' / 'submission.json').read_bytes()


def assert_same_candidates(run_a, run_b):
    """Two runs' results.json hold the same test inputs, candidates in the same order, and NLLs per view within 1e-4."""
    a, b = (json.loads((run / 'results.json').read_text())['candidates'] for run in (run_a, run_b))
    assert a.keys() == b.keys()
    for key in a:
        assert [c['output'] for c in a[key]] == [c['output'] for c in b[key]]
        for x, y in zip(a[key], b[key]):
            assert x['scores_inf'].keys() == y['scores_inf'].keys()
            assert all(abs(x['scores_inf'][k] - y['scores_inf'][k]) < 1e-4 for k in x['scores_inf'])


def test_batched_and_batch_one_dfs_runs_agree(memorised, tmp_path):
    model_dir, chal = memorised
    run(model_dir, chal, tmp_path / 'one', '--no-batch-views', '--no-report')
    run(model_dir, chal, tmp_path / 'many', '--batch-views', '--batch-size', '3', '--no-report')
    assert (tmp_path / 'one' / 'submission.json').read_bytes() == (tmp_path / 'many' / 'submission.json').read_bytes()
    assert_same_candidates(tmp_path / 'one', tmp_path / 'many')


@pytest.mark.parametrize('sampler', ['dfs', 'greedy'])
def test_decode_graphs_reach_the_search_and_find_the_same_candidates(memorised, tmp_path, monkeypatch, sampler):
    """--decode-graphs (decode steps on fixed shapes; CUDA graphs only on CUDA): the flag reaches the batched search,
    and the candidates and their NLLs are those of the growing cache's."""
    import batched_dfs
    model_dir, chal = memorised
    search = ['--sampler', sampler, '--batch-views', '--no-report']
    run(model_dir, chal, tmp_path / 'plain', *search)
    fn = 'batched_dfs' if sampler == 'dfs' else 'batched_greedy'
    flags, real = [], getattr(batched_dfs, fn)

    def recording(*a, decode_graphs=False, **kw):
        flags.append(decode_graphs)
        return real(*a, decode_graphs=decode_graphs, **kw)

    monkeypatch.setattr(batched_dfs, fn, recording)
    run(model_dir, chal, tmp_path / 'fixed', *search, '--decode-graphs')
    assert flags and all(flags)
    assert_same_candidates(tmp_path / 'plain', tmp_path / 'fixed')


@pytest.mark.parametrize('sampler', ['dfs', 'greedy'])
def test_guessed_views_find_the_same_candidates(memorised, tmp_path, monkeypatch, sampler):
    """--guess-views: each test input's first view is searched alone, its best grid guides the other views (where
    the first view found one); the candidates and their NLLs are those of the unguided search (DFS or greedy)."""
    import batched_dfs
    model_dir, chal = memorised
    search = ['--sampler', sampler, '--batch-views', '--no-report']
    run(model_dir, chal, tmp_path / 'plain', *search)
    fn = 'batched_dfs' if sampler == 'dfs' else 'batched_greedy'
    calls, real = [], getattr(batched_dfs, fn)

    def recording(model, prompts, *a, guesses=None, **kw):
        calls.append(guesses)
        return real(model, prompts, *a, guesses=guesses, **kw)

    monkeypatch.setattr(batched_dfs, fn, recording)
    run(model_dir, chal, tmp_path / 'guessed', *search, '--guess-views')
    assert len(calls) == 2 and calls[0] is None and len(calls[1]) == 2 * (N_VIEWS - 1)  # two tasks, one test input each
    assert any(calls[1])  # the later views of a test input whose first view found a grid follow it first
    assert_same_candidates(tmp_path / 'plain', tmp_path / 'guessed')
    assert (tmp_path / 'plain' / 'submission.json').read_bytes() == (tmp_path / 'guessed' / 'submission.json').read_bytes()


def test_cache_is_keyed_by_the_model(memorised, tmp_path):
    model_dir, chal = memorised
    run(model_dir, chal, tmp_path)
    other = tmp_path / 'other_model'
    model, tok = model_tools.load_model(model_dir, backend='transformers')
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform predictions: nothing above min_prob
    model_tools.save_model_and_tokenizer(str(other), model, tok)
    assert run(str(other), chal, tmp_path) == 0.0  # same run directory, yet no stale results


def test_shared_and_per_task_ttt(memorised, tmp_path):
    model_dir, chal = memorised
    ttt = ['--ttt-max-steps', '2', '--ttt-copies', '1', '--ttt-optim', 'adamw_torch', '--no-report']
    run(model_dir, chal, tmp_path / 'shared', '--ttt', 'shared', *ttt)
    assert os.path.exists(tmp_path / 'shared' / 'finetuned_model' / 'run_config.json')
    run(model_dir, chal, tmp_path / 'shared', '--ttt', 'shared', *ttt)  # reuses the saved adapter
    run(model_dir, chal, tmp_path / 'per_task', '--ttt', 'per_task', '--ttt-mask-first', '1', *ttt)
    results = json.loads((tmp_path / 'per_task' / 'results.json').read_text())
    assert results['timings_s']['ttt'] > 0 and len(results['candidates']) == 2


def test_per_task_ttt_leaves_the_base_model_unchanged(memorised, tmp_path):
    model, tok = model_tools.load_model(memorised[0], backend='transformers')
    before = candidates.model_fingerprint(model)
    args = evaluation.evaluation_arg_parser('', model='', output_dir='').parse_args(
        ['--ttt-max-steps', '1', '--ttt-copies', '1', '--ttt-optim', 'adamw_torch'])
    ttt = evaluation.TTTSettings.from_args(args)
    for _ in range(2):
        peft_model = evaluation.train_ttt_adapter(model, tok, ['I1\n+/-=O2\n</s>'] * 2, ttt, args.backend, str(tmp_path),
                                                  resume=False)
        model = peft_model.unload()
    assert candidates.model_fingerprint(model) == before


def test_ttt_settings_are_every_ttt_flag_and_the_seed():
    # the per-task cache key and the adapter's run_config.json: as when they were read from every --ttt* flag
    args = evaluation.evaluation_arg_parser('', model='m', output_dir='o').parse_args([])
    settings = evaluation.TTTSettings.from_args(args)
    assert settings.ttt_max_minutes == args.ttt_max_minutes  # a time limit: read, but not part of the identity
    flags = [k for k in vars(args) if k.startswith('ttt') and k != 'ttt_max_minutes']
    ttt = settings.identity()
    assert ttt == {k: getattr(args, k) for k in flags} | {'seed': args.seed}
    assert list(ttt) == flags + ['seed']


def test_smoke_scripts_write_valid_submissions(tmp_path):
    script = importlib.import_module('run_evaluation_Llama-rearc_without_ttt')
    script.main(['--smoke', '--output-dir', str(tmp_path)])
    sub = json.loads((tmp_path / 'smoke' / 'submission.json').read_text())
    assert len(sub) == 2 and all('attempt_1' in e and 'attempt_2' in e for v in sub.values() for e in v)


def test_tasks_split_over_worker_processes_give_the_same_submission(memorised, tmp_path):
    model_dir, chal = memorised
    run(model_dir, chal, tmp_path / 'one', '--gpus', '1', '--no-report')
    run(model_dir, chal, tmp_path / 'two', '--gpus', '2', '--no-report')  # two worker processes (CPU here)
    assert (tmp_path / 'one' / 'submission.json').read_bytes() == (tmp_path / 'two' / 'submission.json').read_bytes()
    timings = json.loads((tmp_path / 'two' / 'results.json').read_text())['timings_s']
    assert timings['gpus'] == 2 and timings['gpu_s_generate'] > 0


def test_a_budget_far_too_small_still_writes_a_complete_valid_submission(memorised, tmp_path):
    model_dir, chal = memorised
    assert run(model_dir, chal, tmp_path, '--time-budget-s', '0', '--no-report') == 0.0
    sub = json.loads((tmp_path / 'submission.json').read_text())
    ds = arc_loader.ArcDataset.load_from_json(chal)
    arc_loader.check_submission(sub, ds)
    assert all(e['attempt_1'] == [[0]] for v in sub.values() for e in v)


@pytest.mark.parametrize('route', ['prefetch', 'one_by_one'])
def test_the_budget_holds_inside_a_batch_and_keeps_what_was_found(memorised, tmp_path, monkeypatch, route):
    """The deadline passes while the batched search runs (here: after its first decode steps, by a clock that
    jumps): the search stops there, scoring starts no block, and the tasks it reached are submitted with the
    candidates found (before, a prefetched block finished past the budget was thrown away: all fallbacks)."""
    import batched_dfs
    import time as time_module
    model_dir, chal = memorised
    real_time, jumped = time_module.time, {'at': None}

    def clock():  # one hour later once the search has made 40 decode steps
        return real_time() + (3600 if jumped['at'] is not None else 0)
    real_decode = batched_dfs._decode

    def decode(model, walk, cache, mask, state, token, positions, counter, *rest):
        if counter['decode_steps'] >= 40 and jumped['at'] is None:
            jumped['at'] = counter['decode_steps']
        return real_decode(model, walk, cache, mask, state, token, positions, counter, *rest)
    monkeypatch.setattr(batched_dfs, '_decode', decode)
    monkeypatch.setattr(batched_dfs.time, 'time', clock)
    flags = ['--sampler', 'dfs', '--batch-views'] + (['--prefetch-tasks', '0'] if route == 'one_by_one' else [])
    score = run(model_dir, chal, tmp_path, '--time-budget-s', '600', '--no-report', *flags)
    results = json.loads((tmp_path / 'results.json').read_text())
    found = [c for v in results['candidates'].values() for c in v]
    assert jumped['at'] is not None and found  # cut inside the search, and what it found is submitted
    assert all(not c['scores_aug'] for c in found)  # no scoring block started past the deadline
    sub = json.loads((tmp_path / 'submission.json').read_text())
    arc_loader.check_submission(sub, arc_loader.ArcDataset.load_from_json(chal))
    assert score > 0 and any(e['attempt_1'] != [[0]] for v in sub.values() for e in v)


def test_the_budget_holds_inside_a_view_of_the_batch1_dfs(memorised, tmp_path, monkeypatch):
    """The batch-1 DFS (one view at a time) stops at the deadline inside a view, not at the view's end: no decode
    step after the clock jumps, and what the views found is submitted; a rerun without a budget solves both tasks."""
    import time as time_module
    model_dir, chal = memorised
    real_time, steps = time_module.time, {'n': 0, 'at': None}

    def clock():  # an hour later from decode step 142 on: in the third view (steps 111 to 148; replies after 141, 147)
        return real_time() + (3600 if steps['at'] is not None else 0)
    real_nll = inference_tools._PathLogits.nll

    def nll(self, path, on_guess):
        steps['n'] += 1
        if steps['n'] >= 142 and steps['at'] is None:
            steps['at'] = steps['n']
        return real_nll(self, path, on_guess)
    monkeypatch.setattr(inference_tools._PathLogits, 'nll', nll)
    monkeypatch.setattr(time_module, 'time', clock)
    run(model_dir, chal, tmp_path, '--time-budget-s', '600', '--no-report', '--sampler', 'dfs', '--no-batch-views')
    assert steps['at'] is not None and steps['n'] == steps['at']  # not one decode step past the deadline
    results = json.loads((tmp_path / 'results.json').read_text())
    found = [c for v in results['candidates'].values() for c in v]
    assert [len(v) for v in results['candidates'].values()] == [1, 1]  # the second task's from its cut view
    assert not found[1]['scores_aug']  # found past the deadline: not scored
    arc_loader.check_submission(json.loads((tmp_path / 'submission.json').read_text()),
                                arc_loader.ArcDataset.load_from_json(chal))
    monkeypatch.setattr(time_module, 'time', real_time)  # the rerun: cached views resumed, the rest searched
    assert run(model_dir, chal, tmp_path, '--no-report', '--sampler', 'dfs', '--no-batch-views') == pytest.approx(2.0)


def test_out_of_memory_on_one_task_costs_only_that_task(memorised, tmp_path, monkeypatch):
    model_dir, chal = memorised
    first = sorted(json.loads(open(chal).read()))[0]
    real_infer_test = candidates.TaskRunner.infer_test
    attempts = []

    def infer_test(self, dataset, keys, score_keys=()):
        if keys[0].startswith(first):
            attempts.append(self.prompts.max_input_tokens)
            raise torch.OutOfMemoryError('injected')
        return real_infer_test(self, dataset, keys, score_keys)

    monkeypatch.setattr(candidates.TaskRunner, 'infer_test', infer_test)
    assert run(model_dir, chal, tmp_path, '--no-report') == pytest.approx(1.0)  # the other task is solved
    assert len(attempts) == 2 and attempts[1] == attempts[0] // 2  # retried once with half the prompt budget
    sub = json.loads((tmp_path / 'submission.json').read_text())
    assert sub[first][0]['attempt_1'] == [[0]]


def test_batched_greedy_run_equals_generate_greedy_run(memorised, tmp_path):
    # --sampler greedy: the batched argmax decode over all views of all tasks, or generate() one view at a time.
    model_dir, chal = memorised
    run(model_dir, chal, tmp_path / 'one', '--sampler', 'greedy', '--no-batch-views', '--no-report')
    score = run(model_dir, chal, tmp_path / 'many', '--sampler', 'greedy', '--batch-views', '--no-report')
    assert score == pytest.approx(2.0)
    assert (tmp_path / 'one' / 'submission.json').read_bytes() == (tmp_path / 'many' / 'submission.json').read_bytes()


def test_full_model_ttt_trains_once_on_the_demonstrations_then_the_workers_use_it(tmp_path, capsys, monkeypatch):
    """--ttt full (the held-out protocol): the whole model trains on the tasks' demonstration pairs in the parent
    (the dataset handed to the ArcMini recipe, arcmini.train), the worker processes evaluate with the trained
    model, and a rerun reuses it."""
    import arcmini
    script = importlib.import_module('run_evaluation_ArcMini')
    argv = ['--smoke', '--ttt', 'full', '--output-dir', str(tmp_path), '--n-views', '1', '--n-score-views', '1',
            '--gpus', '2', '--no-report']
    given, real_train = [], arcmini.train
    monkeypatch.setattr(arcmini, 'train', lambda tasks, args: given.append(tasks) or real_train(tasks, args))
    script.main(argv)
    out = tmp_path / 'smoke'
    [tasks] = given
    assert len(tasks.challenge) == 2 and all(t['test'] == [] for t in tasks.challenge.values()) and not tasks.solutions
    [model_dir] = out.glob('full_ttt_model_*[!s]')  # named by the starting weights, tasks and settings
    trained = json.loads((model_dir / 'run_config.json').read_text())['settings']
    assert trained['init_model'] == str(out / 'tiny_model') and trained['steps'] == 2
    results = json.loads((out / 'results.json').read_text())
    assert results['timings_s']['gpus'] == 2 and results['timings_s']['ttt'] > 0
    assert results['settings']['model'] == str(model_dir)
    capsys.readouterr()
    script.main(argv)
    assert 'using the model trained earlier' in capsys.readouterr().out


def test_full_model_ttt_is_refused_by_recipes_without_a_full_trainer(tmp_path):
    script = importlib.import_module('run_evaluation_Llama-rearc_without_ttt')
    with pytest.raises(SystemExit) as exit_info:
        script.main(['--smoke', '--ttt', 'full', '--output-dir', str(tmp_path)])
    assert exit_info.value.code == 2


@pytest.mark.parametrize('sampler, row', [('dfs', 'dfs1'), ('greedy', 'greedy')])
def test_a_benchmark_row_gives_the_main_jobs_candidates(memorised, tmp_path, sampler, row):
    """run_benchmark_inference.py times the evaluation's own runner: on the same tasks its row of the CPU's default
    engine (batch-1 DFS; batched greedy) gives the main job's candidates, every view's NLL bit for bit."""
    model_dir, chal = memorised
    run(model_dir, chal, tmp_path / 'main', '--sampler', sampler, '--no-report')
    bench = importlib.import_module('run_benchmark_inference').main(
        ['--model', model_dir, '--challenges', chal, '--n-tasks', '2', '--n-views', str(N_VIEWS), '--min-prob', '0.05',
         '--max-tokens', '2048', '--samplers', row, '--no-scoring', '--output', str(tmp_path / 'bench.json')])
    main = json.loads((tmp_path / 'main' / 'results.json').read_text())['candidates']
    want = {name: {json.dumps(c['output']): c['scores_inf'] for c in cands} for name, cands in main.items()}
    got = {f'{base}_{i}': {json.dumps(c['output']): c['scores_inf'] for c in cands}
           for base, tests in bench['candidates'][row].items() for i, cands in enumerate(tests)}
    assert got == want and all(got.values())
