"""FastV's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.method import MethodConfig, Stage, check_choice, check_ratio

POSITION_CHOICES = (None, "original", "contiguous")


def check_layer(name: str, value: object, low: int = 1) -> None:
    """A decoder-layer option: an integer >= ``low`` (its upper bound depends on the model)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low} (a decoder layer index), got {value!r}")


@dataclass(frozen=True)
class FastVConfig(MethodConfig):
    """``k``: layers ``0..k-1`` see every visual token; after layer ``k-1`` the visual tokens are
    ranked by the attention the last prompt token pays them in layer ``k-1`` (mean over heads) and
    the top ``round(N * (1 - ratio))`` of each sample stay for layers ``k..``. ``positions``: None
    or ``"original"`` keeps each kept token's position (the reference code); ``"contiguous"``
    renumbers the remaining tokens (1-D RoPE models only)."""

    method: ClassVar[str] = "fastv"
    stage: ClassVar[Stage] = Stage.LLM
    k: int = 2
    ratio: float = 0.5
    positions: str | None = None

    def validate(self) -> None:
        check_layer("k", self.k)
        check_ratio(self.ratio)
        check_choice("positions", self.positions, POSITION_CHOICES)
