"""Every entry script runs end to end in --smoke mode (tiny local models, CPU, seconds).

    python -m pytest -q tests/test_scripts.py
"""
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import model_tools
import smoke


@pytest.mark.slow
@pytest.mark.parametrize('name', ['run_finetuning_Nemo-full', 'run_finetuning_Llama-rearc', 'run_finetuning_SmolLM2'])
def test_finetuning_smoke_writes_lora_and_merged(name):
    lora_dir, merged_dir = importlib.import_module(name).main(['--smoke'])
    for path in (lora_dir, merged_dir):
        config = json.load(open(os.path.join(path, 'run_config.json')))
        assert config['settings']['smoke'] and 'transformers' in config['versions']
        assert config['settings']['training']['steps'] == 2  # what the training did, in both stages' records
    merged, tok = model_tools.load_model(merged_dir, backend='transformers')
    assert len(tok) == merged.get_input_embeddings().weight.shape[0] < 100  # the shrunk vocabulary
    assert not merged.config.tie_word_embeddings  # SmolLM2's tied embeddings: untied at the shrink
    assert tok.eos_token == ('<|im_end|>' if 'SmolLM2' in name else '</s>')
    ids = torch.tensor([tok('I12\n+/-=O21\n' + tok.eos_token)['input_ids']])
    base, base_tok = model_tools.load_model(json.load(open(os.path.join(merged_dir, 'run_config.json')))
                                            ['settings']['base_model'], backend='transformers')
    model_tools.keep_single_char_tokens(base, base_tok, keep=model_tools.FORMAT_CHARS)
    with_adapter = model_tools.load_adapter(base, lora_dir)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-4)


@pytest.mark.slow
def test_smollm2_full_finetuning_smoke_writes_the_merged_model():
    merged_dir = importlib.import_module('run_finetuning_SmolLM2').main(['--smoke', '--method', 'full',
                                                                         '--max-shard-mb', '1'])
    assert merged_dir.endswith('-merged') and not os.path.exists(merged_dir[:-len('-merged')] + '-lora')
    settings = json.load(open(os.path.join(merged_dir, 'run_config.json')))['settings']
    assert settings['method'] == 'full' and settings['training']['steps'] == 2
    shards = [f for f in os.listdir(merged_dir) if f.endswith('.safetensors')]
    assert settings['max_shard_mb'] == 1 and all(os.path.getsize(os.path.join(merged_dir, f)) <= 1e6 for f in shards)
    assert 0 < settings['training']['tokens_per_s'] and settings['training']['samples'] > 0
    merged, tok = model_tools.load_model(merged_dir, backend='transformers')
    assert len(tok) == merged.get_input_embeddings().weight.shape[0] < 100 and tok.eos_token == '<|im_end|>'
    base, base_tok = model_tools.load_model(settings['base_model'], backend='transformers')
    model_tools.keep_single_char_tokens(base, base_tok, keep=model_tools.FORMAT_CHARS)
    trained = dict(merged.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in base.named_parameters() if 'layers.0.self_attn' in n)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['run_evaluation_Llama-rearc_with_ttt', 'run_evaluation_Nemo-ReArc1200_per_task_ttt'])
def test_evaluation_smoke(name, tmp_path):
    importlib.import_module(name).main(['--smoke', '--output-dir', str(tmp_path)])
    results = json.load(open(tmp_path / 'smoke' / 'results.json'))
    assert results['n_tasks'] == 2 and results['timings_s']['ttt'] > 0
    timings = results['timings_s']
    assert timings['process_start_to_submission'] > timings['startup'] + timings['ttt']  # Linux: from /proc
    assert timings['startup'] > 0.5  # at least the imports of torch and transformers
    assert 0.1 < results['peak_rss_gb'] < 8  # the peak resident memory is recorded (a tiny model: well under 8 GB)
    assert os.path.exists(tmp_path / 'smoke' / 'report' / 'index.html')


@pytest.mark.slow
def test_default_model_recipe_smoke():
    path = importlib.import_module('run_finetuning_ArcMini').main(['--smoke'])
    model, tok = model_tools.load_model(path, backend='transformers')
    assert model.config.arc_positions and json.load(open(os.path.join(path, 'run_config.json')))['settings']['steps'] == 3


def test_shipped_default_model_loads_with_grid_positions():
    import grid_positions
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'models', 'ArcMini')
    model, tok = model_tools.load_model(path, backend='transformers')
    assert grid_positions.has_grid_positions(model) and model.dtype == torch.float32  # float32 on the CPU
    assert sum(p.numel() for p in model.parameters()) < 16_000_000  # 30 MB in bf16 (the repo's 32 MB cap)


@pytest.mark.slow
def test_inference_benchmark_smoke():
    report = importlib.import_module('run_benchmark_inference').main(['--smoke'])
    assert set(report['samplers']) == {'greedy', 'greedy_guess', 'dfs1', 'dfs_batched', 'dfs_batched_guess',
                                       'greedy_graphs', 'dfs_batched_graphs', 'generate_greedy', 'beam4', 'sample'}
    assert report['samplers']['dfs1']['time_vs_dfs1'] == 1.0 and report['floor']['seconds'] > 0
    same = report['samplers']['dfs_batched']['same_candidates_as_dfs1']
    assert same['same'] and same['other_replies'] == 0 and same['max_nll_diff'] < 1e-3  # float32 on the CPU
    assert report['samplers']['dfs_batched_guess']['same_candidates_as_dfs_batched']['same']
    assert report['samplers']['greedy_guess']['same_candidates_as_greedy']['same']
    assert report['samplers']['greedy_graphs']['same_candidates_as_greedy']['same']
    assert report['samplers']['dfs_batched_graphs']['same_candidates_as_dfs_batched']['same']


@pytest.mark.slow
def test_progress_benchmark_smoke():
    report = importlib.import_module('run_benchmark_progress').main(['--smoke'])
    generation = report['bars'][0]
    assert generation['desc'] == 'generation' and generation['unit'] == 'tok' and generation['total'] > 0
    assert generation['end_s'] > 0 and report['evaluation']['n_tasks'] == 2 and report['cpu_cores'] >= 1
    assert report['settings']['output'] is None  # a smoke run writes no results file


def test_inference_benchmark_profile_counts_every_decode_step():
    report = importlib.import_module('run_benchmark_inference').main(
        ['--smoke', '--samplers', 'greedy', 'dfs_batched', '--no-scoring', '--profile'])
    assert report['samplers']['greedy']['search']['decode_steps'] > 0
    for name in ('greedy', 'dfs_batched'):
        search, prof = report['samplers'][name]['search'], report['profile'][name]
        assert prof['search'] == search  # the profiled run is the same search
        parts = prof['parts']
        assert parts.get('decode.forward', {'calls': 0})['calls'] == search['decode_steps']
        assert parts['decode.rows']['calls'] > search['decode_steps']  # plus the check that ends each decode
        assert parts['search.prefill']['calls'] == search['groups']
        assert sum(p['cpu_ms'] for p in parts.values()) <= 1e3 * prof['wall_s'] * 1.01
        assert prof['gpu'] is None and prof['cpu_ops'][0]['self_cpu_ms'] > 0  # CPU: no kernels to list


def test_inference_benchmark_profiles_a_window_of_a_long_search():
    # A GPU search's events took minutes to read: a search of more forwards than --profile-forwards is recorded in
    # a window of that many from its middle, the search itself unchanged.
    report = importlib.import_module('run_benchmark_inference').main(
        ['--smoke', '--samplers', 'greedy', '--no-scoring', '--profile', '--profile-forwards', '4'])
    search, prof = report['samplers']['greedy']['search'], report['profile']['greedy']
    assert prof['search'] == search and search['forwards'] > 8
    assert prof['recorded'] == {'forwards': 4, 'of_forwards': search['forwards'], 'window': True,
                                'decode_steps': prof['parts']['decode.forward']['calls'],
                                'run_s': prof['recorded']['run_s']}
    assert 1 <= prof['parts']['decode.forward']['calls'] <= 4 and 'search.prefill' not in prof['parts']
    assert 0 < prof['wall_s'] < prof['recorded']['run_s']


def test_inference_benchmark_times_the_parts_of_every_decode_step():
    # --time-parts: the same search once more, each labelled part timed with the GPU synchronized around it
    report = importlib.import_module('run_benchmark_inference').main(
        ['--smoke', '--samplers', 'greedy', 'dfs_batched', '--no-scoring', '--time-parts'])
    for name in ('greedy', 'dfs_batched'):
        search, timed = report['samplers'][name]['search'], report['timed_parts'][name]
        assert timed['search'] == search and timed['decode_steps'] == search['decode_steps']
        parts = timed['parts']
        assert parts.get('decode.forward', {'calls': 0})['calls'] == search['decode_steps']
        assert parts['decode.rows']['calls'] > search['decode_steps']  # plus the check that ends each decode
        assert parts['search.prefill']['calls'] == search['groups']
        assert 0 < timed['parts_s'] <= timed['wall_s']
        assert timed['parts_s'] == pytest.approx(sum(p['seconds'] for p in parts.values()))
    assert report['timed_parts']['greedy']['parts']['decode.walk']['calls'] > 0 and report['profile'] == {}


def test_inference_benchmark_times_a_decode_step_on_a_growing_cache_and_on_fixed_shapes(monkeypatch):
    # --decode-steps: the same tokens fed to the same rows through the search's growing cache and its fixed-shape
    # step (batched_dfs._FixedStep: what a CUDA graph replays; the graph itself only on CUDA), the same NLLs; one
    # prefill, sliced as the search's and without autograd (which kept 24 GB of activations for 32 rows of the
    # shipped model on CPU)
    import batched_dfs
    prefills, real_init = [], batched_dfs._Group.__init__

    def group(self, model, prompts, positions, extra, prefill_tokens, *a, **kw):
        prefills.append((torch.is_inference_mode_enabled(), prefill_tokens))
        real_init(self, model, prompts, positions, extra, prefill_tokens, *a, **kw)
    monkeypatch.setattr(batched_dfs._Group, '__init__', group)
    report = importlib.import_module('run_benchmark_inference').main(
        ['--smoke', '--samplers', 'greedy', '--no-scoring', '--decode-steps', '5', '--decode-rows', '3', '1000'])
    assert [d['rows'] for d in report['decode_steps']] == [3, 4]  # at most every view of the smoke run's tasks
    d = report['decode_steps'][0]
    assert d['steps_timed'] == 5 and d['prompt_width'] > 100
    assert prefills[-2:] == [(True, d['prefill_tokens'])] * 2 and d['prefill_tokens'] < 2 ** 40
    assert d['growing_ms'] > 0 and d['fixed_ms'] > 0 and d['fixed_max_nll_diff'] < 1e-4
    assert 'graph_ms' not in d and 'graph_error' not in d  # CPU: no CUDA graph


def test_inference_benchmark_graph_rows_give_the_plain_rows_candidates():
    # greedy_graphs, dfs_batched_graphs: the same searches with --decode-graphs (fixed-shape steps; CUDA graphs only
    # on CUDA), checked against the plain rows, step for step
    report = importlib.import_module('run_benchmark_inference').main(
        ['--smoke', '--samplers', 'greedy', 'greedy_graphs', 'dfs_batched', 'dfs_batched_graphs', '--no-scoring',
         '--max-new-tokens', '40'])
    rows = report['samplers']
    for plain in ('greedy', 'dfs_batched'):
        graphs = rows[plain + '_graphs']
        assert graphs[f'same_candidates_as_{plain}']['same']
        assert graphs['search'] == rows[plain]['search']  # no graph_captures, no graph_error: CPU
    assert rows['greedy']['search']['decode_steps'] > 0

def test_same_candidates_tolerates_rounding_at_the_threshold_only():
    same_candidates = importlib.import_module('run_benchmark_inference').same_candidates
    t = -math.log(0.1)  # the threshold's NLL
    a = [[((1, 2), 0.5), ((1, 3), t - 0.01)], [((4,), 1.0)]]
    b = [[((1, 2), 0.52)], [((4,), 1.0), ((5,), t - 1.0)]]  # (1, 3) pruned near the threshold; (5,) far from it
    got = same_candidates(a, b, 0.1, tol=0.05)
    assert (got['borderline_replies'], got['other_replies'], got['max_nll_diff']) == (1, 1, pytest.approx(0.02))
    assert not got['same']
    assert same_candidates(a[:1], b[:1], 0.1, tol=0.05)['same']
    assert not same_candidates(a[:1], b[:1], 0.1, tol=0.01)['same']  # the shared reply differs by 0.02


@pytest.mark.slow
def test_ladder_smoke(tmp_path):
    report = importlib.import_module('run_ladder_ArcMini').main(['--smoke', '--output-dir', str(tmp_path)])
    assert [r['stage'] for r in report['stages']] == [1, 2, 3, 4, 5]
    assert all(r['n_tasks'] == 2 for r in report['stages']) and report['stages'][1]['timings_s']['ttt'] > 0
    assert sorted(os.listdir(tmp_path / 'ladder')) == [f'{n}.json' for n in range(1, 6)]
    # no stage given: only the table of the stages found (a ladder run in parts, or on another machine)
    table = importlib.import_module('run_ladder_ArcMini').main(['--smoke', '--output-dir', str(tmp_path), '--stages'])
    assert [r['score'] for r in table['stages']] == [r['score'] for r in report['stages']]
    assert all(r['wall_s'] is None for r in table['stages'])


@pytest.mark.slow
def test_training_benchmark_smoke():
    report = importlib.import_module('run_benchmark_training').main(['--smoke'])
    rows = report['rows']
    for name in ('arcmini padded (recipe step)', 'arcmini packed (sdpa, block-diagonal mask)', 'arcmini padded, batch 3',
                 'arcmini HF Trainer (model_tools.train_model)', 'lora transformers', 'full transformers (packed rows)'):
        assert rows[name]['status'] == 'ok' and rows[name]['real_tokens_per_s'] > 0 < rows[name]['mfu']
        assert rows[name]['padded_tokens_per_s'] >= rows[name]['real_tokens_per_s']
    assert rows['arcmini packed (sdpa, block-diagonal mask)']['loss_diff_vs_padded'] < 1e-4  # packing is exact
    assert rows['full transformers (packed rows)']['batch'] == '4096 tokens'  # SmolLM2's --method full, every weight
    assert list(rows).index('full transformers (packed rows)') < list(rows).index('lora unsloth')
    [fast] = [row for name, row in rows.items() if name.startswith('arcmini recipe fast path')]  # arcmini.train itself
    assert fast['status'] == 'ok' and fast['real_tokens_per_s'] > 0
    if not torch.cuda.is_available():
        assert rows['lora unsloth']['status'].startswith('skipped') and 'arcmini padded + torch.compile' not in rows
    saved = json.load(open(report['settings']['output']))
    assert saved['rows'] == json.loads(json.dumps(rows)) and saved['measured_peak_tflops'] > 0
    assert 'results' not in report['settings']['output'].split(os.sep)  # a smoke run never writes to results/


@pytest.mark.slow
def test_training_benchmark_without_backends_runs_the_full_row_alone():
    # the SmolLM2 lease's BENCH_ARGS="--backends": its full-finetuning row without the LoRA rows beside it
    report = importlib.import_module('run_benchmark_training').main(
        ['--smoke', '--skip', 'fast', 'compile', 'packed', 'large', 'trainer', 'cudnn', '--backends'])
    assert list(report['rows']) == ['arcmini padded (recipe step)', 'full transformers (packed rows)']
    assert report['rows']['full transformers (packed rows)']['mfu'] > 0


def test_default_model_batches_are_runs_of_similar_lengths():
    # Every batch of the key list comes from one length-sorted run: little padding (it was a third, when a
    # bucket's last, partial batch shifted every later batch across two runs).
    import numpy as np
    from arc_loader import count_tokens, get_base_key
    import arcmini as recipe
    args = recipe.settings(['--batch-size', '48', '--epochs', '2', '--no-arc2'])
    tasks = recipe.training_tasks(args)
    data = recipe.bucketed_epochs(tasks, args)
    base = {b: min(count_tokens(tasks.fmt_task(b, **recipe.FMT)['text']), args.max_tokens) for b in tasks.challenge}
    lengths = np.array([base[get_base_key(k)] for k in data.keys])
    assert len(data.keys) % 48 == 0 and len(data.keys) > 2 * len(tasks.challenge) - 48
    batches = lengths.reshape(-1, 48)
    assert 1 - batches.sum() / (batches.max(1) * 48).sum() < 0.15  # 11% here


@pytest.mark.slow
def test_default_model_recipe_data_parallel_over_two_processes(tmp_path):
    """The multi-GPU path of the recipe (torchrun, one process per device, packed rows) on CPU over gloo."""
    script = os.path.join(os.path.dirname(model_tools.__file__), 'run_finetuning_ArcMini.py')
    env = dict(os.environ, OMP_NUM_THREADS='1', TMPDIR=str(tmp_path))
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29533',
                          script, '--smoke'], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count('saved ') == 1  # rank 0 alone saves
    saved = out.stdout.split('saved ')[1].split(' after')[0]
    config = json.load(open(os.path.join(saved, 'run_config.json')))
    assert config['settings']['world_size'] == 2 and config['settings']['steps'] == 3


@pytest.mark.parametrize('flags, problem', [
    (['--lr', 'nan'], '--lr: must be more than 0'),  # torch's "Invalid learning rate" traceback
    (['--max-steps', '-5'], '--max-steps: must be at least 1'),
    (['--adam-beta2', '2'], '--adam-beta2: must be a fraction'),
    (['--ttt-challenges', 'x.json'], 'give --init-model'),
    (['--init-model', 'no_such_model_dir/x', '--ttt-challenges', 'x.json'], '--init-model no_such_model_dir/x: no such folder'),
    (['--init-model', 'MODEL', '--ttt-challenges', 'no_such.json'], 'no_such.json: no such file'),  # ArcDataError traceback
    (['--hidden-size', '390', '--num-heads', '6'], 'a head of 65 dimensions; it must be even'),  # AssertionError
    (['--hidden-size', '4', '--num-heads', '6'], 'a head of 0 dimensions'),  # after the data was built
    (['--rearc-samples', '4', '--rearc-path', 'REARC'], '--rearc-samples 4: '),  # the loader's RuntimeError traceback
])
def test_arcmini_training_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch, flags, problem):
    """run_finetuning_ArcMini.py: a bad flag, --init-model or --ttt-challenges file is one line with status 2,
    before any model is built (they ended in tracebacks from torch, transformers or the ARC loader)."""
    import arcmini
    monkeypatch.setattr(arcmini, 'train', lambda *a, **kw: pytest.fail('trained on bad input'))
    model = tmp_path / 'model'
    model.mkdir()
    (model / 'config.json').write_text('{}')
    if 'REARC' in flags:  # 21 examples a task: 3 draws of 6 demonstrations + 1
        flags[flags.index('REARC')] = smoke.make_fake_rearc(str(tmp_path / 're_arc'))
    flags = [str(model) if f == 'MODEL' else str(tmp_path / f) if f.endswith('.json') else f for f in flags]
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module('run_finetuning_ArcMini').main(flags)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and '\n' not in err and problem in err, err


def test_make_notebooks_parses_its_arguments_first(tmp_path, monkeypatch, capsys):
    """--help or an unknown flag writes nothing (both rewrote the notebooks); a run writes the two committed
    notebooks exactly (they are made from make_notebooks.py, never edited by hand)."""
    import importlib.util
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location('make_notebooks', os.path.join(repo, 'kaggle_notebooks',
                                                                                 'make_notebooks.py'))
    make_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_notebooks)
    written = []
    real_write = make_notebooks.nbformat.write
    monkeypatch.setattr(make_notebooks.nbformat, 'write', lambda nb, path: written.append(path) or real_write(nb, path))
    for flags, status in ((['--help'], 0), (['--bogus'], 2)):
        with pytest.raises(SystemExit) as exit_:
            make_notebooks.main(flags)
        assert exit_.value.code == status and written == []
    assert 'usage' in capsys.readouterr().out
    make_notebooks.main(['--output-dir', str(tmp_path)])
    for name in ('arc-prize_kaggle.ipynb', 'arc-prize_updated.ipynb'):
        with open(tmp_path / name) as new, open(os.path.join(repo, 'kaggle_notebooks', name)) as committed:
            assert new.read() == committed.read(), f'{name}: run python kaggle_notebooks/make_notebooks.py'


@pytest.mark.parametrize('script, flags, problem', [
    ('run_benchmark_inference', ['--n-tasks', '0'], '--n-tasks: must be at least 1'),  # 0 ran all 400 tasks
    ('run_benchmark_inference', ['--n-views', '-1'], '--n-views: must be between 1 and'),  # ran with no views
    ('run_benchmark_inference', ['--max-new-tokens', '0'], '--max-new-tokens: must be at least 1'),
    ('run_benchmark_inference', ['--model', 'no_such_model_dir/x'], '--model no_such_model_dir/x: no such folder'),
    ('run_benchmark_inference', ['--challenges', 'no_such.json'], '--challenges no_such.json: no such file'),
    ('run_benchmark_training', ['--lora-steps', '0'], '--lora-steps: must be at least 1'),  # an AssertionError
    ('run_benchmark_training', ['--lora-model', 'no_such_model_dir/x'],  # failed after the ArcMini rows
     '--lora-model no_such_model_dir/x: no such folder'),
    ('run_benchmark_progress', ['--eval-args', '--n-tasks "1'], 'cannot split it into arguments'),
    ('run_benchmark_progress', ['--eval-args', '--output-dir x'], '--output-dir is set by this script'),
    ('run_benchmark_progress', ['--output', 'OUT_UNDER_A_FILE'], 'a file, not a folder'),  # after the whole main job
])
def test_benchmark_flags_are_one_line_before_any_work(tmp_path, capsys, script, flags, problem):
    (tmp_path / 'a_file').write_text('')
    flags = [str(tmp_path / 'a_file' / 'x.json') if f == 'OUT_UNDER_A_FILE' else f for f in flags]
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(script).parse_args(flags)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and '\n' not in err and problem in err, err
