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
