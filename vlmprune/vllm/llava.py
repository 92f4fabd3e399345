"""vLLM's LLaVA-1.5 with a vlmprune pre-LLM method: used only when ``additional_config`` asks for it.

* :class:`PrunedLlavaProcessingInfo`: each image gets the method's kept count of placeholder
  tokens (for FasterVLM at ratio 0.9 on a 24 x 24 grid: 58 instead of 576).
* :class:`PrunedLlavaForConditionalGeneration`: ``embed_multimodal`` runs vLLM's own vision tower
  and projector, recomputes the [CLS] attention row of the feature layer from the q / k that
  vLLM's attention computed (:func:`vlmprune.scoring.cls_attention_scores`, or the labelled
  no-[CLS] fallback :func:`~vlmprune.scoring.mean_received_attention`), and returns the rows the
  method's ``reduce`` keeps, built by the pre-LLM seam's ``apply_reductions``.

An engine whose configuration has no ``"vlmprune"`` entry gets the stock behaviour from both
classes (they only differ when the settings are present).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from vlmprune.adapters.base import RowProjector, head_mean
from vlmprune.adapters.llava import tower_has_cls
from vlmprune.scoring import cls_attention_scores, mean_received_attention
from vlmprune.seams.encoder import feature_layer_index
from vlmprune.seams.pre_llm import PreLLMMethod

from . import settings_of
from .core import (
    PluginConfigError,
    Settings,
    VisionSignals,
    build_method,
    kept_count,
    reduce_images,
    settings_from,
)

_TOWERS = ("clip_vision_model", "siglip_vision_model")


def _geometry(hf_config: Any) -> tuple[tuple[int, int], int, str, int]:
    """(grid, extra leading rows, score kind, scoring layer index) of a LLaVA config."""
    vc = hf_config.vision_config
    side = int(vc.image_size) // int(vc.patch_size)
    has_cls = tower_has_cls(vc)
    strategy = hf_config.vision_feature_select_strategy
    extra = 1 if (strategy == "full" and has_cls) else 0
    layers = int(vc.num_hidden_layers)
    kind = "cls" if has_cls else "nocls"
    index = feature_layer_index(hf_config.vision_feature_layer, layers) if has_cls else layers - 1
    return (side, side), extra, kind, index


def check_tower(settings: Settings, hf_config: Any, anyres: tuple[str, ...] = ()) -> PreLLMMethod:
    """Start-up checks shared by the LLaVA family (tower, feature layer, the no-[CLS] fallback's
    layer); returns the configured method."""
    vc = hf_config.vision_config
    if getattr(vc, "model_type", None) not in _TOWERS:
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): LLaVA with a {getattr(vc, 'model_type', '?')!r} vision tower is not "
            f"supported; supported towers: {', '.join(_TOWERS)}"
        )
    if isinstance(hf_config.vision_feature_layer, (list, tuple)):
        raise PluginConfigError(
            "vlmprune (vLLM plugin): this model concatenates several vision feature layers "
            f"{list(hf_config.vision_feature_layer)}; the plugin supports one feature layer"
        )
    _, _, kind, index = _geometry(hf_config)
    method = build_method(settings, kind, anyres=anyres)
    if (method.needs_scores or "keys" in method.needs) and kind == "nocls":
        built = feature_layer_index(hf_config.vision_feature_layer, int(vc.num_hidden_layers)) + 1
        if index >= built:
            raise PluginConfigError(
                f"vlmprune (vLLM plugin): {settings.method!r} on a tower without [CLS] scores with the tower's "
                f"last layer (the labelled no-[CLS] fallback), which vLLM does not build for "
                f"vision_feature_layer={hf_config.vision_feature_layer}"
            )
    return method


def check_llava_config(settings: Settings, hf_config: Any) -> int:
    """Start-up checks for a LLaVA checkpoint; returns the kept count per image."""
    method = check_tower(settings, hf_config)
    grid, extra, kind, _ = _geometry(hf_config)
    cls_row = kind == "cls" and hf_config.vision_feature_select_strategy == "default"
    return kept_count(method, grid, extra, int(hf_config.text_config.hidden_size), cls_row)


#: checkpoints saved by transformers 5 name the CLIP / SigLIP tower without ``vision_model``
TOWER_NAMES = WeightsMapper(
    orig_to_new_regex={re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model."}
)


class ClipTowerSignals:
    """What the LLaVA-family plugin models share: read-only hooks on vLLM's CLIP / SigLIP tower that
    capture the scoring layer's fused q / k / v and the feature layer's rows, and the [CLS] (or
    no-[CLS]) scores and head-mean keys recomputed from them. ``self._vlmprune`` is the method."""

    _vlmprune: Any = None
    _vlmprune_captured: list[Tensor] | None = None
    _vlmprune_rows: list[Tensor] | None = None

    def _vlmprune_pixels(self, kwargs: dict) -> tuple[Any, Any]:
        """``(image_input, None)`` for a batch of pixel images this plugin prunes, else ``(None, what
        the stock model returns)``: not configured, no images, or pre-computed embeddings (whose
        placeholders already match them)."""
        if self._vlmprune is None:
            return None, super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return None, []
        if image_input["type"] != "pixel_values":
            return None, self._process_image_input(image_input)
        return image_input, None

    def _vlmprune_hooks(self, index: int) -> None:
        """Hook the scoring layer ``index`` and the last layer vLLM builds (the feature layer)."""
        needs = self._vlmprune.needs
        layers = self.vision_tower.vision_model.encoder.layers
        if self._vlmprune.needs_scores or "keys" in needs:
            self._vlmprune_attn = layers[index].self_attn
            self._vlmprune_attn.qkv_proj.register_forward_hook(self._vlmprune_capture)
        if "vision" in needs:  # the block whose output is the feature layer: vLLM builds up to it
            layers[-1].register_forward_hook(self._vlmprune_capture_rows)

    def _vlmprune_encode(self, run: Any) -> tuple[Any, Tensor | None, Tensor | None]:
        """``run()`` (the tower and projector over a batch of pixels) with the hooks recording: its
        output, the scoring layer's q / k / v (or None) and the feature layer's rows (or None)."""
        method = self._vlmprune
        self._vlmprune_captured = [] if (method.needs_scores or "keys" in method.needs) else None
        self._vlmprune_rows = [] if "vision" in method.needs else None
        try:
            out = run()
            qkv, layer_rows = self._vlmprune_captured, self._vlmprune_rows
        finally:
            self._vlmprune_captured = self._vlmprune_rows = None
        for name, found in (("scoring layer", qkv), ("feature layer", layer_rows)):
            if found is not None and len(found) != 1:
                raise RuntimeError(f"vlmprune (vLLM plugin): the {name} ran {len(found)} times for one batch")
        return out, None if qkv is None else qkv[0], None if layer_rows is None else layer_rows[0]

    # -- scoring ------------------------------------------------------------------------------------
    def _vlmprune_capture(self, module: Any, args: tuple, output: Any) -> None:
        if self._vlmprune_captured is not None:
            self._vlmprune_captured.append(output[0] if isinstance(output, tuple) else output)

    def _vlmprune_capture_rows(self, module: Any, args: tuple, output: Any) -> None:
        if self._vlmprune_rows is not None:
            self._vlmprune_rows.append(output[0] if isinstance(output, tuple) else output)

    def _vlmprune_head_sum(self, x: Tensor, heads: int) -> Tensor:
        """A mean over heads when each tensor-parallel rank holds ``heads`` of them: summed across ranks."""
        tp = int(getattr(self._vlmprune_attn, "tp_size", 1) or 1)
        if tp == 1:
            return x
        from vllm.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce(x * heads) / (heads * tp)

    def _vlmprune_keys(self, qkv: Tensor, n: int) -> Tensor:
        """(B, n, head_dim): the scoring layer's keys of the grid tokens, averaged over heads."""
        _, k, _ = qkv.chunk(3, dim=-1)
        heads = int(self._vlmprune_attn.num_heads_per_partition)
        return self._vlmprune_head_sum(head_mean(k[:, k.shape[1] - n:], heads), heads)

    def _vlmprune_scores(self, qkv: Tensor) -> Tensor:
        """(B, N) patch scores from the scoring layer's fused q / k / v projections. With tensor
        parallelism each rank holds some heads: the head average is summed across ranks."""
        attn = self._vlmprune_attn
        q, k, _ = qkv.chunk(3, dim=-1)
        heads = int(attn.num_heads_per_partition)
        if self._vlmprune.adapter.score_kind == "cls":
            scores = cls_attention_scores(q[:, 0], k, heads, attn.scale)
        else:
            scores = mean_received_attention(q, k, heads, attn.scale)
        return self._vlmprune_head_sum(scores, heads)


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """Placeholder tokens per image: the method's kept count when the engine is configured."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        settings = settings_of(self.ctx.model_config)
        if settings is None:
            return full
        kept = self.__dict__.get("_vlmprune_kept")
        if kept is None:
            kept = self._vlmprune_kept = check_llava_config(settings, self.get_hf_config())
        return kept


def _build_info(ctx: Any) -> LlavaProcessingInfo:
    from vllm.model_executor.models.llava import _build_llava_or_pixtral_hf_info

    info = _build_llava_or_pixtral_hf_info(ctx)
    return PrunedLlavaProcessingInfo(ctx) if type(info) is LlavaProcessingInfo else info


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaForConditionalGeneration(ClipTowerSignals, LlavaForConditionalGeneration):
    """``embed_multimodal`` returns the kept rows of each image (stock when not configured)."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | TOWER_NAMES

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vlmprune: Any = None
        settings = settings_from(vllm_config.additional_config)
        if settings is None:
            return
        self._vlmprune_kept = check_llava_config(settings, self.config)
        self._vlmprune_grid, _, kind, index = _geometry(self.config)
        self._vlmprune = build_method(settings, kind)
        self._vlmprune_hooks(index)
        self._vlmprune_cls_row = kind == "cls" and self.config.vision_feature_select_strategy == "default"

    # -- the multimodal embedding -------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> Any:
        image_input, stock = self._vlmprune_pixels(kwargs)
        if image_input is None:
            return stock
        method = self._vlmprune
        features, qkv, full = self._vlmprune_encode(lambda: self._process_image_pixels(image_input))
        if not isinstance(features, Tensor):
            raise ValueError("vlmprune (vLLM plugin): expected one feature tensor for the batch of images")
        embeds = self.multi_modal_projector(features)
        n = self._vlmprune_grid[0] * self._vlmprune_grid[1]
        scores = self._vlmprune_scores(qkv) if method.needs_scores else None
        signals = VisionSignals()
        if full is not None:
            signals.vision = full[:, full.shape[1] - n:]
            signals.vision_cls = full[:, 0] if self._vlmprune_cls_row else None
            signals.project = RowProjector(self.multi_modal_projector)
        if "keys" in method.needs:
            signals.keys = self._vlmprune_keys(qkv, n)
        rows = reduce_images(method, embeds, self._vlmprune_grid, scores, signals)
        if rows and rows[0].shape[0] != self._vlmprune_kept:
            raise RuntimeError(
                f"vlmprune (vLLM plugin): {rows[0].shape[0]} rows for an image with {self._vlmprune_kept} placeholders"
            )
        return torch.stack(rows) if rows else []
