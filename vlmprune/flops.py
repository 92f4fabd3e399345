"""Analytic FLOPs of a stock Hugging Face VLM forward, prefill and decode, under one declared convention.

Convention (the one every vlmprune FLOPs figure uses)
------------------------------------------------------
* One multiply-add counts as 2 FLOPs. We count exactly what ``torch.utils.flop_counter.FlopCounterMode``
  counts: matrix multiplications (every ``nn.Linear``, the ``lm_head``), convolutions (patch embeddings) and
  the two attention products QKᵀ and A·V. Biases, norms, activations, softmax, rotary embeddings,
  residual adds, embedding look-ups, pixel shuffles and interpolations are ignored (about 1% or less at
  real model sizes).
* Vision encoder (each family's adapter applies this convention to its tower, ``Adapter.vision_flops``;
  this module keeps the shared formulas): the patch-embedding convolution plus every layer the Hugging Face
  vision tower actually executes (CLIP/SigLIP towers run all layers even when the feature layer is -2; SigLIP's attention-pooling
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

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "FlopsReport",
    "as_pair",
    "as_rows",
    "call_option",
    "cross_attention_flops",
    "decode_flops",
    "estimate",
    "fastv_flops",
    "llm_flops",
    "mlp_projector_flops",
    "supported_model_types",
    "vision_flops",
    "vit_flops",
    "vit_flops_at_lengths",
]


def supported_model_types() -> dict[str, str]:
    """``model_type`` of every supported VLM config -> the transformers class that uses it (from the adapters)."""
    from vlmprune.adapters import ADAPTERS

    return {mt: cls for adapter in ADAPTERS for cls, mt in zip(adapter.model_classes, adapter.model_types)}


def __getattr__(name: str) -> Any:
    """``SUPPORTED_MODEL_TYPES`` (see :func:`supported_model_types`), computed from the adapters when read."""
    if name == "SUPPORTED_MODEL_TYPES":
        return supported_model_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    names = ", ".join(f"{cls} ({mt})" for mt, cls in supported_model_types().items())
    return ValueError(
        f"vlmprune.flops: unsupported model config {type(config).__name__} "
        f"(model_type={getattr(config, 'model_type', None)!r}); supported: {names}"
    )


def _family(model_or_config: Any) -> tuple[Any, Any]:
    """(config, adapter class) of a supported VLM or its config; the adapter holds the family's facts."""
    from vlmprune.adapters import for_config

    cfg = getattr(model_or_config, "config", model_or_config)
    family = for_config(cfg)
    if family is None:
        raise _unsupported(cfg)
    return cfg, family


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
    """(hidden, heads, kv_heads, head_dim, mlp, layers, vocab) as the decoder layers are actually built
    (the head width is a family fact: the adapter owning this text config, or the shared default)."""
    from vlmprune.adapters import for_text_config

    d = int(tc.hidden_size)
    h = int(tc.num_attention_heads)
    kv = int(getattr(tc, "num_key_value_heads", None) or h)
    hd = for_text_config(tc).text_head_dim(tc)
    return d, h, kv, int(hd), int(tc.intermediate_size), int(tc.num_hidden_layers), int(tc.vocab_size)


def _per_layer(value: int | Sequence[int], layers: int, name: str) -> list[int]:
    if isinstance(value, int) or (hasattr(value, "__index__") and not isinstance(value, Sequence)):
        return [int(value)] * layers
    vals = [int(v) for v in value]
    if len(vals) != layers:
        raise ValueError(f"vlmprune.flops: {name} has {len(vals)} entries but the LLM has {layers} layers")
    return vals


def as_pair(x: Any) -> tuple[int, int]:
    """An int or an (h, w) pair (a config's ``patch_size`` / ``image_size``) as an (h, w) pair."""
    if isinstance(x, (list, tuple)):
        return int(x[0]), int(x[1])
    return int(x), int(x)


def as_rows(x: Any) -> list[list[int]]:
    """A (k, 2|3) tensor / array / nested list as a list of int rows."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [[int(v) for v in row] for row in x]


def call_option(inputs: Mapping[str, Any], cfg: Any, key: str) -> Any:
    """A forward kwarg passed with the inputs wins over the config default, as in the HF forward."""
    value = inputs.get(key)
    return getattr(cfg, key) if value is None else value


def vit_flops(vc: Any, n_patches: int, cls_token: bool, images: int, pooling_head: bool = False) -> int:
    """A pre-norm ViT tower (CLIP / SigLIP / InternViT) over ``images`` inputs of ``n_patches`` patches
    each: the patch convolution and every layer; ``pooling_head``: SigLIP's attention-pooling head."""
    d, inter, layers = int(vc.hidden_size), int(vc.intermediate_size), int(vc.num_hidden_layers)
    ph, pw = as_pair(vc.patch_size)
    channels = int(getattr(vc, "num_channels", 3))
    n = n_patches + (1 if cls_token else 0)
    conv = 2 * n_patches * channels * ph * pw * d
    # q, k, v, out projections (4·d²), QKᵀ and A·V (2·n²·d each), fc1 + fc2
    layer = 2 * n * 4 * d * d + 4 * n * n * d + 4 * n * d * inter
    head = 0
    if pooling_head:
        # nn.MultiheadAttention with one probe query: q and out on 1 token, k and v on n, then an MLP.
        head = 2 * d * d + 4 * n * d * d + 4 * n * d + 2 * d * d + 4 * d * inter
    return images * (conv + layers * layer + head)


def vit_block_flops(vc: Any, block_lengths: Sequence[tuple[int, int]]) -> int:
    """One image through a pre-norm ViT whose blocks run at changing lengths: the patch convolution over
    the config's image size, then per block (n_in, n_out) the projections and the attention products at
    n_in and the MLP at n_out."""
    d, inter = int(vc.hidden_size), int(vc.intermediate_size)
    ph, pw = as_pair(vc.patch_size)
    side_h, side_w = as_pair(vc.image_size)
    n_patches = (side_h // ph) * (side_w // pw)
    channels = int(getattr(vc, "num_channels", 3))
    enc = 2 * n_patches * channels * ph * pw * d
    for n_in, n_out in block_lengths:
        enc += 2 * n_in * 4 * d * d + 4 * n_in * n_in * d + 4 * n_out * d * inter
    return enc


def mlp_projector_flops(tokens: int, d_in: int, d_out: int) -> int:
    """A 2-layer MLP projector (d_in -> d_out -> d_out) over ``tokens`` tokens."""
    return 2 * int(tokens) * (int(d_in) * int(d_out) + int(d_out) * int(d_out))


def vision_flops(model_config: Any, inputs: Mapping[str, Any]) -> tuple[float, float]:
    """(encoder, projector) FLOPs for the visual inputs of one call, read from the tensors a processor
    returns, because that is what decides how many crops / frames / tiles / patches the tower really sees.

    ``model_config``: a supported VLM or its config; the family's adapter reads the inputs it takes
    (``Adapter.vision_flops``: e.g. AnyRes crops with ``image_sizes``, packed patches with their
    ``*_grid_thw``, InternVL tiles). ``vision_feature_layer`` / ``vision_feature_select_strategy`` in
    ``inputs`` override the config.
    """
    cfg, family = _family(model_config)
    return family.vision_flops(cfg, inputs)


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
    cfg, _ = _family(model_or_config)
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
    """(encoder, projector) FLOPs of a vision tower whose blocks change the sequence length (token
    merging), for ``rows`` images run as one padded batch. ``block_lengths[i]`` is the (padded) length
    block ``i`` attended over and the length its MLP ran at; blocks beyond the list were skipped.
    ``projector_tokens``: rows × length the projector received. The family's adapter applies the
    convention (``Adapter.vision_flops_at_lengths``); towers without a block layout raise."""
    cfg, family = _family(model_config)
    return family.vision_flops_at_lengths(cfg, rows, block_lengths, projector_tokens, num_blocks)
