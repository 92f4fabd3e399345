"""Spatial average pooling: the other baseline every results table needs."""

from __future__ import annotations

import torch

from vlmprune.registry import register_method
from vlmprune.scoring import adaptive_pool_weights, pooled_grid
from vlmprune.seams.pre_llm import PreLLMMethod, Reduction, VisualGroup

from .config import PoolConfig


@register_method
class SpatialPool(PreLLMMethod):
    config_class = PoolConfig

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        out = pooled_grid(group.grid, self.config.ratio)
        if out == tuple(group.grid):
            return Reduction(torch.arange(group.columns.numel()))
        anchors, weights = adaptive_pool_weights(group.grid, out)
        return Reduction(anchors, weights)
