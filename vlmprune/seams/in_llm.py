"""The in-LLM seam: visual tokens leave the decoder's sequence after a layer chosen per sample.

transformers' decoders compute the attention mask and the rotary cos/sin once and hand them to
every layer, so removing tokens between two layers means fixing what each later layer receives.
Hooks on this instance only:

* a pre-hook on the decoder opens the per-call state: which columns are visual, which are real,
  the positions the stock model assigned, and (for decoding) the state of an earlier prefill
  found through the cache object;
* a pre-hook on every decoder layer gives it a sequence that matches its KV cache: for layers
  after the exit the visual rows are gone (hidden states, cos/sin, position ids gathered; a new
  mask over the layer's own shorter cache), and for a sample that exited while others in its
  batch still need their visual tokens, that sample's visual key columns are blocked for its
  text queries (exact: the same as removal, just not cheaper);
* a post-hook on every layer lets the exit policy decide, from the layer's output, which of the
  samples still holding visual tokens exit now.

Rows are physically dropped as soon as every sample in the batch has exited, and never re-added;
the remaining tokens keep their positions (1-D and multi-axis RoPE alike: the adapter says which
rows of the position ids the rotary embedding uses), so the first generated token sits where it
would in the stock model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .. import context
from ..sequence import decode_positions, gather_columns, gather_sequence, layer_mask, prune_sequence
from ..stats import ForwardRecord
from .pre_llm import _cache_len
from .scope import ensure_cache, install_scope

SUPPORTED_ATTENTION = ("eager", "sdpa")


class ExitPolicy(Protocol):
    """Decides the exit layer per sample; ``initial`` may decide everything up front."""

    label: str

    def initial(self, state: ExitState) -> None: ...

    def after_layer(self, layer: int, hidden: Tensor, state: ExitState) -> Tensor | None:
        """(B,) bool: samples (among the undecided) whose visual tokens leave after ``layer``."""
        ...


@dataclass
class ExitState:
    """One prefill's bookkeeping; lives on as long as its KV cache for the decode steps."""

    num_layers: int
    visual: Tensor  # (B, N) bool: visual columns of the decoder input
    valid: Tensor  # (B, N) bool: real (non-padding) columns
    positions: Tensor  # (B, N) or (R, B, N): the positions the stock model used
    exit_at: Tensor  # (B,) long: first layer without the sample's visual tokens (num_layers = never)
    decided: Tensor  # (B,) bool
    dropped_from: int | None = None  # layer from which the visual rows are physically gone
    columns: Tensor | None = None  # (B, N') decoder-input column of each short column (-1 = pad)
    short_valid: Tensor | None = None  # (B, N' + t): real columns of the short layers' caches
    full_valid: Tensor | None = None  # (B, N + t): real columns of the full layers' caches
    next_position: Tensor | None = None  # (B,): position of the next token (used when layer 0 is short)
    prefill: bool = True
    query_len: int = 0
    cache_key: Any = None
    call: int = 0  # serial of the prefill's call context
    _short: dict[str, Any] = field(default_factory=dict)  # per-call tensors reused by every short layer

    @property
    def batch(self) -> int:
        return int(self.visual.shape[0])


def _hidden_of(args: tuple, kwargs: dict) -> tuple[Tensor, bool]:
    if args and isinstance(args[0], Tensor):
        return args[0], True
    return kwargs["hidden_states"], False


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor, positional: bool) -> tuple[tuple, dict]:
    if positional:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


class InLLMSeam:
    """Installs one exit policy on one model instance through the adapter.

    Contract: the method gives an :class:`ExitPolicy` as its ``policy`` attribute (or is one); the
    seam calls it before the first layer and after each layer, and does all the sequence, mask,
    position and cache bookkeeping itself."""

    def __init__(self, adapter: Any, method: Any, handle: Any) -> None:
        self.adapter = adapter
        self.policy: ExitPolicy = getattr(method, "policy", method)
        self.handle = handle
        self.num_layers = len(adapter.decoder_layers)
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def install(self, hooks: Any) -> None:
        backend = getattr(self.adapter.text_config, "_attn_implementation", None) or "eager"
        if backend not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"vlmprune: {self.policy.label} supports attn_implementation in {SUPPORTED_ATTENTION}, "
                f"the model uses {backend!r}; load it with attn_implementation='sdpa'"
            )
        install_scope(self.adapter, hooks, self.handle)
        hooks.forward_pre(self.adapter.decoder, self._decoder_pre, with_kwargs=True)
        for i, layer in enumerate(self.adapter.decoder_layers):
            hooks.forward_pre(layer, self._layer_pre(i), with_kwargs=True)
            hooks.forward(layer, self._layer_post(i), with_kwargs=True)
        hooks.set_attr(self.adapter.model, "_supports_mm_encoder_outputs", lambda: False)

    # -- decoder ------------------------------------------------------------------------------
    def _decoder_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ctx = context.current(self.handle)
        if ctx is None:
            return None
        ctx.llm_state = None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache_key = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(cache_key)
        past = _cache_len(cache)
        visual = ctx.visual if ctx.visual is not None else self.adapter.visual_mask(ctx.inputs, embeds)
        if visual is not None and tuple(visual.shape) == tuple(embeds.shape[:2]) and bool(visual.any()):
            if past > 0:
                raise ValueError(
                    "vlmprune: visual tokens arrived on a non-empty KV cache (an image in a later chat turn); "
                    f"{self.policy.label} supports images in the first forward of a sequence"
                )
            return self._open(module, args, kwargs, embeds, visual.to(embeds.device), cache_key, cache, ctx)
        state = self._states.get(cache) if cache is not None else None
        if state is None:
            return None
        return self._continue(args, kwargs, embeds, state, ctx)

    def _open(self, module: Any, args: tuple, kwargs: dict, embeds: Tensor, visual: Tensor,
              cache_key: str, cache: Any, ctx: Any) -> tuple[tuple, dict]:
        bsz, n = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 2):
            raise ValueError(
                f"vlmprune: {self.policy.label} needs a 2-D attention mask (or none); got a pre-built "
                f"{type(mask).__name__}. Static / compiled caches are not supported."
            )
        valid = mask.bool().to(embeds.device) if mask is not None else torch.ones(bsz, n, dtype=torch.bool, device=embeds.device)
        pos = kwargs.get("position_ids")
        if not isinstance(pos, Tensor):
            pos = torch.arange(n, device=embeds.device).unsqueeze(0).expand(bsz, n)
        else:
            pos = self.adapter.rope_positions(pos)
        if pos.shape[-2] != bsz:
            pos = pos.expand(*pos.shape[:-2], bsz, n)
        kwargs = dict(kwargs)
        cache = ensure_cache(module, kwargs, cache_key, cache)
        state = ExitState(
            num_layers=self.num_layers, visual=visual & valid, valid=valid, positions=pos,
            exit_at=torch.full((bsz,), self.num_layers, dtype=torch.long, device=embeds.device),
            decided=torch.zeros(bsz, dtype=torch.bool, device=embeds.device),
            full_valid=valid, query_len=n, cache_key=cache_key, call=ctx.serial,
        )
        state.decided |= ~state.visual.any(dim=1)  # nothing to remove: never exits
        self.policy.initial(state)
        if cache is not None:
            self._states[cache] = state
        ctx.llm_state = state
        return args, kwargs

    def _continue(self, args: tuple, kwargs: dict, embeds: Tensor, state: ExitState, ctx: Any) -> tuple[tuple, dict] | None:
        q = embeds.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            tail = mask[:, -q:].bool().to(state.valid.device)
        else:
            tail = torch.ones(embeds.shape[0], q, dtype=torch.bool, device=state.valid.device)
        state.prefill = False
        state.query_len = q
        state._short = {}
        state.full_valid = torch.cat([state.full_valid, tail], dim=1)
        if state.short_valid is not None:
            state.short_valid = torch.cat([state.short_valid, tail], dim=1)
        ctx.llm_state = state
        if state.dropped_from != 0:
            return None
        # Every layer's cache is short: the stock mask and positions (sized from layer 0's cache)
        # would be wrong, so pass the short mask and continue the original numbering.
        kwargs = dict(kwargs)
        pos_in = kwargs.get("position_ids")
        axes = pos_in.shape[0] if isinstance(pos_in, Tensor) and pos_in.dim() == 3 else None
        kwargs["attention_mask"] = state.short_valid.long()
        kwargs["position_ids"] = decode_positions(state.next_position, q, axes)
        state.next_position = state.next_position + q
        return args, kwargs

    # -- layers -------------------------------------------------------------------------------
    def _layer_pre(self, index: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            ctx = context.current(self.handle)
            state = getattr(ctx, "llm_state", None) if ctx is not None else None
            if state is None:
                return None
            if state.prefill and state.dropped_from is None and bool(state.decided.all()) and bool(
                (state.exit_at <= index).all()
            ):
                return self._drop(index, args, dict(kwargs), state, ctx)
            if state.dropped_from is not None and index >= state.dropped_from:
                return self._short_layer(args, dict(kwargs), state)
            exited = state.exit_at <= index
            if bool(exited.any()):
                return self._masked_layer(args, dict(kwargs), state, exited)
            return None

        return hook

    def _layer_post(self, index: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            ctx = context.current(self.handle)
            state = getattr(ctx, "llm_state", None) if ctx is not None else None
            if state is None or not state.prefill:
                return None
            if state.dropped_from is None and not bool(state.decided.all()):
                hidden = output[0] if isinstance(output, tuple) else output
                fire = self.policy.after_layer(index, hidden, state)
                if fire is not None:
                    fire = fire.to(state.decided.device) & ~state.decided
                    state.exit_at[fire] = index + 1
                    state.decided |= fire
            if index == self.num_layers - 1:
                state.decided[:] = True
                self._record(state)
            return None

        return hook

    def _drop(self, index: int, args: tuple, kwargs: dict, state: ExitState, ctx: Any) -> tuple[tuple, dict]:
        hidden, positional = _hidden_of(args, kwargs)
        keep = ~state.visual
        pruned = prune_sequence(hidden, keep, state.valid.long(), state.positions, positions="original")
        state.dropped_from = index
        state.columns = pruned.columns
        state.short_valid = pruned.columns >= 0
        state.query_len = int(pruned.columns.shape[1])
        state.next_position = pruned.next_position
        ctx.columns = pruned.columns if ctx.columns is None else gather_columns(ctx.columns, pruned.columns, -1)
        if ctx.visual is not None:
            ctx.visual = torch.zeros_like(pruned.columns, dtype=torch.bool)
        args, kwargs = _with_hidden(args, kwargs, pruned.inputs_embeds, positional)
        return self._short_layer(args, kwargs, state)

    def _short_layer(self, args: tuple, kwargs: dict, state: ExitState) -> tuple[tuple, dict]:
        cached = state._short
        if "mask" not in cached:
            like = kwargs.get("attention_mask")
            cached["mask"] = layer_mask(state.short_valid, state.query_len, like if isinstance(like, Tensor) else None)
            if state.prefill:
                cos, sin = kwargs["position_embeddings"]
                cached["rope"] = (gather_sequence(cos, state.columns, 1), gather_sequence(sin, state.columns, 1))
                pos = kwargs.get("position_ids")
                cached["pos"] = gather_sequence(pos, state.columns, -1) if isinstance(pos, Tensor) else pos
        kwargs["attention_mask"] = cached["mask"]
        if state.prefill:
            kwargs["position_embeddings"] = cached["rope"]
            kwargs["position_ids"] = cached["pos"]
        return args, kwargs

    def _masked_layer(self, args: tuple, kwargs: dict, state: ExitState, exited: Tensor) -> tuple[tuple, dict]:
        key = ("masked", tuple(exited.tolist()))
        if key not in state._short:
            kv = state.full_valid.shape[1]
            q = state.query_len
            vis_keys = torch.zeros(state.batch, kv, dtype=torch.bool, device=state.visual.device)
            vis_keys[:, : state.visual.shape[1]] = state.visual
            vis_keys &= exited.unsqueeze(1)
            if state.prefill:
                text_queries = ~state.visual  # visual rows of an exited sample are dead compute
            else:
                text_queries = torch.ones(state.batch, q, dtype=torch.bool, device=vis_keys.device)
            blocked = text_queries.unsqueeze(2) & vis_keys.unsqueeze(1)
            like = kwargs.get("attention_mask")
            state._short[key] = layer_mask(state.full_valid, q, like if isinstance(like, Tensor) else None, blocked)
        kwargs["attention_mask"] = state._short[key]
        return args, kwargs

    # -- stats --------------------------------------------------------------------------------
    def _record(self, state: ExitState) -> None:
        L = self.num_layers
        n_full = state.valid.sum(1)
        n_vis = state.visual.sum(1)
        dropped = state.dropped_from if state.dropped_from is not None else L
        layer_tokens = [
            [int(n_full[b]) if j < dropped else int(n_full[b] - n_vis[b]) for j in range(L)] for b in range(state.batch)
        ]
        short_len = int(state.columns.shape[1]) if state.columns is not None else int(state.valid.shape[1])
        self.handle.stats.add(
            ForwardRecord(
                method=self.policy.label,
                visual_in=n_vis.tolist(),
                visual_out=[round(float(v) * int(e) / L) for v, e in zip(n_vis, state.exit_at.clamp(max=L))],
                llm_tokens=n_full.tolist(),
                seq_len=int(state.valid.shape[1]),
                positions="original",
                attn_backend=getattr(self.adapter.text_config, "_attn_implementation", None),
                overhead_flops=getattr(self.policy, "overhead_flops", lambda s: 0.0)(state),
                exit_layers=[int(e) for e in state.exit_at.clamp(max=L)],
                layer_tokens=layer_tokens,
                layer_seq_len=[int(state.valid.shape[1]) if j < dropped else short_len for j in range(L)],
                call=state.call,
            )
        )
