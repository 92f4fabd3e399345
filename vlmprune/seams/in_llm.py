"""The in-LLM seam: visual tokens leave the decoder's sequence after a layer, all or a subset, once
or in several stages per forward.

transformers' decoders compute the attention mask and the rotary cos/sin once and hand them to
every layer, so removing tokens between two layers means fixing what each later layer receives.
Hooks on this instance only:

* a pre-hook on the decoder opens the per-call state: which columns are visual, which are real,
  the positions the stock model assigned, and (for decoding) the state of an earlier prefill
  found through the cache object;
* a post-hook on every layer asks the method's policy what to do next: an *exit* policy (DyVTE)
  says which samples drop all their visual rows, a *pruning* policy returns a :class:`Keep`, the
  subset of the current visual rows (plus, optionally, new merged visual rows) the next layers
  run on. The seam hands the policy the signals it asked for (:class:`LayerSignals`: one layer's
  queries and keys, captured from the layer itself, so the model keeps SDPA; or a later layer's
  projections of the current hidden states; the final norm), and charges their cost in FLOPs;
* a pre-hook on every layer gives it a sequence that matches its KV cache: after a stage the rows
  are gathered into a new *layout* (hidden states, cos/sin and position ids gathered, or
  renumbered contiguously and recomputed; a new mask over the layer's own shorter cache); for a
  sample that exited while others in its batch still need their visual tokens, that sample's
  visual key columns are blocked for its text queries (exact: the same as removal, just not
  cheaper).

Samples of a batch that keep different numbers of rows are re-padded to a common length (padding
rows masked), so a batch gives what each sample gives alone; samples without visual tokens pass
through. The caches of layers after a stage really are shorter, decoding continues on them (each
layer gets a mask over its own cache and, with contiguous positions, its own position for the new
token), and a later chat turn on the same cache works as for the stock model. With ``original``
positions the kept tokens keep the positions they had (1-D and multi-axis RoPE alike: the adapter
says which rows of the position ids the rotary embedding uses), so the first generated token sits
where it would in the stock model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .. import context
from ..method import Method
from ..sequence import decode_positions, gather_columns, gather_sequence, layer_mask, padding_side
from ..stats import ForwardRecord
from .pre_llm import _cache_len
from .scope import ensure_cache, install_scope

SUPPORTED_ATTENTION = ("eager", "sdpa")
#: how the rows after a stage are numbered: ``original`` keeps each token's position (FastV, DART),
#: ``contiguous`` renumbers the real rows 0.. after every stage (PyramidDrop, SparseVLM on 1-D RoPE)
POSITIONS = ("original", "contiguous")


class ExitPolicy(Protocol):
    """Decides the exit layer per sample; ``initial`` may decide everything up front."""

    label: str

    def initial(self, state: ExitState) -> None: ...

    def after_layer(self, layer: int, hidden: Tensor, state: ExitState) -> Tensor | None:
        """(B,) bool: samples (among the undecided) whose visual tokens leave after ``layer``."""
        ...


class PrunePolicy(Protocol):
    """Keeps a subset of the visual rows after chosen layers.

    ``attention_layers``: layers whose own queries and keys the seam keeps for :meth:`select`
    (``signals.attention()``); ``positions``: one of :data:`POSITIONS`. ``select`` runs after every
    layer of a prefill (but the last); a :class:`Keep` it returns applies from the next layer on."""

    label: str
    positions: str
    attention_layers: frozenset[int]

    def initial(self, state: ExitState) -> None: ...

    def select(self, layer: int, signals: LayerSignals, state: ExitState) -> Keep | None: ...


@dataclass
class Keep:
    """A pruning decision over the rows of the current layout.

    ``keep`` (B, L) bool: rows that stay; only visual rows may go (text and padding are never
    removed by a policy). ``extra`` (B, E, D): new visual rows (e.g. merged tokens), inserted
    right after each sample's last kept visual row (or where its visual rows began, when none is
    kept); ``extra_count`` (B,) how many of the E are real per sample; ``extra_anchor`` (B, E): the
    current row whose position a new row takes under ``original`` positions. ``flops``: the
    decision's own cost beyond what the signals charged (added to the overhead)."""

    keep: Tensor
    extra: Tensor | None = None
    extra_count: Tensor | None = None
    extra_anchor: Tensor | None = None
    flops: float = 0.0


@dataclass
class Layout:
    """The rows a run of decoder layers works on, from layer ``start`` until the next layout.

    ``columns``: decoder-input column each row stands for (-1 = padding; a merged row names the
    column whose position it took); ``rows``: the row of the previous layout each row was taken
    from (>= that layout's length: the i-th new row of the :class:`Keep`)."""

    start: int
    rows: Tensor  # (B, L')
    columns: Tensor  # (B, L')
    valid: Tensor  # (B, L') real rows
    visual: Tensor  # (B, L') visual rows (merged rows count as visual)
    positions: Tensor  # (B, L') or (R, B, L'): the positions the rows carry
    next_position: Tensor  # (B,): position of the next token in this layout's numbering
    kv_valid: Tensor  # (B, L' + decoded): real columns of the caches of this layout's layers
    shift: Tensor | None = None  # (B,): stock next position minus this layout's (contiguous numbering)

    @property
    def length(self) -> int:
        return int(self.valid.shape[1])


# -- pure sequence and score functions -------------------------------------------------------------


def relayout(
    valid: Tensor, visual: Tensor, columns: Tensor, positions: Tensor, keep: Tensor, start: int, *,
    extra_count: Tensor | None = None, extra_anchor: Tensor | None = None, contiguous: bool = False,
    stock_next: Tensor | None = None,
) -> Layout:
    """The layout after keeping the rows ``keep`` (B, L) of a layout described by ``valid``,
    ``visual``, ``columns`` (B, L) and ``positions`` ((B, L) or (R, B, L)), with ``extra_count``
    new rows per sample inserted after its last kept visual row.

    Samples are re-padded to the longest on the side the old padding was on (left by default).
    ``contiguous``: real rows are renumbered from each sample's first real position on (1-D
    positions only); ``stock_next`` (B,) is then the stock model's next position, from which the
    layout's decode ``shift`` follows. Otherwise rows keep their positions (a new row takes its
    anchor's)."""
    bsz, length = keep.shape
    device = keep.device
    keep = keep.to(torch.bool) & valid
    side = padding_side(valid.long())
    n_extra = int(extra_anchor.shape[1]) if extra_anchor is not None else 0
    picked = []
    for b in range(bsz):
        idx = torch.nonzero(keep[b], as_tuple=False).squeeze(1)
        e = int(extra_count[b]) if n_extra else 0
        if e:
            kept_visual = torch.nonzero(keep[b] & visual[b], as_tuple=False).squeeze(1)
            if kept_visual.numel():
                after = int(kept_visual[-1])
            else:
                first = torch.nonzero(visual[b] & valid[b], as_tuple=False).squeeze(1)
                after = int(first[0]) - 1 if first.numel() else length - 1
            cut = int((idx <= after).sum())
            new = torch.arange(length, length + e, device=device)
            idx = torch.cat([idx[:cut], new, idx[cut:]])
        picked.append(idx)
    new_len = max((int(p.numel()) for p in picked), default=0)
    rows = torch.full((bsz, new_len), -1, dtype=torch.long, device=device)
    for b, idx in enumerate(picked):
        if side == "left":
            rows[b, new_len - idx.numel():] = idx
        else:
            rows[b, : idx.numel()] = idx
    pad = rows < 0
    src = rows.clamp(min=0)
    pos = positions if positions.dim() == 3 else positions.unsqueeze(0)
    if pos.shape[-2] != bsz:
        pos = pos.expand(pos.shape[0], bsz, length)
    if contiguous:
        if pos.shape[0] != 1:
            raise ValueError(
                "vlmprune: contiguous positions after in-LLM pruning need 1-D RoPE positions; this model "
                "numbers tokens on several rotary axes (M-RoPE): use positions='original'"
            )
        base = pos[0].masked_fill(~valid, torch.iinfo(pos.dtype).max).amin(dim=1)
        base = torch.where(valid.any(dim=1), base, torch.zeros_like(base))
    if n_extra:
        anchor = extra_anchor.to(device).clamp(min=0)
        columns = torch.cat([columns, torch.gather(columns, 1, anchor)], dim=1)
        visual = torch.cat([visual, torch.ones(bsz, n_extra, dtype=torch.bool, device=device)], dim=1)
        pos = torch.cat([pos, torch.gather(pos, 2, anchor.unsqueeze(0).expand(pos.shape[0], bsz, n_extra))], dim=2)
    new_columns = torch.gather(columns, 1, src).masked_fill(pad, -1)
    new_valid = ~pad
    new_visual = torch.gather(visual, 1, src) & new_valid
    if contiguous:
        rank = torch.cumsum(new_valid.long(), dim=1) - 1
        new_pos = (base.unsqueeze(1) + rank).masked_fill(pad, 0).unsqueeze(0)
        next_position = base + new_valid.sum(dim=1)
        shift = (stock_next - next_position) if stock_next is not None else torch.zeros_like(next_position)
    else:
        new_pos = torch.gather(pos, 2, src.unsqueeze(0).expand(pos.shape[0], bsz, new_len))
        new_pos = new_pos.masked_fill(pad.unsqueeze(0), 0)
        masked = new_pos.masked_fill(~new_valid.unsqueeze(0), torch.iinfo(new_pos.dtype).min)
        next_position = masked.amax(dim=(0, 2)) + 1 if new_len else torch.zeros(bsz, dtype=torch.long, device=device)
        next_position = torch.where(new_valid.any(dim=1), next_position, torch.zeros_like(next_position))
        shift = None
    if positions.dim() == 2:
        new_pos = new_pos[0]
    return Layout(start, rows, new_columns, new_valid, new_visual, new_pos, next_position, new_valid, shift)


def last_rows(valid: Tensor) -> Tensor:
    """(B, 1): the last real row of each sample (its last prompt token; 0 for an empty sample)."""
    cols = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    return torch.where(valid, cols, torch.full_like(cols, -1)).amax(dim=1, keepdim=True).clamp(min=0)


def attention_probs(q: Tensor, k: Tensor, rows: Tensor, key_valid: Tensor, scaling: float) -> Tensor:
    """Softmax attention of the query rows ``rows`` (B, r) over all keys, per head, in fp32.

    ``q`` (B, H, r, d) and ``k`` (B, H, L, d) are post-RoPE (keys already repeated to the query
    heads, as the attention does for grouped-query models). A row attends causally (to keys at or
    before its own row) and only to real keys, exactly what the layer's own attention computes for
    it; the probabilities are those an eager attention map holds at ``[:, :, rows, :]``. A row with
    no key left (a padding row) comes out as zeros. Returns (B, H, r, L)."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    cols = torch.arange(k.shape[2], device=k.device)
    allowed = key_valid.bool().unsqueeze(1) & (cols.view(1, 1, -1) <= rows.unsqueeze(-1))  # (B, r, L)
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def repeat_kv(k: Tensor, heads: int) -> Tensor:
    """(B, KV, L, d) -> (B, heads, L, d): each key head serves ``heads // KV`` query heads in turn,
    as transformers' ``repeat_kv`` does."""
    bsz, kv, length, dim = k.shape
    if kv == heads:
        return k
    return k[:, :, None].expand(bsz, kv, heads // kv, length, dim).reshape(bsz, heads, length, dim)


def keep_top(scores: Tensor, visual: Tensor, counts: Tensor | list[int]) -> Tensor:
    """(B, L) keep mask: every non-visual row, plus each sample's ``counts[b]`` highest-scoring
    visual rows (exact ties to the lowest row)."""
    from ..scoring import topk_indices

    keep = ~visual.clone()
    for b in range(visual.shape[0]):
        rows = torch.nonzero(visual[b], as_tuple=False).squeeze(1)
        if rows.numel() == 0:
            continue
        chosen = topk_indices(scores[b, rows].float(), int(counts[b]))
        keep[b, rows[chosen]] = True
    return keep


# -- what a pruning policy can ask for -------------------------------------------------------------


@dataclass
class LayerAttention:
    """One decoder layer's queries and keys over the current rows, and the attention rows a
    policy asks for. ``key_proj`` (B, L, KV*d): the keys before RoPE; ``query_rows(rows)`` gives
    the queries (before RoPE) of the rows (B, r); ``rope`` the layer's (cos, sin). Every product is
    charged to the call's overhead."""

    key_proj: Tensor
    query_rows: Callable[[Tensor], Tensor]
    rope: tuple[Tensor, Tensor]
    apply_rope: Callable
    heads: int
    head_dim: int
    scaling: float
    valid: Tensor
    charge: Callable[[float], None]
    _keys: Tensor | None = None
    _keys_first: Tensor | None = None

    def keys(self, from_first_token: bool = False) -> Tensor:
        """(B, H, L, d): post-RoPE keys, repeated to the query heads.

        ``from_first_token``: rotate as if each row's positions started at 0 on its first valid
        token. Attention scores only see position differences, but a key's own norm (other than
        L2) depends on its absolute angle, and a plain ``forward`` on a left-padded batch numbers
        a padded row from the padding; this makes such a statistic the same for a row in a batch
        as for the sample alone (a no-op for an unpadded row)."""
        if from_first_token:
            if self._keys_first is None:
                cos, sin = self.rope
                first = self.valid.float().argmax(dim=1)
                cos_s = gather_sequence(cos, first.unsqueeze(1), 1)
                sin_s = gather_sequence(sin, first.unsqueeze(1), 1)
                amp = torch.sqrt(cos_s * cos_s + sin_s * sin_s).clamp(min=1e-12)  # rope's attention scaling
                shifted = ((cos * cos_s + sin * sin_s) / amp, (sin * cos_s - cos * sin_s) / amp)
                self._keys_first = self._rotated_keys(shifted)
            return self._keys_first
        if self._keys is None:
            self._keys = self._rotated_keys(self.rope)
        return self._keys

    def _rotated_keys(self, rope: tuple[Tensor, Tensor]) -> Tensor:
        bsz, length, _ = self.key_proj.shape
        k = self.key_proj.view(bsz, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope
        _, k = self.apply_rope(k, k, cos, sin)
        return repeat_kv(k, self.heads)

    def queries(self, rows: Tensor) -> Tensor:
        """(B, H, r, d): post-RoPE queries of the rows (B, r)."""
        q = self.query_rows(rows)
        bsz, r, _ = q.shape
        q = q.view(bsz, r, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.rope
        cos_r, sin_r = gather_sequence(cos, rows, 1), gather_sequence(sin, rows, 1)
        q, _ = self.apply_rope(q, q, cos_r, sin_r)
        return q

    def probs(self, rows: Tensor) -> Tensor:
        """(B, H, r, L) fp32: the attention the rows pay every key (see :func:`attention_probs`)."""
        q = self.queries(rows)
        k = self.keys()
        self.charge(2.0 * k.shape[0] * self.heads * rows.shape[1] * k.shape[2] * self.head_dim)
        return attention_probs(q, k, rows, self.valid, self.scaling)


class LayerSignals:
    """What a policy may read after layer ``layer``: the current rows (``valid``, ``visual``,
    ``columns``), the layer's output ``hidden``, the layer's own attention (if it is one of the
    policy's ``attention_layers``), a later layer's projections of ``hidden`` and the final norm.
    Family facts come from the adapter; the pre-norm layer layout (``input_layernorm``) and the
    decoder's final ``norm`` / ``rotary_emb`` are those of every supported decoder."""

    def __init__(self, seam: InLLMSeam, state: ExitState, layer: int, hidden: Tensor) -> None:
        self.seam, self.state, self.layer, self.hidden = seam, state, layer, hidden
        layout = state.current
        self.valid = layout.valid if layout is not None else state.valid
        self.visual = layout.visual if layout is not None else state.visual
        self.columns = layout.columns if layout is not None else state.full_columns

    def charge(self, flops: float) -> None:
        self.state.overhead += float(flops)

    def _layer_attention(self, index: int, key_proj: Tensor, query_rows: Callable[[Tensor], Tensor]) -> LayerAttention:
        attn = self.seam.adapter.decoder_attention(index)
        head_dim = int(attn.head_dim)
        heads = int(attn.q_proj.out_features) // head_dim
        scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
        return LayerAttention(key_proj, query_rows, self.state.rope_last, self.seam.adapter.llm_rope(attn), heads,
                              head_dim, scaling, self.valid, self.charge)

    def attention(self) -> LayerAttention:
        """This layer's own queries and keys (captured while it ran; the layer kept its backend)."""
        seen = self.state.captured.get(self.layer)
        if seen is None or "q" not in seen or "k" not in seen:
            raise RuntimeError(f"vlmprune: layer {self.layer}'s queries and keys were not captured; "
                               "list it in the policy's attention_layers")
        q = seen["q"]
        return self._layer_attention(self.layer, seen["k"], lambda rows: gather_sequence(q, rows, 1))

    def projected(self, index: int) -> LayerAttention:
        """Layer ``index``'s own norm and projections applied to ``hidden`` with the current rows'
        rotary embedding (what that layer would compute on these rows), queries only for the rows
        asked for; the projections are charged to the overhead."""
        layer = self.seam.adapter.decoder_layers[index]
        attn = self.seam.adapter.decoder_attention(index)
        norm = getattr(layer, "input_layernorm", None)
        if norm is None:
            raise ValueError(f"vlmprune: decoder layer {index} has no input_layernorm (a pre-norm decoder is assumed)")
        normed = norm(self.hidden)
        bsz, length, width = normed.shape
        key_proj = attn.k_proj(normed)
        self.charge(2.0 * bsz * length * width * key_proj.shape[-1])

        def query_rows(rows: Tensor) -> Tensor:
            picked = gather_sequence(normed, rows, 1)
            q = attn.q_proj(picked)
            self.charge(2.0 * bsz * rows.shape[1] * width * q.shape[-1])
            return q

        return self._layer_attention(index, key_proj, query_rows)

    def final_norm(self) -> Tensor:
        """The decoder's final norm applied to ``hidden`` (what the LM head would read)."""
        norm = getattr(self.seam.adapter.decoder, "norm", None)
        if norm is None:
            raise ValueError("vlmprune: the decoder has no final norm module named 'norm'")
        return norm(self.hidden)


# -- the per-call state ----------------------------------------------------------------------------


@dataclass
class ExitState:
    """One prefill's bookkeeping; lives on as long as its KV cache for the decode steps."""

    num_layers: int
    visual: Tensor  # (B, N) bool: visual columns of the decoder input
    valid: Tensor  # (B, N) bool: real (non-padding) columns
    positions: Tensor  # (B, N) or (R, B, N): the positions the stock model used
    exit_at: Tensor  # (B,) long: first layer without the sample's visual tokens (num_layers = never)
    decided: Tensor  # (B,) bool
    full_valid: Tensor | None = None  # (B, N + t): real columns of the full layers' caches
    layouts: list[Layout] = field(default_factory=list)  # physical re-layouts, by start layer
    stage_visual: list[list[int]] = field(default_factory=list)  # visual rows per sample after each stage
    stage_layers: list[int] = field(default_factory=list)  # first layer of each stage
    pending: tuple[int, Keep] | None = None  # a decision to apply before layer [0]
    embeds: Tensor | None = None  # the decoder's input embeddings (prefill only)
    base_columns: Tensor | None = None  # the pre-LLM seam's column map when the decoder was entered
    overhead: float = 0.0  # FLOPs the policy's signals and decisions cost in this prefill
    rope_last: Any = None  # the (cos, sin) the last layer ran with
    captured: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # per attention layer: q, k
    scratch: dict[str, Any] = field(default_factory=dict)  # the policy's own per-call values
    stock_next: Tensor | None = None  # (B,): next position in the stock model's numbering
    next_position: Tensor | None = None  # (B,): position of the next token (used when layer 0 is short)
    prefill: bool = True
    query_len: int = 0
    cache_key: Any = None
    call: int = 0  # serial of the prefill's call context
    _short: dict[Any, Any] = field(default_factory=dict)  # per-call tensors reused by every short layer

    @property
    def batch(self) -> int:
        return int(self.visual.shape[0])

    @property
    def dropped_from(self) -> int | None:
        """First layer that runs on a re-laid-out (shorter) sequence."""
        return self.layouts[0].start if self.layouts else None

    @property
    def current(self) -> Layout | None:
        """The latest layout (None: the decoder input's)."""
        return self.layouts[-1] if self.layouts else None

    @property
    def full_columns(self) -> Tensor:
        n = self.valid.shape[1]
        return torch.arange(n, device=self.valid.device).expand(self.batch, n).masked_fill(~self.valid, -1)

    def layout_at(self, layer: int) -> Layout | None:
        found = None
        for layout in self.layouts:
            if layout.start <= layer:
                found = layout
        return found


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
    """Installs one exit or pruning policy on one model instance through the adapter.

    Contract: the method gives its policy as its ``policy`` attribute (or is one): an
    :class:`ExitPolicy` (``after_layer``) or a :class:`PrunePolicy` (``select``). The seam calls it
    before the first layer and after each layer, and does all the sequence, mask, position and
    cache bookkeeping itself."""

    def __init__(self, adapter: Any, method: Any, handle: Any) -> None:
        self.adapter = adapter
        self.policy: Any = getattr(method, "policy", method)
        self.handle = handle
        self.num_layers = len(adapter.decoder_layers)
        self.prunes = hasattr(self.policy, "select")
        self.attention_layers = frozenset(getattr(self.policy, "attention_layers", ()) or ())
        self.last: ExitState | None = None  # the latest prefill's state, for inspection
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def install(self, hooks: Any) -> None:
        backend = getattr(self.adapter.text_config, "_attn_implementation", None) or "eager"
        if backend not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"vlmprune: {self.policy.label} supports attn_implementation in {SUPPORTED_ATTENTION}, "
                f"the model uses {backend!r}; load it with attn_implementation='sdpa'"
            )
        bad = sorted(i for i in self.attention_layers if not 0 <= i < self.num_layers)
        if bad:
            raise ValueError(f"vlmprune: {self.policy.label} asks for the attention of layer(s) {bad}; "
                             f"the model has layers 0..{self.num_layers - 1}")
        install_scope(self.adapter, hooks, self.handle)
        hooks.forward_pre(self.adapter.decoder, self._decoder_pre, with_kwargs=True)
        for i, layer in enumerate(self.adapter.decoder_layers):
            hooks.forward_pre(layer, self._layer_pre(i), with_kwargs=True)
            hooks.forward(layer, self._layer_post(i), with_kwargs=True)
        for i in sorted(self.attention_layers):
            attn = self.adapter.decoder_attention(i)
            hooks.forward(attn.q_proj, self._capture(i, "q"))
            hooks.forward(attn.k_proj, self._capture(i, "k"))
        hooks.set_attr(self.adapter.model, "_supports_mm_encoder_outputs", lambda: False)

    def _state(self) -> ExitState | None:
        ctx = context.current(self.handle)
        return getattr(ctx, "llm_state", None) if ctx is not None else None

    def _capture(self, index: int, key: str):
        def hook(module: Any, args: tuple, output: Tensor) -> None:
            state = self._state()
            if state is not None and state.prefill:
                state.captured.setdefault(index, {})[key] = output
            return None

        return hook

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
        if self.prunes:
            state.decided[:] = True  # a pruning policy decides per stage, not per-sample exits
            state.embeds = embeds
            state.base_columns = ctx.columns
            axes = pos if pos.dim() == 3 else pos.unsqueeze(0)
            last = axes.masked_fill(~valid.unsqueeze(0), torch.iinfo(axes.dtype).min).amax(dim=(0, 2)) + 1
            state.stock_next = torch.where(valid.any(dim=1), last, torch.zeros_like(last))
            if getattr(self.policy, "positions", "original") == "contiguous" and pos.dim() == 3:
                raise ValueError(
                    f"vlmprune: {self.policy.label} with positions='contiguous' needs 1-D RoPE positions; this "
                    "model numbers tokens on several rotary axes (M-RoPE): use positions='original'"
                )
        self.policy.initial(state)
        if cache is not None:
            self._states[cache] = state
        ctx.llm_state = state
        self.last = state
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
        state.captured = {}
        state.full_valid = torch.cat([state.full_valid, tail], dim=1)
        for layout in state.layouts:
            layout.kv_valid = torch.cat([layout.kv_valid, tail], dim=1)
        ctx.llm_state = state
        if state.dropped_from != 0:
            return None
        # Every layer's cache is short: the stock mask and positions (sized from layer 0's cache)
        # would be wrong, so pass the short mask and continue the original numbering.
        kwargs = dict(kwargs)
        pos_in = kwargs.get("position_ids")
        axes = pos_in.shape[0] if isinstance(pos_in, Tensor) and pos_in.dim() == 3 else None
        kwargs["attention_mask"] = state.layouts[0].kv_valid.long()
        kwargs["position_ids"] = decode_positions(state.next_position, q, axes)
        state.next_position = state.next_position + q
        return args, kwargs

    # -- layers -------------------------------------------------------------------------------
    def _layer_pre(self, index: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self._state()
            if state is None:
                return None
            out = self._route(index, args, dict(kwargs), state)
            seen = (out[1] if out is not None else kwargs).get("position_embeddings")
            state.rope_last = seen
            return out

        return hook

    def _route(self, index: int, args: tuple, kwargs: dict, state: ExitState) -> tuple[tuple, dict] | None:
        if state.prefill:
            if state.pending is not None and state.pending[0] == index:
                _, keep = state.pending
                state.pending = None
                return self._stage(index, args, kwargs, state, keep)
            if (not self.prunes and state.dropped_from is None and bool(state.decided.all())
                    and bool((state.exit_at <= index).all())):
                return self._drop(index, args, kwargs, state)
        layout = state.layout_at(index)
        if layout is not None:
            return self._short_layer(args, kwargs, state, layout)
        exited = state.exit_at <= index
        if bool(exited.any()):
            return self._masked_layer(args, kwargs, state, exited)
        return None

    def _layer_post(self, index: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            state = self._state()
            if state is None or not state.prefill:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if self.prunes:
                if index < self.num_layers - 1:
                    keep = self.policy.select(index, LayerSignals(self, state, index, hidden), state)
                    if keep is not None:
                        state.pending = (index + 1, keep)
                state.captured.pop(index, None)
            elif state.dropped_from is None and not bool(state.decided.all()):
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

    def _relaid(self, index: int, args: tuple, kwargs: dict, state: ExitState, layout: Layout,
                extra: Tensor | None, ctx: Any) -> tuple[tuple, dict]:
        """Gather the hidden states into ``layout`` and run layer ``index`` on it."""
        hidden, positional = _hidden_of(args, kwargs)
        if extra is not None:
            hidden = torch.cat([hidden, extra.to(hidden.dtype)], dim=1)
        src = layout.rows.clamp(min=0)
        new = torch.gather(hidden, 1, src.unsqueeze(-1).expand(*src.shape, hidden.shape[-1]))
        new = new.masked_fill((layout.rows < 0).unsqueeze(-1), 0)
        state.layouts.append(layout)
        state._short = {}
        if ctx is not None:
            base = state.base_columns if self.prunes else ctx.columns
            ctx.columns = layout.columns if base is None else gather_columns(base, layout.columns, -1)
            if ctx.visual is not None:
                ctx.visual = layout.visual.clone()
        args, kwargs = _with_hidden(args, kwargs, new, positional)
        return self._short_layer(args, kwargs, state, layout)

    def _drop(self, index: int, args: tuple, kwargs: dict, state: ExitState) -> tuple[tuple, dict]:
        """Every sample exits before ``index``: all visual rows leave (original positions)."""
        layout = relayout(state.valid, state.visual, state.full_columns, state.positions, ~state.visual, index)
        state.next_position = layout.next_position
        return self._relaid(index, args, kwargs, state, layout, None, context.current(self.handle))

    def _stage(self, index: int, args: tuple, kwargs: dict, state: ExitState, keep: Keep) -> tuple[tuple, dict]:
        """Apply a pruning policy's decision before layer ``index``."""
        cur = state.current
        valid = cur.valid if cur is not None else state.valid
        visual = cur.visual if cur is not None else state.visual
        columns = cur.columns if cur is not None else state.full_columns
        positions = cur.positions if cur is not None else state.positions
        mask = keep.keep.to(valid.device).bool()
        if tuple(mask.shape) != tuple(valid.shape):
            raise ValueError(f"vlmprune: {self.policy.label} gave a keep mask of shape {tuple(mask.shape)} "
                             f"for rows {tuple(valid.shape)}")
        mask = (mask | ~visual) & valid
        extra_count = keep.extra_count
        n_extra = int(extra_count.sum()) if keep.extra is not None and extra_count is not None else 0
        state.overhead += float(keep.flops)
        state.stage_layers.append(index)
        removed = bool((valid & ~mask).any())
        if not removed and n_extra == 0:  # nothing changes: the layers keep running on the same rows
            state.stage_visual.append((visual & valid).sum(1).tolist())
            return self._route(index, args, kwargs, state) or (args, kwargs)
        contiguous = getattr(self.policy, "positions", "original") == "contiguous"
        layout = relayout(
            valid, visual, columns, positions, mask, index,
            extra_count=extra_count if n_extra else None, extra_anchor=keep.extra_anchor if n_extra else None,
            contiguous=contiguous, stock_next=state.stock_next,
        )
        state.next_position = layout.next_position
        state.stage_visual.append(layout.visual.sum(1).tolist())
        return self._relaid(index, args, kwargs, state, layout, keep.extra if n_extra else None,
                            context.current(self.handle))

    def _rotary(self, like: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        rotary = getattr(self.adapter.decoder, "rotary_emb", None)
        if rotary is None:
            raise ValueError("vlmprune: contiguous positions need the decoder's rotary embedding (rotary_emb)")
        return rotary(like, positions)

    def _short_layer(self, args: tuple, kwargs: dict, state: ExitState, layout: Layout) -> tuple[tuple, dict]:
        cached = state._short.setdefault(id(layout), {})
        if "mask" not in cached:
            like = kwargs.get("attention_mask")
            q = layout.length if state.prefill else state.query_len
            cached["mask"] = layer_mask(layout.kv_valid, q, like if isinstance(like, Tensor) else None)
            pos = kwargs.get("position_ids")
            if state.prefill:
                if layout.shift is None:
                    cos, sin = kwargs["position_embeddings"]
                    cached["rope"] = (gather_sequence(cos, layout.columns, 1), gather_sequence(sin, layout.columns, 1))
                    cached["pos"] = gather_sequence(pos, layout.columns, -1) if isinstance(pos, Tensor) else pos
                else:
                    hidden, _ = _hidden_of(args, kwargs)
                    cached["rope"] = self._rotary(hidden, layout.positions)
                    cached["pos"] = layout.positions if isinstance(pos, Tensor) else pos
            elif layout.shift is not None:
                hidden, _ = _hidden_of(args, kwargs)
                if not isinstance(pos, Tensor):
                    raise ValueError("vlmprune: contiguous positions need the decoder to pass position_ids to its layers")
                shifted = pos.to(layout.shift.device) - layout.shift.view(-1, 1)
                cached["rope"] = self._rotary(hidden, shifted)
                cached["pos"] = shifted
        kwargs["attention_mask"] = cached["mask"]
        if "rope" in cached:
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
        per_layer = [state.layout_at(j) for j in range(L)]
        layer_tokens = [
            [int(n_full[b]) if lay is None else int(lay.valid[b].sum()) for lay in per_layer] for b in range(state.batch)
        ]
        layer_seq_len = [int(state.valid.shape[1]) if lay is None else lay.length for lay in per_layer]
        if self.prunes:
            visual_layers = [[int(n_vis[b]) if lay is None else int(lay.visual[b].sum()) for lay in per_layer]
                             for b in range(state.batch)]
            visual_out = [round(sum(v) / L) for v in visual_layers]
            exit_layers = None
        else:
            visual_out = [round(float(v) * int(e) / L) for v, e in zip(n_vis, state.exit_at.clamp(max=L))]
            exit_layers = [int(e) for e in state.exit_at.clamp(max=L)]
        overhead = state.overhead + getattr(self.policy, "overhead_flops", lambda s: 0.0)(state)
        self.handle.stats.add(
            ForwardRecord(
                method=self.policy.label,
                visual_in=n_vis.tolist(),
                visual_out=visual_out,
                llm_tokens=n_full.tolist(),
                seq_len=int(state.valid.shape[1]),
                positions=getattr(self.policy, "positions", "original"),
                scoring=getattr(self.policy, "scoring", None),
                attn_backend=getattr(self.adapter.text_config, "_attn_implementation", None),
                overhead_flops=overhead,
                exit_layers=exit_layers,
                layer_tokens=layer_tokens,
                layer_seq_len=layer_seq_len,
                call=state.call,
                stage_layers=list(state.stage_layers) if self.prunes else None,
                stage_visual=[[s[b] for s in state.stage_visual] for b in range(state.batch)] if self.prunes else None,
                variant=getattr(self.policy, "variant", None),
            )
        )
        state.embeds = None
        state.captured = {}
        state.scratch.pop("prefill", None)


class InLLMMethod(Method):
    """Base of a method acting through this seam: it sets ``self.policy`` and keeps the installed
    seam as ``self.seam`` (``self.seam.last`` is the latest prefill's state: its layouts hold the
    decoder-input columns each stage kept)."""

    seams = (InLLMSeam,)
    seam: InLLMSeam | None = None

    def install(self, hooks: Any, handle: Any) -> list[Any]:
        installed = super().install(hooks, handle)
        self.seam = installed[0]
        return installed

    @property
    def label(self) -> str:
        return self.policy.label
