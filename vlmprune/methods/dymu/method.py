"""DyMU: dynamic token merging in the vision encoder + virtual token unmerging in the LLM
(Wang et al., arXiv 2504.17040); ``docs/methods/dymu.md``.

* **DToMe** (encoder, :mod:`vlmprune.methods.dymu.merge`): every ViT block up to the feature layer
  merges, after its attention, each bipartite edge whose key cosine is above the block's calibrated
  threshold; sizes give proportional attention, membership rows (``pos``) say which patches each
  merged token holds. Simple images keep fewer tokens.
* The projector runs on the merged tokens; its output is expanded back to the stock patch layout
  (each patch slot gets its merged token), so the stock model's placeholder bookkeeping is
  untouched, and a decoder pre-hook collapses every group of slots to one column (its smallest
  column): the LLM sees one row per merged token.
* **VTU** (LLM, :mod:`vlmprune.methods.dymu.unmerge`): with ``vtu="fast"`` (default) or ``"exact"`` every
  attention layer attends as if each merged token sat at all its original positions; with
  ``vtu=False`` the merged tokens go in with consecutive positions (plain ToMe into the LLM).

Where DToMe runs comes from the adapter's encoder layout (:mod:`vlmprune.seams.encoder`): inside the
blocks of an :class:`~vlmprune.seams.encoder.EncoderLayout` tower, or, for a tower whose patch merger /
pixel shuffle needs whole groups of patches (:class:`~vlmprune.seams.encoder.EmittedLayout`), in
``POST_MERGE_ROUNDS`` bipartite rounds on the tokens it emits, per image / tile (merging inside such a
tower would break its groups).

Thresholds come from ``vlmprune calibrate dymu`` (:mod:`vlmprune.methods.dymu.calibrate`) as a JSON file, or a
shipped preset (``low`` / ``mid`` / ``high``) for the built-in model. This module knows no model
class: the adapter says where the blocks, projector and attention modules are and how positions work.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlmprune import context
from vlmprune.method import Method, Stage
from vlmprune.registry import register_method
from vlmprune.seams.encoder import EmittedLayout, EncoderLayout, EncoderLayoutError
from vlmprune.seams.pre_llm import DecodeState, continue_pruned, install_continuation
from vlmprune.seams.scope import ensure_cache
from vlmprune.sequence import default_positions, gather_columns, layer_mask, prune_sequence
from vlmprune.stats import ForwardRecord

from . import merge as tm
from . import unmerge as vtu_ops
from .config import DyMUConfig, ThresholdsError
from .thresholds import load_thresholds, preset_dir

_RUNS = "dymu.runs"
_VTU = "dymu.vtu"
_PROJ = "dymu.projected"

#: bipartite merge rounds on the tokens an :class:`EmittedLayout` tower emits (one threshold each)
POST_MERGE_ROUNDS = 3


def supported_models() -> list[str]:
    """Model classes whose adapter describes the vision encoder (the ones DyMU can merge in)."""
    from vlmprune.adapters import ADAPTERS, Adapter

    return [name for cls in ADAPTERS if cls.encoder_layout is not Adapter.encoder_layout for name in cls.model_classes]


def encoder_layout(adapter: Any) -> EncoderLayout | EmittedLayout:
    """Where DyMU merges in this model, from its adapter; a model without an encoder layout gets an
    error naming the supported model classes."""
    try:
        return adapter.encoder_layout()
    except EncoderLayoutError as exc:
        name = adapter.family or type(adapter).__name__
        raise ValueError(
            f"vlmprune: DyMU token merging is not supported for {name} models ({exc}); DyMU merges the images of "
            f"models whose vision encoder vlmprune describes: {', '.join(supported_models())}"
        ) from exc


# -- the encoder half --------------------------------------------------------------------------


@dataclass
class EncoderRun:
    """One vision-tower call: the merge state and what each block did."""

    state: tm.MergeState
    keys: Tensor | None = None
    block_tokens: list[list[int]] = field(default_factory=list)  # per block run: real tokens per row after it
    block_lengths: list[tuple[int, int]] = field(default_factory=list)  # per block run: (padded in, padded out)
    match_flops: float = 0.0
    merged: bool = False
    projected: bool = False
    projector_tokens: int = 0
    slots: list[int] | None = None  # post-merge runs: tokens per row before merging (rows are padded)


class Merger:
    """Runs DToMe inside the blocks of one vision tower. ``rule(i, match, state)`` decides the merges of
    block ``i``; ``current()`` finds this call's :class:`EncoderRun` (per-call context, or a local
    slot for calibration)."""

    def __init__(self, layout: Any, rule: Any, current: Any, start: Any, order: str = "canonical") -> None:
        self.layout = layout
        self.rule = rule
        self.current = current
        self.start = start
        self.order = order

    def install(self, hooks: Any) -> None:
        for i, block in enumerate(self.layout.blocks):
            original = block.layer.forward
            hooks.set_attr(block.layer, "forward", self._forward(i, block, original))
            hooks.forward(block.key_proj, self._on_keys)

    def _on_keys(self, module: Any, args: tuple, output: Tensor) -> None:
        run = self.current()
        if run is not None:
            run.keys = output

    def _forward(self, index: int, block: Any, original: Any) -> Any:
        def forward(hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
            run = self.start(hidden_states) if index == 0 else self.current()
            if run is None:
                return original(hidden_states, attention_mask, *args, **kwargs)
            if index > self.layout.feature_block:  # the model never reads these blocks' output
                return hidden_states
            return self._block(index, block, run, hidden_states, attention_mask, kwargs)

        return forward

    def _block(self, index: int, block: Any, run: EncoderRun, x: Tensor, mask: Tensor | None, kwargs: dict) -> Tensor:
        state = run.state
        bias = tm.attention_bias(state, x.dtype)
        if bias is not None:
            mask = bias if mask is None else mask + bias
        n_in = x.shape[1]
        run.keys = None
        attn_out = block.attn(block.norm1(x), attention_mask=mask, **kwargs)[0]
        x = x + attn_out
        merge = None
        if run.keys is not None:
            bsz, n, _ = run.keys.shape
            metric = run.keys.view(bsz, n, block.heads, -1).mean(dim=2)
            merge, match = self.rule(index, metric, state)
            if merge is not None:
                run.match_flops += 2.0 * bsz * ((n + 1) // 2) * (n // 2) * metric.shape[-1]
        if merge is not None and bool(merge.any()):
            by_score = self.order == "reference" and not self.layout.has_cls
            x, state = tm.merge_tokens(x, state, match, merge, unmerged_by_score=by_score)
            run.merged = True
        if index == self.layout.feature_block and run.merged and self.order == "canonical":
            x, state = tm.canonical_order(x, state)
        run.state = state
        x = x + block.mlp(block.norm2(x))
        if not bool(state.valid.all()):
            x = x.masked_fill(~state.valid.unsqueeze(-1), 0)
        run.block_tokens.append(state.counts.tolist())
        run.block_lengths.append((n_in, x.shape[1]))
        return x


def threshold_rule(thresholds: list[float], has_cls: bool) -> Any:
    """The inference rule: block ``i`` merges every edge scoring above ``thresholds[i]``."""

    def rule(index: int, metric: Tensor, state: tm.MergeState) -> tuple[Tensor | None, Any]:
        tau = thresholds[index]
        if not math.isfinite(tau):
            return None, None
        match = tm.bipartite_match(metric, state.valid, has_cls)
        return tm.threshold_merges(match, state.valid, tau, has_cls), match

    return rule


def post_merge(feats: Tensor, sizes: list[int], rounds: int, rule: Any) -> tuple[Tensor, EncoderRun]:
    """DToMe on the tokens a vision tower emits (an :class:`EmittedLayout`: after a patch merger or
    a pixel shuffle), images / tiles packed along dim 0:
    ``rounds`` bipartite rounds per image on the features' cosine, size-weighted averages, canonical
    order; then every original slot gets its merged token's feature, so the stock layout is unchanged.
    Returns the expanded features and the run (membership rows for the decoder's collapse)."""
    rows, n = len(sizes), max(sizes)
    x = feats.new_zeros(rows, n, feats.shape[-1])
    for i, chunk in enumerate(torch.split(feats, sizes)):
        x[i, : chunk.shape[0]] = chunk
    valid = torch.arange(n, device=feats.device).unsqueeze(0) < torch.tensor(sizes, device=feats.device).unsqueeze(1)
    state = tm.MergeState(size=valid.float(), pos=torch.diag_embed(valid.float()), valid=valid)
    run = EncoderRun(state, slots=list(sizes))
    for r in range(rounds):
        merge, match = rule(r, x, state)
        if merge is not None:
            run.match_flops += 2.0 * rows * ((n + 1) // 2) * (n // 2) * x.shape[-1]
            if bool(merge.any()):
                x, state = tm.merge_tokens(x, state, match, merge)
                run.merged = True
        run.block_tokens.append(state.counts.tolist())
        run.block_lengths.append((n, x.shape[1]))
        n = x.shape[1]
    if run.merged:
        x, state = tm.canonical_order(x, state)
    run.state = state
    run.projected = True
    if not run.merged:
        return feats, run
    index = tm.expansion_index(state.pos, 0)
    out = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([out[i, :k] for i, k in enumerate(sizes)]), run


# -- the LLM half -------------------------------------------------------------------------------


@dataclass
class VTUState:
    """One prefill's unmerging map: full (virtual) column -> compact column."""

    g: Tensor  # (B, N) long
    valid: Tensor  # (B, N) bool: real full columns
    positions: Tensor  # (B, N): the stock positions of the full sequence
    n_compact: int
    kernel: str
    rope: tuple[Tensor, Tensor] | None = None
    masks: dict[Any, Tensor] = field(default_factory=dict)


def collapse_map(
    visual: Tensor, groups: list[Any], members: list[Tensor]
) -> tuple[Tensor, list[int], list[Tensor]]:
    """(B, N) representative column of every column: a visual column maps to the smallest present
    column of its merged token; everything else maps to itself. ``members[k]`` (n_tok, n_grid) are the
    membership rows of group ``k`` over its grid. Also returns, per group, how many merged tokens keep
    at least one column (a token whose patches the stock model drops entirely is dropped). Third, per group,
    the anchor columns of its kept merged tokens in the order of the membership rows (the order the
    encoder emitted the merged tokens in)."""
    bsz, n = visual.shape
    rep = torch.arange(n, device=visual.device).unsqueeze(0).expand(bsz, n).clone()
    kept, anchors = [], []
    for group, member in zip(groups, members):
        cols = group.columns.to(visual.device)
        present = cols >= 0
        tok = member.argmax(dim=0)  # (n_grid,) merged token of each grid slot
        anchor = torch.full((member.shape[0],), n, dtype=torch.long, device=visual.device)
        anchor = anchor.scatter_reduce(0, tok[present], cols[present], reduce="amin")
        rep[group.sample, cols[present]] = anchor[tok[present]]
        kept.append(int((anchor < n).sum()))
        anchors.append(anchor[anchor < n])
    return rep, kept, anchors


def emitted_order(embeds: Tensor, groups: list[Any], anchors: list[Tensor]) -> Tensor:
    """Embeddings whose kept columns hold each group's merged tokens in the encoder's emitted order:
    the i-th smallest anchor column gets the i-th emitted token (which sits at its own anchor). With
    consecutive positions this is the reference's sequence without unmerging."""
    out = embeds.clone()
    for group, anchor in zip(groups, anchors):
        out[group.sample, anchor.sort().values] = embeds[group.sample, anchor]
    return out


@register_method
class DyMU(Method):
    """Installs DToMe on the vision tower, the projector expansion, and the LLM seam (VTU or not)."""

    config_class = DyMUConfig
    commands = {
        "calibrate": ("vlmprune.methods.dymu.calibrate:main", "calibrate DyMU merge thresholds for a target token count (see vlmprune calibrate dymu --help)"),
    }

    def __init__(self, config: DyMUConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.layout = encoder_layout(adapter)
        source = config.thresholds
        if config.preset is not None:
            source = preset_dir() / f"{config.preset}.json"
            if not source.is_file():
                raise ThresholdsError(
                    f"DyMU preset {config.preset!r} is not shipped at {source}; regenerate the presets with "
                    "`python -m vlmprune.methods.dymu.calibrate --presets`"
                )
        self.post = isinstance(self.layout, EmittedLayout)
        count = POST_MERGE_ROUNDS if self.post else len(self.layout.blocks)
        self.thresholds, self.info = load_thresholds(source, adapter.config.vision_config, count)
        self.kernel = config.vtu or "off"
        self._decode: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.handle: Any = None

    @property
    def label(self) -> str:
        return "dymu" if self.kernel == "fast" else f"dymu-{'novtu' if self.kernel == 'off' else self.kernel}"

    # -- install --------------------------------------------------------------------------------
    def install(self, hooks: Any, handle: Any) -> None:
        from vlmprune.seams.scope import install_scope

        self.handle = handle
        if self.kernel != "off":
            others = [m.config.method for m in handle.methods if m is not self and m.config.stage >= Stage.PRE_LLM]
            if others:
                raise ValueError(
                    f"dymu with VTU does not compose with {', '.join(others)} (VTU needs the whole merged "
                    "sequence in every layer); apply dymu with vtu=False to stack it with later-stage methods"
                )
            backend = getattr(self.adapter.text_config, "_attn_implementation", None) or "eager"
            if backend not in ("eager", "sdpa"):
                raise ValueError(f"dymu VTU supports attn_implementation 'eager' or 'sdpa', the model uses {backend!r}")
        else:
            others = [m.config.method for m in handle.methods if m is not self and m.config.stage == Stage.PRE_LLM]
            if others:
                raise ValueError(
                    f"dymu does not compose with the pre-LLM method(s) {', '.join(others)}: they would select among "
                    "the merged tokens by grid position, which merged tokens no longer have"
                )
        install_scope(self.adapter, hooks, self.handle)
        if self.post:
            hooks.forward(self.layout.module, self._on_tower)
        else:
            rule = threshold_rule(self.thresholds, self.layout.has_cls)
            Merger(self.layout, rule, self._current_run, self._start_run, self.config.order).install(hooks)
            hooks.forward(self.layout.projector, self._on_projector)
        hooks.forward_pre(self.adapter.decoder, self._decoder_pre, with_kwargs=True)
        install_continuation(hooks, self.adapter.model, self._decode)
        if self.kernel != "off":
            for i in range(len(self.adapter.decoder_layers)):
                attn = self.adapter.decoder_attention(i)
                hooks.set_attr(attn, "forward", self._attention(attn, attn.forward))
        hooks.set_attr(self.adapter.model, "_supports_mm_encoder_outputs", lambda: False)

    def _ctx(self) -> Any:
        ctx = context.current(self.handle)
        return ctx if ctx is not None and ctx.owner is self.handle else None

    def _start_run(self, hidden: Tensor) -> EncoderRun | None:
        ctx = self._ctx()
        if ctx is None:
            return None
        layer = ctx.inputs.get("vision_feature_layer")
        if layer is not None and layer != self.adapter.config.vision_feature_layer:
            raise ValueError(
                f"vlmprune: this call overrides vision_feature_layer={layer!r}, but dymu was applied for the config's "
                f"{self.adapter.config.vision_feature_layer!r}; set model.config.vision_feature_layer before vlmprune.apply"
            )
        run = EncoderRun(tm.MergeState.start(hidden.shape[0], hidden.shape[1], hidden.device))
        ctx.capture(_RUNS, run)
        return run

    def _current_run(self) -> EncoderRun | None:
        ctx = self._ctx()
        runs = ctx.captured.get(_RUNS) if ctx is not None else None
        return runs[-1] if runs else None

    def _on_tower(self, module: Any, args: tuple, output: Any) -> Any:
        """Emitted-token towers: merge the emitted tokens per image / tile, hand back the stock layout.
        The tokens are the ``layout.module`` output: a tensor, or a model output whose ``pooler_output``
        holds them packed along dim 0."""
        ctx = self._ctx()
        if ctx is None:
            return None
        if ctx.inputs.get("pixel_values_videos") is not None:
            raise ValueError("vlmprune: dymu merges image tokens only; this call has videos")
        sizes = [int(k) for k in self.layout.group_sizes(ctx.inputs)]
        feats = output if isinstance(output, Tensor) else output.pooler_output
        shape = feats.shape
        feats = feats.reshape(-1, shape[-1])
        if sum(sizes) != feats.shape[0]:
            raise ValueError(f"vlmprune: dymu expected {sum(sizes)} image tokens from the vision tower, got {feats.shape[0]}")
        new, run = post_merge(feats, sizes, POST_MERGE_ROUNDS, threshold_rule(self.thresholds, False))
        ctx.capture(_RUNS, run)
        if isinstance(output, Tensor):
            return new.reshape(shape)
        output.pooler_output = new
        return output

    # -- projector: back to the stock patch layout --------------------------------------------
    def _on_projector(self, module: Any, args: tuple, output: Tensor) -> Tensor | None:
        ctx = self._ctx()
        runs = [r for r in (ctx.captured.get(_RUNS, []) if ctx is not None else []) if not r.projected]
        if not runs:
            return None
        run = runs[0]
        run.projected = True
        run.projector_tokens = int(args[0].shape[0] * args[0].shape[1])
        if not run.merged:
            return None
        drop = run.state.pos.shape[1] - args[0].shape[1]
        if drop not in (0, 1) or (drop == 1 and not self.layout.has_cls):
            raise ValueError("vlmprune: dymu cannot match the projector input to the merged vision tokens")
        index = tm.expansion_index(run.state.pos, drop)  # (R, n_slots)
        return torch.gather(output, 1, index.unsqueeze(-1).expand(-1, -1, output.shape[-1]))

    # -- decoder --------------------------------------------------------------------------------
    def _decoder_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        ctx = self._ctx()
        if embeds is None or ctx is None:
            return None
        cache_key = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(cache_key)
        runs = ctx.captured.get(_RUNS)
        if runs:
            return args, self._prefill(module, kwargs, embeds, runs, ctx, cache_key, cache)
        state = self._decode.get(cache) if cache is not None else None
        if state is not None:
            return args, continue_pruned(kwargs, embeds, state)
        return None

    def _prefill(self, module: Any, kwargs: dict, embeds: Tensor, runs: list[EncoderRun], ctx: Any,
                 cache_key: str, cache: Any) -> dict:
        past = int(cache.get_seq_length()) if cache is not None else 0
        if past > 0:
            raise ValueError("vlmprune: dymu supports images in the first forward of a sequence (the KV cache was not empty)")
        visual = self.adapter.visual_mask(ctx.inputs, embeds)
        bsz, n = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 2):
            raise ValueError("vlmprune: dymu needs a 2-D attention mask (or none); static / compiled caches are not supported")
        real = mask.bool().to(embeds.device) if mask is not None else torch.ones(bsz, n, dtype=torch.bool, device=embeds.device)
        groups = self.adapter.visual_groups(ctx, visual, None) if visual is not None else []
        rows = [(run, r) for run in runs for r in range(run.state.pos.shape[0])]
        if len(rows) != len(groups):
            raise ValueError(f"vlmprune: dymu merged {len(rows)} images in the vision tower but the prompt holds {len(groups)}")
        members = []
        for (run, r), group in zip(rows, groups):
            if run.slots is not None:
                if group.columns.numel() != run.slots[r]:
                    raise ValueError("vlmprune: dymu cannot match the merged image tokens to the prompt's placeholders")
                members.append(run.state.pos[r][run.state.valid[r], : run.slots[r]])
                continue
            drop = run.state.pos.shape[-1] - group.columns.numel()
            if group.kind not in ("image", "crop") or drop not in (0, 1):
                raise ValueError(
                    f"vlmprune: dymu merges image tokens only; this call holds a {group.kind} group whose tokens the "
                    "model pools or interpolates after the vision tower (videos, interpolated AnyRes grids)"
                )
            member = run.state.pos[r][run.state.valid[r], drop:]
            members.append(member)
        visual = visual if visual is not None else torch.zeros(bsz, n, dtype=torch.bool, device=embeds.device)
        rep, kept, anchors = collapse_map(visual, groups, members)
        if self.kernel == "off" and self.config.order == "reference" and not self.post:
            embeds = emitted_order(embeds, groups, anchors)
        cols = torch.arange(n, device=embeds.device).unsqueeze(0)
        keep = (rep == cols) & real
        visual_in = (visual & real).sum(1)
        merged = any(run.merged for run in runs) and not bool((keep | ~real).all())
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = default_positions(mask, bsz, n, 0, embeds.device)
        kwargs = dict(kwargs)
        if merged:
            positions = "original" if self.kernel != "off" else self.adapter.default_positions
            pruned = prune_sequence(embeds, keep, mask, pos, positions=positions)
            kwargs["inputs_embeds"] = pruned.inputs_embeds
            kwargs["attention_mask"] = pruned.attention_mask
            kwargs["position_ids"] = pruned.position_ids
            ctx.columns = pruned.columns if ctx.columns is None else gather_columns(ctx.columns, pruned.columns, -1)
            ctx.visual = gather_columns(visual, pruned.columns, False)
            compact_real = pruned.columns >= 0
            if pruned.attention_mask is not None:
                compact_real = pruned.attention_mask.bool()
            visual_out = (ctx.visual & compact_real).sum(1)
            seq_len = int(pruned.columns.shape[1])
            cache = ensure_cache(module, kwargs, cache_key, cache)
            if self.kernel != "off":
                inverse = torch.full((bsz, n), -1, dtype=torch.long, device=embeds.device)
                for b in range(bsz):
                    c = pruned.columns[b]
                    inverse[b, c[c >= 0]] = torch.nonzero(c >= 0).squeeze(1)
                g = torch.gather(inverse, 1, rep)
                valid = real & (g >= 0)
                rope_pos = self.adapter.rope_positions(pos)
                ctx.captured[_VTU] = [VTUState(g.clamp(min=0), valid, rope_pos, seq_len, self.kernel)]
                kv_len = real.sum(1).tolist()
            else:
                kv_len = compact_real.sum(1).tolist()
                if cache is not None:
                    state_mask = pruned.attention_mask if pruned.attention_mask is not None else compact_real.long()
                    self._decode[cache] = DecodeState(state_mask, pruned.attention_mask is not None, pruned.next_position,
                                                      n - seq_len)
            llm_tokens = compact_real.sum(1).tolist()
        else:
            visual_out, seq_len, llm_tokens, kv_len = visual_in, n, real.sum(1).tolist(), real.sum(1).tolist()
        self._record(module, runs, visual_in.tolist(), visual_out.tolist(), llm_tokens, seq_len, kv_len, kept, ctx)
        return kwargs

    # -- VTU attention ----------------------------------------------------------------------------
    def _attention(self, attn: Any, original: Any) -> Any:
        rope_fn = self.adapter.llm_rope(attn)

        def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
            ctx = self._ctx()
            states = ctx.captured.get(_VTU) if ctx is not None else None
            state = states[0] if states else None
            if state is None or hidden_states.shape[1] != state.n_compact:
                return original(hidden_states, *args, **kwargs)
            return vtu_attention(attn, hidden_states, state, rope_fn, self.adapter.decoder.rotary_emb,
                                 kwargs.get("cache", kwargs.get("past_key_values")), kwargs.get("attention_mask"))

        return forward

    # -- stats ------------------------------------------------------------------------------------
    def _record(self, module: Any, runs: list[EncoderRun], visual_in: list[int], visual_out: list[int],
                llm_tokens: list[int], seq_len: int, kv_len: list[int], kept: list[int], ctx: Any) -> None:
        from vlmprune.flops import vit_flops_at_lengths

        enc_tokens: list[list[int]] = []
        vision = projector = 0.0
        if self.post:
            from vlmprune.flops import vision_flops as stock_vision

            vision, projector = stock_vision(self.adapter.config, ctx.inputs)
        for run in runs:
            rows = run.state.pos.shape[0]
            enc_tokens += [[layer[r] for layer in run.block_tokens] for r in range(rows)]
            if self.post:
                continue
            e, p = vit_flops_at_lengths(self.adapter.config, rows, run.block_lengths,
                                        run.projector_tokens, len(self.layout.blocks))
            vision += e
            projector += p
        overhead = sum(run.match_flops for run in runs)
        if self.kernel != "off" and ctx.captured.get(_VTU):
            tc = self.adapter.text_config
            heads, layers = int(tc.num_attention_heads), int(tc.num_hidden_layers)
            hd = int(type(self.adapter).text_head_dim(tc))
            n_full = int(ctx.captured[_VTU][0].g.shape[1])
            extra = n_full * n_full - seq_len * seq_len  # attention runs at N x N, the LLM count assumes N' x N'
            overhead += len(llm_tokens) * layers * 4.0 * heads * hd * extra
        self.handle.stats.add(
            ForwardRecord(
                method=self.label,
                visual_in=visual_in,
                visual_out=visual_out,
                llm_tokens=llm_tokens,
                seq_len=seq_len,
                positions="original" if self.kernel != "off" else self.adapter.default_positions,
                attn_backend=getattr(module.config, "_attn_implementation", None),
                overhead_flops=float(overhead),
                call=ctx.serial,
                image_tokens=kept,
                encoder_layer_tokens=enc_tokens,
                vision_flops=vision,
                projector_flops=projector,
                kv_len=kv_len,
                vtu=self.kernel,
            )
        )



def vtu_attention(attn: Any, h: Tensor, state: VTUState, rope_fn: Any, rotary_emb: Any, cache: Any = None,
                  like: Any = None) -> tuple[Tensor, None]:
    """One decoder attention module under VTU: projections on the compact rows ``h`` (B, N', D), attention
    at the full length with the stock positions (``fast``: the module's own backend; ``exact``: the
    RoPE-decomposed scores), mean over each row's copies, then ``o_proj``. The cache gets the full-length
    rotated K/V, so decode steps run the stock attention over it."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    bsz, nu, _ = h.shape
    hd = attn.head_dim
    q = attn.q_proj(h).view(bsz, nu, -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(bsz, nu, -1, hd).transpose(1, 2)
    v = attn.v_proj(h).view(bsz, nu, -1, hd).transpose(1, 2)
    if state.rope is None:
        state.rope = rotary_emb(h, state.positions)
    cos, sin = state.rope
    g = state.g
    like = like if isinstance(like, Tensor) else None
    key = None if like is None else like.dtype
    if key not in state.masks:
        state.masks[key] = layer_mask(state.valid, g.shape[1], like)
    full_mask = state.masks[key]
    qf, kf = rope_fn(vtu_ops.expand(q, g, 2), vtu_ops.expand(k, g, 2), cos, sin)
    vf = vtu_ops.expand(v, g, 2)
    if cache is not None:
        cache.update(kf, vf, attn.layer_idx)
    if state.kernel == "exact":
        rep = q.shape[1] // k.shape[1]
        out = vtu_ops.unmerged_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                                         g, cos, sin, full_mask, attn.scaling)
    else:
        backend = getattr(attn.config, "_attn_implementation", None) or "eager"
        eager = sys.modules[type(attn).__module__].eager_attention_forward
        fn = eager if backend == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(backend, eager)
        out, _ = fn(attn, qf, kf, vf, full_mask, dropout=0.0, scaling=attn.scaling)
    out = vtu_ops.scatter_mean(out.reshape(bsz, g.shape[1], -1), g, state.valid, nu)
    return attn.o_proj(out), None

def flops(handle: Any, inputs: dict[str, Any], generated_tokens: int = 0) -> Any:
    """The last DyMU call's FLOPs with the encoder at its shrinking per-block lengths, the projector at
    the merged length, the LLM at the compact length (plus VTU's full-length attention as overhead) and
    decode over the real KV length (full length under VTU). A :class:`vlmprune.flops.FlopsReport`."""
    from vlmprune.flops import FlopsReport, decode_flops, estimate

    record = next((r for r in reversed(handle.stats.records) if r.vision_flops is not None), None)
    if record is None:
        raise RuntimeError("no DyMU call has run yet")
    base = estimate(handle.model, None, record.seq_len, generated_tokens=generated_tokens,
                    overhead=sum(r.overhead_flops for r in handle.stats.records if r.call == record.call),
                    batch_size=len(record.llm_tokens))
    decode = 0.0
    if generated_tokens > 1:
        kv = max(record.kv_len) if record.vtu != "off" else record.seq_len
        decode = len(record.llm_tokens) * decode_flops(handle.model.config, kv, generated_tokens - 1)
    return FlopsReport(vision=record.vision_flops, projector=record.projector_flops, llm_prefill=base.llm_prefill,
                       decode=decode, overhead=base.overhead, llm_fastv=base.llm_fastv)
