"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Layout: ``model.model.visual`` is the vision tower (a ViT that packs every image and video frame of
a call into one sequence, with attention kept block-diagonal by ``cu_seqlens``), its ``merger``
turns each ``spatial_merge_size**2`` consecutive ViT tokens into one LLM token, and
``model.model.language_model`` is the decoder. Images and videos have their own placeholder
tokens (``image_token_id`` / ``video_token_id``) and are scattered separately, images first.

Positions: the stock model computes 3-D M-RoPE positions (t, h, w) before the decoder, so the
pre-LLM seam receives them and, in the default ``"original"`` mode, every kept token keeps its
original (t, h, w) position and decoding continues where the unpruned model would. This adapter is
the one place that knows the M-RoPE layout: ``generate``'s extra text row
(:meth:`Qwen2VLAdapter.rope_positions`), the ``rope_deltas`` offset of tokens after the prefill
(:meth:`~Qwen2VLAdapter.continuation_positions`) and how ``get_rope_index`` numbers a video grid
(:meth:`~Qwen2VLAdapter.pooled_video_positions`).

Encoder: the ViT's 2-D RoPE and the 2x2 patch merger need whole groups of patches, so the encoder
layout is the merger's output tokens (:class:`~vlmprune.seams.encoder.EmittedLayout`), per image.

Groups: one per image, and one per temporal slot of a video (each of the ``grid_t`` slices of
(h/merge) x (w/merge) merged tokens), so a method keeps k tokens per frame.

Scores: the Qwen ViTs have no [CLS] token, so [CLS]-row scoring uses vlmprune's labelled
fallback for towers without one (``score_kind = "nocls"``): the mean attention each ViT token
receives over all queries and heads of the LAST vision block, per image / frame, then averaged over each group of
``spatial_merge_size**2`` consecutive ViT tokens (one merged token). Qwen2.5-VL runs its ViT in
window order; the pooled scores are put back in raster order with the same ``reverse_indices``
the model applies to the merger output.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmprune import context
from vlmprune.flops import as_rows
from vlmprune.scoring import mean_received_attention
from vlmprune.seams.encoder import EmittedLayout
from vlmprune.seams.pre_llm import VisualGroup
from vlmprune.sequence import PrunedSequence

from .base import (
    Adapter,
    PooledVideo,
    ResizedImage,
    RowProjector,
    check_vision_signals,
    distribute_signals,
    interpolation_flops,
    signal_carrier,
)

_GRID_KEY = "qwen2_vl.grid"  # (grid_thw, window_index or None) per vision-tower call
_SCORE_KEY = "qwen2_vl.vit_scores"  # (num_vit_tokens,) per vision-tower call, in ViT order
_FLOPS_KEY = "qwen2_vl.score_flops"  # float per vision-tower call


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _vision_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Same math as transformers' ``apply_rotary_pos_emb_vision`` (fp32, cast back)."""
    dq, dk = q.dtype, k.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return ((q * cos) + (_rotate_half(q) * sin)).to(dq), ((k * cos) + (_rotate_half(k) * sin)).to(dk)


def _rope_fn(attn: nn.Module) -> Any:
    """The rope function the attention module's own source module uses (exact parity), if any."""
    module = sys.modules.get(type(attn).__module__)
    return getattr(module, "apply_rotary_pos_emb_vision", _vision_rope)


def vision_qk(
    attn: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Recompute the rope-rotated q / k of a Qwen vision attention module from its input.

    Qwen's vision attention projects q, k, v with one fused ``qkv`` linear and rotates q and k
    before attending, so hooking a projection output would miss the rope. Recomputing from the
    module's input with ``F.linear`` on its own weights is read-only (no hooks fire, the module
    keeps its SDPA / flash backend). Returns (N, H * d) each.
    """
    n = hidden_states.shape[0]
    heads = attn.num_heads
    qkv = F.linear(hidden_states, attn.qkv.weight, attn.qkv.bias).reshape(n, 3, heads, -1)
    q, k = qkv[:, 0], qkv[:, 1]
    cos, sin = position_embeddings
    q, k = _rope_fn(attn)(q, k, cos, sin)
    return q.reshape(n, -1), k.reshape(n, -1)


def frame_received_attention(
    q: Tensor, k: Tensor, cu_seqlens: Tensor, frame_sizes: list[int], num_heads: int, scale: float
) -> Tensor:
    """Mean attention each ViT token receives from all queries of its image / frame, head-averaged.

    The attention of the block is block-diagonal over the segments of ``cu_seqlens`` (one per
    frame in a full-attention block, one per window in a Qwen2.5-VL window block). A segment's
    keys only receive attention from its own queries; dividing the received sum by the frame's
    token count (not the segment's) gives the mean over every query of the frame, with the
    zeros of the block-diagonal map included. Returns (N,) float32 in ViT order.
    """
    bounds = cu_seqlens.tolist()
    frame_ends = torch.tensor(frame_sizes).cumsum(0)
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        mean = mean_received_attention(q[None, a:b], k[None, a:b], num_heads, scale)[0]
        frame = int(torch.searchsorted(frame_ends, torch.tensor(a), right=True))
        size = frame_sizes[frame]
        out[a:b] = mean if b - a == size else mean * ((b - a) / size)
    return out


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: per-image and per-frame groups, original M-RoPE positions."""

    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    model_types = ("qwen2_vl", "qwen2_5_vl")
    text_model_types = ("qwen2_vl_text", "qwen2_5_vl_text")
    default_positions = "original"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._seam_installed = False

    # -- layout ---------------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.inner.visual

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def windowed(self) -> bool:
        """Qwen2.5-VL's ViT runs in window order and un-permutes the merger output."""
        return hasattr(self.vision_tower, "fullatt_block_indexes")

    def encoder_layout(self) -> EmittedLayout:
        """The merger's output tokens, per image: changing tokens inside the ViT would break its 2-D
        RoPE and the 2x2 PatchMerger, so the ViT runs in full."""
        return EmittedLayout(merge_size=self.merge_size, module=self.vision_tower,
                             group_sizes=self.image_group_sizes, features=self._emitted_tokens)

    def image_group_sizes(self, inputs: Mapping[str, Any]) -> list[int]:
        """Merged tokens of each image: t * h * w / merge_size**2 from ``image_grid_thw``."""
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise ValueError("vlmprune: Qwen2-VL image inputs need image_grid_thw (the processor returns it)")
        m = self.merge_size
        return [int(t * h * w) // (m * m) for t, h, w in grid.tolist()]

    def split_images(
        self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **processor_outputs: Any
    ) -> list[dict[str, Tensor]]:
        """The packed patches of each image (t * h * w rows of ``pixel_values``) with its grid row."""
        if image_grid_thw is None:
            raise ValueError(
                "vlmprune: Qwen2-VL pixel_values are packed patches; pass the processor's image_grid_thw with them"
            )
        ends = image_grid_thw.prod(-1).cumsum(0).tolist()
        starts = [0, *ends[:-1]]
        return [{"pixel_values": pixel_values[lo:hi], "image_grid_thw": image_grid_thw[i : i + 1]}
                for i, (lo, hi) in enumerate(zip(starts, ends))]

    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **processor_outputs: Any) -> Any:
        """The ViT and merger over packed patches with their grids, as the stock model calls them."""
        if image_grid_thw is None:
            raise ValueError(
                "vlmprune: Qwen2-VL pixel_values are packed patches; pass the processor's image_grid_thw with them"
            )
        return self.vision_tower(pixel_values, grid_thw=image_grid_thw)

    def _emitted_tokens(self, inputs: Mapping[str, Any]) -> Tensor:
        """(tokens, dim): the merger's output for ``inputs``, images packed in order."""
        return self.encode_images(**inputs).pooler_output

    def scoring_attention(self) -> nn.Module:
        """The attention module of the last vision block (the fallback's layer)."""
        return self.vision_tower.blocks[-1].attn

    # -- visual tokens in a call ---------------------------------------------------------------
    def _token_mask(self, inputs: dict[str, Any], like: Tensor, token: int) -> Tensor:
        """Columns holding ``token`` (from input_ids, or by embedding match like the stock model)."""
        ids = inputs.get("input_ids")
        if ids is not None and ids.shape[:2] == like.shape[:2]:
            return (ids == token).to(like.device)
        user = inputs["inputs_embeds"]
        ref = self.inner.get_input_embeddings()(torch.tensor(token, device=user.device)).to(user.dtype)
        return (user == ref).all(-1).to(like.device)

    def _entries(self, inputs: dict[str, Any]) -> list[tuple[str, Tensor]]:
        """(kind, grid_thw) of the vision-tower calls the stock forward makes, in call order."""
        out = []
        if inputs.get("pixel_values") is not None:
            out.append(("image", inputs.get("image_grid_thw")))
        if inputs.get("pixel_values_videos") is not None:
            out.append(("video", inputs.get("video_grid_thw")))
        for kind, grid in out:
            if grid is None:
                raise ValueError(f"vlmprune: Qwen2-VL {kind} inputs need {kind}_grid_thw")
        return out

    def visual_groups(
        self, ctx: context.CallContext, visual: Tensor, scores: str | None
    ) -> list[VisualGroup]:
        """One group per image and one per video frame, ordered by sample and first column.

        Image features are scattered into the image placeholders and video features into the
        video placeholders, each in row-major order over the batch; within an image / frame the
        merged tokens are row-major over (h / merge, w / merge), as the M-RoPE positions are.
        """
        entries = self._entries(ctx.inputs)
        return self._grouped(ctx, visual, entries, self._merged_scores(ctx, entries) if scores else None)

    def _grouped(
        self, ctx: context.CallContext, visual: Tensor, entries: list[tuple[str, Tensor]],
        merged_scores: list[Tensor] | None,
    ) -> list[VisualGroup]:
        """The groups, each with its rows of ``merged_scores`` (per vision-tower call, one row per merged
        token in LLM order: scores, or rows of signals) as scores."""
        m = self.merge_size
        groups: list[VisualGroup] = []
        for call, (kind, grid_thw) in enumerate(entries):
            token = self.config.image_token_id if kind == "image" else self.config.video_token_id
            mask = self._token_mask(ctx.inputs, visual, token) & visual
            sizes, grids, owners = [], [], []
            for row, (t, h, w) in enumerate(grid_thw.tolist()):
                per_frame = (h // m) * (w // m)
                sizes.extend([per_frame] * t)
                grids.extend([(h // m, w // m)] * t)
                owners.extend([row if kind == "video" else None] * t)
            chunks = self.split_columns(mask, sizes)
            frame_scores = (
                torch.split(merged_scores[call], sizes) if merged_scores is not None else [None] * len(sizes)
            )
            for (sample, cols), grid, s, owner in zip(chunks, grids, frame_scores, owners):
                groups.append(VisualGroup(sample=sample, columns=cols, grid=grid, scores=s, kind=kind, video=owner))
        groups.sort(key=lambda g: (g.sample, int(g.columns[0]) if g.columns.numel() else -1))
        return groups

    # -- scoring ---------------------------------------------------------------------------------
    def install_scoring(self, hooks: Any, kind: str, handle: Any) -> None:
        """Capture the last vision block's input and score every ViT token during the tower call.

        A pre-hook on the tower records its ``grid_thw`` (and a precomputed ``window_index``); a
        pre-hook on the last block's attention recomputes q / k with rope from the block's own
        input and reduces them at once to one float per ViT token, so nothing of size N^2 (and
        no q / k copy) outlives the hook.
        """
        self.score_kind = "nocls"
        attn = self.scoring_attention()
        heads = int(attn.num_heads)
        scale = float(getattr(attn, "scaling", (attn.head_dim) ** -0.5))

        def on_tower(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ctx = context.current(handle)
            if ctx is None or ctx.owner is not handle:
                return
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            ctx.capture(_GRID_KEY, (grid, kwargs.get("window_index")))

        def on_attn(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ctx = context.current(handle)
            if ctx is None or ctx.owner is not handle or not ctx.captured.get(_GRID_KEY):
                return
            x = args[0] if args else kwargs["hidden_states"]
            cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            pe = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
            grid = ctx.captured[_GRID_KEY][-1][0]
            frames = [h * w for t, h, w in grid.tolist() for _ in range(t)]
            with torch.no_grad():
                q, k = vision_qk(module, x.detach(), pe)
                ctx.capture(_SCORE_KEY, frame_received_attention(q, k, cu, frames, heads, scale))
            n, c = x.shape[0], x.shape[-1]
            seg = (cu[1:] - cu[:-1]).double()
            # recomputing q and k (2 of the 3 fused projections) + q.k^T of every segment
            ctx.capture(_FLOPS_KEY, 2.0 * n * c * 2 * c + 2.0 * c * float((seg * seg).sum()))

        hooks.forward_pre(self.vision_tower, on_tower, with_kwargs=True)
        hooks.forward_pre(attn, on_attn, with_kwargs=True)

    def scoring_flops(self, ctx: context.CallContext) -> float:
        """FLOPs of the fallback score: q / k recomputation and the per-frame q.k^T products."""
        return float(sum(ctx.captured.get(_FLOPS_KEY, [])))

    def _merged_scores(self, ctx: context.CallContext, entries: list[tuple[str, Tensor]]) -> list[Tensor]:
        """Per vision-tower call: one score per merged token, in the order the features reach the LLM."""
        grids = ctx.captured.get(_GRID_KEY, [])
        vit = ctx.captured.get(_SCORE_KEY, [])
        if len(vit) != len(entries) or len(grids) != len(entries):
            raise ValueError(
                f"vlmprune: expected {len(entries)} Qwen2-VL vision-tower call(s) with scores in this forward, "
                f"got {len(vit)}; precomputed encoder outputs (mm_encoder_outputs) cannot be scored"
            )
        unit = self.merge_size**2
        out = []
        for (grid, window_index), scores in zip(grids, vit):
            pooled = scores.view(-1, unit).mean(dim=-1)  # ViT order: `unit` consecutive tokens merge
            out.append(self._llm_order(pooled, grid, window_index))
        return out

    def _llm_order(self, merged: Tensor, grid: Tensor, window_index: Tensor | None) -> Tensor:
        """Rows of merged tokens in the ViT's order put in the order the merger output reaches the LLM
        (Qwen2.5-VL: un-permuted from window order with the model's ``reverse_indices``)."""
        if not self.windowed:
            return merged
        if window_index is None:
            from transformers.vision_utils import get_vision_window_index

            tower = self.vision_tower
            window_index, _ = get_vision_window_index(grid, tower.spatial_merge_size, tower.window_size, tower.patch_size)
        return merged[torch.argsort(window_index.to(merged.device))]

    # -- vision-side signals ----------------------------------------------------------------------
    _SIGNAL_GRID_KEY = "qwen2_vl.signal_grid"  # (grid_thw, window_index or None) per vision-tower call
    _MERGER_IN_KEY = "qwen2_vl.merger_in"  # (ViT tokens, C) the merger's input per vision-tower call
    _KEYS_KEY = "qwen2_vl.keys"  # (ViT tokens, head_dim) head-mean keys of the last block per call

    def install_signals(self, hooks: Any, needs: frozenset[str], handle: Any) -> None:
        """Read-only hooks during the vision-tower call: "vision" records the merger's input (the ViT
        tokens it merges ``spatial_merge_size**2`` at a time); "keys" recomputes the last block's
        rope-rotated keys from the block's input (the keys its attention uses; the fused ``qkv``
        projection has no separate key output to hook) and keeps their mean over heads. The ViT keeps
        its attention backend."""
        check_vision_signals(self, needs)
        attn = self.scoring_attention()
        heads = int(attn.num_heads)

        def on_tower(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ctx = context.current(handle)
            if ctx is not None and ctx.owner is handle:
                grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
                ctx.capture(self._SIGNAL_GRID_KEY, (grid, kwargs.get("window_index")))

        def on_merger(module: nn.Module, args: tuple) -> None:
            ctx = context.current(handle)
            if ctx is not None and ctx.owner is handle:
                ctx.capture(self._MERGER_IN_KEY, args[0].detach())

        def on_attn(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ctx = context.current(handle)
            if ctx is None or ctx.owner is not handle:
                return
            x = (args[0] if args else kwargs["hidden_states"]).detach()
            cos, sin = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
            c = x.shape[-1]
            with torch.no_grad():
                w, b = module.qkv.weight[c : 2 * c], (module.qkv.bias[c : 2 * c] if module.qkv.bias is not None else None)
                k = F.linear(x, w, b).reshape(x.shape[0], heads, -1)
                _, k = _rope_fn(module)(k, k, cos, sin)
            ctx.capture(self._KEYS_KEY, k.mean(dim=1))
            ctx.capture(_FLOPS_KEY, 2.0 * x.shape[0] * c * c)  # the key projection, recomputed

        hooks.forward_pre(self.vision_tower, on_tower, with_kwargs=True)
        if "vision" in needs:
            hooks.forward_pre(self.vision_tower.merger, on_merger)
        if "keys" in needs:
            hooks.forward_pre(attn, on_attn, with_kwargs=True)

    def vision_signals(self, ctx: context.CallContext, groups: list[VisualGroup], needs: frozenset[str]) -> None:
        """Per group (image / frame), per merged token in LLM order: "vision", the ``spatial_merge_size**2``
        merger-input rows of its patches side by side (what the merger's MLP takes after normalising
        each part), with the merger as ``project``; "keys", the head-mean keys of the last block
        averaged over the same patches (LightCompress pools Qwen2.5-VL's keys this way). No [CLS]."""
        check_vision_signals(self, needs)
        entries = self._entries(ctx.inputs)
        grids = ctx.captured.get(self._SIGNAL_GRID_KEY, [])
        unit = self.merge_size**2
        per_call: list[list[Tensor]] = [[] for _ in grids]
        parts = []
        for name, key in (("vision", self._MERGER_IN_KEY), ("keys", self._KEYS_KEY)):
            if name not in needs:
                continue
            found = ctx.captured.get(key, [])
            if len(found) != len(entries) or len(grids) != len(entries):
                raise ValueError(
                    f"vlmprune: expected {len(entries)} Qwen2-VL vision-tower call(s) in this forward, got "
                    f"{len(found)}; precomputed encoder outputs (mm_encoder_outputs) give no vision signals"
                )
            for i, ((grid, window_index), rows) in enumerate(zip(grids, found)):
                merged = rows.reshape(-1, unit * rows.shape[-1]) if name == "vision" else rows.reshape(
                    -1, unit, rows.shape[-1]).mean(dim=1)
                per_call[i].append(self._llm_order(merged, grid, window_index))
            width = int(per_call[0][-1].shape[-1]) if per_call else 0
            parts.append((name, width, found[0].dtype if found else torch.float32))
        carried = self._grouped(ctx, ctx.visual, entries, [signal_carrier(rows, rows=False) for rows in per_call])
        project = None
        if "vision" in needs:
            project = RowProjector(self.vision_tower.merger, unit=int(ctx.captured[self._MERGER_IN_KEY][0].shape[-1]))
        distribute_signals(groups, carried, parts, None, project)

    # -- positions -------------------------------------------------------------------------------
    @staticmethod
    def _has_text_axis(position_ids: Any) -> bool:
        """``generate`` hands the model (4, B, L) positions: a plain text row on the three M-RoPE rows."""
        return isinstance(position_ids, Tensor) and position_ids.dim() == 3 and position_ids.shape[0] == 4

    def rope_positions(self, position_ids: Tensor) -> Tensor:
        """The three M-RoPE rows (t, h, w): the text row ``generate`` stacks first is dropped."""
        return position_ids[1:] if self._has_text_axis(position_ids) else position_ids

    def continuation_positions(self, cache_positions: Tensor) -> Tensor:
        """New tokens after a prefill take ``cache position + rope_deltas`` on all three M-RoPE axes."""
        deltas = getattr(self.inner, "rope_deltas", None)
        if deltas is None:
            return cache_positions
        n = cache_positions.shape[-1]
        return cache_positions.unsqueeze(0).expand(3, 1, n) + deltas.to(cache_positions.device).view(1, -1, 1)

    def pooled_video_positions(
        self, pruned: PrunedSequence, position_ids: Tensor, videos: Sequence[PooledVideo]
    ) -> PrunedSequence:
        """Give the pooled tokens the positions ``get_rope_index`` gives a video of the pooled grid: from
        the video's start, t' x the video's own time step (read off the original positions), h' and w'
        on their axes, and the text after the video advanced by max(h', w') instead of max(h, w); each
        pooled block is numbered as one such grid after the other."""
        pos = pruned.position_ids
        original = self.rope_positions(position_ids)
        if pos.dim() != 3 or not videos:
            return pruned
        pos = pos.clone()
        cols = pruned.columns
        real = cols >= 0
        if pruned.attention_mask is not None:
            real &= pruned.attention_mask.bool()
        for video in videos:
            sample, anchors, frame_starts = video.sample, video.columns, video.frame_columns
            row = cols[sample]
            where = torch.full((int(row.max()) + 1,), -1, dtype=torch.long, device=row.device)
            where[row[row >= 0]] = torch.nonzero(row >= 0).squeeze(1)
            new_cols = where[anchors.to(row.device)]
            old = original[:, min(sample, original.shape[1] - 1)]
            start = int(pos[1:, sample, new_cols[0]].min())  # shifted by earlier videos of the sample
            step = int(old[0, frame_starts[1]] - old[0, frame_starts[0]]) if frame_starts.numel() > 1 else 1
            ids, current = [], start
            for f, h, w in video.blocks:
                tt, hh, ww = torch.meshgrid(torch.arange(f) * step, torch.arange(h), torch.arange(w), indexing="ij")
                ids.append(torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + current)
                current += max(h, w)
            pos[:, sample, new_cols] = torch.cat(ids, dim=1).to(pos)
            after = (torch.arange(row.numel(), device=row.device) > new_cols[-1]) & real[sample]
            pos[:, sample, after] += current - (start + max(video.grid))
        masked = pos.masked_fill(~real.unsqueeze(0), torch.iinfo(pos.dtype).min)
        nxt = masked.amax(dim=(0, 2)) + 1
        nxt = torch.where(real.any(dim=1), nxt, torch.zeros_like(nxt))
        return dataclasses.replace(pruned, position_ids=pos, next_position=nxt)

    def install_seam(self, hooks: Any, handle: Any) -> None:
        """Give the decoder 3-axis M-RoPE positions in image-bearing calls of ``handle``.

        ``generate`` hands Qwen2-VL a (4, B, L) position tensor: a plain text row (only used to
        detect packed sequences, which needs no cache and no mask) stacked on the three M-RoPE
        rows. The pre-LLM seam continues decoding from one past the largest kept position over
        every row it is given, so the text row (always the largest) would shift all decode
        positions by ``rope_deltas`` away from the unpruned model's. Dropping the text row in
        the prefill leaves the rope (and the mask, built from the attention mask) unchanged.
        """
        if self._seam_installed:
            return
        self._seam_installed = True

        def on_inner(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            ctx = context.current(handle)
            pos = kwargs.get("position_ids")
            if ctx is None or ctx.owner is not handle or not self._has_text_axis(pos):
                return None
            if kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None:
                return None
            kwargs = dict(kwargs)
            kwargs["position_ids"] = self.rope_positions(pos)
            return args, kwargs

        hooks.forward_pre(self.inner, on_inner, with_kwargs=True)

    # -- FLOPs facts -----------------------------------------------------------------------------
    @classmethod
    def text_head_dim(cls, text_config: Any) -> int:
        """Qwen2-VL's attention uses hidden_size // num_attention_heads whatever ``head_dim`` says."""
        return int(text_config.hidden_size) // int(text_config.num_attention_heads)

    @classmethod
    def vision_flops(cls, config: Any, inputs: Mapping[str, Any]) -> tuple[float, float]:
        """``image_grid_thw`` / ``video_grid_thw`` next to ``pixel_values`` / ``pixel_values_videos``:
        prod(t, h, w) patches each, a Conv3d over ``temporal_patch_size`` frames per patch; Qwen2-VL
        attends per frame, Qwen2.5-VL inside windows except on its ``fullatt_block_indexes`` layers;
        the PatchMerger MLP over the merged tokens."""
        vc = config.vision_config
        qwen25 = config.model_type == "qwen2_5_vl"
        if qwen25:
            d = int(vc.hidden_size)
            out = int(vc.out_hidden_size)
            mlp_per_token = 2 * 3 * d * int(vc.intermediate_size)  # gated MLP
            full_layers = {int(i) for i in vc.fullatt_block_indexes}
        else:
            d = int(vc.embed_dim)
            out = int(vc.hidden_size)
            mlp_per_token = 2 * 2 * d * int(d * vc.mlp_ratio)
            full_layers = set(range(int(vc.depth)))
        depth = int(vc.depth)
        p, tp, m = int(vc.patch_size), int(vc.temporal_patch_size), int(vc.spatial_merge_size)
        channels = int(getattr(vc, "in_channels", 3))

        grids: list[list[int]] = []
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if inputs.get(pixels) is not None:
                if inputs.get(grid) is None:
                    raise ValueError(f"vlmprune.flops: {config.model_type} needs {grid} with {pixels}")
                grids += as_rows(inputs[grid])

        enc = proj = 0
        hidden = d * m * m
        for t, h, w in grids:
            n = t * h * w
            frame = h * w
            full_attn = t * 4 * frame * frame * d
            if qwen25:
                ws = int(vc.window_size) // m // p
                mh, mw = h // m, w // m
                rows = [min(ws, mh - i) for i in range(0, mh, ws)]
                cols = [min(ws, mw - j) for j in range(0, mw, ws)]
                win_attn = t * sum(4 * (r * c * m * m) ** 2 * d for r in rows for c in cols)
            else:
                win_attn = full_attn
            per_layer_linear = 2 * n * 4 * d * d + n * mlp_per_token  # qkv (3d²) + proj (d²) + MLP
            attn = sum(full_attn if i in full_layers else win_attn for i in range(depth))
            enc += 2 * n * channels * tp * p * p * d + depth * per_layer_linear + attn
            proj += 2 * (n // (m * m)) * (hidden * hidden + hidden * out)
        return float(enc), float(proj)

    # -- smaller images: re-encode a call's images and videos at a lower resolution ------------------
    _RESIZED_KEY = "qwen2_vl.resized"  # the ResizedImage list of each vision-tower call

    @staticmethod
    def patches_to_frames(
        patches: Tensor, grid_thw: Sequence[int], patch_size: int, merge_size: int, temporal_patch_size: int
    ) -> Tensor:
        """(t * temporal_patch_size, C, h * patch, w * patch): the frames one image / video's flattened
        patches were cut from, undoing the processor's layout (rows ordered by merge unit, then the
        ``merge x merge`` patches of the unit; each row ``C x temporal_patch x patch x patch``). An
        image gives its ``temporal_patch_size`` identical copies."""
        t, h, w = (int(v) for v in grid_thw)
        p, m, tp = patch_size, merge_size, temporal_patch_size
        c = patches.shape[-1] // (tp * p * p)
        x = patches.reshape(t, h // m, w // m, m, m, c, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
        return x.reshape(t * tp, c, h * p, w * p)

    @staticmethod
    def frames_to_patches(frames: Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> Tensor:
        """The processor's flattened patches (t * h * w, C * temporal_patch * patch * patch) of frames
        (t * temporal_patch_size, C, H, W) whose sides are multiples of patch * merge."""
        p, m, tp = patch_size, merge_size, temporal_patch_size
        f, c, height, width = frames.shape
        t, h, w = f // tp, height // p, width // p
        x = frames.reshape(t, tp, c, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(t * h * w, c * tp * p * p)

    @staticmethod
    def smaller_grid(h: int, w: int, k: int) -> tuple[int, int]:
        """The (h', w') grid of about ``k`` tokens with the aspect of (h, w): each side scaled by
        s = sqrt(k / hw) and rounded to the nearest whole token (halves up); a side that would fall
        below one token is one, and the other side then takes about k; (h, w) itself when k >= hw."""
        if k >= h * w:
            return h, w
        s = math.sqrt(k / (h * w))
        if h * s < 1:
            return 1, min(w, max(1, math.floor(k + 0.5)))
        if w * s < 1:
            return min(h, max(1, math.floor(k + 0.5))), 1
        return min(h, math.floor(h * s + 0.5)), min(w, math.floor(w * s + 0.5))

    def _patch_geometry(self) -> tuple[int, int, int]:
        vc = self.config.vision_config
        return int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size)

    def resize_patches(self, patches: Tensor, grid_thw: Sequence[int], new_hw: tuple[int, int],
                       resample: str = "bicubic") -> Tensor:
        """One image / video's patches resized to a grid of ``new_hw`` merged tokens: its frames are
        rebuilt from the patches, resized with ``resample`` (antialiased, in float32) and cut again the
        way the processor cuts them."""
        p, m, tp = self._patch_geometry()
        frames = self.patches_to_frames(patches, grid_thw, p, m, tp).float()
        size = (new_hw[0] * m * p, new_hw[1] * m * p)
        small = F.interpolate(frames, size=size, mode=resample, align_corners=False, antialias=True)
        return self.frames_to_patches(small.to(patches.dtype), p, m, tp)

    def _resize_entry(self, pixels: Tensor, grid_thw: Tensor, kind: str, budget: Callable[[int], int],
                      resample: str) -> tuple[Tensor, Tensor, list[ResizedImage]]:
        """Each image (each video: its frames alike) of one vision-tower call at the grid its budget
        gives: ``budget(n)`` of the n merged tokens of the image (of one video frame)."""
        p, m, tp = self._patch_geometry()
        grids = [[int(v) for v in row] for row in grid_thw.tolist()]
        ends = torch.tensor([t * h * w for t, h, w in grids]).cumsum(0).tolist()
        chunks, new_grids, items = [], [], []
        for (t, h, w), lo, hi in zip(grids, [0, *ends[:-1]], ends):
            rows, cols = h // m, w // m
            nh, nw = self.smaller_grid(rows, cols, int(budget(rows * cols)))
            chunk, cost = pixels[lo:hi], 0.0
            if (nh, nw) != (rows, cols):
                chunk = self.resize_patches(chunk, (t, h, w), (nh, nw), resample)
                channels = pixels.shape[-1] // (tp * p * p)
                cost = interpolation_flops(t * tp * channels, (h * p, w * p), (nh * m * p, nw * m * p), resample)
            new = torch.tensor([[t, nh * m, nw * m]], dtype=grid_thw.dtype)
            vision, projector = self.vision_flops(self.config, {"pixel_values": chunk, "image_grid_thw": new})
            chunks.append(chunk)
            new_grids.append(new)
            items.append(ResizedImage(kind=kind, grid=(t, rows, cols), new_grid=(t, nh, nw), kept=[nh * nw] * t,
                                      vision_flops=vision, projector_flops=projector, flops=cost,
                                      layout=f"{rows}x{cols}->{nh}x{nw} ({resample})" if cost else f"{rows}x{cols}"))
        return torch.cat(chunks), torch.cat(new_grids).to(grid_thw.device), items

    def resize_image_inputs(
        self, inputs: Mapping[str, Any], budget: Callable[[int], int], resample: str = "bicubic"
    ) -> tuple[dict[str, Tensor], list[ResizedImage]]:
        """``pixel_values`` / ``image_grid_thw`` and ``pixel_values_videos`` / ``video_grid_thw`` for the
        same images and videos at the grids their budgets give (images first, as the model encodes)."""
        out: dict[str, Tensor] = {}
        items: list[ResizedImage] = []
        for kind, (pixels, grid) in (("image", ("pixel_values", "image_grid_thw")),
                                     ("video", ("pixel_values_videos", "video_grid_thw"))):
            if inputs.get(pixels) is None:
                continue
            if inputs.get(grid) is None:
                raise ValueError(f"vlmprune: Qwen2-VL {kind} inputs need {grid}")
            out[pixels], out[grid], found = self._resize_entry(inputs[pixels], inputs[grid], kind, budget, resample)
            items += found
        return out, items

    def install_image_resize(
        self, hooks: Any, handle: Any, budget: Callable[[int], int], resample: str = "bicubic"
    ) -> None:
        """Wrap ``get_image_features`` / ``get_video_features`` of the inner model (this instance only):
        in ``handle``'s calls they encode the smaller images and videos, then put each one's merged
        tokens first in its image / in each of its frames, zeros after, so the stock placeholder
        scatter fills the prompt as usual."""
        for kind, name in (("image", "get_image_features"), ("video", "get_video_features")):
            hooks.set_attr(self.inner, name, self._resizing(getattr(self.inner, name), kind, handle, budget, resample))

    def _resizing(self, original: Callable, kind: str, handle: Any, budget: Callable[[int], int],
                  resample: str) -> Callable:
        pixels_key, grid_key = ("pixel_values", "image_grid_thw") if kind == "image" else (
            "pixel_values_videos", "video_grid_thw")

        def features(*args: Any, **kwargs: Any) -> Any:
            ctx = context.current(handle)
            if ctx is None or ctx.owner is not handle:
                return original(*args, **kwargs)
            args = list(args)
            pixels = args.pop(0) if args else kwargs.pop(pixels_key)
            grid = args.pop(0) if args else kwargs.pop(grid_key, None)
            if grid is None:
                raise ValueError(f"vlmprune: Qwen2-VL {kind} inputs need {grid_key}")
            given = sorted(k for k, v in kwargs.items() if isinstance(v, Tensor))
            if given:
                raise ValueError(
                    f"vlmprune: precomputed vision inputs ({', '.join(given)}) describe the full-size {kind}s; "
                    "they cannot be used while the images are made smaller"
                )
            small, small_grid, items = self._resize_entry(pixels, grid, kind, budget, resample)
            out = original(small, small_grid, *args, **kwargs)
            placed = []
            for feats, item in zip(out.pooler_output, items):
                t, rows, cols = item.grid
                k = item.kept[0]
                full = feats.new_zeros(t, rows * cols, feats.shape[-1])
                full[:, :k] = feats.view(t, k, -1)
                placed.append(full.view(t * rows * cols, -1))
            out.pooler_output = tuple(placed)
            ctx.capture(self._RESIZED_KEY, items)
            return out

        features.__doc__ = getattr(original, "__doc__", None)
        return features

    def resized_images(self, ctx: context.CallContext) -> list[ResizedImage]:
        """The images, then the videos, that this call encoded smaller."""
        return [item for call in ctx.captured.get(self._RESIZED_KEY, []) for item in call]

    def resized_image_positions(
        self, pruned: PrunedSequence, position_ids: Tensor, images: Sequence[PooledVideo]
    ) -> PrunedSequence:
        """M-RoPE positions of the smaller images and videos as ``get_rope_index`` gives a prompt holding
        them: from the item's start (shifted by the items before it in the sample), h and w over the
        smaller grid, each frame's temporal position as the stock model gave that frame; the text after
        an item moves by max(h', w') - max(h, w). ``images[i].columns``: the kept input columns,
        ``frame_columns``: each stock frame's first input column, ``blocks``: [(t, h', w')]."""
        pos = pruned.position_ids
        if not isinstance(pos, Tensor) or pos.dim() != 3 or not images:
            return pruned
        original = self.rope_positions(position_ids)
        pos = pos.clone()
        cols = pruned.columns
        real = cols >= 0
        if pruned.attention_mask is not None:
            real &= pruned.attention_mask.bool()
        per_sample: dict[int, list[PooledVideo]] = {}
        for item in images:
            per_sample.setdefault(int(item.sample), []).append(item)
        for sample, items in per_sample.items():
            row = cols[sample]
            where = torch.full((int(row.max()) + 1,), -1, dtype=torch.long, device=row.device)
            where[row[row >= 0]] = torch.nonzero(row >= 0).squeeze(1)
            old = original[:, min(sample, original.shape[1] - 1)]
            shift = 0
            for item in sorted(items, key=lambda i: int(i.frame_columns[0])):
                (t, h, w), = item.blocks
                new_cols = where[item.columns.to(row.device)]
                start = int(old[1:, item.frame_columns[0]].min()) + shift
                tt = (old[0, item.frame_columns.to(old.device)] + shift).repeat_interleave(h * w)
                hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                ids = torch.stack([tt.cpu(), hh.reshape(-1).repeat(t) + start, ww.reshape(-1).repeat(t) + start])
                pos[:, sample, new_cols] = ids.to(pos)
                delta = max(h, w) - max(item.grid)
                after = (torch.arange(row.numel(), device=row.device) > new_cols[-1]) & real[sample]
                pos[:, sample, after] += delta
                shift += delta
        masked = pos.masked_fill(~real.unsqueeze(0), torch.iinfo(pos.dtype).min)
        nxt = masked.amax(dim=(0, 2)) + 1
        nxt = torch.where(real.any(dim=1), nxt, torch.zeros_like(nxt))
        return dataclasses.replace(pruned, position_ids=pos, next_position=nxt)
