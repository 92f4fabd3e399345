"""DivPrune's rule as pure tensor functions (no model knowledge).

The distance between two tokens is ``1 - cos`` of their feature vectors, over the full N x N
matrix, computed in the features' own dtype (the reference computes it in the model's half
precision). The greedy max-min heuristic then picks ``k`` tokens: first the token whose nearest
neighbour is farthest (the second-smallest entry of its column, the smallest being its distance
to itself), then, repeatedly, the token whose distance to the nearest already-picked token is
largest. Ties go to the lower index (``argmax``).

The reference scores already-picked tokens too (their distance to the picked set is their
self-distance, about 0), so with exact duplicates, or near-duplicates closer than the rounding of
the self-distance, it can pick an index again and keep fewer than ``k`` distinct tokens. Here a
picked token is never a candidate again: the result is always ``k`` distinct indices, the same
sequence as the reference's wherever the reference does not repeat itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cosine_distance(features: Tensor) -> Tensor:
    """(N, N) ``1 - cos(x_i, x_j)`` of the rows of ``features`` (N, D), in their dtype. A zero row
    (norm 0) counts as orthogonal to everything rather than producing NaN."""
    norm = features.norm(dim=1, keepdim=True).clamp_min(torch.finfo(features.dtype).tiny)
    unit = features / norm
    return 1.0 - unit @ unit.T


def distance_flops(n: int, d: int) -> float:
    """FLOPs of :func:`cosine_distance` as ``FlopCounterMode`` counts them (the N x N x D product)."""
    return 2.0 * n * n * d


def max_min_select(distance: Tensor, k: int) -> Tensor:
    """``k`` distinct indices of the (N, N) ``distance`` matrix in the order the greedy max-min rule
    picks them (see the module docstring). Needs ``1 <= k <= N``."""
    n = int(distance.shape[0])
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"max_min_select: need 1 <= k <= N, got k={k}, N={n}")
    picks = torch.empty(k, dtype=torch.long, device=distance.device)
    taken = torch.zeros(n, dtype=torch.bool, device=distance.device)
    if n == 1:
        picks[0] = 0
        return picks
    # first pick: the token whose nearest neighbour (second-smallest entry of its column) is farthest
    scores = torch.topk(distance, 2, dim=0, largest=False).values[1]
    nearest = None  # distance of every token to the nearest picked one
    for i in range(k):
        if i > 0:
            row = distance[picks[i - 1]]
            nearest = row if nearest is None else torch.minimum(nearest, row)
            scores = nearest.masked_fill(taken, float("-inf"))
        j = torch.argmax(scores)
        picks[i] = j
        taken[j] = True
    return picks


def select(features: Tensor, k: int) -> tuple[Tensor, float]:
    """DivPrune on one group: the ``k`` token indices of ``features`` (N, D) in selection order, and
    the decision's FLOPs: the distance matrix's product. The greedy passes (a column scan of the
    N x N matrix for the first pick, then a running minimum over N entries per pick) are
    comparisons, which the FLOPs convention, like ``FlopCounterMode``, does not count."""
    n, d = int(features.shape[0]), int(features.shape[1])
    picks = max_min_select(cosine_distance(features), k)
    return picks, distance_flops(n, d)
