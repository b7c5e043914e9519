"""Inference: DFS sampling, `generate` baselines, reply scoring (the product-of-experts scorer), model
fingerprints and a disk cache keyed by everything that changes a result (the model included).

Token ids are plain lists of ints and NLLs are floats in nats (lower = better), so results pickle to disk and
compare exactly on a rerun. Every model call goes through `_forward`, which asks `position_ids_for` for the
positions: the one place to change for a model whose positions are computed from the token ids.
"""
import contextlib
import hashlib
import inspect
import json
import math
import time

import numpy as np
import torch

from tqdm.auto import tqdm

import arc_loader
import grid_positions
from model_tools import attention_without_cudnn

# --------------------------------------------------------------------------------------------------
# Model plumbing shared by the sampler and the scorer


def position_ids_for(model, token_ids, start=0):
    """Position ids of token_ids[:, start:], given the whole sequence from position 0.

    (batch, n) 1-D positions for ordinary models; (3, batch, n) (grid, row, column) positions for a model
    whose config carries `arc_positions` (see grid_positions.py), derived from the whole prefix.
    """
    grid = grid_positions.position_ids_for(model, token_ids)
    if grid is not None:
        return grid[..., start:].to(token_ids.device)
    batch, length = token_ids.shape
    return torch.arange(start, length, device=token_ids.device).repeat(batch, 1)


def _device(model):
    return model.get_input_embeddings().weight.device


@contextlib.contextmanager
def _eval_mode(model):
    # Dropout would make DFS and scoring random; restore the caller's mode afterwards (TTT trains in between).
    # cuDNN attention would build a new execution plan at every decode step (model_tools.attention_without_cudnn).
    was_training = model.training
    model.eval()
    try:
        with attention_without_cudnn():
            yield
    finally:
        if was_training:
            model.train()


def _accepts_logits_to_keep(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _forward(model, seq, start=0, cache=None, keep=None, attention_mask=None, use_cache=False):
    """Run seq[:, start:] on top of `cache` (which holds seq[:, :start]); returns (logits, cache)."""
    kwargs = {}
    if keep is not None and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep  # a long prompt's full logits would cost len * vocab floats
    out = model(input_ids=seq[:, start:], position_ids=position_ids_for(model, seq, start),
                attention_mask=attention_mask, past_key_values=cache, use_cache=use_cache or cache is not None,
                **kwargs)
    logits = out.logits if keep is None else out.logits[:, -keep:]
    return logits, out.past_key_values


def _crop(cache, length):
    # transformers 5.17 reads a positive crop() argument as a deprecated absolute length; a negative one
    # removes that many tokens in every version, so crop by the number of tokens to drop.
    extra = cache.get_seq_length() - length
    assert extra >= 0, f"KV cache holds {cache.get_seq_length()} tokens, cannot grow it to {length} by cropping"
    if extra > 0:
        cache.crop(-extra)


def _neg_log_softmax(logits):
    return -torch.log_softmax(logits.float(), dim=-1)


def _as_ids(ids, name):
    """Token ids as a list of ints from a list, a 1-D tensor/array or a (1, n) tensor/array."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        assert ids.ndim == 1 or (ids.ndim == 2 and ids.shape[0] == 1), \
            f"{name}: expected a 1-D sequence or batch size 1, got shape {tuple(ids.shape)}"
        ids = ids.reshape(-1).tolist()
    ids = list(ids)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
    assert not bad, f"{name}: token ids must be ints, got {bad[:3]!r}"
    return [int(t) for t in ids]


def _to_tensor(ids, device):
    return torch.tensor([ids], dtype=torch.long, device=device)


def _right_pad(seqs, device, pad_id=0):
    """(ids, attention_mask) of right-padded sequences; padding after the last real token never shifts positions."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def _chunks(items, size):
    assert size >= 1, f"batch_size must be >= 1, got {size}"
    return [items[i:i + size] for i in range(0, len(items), size)]


def _common_prefix(a, b):
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


# --------------------------------------------------------------------------------------------------
# DFS sampler


class _PathLogits:
    """Next-token NLLs along a DFS path: one prefill of prompt + guess, then one token per step on a KV cache."""

    def __init__(self, model, prompt, guess):
        self.model, self.n_prompt, self.device = model, len(prompt), _device(model)
        self.seq = _to_tensor(prompt + guess, self.device)
        logits, self.cache = _forward(model, self.seq, keep=len(guess) + 1, use_cache=True)
        self.guess_nll = _neg_log_softmax(logits[0])  # row k: the reply's k-th token after guess[:k]
        self.cached = list(guess)  # reply tokens whose keys/values are in the cache

    def nll(self, path, on_guess):
        """NLL of every vocabulary token after prompt + path (float64 numpy)."""
        if on_guess:
            return self.guess_nll[len(path)].double().cpu().numpy()
        # The cache may hold a deeper, abandoned branch: crop back to the branch point, then feed what is
        # missing (one token, since DFS extends the current path by one token at a time).
        keep = min(_common_prefix(self.cached, path), len(path) - 1)
        _crop(self.cache, self.n_prompt + keep)
        self.seq = torch.cat([self.seq[:, :self.n_prompt + keep],
                              _to_tensor(path[keep:], self.device)], dim=1)
        logits, _ = _forward(self.model, self.seq, self.n_prompt + keep, cache=self.cache)
        self.cached = list(path)
        return _neg_log_softmax(logits[0, -1]).double().cpu().numpy()


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


def _clean_guess(guess, eos_token_id, max_new_tokens):
    guess = [] if guess is None else _as_ids(guess, "guess")
    if guess and guess[-1] == eos_token_id:
        guess = guess[:-1]
    return guess[:max_new_tokens - 1]  # deeper guess tokens could never be followed by eos in budget


def _search(steps, guess, eos_token_id, max_new_tokens, max_nll):
    """Iterative DFS (explicit stack: a 30x30 reply is 932 levels deep); returns [(reply ids, NLL)]."""
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
            on_guess = frame.on_guess and len(path) < len(guess) and token == guess[len(path)]
            path.append(token)
            next_guess = guess[len(path)] if on_guess and len(path) < len(guess) else None
            stack.append(_Frame(steps.nll(path, on_guess), score, max_nll, on_guess, next_guess))
    return found


def dfs(model, input_ids, eos_token_id, max_new_tokens, min_prob, guess=None):
    """Every reply ending in eos within max_new_tokens with probability > min_prob, as [(ids, NLL)] by NLL."""
    prompt = _as_ids(input_ids, "input_ids")
    assert prompt, "dfs: empty prompt (it should at least hold the bos token)"
    assert 0.0 < min_prob <= 1.0, f"dfs: min_prob must be in (0, 1], got {min_prob}"
    assert max_new_tokens >= 1, f"dfs: max_new_tokens must be >= 1, got {max_new_tokens}"
    guess = _clean_guess(guess, eos_token_id, max_new_tokens)
    with _eval_mode(model), torch.inference_mode():
        steps = _PathLogits(model, prompt, guess)
        found = _search(steps, guess, eos_token_id, max_new_tokens, -math.log(min_prob))
    return sorted(found, key=lambda c: (c[1], c[0]))


# --------------------------------------------------------------------------------------------------
# Reply scoring (the product-of-experts scorer)


def _targets_nll(logits, targets):
    """Summed NLL of `targets` where logits row j predicts targets[j] (log-softmax in float32)."""
    index = torch.tensor(targets, dtype=torch.long, device=logits.device)[:, None]
    return float(_neg_log_softmax(logits).gather(1, index).double().sum())


def _score_padded(model, pairs):
    """Reply NLLs of one batch of (prompt, reply) pairs as right-padded prompt + reply rows."""
    ids, mask = _right_pad([p + r for p, r in pairs], _device(model))
    keep = ids.shape[1] - min(len(p) for p, _ in pairs) + 1  # from the first reply-predicting position
    logits, _ = _forward(model, ids, attention_mask=mask, keep=keep)
    offset = ids.shape[1] - keep
    return [_targets_nll(logits[row, len(p) - 1 - offset:len(p) - 1 - offset + len(r)], r)
            for row, (p, r) in enumerate(pairs)]


def _score_on_prompt_cache(model, prompt_ids, cache, first_logits, replies):
    """Reply NLLs of a batch of replies to one prompt whose KV cache (batch 1) and last logits are given."""
    n, n_prompt = len(replies), prompt_ids.shape[1]
    ids, mask = _right_pad(replies, prompt_ids.device)
    cache.batch_repeat_interleave(n)
    seq = torch.cat([prompt_ids.expand(n, -1), ids], dim=1)
    full_mask = torch.cat([torch.ones_like(prompt_ids).expand(n, -1), mask], dim=1)
    logits, _ = _forward(model, seq, n_prompt, cache=cache, attention_mask=full_mask)
    _crop(cache, n_prompt)  # back to the bare prompt (batch 1) for the next batch of replies
    cache.batch_select_indices(torch.zeros(1, dtype=torch.long, device=prompt_ids.device))
    logits = torch.cat([first_logits.expand(n, 1, -1), logits[:, :-1]], dim=1)  # row j predicts reply[j]
    return [_targets_nll(logits[row, :len(r)], r) for row, r in enumerate(replies)]


def _score_shared_prompt(model, prompt, replies, batch_size):
    """Reply NLLs for many replies to one prompt: the prompt is run once and its KV cache reused."""
    prompt_ids = _to_tensor(prompt, _device(model))
    logits, cache = _forward(model, prompt_ids, keep=1, use_cache=True)
    nlls = []
    for chunk in _chunks(replies, batch_size):
        nlls += _score_on_prompt_cache(model, prompt_ids, cache, logits[:, -1:], chunk)
    return nlls


def _check_pairs(prompts, replies):
    assert len(prompts) == len(replies), f"score_replies: {len(prompts)} prompts but {len(replies)} replies"
    pairs = [(_as_ids(p, "prompt"), _as_ids(r, "reply")) for p, r in zip(prompts, replies)]
    assert all(p and r for p, r in pairs), "score_replies: prompts and replies must be non-empty"
    return pairs


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
    for chunk in _chunks(order, batch_size):
        for i, v in zip(chunk, _score_padded(model, [pairs[i] for i in chunk])):
            nlls[i] = v
    return nlls


def score_replies(model, prompts, replies, batch_size=8, share_prompts=True):
    """NLL of each reply given its prompt: -sum log p(reply tokens | prompt + earlier reply tokens)."""
    pairs = _check_pairs(prompts, replies)
    # The PoE scores every candidate under the same augmented prompts: run each distinct prompt once.
    score = _score_by_prompt if share_prompts else _score_by_length
    with _eval_mode(model), torch.inference_mode():
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


@contextlib.contextmanager
def _seeded_torch(seed, device):
    # generate() samples from torch's global RNG: seed it inside a fork so the caller's stream is untouched.
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


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
    prompt = _as_ids(input_ids, "input_ids")
    config = _generation_config(mode, num_beams, num_return_sequences, temperature)
    config.max_new_tokens, config.eos_token_id = max_new_tokens, eos_token_id
    config.return_dict_in_generate = True
    config.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
    ids = _to_tensor(prompt, _device(model))
    with _eval_mode(model), _seeded_torch(seed, ids.device), torch.no_grad(), _grid_positions_in_generate(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    replies = _replies_ending_in_eos(out.sequences, len(prompt), eos_token_id)
    # Scores from generate() are processed (temperature, beam length penalty); rescore plainly like DFS.
    nlls = score_replies(model, [prompt] * len(replies), replies) if replies else []
    return sorted(zip(replies, nlls), key=lambda c: (c[1], c[0]))


# --------------------------------------------------------------------------------------------------
# Model identity and the disk cache


def _tensor_digest(tensor, sample_size):
    """Bytes standing for a tensor's values: all of a small one, else a strided sample plus its sum."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n <= sample_size:
        return flat.to(torch.float64).cpu().numpy().tobytes()
    index = torch.arange(sample_size, device=flat.device) * (n - 1) // (sample_size - 1)
    # The sum catches a change the sample misses; 10 digits hide the summation order of CPU vs GPU kernels.
    total = f"{float(torch.sum(flat, dtype=torch.float64)):.10e}".encode()
    return flat[index].to(torch.float64).cpu().numpy().tobytes() + total


def _json_fallback(obj):
    return sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else str(obj)


def _active_adapters(model):
    # peft's PeftModel has an `active_adapters` property; elsewhere (transformers' adapter mixin, a model
    # with injected LoRA layers) take every configured adapter, which can only make the key stricter.
    if isinstance(getattr(type(model), "active_adapters", None), property):
        return list(model.active_adapters)
    return list(model.peft_config)


def _adapter_description(model):
    """Active peft adapters and their configs (alpha changes the output without changing any weight)."""
    if not getattr(model, "peft_config", None):
        return ""
    configs = {}
    for name in sorted(_active_adapters(model)):
        config = dict(model.peft_config[name].to_dict())
        config.pop("base_model_name_or_path", None)  # a path, not a property of the weights
        configs[name] = config
    return json.dumps(configs, sort_keys=True, default=_json_fallback)


def model_fingerprint(model, sample_size=4096):
    """Short hex id of a model's weights (names, shapes, dtypes, sampled values) and active peft adapters."""
    digest = hashlib.sha256()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        if not tensor.is_meta:
            digest.update(_tensor_digest(tensor, sample_size))
    digest.update(_adapter_description(model).encode())
    return digest.hexdigest()[:16]


def cache_key(parts):
    """sha256 of the canonical JSON of `parts` (plain JSON values only, so equal parts give equal keys)."""
    try:
        text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"cache key parts must be plain JSON (dict/list/str/int/float/bool/None): {err}") from err
    return hashlib.sha256(text.encode()).hexdigest()


_PLAIN_SCALARS = (int, float, str, bool, type(None))


def _check_plain(value, where="value"):
    """Refuse tensors and numpy scalars: a cached value must come back identical in a fresh process."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
    elif type(value) not in _PLAIN_SCALARS:
        raise TypeError(f"DiskCache: {where} is a {type(value).__name__}; store plain Python values only")


_MISSING = object()  # a stored None must count as a hit


class DiskCache:
    """A diskcache.Cache whose keys are sha256 hashes of everything that changes a result."""

    def __init__(self, path):
        import diskcache
        self.path = str(path)
        self._cache = diskcache.Cache(self.path)

    def get(self, key_parts, default=None):
        """The stored value for key_parts, or default."""
        return self._cache.get(cache_key(key_parts), default=default)

    def put(self, key_parts, value):
        """Store a plain-Python value under key_parts."""
        _check_plain(value)
        self._cache.set(cache_key(key_parts), value)

    def get_or_compute(self, key_parts, fn):
        """The stored value for key_parts, or fn() computed, stored and returned."""
        value = self.get(key_parts, default=_MISSING)
        if value is _MISSING:
            value = fn()
            self.put(key_parts, value)
        return value

    def __contains__(self, key_parts):
        return cache_key(key_parts) in self._cache

    def __len__(self):
        return len(self._cache)

    def close(self):
        """Close the underlying diskcache (the files stay)."""
        self._cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------------
# Cached entry points for the task loop


def _generate_defaults():
    params = inspect.signature(generate_candidates).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _resolve(model):
    """A model, or a zero-argument callable returning one (e.g. lazy test-time training), resolved now."""
    return model if isinstance(model, torch.nn.Module) else model()


def infer_single(model, input_ids, eos_token_id, max_new_tokens, min_prob=None, guess=None, cache=None,
                 fingerprint=None, **generate_kw):
    """Candidates for one prompt: DFS if min_prob is set, else generate_candidates; memoized without the guess.

    `model` may be a zero-argument callable returning the model: it is only called on a cache miss.
    """
    prompt = _as_ids(input_ids, "input_ids")
    if min_prob is not None:
        assert not generate_kw, f"infer_single: DFS takes no generate options, got {sorted(generate_kw)}"
        parts = {"fn": "dfs", "min_prob": float(min_prob)}
        compute = lambda: dfs(_resolve(model), prompt, eos_token_id, max_new_tokens, min_prob, guess=guess)  # noqa: E731
    else:
        parts = {"fn": "generate", **_generate_defaults(), **generate_kw}
        compute = lambda: generate_candidates(_resolve(model), prompt, eos_token_id, max_new_tokens,  # noqa: E731
                                              **generate_kw)
    if cache is None:
        return compute()
    assert fingerprint, "infer_single: a cache needs fingerprint=model_fingerprint(model)"
    parts.update(model=fingerprint, prompt=prompt, eos=int(eos_token_id), max_new_tokens=int(max_new_tokens))
    return cache.get_or_compute(parts, compute)


def dfs_batch_cached(model, prompts, eos_token_id, max_new_tokens, min_prob, cache=None, fingerprint=None,
                     progress=None, **limits):
    """DFS results of many prompts at once (batched_dfs), memoized under the same keys as infer_single's DFS;
    with min_prob None the batched greedy decode ([] or [(ids, NLL)] per prompt).

    Results are saved group by group as they finish (a killed run keeps them); `progress` (a description)
    shows a progress bar over the prompts; `limits` go to batched_dfs (batch_size, max_batch_tokens, ...).
    """
    import batched_dfs  # imported here: batched_dfs builds on this module

    prompts = [_as_ids(p, "prompts") for p in prompts]
    search = {"fn": "dfs", "min_prob": float(min_prob)} if min_prob is not None else {"fn": "greedy_batched"}
    parts = [{**search, "model": fingerprint, "prompt": p, "eos": int(eos_token_id),
              "max_new_tokens": int(max_new_tokens)} for p in prompts]
    if cache is not None:
        assert fingerprint, "dfs_batch_cached: a cache needs fingerprint=model_fingerprint(model)"
    out = [cache.get(part, default=_MISSING) if cache is not None else _MISSING for part in parts]
    missing = [i for i, v in enumerate(out) if v is _MISSING]
    if missing:
        bar = tqdm(total=len(missing), desc=progress, dynamic_ncols=True) if progress else None

        def save(idx, results):
            for j, v in zip(idx, results):
                i = missing[j]
                out[i] = [(list(ids), float(nll)) for ids, nll in v]
                if cache is not None:
                    cache.put(parts[i], out[i])
            if bar is not None:
                bar.update(len(idx))

        todo = [prompts[i] for i in missing]
        if min_prob is None:
            batched_dfs.batched_greedy(_resolve(model), todo, eos_token_id, max_new_tokens, callback=save, **limits)
        else:
            batched_dfs.batched_dfs(_resolve(model), todo, eos_token_id, max_new_tokens, min_prob, callback=save,
                                    **limits)
        if bar is not None:
            bar.close()
    return out


SCORE_BLOCK = 4096  # pairs per batched scoring call: results are saved after each


def score_replies_cached(model, prompts, replies, cache=None, fingerprint=None, batch_size=8, batched_limits=None,
                         progress=None):
    """score_replies with each (prompt, reply) NLL memoized; only the missing pairs are run.

    With `batched_limits` (a dict of batched_dfs limits) they run through batched_dfs.batched_scores, many
    prompts per forward, in blocks saved as they finish; `progress` shows a bar over the pairs.
    """
    pairs = _check_pairs(prompts, replies)
    if cache is not None:
        assert fingerprint, "score_replies_cached: a cache needs fingerprint=model_fingerprint(model)"
    parts = [{"fn": "score", "model": fingerprint, "prompt": p, "reply": r} for p, r in pairs]
    nlls = [cache.get(part) if cache is not None else None for part in parts]
    missing = [i for i, v in enumerate(nlls) if v is None]
    if not missing:
        return nlls
    if batched_limits is None:
        blocks, score = [missing], lambda m, p, r: score_replies(m, p, r, batch_size)  # noqa: E731
    else:
        import batched_dfs  # imported here: batched_dfs builds on this module
        missing.sort(key=lambda i: len(pairs[i][0]))  # blocks of similar prompt lengths
        blocks = list(_chunks(missing, SCORE_BLOCK))
        score = lambda m, p, r: batched_dfs.batched_scores(m, p, r, **batched_limits)  # noqa: E731
    bar = tqdm(total=len(missing), desc=progress, dynamic_ncols=True) if progress else None
    for block in blocks:
        fresh = score(_resolve(model), [pairs[i][0] for i in block], [pairs[i][1] for i in block])
        for i, v in zip(block, fresh):
            nlls[i] = v
            if cache is not None:
                cache.put(parts[i], v)
        if bar is not None:
            bar.update(len(block))
    if bar is not None:
        bar.close()
    return nlls


# --------------------------------------------------------------------------------------------------
# The task loop: augmented views -> candidates in the original frame -> scores under the scoring views


def _grid_id(grid):
    grid = np.asarray(grid)
    return f"{grid.shape}:{grid.tobytes().hex()}"


def _raise_cache_miss():
    raise CacheMiss("not in the cache")


class TaskRunner:
    """Generates and scores the candidates of test inputs over augmented views, through the disk cache.

    `get_model` is a model or a zero-argument callable returning one (lazy per-task TTT: called only on a
    cache miss). `model_id` names the weights in every cache key.
    """

    def __init__(self, get_model, tokenizer, model_id, fmt_opts, max_tokens=8192, max_new_tokens=932,
                 sampler="dfs", min_prob=0.1, sampler_opts=None, pass_guess=True, cache=None,
                 score_batch_size=8, timings=None, cache_only=False, batch_views=False, batch_limits=None):
        self.get_model, self.tok, self.model_id = get_model, tokenizer, model_id
        if cache_only:  # collect what worker processes computed; never compute anything here
            self.get_model = _raise_cache_miss
        self.fmt_opts, self.max_new_tokens = fmt_opts, max_new_tokens
        self.max_input_tokens = max_tokens - max_new_tokens  # the prompt leaves room for the longest reply
        self.sampler, self.min_prob, self.sampler_opts = sampler, min_prob, dict(sampler_opts or {})
        self.pass_guess, self.cache, self.score_batch_size = pass_guess, cache, score_batch_size
        self.timings = timings if timings is not None else {}
        self.batch_views = batch_views and sampler in ("dfs", "greedy")  # batched DFS / greedy over many views
        self.batch_limits = dict(batch_limits or {})  # batched_dfs memory limits (batch_size, max_batch_tokens, ...)
        self._prefetched = {}  # (generation views, scoring views) -> candidate records, filled by prefetch

    def _ids(self, text, bos):
        return list(self.tok(text, add_special_tokens=bos)["input_ids"])

    def _timed(self, stage, fn, *a, **kw):
        start, ttt_before = time.time(), self.timings.get("ttt", 0.0)
        try:
            return fn(*a, **kw)
        finally:  # lazy per-task TTT runs inside the first model call and books its own time
            spent = time.time() - start - (self.timings.get("ttt", 0.0) - ttt_before)
            self.timings[stage] = self.timings.get(stage, 0.0) + spent

    def generate(self, prompt_text, guess_text=None):
        """Replies to one formatted prompt as [(reply text, NLL)]; the guess only changes the speed."""
        guess = self._ids(guess_text, False) if guess_text and self.sampler == "dfs" else None
        min_prob = self.min_prob if self.sampler == "dfs" else None
        kw = {} if self.sampler == "dfs" else {"mode": self.sampler, **self.sampler_opts}
        out = self._timed("generate", infer_single, self.get_model, self._ids(prompt_text, True),
                          self.tok.eos_token_id, self.max_new_tokens, min_prob=min_prob, guess=guess,
                          cache=self.cache, fingerprint=self.model_id, **kw)
        return [(self.tok.decode(ids, skip_special_tokens=False), nll) for ids, nll in out]

    def _view_prompts(self, dataset, keys):
        """[(view key as formatted, prompt ids)]: each view cut to the prompt budget by dropping examples."""
        formatted = [dataset.get_task(k, self.max_input_tokens, "input", **self.fmt_opts) for k in keys]
        return [(key, self._ids(f["input"], True)) for key, f in formatted]

    def _generate_batch(self, dataset, keys, progress=None):
        """[(key, [(reply text, NLL)])] for all views at once through the batched DFS (no guesses needed)."""
        views = self._view_prompts(dataset, keys)
        min_prob = self.min_prob if self.sampler == "dfs" else None  # None: greedy
        out = self._timed("generate", dfs_batch_cached, self.get_model, [ids for _, ids in views],
                          self.tok.eos_token_id, self.max_new_tokens, min_prob, cache=self.cache,
                          fingerprint=self.model_id, progress=progress, **self.batch_limits)
        return [(key, [(self.tok.decode(ids, skip_special_tokens=False), nll) for ids, nll in replies])
                for (key, _), replies in zip(views, out)]

    def prefetch(self, dataset, work):
        """Fill the cache for many test inputs at once: `work` is [(generation views, scoring views)] per test input.

        One batched DFS over every view of every test input, then one batched scoring of every candidate under
        its scoring views; infer_test then finds everything in the cache. Needs batch_views (a shared model).
        """
        assert self.batch_views, "TaskRunner.prefetch: needs batch_views=True (the batched DFS)"
        views = iter(self._generate_batch(dataset, [k for gen_keys, _ in work for k in gen_keys],
                                          progress="DFS, all views"))
        prompts, reply_ids, where, done = [], [], [], []
        for gen_keys, score_keys in work:
            cands = {}
            for _ in gen_keys:
                self._add_candidates(cands, dataset, *next(views))
            p, r, w = self._score_pairs(dataset, list(cands.values()), score_keys)
            prompts.extend(p)
            reply_ids.extend(r)
            where.extend(w)
            done.append(((tuple(gen_keys), tuple(score_keys)), list(cands.values())))
        if prompts:
            nlls = self._timed("score", score_replies_cached, self.get_model, prompts, reply_ids, cache=self.cache,
                               fingerprint=self.model_id, batched_limits=self.batch_limits, progress="scoring")
            for (cand, key2), nll in zip(where, nlls):
                cand["scores_aug"][key2] = nll
        self._prefetched.update(done)  # infer_test hands these out instead of building them again

    def infer_test(self, dataset, keys, score_keys=()):
        """Candidate records of one test input: generated under `keys`, scored under every `score_keys` view."""
        ready = self._prefetched.pop((tuple(keys), tuple(score_keys)), None)
        if ready is not None:
            return ready
        cands = {}
        if self.batch_views:
            for key, replies in self._generate_batch(dataset, keys):
                self._add_candidates(cands, dataset, key, replies)
        else:
            best = None
            for key in keys:
                key, fmt = dataset.get_task(key, self.max_input_tokens, "input", **self.fmt_opts)
                guess = None
                if self.pass_guess and best is not None:  # the best answer so far, re-encoded under this view
                    guess = dataset.fmt_task(key, reply=best, **self.fmt_opts)["reply"]
                self._add_candidates(cands, dataset, key, self.generate(fmt["input"], guess))
                if cands:
                    best = min(cands.values(), key=lambda c: min(c["scores_inf"].values()))["output"]
        self.score_candidates(dataset, list(cands.values()), score_keys)
        return list(cands.values())

    def _add_candidates(self, cands, dataset, key, replies):
        """Decode a view's replies into the original frame; one record per distinct grid."""
        for text, nll in replies:
            grid, correct, _ = dataset.decode(text, self.fmt_opts["lines_sep"], key)
            if grid is not None:
                rec = cands.setdefault(_grid_id(grid), {"output": grid.tolist(), "correct": correct,
                                                        "scores_inf": {}, "scores_aug": {}})
                rec["scores_inf"][key] = nll

    def _score_pairs(self, dataset, cands, score_keys):
        """(prompt ids, reply ids, (candidate, view key)) of every candidate under every scoring view."""
        prompts, replies, where = [], [], []
        views = []  # a view's prompt is the same for every candidate: formatted and tokenized once
        for key in score_keys if cands else ():
            key2, fmt = dataset.get_task(key, self.max_input_tokens, "input", reply=False, **self.fmt_opts)
            views.append((key2, self._ids(fmt["input"], True)))
        for cand in cands:
            for key2, prompt in views:
                prompts.append(prompt)
                replies.append(self._ids(dataset.fmt_reply(key2, cand["output"], **self.fmt_opts), False))
                where.append((cand, key2))
        return prompts, replies, where

    def score_candidates(self, dataset, cands, score_keys):
        """Fill each candidate's scores_aug: its reply NLL under every scoring view (one batched call)."""
        prompts, replies, where = self._score_pairs(dataset, cands, score_keys)
        if not where:
            return
        nlls = self._timed("score", score_replies_cached, self.get_model, prompts, replies, cache=self.cache,
                           fingerprint=self.model_id, batch_size=self.score_batch_size,
                           batched_limits=self.batch_limits if self.batch_views else None)
        for (cand, key2), nll in zip(where, nlls):
            cand["scores_aug"][key2] = nll


def view_keys(dataset, key, n_views, seed, **aug_opts):
    """n augmented views of one test input: the 8 symmetries, each repeated with its own colours and example
    order (n=16: 8 D8 x 2), seeded by (seed, key) so every task gets the same views on every machine."""
    opts = {"tp": "all", "rt": "all", "perm": True, "shfl_ex": True, **aug_opts}
    rng = np.random.default_rng(arc_loader.stable_seed(seed, key))
    return dataset.augment_keys([key], rng, n=max(1, -(-n_views // 8)), **opts)[:n_views]


class CacheMiss(RuntimeError):
    """Raised by a cache-only TaskRunner: the result is not in the cache (the task was not finished)."""


def _out_of_memory_errors():
    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (torch.cuda.OutOfMemoryError,)


def _infer_task(dataset, runner, base, n_tests, n_views, aug_seed, n_score_views, score_seed):
    out = []
    for i in range(n_tests):
        key = f"{base}_{i}"
        keys = view_keys(dataset, key, n_views, aug_seed)
        # the paper's choice: the same scoring views ("experts") for all candidates of a test input
        out.append(runner.infer_test(dataset, keys, view_keys(dataset, key, n_score_views, score_seed)))
    return out


def _infer_task_guarded(dataset, runner, base, n_tests, *view_args):
    """A task's candidates; on out-of-memory once more with half the prompt budget (fewer examples), then None."""
    full = runner.max_input_tokens
    try:
        for attempt in range(2):
            try:
                return _infer_task(dataset, runner, base, n_tests, *view_args)
            except _out_of_memory_errors():
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                runner.max_input_tokens //= 2
                tqdm.write(f"task {base}: out of memory" + (", retrying with fewer examples" if attempt == 0
                                                              else ", skipped (fallback attempts)"))
            except CacheMiss:
                tqdm.write(f"task {base}: not finished by any worker, skipped (fallback attempts)")
                return None
        return None
    finally:
        runner.max_input_tokens = full


def _prefetch(dataset, runner, grouped, bases, n_views, aug_seed, n_score_views, score_seed):
    """runner.prefetch for every test input of `bases`; out of memory leaves them to the task loop."""
    work = [(view_keys(dataset, f"{b}_{i}", n_views, aug_seed), view_keys(dataset, f"{b}_{i}", n_score_views, score_seed))
            for b in bases for i in range(len(grouped[b]))]
    try:
        runner.prefetch(dataset, work)
    except _out_of_memory_errors():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tqdm.write(f"out of memory in the batched search over {len(bases)} tasks: they run one by one")


def inference_run(dataset, runner_for_task, n_views=16, aug_seed=10000, n_score_views=8, score_seed=0,
                  callback=None, deadline=None, prefetch=None, prefetch_tasks=100):
    """Every test input of every task: {task id: [candidate records per test input]}.

    `runner_for_task(base)` returns the TaskRunner of a task (per-task TTT gives each its own model) and,
    optionally, a clean-up function; `callback(cands, name, value, seconds)` sees each test input's result
    (an empty list for a skipped task). Tasks not started by `deadline` (time.time() seconds), and tasks that
    run out of memory twice, are left out of the results: the submission gives them fallback attempts.
    `prefetch` (the TaskRunner shared by all tasks, with batch_views) first computes blocks of `prefetch_tasks`
    tasks at once, all their views in one batched DFS and one batched scoring, into the cache.
    """
    results, skipped = {}, []
    grouped = dataset.grouped_keys()
    bases = list(grouped)
    for n, base in enumerate(tqdm(bases, desc="tasks", total=len(grouped), dynamic_ncols=True)):
        start, n_tests = time.time(), len(grouped[base])
        if prefetch is not None and n % prefetch_tasks == 0 and (deadline is None or start < deadline):
            _prefetch(dataset, prefetch, grouped, bases[n:n + prefetch_tasks], n_views, aug_seed, n_score_views,
                      score_seed)
            start = time.time()
        cands = None
        if deadline is None or start < deadline:
            runner, done = runner_for_task(base)
            cands = _infer_task_guarded(dataset, runner, base, n_tests, n_views, aug_seed, n_score_views, score_seed)
            if done is not None:
                done()
        if cands is None:
            skipped.append(base)
        else:
            results[base] = cands
        for i in range(n_tests):
            if callback is not None:
                callback(cands[i] if cands else [], name=f"{base}_{i}", value=1 / n_tests, seconds=time.time() - start)
    if skipped:
        print(f"{len(skipped)} of {len(grouped)} tasks skipped (time budget, memory or unfinished): fallback attempts")
    return results
