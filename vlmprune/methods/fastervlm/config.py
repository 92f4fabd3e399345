"""FasterVLM's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.seams.pre_llm import PreLLMConfig


@dataclass(frozen=True)
class FasterVLMConfig(PreLLMConfig):
    """``ratio``: fraction of visual tokens removed. ``positions``: None uses the adapter's default
    (contiguous re-indexing for LLaVA / InternVL as in the reference code, original M-RoPE
    positions for Qwen2-VL). ``anyres``: LLaVA-NeXT crops follow the stock HF layout by default (the
    paper's "unpad" layout: top-k per crop over the full crop grid, newline tokens always kept);
    ``anyres="spatial"`` runs the layout the reference code ran for its LLaVA-NeXT numbers."""

    method: ClassVar[str] = "fastervlm"
    eval_default_rank: ClassVar[int | None] = 1  # in the default vlmprune-eval grid
