"""PyramidDrop's options and its eval grid (lambda solved for a layer-averaged budget)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from vlmprune.method import EvalContext, MethodConfig, Stage, as_layers, axis_product, check_choice

from .ops import default_layers, lam_for_budget

POSITION_CHOICES = (None, "original", "contiguous")


@dataclass(frozen=True)
class PyramidDropConfig(MethodConfig):
    """``layers``: the stage boundaries; before each layer ``l`` in it the visual tokens are ranked
    by the attention the last prompt token pays them, computed with layer ``l``'s own norm and
    query/key projections, and stage ``s`` (1-based) keeps ``int(N * lam**s)`` of the sample's
    original N. None: a quarter, half and three quarters of the depth (``[8, 16, 24]`` on 32
    layers, the reference's). ``lam``: the fraction kept per stage, in (0, 1]. ``positions``: None
    uses the adapter's default (``contiguous``, the reference's renumbering, on 1-D RoPE models;
    ``original`` for M-RoPE)."""

    method: ClassVar[str] = "pyramiddrop"
    stage: ClassVar[Stage] = Stage.LLM
    layers: tuple[int, ...] | None = None
    lam: float = 0.5
    positions: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", as_layers(self.layers))
        super().__post_init__()

    def validate(self) -> None:
        if self.layers is not None:
            if not isinstance(self.layers, tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.layers
            ):
                raise ValueError(f"layers must be a list of decoder layer indices >= 1 (or None), got {self.layers!r}")
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {list(self.layers)}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 < float(self.lam) <= 1.0:
            raise ValueError(f"lam must be a number in (0, 1] (the fraction of visual tokens each stage keeps), got {self.lam!r}")
        check_choice("positions", self.positions, POSITION_CHOICES)

    @classmethod
    def eval_cells(
        cls, ratios: Sequence[float], model: EvalContext, axes: Mapping[str, Sequence[Any]]
    ) -> list[dict[str, Any]]:
        """Without a ``lam`` axis: one cell per ratio, with the lambda whose layer-averaged visual
        tokens come to ``N * (1 - ratio)`` on this model's depth (the reference's issues suggest
        solving lambda this way for a token budget); ratios the stage layers cannot reach (layers
        before the first stage always see every token) are left out."""
        cls.check_eval_axes(axes)
        if "lam" in axes or not model.num_layers:
            return axis_product(axes)
        cells = []
        for ratio in ratios:
            layers = list(axes.get("layers", [None]))
            for chosen in layers:
                stage_layers = list(chosen) if chosen is not None else default_layers(model.num_layers)
                lam = lam_for_budget(stage_layers, model.num_layers, 1.0 - float(ratio))
                if lam is None:
                    continue
                rest = {k: v for k, v in axes.items() if k != "layers"}
                for combo in axis_product(rest):
                    cell = {"ratio": float(ratio), "lam": max(round(lam, 4), 1e-4), **combo}
                    if chosen is not None:
                        cell["layers"] = chosen
                    cells.append(cell)
        return cells

    @classmethod
    def setting_label(cls, options: Mapping[str, Any]) -> str:
        return ",".join(f"{k}={v}" for k, v in options.items() if k != "ratio")
