"""Learned task tokens: one extra vocabulary row per task, the first token after BOS of each of its texts.

A from-scratch model cannot read a new rule off two or three demonstrations; a row of its own lets each task
store what the demonstrations teach (the from-scratch anchors' per-task embedding, kept a stock transformers
model: the rows are ordinary tokens '<task:ID>' of the tokenizer, saved with it). The generic token '<task:?>'
is trained on a share of the samples (the key segment '.nt'), so a task without a row of its own starts from a
copy of it: `add_missing` gives every new task that copy, and test-time training then trains it like the rest.
A tokenizer holding the generic token marks a model that expects task tokens (`enabled`).
"""
import torch
from tokenizers import AddedToken

from arc_loader import task_token_text

GENERIC = task_token_text(None)


def enabled(tokenizer):
    """Whether texts for this tokenizer's model start with a task token."""
    return GENERIC in tokenizer.get_vocab()


def add_tokens(tokenizer, task_ids):
    """Add the generic token and '<task:ID>' for each id (in the order given) that the tokenizer lacks."""
    vocab = tokenizer.get_vocab()
    names = [GENERIC] + [task_token_text(t) for t in task_ids]
    new = [n for n in dict.fromkeys(names) if n not in vocab]
    # Not special: decode(skip_special_tokens=True) must not hide them, and they never end a text.
    tokenizer.add_tokens([AddedToken(n, single_word=False, normalized=False, special=False) for n in new])
    return new


def add_missing(model, tokenizer, task_ids):
    """Give each task id without a row a copy of the generic row (input and output embeddings): the model then
    treats the task as it treats the generic token until test-time training moves the copy. Returns the count."""
    if not enabled(tokenizer):
        return 0
    old = len(tokenizer)
    new = add_tokens(tokenizer, sorted(task_ids))
    if not new:
        return 0
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generic = tokenizer.convert_tokens_to_ids(GENERIC)
    with torch.no_grad():
        for emb in _embedding_matrices(model):
            emb[old:len(tokenizer)] = emb[generic]
    return len(new)


def keep_first(model, tokenizer, tokenizer_factory, task_ids):
    """For saving: the tokenizer rebuilt with only the given tasks' tokens (the first ones added, right after the
    generic token), the model's embeddings cut to match. Returns the new tokenizer."""
    tok = tokenizer_factory()
    add_tokens(tok, task_ids)
    old_vocab = tokenizer.get_vocab()
    moved = [t for t, i in tok.get_vocab().items() if old_vocab.get(t) != i]
    if moved:
        raise ValueError(f'task_tokens.keep_first: {len(moved)} tokens are not the first ones added, e.g. {moved[:3]}')
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return tok


def _embedding_matrices(model):
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return [inp] if out is inp else [inp, out]
