"""Random selection's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.seams.pre_llm import PreLLMConfig


@dataclass(frozen=True)
class RandomConfig(PreLLMConfig):
    """Uniformly random tokens, ``round(N * (1 - ratio))`` per group; ``seed`` makes it reproducible
    (each call draws from a generator seeded anew, so the same input keeps the same tokens)."""

    method: ClassVar[str] = "random"
    eval_default_rank: ClassVar[int | None] = 2  # in the default vlmprune-eval grid
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
