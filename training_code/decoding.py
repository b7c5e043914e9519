"""Model-call plumbing shared by the batch-1 sampler and scorer (inference_tools) and the batched ones
(batched_dfs): token-id checks, right padding, forward passes with the model's own positions, KV cache
cropping, next-token NLLs and the eval-mode guard.

Token ids are plain lists of ints and NLLs are floats in nats (lower = better), so results pickle to disk and
compare exactly on a rerun.
"""
import contextlib
import inspect

import numpy as np
import torch

import grid_positions
from model_tools import attention_without_cudnn


def device_of(model):
    """The device of the model's input embeddings (where token ids must go)."""
    return model.get_input_embeddings().weight.device


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for the block; the caller's mode is restored afterwards (TTT trains in between)."""
    # Dropout would make DFS and scoring random.
    # cuDNN attention would build a new execution plan at every decode step (model_tools.attention_without_cudnn).
    was_training = model.training
    model.eval()
    try:
        with attention_without_cudnn():
            yield
    finally:
        if was_training:
            model.train()


def accepts_logits_to_keep(model):
    """True if the (base) model's forward takes `logits_to_keep` (a long prompt's full logits cost len * vocab)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def forward_tokens(model, seq, start=0, cache=None, keep=None, attention_mask=None, use_cache=False):
    """Run seq[:, start:] on top of `cache` (which holds seq[:, :start]); returns (logits, cache).

    Positions come from grid_positions.model_position_ids: 1-D, or (grid, row, column) for a grid model.
    """
    kwargs = {}
    if keep is not None and accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(input_ids=seq[:, start:], position_ids=grid_positions.model_position_ids(model, seq, start),
                attention_mask=attention_mask, past_key_values=cache, use_cache=use_cache or cache is not None,
                **kwargs)
    logits = out.logits if keep is None else out.logits[:, -keep:]
    return logits, out.past_key_values


def crop_cache(cache, length):
    """Cut a KV cache back to its first `length` tokens."""
    # transformers 5.17 reads a positive crop() argument as a deprecated absolute length; a negative one
    # removes that many tokens in every version, so crop by the number of tokens to drop.
    extra = cache.get_seq_length() - length
    assert extra >= 0, f"KV cache holds {cache.get_seq_length()} tokens, cannot grow it to {length} by cropping"
    if extra > 0:
        cache.crop(-extra)


def neg_log_softmax(logits):
    """Next-token NLLs (log-softmax in float32, whatever the model's dtype)."""
    return -torch.log_softmax(logits.float(), dim=-1)


def as_ids(ids, name):
    """Token ids as a list of ints from a list, a 1-D tensor/array or a (1, n) tensor/array."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        assert ids.ndim == 1 or (ids.ndim == 2 and ids.shape[0] == 1), \
            f"{name}: expected a 1-D sequence or batch size 1, got shape {tuple(ids.shape)}"
        ids = ids.reshape(-1).tolist()
    ids = list(ids)
    if set(map(type, ids)) <= {int}:  # the usual case, checked at C speed (a bool's type is not int)
        return ids
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
    assert not bad, f"{name}: token ids must be ints, got {bad[:3]!r}"
    return [int(t) for t in ids]


def row_tensor(ids, device):
    """A (1, n) long tensor of one token-id list."""
    return torch.tensor([ids], dtype=torch.long, device=device)


def right_pad(seqs, device, pad_id=0):
    """(ids, attention_mask) of right-padded sequences; padding after the last real token never shifts positions."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def chunks(items, size):
    """items cut into consecutive lists of at most `size`."""
    assert size >= 1, f"batch_size must be >= 1, got {size}"
    return [items[i:i + size] for i in range(0, len(items), size)]


def check_pairs(prompts, replies):
    """(prompt ids, reply ids) pairs of a scoring call, both non-empty."""
    assert len(prompts) == len(replies), f"score_replies: {len(prompts)} prompts but {len(replies)} replies"
    checked = {}  # id(prompt) -> (prompt, its ids): a scoring call repeats each view's prompt for every candidate

    def prompt_ids(p):
        if id(p) not in checked:
            checked[id(p)] = (p, as_ids(p, "prompt"))  # p is kept, so its id is not re-used during the call
        return checked[id(p)][1]
    pairs = [(prompt_ids(p), as_ids(r, "reply")) for p, r in zip(prompts, replies)]
    assert all(p and r for p, r in pairs), "score_replies: prompts and replies must be non-empty"
    return pairs


def clean_guess(guess, eos_token_id, max_new_tokens):
    """A DFS guess as ids without its eos, cut to what could still be followed by eos within max_new_tokens."""
    guess = [] if guess is None else as_ids(guess, "guess")
    if guess and guess[-1] == eos_token_id:
        guess = guess[:-1]
    return guess[:max_new_tokens - 1]
