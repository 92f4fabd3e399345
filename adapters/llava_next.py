"""LLaVA-NeXT and LLaVA-OneVision: AnyRes crops (base view + a grid of crops), unpadding, newlines.

Both models encode every crop of every image as one vision-tower batch, then pack each image as
its base-view tokens followed by the crops stitched into one large grid, cropped back to the
image's aspect ratio ("unpadding") with an ``image_newline`` token closing each row. OneVision
also shrinks very large stitched grids by bilinear interpolation (``vision_aspect_ratio``) and
encodes video frames, pooled 2x2 (bilinear) with one newline after each video.

Groups: one per crop, base view included, over the full crop grid (the reference code's
``anyres="unpad"`` layout), so a method keeps the same k in every crop;
crop tokens the unpadding removes get column -1. Newline tokens belong to no group and are
therefore always kept. Rather
than re-deriving the packing arithmetic, the adapter runs the model's own ``pack_image_features``
(and ``apply_pooling``) on index tensors, so the token-to-column map stays right for any grid.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from vlmprune import context
from vlmprune.flops import as_rows
from vlmprune.seams.pre_llm import VisualGroup

from .base import Adapter
from .llava import ClipTowerMixin, tower_has_cls

#: marks a newline (or any non-grid) position in packed index tensors
_NEWLINE = -1.0


def _anyres_crops(cfg: Any, image_sizes: list[list[int]], batch_num_images: Any, max_crops: int) -> int:
    """Crops the HF model keeps from 5-D pixel_values: base image + the anyres grid of the best resolution
    for each image's (height, width) (LLaVA-OneVision: just the base image when a sample has several).
    From the config alone, for FLOPs estimates without a model."""
    from transformers.image_processing_utils import select_best_resolution

    side = int(cfg.vision_config.image_size)
    if batch_num_images is None:
        patching = [True] * len(image_sizes)
    else:
        nums = [
            int(n)
            for n in (batch_num_images.tolist() if hasattr(batch_num_images, "tolist") else batch_num_images)
        ]
        patching = [n == 1 for n in nums for _ in range(n)]
    total = 0
    for (h, w), should_patch in zip(image_sizes, patching):
        if should_patch:
            bh, bw = select_best_resolution((h, w), cfg.image_grid_pinpoints)
            crops = math.ceil(bh / side) * math.ceil(bw / side) + 1
        else:
            crops = 1
        total += min(crops, max_crops)
    return total


class LlavaNextAdapter(ClipTowerMixin, Adapter):
    """``LlavaNextForConditionalGeneration``: CLIP tower with [CLS], every image AnyRes-patched.
    The encoder layout is the CLIP / SigLIP blocks, every crop an input of its own."""

    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)

    anyres_layouts = ("unpad", "spatial")

    # -- images for the vision tower --------------------------------------------------------------
    def split_images(
        self, pixel_values: Tensor, image_sizes: Any = None, batch_num_images: Any = None, **processor_outputs: Any
    ) -> list[dict[str, Tensor]]:
        """4-D ``pixel_values``: one row per image (crops given one by one). 5-D (images, crops, 3, H, W),
        the processor's AnyRes output padded to the most crops: each image's real crops, counted from
        ``image_sizes`` (and OneVision's ``batch_num_images``) exactly as the model's
        ``get_image_features`` counts them, so the padding crops are dropped."""
        if pixel_values.dim() == 4:
            return super().split_images(pixel_values)
        if pixel_values.dim() != 5:
            raise ValueError(
                f"vlmprune: {self.family} takes pixel_values (images, crops, 3, H, W) or (crops, 3, H, W); "
                f"got {tuple(pixel_values.shape)}"
            )
        if image_sizes is None:
            raise ValueError(
                "vlmprune: 5-D pixel_values (images, crops, 3, H, W) need the processor's image_sizes to tell "
                "each image's crops from the padding; pass image_sizes=... with them"
            )
        counts = self._crop_counts(image_sizes, batch_num_images)
        return [{"pixel_values": crops[:n]} for crops, n in zip(pixel_values, counts)]

    def encode_images(self, pixel_values: Tensor, **processor_outputs: Any) -> Any:
        """The tower over every crop the model encodes (5-D pixel values flattened as the model does)."""
        if pixel_values.dim() == 5:
            pixel_values = self.join_images(self.split_images(pixel_values, **processor_outputs))["pixel_values"]
        return self.vision_tower(pixel_values)

    def _crop_counts(self, image_sizes: Any, batch_num_images: Any = None) -> list[int]:
        """Crops the model encodes per image (every image AnyRes-patched)."""
        return [self._patched_crops(size) for size in image_sizes]

    # -- FLOPs ------------------------------------------------------------------------------------
    @classmethod
    def _flops_crops(cls, config: Any, pixel_values: Tensor, inputs: Mapping[str, Any]) -> int:
        """Only the crops the HF model keeps (base + AnyRes grid of the best pinpoint; OneVision: 1 crop
        per image when ``batch_num_images`` says a sample has several)."""
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError(f"vlmprune.flops: {config.model_type} with 5-D pixel_values needs image_sizes")
        return _anyres_crops(config, as_rows(sizes), inputs.get("batch_num_images"), pixel_values.shape[1])

    # -- geometry ---------------------------------------------------------------------------------
    def _modeling(self) -> Any:
        """The transformers module that defines this model, for its own AnyRes helpers."""
        return sys.modules[type(self.inner).__module__]

    def _crop_grid(self) -> tuple[int, int]:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def _extra_tokens(self, ctx: context.CallContext) -> int:
        """Feature tokens per crop ahead of the patch grid ([CLS] kept by the "full" strategy)."""
        strategy = ctx.inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        return 1 if (strategy == "full" and tower_has_cls(self.config.vision_config)) else 0

    def _patched_crops(self, image_size: Any) -> int:
        """Crops the model encodes for one AnyRes-patched image (base view included)."""
        return int(
            self._modeling().image_size_to_num_patches(
                image_size=image_size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
        )

    def _pack(self, ctx: context.CallContext, features: list[Tensor], image_sizes: Tensor, **kw: Any) -> list[Tensor]:
        """Run the model's own packing on (crops, tokens, c) tensors; newlines get ``_NEWLINE``."""
        strategy = ctx.inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        newline = torch.full(features[0].shape[-1:], _NEWLINE, dtype=features[0].dtype)
        packed, _ = self.inner.pack_image_features(
            features, image_sizes, vision_feature_select_strategy=strategy, image_newline=newline
        )
        return [p.squeeze(-1) for p in packed]

    def _crops_per_image(self, ctx: context.CallContext, image_counts: list[int]) -> list[int]:
        """Crops of each image, in the order the model encodes them; ``image_counts`` (image
        placeholder tokens per sample) lets subclasses resolve per-sample patching rules."""
        return [self._patched_crops(size) for size in ctx.inputs["image_sizes"]]

    def _image_layouts(
        self, ctx: context.CallContext, crops: list[int], feat: int, **kw: Any
    ) -> list[tuple[Tensor, bool]]:
        """Per image: the packed sequence as global feature indices (crop * feat + token, or -1
        for a newline) and whether it is exact (False where OneVision interpolated the grid)."""
        sizes = ctx.inputs["image_sizes"]
        index = [torch.arange(n * feat, dtype=torch.float64).view(n, feat, 1) for n in crops]
        return [(p, True) for p in self._pack(ctx, index, sizes, **kw)]

    # -- which columns are which --------------------------------------------------------------
    def _token_masks(self, ctx: context.CallContext, visual: Tensor) -> dict[str, Tensor]:
        """Split the visual columns into image and video placeholders (scattered separately)."""
        ids = ctx.inputs.get("input_ids")
        names = {"image": ("image_token_id", "image_token_index"), "video": ("video_token_id", "video_token_index")}
        out = {}
        for kind, attrs in names.items():
            tok = next((getattr(self.config, a) for a in attrs if getattr(self.config, a, None) is not None), None)
            if tok is None:
                continue
            if ids is not None and ids.shape[:2] == visual.shape:
                mask = ids.to(visual.device) == int(tok)
            else:
                user = ctx.inputs["inputs_embeds"]
                ref = self.inner.get_input_embeddings()(torch.tensor(int(tok), device=user.device)).to(user.dtype)
                mask = (user == ref).all(-1).to(visual.device)
            out[kind] = mask & visual
        return out

    # -- groups -------------------------------------------------------------------------------
    def _image_groups(
        self, ctx: context.CallContext, mask: Tensor, score: Tensor | None
    ) -> tuple[list[VisualGroup], int]:
        """Groups of all images of the call and the number of crops they used from ``score``."""
        if ctx.inputs.get("pixel_values") is None or not bool(mask.any()):
            return [], 0
        grid = self._crop_grid()
        n = grid[0] * grid[1]
        extra = self._extra_tokens(ctx)
        feat = n + extra
        crops = self._crops_per_image(ctx, mask.sum(1).tolist())
        layouts = self._image_layouts(ctx, crops, feat)
        chunks = self.split_columns(mask, [p.numel() for p, _ in layouts])
        if score is not None and score.shape[0] < sum(crops):
            raise ValueError(
                f"vlmprune: the images need {sum(crops)} crops but the vision tower encoded {score.shape[0]}"
            )
        groups: list[VisualGroup] = []
        offset = 0
        sizes = ctx.inputs["image_sizes"]
        for i, ((sample, cols), (packed, exact), n_crops) in enumerate(zip(chunks, layouts, crops)):
            crop_scores = score[offset : offset + n_crops, score.shape[1] - n :] if score is not None else None
            if exact:
                groups.extend(self._crop_groups(sample, cols, packed, n_crops, feat, extra, grid, crop_scores))
            else:
                groups.extend(
                    self._pooled_image_groups(ctx, sample, cols, packed, sizes[i : i + 1], feat, grid, crop_scores)
                )
            offset += n_crops
        return groups, offset

    @staticmethod
    def _crop_groups(
        sample: int,
        cols: Tensor,
        packed: Tensor,
        n_crops: int,
        feat: int,
        extra: int,
        grid: tuple[int, int],
        scores: Tensor | None,
    ) -> list[VisualGroup]:
        """One group per crop: invert the packed index map into crop token -> column (or -1)."""
        colmap = torch.full((n_crops * feat,), -1, dtype=torch.long, device=cols.device)
        present = packed >= 0
        colmap[packed[present].round().long().to(cols.device)] = cols[present.to(cols.device)]
        colmap = colmap.view(n_crops, feat)[:, extra:]
        groups = []
        for c in range(n_crops):
            kind = "image" if c == 0 else "crop"
            s = scores[c] if scores is not None else None
            groups.append(VisualGroup(sample=sample, columns=colmap[c].clone(), grid=grid, scores=s, kind=kind))
        return groups

    def _pooled_image_groups(
        self,
        ctx: context.CallContext,
        sample: int,
        cols: Tensor,
        packed: Tensor,
        image_size: Tensor,
        feat: int,
        grid: tuple[int, int],
        scores: Tensor | None,
    ) -> list[VisualGroup]:
        """Groups of an image whose stitched grid the model interpolated (OneVision only)."""
        raise RuntimeError(f"vlmprune: {type(self.inner).__name__} does not interpolate AnyRes grids")

    # -- the reference code's "spatial" layout ---------------------------------------------------
    def check_anyres(self, layout: str, positions: str) -> None:
        super().check_anyres(layout, positions)
        if layout == "spatial" and positions != "contiguous":
            raise ValueError(
                "vlmprune: anyres='spatial' numbers the kept tokens contiguously, as the reference code "
                f"does; positions={positions!r} has no meaning there (leave positions unset)"
            )

    def anyres_groups(self, layout: str, ctx: context.CallContext, groups: list[VisualGroup]) -> None:
        """In the "spatial" layout every crop token can reach the LLM (nothing is unpadded away):
        each group shows all its tokens as present, with projected features for the ones the stock
        packing drops, so methods that choose among present tokens (DivPrune, CDPruner) see them.
        The real columns are kept aside for :meth:`anyres_sequence`."""
        ctx.captured["anyres.columns"] = [g.columns for g in groups]
        for g in groups:
            absent = g.columns < 0
            if g.features is not None and bool(absent.any()):
                rows = g.project(g.vision[absent.to(g.vision.device)]).to(g.features.device, g.features.dtype)
                g.features = g.features.clone()
                g.features[absent.to(g.features.device)] = rows
            g.columns = torch.arange(g.columns.numel(), device=g.columns.device)

    def anyres_sequence(
        self, layout: str, ctx: context.CallContext, embeds: Tensor, visual: Tensor,
        groups: list[VisualGroup], reductions: list[Any],
    ) -> tuple[Tensor, Tensor]:
        """The "spatial" layout of the LLaVA reference code: per image the kept base-view tokens
        (raster order), then the kept grid-crop tokens in raster order of the stitched
        (rows x crop side) x (cols x crop side) grid; no unpadding (a crop token the stock packing
        unpads away can be kept, its embedding projected from the tower's output), no newlines.
        The tokens fill the start of the image's placeholder run and the rest is dropped, so the
        kept count must fit in the run the processor made; positions are renumbered contiguously
        by the seam, so only the order counts."""
        strategy = ctx.inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        if self._extra_tokens(ctx):
            raise ValueError(f"vlmprune: anyres='spatial' needs the 'default' feature strategy, not {strategy!r}")
        mask = self._token_masks(ctx, visual)["image"]
        keep = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        out = embeds.clone()
        if not bool(mask.any()):
            return keep, out
        h, w = self._crop_grid()
        feat = h * w
        crops = self._crops_per_image(ctx, mask.sum(1).tolist())
        spans = self.split_columns(mask, [p.numel() for p, _ in self._image_layouts(ctx, crops, feat)])
        real = ctx.captured["anyres.columns"]
        by_sample: dict[int, list[tuple[VisualGroup, Tensor, Any]]] = {}
        for group, cols, red in zip(groups, real, reductions):  # a sample's groups: its images' crops, in order
            by_sample.setdefault(group.sample, []).append((group, cols, red))
        taken: dict[int, int] = {}
        side = int(self.config.vision_config.image_size)
        for (sample, span), n_crops, size in zip(spans, crops, ctx.inputs["image_sizes"]):
            start = taken.get(sample, 0)
            members = by_sample[sample][start : start + n_crops]
            taken[sample] = start + n_crops
            grid_rows, grid_cols = self._modeling().get_anyres_image_grid_shape(
                tuple(int(v) for v in size), self.config.image_grid_pinpoints, side
            )
            if n_crops != 1 + grid_rows * grid_cols:
                raise ValueError(f"vlmprune: an image has {n_crops} crops, expected 1 + {grid_rows} x {grid_cols}")
            tokens, order = [], []
            for c, (group, cols, red) in enumerate(members):
                rows_out = self._crop_tokens(group, cols, red, embeds, out.dtype)
                a = red.anchors.to(torch.long).cpu()
                y, x = a // w, a % w
                if c == 0:
                    key = a
                else:
                    r, q = divmod(c - 1, grid_cols)
                    key = feat + (r * h + y) * (grid_cols * w) + q * w + x
                tokens.append(rows_out)
                order.append(key)
            key = torch.cat(order)
            seq = torch.cat(tokens)[torch.argsort(key, stable=True).to(embeds.device)]
            span = span.to(embeds.device)
            if seq.shape[0] > span.numel():
                raise ValueError(
                    f"vlmprune: anyres='spatial' keeps {seq.shape[0]} tokens of this image but its prompt has "
                    f"{span.numel()} image placeholders (the stock, unpadded count); raise the ratio"
                )
            keep[sample, span] = False
            keep[sample, span[: seq.shape[0]]] = True
            out[sample, span[: seq.shape[0]]] = seq
        return keep, out

    @staticmethod
    def _crop_tokens(group: VisualGroup, columns: Tensor, red: Any, embeds: Tensor, dtype: torch.dtype) -> Tensor:
        """A crop's kept tokens as LLM-input rows: the stock embedding where the crop token reaches
        the LLM, otherwise the projector applied to the tower's row; averages and built tokens
        as the method gave them."""
        if red.tokens is not None:
            return red.tokens.to(embeds.device, dtype)
        cols = columns.to(embeds.device)
        present = cols >= 0
        full = torch.empty(cols.numel(), embeds.shape[-1], dtype=dtype, device=embeds.device)
        full[present] = embeds[group.sample, cols[present]]
        if bool((~present).any()):
            if group.vision is None or group.project is None:
                raise RuntimeError("vlmprune: anyres='spatial' needs the tower's rows of every crop token")
            full[~present] = group.project(group.vision[~present.to(group.vision.device)]).to(embeds.device, dtype)
        if red.weights is not None:
            w = red.weights.to(embeds.device, torch.float32)
            w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)
            return (w @ full.float()).to(dtype)
        return full[red.anchors.to(embeds.device)]

    def visual_groups(self, ctx: context.CallContext, visual: Tensor, scores: str | None) -> list[VisualGroup]:
        """Per sample: its images' crops (base view, then grid crops, images in prompt order),
        then its video frames. Columns carry the placement; this order only fixes which group is
        a sample's i-th, which seeded methods rely on to be batch-invariant."""
        return self._grouped(ctx, visual, self.captured_scores(ctx) if scores else None)

    def _grouped(self, ctx: context.CallContext, visual: Tensor, score: Tensor | None) -> list[VisualGroup]:
        """The groups, each with its rows of ``score`` ((crops + frames, N, ...), one row per tower input,
        images first) as scores, carried through the same packing / pooling as the features."""
        masks = self._token_masks(ctx, visual)
        groups, used = self._image_groups(ctx, masks["image"], score)
        if "video" in masks:
            rest = score[used:] if score is not None else None
            groups.extend(self._video_groups(ctx, masks["video"], rest))
        # per-sample order is what matters to methods (seeded draws); keep it stable
        return sorted(groups, key=lambda g: g.sample)

    def _video_groups(self, ctx: context.CallContext, mask: Tensor, score: Tensor | None) -> list[VisualGroup]:
        return []


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """``LlavaOnevisionForConditionalGeneration``: SigLIP tower (no [CLS]: the labelled
    ``nocls`` fallback), AnyRes only for single-image samples, optional grid interpolation,
    and video frames pooled 2x2 with one newline per video."""

    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)
    anyres_layouts = ("unpad",)  # the reference "spatial" layout is LLaVA-NeXT's (OneVision interpolates)

    def _crop_counts(self, image_sizes: Any, batch_num_images: Any = None) -> list[int]:
        """Crops per image: AnyRes-patched only when its sample has one image (``batch_num_images``),
        every image patched without it, as ``get_image_features`` decides."""
        patched = [self._patched_crops(size) for size in image_sizes]
        if batch_num_images is None:
            return patched
        need = [int(k) == 1 for k in batch_num_images for _ in range(int(k))]
        return [p if nd else 1 for p, nd in zip(patched, need)]

    @classmethod
    def _flops_frames(cls, config: Any, pixel_values_videos: Tensor) -> int:
        """Every frame of every video."""
        return pixel_values_videos.shape[0] * pixel_values_videos.shape[1]

    def _aspect_ratio(self, ctx: context.CallContext) -> str:
        return ctx.inputs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio

    def _pack(self, ctx: context.CallContext, features: list[Tensor], image_sizes: Tensor, **kw: Any) -> list[Tensor]:
        newline = torch.full(features[0].shape[-1:], _NEWLINE, dtype=features[0].dtype)
        ratio = kw.get("vision_aspect_ratio") or self._aspect_ratio(ctx)
        packed, _ = self.inner.pack_image_features(
            features, image_sizes, image_newline=newline, vision_aspect_ratio=ratio
        )
        return [p.squeeze(-1) for p in packed]

    def _image_layouts(
        self, ctx: context.CallContext, crops: list[int], feat: int, **kw: Any
    ) -> list[tuple[Tensor, bool]]:
        """As LLaVA-NeXT, but an image whose stitched grid the model interpolated is not exact:
        detected by packing once more with interpolation disabled and comparing lengths."""
        real = super()._image_layouts(ctx, crops, feat)
        plain = super()._image_layouts(ctx, crops, feat, vision_aspect_ratio=f"anyres_max_{2**31 - 1}")
        return [(p, p.numel() == q.numel()) for (p, _), (q, _) in zip(real, plain)]

    def _crops_per_image(self, ctx: context.CallContext, image_counts: list[int]) -> list[int]:
        """OneVision patches an image only when its sample has exactly one (``batch_num_images``);
        without that input every image is patched. When the call's ``batch_num_images`` is not
        visible to the adapter, the per-sample placeholder counts decide between the two rules."""
        sizes = ctx.inputs["image_sizes"]
        given = ctx.inputs.get("batch_num_images")
        if given is not None:
            return self._crop_counts(sizes, given)
        return self._infer_crops(ctx, image_counts, self._crop_counts(sizes))

    def _infer_crops(self, ctx: context.CallContext, counts: list[int], patched: list[int]) -> list[int]:
        """Choose between OneVision's two patching rules by the per-sample placeholder counts;
        an error when both fit with different layouts (or none fits)."""
        h, w = self._crop_grid()
        feat = h * w + self._extra_tokens(ctx)
        lengths = [p.numel() for p, _ in super()._image_layouts(ctx, patched, feat)]  # if patched
        single = feat + 1  # an unpatched image: base view + one newline
        total = len(patched)
        plans: list[list[int]] = []

        # rule 1 (no batch_num_images): every image patched, images fill samples in order
        i, ok = 0, True
        for c in counts:
            got = 0
            while got < c and i < total:
                got += lengths[i]
                i += 1
            ok &= got == c
        if ok and i == total:
            plans.append(list(patched))

        # rule 2 (batch_num_images): one image per sample patched, several images unpatched
        def search(s: int, i: int, acc: list[int]) -> None:
            if s == len(counts):
                if i == total:
                    plans.append(list(acc))
                return
            c = counts[s]
            if c == 0:
                search(s + 1, i, acc)
                return
            if i < total and lengths[i] == c:
                search(s + 1, i + 1, acc + [patched[i]])
            k = c // single
            if k >= 2 and k * single == c and i + k <= total:
                search(s + 1, i + k, acc + [1] * k)

        search(0, 0, [])
        unique = {tuple(p) for p in plans}
        if len(unique) != 1:
            raise ValueError(
                "vlmprune: cannot tell which LLaVA-OneVision images were AnyRes-patched: "
                f"{len(unique)} layouts fit the image token counts {counts}. vlmprune infers the "
                "model's batch_num_images (and uses the config's vision_aspect_ratio) from the prompt."
            )
        return list(unique.pop())

    def _pooled_image_groups(
        self,
        ctx: context.CallContext,
        sample: int,
        cols: Tensor,
        packed: Tensor,
        image_size: Tensor,
        feat: int,
        grid: tuple[int, int],
        scores: Tensor | None,
    ) -> list[VisualGroup]:
        """The model interpolated this image's stitched grid, so grid tokens are blends of crop
        tokens: the base view stays one crop group, the interpolated grid becomes one group whose
        scores are the crop scores packed (stitched, unpadded, interpolated) exactly like the
        features, through the model's own packing."""
        cols = cols.to(packed.device)
        base_cols = cols[:feat]
        base = VisualGroup(
            sample=sample, columns=base_cols.clone(), grid=grid, scores=scores[0] if scores is not None else None
        )
        rest, rest_cols = packed[feat:], cols[feat:]
        is_token = rest != _NEWLINE  # packed on the CPU: index tensors are built there
        rows = int((~is_token).sum())
        width = int(is_token.sum()) // max(rows, 1)
        pooled_scores = None
        if scores is not None:  # (crops, N) scores, or (crops, N, c) rows of signals
            rows = scores.double() if scores.dim() == 3 else scores.double().unsqueeze(-1)
            pooled = self._pack(ctx, [rows], image_size)
            pooled_scores = pooled[0][feat:][is_token.to(pooled[0].device)].to(scores.dtype)
        group = VisualGroup(
            sample=sample, columns=rest_cols[is_token].clone(), grid=(rows, width), scores=pooled_scores, kind="crop"
        )
        return [base, group]

    def _video_groups(self, ctx: context.CallContext, mask: Tensor, score: Tensor | None) -> list[VisualGroup]:
        """One group per frame on the pooled grid; the newline after each video is in none."""
        videos = ctx.inputs.get("pixel_values_videos")
        if videos is None or not bool(mask.any()):
            return []
        n_videos, frames = videos.shape[:2]
        h, w = self._crop_grid()
        n = h * w
        per_frame = self.inner.apply_pooling(torch.zeros(1, n, 1)).shape[1]
        grid = (math.ceil(h / 2), math.ceil(w / 2))
        if grid[0] * grid[1] != per_frame:
            raise ValueError(f"vlmprune: pooled frame has {per_frame} tokens, expected a {grid} grid")
        pooled = None
        if score is not None:
            if score.shape[0] != n_videos * frames:
                raise ValueError(
                    f"vlmprune: {n_videos * frames} video frames but the vision tower encoded {score.shape[0]}"
                )
            rows = score[:, score.shape[1] - n :].float()
            if rows.dim() == 2:  # scores; (frames, N, c) rows of signals pool as they are
                pooled = self.inner.apply_pooling(rows.unsqueeze(-1)).squeeze(-1)
            else:
                pooled = self.inner.apply_pooling(rows)
        chunks = self.split_columns(mask, [frames * per_frame + 1] * n_videos)
        groups = []
        for v, (sample, cols) in enumerate(chunks):
            for f in range(frames):
                s = pooled[v * frames + f] if pooled is not None else None
                groups.append(
                    VisualGroup(
                        sample=sample,
                        columns=cols[f * per_frame : (f + 1) * per_frame].clone(),
                        grid=grid,
                        scores=s,
                        kind="frame",
                        video=v,
                    )
                )
        return groups
