"""vLLM's LLaVA-NeXT (llava-v1.6) with a vlmprune pre-LLM method: used only when ``additional_config`` asks for it.

The HF path (``vlmprune.apply``, ``adapters/llava_next.py``) makes one group per crop, base view
first, over the full crop grid; each image is packed the stock way ("unpad": base-view tokens, then
the crops stitched into one grid, cropped back to the image's aspect ratio, an ``image_newline``
token closing each row). Grid tokens the unpadding removes are in no sequence column (-1), and the
newline tokens belong to no group, so they are always kept. The plugin rebuilds exactly that:

* :func:`packed_layout` runs vLLM's own packing (``_merge_image_patch_embeddings``) on an index
  tensor, so each packed row is known as (crop, token) or a newline, for any image size and
  pinpoints;
* :func:`reduce_packed` makes the same groups from it (one per crop, columns -1 where unpadding
  removed a token), calls the method's ``reduce`` per crop with the seam's seeds and builds the rows
  with the seam's ``apply_reductions``, returning the kept rows in the packed order;
* :class:`PrunedLlavaNextProcessingInfo` gives each image the count :func:`reduce_packed` returns
  for its size (run on made-up data: only methods whose count does not depend on the image's
  content are accepted, checked at start-up);
* :class:`PrunedLlavaNextForConditionalGeneration` runs vLLM's tower and projector with the
  read-only hooks of the LLaVA plugin and returns each image's kept rows.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vlmprune.adapters.base import RowProjector
from vlmprune.seams.pre_llm import PreLLMMethod, VisualGroup, apply_reductions, fill_signals

from . import settings_of
from .core import PluginConfigError, Settings, VisionSignals, group_seed, settings_from
from .llava import TOWER_NAMES, ClipTowerSignals, _geometry, check_tower

#: the AnyRes layouts served: the stock packing (``anyres=None`` or "unpad")
SERVED_ANYRES = ("unpad",)
_NEWLINE = -1
#: made-up images a method's count is checked on at start-up, each with its scores as drawn, raised
#: and lowered on the tokens the unpadding removes (a count that changes between them depends on
#: the image's content, which vLLM cannot know when it reserves placeholders)
_PROBES = 3


def packed_layout(hf_config: Any, image_size: tuple[int, int]) -> tuple[Tensor, int]:
    """(L,) long: what each row of an image's packed sequence holds (``crop * n + token``, or -1 for
    an ``image_newline`` row), and the image's crop count (base view included). Computed by vLLM's
    own ``_merge_image_patch_embeddings`` (stitching, unpadding, newlines) on index rows."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    vc = hf_config.vision_config
    side = int(vc.image_size) // int(vc.patch_size)
    n = side * side
    h, w = (int(v) for v in image_size)
    rows, cols = get_anyres_image_grid_shape((h, w), hf_config.image_grid_pinpoints, int(vc.image_size))
    crops = 1 + int(rows) * int(cols)
    index = torch.arange(crops * n, dtype=torch.float64).view(crops, n, 1)
    fake = SimpleNamespace(config=hf_config, image_newline=torch.full((1,), float(_NEWLINE), dtype=torch.float64))
    packed = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
        fake, torch.tensor([h, w]), index, strategy="spatial_unpad"
    )
    return packed.squeeze(-1).round().long(), crops


def crop_groups(layout: Tensor, crops: int, grid: tuple[int, int]) -> list[VisualGroup]:
    """One group per crop (base view first) over its full grid: ``columns[j]`` is the packed row of
    the crop's token ``j``, or -1 where the unpadding removed it (as the HF adapter's ``_crop_groups``)."""
    n = grid[0] * grid[1]
    colmap = torch.full((crops * n,), -1, dtype=torch.long)
    present = layout >= 0
    colmap[layout[present]] = torch.nonzero(present).squeeze(1)
    colmap = colmap.view(crops, n)
    return [VisualGroup(sample=0, columns=colmap[c].clone(), grid=grid, kind="image" if c == 0 else "crop")
            for c in range(crops)]


def reduce_packed(method: PreLLMMethod, packed: Tensor, layout: Tensor, crops: int, grid: tuple[int, int],
                  scores: Tensor | None = None, signals: VisionSignals | None = None) -> Tensor:
    """The LLM-input rows one image keeps, in the packed order (kept crop tokens and every newline).

    ``packed`` (L, D): the image's stock packed embeddings; ``layout`` from :func:`packed_layout`;
    ``scores`` (crops, n) and ``signals`` (vision (crops, n, C), vision_cls (crops, C), keys
    (crops, n, d)) per crop when the method asked for them. Crop ``c`` draws as the prompt's group
    ``c`` (an image draws as its prompt's first image, see :func:`~.core.group_seed`)."""
    groups = crop_groups(layout, crops, grid)
    if packed.shape[0] != layout.numel():
        raise RuntimeError(f"vlmprune (vLLM plugin): {packed.shape[0]} packed rows for a layout of {layout.numel()}")
    embeds = packed.unsqueeze(0)
    needs = set(getattr(method, "needs", ()))
    if "features" in needs:
        fill_signals(groups, {"features"}, embeds, torch.ones(1, packed.shape[0], dtype=torch.bool), None)
    for c, group in enumerate(groups):
        if scores is not None:
            group.scores = scores[c]
        if "vision" in needs:
            if signals is None or signals.vision is None:
                raise ValueError(f"vlmprune: {method.config.method!r} needs the feature layer's rows")
            group.vision = signals.vision[c]
            group.vision_cls = None if signals.vision_cls is None else signals.vision_cls[c]
            group.project = signals.project
        if "keys" in needs:
            if signals is None or signals.keys is None:
                raise ValueError(f"vlmprune: {method.config.method!r} needs the scoring layer's keys")
            group.keys = signals.keys[c]
    reductions = [method.reduce(group, group_seed(method, c)) for c, group in enumerate(groups)]
    keep, out = apply_reductions(embeds, groups, reductions)
    return out[0][keep[0]]


def made_up_count(method: PreLLMMethod, hf_config: Any, image_size: tuple[int, int], seed: int = 0,
                  cls_row: bool = True, bias: float = 0.0) -> int:
    """Rows :func:`reduce_packed` keeps for an image of ``image_size`` (h, w), on made-up signals.
    ``bias``: added to the scores of the crop tokens the unpadding removes (a made-up image whose
    important content lies in the padding, or, negative, outside it)."""
    layout, crops = packed_layout(hf_config, image_size)
    grid = _geometry(hf_config)[0]
    n = grid[0] * grid[1]
    width = int(hf_config.text_config.hidden_size)
    g = torch.Generator().manual_seed(seed)
    packed = torch.randn(layout.numel(), width, generator=g)
    scores = None
    if method.needs_scores:
        absent = torch.stack([group.columns < 0 for group in crop_groups(layout, crops, grid)])
        scores = torch.rand(crops, n, generator=g) + bias * absent.float()
    weight = torch.randn(width, width, generator=g)
    signals = VisionSignals(torch.randn(crops, n, width, generator=g),
                            torch.randn(crops, width, generator=g) if cls_row else None,
                            torch.randn(crops, n, width, generator=g), lambda rows, w=weight: rows @ w)
    return int(reduce_packed(method, packed, layout, crops, grid, scores, signals).shape[0])


def _cls_row(hf_config: Any) -> bool:
    return _geometry(hf_config)[2] == "cls" and hf_config.vision_feature_select_strategy == "default"


def _probe_size(hf_config: Any) -> tuple[int, int] | None:
    """An image size whose packing unpads some crop tokens away (None if none is found)."""
    side = int(hf_config.vision_config.image_size)
    for h, w in [(side, 3 * side // 2 + 1), (3 * side // 2 + 1, side), (side, 5 * side // 2), (2 * side, side // 2)]:
        layout, crops = packed_layout(hf_config, (h, w))
        n = (side // int(hf_config.vision_config.patch_size)) ** 2
        if int((layout >= 0).sum()) < crops * n:
            return h, w
    return None


def check_next_config(settings: Settings, hf_config: Any) -> PreLLMMethod:
    """Start-up checks for a LLaVA-NeXT checkpoint; returns the configured method."""
    layout = dict(settings.options).get("anyres")
    if layout == "spatial":
        raise PluginConfigError(
            "vlmprune (vLLM plugin): anyres='spatial' (the LLaVA reference code's layout: no unpadding, no newline "
            "tokens, crop tokens the stock packing drops made from the tower's rows) is not served in vLLM; the "
            "plugin serves the stock 'unpad' layout (leave anyres unset)"
        )
    strategy = hf_config.vision_feature_select_strategy
    if strategy != "default":
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): LLaVA-NeXT with vision_feature_select_strategy={strategy!r}: vLLM's and "
            "transformers' AnyRes packing need the 'default' strategy (no [CLS] row per crop)"
        )
    method = check_tower(settings, hf_config, anyres=SERVED_ANYRES)
    probe = _probe_size(hf_config)
    if probe is not None:
        counts = {made_up_count(method, hf_config, probe, seed, _cls_row(hf_config), bias)
                  for seed in range(_PROBES) for bias in (0.0, 1.0, -1.0)}
        if len(counts) != 1:
            raise PluginConfigError(
                f"vlmprune (vLLM plugin): {settings.method!r} with {dict(settings.options)} cannot run on LLaVA-NeXT "
                "in vLLM: in the stock 'unpad' layout it chooses tokens over each crop's full grid and the crop "
                "tokens the unpadding removes are then dropped, so how many tokens an image keeps depends on "
                f"what the image shows ({' or '.join(map(str, sorted(counts)))} for a {probe[0]} x {probe[1]} image), "
                "while vLLM fixes each image's placeholder count before encoding it. Methods whose count the "
                "image's size fixes run (random, pool, divprune; any method at ratio 0)"
            )
    return method


class PrunedLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """Placeholder tokens per image: the HF path's kept count for the image's size when configured."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        settings = settings_of(self.ctx.model_config)
        if settings is None:
            return full
        hf_config = self.get_hf_config()
        method = self.__dict__.get("_vlmprune_method")
        if method is None:
            method = self._vlmprune_method = check_next_config(settings, hf_config)
            self._vlmprune_counts: dict[tuple[int, int], int] = {}
        key = (int(image_height), int(image_width))
        if key not in self._vlmprune_counts:
            layout, _ = packed_layout(hf_config, key)
            if layout.numel() != full:
                raise RuntimeError(
                    f"vlmprune (vLLM plugin): {layout.numel()} packed rows for a {key[0]} x {key[1]} image, vLLM "
                    f"counts {full}"
                )
            self._vlmprune_counts[key] = made_up_count(method, hf_config, key, 0, _cls_row(hf_config))
        return self._vlmprune_counts[key]


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=PrunedLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaNextForConditionalGeneration(ClipTowerSignals, LlavaNextForConditionalGeneration):
    """``embed_multimodal`` returns the kept rows of each image (stock when not configured)."""

    hf_to_vllm_mapper = LlavaNextForConditionalGeneration.hf_to_vllm_mapper | TOWER_NAMES

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vlmprune: Any = None
        settings = settings_from(vllm_config.additional_config)
        if settings is None:
            return
        self._vlmprune = check_next_config(settings, self.config)
        self._vlmprune_grid, _, _, index = _geometry(self.config)
        self._vlmprune_hooks(index)
        self._vlmprune_cls_row = _cls_row(self.config)

    def embed_multimodal(self, **kwargs: object) -> Any:
        image_input, stock = self._vlmprune_pixels(kwargs)
        if image_input is None:
            return stock
        method = self._vlmprune
        patch_embeddings, qkv, full = self._vlmprune_encode(lambda: self._process_image_pixels(image_input))
        sizes = image_input.get("image_sizes")
        if sizes is None:
            raise ValueError("vlmprune (vLLM plugin): LLaVA-NeXT images need their image_sizes")
        n = self._vlmprune_grid[0] * self._vlmprune_grid[1]
        scores = self._vlmprune_scores(qkv) if method.needs_scores else None
        keys = self._vlmprune_keys(qkv, n) if "keys" in method.needs else None
        project = RowProjector(self.multi_modal_projector) if full is not None else None
        out, offset = [], 0
        for i, crops_in in enumerate(patch_embeddings):  # the tower ran on every image's crops, in order
            size = tuple(int(v) for v in sizes[i].tolist())
            layout, crops = packed_layout(self.config, size)
            packed = self._merge_image_patch_embeddings(sizes[i], crops_in, strategy="spatial_unpad")
            part = slice(offset, offset + crops)
            signals = VisionSignals(
                None if full is None else full[part, full.shape[1] - n:],
                full[part, 0] if (full is not None and self._vlmprune_cls_row) else None,
                None if keys is None else keys[part], project,
            )
            out.append(reduce_packed(method, packed, layout, crops, self._vlmprune_grid,
                                     None if scores is None else scores[part], signals))
            offset += int(crops_in.shape[0])
        return out
