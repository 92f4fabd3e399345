"""CDPruner's rule as pure tensor functions (no model knowledge).

* Similarity ``S``: cosine of the tokens' projector outputs, the rows L2-normalised in their own
  dtype, then the product in float32 (as the reference).
* Relevance ``r``: for every token the mean over the instruction's vectors of the **negated**
  cosine between the token and that vector, then min-max normalised as the reference does,
  ``(r - min + 1e-6) / (max - min)`` (float32).
* Kernel ``L = diag(r) S diag(r)``.
* Selection: the greedy MAP of the DPP with kernel ``L`` (the fast incremental Cholesky form of
  Chen et al., 2018): ``d2 = diag(L)``; each step picks ``j = argmax d2`` (ties: lower index),
  ``e = (L[j] - C[:, j]^T C) / sqrt(d2[j])``, appends ``e`` to ``C``, ``d2 -= e**2`` and retires
  ``j``. No early stop and no jitter, as the reference.

Beyond the kernel's rank (a budget larger than the embedding width) no token adds volume: ``d2``
is rounding noise, and once it is zero or negative the arithmetic turns to NaN. The reference
then retires only the index it just picked, so NaN revives the others and it can pick an index
twice (fewer than ``T`` distinct tokens). Here every picked index stays retired: the steps are the
reference's while its numbers are defined, NaN steps take the lowest unpicked index, and the
result is always ``T`` distinct indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: the reference's offset in the min-max normalisation of the relevance
EPS = 1e-6


def _unit(x: Tensor) -> Tensor:
    """Rows of ``x`` divided by their norm (a zero row stays zero instead of NaN)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def similarity(features: Tensor) -> Tensor:
    """(N, N) float32 cosine similarity of the rows of ``features`` (N, D), normalised in their dtype."""
    unit = _unit(features).float()
    return unit @ unit.T


def relevance(features: Tensor, instruction: Tensor) -> Tensor:
    """(N,) float32 relevance of every token to the instruction's vectors (M, D): the mean over
    the M vectors of ``-cos``, then ``(r - min + 1e-6) / (max - min)``. No vectors (M = 0), or all
    tokens equally relevant (max == min), give uniform relevance (all ones)."""
    n = int(features.shape[0])
    if instruction.shape[0] == 0 or n == 0:
        return torch.ones(n, dtype=torch.float32, device=features.device)
    cos = _unit(features.float()) @ _unit(instruction.float().to(features.device)).T  # (N, M)
    r = (-cos).mean(dim=-1)
    span = r.max() - r.min()
    if not bool(span > 0):
        return torch.ones_like(r)
    return (r - r.min() + EPS) / span


def kernel(similarity: Tensor, relevance: Tensor | None = None) -> Tensor:
    """``L = diag(r) S diag(r)`` (``S`` itself when there is no relevance)."""
    if relevance is None:
        return similarity
    return relevance.unsqueeze(1) * similarity * relevance.unsqueeze(0)


def greedy_map(L: Tensor, t: int) -> Tensor:
    """(t,) the indices the fast greedy MAP of a DPP with kernel ``L`` (N, N) picks, in order."""
    n = int(L.shape[0])
    t = int(t)
    if not 0 <= t <= n:
        raise ValueError(f"greedy_map: need 0 <= t <= N, got t={t}, N={n}")
    c = L.new_zeros(t, n)
    d2 = torch.diagonal(L).clone()
    picks = torch.empty(t, dtype=torch.long, device=L.device)
    taken = torch.zeros(n, dtype=torch.bool, device=L.device)
    for i in range(t):
        j = torch.argmax(d2)
        picks[i] = j
        taken[j] = True
        row = L[j]
        if i > 0:
            row = row - (c[:i, j].unsqueeze(0) @ c[:i]).squeeze(0)
        e = row / torch.sqrt(d2[j])
        c[i] = e
        # retired entries stay -inf (the reference sets only d2[j]; -inf - NaN would revive the others)
        d2 = (d2 - torch.square(e)).masked_fill(taken, float("-inf"))
    return picks


def similarity_flops(n: int, d: int) -> float:
    """FLOPs of :func:`similarity` as ``FlopCounterMode`` counts them: the N x N x D product."""
    return 2.0 * n * n * d


def relevance_flops(n: int, m: int, d: int) -> float:
    """FLOPs of :func:`relevance`: the N x M x D product."""
    return 2.0 * n * m * d


def greedy_map_flops(n: int, t: int) -> float:
    """FLOPs of :func:`greedy_map`: step i (from 0) multiplies its i earlier vectors' entries at
    ``j`` into their N-vectors, 2 * i * N; summed over t steps, N * t * (t - 1)."""
    return float(n) * t * (t - 1)


def select(features: Tensor, instruction: Tensor | None, t: int) -> tuple[Tensor, float]:
    """CDPruner on one group: the ``t`` token indices of ``features`` (N, D) in the order the greedy
    MAP picks them, and the decision's FLOPs (similarity, relevance and the greedy's products).
    ``instruction`` (M, D): the vectors the relevance compares against; None: uniform relevance."""
    n, d = int(features.shape[0]), int(features.shape[1])
    S = similarity(features)
    flops = similarity_flops(n, d)
    r = None
    if instruction is not None:
        r = relevance(features, instruction)
        if instruction.shape[0] > 0:
            flops += relevance_flops(n, int(instruction.shape[0]), d)
    picks = greedy_map(kernel(S, r), t)
    return picks, flops + greedy_map_flops(n, t)
