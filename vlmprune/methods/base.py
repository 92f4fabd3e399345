"""What every method declares: its config, its stage, and how it plugs into an adapter.

A method never imports a model class. It receives an adapter (which knows the model family) and
a :class:`~vlmprune.hooks.HookSet` to install its patches through. Methods that remove visual
tokens before the LLM implement :meth:`PreLLMMethod.reduce`, a pure decision over one group of
visual tokens (one image, crop, tile or frame); the shared seam does the sequence surgery.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import torch
from torch import Tensor


class Stage(IntEnum):
    """Where a method acts; methods in different stages compose in this order."""

    ENCODER = 0  # inside the vision tower (DyMU merging)
    PRE_LLM = 1  # between projector and LLM (FasterVLM, random, pool, slow-fast fast tokens)
    LLM = 2  # inside the decoder layers (DyVTE, DyMU unmerging, slow-fast cross-attention)
    DECODE = 3  # generation (FLASH)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config: frozen, validated on construction."""

    method: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.PRE_LLM
    #: names of other methods this one may share its stage with
    composes_with: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by configs with options to check
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


POSITION_CHOICES = (None, "contiguous", "original")


def check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(
            f"ratio must be in [0, 1) (the fraction of visual tokens to remove), got {ratio}; "
            "ratio=0.9 keeps 10% of the tokens"
        )


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@dataclass(frozen=True)
class PreLLMConfig(MethodConfig):
    """Options every pre-LLM reduction shares. ``ratio``: fraction of visual tokens removed, in
    [0, 1). ``positions``: how kept tokens are numbered (None: the adapter's default, see the
    README's "Positions after pruning")."""

    stage: ClassVar[Stage] = Stage.PRE_LLM
    ratio: float = 0.9
    positions: str | None = None

    def validate(self) -> None:
        check_ratio(self.ratio)
        check_choice("positions", self.positions, POSITION_CHOICES)


@dataclass
class VisualGroup:
    """One image / crop / tile / frame worth of visual tokens, as a method sees it.

    ``columns[j]`` is the sequence column of grid token ``j`` (row-major over ``grid``), or -1 when
    the stock model does not feed that grid token to the LLM (e.g. LLaVA-NeXT's unpadding); a
    method decides over the full grid, so its counts do not depend on that detail.
    """

    sample: int
    columns: Tensor  # (n,) long
    grid: tuple[int, int]  # (h, w) with h * w == n
    scores: Tensor | None = None  # (n,) importance, when the method asked for it
    kind: str = "image"


@dataclass
class Reduction:
    """A method's decision for one group: which grid tokens survive, optionally as averages."""

    anchors: Tensor  # (k,) grid indices, ascending; each becomes one LLM token at that anchor
    weights: Tensor | None = None  # (k, n) rows of averaging weights; None = plain selection


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept out of ``n``: round(n * (1 - ratio)), at least one (FasterVLM's convention)."""
    return max(1, min(n, int(round(n * (1.0 - ratio)))))


class Method:
    """Base plugin: holds the config and the adapter, installs itself through a HookSet."""

    config: MethodConfig

    def __init__(self, config: MethodConfig, adapter: Any) -> None:
        self.config = config
        self.adapter = adapter

    def install(self, hooks: Any, handle: Any) -> None:
        return None

    @property
    def label(self) -> str:
        return self.config.method


class PreLLMMethod(Method):
    """A method that decides, per visual group, which tokens reach the LLM."""

    #: signal the adapter must capture for ``VisualGroup.scores`` ("cls" or None)
    needs_scores: ClassVar[str | None] = None

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        raise TypeError(f"{type(self).__name__} must implement reduce()")
