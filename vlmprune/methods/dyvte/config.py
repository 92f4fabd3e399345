"""DyVTE's options: a fixed exit layer or trained per-sample gates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from vlmprune.method import EvalContext, MethodConfig, Stage, axis_product

#: where a checkpoint's trained gates live, next to its weights (``vlmprune train-gates`` writes it)
GATES_DIR = "dyvte-gates"
GATES_FILE = "gates.safetensors"


@dataclass(frozen=True)
class DyVTEConfig(MethodConfig):
    """``exit_layer=K``: layers ``0..K-1`` see the visual tokens, ``K..L-1`` do not (``K=L``: no
    change). ``gates``: a gates file or a directory holding ``gates.safetensors``, for per-sample
    learned exits. ``threshold``: exit when the router's softmax exit probability exceeds it (0.5
    = the reference's argmax rule, a tie keeps the tokens)."""

    method: ClassVar[str] = "dyvte"
    stage: ClassVar[Stage] = Stage.LLM
    exit_layer: int | None = None
    gates: str | None = None
    threshold: float = 0.5

    def validate(self) -> None:
        if (self.exit_layer is None) == (self.gates is None):
            raise ValueError(
                "dyvte needs exactly one of exit_layer=K (a fixed exit) or gates='path' (learned per-sample exits)"
            )
        if self.exit_layer is not None and (
            isinstance(self.exit_layer, bool) or not isinstance(self.exit_layer, int) or self.exit_layer < 0
        ):
            raise ValueError(f"exit_layer must be an integer in 0..num_layers, got {self.exit_layer!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}")

    @classmethod
    def eval_cells(
        cls, ratios: Sequence[float], model: EvalContext, axes: Mapping[str, Sequence[Any]]
    ) -> list[dict[str, Any]]:
        """One cell per fixed exit layer and one per gates file (the two options exclude each
        other, so they are listed, not crossed; other axes such as ``threshold`` are crossed with
        each). Without either axis: every exit layer 1..L-1 of the model plus the gates shipped
        next to its checkpoint, so that ``--method dyvte`` alone shows the whole trade-off."""
        cls.check_eval_axes(axes)
        rest = {k: v for k, v in axes.items() if k not in ("exit_layer", "gates")}
        layers, gates = list(axes.get("exit_layer", ())), [str(g) for g in axes.get("gates", ())]
        if "exit_layer" not in axes and "gates" not in axes:
            layers = list(range(1, model.num_layers)) if model.num_layers else []
            shipped = model.artifact(GATES_DIR, GATES_FILE)
            gates = [str(shipped)] if shipped is not None else []
        if not layers and not gates:
            raise ValueError(
                "dyvte needs --exit-layer K[,K...] or --gates PATH (or --method dyvte:exit_layer=1,2;gates=PATH); "
                "no shipped gates for this model"
            )
        choices = [{"exit_layer": k} for k in layers] + [{"gates": g} for g in gates]
        return [{**choice, **combo} for choice in choices for combo in axis_product(rest)]
