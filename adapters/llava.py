"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one fixed grid of patch tokens per image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vlmprune import context
from vlmprune.flops import as_pair, call_option, mlp_projector_flops, vit_block_flops, vit_flops
from vlmprune.scoring import cls_attention_scores, mean_received_attention
from vlmprune.seams.encoder import (
    EncoderBlock,
    EncoderLayout,
    EncoderLayoutError,
    capture_projections,
    encoder_layers,
    feature_layer_index,
)
from vlmprune.seams.pre_llm import VisualGroup

from .base import Adapter, RowProjector, check_vision_signals, distribute_signals, head_mean, signal_carrier

__all__ = ["LlavaAdapter", "ClipScoringMixin", "ClipTowerMixin", "clip_encoder_layout", "encoder_layers", "feature_layer_index",
           "tower_has_cls"]

#: vision towers whose FLOPs the LLaVA family's formula covers
_VIT_TOWERS = ("clip_vision_model", "siglip_vision_model")


def tower_has_cls(vision_config: Any) -> bool:
    """CLIP-style towers prepend a [CLS] token; SigLIP towers do not."""
    return getattr(vision_config, "model_type", "") in ("clip_vision_model", "clip", "internvl_vision")


def clip_encoder_layout(adapter: Any) -> EncoderLayout:
    """CLIP / SigLIP blocks (pre-norm: layer_norm1, self_attn, layer_norm2, mlp), the block feeding the
    feature layer, and the LLaVA-family projector (token-wise MLP)."""
    layer_sel = adapter.config.vision_feature_layer
    if isinstance(layer_sel, (list, tuple)):
        raise EncoderLayoutError(
            f"this model concatenates the vision feature layers {list(layer_sel)}, the encoder layout has a "
            "single feature block; set one vision_feature_layer"
        )
    layers = encoder_layers(adapter.vision_tower)
    vc = adapter.config.vision_config
    try:
        blocks = [
            EncoderBlock(layer, layer.layer_norm1, layer.self_attn, layer.self_attn.k_proj, layer.layer_norm2,
                         layer.mlp, int(vc.num_attention_heads))
            for layer in layers
        ]
    except AttributeError as exc:
        raise EncoderLayoutError(
            f"the {type(layers[0]).__name__} blocks of this vision tower are not CLIP / SigLIP pre-norm blocks ({exc})"
        ) from exc
    tokens = (int(vc.image_size) // int(vc.patch_size)) ** 2
    return EncoderLayout(blocks, tower_has_cls(vc), feature_layer_index(layer_sel, len(layers)),
                         adapter.inner.multi_modal_projector, tokens)


class ClipScoringMixin:
    """[CLS]-row scoring (or the labelled no-[CLS] fallback) for CLIP / SigLIP style towers."""

    def _score_attention(self) -> nn.Module:
        layers = encoder_layers(self.vision_tower)
        if self.score_kind == "cls":
            return layers[feature_layer_index(self.config.vision_feature_layer, len(layers))].self_attn
        return layers[-1].self_attn

    def install_scoring(self, hooks: Any, kind: str, handle: Any) -> None:
        self.score_kind = "cls" if tower_has_cls(self.config.vision_config) else "nocls"
        self._scoring_attn = self._score_attention()
        capture_projections(hooks, self._scoring_attn, handle, "vision", cls_only=self.score_kind == "cls")

    def _check_feature_layer(self, ctx: context.CallContext) -> None:
        layer = ctx.inputs.get("vision_feature_layer")
        if layer is not None and layer != self.config.vision_feature_layer:
            raise ValueError(
                f"vlmprune: this call overrides vision_feature_layer={layer!r}, but scoring was installed "
                f"for the config's {self.config.vision_feature_layer!r}; set model.config.vision_feature_layer "
                "before vlmprune.apply instead"
            )

    def captured_scores(self, ctx: context.CallContext) -> Tensor:
        """(num_encoder_inputs, N) patch scores of every vision-tower call so far in this context."""
        self._check_feature_layer(ctx)
        if not ctx.captured.get("vision.q"):
            raise ValueError(
                "vlmprune: this method scores tokens inside the vision tower, so the call must pass "
                "pixel_values (not pre-computed mm_encoder_outputs / image features)"
            )
        q = torch.cat(ctx.captured.get("vision.q", []), dim=0)
        k = torch.cat(ctx.captured.get("vision.k", []), dim=0)
        attn = self._scoring_attn
        heads = self.config.vision_config.num_attention_heads
        scale = getattr(attn, "scale", None)
        if self.score_kind == "cls":
            return cls_attention_scores(q, k, heads, scale)
        return mean_received_attention(q, k, heads, scale)

    def scoring_flops(self, ctx: context.CallContext) -> float:
        """FLOPs of computing the scores: one query row (cls) or all rows of q·kᵀ (fallback)."""
        keys = ctx.captured.get("vision.k", [])
        total = 0.0
        for k in keys:
            b, n, c = k.shape
            total += 2.0 * b * n * c * (1 if self.score_kind == "cls" else n)
        return total


_FEATURES_KEY = "signals.feature_layer"  # (inputs, tokens, C) feature-layer output per tower call
_KEYS_KEY = "signals.keys"  # (inputs, tokens, head_dim) head-mean keys of the scoring layer per tower call


class ClipTowerMixin(ClipScoringMixin):
    """What the LLaVA families share about their CLIP / SigLIP tower and MLP projector: [CLS] scoring,
    the vision-side signals, the encoder layout, and the vision FLOPs."""

    def encoder_layout(self) -> EncoderLayout:
        return clip_encoder_layout(self)

    # -- vision-side signals ----------------------------------------------------------------------
    def install_signals(self, hooks: Any, needs: frozenset[str], handle: Any) -> None:
        """Read-only forward hooks: "vision" records the output of the block that produces the feature
        layer (``hidden_states[vision_feature_layer]``, [CLS] row included); "keys" records the key
        projection of the scoring attention (the feature layer's with a [CLS] token, the last layer's
        for the no-[CLS] fallback) averaged over heads. The tower keeps its attention backend."""
        check_vision_signals(self, needs)
        layer_sel = self.config.vision_feature_layer
        if isinstance(layer_sel, (list, tuple)):
            raise ValueError(
                f"vlmprune: this model concatenates the vision feature layers {list(layer_sel)}; the vision-side "
                "signals need one vision_feature_layer"
            )
        layers = encoder_layers(self.vision_tower)
        feature_block = feature_layer_index(layer_sel, len(layers))
        heads = int(self.config.vision_config.num_attention_heads)

        def on_layer(module: nn.Module, args: tuple, output: Any) -> None:
            ctx = context.current(handle)
            if ctx is not None and ctx.owner is handle:
                out = output[0] if isinstance(output, (tuple, list)) else output
                ctx.capture(_FEATURES_KEY, out.detach())

        def on_keys(module: nn.Module, args: tuple, output: Tensor) -> None:
            ctx = context.current(handle)
            if ctx is not None and ctx.owner is handle:
                ctx.capture(_KEYS_KEY, head_mean(output.detach(), heads))

        if "vision" in needs:
            hooks.forward(layers[feature_block], on_layer)
        if "keys" in needs:
            scoring = feature_block if tower_has_cls(self.config.vision_config) else len(layers) - 1
            hooks.forward(layers[scoring].self_attn.k_proj, on_keys)

    def vision_signals(self, ctx: context.CallContext, groups: list[VisualGroup], needs: frozenset[str]) -> None:
        """Per group: the feature-layer patch rows the projector receives, the crop's [CLS] row (None
        when the tower has none, or when the "full" strategy already feeds it to the LLM), the head-mean
        keys, and the projector. The rows reach the groups through the family's own grouping (crops,
        OneVision's interpolated grids and pooled frames alike), so they line up with the scores."""
        check_vision_signals(self, needs)
        self._check_feature_layer(ctx)
        vc = self.config.vision_config
        n = (int(vc.image_size) // int(vc.patch_size)) ** 2
        parts, values, cls_rows = [], [], None
        for name, key in (("vision", _FEATURES_KEY), ("keys", _KEYS_KEY)):
            if name not in needs:
                continue
            found = ctx.captured.get(key)
            if not found:
                raise ValueError(
                    "vlmprune: this method reads the vision tower's features, so the call must pass pixel_values "
                    "(not pre-computed mm_encoder_outputs / image features)"
                )
            rows = torch.cat(found, dim=0)
            if name == "vision":
                strategy = ctx.inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
                if tower_has_cls(vc) and strategy == "default":
                    cls_rows = rows[:, 0]
            values.append(rows[:, rows.shape[1] - n :])
            parts.append((name, int(rows.shape[-1]), rows.dtype))
        carried = self._grouped(ctx, ctx.visual, signal_carrier(values))
        project = RowProjector(self.inner.multi_modal_projector) if "vision" in needs else None
        distribute_signals(groups, carried, parts, cls_rows, project)

    # -- FLOPs ------------------------------------------------------------------------------------
    @classmethod
    def vision_flops(cls, config: Any, inputs: Mapping[str, Any]) -> tuple[float, float]:
        """CLIP / SigLIP tower and the 2-layer MLP projector over every image (crop, frame) the model
        encodes: ``pixel_values`` (B, 3, H, W); AnyRes families also take 5-D pixel values and videos."""
        vc = config.vision_config
        if vc.model_type not in _VIT_TOWERS:
            raise ValueError(
                f"vlmprune.flops: {config.model_type} with a {vc.model_type!r} vision tower is not supported; "
                f"supported towers: {', '.join(_VIT_TOWERS)}"
            )
        layer_sel = call_option(inputs, config, "vision_feature_layer")
        strategy = call_option(inputs, config, "vision_feature_select_strategy")
        n_feat_layers = 1 if isinstance(layer_sel, int) else len(layer_sel)
        has_cls = vc.model_type == "clip_vision_model"
        pooling_head = vc.model_type == "siglip_vision_model" and bool(getattr(vc, "vision_use_head", False))
        ph, pw = as_pair(vc.patch_size)
        d_text = int(config.text_config.hidden_size)
        d_in = int(vc.hidden_size) * n_feat_layers
        enc = proj = 0
        for count, height, width in cls._encoder_passes(config, inputs):
            n_patches = (height // ph) * (width // pw)
            enc += vit_flops(vc, n_patches, has_cls, count, pooling_head)
            n_tokens = n_patches + (1 if has_cls else 0) - (1 if strategy == "default" else 0)
            proj += mlp_projector_flops(count * n_tokens, d_in, d_text)
        return float(enc), float(proj)

    @classmethod
    def _encoder_passes(cls, config: Any, inputs: Mapping[str, Any]) -> list[tuple[int, int, int]]:
        """(tower inputs, height, width) of every group of same-size inputs the tower encodes."""
        groups: list[tuple[int, int, int]] = []
        pv = inputs.get("pixel_values")
        if pv is not None:
            if len(pv.shape) == 4:
                groups.append((pv.shape[0], pv.shape[-2], pv.shape[-1]))
            elif len(pv.shape) == 5:
                groups.append((cls._flops_crops(config, pv, inputs), pv.shape[-2], pv.shape[-1]))
            else:
                raise ValueError(f"vlmprune.flops: pixel_values of shape {tuple(pv.shape)}: expected 4 or 5 dims")
        pvv = inputs.get("pixel_values_videos")
        if pvv is not None:
            groups.append((cls._flops_frames(config, pvv), pvv.shape[-2], pvv.shape[-1]))
        return groups

    @classmethod
    def _flops_crops(cls, config: Any, pixel_values: Tensor, inputs: Mapping[str, Any]) -> int:
        """Tower inputs of 5-D ``pixel_values`` (AnyRes families)."""
        raise ValueError("vlmprune.flops: LLaVA-1.5 expects 4-D pixel_values (B, 3, H, W)")

    @classmethod
    def _flops_frames(cls, config: Any, pixel_values_videos: Tensor) -> int:
        """Tower inputs of ``pixel_values_videos`` (families that take videos)."""
        raise ValueError(f"vlmprune.flops: {config.model_type} takes no pixel_values_videos")

    @classmethod
    def vision_flops_at_lengths(
        cls, config: Any, rows: int, block_lengths: Sequence[tuple[int, int]], projector_tokens: int,
        num_blocks: int,
    ) -> tuple[float, float]:
        """The CLIP / SigLIP blocks at their (changing) lengths, and the MLP projector on the tokens it got."""
        vc = config.vision_config
        enc = vit_block_flops(vc, list(block_lengths)[:num_blocks])
        proj = mlp_projector_flops(projector_tokens, int(vc.hidden_size), int(config.text_config.hidden_size))
        return float(rows * enc), float(proj)


class LlavaAdapter(ClipTowerMixin, Adapter):
    """``LlavaForConditionalGeneration``: one fixed grid of patch tokens per image, 1-D RoPE."""

    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)

    def _grid(self) -> tuple[int, int]:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def visual_groups(self, ctx: context.CallContext, visual: Tensor, scores: str | None) -> list[VisualGroup]:
        return self._grouped(ctx, visual, self.captured_scores(ctx) if scores else None)

    def _grouped(self, ctx: context.CallContext, visual: Tensor, score: Tensor | None) -> list[VisualGroup]:
        """The groups, each with its rows of ``score`` ((images, N, ...) per tower input) as scores."""
        strategy = ctx.inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        grid = self._grid()
        n = grid[0] * grid[1]
        extra = 1 if (strategy == "full" and tower_has_cls(self.config.vision_config)) else 0
        per_image = n + extra
        total = int(visual.sum())
        chunks = self.split_columns(visual, [per_image] * (total // per_image))
        if score is not None and score.shape[0] != len(chunks):
            raise ValueError(
                f"vlmprune: {len(chunks)} images in the prompt but the vision tower encoded {score.shape[0]}"
            )
        groups = []
        for i, (sample, cols) in enumerate(chunks):
            s = score[i, score.shape[1] - n :] if score is not None else None
            groups.append(VisualGroup(sample=sample, columns=cols[extra:], grid=grid, scores=s))
        return groups
