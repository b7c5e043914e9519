"""Batched, exact DFS: the candidates of `inference_tools.dfs` for many prompts (views of many tasks) at once.

Algorithm ("greedy paths + branch rounds"). An open node is (prompt, reply prefix, prefix NLL). Each round
extends every open node greedily, many rows per batched decode on a KV cache, until eos, the token budget,
or until the path's NLL reaches the bound -log(min_prob). At every position a decoded path passes, each
other token whose NLL keeps the total under the bound is a branch: eos completes a candidate at once, any
other token becomes an open node of the next round. The subtrees hang off distinct (position, token) pairs,
so every reply above min_prob is found exactly once, as by the batch-1 DFS, in a few rounds (a round per
branch taken off the greedy path) instead of one batch-1 forward per explored token.

Prompts are prefilled once per group of `batch_size` (sorted by length) and their KV cache is reused by every
round: each batch of nodes copies its prompts' rows out of the group cache and feeds only the reply prefix.
Rows carry masked padding in the middle (prompt | pad | prefix | pad | decoded tokens); position ids
are computed from each row's real tokens only (1-D, or (grid, row, column) via grid_positions), so padding
never moves a position.
"""
import collections
import math

import torch

import grid_positions
import inference_tools as it

PAD_ID = 0  # any id: padded columns are masked out and get no position

# An open node: prompt row in its group, tokens to feed after the prompt, how many of them are a known prefix
# (the rest is a guess to follow), and the NLL of the known prefix.
_Node = collections.namedtuple("_Node", "row fed known nll")


# --------------------------------------------------------------------------------------------------
# Positions of real tokens in padded rows


class _Positions:
    """Position ids continuing each row's real tokens; a row's state is its next 1-D position or grid (g, r, c)."""

    def __init__(self, model):
        self.grid = grid_positions.grid_position_settings(model)

    def block(self, seqs, state, device):
        """Positions of right-padded token lists (after `state`, None = sequence start) and the states after them."""
        width = max(len(s) for s in seqs)
        if self.grid is None:
            start = torch.zeros(len(seqs), dtype=torch.long, device=device) if state is None else state
            lens = torch.tensor([len(s) for s in seqs], device=device)
            return start[:, None] + torch.arange(width, device=device), start + lens
        return self._grid_block(seqs, state, width, device)

    def _grid_block(self, seqs, state, width, device):
        # Row by row on the unpadded tokens: trailing padding would move a row's end state.
        pos = torch.zeros(grid_positions.AXES, len(seqs), width, dtype=torch.long, device=device)
        after = torch.zeros(grid_positions.AXES, len(seqs), dtype=torch.long, device=device)
        for row, seq in enumerate(seqs):
            start = None if state is None else state[:, row]
            if not seq:
                after[:, row] = 0 if start is None else start
                continue
            ids = torch.tensor(seq, dtype=torch.long, device=device)
            p, s = grid_positions.arc_position_ids(ids, start_state=start, return_state=True, **self.grid)
            pos[:, row, :len(seq)], after[:, row] = p[:, 0], s[:, 0]
        return pos, after

    def step(self, tokens, state):
        """Positions of one new token per row, (R,) ids, and the states after them."""
        if self.grid is None:
            return state[:, None], state + 1
        return grid_positions.arc_position_ids(tokens[:, None], start_state=state, return_state=True, **self.grid)


# --------------------------------------------------------------------------------------------------
# Prompt groups: one prefill, a KV cache reused by every round


class _Group:
    """A batch of prompts prefilled together: their KV cache, mask, end positions and next-token NLLs."""

    def __init__(self, model, prompts, positions):
        device = it._device(model)
        ids, self.mask = it._right_pad(prompts, device, PAD_ID)
        pos, self.state = positions.block(prompts, None, device)
        keep = ids.shape[1] - min(len(p) for p in prompts) + 1  # from the shortest prompt's last token on
        kwargs = {"logits_to_keep": keep} if it._accepts_logits_to_keep(model) else {}
        out = model(input_ids=ids, position_ids=pos, attention_mask=self.mask, use_cache=True, **kwargs)
        logits = out.logits[:, -keep:]
        last = torch.tensor([len(p) - 1 - (ids.shape[1] - keep) for p in prompts], device=device)
        self.last_nll = it._neg_log_softmax(logits[torch.arange(len(prompts), device=device), last])
        self.cache, self.config = out.past_key_values, getattr(model, "config", None)
        self.device = device

    def row_cache(self, rows):
        """A fresh DynamicCache holding the prompt rows `rows` (the group cache stays untouched)."""
        from transformers import DynamicCache
        data = []
        for layer in self.cache.layers:
            assert type(layer).__name__ == "DynamicLayer", \
                f"batched_dfs: needs full-attention KV cache layers, got {type(layer).__name__}"
            data.append((layer.keys[rows], layer.values[rows]))
        return DynamicCache(ddp_cache_data=data, config=self.config)


# --------------------------------------------------------------------------------------------------
# Walking R paths at once


class _Walk:
    """Device-side state of R paths (NLL, reply depth, alive) and every branch they pass.

    `step` handles one position per selected row: the tokens allowed there are those keeping the NLL under the
    bound (non-eos ones only while a later eos still fits in max_new_tokens); the path's token continues the
    path if allowed and not eos; every other allowed token is recorded as a branch (with `branch` off only
    the path's own eos is recorded, which makes a plain greedy decode).
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
        if not self.search.branch:
            hits &= on_path
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

    def results(self, nodes):
        """Every recorded branch as (node index, reply ids up to and including the branch token, NLL)."""
        if not self.where:
            return []
        where, values = torch.cat(self.where).cpu().tolist(), torch.cat(self.values).cpu().tolist()
        paths = torch.stack(self.paths).cpu().numpy()
        taken = torch.stack(self.taken).cpu().numpy()
        reply, out = {}, []
        for (row, depth, token), value in zip(where, values):
            if row not in reply:
                reply[row] = nodes[row].fed[:nodes[row].known] + paths[:, row][taken[:, row]].tolist()
            out.append((row, reply[row][:depth] + [token], value))
        return out


class _Search:
    """Settings of one search: eos id, token budget, NLL bound and whether to branch (False: greedy)."""

    def __init__(self, eos, max_new_tokens, bound, branch):
        self.eos, self.max_new_tokens, self.bound, self.branch = eos, max_new_tokens, bound, branch


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
    ids, fed_mask = it._right_pad(fed, group.device, PAD_ID)
    pos, state = positions.block(fed, state, group.device)
    mask = torch.cat([mask, fed_mask], dim=1)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache,
                   use_cache=True).logits
    return torch.cat([nll, it._neg_log_softmax(logits)], dim=1), mask, state


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


def _run_nodes(model, group, nodes, search, positions, counter):
    """Every branch met while extending `nodes` (all of one group), as _Walk.results."""
    rows = torch.tensor([n.row for n in nodes], device=group.device)
    cache = group.row_cache(rows)
    nll, mask, state = _feed_prefixes(model, group, rows, [n.fed for n in nodes], positions, cache)
    counter["forwards"] += int(nll.shape[1] > 1)
    walk = _Walk(nodes, search, group.device)
    token = _follow_fed(walk, nodes, nll, group.device)
    ones = torch.ones(len(nodes), 1, dtype=mask.dtype, device=group.device)
    while bool(walk.alive.any()):
        pos, state = positions.step(token, state)
        mask = torch.cat([mask, ones], dim=1)
        logits = model(input_ids=token[:, None], position_ids=pos, attention_mask=mask, past_key_values=cache,
                       use_cache=True).logits
        step_nll = it._neg_log_softmax(logits[:, -1])
        token = step_nll.argmin(-1)
        walk.step(step_nll, token, walk.alive)
        counter["forwards"] += 1
        counter["decode_steps"] += 1
    return walk.results(nodes)


# --------------------------------------------------------------------------------------------------
# Rounds over groups of prompts


def _search_group(model, group, starts, search, batch_size, positions, counter):
    """All candidates of one group's prompts: {row: [(ids, NLL)]}; `starts` holds each row's fed guess."""
    found = {row: [] for row in range(len(starts))}
    nodes = [_Node(row, guess, 0, 0.0) for row, guess in enumerate(starts)]
    while nodes:
        counter["rounds"] += 1
        nodes.sort(key=lambda n: (len(n.fed), n.row))  # similar prefix lengths per batch: less padding
        opened = []
        for chunk in it._chunks(nodes, batch_size):
            for i, ids, value in _run_nodes(model, group, chunk, search, positions, counter):
                if ids[-1] == search.eos:
                    found[chunk[i].row].append((ids, value))
                else:
                    opened.append(_Node(chunk[i].row, ids, len(ids), value))
        nodes = opened
    return found


def _search_all(model, prompts, guesses, search, batch_size, stats):
    counter = {"groups": 0, "rounds": 0, "forwards": 0, "decode_steps": 0}
    positions = _Positions(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths per prefill
    found = [None] * len(prompts)
    with it._eval_mode(model), torch.inference_mode():
        for idx in it._chunks(order, batch_size):
            group = _Group(model, [prompts[i] for i in idx], positions)
            counter["groups"] += 1
            counter["forwards"] += 1
            for row, cands in _search_group(model, group, [guesses[i] for i in idx], search, batch_size,
                                            positions, counter).items():
                found[idx[row]] = sorted(cands, key=lambda c: (c[1], c[0]))
            del group  # free this group's KV cache before the next prefill allocates its own
    if stats is not None:
        stats.update(counter)
    return found


def _check_prompts(prompts):
    assert isinstance(prompts, (list, tuple)), \
        f"batched_dfs: prompts must be a list of token-id lists, got {type(prompts).__name__}"
    prompts = [it._as_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    empty = [i for i, p in enumerate(prompts) if not p]
    assert not empty, f"batched_dfs: empty prompts at {empty[:5]} (each should at least hold the bos token)"
    return prompts


def _check_args(min_prob, max_new_tokens, batch_size):
    assert 0.0 < min_prob <= 1.0, f"batched_dfs: min_prob must be in (0, 1], got {min_prob}"
    assert max_new_tokens >= 1, f"batched_dfs: max_new_tokens must be >= 1, got {max_new_tokens}"
    assert batch_size >= 1, f"batched_dfs: batch_size must be >= 1, got {batch_size}"


def batched_dfs(model, prompts, eos_token_id, max_new_tokens, min_prob, guesses=None, batch_size=64, stats=None):
    """For each prompt, exactly `inference_tools.dfs`'s result: [(reply ids incl. eos, NLL)] sorted by (NLL, ids).

    `guesses` (optional, one reply or None per prompt) only sets the first path followed, verified by one
    prefill; results do not depend on it. `batch_size` bounds the rows per forward pass (prompts per prefill,
    nodes per decode). A dict passed as `stats` receives counts of groups, rounds, forwards and decode steps.
    """
    prompts = _check_prompts(prompts)
    _check_args(min_prob, max_new_tokens, batch_size)
    if guesses is None:
        guesses = [None] * len(prompts)
    assert len(guesses) == len(prompts), f"batched_dfs: {len(prompts)} prompts but {len(guesses)} guesses"
    guesses = [it._clean_guess(g, eos_token_id, max_new_tokens) for g in guesses]
    search = _Search(eos_token_id, max_new_tokens, -math.log(min_prob), branch=True)
    return _search_all(model, prompts, guesses, search, batch_size, stats)


def batched_greedy(model, prompts, eos_token_id, max_new_tokens, batch_size=64, stats=None):
    """Greedy (argmax) reply of each prompt as (ids incl. eos, NLL), or None where no eos came in max_new_tokens."""
    prompts = _check_prompts(prompts)
    _check_args(1.0, max_new_tokens, batch_size)
    search = _Search(eos_token_id, max_new_tokens, math.inf, branch=False)
    found = _search_all(model, prompts, [[] for _ in prompts], search, batch_size, stats)
    return [cands[0] if cands else None for cands in found]
