"""Slow-Fast video tokens (Shi et al., arXiv 2504.01328; SF-LLaVA, Xu et al., arXiv 2407.15841),
``docs/methods/slowfast.md``.

Three modes, one config:

* ``mode="pooling"`` (training-free SlowFast-LLaVA): each video's tokens become a slow
  block (``slow_frames`` frames, pooled by ``slow_stride``) followed by a fast block (every frame,
  pooled by ``fast_stride``), in place of the video tokens. Images pass through unchanged.
* ``mode="fast"``: only the fast tokens of the trained method (the paper's strides ``s, t, p``)
  replace the video tokens; the "fast-only" model the hybrid starts from.
* ``mode="hybrid"`` (the paper's hybrid architecture): the fast tokens replace the video tokens,
  and the chosen decoder layers add a gated cross-attention from the text to the slow tokens (every frame, unpooled but
  for ``video_pooling_stride``), which never enter the sequence or the KV cache. With a fresh
  (untrained) adapter the warm-up gate is 0 and the model equals ``mode="fast"`` bit for bit.

Where the frames are: the video frames the adapter reports (``VisualGroup.kind`` "frame" / "video"),
or, with ``mosaic=m``, images that tile ``m x m`` frames row-major (the built-in benchmark's layout: ``mosaic=2``, 8 frames as two 224 px images). All the
frames of one sample form one video. The method only reads ``VisualGroup.kind`` and the grids, and
asks the adapter how the pooled tokens are numbered; it knows no model class.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from vlmprune import context
from vlmprune.adapters.base import PooledVideo
from vlmprune.method import Method
from vlmprune.registry import register_method
from vlmprune.seams.pre_llm import PreLLMSeam

from .config import LORA_TARGETS, SlowFastConfig, _stride
from .pooling import fast_pathway, slowfast_llava, spatial_pool


@dataclass
class Video:
    """One sample's video as the method sees it: per frame, the sequence columns of its grid."""

    sample: int
    columns: Tensor  # (T, h * w) long, frame-major, row-major within a frame
    grid: tuple[int, int]


def mosaic_frames(columns: Tensor, grid: tuple[int, int], m: int) -> list[Tensor]:
    """Split one image's row-major grid columns into ``m x m`` frames (row-major tiles)."""
    h, w = grid
    if h % m or w % m:
        raise ValueError(f"mosaic={m} does not divide the image grid {grid}; each frame must be a whole tile")
    g = columns.view(h, w)
    fh, fw = h // m, w // m
    return [g[r * fh : (r + 1) * fh, c * fw : (c + 1) * fw].reshape(-1) for r in range(m) for c in range(m)]


def find_videos(groups: list[Any], mosaic: int, min_images: int) -> list[Video]:
    """Videos of a call from the adapter's groups: frame groups (``kind`` "frame" / "video"), one
    video per ``VisualGroup.video`` (a sample may hold several, each pooled on its own), or, with
    ``mosaic``, the images of samples holding at least ``min_images`` of them (one video per sample)."""
    per_sample: dict[tuple[int, int], list[tuple[Tensor, tuple[int, int]]]] = {}
    if mosaic:
        images: dict[int, list[Any]] = {}
        for g in groups:
            if g.kind == "image":
                images.setdefault(g.sample, []).append(g)
        for sample, imgs in images.items():
            if len(imgs) < min_images:
                continue
            for g in imgs:
                if bool((g.columns < 0).any()):
                    raise ValueError("vlmprune: slowfast mosaic frames need every grid token in the sequence")
                grid = (g.grid[0] // mosaic, g.grid[1] // mosaic)
                per_sample.setdefault((sample, -1), []).extend((f, grid) for f in mosaic_frames(g.columns, g.grid, mosaic))
    else:
        for g in groups:
            if g.kind in ("frame", "video"):
                if bool((g.columns < 0).any()):
                    raise ValueError("vlmprune: slowfast needs every token of a video frame in the sequence")
                video = -1 if g.video is None else int(g.video)
                per_sample.setdefault((g.sample, video), []).append((g.columns, tuple(g.grid)))
    videos = []
    for (sample, _), frames in sorted(per_sample.items(), key=lambda kv: (kv[0][0], int(kv[1][0][0].min()))):
        grids = {grid for _, grid in frames}
        if len(grids) != 1:
            raise ValueError(f"vlmprune: the frames of one video of sample {sample} have different grids {sorted(grids)}")
        videos.append(Video(sample, torch.stack([c for c, _ in frames]), grids.pop()))
    return videos


@register_method
class SlowFast(Method):
    """Installs the slow-fast seam (and, in hybrid mode, the hybrid layers) on one model."""

    config_class = SlowFastConfig
    commands = {
        "train-slowfast": ("vlmprune.methods.slowfast.training:main", "train slow-fast hybrid layers on a frozen model (see vlmprune train-slowfast --help)"),
    }

    needs_scores: ClassVar[str | None] = None

    def __init__(self, config: SlowFastConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        self.hybrid: Any = None
        self.lora: Any = None
        self.saved: dict[str, Any] = {}
        if config.mode == "hybrid":
            self._build_hybrid(config, adapter)

    def _build_hybrid(self, config: SlowFastConfig, adapter: Any) -> None:
        from .hybrid import HybridAdapter, LoRA, load_adapter

        layers = adapter.decoder_layers
        param = next(adapter.decoder.parameters())
        if config.adapter is not None:
            hybrid, lora, extra = load_adapter(config.adapter)
            fresh = HybridAdapter.for_decoder(layers, adapter.text_config, hybrid.layer_indices, hybrid.impl)
            fresh.check(hybrid, str(config.adapter))
            self.saved = extra
            if lora:
                self.lora = LoRA.from_deltas(lora, float(extra.get("lora_alpha", 16.0))).to(param.device)
        else:
            hybrid = HybridAdapter.for_decoder(layers, adapter.text_config, config.hybrid_layers(len(layers)),
                                               config.cross_attn_impl)
            if config.init_kv_from_lm:
                hybrid.init_kv_from_lm(layers)
            if config.lora_rank:
                prefix = next(n + "." for n, m in adapter.model.named_modules() if m is adapter.decoder)
                self.lora = LoRA.for_model(adapter.decoder, LORA_TARGETS, config.lora_rank, config.lora_alpha,
                                           prefix=prefix).to(param.device)
        self.hybrid = hybrid.to(param.device).eval()

    def install(self, hooks: Any, handle: Any) -> None:
        seam = SlowFastSeam(self.adapter, self, handle)
        seam.install(hooks)
        if self.lora is not None:  # first, so the hybrid layers see the adapted q projection
            self.lora.install(hooks, self.adapter.model)
        if self.hybrid is not None:
            from .hybrid import install_hybrid_layers

            install_hybrid_layers(hooks, self.adapter.decoder_layers, self.hybrid, seam.current_state)

    @property
    def label(self) -> str:
        return f"slowfast-{self.config.mode}"

    def fast_options(self) -> dict[str, int]:
        """s, t, p, min_fast_frames in use (a trained adapter's recipe wins over the config)."""
        c = self.config
        base = {"s": c.s, "t": c.t, "p": c.p, "min_fast_frames": c.min_fast_frames,
                "video_pooling_stride": c.video_pooling_stride}
        for k in base:
            if k in self.saved.get("fast", {}):
                base[k] = int(self.saved["fast"][k])
        return base


# -- the seam ------------------------------------------------------------------------------------

_LAYOUT = "slowfast.layout"
_SLOW = "slowfast.slow"
_STATE = "slowfast.state"
_POS = "slowfast.positions"


def _check_divides(name: str, stride: tuple[int, int], grid: tuple[int, int]) -> None:
    if grid[0] % stride[0] or grid[1] % stride[1]:
        raise ValueError(
            f"vlmprune slowfast: {name}={stride} does not divide the frame grid {grid}; choose a stride that "
            "divides it (pooling would silently drop the last rows / columns)"
        )


class SlowFastSeam(PreLLMSeam):
    """The pre-LLM seam with a reduction over whole videos (several frame groups at once): each
    video's pooled tokens are written into its first columns and its other columns are dropped, so
    they sit as one contiguous run where that video was."""

    def __init__(self, adapter: Any, method: SlowFast, handle: Any) -> None:
        super().__init__(adapter, method, handle)
        self._decode_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # per-call state for the hybrid hooks
    def current_state(self) -> Any:
        ctx = context.current(self.handle)
        if ctx is None or ctx.owner is not self.handle:
            return None
        found = ctx.captured.get(_STATE)
        return found[-1] if found else None

    def _reduce(self, ctx: Any, embeds: Tensor, visual: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        cfg: SlowFastConfig = self.method.config
        opts = self.method.fast_options()
        groups = self.adapter.visual_groups(ctx, visual, None)
        videos = find_videos(groups, cfg.mosaic, cfg.mosaic_min_images)
        keep = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        out = embeds.clone() if videos else embeds
        slow: dict[int, Tensor] = {}
        layout = []
        for v in videos:
            cols = v.columns.to(embeds.device)
            frames, (h, w) = cols.shape[0], v.grid
            feats = embeds[v.sample, cols.reshape(-1)].view(frames, h, w, -1)
            vps = opts["video_pooling_stride"]
            if frames > 1 and vps > 1:
                _check_divides("video_pooling_stride", (vps, vps), (h, w))
                feats = spatial_pool(feats, vps)
            fh, fw = feats.shape[1:3]
            if cfg.mode == "pooling":
                _check_divides("slow_stride", _stride("slow_stride", cfg.slow_stride), (fh, fw))
                _check_divides("fast_stride", _stride("fast_stride", cfg.fast_stride), (fh, fw))
                sl, fa = slowfast_llava(feats, cfg.slow_frames, _stride("", cfg.slow_stride), cfg.fast_frames,
                                        _stride("", cfg.fast_stride))
                blocks = [tuple(sl.shape[:3]), tuple(fa.shape[:3])]
                tokens = torch.cat([sl.flatten(0, 2), fa.flatten(0, 2)])
            else:
                _check_divides("p", (opts["p"], opts["p"]), (fh, fw))
                fa = fast_pathway(feats, opts["s"], opts["t"], opts["p"], opts["min_fast_frames"])
                blocks = [tuple(fa.shape[:3])]
                tokens = fa.flatten(0, 2)
                frames_slow = feats.flatten(0, 2)  # [T * n_f, D], frame-major; a sample's videos in order
                slow[v.sample] = torch.cat([slow[v.sample], frames_slow]) if v.sample in slow else frames_slow
            video_cols = cols.reshape(-1).sort().values
            k = tokens.shape[0]
            if k > video_cols.numel():
                raise ValueError(
                    f"vlmprune slowfast: the pooled video has {k} tokens, more than the {video_cols.numel()} it replaces; "
                    "use fewer slow frames or larger strides"
                )
            keep[v.sample, video_cols[k:]] = False
            out[v.sample, video_cols[:k]] = tokens.to(embeds.dtype)
            layout.append((v.sample, video_cols[:k], blocks, cols[:, 0], (h, w)))
        ctx.captured[_LAYOUT] = [layout]
        ctx.captured[_SLOW] = [slow]
        return keep, out

    def _prune(self, module: Any, kwargs: dict, embeds: Tensor, visual: Tensor, ctx: Any, cache_key: str,
               cache: Any) -> dict:
        ctx.captured[_POS] = [kwargs.get("position_ids")]
        mask = kwargs.get("attention_mask")
        pos = kwargs.get("position_ids")
        if (self.method.config.mode != "pooling" and isinstance(mask, Tensor) and mask.dim() == 2
                and not bool(mask.bool().all()) and (pos is None or pos.dim() == 2)):
            # The cross-attention queries carry RoPE and the slow keys do not, so absolute positions
            # matter: number each sample's real tokens from 0 whatever its padding, so a padded
            # sample sees exactly what it sees alone (self-attention, being relative, is unchanged).
            kwargs = dict(kwargs)
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0).to(embeds.device)
        out = super()._prune(module, kwargs, embeds, visual, ctx, cache_key, cache)
        layout = ctx.captured[_LAYOUT][-1]
        slow: dict[int, Tensor] = ctx.captured[_SLOW][-1]
        bsz = embeds.shape[0]
        fast = [0] * bsz
        for sample, anchors, *_ in layout:
            fast[sample] += int(anchors.numel())  # summed over the sample's videos
        slow_counts = [int(slow[b].shape[0]) if b in slow else 0 for b in range(bsz)]
        state = None
        if self.method.hybrid is not None and slow:
            state = self._prefill_state(out, ctx, slow, bsz)
            ctx.captured[_STATE] = [state]
            cache = out.get(cache_key)
            if cache is not None and self.method.config.cross_attn_during_decode:
                self._decode_states[cache] = (state.slow, state.slow_mask)
        rec = self.handle.stats.last
        if rec is not None and rec.call == ctx.serial:
            if self.method.config.mode == "pooling":  # SF-LLaVA: both blocks are LLM input tokens
                rec.slow_tokens = _pooling_slow_counts(layout, bsz)
                rec.fast_tokens = [f - s for f, s in zip(fast, rec.slow_tokens)]
            else:
                rec.fast_tokens, rec.slow_tokens = fast, slow_counts
            if state is not None:
                cross, gate = self._cross_flops(state)
                rec.cross_attn_flops = cross
                rec.overhead_flops += cross + gate
        return out

    def _prefill_state(self, kwargs: dict, ctx: Any, slow: dict[int, Tensor], bsz: int) -> Any:
        from .hybrid import HybridState

        emb = kwargs["inputs_embeds"]
        n = emb.shape[1]
        longest = max(v.shape[0] for v in slow.values())
        slow_t = emb.new_zeros(bsz, longest, emb.shape[-1])
        slow_mask = torch.zeros(bsz, longest, dtype=torch.bool, device=emb.device)
        for b, v in slow.items():
            slow_t[b, : v.shape[0]] = v
            slow_mask[b, : v.shape[0]] = True
        mask = kwargs.get("attention_mask")
        real = mask.bool() if isinstance(mask, Tensor) else torch.ones(bsz, n, dtype=torch.bool, device=emb.device)
        vis = ctx.visual.to(emb.device)
        impl = self.method.hybrid.impl
        query = real.clone()
        if impl.startswith("text-only"):
            query &= ~vis
        if impl.endswith("masksystem"):
            cols = torch.arange(n, device=emb.device).unsqueeze(0).expand(bsz, n)
            first = torch.where(vis, cols, torch.full_like(cols, n)).amin(dim=1, keepdim=True)
            query &= cols > first
        query &= slow_mask.any(dim=1, keepdim=True)
        return HybridState(slow_t, slow_mask, query)

    def _cross_flops(self, state: Any) -> tuple[float, float]:
        from vlmprune.flops import cross_attention_flops

        h = self.method.hybrid
        layers = len(h.layer_indices)
        q = state.query.sum(1).tolist()
        s = state.slow_mask.sum(1).tolist()
        cross = sum(cross_attention_flops(self.adapter.text_config, qi, si, layers) for qi, si in zip(q, s))
        gate = sum(2.0 * qi * h.heads * h.head_dim * layers for qi in q)
        return float(cross), float(gate)

    def _decoder_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ctx = context.current(self.handle)
        if ctx is not None and ctx.owner is self.handle:
            ctx.captured.pop(_STATE, None)
        result = super()._decoder_pre(module, args, kwargs)
        if ctx is None or ctx.owner is not self.handle or _STATE in ctx.captured:
            return result
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        saved = self._decode_states.get(cache) if cache is not None else None
        embeds = kwargs.get("inputs_embeds")
        if saved is not None and embeds is not None:
            self._start_decode(ctx, saved, result[1] if result is not None else kwargs, embeds)
        return result

    def _start_decode(self, ctx: Any, saved: tuple[Tensor, Tensor], kwargs: dict, embeds: Tensor) -> None:
        """A decode step on a cache whose prefill had slow tokens (``cross_attn_during_decode``):
        the new tokens (text) query the same slow tokens; nothing is added to the KV cache."""
        from .hybrid import HybridState

        slow, slow_mask = saved
        n = embeds.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            query = mask[:, -n:].bool().to(embeds.device)
        else:
            query = torch.ones(embeds.shape[0], n, dtype=torch.bool, device=embeds.device)
        query = query & slow_mask.any(dim=1, keepdim=True)
        state = HybridState(slow, slow_mask, query)
        ctx.captured[_STATE] = [state]
        rec = self.handle.stats.last
        if rec is not None:
            cross, gate = self._cross_flops(state)
            rec.cross_attn_flops = (rec.cross_attn_flops or 0.0) + cross
            rec.overhead_flops += cross + gate

    def _adjust(self, ctx: Any, pruned: Any, visual: Tensor) -> Any:
        """Number the pooled tokens as the model numbers a video of the pooled grid, each pooled block
        (SF-LLaVA's slow, then fast) one such grid after the other; the adapter knows how its positions
        work (a token per position for 1-D RoPE: nothing to change)."""
        original = ctx.captured.get(_POS, [None])[-1]
        layout = ctx.captured.get(_LAYOUT, [[]])[-1]
        if not layout or not isinstance(original, Tensor):
            return pruned
        videos = [PooledVideo(sample, anchors, blocks, frame_starts, grid)
                  for sample, anchors, blocks, frame_starts, grid in layout]
        return self.adapter.pooled_video_positions(pruned, original, videos)


def _pooling_slow_counts(layout: list, bsz: int) -> list[int]:
    counts = [0] * bsz
    for sample, _, blocks, *_ in layout:
        f, h, w = blocks[0]
        counts[sample] += int(f * h * w)
    return counts
