"""Sequence surgery for methods that remove visual tokens before the LLM.

These functions are pure tensor code (no model knowledge) so they can be tested directly. They
take the sequence the stock model would have fed its decoder and a per-column keep mask, and
return a shorter sequence whose attention mask and positions stay consistent, re-padded so that
samples that lost different numbers of tokens still form one rectangular batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

POSITIONS = ("contiguous", "original")


@dataclass
class PrunedSequence:
    """The decoder inputs after removal, plus what decoding needs to stay consistent."""

    inputs_embeds: Tensor  # (B, L', D)
    attention_mask: Tensor | None  # (B, L') or None when no padding is needed
    position_ids: Tensor  # (B, L') or (R, B, L') for multi-axis rope
    columns: Tensor  # (B, L') original column of each new column, -1 for added padding
    next_position: Tensor  # (B,) position the next appended token gets
    removed: Tensor  # (B,) real tokens removed per sample


def padding_side(attention_mask: Tensor | None) -> str:
    """Infer the padding side from a 2-D mask: right padding iff some row ends on a pad."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return "left"
    if bool((attention_mask[:, -1] == 0).any()) and bool((attention_mask[:, 0] == 1).all()):
        return "right"
    return "left"


def default_positions(attention_mask: Tensor | None, batch: int, length: int, past: int, device) -> Tensor:
    """Positions the stock decoder would use when none are given: a plain arange after the cache."""
    del attention_mask  # HF decoders ignore padding when inventing positions; so do we.
    pos = torch.arange(past, past + length, device=device)
    return pos.unsqueeze(0).expand(batch, length)


def prune_sequence(
    inputs_embeds: Tensor,
    keep: Tensor,
    attention_mask: Tensor | None,
    position_ids: Tensor,
    *,
    positions: str = "contiguous",
) -> PrunedSequence:
    """Drop the columns where ``keep`` is False and re-pad each sample to the longest.

    ``position_ids`` has the sequence on its last axis and the batch on the one before (1-D rope:
    (B, L); Qwen2-VL's M-RoPE: (3, B, L)). In ``contiguous`` mode the kept tokens are renumbered so
    that no gap is left where tokens were removed (the FasterVLM / LLaVA reference behaviour); in
    ``original`` mode every kept token keeps the position it had in the full sequence.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    bsz, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    keep = keep.to(device=device, dtype=torch.bool)
    real = attention_mask.to(device).bool() if attention_mask is not None else torch.ones_like(keep)
    side = padding_side(attention_mask)
    pos = position_ids
    if pos.dim() == 2:
        pos = pos.unsqueeze(0)
    if pos.shape[-2] != bsz:
        pos = pos.expand(pos.shape[0], bsz, length)
    removed = ((~keep) & real).sum(dim=1)
    if positions == "contiguous":
        # shift every token back by the number of real tokens removed before it
        shift = torch.cumsum(((~keep) & real).long(), dim=1)
        pos = pos - shift.unsqueeze(0)
    # old padding goes too; the re-padding below adds back only what the new lengths need
    keep = keep & real
    counts = keep.sum(dim=1)
    new_len = int(counts.max().item()) if bsz else 0
    columns = torch.full((bsz, new_len), -1, dtype=torch.long, device=device)
    for b in range(bsz):
        idx = torch.nonzero(keep[b], as_tuple=False).squeeze(1)
        n = idx.numel()
        if side == "left":
            columns[b, new_len - n :] = idx
        else:
            columns[b, :n] = idx
    pad = columns < 0
    gather_cols = columns.clamp(min=0)
    new_embeds = torch.gather(
        inputs_embeds, 1, gather_cols.unsqueeze(-1).expand(bsz, new_len, inputs_embeds.shape[-1])
    )
    new_embeds = new_embeds.masked_fill(pad.unsqueeze(-1), 0)
    new_real = torch.gather(real, 1, gather_cols) & ~pad
    new_pos = torch.gather(pos, 2, gather_cols.unsqueeze(0).expand(pos.shape[0], bsz, new_len))
    new_pos = new_pos.masked_fill(pad.unsqueeze(0), 0)
    if attention_mask is None and not bool(pad.any()):
        new_mask = None
    else:
        dtype = attention_mask.dtype if attention_mask is not None else torch.long
        new_mask = new_real.to(dtype)
    # next position: one past the largest position of a real token, per sample (max over rope axes)
    masked = new_pos.masked_fill(~new_real.unsqueeze(0), torch.iinfo(new_pos.dtype).min)
    next_position = masked.amax(dim=(0, 2)) + 1
    next_position = torch.where(new_real.any(dim=1), next_position, torch.zeros_like(next_position))
    if position_ids.dim() == 2:
        new_pos = new_pos[0]
    return PrunedSequence(new_embeds, new_mask, new_pos, columns, next_position, removed)


def gather_columns(values: Tensor, columns: Tensor, fill: int | float) -> Tensor:
    """Apply the column map of :func:`prune_sequence` to another (B, L) tensor, e.g. labels."""
    out = torch.gather(values, 1, columns.clamp(min=0).to(values.device))
    return out.masked_fill(columns.to(values.device) < 0, fill)


def decode_positions(next_position: Tensor, new_tokens: int, rope_axes: int | None) -> Tensor:
    """Positions of tokens appended after a pruned prefill: continue from each sample's last one."""
    steps = torch.arange(new_tokens, device=next_position.device)
    pos = next_position.unsqueeze(1) + steps.unsqueeze(0)
    if rope_axes is None:
        return pos
    return pos.unsqueeze(0).expand(rope_axes, *pos.shape).contiguous()


def layer_mask(
    valid_keys: Tensor,
    query_len: int,
    like: Tensor | None,
    blocked: Tensor | None = None,
) -> Tensor:
    """A 4-D attention mask (B, 1, q, kv) for the last ``query_len`` of ``kv`` cached columns.

    For decoder layers whose sequence a method changed, where the stock mask no longer fits:
    query ``r`` sits at key column ``kv - q + r`` and sees the valid keys up to itself (causal,
    in the order the cache holds them). ``blocked`` (B, q, kv) removes further keys per query.
    The result has the form of ``like``, the mask the stock model built for the layer: boolean
    (True = attend, SDPA) when ``like`` is None or boolean, additive float of its dtype otherwise
    (eager). A query with no key left (a padding row) attends everywhere, as transformers does,
    so no NaN appears in rows whose output is never used.
    """
    bsz, kv = valid_keys.shape
    device = valid_keys.device
    rows = torch.arange(query_len, device=device).unsqueeze(1) + (kv - query_len)
    causal = torch.arange(kv, device=device).unsqueeze(0) <= rows  # (q, kv)
    allowed = causal.unsqueeze(0) & valid_keys.bool().unsqueeze(1)  # (B, q, kv)
    if blocked is not None:
        allowed = allowed & ~blocked.to(device)
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty
    allowed = allowed.unsqueeze(1)
    if like is None or like.dtype == torch.bool:
        return allowed
    out = torch.zeros(allowed.shape, dtype=like.dtype, device=device)
    return out.masked_fill(~allowed, torch.finfo(like.dtype).min)


def gather_sequence(values: Tensor, columns: Tensor, dim: int) -> Tensor:
    """Pick ``columns`` (B, L') along the sequence axis ``dim`` of ``values``, whose batch axis is
    ``dim - 1`` (size B or 1, broadcast); padding columns (-1) pick column 0 (their rows are masked)."""
    if dim < 0:
        dim += values.dim()
    bsz, new_len = columns.shape
    shape = list(values.shape)
    if shape[dim - 1] != bsz:
        shape[dim - 1] = bsz
        values = values.expand(*shape)
    index_shape = [1] * values.dim()
    index_shape[dim - 1], index_shape[dim] = bsz, new_len
    index = columns.clamp(min=0).to(values.device).view(index_shape)
    expand = list(values.shape)
    expand[dim] = new_len
    return torch.gather(values, dim, index.expand(*expand))
