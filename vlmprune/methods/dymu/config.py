"""DyMU's options: where the merge thresholds come from and how the LLM unmerges."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vlmprune.method import EvalContext, MethodConfig, Stage, axis_product

PRESETS = ("low", "mid", "high")
VTU_CHOICES = ("fast", "exact", False)
ORDERS = ("canonical", "reference")


class ThresholdsError(ValueError):
    """A thresholds file is missing, malformed, or was calibrated for another model."""


@dataclass(frozen=True)
class DyMUConfig(MethodConfig):
    """``thresholds``: a JSON file from ``vlmprune calibrate dymu`` (or a list, one per vision block;
    None / inf = never merge). ``preset``: ``low`` / ``mid`` / ``high``, calibrated for the built-in
    model. ``vtu``: ``"fast"`` (default; expand q/k/v, stock attention, mean back), ``"exact"`` (the
    paper's RoPE-decomposed scores, same output, eager maths) or False (no unmerging). ``order``:
    ``"canonical"`` (default; merged tokens sorted by their first original patch, the same for an
    image alone or in any batch) or ``"reference"`` (the reference code's batch-size-1 order: ToMe's
    [unmerged A ; B] layout kept to the end, unmerged A by score on towers without [CLS]; with
    ``vtu=False`` the merged tokens enter the LLM in that order)."""

    method: ClassVar[str] = "dymu"
    stage: ClassVar[Stage] = Stage.ENCODER
    thresholds: Any = None
    preset: str | None = None
    vtu: Any = "fast"
    order: str = "canonical"

    def validate(self) -> None:
        if (self.thresholds is None) == (self.preset is None):
            raise ValueError("dymu needs exactly one of thresholds='thresholds.json' (or a list) or preset='low'|'mid'|'high'")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown DyMU preset {self.preset!r}; presets: {', '.join(PRESETS)} (built-in model only)")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}; got {self.order!r}")
        if self.vtu not in VTU_CHOICES or self.vtu is True:
            raise ValueError(f"vtu must be one of 'fast', 'exact' or False; got {self.vtu!r}")
        if isinstance(self.thresholds, (list, tuple)):
            object.__setattr__(self, "thresholds", tuple(_as_threshold(t) for t in self.thresholds))
        elif self.thresholds is not None and not isinstance(self.thresholds, (str, Path)):
            raise ValueError(f"thresholds must be a path or a list of numbers, got {type(self.thresholds).__name__}")

    @classmethod
    def eval_cells(
        cls, ratios: Sequence[float], model: EvalContext, axes: Mapping[str, Sequence[Any]]
    ) -> list[dict[str, Any]]:
        """One cell per preset (default: low, mid, high), or per thresholds file when that axis is
        given; other axes (``vtu``) are crossed with them."""
        cls.check_eval_axes(axes)
        if "preset" not in axes and "thresholds" not in axes:
            axes = {"preset": list(PRESETS), **axes}
        return axis_product(axes)


def _as_threshold(value: Any) -> float:
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ThresholdsError(f"a DyMU threshold must be a number (or null for 'never merge'), got {value!r}")
    return float(value)
