"""vLLM's Qwen2-VL with a vlmprune pre-LLM method: used only when ``additional_config`` asks for it.

* :class:`PrunedQwen2VLMultiModalProcessor`: each image (each frame slot of a video) gets the method's kept count of
  placeholder tokens for its own merged grid ((h / merge) x (w / merge) tokens; FasterVLM at ratio
  0.9 keeps round(n * 0.1) of them, as ``vlmprune.apply`` does per image group).
* :class:`PrunedQwen2VLForConditionalGeneration`: ``embed_multimodal`` runs vLLM's own vision
  tower, recomputes what the method needs from it exactly as the Hugging Face adapter
  (``vlmprune.adapters.qwen2_vl``) does: the labelled no-[CLS] score (mean attention each ViT token
  receives in the last vision block, per image, from the rope-rotated q / k vLLM's attention
  computed, averaged over each merge unit), the merger's input rows ("vision", with the merger as
  the projector) and the last block's head-mean keys ("keys"). The method's ``reduce`` picks the
  rows; the pre-LLM seam's ``apply_reductions`` builds them.

Videos: each of a video's grid_t frame slots is one group, as under ``vlmprune.apply``: the
processor emits grid_t times the kept count of one slot, and ``embed_multimodal`` decides each slot
with its own signals (the scores of that frame's attention, its rows and keys).

Positions: kept tokens keep their original (t, h, w) M-RoPE grid positions (a video's t: its frame
slot's temporal position, Qwen2.5-VL's ``second_per_grid_ts`` x ``tokens_per_second`` scaling
included) and the text after an image or a video continues where it would after the full item (the Hugging Face path's default
``positions="original"``). The kept tokens are only known after the vision tower, so the plugin
reuses vLLM's own mechanism for content-dependent pruning (EVS): the model declares
``supports_multimodal_pruning``, each image embedding carries 4 extra channels (t, h, w of each
kept row relative to the image start, and the offset of the next text token), and vLLM's model
runner calls :meth:`~PrunedQwen2VLForConditionalGeneration.recompute_mrope_positions` to write
them into the request's positions. An engine without the ``"vlmprune"`` entry uses vLLM's stock
classes (the overrides are only installed when it is present).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from vllm.config.multimodal import MultiModalConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from vlmprune.adapters.base import RowProjector
from vlmprune.adapters.qwen2_vl import frame_received_attention
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

#: channels appended to each image embedding row for vLLM's position recomputation
POSITION_CHANNELS = 4


class PruningMultiModalConfig(MultiModalConfig):
    """The engine's multimodal config when the plugin prunes a Qwen model: it tells vLLM's model
    runner that the model prunes its multimodal embeddings (so it recomputes M-RoPE positions from
    them), without enabling vLLM's own video pruning (``video_pruning_rate`` stays unset)."""

    def is_multimodal_pruning_enabled(self) -> bool:
        return True


def enable_position_recompute(model_config: Any) -> None:
    """Mark a configured engine's multimodal config (see :class:`PruningMultiModalConfig`)."""
    mm = getattr(model_config, "multimodal_config", None)
    if mm is None:
        raise PluginConfigError("vlmprune (vLLM plugin): this Qwen2-VL engine has no multimodal config")
    rate = getattr(mm, "video_pruning_rate", None)
    if rate is not None and rate > 0:
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): video_pruning_rate={rate} asks for vLLM's own video pruning (EVS) on top of "
            "the plugin's method; the plugin prunes videos itself (one group per frame slot): leave "
            "video_pruning_rate unset"
        )
    if type(mm) is MultiModalConfig:
        mm.__class__ = PruningMultiModalConfig
    elif not isinstance(mm, PruningMultiModalConfig):
        raise PluginConfigError(f"vlmprune (vLLM plugin): an unexpected multimodal config {type(mm).__name__}")


def _text_width(hf_config: Any) -> int:
    text = getattr(hf_config, "text_config", None)
    return int(getattr(text, "hidden_size", None) or hf_config.hidden_size)


def check_qwen2_vl_config(settings: Settings, hf_config: Any) -> PreLLMMethod:
    """Start-up checks for a Qwen2-VL checkpoint; returns the method (no [CLS]: the labelled fallback
    score, kept tokens at their original M-RoPE positions)."""
    vc = hf_config.vision_config
    if int(getattr(vc, "spatial_merge_size", 0) or 0) < 1:
        raise PluginConfigError("vlmprune (vLLM plugin): a Qwen2-VL vision config without spatial_merge_size")
    method = build_method(settings, "nocls", positions="original")
    kept_count(method, (2, 2), 0, 8, cls_row=False)  # a count that depends on the image: refused here
    return method


class KeptCounts:
    """Placeholder tokens per image, by merged grid (h / merge, w / merge): the rows the method keeps."""

    def __init__(self, method: PreLLMMethod, width: int) -> None:
        self.method, self.width, self._memo = method, width, {}

    def __call__(self, grid: tuple[int, int]) -> int:
        if grid not in self._memo:
            self._memo[grid] = kept_count(self.method, grid, 0, self.width, cls_row=False)
        return self._memo[grid]


def _counts_of(info: Qwen2VLProcessingInfo) -> KeptCounts | None:
    """The kept counts of a configured engine (None: this engine runs unpruned)."""
    settings = settings_of(info.ctx.model_config)
    if settings is None:
        return None
    counts = info.__dict__.get("_vlmprune_counts")
    if counts is None:
        hf_config = info.get_hf_config()
        counts = info._vlmprune_counts = KeptCounts(check_qwen2_vl_config(settings, hf_config), _text_width(hf_config))
    return counts


class _PrunedPromptUpdates:
    """Each image's placeholder run is the kept count (stock when the engine is not configured)."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Sequence[Any]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        counts = _counts_of(self.info)
        if counts is None:
            return updates
        merge = int(self.info.get_hf_config().vision_config.spatial_merge_size)

        def kept(item_idx: int, full: Any, modality: str) -> list[int]:
            """An image's kept count; a video's: the kept count of each of its grid_t frame slots."""
            t, h, w = (int(x) for x in out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data)
            return list(full(item_idx))[: t * counts((h // merge, w // merge))]

        out = []
        for update in updates:
            if update.modality in ("image", "video"):
                out.append(PromptReplacement(modality=update.modality, target=update.target,
                                             replacement=lambda i, f=update.replacement, m=update.modality:
                                             kept(i, f, m)))
            else:
                out.append(update)
        return out


class PrunedQwen2VLMultiModalProcessor(_PrunedPromptUpdates, Qwen2VLMultiModalProcessor):
    pass


class PrunedQwen2_5_VLMultiModalProcessor(_PrunedPromptUpdates, Qwen2_5_VLMultiModalProcessor):
    pass


class _PrunedQwen:
    """``embed_multimodal`` returns each image's kept rows with their grid positions (configured only).
    Shared by Qwen2-VL and Qwen2.5-VL: the latter runs its ViT in window order, so the captured rows
    and scores are put back in raster order with the tower's own ``reverse_indices``."""

    #: vLLM's model runner recomputes M-RoPE positions from the embeddings (only when the engine's
    #: multimodal config enables it: the plugin does so for a configured engine)
    supports_multimodal_pruning = True

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self._vlmprune: PreLLMMethod | None = None
        self._vlmprune_cap: dict[str, list] | None = None
        settings = settings_from(vllm_config.additional_config)
        if settings is None:
            return
        self._vlmprune = method = check_qwen2_vl_config(settings, self.config)
        attn = self.visual.blocks[-1].attn
        if int(getattr(attn, "tp_size", 1) or 1) != 1 and (method.needs_scores or "keys" in method.needs):
            raise PluginConfigError(
                "vlmprune (vLLM plugin): Qwen2-VL scores need every head of the last vision block in one "
                "process; run the vision tower without tensor parallelism (mm_encoder_tp_mode='data')"
            )
        self._vlmprune_heads = int(attn.num_attention_heads_per_partition)
        self._vlmprune_scale = float(attn.hidden_size_per_attention_head) ** -0.5
        if method.needs_scores or "keys" in method.needs:
            attn.register_forward_pre_hook(self._vlmprune_on_attn, with_kwargs=True)
            attn.apply_rotary_emb.register_forward_hook(self._vlmprune_on_rope)
        if "vision" in method.needs:
            # the merger's first step: Qwen2.5-VL's merger is a compiled module whose own hooks never fire
            self.visual.merger.ln_q.register_forward_pre_hook(self._vlmprune_on_merger)

    # -- captures during the vision tower ---------------------------------------------------------
    def _vlmprune_on_attn(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self._vlmprune_cap is not None:
            self._vlmprune_cap["cu"].append(kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None))

    def _vlmprune_on_rope(self, module: Any, args: tuple, output: Tensor) -> None:
        if self._vlmprune_cap is not None:  # (2 * b, s, heads, d): the rotated q then k, b = 1
            self._vlmprune_cap["qk"].append(output.detach())

    def _vlmprune_on_merger(self, module: Any, args: tuple) -> None:
        if self._vlmprune_cap is not None:
            self._vlmprune_cap["merger"].append(args[0].detach())

    # -- the multimodal embedding -----------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> Any:
        if self._vlmprune is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        modalities = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[Tensor, ...] = ()
        for name, item in modalities.items():
            if item is None:
                continue
            if name in ("image", "images"):
                out += self._vlmprune_media(item, "image")
            elif name in ("video", "videos"):
                out += self._vlmprune_media(item, "video")
            else:
                raise ValueError(f"vlmprune (vLLM plugin): unsupported modality {name!r}")
        return out

    def _vlmprune_raster(self, merged: Tensor, grids: list[tuple[int, int, int]]) -> Tensor:
        """Rows per merged token in the ViT's order -> the order the tower's output reaches the LLM."""
        if not isinstance(self, Qwen2_5_VLForConditionalGeneration):
            return merged
        reverse = self.visual.prepare_encoder_metadata([list(g) for g in grids])["reverse_indices"]
        return merged[reverse.to(merged.device)]

    def _vlmprune_times(self, t: int, seconds: Any) -> Tensor:
        """(t,) the temporal M-RoPE position of each frame slot of a video, from the video's start, as
        transformers' ``get_rope_index`` numbers them: Qwen2-VL 0, 1, 2, ...; Qwen2.5-VL
        ``(arange(t) * tokens_per_second * second_per_grid_t).long()`` (1 s per slot when the
        processor gave no ``second_per_grid_ts``), with the same float arithmetic."""
        if not isinstance(self, Qwen2_5_VLForConditionalGeneration):
            return torch.arange(t)
        tokens_per_second = self.config.vision_config.tokens_per_second
        if seconds is None:
            seconds = 1
        elif isinstance(seconds, Tensor):
            seconds = seconds.detach().cpu().reshape(())
        return (torch.arange(t) * (tokens_per_second * seconds)).long()

    def _vlmprune_media(self, media: Any, kind: str) -> tuple[Tensor, ...]:
        """Each image's / video's kept rows with their 4 position channels. A video is one group per
        frame slot (its grid_t slices of merged tokens), each decided with that slot's own signals."""
        if media["type"] not in ("pixel_values", "pixel_values_videos"):
            raise ValueError(f"vlmprune (vLLM plugin): precomputed {kind} embeddings cannot be pruned "
                             "(the method needs the vision tower's signals)")
        method = self._vlmprune
        grids = [tuple(int(x) for x in g) for g in media[f"{kind}_grid_thw"].tolist()]
        seconds = media.get("second_per_grid_ts") if kind == "video" else None
        if seconds is not None and not isinstance(seconds, Tensor):
            seconds = torch.as_tensor(seconds)
        if seconds is not None:
            seconds = seconds.reshape(-1)
        self._vlmprune_cap = {"cu": [], "qk": [], "merger": []}
        try:
            embeds = self._process_image_input(media) if kind == "image" else self._process_video_input(media)
            cap = self._vlmprune_cap
        finally:
            self._vlmprune_cap = None
        for key, found in cap.items():
            if len(found) > 1:
                raise RuntimeError(f"vlmprune (vLLM plugin): the vision tower's {key} ran {len(found)} times")
        m = int(self.visual.spatial_merge_size)
        unit = m * m
        sizes = [t * h * w // unit for t, h, w in grids]
        scores = keys = vision = None
        project = None
        if cap["qk"]:
            qk = cap["qk"][0]
            q, k = qk[0].reshape(qk.shape[1], -1), qk[1].reshape(qk.shape[1], -1)
            if method.needs_scores:
                frames = [h * w for t, h, w in grids for _ in range(t)]
                vit = frame_received_attention(q, k, cap["cu"][0], frames, self._vlmprune_heads, self._vlmprune_scale)
                scores = self._vlmprune_raster(vit.view(-1, unit).mean(dim=-1), grids).split(sizes)
            if "keys" in method.needs:
                head_mean = k.reshape(k.shape[0], self._vlmprune_heads, -1).mean(dim=1)
                merged = head_mean.reshape(-1, unit, head_mean.shape[-1]).mean(dim=1)
                keys = self._vlmprune_raster(merged, grids).split(sizes)
        if cap["merger"]:
            rows = cap["merger"][0]
            rows = rows.reshape(-1, rows.shape[-1])
            width = rows.shape[-1]
            vision = self._vlmprune_raster(rows.reshape(-1, unit * width), grids).split(sizes)
            project = RowProjector(self.visual.merger, unit=width)
        out = []
        for i, (emb, (t, h, w)) in enumerate(zip(embeds, grids)):
            if kind == "image" and t != 1:
                raise ValueError(f"vlmprune (vLLM plugin): an image with {t} temporal patches")
            grid = (h // m, w // m)
            n = grid[0] * grid[1]

            def frames(x: Tensor | None, t: int = t, n: int = n) -> Tensor | None:  # (t * n, ...) -> (t, n, ...)
                return None if x is None else x.reshape(t, n, *x.shape[1:])

            signals = VisionSignals(vision=frames(None if vision is None else vision[i]),
                                    keys=frames(None if keys is None else keys[i]), project=project)
            rows, keep = reduce_images(method, frames(emb), grid, frames(None if scores is None else scores[i]),
                                       signals, with_keep=True, kind=kind, groups_first=kind == "image")
            times = self._vlmprune_times(t, None if seconds is None else seconds[i]) if kind == "video" else \
                torch.zeros(1, dtype=torch.long)
            pos = torch.cat([self._vlmprune_positions(grid, keep[f], int(times[f])) for f in range(t)])
            out.append(torch.cat([torch.cat(rows), pos.to(rows[0])], dim=1))
        return tuple(out)

    @staticmethod
    def _vlmprune_positions(grid: tuple[int, int], keep: Tensor, time: int = 0) -> Tensor:
        """(kept, 4): each kept row's (t, h, w) M-RoPE position from the image's / video's start (``time``:
        its frame slot's temporal position), and the offset of the text after it: max(h, w) of the
        merged grid, where ``get_rope_index`` continues the text after an image or a video (for a
        video whatever its temporal positions reach)."""
        gh, gw = grid
        hh, ww = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        pos = torch.stack([torch.full((gh * gw,), time, dtype=torch.long), hh.flatten(), ww.flatten(),
                           torch.full((gh * gw,), max(gh, gw), dtype=torch.long)], dim=1)
        return pos[keep.cpu()]

    # -- positions --------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
        """Positions for the pruned prompt before its images are encoded: text exactly as with the full
        images, each image's placeholders provisionally numbered (the runner rewrites them with
        :meth:`recompute_mrope_positions` once the kept rows are known)."""
        if self._vlmprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)  # type: ignore[misc]
        m = int(self.config.vision_config.spatial_merge_size)
        pieces, st, nxt = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality not in ("image", "video"):
                raise ValueError(f"vlmprune (vLLM plugin): unsupported modality {feature.modality!r}")
            t, h, w = (int(x) for x in feature.data[f"{feature.modality}_grid_thw"].data.tolist())
            offset, length = int(feature.mm_position.offset), int(feature.mm_position.length)
            text = offset - st
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + nxt)
            base = nxt + text
            grid = np.indices((t, h // m, w // m)).reshape(3, -1)
            if feature.modality == "video":
                seconds = feature.data.get("second_per_grid_ts")
                times = self._vlmprune_times(t, None if seconds is None else seconds.data).numpy()
                grid[0] = np.repeat(times, (h // m) * (w // m))
            pieces.append(grid[:, :length] + base)
            nxt = base + max(h // m, w // m)
            st = offset + length
        if st < len(input_tokens):
            text = len(input_tokens) - st
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + nxt)
        positions = np.concatenate(pieces, axis=1).reshape(3, -1)
        return torch.from_numpy(np.ascontiguousarray(positions)), int(positions.max() + 1 - len(input_tokens))

    def recompute_mrope_positions(
        self, input_ids: Any, multimodal_embeddings: Sequence[Tensor], mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[Tensor], Tensor, int]:
        """vLLM's EVS position recomputation on the kept rows' grid positions (the 4 extra channels)."""
        from vllm.multimodal.video_prune.evs import recompute_mrope_positions
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed

        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = input_ids.to(device, torch.long) if isinstance(input_ids, Tensor) else \
            torch.tensor(input_ids, dtype=torch.long, device=device)
        rows = [e[:, :-POSITION_CHANNELS] for e in multimodal_embeddings]
        positions = [e[:, -POSITION_CHANNELS:].permute(1, 0).long() for e in multimodal_embeddings]
        cfg = self.config
        with gpu_sync_allowed():
            new, delta = recompute_mrope_positions(ids, positions, mrope_positions, num_computed_tokens,
                                                   cfg.vision_start_token_id, cfg.image_token_id, cfg.video_token_id)
        return rows, new, delta

    def get_encoder_cudagraph_config(self) -> Any:
        """No encoder CUDA graphs when pruning: that path would skip ``embed_multimodal``."""
        config = super().get_encoder_cudagraph_config()  # type: ignore[misc]
        if self._vlmprune is not None and dataclasses.is_dataclass(config) and hasattr(config, "modalities"):
            config = dataclasses.replace(config, modalities=[])
        return config


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2VLMultiModalProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class PrunedQwen2VLForConditionalGeneration(_PrunedQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL, pruned when the engine is configured."""

    supports_multimodal_pruning = True


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class PrunedQwen2_5_VLForConditionalGeneration(_PrunedQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL (window attention in its ViT), pruned when the engine is configured."""

    supports_multimodal_pruning = True
