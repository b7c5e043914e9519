"""The held-out path end to end on CPU: a tiny task-token model that never saw a real ARC task trains on that task's
demonstration pairs only (run_finetuning_ArcMini.py --init-model --ttt-challenges), then the evaluation script
runs on it; the true test output, never read, becomes far more likely (its NLL falls by more than half; the tiny
model does not solve the task in the seconds a test may take).

    python -m pytest -q tests/test_held_out.py
"""
import importlib
import json

import pytest

import arc_loader
import grid_positions
import inference_tools
import model_tools
import task_tokens
from arc_downloader import arc_paths

pytestmark = pytest.mark.slow  # about a minute: 60 training steps and two evaluation runs


def smallest_task():
    chal, sols = arc_paths('evaluation')
    ds = arc_loader.ArcDataset.load_from_json(chal).load_solutions(sols)
    single = [b for b, t in ds.challenge.items() if len(t['test']) == 1]
    base = min(single, key=lambda b: len(ds.fmt_task(f'{b}_0', preprompt='')['text']))
    return base, {base: ds.challenge[base]}, {base: ds.solutions[base]}


def answer_nll(model_dir, challenges, solutions, base):
    """NLL of the true test output after the task's prompt (identity view, the model's own task token)."""
    model, tok = model_tools.load_model(model_dir, backend='transformers')
    ds = arc_loader.ArcDataset(challenges, solutions)
    task_tokens.add_missing(model, tok, challenges)
    fmt = ds.fmt_task(f'{base}_0', preprompt='', task_token=True)
    return inference_tools.calc_score(model, tok, fmt['input'], fmt['reply'])


def evaluate(model_dir, chal_path, out_dir):
    script = importlib.import_module('run_evaluation_ArcMini')
    script.main(['--model', model_dir, '--challenges', str(chal_path), '--output-dir', str(out_dir), '--ttt', 'none',
                 '--sampler', 'greedy', '--n-views', '1', '--n-score-views', '1', '--max-tokens', '2048',
                 '--backend', 'transformers', '--no-report'])
    return json.loads((out_dir / 'results.json').read_text())


def test_held_out_ttt_learns_a_task_never_seen_in_pretraining(tmp_path):
    base, chal, sols = smallest_task()
    chal_path, sol_path = tmp_path / 'held_out_challenges.json', tmp_path / 'held_out_solutions.json'
    chal_path.write_text(json.dumps(chal))
    sol_path.write_text(json.dumps(sols))  # found beside the challenges by the evaluation script
    tok = model_tools.arc_tokenizer()
    task_tokens.add_tokens(tok, ['some-other-task'])  # a pretrained vocabulary without the held-out task
    model = grid_positions.create_grid_model(tok, hidden_size=64, num_layers=2, num_heads=4, head_dim=16,
                                             intermediate_size=128, max_position_embeddings=2048, seed=0)
    pretrained = str(tmp_path / 'pretrained')
    model_tools.save_model_and_tokenizer(pretrained, model, tok, {'test': 'held-out stand-in'})

    finetuning = importlib.import_module('run_finetuning_ArcMini')
    tuned = finetuning.main(['--init-model', pretrained, '--ttt-challenges', str(chal_path), '--max-steps', '60',
                             '--row-tokens', '4096', '--max-tokens', '2048', '--lr', '3e-3', '--warmup-steps', '5',
                             '--num-workers', '0', '--save-steps', '1000', '--save-model-path', str(tmp_path / 'ttt')])
    _, tuned_tok = model_tools.load_model(tuned, backend='transformers')
    assert task_tokens.task_token_text(base) in tuned_tok.get_vocab()  # the new task got its own row, and kept it

    before, after = answer_nll(pretrained, chal, sols, base), answer_nll(tuned, chal, sols, base)
    print(f"held-out task {base}: answer NLL {before:.1f} before, {after:.1f} after test-time training")
    assert after < 0.5 * before, (before, after)
    for name, model_dir in [('before', pretrained), ('after', tuned)]:
        results = evaluate(model_dir, chal_path, tmp_path / f'eval_{name}')
        assert results['n_tasks'] == 1 and 0 <= results['score'] <= 1
