"""Pure tensor functions: token importance scores and selections. No model knowledge here."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, C) -> (B, H, T, C/H)."""
    b, t, c = x.shape
    return x.view(b, t, num_heads, c // num_heads).transpose(1, 2)


def cls_attention_scores(q_cls: Tensor, keys: Tensor, num_heads: int, scale: float | None = None) -> Tensor:
    """The [CLS] query's attention over the patch keys, averaged over heads (FasterVLM's score).

    ``q_cls`` (B, C) is the projected query of token 0, ``keys`` (B, 1+N, C) the projected keys of
    the same layer. The softmax runs over all 1+N keys in fp32 and the [CLS] column is dropped
    afterwards without renormalising, exactly as slicing the eager attention map would. Computing
    this one row costs O(N*C) and leaves the layer itself on SDPA / flash attention.
    """
    head_dim = q_cls.shape[-1] // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    q = _heads(q_cls.unsqueeze(1).float(), num_heads)  # (B,H,1,d)
    k = _heads(keys.float(), num_heads)  # (B,H,1+N,d)
    probs = torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)  # (B,H,1,1+N)
    return probs[:, :, 0, 1:].mean(dim=1)


def mean_received_attention(
    queries: Tensor, keys: Tensor, num_heads: int, scale: float | None = None, chunk: int = 256
) -> Tensor:
    """Average attention each key receives over all queries and heads (the no-[CLS] fallback).

    Chunked over queries so memory stays O(chunk * N) instead of materialising the full map.
    ``queries`` / ``keys``: (B, N, C) -> (B, N).
    """
    head_dim = queries.shape[-1] // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    q = _heads(queries.float(), num_heads)
    k = _heads(keys.float(), num_heads)
    total = torch.zeros(k.shape[0], k.shape[1], k.shape[2], device=k.device)
    for start in range(0, q.shape[2], chunk):
        probs = torch.softmax((q[:, :, start : start + chunk] * scale) @ k.transpose(-1, -2), dim=-1)
        total += probs.sum(dim=2)
    return (total / q.shape[2]).mean(dim=1)


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores, returned in ascending (raster) order.

    Exact ties go to the lowest index. ``torch.topk`` breaks ties arbitrarily (its choice depends on
    the vector's length and layout), which made the kept set of an image depend on the batch it
    came in; a stable descending sort gives the same set as ``topk`` whenever there is no tie."""
    k = max(0, min(int(k), scores.numel()))
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(idx).values


def pool_scores(scores: Tensor, grid: tuple[int, int], factor: int) -> Tensor:
    """Average scores over ``factor x factor`` blocks of a row-major grid (features pooled alike)."""
    h, w = grid
    s = scores.view(1, 1, h, w)
    return F.avg_pool2d(s, factor).flatten()


def pooled_grid(grid: tuple[int, int], ratio: float) -> tuple[int, int]:
    """Output grid of spatial pooling that keeps about ``1 - ratio`` of the tokens."""
    f = math.sqrt(1.0 - ratio)
    return max(1, round(grid[0] * f)), max(1, round(grid[1] * f))


def adaptive_pool_weights(grid: tuple[int, int], out: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Averaging matrix of adaptive average pooling from ``grid`` to ``out`` (as avg-pool bins).

    Returns (anchors, weights): ``weights[r]`` averages the grid tokens of output bin ``r`` and
    ``anchors[r]`` is the bin's top-left grid token, whose position the pooled token takes.
    """
    h, w = grid
    oh, ow = out
    weights = torch.zeros(oh * ow, h * w)
    anchors = torch.zeros(oh * ow, dtype=torch.long)
    for i in range(oh):
        r0, r1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        for j in range(ow):
            c0, c1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            rows = torch.arange(r0, r1).unsqueeze(1) * w + torch.arange(c0, c1).unsqueeze(0)
            weights[i * ow + j, rows.flatten()] = 1.0 / rows.numel()
            anchors[i * ow + j] = r0 * w + c0
    return anchors, weights
