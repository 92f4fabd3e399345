"""FasterVLM: keep the visual tokens the vision encoder's [CLS] token attends to most.

Spec: shared/methods/fastervlm.md. The score is the [CLS] row of the attention inside the
encoder layer that produces the feature layer, averaged over heads; the top
``round(N * (1 - ratio))`` tokens of each image / crop / tile survive, in raster order, and the
rest are removed before the LLM. Encoders without a [CLS] token use the labelled fallback
``fastervlm-nocls`` (mean attention received in the last layer).
"""

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
from .scoring import topk_indices


@dataclass(frozen=True)
class FasterVLMConfig(PreLLMConfig):
    """``ratio``: fraction of visual tokens removed. ``positions``: None uses the adapter's default
    (contiguous re-indexing for LLaVA / InternVL as in the reference code, original M-RoPE
    positions for Qwen2-VL). LLaVA-NeXT crops follow the stock HF layout (the spec's "unpad":
    top-k per crop over the full crop grid, newline tokens always kept); the reference code's
    "spatial" layout is not what stock models run, so it is not offered."""

    method: ClassVar[str] = "fastervlm"


class FasterVLM(PreLLMMethod):
    needs_scores = "cls"

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        n = group.columns.numel()
        if group.scores is None:
            raise RuntimeError("FasterVLM needs [CLS] scores but the adapter captured none for this group")
        return Reduction(topk_indices(group.scores, keep_count(n, self.config.ratio)))

    @property
    def label(self) -> str:
        return "fastervlm" if self.adapter.score_kind == "cls" else "fastervlm-nocls"
