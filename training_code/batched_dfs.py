"""Batched, exact DFS: the candidates of `inference_tools.dfs` for many prompts (views of many tasks) at once.

Algorithm ("greedy paths + branch rounds"). An open node is (prompt, reply prefix, prefix NLL). Each round
extends every open node greedily, many rows per batched decode on a KV cache, until eos, the token budget,
or until the path's NLL reaches the bound -log(min_prob). At every position a decoded path passes, each
other token whose NLL keeps the total under the bound is a branch: eos completes a candidate at once, any
other token becomes an open node of the next round. The subtrees hang off distinct (position, token) pairs,
so every reply above min_prob is found exactly once, as by the batch-1 DFS, in a few rounds (a round per
branch taken off the greedy path) instead of one batch-1 forward per explored token.

Prompts are prefilled once per group (sorted by length; at most `batch_size` rows and `max_batch_tokens` cached
tokens) and their KV cache is reused by every round: the first round writes its replies behind the prompts in
the group's own buffer, later batches of nodes copy their prompts' rows out of it and feed only the reply
prefix. KV buffers are preallocated and grow in steps (no copy of the whole cache per decoded token), and rows
whose path ended are dropped from the decode batch once they are half of it. With `decode_graphs`, a decode step
attends to its whole buffers instead, at shapes that stay fixed from one position to the next, so that on CUDA it
is captured once as a CUDA graph and replayed (_FixedStep).
Rows carry masked padding in the middle (prompt | pad | prefix | pad | decoded tokens); position ids
are computed from each row's real tokens only (1-D, or (grid, row, column): grid_positions.Positions carries
each row's state from piece to piece), so padding never moves a position.

The same machinery gives `batched_greedy` (one path per prompt, no branches; a guess is followed while it is
the argmax) and `batched_scores` (the NLL of
given replies: each distinct prompt prefilled once per group, its replies fed on copies of its rows).
"""
import collections
import contextlib
import math
import time

import torch
from torch.profiler import record_function
from transformers.cache_utils import Cache, DynamicLayer

import grid_positions
from decoding import (accepts_logits_to_keep, as_ids, check_pairs, clean_guess, device_of, eval_mode, neg_log_softmax,
                      right_pad)

PAD_ID = 0  # any id: padded columns are masked out and get no position
SPARE = 64  # free KV columns behind a batch's longest fed prefix (buffers grow when the decode needs more)

# An open node: prompt row in its group, tokens to feed after the prompt, how many of them are a known prefix
# (the rest is a guess to follow), and the NLL of the known prefix.
_Node = collections.namedtuple("_Node", "row fed known nll")


_part_times = None  # inside timed_parts(): {label: [calls, seconds]}


@contextlib.contextmanager
def timed_parts():
    """Inside the block, the search's labelled parts (prefill, feeding fed prefixes, per decode step the live-row
    bookkeeping, the forward and the walk, reading the results back) are timed by the wall clock, the GPU synchronized
    before and after each: yields {label: [calls, seconds]}. The syncs take away the overlap of the CPU with the GPU,
    so the parts add up to more than an untimed search; what they tell is which part a step waits for."""
    global _part_times
    _part_times = {}
    try:
        yield _part_times
    finally:
        _part_times = None


@contextlib.contextmanager
def _part(label):
    """A labelled part of the search: a range for torch.profiler (run_benchmark_inference.py --profile) and, inside
    timed_parts(), its synchronized wall time."""
    with record_function(label):
        if _part_times is None:
            yield
            return
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            times = _part_times.setdefault(label, [0, 0.0])
            times[0] += 1
            times[1] += time.perf_counter() - start


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# Prompt groups: one prefill, a KV cache reused by every round


class _GrowingLayer(DynamicLayer):
    """A full-attention KV cache layer over a preallocated (rows, heads, capacity, dim) buffer.

    Tokens are written in place behind the first `length` columns; when the buffer is full it grows by at
    least GROW columns (DynamicLayer instead copies the whole cache for every token decoded).
    """

    GROW = 256

    def __init__(self, keys, values, length):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._use(keys, values, length)

    def _use(self, keys, values, length):
        self._k, self._v, self._n = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        n, add = self._n, key_states.shape[-2]
        k, v = self._k, self._v
        if n + add > k.shape[-2]:
            more = max(add, self.GROW)
            k = torch.cat([k[:, :, :n], k.new_empty(*k.shape[:2], more, k.shape[-1])], dim=2)
            v = torch.cat([v[:, :, :n], v.new_empty(*v.shape[:2], more, v.shape[-1])], dim=2)
        k[:, :, n:n + add], v[:, :, n:n + add] = key_states, value_states
        self._use(k, v, n + add)
        return self.keys, self.values

    def batch_select_indices(self, indices):
        self._use(self._k[indices], self._v[indices], self._n)

    def crop(self, tokens_to_remove):
        raise NotImplementedError("batched_dfs: its KV cache layers are never cropped")


def _growing_cache(layers):
    from transformers import DynamicCache
    cache = DynamicCache()
    cache.layers = layers
    return cache


class _Group:
    """A batch of prompts prefilled together: their KV buffers, mask, end positions and next-token NLLs.

    The prefill runs in slices of at most `prefill_tokens` tokens; each layer's keys and values go into one
    buffer with `extra` free columns behind the prompts, where the first round's replies are written. When
    `past()` turns true between two slices, the prefill stops and `cut` is set.
    """

    def __init__(self, model, prompts, positions, extra, prefill_tokens, past=lambda: False):
        device = device_of(model)
        ids, self.mask = right_pad(prompts, device, PAD_ID)
        pos, self.state = positions.block(ids, lengths=self.mask.sum(1))
        self.width = width = ids.shape[1]
        keep = width - min(len(p) for p in prompts) + 1  # from the shortest prompt's last token on
        kwargs = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
        last = torch.tensor([len(p) - 1 - (width - keep) for p in prompts], device=device)
        step = max(1, prefill_tokens // width)
        self.buffers, nlls, self.cut = None, [], False
        for lo in range(0, len(prompts), step):
            if past():  # the deadline passed between two prefill slices: the group is abandoned
                self.cut = True
                return
            rows = slice(lo, lo + step)
            out = model(input_ids=ids[rows], position_ids=pos[..., rows, :], attention_mask=self.mask[rows],
                        use_cache=True, **kwargs)
            if self.buffers is None:
                self.buffers = [self._empty(layer.keys, len(prompts), width + extra) for layer in out.past_key_values.layers]
            for layer, (k, v) in zip(out.past_key_values.layers, self.buffers):
                assert type(layer).__name__ == "DynamicLayer", \
                    f"batched_dfs: needs full-attention KV cache layers, got {type(layer).__name__}"
                k[rows, :, :width], v[rows, :, :width] = layer.keys, layer.values
            logits = out.logits[:, -keep:]
            nlls.append(neg_log_softmax(logits[torch.arange(logits.shape[0], device=device), last[rows]]))
            del out
        self.last_nll = torch.cat(nlls)
        self.device, self.forwards = device, -(-len(prompts) // step)

    @staticmethod
    def _empty(like, rows, capacity):
        shape = (rows, like.shape[1], capacity, like.shape[3])
        return like.new_empty(shape), like.new_empty(shape)

    def cache(self, rows, extra):
        """A KV cache of the prompt rows `rows` (None: all rows in order, in the group's own buffers)."""
        if rows is None:  # replies go behind the prompts; the prompts' columns are never written
            return _growing_cache([_GrowingLayer(k, v, self.width) for k, v in self.buffers])
        layers = []
        for k, v in self.buffers:
            nk, nv = self._empty(k, len(rows), self.width + extra)
            nk[:, :, :self.width], nv[:, :, :self.width] = k[:, :, :self.width][rows], v[:, :, :self.width][rows]
            layers.append(_GrowingLayer(nk, nv, self.width))
        return _growing_cache(layers)


# --------------------------------------------------------------------------------------------------
# A decode step: the batch's next-token NLLs and argmax tokens, on the growing cache or on fixed shapes


def _step_forward(model, token, pos, mask, cache):
    """One decode forward: (NLLs (rows, V), argmax tokens) of the next token after `token` (rows, 1)."""
    logits = model(input_ids=token, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    nll = neg_log_softmax(logits[:, -1])
    return nll, nll.argmin(-1)


class _GrowingStep:
    """A decode step on the growing cache (the default): the mask grows by a column a step, `select` keeps the rows
    `keep` of the cache and the mask. _FixedStep has the same interface."""

    def __init__(self, model, cache, mask):
        self.model, self.cache, self.mask = model, cache, mask

    def select(self, keep):
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]

    def __call__(self, token, pos):
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=1)
        return _step_forward(self.model, token[:, None], pos, self.mask, self.cache)



class _FixedLayer(DynamicLayer):
    """A full-attention KV cache layer attended to whole: its (rows, heads, capacity, dim) buffer, columns not yet
    written zeros (masked out, and finite), the next column to write a device tensor. The step's shapes and
    addresses then stay the same from one position to the next (transformers treats it as a static layer: the
    mask spans the buffer, its causal offset is the tensor)."""

    is_compileable = True

    def __init__(self, keys, values, length):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        keys[:, :, length:].zero_()
        values[:, :, length:].zero_()
        self.keys, self.values = keys, values
        self.written = torch.tensor(length, device=keys.device)

    def update(self, key_states, value_states, *args, **kwargs):
        at = self.written + torch.arange(key_states.shape[-2], device=self.device)
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        self.written.add_(key_states.shape[-2])
        return self.keys, self.values

    def get_seq_length(self):
        return self.written

    def get_mask_sizes(self, query_length):
        return self.keys.shape[-2], 0

    def get_max_length(self):
        return self.keys.shape[-2]

    def batch_select_indices(self, indices):
        self.keys, self.values = self.keys[indices], self.values[indices]

    def grow(self, more):
        self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], more, self.keys.shape[-1])], dim=2)
        self.values = torch.cat([self.values, self.values.new_zeros(*self.values.shape[:2], more,
                                                                    self.values.shape[-1])], dim=2)

    def rewind(self, length):
        self.written.fill_(length)

    def crop(self, tokens_to_remove):
        raise NotImplementedError("batched_dfs: its KV cache layers are never cropped")


_capture_failed = None  # the error of a failed CUDA graph capture: on a GPU where one failed, none is tried again


def _has_cuda_graphs(device):
    return device.type == "cuda"


class _FixedStep:
    """The decode forward (model, NLLs, argmax token) on fixed shapes, over the buffers of a growing cache whose
    prompts and fed prefixes are written: the mask spans the buffers and is written in place, one column a step.
    On CUDA the step is captured as a CUDA graph at its first call and replayed (the token and positions copied into
    its inputs), captured again when its shapes change: rows cut (`select`) or buffers grown by GROW columns (a
    few times a search). A capture that fails is recorded in `counter["graph_error"]`, the steps run eagerly and no
    capture is tried again in the process (on the H100 a failed capture also left CUDA's random number generator
    unusable: the process's next `torch.randn` failed)."""

    def __init__(self, model, cache, mask, counter):
        self.model, self.counter = model, counter
        self.n = cache.layers[0]._n  # columns written: prompts, padding and fed prefixes
        self.layers = [_FixedLayer(layer._k, layer._v, self.n) for layer in cache.layers]
        self.cache = Cache(layers=self.layers)
        self.mask = mask.new_zeros(len(mask), self.layers[0].keys.shape[-2])
        self.mask[:, :self.n] = mask
        on_gpu = _has_cuda_graphs(self.mask.device)
        self.capture = on_gpu and _capture_failed is None
        if on_gpu and _capture_failed is not None:
            counter["graph_error"] = _capture_failed  # an earlier search's
        self.graph = None

    def select(self, keep):
        for layer in self.layers:
            layer.batch_select_indices(keep)
        self.mask, self.graph = self.mask[keep], None

    def _forward(self, token, pos):
        return _step_forward(self.model, token, pos, self.mask, self.cache)

    def __call__(self, token, pos):
        """The step's NLLs (rows, V) and argmax tokens (on CUDA: the graph's outputs, until its next replay)."""
        if self.n == self.layers[0].keys.shape[-2]:
            for layer in self.layers:
                layer.grow(_GrowingLayer.GROW)
            self.mask = torch.cat([self.mask, self.mask.new_zeros(len(self.mask), _GrowingLayer.GROW)], dim=1)
            self.graph = None
        self.mask[:, self.n] = 1
        if self.capture and self.graph is None:
            self._capture(token, pos)
        if self.graph is None:
            out = self._forward(token[:, None], pos)
        else:
            self.inputs[0].copy_(token[:, None])
            self.inputs[1].copy_(pos)
            self.graph.replay()
            out = self.outputs
        self.n += 1
        return out

    def _capture(self, token, pos):
        """Warm up on a side stream (as CUDA graph capture asks; it writes this step's column, which the replay
        writes again), rewind the column counters, capture."""
        self.inputs = token[:, None].clone(), pos.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            for layer in self.layers:
                layer.rewind(self.n)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # a pool of its own: a pool shared with a freed graph failed to capture
                self.outputs = self._forward(*self.inputs)
            for layer in self.layers:  # a capture records the step and runs nothing: the counters stay (a test's fake
                layer.rewind(self.n)   # capture on CPU runs it)
            self.graph = graph
            self.counter["graph_captures"] = self.counter.get("graph_captures", 0) + 1
        except RuntimeError as e:  # the steps go on eagerly, with no capture again in this process; stats say why
            global _capture_failed
            _capture_failed = self.counter["graph_error"] = str(e)[:300]
            self.capture = False
            for layer in self.layers:
                layer.rewind(self.n)


# --------------------------------------------------------------------------------------------------
# Walking R paths at once


class _Walk:
    """Device-side state of R paths (NLL, reply depth, alive) and every branch they pass.

    `step` handles one position per selected row: the tokens allowed there are those keeping the NLL under the
    bound (non-eos ones only while a later eos still fits in max_new_tokens); the path's token continues the
    path if allowed and not eos; every other allowed token is recorded as a branch. With `branch` off (a plain
    greedy decode) only the path's own eos is recorded, and a fed token that is not the argmax ends the path:
    the argmax token there is recorded instead (an open node, so the next round decodes on from it).
    """

    def __init__(self, nodes, search, device):
        self.search, self.device = search, device
        self.nll = torch.tensor([n.nll for n in nodes], dtype=torch.float64, device=device)
        self.depth = torch.tensor([n.known for n in nodes], dtype=torch.long, device=device)
        self.alive = torch.ones(len(nodes), dtype=torch.bool, device=device)
        self.paths, self.taken = [], []  # per step: each row's path token, whether the path went on with it
        self.where, self.values = [], []  # per step: (row, depth, token) and NLL of every branch

    def step(self, nll, path, sel):
        """Process one position for rows in `sel` with next-token NLLs (R, V) and path tokens (R,)."""
        eos, sel = self.search.eos, sel & self.alive
        total = self.nll[:, None] + nll.double()
        ok = (total < self.search.bound) & sel[:, None]
        no_room = self.depth >= self.search.max_new_tokens - 1  # a non-eos token here could never end in eos
        ok[:, torch.arange(ok.shape[1], device=self.device) != eos] &= ~no_room[:, None]
        on_path = torch.nn.functional.one_hot(path, ok.shape[1]).bool()
        cont = ok.gather(1, path[:, None])[:, 0] & (path != eos)
        hits = ok & ~(on_path & cont[:, None])
        if not self.search.branch:  # greedy: a fed guess is followed only while it is the argmax token
            best = nll.argmin(-1)
            off = path != best  # the guess leaves the greedy path here: its argmax token is the node to go on from
            cont &= ~off
            hits = ok & torch.where(off[:, None], torch.nn.functional.one_hot(best, ok.shape[1]).bool(),
                                    on_path & ~cont[:, None])
        self._record(hits, total)
        self.paths.append(path)
        self.taken.append(cont)
        self.nll = torch.where(cont, total.gather(1, path[:, None])[:, 0], self.nll)
        self.depth += cont.long()
        self.alive = torch.where(sel, cont, self.alive)

    def _record(self, hits, total):
        rows, tokens = hits.nonzero(as_tuple=True)
        if len(rows):
            self.where.append(torch.stack([rows, self.depth[rows], tokens]).T)
            self.values.append(total[rows, tokens])

    def results(self, nodes, rows=None):
        """Every recorded branch as (node index, reply ids up to and including the branch token, NLL); only those
        of the rows in the set `rows` when given."""
        if not self.where:
            return []
        where, values = torch.cat(self.where).cpu().tolist(), torch.cat(self.values).cpu().tolist()
        paths = torch.stack(self.paths).cpu().numpy()
        taken = torch.stack(self.taken).cpu().numpy()
        reply, out = {}, []
        for (row, depth, token), value in zip(where, values):
            if rows is not None and row not in rows:
                continue
            if row not in reply:
                reply[row] = nodes[row].fed[:nodes[row].known] + paths[:, row][taken[:, row]].tolist()
            out.append((row, reply[row][:depth] + [token], value))
        return out


class _Search:
    """Settings of one search: eos id, token budget, NLL bound, whether to branch (False: greedy) and whether the
    decode steps run on fixed shapes (CUDA graphs)."""

    def __init__(self, eos, max_new_tokens, bound, branch, fixed=False):
        self.eos, self.max_new_tokens, self.bound, self.branch, self.fixed = eos, max_new_tokens, bound, branch, fixed


# --------------------------------------------------------------------------------------------------
# One batch of nodes: feed their prefixes, follow the fed tokens, then decode greedily


def _feed_prefixes(model, group, rows, fed, positions, cache):
    """Run the nodes' fed tokens on their prompts' cache; returns (NLL (R, L + 1, V), mask, state).

    Entry k of the NLLs is the distribution of reply token k given the prompt and fed[:k].
    """
    mask, state = group.mask[rows], group.state[..., rows]
    nll = group.last_nll[rows][:, None]
    if max(len(f) for f in fed) == 0:
        return nll, mask, state
    ids, fed_mask = right_pad(fed, group.device, PAD_ID)
    pos, state = positions.block(ids, state, lengths=fed_mask.sum(1))
    mask = torch.cat([mask, fed_mask], dim=1)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache,
                   use_cache=True).logits
    return torch.cat([nll, neg_log_softmax(logits)], dim=1), mask, state


def _follow_fed(walk, nodes, nll, device):
    """Walk each row from its known prefix along its fed tokens (a guess), then one greedy token at the end.

    Returns the greedy tokens, which the decode feeds next.
    """
    known = torch.tensor([n.known for n in nodes], device=device)
    lens = torch.tensor([len(n.fed) for n in nodes], device=device)
    fed = torch.full((len(nodes), nll.shape[1]), -1, dtype=torch.long, device=device)
    for row, node in enumerate(nodes):
        fed[row, :len(node.fed)] = torch.tensor(node.fed, dtype=torch.long)
    arange, nxt = torch.arange(len(nodes), device=device), torch.zeros(len(nodes), dtype=torch.long, device=device)
    for s in range(int((lens - known).max()) + 1):
        k = (known + s).clamp(max=lens)
        step_nll, forced = nll[arange, k], fed[arange, k]
        path = torch.where(forced >= 0, forced, step_nll.argmin(-1))
        walk.step(step_nll, path, known + s <= lens)
        nxt = torch.where(known + s == lens, path, nxt)
    return nxt


ENDED_REPORTS = 16  # a decode hands on its ended rows about this many times (each a copy of its paths to the host)


def _decode(model, walk, cache, mask, state, token, positions, counter, on_ended=None, fixed=False):
    """Greedy decode of every live path, one token per forward, until all ended (or the deadline passed: every
    path ends where it is, and the search is marked cut).

    Rows whose path ended are dropped from the batch (cache, mask, positions) once they are half of it;
    `live` maps the batch rows to the walk's rows. `on_ended(rows)` hears of the walk rows that ended, each once,
    a few at a time while others decode on (rows still alive at the end, or at a cut, are not handed on).
    `fixed`: each forward on fixed shapes (_FixedStep: on CUDA a replayed CUDA graph).
    """
    live = torch.arange(len(token), device=token.device)
    n_rows = len(walk.alive)
    told, n_told, every = torch.zeros_like(walk.alive), 0, max(1, n_rows // ENDED_REPORTS)
    step = _FixedStep(model, cache, mask, counter) if fixed else _GrowingStep(model, cache, mask)
    while True:
        if _past(counter):
            walk.alive[:] = False
        with _part("decode.rows"):  # the labels name the parts of a step (benchmark --profile, --time-parts)
            alive = walk.alive[live]
            n_alive = int(alive.sum())
            if n_alive == 0:
                return
            if on_ended is not None and n_rows - n_alive - n_told >= every:
                ended = (~walk.alive & ~told).nonzero()[:, 0]
                told[ended] = True
                n_told += len(ended)
                on_ended(ended.tolist())
            if n_alive <= len(live) // 2:
                keep = alive.nonzero()[:, 0]
                step.select(keep)
                live, token, state = live[keep], token[keep], state[..., keep]
            pos, state = positions.block(token[:, None], state)
        with _part("decode.forward"):
            step_nll, token = step(token, pos)
        with _part("decode.walk"):
            full_nll = step_nll.new_zeros(n_rows, step_nll.shape[1]).index_copy_(0, live, step_nll)
            full_token = token.new_zeros(n_rows).index_copy_(0, live, token)
            sel = torch.zeros(n_rows, dtype=torch.bool, device=token.device).index_fill_(0, live, True)
            walk.step(full_nll, full_token, sel)
        counter["forwards"] += 1
        counter["decode_steps"] += 1


def _run_nodes(model, group, nodes, search, positions, counter, whole_group, on_ended=None):
    """Every branch met while extending `nodes` (all of one group), as _Walk.results.

    `whole_group`: the nodes are the group's rows in order, so the group's own buffers take the replies.
    `on_ended(indices, results)` hears of nodes whose path ended while others decode on, with their branches.
    """
    rows = torch.tensor([n.row for n in nodes], device=group.device)
    extra = max(len(n.fed) for n in nodes) + SPARE
    cache = group.cache(None if whole_group else rows, extra)
    with _part("search.feed"):
        nll, mask, state = _feed_prefixes(model, group, rows, [n.fed for n in nodes], positions, cache)
        counter["forwards"] += int(nll.shape[1] > 1)
        walk = _Walk(nodes, search, group.device)
        token = _follow_fed(walk, nodes, nll, group.device)
    tell = None if on_ended is None else (lambda rows: on_ended(rows, walk.results(nodes, set(rows))))
    _decode(model, walk, cache, mask, state, token, positions, counter, tell, search.fixed)
    del cache
    with _part("search.results"):
        return walk.results(nodes)


# --------------------------------------------------------------------------------------------------
# Rounds over groups of prompts


def _node_chunks(nodes, group, batch_size, max_batch_tokens):
    """Batches of nodes (sorted by fed length: less padding), each within the row and cached-token budgets."""
    nodes = sorted(nodes, key=lambda n: (len(n.fed), n.row))
    chunks, chunk = [], []
    for node in nodes:
        width = group.width + len(node.fed)  # the longest fed prefix so far: nodes are sorted by it
        if chunk and (len(chunk) >= batch_size or (len(chunk) + 1) * width > max_batch_tokens):
            chunks.append(chunk)
            chunk = []
        chunk.append(node)
    return chunks + [chunk] if chunk else chunks


class _Finished:
    """Tells of a group's prompts as they finish, while the search goes on: a prompt is done once every node of it
    in the current round has ended without opening a node for a later round. `tell(rows, results)` hears of each
    done prompt once, with its candidates sorted by (NLL, ids), exactly what the search returns for it."""

    def __init__(self, found, eos, tell):
        self.found, self.eos, self.tell, self.told = found, eos, tell, set()

    def start_round(self, nodes):
        self.left = collections.Counter(n.row for n in nodes)  # nodes of each prompt not ended yet this round
        self.busy = set()  # prompts that opened a node this round

    def start_chunk(self, chunk):
        self.chunk, self.closed, self.early = chunk, set(), collections.defaultdict(list)

    def ended(self, idx, results):
        """Nodes `idx` of the chunk ended while others decode on; `results` their branches (_Walk.results)."""
        for i, ids, value in results:
            if ids[-1] == self.eos:
                self.early[self.chunk[i].row].append((ids, value))  # not in `found` before the chunk's end
            else:
                self.busy.add(self.chunk[i].row)
        self._close(idx)

    def end_chunk(self, opened_rows):
        """The chunk's results are in `found` (its early eos replies too), its opened nodes' prompts given."""
        self.busy.update(opened_rows)
        self.early.clear()
        self._close([i for i in range(len(self.chunk)) if i not in self.closed])

    def _close(self, idx):
        rows = set()
        for i in idx:
            self.closed.add(i)
            self.left[self.chunk[i].row] -= 1
            rows.add(self.chunk[i].row)
        done = sorted(r for r in rows if self.left[r] == 0 and r not in self.busy and r not in self.told)
        if done:
            self.told.update(done)
            self.tell(done, [sorted(self.found[r] + self.early[r], key=lambda c: (c[1], c[0])) for r in done])


def _search_group(model, group, starts, search, limits, positions, counter, tell=None):
    """All candidates of one group's prompts: {row: [(ids, NLL)]}; `starts` holds each row's fed guess. Past the
    deadline, the candidates found so far (each a complete reply with its exact NLL). `tell(rows, results)` hears
    of each prompt as soon as its search is done (_Finished), never of one the deadline cut."""
    found = {row: [] for row in range(len(starts))}
    finished = _Finished(found, search.eos, tell or (lambda rows, results: None))
    nodes = [_Node(row, guess, 0, 0.0) for row, guess in enumerate(starts)]
    while nodes and not _past(counter):
        counter["rounds"] += 1
        opened = []
        finished.start_round(nodes)
        for chunk in _node_chunks(nodes, group, *limits):
            if _past(counter):
                break
            whole = len(chunk) == len(starts) and all(n.row == i for i, n in enumerate(chunk))
            finished.start_chunk(chunk)
            n_opened = len(opened)
            for i, ids, value in _run_nodes(model, group, chunk, search, positions, counter, whole, finished.ended):
                if ids[-1] == search.eos:
                    found[chunk[i].row].append((ids, value))
                else:
                    opened.append(_Node(chunk[i].row, ids, len(ids), value))
            if not counter["cut"]:  # a cut chunk's nodes did not end
                finished.end_chunk({n.row for n in opened[n_opened:]})
        nodes = opened
    return found


def _groups(prompts, batch_size, max_batch_tokens):
    """Prompt indices sorted by length, cut into groups of at most batch_size rows and max_batch_tokens tokens."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups, group = [], []
    for i in order:
        if group and (len(group) >= batch_size or (len(group) + 1) * len(prompts[i]) > max_batch_tokens):
            groups.append(group)
            group = []
        group.append(i)
    return groups + [group] if group else groups


def _past(counter):
    """True once the search's deadline has passed (and from then on: the search is cut)."""
    if not counter["cut"] and counter["deadline"] is not None and time.time() > counter["deadline"]:
        counter["cut"] = True
    return counter["cut"]


def _search_all(model, prompts, guesses, search, limits, stats, callback, deadline):
    counter = {"groups": 0, "rounds": 0, "forwards": 0, "decode_steps": 0, "deadline": deadline, "cut": False}
    positions = grid_positions.Positions(model)
    batch_size, max_batch_tokens, prefill_tokens = limits
    found, unfinished = [[] for _ in prompts], []
    with eval_mode(model), torch.inference_mode():
        for idx in _groups(prompts, batch_size, max_batch_tokens):
            if _past(counter):
                unfinished += idx
                continue
            starts = [guesses[i] for i in idx]
            extra = max(len(g) for g in starts) + SPARE
            with _part("search.prefill"):
                group = _Group(model, [prompts[i] for i in idx], positions, extra, prefill_tokens,
                               past=lambda: _past(counter))
            if group.cut:
                unfinished += idx
                continue
            counter["groups"] += 1
            counter["forwards"] += group.forwards
            told = set()

            def tell(rows, results, idx=idx, told=told):
                told.update(rows)
                if callback is not None:
                    callback([idx[r] for r in rows], results)
            for row, cands in _search_group(model, group, starts, search, (batch_size, max_batch_tokens),
                                            positions, counter, tell).items():
                found[idx[row]] = sorted(cands, key=lambda c: (c[1], c[0]))
            del group  # free this group's KV cache before the next prefill allocates its own
            # a prompt the deadline cut: its candidates so far are returned, but it is not done (not for a cache)
            unfinished += [i for row, i in enumerate(idx) if row not in told]
    if stats is not None:
        stats.update({k: v for k, v in counter.items() if k not in ("deadline", "cut")}, unfinished=sorted(unfinished))
    return found


def _reply_nlls(nll, replies):
    """Summed NLL of each reply from per-position NLLs (R, L + 1, V) of its fed tokens (float64 sums)."""
    ids, mask = right_pad(replies, nll.device, PAD_ID)
    picked = nll[:, :ids.shape[1]].gather(2, ids[..., None])[..., 0].double()
    return (picked * mask).sum(1).tolist()


def batched_scores(model, prompts, replies, batch_size=64, max_batch_tokens=2 ** 40, prefill_tokens=2 ** 40):
    """NLL of each reply given its prompt, as inference_tools.score_replies, with the prompts prefilled in groups.

    Each distinct prompt is run once (the product of experts scores every candidate under the same views);
    its KV cache then serves all its replies, many prompts' replies per forward. Limits as in batched_dfs.
    """
    pairs = check_pairs(prompts, replies)
    limits = _check_args(1.0, 1, batch_size, max_batch_tokens, prefill_tokens)
    index = {}
    for p, _ in pairs:
        index.setdefault(tuple(p), len(index))
    distinct = [list(p) for p in index]
    by_prompt = [[] for _ in distinct]
    for j, (p, _) in enumerate(pairs):
        by_prompt[index[tuple(p)]].append(j)
    positions, out = grid_positions.Positions(model), [None] * len(pairs)
    with eval_mode(model), torch.inference_mode():
        for idx in _groups(distinct, batch_size, max_batch_tokens):
            nodes = [_Node(row, pairs[j][1], 0, 0.0) for row, i in enumerate(idx) for j in by_prompt[i]]
            pair_of = {id(node): j for node, j in zip(nodes, (j for i in idx for j in by_prompt[i]))}
            group = _Group(model, [distinct[i] for i in idx], positions, 0, prefill_tokens)
            for chunk in _node_chunks(nodes, group, *limits[:2]):
                rows = torch.tensor([n.row for n in chunk], device=group.device)
                cache = group.cache(rows, max(len(n.fed) for n in chunk))
                nll, _, _ = _feed_prefixes(model, group, rows, [n.fed for n in chunk], positions, cache)
                del cache
                for node, value in zip(chunk, _reply_nlls(nll[:, :-1], [n.fed for n in chunk])):
                    out[pair_of[id(node)]] = value
            del group
    return out


def kv_bytes_per_token(model):
    """Bytes of KV cache one token takes in `model` (all layers, keys and values, in the model's dtype)."""
    cfg = grid_positions.config_of(model).get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * getattr(model, "dtype", torch.float32).itemsize


def memory_limits(model, kv_cache_gb, batch_size, prefill_tokens):
    """batched_dfs limits from a KV-cache budget in GB: {batch_size, max_batch_tokens, prefill_tokens}."""
    tokens = max(1, int(kv_cache_gb * 2 ** 30 / kv_bytes_per_token(model)))
    return {"batch_size": batch_size, "max_batch_tokens": tokens, "prefill_tokens": prefill_tokens}


# Memory settings of the batched search. On a GPU: the setting measured best on an 80 GB H100 (the ladder's 20 GB
# KV cache, 262144-token prefills, 512 rows, 400 tasks searched at once), the KV cache cut to a quarter of the free
# memory on smaller cards (the peak is about 2.5 times the KV cache). On a CPU: small groups, a 1 GB KV cache (the
# CPU main job, 10 tasks on 2 cores: peak 3.0 GB in 9.5 min; 4 GB of KV cache peaked at 10.1 GB in 10.0 min with the
# same submission; results/arcmini-v3_cpu_first10_greedy8_kv*.json).
GPU_MEMORY = {"kv_cache_gb": 20.0, "prefill_tokens": 262144, "batch_size": 512, "prefetch_tasks": 400}
CPU_MEMORY = {"kv_cache_gb": 1.0, "prefill_tokens": 32768, "batch_size": 256, "prefetch_tasks": 100}


def default_memory(free_bytes=None):
    """The memory settings for a card with `free_bytes` free (None: no GPU)."""
    if free_bytes is None:
        return dict(CPU_MEMORY)
    return dict(GPU_MEMORY, kv_cache_gb=min(GPU_MEMORY["kv_cache_gb"], round(free_bytes / 2 ** 30 / 4, 1)))


def _check_prompts(prompts):
    assert isinstance(prompts, (list, tuple)), \
        f"batched_dfs: prompts must be a list of token-id lists, got {type(prompts).__name__}"
    prompts = [as_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    empty = [i for i, p in enumerate(prompts) if not p]
    assert not empty, f"batched_dfs: empty prompts at {empty[:5]} (each should at least hold the bos token)"
    return prompts


def _check_args(min_prob, max_new_tokens, batch_size, max_batch_tokens, prefill_tokens):
    assert 0.0 < min_prob <= 1.0, f"batched_dfs: min_prob must be in (0, 1], got {min_prob}"
    assert max_new_tokens >= 1, f"batched_dfs: max_new_tokens must be >= 1, got {max_new_tokens}"
    assert batch_size >= 1, f"batched_dfs: batch_size must be >= 1, got {batch_size}"
    assert max_batch_tokens >= 1 and prefill_tokens >= 1, \
        f"batched_dfs: max_batch_tokens and prefill_tokens must be >= 1, got {max_batch_tokens}, {prefill_tokens}"
    return batch_size, max_batch_tokens, prefill_tokens


def _check_guesses(guesses, prompts, eos_token_id, max_new_tokens):
    if guesses is None:
        guesses = [None] * len(prompts)
    assert len(guesses) == len(prompts), f"batched_dfs: {len(prompts)} prompts but {len(guesses)} guesses"
    return [clean_guess(g, eos_token_id, max_new_tokens) for g in guesses]


def batched_dfs(model, prompts, eos_token_id, max_new_tokens, min_prob, guesses=None, batch_size=64,
                max_batch_tokens=2 ** 40, prefill_tokens=2 ** 40, stats=None, callback=None, deadline=None,
                decode_graphs=False):
    """For each prompt, exactly `inference_tools.dfs`'s result: [(reply ids incl. eos, NLL)] sorted by (NLL, ids).

    `guesses` (optional, one reply or None per prompt) only sets the first path followed, verified by one
    prefill; results do not depend on it. Memory: `batch_size` bounds the rows per forward pass (prompts per
    group, nodes per decode), `max_batch_tokens` the rows x cached tokens of a group or a batch of nodes, and
    `prefill_tokens` the rows x tokens of one prefill forward. A dict passed as `stats` receives counts of
    groups, rounds, forwards and decode steps, and `unfinished`: the prompts whose search the `deadline` (a
    time.time() value) cut or never started; their results hold the candidates found until then (each exact),
    and `callback(indices, results)`, which sees the results of prompts as soon as they are done, a few at a time
    while the others are searched on (to save them: a killed run keeps them), never sees them. The deadline is
    checked before every prefill slice and every decode step. `decode_graphs`: each decode step on fixed shapes,
    on CUDA captured as a CUDA graph and replayed (_FixedStep; the same results up to float rounding; `stats` then
    counts `graph_captures`, and holds `graph_error` if a capture failed and the steps ran eagerly).
    """
    prompts = _check_prompts(prompts)
    limits = _check_args(min_prob, max_new_tokens, batch_size, max_batch_tokens, prefill_tokens)
    guesses = _check_guesses(guesses, prompts, eos_token_id, max_new_tokens)
    search = _Search(eos_token_id, max_new_tokens, -math.log(min_prob), branch=True, fixed=decode_graphs)
    return _search_all(model, prompts, guesses, search, limits, stats, callback, deadline)


def batched_greedy(model, prompts, eos_token_id, max_new_tokens, guesses=None, batch_size=64,
                   max_batch_tokens=2 ** 40, prefill_tokens=2 ** 40, stats=None, callback=None, deadline=None,
                   decode_graphs=False):
    """Greedy (argmax) reply of each prompt as [(ids incl. eos, NLL)], or [] where no eos came in max_new_tokens.

    `guesses` (optional, one reply or None per prompt) are verified in one forward: the reply follows a guess as
    long as its tokens are the argmax ones (a right guess costs no decode step), then decodes on from the first
    argmax token that differs, in the next round; the replies do not depend on the guesses. `stats`, `callback`
    `deadline` and `decode_graphs` as in batched_dfs (a cut greedy reply is no candidate: [])."""
    prompts = _check_prompts(prompts)
    limits = _check_args(1.0, max_new_tokens, batch_size, max_batch_tokens, prefill_tokens)
    guesses = _check_guesses(guesses, prompts, eos_token_id, max_new_tokens)
    search = _Search(eos_token_id, max_new_tokens, math.inf, branch=False, fixed=decode_graphs)
    return _search_all(model, prompts, guesses, search, limits, stats, callback, deadline)
