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
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, ClassVar


class Stage(IntEnum):
    """Where a method acts; methods in different stages compose in this order."""

    ENCODER = 0  # inside the vision tower (DyMU merging)
    PRE_LLM = 1  # between projector and LLM (FasterVLM, random, pool, slow-fast fast tokens)
    LLM = 2  # inside the decoder layers (DyVTE, DyMU unmerging, slow-fast cross-attention)
    DECODE = 3  # generation (FLASH)


@dataclass(frozen=True)
class EvalContext:
    """What a method's eval-grid hooks may know about the model being evaluated, so that the eval
    harness never needs to know the method: ``checkpoint``, the model's directory (where shipped
    artifacts such as trained gates or a draft live; None for an in-memory model), ``builtin``,
    whether it is the built-in benchmark model (its prompt and mosaic layout), ``num_layers``, the
    decoder depth (None when unknown)."""

    checkpoint: Path | None = None
    builtin: bool = False
    num_layers: int | None = None

    def artifact(self, *parts: str) -> Path | None:
        """``checkpoint/parts...`` when it exists, else None (an artifact is only ever a default)."""
        if self.checkpoint is None:
            return None
        path = Path(self.checkpoint).joinpath(*parts)
        return path if path.exists() else None


def axis_product(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cross product of option axes, first axis slowest: ``{"a": [1, 2], "b": [3]}`` gives
    ``[{"a": 1, "b": 3}, {"a": 2, "b": 3}]``; no axes give one empty cell."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(list(axes[k]) for k in keys))]


def _label_value(value: Any) -> str:
    """A path shows as its last component (rows name the file, not the machine's folders)."""
    if isinstance(value, Path) or (isinstance(value, str) and "/" in value):
        return Path(value).name
    return str(value)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config: frozen, validated on construction.

    Besides its options, a config class describes how ``vlmprune-eval`` grids it (the *eval-grid
    contract*), so that the harness and its CLI never name a method:

    * :meth:`eval_cells`: the option dicts of the method's grid cells, given the ratios asked for
      and the user's axes (``--method NAME:key=v1,v2``);
    * :meth:`eval_defaults`: options the model under evaluation needs (a shipped artifact, a
      layout), merged under every cell's own options;
    * :meth:`setting_label`: the row's "setting" text for a cell's options;
    * :attr:`eval_needs`, :attr:`eval_one_prompt_per_call`, :attr:`eval_lossless`,
      :attr:`eval_default_rank`: traits the harness reads instead of method names.
    """

    method: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.PRE_LLM
    #: names of other methods this one may share its stage with
    composes_with: ClassVar[tuple[str, ...]] = ()
    #: task traits this method needs to get rows on a task: ``"video"`` (video tasks only) or
    #: ``"generates"`` (tasks scored by generation only, e.g. a decoding method); a task lacking a
    #: trait is skipped for this method (and for every stack it is part of)
    eval_needs: ClassVar[frozenset[str]] = frozenset()
    #: the harness feeds one prompt per model call (a batch of one), e.g. speculative decoding
    eval_one_prompt_per_call: ClassVar[bool] = False
    #: outputs are meant to be identical to the unpatched model's: the harness then adds
    #: ``identical_to_none`` and ``speedup_vs_none`` to the rows (a stack: when every part is)
    eval_lossless: ClassVar[bool] = False
    #: place in the default ``vlmprune-eval`` grid, lowest first (None: run only when asked for)
    eval_default_rank: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by configs with options to check
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    # ------------------------------------------------------------------ the eval-grid contract

    @classmethod
    def eval_cells(
        cls, ratios: Sequence[float], model: EvalContext, axes: Mapping[str, Sequence[Any]]
    ) -> list[dict[str, Any]]:
        """The option dicts of this method's grid cells, one row per dict and task.

        ``axes``: the user's values per option (``--method NAME:key=v1,v2;key2=v3`` gives
        ``{"key": [v1, v2], "key2": [v3]}``); several axes form a cross product. A ``"ratio"`` key
        is the row's ratio (passed on as an option only when the config has a ``ratio`` field); a
        cell without one reports the measured share of visual tokens removed. Default: one cell per
        ratio (crossed with the axes) when the config has a ``ratio`` field, else one cell per
        combination of the axes (one cell with the defaults when there are none). Override it to
        give a method its own default grid (presets, modes, layers of ``model``)."""
        cls.check_eval_axes(axes)
        if "ratio" in cls.option_names() and "ratio" not in axes:
            return [{"ratio": float(r), **combo} for r in ratios for combo in axis_product(axes)]
        return axis_product(axes)

    @classmethod
    def eval_defaults(cls, model: EvalContext, options: Mapping[str, Any]) -> dict[str, Any]:
        """Options the model under evaluation needs for a cell whose own options are ``options``
        (e.g. a trained artifact shipped in ``model.checkpoint``); the cell's own options win.
        Default: none."""
        return {}

    @classmethod
    def setting_label(cls, options: Mapping[str, Any]) -> str:
        """The row's "setting" text for a cell's own options (as :meth:`eval_cells` made them, its
        ``ratio`` left out); an empty label makes the row show its ratio. Default: ``key=value``
        pairs joined by commas, a path shown as its file name."""
        return ",".join(f"{k}={_label_value(v)}" for k, v in options.items() if k != "ratio")

    @classmethod
    def check_eval_axes(cls, axes: Mapping[str, Sequence[Any]]) -> None:
        """A ValueError naming the valid options when an axis is not an option of this method."""
        valid = cls.option_names()
        unknown = sorted(set(axes) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for method {cls.method!r}; valid options: {', '.join(valid)}"
            )


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


def as_layers(value: Any) -> Any:
    """A ``layers`` option as a tuple (a list or a single int given by a user or the CLI); other
    values come back as they are, for ``validate`` to judge."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    return value


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
