"""Slow-fast's options: the mode, the fast and slow pathways, and the hybrid layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from vlmprune.method import EvalContext, MethodConfig, Stage, axis_product, check_choice

MODES = ("pooling", "hybrid", "fast")
LORA_TARGETS = ("q_proj", "v_proj")
IMPLS = ("vanilla", "text-only-vanilla", "text-only-vanilla-masksystem")
#: the eval grid's cells per mode, sized for the built-in model (8 frames as two 2x2 mosaics of
#: 8x8-patch frames): fast-only (s1 t4 p2: 32 tokens), training-free SlowFast pooling (1 slow frame
#: at stride 2 + all 8 frames at stride 8: 24 tokens) and the trained hybrid (the fast tokens +
#: cross-attention)
EVAL_MODES: dict[str, dict[str, Any]] = {
    "fast": {"mode": "fast"},
    "pooling": {"mode": "pooling", "slow_frames": 1, "slow_stride": 2, "fast_stride": 8},
    "hybrid": {"mode": "hybrid"},
}
#: where a checkpoint's trained hybrid adapter lives, next to its weights (``vlmprune train-slowfast``)
ADAPTER_DIR = "slowfast-hybrid"


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _stride(name: str, value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be an int or a (rows, cols) pair, got {value!r}")
    for v in value:
        _positive(name, v)
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class SlowFastConfig(MethodConfig):
    """Options (see the module docstring for the modes).

    Fast pathway (``fast`` / ``hybrid``): ``s`` temporal sampling stride, ``t`` temporal pooling
    stride, ``p`` spatial stride, ``min_fast_frames``; ``video_pooling_stride``: the
    initial per-frame spatial pooling both pathways start from (the paper's first step).
    Hybrid layers: ``layers`` (explicit indices) or ``range(min_layer, max_layer, every_n_layers)``
    (``max_layer=None``: all layers); ``cross_attn_impl``; ``init_kv_from_lm`` (kv_proj starts as
    the layer's own [k_proj; v_proj]); ``cross_attn_during_decode`` (False: generated tokens get
    no cross-attention, the reference's behaviour); ``adapter``: a trained adapter file or
    directory (``vlmprune train-slowfast``), whose layers and impl win over the options here.
    Pooling (``pooling``): ``slow_frames``, ``slow_stride``, ``fast_frames`` (None: all) and
    ``fast_stride``. Layout: ``mosaic`` (0: the model's own video input; m: images are m x m
    frame mosaics) and ``mosaic_min_images`` (samples with fewer images are images, not videos).
    ``lora_rank`` > 0 adds fresh (zero, so output-preserving) LoRA deltas on the LLM's q/v
    projections, for training; a trained adapter brings its own.
    """

    method: ClassVar[str] = "slowfast"
    stage: ClassVar[Stage] = Stage.PRE_LLM  # fast tokens; the hybrid layers also act inside the LLM
    eval_needs: ClassVar[frozenset[str]] = frozenset({"video"})  # a video method: no rows on image tasks
    mode: str = "hybrid"
    s: int = 1
    t: int = 4
    p: int = 2
    min_fast_frames: int = 1
    video_pooling_stride: int = 1
    layers: tuple[int, ...] | None = None
    min_layer: int = 0
    max_layer: int | None = None
    every_n_layers: int = 2
    cross_attn_impl: str = "text-only-vanilla"
    init_kv_from_lm: bool = True
    cross_attn_during_decode: bool = False
    adapter: str | None = None
    slow_frames: int = 10
    slow_stride: int | tuple[int, int] = (2, 1)
    fast_frames: int | None = None
    fast_stride: int | tuple[int, int] = 6
    mosaic: int = 0
    mosaic_min_images: int = 2
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def validate(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("cross_attn_impl", self.cross_attn_impl, IMPLS)
        for name in ("s", "t", "p", "min_fast_frames", "video_pooling_stride", "every_n_layers", "slow_frames",
                     "mosaic_min_images"):
            _positive(name, getattr(self, name))
        if self.fast_frames is not None:
            _positive("fast_frames", self.fast_frames)
        _stride("slow_stride", self.slow_stride)
        _stride("fast_stride", self.fast_stride)
        if isinstance(self.mosaic, bool) or not isinstance(self.mosaic, int) or self.mosaic < 0:
            raise ValueError(f"mosaic must be 0 (native video input) or the frames per mosaic side, got {self.mosaic!r}")
        if self.layers is not None and (
            not isinstance(self.layers, (tuple, list)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers)
        ):
            raise ValueError(f"layers must be a tuple of decoder layer indices, got {self.layers!r}")
        if self.min_layer < 0 or (self.max_layer is not None and self.max_layer < self.min_layer):
            raise ValueError(f"need 0 <= min_layer <= max_layer, got {self.min_layer}, {self.max_layer}")
        if self.mode != "hybrid" and (self.adapter is not None or self.cross_attn_during_decode or self.lora_rank):
            raise ValueError("adapter=, cross_attn_during_decode= and lora_rank= only apply to mode='hybrid'")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be a non-negative integer, got {self.lora_rank!r}")

    def hybrid_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            return sorted(set(int(i) for i in self.layers))
        top = num_layers if self.max_layer is None else min(self.max_layer, num_layers)
        return list(range(self.min_layer, top, self.every_n_layers))

    @classmethod
    def eval_cells(
        cls, ratios: Sequence[float], model: EvalContext, axes: Mapping[str, Sequence[Any]]
    ) -> list[dict[str, Any]]:
        """One cell per mode (default: fast, pooling, hybrid, with :data:`EVAL_MODES`' options),
        crossed with the other axes (which win over a mode's own options)."""
        cls.check_eval_axes(axes)
        modes = list(axes.get("mode", EVAL_MODES))
        bad = [m for m in modes if m not in EVAL_MODES]
        if bad:
            raise ValueError(f"unknown slow-fast mode {bad[0]!r}; modes: {', '.join(EVAL_MODES)}")
        rest = {k: v for k, v in axes.items() if k != "mode"}
        return [{**EVAL_MODES[m], **combo} for m in modes for combo in axis_product(rest)]

    @classmethod
    def eval_defaults(cls, model: EvalContext, options: Mapping[str, Any]) -> dict[str, Any]:
        """The built-in model's mosaic layout (two 2x2 frame mosaics per clip) and, for the hybrid
        mode, the adapter trained for this model when its checkpoint ships one."""
        out: dict[str, Any] = {"mosaic": 2} if model.builtin else {}
        adapter = model.artifact(ADAPTER_DIR)
        if adapter is not None and options.get("mode", cls.mode) == "hybrid":
            out["adapter"] = str(adapter)
        return out

    @classmethod
    def setting_label(cls, options: Mapping[str, Any]) -> str:
        """The mode, then any option the mode's eval cell does not set itself (e.g. ``hybrid,p=4``)."""
        mode = options.get("mode", cls.mode)
        own = EVAL_MODES.get(mode, {})
        extra = {k: v for k, v in options.items() if k not in ("mode", "ratio") and (k not in own or own[k] != v)}
        return ",".join(x for x in (str(mode), super().setting_label(extra)) if x)
