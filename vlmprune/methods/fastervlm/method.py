"""FasterVLM: keep the visual tokens the vision encoder's [CLS] token attends to most.

The score is the [CLS] row of the attention inside the
encoder layer that produces the feature layer, averaged over heads; the top
``round(N * (1 - ratio))`` tokens of each image / crop / tile survive, in raster order, and the
rest are removed before the LLM. Encoders without a [CLS] token use the labelled fallback
``fastervlm-nocls`` (mean attention received in the last layer).
"""

from __future__ import annotations

import torch

from vlmprune.method import keep_count
from vlmprune.registry import register_method
from vlmprune.scoring import topk_indices
from vlmprune.seams.pre_llm import PreLLMMethod, Reduction, VisualGroup

from .config import FasterVLMConfig


@register_method
class FasterVLM(PreLLMMethod):
    config_class = FasterVLMConfig

    needs_scores = "cls"

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        n = group.columns.numel()
        if group.scores is None:
            raise RuntimeError("FasterVLM needs [CLS] scores but the adapter captured none for this group")
        return Reduction(topk_indices(group.scores, keep_count(n, self.config.ratio)))

    @property
    def label(self) -> str:
        return "fastervlm" if self.adapter.score_kind == "cls" else "fastervlm-nocls"
