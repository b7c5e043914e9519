"""The candidate loop's plumbing on tiny random Llama models: model fingerprints and the disk cache behind the
cached entry points (the loop itself runs end to end in test_evaluation.py)."""
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
        again = cand.dfs_batch_cached(model, prompts, EOS, 4, 0.05, cache=cache, fingerprint=fp, on_done=done.append)
        cand.score_replies_cached(model, prompts[:2], [first[0][0][0], first[1][0][0]], cache, fp)
        cand.infer_single(model, PROMPT, EOS, 4, min_prob=0.05, cache=cache, fingerprint=fp)  # same key as batched
        assert again[:2] == first and sum(done) == 3 and done[0] == 2  # the cached ones are counted first
        assert cache.resumed_line() == "resumed: 3 of 4 candidate searches and 2 of 2 scores came from the cache"


def test_prompt_bar_counts_views_and_never_counts_a_task_twice():
    bar = cand._PromptBar({"a": ["a_0", "a_1"], "b": ["b_0"]}, n_views=4)
    assert bar.bar.total == 12
    count = bar.counter(["a"])
    count(3)
    count(9)  # an out-of-memory retry of task a: capped at its 8 prompts
    assert bar.bar.n == 8
    bar.counter(["b"])(1)
    bar.finish("b")
    assert bar.bar.n == 12
    bar.close()


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
