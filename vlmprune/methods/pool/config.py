"""Spatial pooling's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.seams.pre_llm import PreLLMConfig


@dataclass(frozen=True)
class PoolConfig(PreLLMConfig):
    """Adaptive 2-D average pooling of each group's token grid to about ``1 - ratio`` of its
    tokens: an (h, w) grid becomes round(h*sqrt(1-r)) x round(w*sqrt(1-r)). Pooling acts on the
    projected features (the LLM's input), and each pooled token takes the position of its bin's
    top-left token."""

    method: ClassVar[str] = "pool"
    eval_default_rank: ClassVar[int | None] = 3  # in the default vlmprune-eval grid
