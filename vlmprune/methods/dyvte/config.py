"""DyVTE's options: a fixed exit layer or trained per-sample gates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.method import MethodConfig, Stage


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
