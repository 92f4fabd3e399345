"""PyramidDrop's schedule and rule as pure functions (no model knowledge)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def default_layers(num_layers: int) -> list[int]:
    """A quarter, half and three quarters of the depth (``[8, 16, 24]`` for 32 layers), each a
    layer index in ``1..num_layers - 1``, duplicates merged."""
    picked = [min(max(1, round(num_layers * f)), num_layers - 1) for f in (0.25, 0.5, 0.75)]
    return sorted(set(picked)) if num_layers > 1 else []


def stage_keep(n: int | Tensor, lam: float, stage: int) -> int:
    """Visual tokens a sample with ``n`` at the decoder input keeps after stage ``stage`` (1-based):
    ``int(n * lam**stage)``, as the reference's ratio list ``[1, lam, lam^2, ...]`` gives."""
    return int(int(n) * (lam ** stage))


def layer_mean_share(layers: list[int], num_layers: int, lam: float) -> float:
    """Mean over decoder layers of the share of visual tokens present (ignoring the truncation)."""
    total = 0.0
    for j in range(num_layers):
        stage = sum(1 for layer in layers if layer <= j)
        total += lam ** stage
    return total / num_layers


def lam_for_budget(layers: list[int], num_layers: int, share: float) -> float | None:
    """The lambda whose layer-averaged share of visual tokens is ``share`` (bisection), or None
    when the layers cannot reach it (``share`` below the layers before the first stage)."""
    if not layers:
        return None
    low_share = layer_mean_share(layers, num_layers, 0.0)
    if share < low_share - 1e-9 or share > 1.0 + 1e-9:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if layer_mean_share(layers, num_layers, mid) < share:
            lo = mid
        else:
            hi = mid
    return max(hi, 1e-6) if not math.isnan(hi) else None


def last_token_scores(probs: Tensor) -> Tensor:
    """(B, L): the last instruction token's attention, averaged over heads then over its query row
    (one row at inference), as the reference ranks the image tokens."""
    return probs.mean(dim=1).mean(dim=1)


def pyramid_keep(scores: Tensor, visual: Tensor, n_input: Tensor, lam: float, stage: int) -> Tensor:
    """(B, L) keep mask for stage ``stage``: text rows, and the top ``int(N * lam**stage)`` visual
    rows of each sample by score (N: its visual tokens at the decoder input)."""
    from vlmprune.seams.in_llm import keep_top

    counts = torch.tensor([stage_keep(n, lam, stage) for n in n_input.tolist()])
    return keep_top(scores, visual.bool(), counts)
