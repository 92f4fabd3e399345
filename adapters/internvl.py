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
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmprune import context
from vlmprune.flops import as_pair, call_option, mlp_projector_flops, vit_flops
from vlmprune.scoring import cls_attention_scores
from vlmprune.seams.encoder import EmittedLayout, encoder_layers, feature_layer_index
from vlmprune.seams.pre_llm import VisualGroup

from .base import (
    Adapter,
    ResizedImage,
    RowProjector,
    check_vision_signals,
    distribute_signals,
    head_mean,
    interpolation_flops,
    signal_carrier,
)


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

    # -- vision-side signals ----------------------------------------------------------------------
    _SHUFFLED_KEY = "internvl.projector_in"  # (tiles, tokens, 4C) what the projector receives per call
    _KEYS_KEY = "internvl.keys"  # (tiles, 1 + N, head_dim) head-mean keys of the feature layer per call

    def install_signals(self, hooks: Any, needs: frozenset[str], handle: Any) -> None:
        """Read-only hooks: "vision" records the projector's input (the pixel-shuffled rows: each
        token's 2x2 patches side by side); "keys" records the keys of the feature layer's attention
        (after its optional qk-norm, as the attention uses them) averaged over heads."""
        check_vision_signals(self, needs)
        heads = int(self.config.vision_config.num_attention_heads)

        def on_projector(module: nn.Module, args: tuple) -> None:
            ctx = context.current(handle)
            if ctx is not None and ctx.owner is handle:
                ctx.capture(self._SHUFFLED_KEY, args[0].detach())

        def on_keys(module: nn.Module, args: tuple, output: Tensor) -> None:
            ctx = context.current(handle)
            if ctx is not None and ctx.owner is handle:
                ctx.capture(self._KEYS_KEY, head_mean(output.detach(), heads))

        if "vision" in needs:
            hooks.forward_pre(self.inner.multi_modal_projector, on_projector)
        if "keys" in needs:
            block = self._block_for(self.config.vision_feature_layer)
            hooks.forward(encoder_layers(self.vision_tower)[block].attention.k_norm, on_keys)

    def vision_signals(self, ctx: context.CallContext, groups: list[VisualGroup], needs: frozenset[str]) -> None:
        """Per tile, per LLM token: "vision", the pixel-shuffled row the projector receives (with the
        projector as ``project``); "keys", the head-mean keys of its 2x2 patches averaged, grouped as
        ``pixel_shuffle`` groups them ([CLS] dropped). ``vision_cls`` stays None: InternViT's [CLS] row
        is scored with but is one patch wide, not a row the projector takes."""
        check_vision_signals(self, needs)
        parts, values = [], []
        for name, key in (("vision", self._SHUFFLED_KEY), ("keys", self._KEYS_KEY)):
            if name not in needs:
                continue
            found = ctx.captured.get(key)
            if not found:
                raise ValueError("vlmprune: the vision tower ran without the vision-signal hooks firing")
            rows = torch.cat(found, dim=0)
            if name == "keys":
                patches = rows[:, 1:]
                side = math.isqrt(patches.shape[1])
                rows = patches[:, self.merge_members(side).to(patches.device)].mean(dim=2)
            values.append(rows)
            parts.append((name, int(rows.shape[-1]), rows.dtype))
        carried = self._grouped(ctx, ctx.visual, None, signal_carrier(values, rows=False))
        project = RowProjector(self.inner.multi_modal_projector) if "vision" in needs else None
        distribute_signals(groups, carried, parts, None, project)

    # -- groups ----------------------------------------------------------------------------------
    def visual_groups(self, ctx: context.CallContext, visual: Tensor, scores: str | None) -> list[VisualGroup]:
        """One group per tile, in the order the stock model scatters tile features into the prompt."""
        return self._grouped(ctx, visual, scores, None)

    def _grouped(
        self, ctx: context.CallContext, visual: Tensor, scores: str | None, rows: Tensor | None
    ) -> list[VisualGroup]:
        """The groups; with ``rows`` ((tiles, tokens, c) in LLM token order) each tile's rows as scores."""
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
        tile_scores = rows if rows is not None else (
            self.merged_scores(self.captured_scores(ctx)) if scores else None)
        if tile_scores is not None and tuple(tile_scores.shape[:2]) != (num_tiles, per_tile):
            raise ValueError(
                f"vlmprune: {num_tiles} tiles of {per_tile} tokens in the prompt but the vision tower "
                f"gave {tuple(tile_scores.shape[:2])}"
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

    # -- smaller images: fewer tiles -----------------------------------------------------------------
    _RESIZED_KEY = "internvl.resized"  # the ResizedImage list of each get_image_features call

    def image_tile_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        """Tiles of each image of a call, images in prompt order over the batch: an image is one run of
        consecutive image-context tokens (the processor wraps each image's tiles, and each video frame,
        in <img> ... </img>), ``tokens per tile`` of them per tile."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            raise ValueError("vlmprune: InternVL image tokens without pixel_values to locate their tiles")
        token = int(self.config.image_token_id)
        ids = inputs.get("input_ids")
        if ids is not None:
            mask = ids == token
        else:
            embeds = inputs["inputs_embeds"]
            ref = self.inner.get_input_embeddings()(torch.tensor(token, device=embeds.device)).to(embeds.dtype)
            mask = (embeds == ref).all(-1)
        rows, cols = self.merged_grid(self.patch_side(pixel_values))
        per_tile = rows * cols
        counts = []
        for row in mask.long().cpu():
            edges = torch.diff(torch.cat([row.new_zeros(1), row, row.new_zeros(1)]))
            starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
            for length in (ends - starts).tolist():
                if length % per_tile:
                    raise ValueError(f"vlmprune: an image of {length} tokens is not whole tiles of {per_tile}")
                counts.append(length // per_tile)
        if sum(counts) != int(pixel_values.shape[0]):
            raise ValueError(
                f"vlmprune: the prompt's images hold {sum(counts)} tiles but pixel_values has {pixel_values.shape[0]}"
            )
        return counts

    @staticmethod
    def assemble_tiles(crops: Tensor, columns: int, rows: int) -> Tensor:
        """(C, rows * T, columns * T): the canvas of ``rows x columns`` crops (T x T, row-major)."""
        _, c, t, _ = crops.shape
        return crops.reshape(rows, columns, c, t, t).permute(2, 0, 3, 1, 4).reshape(c, rows * t, columns * t)

    @staticmethod
    def cut_tiles(canvas: Tensor, side: int) -> Tensor:
        """(rows * columns, C, side, side): a canvas cut into tiles row-major, as the processor cuts."""
        c, height, width = canvas.shape
        rows, columns = height // side, width // side
        return canvas.reshape(c, rows, side, columns, side).permute(1, 3, 0, 2, 4).reshape(rows * columns, c, side, side)

    @staticmethod
    def tile_canvas(columns: int, rows: int, max_tiles: int) -> tuple[int, int]:
        """The processor's grid (columns, rows) of at most ``max_tiles`` tiles for an image shaped like
        a ``columns x rows`` canvas: the closest aspect (width / height); on a tie, the grid with more
        tiles while the image covers more than half of it (transformers' ``get_optimal_tiled_canvas``)."""
        grids = sorted(((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles),
                       key=lambda g: g[0] * g[1])
        aspect, area = columns / rows, columns * rows
        best, best_diff = (1, 1), float("inf")
        for a, b in grids:
            diff = abs(aspect - a / b)
            if diff < best_diff:
                best, best_diff = (a, b), diff
            elif diff == best_diff and area > 0.5 * a * b:
                best = (a, b)
        return best

    def tile_grid(self, tiles: Tensor, resample: str = "bicubic") -> tuple[int, int, float]:
        """(columns, rows) of one image's crops ``tiles[:-1]`` (its thumbnail last), and the FLOPs of
        finding it. The inputs do not record the grid; the processor resizes the same image to the
        crops' canvas and to the thumbnail, so of the grids with that many crops, the one whose canvas
        shrunk to one tile is closest (mean squared error) to the thumbnail is taken (the squarest first
        on a tie)."""
        crops, thumb = tiles[:-1].float(), tiles[-1].float()
        n, c, side, _ = crops.shape
        candidates = sorted(((a, n // a) for a in range(1, n + 1) if n % a == 0),
                            key=lambda g: (abs(math.log(g[0] / g[1])), -g[0]))
        best, cost = (float("inf"), 1, n), 0.0
        for columns, rows in candidates:
            canvas = self.assemble_tiles(crops, columns, rows)
            small = F.interpolate(canvas[None], size=(side, side), mode=resample, align_corners=False, antialias=True)
            error = float((small[0] - thumb).pow(2).mean())
            cost += interpolation_flops(c, (rows * side, columns * side), (side, side), resample) + 3.0 * thumb.numel()
            if error < best[0]:
                best = (error, columns, rows)
        return best[1], best[2], cost

    def _fewer_tiles(self, tiles: Tensor, budget: Callable[[int], int], resample: str,
                     per_tile: int) -> tuple[Tensor, str, float]:
        """One image's tiles for ``budget(tiles * per_tile)`` tokens: the most tiles that fit (at least
        one). The crops' canvas is resized to the grid the processor picks for that many crops (the
        thumbnail, unchanged, after them); with room for fewer than two crops, the thumbnail alone (what
        the processor gives an image allowed one tile)."""
        n = int(tiles.shape[0])
        allowed = max(1, int(budget(n * per_tile)) // per_tile)
        if n == 1 or allowed >= n:
            return tiles, f"{n} tile(s)", 0.0
        columns, rows, cost = self.tile_grid(tiles, resample)
        before = f"{columns}x{rows}+thumbnail"
        if allowed - 1 < 2:
            return tiles[-1:], f"{before}->thumbnail", cost
        nc, nr = self.tile_canvas(columns, rows, allowed - 1)
        if nc * nr == 1:
            return tiles[-1:], f"{before}->thumbnail", cost
        side = int(tiles.shape[-1])
        canvas = self.assemble_tiles(tiles[:-1].float(), columns, rows)
        small = F.interpolate(canvas[None], size=(nr * side, nc * side), mode=resample, align_corners=False,
                              antialias=True)[0]
        cost += interpolation_flops(int(tiles.shape[1]), (rows * side, columns * side), (nr * side, nc * side), resample)
        out = torch.cat([self.cut_tiles(small, side).to(tiles.dtype), tiles[-1:]])
        return out, f"{before}->{nc}x{nr}+thumbnail ({resample})", cost

    def resize_image_inputs(
        self, inputs: Mapping[str, Any], budget: Callable[[int], int], resample: str = "bicubic"
    ) -> tuple[dict[str, Tensor], list[ResizedImage]]:
        """``pixel_values`` with fewer tiles per image (:meth:`_fewer_tiles`); the images are found in the
        prompt (:meth:`image_tile_counts`), so ``inputs`` holds ``input_ids`` (or ``inputs_embeds``)."""
        pixel_values = inputs["pixel_values"]
        rows, cols = self.merged_grid(self.patch_side(pixel_values))
        per_tile = rows * cols
        chunks, items, start = [], [], 0
        for n in self.image_tile_counts(inputs):
            tiles, layout, cost = self._fewer_tiles(pixel_values[start : start + n], budget, resample, per_tile)
            start += n
            kept = int(tiles.shape[0])
            vision, projector = self.vision_flops(self.config, {**inputs, "pixel_values": tiles})
            chunks.append(tiles)
            items.append(ResizedImage(kind="tile", grid=(n, rows, cols), new_grid=(kept, rows, cols),
                                      kept=[per_tile] * kept + [0] * (n - kept), vision_flops=vision,
                                      projector_flops=projector, flops=cost, layout=layout))
        return {"pixel_values": torch.cat(chunks)}, items

    def install_image_resize(
        self, hooks: Any, handle: Any, budget: Callable[[int], int], resample: str = "bicubic"
    ) -> None:
        """Wrap the inner model's ``get_image_features`` (this instance only): in ``handle``'s calls it
        encodes each image's fewer tiles and puts their tokens in the image's first tile slots, zeros in
        the rest, so the stock placeholder scatter fills the prompt as usual."""
        original = self.inner.get_image_features

        def features(*args: Any, **kwargs: Any) -> Any:
            ctx = context.current(handle)
            if ctx is None or ctx.owner is not handle:
                return original(*args, **kwargs)
            args = list(args)
            pixel_values = args.pop(0) if args else kwargs.pop("pixel_values")
            small, items = self.resize_image_inputs({**ctx.inputs, "pixel_values": pixel_values}, budget, resample)
            out = original(small["pixel_values"], *args, **kwargs)
            feats = out.pooler_output
            full = feats.new_zeros(int(pixel_values.shape[0]), *feats.shape[1:])
            old = new = 0
            for item in items:
                kept = item.new_grid[0]
                full[old : old + kept] = feats[new : new + kept]
                old, new = old + item.grid[0], new + kept
            out.pooler_output = full
            ctx.capture(self._RESIZED_KEY, items)
            return out

        features.__doc__ = original.__doc__
        hooks.set_attr(self.inner, "get_image_features", features)

    def resized_images(self, ctx: context.CallContext) -> list[ResizedImage]:
        """The images this call encoded with fewer tiles, in prompt order."""
        return [item for call in ctx.captured.get(self._RESIZED_KEY, []) for item in call]
