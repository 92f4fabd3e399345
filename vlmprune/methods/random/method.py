"""Random selection: the baseline every results table needs (uniform draws, reproducible per call)."""

from __future__ import annotations

import torch

from vlmprune.method import keep_count
from vlmprune.registry import register_method
from vlmprune.scoring import topk_indices
from vlmprune.seams.pre_llm import PreLLMMethod, Reduction, VisualGroup

from .config import RandomConfig


@register_method
class RandomPrune(PreLLMMethod):
    config_class = RandomConfig

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        n = group.columns.numel()
        scores = torch.rand(n, generator=generator)
        return Reduction(topk_indices(scores, keep_count(n, self.config.ratio)))
