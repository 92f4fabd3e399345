"""Pure pooling functions for video tokens (Slow-Fast and SlowFast-LLaVA, as in the papers' reference code).

No model knowledge here: every function takes per-frame token grids ``(T, h, w, D)`` and returns
pooled grids, so the counts and the averages can be tested directly. The slow-fast method uses
them through the pre-LLM seam (:mod:`vlmprune.methods.slowfast`).

Two pathways are defined:

* :func:`fast_pathway` is the trained Slow-Fast MLLM's ``split_slow_fast_tokens`` (reference code):
  zero-pad in time to a multiple of ``s*t``, keep every ``s``-th frame, average ``t`` consecutive
  frames, average ``p x p`` spatial windows (floor, like ``avg_pool2d``).
* :func:`slowfast_llava` is the training-free SlowFast-LLaVA (its paper): a slow block of a few
  uniformly spaced frames with light pooling followed by a fast block of every frame with heavy
  pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    a, b = x
    return int(a), int(b)


def uniform_indices(total: int, count: int) -> list[int]:
    """Frames ``linspace(0, total - 1, count)`` cast to int (the reference code's frame sampling)."""
    if count < 1 or total < 1:
        raise ValueError(f"need at least one frame to sample from and to keep, got total={total}, count={count}")
    if count == 1:
        return [0]
    return [int(v) for v in torch.linspace(0, total - 1, count, dtype=torch.float64).tolist()]


def strided_indices(total: int, count: int) -> list[int]:
    """Frames ``floor(i * total / count)``: every (total/count)-th frame, starting at 0. Used for
    SF-LLaVA's slow frames (50 frames, 10 slow -> 0, 5, ..., 45) and for the fast pathway's ``s``."""
    if count < 1 or total < 1:
        raise ValueError(f"need at least one frame to sample from and to keep, got total={total}, count={count}")
    return [(i * total) // count for i in range(count)]


def spatial_pool(x: Tensor, stride: int | tuple[int, int]) -> Tensor:
    """Average ``stride``-sized windows of each frame grid, kernel = stride, floor (``avg_pool2d``).

    ``x``: (T, h, w, D) -> (T, h // sh, w // sw, D). Computed in fp32, cast back.
    """
    sh, sw = _pair(stride)
    if sh < 1 or sw < 1:
        raise ValueError(f"spatial stride must be positive, got {stride!r}")
    if sh == 1 and sw == 1:
        return x
    t, h, w, d = x.shape
    if h < sh or w < sw:
        raise ValueError(f"spatial stride {(sh, sw)} is larger than the frame grid {(h, w)}")
    y = F.avg_pool2d(x.permute(0, 3, 1, 2).float(), kernel_size=(sh, sw), stride=(sh, sw))
    return y.permute(0, 2, 3, 1).to(x.dtype)


def temporal_pool(x: Tensor, stride: int, min_frames: int = 1) -> Tensor:
    """Average ``stride`` consecutive frames (floor), or, when that would leave fewer than
    ``min_frames``, adaptive-average to ``min(T, min_frames)`` frames (as the reference code does)."""
    if stride <= 1:
        return x
    t = x.shape[0]
    flat = x.permute(1, 2, 3, 0).reshape(1, -1, t).float()  # (1, h*w*D, T)
    if t // stride >= min_frames:
        y = F.avg_pool1d(flat, kernel_size=stride, stride=stride)
    else:
        y = F.adaptive_avg_pool1d(flat, min(t, min_frames))
    return y.reshape(*x.shape[1:], -1).permute(3, 0, 1, 2).to(x.dtype)


def fast_pathway(x: Tensor, s: int = 1, t: int = 4, p: int = 1, min_fast_frames: int = 1) -> Tensor:
    """The fast tokens of one video, as the reference code computes them: (T, h, w, D) -> (T', h // p, w // p, D).

    For T = 1 (an image) only the spatial pooling runs. Zero frames padded in time take part in
    the averages, as in the reference.
    """
    frames = x.shape[0]
    if frames < 1:
        raise ValueError("a video needs at least one frame")
    if min(s, t, p, min_fast_frames) < 1:
        raise ValueError(f"s, t, p and min_fast_frames must be positive, got {(s, t, p, min_fast_frames)}")
    if frames == 1:
        return spatial_pool(x, p)
    unit = s * t
    padded = math.ceil(frames / unit) * unit
    if padded > frames:
        x = torch.cat([x, x.new_zeros((padded - frames, *x.shape[1:]))], dim=0)
    if s > 1:
        m = max(frames // s, min_fast_frames)
        x = x[[(i * frames) // m for i in range(m)]]  # unpadded T, as the reference
    x = temporal_pool(x, t, min_fast_frames)
    return spatial_pool(x, p)


def fast_frames(frames: int, s: int = 1, t: int = 4, min_fast_frames: int = 1) -> int:
    """Frames the fast pathway keeps (the same procedure as :func:`fast_pathway`, on counts)."""
    if frames == 1:
        return 1
    padded = math.ceil(frames / (s * t)) * (s * t)
    n = max(frames // s, min_fast_frames) if s > 1 else padded
    if t > 1:
        n = n // t if n // t >= min_fast_frames else min(n, min_fast_frames)
    return n


def fast_count(frames: int, h: int, w: int, s: int = 1, t: int = 4, p: int = 1, min_fast_frames: int = 1) -> int:
    """Number of fast tokens: ``fast_frames * floor(h / p) * floor(w / p)``; with s = 1 this is
    ``ceil(T / t) * floor(h / p) * floor(w / p)``."""
    return fast_frames(frames, s, t, min_fast_frames) * (h // p) * (w // p)


def slowfast_llava(
    x: Tensor,
    slow_frames: int = 10,
    slow_stride: int | tuple[int, int] = (2, 1),
    fast_frames: int | None = None,
    fast_stride: int | tuple[int, int] = 6,
) -> tuple[Tensor, Tensor]:
    """SF-LLaVA's two pathways of one video (as in its paper): (slow, fast), each (frames, h', w', D).

    Slow: ``slow_frames`` frames, every (T / slow_frames)-th, pooled by ``slow_stride``.
    Fast: ``fast_frames`` frames (None: all) spaced the same way, pooled by ``fast_stride``.
    A video shorter than the requested frame count uses all its frames (the documented fallback).
    """
    total = x.shape[0]
    slow = x[strided_indices(total, min(slow_frames, total))]
    n_fast = total if fast_frames is None else min(fast_frames, total)
    fast = x[strided_indices(total, n_fast)]
    return spatial_pool(slow, slow_stride), spatial_pool(fast, fast_stride)


def slowfast_llava_count(
    frames: int, h: int, w: int, slow_frames: int = 10, slow_stride: int | tuple[int, int] = (2, 1),
    fast_frames: int | None = None, fast_stride: int | tuple[int, int] = 6,
) -> tuple[int, int]:
    """(slow, fast) token counts of :func:`slowfast_llava`: ``N_s*h_s*w_s`` and ``N_f*h_f*w_f``."""
    sh, sw = _pair(slow_stride)
    fh, fw = _pair(fast_stride)
    n_fast = frames if fast_frames is None else min(fast_frames, frames)
    return min(slow_frames, frames) * (h // sh) * (w // sw), n_fast * (h // fh) * (w // fw)
