"""Batch-1 inference: the DFS sampler, `generate` baselines and reply scoring (the product-of-experts scorer).

Token ids are plain lists of ints and NLLs are floats in nats (lower = better). Every model call goes through
decoding.forward_tokens, which takes the positions from grid_positions: the one place to change for a model
whose positions are computed from the token ids. batched_dfs gives the same results for many prompts at once.
"""
import contextlib
import math
import time

import numpy as np
import torch

import grid_positions
from seeding import seeded_torch
from decoding import (as_ids, check_pairs, chunks, clean_guess, crop_cache, device_of, eval_mode, forward_tokens,
                      neg_log_softmax, right_pad, row_tensor)


# --------------------------------------------------------------------------------------------------
# DFS sampler


def _common_prefix(a, b):
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


class _PathLogits:
    """Next-token NLLs along a DFS path: one prefill of prompt + guess, then one token per step on a KV cache."""

    def __init__(self, model, prompt, guess):
        self.model, self.n_prompt, self.device = model, len(prompt), device_of(model)
        self.seq = row_tensor(prompt + guess, self.device)
        logits, self.cache = forward_tokens(model, self.seq, keep=len(guess) + 1, use_cache=True)
        self.guess_nll = neg_log_softmax(logits[0])  # row k: the reply's k-th token after guess[:k]
        self.cached = list(guess)  # reply tokens whose keys/values are in the cache

    def nll(self, path, on_guess):
        """NLL of every vocabulary token after prompt + path (float64 numpy)."""
        if on_guess:
            return self.guess_nll[len(path)].double().cpu().numpy()
        # The cache may hold a deeper, abandoned branch: crop back to the branch point, then feed what is
        # missing (one token, since DFS extends the current path by one token at a time).
        keep = min(_common_prefix(self.cached, path), len(path) - 1)
        crop_cache(self.cache, self.n_prompt + keep)
        self.seq = torch.cat([self.seq[:, :self.n_prompt + keep],
                              row_tensor(path[keep:], self.device)], dim=1)
        logits, _ = forward_tokens(self.model, self.seq, self.n_prompt + keep, cache=self.cache)
        self.cached = list(path)
        return neg_log_softmax(logits[0, -1]).double().cpu().numpy()


class _Frame:
    """One DFS node: its NLL so far and the tokens still to try (those that keep the total under max_nll)."""
    __slots__ = ("nll", "score", "tokens", "next", "on_guess")

    def __init__(self, nll, score, max_nll, on_guess, guess_token):
        self.nll, self.score, self.next, self.on_guess = nll, score, 0, on_guess
        tokens = np.flatnonzero(score + nll < max_nll).tolist()  # strictly above min_prob; id order
        if guess_token in tokens:  # guess first: its subtree reuses the prefilled cache before a sibling crops it
            tokens.remove(guess_token)
            tokens.insert(0, guess_token)
        self.tokens = tokens


def _past(deadline):
    return deadline is not None and time.time() > deadline


def _search(steps, guess, eos_token_id, max_new_tokens, max_nll, deadline):
    """Iterative DFS (explicit stack: a 30x30 reply is 932 levels deep); returns ([(reply ids, NLL)], cut).
    Past `deadline` no node is expanded: the replies found so far, and cut True."""
    found, path = [], []
    stack = [_Frame(steps.nll(path, True), 0.0, max_nll, True, guess[0] if guess else None)]
    while stack:
        frame = stack[-1]
        if frame.next == len(frame.tokens):
            stack.pop()
            if path:  # the root frame was reached without a token
                path.pop()
            continue
        token = frame.tokens[frame.next]
        frame.next += 1
        score = frame.score + float(frame.nll[token])
        if token == eos_token_id:
            found.append((path + [token], score))
        elif len(path) + 2 <= max_new_tokens:  # room left for this token and an eos after it
            if _past(deadline):  # before the decode step this node needs
                return found, True
            on_guess = frame.on_guess and len(path) < len(guess) and token == guess[len(path)]
            path.append(token)
            next_guess = guess[len(path)] if on_guess and len(path) < len(guess) else None
            stack.append(_Frame(steps.nll(path, on_guess), score, max_nll, on_guess, next_guess))
    return found, False


def dfs(model, input_ids, eos_token_id, max_new_tokens, min_prob, guess=None, deadline=None, stats=None):
    """Every reply ending in eos within max_new_tokens with probability > min_prob, as [(ids, NLL)] by NLL.

    Past `deadline` (a time.time() value, checked before the prefill and every decode step) the search stops:
    the replies found so far (each exact), and a dict passed as `stats` gets cut=True (else False)."""
    prompt = as_ids(input_ids, "input_ids")
    assert prompt, "dfs: empty prompt (it should at least hold the bos token)"
    assert 0.0 < min_prob <= 1.0, f"dfs: min_prob must be in (0, 1], got {min_prob}"
    assert max_new_tokens >= 1, f"dfs: max_new_tokens must be >= 1, got {max_new_tokens}"
    guess = clean_guess(guess, eos_token_id, max_new_tokens)
    found, cut = [], True
    if not _past(deadline):
        with eval_mode(model), torch.inference_mode():
            steps = _PathLogits(model, prompt, guess)
            found, cut = _search(steps, guess, eos_token_id, max_new_tokens, -math.log(min_prob), deadline)
    if stats is not None:
        stats["cut"] = cut
    return sorted(found, key=lambda c: (c[1], c[0]))


# --------------------------------------------------------------------------------------------------
# Reply scoring (the product-of-experts scorer)


def _targets_nll(logits, targets):
    """Summed NLL of `targets` where logits row j predicts targets[j] (log-softmax in float32)."""
    index = torch.tensor(targets, dtype=torch.long, device=logits.device)[:, None]
    return float(neg_log_softmax(logits).gather(1, index).double().sum())


def _score_padded(model, pairs):
    """Reply NLLs of one batch of (prompt, reply) pairs as right-padded prompt + reply rows."""
    ids, mask = right_pad([p + r for p, r in pairs], device_of(model))
    keep = ids.shape[1] - min(len(p) for p, _ in pairs) + 1  # from the first reply-predicting position
    logits, _ = forward_tokens(model, ids, attention_mask=mask, keep=keep)
    offset = ids.shape[1] - keep
    return [_targets_nll(logits[row, len(p) - 1 - offset:len(p) - 1 - offset + len(r)], r)
            for row, (p, r) in enumerate(pairs)]


def _score_on_prompt_cache(model, prompt_ids, cache, first_logits, replies):
    """Reply NLLs of a batch of replies to one prompt whose KV cache (batch 1) and last logits are given."""
    n, n_prompt = len(replies), prompt_ids.shape[1]
    ids, mask = right_pad(replies, prompt_ids.device)
    cache.batch_repeat_interleave(n)
    seq = torch.cat([prompt_ids.expand(n, -1), ids], dim=1)
    full_mask = torch.cat([torch.ones_like(prompt_ids).expand(n, -1), mask], dim=1)
    logits, _ = forward_tokens(model, seq, n_prompt, cache=cache, attention_mask=full_mask)
    crop_cache(cache, n_prompt)  # back to the bare prompt (batch 1) for the next batch of replies
    cache.batch_select_indices(torch.zeros(1, dtype=torch.long, device=prompt_ids.device))
    logits = torch.cat([first_logits.expand(n, 1, -1), logits[:, :-1]], dim=1)  # row j predicts reply[j]
    return [_targets_nll(logits[row, :len(r)], r) for row, r in enumerate(replies)]


def _score_shared_prompt(model, prompt, replies, batch_size):
    """Reply NLLs for many replies to one prompt: the prompt is run once and its KV cache reused."""
    prompt_ids = row_tensor(prompt, device_of(model))
    logits, cache = forward_tokens(model, prompt_ids, keep=1, use_cache=True)
    nlls = []
    for chunk in chunks(replies, batch_size):
        nlls += _score_on_prompt_cache(model, prompt_ids, cache, logits[:, -1:], chunk)
    return nlls


def _score_by_prompt(model, pairs, batch_size):
    groups = {}
    for i, (prompt, _) in enumerate(pairs):
        groups.setdefault(tuple(prompt), []).append(i)
    nlls = [0.0] * len(pairs)
    for prompt, idx in groups.items():
        idx.sort(key=lambda i: -len(pairs[i][1]))  # similar lengths per batch: less padding
        for i, v in zip(idx, _score_shared_prompt(model, list(prompt), [pairs[i][1] for i in idx], batch_size)):
            nlls[i] = v
    return nlls


def _score_by_length(model, pairs, batch_size):
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    nlls = [0.0] * len(pairs)
    for chunk in chunks(order, batch_size):
        for i, v in zip(chunk, _score_padded(model, [pairs[i] for i in chunk])):
            nlls[i] = v
    return nlls


def score_replies(model, prompts, replies, batch_size=8, share_prompts=True):
    """NLL of each reply given its prompt: -sum log p(reply tokens | prompt + earlier reply tokens)."""
    pairs = check_pairs(prompts, replies)
    # The PoE scores every candidate under the same augmented prompts: run each distinct prompt once.
    score = _score_by_prompt if share_prompts else _score_by_length
    with eval_mode(model), torch.inference_mode():
        return score(model, pairs, batch_size)


def calc_score(model, tokenizer, input_text, reply_text):
    """NLL of reply_text after input_text (bos prepended to the input), as in RECIPE.md 5.1."""
    prompt = tokenizer(input_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id is not None, "calc_score: the tokenizer has no bos token"
    if not prompt or prompt[0] != tokenizer.bos_token_id:
        prompt = [tokenizer.bos_token_id] + prompt
    reply = tokenizer(reply_text, add_special_tokens=False)["input_ids"]
    return score_replies(model, [prompt], [reply])[0]


# --------------------------------------------------------------------------------------------------
# generate() baselines


def _generation_config(mode, num_beams, num_return_sequences, temperature):
    from transformers import GenerationConfig
    if mode == "greedy":
        assert num_return_sequences == 1, "generate_candidates: greedy returns one sequence"
        return GenerationConfig(do_sample=False, num_beams=1)
    if mode == "sample":
        assert temperature > 0, f"generate_candidates: temperature must be > 0, got {temperature}"
        # top_k=0 and top_p=1 sample the full distribution, whatever the model's generation_config says.
        return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                num_return_sequences=num_return_sequences)
    if mode == "beam":
        assert 1 <= num_return_sequences <= num_beams, \
            f"generate_candidates: need 1 <= num_return_sequences <= num_beams, got {num_return_sequences}, {num_beams}"
        return GenerationConfig(do_sample=False, num_beams=num_beams, num_return_sequences=num_return_sequences)
    raise ValueError(f"generate_candidates: mode must be 'greedy', 'sample' or 'beam', got {mode!r}")


def _replies_ending_in_eos(sequences, n_prompt, eos_token_id):
    """Unique replies cut after their first eos, in order; replies that never reach eos are dropped."""
    replies = []
    for seq in sequences:
        reply = seq[n_prompt:].tolist()
        if eos_token_id in reply:
            reply = reply[:reply.index(eos_token_id) + 1]
            if reply not in replies:
                replies.append(reply)
    return replies


@contextlib.contextmanager
def _grid_positions_in_generate(model):
    """For a grid-position model, make generate() pass (grid, row, column) positions of the tokens it feeds
    (otherwise it would silently use 1-D positions): each step's positions are computed from the whole sequence."""
    if not grid_positions.has_grid_positions(model):
        yield
        return
    prepare, own = model.prepare_inputs_for_generation, model.__dict__.get("prepare_inputs_for_generation")

    def with_grid_positions(input_ids, *args, **kwargs):
        inputs = prepare(input_ids, *args, **kwargs)
        fed = inputs["input_ids"].shape[1]
        inputs["position_ids"] = grid_positions.position_ids_for(model, input_ids)[..., -fed:]
        return inputs

    model.prepare_inputs_for_generation = with_grid_positions
    try:
        yield
    finally:
        if own is None:
            del model.prepare_inputs_for_generation  # back to the class's method
        else:
            model.prepare_inputs_for_generation = own


def generate_candidates(model, input_ids, eos_token_id, max_new_tokens, mode="greedy", num_beams=4,
                        num_return_sequences=1, temperature=1.0, seed=0, pad_token_id=None):
    """Greedy, sampled or beam replies through model.generate, as [(ids, NLL)] with the NLL recomputed."""
    prompt = as_ids(input_ids, "input_ids")
    config = _generation_config(mode, num_beams, num_return_sequences, temperature)
    config.max_new_tokens, config.eos_token_id = max_new_tokens, eos_token_id
    config.return_dict_in_generate = True
    config.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
    ids = row_tensor(prompt, device_of(model))
    # generate() samples from torch's global RNG: seeded inside a fork, the caller's stream untouched
    with eval_mode(model), seeded_torch(seed, ids.device), torch.no_grad(), _grid_positions_in_generate(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    replies = _replies_ending_in_eos(out.sequences, len(prompt), eos_token_id)
    # Scores from generate() are processed (temperature, beam length penalty); rescore plainly like DFS.
    nlls = score_replies(model, [prompt] * len(replies), replies) if replies else []
    return sorted(zip(replies, nlls), key=lambda c: (c[1], c[0]))
