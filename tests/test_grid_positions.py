"""Grid positions: vectorised rule vs slow reference, continuation, KV-cache decoding, padding, training, save/load."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grid_positions as gp

CHARS = list("0123456789IO+/-=") + ["\n"]


@pytest.fixture(scope="module")
def tok():
    """Minimal character-level tokenizer built here, so the test does not depend on model_tools."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m:.)"), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tok):
    m = gp.create_grid_model(tok, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, intermediate_size=128,
                             max_position_embeddings=512, seed=0)
    return m.eval()


def reference_positions(ids, grid_start_ids, newline_id, state=(0, 0, 0)):
    """The rule written out literally, one token at a time."""
    g, r, c = state
    out = []
    for x in ids:
        if x in grid_start_ids:
            g += 1
            out.append((g, 0, 0))
            r, c = 1, 1
        elif x == newline_id:
            out.append((g, r, c))
            r, c = r + 1, 1
        else:
            out.append((g, r, c))
            c += 1
    return out, (g, r, c)


def as_triples(pos, b=0):
    return [tuple(p) for p in pos[:, b].T.tolist()]


def task_text(seed, n_pairs=2):
    """A random ARC-format prompt + reply (as text after <s>)."""
    gen = torch.Generator().manual_seed(seed)

    def grid():
        h, w = (int(v) for v in torch.randint(1, 5, (2,), generator=gen))
        rows = torch.randint(0, 10, (h, w), generator=gen).tolist()
        return "\n".join("".join(map(str, row)) for row in rows)
    demos = "".join(f"I{grid()}\n+/-=O{grid()}\n</s>" for _ in range(n_pairs))
    return demos + f"I{grid()}\n+/-=O", f"{grid()}\n</s>"


def encode(tok, text, bos=True):
    return tok(text, add_special_tokens=bos)["input_ids"]


# ---------------------------------------------------------------------------------------------
# The position rule

TOKEN_IDS = st.lists(st.integers(min_value=0, max_value=8), max_size=60)
STARTS, NL = (3, 4), 5


def test_known_task_positions(tok):
    ids = encode(tok, "I12\n34\n+/-=O5\n</s>")
    settings_ = gp._grid_ids(tok)
    got = as_triples(gp.arc_position_ids(ids, **settings_))
    assert got[:5] == [(0, 0, 0), (1, 0, 0), (1, 1, 1), (1, 1, 2), (1, 1, 3)]  # <s> I 1 2 \n
    assert got[5:8] == [(1, 2, 1), (1, 2, 2), (1, 2, 3)]  # 3 4 \n
    assert got[12:] == [(2, 0, 0), (2, 1, 1), (2, 1, 2), (2, 2, 1)]  # O 5 \n </s>


@settings(max_examples=200, deadline=None, database=None)
@given(TOKEN_IDS, st.tuples(*[st.integers(0, 5)] * 3))
def test_vectorised_matches_reference(ids, state):
    want, want_state = reference_positions(ids, STARTS, NL, state)
    pos, final = gp.arc_position_ids(torch.tensor(ids, dtype=torch.long), STARTS, NL, start_state=state,
                                     return_state=True)
    assert pos.shape == (3, 1, len(ids)) and pos.dtype == torch.long
    assert as_triples(pos) == want
    assert tuple(final[:, 0].tolist()) == want_state


def test_batch_matches_reference_per_row():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9, (16, 300), generator=gen)
    states = torch.randint(0, 4, (3, 16), generator=gen)
    pos, final = gp.arc_position_ids(ids, STARTS, NL, start_state=states, return_state=True)
    for b in range(16):
        want, want_state = reference_positions(ids[b].tolist(), STARTS, NL, tuple(states[:, b].tolist()))
        assert as_triples(pos, b) == want
        assert tuple(final[:, b].tolist()) == want_state


@settings(max_examples=150, deadline=None, database=None)
@given(TOKEN_IDS, st.integers(0, 60))
def test_prefix_then_continuation_equals_whole(ids, cut):
    cut = min(cut, len(ids))
    whole = gp.arc_position_ids(ids, STARTS, NL)
    head, state = gp.arc_position_ids(ids[:cut], STARTS, NL, return_state=True)
    tail = gp.arc_position_ids(ids[cut:], STARTS, NL, start_state=state)
    assert torch.equal(torch.cat([head, tail], dim=2), whole)


@settings(max_examples=100, deadline=None, database=None)
@given(TOKEN_IDS)
def test_next_position_steps_match_whole(ids):
    state, steps = (0, 0, 0), []
    for x in ids:
        p, state = gp.next_position(state, x, STARTS, NL)
        steps.append(p)
    pos, final = gp.arc_position_ids(ids, STARTS, NL, return_state=True)
    assert steps == as_triples(pos) and state == tuple(final[:, 0].tolist())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="1-D or"):
        gp.arc_position_ids(torch.zeros(2, 2, 2, dtype=torch.long), STARTS, NL)
    with pytest.raises(ValueError, match="start_state"):
        gp.arc_position_ids(torch.zeros(2, 5, dtype=torch.long), STARTS, NL, start_state=torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------
# Config plumbing and the model


def test_config_and_rotary_layout(model, tok):
    cfg = model.config
    assert cfg.arc_positions == {"grid_start_ids": [tok.convert_tokens_to_ids("I"), tok.convert_tokens_to_ids("O")],
                                 "newline_id": encode(tok, "\n", bos=False)[0]}
    assert set(cfg.layer_types) == {"full_attention"} and cfg.vocab_size == len(tok)
    assert cfg.rope_parameters["mrope_section"] == [4, 2, 2] and gp.default_mrope_section(64) == [12, 10, 10]
    # Each rotary frequency must follow the axis we intend: i % 3 within the row/column counts, else grid.
    rot = model.model.rotary_emb
    pos = torch.tensor([[[3]], [[5]], [[7]]])
    cos, _ = rot(torch.zeros(1, dtype=torch.float32), pos)
    axis = [i % 3 if (i % 3 == 1 and i < 3 * 2) or (i % 3 == 2 and i < 3 * 2) else 0 for i in range(8)]
    want = torch.cos(rot.inv_freq * torch.tensor([[3, 5, 7][a] for a in axis], dtype=torch.float32))
    assert torch.allclose(cos[0, 0, :8], want) and torch.allclose(cos[0, 0, 8:], want)
    assert sorted(axis) == [0, 0, 0, 0, 1, 1, 2, 2]


def test_bad_mrope_section_raises(tok):
    with pytest.raises(AssertionError, match="sum to"):
        gp.grid_model_config(tok, hidden_size=64, num_heads=4, head_dim=16, mrope_section=[4, 4, 4])
    with pytest.raises(AssertionError, match="too large"):
        gp.grid_model_config(tok, hidden_size=64, num_heads=4, head_dim=16, mrope_section=[1, 4, 3])


def test_default_size_parameter_count(tok):
    from transformers import Qwen3_5ForCausalLM

    with torch.device("meta"):
        m = Qwen3_5ForCausalLM(gp.grid_model_config(tok))
    n = sum(p.numel() for p in m.parameters())
    assert 25e6 < n < 37e6, n


def test_plumbing_for_other_models_and_peft(model, tok):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    ids = torch.tensor([encode(tok, "I12\n")])
    assert not gp.has_grid_positions(llama) and gp.position_ids_for(llama, ids) is None
    assert gp.position_ids_for(llama.config, ids, return_state=True) == (None, None)
    assert gp.has_grid_positions(model) and gp.has_grid_positions(model.config)
    peft_model = get_peft_model(gp.create_grid_model(tok, hidden_size=64, num_layers=1, num_heads=4, head_dim=16,
                                                     intermediate_size=128),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pos = gp.position_ids_for(peft_model, ids)
    assert gp.has_grid_positions(peft_model) and as_triples(pos)[-1] == (1, 1, 3)
    assert peft_model(input_ids=ids, position_ids=pos).logits.shape == (1, ids.shape[1], len(tok))


def padded(rows, pad=0):
    width = max(map(len, rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows]), torch.tensor([len(r) for r in rows])


def test_positions_carried_over_padded_pieces_equal_the_whole(model, tok):
    # Batched decoding feeds right-padded pieces (prompts, then reply prefixes, then one token per row):
    # every row's real tokens get the positions of its whole sequence, for a grid model and a 1-D one.
    from transformers import LlamaConfig
    seqs = [encode(tok, "".join(task_text(s, n_pairs=1 + s % 2))) for s in range(3)]
    cuts = [(len(s) // 3, len(s) - 1) for s in seqs]
    for config in (model.config, LlamaConfig()):
        positions, pieces = gp.Positions(config), []
        ids, lengths = padded([s[:a] for s, (a, _) in zip(seqs, cuts)])
        pos, state = positions.block(ids, lengths=lengths)
        pieces.append((pos, lengths))
        ids, lengths = padded([s[a:b] for s, (a, b) in zip(seqs, cuts)])
        pos, state = positions.block(ids, state, lengths=lengths)
        pieces.append((pos, lengths))
        pos, state = positions.block(torch.tensor([[s[-1]] for s in seqs]), state)
        pieces.append((pos, [1] * len(seqs)))
        for row, seq in enumerate(seqs):
            got = torch.cat([p[..., row, :int(n[row])] for p, n in pieces], dim=-1)
            assert torch.equal(got, gp.model_position_ids(config, torch.tensor([seq]))[..., 0, :])
            assert torch.equal(gp.model_position_ids(config, torch.tensor([seq]), start=5)[..., 0, :], got[..., 5:])
    assert gp.model_position_ids(LlamaConfig(), torch.tensor([seqs[0]])).tolist() == [list(range(len(seqs[0])))]


def test_model_uses_the_grid_positions(model, tok):
    ids = torch.tensor([encode(tok, "".join(task_text(0)))])
    with torch.no_grad():
        grid = model(input_ids=ids, position_ids=gp.position_ids_for(model, ids)).logits
        flat = model(input_ids=ids).logits
    assert not torch.allclose(grid, flat, atol=1e-3)


def forward(model, ids, pos, cache=None, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, past_key_values=cache, attention_mask=attention_mask,
                     use_cache=cache is not None).logits


def decode_steps(model, token_ids, cache, state):
    """Feed tokens one at a time through the cache (DFS style); returns the per-step logits and final state."""
    logits, settings_ = [], model.config.arc_positions
    for x in token_ids:
        p, state = gp.next_position(state, x, **settings_)
        logits.append(forward(model, torch.tensor([[x]]), torch.tensor(p).view(3, 1, 1), cache))
    return torch.cat(logits, dim=1), state


def test_kv_cache_decoding_and_backtracking(model, tok):
    from transformers import DynamicCache

    prompt, reply = task_text(3)
    ids = encode(tok, prompt + reply)
    n = len(encode(tok, prompt))
    full = forward(model, torch.tensor([ids]), gp.position_ids_for(model, torch.tensor([ids])))
    cache = DynamicCache(config=model.config)
    # Prompt in one forward (positions + state), then the reply one token at a time.
    head, state = gp.position_ids_for(model, torch.tensor([ids[:n]]), return_state=True)
    first = forward(model, torch.tensor([ids[:n]]), head, cache)
    steps, _ = decode_steps(model, ids[n:], cache, tuple(state[:, 0].tolist()))
    assert torch.allclose(torch.cat([first, steps], dim=1), full, atol=1e-4)
    # Backtrack to the prompt and take another branch: must equal a fresh full forward of that sequence.
    cache.crop(-(len(ids) - n))
    other = encode(tok, "77\n1\n</s>", bos=False)
    branch, _ = decode_steps(model, other, cache, tuple(state[:, 0].tolist()))
    fresh = torch.tensor([ids[:n] + other])
    want = forward(model, fresh, gp.position_ids_for(model, fresh))[:, n:]
    assert cache.get_seq_length() == n + len(other)
    assert torch.allclose(branch, want, atol=1e-4)


def test_right_padded_batch_matches_single_forwards(model, tok):
    seqs = [encode(tok, "".join(task_text(s, n_pairs=1 + s % 2))) for s in range(3)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    batch = forward(model, ids, gp.position_ids_for(model, ids), attention_mask=mask)
    for b, s in enumerate(seqs):
        one = forward(model, torch.tensor([s]), gp.position_ids_for(model, torch.tensor([s])))
        assert torch.allclose(batch[b, :len(s)], one[0], atol=1e-4)


@pytest.mark.slow
def test_training_reduces_loss(tok):
    m = gp.create_grid_model(tok, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, intermediate_size=128,
                             seed=1).train()
    ids = torch.tensor([encode(tok, "".join(task_text(5)))])
    pos = gp.position_ids_for(m, ids)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = m(input_ids=ids, position_ids=pos, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_seed_is_explicit(tok):
    kwargs = dict(hidden_size=64, num_layers=1, num_heads=4, head_dim=16, intermediate_size=128)
    before = torch.random.get_rng_state()
    a, b = gp.create_grid_model(tok, seed=3, **kwargs), gp.create_grid_model(tok, seed=3, **kwargs)
    c = gp.create_grid_model(tok, seed=4, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), before)
    wa, wb, wc = (x.model.embed_tokens.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_bf16_keeps_rotary_frequencies_in_fp32(tok):
    m = gp.create_grid_model(tok, hidden_size=64, num_layers=1, num_heads=4, head_dim=16, intermediate_size=128,
                             dtype=torch.bfloat16)
    assert type(m).__name__ == "Qwen3_5ForCausalLM" and m.lm_head.weight.dtype == torch.bfloat16
    assert m.model.rotary_emb.inv_freq.dtype == torch.float32


def test_save_load_round_trip(model, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "Qwen3_5ForCausalLM"
    assert loaded.config.arc_positions == model.config.arc_positions
    assert loaded.config.rope_parameters == model.config.rope_parameters
    ids = torch.tensor([encode(tok, "".join(task_text(7)))])
    pos = gp.position_ids_for(loaded, ids)
    assert torch.equal(pos, gp.position_ids_for(model, ids))
    assert torch.allclose(forward(loaded, ids, pos), forward(model, ids, pos), atol=1e-6)


def test_a_decode_step_on_a_static_cache_is_one_graph_with_the_dynamic_logits():
    # The precondition of capturing the search's decode step as a CUDA graph (docs/SPEED.md): on a static KV cache
    # (transformers.StaticCache, a full-capacity mask, a tensor cache position) the grid model's step traces as one
    # graph, is not traced again as the position moves, and gives the logits of the growing cache the search uses now,
    # for right-padded prompts of different lengths.
    import model_tools
    from transformers import DynamicCache, StaticCache
    torch.manual_seed(0)
    model = gp.create_grid_model(model_tools.arc_tokenizer(), hidden_size=64, num_layers=2, num_heads=4, head_dim=16,
                                 intermediate_size=128).eval()
    lengths, capacity, steps = [20, 14, 17, 9], 40, 6
    rows, width = len(lengths), max(lengths)
    ids, mask = torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, capacity, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n], mask[r, :n] = torch.randint(3, 20, (n,)), 1
    pos, feed = gp.model_position_ids(model, ids), torch.randint(3, 20, (rows, steps))
    traces = []

    def count(gm, example_inputs):
        traces.append(gm)
        return gm.forward
    with torch.no_grad():
        grown = DynamicCache()
        model(input_ids=ids, position_ids=pos, attention_mask=mask[:, :width], past_key_values=grown, use_cache=True)
        static = StaticCache(config=model.config, max_cache_len=capacity)
        model(input_ids=ids, position_ids=pos, attention_mask=mask[:, :width], past_key_values=static, use_cache=True,
              cache_position=torch.arange(width))
        step = torch.compile(lambda t, p, m, c: model(input_ids=t, position_ids=p, attention_mask=m, use_cache=True,
                                                       past_key_values=static, cache_position=c).logits[:, -1],
                             fullgraph=True, backend=count, dynamic=False)
        for k in range(steps):
            p, mask[:, width + k] = pos[..., -1:] + 1 + k, 1
            want = model(input_ids=feed[:, k:k + 1], position_ids=p, attention_mask=mask[:, :width + k + 1],
                         past_key_values=grown, use_cache=True).logits[:, -1]
            got = step(feed[:, k:k + 1], p, mask, torch.tensor([width + k]))
            assert torch.allclose(got, want, atol=1e-5)
    assert len(traces) == 1
