"""Packed rows: the same logits and loss as the same samples in a padded batch, for grid and 1-D models."""
import pytest
import torch

import grid_positions
import model_tools as mt
import packing
import training
from arc_downloader import load_arc
from arc_loader import FMT_OPTS

FMT = dict(FMT_OPTS, preprompt='')


@pytest.fixture(scope="module")
def tok():
    return mt.arc_tokenizer()


@pytest.fixture(scope="module")
def samples(tok):
    """Token ids of real ARC tasks (augmented), of different lengths."""
    ds = load_arc('training').augment(seed=3, tp=True, rt=True, perm=True, shfl_ex=True)
    texts = sorted((ds.fmt_task(k, **FMT)['text'] for k in sorted(ds.keys)[:60]), key=len)
    return [tok(t)['input_ids'] for t in texts[:5]]


def grid_model(tok):
    return grid_positions.create_grid_model(tok, hidden_size=64, num_layers=2, num_heads=4, head_dim=16,
                                            intermediate_size=128, max_position_embeddings=4096, seed=1)


def padded_and_packed(model, tok, samples, capacity):
    position_fn = training._position_fn(model)
    labeler = training.InputMaskingDataCollator(tok, mask_first_n_examples=1, position_fn=position_fn)
    collate = packing.PackedCollator(labeler.labels, tok.pad_token_id, capacity, position_fn)
    return labeler([{"input_ids": s} for s in samples]), collate([samples])


def run_both(model, padded, packed):
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(**padded)
        packing.register_varlen_attention()
        model.set_attn_implementation(packing.VARLEN)
        out = model(**packed)
        model.set_attn_implementation("sdpa")
    return ref, out


@pytest.mark.parametrize("grid", [True, False])
def test_packed_row_equals_padded_batch(tok, samples, grid):
    model = grid_model(tok) if grid else mt.create_model(tok, hidden_size=64, num_layers=2, num_heads=4, seed=1)
    capacity = sum(map(len, samples)) + 37  # a padding tail too
    padded, packed = padded_and_packed(model, tok, samples, capacity)
    assert packed["input_ids"].shape == (1, capacity) and packed["cu_seq_lens_q"][-1] == capacity
    ref, out = run_both(model.eval(), padded, packed)
    bounds = packed["cu_seq_lens_q"].tolist()
    for b, s in enumerate(samples):
        torch.testing.assert_close(out.logits[0, bounds[b]:bounds[b + 1]], ref.logits[b, :len(s)], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_padded(tok, samples):
    model = grid_model(tok).train()
    padded, packed = padded_and_packed(model, tok, samples[:3], sum(map(len, samples[:3])) + 5)
    grads = []
    for batch, attn in ((padded, "sdpa"), (packed, packing.register_varlen_attention())):
        model.set_attn_implementation(attn)
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_plan_rows_next_fit():
    assert packing.plan_rows([3, 4, 2, 5, 1], capacity=7) == [[0, 1], [2, 3], [4]]
    assert packing.plan_rows([1, 1, 1, 1, 1], capacity=10, max_segments=2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        packing.plan_rows([3, 9], capacity=8)


def test_collator_drops_what_does_not_fit_and_pads(tok):
    collate = packing.PackedCollator(lambda ids: list(ids), tok.pad_token_id, capacity=10)
    batch = collate([[[5, 6, 7], [8] * 9, [9, 9]]])  # the 9-token sample cannot fit after the first
    assert collate.dropped == 1
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 9, 9] + [tok.pad_token_id] * 5
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 10] and batch["max_length_q"] == 5
    assert batch["labels"][0, 5:].eq(-100).all()
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]


def test_varlen_attention_needs_a_packed_row(tok):
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="needs cu_seq_lens_q"):
        packing.varlen_attention(None, q, q, q, None)
