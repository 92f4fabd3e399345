"""VisionZip's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.method import check_choice
from vlmprune.seams.pre_llm import PreLLMConfig

from .ops import CONTEXTUAL_SHARE

MERGE_SPACES = ("vision", "llm")


def _check_count(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class VisionZipConfig(PreLLMConfig):
    """Per image / crop / tile / frame, VisionZip keeps a budget of ``T = round(N * (1 - ratio))``
    tokens (``tokens`` sets T directly): ``dominant`` tokens, the [CLS] token (where the tower
    has one the LLM can take) and the patches its attention picks, plus ``contextual`` tokens merged
    from the rest by key similarity. T is split as the paper's settings split it (64 = 54 + 10):
    ``contextual = round(T * contextual_share)``; giving ``dominant`` and ``contextual`` sets the
    two counts directly (the reference's interface; ``dominant`` counts the [CLS] token).

    ``merge_space``: ``"vision"`` (the reference: contextual tokens are merged from what the
    projector receives, then projected) or ``"llm"`` (merged from the projected tokens, as
    LightCompress's Qwen2.5-VL port does). ``positions``: None uses the adapter's default; with
    contiguous positions the tokens follow the reference order ([CLS], dominant in raster order,
    contextual in target order), with original positions each sits at its own grid place."""

    method: ClassVar[str] = "visionzip"
    tokens: int | None = None
    dominant: int | None = None
    contextual: int | None = None
    contextual_share: float = CONTEXTUAL_SHARE
    merge_space: str = "vision"

    def validate(self) -> None:
        super().validate()
        if self.tokens is not None:
            _check_count("tokens", self.tokens, 1)
        if (self.dominant is None) != (self.contextual is None):
            raise ValueError(
                "visionzip: give both dominant and contextual (the per-group counts) or neither "
                f"(then ratio or tokens sets the budget); got dominant={self.dominant!r}, contextual={self.contextual!r}"
            )
        if self.dominant is not None:
            _check_count("dominant", self.dominant, 1)
            _check_count("contextual", self.contextual, 0)
            if self.tokens is not None:
                raise ValueError("visionzip: give tokens or dominant + contextual, not both")
        share = self.contextual_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= float(share) < 1.0:
            raise ValueError(f"contextual_share must be a number in [0, 1), got {share!r}")
        check_choice("merge_space", self.merge_space, MERGE_SPACES)
