"""The pre-LLM seam: one place where visual tokens leave the sequence before the decoder.

Contract: a method at this seam subclasses :class:`PreLLMMethod` and implements ``reduce(group)``,
a pure decision over one :class:`VisualGroup` (one image, crop, tile or frame, with the signals it
asked for: an importance score through ``needs_scores``, and through ``needs`` the group's LLM-input
features, the instruction's embeddings, or vision-side signals the adapter captures) returning a
:class:`Reduction` (which grid tokens survive, optionally as weighted averages or as new
embeddings). The seam does everything else, the same way for every method.

The stock model runs as usual up to its decoder call (vision tower, projector, placeholder
scatter, Qwen2-VL's M-RoPE positions). A forward pre-hook on the decoder then removes the
columns a method dropped, from the embeddings, the attention mask and the positions, so the
decoder and its KV cache only ever hold the kept tokens. Decoding steps that follow on the same
cache object get a mask and positions consistent with the shorter cache; that bookkeeping lives
in a weak map keyed by the cache, so concurrent generations do not share it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import context
from ..method import Method, MethodConfig, Stage, check_choice, check_ratio
from ..sequence import PrunedSequence, decode_positions, default_positions, gather_columns, prune_sequence
from ..stats import ForwardRecord
from .scope import ensure_cache, install_scope

POSITION_CHOICES = (None, "contiguous", "original")
ANYRES_CHOICES = (None, "unpad", "spatial")


@dataclass(frozen=True)
class PreLLMConfig(MethodConfig):
    """Options every pre-LLM reduction shares. ``ratio``: fraction of visual tokens removed, in
    [0, 1). ``positions``: how kept tokens are numbered (None: the adapter's default, see the
    "Positions after pruning" in docs/models.md). ``anyres``: how AnyRes crops (LLaVA-NeXT) reach
    the LLM: None / "unpad" the stock model's packing (crops stitched, unpadded, a newline per row),
    "spatial" the layout the LLaVA reference code runs (base view, then the stitched grid in raster
    order, no unpadding, no newlines; contiguous positions)."""

    stage: ClassVar[Stage] = Stage.PRE_LLM
    ratio: float = 0.9
    positions: str | None = None
    anyres: str | None = None

    def validate(self) -> None:
        check_ratio(self.ratio)
        check_choice("positions", self.positions, POSITION_CHOICES)
        check_choice("anyres", self.anyres, ANYRES_CHOICES)


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
    #: for a video frame: which video of the call it belongs to (frames of one video share it), so a
    #: method that works per video never mixes two videos of one sample; None for images
    video: int | None = None
    # -- signals a method asks for in ``PreLLMMethod.needs`` (None otherwise) --------------------
    #: (n, D) the LLM-input embeddings of the grid tokens (projector outputs); rows of members the
    #: stock model does not feed to the LLM (column -1) are zeros ("features")
    features: Tensor | None = None
    #: (t, D) LLM-input embeddings of the sample's instruction: its real text tokens after its last
    #: visual token ("instruction")
    instruction: Tensor | None = None
    #: (n, C) what the projector receives for each grid token, from the vision tower ("vision")
    vision: Tensor | None = None
    #: (C,) the [CLS] row of the feature layer's hidden states, for towers that have one ("vision")
    vision_cls: Tensor | None = None
    #: (n, d) keys of the scoring attention layer per grid token, averaged over heads ("keys")
    keys: Tensor | None = None
    #: maps rows shaped like ``vision`` (and ``vision_cls``) to LLM-input embeddings ("vision")
    project: Callable[[Tensor], Tensor] | None = None

    @property
    def present(self) -> Tensor:
        """(n,) bool: grid tokens the stock model feeds to the LLM."""
        return self.columns >= 0


@dataclass
class Reduction:
    """A method's decision for one group: which grid tokens survive, optionally as averages or as
    new embeddings.

    ``anchors`` are the columns that stay (and the positions they carry); ``tokens`` replaces what
    those columns hold, row ``i`` going to ``anchors[i]``: a method that reorders or builds tokens
    (merged contextual tokens, a [CLS] token) says it here. ``flops``: the decision's own cost,
    added to the call's overhead in ``handle.stats``."""

    anchors: Tensor  # (k,) grid indices, ascending; each becomes one LLM token at that anchor
    weights: Tensor | None = None  # (k, n) rows of averaging weights; None = plain selection
    tokens: Tensor | None = None  # (k, D) LLM-input embeddings for the anchors; None = keep / average
    flops: float = 0.0



class PreLLMMethod(Method):
    seams: ClassVar[tuple[type, ...]] = ()  # set to (PreLLMSeam,) below, once the seam exists

    """A method that decides, per visual group, which tokens reach the LLM."""

    #: signal the adapter must capture for ``VisualGroup.scores`` ("cls" or None)
    needs_scores: ClassVar[str | None] = None
    #: further signals filled into each :class:`VisualGroup`: "features", "instruction" (the seam
    #: fills them), "vision", "keys" (the adapter captures them in the vision tower)
    needs: ClassVar[frozenset[str]] = frozenset()

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        raise TypeError(f"{type(self).__name__} must implement reduce()")


@dataclass
class DecodeState:
    mask: Tensor  # (B, cache_len) mask of what the cache holds
    pass_mask: bool  # whether the decoder needs the mask (padding present)
    next_position: Tensor  # (B,)
    removed: int = 0  # columns the prefill dropped (the cache is that much shorter than the history)


def _cache_of(kwargs: dict[str, Any]) -> tuple[str, Any]:
    for key in ("cache", "past_key_values"):
        if key in kwargs:
            return key, kwargs[key]
    return "cache", None


def cache_length(cache: Any) -> int:
    """What the cache really holds (not the length it reports to ``generate``, see
    :class:`VirtualLength`)."""
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if isinstance(length, VirtualLength):
        return length.real()
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError):
        return 0


_cache_len = cache_length  # the name other seams import


class VirtualLength:
    """``cache.get_seq_length`` while ``generate`` continues on a cache whose prefill lost ``removed``
    visual columns (see :meth:`PreLLMSeam._generate`).

    ``generate`` reads the cache length to decide which part of ``input_ids`` is new: in a chat that
    reuses the cache, the second turn passes the whole history, and with the pruned (shorter) length
    it would feed the tail of the history back in as new text. Reporting the unpruned length for the
    duration of that call makes it slice exactly the new tokens, as for a stock model; the
    attention-mask code asks ``get_query_offset``, which stays the real length, so masks and the
    cache agree. Outside such a call the cache reports what it really holds.
    """

    def __init__(self, cache: Any, removed: int) -> None:
        self._cache = weakref.ref(cache)
        self._method = type(cache).get_seq_length
        self.removed = int(removed)

    def real(self, layer_idx: int = 0) -> int:
        cache = self._cache()
        return 0 if cache is None else int(self._method(cache, layer_idx))

    def __call__(self, layer_idx: int = 0) -> int:
        return self.real(layer_idx) + self.removed

    @classmethod
    @contextlib.contextmanager
    def around(cls, cache: Any, removed: int) -> Iterator[None]:
        """Report the unpruned length inside the ``with`` block (on this cache object only)."""
        if removed <= 0 or "get_seq_length" in cache.__dict__ or not hasattr(type(cache), "get_query_offset"):
            yield
            return
        length = cls(cache, removed)
        cache.get_seq_length = length
        cache.get_query_offset = length.real
        try:
            yield
        finally:
            cache.__dict__.pop("get_seq_length", None)
            cache.__dict__.pop("get_query_offset", None)


def apply_reductions(
    embeds: Tensor, groups: list[VisualGroup], reductions: list[Reduction]
) -> tuple[Tensor, Tensor]:
    """Turn per-group decisions into a keep mask over columns, averaging pooled tokens in place.

    Members a stock model never feeds to the LLM (column -1) are ignored; pooling weights are
    renormalised over the members that are present.
    """
    keep = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    out = embeds
    for group, red in zip(groups, reductions):
        cols = group.columns.to(embeds.device)
        present = cols >= 0
        keep[group.sample, cols[present]] = False
        anchors = red.anchors.to(embeds.device)
        anchor_cols = cols[anchors]
        if red.tokens is not None:
            if red.tokens.shape[0] != anchors.numel():
                raise ValueError(
                    f"vlmprune: a reduction gave {red.tokens.shape[0]} tokens for {anchors.numel()} anchors"
                )
            if out is embeds:
                out = embeds.clone()
            ok = anchor_cols >= 0
            out[group.sample, anchor_cols[ok]] = red.tokens.to(embeds.device, embeds.dtype)[ok]
            anchor_cols = anchor_cols[ok]
        elif red.weights is not None:
            if out is embeds:
                out = embeds.clone()
            w = red.weights.to(embeds.device, torch.float32) * present.float().unsqueeze(0)
            norm = w.sum(dim=1, keepdim=True)
            ok = (norm.squeeze(1) > 0) & (anchor_cols >= 0)
            w = w[ok] / norm[ok]
            src = embeds[group.sample, cols.clamp(min=0)].float()
            out[group.sample, anchor_cols[ok]] = (w @ src).to(embeds.dtype)
            anchor_cols = anchor_cols[ok]
        keep[group.sample, anchor_cols[anchor_cols >= 0]] = True
    return keep, out


#: signals the seam fills from the decoder's input itself; the rest come from the adapter
SEAM_SIGNALS = frozenset({"features", "instruction"})
SIGNALS = SEAM_SIGNALS | {"vision", "keys"}


def fill_signals(groups: list[VisualGroup], needs: set[str], embeds: Tensor, visual: Tensor,
                 mask: Tensor | None) -> None:
    """Fill the groups' ``features`` / ``instruction`` from the decoder's input embeddings."""
    unknown = needs - SIGNALS
    if unknown:
        raise ValueError(f"vlmprune: unknown pre-LLM signal(s) {sorted(unknown)}; known: {sorted(SIGNALS)}")
    if "features" in needs:
        for group in groups:
            cols = group.columns.to(embeds.device)
            feats = embeds[group.sample, cols.clamp(min=0)]
            group.features = feats * (cols >= 0).unsqueeze(1).to(feats.dtype)
    if "instruction" in needs:
        real = mask.bool().to(visual.device) if mask is not None else torch.ones_like(visual)
        positions = torch.arange(visual.shape[1], device=visual.device)
        cache: dict[int, Tensor] = {}
        for group in groups:
            b = group.sample
            if b not in cache:
                last = int(torch.where(visual[b], positions, -1).max())
                text = real[b] & ~visual[b] & (positions > last)
                cache[b] = embeds[b, text.to(embeds.device)]
            group.instruction = cache[b]


def continue_pruned(kwargs: dict, embeds: Tensor, state: DecodeState) -> dict:
    """Decoder kwargs for a step on a cache whose prefill dropped columns: the mask continues the
    short cache's, and positions continue from the prefill's numbering (1-D or M-RoPE axes)."""
    n = embeds.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and isinstance(mask, Tensor) and mask.dim() == 2:
        tail = mask[:, -n:].to(state.mask.dtype)
        state.pass_mask = True
    else:
        tail = torch.ones(embeds.shape[0], n, dtype=state.mask.dtype, device=state.mask.device)
    state.mask = torch.cat([state.mask, tail.to(state.mask.device)], dim=1)
    pos_in = kwargs.get("position_ids")
    axes = pos_in.shape[0] if isinstance(pos_in, Tensor) and pos_in.dim() == 3 else None
    kwargs = dict(kwargs)
    kwargs["position_ids"] = decode_positions(state.next_position, n, axes)
    state.next_position = state.next_position + n
    kwargs["attention_mask"] = state.mask if state.pass_mask else None
    return kwargs


def install_continuation(hooks: Any, model: Any, states: weakref.WeakKeyDictionary) -> None:
    """Wrap ``generate`` on this instance so that a call continuing on a cache found in ``states``
    (a later chat turn on a pruned cache) sees the cache at its unpruned length (:class:`VirtualLength`)."""
    previous = model.__dict__.get("generate") or type(model).generate.__get__(model)

    def generate(*args: Any, **kwargs: Any) -> Any:
        _, cache = _cache_of(kwargs)
        state = states.get(cache) if cache is not None else None
        if state is None:
            return previous(*args, **kwargs)
        with VirtualLength.around(cache, state.removed):
            return previous(*args, **kwargs)

    generate.__doc__ = previous.__doc__
    hooks.set_attr(model, "generate", generate)


class PreLLMSeam:
    """Installs one pre-LLM method on one model instance through the adapter's seams."""

    def __init__(self, adapter: Any, method: Any, handle: Any) -> None:
        self.adapter = adapter
        self.method = method
        self.handle = handle
        self.positions = getattr(method.config, "positions", None) or adapter.default_positions
        self.anyres = getattr(method.config, "anyres", None)
        if self.anyres is not None:
            adapter.check_anyres(self.anyres, self.positions)
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def _relayout(self) -> bool:
        """Whether the adapter rebuilds the visual sequence (a non-stock AnyRes layout)."""
        return self.anyres not in (None, "unpad")

    def _vision_needs(self) -> frozenset[str]:
        """Vision-side signals to capture: the method's, plus the projector inputs a re-layout needs
        for crop tokens the stock packing drops."""
        needs = frozenset(getattr(self.method, "needs", ())) - SEAM_SIGNALS
        return needs | {"vision"} if self._relayout else needs

    # -- installation -------------------------------------------------------------------------
    def install(self, hooks: Any) -> None:
        install_scope(self.adapter, hooks, self.handle)
        self.adapter.install_seam(hooks, self.handle)
        hooks.forward_pre(self.adapter.model, self._model_pre, with_kwargs=True)
        install_continuation(hooks, self.adapter.model, self._states)
        hooks.forward_pre(self.adapter.decoder, self._decoder_pre, with_kwargs=True)
        # transformers' generate() encodes images before the first forward, outside any call this
        # seam can see; on this instance only, let the first forward encode them instead.
        hooks.set_attr(self.adapter.model, "_supports_mm_encoder_outputs", lambda: False)
        if self.method.needs_scores:
            self.adapter.install_scoring(hooks, self.method.needs_scores, self.handle)
        vision_side = self._vision_needs()
        if vision_side:
            self.adapter.install_signals(hooks, vision_side, self.handle)

    # -- the seam -----------------------------------------------------------------------------
    def _model_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        """A later chat turn that passes the image again on a cache this seam pruned: say so before
        the stock model fails on the placeholder count."""
        _, cache = _cache_of(kwargs)
        has_pixels = any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
        if has_pixels and cache is not None and cache in self._states and cache_length(cache) > 0:
            raise ValueError(
                "vlmprune: this KV cache already holds the pruned image tokens of an earlier turn. "
                "To continue the chat, pass the whole history's input_ids and the cache without "
                "pixel_values (the image is already in the cache); to send a new image, start a new cache."
            )

    def _decoder_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache_key, cache = _cache_of(kwargs)
        past = cache_length(cache)
        ctx = context.current(self.handle)
        visual = None
        if ctx is not None and ctx.owner is self.handle:
            visual = self.adapter.visual_mask(ctx.inputs, embeds)
        if visual is not None and bool(visual.any()):
            ctx.visual = visual
            if past > 0:
                raise ValueError(
                    "vlmprune: visual tokens arrived on a non-empty KV cache (an image in a later chat "
                    "turn). Pruning before the LLM supports images in the first forward of a sequence; "
                    "start a new cache for each image-bearing prompt."
                )
            return args, self._prune(module, kwargs, embeds, visual, ctx, cache_key, cache)
        state = self._states.get(cache) if cache is not None else None
        if state is not None:
            return args, self._continue(kwargs, embeds, state)
        return None

    def _prune(
        self, module: Any, kwargs: dict, embeds: Tensor, visual: Tensor, ctx: Any, cache_key: str, cache: Any
    ) -> dict:
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ValueError(
                "vlmprune: pre-LLM pruning needs a 2-D attention mask (or none); got a pre-built "
                f"{type(mask).__name__} mask. Static / compiled caches are not supported with pruning."
            )
        bsz, length = embeds.shape[:2]
        keep, new_embeds = self._reduce(ctx, embeds, visual, mask)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = default_positions(mask, bsz, length, 0, embeds.device)
        pruned = prune_sequence(new_embeds, keep, mask, pos, positions=self.positions)
        pruned = self._adjust(ctx, pruned, visual)
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = pruned.inputs_embeds
        kwargs["attention_mask"] = pruned.attention_mask
        kwargs["position_ids"] = pruned.position_ids
        ctx.columns = pruned.columns
        ctx.visual = gather_columns(visual, pruned.columns, False)
        cache = ensure_cache(module, kwargs, cache_key, cache)
        if cache is not None:
            state_mask = (
                pruned.attention_mask
                if pruned.attention_mask is not None
                else torch.ones(pruned.columns.shape, dtype=torch.long, device=embeds.device)
            )
            self._states[cache] = DecodeState(state_mask, pruned.attention_mask is not None, pruned.next_position,
                                              length - int(pruned.columns.shape[1]))
        real = mask.bool() if mask is not None else torch.ones_like(visual)
        visual_in = (visual & real).sum(1)
        new_real = pruned.columns >= 0
        if pruned.attention_mask is not None:
            new_real = pruned.attention_mask.bool()
        self.handle.stats.add(
            ForwardRecord(
                method=self.method.label,
                visual_in=visual_in.tolist(),
                visual_out=(visual_in - pruned.removed).tolist(),
                llm_tokens=new_real.sum(1).tolist(),
                seq_len=int(pruned.columns.shape[1]),
                positions=self.positions,
                scoring=self.adapter.score_kind if self.method.needs_scores else None,
                attn_backend=getattr(module.config, "_attn_implementation", None),
                overhead_flops=(self.adapter.scoring_flops(ctx) if self.method.needs_scores else 0.0)
                + float(getattr(ctx, "decision_flops", 0.0) or 0.0),
                call=ctx.serial,
            )
        )
        return kwargs

    def _reduce(self, ctx: Any, embeds: Tensor, visual: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The keep mask over columns and the (possibly averaged) embeddings: one decision per
        visual group. Seams whose reductions span several groups (video frames) override this."""
        groups = self.adapter.visual_groups(ctx, visual, self.method.needs_scores)
        needs = set(getattr(self.method, "needs", ())) | set(self._vision_needs())
        if needs:
            fill_signals(groups, needs, embeds, visual, mask)
            vision_side = needs - SEAM_SIGNALS
            if vision_side:
                self.adapter.vision_signals(ctx, groups, frozenset(vision_side))
        if self._relayout:
            self.adapter.anyres_groups(self.anyres, ctx, groups)
        reductions = []
        per_sample_index: dict[int, int] = {}
        seed = getattr(self.method.config, "seed", 0)
        for group in groups:
            i = per_sample_index.get(group.sample, 0)
            per_sample_index[group.sample] = i + 1
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)  # batch-invariant draws
            reductions.append(self.method.reduce(group, gen))
        ctx.decision_flops = sum(float(r.flops) for r in reductions)
        if self._relayout:
            return self.adapter.anyres_sequence(self.anyres, ctx, embeds, visual, groups, reductions)
        return apply_reductions(embeds, groups, reductions)

    def _adjust(self, ctx: Any, pruned: PrunedSequence, visual: Tensor) -> PrunedSequence:
        """Hook for seams that renumber the kept tokens (e.g. M-RoPE positions of a pooled video
        grid); the default keeps what :func:`prune_sequence` computed."""
        return pruned

    def _continue(self, kwargs: dict, embeds: Tensor, state: DecodeState) -> dict:
        return continue_pruned(kwargs, embeds, state)


PreLLMMethod.seams = (PreLLMSeam,)
