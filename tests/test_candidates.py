"""The candidate loop's plumbing on tiny random Llama models: model fingerprints and the disk cache behind the
cached entry points (the loop itself runs end to end in test_evaluation.py)."""
import types

import pytest
import torch

import candidates as cand
from tiny_models import EOS, PROMPT, count_forwards, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fingerprint_follows_the_weights_and_the_adapter():
    from peft import LoraConfig, get_peft_model
    model = tiny_llama(0)
    base = cand.model_fingerprint(model)
    assert base == cand.model_fingerprint(tiny_llama(0)) and base != cand.model_fingerprint(tiny_llama(1))
    sampled = cand.model_fingerprint(model, sample_size=16)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[7, 5] += 1e-3  # most likely not among the 16 sampled values
    assert cand.model_fingerprint(model) != base and cand.model_fingerprint(model, sample_size=16) != sampled
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with_adapter = cand.model_fingerprint(peft_model)
    peft_model.peft_config["default"].lora_alpha = 8
    assert len({with_adapter, cand.model_fingerprint(peft_model), cand.model_fingerprint(model)}) == 3


def test_disk_cache_reruns_return_identical_results_and_the_model_is_part_of_the_key(tmp_path):
    model = tiny_llama(4)
    fp = cand.model_fingerprint(model)
    with cand.DiskCache(tmp_path / "cache") as cache:
        first = cand.infer_single(model, PROMPT, EOS, 5, min_prob=0.01, cache=cache, fingerprint=fp)
        scores = cand.score_replies_cached(model, [PROMPT] * 2, [first[0][0], first[1][0]], cache, fp)
    calls, handle = count_forwards(model)
    with cand.DiskCache(tmp_path / "cache") as cache:  # a fresh process would see the same files
        again = cand.infer_single(model, PROMPT, EOS, 5, min_prob=0.01, guess=first[1][0], cache=cache, fingerprint=fp)
        assert cand.score_replies_cached(model, [PROMPT] * 2, [first[0][0], first[1][0]], cache, fp) == scores
        assert len(calls) == 0 and again == first
        assert scores == pytest.approx([n for _, n in first[:2]], abs=1e-4)
        other = cand.infer_single(tiny_llama(5), PROMPT, EOS, 5, min_prob=0.01, cache=cache,
                                  fingerprint=cand.model_fingerprint(tiny_llama(5)))
        assert len(calls) == 0 and other != first and len(cache) == 4
        greedy = cand.infer_single(model, PROMPT, EOS, 5, cache=cache, fingerprint=fp)
        assert len(calls) > 0 and greedy == cand.infer_single(model, PROMPT, EOS, 5, cache=cache, fingerprint=fp)
    handle.remove()


def test_a_dfs_cut_by_its_deadline_is_never_saved(tmp_path, monkeypatch):
    import inference_tools
    model = tiny_llama(0)
    fp, full = cand.model_fingerprint(model), inference_tools.dfs(model, PROMPT, EOS, 6, 0.001)
    now = [0.0]  # a clock that jumps an hour once the search has made 20 decode steps
    real_nll = inference_tools._PathLogits.nll

    def nll(self, path, on_guess):
        self.steps = getattr(self, "steps", 0) + 1
        now[0] = 3600.0 if self.steps >= 20 else 0.0
        return real_nll(self, path, on_guess)
    monkeypatch.setattr(inference_tools._PathLogits, "nll", nll)
    monkeypatch.setattr(inference_tools.time, "time", lambda: now[0])
    with cand.DiskCache(tmp_path / "cache") as cache:
        cut = cand.infer_single(model, PROMPT, EOS, 6, min_prob=0.001, cache=cache, fingerprint=fp, deadline=60.0)
        assert 0 < len(cut) < len(full) and len(cache) == 0  # what it found, not saved
        now[0] = 0.0
        assert cand.infer_single(model, PROMPT, EOS, 6, min_prob=0.001, cache=cache, fingerprint=fp) == full
        assert len(cache) == 1


def test_disk_cache_refuses_values_and_keys_that_would_not_round_trip(tmp_path):
    with cand.DiskCache(tmp_path / "c") as cache:
        with pytest.raises(TypeError, match="plain Python"):
            cache.get_or_compute({"a": 1}, lambda: [torch.tensor(1.0)])
        with pytest.raises(TypeError, match="plain JSON"):
            cache.get_or_compute({"a": torch.tensor(1)}, lambda: 1)
        assert cache.get_or_compute({"a": 1, "b": [1.5, None]}, lambda: None) is None
        assert {"b": [1.5, None], "a": 1} in cache and cache.get_or_compute({"a": 1, "b": [1.5, None]}, int) is None
        with pytest.raises(AssertionError, match="fingerprint"):
            cand.infer_single(tiny_llama(0), PROMPT, EOS, 3, min_prob=0.1, cache=cache)


def test_a_damaged_cache_is_set_aside_and_a_full_disk_stops_only_the_saving(tmp_path, capsys, monkeypatch):
    import sqlite3
    with cand.DiskCache(tmp_path / "cache") as cache:
        cache.put({"a": 1}, [1, 2])
    (tmp_path / "cache" / "cache.db").write_bytes(b"not a database" * 100)
    with cand.DiskCache(tmp_path / "cache") as cache:  # the rerun: the damaged cache costs its results only
        assert cache.get({"a": 1}) is None
        cache.put({"a": 1}, [3])
        assert cache.get({"a": 1}) == [3]
        assert "is damaged" in capsys.readouterr().out
        assert len(list(tmp_path.glob("cache.damaged-*"))) == 1

        def full(*a, **kw):
            raise sqlite3.OperationalError("database or disk is full")
        monkeypatch.setattr(cache._cache, "set", full)
        cache.put({"b": 1}, [4])  # warns once, and the run goes on
        cache.put({"c": 1}, [5])
        out = capsys.readouterr().out
        assert out.count("WARNING") == 1 and cache.disk_full and cache.get({"b": 1}) is None


def test_a_second_run_over_the_same_cache_reports_its_hits(tmp_path):
    model = tiny_llama(4)
    fp = cand.model_fingerprint(model)
    prompts = [PROMPT, PROMPT[:-1], PROMPT[:3]]
    with cand.DiskCache(tmp_path / "cache") as cache:
        first = cand.dfs_batch_cached(model, prompts[:2], EOS, 4, 0.05, cache=cache, fingerprint=fp)
        cand.score_replies_cached(model, prompts[:2], [first[0][0][0], first[1][0][0]], cache, fp)
        assert cache.reused == {"search": [0, 2], "score": [0, 2]} and cache.resumed_line() is None
    done = []
    with cand.DiskCache(tmp_path / "cache") as cache:  # the rerun: two of three prompts are cached
        again = cand.dfs_batch_cached(model, prompts, EOS, 4, 0.05, cache=cache, fingerprint=fp,
                                      on_done=lambda n, tokens: done.append((n, tokens)))
        cand.score_replies_cached(model, prompts[:2], [first[0][0][0], first[1][0][0]], cache, fp)
        cand.infer_single(model, PROMPT, EOS, 4, min_prob=0.05, cache=cache, fingerprint=fp)  # same key as batched
        assert again[:2] == first and sum(n for n, _ in done) == 3 and done[0] == (2, 9)  # the cached ones first
        assert sum(tokens for _, tokens in done) == sum(map(len, prompts))  # and their prompt tokens
        assert cache.resumed_line() == "resumed: 3 of 4 candidate searches and 2 of 2 scores came from the cache"


def test_a_killed_search_keeps_the_prompts_it_finished(tmp_path, monkeypatch):
    """A run killed inside its one group (here: Ctrl-C from the clock the search reads before every decode step)
    keeps the prompts finished so far in the cache; the rerun takes them from there and computes the others, with
    the results of a run never killed (before, a group was saved only whole: a killed one-group run lost all)."""
    import batched_dfs
    model, prompts = tiny_llama(0), [[0] + [2 + (i * j) % 4 for j in range(i % 7)] for i in range(10)]
    fp = cand.model_fingerprint(model)
    full = cand.dfs_batch_cached(model, prompts, EOS, 6, None)
    ticks = [0, None]  # looks at the clock; the look at which it raises

    def clock():
        ticks[0] += 1
        if ticks[0] == ticks[1]:
            raise KeyboardInterrupt
        return 0.0
    monkeypatch.setattr(batched_dfs, "time", types.SimpleNamespace(time=clock))  # the search's clock only
    cand.dfs_batch_cached(model, prompts, EOS, 6, None, deadline=1.0)  # counts the looks of a whole search
    ticks[:] = [0, ticks[0]]  # Ctrl-C at the last look, before the last decode step
    with cand.DiskCache(tmp_path / "cache") as cache:
        with pytest.raises(KeyboardInterrupt):
            cand.dfs_batch_cached(model, prompts, EOS, 6, None, cache=cache, fingerprint=fp, deadline=1.0)
    with cand.DiskCache(tmp_path / "cache") as cache:  # the rerun
        assert cand.dfs_batch_cached(model, prompts, EOS, 6, None, cache=cache, fingerprint=fp) == full
        hits, total = cache.reused["search"]
        assert 0 < hits < total == 10


def test_generation_bar_counts_prompt_tokens_and_never_counts_a_task_twice():
    bar = cand._GenerationBar({"a": [10, 20, 30, 40], "b": [5, 5]})  # prompt tokens of each view, task by task
    assert bar.bar.total == 110 and bar.n_prompts == 6
    count = bar.counter(["a"])
    count(1, 10)
    count(9, 900)  # an out-of-memory retry of task a: capped at its 4 prompts and 100 tokens
    assert (bar.prompts, bar.bar.n) == (4, 100)
    bar.counter(["b"])(1, 5)
    bar.finish("b")
    assert (bar.prompts, bar.bar.n) == (6, 110) and bar.bar.postfix == "6/6 prompts"
    assert "prompt tokens" in str(bar.bar)  # the display says what it counts
    bar.close()


def test_scoring_bar_counts_prompt_and_reply_tokens(monkeypatch):
    from run_benchmark_progress import recording
    bars = []
    monkeypatch.setattr(cand, "tqdm", recording(cand.tqdm, bars))
    prompts, replies = [PROMPT, PROMPT[:3]], [[3, EOS], [4, 4, EOS]]
    cand.score_replies_cached(tiny_llama(4), prompts, replies, progress="scoring")
    assert bars[0]["total"] == (5 + 2) + (3 + 3) and bars[0]["updates"][-1]["n"] == 13
    assert bars[0]["updates"][-1]["postfix"] == "2/2 pairs"


def _uneven_tasks():
    """Eight tasks whose grids grow from 2 x 2 to 30 x 30: prompts from tens to thousands of tokens."""
    from arc_loader import ArcDataset
    tasks = {}
    for i, size in enumerate([2, 3, 5, 8, 12, 18, 24, 30]):
        grid = [[(r + c + i) % 10 for c in range(size)] for r in range(size)]
        tasks[f"task{i}"] = {"train": [{"input": grid, "output": grid}] * 2, "test": [{"input": grid}]}
    return ArcDataset(tasks)


def test_generation_eta_after_a_tenth_of_the_work_is_within_2x_on_uneven_prompts(monkeypatch):
    # The batched search runs its groups shortest prompts first, and its time goes with the prompts' tokens (on the
    # CPU main job: 2 to 4 ms of CPU a prompt token in every group). A fake search with that cost (1 ms a token, 2 s a
    # group) on a fake clock, through the run's own loop and bar: the ETA the bar shows from the first tenth of the
    # work on is within a factor of two of the real remaining time. A bar over prompts said a third of it.
    import tqdm.std

    import batched_dfs
    import model_tools
    from run_benchmark_progress import judge, recording
    from search import Engine, Prompts, Search, format_options
    now, groups = [0.0], []

    def fake_greedy(model, prompts, eos, max_new_tokens, stats=None, callback=None, guesses=None, deadline=None,
                    batch_size=None, max_batch_tokens=None, prefill_tokens=None, decode_graphs=False):
        for idx in batched_dfs._groups(prompts, batch_size, max_batch_tokens):
            groups.append(idx)
            now[0] += 2.0 + 1e-3 * sum(len(prompts[i]) for i in idx)
            callback(idx, [[] for _ in idx])
        stats["unfinished"] = []
        return [[] for _ in prompts]

    bars = []
    monkeypatch.setattr(batched_dfs, "batched_greedy", fake_greedy)
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])  # the bars' clock
    monkeypatch.setattr(cand, "tqdm", recording(cand.tqdm, bars))
    tok = model_tools.arc_tokenizer()
    prompts = Prompts(tok, format_options("", tok))
    search = Search(sampler="greedy", n_views=8, n_score_views=0)
    engine = Engine(batch_views=True, batch_scores=False, prefetch_tasks=100, batch_size=256, kv_cache_gb=1.0,
                    prefill_tokens=32768, max_batch_tokens=20000)
    dataset = _uneven_tasks()
    runner = cand.TaskRunner(torch.nn.Linear(1, 1), "fake", prompts, search, engine)
    cand.inference_run(dataset, runner, search, engine)
    lengths = sorted(len(prompts.view(dataset, view)[1]) for key in dataset.keys
                     for view in cand.view_keys(dataset, key, 8, search.aug_seed))
    assert lengths[0] < 100 and lengths[-1] > 4000 and len(groups) >= 5
    generation = judge(bars[0], after=0.1)
    assert 0.5 <= generation["ratio_at_first_update_past"] <= 2 and generation["within_2x"], generation
    assert generation["first_update_past"]["fraction"] < 0.5  # judged early, not at the end


@pytest.mark.parametrize("sampler, batched", [("dfs", False), ("dfs", True), ("greedy", True), ("greedy", False),
                                              ("beam", False)])
def test_the_search_owns_its_part_of_the_cache_key(tmp_path, sampler, batched):
    # Search.key_part is what the cached entry points store under (the same keys as before Search existed)
    from search import Search
    model, search = tiny_llama(4), Search(sampler=sampler, min_prob=0.05, num_beams=2)
    fp = cand.model_fingerprint(model)
    with cand.DiskCache(tmp_path / "cache") as cache:
        if batched:
            cand.dfs_batch_cached(model, [PROMPT], EOS, 4, search.threshold, cache=cache, fingerprint=fp)
        else:
            kw = {} if sampler == "dfs" else search.generate_options()
            cand.infer_single(model, PROMPT, EOS, 4, min_prob=search.threshold, cache=cache, fingerprint=fp, **kw)
        key = dict(search.key_part(batched), model=fp, prompt=list(PROMPT), eos=EOS, max_new_tokens=4)
        assert len(cache) == 1 and key in cache
    assert Search(sampler="dfs", min_prob=0.1).key_part(True) == {"fn": "dfs", "min_prob": 0.1}  # both routes
    assert Search(sampler="greedy").key_part(True) == {"fn": "greedy_batched"}


def test_a_failed_graph_capture_is_said_and_the_candidates_stay(monkeypatch):
    # --decode-graphs where a CUDA graph capture failed: the search ran its steps eagerly (batched_dfs records why
    # in its stats); the evaluation says so once and keeps the candidates
    import batched_dfs
    from search import Engine
    found = [[([5, 2], 0.25)]]

    def failed_capture(model, prompts, eos, max_new_tokens, stats=None, callback=None, decode_graphs=False, **kw):
        assert decode_graphs
        stats.update(graph_error="operation not permitted when stream is capturing", unfinished=[])
        callback([0], found)
        return found

    monkeypatch.setattr(batched_dfs, "batched_greedy", failed_capture)
    engine = Engine(batch_views=True, decode_graphs=True, batch_size=8, max_batch_tokens=1000, prefill_tokens=1000)
    with pytest.warns(RuntimeWarning, match="a CUDA graph capture failed.*operation not permitted"):
        out = cand.dfs_batch_cached(torch.nn.Linear(1, 1), [[1, 2, 3]], 2, 4, None, engine=engine)
    assert out == [[([5, 2], 0.25)]]
