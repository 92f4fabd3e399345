"""SparseVLM's rules as pure tensor functions (no model knowledge): text raters, the visual
tokens' scores, the kept count per stage, and the recycling of pruned tokens (DPC-kNN clustering)."""

from __future__ import annotations

import torch
from torch import Tensor

#: the reference's kept visual tokens per stage for LLaVA-1.5's 576, by token budget (v1.5)
BUDGETS: dict[int, tuple[int, ...]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
REFERENCE_TOKENS = 576
REFERENCE_DEPTH = 32
LAYERS = {"v1.5": (2, 6, 15), "v1": (2, 6, 15, 19)}
#: v1 (first release): kept = rank(A) * scale + bias, by budget
V1_PRESETS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
RECYCLE_SHARE = 0.3  # of the pruned tokens, the top 30 % by score are recycled
CLUSTER_SHARE = 10  # one merged token per 10 recycled ones (plus one)


def default_layers(version: str, num_layers: int) -> list[int]:
    """The reference's pruning layers for 32 layers, scaled to ``num_layers`` (rounded, strictly
    increasing, each before the last layer)."""
    out: list[int] = []
    for layer in LAYERS[version]:
        v = round(layer * num_layers / REFERENCE_DEPTH)
        v = max(v, out[-1] + 1 if out else 0)
        if v <= num_layers - 2:
            out.append(v)
    return out


def select_raters(visual: Tensor, text: Tensor) -> Tensor:
    """(T,) bool: the text tokens that rate the visual ones.

    ``visual`` (N, D) and ``text`` (T, D): the LLM-input embeddings of the visual tokens and of the
    text after them. Each visual token's softmax over the text of the raw dot products, averaged
    over the visual tokens, gives one relevance per text token; the raters are those above the
    mean relevance."""
    relevance = torch.softmax(visual.float() @ text.float().T, dim=1).mean(dim=0)
    return relevance > relevance.mean()


def rater_scores(probs: Tensor, weights: Tensor) -> Tensor:
    """(B, L): attention each key receives from the raters, mean over heads then over raters.

    ``probs`` (B, H, R, L); ``weights`` (B, R): 1 for a real rater row, 0 for padding."""
    per_row = probs.mean(dim=1)  # (B, R, L)
    w = weights.float()
    return (per_row * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1)


def stage_count(budget: int, stage: int, n_visual_input: int) -> int:
    """The v1.5 count of stage ``stage`` (0-based), scaled from 576 visual tokens to the sample's."""
    count = BUDGETS[budget][stage]
    if n_visual_input == REFERENCE_TOKENS:
        return count
    return int(round(count * n_visual_input / REFERENCE_TOKENS))


def rank_count(attention: Tensor, scale: float, bias: float) -> tuple[int, int]:
    """(rank, count) of v1: ``attention`` (R, V) rater-to-visual attention (mean over heads); the
    count is ``int(rank * scale + bias)``."""
    rank = int(torch.linalg.matrix_rank(attention.float()))
    return rank, int(rank * scale + bias)


def recycle_counts(pruned: int) -> tuple[int, int]:
    """(recycled, clusters) for ``pruned`` pruned tokens: the top ``int(0.3 * P) + 1`` by score are
    recycled into ``int(recycled / 10) + 1`` merged tokens (none when nothing was pruned)."""
    if pruned <= 0:
        return 0, 0
    recycled = int(pruned * RECYCLE_SHARE) + 1
    return recycled, int(recycled / CLUSTER_SHARE) + 1


def cluster_and_merge(x: Tensor, clusters: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """DPC-kNN clustering of ``x`` (N, C) into ``clusters`` merged tokens, as the reference does.

    Distances are L2 / sqrt(C); density = exp(-mean squared distance to the ``clusters`` nearest);
    a tiny uniform noise (``generator``) separates equal densities; each token's distance
    indicator is its distance to the nearest denser token (the largest distance for the densest);
    centres are the top ``clusters`` of indicator x density; every token joins its nearest centre
    and each merged token is the mean of its cluster. Returns ((clusters, C) merged tokens in
    centre order, (clusters,) the centres' indices)."""
    n, c = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / (c ** 0.5)
    nearest = torch.topk(dist, k=clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    noise = torch.rand(density.shape, generator=generator, dtype=density.dtype) if generator is not None else torch.rand_like(density)
    density = density + noise.to(density.device) * 1e-6
    denser = (density[None, :] > density[:, None]).float()
    dist_max = dist.max()
    indicator = (dist * denser + dist_max * (1 - denser)).min(dim=-1).values
    centres = torch.topk(indicator * density, k=clusters).indices
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(clusters, device=x.device)
    counts = torch.zeros(clusters, device=x.device).index_add_(0, assign, torch.ones(n, device=x.device)) + 1e-6
    merged = torch.zeros(clusters, c, device=x.device).index_add_(0, assign, xf / counts[assign].unsqueeze(1))
    return merged.to(x.dtype), centres
