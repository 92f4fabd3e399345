"""InternVL (``InternVLForConditionalGeneration``): tiles of pixel-shuffled InternViT patches.

How the stock model lays out visual tokens (transformers 5.24, ``models/internvl``):

- Every image is split by the processor into tiles (a grid of crops plus a thumbnail);
  ``pixel_values`` is ``(num_tiles, 3, H, W)`` over all images of the batch, and the prompt holds
  ``M`` image-context tokens per tile, tiles of one image back to back, images in prompt order.
- InternViT prepends a [CLS] token; ``get_image_features`` takes ``hidden_states[vision_feature_layer]``
  (``last_hidden_state`` for -1), drops [CLS] (``vision_feature_select_strategy="default"``), and
  ``pixel_shuffle`` with ``downsample_ratio`` 0.5 turns each 2x2 block of patches into one token
  (a 32x32 patch grid -> 16x16 = 256 tokens per 448px tile) before the MLP projector.

Scores: the [CLS] attention row of the block that produces the feature layer, averaged over heads,
is pooled over exactly the patches that ``pixel_shuffle`` merges into each token, so every LLM
token gets the mean score of its patches; one :class:`VisualGroup` per tile (thumbnail included).

Encoder: the 2x2 pixel shuffle needs whole groups of patches, so the encoder layout is the
projector's output tokens of each tile (:class:`~vlmprune.seams.encoder.EmittedLayout`); the
decoder (Qwen2 / Llama) uses 1-D positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vlmprune import context
from vlmprune.flops import as_pair, call_option, mlp_projector_flops, vit_flops
from vlmprune.scoring import cls_attention_scores
from vlmprune.seams.encoder import EmittedLayout, encoder_layers, feature_layer_index
from vlmprune.seams.pre_llm import VisualGroup

from .base import Adapter


class InternVLAdapter(Adapter):
    """Adapter for ``InternVLForConditionalGeneration`` (InternVL 2.5 / 3 "-hf" checkpoints)."""

    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    model_types = ("internvl",)
    default_positions = "contiguous"  # the numbering of the LLaVA reference code

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._members: dict[int, Tensor] = {}
        self._scoring_block: int | None = None

    # -- geometry --------------------------------------------------------------------------------
    def patch_side(self, pixel_values: Tensor) -> int:
        """Patches per side of one tile (the stock model assumes square tiles, as we do)."""
        patch = self.config.vision_config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return int(pixel_values.shape[-2]) // int(patch)

    def merge_members(self, side: int) -> Tensor:
        """(M, r) patch indices that ``pixel_shuffle`` merges into each of the M output tokens.

        Computed by running the model's own ``pixel_shuffle`` on a grid of patch indices, so the
        grouping (and the order of the merged tokens) cannot drift from what the model does with
        the features. Row ``m`` lists the raster indices of the patches in merged token ``m``.
        """
        members = self._members.get(side)
        if members is None:
            index = torch.arange(side * side, dtype=torch.float64).view(1, side, side, 1)
            shuffled = self.inner.pixel_shuffle(index, scale_factor=self.config.downsample_ratio)
            members = shuffled.reshape(-1, shuffled.shape[-1]).round().long()
            if sorted(members.flatten().tolist()) != list(range(side * side)):
                raise RuntimeError("vlmprune: pixel_shuffle is not a permutation of the patch grid")
            self._members[side] = members
        return members

    def merged_grid(self, side: int) -> tuple[int, int]:
        """(h, w) grid of the tokens one tile contributes after pixel_shuffle."""
        m = self.merge_members(side).shape[0]
        h = int(side * self.config.downsample_ratio)
        if h * h != m:
            h = math.isqrt(m)
        return h, m // h

    def merged_scores(self, patch_scores: Tensor) -> Tensor:
        """Pool (T, N) patch scores to (T, M) token scores with the grouping pixel_shuffle uses.

        The mean (not max) over each token's patches, as the reference code pools; equal-size groups
        make mean and sum rank alike.
        """
        side = math.isqrt(patch_scores.shape[-1])
        if side * side != patch_scores.shape[-1]:
            raise ValueError(f"vlmprune: {patch_scores.shape[-1]} patch scores do not form a square grid")
        members = self.merge_members(side).to(patch_scores.device)
        return patch_scores[:, members].mean(dim=-1)

    # -- the vision encoder ----------------------------------------------------------------------
    def encoder_layout(self) -> EmittedLayout:
        """The projector's output tokens per tile (after the pixel shuffle; no [CLS]: the stock model
        dropped it before the shuffle): changing tokens inside InternViT would break the 2x2 shuffle,
        so the ViT and projector run in full."""
        return EmittedLayout(merge_size=1, module=self.inner.multi_modal_projector,
                             group_sizes=self.image_group_sizes, tokens=int(self.config.image_seq_length),
                             features=lambda inputs: self.tile_features(inputs["pixel_values"]))

    def image_group_sizes(self, inputs: Mapping[str, Any]) -> list[int]:
        """LLM tokens per tile (:meth:`tile_sizes`)."""
        return self.tile_sizes(inputs)

    def tile_features(self, pixel_values: Tensor) -> Tensor:
        """(tiles, tokens, dim): the projector's output per tile, what the stock model feeds the LLM."""
        cfg = self.config
        out = self.inner.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        return getattr(out, "pooler_output", out)

    def tile_sizes(self, inputs: dict[str, Any]) -> list[int]:
        """LLM tokens per tile of this call, tiles in ``pixel_values`` order."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            raise ValueError("vlmprune: InternVL image features without pixel_values to locate their tiles")
        h, w = self.merged_grid(self.patch_side(pixel_values))
        return [h * w] * int(pixel_values.shape[0])

    # -- scoring ---------------------------------------------------------------------------------
    def _block_for(self, feature_layer: int | list[int]) -> int:
        return feature_layer_index(feature_layer, len(encoder_layers(self.vision_tower)))

    def install_scoring(self, hooks: Any, kind: str, handle: Any) -> None:
        """Capture the [CLS] query and all keys of the feature layer's attention, after qk-norm.

        InternViT's attention applies optional RMS ``q_norm`` / ``k_norm`` (``use_qk_norm``) to the
        projections before the score; hooking the norms' outputs (``nn.Identity`` when off) gives
        exactly the q / k the eager attention multiplies, whatever the configuration.
        """
        self.score_kind = "cls"  # InternViT always prepends a [CLS] token
        self._scoring_block = self._block_for(self.config.vision_feature_layer)
        attn = encoder_layers(self.vision_tower)[self._scoring_block].attention
        self._scoring_attn = attn

        def on_q(module: nn.Module, args: tuple, output: Tensor) -> None:
            ctx = context.current(handle)
            if ctx is not None and ctx.owner is handle:
                ctx.capture("vision.q", output[:, 0].detach())

        def on_k(module: nn.Module, args: tuple, output: Tensor) -> None:
            ctx = context.current(handle)
            if ctx is not None and ctx.owner is handle:
                ctx.capture("vision.k", output.detach())

        hooks.forward(attn.q_norm, on_q)
        hooks.forward(attn.k_norm, on_k)

    def captured_scores(self, ctx: context.CallContext) -> Tensor:
        """(num_tiles, N) [CLS]-to-patch attention of every tile encoded in this call."""
        call_layer = ctx.inputs.get("vision_feature_layer")
        if call_layer is not None and self._block_for(call_layer) != self._scoring_block:
            raise ValueError(
                f"vlmprune: this call uses vision_feature_layer={call_layer}, but [CLS] scoring was "
                f"installed for the config's {self.config.vision_feature_layer}; apply vlmprune to a model "
                "whose config.vision_feature_layer matches the layer you pass"
            )
        qs, ks = ctx.captured.get("vision.q", []), ctx.captured.get("vision.k", [])
        if not qs or not ks:
            raise RuntimeError("vlmprune: the vision tower ran without the [CLS] scoring hooks firing")
        q, k = torch.cat(qs, dim=0), torch.cat(ks, dim=0)
        heads = self.config.vision_config.num_attention_heads
        return cls_attention_scores(q, k, heads, getattr(self._scoring_attn, "scale", None))

    def scoring_flops(self, ctx: context.CallContext) -> float:
        """FLOPs of the [CLS] row (one query against 1+N keys per tile) plus its 2x2 pooling,
        the method's own overhead in the FLOPs report (q / k themselves are computed by the layer)."""
        total = 0.0
        for k in ctx.captured.get("vision.k", []):
            tiles, n, c = k.shape
            total += 2.0 * tiles * n * c + tiles * (n - 1)
        return total

    # -- groups ----------------------------------------------------------------------------------
    def visual_groups(self, ctx: context.CallContext, visual: Tensor, scores: str | None) -> list[VisualGroup]:
        """One group per tile, in the order the stock model scatters tile features into the prompt."""
        pixel_values = ctx.inputs.get("pixel_values")
        if pixel_values is None:
            raise ValueError("vlmprune: InternVL visual tokens without pixel_values to locate their tiles")
        num_tiles = int(pixel_values.shape[0])
        grid = self.merged_grid(self.patch_side(pixel_values))
        per_tile = grid[0] * grid[1]
        total = int(visual.sum())
        if total != num_tiles * per_tile:
            raise ValueError(
                f"vlmprune: the prompt has {total} image tokens but {num_tiles} tiles give "
                f"{num_tiles * per_tile} ({per_tile} per tile)"
            )
        chunks = self.split_columns(visual, [per_tile] * num_tiles)
        tile_scores = None
        if scores:
            tile_scores = self.merged_scores(self.captured_scores(ctx))
            if tile_scores.shape != (num_tiles, per_tile):
                raise ValueError(
                    f"vlmprune: {num_tiles} tiles of {per_tile} tokens in the prompt but the vision tower "
                    f"scored {tuple(tile_scores.shape)}"
                )
        return [
            VisualGroup(
                sample=sample,
                columns=cols,
                grid=grid,
                scores=tile_scores[i] if tile_scores is not None else None,
                kind="tile",
            )
            for i, (sample, cols) in enumerate(chunks)
        ]

    # -- FLOPs facts -----------------------------------------------------------------------------
    @classmethod
    def vision_flops(cls, config: Any, inputs: Mapping[str, Any]) -> tuple[float, float]:
        """InternViT over ``pixel_values`` (tiles, 3, H, W), with [CLS]; the pixel shuffle and the MLP
        projector over the shuffled tokens of every tile."""
        vc = config.vision_config
        if getattr(vc, "model_type", None) != "internvl_vision":
            raise ValueError(
                f"vlmprune.flops: internvl with a {getattr(vc, 'model_type', None)!r} vision tower is not supported"
            )
        pv = inputs.get("pixel_values")
        if pv is None:
            return 0.0, 0.0
        if len(pv.shape) != 4:
            raise ValueError(
                f"vlmprune.flops: InternVL expects pixel_values (tiles, 3, H, W), got {tuple(pv.shape)}"
            )
        ph, pw = as_pair(vc.patch_size)
        tiles, n_patches = pv.shape[0], (pv.shape[-2] // ph) * (pv.shape[-1] // pw)
        enc = vit_flops(vc, n_patches, True, tiles)
        strategy = call_option(inputs, config, "vision_feature_select_strategy")
        n_tokens = n_patches + (0 if strategy == "default" else 1)
        scale = int(1 / config.downsample_ratio)
        side = int(n_tokens**0.5)  # the HF model reshapes to a square grid
        tokens_out = (side // scale) ** 2
        d_in = int(vc.hidden_size) * scale * scale
        proj = mlp_projector_flops(tiles * tokens_out, d_in, int(config.text_config.hidden_size))
        return float(enc), float(proj)
