"""The candidate loop: model fingerprints, a disk cache keyed by everything that changes a result (the model
included), cached entry points to the samplers and scorers, and the per-task loop over augmented views
(`TaskRunner`, `inference_run`): generate candidates under some views, score them under others. What the search is
(search.Search), how fast it runs (search.Engine) and its prompts (search.Prompts) come in whole from search.py.

Cached values are plain Python (lists of ints, floats), so a rerun in a fresh process gets identical results.
The samplers are called through their modules (`inference_tools.dfs`, `batched_dfs.batched_dfs`), so a test can
wrap them to count what a run computes.
"""
import errno
import hashlib
import json
import os
import sqlite3
import time
import warnings

import numpy as np
import torch

from tqdm.auto import tqdm

import arc_loader
import batched_dfs
import inference_tools
from decoding import as_ids, check_pairs, chunks
from search import Engine, search_key_part


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


def _open_cache(path):
    """diskcache.Cache at path; a damaged one (not a database, malformed) is set aside with a warning and a
    fresh one made, so that a damaged cache costs its results, not the run."""
    import diskcache
    try:
        cache = diskcache.Cache(path)
        len(cache)  # reads the database
        return cache
    except sqlite3.DatabaseError as e:
        aside = f'{path}.damaged-{time.strftime("%Y%m%d-%H%M%S")}'
        os.replace(path, aside)
        print(f'WARNING: the cache {path} is damaged ({e}): moved to {aside}; starting a new one')
        return diskcache.Cache(path)


class DiskCache:
    """A diskcache.Cache whose keys are sha256 hashes of everything that changes a result."""

    def __init__(self, path):
        self.path = str(path)
        self._cache = _open_cache(self.path)
        self.reused = {}  # kind ("search", "score") -> [results found in the cache, results asked for]
        self.disk_full = False  # set when a write found the disk full: the run goes on without saving

    def tally(self, kind, hits, total):
        """Count `hits` of `total` results of one kind as found in the cache (for `resumed_line`)."""
        counts = self.reused.setdefault(kind, [0, 0])
        counts[0] += hits
        counts[1] += total

    def resumed_line(self):
        """'resumed: 812 of 3352 candidate searches and 0 of 26816 scores came from the cache', or None
        when nothing came from it (a fresh run)."""
        if not any(hits for hits, _ in self.reused.values()):
            return None
        names = {"search": "candidate searches", "score": "scores"}
        parts = [f"{hits} of {total} {names.get(kind, kind)}" for kind, (hits, total) in self.reused.items()]
        return f"resumed: {' and '.join(parts)} came from the cache"

    def get(self, key_parts, default=None):
        """The stored value for key_parts, or default."""
        return self.get_many([cache_key(key_parts)], default=default)[0]

    def put(self, key_parts, value):
        """Store a plain-Python value under key_parts."""
        self.put_many([(cache_key(key_parts), value)])

    def get_many(self, keys, default=None):
        """The stored values under many keys made by cache_key (hashed once by the caller, for get and put)."""
        with self._cache.transact():
            return [self._cache.get(k, default=default) for k in keys]

    def put_many(self, items):
        """Store (key from cache_key, plain-Python value) pairs in one transaction (one disk commit)."""
        items = list(items)
        for _, value in items:
            _check_plain(value)
        if self.disk_full:
            return
        try:
            with self._cache.transact():
                for key, value in items:
                    self._cache.set(key, value)
        except (sqlite3.OperationalError, OSError) as e:
            if 'full' not in str(e) and getattr(e, 'errno', None) != errno.ENOSPC:
                raise
            self.disk_full = True
            print(f'WARNING: the disk of {self.path} is full ({e}): results are no longer saved to the cache '
                  '(this run goes on; a rerun recomputes what was not saved)')

    def get_or_compute(self, key_parts, fn, kind=None, complete=lambda: True):
        """The stored value for key_parts, or fn() computed and returned, stored unless `complete()` says it is not
        (a search cut by its deadline); `kind` tallies the lookup."""
        value = self.get(key_parts, default=_MISSING)
        if kind is not None:
            self.tally(kind, value is not _MISSING, 1)
        if value is _MISSING:
            value = fn()
            if complete():
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


def _resolve(model):
    """A model, or a zero-argument callable returning one (e.g. lazy test-time training), resolved now."""
    return model if isinstance(model, torch.nn.Module) else model()


def infer_single(model, input_ids, eos_token_id, max_new_tokens, min_prob=None, guess=None, cache=None,
                 fingerprint=None, deadline=None, **generate_kw):
    """Candidates for one prompt: DFS if min_prob is set, else generate_candidates; memoized without the guess.

    `model` may be a zero-argument callable returning the model: it is only called on a cache miss. Past
    `deadline` (time.time()) a DFS stops before its next decode step: the candidates found so far, unsaved.
    """
    prompt = as_ids(input_ids, "input_ids")
    stats = {"cut": False}
    if min_prob is not None:
        assert not generate_kw, f"infer_single: DFS takes no generate options, got {sorted(generate_kw)}"
        compute = lambda: inference_tools.dfs(_resolve(model), prompt, eos_token_id, max_new_tokens,  # noqa: E731
                                              min_prob, guess=guess, deadline=deadline, stats=stats)
    else:
        compute = lambda: inference_tools.generate_candidates(  # noqa: E731
            _resolve(model), prompt, eos_token_id, max_new_tokens, **generate_kw)
    if cache is None:
        return compute()
    assert fingerprint, "infer_single: a cache needs fingerprint=model_fingerprint(model)"
    parts = dict(search_key_part(min_prob, generate_kw=generate_kw), model=fingerprint, prompt=prompt,
                 eos=int(eos_token_id), max_new_tokens=int(max_new_tokens))
    return cache.get_or_compute(parts, compute, kind="search", complete=lambda: not stats["cut"])


def token_bar(total, desc, counts="prompt tokens"):
    """A bar over `total` tokens, the unit of a search's or a scoring's work: their time goes with the tokens, not
    with the number of prompts or pairs (a batched search takes its groups shortest prompts first). `counts` says
    which tokens, in the display."""
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} " + counts + " [{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def dfs_batch_cached(model, prompts, eos_token_id, max_new_tokens, min_prob, cache=None, fingerprint=None,
                     progress=None, on_done=None, guesses=None, deadline=None, engine=Engine()):
    """DFS results of many prompts at once (batched_dfs), memoized under the same keys as infer_single's DFS;
    with min_prob None the batched greedy decode ([] or [(ids, NLL)] per prompt). `guesses` (reply ids or None per
    prompt) only change the speed, so they are no part of the keys.

    Results are saved as prompts finish, a few at a time inside a group (a killed run keeps them); `progress` (a
    description) shows a progress bar over the prompts' tokens (the work: the search takes its groups shortest
    prompts first);
    `on_done(n, tokens)` hears of every n prompts done, `tokens` prompt tokens in all (the cached ones first);
    `engine` (search.Engine) gives batched_dfs its memory limits (batch_size, max_batch_tokens, prefill_tokens; None:
    batched_dfs' own). Past `deadline` (time.time()) the search
    stops before its next decode step: the prompts it did not finish get the candidates found so far, unsaved.
    """
    prompts = [as_ids(p, "prompts") for p in prompts]
    search = search_key_part(min_prob, batched=True)
    parts = [{**search, "model": fingerprint, "prompt": p, "eos": int(eos_token_id),
              "max_new_tokens": int(max_new_tokens)} for p in prompts]
    if cache is not None:
        assert fingerprint, "dfs_batch_cached: a cache needs fingerprint=model_fingerprint(model)"
    keys = [cache_key(part) for part in parts] if cache is not None else None
    out = cache.get_many(keys, default=_MISSING) if cache is not None else [_MISSING] * len(parts)
    missing = [i for i, v in enumerate(out) if v is _MISSING]
    if cache is not None:
        cache.tally("search", len(out) - len(missing), len(out))
    if on_done is not None and len(out) > len(missing):
        on_done(len(out) - len(missing), sum(len(p) for p, v in zip(prompts, out) if v is not _MISSING))
    if missing:
        bar = token_bar(sum(len(prompts[i]) for i in missing), progress) if progress else None

        def save(idx, results):
            for j, v in zip(idx, results):
                out[missing[j]] = [(list(ids), float(nll)) for ids, nll in v]
            if cache is not None:
                cache.put_many((keys[missing[j]], out[missing[j]]) for j in idx)
            tokens = sum(len(todo[j]) for j in idx)
            if bar is not None:
                bar.update(tokens)
            if on_done is not None:
                on_done(len(idx), tokens)

        todo = [prompts[i] for i in missing]
        todo_guesses = None if guesses is None else [guesses[i] for i in missing]
        limits = {k: v for k, v in engine.limits().items() if v is not None}
        stats, common = {}, dict(callback=save, guesses=todo_guesses, deadline=deadline,
                                 decode_graphs=engine.decode_graphs, **limits)
        if min_prob is None:
            found = batched_dfs.batched_greedy(_resolve(model), todo, eos_token_id, max_new_tokens, stats=stats,
                                               **common)
        else:
            found = batched_dfs.batched_dfs(_resolve(model), todo, eos_token_id, max_new_tokens, min_prob,
                                            stats=stats, **common)
        if "graph_error" in stats:  # the same candidates, only slower: said once (the warning's text repeats)
            warnings.warn("--decode-graphs: a CUDA graph capture failed, the decode steps ran without graphs "
                          f"(the same candidates, slower): {stats['graph_error']}", RuntimeWarning)
        for j in stats["unfinished"]:  # cut by the deadline: what was found, never saved
            out[missing[j]] = [(list(ids), float(nll)) for ids, nll in found[j]]
        if bar is not None:
            bar.close()
    return out


SCORE_BLOCK = 4096  # pairs per batched scoring call: results are saved after each
UNBATCHED_SCORE_BLOCK = 256  # the same for one prompt at a time (a CPU's: a few seconds each)


def score_replies_cached(model, prompts, replies, cache=None, fingerprint=None, engine=Engine(), progress=None,
                         deadline=None):
    """score_replies with each (prompt, reply) NLL memoized; only the missing pairs are run, as `engine`
    (search.Engine) says: `score_batch_size` replies per forward, one prompt at a time; or, with `batch_scores`,
    through batched_dfs.batched_scores under the engine's memory limits, many
    prompts per forward, in blocks saved as they finish; `progress` shows a bar over the pairs' prompt and reply
    tokens (the work; the batched blocks go shortest prompts first), the pairs done in its postfix. No block starts
    past `deadline` (time.time()): the pairs left unscored are None.
    """
    pairs = check_pairs(prompts, replies)
    if cache is not None:
        assert fingerprint, "score_replies_cached: a cache needs fingerprint=model_fingerprint(model)"
    keys = [cache_key({"fn": "score", "model": fingerprint, "prompt": p, "reply": r}) for p, r in pairs] \
        if cache is not None else None
    nlls = cache.get_many(keys) if cache is not None else [None] * len(pairs)
    missing = [i for i, v in enumerate(nlls) if v is None]
    if cache is not None:
        cache.tally("score", len(nlls) - len(missing), len(nlls))
    if not missing:
        return nlls
    if not engine.batch_scores:  # in the given order (a test input's pairs together), each prompt prefilled once per block
        blocks = list(chunks(missing, UNBATCHED_SCORE_BLOCK))
        score = lambda m, p, r: inference_tools.score_replies(m, p, r, engine.score_batch_size)  # noqa: E731
    else:
        missing.sort(key=lambda i: len(pairs[i][0]))  # blocks of similar prompt lengths
        blocks = list(chunks(missing, SCORE_BLOCK))
        limits = {k: v for k, v in engine.limits().items() if v is not None}
        score = lambda m, p, r: batched_dfs.batched_scores(m, p, r, **limits)  # noqa: E731
    tokens = lambda i: len(pairs[i][0]) + len(pairs[i][1])  # noqa: E731
    bar = token_bar(sum(map(tokens, missing)), progress, "prompt + reply tokens") if progress else None
    done = 0
    for block in blocks:
        if deadline is not None and time.time() > deadline:
            break
        fresh = score(_resolve(model), [pairs[i][0] for i in block], [pairs[i][1] for i in block])
        for i, v in zip(block, fresh):
            nlls[i] = v
        if cache is not None:
            cache.put_many((keys[i], nlls[i]) for i in block)
        done += len(block)
        if bar is not None:
            bar.set_postfix_str(f"{done}/{len(missing)} pairs", refresh=False)
            bar.update(sum(map(tokens, block)))
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
    cache miss). `model_id` names the weights in every cache key. `prompts` (search.Prompts) builds every prompt
    and reply; `search` (search.Search) says what the candidates are, `engine` (search.Engine, resolved by
    search.resolve_engine) only how fast they come.
    """

    def __init__(self, get_model, model_id, prompts, search, engine, cache=None, timings=None):
        assert engine.max_batch_tokens is not None, "TaskRunner: resolve the engine first (search.resolve_engine)"
        # cache_only: collect what worker processes computed; never compute anything here
        self.get_model = _raise_cache_miss if engine.cache_only else get_model
        self.model_id, self.prompts, self.search, self.engine, self.cache = model_id, prompts, search, engine, cache
        self.tok = prompts.tok
        self.timings = timings if timings is not None else {}
        self._prefetched = {}  # (generation views, scoring views) -> candidate records, filled by prefetch
        self.progress = None  # progress(n, tokens): n more prompts (views) of `tokens` prompt tokens generated; set by
        # inference_run for its bar
        self.deadline = None  # time.time() past which no decode step or scoring block starts; set by inference_run

    def _timed(self, stage, fn, *a, **kw):
        start, ttt_before = time.time(), self.timings.get("ttt", 0.0)
        try:
            return fn(*a, **kw)
        finally:  # lazy per-task TTT runs inside the first model call and books its own time
            spent = time.time() - start - (self.timings.get("ttt", 0.0) - ttt_before)
            self.timings[stage] = self.timings.get(stage, 0.0) + spent

    def _texts(self, out):
        return [(self.tok.decode(ids, skip_special_tokens=False), nll) for ids, nll in out]

    def generate(self, prompt, guess=None):
        """Replies to one prompt (token ids) as [(reply text, NLL)]; a DFS's guess (reply ids) only changes the
        speed."""
        kw = {} if self.search.sampler == "dfs" else self.search.generate_options()
        out = self._timed("generate", infer_single, self.get_model, prompt, self.tok.eos_token_id,
                          self.prompts.max_new_tokens, min_prob=self.search.threshold, guess=guess,
                          cache=self.cache, fingerprint=self.model_id, deadline=self.deadline, **kw)
        return self._texts(out)

    def _generate_batch(self, dataset, keys, progress=None, guesses=None):
        """[(key, [(reply text, NLL)])] for all views at once through the batched DFS or greedy decode; `guesses` (a
        grid in the original frame or None per view) are followed first under each view, which changes only the speed.

        `progress` names a bar of its own, shown only when no `self.progress` counts the work already."""
        views = [self.prompts.view(dataset, k) for k in keys]
        if guesses is not None:
            guesses = [None if grid is None else self.prompts.reply(dataset, key, grid)
                       for (key, _), grid in zip(views, guesses)]
        out = self._timed("generate", dfs_batch_cached, self.get_model, [ids for _, ids in views],
                          self.tok.eos_token_id, self.prompts.max_new_tokens, self.search.threshold, cache=self.cache,
                          fingerprint=self.model_id, progress=None if self.progress else progress,
                          on_done=self.progress, guesses=guesses, deadline=self.deadline, engine=self.engine)
        return [(key, self._texts(replies)) for (key, _), replies in zip(views, out)]

    def _generate_views(self, dataset, key_lists, progress=None):
        """_generate_batch for the views of many test inputs ([keys] per input): [[(key, replies)]] per input.

        With guess_views, in two searches: every input's first view, then its other views, each guided by the
        first view's most probable grid (the ARChitects' 2025 guessed continuations: a right guess costs one
        forward instead of a token-by-token decode). The candidates are the same either way."""
        if not self.engine.guess_views or all(len(keys) < 2 for keys in key_lists):
            flat = iter(self._generate_batch(dataset, [k for keys in key_lists for k in keys], progress))
            return [[next(flat) for _ in keys] for keys in key_lists]
        first = self._generate_batch(dataset, [keys[0] for keys in key_lists], progress)
        best = []  # the first decodable reply: batched_dfs returns them most probable first
        for key, replies in first:
            grids = (self.prompts.decode(dataset, text, key)[0] for text, _ in replies)
            best.append(next((g for g in grids if g is not None), None))
        rest = iter(self._generate_batch(dataset, [k for keys in key_lists for k in keys[1:]], progress,
                                         guesses=[grid for grid, keys in zip(best, key_lists) for _ in keys[1:]]))
        return [[head] + [next(rest) for _ in keys[1:]] for head, keys in zip(first, key_lists)]

    def _score(self, prompts, replies, progress=None):
        """The NLLs of (prompt, reply) pairs, batched over many prompts or not as the engine says."""
        return self._timed("score", score_replies_cached, self.get_model, prompts, replies, cache=self.cache,
                           fingerprint=self.model_id, engine=self.engine, progress=progress, deadline=self.deadline)

    def prefetch(self, dataset, work):
        """Fill the cache for many test inputs at once: `work` is [(generation views, scoring views)] per test input.

        One batched DFS over every view of every test input, then one batched scoring of every candidate under
        its scoring views; infer_test then finds everything in the cache. Needs batch_views (a shared model).
        """
        assert self.engine.batch_views, "TaskRunner.prefetch: needs an engine with batch_views (the batched DFS)"
        views = self._generate_views(dataset, [gen_keys for gen_keys, _ in work], progress="DFS, all views")
        groups, done = [], []
        for (gen_keys, score_keys), replies in zip(work, views):
            cands = {}
            for key, view_replies in replies:
                self._add_candidates(cands, dataset, key, view_replies)
            groups.append((list(cands.values()), score_keys))
            done.append(((tuple(gen_keys), tuple(score_keys)), list(cands.values())))
        self.score_all(dataset, groups, progress="scoring")
        self._prefetched.update(done)  # infer_test hands these out instead of building them again

    def infer_test(self, dataset, keys, score_keys=()):
        """Candidate records of one test input: generated under `keys`, scored under every `score_keys` view."""
        ready = self._prefetched.pop((tuple(keys), tuple(score_keys)), None)
        if ready is not None:
            return ready
        cands = {}
        if self.engine.batch_views:
            for key, replies in self._generate_views(dataset, [keys])[0]:
                self._add_candidates(cands, dataset, key, replies)
        else:
            self._generate_one_by_one(dataset, keys, cands)
        self.score_candidates(dataset, list(cands.values()), score_keys)
        return list(cands.values())

    def _generate_one_by_one(self, dataset, keys, cands):
        """Batch-1 search of each view in turn; a DFS follows the best answer so far first (pass_guess)."""
        best = None
        for key in keys:
            if self.deadline is not None and time.time() > self.deadline:
                break  # past the deadline: the views searched so far give the candidates
            key, prompt = self.prompts.view(dataset, key)
            guess = None
            if self.engine.pass_guess and best is not None and self.search.sampler == "dfs":
                guess = self.prompts.reply(dataset, key, best)  # the best answer so far, re-encoded under this view
            self._add_candidates(cands, dataset, key, self.generate(prompt, guess))
            if self.progress is not None:
                self.progress(1, len(prompt))
            if cands:
                best = min(cands.values(), key=lambda c: min(c["scores_inf"].values()))["output"]

    def _add_candidates(self, cands, dataset, key, replies):
        """Decode a view's replies into the original frame; one record per distinct grid."""
        for text, nll in replies:
            grid, correct, _ = self.prompts.decode(dataset, text, key)
            if grid is not None:
                rec = cands.setdefault(_grid_id(grid), {"output": grid.tolist(), "correct": correct,
                                                        "scores_inf": {}, "scores_aug": {}})
                rec["scores_inf"][key] = nll

    def _score_pairs(self, dataset, cands, score_keys):
        """(prompt ids, reply ids, (candidate, view key)) of every candidate under every scoring view."""
        prompts, replies, where = [], [], []
        # a view's prompt is the same for every candidate: formatted and tokenized once
        views = [self.prompts.view(dataset, key, reply=False) for key in (score_keys if cands else ())]
        for cand in cands:
            for key2, prompt in views:
                prompts.append(prompt)
                replies.append(self.prompts.reply(dataset, key2, cand["output"]))
                where.append((cand, key2))
        return prompts, replies, where

    def score_candidates(self, dataset, cands, score_keys):
        """Fill each candidate's scores_aug: its reply NLL under every scoring view (one batched call)."""
        self.score_all(dataset, [(cands, score_keys)])

    def score_all(self, dataset, groups, progress=None):
        """score_candidates for many test inputs in one call, [(candidates, scoring views)]: with batch_scores,
        many prompts per forward."""
        prompts, replies, where = [], [], []
        for cands, score_keys in groups:
            p, r, w = self._score_pairs(dataset, cands, score_keys)
            prompts.extend(p)
            replies.extend(r)
            where.extend(w)
        if not where:
            return
        for (cand, key2), nll in zip(where, self._score(prompts, replies, progress)):
            if nll is not None:  # None: not scored before the deadline (the candidate ranks after scored ones)
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


def _infer_task(dataset, runner, base, n_tests, search):
    out = []
    for i in range(n_tests):
        key = f"{base}_{i}"
        keys = view_keys(dataset, key, search.n_views, search.aug_seed)
        # the paper's choice: the same scoring views ("experts") for all candidates of a test input
        out.append(runner.infer_test(dataset, keys, view_keys(dataset, key, search.n_score_views, search.score_seed)))
    return out


def _infer_task_guarded(dataset, runner, base, n_tests, search):
    """A task's candidates; on out-of-memory once more with half the prompt budget (fewer examples), then None.
    Any other failure of the task (a view that does not fit --max-tokens even with one example, a search or
    scoring error) costs that task only: a warning naming it, and None (fallback attempts)."""
    full = runner.prompts.max_input_tokens
    try:
        for attempt in range(2):
            try:
                return _infer_task(dataset, runner, base, n_tests, search)
            except _out_of_memory_errors():
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                runner.prompts.max_input_tokens //= 2
                tqdm.write(f"task {base}: out of memory" + (", retrying with fewer examples" if attempt == 0
                                                              else ", skipped (fallback attempts)"))
            except CacheMiss:
                tqdm.write(f"task {base}: not finished by any worker, skipped (fallback attempts)")
                return None
            except Exception as e:  # noqa: BLE001  (one task's failure must not cost the submission)
                tqdm.write(f"WARNING: task {base}: {type(e).__name__}: {e}; skipped (fallback attempts)")
                return None
        return None
    finally:
        runner.prompts.max_input_tokens = full


def _prefetch(dataset, runner, grouped, bases, search):
    """runner.prefetch for every test input of `bases`; out of memory leaves them to the task loop."""
    work = [(view_keys(dataset, f"{b}_{i}", search.n_views, search.aug_seed),
             view_keys(dataset, f"{b}_{i}", search.n_score_views, search.score_seed))
            for b in bases for i in range(len(grouped[b]))]
    try:
        runner.prefetch(dataset, work)
    except _out_of_memory_errors():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tqdm.write(f"out of memory in the batched search over {len(bases)} tasks: they run one by one")
    except Exception as e:  # noqa: BLE001  (a bad task: the tasks run one by one, where it costs only itself)
        tqdm.write(f"WARNING: the batched search over {len(bases)} tasks failed ({type(e).__name__}: {e}): "
                   "they run one by one")


def _prompt_tokens(dataset, prompts, grouped, search):
    """{task: [prompt tokens of each generation view of its test inputs]}, the prompts as the search builds them; a
    task whose prompts cannot be built (too long even with one example) weighs nothing: it fails in its own turn."""
    out = {}
    for base, tests in grouped.items():
        views = [view for i in range(len(tests))
                 for view in view_keys(dataset, f"{base}_{i}", search.n_views, search.aug_seed)]
        try:
            out[base] = [len(prompts.view(dataset, view)[1]) for view in views]
        except Exception:  # noqa: BLE001  (one task's failure costs that task, in the task loop, not the run)
            out[base] = [0] * len(views)
    return out


class _GenerationBar:
    """The run's generation bar. It counts prompt tokens, the unit of work: the batched search runs its groups
    shortest prompts first, so a bar over prompts raced ahead at the start and its ETA at a tenth of the CPU main job
    was a fifth of the real remaining time; over tokens, 1.06 of it (docs/MAIN_JOB.md). Its postfix counts the prompts
    (views x test inputs).

    `tokens` is {task: [prompt tokens of each of its views]} in the run's order. A counter advances the bar as
    views finish, never past the tasks it serves (an out-of-memory retry of a task does not count twice);
    `finish(base)` moves it to the end of a task, done, skipped or found prefetched.
    """

    def __init__(self, tokens):
        self._end, n, total = {}, 0, 0
        for base, lengths in tokens.items():
            n, total = n + len(lengths), total + sum(lengths)
            self._end[base] = (n, total)  # prompts and tokens up to and including this task
        self.prompts, self.n_prompts = 0, n
        self.bar = token_bar(total, "generation")
        self.bar.set_postfix_str(f"0/{n} prompts")

    def counter(self, bases):
        """progress(n, tokens) for a TaskRunner working on `bases` (consecutive tasks)."""
        end_n, end_tokens = self._end[bases[-1]]
        return lambda n, tokens: self._advance(min(n, end_n - self.prompts), min(tokens, end_tokens - self.bar.n))

    def finish(self, base):
        end_n, end_tokens = self._end[base]
        self._advance(end_n - self.prompts, end_tokens - self.bar.n)

    def _advance(self, n, tokens):
        n, tokens = max(0, n), max(0, tokens)
        if n:
            self.prompts += n
            self.bar.set_postfix_str(f"{self.prompts}/{self.n_prompts} prompts", refresh=not tokens)
        if tokens:  # never update(0): it would restart tqdm's clock of the rate without counting any work
            self.bar.update(tokens)

    def close(self):
        self.bar.close()


def _first_runner_prompts(runner_for_task, base):
    """The prompt builder of per-task runners (all share one), from the first task's runner (it makes no model)."""
    runner, done = runner_for_task(base)
    if done is not None:
        done()
    return runner.prompts


def inference_run(dataset, runners, search, engine, callback=None, deadline=None):
    """Every test input of every task: {task id: [candidate records per test input]}.

    `runners` is the TaskRunner shared by all tasks, or `runner_for_task(base)` returning a task's TaskRunner
    (per-task TTT gives each its own model) and, optionally, a clean-up function. `search` gives the views, `engine`
    (resolved) the prefetch: a shared runner first computes blocks of `engine.prefetch_tasks` tasks at once, all
    their views in one batched search and one batched scoring, into the cache. `callback(cands, name, value,
    seconds)` sees each test input's result (an empty list for a skipped task). Past `deadline` (time.time()
    seconds) no decode step, scoring block or task starts: a task reached (started, or in a prefetched block) keeps
    the candidates found until then; tasks not started, and tasks that run out of memory twice, are left out of the
    results: the submission gives them fallback attempts.
    """
    shared = runners if isinstance(runners, TaskRunner) else None
    runner_for_task = runners if shared is None else (lambda base: (shared, None))
    prefetch, block = (shared if engine.prefetch_tasks > 0 else None), max(1, engine.prefetch_tasks)
    results, skipped, prefetched = {}, [], set()
    grouped = dataset.grouped_keys()
    bases = list(grouped)
    tokens = {}
    if bases:
        prompts = shared.prompts if shared is not None else _first_runner_prompts(runner_for_task, bases[0])
        tokens = _prompt_tokens(dataset, prompts, grouped, search)
    bar = _GenerationBar(tokens)
    for n, base in enumerate(bases):
        start, n_tests = time.time(), len(grouped[base])
        if prefetch is not None and n % block == 0 and (deadline is None or start < deadline):
            prefetch.progress, prefetch.deadline = bar.counter(bases[n:n + block]), deadline
            _prefetch(dataset, prefetch, grouped, bases[n:n + block], search)
            prefetched.update(bases[n:n + block])  # their candidates are in hand, finished or cut: kept
            start = time.time()
        cands = None
        if deadline is None or start < deadline or base in prefetched:
            runner, done = runner_for_task(base)
            runner.progress, runner.deadline = bar.counter([base]), deadline
            cands = _infer_task_guarded(dataset, runner, base, n_tests, search)
            runner.progress = None
            if done is not None:
                done()
        bar.finish(base)
        if cands is None:
            skipped.append(base)
        else:
            results[base] = cands
        for i in range(n_tests):
            if callback is not None:
                callback(cands[i] if cands else [], name=f"{base}_{i}", value=1 / n_tests, seconds=time.time() - start)
    bar.close()
    if skipped:
        print(f"{len(skipped)} of {len(grouped)} tasks skipped (time budget, memory or unfinished): fallback attempts")
    return results
