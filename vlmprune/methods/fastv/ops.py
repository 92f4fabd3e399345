"""FastV's rule as pure tensor functions (no model knowledge)."""

from __future__ import annotations

import torch
from torch import Tensor


def last_token_scores(probs: Tensor) -> Tensor:
    """(B, L): the attention the last query row pays every key, averaged over heads.

    ``probs`` (B, H, 1, L): post-softmax attention of each sample's last prompt token (the
    reference reads ``mean(attn, heads)[-1]`` of layer K-1's eager map)."""
    return probs.mean(dim=1)[:, -1]


def kept_counts(visual: Tensor, ratio: float) -> list[int]:
    """Visual tokens each sample keeps: ``round(N * (1 - ratio))`` of its N, Python's rounding, as
    the reference's ``topk(round(N * (1 - r)))``."""
    return [int(round(int(n) * (1.0 - ratio))) for n in visual.sum(dim=1)]


def fastv_keep(scores: Tensor, visual: Tensor, ratio: float) -> Tensor:
    """(B, L) keep mask: text rows and the top ``round(N * (1 - ratio))`` visual rows by score."""
    from vlmprune.seams.in_llm import keep_top

    return keep_top(scores, visual.bool(), torch.tensor(kept_counts(visual, ratio)))
