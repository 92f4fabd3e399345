"""DToMe token merging as pure tensor functions (DyMU's encoder half; ToMe's algorithm with thresholds).

Everything here works on a padded batch: ``valid`` (B, N) marks real tokens, which always come first in
each row, so the bipartite split of a sample's real tokens is the same alone or batched. State per row:

* ``x`` (B, N, C): token features;
* ``size`` (B, N): how many original tokens each one stands for (0 on padding);
* ``pos`` (B, N, N0): 0/1 membership of each token over the N0 original tokens (``pos.sum(-1) == size``).

No model knowledge: the caller gives the metric (the block's keys averaged over heads) and the rule
(a per-layer threshold, or a batch-wide count during calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG = float("-inf")


@dataclass
class MergeState:
    """One encoder call's token bookkeeping (rows = images / crops given to the tower)."""

    size: Tensor  # (B, N) float, 0 on padding
    pos: Tensor  # (B, N, N0) float 0/1 membership
    valid: Tensor  # (B, N) bool, real tokens first

    @classmethod
    def start(cls, batch: int, length: int, device: torch.device | str) -> MergeState:
        eye = torch.eye(length, device=device).unsqueeze(0).expand(batch, length, length).clone()
        return cls(
            size=torch.ones(batch, length, device=device),
            pos=eye,
            valid=torch.ones(batch, length, dtype=torch.bool, device=device),
        )

    @property
    def counts(self) -> Tensor:
        """(B,) real tokens per row."""
        return self.valid.sum(dim=1)

    @property
    def merged(self) -> bool:
        """Whether anything was merged or padded yet (attention needs no bias before that)."""
        return bool((self.size != 1).any()) or not bool(self.valid.all())


@dataclass
class Matching:
    """The bipartite graph of one layer: every A token's best B partner and its score."""

    score: Tensor  # (B, Na) best cosine per A token, -inf where it may not merge
    dst: Tensor  # (B, Na) index into the B set


def bipartite_match(metric: Tensor, valid: Tensor, protect_first: bool) -> Matching:
    """ToMe's bipartite soft matching graph: A = even, B = odd positions; each A token picks its most
    similar B token by cosine similarity. Edges touching padding and, with ``protect_first``, the
    [CLS] token (index 0, always in A) get -inf, so they never merge."""
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(1, 2)  # (B, Na, Nb)
    va, vb = valid[:, ::2], valid[:, 1::2]
    scores = scores.masked_fill(~va.unsqueeze(2) | ~vb.unsqueeze(1), NEG)
    if protect_first:
        scores[:, 0, :] = NEG
    if scores.shape[2] == 0:
        empty = torch.full(va.shape, NEG, device=metric.device)
        return Matching(empty, torch.zeros(va.shape, dtype=torch.long, device=metric.device))
    score, dst = scores.max(dim=2)
    return Matching(score, dst)


def _cap(valid: Tensor, protect_first: bool) -> Tensor:
    """(B,) most merges one layer may make per row: (N_real - protected) // 2, as the reference."""
    return (valid.sum(dim=1) - int(protect_first)).clamp(min=0) // 2


def threshold_merges(match: Matching, valid: Tensor, threshold: float, protect_first: bool) -> Tensor:
    """(B, Na) bool: the inference rule. Every edge scoring strictly above ``threshold`` merges, at most
    ``(N - protected) // 2`` per row, the highest scores first. Per row, so batching changes nothing."""
    above = match.score > threshold
    order = match.score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return above & (rank < _cap(valid, protect_first).unsqueeze(1))


def batch_topk_merges(match: Matching, r: int) -> tuple[Tensor, float]:
    """Calibration rule: merge the ``B * r`` best edges of the whole batch (so redundant images give
    more), and return the batch threshold: the score of the best edge left unmerged, clamped to >= 0
    (the reference's ``node_max[edge_idx[B * r]]``). When every edge merged it is 0 (+inf with no edge)."""
    bsz, na = match.score.shape
    flat = match.score.reshape(-1)
    k = min(bsz * int(r), int(torch.isfinite(flat).sum()))
    order = flat.argsort(descending=True, stable=True)
    merge = torch.zeros_like(flat, dtype=torch.bool)
    merge[order[:k]] = True
    nxt = flat[order[k]] if k < flat.numel() else torch.tensor(NEG)
    if bool(torch.isfinite(nxt)):
        tau = float(nxt.clamp(min=0))
    else:  # every edge merged (B·r asked for more than the batch has): any threshold below them all
        tau = 0.0 if k > 0 else float("inf")
    return merge.view(bsz, na), tau


def merge_tokens(
    x: Tensor, state: MergeState, match: Matching, merge: Tensor, unmerged_by_score: bool = False
) -> tuple[Tensor, MergeState]:
    """Merge the chosen A tokens into their B partners (size-weighted average, sizes and membership
    summed), then lay each row out as ToMe does: [unmerged A ; all B] in their current relative order,
    real tokens first, cut to the longest row. Rows that merge nothing keep their order unchanged.

    ``unmerged_by_score``: order the unmerged A tokens by their best edge's score, highest first, as
    ToMe leaves them when there is no [CLS] token to keep first (SigLIP in the reference code)."""
    bsz, n, c = x.shape
    merge = merge & torch.isfinite(match.score)
    xa, xb = x[:, ::2], x[:, 1::2]
    sa, sb = state.size[:, ::2], state.size[:, 1::2]
    pa, pb = state.pos[:, ::2], state.pos[:, 1::2]
    w = sa * merge  # (B, Na) weight each A token adds to its partner
    dst = match.dst
    num = xb.float() * sb.unsqueeze(-1)
    num = num.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, c), xa.float() * w.unsqueeze(-1))
    den = sb.scatter_add(1, dst, w)
    new_b = (num / den.clamp_min(1e-12).unsqueeze(-1)).to(x.dtype)
    # rows of B that received nothing keep their exact values (no round trip through the division)
    touched = torch.zeros_like(sb, dtype=torch.long).scatter_add(1, dst, merge.long()) > 0  # bool scatter races
    new_b = torch.where(touched.unsqueeze(-1), new_b, xb)
    new_pb = pb.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, pb.shape[-1]), pa * merge.unsqueeze(-1).to(pa.dtype))

    va, vb = state.valid[:, ::2], state.valid[:, 1::2]
    keep_a = va & ~merge
    big = n + 1
    if unmerged_by_score:
        by_score = match.score.masked_fill(~keep_a, NEG).argsort(dim=1, descending=True, stable=True)
        rank_a = torch.empty_like(by_score)
        rank_a.scatter_(1, by_score, torch.arange(by_score.shape[1], device=x.device).expand_as(by_score))
        key_a = torch.where(keep_a, rank_a, big)
    else:
        key_a = torch.where(keep_a, keep_a.long().cumsum(1) - 1, big)
    key_b = torch.where(vb, keep_a.sum(1, keepdim=True) + vb.long().cumsum(1) - 1, big)
    idx = torch.arange(n, device=x.device)
    # back in the interleaved layout: position 2i holds A_i, 2i+1 holds B_i
    key = torch.empty(bsz, n, dtype=torch.long, device=x.device)
    key[:, ::2], key[:, 1::2] = key_a, key_b
    untouched = ~merge.any(dim=1, keepdim=True)
    key = torch.where(untouched, torch.where(state.valid, idx, big), key)
    order = key.argsort(dim=1, stable=True)
    new_len = int((key < big).sum(1).max()) if bsz else 0
    order = order[:, :new_len]

    full_x = x.clone()
    full_x[:, 1::2] = new_b
    full_size = state.size.clone()
    full_size[:, 1::2] = den
    full_size[:, ::2] = sa * ~merge
    full_pos = state.pos.clone()
    full_pos[:, 1::2] = new_pb
    full_pos[:, ::2] = pa * (~merge).unsqueeze(-1).to(pa.dtype)
    valid = torch.gather(key < big, 1, order)
    out_x = torch.gather(full_x, 1, order.unsqueeze(-1).expand(-1, -1, c))
    size = torch.gather(full_size, 1, order) * valid
    pos = torch.gather(full_pos, 1, order.unsqueeze(-1).expand(-1, -1, full_pos.shape[-1])) * valid.unsqueeze(-1)
    out_x = out_x.masked_fill(~valid.unsqueeze(-1), 0)
    return out_x, MergeState(size=size, pos=pos, valid=valid)


def attention_bias(state: MergeState, dtype: torch.dtype) -> Tensor | None:
    """(B, 1, 1, N) additive key bias: log(size) (proportional attention) on real keys, the dtype's
    minimum on padding; None while nothing has been merged (the stock layer's exact call)."""
    if not state.merged:
        return None
    bias = state.size.clamp_min(1).log().to(dtype)
    bias = bias.masked_fill(~state.valid, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def first_member(pos: Tensor) -> Tensor:
    """(B, N) smallest original index each token holds (N0 for empty / padding tokens)."""
    n0 = pos.shape[-1]
    idx = torch.arange(n0, device=pos.device)
    return torch.where(pos > 0, idx, n0).amin(dim=-1)


def canonical_order(x: Tensor, state: MergeState) -> tuple[Tensor, MergeState]:
    """Sort each row's tokens by their smallest original index (padding last). The reference order is
    an artefact of the matching; this one is the same for a sample alone or in any batch."""
    key = first_member(state.pos).masked_fill(~state.valid, state.pos.shape[-1] + 1)
    order = key.argsort(dim=1, stable=True)
    c = x.shape[-1]
    return (
        torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, c)),
        MergeState(
            size=torch.gather(state.size, 1, order),
            pos=torch.gather(state.pos, 1, order.unsqueeze(-1).expand(-1, -1, state.pos.shape[-1])),
            valid=torch.gather(state.valid, 1, order),
        ),
    )


def expansion_index(pos: Tensor, drop: int = 0) -> Tensor:
    """(B, N0 - drop) long: for every original token (after dropping the first ``drop``, e.g. [CLS]), the
    row index of the merged token that holds it, shifted by ``-drop`` to index the features the stock
    model keeps after the same drop."""
    member = pos[:, :, drop:]  # (B, N, N0 - drop)
    return member.argmax(dim=1) - drop


def schedule(r_total: int, layers: int, kind: str = "constant") -> list[int]:
    """Per-layer merge counts summing to ``r_total`` (the reference's ``constant`` schedule: equal
    shares, the remainder on the first layers; ``linear`` decreasing, ``reverse_linear`` increasing)."""
    if layers <= 0:
        return []
    if kind == "constant":
        base, rem = divmod(int(r_total), layers)
        return [base + (1 if i < rem else 0) for i in range(layers)]
    if kind in ("linear", "reverse_linear"):
        weights = torch.arange(layers, 0, -1, dtype=torch.float64)
        if kind == "reverse_linear":
            weights = weights.flip(0)
        raw = weights / weights.sum() * r_total
        out = raw.floor().long()
        rem = int(r_total - out.sum())
        for i in (raw - out).argsort(descending=True)[:rem].tolist():
            out[i] += 1
        return out.tolist()
    raise ValueError(f"schedule must be 'constant', 'linear' or 'reverse_linear', got {kind!r}")
