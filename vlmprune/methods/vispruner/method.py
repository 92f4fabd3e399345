"""VisPruner: important tokens by [CLS] attention, then diverse tokens by removing near-duplicates.

The importance score is the adapter's [CLS] attention row at the feature layer, averaged over
heads (towers without a [CLS] token: the labelled fallback, mean attention received in the last
layer, as the reference does for SigLIP); the similarity is the cosine of what the projector
receives for each token (the tower's feature-layer patch features). One decision per image /
crop / tile / frame; the kept tokens stay in raster order and the rest leave before the LLM.
"""

from __future__ import annotations

import torch

from vlmprune.method import keep_count
from vlmprune.registry import register_method
from vlmprune.seams.pre_llm import PreLLMMethod, Reduction, VisualGroup

from .config import VisPrunerConfig
from .ops import select


@register_method
class VisPruner(PreLLMMethod):
    config_class = VisPrunerConfig

    needs_scores = "cls"
    needs = frozenset({"vision"})

    def budget(self, n: int) -> int:
        """Tokens kept of a group of ``n``: ``tokens`` when set (at most n), else round(n * (1 - ratio))."""
        if self.config.tokens is not None:
            return min(n, int(self.config.tokens))
        return keep_count(n, self.config.ratio)

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        if group.scores is None or group.vision is None:
            raise RuntimeError("VisPruner needs [CLS] scores and the vision features, but the adapter gave none")
        n = group.columns.numel()
        kept, flops = select(group.scores, group.vision, self.budget(n), self.config.important_ratio)
        return Reduction(kept, flops=flops)

    @property
    def label(self) -> str:
        return "vispruner" if self.adapter.score_kind == "cls" else "vispruner-nocls"
