"""Cross-check vlmprune.flops against torch.utils.flop_counter.FlopCounterMode on tiny random models.

Every family runs one real forward (processor-shaped inputs) under the counter and must agree with the
analytic estimate within 2%. The tiny models are built from configs (no download) and are wide enough that
the ops neither side counts (norms, softmax, rope) do not matter.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)

from vlmprune.flops import (
    FlopsReport,
    decode_flops,
    estimate,
    fastv_flops,
    llm_flops,
    vision_flops,
)

TOL = 0.02
VOCAB = 256
IMG, VID, V_START, V_END = 250, 251, 252, 253
D = 64  # hidden width of every tower and LLM


# On CPU, SDPA runs aten._scaled_dot_product_flash_attention_for_cpu, which FlopCounterMode has no formula for
# (it would count the attention products as 0). Count it like the GPU SDPA kernels so eager and SDPA agree.
def _sdpa_cpu_flop(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and A·V of (B, H, S, E) shapes, as the counter's formula for the GPU SDPA kernels."""
    b, h, s_q, e = q
    return 2 * b * h * s_q * k[-2] * e + 2 * b * h * s_q * k[-2] * v[-1]


SDPA_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}


def _counted(fn) -> tuple[float, object]:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_CPU) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


def _text(kind: str) -> dict:
    common = dict(
        hidden_size=D,
        intermediate_size=2 * D,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    # Qwen2-VL text: head_dim 16 -> mrope sections sum to 8
    return dict(
        **common, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}
    )


def _vit(kind: str, **kw) -> object:
    common = dict(
        hidden_size=D,
        intermediate_size=2 * D,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
    )
    common.update(kw)
    return CLIPVisionConfig(**common) if kind == "clip" else SiglipVisionConfig(**common)


def _ids(*segments: tuple[int, int]) -> torch.Tensor:
    """input_ids (1, n) from (token, count) segments; token -1 = random text."""
    parts = []
    for tok, count in segments:
        parts.append(torch.randint(3, 200, (count,)) if tok < 0 else torch.full((count,), tok))
    return torch.cat(parts)[None]


# ---------------------------------------------------------------------------------------- model factories
# Each returns (model, inputs, n_llm_tokens).


def make_llava(attn: str, tower: str = "clip", batch: int = 1):
    cfg = LlavaConfig(
        vision_config=_vit(tower),
        text_config=_text("llama"),
        image_token_id=IMG,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default" if tower == "clip" else "full",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    tokens = 64  # (32/4)² patches, CLS dropped ("default") or absent (SigLIP)
    ids = torch.cat([_ids((-1, 5), (IMG, tokens), (-1, 20)) for _ in range(batch)])
    return model, {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 32, 32)}, ids.shape[1]


def _pack_tokens(model, inputs, **kw) -> int:
    feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **kw).pooler_output
    return sum(f.shape[0] for f in feats)


def make_llava_next(attn: str):
    cfg = LlavaNextConfig(
        vision_config=_vit("clip"),
        text_config=_text("llama"),
        image_token_id=IMG,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_feature_layer=-2,
    )
    model = LlavaNextForConditionalGeneration(cfg).eval()
    # two images: the first uses 5 crops (64x64 grid + base), the second 3 (32x64 grid + base)
    inputs = {"pixel_values": torch.randn(2, 5, 3, 32, 32), "image_sizes": torch.tensor([[60, 62], [30, 60]])}
    n_img = _pack_tokens(model, inputs)
    inputs["input_ids"] = _ids((-1, 4), (IMG, n_img), (-1, 12))
    return model, inputs, inputs["input_ids"].shape[1]


def make_llava_onevision(attn: str):
    cfg = LlavaOnevisionConfig(
        vision_config=_vit("siglip", vision_use_head=False),
        text_config=_text("qwen2"),
        image_token_id=IMG,
        video_token_id=VID,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
    )
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    inputs = {
        "pixel_values": torch.randn(1, 5, 3, 32, 32),
        "image_sizes": torch.tensor([[40, 80]]),
        "pixel_values_videos": torch.randn(1, 3, 3, 32, 32),
    }
    n_img = _pack_tokens(model, inputs)
    n_vid = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output.shape[1]
    inputs["input_ids"] = _ids((-1, 4), (IMG, n_img), (-1, 3), (VID, n_vid), (-1, 8))
    return model, inputs, inputs["input_ids"].shape[1]


def _qwen_inputs(model, image_thw: list[int], video_thw: list[int] | None):
    vc = model.config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    merge = vc.spatial_merge_size**2
    n_img = image_thw[0] * image_thw[1] * image_thw[2]
    inputs = {"pixel_values": torch.randn(n_img, patch_dim), "image_grid_thw": torch.tensor([image_thw])}
    segs = [(-1, 4), (V_START, 1), (IMG, n_img // merge), (V_END, 1), (-1, 6)]
    if video_thw is not None:
        n_vid = video_thw[0] * video_thw[1] * video_thw[2]
        inputs["pixel_values_videos"] = torch.randn(n_vid, patch_dim)
        inputs["video_grid_thw"] = torch.tensor([video_thw])
        segs += [(V_START, 1), (VID, n_vid // merge), (V_END, 1), (-1, 5)]
    ids = _ids(*segs)
    inputs["input_ids"] = ids
    inputs["mm_token_type_ids"] = (ids == IMG).int() + 2 * (ids == VID).int()
    return inputs


def make_qwen2_vl(attn: str):
    cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=D,
            hidden_size=D,
            num_heads=4,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=_text("qwen2_vl"),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    inputs = _qwen_inputs(model, [1, 8, 12], [2, 4, 6])
    return model, inputs, inputs["input_ids"].shape[1]


def make_qwen2_5_vl(attn: str):
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=4,
            hidden_size=D,
            out_hidden_size=D,
            intermediate_size=2 * D,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[1, 3],
        ),
        text_config=_text("qwen2_vl"),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # 12x10 patches -> 6x5 merged -> windows of 2x2 merged: 3 rows x (2, 2, 1) cols; the video divides evenly
    inputs = _qwen_inputs(model, [1, 12, 10], [2, 8, 8])
    return model, inputs, inputs["input_ids"].shape[1]


def make_internvl(attn: str):
    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=D,
            intermediate_size=2 * D,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
            use_qk_norm=True,
        ),
        text_config=_text("qwen2"),
        image_token_id=IMG,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
    )
    model = InternVLForConditionalGeneration(cfg).eval()
    tiles = 3
    ids = _ids((-1, 4), (IMG, tiles * 16), (-1, 10))  # (32/4)² = 64 patches -> 16 after pixel shuffle
    return model, {"input_ids": ids, "pixel_values": torch.randn(tiles, 3, 32, 32)}, ids.shape[1]


FAMILIES = {
    "llava-clip": make_llava,
    "llava-siglip": lambda attn: make_llava(attn, tower="siglip"),
    "llava_next": make_llava_next,
    "llava_onevision": make_llava_onevision,
    "qwen2_vl": make_qwen2_vl,
    "qwen2_5_vl": make_qwen2_5_vl,
    "internvl": make_internvl,
}


def _build(name: str, attn: str):
    torch.manual_seed(0)
    model, inputs, n = FAMILIES[name](attn)
    model.set_attn_implementation(attn)
    return model, inputs, n


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_forward_matches_flop_counter(name: str, attn: str) -> None:
    model, inputs, n = _build(name, attn)
    measured, _ = _counted(lambda: model(**inputs, use_cache=False))
    report = estimate(model, inputs, n, logits_positions=n)
    assert report.vision > 0 and report.projector > 0 and report.llm_prefill > 0
    err = _rel(report.total, measured)
    print(f"{name:16s} {attn:5s} forward rel err {err:.2e}")
    assert err < TOL, (name, attn, report.as_dict(), measured)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_decode_step_matches_flop_counter(name: str) -> None:
    model, inputs, n = _build(name, "eager")
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    measured, _ = _counted(lambda: model(input_ids=nxt, cache=out.cache, use_cache=True))
    expected = decode_flops(model.config.text_config, n, 1)
    err = _rel(expected, measured)
    print(f"{name:16s} decode rel err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("name", ["llava-clip", "qwen2_vl"])
def test_generate_matches_flop_counter(name: str) -> None:
    """generate(): prefill with logits for 1 position, then G - 1 one-token decode steps."""
    model, inputs, n = _build(name, "eager")
    g = 4
    measured, seq = _counted(
        lambda: model.generate(**inputs, max_new_tokens=g, min_new_tokens=g, do_sample=False, pad_token_id=0)
    )
    assert seq.shape[1] == n + g
    report = estimate(model, inputs, n, generated_tokens=g)
    assert report.decode == pytest.approx(decode_flops(model.config, n, g - 1))
    assert _rel(report.total, measured) < TOL


def test_batch_size_scales_llm_only() -> None:
    model, inputs, n = _build("llava-clip", "eager")
    _, inputs2, _ = make_llava("eager", batch=2)  # same config, two images, two sequences of length n
    measured, _ = _counted(lambda: model(**inputs2, use_cache=False))
    one = estimate(model, inputs, n)
    two = estimate(model, inputs2, n, batch_size=2)
    assert two.vision == pytest.approx(2 * one.vision)  # read from the 2-image pixel_values
    assert two.llm_prefill == pytest.approx(2 * one.llm_prefill)  # multiplied by batch_size
    assert _rel(two.total, measured) < TOL


def test_qwen2_5_windowed_attention_is_cheaper_than_full() -> None:
    model, inputs, _ = _build("qwen2_5_vl", "eager")
    windowed, _ = vision_flops(model.config, inputs)
    model.config.vision_config.fullatt_block_indexes = list(range(model.config.vision_config.depth))
    full, _ = vision_flops(model.config, inputs)
    assert windowed < full


def test_llm_flops_hand_computed() -> None:
    """One layer, n=4, past=2, d=8, 2 heads (hd 4), 1 KV head, m=16, vocab 10."""
    tc = LlamaConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=10,
    )
    n, p = 4, 2
    q_o = 2 * (2 * n * 8 * 8)
    k_v = 2 * (2 * n * 8 * 4)
    attn = 2 * (2 * n * (n + p) * 8)
    mlp = 3 * (2 * n * 8 * 16)
    assert llm_flops(tc, n, past=p, logits_positions=1) == q_o + k_v + attn + mlp + 2 * 1 * 8 * 10
    assert llm_flops(tc, n, past=p) == q_o + k_v + attn + mlp + 2 * n * 8 * 10
    steps = [llm_flops(tc, 1, past=5 + i, logits_positions=1) for i in range(3)]
    assert decode_flops(tc, 5, 3) == sum(steps)


def test_fastv_formula_hand_computed() -> None:
    tc = LlamaConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=10,
    )

    def f(n: int) -> int:
        return 4 * n * 8**2 + 2 * n**2 * 8 + 2 * n * 8 * 16

    assert f(10) == 2560 + 1600 + 2560
    assert fastv_flops(tc, 10) == 3 * f(10)
    # pruned after layer K=1 from 10 to 4 tokens: K·f(n) + (T−K)·f(n′)
    assert fastv_flops(tc, [10, 4, 4]) == 1 * f(10) + 2 * f(4)


def test_per_layer_token_list() -> None:
    tc = _text("llama")
    assert llm_flops(tc, [30, 30]) == llm_flops(tc, 30)
    mixed = llm_flops(tc, [30, 10], logits_positions=1)
    full, small = llm_flops(tc, 30, logits_positions=1), llm_flops(tc, 10, logits_positions=1)
    head = 2 * D * VOCAB
    assert mixed == pytest.approx((full - head) / 2 + (small - head) / 2 + head)
    assert decode_flops(tc, [30, 10], 2) < decode_flops(tc, 30, 2)
    report = estimate(LlavaConfig(vision_config=_vit("clip"), text_config=tc), None, [30, 10])
    assert report.vision == 0 and report.llm_prefill == mixed - head + 10 * head
    assert report.llm_fastv == fastv_flops(tc, [30, 10])
    with pytest.raises(ValueError, match="2 layers"):
        llm_flops(tc, [30, 20, 10])


def test_report_total_and_dict() -> None:
    r = FlopsReport(vision=1.0, projector=2.0, llm_prefill=3.0, decode=4.0, overhead=5.0, llm_fastv=100.0)
    assert r.total == 15.0
    assert r.as_dict() == {
        "vision": 1.0,
        "projector": 2.0,
        "llm_prefill": 3.0,
        "decode": 4.0,
        "overhead": 5.0,
        "llm_fastv": 100.0,
        "total": 15.0,
    }
    with pytest.raises(AttributeError):
        r.vision = 0.0  # frozen


def test_overhead_is_added() -> None:
    model, inputs, n = _build("internvl", "eager")
    base = estimate(model, inputs, n)
    plus = estimate(model, inputs, n, overhead=1e6)
    assert plus.total == pytest.approx(base.total + 1e6)


def test_unsupported_config_raises() -> None:
    with pytest.raises(ValueError, match="supported:.*LlavaForConditionalGeneration"):
        estimate(LlamaConfig(), None, 10)
    with pytest.raises(ValueError, match="Qwen2_5_VLForConditionalGeneration"):
        vision_flops(Qwen2Config(), {})
    with pytest.raises(ValueError, match="not a decoder text config"):
        llm_flops(CLIPVisionConfig(), 10)
