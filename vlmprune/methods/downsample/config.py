"""The downsampling baseline's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.method import MethodConfig, Stage, check_choice, check_ratio

RESAMPLE_CHOICES = ("bicubic", "bilinear")


@dataclass(frozen=True)
class DownsampleConfig(MethodConfig):
    """Give the vision encoder a smaller image instead of pruning its tokens.

    ``ratio``: fraction of visual tokens removed, in [0, 1): an image of N tokens is made smaller until
    it gives about ``round(N * (1 - ratio))`` (Qwen2-VL / Qwen2.5-VL: a patch grid of that many merged
    tokens with the image's aspect; InternVL: the most tiles that fit, at least the thumbnail).
    ``resample``: the filter that shrinks the image ("bicubic", the processors' filter, or
    "bilinear"), always antialiased. Kept tokens are numbered as the stock model numbers the smaller
    image, so there is no ``positions`` option. Applies to dynamic-resolution models only: a model
    whose tower takes one fixed image size (the LLaVA family) raises a ValueError at apply time."""

    method: ClassVar[str] = "downsample"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    ratio: float = 0.9
    resample: str = "bicubic"

    def validate(self) -> None:
        check_ratio(self.ratio)
        check_choice("resample", self.resample, RESAMPLE_CHOICES)
