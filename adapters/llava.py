"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one fixed grid of patch tokens per image."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlmprune import context
from vlmprune.scoring import cls_attention_scores, mean_received_attention
from vlmprune.seams.pre_llm import VisualGroup

from .base import Adapter, MergeBlock, MergeLayout, capture_projections


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a CLIP / SigLIP style vision tower."""
    for path in ("encoder.layers", "vision_model.encoder.layers", "encoder.layer"):
        obj: Any = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise TypeError(f"vlmprune: cannot find the encoder layers of vision tower {type(tower).__name__}")


def tower_has_cls(vision_config: Any) -> bool:
    """CLIP-style towers prepend a [CLS] token; SigLIP towers do not."""
    return getattr(vision_config, "model_type", "") in ("clip_vision_model", "clip", "internvl_vision")


def feature_layer_index(feature_layer: int | list[int], num_layers: int) -> int:
    """Encoder block whose output is ``hidden_states[feature_layer]`` (index 0 is the embeddings)."""
    layer = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer
    idx = num_layers + layer if layer < 0 else layer - 1
    if not 0 <= idx < num_layers:
        raise ValueError(f"vlmprune: vision feature layer {layer} has no attention block to score with")
    return idx


def clip_merge_layout(adapter: Any) -> MergeLayout:
    """CLIP / SigLIP blocks (pre-norm: layer_norm1, self_attn, layer_norm2, mlp) for token merging, the
    block feeding the feature layer, and the LLaVA-family projector."""
    layer_sel = adapter.config.vision_feature_layer
    if isinstance(layer_sel, (list, tuple)):
        raise ValueError(
            "vlmprune: DyMU needs a single vision_feature_layer (merged layers have different token sets); "
            f"this model concatenates layers {list(layer_sel)}"
        )
    layers = encoder_layers(adapter.vision_tower)
    vc = adapter.config.vision_config
    blocks = [
        MergeBlock(layer, layer.layer_norm1, layer.self_attn, layer.self_attn.k_proj, layer.layer_norm2,
                   layer.mlp, int(vc.num_attention_heads))
        for layer in layers
    ]
    return MergeLayout(blocks, tower_has_cls(vc), feature_layer_index(layer_sel, len(layers)),
                       adapter.inner.multi_modal_projector)


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

    def captured_scores(self, ctx: context.CallContext) -> Tensor:
        """(num_encoder_inputs, N) patch scores of every vision-tower call so far in this context."""
        layer = ctx.inputs.get("vision_feature_layer")
        if layer is not None and layer != self.config.vision_feature_layer:
            raise ValueError(
                f"vlmprune: this call overrides vision_feature_layer={layer!r}, but scoring was installed "
                f"for the config's {self.config.vision_feature_layer!r}; set model.config.vision_feature_layer "
                "before vlmprune.apply instead"
            )
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


class LlavaAdapter(ClipScoringMixin, Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def _grid(self) -> tuple[int, int]:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def visual_groups(self, ctx: context.CallContext, visual: Tensor, scores: str | None) -> list[VisualGroup]:
        strategy = ctx.inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        grid = self._grid()
        n = grid[0] * grid[1]
        extra = 1 if (strategy == "full" and tower_has_cls(self.config.vision_config)) else 0
        per_image = n + extra
        total = int(visual.sum())
        chunks = self.split_columns(visual, [per_image] * (total // per_image))
        score = self.captured_scores(ctx) if scores else None
        if score is not None and score.shape[0] != len(chunks):
            raise ValueError(
                f"vlmprune: {len(chunks)} images in the prompt but the vision tower encoded {score.shape[0]}"
            )
        groups = []
        for i, (sample, cols) in enumerate(chunks):
            s = score[i, score.shape[1] - n :] if score is not None else None
            groups.append(VisualGroup(sample=sample, columns=cols[extra:], grid=grid, scores=s))
        return groups

    def merge_layout(self) -> MergeLayout:
        return clip_merge_layout(self)
