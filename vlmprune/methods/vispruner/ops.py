"""VisPruner's rule as pure tensor functions (no model knowledge).

Of a group's budget ``T``, ``int(T * important_ratio)`` tokens are the ones the encoder's
[CLS] token attends to most ("important"); the rest of the budget goes to "diverse" tokens, found
among the remaining tokens (in descending score order) by repeatedly removing near-duplicates: split
the residual list alternately into ``a`` (even places) and ``b`` (odd places), give every ``a``
token its highest cosine similarity to a ``b`` token, drop the ``q = min(8, R - T_div)`` most
similar ``a`` tokens, and continue on the surviving ``a`` tokens (most similar first) followed by
all ``b`` tokens, until ``T_div`` tokens are left.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: tokens the reference drops per round at most
STEP = 8


def split_budget(total: int, important_ratio: float) -> tuple[int, int]:
    """(important, diverse) tokens of a budget: ``int(total * important_ratio)`` and the rest."""
    important = int(int(total) * float(important_ratio))
    return important, int(total) - important


def remove_duplicates(residual: Tensor, normalized: Tensor, keep: int, step: int = STEP) -> tuple[Tensor, float]:
    """The ``keep`` diverse tokens of ``residual`` (indices into ``normalized``, (N, C) unit rows),
    by VisPruner's iterative bipartite removal; returns them (in the loop's final order) and the
    FLOPs of the similarity products (as ``FlopCounterMode`` counts them).

    Each round drops ``q = min(step, R - keep)`` tokens of ``a``. The reference assumes an even
    residual length R with at least ``q`` tokens in ``a`` (its index arithmetic fails otherwise,
    e.g. for an odd R); here ``a`` takes the ceil(R / 2) even places, q is also capped at |a|, and
    every ``a`` token not dropped is kept, so any R works and equals the reference wherever it runs.
    """
    flops = 0.0
    keep = max(0, int(keep))
    while keep > 0:
        r = int(residual.numel())
        q = min(step, r - keep)
        if q <= 0:
            break
        a_idx, b_idx = residual[0::2], residual[1::2]
        q = min(q, int(a_idx.numel()))
        if b_idx.numel() == 0:  # a single token left and keep == 0 is excluded above
            break
        a, b = normalized[a_idx], normalized[b_idx]
        best = (a @ b.T).max(dim=-1).values  # (|a|,)
        flops += 2.0 * a.shape[0] * b.shape[0] * a.shape[1]
        order = torch.sort(best, descending=True, stable=True).indices
        residual = torch.cat([a_idx[order[q:]], b_idx])
    return residual, flops


def select(scores: Tensor, feats: Tensor, total: int, important_ratio: float, step: int = STEP) -> tuple[Tensor, float]:
    """Grid indices VisPruner keeps of one group (ascending raster order) and the FLOPs of the
    decision. ``scores`` (N,): importance ([CLS] attention); ``feats`` (N, C): the features whose
    cosine similarity finds duplicates; ``total``: the budget T. Ties in the score (and in the
    similarity ranking) go to the lower index."""
    n = int(scores.numel())
    total = max(0, min(int(total), n))
    important, diverse = split_budget(total, important_ratio)
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    kept, residual = order[:important], order[important:]
    flops = 0.0
    if diverse > 0:
        values = feats.float()
        normalized = values / values.norm(dim=-1, keepdim=True)
        residual, flops = remove_duplicates(residual, normalized, diverse, step)
        kept = torch.cat([kept, residual])
    return torch.sort(kept).values, flops
