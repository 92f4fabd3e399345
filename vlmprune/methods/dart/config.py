"""DART's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.method import MethodConfig, Stage, check_choice, check_ratio

POSITION_CHOICES = (None, "original", "contiguous")
PIVOT_ORDERS = ("reference", "sorted")


def _check_count(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class DARTConfig(MethodConfig):
    """``k``: layers ``0..k-1`` see every visual token; after layer ``k-1``, ``pivot_image``
    visual and ``pivot_text`` text tokens (after the last visual token) with the largest key L1
    norm are pivots, and each pivot in turn claims the ``t`` remaining visual tokens least similar
    to it (cosine of the final-normed hidden states); the visual pivots and the claimed tokens
    stay. ``t = floor(N * (1 - ratio) / (pivot_image + pivot_text))``, or
    ``tokens // (pivot_image + pivot_text)`` when ``tokens`` is set (the reference's
    ``max_num_trunction``; it overrides ``ratio``). ``ratio=0`` keeps everything.
    ``pivot_order``: ``"reference"`` visits the pivots in the order the reference code does (a
    CPython ``set`` of their indices); ``"sorted"`` in ascending position (labelled
    ``dart-sorted``). ``positions``: None or ``"original"`` keeps positions (the reference)."""

    method: ClassVar[str] = "dart"
    stage: ClassVar[Stage] = Stage.LLM
    k: int = 2
    ratio: float = 0.778
    tokens: int | None = None
    pivot_image: int = 4
    pivot_text: int = 4
    pivot_order: str = "reference"
    positions: str | None = None

    def validate(self) -> None:
        _check_count("k", self.k, 1)
        check_ratio(self.ratio)
        if self.tokens is not None:
            _check_count("tokens", self.tokens, 0)
        _check_count("pivot_image", self.pivot_image, 0)
        _check_count("pivot_text", self.pivot_text, 0)
        if self.pivot_image + self.pivot_text == 0:
            raise ValueError("dart needs at least one pivot: pivot_image + pivot_text must be >= 1")
        check_choice("pivot_order", self.pivot_order, PIVOT_ORDERS)
        check_choice("positions", self.positions, POSITION_CHOICES)
