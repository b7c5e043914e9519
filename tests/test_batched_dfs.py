"""batched_dfs against the batch-1 dfs (same candidates, NLLs within 1e-4) on tiny Llamas and a tiny grid model,
with and without guesses; forward-pass counts; batched_greedy against a plain argmax decode, with and without
guesses."""
import contextlib
import math
import random
import types

import pytest
import torch

import batched_dfs as bd
import inference_tools as it
from tiny_models import (BOS, EOS, arc_prompts, argmax_decode, assert_same_candidate_sets, assert_same_candidates,
                         constant_llama, count_forwards, tiny_llama)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_prompts(n, seed, vocab=6):
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(2, vocab) for _ in range(rng.randrange(0, 12))] for _ in range(n)]


def dfs_all(model, prompts, eos, max_new_tokens, min_prob):
    """The batch-1 dfs of every prompt and the number of forward passes it took."""
    fed, handle = count_forwards(model)
    found = [it.dfs(model, p, eos, max_new_tokens, min_prob) for p in prompts]
    handle.remove()
    return found, len(fed)


def batched_checked(model, prompts, eos, max_new_tokens, min_prob, **kwargs):
    """batched_dfs with its stats and forward count, checking the output contract."""
    stats = {}
    fed, handle = count_forwards(model)
    got = bd.batched_dfs(model, prompts, eos, max_new_tokens, min_prob, stats=stats, **kwargs)
    handle.remove()
    assert len(got) == len(prompts) and stats["forwards"] == len(fed)
    for cands in got:
        assert all(type(n) is float and all(type(t) is int for t in r) for r, n in cands)
        assert cands == sorted(cands, key=lambda c: (c[1], c[0]))
        assert all(r[-1] == eos and eos not in r[:-1] and len(r) <= max_new_tokens for r, _ in cands)
    return got, stats


def assert_all_same(got, expected, atol=1e-4):
    for g, e in zip(got, expected, strict=True):
        assert_same_candidates(g, e, atol)


@pytest.mark.parametrize("seed,min_prob,max_new_tokens", [(0, 0.01, 6), (4, 0.003, 6), (5, 0.003, 5)])
def test_equals_dfs_for_many_prompts_at_once(seed, min_prob, max_new_tokens):
    model, prompts = tiny_llama(seed), random_prompts(10, seed)
    expected, dfs_forwards = dfs_all(model, prompts, EOS, max_new_tokens, min_prob)
    assert sum(map(len, expected)) >= 50 and max(len(r) for c in expected for r, _ in c) >= 4  # non-trivial
    for batch_size in (1, 3, 64):
        got, stats = batched_checked(model, prompts, EOS, max_new_tokens, min_prob, batch_size=batch_size)
        assert_all_same(got, expected)
        assert stats["groups"] == math.ceil(len(prompts) / batch_size)
    # All prompts share each forward: a few rounds of short decodes instead of one forward per explored node.
    assert stats["rounds"] <= 6 and stats["forwards"] * 10 < dfs_forwards


def test_results_do_not_depend_on_guesses():
    model, prompts = tiny_llama(4), random_prompts(8, 1)
    expected, _ = dfs_all(model, prompts, EOS, 6, 0.003)
    wrong = [2, 3, 4, 5, 2, 3, EOS]
    eos_inside = [2, EOS, 3, EOS]
    guesses = [expected[0][0][0], expected[1][-1][0], wrong, None, eos_inside, [3] * 20, [EOS], []]
    for batch_size in (2, 64):
        got, _ = batched_checked(model, prompts, EOS, 6, 0.003, guesses=guesses, batch_size=batch_size)
        assert_all_same(got, expected)
    best = [c[0][0] if c else None for c in expected]
    got, _ = batched_checked(model, prompts, EOS, 6, 0.003, guesses=best)
    assert_all_same(got, expected)


def test_guess_path_costs_one_prefill_instead_of_a_decode():
    q = 1e-3  # replies are runs of token 2 ending in eos, the longest 200 tokens long
    model = constant_llama([-30.0, math.log(q / (1 - q)), 0.0, -30.0])
    expected, _ = dfs_all(model, [[BOS], [BOS, 2]], EOS, 200, 1e-4)
    got, plain = batched_checked(model, [[BOS], [BOS, 2]], EOS, 200, 1e-4)
    guessed, with_guess = batched_checked(model, [[BOS], [BOS, 2]], EOS, 200, 1e-4,
                                          guesses=[[2] * 199 + [EOS], [2] * 150])
    assert len(expected[0]) == 200 and expected[0][-1][0] == [2] * 199 + [EOS]
    assert_all_same(got, expected)
    assert_all_same(guessed, expected)
    assert plain["forwards"] == 1 + 199 and plain["rounds"] == 1  # prefill, then one decode step per token
    # Prefill of the prompts, one forward over the guesses, and the 49 tokens after the shorter guess.
    assert with_guess["forwards"] == 2 + 49 and with_guess["rounds"] == 1


def markov_llama(logits):
    """A Llama whose next-token logits are logits[last token]: attention and MLP outputs are zeroed."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    model = tiny_llama(0, vocab=len(logits))
    width = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :len(logits)] = torch.eye(len(logits))  # RMS-normed to sqrt(width) e_i
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :len(logits)] = logits.T / width ** 0.5
    return model


def test_long_replies_take_few_rounds():
    # A cycle 2 -> 3 -> 4 -> 5 -> 2 (any other token e^-4 less likely), eos likely only after 5.
    logits = torch.full((6, 6), -4.0)
    logits[:, BOS] = logits[:, EOS] = -30.0
    for token in range(2, 6):
        logits[token, 2 + (token - 1) % 4] = 0.0
    logits[BOS, 2], logits[5, EOS] = 0.0, -1.0
    model, prompts = markov_llama(logits), [[BOS, 2, 3], [BOS, 4, 5, 2, 3, 4], [BOS, 5]]
    expected, dfs_forwards = dfs_all(model, prompts, EOS, 50, 1e-3)
    got, stats = batched_checked(model, prompts, EOS, 50, 1e-3)
    assert_all_same(got, expected)
    assert min(max(len(r) for r, _ in c) for c in expected) >= 40 and sum(map(len, expected)) >= 100
    assert stats["rounds"] <= 3 and stats["forwards"] * 10 < dfs_forwards


def test_grid_model_equals_dfs_on_arc_prompts(grid_setup):
    model, tok = grid_setup
    prompts, eos = arc_prompts(tok, 8), tok.eos_token_id
    assert len({len(p) for p in prompts}) >= 2
    expected, dfs_forwards = dfs_all(model, prompts, eos, 8, 0.01)
    assert sum(map(len, expected)) >= 30 and max(len(r) for c in expected for r, _ in c) >= 5
    for batch_size in (3, 64):
        got, stats = batched_checked(model, prompts, eos, 8, 0.01, batch_size=batch_size)
        assert_all_same(got, expected)
    assert stats["forwards"] * 4 < dfs_forwards
    guesses = [c[-1][0] for c in expected]
    got, _ = batched_checked(model, prompts, eos, 8, 0.01, guesses=guesses, batch_size=5)
    assert_all_same(got, expected)


def test_memory_limits_growing_buffers_and_dropped_rows_change_nothing(grid_setup, monkeypatch):
    # Tiny budgets: groups and node batches cut by cached tokens, prefills in slices of one or two prompts, KV
    # buffers growing a column at a time; rows whose path ended are dropped from the decode batch.
    model, tok = grid_setup
    prompts, eos = arc_prompts(tok, 8), tok.eos_token_id
    expected, _ = dfs_all(model, prompts, eos, 8, 0.01)
    monkeypatch.setattr(bd._GrowingLayer, "GROW", 1)
    monkeypatch.setattr(bd, "SPARE", 0)
    dropped = []
    original = bd._GrowingLayer.batch_select_indices
    monkeypatch.setattr(bd._GrowingLayer, "batch_select_indices",
                        lambda self, idx: dropped.append(len(idx)) or original(self, idx))
    seen = []
    got, stats = batched_checked(model, prompts, eos, 8, 0.01, max_batch_tokens=3 * 300, prefill_tokens=500,
                                 callback=lambda idx, res: seen.append((list(idx), res)))
    assert_all_same(got, expected)
    assert dropped and stats["groups"] >= 3
    assert sorted(i for idx, _ in seen for i in idx) == list(range(len(prompts)))
    assert all(got[i] == r for idx, res in seen for i, r in zip(idx, res))



def test_fixed_shape_decode_steps_change_nothing(grid_setup, monkeypatch):
    # decode_graphs=True: each decode step attends to its whole KV buffers (zeros masked out), its next column a
    # device tensor (what a CUDA graph replays; on a CPU the same steps run eagerly). Tiny budgets make the buffers
    # grow one column at a time and drop rows, so shapes change mid-decode; the candidates stay the batch-1 DFS's.
    steps = []
    real_call = bd._FixedStep.__call__
    monkeypatch.setattr(bd._FixedStep, "__call__", lambda self, *a: steps.append(self.n) or real_call(self, *a))
    model, prompts = tiny_llama(4), random_prompts(10, 4)
    expected, _ = dfs_all(model, prompts, EOS, 6, 0.003)
    got, stats = batched_checked(model, prompts, EOS, 6, 0.003, batch_size=3, decode_graphs=True)
    assert_all_same(got, expected)
    assert len(steps) == stats["decode_steps"] > 0 and "graph_error" not in stats
    grid, tok = grid_setup
    prompts, eos = arc_prompts(tok, 8), tok.eos_token_id
    expected, _ = dfs_all(grid, prompts, eos, 8, 0.01)
    monkeypatch.setattr(bd._GrowingLayer, "GROW", 1)
    monkeypatch.setattr(bd, "SPARE", 0)
    grown, cut = [], []
    real_grow, real_select = bd._FixedLayer.grow, bd._FixedStep.select
    monkeypatch.setattr(bd._FixedLayer, "grow", lambda self, more: grown.append(more) or real_grow(self, more))
    monkeypatch.setattr(bd._FixedStep, "select", lambda self, keep: cut.append(len(keep)) or real_select(self, keep))
    got, stats = batched_checked(grid, prompts, eos, 8, 0.01, max_batch_tokens=3 * 300, prefill_tokens=500,
                                 decode_graphs=True, guesses=[c[-1][0] if c else None for c in expected])
    assert_all_same(got, expected)
    assert grown and cut and stats["groups"] >= 3
    greedy = [argmax_decode(grid, p, eos, 12) for p in prompts]
    assert_same_greedy(bd.batched_greedy(grid, prompts, eos, 12, decode_graphs=True), greedy)

def assert_same_greedy(got, expected):
    assert all(len(g) <= 1 for g in got)
    got = [g[0] if g else None for g in got]
    assert [g is None for g in got] == [e is None for e in expected]
    for g, e in zip(got, expected):
        if e is not None:
            assert g[0] == e[0] and g[1] == pytest.approx(e[1], abs=1e-4)


def test_batched_greedy_is_the_argmax_decode(grid_setup):
    model, prompts = tiny_llama(8, scale=30.0), random_prompts(12, 2)
    expected = [argmax_decode(model, p, EOS, 8) for p in prompts]
    assert sum(e is None for e in expected) >= 1 and sum(e is not None and len(e[0]) >= 3 for e in expected) >= 3
    for batch_size in (1, 5, 64):
        assert_same_greedy(bd.batched_greedy(model, prompts, EOS, 8, batch_size=batch_size), expected)
    grid, tok = grid_setup
    prompts = arc_prompts(tok, 6)
    expected = [argmax_decode(grid, p, tok.eos_token_id, 12) for p in prompts]
    assert sum(e is not None for e in expected) >= 2
    stats = {}
    assert_same_greedy(bd.batched_greedy(grid, prompts, tok.eos_token_id, 12, stats=stats), expected)
    assert stats["forwards"] <= 1 + 12


def test_batched_greedy_follows_a_guess_only_while_it_is_the_argmax():
    model, prompts = tiny_llama(8, scale=30.0), random_prompts(12, 2)
    expected = [argmax_decode(model, p, EOS, 8) for p in prompts]
    replies = [e[0] for e in expected if e is not None and len(e[0]) >= 3]
    assert len(replies) >= 3
    rng = random.Random(0)
    kinds = [lambda e: e, lambda e: e[:2], lambda e: e[:1] + [5 if e[1] != 5 else 4] + e[2:],  # right, its start, one off
             lambda e: [2, 3, 4, 5, 2, 3, 4, EOS], lambda e: [EOS], lambda e: None, lambda e: [3] * 20]
    guesses = [kinds[i % len(kinds)](e[0] if e else rng.choice(replies)) for i, e in enumerate(expected)]
    for batch_size in (1, 5, 64):
        assert_same_greedy(bd.batched_greedy(model, prompts, EOS, 8, guesses=guesses, batch_size=batch_size), expected)
    # A right guess costs one forward instead of its decode steps; a wrong one, a round of its own.
    right = [e[0] for e in expected if e is not None]
    long = [p for p, e in zip(prompts, expected) if e is not None]
    plain, guessed = {}, {}
    assert_same_greedy(bd.batched_greedy(model, long, EOS, 8, stats=plain), [e for e in expected if e is not None])
    assert_same_greedy(bd.batched_greedy(model, long, EOS, 8, guesses=right, stats=guessed),
                       [e for e in expected if e is not None])
    assert plain["decode_steps"] == max(len(r) for r in right) - 1
    assert guessed["decode_steps"] == 0 and guessed["forwards"] == 2 and guessed["rounds"] == 1
    one_off = [r[:-1] + [3 if r[-1] != 3 else 4] for r in right]  # wrong in the last token: the argmax there is eos
    stats = {}
    assert_same_greedy(bd.batched_greedy(model, long, EOS, 8, guesses=one_off, stats=stats),
                       [e for e in expected if e is not None])
    assert stats["forwards"] == 2 and stats["decode_steps"] == 0


def test_bf16_equals_dfs_within_rounding():
    # Mildly peaked logits: at |logit| ~ 10 bf16 rounds logits to 1/16, which no batching can match exactly.
    # Batched and batch-1 forwards round differently: up to 3.3e-3 nats on a CPU without bf16 instructions (AMD
    # EPYC), where near-equal NLLs may also swap places; so the same replies, each NLL within 5e-3 (1.5 x that).
    model, prompts = tiny_llama(4, scale=2.0).to(torch.bfloat16), random_prompts(10, 3)
    expected, _ = dfs_all(model, prompts, EOS, 4, 0.003)
    assert sum(map(len, expected)) >= 100
    got, _ = batched_checked(model, prompts, EOS, 4, 0.003)
    for g, e in zip(got, expected, strict=True):
        assert_same_candidate_sets(g, e, atol=5e-3)


def test_bad_input_raises_and_training_mode_is_restored():
    model = tiny_llama(0)
    with pytest.raises(AssertionError, match="empty prompts"):
        bd.batched_dfs(model, [[BOS], []], EOS, 4, 0.1)
    with pytest.raises(AssertionError, match="min_prob"):
        bd.batched_dfs(model, [[BOS]], EOS, 4, 0.0)
    with pytest.raises(AssertionError, match="2 prompts but 1 guesses"):
        bd.batched_dfs(model, [[BOS], [BOS]], EOS, 4, 0.1, guesses=[None])
    with pytest.raises(AssertionError, match="ints"):
        bd.batched_dfs(model, [[BOS, 0.5]], EOS, 4, 0.1)
    with pytest.raises(AssertionError, match="batch_size"):
        bd.batched_greedy(model, [[BOS]], EOS, 4, batch_size=0)
    model.train()
    assert bd.batched_dfs(model, [[BOS, 3]], EOS, 3, 1.0) == [[]]
    assert model.training


def test_batched_scores_equal_score_replies(grid_setup):
    # Shared prompts (the product of experts scores every candidate under the same views), many prompts per group.
    model, tok = grid_setup
    prompts = arc_prompts(tok, 5)
    rng = random.Random(0)
    replies = [[rng.randrange(3, len(tok)) for _ in range(rng.randrange(1, 30))] + [tok.eos_token_id] for _ in range(4)]
    pairs = [(p, r) for p in prompts for r in rng.sample(replies, 3)]
    expected = it.score_replies(model, [p for p, _ in pairs], [r for _, r in pairs])
    for limits in ({}, {"batch_size": 2, "max_batch_tokens": 700, "prefill_tokens": 300}):
        got = bd.batched_scores(model, [p for p, _ in pairs], [r for _, r in pairs], **limits)
        assert got == pytest.approx(expected, abs=1e-4)
    llama, prompts = tiny_llama(3), random_prompts(6, 4)
    replies = [[2, 3, EOS], [4, EOS], [5, 5, 5, 2, EOS]]
    pairs = [(p, r) for p in prompts for r in replies]
    expected = it.score_replies(llama, [p for p, _ in pairs], [r for _, r in pairs])
    assert bd.batched_scores(llama, [p for p, _ in pairs], [r for _, r in pairs], batch_size=4) == \
        pytest.approx(expected, abs=1e-4)


def test_default_memory_follows_the_free_gpu_memory():
    from search import Engine, resolve_engine
    assert bd.default_memory(None) == bd.CPU_MEMORY
    assert bd.default_memory(140 * 2 ** 30)["kv_cache_gb"] == 20.0  # the measured setting, not more
    small = bd.default_memory(24 * 2 ** 30)
    assert small["kv_cache_gb"] == 6.0 and small["batch_size"] == bd.GPU_MEMORY["batch_size"]
    model = tiny_llama(0)
    engine = resolve_engine(Engine(kv_cache_gb=1.5), "dfs", model)  # on this CPU machine: the CPU defaults
    assert engine.kv_cache_gb == 1.5 and engine.prefill_tokens == bd.CPU_MEMORY["prefill_tokens"]  # the flag stays
    assert engine.max_batch_tokens == int(1.5 * 2 ** 30 / bd.kv_bytes_per_token(model))
    assert not engine.batch_views and not engine.batch_scores and engine.prefetch_tasks == 0  # CPU: batch-1 DFS
    greedy = resolve_engine(Engine(), "greedy", model)
    assert greedy.batch_views and greedy.prefetch_tasks == bd.CPU_MEMORY["prefetch_tasks"]
    assert resolve_engine(Engine(cache_only=True), "greedy", model).prefetch_tasks == 0
    assert not resolve_engine(Engine(batch_views=True, guess_views=True), "beam", model).guess_views
    assert not engine.decode_graphs and not greedy.decode_graphs  # a CPU replays no graphs


def test_on_a_gpu_the_batched_search_replays_its_decode_steps_as_graphs(monkeypatch):
    # The GPU defaults (measured on one H100, docs/SPEED.md): batched search and scoring, CUDA-graph decode steps;
    # an explicit flag stays
    from search import Engine, resolve_engine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * 2 ** 30, 80 * 2 ** 30))
    model = tiny_llama(0)
    for sampler in ("greedy", "dfs"):
        engine = resolve_engine(Engine(), sampler, model)
        assert engine.batch_views and engine.batch_scores and engine.decode_graphs
        assert engine.kv_cache_gb == bd.GPU_MEMORY["kv_cache_gb"]
    assert not resolve_engine(Engine(decode_graphs=False), "dfs", model).decode_graphs



# ---- results handed on as prompts finish, inside a group ---------------------------------------------------------

@pytest.mark.parametrize("greedy", [False, True])
def test_prompts_are_handed_on_as_they_finish_inside_a_group(greedy):
    """One group of 10 prompts: the callback hears of prompts while the others are still searched (it heard of the
    whole group at its end), each once, with exactly the results the search returns."""
    model, prompts = tiny_llama(0), random_prompts(10, 0)
    fed, handle = count_forwards(model)
    calls = []
    callback = lambda idx, results: calls.append((len(fed), list(idx), results))  # noqa: E731
    got = bd.batched_greedy(model, prompts, EOS, 6, batch_size=64, callback=callback) if greedy else \
        bd.batched_dfs(model, prompts, EOS, 6, 0.003, batch_size=64, callback=callback)
    handle.remove()
    assert len(calls) > 1 and calls[0][0] < len(fed)  # the first ones before the search's last forward
    told = [i for _, idx, _ in calls for i in idx]
    assert sorted(told) == list(range(10))
    assert all(got[i] == r for _, idx, results in calls for i, r in zip(idx, results))


# ---- the deadline: checked before every decode step; what was found is kept, nothing unfinished is saved ------

@pytest.mark.parametrize("greedy", [False, True])
def test_deadline_cuts_the_search_and_keeps_what_it_found(greedy, monkeypatch):
    model, prompts = tiny_llama(0), random_prompts(10, 0)
    search = (lambda **kw: bd.batched_greedy(model, prompts, EOS, 6, **kw)) if greedy else \
        (lambda **kw: bd.batched_dfs(model, prompts, EOS, 6, 0.003, **kw))
    full = search(batch_size=3)
    stats, saved = {}, []
    assert search(batch_size=3, deadline=0.0, stats=stats, callback=lambda i, r: saved.append(i)) == [[]] * 10
    assert stats["unfinished"] == list(range(10)) and stats["forwards"] == 0 and saved == []
    ticks = [0]  # a clock that ticks once per look; the deadline falls halfway through the looks of a whole search

    def clock():
        ticks[0] += 1
        return ticks[0]
    monkeypatch.setattr(bd.time, "time", clock)
    assert search(batch_size=3, deadline=10 ** 9) == full
    looks, ticks[0] = ticks[0], 0
    stats, saved = {}, []
    got = search(batch_size=3, deadline=looks // 2, stats=stats, callback=lambda i, r: saved.append(list(i)))
    assert 0 < len(stats["unfinished"]) < 10 and saved  # some groups finished, then one was cut
    done = [i for group in saved for i in group]
    assert sorted(done + stats["unfinished"]) == list(range(10))
    for i in done:
        assert got[i] == full[i]  # finished: exactly the full search's candidates
    for i in stats["unfinished"]:  # cut: only candidates the full search has too, with the same NLLs
        assert all(any(r == fr and abs(n - fn) < 1e-9 for fr, fn in full[i]) for r, n in got[i])


class FakeGraph:
    """CUDA graph semantics on a CPU: a capture records the step (its fake runs it too, as a warm-up would), a replay
    computes it again from the same input tensors into the same output tensors."""
    recording, replays = None, 0

    def replay(self):
        step, args, outputs = self.captured
        for out, fresh in zip(outputs, REAL_FORWARD(step, *args)):
            out.copy_(fresh)
        FakeGraph.replays += 1


REAL_FORWARD = bd._FixedStep._forward


@contextlib.contextmanager
def fake_capture(graph):
    FakeGraph.recording = graph
    try:
        yield
    finally:
        FakeGraph.recording = None


def recorded_forward(step, *args):
    out = REAL_FORWARD(step, *args)
    if FakeGraph.recording is not None:
        FakeGraph.recording.captured = (step, args, out)
    return out


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(bd, "_has_cuda_graphs", lambda device: True)
    monkeypatch.setattr(bd, "_capture_failed", None)
    monkeypatch.setattr(bd._FixedStep, "_forward", recorded_forward)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    FakeGraph.replays = 0


def test_replayed_steps_write_the_right_columns(grid_setup, fake_cuda_graphs, monkeypatch):
    # The capture bookkeeping of --decode-graphs, with fake graphs on CPU: the warm-up and the capture leave the
    # column counters where they were, each replay reads the step's token and positions from the captured inputs
    # and writes its column; rows cut and buffers grown take a new capture. The batch-1 DFS's candidates.
    grid, tok = grid_setup
    prompts, eos = arc_prompts(tok, 8), tok.eos_token_id
    expected, _ = dfs_all(grid, prompts, eos, 8, 0.01)
    monkeypatch.setattr(bd._GrowingLayer, "GROW", 3)
    monkeypatch.setattr(bd, "SPARE", 0)
    stats = {}  # (the fakes' warm-up and capture forwards are model calls a real capture does not make: not counted)
    got = bd.batched_dfs(grid, prompts, eos, 8, 0.01, max_batch_tokens=3 * 300, prefill_tokens=500, stats=stats,
                         decode_graphs=True)
    assert_all_same(got, expected)
    assert "graph_error" not in stats and 1 < stats["graph_captures"] < stats["decode_steps"]
    assert FakeGraph.replays == stats["decode_steps"]
    greedy = [argmax_decode(grid, p, eos, 12) for p in prompts]
    assert_same_greedy(bd.batched_greedy(grid, prompts, eos, 12, decode_graphs=True), greedy)


def test_a_failed_capture_runs_the_steps_eagerly_and_is_not_tried_again(grid_setup, fake_cuda_graphs, monkeypatch):
    def failing(graph):
        raise RuntimeError("no capture here")
    monkeypatch.setattr(torch.cuda, "graph", failing)
    grid, tok = grid_setup
    prompts, eos = arc_prompts(tok, 4), tok.eos_token_id
    expected, _ = dfs_all(grid, prompts, eos, 8, 0.01)
    for _ in range(2):  # the second search tries no capture, and says why
        stats = {}
        got = bd.batched_dfs(grid, prompts, eos, 8, 0.01, stats=stats, decode_graphs=True)
        assert_all_same(got, expected)
        assert stats["graph_error"] == "no capture here" and "graph_captures" not in stats
    assert FakeGraph.replays == 0
