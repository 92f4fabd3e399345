"""FasterVLM's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.seams.pre_llm import PreLLMConfig


@dataclass(frozen=True)
class FasterVLMConfig(PreLLMConfig):
    """``ratio``: fraction of visual tokens removed. ``positions``: None uses the adapter's default
    (contiguous re-indexing for LLaVA / InternVL as in the reference code, original M-RoPE
    positions for Qwen2-VL). LLaVA-NeXT crops follow the stock HF layout (the paper's "unpad" layout:
    top-k per crop over the full crop grid, newline tokens always kept); the reference code's
    "spatial" layout is not what stock models run, so it is not offered."""

    method: ClassVar[str] = "fastervlm"
    eval_default_rank: ClassVar[int | None] = 1  # in the default vlmprune-eval grid
