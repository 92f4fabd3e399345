"""Analytic FLOPs of a stock Hugging Face VLM forward, prefill and decode, under one declared convention.

Convention (the one every vlmprune FLOPs figure uses)
------------------------------------------------------
* One multiply-add counts as 2 FLOPs. We count exactly what ``torch.utils.flop_counter.FlopCounterMode``
  counts: matrix multiplications (every ``nn.Linear``, the ``lm_head``), convolutions (patch embeddings) and
  the two attention products QKᵀ and A·V. Biases, norms, activations, softmax, rotary embeddings,
  residual adds, embedding look-ups, pixel shuffles and interpolations are ignored (about 1% or less at
  real model sizes).
* Vision encoder: the patch-embedding convolution plus every layer the Hugging Face vision tower actually
  executes (CLIP/SigLIP towers run all layers even when the feature layer is -2; SigLIP's attention-pooling
  head is counted when ``vision_use_head`` is set), with the full N² attention term over the tokens of each
  image / crop / frame / tile it attends over. Qwen2-VL attends per frame; Qwen2.5-VL attends inside
  windows except on its ``fullatt_block_indexes`` layers.
* Projector: LLaVA's 2-layer MLP, InternVL's pixel-shuffle + MLP, Qwen2-VL's PatchMerger MLP, over the
  tokens they receive.
* LLM prefill over n tokens after ``past`` cached ones, per decoder layer: q/k/v/o projections with
  grouped-query KV width (``num_key_value_heads × head_dim``), the attention products with the full
  n × (past + n) term (no causal discount, as ``FlopCounterMode`` counts SDPA), the gated MLP as 3 matrices
  (2·n·d·m each); plus the ``lm_head`` on the positions whose logits are computed (all n for a plain
  forward, 1 in ``generate``). The decoder is assumed Llama/Qwen2-style (gated MLP), as in every supported
  family.
* Decode: one single-token forward per generated token at its growing context length. ``generate`` makes the
  first new token during prefill, so G generated tokens cost G − 1 decode steps.
* Method overhead (scoring, merging, a draft model) is a number the method reports; it is added as is.
* Batch: vision and projector are counted from the visual tensors of the whole batch; LLM prefill and
  decode are per sample × ``batch_size`` (padded samples cost the padded length).
* For comparison with papers we also report the FastV (Chen et al., 2024, Eq. 5) LLM-only prefill figure:
  per layer 4nd² + 2n²d + 2ndm, summed over layers, with a per-layer token count for methods that shrink
  the sequence inside the LLM (K·f(n) + (T−K)·f(n′)). Read as multiply-adds it is 4 d×d projections, the
  two n×n×d attention products and a 2-matrix MLP; it ignores GQA, the gated MLP's third matrix, the
  vision side, ``lm_head`` and the method's overhead. It comes out at roughly half our LLM prefill figure
  or less, so compare reduction ratios, not absolute values, across the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "FlopsReport",
    "SUPPORTED_MODEL_TYPES",
    "cross_attention_flops",
    "decode_flops",
    "estimate",
    "fastv_flops",
    "llm_flops",
    "vision_flops",
    "vit_flops_at_lengths",
]

#: model_type of the supported VLM configs -> the transformers class that uses it.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
}
_VIT_TOWERS = ("clip_vision_model", "siglip_vision_model")
# Text models whose attention uses hidden_size // num_attention_heads whatever head_dim says.
_HEAD_DIM_FROM_HIDDEN = ("qwen2_vl_text", "qwen2_5_vl_text")


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one call, split by stage so a table can show where a method saves compute."""

    vision: float
    projector: float
    llm_prefill: float
    decode: float
    overhead: float
    llm_fastv: float  # FastV Eq. 5 style, LLM prefill only, for comparison with papers

    @property
    def total(self) -> float:
        """vision + projector + llm_prefill + decode + overhead (llm_fastv is a side figure, not added)."""
        return self.vision + self.projector + self.llm_prefill + self.decode + self.overhead

    def as_dict(self) -> dict[str, float]:
        """All fields plus ``total``, for JSON output."""
        d = {k: float(v) for k, v in asdict(self).items()}
        d["total"] = float(self.total)
        return d


# ----------------------------------------------------------------------------------------------- helpers


def _unsupported(config: Any) -> ValueError:
    names = ", ".join(f"{cls} ({mt})" for mt, cls in SUPPORTED_MODEL_TYPES.items())
    return ValueError(
        f"vlmprune.flops: unsupported model config {type(config).__name__} "
        f"(model_type={getattr(config, 'model_type', None)!r}); supported: {names}"
    )


def _model_config(model_or_config: Any) -> Any:
    cfg = getattr(model_or_config, "config", model_or_config)
    if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(cfg)
    return cfg


def _text_config(config: Any) -> Any:
    """Accept a text config or a whole VLM config (then its ``text_config``)."""
    cfg = getattr(config, "text_config", None) or config
    needed = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
    missing = [k for k in needed if getattr(cfg, k, None) is None]
    if missing:
        raise ValueError(
            f"vlmprune.flops: {type(cfg).__name__} is not a decoder text config (missing {missing}); "
            "pass model.config or model.config.text_config of a supported VLM"
        )
    return cfg


def _text_dims(tc: Any) -> tuple[int, int, int, int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim, mlp, layers, vocab) as the decoder layers are actually built."""
    d = int(tc.hidden_size)
    h = int(tc.num_attention_heads)
    kv = int(getattr(tc, "num_key_value_heads", None) or h)
    hd = getattr(tc, "head_dim", None)
    if tc.model_type in _HEAD_DIM_FROM_HIDDEN or not hd:
        hd = d // h
    return d, h, kv, int(hd), int(tc.intermediate_size), int(tc.num_hidden_layers), int(tc.vocab_size)


def _per_layer(value: int | Sequence[int], layers: int, name: str) -> list[int]:
    if isinstance(value, int) or (hasattr(value, "__index__") and not isinstance(value, Sequence)):
        return [int(value)] * layers
    vals = [int(v) for v in value]
    if len(vals) != layers:
        raise ValueError(f"vlmprune.flops: {name} has {len(vals)} entries but the LLM has {layers} layers")
    return vals


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (list, tuple)):
        return int(x[0]), int(x[1])
    return int(x), int(x)


def _rows(x: Any) -> list[list[int]]:
    """A (k, 2|3) tensor / array / nested list as a list of int rows."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [[int(v) for v in row] for row in x]


def _override(inputs: Mapping[str, Any], cfg: Any, key: str) -> Any:
    """A forward kwarg passed with the inputs wins over the config default, as in the HF forward."""
    value = inputs.get(key)
    return getattr(cfg, key) if value is None else value


def _vit_flops(vc: Any, n_patches: int, cls_token: bool, images: int) -> int:
    """A CLIP / SigLIP / InternViT tower over `images` inputs of `n_patches` patches each."""
    d, inter, layers = int(vc.hidden_size), int(vc.intermediate_size), int(vc.num_hidden_layers)
    ph, pw = _pair(vc.patch_size)
    channels = int(getattr(vc, "num_channels", 3))
    n = n_patches + (1 if cls_token else 0)
    conv = 2 * n_patches * channels * ph * pw * d
    # q, k, v, out projections (4·d²), QKᵀ and A·V (2·n²·d each), fc1 + fc2
    layer = 2 * n * 4 * d * d + 4 * n * n * d + 4 * n * d * inter
    head = 0
    if vc.model_type == "siglip_vision_model" and getattr(vc, "vision_use_head", False):
        # nn.MultiheadAttention with one probe query: q and out on 1 token, k and v on n, then an MLP.
        head = 2 * d * d + 4 * n * d * d + 4 * n * d + 2 * d * d + 4 * d * inter
    return images * (conv + layers * layer + head)


def _llava_family(cfg: Any, inputs: Mapping[str, Any]) -> tuple[float, float]:
    vc = cfg.vision_config
    if vc.model_type not in _VIT_TOWERS:
        raise ValueError(
            f"vlmprune.flops: {cfg.model_type} with a {vc.model_type!r} vision tower is not supported; "
            f"supported towers: {', '.join(_VIT_TOWERS)}"
        )
    layer_sel = _override(inputs, cfg, "vision_feature_layer")
    strategy = _override(inputs, cfg, "vision_feature_select_strategy")
    n_feat_layers = 1 if isinstance(layer_sel, int) else len(layer_sel)
    has_cls = vc.model_type == "clip_vision_model"
    ph, pw = _pair(vc.patch_size)
    d_text = int(cfg.text_config.hidden_size)
    d_in = int(vc.hidden_size) * n_feat_layers

    # (number of encoder passes, height, width) groups
    groups: list[tuple[int, int, int]] = []
    pv = inputs.get("pixel_values")
    if pv is not None:
        if len(pv.shape) == 4:
            groups.append((pv.shape[0], pv.shape[-2], pv.shape[-1]))
        elif len(pv.shape) == 5:
            if cfg.model_type == "llava":
                raise ValueError("vlmprune.flops: LLaVA-1.5 expects 4-D pixel_values (B, 3, H, W)")
            sizes = inputs.get("image_sizes")
            if sizes is None:
                raise ValueError(f"vlmprune.flops: {cfg.model_type} with 5-D pixel_values needs image_sizes")
            crops = _anyres_crops(cfg, _rows(sizes), inputs.get("batch_num_images"), pv.shape[1])
            groups.append((crops, pv.shape[-2], pv.shape[-1]))
        else:
            raise ValueError(f"vlmprune.flops: pixel_values of shape {tuple(pv.shape)}: expected 4 or 5 dims")
    pvv = inputs.get("pixel_values_videos")
    if pvv is not None:
        if cfg.model_type != "llava_onevision":
            raise ValueError(f"vlmprune.flops: {cfg.model_type} takes no pixel_values_videos")
        groups.append((pvv.shape[0] * pvv.shape[1], pvv.shape[-2], pvv.shape[-1]))

    enc = proj = 0
    for count, height, width in groups:
        n_patches = (height // ph) * (width // pw)
        enc += _vit_flops(vc, n_patches, has_cls, count)
        n_tokens = n_patches + (1 if has_cls else 0) - (1 if strategy == "default" else 0)
        proj += count * 2 * n_tokens * (d_in * d_text + d_text * d_text)
    return float(enc), float(proj)


def _anyres_crops(cfg: Any, image_sizes: list[list[int]], batch_num_images: Any, max_crops: int) -> int:
    """Crops the HF model keeps from 5-D pixel_values: base image + the anyres grid of the best resolution
    for each image's (height, width) (LLaVA-OneVision: just the base image when a sample has several)."""
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


def _qwen_family(cfg: Any, inputs: Mapping[str, Any]) -> tuple[float, float]:
    vc = cfg.vision_config
    qwen25 = cfg.model_type == "qwen2_5_vl"
    if qwen25:
        d = int(vc.hidden_size)
        out = int(vc.out_hidden_size)
        mlp_per_token = 2 * 3 * d * int(vc.intermediate_size)  # gated MLP
        full_layers = {int(i) for i in vc.fullatt_block_indexes}
    else:
        d = int(vc.embed_dim)
        out = int(vc.hidden_size)
        mlp_per_token = 2 * 2 * d * int(d * vc.mlp_ratio)
        full_layers = set(range(int(vc.depth)))
    depth = int(vc.depth)
    p, tp, m = int(vc.patch_size), int(vc.temporal_patch_size), int(vc.spatial_merge_size)
    channels = int(getattr(vc, "in_channels", 3))

    grids: list[list[int]] = []
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if inputs.get(pixels) is not None:
            if inputs.get(grid) is None:
                raise ValueError(f"vlmprune.flops: {cfg.model_type} needs {grid} with {pixels}")
            grids += _rows(inputs[grid])

    enc = proj = 0
    hidden = d * m * m
    for t, h, w in grids:
        n = t * h * w
        frame = h * w
        full_attn = t * 4 * frame * frame * d
        if qwen25:
            ws = int(vc.window_size) // m // p
            mh, mw = h // m, w // m
            rows = [min(ws, mh - i) for i in range(0, mh, ws)]
            cols = [min(ws, mw - j) for j in range(0, mw, ws)]
            win_attn = t * sum(4 * (r * c * m * m) ** 2 * d for r in rows for c in cols)
        else:
            win_attn = full_attn
        per_layer_linear = 2 * n * 4 * d * d + n * mlp_per_token  # qkv (3d²) + proj (d²) + MLP
        attn = sum(full_attn if i in full_layers else win_attn for i in range(depth))
        enc += 2 * n * channels * tp * p * p * d + depth * per_layer_linear + attn
        proj += 2 * (n // (m * m)) * (hidden * hidden + hidden * out)
    return float(enc), float(proj)


def _internvl(cfg: Any, inputs: Mapping[str, Any]) -> tuple[float, float]:
    vc = cfg.vision_config
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
    ph, pw = _pair(vc.patch_size)
    tiles, n_patches = pv.shape[0], (pv.shape[-2] // ph) * (pv.shape[-1] // pw)
    enc = _vit_flops(vc, n_patches, True, tiles)
    strategy = _override(inputs, cfg, "vision_feature_select_strategy")
    n_tokens = n_patches + (0 if strategy == "default" else 1)
    scale = int(1 / cfg.downsample_ratio)
    side = int(n_tokens**0.5)  # the HF model reshapes to a square grid
    tokens_out = (side // scale) ** 2
    d_in = int(vc.hidden_size) * scale * scale
    d_text = int(cfg.text_config.hidden_size)
    proj = tiles * 2 * tokens_out * (d_in * d_text + d_text * d_text)
    return float(enc), float(proj)


# ------------------------------------------------------------------------------------------------- API


def vision_flops(model_config: Any, inputs: Mapping[str, Any]) -> tuple[float, float]:
    """(encoder, projector) FLOPs for the visual inputs of one call, read from the tensors a processor
    returns, because that is what decides how many crops / frames / tiles / patches the tower really sees.

    * LLaVA-1.5: ``pixel_values`` (B, 3, H, W).
    * LLaVA-NeXT / OneVision: ``pixel_values`` (B, crops, 3, H, W) with ``image_sizes``: only the crops the HF
      model keeps (base + anyres grid of the best pinpoint; OneVision: 1 crop per image when
      ``batch_num_images`` says a sample has several) are counted; 4-D pixel values count every row.
      OneVision ``pixel_values_videos`` (B, frames, 3, H, W): every frame.
    * Qwen2-VL / 2.5-VL: ``image_grid_thw`` / ``video_grid_thw`` (prod(t, h, w) patches each, a Conv3d over
      ``temporal_patch_size`` frames per patch) next to ``pixel_values`` / ``pixel_values_videos``.
    * InternVL: ``pixel_values`` (tiles, 3, H, W).
    ``vision_feature_layer`` / ``vision_feature_select_strategy`` in ``inputs`` override the config.
    """
    cfg = _model_config(model_config)
    if cfg.model_type in ("llava", "llava_next", "llava_onevision"):
        return _llava_family(cfg, inputs)
    if cfg.model_type in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen_family(cfg, inputs)
    return _internvl(cfg, inputs)


def llm_flops(
    text_config: Any,
    tokens_per_layer: int | Sequence[int],
    past: int | Sequence[int] = 0,
    logits_positions: int | None = None,
) -> float:
    """FLOPs of one decoder forward over ``tokens_per_layer`` new tokens (one int, or one count per decoder
    layer so in-LLM pruning is counted where it happens) after ``past`` cached tokens (int or per layer),
    plus ``lm_head`` on ``logits_positions`` positions (default: the tokens leaving the last layer, as in a
    plain forward; ``generate`` computes 1). Accepts a text config or a whole VLM config."""
    tc = _text_config(text_config)
    d, h, kv, hd, mlp, layers, vocab = _text_dims(tc)
    ns = _per_layer(tokens_per_layer, layers, "tokens_per_layer")
    pasts = _per_layer(past, layers, "past")
    total = 0
    for n, p in zip(ns, pasts):
        proj = 2 * n * d * (h * hd) * 2 + 2 * n * d * (kv * hd) * 2  # q + o, k + v (GQA width)
        attn = 2 * 2 * n * (p + n) * h * hd  # QKᵀ and A·V, full n × (past + n)
        total += proj + attn + 3 * 2 * n * d * mlp
    positions = ns[-1] if logits_positions is None else int(logits_positions)
    total += 2 * positions * d * vocab
    return float(total)


def decode_flops(text_config: Any, context_len: int | Sequence[int], new_tokens: int) -> float:
    """FLOPs of ``new_tokens`` single-token decoder forwards (logits for 1 position each), the first one
    attending over ``context_len`` cached tokens (int or per layer, for methods that pruned the cache of
    some layers) and each later one over one token more."""
    tc = _text_config(text_config)
    layers = _text_dims(tc)[5]
    ctx = _per_layer(context_len, layers, "context_len")
    return float(
        sum(llm_flops(tc, 1, past=[c + i for c in ctx], logits_positions=1) for i in range(int(new_tokens)))
    )


def cross_attention_flops(text_config: Any, query_tokens: int, slow_tokens: int, layers: int = 1) -> float:
    """FLOPs of the slow-fast hybrid layers' cross-attention for one sample: per hybrid layer the
    slow tokens' KV projection (2·S·d·2·kv·hd) and the two attention products over ``query_tokens``
    queries and S slow keys (2·2·q·S·h·hd). Linear in the number of slow tokens S; the small gate
    projection is reported by the method as overhead apart from this figure."""
    tc = _text_config(text_config)
    d, h, kv, hd, _, _, _ = _text_dims(tc)
    s, q = int(slow_tokens), int(query_tokens)
    per_layer = 2 * s * d * 2 * kv * hd + 2 * 2 * q * s * h * hd
    return float(layers * per_layer)


def fastv_flops(text_config: Any, tokens_per_layer: int | Sequence[int]) -> float:
    """FastV Eq. 5 LLM prefill FLOPs, sum over layers of 4nd² + 2n²d + 2ndm (``tokens_per_layer``: one int,
    or one count per layer so a method pruning after layer K gives K·f(n) + (T−K)·f(n′)). Reported beside
    our figure because papers quote this one."""
    tc = _text_config(text_config)
    d, _, _, _, m, layers, _ = _text_dims(tc)
    ns = _per_layer(tokens_per_layer, layers, "tokens_per_layer")
    return float(sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in ns))


def estimate(
    model_or_config: Any,
    inputs: Mapping[str, Any] | None,
    llm_tokens: int | Sequence[int],
    *,
    generated_tokens: int = 0,
    logits_positions: int | None = None,
    overhead: float = 0.0,
    batch_size: int = 1,
) -> FlopsReport:
    """Per-batch FLOPs of one call, as a :class:`FlopsReport`.

    ``inputs``: the processor's tensors (visual ones are read, see :func:`vision_flops`; None = text only).
    ``llm_tokens``: the sequence length the LLM actually processed per sample (after pruning), or one
    length per decoder layer. ``generated_tokens``: tokens produced by ``generate`` (the first comes from
    prefill, the rest are decode steps); when > 0 the prefill computes logits for 1 position, otherwise for
    every position, unless ``logits_positions`` says otherwise. ``overhead``: the method's own FLOPs for the
    whole batch. LLM prefill and decode are multiplied by ``batch_size``; the vision side already covers
    the batch through ``inputs``.
    """
    cfg = _model_config(model_or_config)
    tc = _text_config(cfg)
    layers = _text_dims(tc)[5]
    ns = _per_layer(llm_tokens, layers, "llm_tokens")
    enc, proj = vision_flops(cfg, inputs) if inputs is not None else (0.0, 0.0)
    if logits_positions is None:
        logits_positions = 1 if generated_tokens > 0 else ns[-1]
    prefill = llm_flops(tc, ns, 0, logits_positions)
    decode = decode_flops(tc, ns, generated_tokens - 1) if generated_tokens > 1 else 0.0
    return FlopsReport(
        vision=enc,
        projector=proj,
        llm_prefill=batch_size * prefill,
        decode=batch_size * decode,
        overhead=float(overhead),
        llm_fastv=batch_size * fastv_flops(tc, ns),
    )


def vit_flops_at_lengths(
    model_config: Any, rows: int, block_lengths: Sequence[tuple[int, int]], projector_tokens: int, num_blocks: int
) -> tuple[float, float]:
    """(encoder, projector) FLOPs of a LLaVA-family CLIP / SigLIP tower whose blocks change the sequence
    length (token merging), for ``rows`` images run as one padded batch. ``block_lengths[i]`` is the
    (padded) length block ``i`` attended over and the length its MLP ran at; blocks beyond the list were
    skipped. ``projector_tokens``: rows × length the projector received. Same convention as the rest:
    projections and MLP linear in n, the two attention products 2·n²·d each, the patch convolution."""
    cfg = _model_config(model_config)
    vc = cfg.vision_config
    d, inter = int(vc.hidden_size), int(vc.intermediate_size)
    ph, pw = _pair(vc.patch_size)
    side_h, side_w = _pair(vc.image_size)
    n_patches = (side_h // ph) * (side_w // pw)
    channels = int(getattr(vc, "num_channels", 3))
    enc = 2 * n_patches * channels * ph * pw * d
    for n_in, n_out in list(block_lengths)[:num_blocks]:
        enc += 2 * n_in * 4 * d * d + 4 * n_in * n_in * d + 4 * n_out * d * inter
    d_text = int(cfg.text_config.hidden_size)
    proj = 2 * int(projector_tokens) * (d * d_text + d_text * d_text)
    return float(rows * enc), float(proj)
