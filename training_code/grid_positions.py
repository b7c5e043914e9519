"""2-D grid positions for from-scratch models: (grid, row, column) position ids and a Qwen3.5 model that uses them.

Rule (one state (g, r, c), starting at (0, 0, 0), updated token by token):
  grid-start token ('I' or 'O'): g += 1, position (g, 0, 0), then r = c = 1;
  newline token:                 position (g, r, c), then r += 1, c = 1;
  any other token:               position (g, r, c), then c += 1.
So cell (i, j) (0-based) of grid g sits at (g, i + 1, j + 1) and the '\\n' ending row i at (g, i + 1, width + 1).

A model opts in through `config.arc_positions = {'grid_start_ids': [...], 'newline_id': n}` (saved in
config.json); `position_ids_for` returns None for every other model, meaning "use its default 1-D positions".
`Positions` (and `model_position_ids`) give the position ids of any model, 1-D or grid: the one place the
samplers and scorers get positions from.
transformers is imported inside `create_grid_model`, so importing this module costs only torch.
"""
import torch

from seeding import seeded_torch

AXES = 3  # (grid, row, column): Qwen3.5's (temporal, height, width) rotary axes


# --------------------------------------------------------------------------------------------------
# Position ids from token ids


def _as_batch(input_ids):
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"arc_position_ids: input_ids must be 1-D or (batch, seq), got shape {tuple(ids.shape)}")
    return ids


def _start_state(start_state, batch, device):
    """(3, batch) long tensor from None, a (g, r, c) triple, or a (3,) / (3, batch) tensor."""
    if start_state is None:
        return torch.zeros(AXES, batch, dtype=torch.long, device=device)
    state = torch.as_tensor(start_state, dtype=torch.long, device=device)
    if state.ndim == 1:
        state = state[:, None].expand(AXES, batch)
    if state.shape != (AXES, batch):
        raise ValueError(f"arc_position_ids: start_state must be (g, r, c) or shape (3, {batch}), "
                         f"got shape {tuple(state.shape)}")
    return state


def _last_index_before(flags):
    """For each t in 0..T, the largest s < t with flags[:, s], or -1 (shape (B, T + 1))."""
    batch, length = flags.shape
    idx = torch.arange(length, device=flags.device).expand(batch, length)
    marked = torch.where(flags, idx, torch.full_like(idx, -1))
    before = torch.cat([marked.new_full((batch, 1), -1), marked], dim=1)
    return before.cummax(dim=1).values


def _states_before(is_start, is_nl, state0):
    """State (g, r, c) before each token t in 0..T: three (B, T + 1) tensors; column T is the final state."""
    batch, length = is_start.shape
    zero = torch.zeros(batch, 1, dtype=torch.long, device=is_start.device)
    starts_before = torch.cat([zero, is_start.long().cumsum(1)], dim=1)
    nl_before = torch.cat([zero, is_nl.long().cumsum(1)], dim=1)
    g0, r0, c0 = (s[:, None] for s in state0)
    g = g0 + starts_before
    # Rows count the newlines since the last grid start (which set r = 1), or since the call began.
    last_start = _last_index_before(is_start)
    nl_at_start = nl_before.gather(1, (last_start + 1).clamp(min=0))
    r = torch.where(last_start >= 0, 1 + nl_before - nl_at_start, r0 + nl_before)
    # Columns count tokens since the last grid start or newline (which set c = 1), or since the call began.
    t = torch.arange(length + 1, device=is_start.device).expand(batch, length + 1)
    last_delim = _last_index_before(is_start | is_nl)
    c = torch.where(last_delim >= 0, t - last_delim, c0 + t)
    return g, r, c


def arc_position_ids(input_ids, grid_start_ids, newline_id, start_state=None, return_state=False, lengths=None):
    """(3, B, T) long (grid, row, column) positions of input_ids (1-D = batch 1), continuing from start_state.

    The state returned is the one after each row's first `lengths[b]` tokens (default: all), so right-padded
    rows get the state after their real tokens (padding never changes the positions before it)."""
    ids = _as_batch(input_ids)
    state0 = _start_state(start_state, ids.shape[0], ids.device)
    starts = torch.as_tensor(list(grid_start_ids), dtype=ids.dtype, device=ids.device)
    is_start = torch.isin(ids, starts)
    g, r, c = _states_before(is_start, ids == newline_id, state0)
    # A grid-start token shows the new grid index (the state after it) at row and column 0.
    pos = torch.stack([g[:, 1:], r[:, :-1], c[:, :-1]])
    pos[1:].masked_fill_(is_start[None], 0)
    if not return_state:
        return pos
    if lengths is None:
        return pos, torch.stack([g[:, -1], r[:, -1], c[:, -1]])
    end = torch.as_tensor(lengths, dtype=torch.long, device=ids.device)[:, None]
    return pos, torch.stack([g.gather(1, end)[:, 0], r.gather(1, end)[:, 0], c.gather(1, end)[:, 0]])


def next_position(state, token_id, grid_start_ids, newline_id):
    """Pure-Python single step: ((g, r, c) position of token_id, state after it) from the state before it."""
    g, r, c = state
    if token_id in grid_start_ids:
        return (g + 1, 0, 0), (g + 1, 1, 1)
    if token_id == newline_id:
        return (g, r, c), (g, r + 1, 1)
    return (g, r, c), (g, r, c + 1)


# --------------------------------------------------------------------------------------------------
# Model / config plumbing


def config_of(model_or_config):
    """The config of a model, a PeftModel or a torch.compile wrapper (a config is returned as it is)."""
    obj = getattr(model_or_config, "_orig_mod", model_or_config)  # torch.compile wrapper
    if hasattr(obj, "get_base_model"):  # PeftModel
        obj = obj.get_base_model()
    return getattr(obj, "config", obj)


def grid_position_settings(model_or_config):
    """The config's arc_positions dict ({'grid_start_ids': [...], 'newline_id': n}), or None."""
    settings = getattr(config_of(model_or_config), "arc_positions", None)
    if settings is None:
        return None
    missing = {"grid_start_ids", "newline_id"} - set(settings)
    if missing:
        raise ValueError(f"config.arc_positions lacks {sorted(missing)}: {settings!r}")
    return settings


def has_grid_positions(model_or_config):
    """True if the model (or PeftModel, or config) uses (grid, row, column) positions."""
    return grid_position_settings(model_or_config) is not None


class Positions:
    """Position ids of any model's tokens, continuing per row from a state: the next 1-D position (B,) of an
    ordinary model, or the (3, B) (grid, row, column) state of a grid-position model.

    Batched decoding feeds rows in pieces (prompt, then reply prefixes, then one token at a time) with padding
    between them; carrying each row's state from piece to piece keeps the positions of its real tokens exact.
    """

    def __init__(self, model_or_config):
        self.grid = grid_position_settings(model_or_config)

    def block(self, input_ids, state=None, lengths=None):
        """(positions, states after) of (B, T) token ids (1-D = batch 1) that follow `state` (None: sequence start).

        Positions are (B, T) for an ordinary model, (3, B, T) for a grid model. With `lengths` (real tokens per
        right-padded row) the state is the one after each row's real tokens.
        """
        ids = _as_batch(input_ids)
        if self.grid is None:
            batch, width = ids.shape
            start = torch.zeros(batch, dtype=torch.long, device=ids.device) if state is None else state
            end = width if lengths is None else torch.as_tensor(lengths, device=ids.device)
            return start[:, None] + torch.arange(width, device=ids.device), start + end
        return arc_position_ids(ids, self.grid["grid_start_ids"], self.grid["newline_id"], start_state=state,
                                return_state=True, lengths=lengths)


def model_position_ids(model_or_config, input_ids, start=0):
    """Position ids of input_ids[:, start:] given the whole sequence from position 0, for any model.

    (batch, n) 1-D positions for ordinary models; (3, batch, n) (grid, row, column) positions for a grid model,
    derived from the whole prefix.
    """
    return Positions(model_or_config).block(input_ids)[0][..., start:]


def position_ids_for(model_or_config, input_ids, start_state=None, return_state=False):
    """(3, B, T) grid positions for a grid-position model, else None (use the model's default positions)."""
    positions = Positions(model_or_config)
    if positions.grid is None:
        return (None, None) if return_state else None
    pos, state = positions.block(input_ids, start_state)
    return (pos, state) if return_state else pos


# --------------------------------------------------------------------------------------------------
# Model factory


def default_mrope_section(head_dim):
    """Rotary frequencies per axis (grid, row, column): rows and columns equal, the remainder to the grid axis."""
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def _check_mrope_section(section, head_dim):
    half = head_dim // 2
    assert head_dim % 2 == 0, f"create_grid_model: head_dim must be even, got {head_dim}"
    assert len(section) == AXES and min(section) >= 1, f"mrope_section must be 3 positive ints, got {section}"
    assert sum(section) == half, f"mrope_section {section} must sum to head_dim // 2 = {half}"
    # Qwen3.5 interleaves: frequency i goes to row if i % 3 == 1 and i < 3 * section[1], to column if
    # i % 3 == 2 and i < 3 * section[2], else to grid. Larger row/column counts are silently truncated there.
    assert 3 * section[1] - 2 < half and 3 * section[2] - 1 < half, \
        f"mrope_section {section}: row/column counts too large for {half} interleaved frequencies"


def _grid_ids(tokenizer):
    grid_start_ids = [tokenizer.convert_tokens_to_ids(ch) for ch in ("I", "O")]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    bad = [i for i in grid_start_ids if i is None or i == unk]
    assert not bad and len(newline) == 1, \
        f"create_grid_model: tokenizer needs single tokens 'I', 'O', '\\n' (got {grid_start_ids}, {newline})"
    return {"grid_start_ids": grid_start_ids, "newline_id": newline[0]}


def grid_model_config(tokenizer, hidden_size=512, num_layers=8, num_heads=8, head_dim=64, intermediate_size=2048,
                      max_position_embeddings=4096, rope_theta=10000.0, mrope_section=None,
                      tie_word_embeddings=False):
    """Qwen3_5TextConfig for a from-scratch grid model (all layers full attention, full 3-axis rotary)."""
    from transformers import Qwen3_5TextConfig

    section = list(default_mrope_section(head_dim) if mrope_section is None else mrope_section)
    _check_mrope_section(section, head_dim)
    # partial_rotary_factor: Qwen3.5 rotates only 1/4 of each head by default; we rotate all of it. The same
    # value goes top-level too, else config.json carries a stale 0.25 beside rope_parameters' 1.0.
    # mrope_interleaved is documentation only: Qwen3.5's text rotary always interleaves.
    rope = {"rope_type": "default", "rope_theta": float(rope_theta), "partial_rotary_factor": 1.0,
            "mrope_section": section, "mrope_interleaved": True}
    return Qwen3_5TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        head_dim=head_dim, max_position_embeddings=max_position_embeddings, rope_parameters=rope,
        partial_rotary_factor=1.0, layer_types=["full_attention"] * num_layers,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        arc_positions=_grid_ids(tokenizer))


def create_grid_model(tokenizer, hidden_size=512, num_layers=8, num_heads=8, head_dim=64, intermediate_size=2048,
                      max_position_embeddings=4096, rope_theta=10000.0, mrope_section=None, seed=0,
                      dtype=torch.float32, tie_word_embeddings=False):
    """Randomly initialised Qwen3_5ForCausalLM with (grid, row, column) rotary positions.

    Every layer is full softmax attention (no Gated-DeltaNet linear attention: its recurrent state cannot be
    cropped back token by token the way the DFS backtracks, and grids need exact lookup), multi-head (kv heads
    = heads), QK-norm, and Qwen3.5's sigmoid attention-output gate (hard-wired in the modeling code, no switch;
    it costs hidden * heads * head_dim extra q_proj weights per layer). No MTP head exists in the causal LM.
    Default size (width 512, 8 layers, 8 heads x 64, MLP 2048) with model_tools.arc_tokenizer (77 tokens):
    35.74M parameters, 4.46M per layer (0.26M of it the output gate; 33.6M in all without the gate, which
    Qwen3.5 has no switch for); intermediate_size=1792 would give 32.6M.
    """
    from transformers import AutoModelForCausalLM

    config = grid_model_config(tokenizer, hidden_size, num_layers, num_heads, head_dim, intermediate_size,
                               max_position_embeddings, rope_theta, mrope_section, tie_word_embeddings)
    # Weight init draws from torch's global generator; fork it so the caller's stream is untouched.
    with seeded_torch(seed):
        # from_config, not .to(dtype): .to would also round the rotary inv_freq buffer to bf16.
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model
