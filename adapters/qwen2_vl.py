"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Layout: ``model.model.visual`` is the vision tower (a ViT that packs every image and video frame of
a call into one sequence, with attention kept block-diagonal by ``cu_seqlens``), its ``merger``
turns each ``spatial_merge_size**2`` consecutive ViT tokens into one LLM token, and
``model.model.language_model`` is the decoder. Images and videos have their own placeholder
tokens (``image_token_id`` / ``video_token_id``) and are scattered separately, images first.

Positions: the stock model computes 3-D M-RoPE positions (t, h, w) before the decoder, so the
pre-LLM seam receives them and, in the default ``"original"`` mode, every kept token keeps its
original (t, h, w) position and decoding continues where the unpruned model would.

Groups: one per image, and one per temporal slot of a video (each of the ``grid_t`` slices of
(h/merge) x (w/merge) merged tokens), so a method keeps k tokens per frame.

Scores: the Qwen ViTs have no [CLS] token, so FasterVLM uses the labelled fallback
(``score_kind = "nocls"``, spec section 7): the mean attention each ViT token receives over all
queries and heads of the LAST vision block, per image / frame, then averaged over each group of
``spatial_merge_size**2`` consecutive ViT tokens (one merged token). Qwen2.5-VL runs its ViT in
window order; the pooled scores are put back in raster order with the same ``reverse_indices``
the model applies to the merger output.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmprune import context
from vlmprune.scoring import mean_received_attention
from vlmprune.seams.pre_llm import VisualGroup

from .base import Adapter

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
    token count (not the segment's) gives the spec's mean over every query of the frame, with the
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

    def merge_layout(self) -> Any:
        """DyMU on the merger's output tokens (spec option 1): merging inside the ViT would break its 2-D
        RoPE and the 2x2 PatchMerger, so the ViT runs in full and 3 rounds merge its output per image."""
        from .base import PostMergeLayout

        return PostMergeLayout(rounds=3, merge_size=self.merge_size)

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
        m = self.merge_size
        entries = self._entries(ctx.inputs)
        merged_scores = self._merged_scores(ctx, entries) if scores else None
        groups: list[VisualGroup] = []
        for call, (kind, grid_thw) in enumerate(entries):
            token = self.config.image_token_id if kind == "image" else self.config.video_token_id
            mask = self._token_mask(ctx.inputs, visual, token) & visual
            sizes, grids = [], []
            for t, h, w in grid_thw.tolist():
                per_frame = (h // m) * (w // m)
                sizes.extend([per_frame] * t)
                grids.extend([(h // m, w // m)] * t)
            chunks = self.split_columns(mask, sizes)
            frame_scores = (
                torch.split(merged_scores[call], sizes) if merged_scores is not None else [None] * len(sizes)
            )
            for (sample, cols), grid, s in zip(chunks, grids, frame_scores):
                groups.append(VisualGroup(sample=sample, columns=cols, grid=grid, scores=s, kind=kind))
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
            if self.windowed:
                if window_index is None:
                    from transformers.vision_utils import get_vision_window_index

                    tower = self.vision_tower
                    window_index, _ = get_vision_window_index(
                        grid, tower.spatial_merge_size, tower.window_size, tower.patch_size
                    )
                pooled = pooled[torch.argsort(window_index.to(pooled.device))]
            out.append(pooled)
        return out

    # -- positions -------------------------------------------------------------------------------
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
            if ctx is None or ctx.owner is not handle or not isinstance(pos, Tensor):
                return None
            if pos.dim() != 3 or pos.shape[0] != 4:
                return None
            if kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None:
                return None
            kwargs = dict(kwargs)
            kwargs["position_ids"] = pos[1:]
            return args, kwargs

        hooks.forward_pre(self.inner, on_inner, with_kwargs=True)
