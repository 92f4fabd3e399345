"""VisPruner's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.seams.pre_llm import PreLLMConfig


@dataclass(frozen=True)
class VisPrunerConfig(PreLLMConfig):
    """Per image / crop / tile / frame, VisPruner keeps ``T = round(N * (1 - ratio))`` tokens
    (``tokens`` sets T directly, the reference's ``visual_token_num``): ``int(T *
    important_ratio)`` by [CLS] attention, the rest chosen for diversity (near-duplicates removed
    by feature similarity). Kept tokens stay in raster order. ``important_ratio=1`` keeps
    important tokens only (FasterVLM's rule)."""

    method: ClassVar[str] = "vispruner"
    tokens: int | None = None
    important_ratio: float = 0.5

    def validate(self) -> None:
        super().validate()
        if self.tokens is not None and (
            isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1
        ):
            raise ValueError(f"tokens must be an integer >= 1 (tokens kept per group), got {self.tokens!r}")
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"important_ratio must be a number in [0, 1], got {r!r}")
