"""Task tokens: one token per task in the text, a generic copy for new tasks, the saved vocabulary cut back."""
import torch

import grid_positions
import model_tools
import task_tokens
from arc_loader import ArcDataset


def _tiny(tok):
    return grid_positions.create_grid_model(tok, hidden_size=32, num_layers=1, num_heads=2, head_dim=16,
                                            intermediate_size=64)


def test_task_token_is_one_token_first_after_bos():
    tok = model_tools.arc_tokenizer()
    task_tokens.add_tokens(tok, ['abc'])
    ds = ArcDataset({'abc': {'train': [{'input': [[1]], 'output': [[2]]}], 'test': [{'input': [[3]]}]}})
    text = ds.fmt_task('abc_0', task_token=True)['input']
    ids = tok(text)['input_ids']
    assert ids[1] == tok.convert_tokens_to_ids('<task:abc>')
    generic = ds.fmt_task('abc_0.nt', task_token=True)['input']
    assert tok(generic)['input_ids'][1] == tok.convert_tokens_to_ids(task_tokens.GENERIC)
    assert ds.fmt_task('abc_0')['input'] == text[len('<task:abc>'):]


def test_new_tasks_get_the_generic_rows_and_saving_keeps_the_first():
    tok = model_tools.arc_tokenizer()
    task_tokens.add_tokens(tok, ['keep', 'pool-only'])
    model = _tiny(tok)
    assert task_tokens.add_missing(model, tok, ['keep', 'new']) == 1
    g, new = tok.convert_tokens_to_ids(task_tokens.GENERIC), tok.convert_tokens_to_ids('<task:new>')
    for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert torch.equal(emb[new], emb[g])
    kept = task_tokens.keep_first(model, tok, model_tools.arc_tokenizer, ['keep'])
    assert len(kept) == model.get_input_embeddings().weight.shape[0] == len(model_tools.arc_tokenizer()) + 2
    assert kept.convert_tokens_to_ids('<task:keep>') == tok.convert_tokens_to_ids('<task:keep>')
