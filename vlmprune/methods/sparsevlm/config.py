"""SparseVLM's options and its eval grid (one cell per token budget)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from vlmprune.method import EvalContext, MethodConfig, Stage, as_layers, axis_product, check_choice

from .ops import BUDGETS, V1_PRESETS

POSITION_CHOICES = (None, "original", "contiguous")
VERSIONS = ("v1.5", "v1")


@dataclass(frozen=True)
class SparseVLMConfig(MethodConfig):
    """``budget``: the reference's token preset (192, 128, 96, 64 tokens of LLaVA-1.5's 576, averaged
    over layers). ``version``: ``"v1.5"`` (the reference's default path: a fixed count per stage,
    scaled by N/576 for other token counts) or ``"v1"`` (the first release: a per-sample count
    ``rank(A) * scale + bias`` from the rank of the rater-to-visual attention A; presets for 192,
    128 and 64). ``layers``: the pruning layers (each layer runs on its full input, its output is
    pruned); None: the reference's ``[2, 6, 15]`` (v1 ``[2, 6, 15, 19]``) of 32 layers, scaled to the
    model's depth. ``merge``: recycle the pruned tokens into merged ones (the reference: yes).
    ``seed``: the tiny noise the clustering adds to break density ties (the reference draws it from
    the global RNG). ``scale`` / ``bias``: override the v1 preset. ``positions``: None uses the
    adapter's default (``contiguous``, the reference's renumbering, on 1-D RoPE models)."""

    method: ClassVar[str] = "sparsevlm"
    stage: ClassVar[Stage] = Stage.LLM
    budget: int = 192
    version: str = "v1.5"
    layers: tuple[int, ...] | None = None
    merge: bool = True
    seed: int = 0
    scale: float | None = None
    bias: float | None = None
    positions: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", as_layers(self.layers))
        super().__post_init__()

    def validate(self) -> None:
        check_choice("version", self.version, VERSIONS)
        budgets = tuple(BUDGETS) if self.version == "v1.5" else tuple(V1_PRESETS)
        if self.version == "v1" and (self.scale is not None and self.bias is not None):
            budgets = tuple(BUDGETS)
        check_choice("budget", self.budget, budgets)
        if self.layers is not None:
            if not isinstance(self.layers, tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.layers
            ):
                raise ValueError(f"layers must be a list of decoder layer indices >= 0 (or None), got {self.layers!r}")
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {list(self.layers)}")
            if self.version == "v1.5" and len(self.layers) > len(BUDGETS[self.budget]):
                raise ValueError(f"sparsevlm v1.5 has {len(BUDGETS[self.budget])} stages; got {len(self.layers)} layers")
        if not isinstance(self.merge, bool):
            raise ValueError(f"merge must be True or False, got {self.merge!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("scale", "bias"):
            value = getattr(self, name)
            if value is not None:
                if self.version != "v1":
                    raise ValueError(f"{name} applies to version='v1' only")
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{name} must be a number, got {value!r}")
        check_choice("positions", self.positions, POSITION_CHOICES)

    @classmethod
    def eval_cells(
        cls, ratios: Sequence[float], model: EvalContext, axes: Mapping[str, Sequence[Any]]
    ) -> list[dict[str, Any]]:
        """One cell per budget (default: every v1.5 preset), crossed with the other axes."""
        cls.check_eval_axes(axes)
        if "budget" in axes:
            return axis_product(axes)
        return axis_product({"budget": list(BUDGETS), **axes})
