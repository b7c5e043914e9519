"""inference_tools on tiny random Llama models: DFS against brute-force enumeration, batched scoring against
plain forward passes, the generate() baselines (also on a grid-position model)."""
import itertools
import math

import pytest
import torch

import inference_tools as it
from tiny_models import (BOS, EOS, PROMPT, arc_prompts, argmax_decode, assert_same_candidates, constant_llama,
                         count_forwards, tiny_llama)

pytestmark = pytest.mark.usefixtures("one_thread")


def full_nll(model, prompt, reply):
    """Reply NLL from one plain, unpadded forward pass over prompt + reply."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return -sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(reply))


def brute_force(model, prompt, max_new_tokens, min_prob, vocab):
    """Every reply (eos only at its end) of at most max_new_tokens tokens with p > min_prob, by full forwards."""
    others = [t for t in range(vocab) if t != EOS]
    found = []
    for n in range(max_new_tokens):
        replies = torch.tensor([list(body) + [EOS] for body in itertools.product(others, repeat=n)])
        with torch.no_grad():
            logits = model(torch.cat([torch.tensor(prompt).expand(len(replies), -1), replies], 1)).logits
        logp = torch.log_softmax(logits[:, len(prompt) - 1:-1].float(), -1)
        nlls = -logp.gather(2, replies[:, :, None])[:, :, 0].double().sum(1)
        found += [(r, float(v)) for r, v in zip(replies.tolist(), nlls) if v < -math.log(min_prob)]
    return sorted(found, key=lambda c: (c[1], c[0]))


@pytest.mark.parametrize("seed,min_prob,max_new_tokens", [(0, 0.01, 6), (4, 0.003, 6), (5, 0.003, 5)])
def test_dfs_finds_exactly_the_replies_above_min_prob(seed, min_prob, max_new_tokens):
    model = tiny_llama(seed)
    expected = brute_force(model, PROMPT, max_new_tokens, min_prob, vocab=6)
    assert len(expected) >= 8 and sum(len(r) >= 3 for r, _ in expected) >= 3  # a non-trivial case
    assert max(len(r) for r, _ in expected) >= 4
    got = dfs_checked(model, PROMPT, max_new_tokens, min_prob)
    assert_same_candidates(got, expected)
    wrong = [2, 3, 4, 5, 2, 3, EOS]
    for guess in (expected[0][0], expected[-1][0], wrong):
        fed, handle = count_forwards(model)
        assert_same_candidates(dfs_checked(model, PROMPT, max_new_tokens, min_prob, guess=guess), expected)
        handle.remove()
        # One prefill of prompt + guess (eos dropped, cut to the budget); the guess is explored first, so the
        # cache always holds the current path's prefix and every later forward feeds a single token.
        assert fed[0] == len(PROMPT) + min(len(guess) - 1, max_new_tokens - 1) and set(fed[1:]) == {1}


def dfs_checked(model, prompt, max_new_tokens, min_prob, guess=None):
    """dfs, checking the contract on its output types and order."""
    got = it.dfs(model, prompt, EOS, max_new_tokens, min_prob, guess=guess)
    assert all(type(n) is float and all(type(t) is int for t in r) for r, n in got)
    assert got == sorted(got, key=lambda c: (c[1], c[0]))
    assert all(r[-1] == EOS and EOS not in r[:-1] and len(r) <= max_new_tokens for r, _ in got)
    return got


def test_dfs_backtracks_many_times_on_one_cropped_cache():
    model = tiny_llama(0)
    calls, handle = count_forwards(model)
    got = it.dfs(model, torch.tensor(PROMPT), EOS, 6, 0.001)
    handle.remove()
    assert len(calls) > 50  # one prefill, then one single-token forward per expanded node
    assert_same_candidates(got, brute_force(model, PROMPT, 6, 0.001, vocab=6))


def test_dfs_deadline_cuts_the_search_inside_a_prompt_and_keeps_what_it_found(monkeypatch):
    model, full = tiny_llama(0), it.dfs(tiny_llama(0), PROMPT, EOS, 6, 0.001)
    stats, (fed, handle) = {}, count_forwards(model)
    assert it.dfs(model, PROMPT, EOS, 6, 0.001, deadline=0.0, stats=stats) == [] and stats == {"cut": True}
    handle.remove()
    assert fed == []  # not even the prefill
    ticks = [0]  # a clock that ticks once per look; the deadline falls halfway through the looks of a whole search

    def clock():
        ticks[0] += 1
        return ticks[0]
    monkeypatch.setattr(it.time, "time", clock)
    assert it.dfs(model, PROMPT, EOS, 6, 0.001, deadline=10 ** 9, stats=stats) == full and not stats["cut"]
    looks, ticks[0] = ticks[0], 0
    fed, handle = count_forwards(model)
    got = it.dfs(model, PROMPT, EOS, 6, 0.001, deadline=looks // 2, stats=stats)
    handle.remove()
    assert stats["cut"] and 0 < len(got) < len(full) and len(fed) <= looks // 2 + 1  # stopped where the clock said
    assert all(any(r == fr and abs(n - fn) < 1e-9 for fr, fn in full) for r, n in got)  # each exact
    assert got == sorted(got, key=lambda c: (c[1], c[0]))


def test_dfs_respects_max_new_tokens_and_takes_tensor_prompts():
    model = tiny_llama(4)
    got = it.dfs(model, torch.tensor([PROMPT]), EOS, 2, 0.003)
    assert_same_candidates(got, brute_force(model, PROMPT, 2, 0.003, vocab=6))
    assert it.dfs(model, PROMPT, EOS, 1, 0.003) == [r for r in got if len(r[0]) == 1]


def test_dfs_long_reply_follows_the_guess_in_one_forward():
    q = 1e-3  # eos is unlikely: replies are runs of token 2 ending in eos, the longest 1000 tokens long
    model = constant_llama([-30.0, math.log(q / (1 - q)), 0.0, -30.0])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[BOS]])).logits[0, -1].float(), -1)
    step, stop = -float(logp[2]), -float(logp[EOS])
    calls, handle = count_forwards(model)
    got = it.dfs(model, [BOS], EOS, 1000, 1e-4)
    n_without_guess = len(calls)
    best_last = [2] * 999 + [EOS]
    with_guess = it.dfs(model, [BOS], EOS, 1000, 1e-4, guess=best_last)
    handle.remove()
    assert n_without_guess == 1000 and len(calls) - n_without_guess == 1  # the guess path costs one prefill
    assert [r for r, _ in got] == [[2] * k + [EOS] for k in range(1000)]
    assert [n for _, n in got] == pytest.approx([k * step + stop for k in range(1000)], abs=1e-4)
    assert_same_candidates(with_guess, got)


def test_dfs_rejects_bad_input_and_restores_training_mode():
    model = tiny_llama(0)
    with pytest.raises(AssertionError, match="batch size 1"):
        it.dfs(model, torch.tensor([PROMPT, PROMPT]), EOS, 4, 0.1)
    with pytest.raises(AssertionError, match="min_prob"):
        it.dfs(model, PROMPT, EOS, 4, 0.0)
    with pytest.raises(AssertionError, match="ints"):
        it.dfs(model, [0.5, 1.0], EOS, 4, 0.1)
    model.train()
    it.dfs(model, PROMPT, EOS, 3, 0.1)
    assert model.training


def test_score_replies_batched_equals_plain_forward():
    model = tiny_llama(3)
    prompts = [[BOS, 3], [BOS, 3, 4, 5, 2, 2, 3], [BOS, 3], [BOS, 5, 5, 4], [BOS, 3], [BOS, 2, 2, 2, 3]]
    replies = [[EOS], [2, 3, 4, 5, 4, EOS], [4, 4, EOS], [3, EOS], [5, 2, 3, 3, 2, 4, 4, EOS], [0, 5, EOS]]
    expected = [full_nll(model, p, r) for p, r in zip(prompts, replies)]
    for batch_size, share in itertools.product([1, 2, 4, 8], [True, False]):
        got = it.score_replies(model, prompts, replies, batch_size=batch_size, share_prompts=share)
        assert got == pytest.approx(expected, abs=1e-4), (batch_size, share)
    assert it.score_replies(model, prompts[:1], replies[:1]) != it.score_replies(model, prompts[:1], replies[2:3])


def test_score_replies_agrees_with_dfs_and_checks_lengths():
    model = tiny_llama(4)
    found = it.dfs(model, PROMPT, EOS, 5, 0.01)
    nlls = it.score_replies(model, [PROMPT] * len(found), [r for r, _ in found], batch_size=3)
    assert nlls == pytest.approx([n for _, n in found], abs=1e-4)
    with pytest.raises(AssertionError, match="2 prompts but 1 replies"):
        it.score_replies(model, [PROMPT, PROMPT], [[EOS]])


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "0", "1", "2", "\n"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # Oniguruma's (?m) is dotall: '.' matches the newline too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m:.)"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def test_calc_score_tokenises_input_with_bos_and_reply_without():
    model, tok = tiny_llama(2), char_tokenizer()
    nll = it.calc_score(model, tok, "01\n2", "10\n</s>")
    assert nll == pytest.approx(full_nll(model, [BOS, 2, 3, 5, 4], [3, 2, 5, EOS]), abs=1e-4)


def test_greedy_is_the_argmax_path_and_the_dfs_favourite():
    model, prompt = tiny_llama(8, scale=30.0), [BOS, 4, 4]
    best = it.dfs(model, prompt, EOS, 8, 0.05)[0]
    assert math.exp(-best[1]) > 0.5 and len(best[0]) >= 3
    greedy = it.generate_candidates(model, prompt, EOS, 8)
    assert [r for r, _ in greedy] == [best[0]] and greedy[0][1] == pytest.approx(best[1], abs=1e-4)


def test_sampling_is_seeded_without_touching_the_global_rng_and_beams_are_rescored():
    model = tiny_llama(6, scale=15.0)
    state = torch.random.get_rng_state()
    sampled = it.generate_candidates(model, PROMPT, EOS, 8, mode="sample", num_return_sequences=6, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    torch.manual_seed(12345)  # the global stream must not matter
    assert sampled == it.generate_candidates(model, PROMPT, EOS, 8, mode="sample", num_return_sequences=6, seed=3)
    assert sampled != it.generate_candidates(model, PROMPT, EOS, 8, mode="sample", num_return_sequences=6, seed=4)
    beams = it.generate_candidates(model, PROMPT, EOS, 8, mode="beam", num_beams=4, num_return_sequences=4)
    for replies in (sampled, beams):
        assert replies and all(r[-1] == EOS and EOS not in r[:-1] for r, _ in replies)
        assert [n for _, n in replies] == pytest.approx([full_nll(model, PROMPT, r) for r, _ in replies], abs=1e-4)
    with pytest.raises(ValueError, match="mode"):
        it.generate_candidates(model, PROMPT, EOS, 8, mode="nucleus")


def test_lora_model_is_searched_and_scored_like_any_model():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_llama(4), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    found = it.dfs(model, PROMPT, EOS, 5, 0.01)
    assert found and [n for _, n in found] == pytest.approx([full_nll(model, PROMPT, r) for r, _ in found],
                                                            abs=1e-4)


def test_generate_passes_grid_positions(grid_setup):
    # generate() on a grid-position model: greedy equals the argmax decode with grid positions at every step.
    model, tok = grid_setup
    prompts, eos = arc_prompts(tok, 6), tok.eos_token_id
    answered = []
    for prompt in prompts:
        expected = argmax_decode(model, prompt, eos, 12)
        got = it.generate_candidates(model, prompt, eos, 12, mode="greedy")
        assert (got[0][0] if got else None) == (expected[0] if expected else None)
        if expected:
            assert got[0][1] == pytest.approx(expected[1], abs=1e-4)
            answered.append(prompt)
    assert "prepare_inputs_for_generation" not in model.__dict__ and len(answered) >= 2
    beams = it.generate_candidates(model, answered[0], eos, 12, mode="beam", num_beams=4, num_return_sequences=4)
    assert beams and [n for _, n in beams] == pytest.approx(it.score_replies(model, [answered[0]] * len(beams),
                                                                              [r for r, _ in beams]), abs=1e-4)
