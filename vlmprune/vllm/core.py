"""What the vLLM plugin needs from vlmprune, without importing vLLM.

The plugin runs a pre-LLM method's own ``reduce(group) -> Reduction`` on the groups it builds from
vLLM's encoder outputs, and turns the reductions into LLM-input rows with the pre-LLM seam's own
:func:`~vlmprune.seams.pre_llm.apply_reductions`; nothing here re-implements a scoring or
selection rule. This module checks a configuration (a clear error at start-up instead of a wrong
answer) and answers the two questions vLLM asks: how many placeholder tokens an image gets, and
which rows its multimodal embedding returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import registry
from ..method import Method, MethodConfig, Stage
from ..seams.pre_llm import PreLLMMethod, PreLLMSeam, VisualGroup, apply_reductions, fill_signals

#: the key of vLLM's ``additional_config`` this plugin reads
CONFIG_KEY = "vlmprune"
#: signals the engine can hand a method: the image's projector outputs ("features"), the feature
#: layer's rows with the [CLS] row and the projector ("vision"), the scoring layer's head-mean keys
ENGINE_SIGNALS = frozenset({"features", "vision", "keys"})
#: how each stage's methods relate to vLLM, for the error a user gets
_STAGE_REASON = {
    Stage.ENCODER: "it acts inside the vision tower with a count that depends on the image, while vLLM "
    "reserves each image's placeholder tokens before the image is encoded",
    Stage.LLM: "it acts inside the decoder layers, which would need vLLM's attention kernels and paged KV "
    "cache patched; the plugin only acts before the LLM",
    Stage.DECODE: "it replaces the decoding loop (speculative decoding); vLLM schedules decoding itself",
}


class PluginConfigError(ValueError):
    """A ``{"vlmprune": {...}}`` configuration vLLM cannot run; raised at engine start-up."""


@dataclass(frozen=True)
class Settings:
    """A parsed ``additional_config["vlmprune"]``: the method's name and its options."""

    method: str
    options: tuple[tuple[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dict(self.options)}

    def config(self) -> MethodConfig:
        try:
            return registry.make_config(self.method, dict(self.options))
        except (TypeError, ValueError) as exc:
            raise PluginConfigError(f"vlmprune (vLLM plugin): {exc}") from exc


def settings_from(additional_config: Any) -> Settings | None:
    """The plugin's settings in vLLM's ``additional_config`` (a dict, or a JSON string as the
    command line gives it), or None when it holds no ``"vlmprune"`` entry."""
    if additional_config is None:
        return None
    if isinstance(additional_config, str):
        import json

        additional_config = json.loads(additional_config) if additional_config.strip() else {}
    if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
        return None
    raw = additional_config[CONFIG_KEY]
    if isinstance(raw, str):
        raw = {"method": raw}
    if not isinstance(raw, Mapping) or not isinstance(raw.get("method"), str):
        raise PluginConfigError(
            'vlmprune (vLLM plugin): expected additional_config {"vlmprune": {"method": NAME, "ratio": R, ...}}, '
            f"got {raw!r}"
        )
    options = tuple(sorted((str(k), v) for k, v in raw.items() if k != "method"))
    return Settings(raw["method"], options)


class EngineAdapter:
    """What a method may ask of its adapter when it runs in vLLM: only the score kind (a method's
    label names the no-[CLS] fallback). Everything else about the model lives in the plugin."""

    family = "vllm"
    #: kept placeholders are numbered contiguously (vLLM's 1-D positions; LLaVA's default too)
    default_positions = "contiguous"

    def __init__(self, score_kind: str, default_positions: str = "contiguous") -> None:
        self.score_kind = score_kind
        self.default_positions = default_positions


def build_method(settings: Settings, score_kind: str = "cls", positions: str = "contiguous",
                 anyres: tuple[str, ...] = ()) -> PreLLMMethod:
    """The configured method, checked to be one the engine can run: a pre-LLM method on the plain
    pre-LLM seam whose signals the engine provides and whose kept count is fixed in advance.
    ``positions``: how the model numbers kept tokens in vLLM (LLaVA: "contiguous", 1-D positions;
    Qwen2-VL: "original", the kept tokens' own M-RoPE grid positions), the only value accepted.
    ``anyres``: the AnyRes layouts the model serves (LLaVA-NeXT: "unpad"; none for models without
    AnyRes crops); ``anyres=None`` always means the model's stock layout."""
    try:
        config_cls, method_cls = registry.lookup(settings.method)
    except ValueError as exc:
        raise PluginConfigError(f"vlmprune (vLLM plugin): {exc}") from exc
    if config_cls.stage != Stage.PRE_LLM:
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): method {settings.method!r} cannot run in vLLM: "
            f"{_STAGE_REASON.get(config_cls.stage, 'it does not act before the LLM')}. "
            f"Methods that can: {', '.join(engine_methods())}"
        )
    if not issubclass(method_cls, PreLLMMethod) or tuple(method_cls.seams) != (PreLLMSeam,):
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): method {settings.method!r} cannot run in vLLM: it is not a plain "
            "per-image pre-LLM reduction (it brings its own seam or layers). "
            f"Methods that can: {', '.join(engine_methods())}"
        )
    needs = frozenset(getattr(method_cls, "needs", ()))
    missing = needs - ENGINE_SIGNALS
    if missing:
        what = "the prompt's instruction, which vLLM's encoder never sees (and its encoder cache is " \
               "keyed by the image alone)" if "instruction" in missing else "vision-tower signals"
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): method {settings.method!r} needs {', '.join(sorted(missing))} "
            f"({what}); the plugin provides {', '.join(sorted(ENGINE_SIGNALS))} and [CLS] scores"
        )
    if method_cls.needs_scores not in (None, "cls"):
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): method {settings.method!r} asks for {method_cls.needs_scores!r} scores; "
            "the plugin computes 'cls' scores only"
        )
    config = settings.config()
    asked = getattr(config, "positions", None)
    if asked not in (None, positions):
        how = "numbered contiguously" if positions == "contiguous" else "at their original M-RoPE grid positions"
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): positions={asked!r} is not available in vLLM for this model: the kept "
            f"placeholder tokens are {how} (positions=None or {positions!r})"
        )
    layout = getattr(config, "anyres", None)
    if layout is not None and not anyres:
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): anyres={layout!r} is an option for LLaVA-NeXT's AnyRes crops; "
            "this model has none (leave anyres unset)"
        )
    if layout is not None and layout not in anyres:
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): anyres={layout!r} is not served in vLLM for this model; served: "
            f"{', '.join(repr(a) for a in anyres)} (or leave anyres unset: the stock layout)"
        )
    method = method_cls(config, EngineAdapter(score_kind, positions))
    return method


def engine_methods() -> list[str]:
    """Registered methods whose class the plugin can run (fixed counts are checked per model)."""
    out = []
    for name in registry.available_methods():
        cfg_cls, method_cls = registry.lookup(name)
        if (cfg_cls.stage == Stage.PRE_LLM and issubclass(method_cls, PreLLMMethod)
                and tuple(method_cls.seams) == (PreLLMSeam,)
                and not (frozenset(getattr(method_cls, "needs", ())) - ENGINE_SIGNALS)
                and method_cls.needs_scores in (None, "cls")):
            out.append(name)
    return out


def group_seed(method: Method, index: int = 0) -> torch.Generator:
    """The generator the pre-LLM seam gives a sample's group number ``index`` (``seed * 1_000_003 + index``).

    vLLM caches an image's (a video's) embedding by the item alone and may batch items of several
    prompts, so every item draws as the first item of its prompt would: an image as group 0, the
    frames of a video as groups 0, 1, ... A single-image or single-video prompt draws exactly as
    under ``vlmprune.apply``; later items of a multi-item prompt draw differently."""
    seed = int(getattr(method.config, "seed", 0) or 0)
    return torch.Generator().manual_seed(seed * 1_000_003 + int(index))


@dataclass
class VisionSignals:
    """What the engine captured in the vision tower for a batch of B images (see VisualGroup):
    ``vision`` (B, n, C) feature-layer rows of the grid tokens, ``vision_cls`` (B, C) or None,
    ``keys`` (B, n, d) head-mean keys, ``project`` the projector as a row function."""

    vision: Tensor | None = None
    vision_cls: Tensor | None = None
    keys: Tensor | None = None
    project: Any = None


def reduce_images(method: PreLLMMethod, embeds: Tensor, grid: tuple[int, int],
                  scores: Tensor | None = None, signals: VisionSignals | None = None,
                  with_keep: bool = False, kind: str = "image", groups_first: bool = True) -> Any:
    """The LLM-input rows each image keeps.

    ``embeds`` (B, T, D): the projector outputs of B images, whose last ``h * w`` rows are the grid
    tokens (a leading [CLS] row, with the "full" feature strategy, is always kept, as under
    ``vlmprune.apply``); ``scores`` (B, h * w) when the method asked for them. Each image is one
    :class:`VisualGroup`; the method's ``reduce`` decides, and the seam's ``apply_reductions``
    builds the rows (selected, averaged or replaced), in the order the HF path feeds them.
    ``with_keep``: also return each image's (T,) keep mask (the columns whose positions the kept
    rows carry, as the pre-LLM seam's position bookkeeping uses them). ``kind``: the groups' kind
    ("video" for the frames of a video). ``groups_first``: every row draws as its prompt's first
    group (images); False: row ``i`` draws as group ``i`` (the frames of one video, in order)."""
    b, t, _ = embeds.shape
    n = grid[0] * grid[1]
    if t < n:
        raise ValueError(f"vlmprune: {t} visual rows per image, fewer than the {grid} grid")
    columns = torch.arange(t - n, t, device=embeds.device)
    groups = [
        VisualGroup(sample=i, columns=columns, grid=grid, scores=None if scores is None else scores[i], kind=kind)
        for i in range(b)
    ]
    needs = set(getattr(method, "needs", ()))
    if needs & {"features", "instruction"}:
        fill_signals(groups, needs & {"features", "instruction"}, embeds,
                     torch.ones(b, t, dtype=torch.bool, device=embeds.device), None)
    if needs & {"vision", "keys"}:
        if signals is None:
            raise ValueError(f"vlmprune: {method.config.method!r} needs {sorted(needs & {'vision', 'keys'})}")
        for i, group in enumerate(groups):
            if "vision" in needs:
                group.vision = signals.vision[i]
                group.vision_cls = None if signals.vision_cls is None else signals.vision_cls[i]
                group.project = signals.project
            if "keys" in needs:
                group.keys = signals.keys[i]
    reductions = [method.reduce(group, group_seed(method, 0 if groups_first else i)) for i, group in enumerate(groups)]
    keep, out = apply_reductions(embeds, groups, reductions)
    rows = [out[i][keep[i]] for i in range(b)]
    return (rows, [keep[i] for i in range(b)]) if with_keep else rows


def kept_count(method: PreLLMMethod, grid: tuple[int, int], extra: int = 0, width: int = 8,
               cls_row: bool = True) -> int:
    """Placeholder tokens one image gets: the rows :func:`reduce_images` returns for it, found by
    running the method on two different made-up images. A method whose count depends on the image
    cannot run in vLLM (the count is fixed before the image is encoded). ``cls_row``: whether the
    groups get the tower's [CLS] row as ``vision_cls`` (a method may keep it as a token)."""
    counts = set()
    n = grid[0] * grid[1]
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        embeds = torch.randn(1, extra + n, width, generator=g)
        scores = torch.rand(1, n, generator=g) if method.needs_scores else None
        weight = torch.randn(width, width, generator=g)
        cls = torch.randn(1, width, generator=g) if cls_row else None
        signals = VisionSignals(torch.randn(1, n, width, generator=g), cls, torch.randn(1, n, width, generator=g),
                                lambda rows, w=weight: rows @ w)
        counts.add(reduce_images(method, embeds, grid, scores, signals)[0].shape[0])
    if len(counts) != 1:
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): method {method.config.method!r} keeps a number of tokens that depends "
            f"on the image ({sorted(counts)} on two images), but vLLM fixes each image's placeholder count "
            "before encoding it"
        )
    return counts.pop()
