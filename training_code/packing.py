"""Packed training rows: many samples back to back in one row, no padding between them, attention kept inside
each sample by a variable-length attention function.

A padded batch spends its compute on padding and, once transformers is handed a padding mask, runs attention on
the memory-efficient kernel instead of flash. A packed row has one fixed length (`capacity`), so `torch.compile`
sees one shape, and the samples' boundaries travel as cumulative lengths (`cu_seq_lens_q/k`, the flash-attention
convention), which transformers passes untouched to the attention function of the model's `_attn_implementation`.

    register_varlen_attention()                      # once; then
    model.set_attn_implementation(VARLEN)            # for training only (inference keeps sdpa)
    rows = PackedRows(samples, plan_rows(lengths, capacity, max_segments))
    collate = PackedCollator(labels_fn, pad_id, capacity, position_fn)

The model stays a stock transformers model: its weights, config and every other attention path are unchanged, and a
packed row gives the same logits and loss as the same samples padded in a batch (tests/test_packing.py).
"""
import numpy as np
import torch

VARLEN = "arc_varlen"  # the attn_implementation name registered with transformers.AttentionInterface


# --------------------------------------------------------------------------------------------------
# Attention over packed rows


def _reference_varlen(q, k, v, cu_seq, scale):
    """Causal attention per sample with SDPA, one sample at a time: the CPU path and the reference of the tests."""
    out = torch.empty_like(q)
    bounds = cu_seq.tolist()
    for beg, end in zip(bounds[:-1], bounds[1:]):
        if end > beg:
            seg = [x[beg:end].transpose(0, 1) for x in (q, k, v)]  # (heads, tokens, head_dim)
            out[beg:end] = torch.nn.functional.scaled_dot_product_attention(
                *seg, is_causal=True, scale=scale).transpose(0, 1)
    return out


def _cuda_varlen(q, k, v, cu_seq, max_len, scale):
    from torch.nn.attention.varlen import varlen_attn

    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16  # flash kernels: 16-bit only
    cu_seq = cu_seq.to(device=q.device, dtype=torch.int32)
    out = varlen_attn(q.to(dtype), k.to(dtype), v.to(dtype), cu_seq, cu_seq, max_len, max_len, scale=scale,
                      window_size=(-1, 0))  # (-1, 0): every earlier key of the sample, no later one (causal)
    return out.to(q.dtype)


@torch.compiler.disable  # the sample count and longest sample change every row: kept out of the compiled graph
def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """transformers attention function for one packed row: query/key/value (1, heads, tokens, head_dim), causal
    attention inside each [cu_seq_lens_q[i], cu_seq_lens_q[i + 1]) span. Returns ((1, tokens, heads, head_dim), None)."""
    if cu_seq_lens_q is None:
        raise ValueError(f"attention {VARLEN!r} needs cu_seq_lens_q (a packed row from PackedCollator); use 'sdpa' "
                         "for ordinary batches")
    if query.shape[0] != 1:
        raise ValueError(f"attention {VARLEN!r}: a packed batch is one row, got batch {query.shape[0]}")
    if dropout:
        raise ValueError(f"attention {VARLEN!r} has no dropout")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, head_dim)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: one key/value head per group of query heads
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if q.is_cuda:
        out = _cuda_varlen(q, k, v, cu_seq_lens_q, int(max_length_q), scale)
    else:
        out = _reference_varlen(q, k, v, cu_seq_lens_q, scale)
    return out[None], None


def register_varlen_attention():
    """Register VARLEN with transformers (idempotent). With no mask function of that name, transformers builds
    no attention mask and hands the attention function the cu_seq_lens / max_length keywords of the forward call."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    return VARLEN


# --------------------------------------------------------------------------------------------------
# Rows: which samples go together


def plan_rows(lengths, capacity, max_segments=None):
    """Sample indices in their given order, cut into rows of at most `capacity` tokens (and `max_segments`
    samples): next-fit, so that a pre-shuffled order stays shuffled and each row is a run of it."""
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"plan_rows: sample {i} has {n} tokens, more than a row's capacity of {capacity}")
        if row and (used + n > capacity or (max_segments and len(row) == max_segments)):
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


class PackedRows(torch.utils.data.Dataset):
    """A dataset of rows: item i is the list of the samples that row i holds (formatted in the DataLoader workers
    when `samples` formats on access, e.g. training.FormattedKeys)."""

    def __init__(self, samples, rows):
        self.samples, self.rows = samples, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return [self.samples[j] for j in self.rows[i]]


# --------------------------------------------------------------------------------------------------
# Collating a row


class PackedCollator:
    """Concatenates the samples of a batch of rows into one row of `capacity` x rows tokens.

    labels_fn(ids) gives a sample's labels (-100 where no loss), position_fn((1, n) ids) its position ids (e.g.
    (3, 1, n) grid positions) or None for the model's 1-D positions, which then restart at 0 in every sample.
    The tail after the last sample is one more sample of padding (its own attention span, no loss), so that every
    position computes finite values. Samples that do not fit (their lengths were under-estimated) are left out and
    counted in `dropped`."""

    def __init__(self, labels_fn, pad_id, capacity, position_fn=None):
        self.labels_fn, self.pad_id, self.capacity, self.position_fn = labels_fn, pad_id, capacity, position_fn
        self.dropped = 0

    def __call__(self, rows):
        samples = [self._ids(s) for row in rows for s in row]
        capacity = self.capacity * len(rows)
        kept, used = [], 0
        for ids in samples:
            if used + len(ids) > capacity:
                self.dropped += 1
                continue
            kept.append(ids)
            used += len(ids)
        if not kept:
            raise ValueError(f"PackedCollator: no sample of this batch fits in {capacity} tokens")
        return self.collate(kept, capacity)

    def collate(self, samples, capacity):
        """The model inputs of `samples` packed into one row of `capacity` tokens."""
        pad = capacity - sum(map(len, samples))
        row = lambda parts, fill: torch.from_numpy(np.concatenate(  # noqa: E731
            [np.asarray(p, dtype=np.int64) for p in parts] + [np.full(pad, fill, dtype=np.int64)]))[None]
        lengths = [len(s) for s in samples] + ([pad] if pad else [])
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch = {"input_ids": row(samples, self.pad_id), "labels": row(map(self.labels_fn, samples), -100),
                 "use_cache": False, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths),
                 "max_length_k": max(lengths), "position_ids": self._positions(samples, pad)}
        return batch

    def _positions(self, samples, pad):
        if self.position_fn is None:
            return torch.cat([torch.arange(n) for n in [len(s) for s in samples] + [pad]])[None]
        lengths = torch.tensor([len(s) for s in samples] + [pad])
        # One call for all samples, right-padded to the longest (padding never shifts the positions before it);
        # then each sample's real tokens in order, and zeros for the row's tail.
        width = int(lengths[:-1].max())
        padded = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        real = torch.arange(width)[None] < lengths[:-1, None]
        padded[real] = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in samples]))
        pos = self.position_fn(padded)[:, real]  # (axes, tokens)
        return torch.cat([pos, pos.new_zeros(pos.shape[0], pad)], dim=1)[:, None]

    @staticmethod
    def _ids(sample):
        ids = sample["input_ids"] if isinstance(sample, dict) else sample
        return ids.tolist() if hasattr(ids, "tolist") else list(ids)

