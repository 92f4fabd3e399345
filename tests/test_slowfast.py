"""Slow-Fast video tokens: pure pooling, the fast-only / hybrid / SF-LLaVA modes on a tiny LLaVA
whose images are 2x2 frame mosaics (the built-in benchmark's video layout), adapter files, FLOPs
and a training smoke run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmprune
from vlmprune.flops import cross_attention_flops
from vlmprune.methods.slowfast import pooling as vp
from vlmprune.methods.slowfast.hybrid import AdapterFileError, load_adapter, save_adapter

from tiny import IMAGE_TOKEN, PAD, llama_config

SIDE = 8  # image grid 8x8 -> four 4x4 frames per mosaic image


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tiny_video_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=8 * SIDE, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=llama_config(num_hidden_layers=4), image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


def video_batch(images_per_sample: list[int], seed: int = 0, text_before: int = 3, text_after: int = 4) -> dict:
    """Left-padded prompts ``[text][image tokens x k][text]`` with k mosaic images per sample."""
    g = torch.Generator().manual_seed(seed)
    n = SIDE * SIDE
    rows, pixels = [], []
    for k in images_per_sample:
        before = torch.randint(5, 64, (text_before,), generator=g)
        after = torch.randint(5, 64, (text_after,), generator=g)
        rows.append(torch.cat([before, torch.full((n * k,), IMAGE_TOKEN), after]))
        pixels.append(torch.randn(k, 3, 8 * SIDE, 8 * SIDE, generator=g))
    longest = max(r.numel() for r in rows)
    ids = torch.full((len(rows), longest), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - r.numel():] = r
        mask[i, longest - r.numel():] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}


@pytest.fixture(scope="module")
def model():
    return tiny_video_llava()


VIDEO = dict(mosaic=2, t=4, p=2)


def randomise(handle, warm: float = 0.0, seed: int = 1) -> None:
    """Random kv / gate weights and a chosen warm-up gate value."""
    g = torch.Generator().manual_seed(seed)
    for name, p in handle.methods[0].hybrid.named_parameters():
        if name.endswith("cross_attn_warm_up_gate"):
            p.fill_(warm)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# -- pure pooling --------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 5, 8, 9, 16])
@pytest.mark.parametrize("s,t,p,min_fast", [(1, 1, 1, 1), (1, 4, 2, 1), (2, 2, 1, 1), (1, 3, 4, 1), (2, 4, 2, 4), (3, 2, 1, 2)])
def test_fast_counts_follow_the_procedure(T, s, t, p, min_fast):
    h = w = 8
    x = torch.randn(T, h, w, 3)
    out = vp.fast_pathway(x, s, t, p, min_fast)
    assert out.shape[0] * out.shape[1] * out.shape[2] == vp.fast_count(T, h, w, s, t, p, min_fast)
    assert out.shape[1:3] == (h // p, w // p)
    if T == 1:
        assert out.shape[0] == 1
    elif s == 1 and T // t >= min_fast:
        assert vp.fast_count(T, h, w, 1, t, p, min_fast) == math.ceil(T / t) * (h // p) * (w // p)


def test_fast_count_headline_settings():
    assert vp.fast_frames(64, 1, 4) == 16 and vp.fast_frames(96, 1, 6) == 16
    assert vp.fast_count(64, 24, 24, 1, 4, 2) == 16 * 144
    assert vp.fast_count(1, 9, 9, 1, 4, 2) == 16  # an image: floor(h / p)^2


def test_fast_pathway_values_match_avg_pool3d_with_zero_padding():
    x = torch.randn(6, 4, 4, 5)
    out = vp.fast_pathway(x, 1, 4, 2)
    padded = torch.cat([x, torch.zeros(2, 4, 4, 5)])  # zero frames count in the averages
    ref = F.avg_pool3d(padded.permute(3, 0, 1, 2).unsqueeze(0), (4, 2, 2)).squeeze(0).permute(1, 2, 3, 0)
    assert torch.allclose(out, ref, atol=1e-6)


def test_sf_llava_defaults_count_and_order():
    slow, fast = vp.slowfast_llava_count(50, 24, 24)
    assert (slow, fast) == (10 * 288, 50 * 16) and slow + fast == 3680
    assert vp.strided_indices(50, 10) == list(range(0, 50, 5))
    x = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1).expand(50, 24, 24, 1).contiguous()
    s, f = vp.slowfast_llava(x)
    assert s.shape == (10, 12, 24, 1) and f.shape == (50, 4, 4, 1)
    assert s[:, 0, 0, 0].tolist() == list(range(0, 50, 5))


# -- modes on a tiny mosaic-video LLaVA ------------------------------------------------------------


def prefill_and_step(model, inp):
    out = model(**inp, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([inp["attention_mask"], torch.ones_like(nxt)], dim=1)
    step = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
    return out.logits, step.logits, cache


@pytest.mark.parametrize("builder", ["qwen2_vl", "qwen2_5_vl"])
def test_two_videos_in_one_sample_are_pooled_each_on_its_own(builder):
    """Two videos of one prompt: each is pooled over its own frames (never across the boundary), its
    pooled tokens stay where it was, and the second video and the text after it are numbered after
    the first one's pooled grid, as the model numbers two videos of those grids."""
    from test_qwen2_vl import BUILDERS, make_batch

    model = BUILDERS[builder](seed=0)
    inp = make_batch(model, [dict(videos=[(4, 8, 8), (2, 8, 8)], before=3, after=4)], seed=2)
    seen, hook = _recorder(model)
    model(**inp)  # stock: video 1 in columns 4 .. 4 + 64, video 2 in 70 .. 70 + 32
    hook.remove()
    stock = seen[0]["inputs_embeds"][0]
    first = vp.fast_pathway(stock[4:68].view(4, 4, 4, -1), 1, 2, 2).flatten(0, 2)  # 8 tokens
    second = vp.fast_pathway(stock[70:102].view(2, 4, 4, -1), 1, 2, 2).flatten(0, 2)  # 4 tokens
    with vlmprune.apply(model, "slowfast", mode="fast", t=2, p=2) as h:
        seen, hook = _recorder(model)
        try:
            model(**inp)
        finally:
            hook.remove()
        rec = h.stats.records[0]
    assert rec.fast_tokens == [8 + 4] and rec.slow_tokens == [64 + 32]
    embeds, pos = seen[0]["inputs_embeds"][0], seen[0]["position_ids"][:, 0]
    assert embeds.shape[0] == 3 + 1 + 8 + 2 + 4 + 1 + 4
    assert torch.allclose(embeds[4:12], first, atol=1e-6) and torch.allclose(embeds[14:18], second, atol=1e-6)
    step = 2 if builder == "qwen2_5_vl" else 1

    def grid(t, start):
        tt, hh, ww = torch.meshgrid(torch.arange(t) * step, torch.arange(2), torch.arange(2), indexing="ij")
        return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + start

    assert torch.equal(pos[:, 4:12], grid(2, 4))
    assert torch.equal(pos[:, 12:14], torch.tensor([6, 7]).expand(3, 2))  # vision_end, vision_start
    assert torch.equal(pos[:, 14:18], grid(1, 8))
    assert torch.equal(pos[:, 18:], (torch.arange(5) + 10).expand(3, 5))


@pytest.mark.parametrize("impl", ["vanilla", "text-only-vanilla", "text-only-vanilla-masksystem"])
@pytest.mark.parametrize("during_decode", [False, True])
def test_zero_warm_up_gate_equals_fast_only_bit_exactly(model, impl, during_decode):
    inp = video_batch([2, 2], seed=3)
    with vlmprune.apply(model, "slowfast", mode="fast", **VIDEO):
        ref_pre, ref_step, _ = prefill_and_step(model, inp)
        ref_gen = model.generate(**inp, max_new_tokens=5, do_sample=False)
    with vlmprune.apply(model, "slowfast", mode="hybrid", cross_attn_impl=impl,
                        cross_attn_during_decode=during_decode, **VIDEO) as h:
        randomise(h, warm=0.0)
        assert h.methods[0].hybrid.layer_indices == [0, 2]
        pre, step, _ = prefill_and_step(model, inp)
        gen = model.generate(**inp, max_new_tokens=5, do_sample=False)
        assert h.stats.last.cross_attn_flops > 0  # the cross-attention really ran
    assert torch.equal(pre, ref_pre) and torch.equal(step, ref_step) and torch.equal(gen, ref_gen)


def test_nonzero_gate_changes_text_logits_continuously(model):
    inp = video_batch([2], seed=4)
    with vlmprune.apply(model, "slowfast", mode="fast", **VIDEO):
        base = model(**inp).logits
    with vlmprune.apply(model, "slowfast", mode="hybrid", **VIDEO) as h:
        diffs = []
        for warm in (1.0, 1e-2, 1e-4):
            randomise(h, warm=warm)
            diffs.append(float((model(**inp).logits - base).abs().max()))
    assert diffs[0] > diffs[1] > diffs[2] > 0 and diffs[2] < 1e-3


def test_kv_cache_holds_text_and_fast_tokens_only(model):
    inp = video_batch([2], seed=5)
    text = inp["attention_mask"].sum().item() - 2 * SIDE * SIDE
    lengths, slows = set(), []
    for vps, p in ((1, 4), (2, 2)):  # 4x4 frames: 16 or 4 slow tokens per frame, one fast token either way
        with vlmprune.apply(model, "slowfast", mode="hybrid", video_pooling_stride=vps, mosaic=2, t=4, p=p) as h:
            randomise(h, warm=0.5)
            out = model(**inp, use_cache=True)
            rec = h.stats.last
            lengths.add(out.past_key_values.get_seq_length())
            assert rec.fast_tokens == [2] and out.past_key_values.get_seq_length() == text + rec.fast_tokens[0]
            slows.append(rec.slow_tokens[0])
    assert slows == [128, 32] and len(lengths) == 1


def test_short_and_long_video_in_one_batch(model):
    alone = video_batch([1], seed=6)
    both = video_batch([1, 2], seed=6)  # same first sample, left-padded next to a longer video
    opts = dict(VIDEO, mosaic_min_images=1)
    with vlmprune.apply(model, "slowfast", mode="hybrid", **opts) as h:
        randomise(h, warm=0.7)
        single = model(**alone).logits[0, -1]
        batched = model(**both).logits[0, -1]
        assert h.stats.last.slow_tokens == [64, 128] and h.stats.last.fast_tokens == [4, 8]
        gen_single = model.generate(**alone, max_new_tokens=4, do_sample=False)[0, -4:]
        gen_batched = model.generate(**both, max_new_tokens=4, do_sample=False)[0, -4:]
    assert torch.allclose(single, batched, atol=1e-5)
    assert torch.equal(gen_single, gen_batched)


def test_cross_attention_flops_linear_in_slow_tokens(model):
    tc = model.config.text_config
    assert cross_attention_flops(tc, 7, 200, 2) == 2 * cross_attention_flops(tc, 7, 100, 2)
    flops = []
    for k in (1, 2):  # 4 frames -> 64 slow tokens, 8 frames -> 128; same text queries
        with vlmprune.apply(model, "slowfast", mode="hybrid", mosaic_min_images=1, **VIDEO) as h:
            model(**video_batch([k], seed=7))
            flops.append(h.stats.last.cross_attn_flops)
            assert h.stats.last.overhead_flops > h.stats.last.cross_attn_flops
    assert flops[1] == 2 * flops[0] > 0


def test_decode_flag(model):
    inp = video_batch([2], seed=8)
    steps = {}
    for flag in (False, True):
        with vlmprune.apply(model, "slowfast", mode="hybrid", cross_attn_during_decode=flag, **VIDEO) as h:
            randomise(h, warm=0.8)
            out = model(**inp, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([inp["attention_mask"], torch.ones_like(nxt)], dim=1)
            frozen = copy.deepcopy(cache)
            steps[flag] = model(input_ids=nxt, attention_mask=mask, cache=cache).logits
        # the stock model continuing the same cache: no slow information beyond the cache
        plain = model(input_ids=nxt, attention_mask=mask, cache=frozen).logits
        if flag:
            assert not torch.allclose(steps[flag], plain, atol=1e-4)
        else:
            assert torch.allclose(steps[flag], plain, atol=1e-6)


def test_pooling_mode_counts_order_and_images_unchanged(model):
    inp = video_batch([2, 1], seed=9)  # sample 1 has one image: an image, not a video
    ref = model(**inp).logits
    with vlmprune.apply(model, "slowfast", mode="pooling", mosaic=2, slow_frames=2, slow_stride=(2, 1), fast_stride=2) as h:
        out = model(**inp).logits
        rec = h.stats.last
    assert rec.slow_tokens == [2 * 2 * 4, 0] and rec.fast_tokens == [8 * 4, 0]
    assert rec.visual_out == [48, 64]  # the image keeps its 64 tokens
    n_ref = inp["attention_mask"][1].sum()
    assert torch.allclose(out[1, -n_ref:], ref[1, -n_ref:], atol=1e-5)  # image sample unchanged (re-padded batch)


def test_pooled_tokens_are_the_pooled_features(model):
    inp = video_batch([2], seed=10)
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    model(**inp)  # stock: the image features sit in columns 3 .. 3 + 128
    hook.remove()
    feats = seen[-1][0, 3 : 3 + 2 * SIDE * SIDE]
    frames = feats.view(2, 2, 4, 2, 4, -1).permute(0, 1, 3, 2, 4, 5).reshape(8, 4, 4, -1)  # mosaic tiles, row-major
    with vlmprune.apply(model, "slowfast", mode="pooling", mosaic=2, slow_frames=2, slow_stride=2, fast_stride=4):
        hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)  # after the seam's
        try:
            model(**inp)
        finally:
            hook.remove()
    slow, fast = vp.slowfast_llava(frames, 2, 2, None, 4)
    expected = torch.cat([slow.flatten(0, 2), fast.flatten(0, 2)])  # slow block, then fast block
    got = seen[-1][0, 3 : 3 + expected.shape[0]]
    assert seen[-1].shape[1] == inp["input_ids"].shape[1] - 2 * SIDE * SIDE + expected.shape[0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_bad_inputs_are_clear_errors(model):
    inp = video_batch([2], seed=11)
    with vlmprune.apply(model, "slowfast", mode="fast", mosaic=2, p=3):
        with pytest.raises(ValueError, match="does not divide the frame grid"):
            model(**inp)
    with vlmprune.apply(model, "slowfast", mode="pooling", mosaic=3):
        with pytest.raises(ValueError, match="mosaic=3 does not divide"):
            model(**inp)
    with pytest.raises(ValueError, match="mode must be one of"):
        vlmprune.apply(model, "slowfast", mode="slow")
    with pytest.raises(ValueError, match="positive integer"):
        vlmprune.apply(model, "slowfast", t=0)
    with pytest.raises(ValueError, match="out of range"):
        vlmprune.apply(model, "slowfast", layers=(7,))
    # a video shorter than slow_frames uses all its frames (documented fallback)
    with vlmprune.apply(model, "slowfast", mode="pooling", mosaic=2, slow_frames=50, slow_stride=2, fast_stride=4) as h:
        model(**inp)
        assert h.stats.last.slow_tokens == [8 * 4]
    # an image where the hybrid wants a video: passes through, no cross-attention (documented fallback)
    image = video_batch([1], seed=12)
    ref = model(**image).logits
    with vlmprune.apply(model, "slowfast", mode="hybrid", **VIDEO) as h:
        randomise(h, warm=1.0)
        assert torch.equal(model(**image).logits, ref)
        assert h.stats.last.fast_tokens == [0] and h.stats.last.cross_attn_flops == 0


def test_remove_restores_and_model_state_dict_untouched(model):
    inp = video_batch([2], seed=13)
    ref = model(**inp).logits
    keys = set(model.state_dict())
    h = vlmprune.apply(model, "slowfast", mode="hybrid", **VIDEO)
    randomise(h, warm=1.0)
    assert not torch.equal(model(**inp).logits[:, -1], ref[:, -1])
    assert set(model.state_dict()) == keys
    h.remove()
    assert torch.equal(model(**inp).logits, ref)


def test_adapter_save_load_round_trip(model, tmp_path):
    inp = video_batch([2], seed=14)
    with vlmprune.apply(model, "slowfast", mode="hybrid", layers=(1, 3), lora_rank=2, **VIDEO) as h:
        randomise(h, warm=0.6, seed=5)
        before = model(**inp).logits
        for p in h.methods[0].lora.B.values():
            p.normal_()
        want = model(**inp).logits
        assert not torch.equal(want, before)  # the LoRA deltas act
        save_adapter(h.methods[0].hybrid, tmp_path / "ad", lora=h.methods[0].lora.deltas(),
                     extra={"fast": {"s": 1, "t": 4, "p": 2}, "lora_alpha": 16.0})
    hybrid, lora, extra = load_adapter(tmp_path / "ad")
    assert hybrid.layer_indices == [1, 3] and len(lora) == 4 * 2 * 2 and extra["fast"]["t"] == 4
    with vlmprune.apply(model, "slowfast", mode="hybrid", adapter=str(tmp_path / "ad"), mosaic=2) as h:
        assert torch.equal(model(**inp).logits, want)
    assert not torch.equal(model(**inp).logits[:, -1], want[:, -1])  # removed with the handle
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(AdapterFileError, match="corrupt"):
        vlmprune.apply(model, "slowfast", adapter=str(tmp_path / "bad.safetensors"), mosaic=2)
    with pytest.raises(AdapterFileError, match="train one"):
        vlmprune.apply(model, "slowfast", adapter=str(tmp_path / "missing"), mosaic=2)


def test_training_smoke(tmp_path):
    from vlmprune.evals.builtin import Sizes, build_untrained, save_builtin
    from vlmprune.methods.slowfast.training import main

    small = Sizes(vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_hidden=32, text_layers=2,
                  text_heads=2, text_mlp=64)
    m, proc = build_untrained(seed=0, sizes=small)
    save_builtin(m, proc, tmp_path / "model")
    out = tmp_path / "sf"
    args = ["--model", str(tmp_path / "model"), "--output", str(out), "--steps", "2", "--batch-size", "2",
            "--eval-batches", "1", "--lora-rank", "2", "--threads", "1"]
    with torch.enable_grad():
        assert main(args) == 0
    hybrid, lora, extra = load_adapter(out)
    assert lora and extra["steps"] == 2 and float(hybrid.layers["0"].cross_attn_warm_up_gate) != 0.0
    assert (out / "train-state.pt").exists()
    with torch.enable_grad():
        assert main(args[:5] + ["4"] + args[6:]) == 0  # resumes from step 2
    assert load_adapter(out)[2]["steps"] == 4


# -- LLaVA-OneVision and Qwen2-VL video input ------------------------------------------------------


def _recorder(model):
    seen = []

    def hook(module, args, kwargs):
        seen.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_onevision_video_fast_and_hybrid():
    from test_llava_next import FRAMES, POOLED, make_inputs, tiny_onevision

    model = tiny_onevision(seed=0)
    model.generation_config.pad_token_id = PAD
    inp = {k: v for k, v in make_inputs(model, [{"video": True, "seed": 1}]).items() if not k.startswith("_")}
    ref = model(**inp).logits
    text = int(inp["attention_mask"].sum()) - (FRAMES * POOLED + 1)
    with vlmprune.apply(model, "slowfast", mode="fast", t=2, p=3) as h:
        fast = model(**inp, use_cache=True)
        fast_gen = model.generate(**inp, max_new_tokens=4, do_sample=False)
        rec = h.stats.last
    assert rec.fast_tokens == [2] and rec.slow_tokens == [FRAMES * POOLED]
    assert rec.visual_out == [2 + 1]  # fast tokens, then the newline the processor adds after a video
    assert fast.past_key_values.get_seq_length() == text + 3
    with vlmprune.apply(model, "slowfast", mode="hybrid", t=2, p=3, layers=(0, 1)) as h:
        randomise(h, warm=0.0)
        assert torch.equal(model(**inp).logits, fast.logits)
        assert torch.equal(model.generate(**inp, max_new_tokens=4, do_sample=False), fast_gen)
        randomise(h, warm=0.5)
        assert not torch.equal(model(**inp).logits[:, -1], fast.logits[:, -1])
    assert torch.equal(model(**inp).logits, ref)


@pytest.mark.parametrize("builder", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_video_positions_follow_the_pooled_grid(builder):
    from test_qwen2_vl import BUILDERS, make_batch

    model = BUILDERS[builder](seed=0)
    inp = make_batch(model, [dict(videos=[(4, 8, 8)], before=3, after=4)], seed=2)
    ref = model(**inp).logits
    with vlmprune.apply(model, "slowfast", mode="fast", t=2, p=2) as h:
        seen, hook = _recorder(model)  # after the seam's hook
        try:
            out = model(**inp).logits
            gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
        finally:
            hook.remove()
        rec = h.stats.records[0]
    assert rec.fast_tokens == [2 * 2 * 2] and rec.slow_tokens == [4 * 16]
    pos = seen[0]["position_ids"]  # (3, 1, L'): text 0..3 (3 tokens + vision_start), video grid, text
    assert pos.shape[-1] == 3 + 1 + 8 + 1 + 4
    video = pos[:, 0, 4:12]
    step = 2 if builder == "qwen2_5_vl" else 1  # tokens_per_second x second_per_grid_t, as the model spaces slots
    tt, hh, ww = torch.meshgrid(torch.arange(2) * step, torch.arange(2), torch.arange(2), indexing="ij")
    assert torch.equal(video, torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + 4)
    after = pos[:, 0, 12:]
    assert torch.equal(after, (torch.arange(5) + 6).expand(3, 5))  # vision_end and text: start + max(h', w')
    assert gen.shape[1] == inp["input_ids"].shape[1] + 3
    with vlmprune.apply(model, "slowfast", mode="hybrid", t=2, p=2, layers=(0, 1)) as h:
        randomise(h, warm=0.0)
        assert torch.equal(model(**inp).logits, out)
        assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), gen)
    assert torch.equal(model(**inp).logits, ref)


@pytest.mark.parametrize("impl", ["vanilla", "text-only-vanilla", "text-only-vanilla-masksystem"])
def test_query_sets(model, impl):
    """Spec §10.6: with a non-zero gate, changing the slow tokens changes layer 0's output only at
    the querying positions (text; after the first visual token with masksystem; all for vanilla)."""
    from vlmprune import context

    inp = video_batch([2], seed=15)
    outs = []
    for scale in (1.0, 3.0):
        with vlmprune.apply(model, "slowfast", mode="hybrid", cross_attn_impl=impl, **VIDEO) as h:
            randomise(h, warm=0.9)

            def alter(module, args, scale=scale, h=h):
                context.current(h).captured["slowfast.state"][-1].slow.mul_(scale)

            layers = model.model.language_model.layers
            hooks = [layers[0].register_forward_pre_hook(alter),
                     layers[0].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))]
            try:
                model(**inp)
            finally:
                for x in hooks:
                    x.remove()
    changed = (outs[0] - outs[1]).abs().amax(-1)[0] > 0  # per column of the pruned sequence: 3 text, 8 fast, 4 text
    expected = {"vanilla": [True] * 15, "text-only-vanilla": [True] * 3 + [False] * 8 + [True] * 4,
                "text-only-vanilla-masksystem": [False] * 11 + [True] * 4}[impl]
    assert changed.tolist() == expected
