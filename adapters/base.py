"""The adapter interface: how one model family is laid out, and nothing about any method.

An adapter answers narrow questions about a stock transformers model instance: where its vision
tower, projector, decoder and decoder layers are; which sequence columns hold visual tokens; how
the visual tokens of a call split into groups (images, crops, tiles, frames) with their grids;
and, when a method asks, which importance signal (e.g. the [CLS] attention row) to capture and
where. Methods use these answers through the seams in ``vlmprune``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlmprune import context
from vlmprune.seams.pre_llm import VisualGroup


@dataclass
class MergeBlock:
    """The parts of one pre-norm ViT block that token merging (DyMU) runs by hand, in order:
    ``x + attn(norm1(x))``, merge, ``x + mlp(norm2(x))``; ``key_proj`` gives the merging metric."""

    layer: nn.Module
    norm1: nn.Module
    attn: nn.Module
    key_proj: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    heads: int


@dataclass
class MergeLayout:
    """Where a vision tower's blocks are, whether index 0 is a protected [CLS], the last block whose
    output the model reads (later blocks can be skipped), and the projector fed from it."""

    blocks: list[MergeBlock]
    has_cls: bool
    feature_block: int
    projector: nn.Module


@dataclass
class PostMergeLayout:
    """Token merging on the tokens the vision tower emits (after a patch merger that needs whole 2x2
    groups, e.g. Qwen2-VL; after InternVL's pixel shuffle): ``rounds`` bipartite rounds per image / tile,
    no [CLS]. ``module``: whose output holds the tokens (None: the vision tower's ``pooler_output``, packed
    along dim 0; a module returning a (groups, tokens, dim) tensor, e.g. InternVL's projector).
    ``group_sizes(inputs)``: tokens per image / tile in this call (None: Qwen2-VL's ``image_grid_thw``).
    For calibration without a prompt, layouts with fixed-size groups also give ``tokens`` (per group)
    and ``features(pixel_values)`` ((groups, tokens, dim) merge inputs)."""

    rounds: int
    merge_size: int
    module: nn.Module | None = None
    group_sizes: Callable[[dict[str, Any]], list[int]] | None = None
    tokens: int | None = None
    features: Callable[[Any], Any] | None = None


class Adapter:
    """Base adapter for the ``*ForConditionalGeneration`` VLMs of transformers 5."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: how kept tokens are numbered after pruning unless the method says otherwise
    default_positions: ClassVar[str] = "contiguous"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner = model.model
        self.config = model.config
        self.score_kind: str | None = None  # "cls" or "nocls" once scoring is installed

    # -- layout ---------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.inner.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def vision_tower(self) -> nn.Module:
        return self.inner.vision_tower

    @property
    def text_config(self) -> Any:
        return self.config.get_text_config()

    # -- visual tokens in a call ---------------------------------------------------------------
    def placeholder_ids(self) -> list[int]:
        ids = []
        for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
            value = getattr(self.config, name, None)
            if value is not None and value not in ids:
                ids.append(int(value))
        return ids

    def visual_mask(self, inputs: dict[str, Any], embeds: Tensor) -> Tensor | None:
        """Columns of the current chunk that hold visual tokens, or None for a text-only call."""
        if all(inputs.get(k) is None for k in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")):
            return None
        ids = inputs.get("input_ids")
        if ids is not None:
            if ids.shape[:2] != embeds.shape[:2]:
                return None
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for tok in self.placeholder_ids():
                mask |= ids == tok
            return mask.to(embeds.device)
        user_embeds = inputs.get("inputs_embeds")
        if user_embeds is None or user_embeds.shape[:2] != embeds.shape[:2]:
            return None
        table = self.inner.get_input_embeddings()
        mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        for tok in self.placeholder_ids():
            ref = table(torch.tensor(tok, device=user_embeds.device)).to(user_embeds.dtype)
            mask |= (user_embeds == ref).all(-1).to(embeds.device)
        return mask

    @staticmethod
    def split_columns(visual: Tensor, sizes: list[int]) -> list[tuple[int, Tensor]]:
        """Split the visual columns (row-major over the batch, the order the stock model scatters
        features in) into consecutive chunks of ``sizes``; returns (sample, columns) per chunk."""
        coords = torch.nonzero(visual, as_tuple=False)  # (M, 2) in row-major order
        if sum(sizes) != coords.shape[0]:
            raise ValueError(
                f"vlmprune: the call has {coords.shape[0]} visual placeholder tokens but its images give "
                f"{sum(sizes)} features; the image count or processor output does not match the prompt"
            )
        out, start = [], 0
        for size in sizes:
            chunk = coords[start : start + size]
            samples = chunk[:, 0].unique()
            if samples.numel() != 1:
                raise ValueError("vlmprune: one image's tokens span two samples of the batch")
            out.append((int(samples[0]), chunk[:, 1]))
            start += size
        return out

    def visual_groups(self, ctx: context.CallContext, visual: Tensor, scores: str | None) -> list[VisualGroup]:
        """Groups of visual tokens of this call, in the order the stock model scatters them."""
        raise TypeError(f"{type(self).__name__} must implement visual_groups()")

    def install_seam(self, hooks: Any, handle: Any) -> None:
        """Family-specific fixes every pre-LLM method needs (e.g. position layouts); none by default."""
        return None

    def scoring_flops(self, ctx: context.CallContext) -> float:
        """FLOPs the captured scoring costs in this call (a method's overhead in the FLOPs report)."""
        return 0.0

    def install_scoring(self, hooks: Any, kind: str, handle: Any) -> None:
        """Capture what the [CLS] score needs during the vision tower's forward."""
        raise TypeError(f"{type(self).__name__} must implement install_scoring()")

    def merge_layout(self) -> MergeLayout:
        """The vision blocks token merging (DyMU) runs inside; families without support say why."""
        raise ValueError(
            f"vlmprune: DyMU token merging is not supported for {self.family or type(self).__name__} models"
            "; supported: the LLaVA family with a CLIP or SigLIP tower (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision images), "
            "Qwen2-VL / Qwen2.5-VL images (merging after the ViT) and InternVL (merging after the pixel shuffle)"
        )

    def decoder_attention(self, index: int) -> nn.Module:
        """The self-attention module of decoder layer ``index`` (for in-attention methods such as VTU)."""
        return self.decoder_layers[index].self_attn

    def llm_rope(self, attn: nn.Module) -> Any:
        """``fn(q, k, cos, sin) -> (q, k)``: the rotary embedding the decoder's attention applies."""
        import sys

        fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if fn is None:
            raise ValueError(f"vlmprune: cannot find the rotary embedding of {type(attn).__name__}")
        return fn


def capture_projections(hooks: Any, attn: nn.Module, handle: Any, key: str, cls_only: bool) -> None:
    """Record the q / k projections of one vision attention module while ``handle``'s call runs.

    Read-only forward hooks: the layer itself keeps its attention backend (SDPA / flash).
    With ``cls_only`` only the [CLS] query row is kept.
    """

    def on_q(module: nn.Module, args: tuple, output: Tensor) -> None:
        ctx = context.current(handle)
        if ctx is not None and ctx.owner is handle:
            ctx.capture(key + ".q", (output[:, 0] if cls_only else output).detach())

    def on_k(module: nn.Module, args: tuple, output: Tensor) -> None:
        ctx = context.current(handle)
        if ctx is not None and ctx.owner is handle:
            ctx.capture(key + ".k", output.detach())

    hooks.forward(attn.q_proj, on_q)
    hooks.forward(attn.k_proj, on_k)
