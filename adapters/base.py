"""The adapter interface: how one model family is laid out, and nothing about any method.

An adapter answers narrow questions about a stock transformers model instance: where its vision
tower, projector, decoder and decoder layers are; which sequence columns hold visual tokens; how
the visual tokens of a call split into groups (images, crops, tiles, frames) with their grids;
how the vision encoder is built (:mod:`vlmprune.seams.encoder`); how the decoder numbers its
positions; what the vision side costs in FLOPs; and, when a method asks, which importance signal
(e.g. the [CLS] attention row) to capture and where. Methods and seams use these answers and never
test which family a model is; a new family is a new adapter.

The defaults below are those of a family with 1-D RoPE positions and ``pixel_values`` of shape
(images, 3, H, W); an adapter overrides what differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlmprune import context
from vlmprune.seams.encoder import EmittedLayout, EncoderLayout, EncoderLayoutError
from vlmprune.seams.pre_llm import VisualGroup
from vlmprune.sequence import PrunedSequence


@dataclass
class PooledVideo:
    """A video whose frame tokens a method replaced by pooled grids, in the input sequence.

    ``columns``: the input columns now holding the pooled tokens, in order; ``blocks``: the
    pooled grids (frames, h, w) those tokens fill one after the other; ``frame_columns``: the
    input column of each original frame's first token; ``grid``: the original frame grid."""

    sample: int
    columns: Tensor
    blocks: list[tuple[int, int, int]]
    frame_columns: Tensor
    grid: tuple[int, int]


class Adapter:
    """Base adapter for the ``*ForConditionalGeneration`` VLMs of transformers 5."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: the config ``model_type`` of each class in ``model_classes`` (same order), for work on configs
    model_types: ClassVar[tuple[str, ...]] = ()
    #: ``model_type`` of the family's own text configs, when their facts differ from the defaults
    text_model_types: ClassVar[tuple[str, ...]] = ()
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

    #: AnyRes layouts a pre-LLM method may ask for (``anyres=``); empty for families without AnyRes crops
    anyres_layouts: ClassVar[tuple[str, ...]] = ()

    def check_anyres(self, layout: str, positions: str) -> None:
        """Refuse, at ``apply`` time, a crop layout this family does not have."""
        if layout not in self.anyres_layouts:
            offered = ", ".join(repr(x) for x in self.anyres_layouts) or "none (no AnyRes crops)"
            raise ValueError(
                f"vlmprune: anyres={layout!r} is not offered for {self.family or type(self).__name__} models; "
                f"layouts offered: {offered}"
            )

    def anyres_groups(self, layout: str, ctx: context.CallContext, groups: list[VisualGroup]) -> None:
        """Make ``groups`` show what reaches the LLM in ``layout`` before the method decides."""
        raise ValueError(f"vlmprune: {self.family or type(self).__name__} models have no {layout!r} layout")

    def anyres_sequence(
        self, layout: str, ctx: context.CallContext, embeds: Tensor, visual: Tensor,
        groups: list[VisualGroup], reductions: list[Any],
    ) -> tuple[Tensor, Tensor]:
        """The keep mask and embeddings when the kept crop tokens are laid out in ``layout`` rather
        than the stock packing (families with :attr:`anyres_layouts`)."""
        raise ValueError(f"vlmprune: {self.family or type(self).__name__} models have no {layout!r} layout")

    def install_seam(self, hooks: Any, handle: Any) -> None:
        """Family-specific fixes every pre-LLM method needs (e.g. position layouts); none by default."""
        return None

    def scoring_flops(self, ctx: context.CallContext) -> float:
        """FLOPs the captured scoring costs in this call (a method's overhead in the FLOPs report)."""
        return 0.0

    def vision_signals(self, ctx: context.CallContext, groups: list[VisualGroup], needs: frozenset[str]) -> None:
        """Fill the vision-side signals ``needs`` ("vision": what the projector receives per grid
        token, the [CLS] row and the projector itself; "keys": the scoring layer's head-averaged
        keys) into ``groups``, from what :meth:`install_signals` captured during this call."""
        raise ValueError(
            f"vlmprune: {self.family or type(self).__name__} models do not provide the vision-side "
            f"signal(s) {', '.join(sorted(needs))} this method needs"
        )

    def install_signals(self, hooks: Any, needs: frozenset[str], handle: Any) -> None:
        """Capture, during the vision tower's forward, what :meth:`vision_signals` needs."""
        raise ValueError(
            f"vlmprune: {self.family or type(self).__name__} models do not provide the vision-side "
            f"signal(s) {', '.join(sorted(needs))} this method needs"
        )

    def install_scoring(self, hooks: Any, kind: str, handle: Any) -> None:
        """Capture what the [CLS] score needs during the vision tower's forward."""
        raise TypeError(f"{type(self).__name__} must implement install_scoring()")

    def decoder_attention(self, index: int) -> nn.Module:
        """The self-attention module of decoder layer ``index`` (for methods that run attention themselves)."""
        return self.decoder_layers[index].self_attn

    def llm_rope(self, attn: nn.Module) -> Any:
        """``fn(q, k, cos, sin) -> (q, k)``: the rotary embedding the decoder's attention applies."""
        import sys

        fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if fn is None:
            raise ValueError(f"vlmprune: cannot find the rotary embedding of {type(attn).__name__}")
        return fn

    # -- the vision encoder ----------------------------------------------------------------------
    def encoder_layout(self) -> EncoderLayout | EmittedLayout:
        """How the vision encoder is built (see :mod:`vlmprune.seams.encoder`); families without a
        describable encoder raise :class:`~vlmprune.seams.encoder.EncoderLayoutError`."""
        raise EncoderLayoutError(
            f"the {self.family or type(self).__name__} family exposes no encoder block layout"
        )

    def image_group_sizes(self, inputs: Mapping[str, Any]) -> list[int]:
        """Tokens the vision side emits for each image / tile of ``inputs`` (processor outputs), in
        the order it emits them; defined by families whose groups differ in size or are not visible
        in ``visual_groups`` without a prompt."""
        raise ValueError(f"vlmprune: {self.family or type(self).__name__} models give no image group sizes")

    def split_images(self, pixel_values: Tensor, **processor_outputs: Any) -> list[dict[str, Tensor]]:
        """The processor's outputs for a set of images, one dict per image, holding exactly what the
        vision tower encodes for it (e.g. only the real crops of an AnyRes image). The tensors of
        consecutive images concatenate along dim 0 (:meth:`join_images`) into a batch
        :meth:`encode_images` takes. Default: ``pixel_values`` (images, 3, H, W), one row each."""
        if pixel_values.dim() != 4:
            raise ValueError(
                f"vlmprune: {self.family or type(self).__name__} takes pixel_values of shape (images, 3, H, W); "
                f"got {tuple(pixel_values.shape)}"
            )
        return [{"pixel_values": pixel_values[i : i + 1]} for i in range(pixel_values.shape[0])]

    @staticmethod
    def join_images(images: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The batch of several :meth:`split_images` entries (their tensors concatenated along dim 0)."""
        return {key: torch.cat([image[key] for image in images]) for key in images[0]}

    def encode_images(self, pixel_values: Tensor, **processor_outputs: Any) -> Any:
        """Run the vision tower on processed images the way the stock model feeds it and return the
        tower's output (hooks inside the tower see a real call). Default: ``pixel_values`` as is."""
        return self.vision_tower(pixel_values)

    # -- positions -------------------------------------------------------------------------------
    def rope_positions(self, position_ids: Tensor) -> Tensor:
        """The rows of the ``position_ids`` the decoder receives that its rotary embedding uses:
        (B, L) for 1-D RoPE (the default: unchanged), (axes, B, L) for multi-axis RoPE."""
        return position_ids

    def continuation_positions(self, cache_positions: Tensor) -> Tensor:
        """``position_ids`` for new tokens at 1-D cache positions ``cache_positions`` (1, n), after a
        prefill of this model instance. Default (1-D RoPE): the cache positions themselves."""
        return cache_positions

    def pooled_video_positions(
        self, pruned: PrunedSequence, position_ids: Tensor, videos: Sequence[PooledVideo]
    ) -> PrunedSequence:
        """Number the tokens of pooled videos as the stock model numbers a video of the pooled grid.

        ``pruned``: the sequence after the pre-LLM seam kept the pooled tokens; ``position_ids``: the
        positions the decoder received before pruning. Default (1-D RoPE): a token takes one position
        whatever it holds, so the seam's numbering stands and ``pruned`` comes back unchanged."""
        return pruned

    # -- FLOPs facts (from the config alone, so FLOPs can be estimated without a model) -------------
    @classmethod
    def text_head_dim(cls, text_config: Any) -> int:
        """Width of one attention head of the decoder as its layers are built."""
        hidden, heads = int(text_config.hidden_size), int(text_config.num_attention_heads)
        return int(getattr(text_config, "head_dim", None) or hidden // heads)

    @classmethod
    def vision_flops(cls, config: Any, inputs: Mapping[str, Any]) -> tuple[float, float]:
        """(encoder, projector) FLOPs of the visual inputs of one call under the convention of
        :mod:`vlmprune.flops`, read from the processor's tensors."""
        raise ValueError(f"vlmprune.flops: {cls.family or cls.__name__} models give no vision FLOPs")

    @classmethod
    def vision_flops_at_lengths(
        cls, config: Any, rows: int, block_lengths: Sequence[tuple[int, int]], projector_tokens: int,
        num_blocks: int,
    ) -> tuple[float, float]:
        """(encoder, projector) FLOPs of an :class:`~vlmprune.seams.encoder.EncoderLayout` tower whose
        blocks change the sequence length, for ``rows`` images run as one padded batch:
        ``block_lengths[i]`` is the (padded) length block ``i`` attended over and the length its MLP
        ran at (blocks beyond the list were skipped); ``projector_tokens``: rows x length the
        projector received."""
        raise ValueError(f"vlmprune.flops: {cls.family or cls.__name__} models have no encoder block layout")

    # -- smaller images: encode a call's images at a lower resolution --------------------------------
    # Families whose vision side takes images of varying size (a dynamic patch grid, a varying tile
    # count) override the three methods below; fixed-resolution towers keep these defaults.
    def resize_image_inputs(
        self, inputs: Mapping[str, Any], budget: Callable[[int], int], resample: str = "bicubic"
    ) -> tuple[dict[str, Tensor], list[ResizedImage]]:
        """The processor's visual outputs in ``inputs`` for the same images made smaller: each image
        (or video) of ``n`` LLM tokens becomes one of about ``budget(n)`` tokens, as the processor
        would lay out an image of that size. Returns the smaller tensors (same keys) and one
        :class:`ResizedImage` per image / video, in the order the vision side emits them."""
        raise ValueError(resize_unsupported(self))

    def install_image_resize(
        self, hooks: Any, handle: Any, budget: Callable[[int], int], resample: str = "bicubic"
    ) -> None:
        """In ``handle``'s calls, encode the smaller images of :meth:`resize_image_inputs` instead of
        the processor's, and hand the stock placeholder scatter features laid out as
        :attr:`ResizedImage.kept` says (each group's leading tokens hold the smaller image's
        features, the rest zeros); :meth:`resized_images` then reports what was encoded."""
        raise ValueError(resize_unsupported(self))

    def resized_images(self, ctx: context.CallContext) -> list[ResizedImage]:
        """What :meth:`install_image_resize` encoded in this call, in emission order."""
        return []

    def resized_image_positions(
        self, pruned: PrunedSequence, position_ids: Tensor, images: Sequence[PooledVideo]
    ) -> PrunedSequence:
        """Number the kept tokens of smaller images as the stock model numbers an image of the smaller
        grid (``images[i].blocks == [new_grid]``). Default (1-D RoPE): one position per token, so the
        seam's contiguous numbering is already the stock one."""
        return pruned


@dataclass
class ResizedImage:
    """One image (or video) that the vision side encoded at a smaller size.

    ``kind``: the :attr:`VisualGroup.kind` of its groups; ``grid`` / ``new_grid``: the geometry of
    its LLM tokens before and after, (frames or tiles, h, w); ``kept``: per stock group of the item
    (frame / tile, in order), how many of its leading grid tokens hold the smaller item's features;
    ``vision_flops`` / ``projector_flops``: what encoding the smaller item cost (the convention of
    :mod:`vlmprune.flops`); ``flops``: the resizing's own cost; ``layout``: how the smaller item was
    made (e.g. the tile grid read off the inputs)."""

    kind: str
    grid: tuple[int, int, int]
    new_grid: tuple[int, int, int]
    kept: list[int]
    vision_flops: float = 0.0
    projector_flops: float = 0.0
    flops: float = 0.0
    layout: str | None = None


def resize_unsupported(adapter: Adapter) -> str:
    """The error for a family whose vision side takes one image size, naming those that take others."""
    from vlmprune.adapters import ADAPTERS

    able = [name for cls in ADAPTERS if cls.install_image_resize is not Adapter.install_image_resize
            for name in cls.model_classes]
    return (
        f"vlmprune: {type(adapter.model).__name__} encodes every image (or crop) at one fixed resolution, so "
        "giving its encoder a smaller image does not apply (it would need position embeddings the tower "
        f"was not trained with). Image downsampling applies to dynamic-resolution models: {', '.join(able)}"
    )


def interpolation_flops(images: int, size: tuple[int, int], new_size: tuple[int, int], mode: str) -> float:
    """FLOPs of resizing ``images`` planes from ``size`` to ``new_size`` with a separable (antialiased)
    ``mode`` filter, width first: a multiply and an add per filter tap of every output sample; the
    taps widen by the shrink factor when antialiasing a downscale."""
    support = {"bilinear": 1.0, "bicubic": 2.0}.get(mode, 2.0)
    (h, w), (nh, nw) = size, new_size
    taps_w = 2.0 * support * max(1.0, w / max(nw, 1))
    taps_h = 2.0 * support * max(1.0, h / max(nh, 1))
    return 2.0 * images * (h * nw * taps_w + nh * nw * taps_h)


# -- vision-side signals for pre-LLM methods ("vision", "keys") ------------------------------------
#: the signals an adapter captures in the vision tower for :class:`VisualGroup`
VISION_SIGNALS = frozenset({"vision", "keys"})


def check_vision_signals(adapter: Adapter, needs: frozenset[str]) -> None:
    """A clear error for a vision-side signal no adapter knows."""
    unknown = set(needs) - VISION_SIGNALS
    if unknown:
        raise ValueError(
            f"vlmprune: {adapter.family or type(adapter).__name__} models give no vision-side signal(s) "
            f"{sorted(unknown)}; known: {sorted(VISION_SIGNALS)}"
        )


def head_mean(x: Tensor, heads: int) -> Tensor:
    """(..., heads * d) -> (..., d): the mean over attention heads."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads).mean(dim=-2)


class RowProjector:
    """A family's projector as a function of rows shaped like ``VisualGroup.vision``: (m, width) ->
    (m, LLM width). ``unit``: the width the module's first step takes when a row holds several of
    them (Qwen2-VL's merger normalises each patch's part of a merged row). It calls the module's
    ``forward`` directly, so hooks on the projector itself (e.g. the ones capturing signals) do not
    fire. ``flops(m)``: the matrix products of projecting ``m`` rows (2 * in * out per linear layer)."""

    def __init__(self, module: nn.Module, unit: int | None = None) -> None:
        self.module = module
        self.unit = unit
        self.flops_per_row = 2.0 * sum(
            m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)
        )

    def __call__(self, rows: Tensor) -> Tensor:
        param = next(self.module.parameters(), None)
        x = rows.to(param.dtype) if param is not None else rows
        m = x.shape[0]
        if self.unit is not None:
            x = x.reshape(-1, self.unit)
        return self.module.forward(x).reshape(m, -1)

    def flops(self, rows: int) -> float:
        return float(rows) * self.flops_per_row


def signal_carrier(parts: Sequence[Tensor], rows: bool = True) -> Tensor:
    """Signals laid side by side along the last dim in float32 (float64 for float64 inputs), plus,
    with ``rows``, a channel holding each entry's index along dim 0 (the tower input it came from),
    so the family's own grouping code can carry them to the groups like scores."""
    wide = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    cols = [p.to(wide) for p in parts]
    if rows:
        lead = parts[0].shape[0]
        index = torch.arange(lead, dtype=wide, device=parts[0].device)
        cols.append(index.view(lead, *([1] * (parts[0].dim() - 1))).expand(*parts[0].shape[:-1], 1))
    return torch.cat(cols, dim=-1)


def distribute_signals(
    groups: Sequence[VisualGroup], carried: Sequence[VisualGroup], parts: Sequence[tuple[str, int, torch.dtype]],
    cls_rows: Tensor | None = None, project: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """Set each group's signals from ``carried``: the same groups built from a :func:`signal_carrier`
    in place of scores. ``parts``: (attribute, width, dtype) in carrier order; ``cls_rows``: the [CLS]
    row of each tower input (picked with the carrier's index channel, for groups from one input)."""
    if len(carried) != len(groups):
        raise RuntimeError(f"vlmprune: {len(groups)} visual groups but the vision signals form {len(carried)}")
    for group, found in zip(groups, carried):
        if not torch.equal(group.columns.cpu(), found.columns.cpu()):
            raise RuntimeError("vlmprune: the vision signals' groups do not match the call's visual groups")
        values, offset = found.scores, 0
        for name, width, dtype in parts:
            setattr(group, name, values[:, offset : offset + width].to(dtype))
            offset += width
        if cls_rows is not None and values.shape[-1] > offset and values.shape[0]:
            source = values[:, offset]
            if bool((source == source[0]).all()):
                group.vision_cls = cls_rows[int(source[0].round())]
        if project is not None:
            group.project = project
