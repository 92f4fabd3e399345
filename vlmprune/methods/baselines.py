"""Baselines every results table needs: random selection and spatial average pooling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import (
    PreLLMConfig,
    PreLLMMethod,
    Reduction,
    VisualGroup,
    keep_count,
)
from .scoring import adaptive_pool_weights, pooled_grid, topk_indices


@dataclass(frozen=True)
class RandomConfig(PreLLMConfig):
    """Uniformly random tokens, ``round(N * (1 - ratio))`` per group; ``seed`` makes it reproducible
    (each call draws from a generator seeded anew, so the same input keeps the same tokens)."""

    method: ClassVar[str] = "random"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")


class RandomPrune(PreLLMMethod):
    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        n = group.columns.numel()
        scores = torch.rand(n, generator=generator)
        return Reduction(topk_indices(scores, keep_count(n, self.config.ratio)))


@dataclass(frozen=True)
class PoolConfig(PreLLMConfig):
    """Adaptive 2-D average pooling of each group's token grid to about ``1 - ratio`` of its
    tokens: an (h, w) grid becomes round(h*sqrt(1-r)) x round(w*sqrt(1-r)). Pooling acts on the
    projected features (the LLM's input), and each pooled token takes the position of its bin's
    top-left token."""

    method: ClassVar[str] = "pool"


class SpatialPool(PreLLMMethod):
    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        out = pooled_grid(group.grid, self.config.ratio)
        if out == tuple(group.grid):
            return Reduction(torch.arange(group.columns.numel()))
        anchors, weights = adaptive_pool_weights(group.grid, out)
        return Reduction(anchors, weights)
