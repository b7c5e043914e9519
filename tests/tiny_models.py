"""Tiny random models and checks shared by the sampler and scorer tests (inference_tools, batched_dfs, candidates)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import grid_positions

BOS, EOS = 0, 1
PROMPT = [BOS, 3, 4, 5, 2]


def tiny_llama(seed, vocab=6, scale=10.0):
    """A 2-layer width-32 Llama; scaling lm_head makes the next-token distributions peaked."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=BOS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def constant_llama(logits):
    """A Llama whose next-token logits are `logits` at every position, whatever the input."""
    model = tiny_llama(0, vocab=len(logits))
    with torch.no_grad():
        for layer in model.model.layers:  # no attention or MLP output: the residual stream is the embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.linspace(-1, 1, 32).expand(len(logits), -1))
        normed = model.model.norm(model.model.embed_tokens.weight[:1])[0]
        model.lm_head.weight.copy_(torch.tensor(logits)[:, None] * normed / normed.dot(normed))
    return model


def count_forwards(model):
    """A list that records the number of tokens fed by each forward call, and the hook's handle."""
    fed = []
    handle = model.register_forward_hook(lambda mod, args, kwargs, out: fed.append(kwargs["input_ids"].shape[1]),
                                         with_kwargs=True)
    return fed, handle


def assert_same_candidates(got, expected, atol=1e-4):
    assert [r for r, _ in got] == [r for r, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, abs=atol)


def assert_same_candidate_sets(got, expected, atol):
    """The same replies (in any order: rounding may swap near-equal NLLs), each NLL within `atol`."""
    got, expected = dict((tuple(r), n) for r, n in got), dict((tuple(r), n) for r, n in expected)
    assert got.keys() == expected.keys()
    for reply, nll in got.items():
        assert nll == pytest.approx(expected[reply], abs=atol), reply


def arc_prompts(tok, n, max_len=300):
    """Formatted ARC evaluation tasks (no reply); long ones keep bos + their last 250 tokens."""
    import arc_downloader
    import arc_loader
    challenges, _ = arc_downloader.arc_paths("evaluation")
    dataset = arc_loader.ArcDataset.load_from_json(challenges)
    prompts = [tok(dataset.fmt_task(key)["input"])["input_ids"] for key in dataset.keys[:n]]
    return [p if len(p) <= max_len else p[:1] + p[-250:] for p in prompts]


def argmax_decode(model, prompt, eos, max_new_tokens):
    """Batch-1 greedy decode with a full forward per token (no cache): (reply ids, NLL) or None."""
    seq, nll = list(prompt), 0.0
    for _ in range(max_new_tokens):
        ids = torch.tensor([seq])
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=grid_positions.model_position_ids(model, ids)).logits[0, -1]
        logp = torch.log_softmax(logits.float(), -1)
        token = int(logp.argmax())
        nll -= float(logp[token])
        seq.append(token)
        if token == eos:
            return seq[len(prompt):], nll
    return None
