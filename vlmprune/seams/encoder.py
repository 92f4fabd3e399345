"""The encoder seam: the place inside the vision tower, described without naming any method.

Methods that act inside the vision encoder (token merging, [CLS]-attention scoring) need to know
where its blocks are, which block the model reads its features from, whether index 0 is a [CLS]
token, and which module turns the tower's output into LLM tokens. An adapter answers with one of
two layouts (:meth:`Adapter.encoder_layout`):

* :class:`EncoderLayout`: a tower of pre-norm ViT blocks (CLIP, SigLIP) whose tokens a method may
  change between blocks, then a projector that works token by token;
* :class:`EmittedLayout`: a tower that ends in a patch merger or pixel shuffle needing whole
  ``merge_size x merge_size`` groups of patches (changing tokens inside would break it), so a
  method acts on the tokens the tower emits, per image / tile.

A family without either raises :class:`EncoderLayoutError`. This module also holds the small
helpers about "where in the encoder" that several adapters share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .. import context


class EncoderLayoutError(ValueError):
    """The model's vision encoder has no layout this seam can describe (a method says what it needed)."""


@dataclass
class EncoderBlock:
    """The parts of one pre-norm ViT block, in the order the block applies them:
    ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``. ``key_proj`` is the attention's key
    projection (its output is the block's keys), ``heads`` its number of attention heads."""

    layer: nn.Module
    norm1: nn.Module
    attn: nn.Module
    key_proj: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    heads: int


@dataclass
class EncoderLayout:
    """A tower of :class:`EncoderBlock` s: whether token 0 is a [CLS] token, the last block whose
    output the model reads (later blocks may be skipped), the projector fed from it (token-wise),
    and ``tokens``: patch tokens per image (or crop) entering the first block, [CLS] not counted."""

    blocks: list[EncoderBlock]
    has_cls: bool
    feature_block: int
    projector: nn.Module
    tokens: int


@dataclass
class EmittedLayout:
    """A tower whose output tokens come from a patch merger / pixel shuffle over ``merge_size x
    merge_size`` patches (1 when the layout's tokens are already the merged ones), no [CLS].

    ``module``: whose forward output holds the tokens, either a (groups, tokens, dim) / (tokens, dim)
    tensor or a model output whose ``pooler_output`` holds them packed along dim 0.
    ``group_sizes(inputs)``: tokens of each image / tile of a call's inputs, in emission order.
    ``features(inputs)``: the tokens for processor outputs ``inputs``, computed as the stock model
    does (any shape whose last dim is the feature dim, groups in order), for work without a prompt.
    ``tokens``: tokens per group when every group has the same count, else None."""

    merge_size: int
    module: nn.Module
    group_sizes: Callable[[dict[str, Any]], list[int]]
    features: Callable[[dict[str, Any]], Tensor]
    tokens: int | None = None


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a CLIP / SigLIP / InternViT style vision tower."""
    for path in ("encoder.layers", "vision_model.encoder.layers", "encoder.layer"):
        obj: Any = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise TypeError(f"vlmprune: cannot find the encoder layers of vision tower {type(tower).__name__}")


def feature_layer_index(feature_layer: int | list[int], num_layers: int) -> int:
    """Encoder block whose output is ``hidden_states[feature_layer]`` (index 0 is the embeddings)."""
    layer = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer
    idx = num_layers + layer if layer < 0 else layer - 1
    if not 0 <= idx < num_layers:
        raise ValueError(f"vlmprune: vision feature layer {layer} has no attention block to score with")
    return idx


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
