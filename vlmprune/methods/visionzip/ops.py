"""VisionZip's rules as pure tensor functions (no model knowledge).

* :func:`split_budget`: a group's token budget as ``dominant + contextual``, in the proportion of
  the paper's LLaVA-1.5 settings (54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192).
* :func:`contextual_merge`: the contextual tokens: of the tokens left after the dominant ones, in
  the order given, every ``s``-th one is a target (``s = max(1, R // C)``, the first C of them);
  every other token joins the target whose key it is most similar to (cosine, first target on a
  tie), and a contextual token is its target plus the mean of the tokens that joined it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: the paper's share of contextual tokens in a budget: 10 of 64, 20 of 128, 30 of 192
CONTEXTUAL_SHARE = 10 / 64


def split_budget(total: int, contextual_share: float = CONTEXTUAL_SHARE) -> tuple[int, int]:
    """(dominant, contextual) for a budget of ``total`` tokens: ``contextual = round(total * share)``
    (halves up), at least one and at most ``total - 1`` once there are two tokens to share; one
    token is a dominant one. 64 -> (54, 10), 128 -> (108, 20), 26 -> (22, 4), 13 -> (11, 2)."""
    total = int(total)
    if total <= 1:
        return max(total, 0), 0
    contextual = int(total * float(contextual_share) + 0.5)
    contextual = min(max(contextual, 1), total - 1)
    return total - contextual, contextual


@dataclass
class ContextualMerge:
    """The outcome of :func:`contextual_merge` over R tokens: ``targets`` (C,) their places in the
    given order, ``assign`` (R,) the target slot (0..C-1) each token went to (a target: its own),
    ``tokens`` (C, dim) the contextual tokens in target order, ``flops`` the matrix products' cost
    (counted as ``torch.utils.flop_counter.FlopCounterMode`` counts them)."""

    targets: Tensor
    assign: Tensor
    tokens: Tensor
    flops: float


def merge_flops(remaining: int, contextual: int, key_dim: int, feat_dim: int) -> float:
    """Matrix-product FLOPs of :func:`contextual_merge` on ``remaining`` tokens: the cosine
    similarities of the non-targets to the targets and the one-hot sum of each target's members."""
    if remaining <= 0 or contextual <= 0:
        return 0.0
    step = max(1, remaining // contextual)
    c = len(range(0, remaining, step)[:contextual])
    others = remaining - c
    return 2.0 * others * c * key_dim + 2.0 * c * others * feat_dim


def contextual_merge(keys: Tensor, feats: Tensor, contextual: int) -> ContextualMerge:
    """Merge R tokens (``keys`` (R, d) for the similarity, ``feats`` (R, dim) for the result) into
    ``contextual`` tokens, VisionZip's rule. Keys are L2-normalised; the similarity and the sums run
    in float32 and the tokens come back in ``feats``' dtype. With fewer than ``contextual`` tokens
    every token is its own target (no merging), so fewer tokens come back."""
    r = int(keys.shape[0])
    if r == 0 or contextual <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=keys.device)
        return ContextualMerge(empty, torch.zeros(r, dtype=torch.long, device=keys.device),
                               feats.new_zeros(0, feats.shape[-1]), 0.0)
    metric = keys.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, r // contextual)
    targets = torch.arange(0, r, step, device=keys.device)[:contextual]
    c = int(targets.numel())
    is_target = torch.zeros(r, dtype=torch.bool, device=keys.device)
    is_target[targets] = True
    others = torch.nonzero(~is_target).squeeze(1)
    similarity = metric[others] @ metric[targets].T  # (R - C, C)
    choice = similarity.argmax(dim=1)  # first target on a tie
    one_hot = torch.zeros(others.numel(), c, dtype=torch.float32, device=keys.device)
    one_hot[torch.arange(others.numel(), device=keys.device), choice] = 1.0
    counts = one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
    values = feats.float()
    merged = values[targets] + (one_hot.T @ values[others]) / counts
    assign = torch.empty(r, dtype=torch.long, device=keys.device)
    assign[targets] = torch.arange(c, device=keys.device)
    assign[others] = choice
    return ContextualMerge(targets, assign, merged.to(feats.dtype),
                           merge_flops(r, contextual, int(keys.shape[-1]), int(feats.shape[-1])))
