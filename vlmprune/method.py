"""The method contract: a frozen config that validates itself, and a small class that wires the
method's pure tensor functions into the model through one or more seams.

A method never imports a model class and never branches on a family: it receives an adapter (which
knows the family) and installs itself through the seams of :mod:`vlmprune.seams`, each of which
names a place in the model (encoder, pre-LLM, in-LLM, decode, extra layers). Every method is
installed the same way: ``apply`` builds it from its config and calls :meth:`Method.install`,
whose default installs each seam in :attr:`Method.seams`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar


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


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept out of ``n``: round(n * (1 - ratio)), at least one (FasterVLM's convention)."""
    return max(1, min(n, int(round(n * (1.0 - ratio)))))



class Method:
    """Base plugin: holds the config and the adapter, installs itself through its seams.

    ``seams``: the seam classes (from :mod:`vlmprune.seams`) this method acts through; each is built
    as ``Seam(adapter, method, handle)`` and installed in order. A method with more to wire (its own
    modules, a second seam that needs the first) extends :meth:`install` and calls ``super()``.
    """

    config: MethodConfig
    #: the config class this method is built from (the registry's key is its ``method`` name)
    config_class: ClassVar[type[MethodConfig]]
    seams: ClassVar[tuple[type, ...]] = ()
    #: CLI sub-commands this method brings: name -> ("module:function", help). The function takes
    #: the remaining argv; ``calibrate`` becomes ``vlmprune calibrate <method>``.
    commands: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init__(self, config: MethodConfig, adapter: Any) -> None:
        self.config = config
        self.adapter = adapter

    def install(self, hooks: Any, handle: Any) -> list[Any]:
        """Install every seam of :attr:`seams`; returns the installed seam objects."""
        installed = []
        for seam_cls in self.seams:
            seam = seam_cls(self.adapter, self, handle)
            seam.install(hooks)
            installed.append(seam)
        return installed

    @property
    def label(self) -> str:
        return self.config.method
