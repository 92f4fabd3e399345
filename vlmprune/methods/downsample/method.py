"""Downsampling: the baseline that gives the vision encoder a smaller image (``docs/methods/downsample.md``).

Several benchmark studies of visual-token reduction found that simply feeding the encoder a
lower-resolution image, so that it emits about as many tokens as a pruning method keeps, is a
strong baseline. On a stock model with the stock processor's inputs this happens inside the call:

1. The adapter wraps the inner model's image / video feature function (this instance only). In the
   handle's calls it rebuilds each image from the processor's output, makes it smaller (the family's
   geometry: a patch grid, a tile count) for ``keep_count(N, ratio)`` of its N tokens, and runs the
   stock vision tower and projector on the smaller images, so the vision FLOPs really fall. Each
   image's features go first in its placeholder block, zeros after, so the stock scatter works.
2. This seam (the pre-LLM seam with its own reduction) keeps exactly those leading tokens of every
   image and drops the rest from embeddings, mask, positions and KV cache, like any pre-LLM method.
3. The adapter numbers the kept tokens as the stock model numbers a prompt holding the smaller image
   (Qwen's M-RoPE grid; 1-D positions are contiguous), and the record gets the FLOPs the vision
   side really ran.

The method knows no family: it asks the adapter to resize, and a family whose tower takes one fixed
image size raises a ValueError naming the families that apply.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from vlmprune.adapters.base import PooledVideo
from vlmprune.method import keep_count
from vlmprune.registry import register_method
from vlmprune.seams.pre_llm import PreLLMMethod, PreLLMSeam, Reduction, VisualGroup, apply_reductions
from vlmprune.sequence import PrunedSequence

from .config import DownsampleConfig

_POS = "downsample.positions"  # the positions the decoder received before the seam pruned
_PLACED = "downsample.placed"  # the kept columns of every smaller image, for their positions


class DownsampleSeam(PreLLMSeam):
    """The pre-LLM seam keeping, in each image's placeholder block, the tokens of its smaller version."""

    def install(self, hooks: Any) -> None:
        cfg = self.method.config
        self.adapter.install_image_resize(hooks, self.handle, self.method.budget, cfg.resample)  # refuses first
        super().install(hooks)

    def _reduce(self, ctx: Any, embeds: Tensor, visual: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        groups = self.adapter.visual_groups(ctx, visual, None)
        images = self.adapter.resized_images(ctx)
        if groups and not images:
            raise ValueError(
                "vlmprune downsample: this call's visual tokens were not encoded from its pixel inputs "
                "(precomputed encoder outputs?); the method needs pixel_values to make the images smaller"
            )
        queues: dict[str, list[VisualGroup]] = {}
        for group in groups:  # per kind, groups come in the order the images were encoded
            queues.setdefault(group.kind, []).append(group)
        chosen: dict[int, Reduction] = {}
        placed = []
        for image in images:
            queue = queues.get(image.kind, [])
            if len(queue) < len(image.kept):
                raise ValueError(f"vlmprune downsample: the prompt has fewer {image.kind} groups than were encoded")
            members, queues[image.kind] = queue[: len(image.kept)], queue[len(image.kept) :]
            columns = []
            for group, k in zip(members, image.kept):
                chosen[id(group)] = Reduction(torch.arange(k))
                columns.append(group.columns[:k])
            placed.append(PooledVideo(sample=members[0].sample, columns=torch.cat(columns),
                                      blocks=[tuple(image.new_grid)],
                                      frame_columns=torch.stack([g.columns[0] for g in members]),
                                      grid=tuple(image.grid[1:])))
        left = sum(len(q) for q in queues.values())
        if left:
            raise ValueError(f"vlmprune downsample: {left} visual group(s) of the prompt were not encoded in this call")
        ctx.captured[_PLACED] = [placed]
        ctx.decision_flops = float(sum(image.flops for image in images))
        return apply_reductions(embeds, groups, [chosen[id(g)] for g in groups])

    def _prune(self, module: Any, kwargs: dict, embeds: Tensor, visual: Tensor, ctx: Any, cache_key: str,
               cache: Any) -> dict:
        ctx.captured[_POS] = [kwargs.get("position_ids")]
        out = super()._prune(module, kwargs, embeds, visual, ctx, cache_key, cache)
        rec = self.handle.stats.last
        images = self.adapter.resized_images(ctx)
        if rec is not None and rec.call == ctx.serial and images:
            rec.vision_flops = float(sum(image.vision_flops for image in images))
            rec.projector_flops = float(sum(image.projector_flops for image in images))
            rec.image_tokens = [sum(image.kept) for image in images]
            rec.variant = "; ".join(dict.fromkeys(image.layout for image in images if image.layout))
        return out

    def _adjust(self, ctx: Any, pruned: PrunedSequence, visual: Tensor) -> PrunedSequence:
        """Number the smaller images' tokens as the stock model numbers them (the adapter knows how)."""
        original = ctx.captured.get(_POS, [None])[-1]
        placed = ctx.captured.get(_PLACED, [[]])[-1]
        if not placed or not isinstance(original, Tensor):
            return pruned
        return self.adapter.resized_image_positions(pruned, original, placed)


@register_method
class Downsample(PreLLMMethod):
    """Encode each image smaller so that it yields about ``round(N * (1 - ratio))`` tokens."""

    config_class = DownsampleConfig
    seams: ClassVar[tuple[type, ...]] = (DownsampleSeam,)

    def budget(self, n: int) -> int:
        """Tokens an image (video frame, for Qwen videos) of ``n`` tokens may give: FasterVLM's count."""
        return keep_count(n, self.config.ratio)

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        raise TypeError("vlmprune downsample decides per image in its seam (DownsampleSeam._reduce), not per group")
