"""Per-task TTT batched over tasks (per_task_ttt.py): leave-one-out samples, training tasks together equals
training each alone, the time limit, resuming, and the evaluation's --ttt per_task end to end.

    python -m pytest -q tests/test_per_task_ttt.py
"""
import dataclasses
import importlib
import json
import os
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import arc_loader
import grid_positions
import model_tools
import per_task_ttt
import run_record
import task_tokens
from arc_downloader import arc_paths
from search import format_options


def real_tasks(n=2):
    """The n ARC-AGI-1 evaluation tasks with the shortest texts, with their solutions."""
    chal, sols = arc_paths('evaluation')
    ds = arc_loader.ArcDataset.load_from_json(chal).load_solutions(sols)
    bases = sorted(ds.challenge, key=lambda b: len(ds.fmt_task(f'{b}_0')['text']))[:n]
    return ds.only_tasks(bases)


@pytest.fixture(scope='module')
def tiny():
    """(model, tokenizer, tasks): a tiny grid model with task tokens for the two shortest evaluation tasks."""
    tasks = real_tasks()
    tok = model_tools.arc_tokenizer()
    task_tokens.add_tokens(tok, sorted(tasks.challenge))
    model = grid_positions.create_grid_model(tok, hidden_size=32, num_layers=1, num_heads=2, head_dim=16,
                                             intermediate_size=64, max_position_embeddings=2048, seed=0).eval()
    return model, tok, tasks


def settings(train, **kw):
    return per_task_ttt.Settings(**dict(dict(train=train, steps=3, copies=1, batch_size=2, r=4, warmup_steps=1,
                                             max_tokens=2048), **kw))


def samples_of(tiny, s):
    model, tok, tasks = tiny
    return per_task_ttt.task_samples(tasks, sorted(tasks.challenge), tok, s, format_options('', tok))


def test_leave_one_out_samples_hold_no_test_grid_and_each_demonstration_is_the_query_once():
    tasks = real_tasks(5)
    for base, task in tasks.challenge.items():
        loo = per_task_ttt.leave_one_out(task, base)
        assert len(loo) == len(task['train'])
        tests = [np.asarray(t['input']) for t in task['test']] + [np.asarray(s) for s in tasks.solutions[base]]
        for i, ds in enumerate(loo):
            demos, query = ds.get_pairs(f'{base}_0')
            assert query['output'].tolist() == task['train'][i]['output']  # demonstration i is the query
            assert [d['input'].tolist() for d in demos] == [d['input'] for j, d in enumerate(task['train']) if j != i]
            grids = [g for d in demos for g in (d['input'], d['output'])] + [query['input'], query['output']]
            assert not any(g.shape == t.shape and (g == t).all() for g in grids for t in tests
                           if not any(np.array_equal(t, np.asarray(p[k])) for p in task['train'] for k in p))
        texts, too_long = per_task_ttt.task_texts(task, base, settings('token', copies=2), dict(arc_loader.FMT_OPTS))
        assert len(texts) + too_long == len(task['train']) * 8 * 2  # queries x D8 x copies


@pytest.mark.parametrize('train', ['token', 'lora', 'full'])
def test_tasks_trained_together_learn_what_each_learns_alone(tiny, train):
    """The key property of the batching: a task's parameters do not depend on the other tasks of its batch (nor
    on how the batch is cut into forward passes)."""
    model, tok, _ = tiny
    s = settings(train)
    samples = samples_of(tiny, s)
    a, b = sorted(samples)
    together = per_task_ttt.train_group(model, tok, samples, per_task_ttt.Settings(**dict(
        vars(s), batch_tokens=1000)))
    for base in (a, b):
        alone = per_task_ttt.train_group(model, tok, {base: samples[base]}, s)[base]
        assert alone.keys() == together[base].keys()
        for name, tensor in alone.items():
            torch.testing.assert_close(together[base][name], tensor, rtol=1e-4, atol=1e-6)
    learnt = {'token': 'rows', 'lora': 'B.', 'full': 'D.'}[train]
    learnt = next(n for n in together[a] if n.startswith(learnt))
    assert together[a][learnt].abs().sum() > 0 and not torch.equal(together[a][learnt], together[b][learnt])
    assert all(p.grad is None for p in model.parameters())  # the model itself is untouched


@pytest.mark.parametrize('train', ['lora', 'full'])
def test_the_search_merges_a_task_into_the_weights_as_its_training_applied_it(tiny, tmp_path, train):
    """adapter_runners: a task's saved LoRA or layer copies, merged into the weights, give the logits its training
    forward (the per-row hooks) gave; the clean-up restores the base model."""
    model, tok, tasks = tiny
    s, folder = settings(train), str(tmp_path / 'tasks')
    a, _ = per_task_ttt.train_tasks(model, tok, tasks, s, format_options('', tok), folder)
    run_record.write_run_config(folder, dict(settings=dataclasses.asdict(s)))
    batch = torch.tensor([samples_of(tiny, s)[a][0]])
    with torch.no_grad():
        base = model(batch).logits
        adapters, saved = per_task_ttt.TaskAdapters(model, tok, [a], s), load_file(per_task_ttt.task_file(folder, a))
        for name, p in adapters.named_parameters():
            p[0] = saved[name].float()
        handles, adapters.index = adapters.attach(model), torch.tensor([0])
        hooked = model(batch).logits
        for h in handles:
            h.remove()
        engine = types.SimpleNamespace(max_batch_tokens=1, cache_only=False)
        runner, restore = per_task_ttt.adapter_runners(model, folder, types.SimpleNamespace(tok=tok), None, engine,
                                                       None, {})(a)
        merged = runner.get_model()(batch).logits
        restore()
        torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(hooked, base, atol=1e-3)
        torch.testing.assert_close(model(batch).logits, base, rtol=0, atol=0)


def test_a_time_limit_mid_training_leaves_the_cut_tasks_on_the_base_model_and_a_rerun_resumes(tiny, tmp_path,
                                                                                              monkeypatch, capsys):
    model, tok, tasks = tiny
    a, b = sorted(tasks.challenge)
    clock, real_step = [0.0], per_task_ttt._backward_step

    def step(*args):  # one optimizer step = one second
        clock[0] += 1
        return real_step(*args)
    monkeypatch.setattr(per_task_ttt, '_backward_step', step)
    monkeypatch.setattr(per_task_ttt.time, 'time', lambda: clock[0])
    s, fmt, folder = settings('token', tasks_per_group=1), format_options('', tok), str(tmp_path / 'tasks')
    before = model.get_input_embeddings().weight.detach().clone()
    # a limit inside the first group: its second step starts in time, its third does not, and nothing is kept
    assert per_task_ttt.train_tasks(model, tok, tasks, s, fmt, folder, stop_at=1.5) == []
    assert os.listdir(folder) == []
    clock[0] = 0.0
    # task a's 3 steps end at second 3; task b, at a's pace, would end at second 6: not started
    assert per_task_ttt.train_tasks(model, tok, tasks, s, fmt, folder, stop_at=5.5) == [a]
    assert 'not started' in capsys.readouterr().out and clock[0] == 3
    assert sorted(os.listdir(folder)) == [f'{a}.safetensors']
    per_task_ttt.apply_token_rows(model, tok, folder, [a])
    changed = (model.get_input_embeddings().weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [tok.convert_tokens_to_ids(arc_loader.task_token_text(a))]  # b keeps its base row
    model.get_input_embeddings().weight.data.copy_(before)
    saved = os.path.getmtime(os.path.join(folder, f'{a}.safetensors'))
    assert per_task_ttt.train_tasks(model, tok, tasks, s, fmt, folder) == [a, b]  # resumes: trains only b
    assert os.path.getmtime(os.path.join(folder, f'{a}.safetensors')) == saved


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'empty'])
def test_a_damaged_task_file_of_an_earlier_run_is_set_aside_and_the_task_trains_again(tiny, tmp_path, damage):
    """Issue #35, third round: a per_task_ttt_*/tasks/<task>.safetensors that cannot be read (an earlier run
    killed while the disk was full) ended the evaluation in a SafetensorError traceback, with no submission."""
    model, tok, tasks = tiny
    a, b = sorted(tasks.challenge)
    s, fmt, folder = settings('token'), format_options('', tok), str(tmp_path / 'tasks')
    assert per_task_ttt.train_tasks(model, tok, tasks.only_tasks([a]), s, fmt, folder) == [a]
    path = os.path.join(folder, f'{a}.safetensors')
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write({'garbage': b'garbage', 'truncated': data[:len(data) // 2], 'empty': b''}[damage])
    assert per_task_ttt.train_tasks(model, tok, tasks, s, fmt, folder) == [a, b]
    assert os.path.exists(path + '.damaged')
    per_task_ttt.apply_token_rows(model.__class__(model.config), tok, folder, [a, b])  # both readable now


def test_the_time_limit_is_the_earliest_of_the_limits():
    assert per_task_ttt._stop_time(100.0, None, None) is None
    assert per_task_ttt._stop_time(100.0, 1.0, None) == 160.0
    assert per_task_ttt._stop_time(100.0, None, 300.0) == 200.0  # a deadline alone: half the time left
    assert per_task_ttt._stop_time(100.0, 10.0, 300.0) == 300.0


@pytest.mark.slow
@pytest.mark.parametrize('ttt, train, extra', [('per_task', 'token', []), ('full+per_task', 'lora', ['--gpus', '2']),
                                               ('per_task', 'full', [])])
def test_the_evaluation_runs_per_task_ttt_end_to_end(tmp_path, ttt, train, extra):
    """run_evaluation_ArcMini.py --smoke --ttt per_task (token; full: each task's own layers) or full+per_task (lora,
    tasks split over two worker processes, which merge each task's LoRA): a valid submission, the adapted tasks
    recorded."""
    script = importlib.import_module('run_evaluation_ArcMini')
    script.main(['--smoke', '--ttt', ttt, '--per-task-ttt-train', train, '--output-dir', str(tmp_path),
                 '--n-views', '1', '--n-score-views', '1', '--no-report', *extra])
    out = tmp_path / 'smoke'
    submission = json.loads((out / 'submission.json').read_text())
    asked = arc_loader.ArcDataset.load_from_json(arc_paths('evaluation')[0]).first_tasks(2)
    arc_loader.check_submission(submission, asked)
    results = json.loads((out / 'results.json').read_text())
    assert results['timings_s']['ttt_per_task'] > 0
    [root] = out.glob('per_task_ttt_*')
    folder = root / ('model' if train == 'token' else 'tasks')
    record = json.loads((folder / 'run_config.json').read_text())['settings']
    assert len(record['adapted']) == 2 and record['settings']['train'] == train
    if train == 'token':
        assert results['settings']['model'] == str(folder)
    else:
        assert results['settings']['per_task_adapters'] == str(folder)
        assert ('full_ttt_model_' in results['settings']['model']) == (ttt == 'full+per_task')
