"""downsample: the encoder gets a smaller image, on tiny random-init Qwen2-VL, Qwen2.5-VL and InternVL.

The strongest check builds the smaller inputs directly (the prompt a processor gives the smaller image,
with the pixels the adapter's resize makes) and runs the STOCK model on them: the patched model on the
full-size inputs must give the same logits, decoder positions and generated tokens. The resizes
themselves are checked against the processors' own layouts (their PIL image processors, which need no
torchvision) and against ``F.interpolate`` of the reconstructed image.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_internvl import MERGED, prompt, tiny_internvl
from test_qwen2_vl import make_batch, tiny_qwen2_5_vl, tiny_qwen2_vl

import vlmprune
from vlmprune import flops as flops_mod
from vlmprune.adapters.internvl import InternVLAdapter
from vlmprune.adapters.qwen2_vl import Qwen2VLAdapter
from vlmprune.method import keep_count

from tiny import llava_inputs, tiny_llava

P, M, TP = 4, 2, 2  # the tiny Qwen towers: patch 4, merge 2, temporal patch 2
TILE = 32  # the tiny InternVL tile side (8x8 patches -> 16 tokens)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


QWEN = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


@pytest.fixture(scope="module", params=sorted(QWEN))
def qwen(request):
    return QWEN[request.param]()


@pytest.fixture(scope="module")
def internvl():
    return tiny_internvl()


def budget(ratio: float):
    return lambda n: keep_count(n, ratio)


def record_decoder(model):
    seen: list[dict] = []

    def hook(module, args, kwargs):
        seen.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids")})

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def run(model, inputs, **kw):
    """Logits and what the decoder received."""
    seen, hook = record_decoder(model)
    try:
        out = model(**inputs, **kw)
    finally:
        hook.remove()
    return out.logits, seen[-1]


# -- Qwen2-VL: the pure resize --------------------------------------------------------------------
def test_patch_layout_is_the_processors():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = torch.randn(3, 48, 64, generator=torch.Generator().manual_seed(0))
    ref, gh, gw = Qwen2VLImageProcessorPil().patchify(image.numpy(), P, M, TP)
    ours = Qwen2VLAdapter.frames_to_patches(image.expand(TP, -1, -1, -1), P, M, TP)
    assert (gh, gw) == (12, 16) and torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref)))
    back = Qwen2VLAdapter.patches_to_frames(ours, (1, 12, 16), P, M, TP)
    assert torch.equal(back, image.expand(TP, -1, -1, -1))
    video = torch.randn(3 * TP, 3, 16, 24)  # a round trip over several temporal slots
    patches = Qwen2VLAdapter.frames_to_patches(video, P, M, TP)
    assert torch.equal(Qwen2VLAdapter.patches_to_frames(patches, (3, 4, 6), P, M, TP), video)


@pytest.mark.parametrize(("hw", "k", "expected"), [
    ((6, 8), 12, (3, 4)), ((16, 16), 64, (8, 8)), ((4, 6), 24, (4, 6)), ((4, 6), 6, (2, 3)), ((2, 2), 1, (1, 1)),
    ((3, 9), 3, (1, 3)), ((6, 5), 8, (3, 3)), ((1, 12), 6, (1, 6)), ((12, 1), 5, (5, 1)), ((24, 24), 13, (4, 4)),
])
def test_smaller_grid(hw, k, expected):
    assert Qwen2VLAdapter.smaller_grid(*hw, k) == expected


def test_smaller_grid_is_about_k_and_keeps_the_aspect():
    for h in range(1, 13):
        for w in range(1, 13):
            for k in range(1, h * w + 1):
                a, b = Qwen2VLAdapter.smaller_grid(h, w, k)
                assert 1 <= a <= h and 1 <= b <= w
                s = math.sqrt(k / (h * w))
                if h * s >= 1 and w * s >= 1:
                    assert abs(a - h * s) <= 0.5 and abs(b - w * s) <= 0.5  # each side rounded to the nearest
                assert abs(a * b - k) <= (a + b) / 2


def test_identity_at_ratio0_and_resize_equals_interpolate(qwen):
    adapter = Qwen2VLAdapter(qwen)
    inputs = make_batch(qwen, [dict(images=[(1, 12, 16), (1, 4, 4)], videos=[(2, 8, 8)])])
    same, items = adapter.resize_image_inputs(inputs, budget(0.0))
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(same[key], inputs[key])
    assert [i.kept for i in items] == [[48], [4], [16, 16]]
    small, items = adapter.resize_image_inputs(inputs, budget(0.75))
    assert small["image_grid_thw"].tolist() == [[1, 6, 8], [1, 2, 2]] and small["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert [i.new_grid for i in items] == [(1, 3, 4), (1, 1, 1), (2, 2, 2)]
    # a known image: the first one's frames, interpolated by torch, cut the processor's way
    frames = Qwen2VLAdapter.patches_to_frames(inputs["pixel_values"][:192], (1, 12, 16), P, M, TP)
    ref = F.interpolate(frames, size=(24, 32), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(small["pixel_values"][:48], Qwen2VLAdapter.frames_to_patches(ref, P, M, TP))
    bilinear, _ = adapter.resize_image_inputs(inputs, budget(0.75), "bilinear")
    ref = F.interpolate(frames, size=(24, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(bilinear["pixel_values"][:48], Qwen2VLAdapter.frames_to_patches(ref, P, M, TP))
    video = Qwen2VLAdapter.patches_to_frames(inputs["pixel_values_videos"], (2, 8, 8), P, M, TP)
    ref = F.interpolate(video, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(small["pixel_values_videos"], Qwen2VLAdapter.frames_to_patches(ref, P, M, TP))


def test_resize_agrees_with_the_processor_on_the_smaller_image():
    """The processor given the same picture at the smaller size (its max_pixels) lays out the same grid
    and nearly the same pixels (it resizes uint8 with PIL; we resize its normalised output)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    picture = np.random.RandomState(0).randint(0, 255, (48, 64, 3), dtype=np.uint8)
    picture = np.asarray(F.avg_pool2d(torch.from_numpy(picture).permute(2, 0, 1).float(), 3, 1, 1)
                         .round().byte().permute(1, 2, 0))  # smoother than noise, like a photograph
    geometry = dict(patch_size=P, merge_size=M, temporal_patch_size=TP)
    full = Qwen2VLImageProcessorPil(**geometry, size={"shortest_edge": 64, "longest_edge": 64 * 64})(
        images=[picture], return_tensors="pt")
    small = Qwen2VLImageProcessorPil(**geometry, size={"shortest_edge": 64, "longest_edge": 24 * 32})(
        images=[picture], return_tensors="pt")
    assert full["image_grid_thw"].tolist() == [[1, 12, 16]] and small["image_grid_thw"].tolist() == [[1, 6, 8]]
    ours, _ = Qwen2VLAdapter(tiny_qwen2_vl()).resize_image_inputs(dict(full), budget(0.75))
    assert torch.equal(ours["image_grid_thw"], small["image_grid_thw"])
    diff = (ours["pixel_values"] - small["pixel_values"]).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.05  # normalised units: one 8-bit level is about 0.014


# -- Qwen2-VL: the patched model equals the stock model on the smaller image ----------------------
def small_qwen_inputs(model, samples, ratio, seed):
    """Full inputs, and the inputs a processor gives the smaller images (same text, the adapter's pixels)."""
    full = make_batch(model, samples, seed=seed)
    pixels, items = Qwen2VLAdapter(model).resize_image_inputs(full, budget(ratio))
    images = iter(i for i in items if i.kind == "image")
    videos = iter(i for i in items if i.kind == "video")

    def grid(item):
        t, h, w = item.new_grid
        return (t, h * M, w * M)

    small_samples = [dict(s, images=[grid(next(images)) for _ in s.get("images", ())],
                          videos=[grid(next(videos)) for _ in s.get("videos", ())]) for s in samples]
    small = make_batch(model, small_samples, seed=seed)
    small.update(pixels)
    return full, small, items


SAMPLES = [dict(images=[(1, 8, 12), (1, 4, 4)], videos=[(2, 4, 8)], before=3, after=5)]


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_equals_stock_model_on_the_smaller_images(qwen, ratio):
    full, small, items = small_qwen_inputs(qwen, SAMPLES, ratio, seed=1)
    ref, ref_seen = run(qwen, small)
    with vlmprune.apply(qwen, "downsample", ratio=ratio) as handle:
        out, seen = run(qwen, full)
        rec = handle.stats.last
        gen = qwen.generate(**full, max_new_tokens=5, do_sample=False)
    assert torch.equal(seen["position_ids"], ref_seen["position_ids"])  # M-RoPE of the smaller grids
    torch.testing.assert_close(seen["inputs_embeds"], ref_seen["inputs_embeds"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    ref_gen = qwen.generate(**small, max_new_tokens=5, do_sample=False)
    assert torch.equal(gen[:, -5:], ref_gen[:, -5:])  # decoding continues where the stock model would
    sizes = [sum(i.kept) for i in items]
    assert rec.visual_in == [24 + 4 + 16] and rec.visual_out == [sum(sizes)] and rec.image_tokens == sizes
    assert sizes[0] == keep_count(24, ratio) or abs(sizes[0] - keep_count(24, ratio)) <= 3
    vision, projector = flops_mod.vision_flops(qwen, small)
    assert rec.vision_flops == pytest.approx(vision) and rec.projector_flops == pytest.approx(projector)
    assert rec.vision_flops < flops_mod.vision_flops(qwen, full)[0] and rec.overhead_flops > 0


def test_counts_per_image_and_frame(qwen):
    full = make_batch(qwen, [dict(images=[(1, 16, 16), (1, 8, 12)], videos=[(3, 8, 8)])])
    for ratio in (0.0, 0.5, 0.75, 0.9):
        with vlmprune.apply(qwen, "downsample", ratio=ratio) as handle:
            qwen(**full)
            rec = handle.stats.last
        grids = [Qwen2VLAdapter.smaller_grid(h, w, keep_count(h * w, ratio)) for h, w in ((8, 8), (4, 6), (4, 4))]
        expected = [grids[0][0] * grids[0][1], grids[1][0] * grids[1][1], 3 * grids[2][0] * grids[2][1]]
        assert rec.image_tokens == expected and rec.visual_out == [sum(expected)]
        assert rec.visual_in == [64 + 24 + 48]


def test_batch_of_different_images_equals_each_alone(qwen):
    samples = [dict(images=[(1, 8, 8)]), dict(images=[(1, 8, 12), (1, 4, 8)], videos=[(2, 4, 4)], after=6)]
    batch = make_batch(qwen, samples, seed=4)
    assert not batch["attention_mask"].all()  # left padding
    rows = [64, 96, 32]
    pix = torch.split(batch["pixel_values"], rows)
    singles = []
    for b, images in enumerate([[0], [1, 2]]):
        real = batch["attention_mask"][b].bool()
        one = {k: batch[k][b : b + 1, real] for k in ("input_ids", "mm_token_type_ids", "attention_mask")}
        one["pixel_values"] = torch.cat([pix[i] for i in images])
        one["image_grid_thw"] = batch["image_grid_thw"][images]
        if b == 1:
            one["pixel_values_videos"], one["video_grid_thw"] = batch["pixel_values_videos"], batch["video_grid_thw"]
        singles.append(one)
    with vlmprune.apply(qwen, "downsample", ratio=0.75) as handle:
        out = qwen(**batch).logits
        counts = handle.stats.last.visual_out
        gen = qwen.generate(**batch, max_new_tokens=4, do_sample=False)
        for b, one in enumerate(singles):
            alone = qwen(**one).logits
            assert handle.stats.last.visual_out == [counts[b]]
            torch.testing.assert_close(out[b : b + 1, -alone.shape[1] :], alone, atol=1e-5, rtol=0)
            assert torch.equal(gen[b, -4:], qwen.generate(**one, max_new_tokens=4, do_sample=False)[0, -4:])


def test_ratio0_is_the_stock_model_and_remove_restores(qwen):
    inputs = make_batch(qwen, SAMPLES, seed=2)
    ref = qwen(**inputs).logits
    ref_gen = qwen.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vlmprune.apply(qwen, "downsample", ratio=0.0):
        assert torch.equal(qwen(**inputs).logits, ref)
        assert torch.equal(qwen.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)
    handle = vlmprune.apply(qwen, "downsample", ratio=0.9)
    assert "get_image_features" in qwen.model.__dict__
    assert qwen(**inputs).logits.shape[1] < ref.shape[1]
    handle.remove()
    assert "get_image_features" not in qwen.model.__dict__ and "get_video_features" not in qwen.model.__dict__
    assert torch.equal(qwen(**inputs).logits, ref)
    assert torch.equal(qwen.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)


# -- InternVL: fewer tiles ------------------------------------------------------------------------
def tiles_of(picture: np.ndarray, max_patches: int) -> torch.Tensor:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                    max_patches=max_patches)
    return proc(images=[picture], return_tensors="pt")["pixel_values"]


def smooth_picture(h: int, w: int, seed: int) -> np.ndarray:
    x = torch.from_numpy(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))
    x = F.avg_pool2d(x.permute(2, 0, 1).float()[None], 5, 1, 2)[0]
    return np.asarray(x.round().byte().permute(1, 2, 0))


def test_tile_grid_is_read_off_the_thumbnail(internvl):
    adapter = InternVLAdapter(internvl)
    for (h, w), max_patches, grid in [((40, 100), 6, (3, 1)), ((100, 40), 6, (1, 3)), ((64, 96), 12, (3, 2)),
                                      ((96, 64), 12, (2, 3)), ((64, 64), 4, (2, 2))]:
        tiles = tiles_of(smooth_picture(h, w, seed=h + w), max_patches)
        assert tiles.shape[0] == grid[0] * grid[1] + 1
        assert adapter.tile_grid(tiles)[:2] == grid


def test_tile_canvas_is_the_processors_rule():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    for columns in range(1, 7):
        for rows in range(1, 7):
            for most in range(1, 13):
                ref = get_optimal_tiled_canvas((rows * TILE, columns * TILE), (TILE, TILE), 1, most)
                assert InternVLAdapter.tile_canvas(columns, rows, most) == tuple(ref)


def test_fewer_tiles_agree_with_the_processor(internvl):
    adapter = InternVLAdapter(internvl)
    picture = smooth_picture(64, 96, seed=3)
    tiles = tiles_of(picture, 12)  # 3x2 crops + thumbnail: 7 tiles, 112 tokens
    inputs = {"input_ids": prompt([7]).unsqueeze(0), "pixel_values": tiles}
    same, items = adapter.resize_image_inputs(inputs, budget(0.0))
    assert torch.equal(same["pixel_values"], tiles) and items[0].kept == [MERGED] * 7
    # room for one tile: the thumbnail, exactly what the processor gives an image allowed one tile
    one, items = adapter.resize_image_inputs(inputs, budget(0.8))
    assert torch.equal(one["pixel_values"], tiles_of(picture, 1)) and items[0].kept == [MERGED] + [0] * 6
    # room for three: 2x1 crops (the processor's grid for max 2 crops) + the thumbnail
    three, items = adapter.resize_image_inputs(inputs, budget(0.5))
    ref = tiles_of(picture, 2)
    assert three["pixel_values"].shape == ref.shape == (3, 3, TILE, TILE) and items[0].new_grid[0] == 3
    assert torch.equal(three["pixel_values"][-1], tiles[-1])
    canvas = InternVLAdapter.assemble_tiles(tiles[:-1], 3, 2)
    crops = F.interpolate(canvas[None], size=(TILE, 2 * TILE), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(three["pixel_values"][:2], InternVLAdapter.cut_tiles(crops[0], TILE))
    diff = (three["pixel_values"] - ref).abs()
    assert diff.mean() < 0.05  # the processor resizes the original picture, we resize its 3x2 canvas


def internvl_inputs(tile_sets: list[list[torch.Tensor]], seed: int, after: int = 4):
    rows = [prompt([t.shape[0] for t in tiles], after=after, seed=seed + i) for i, tiles in enumerate(tile_sets)]
    length = max(r.numel() for r in rows)
    ids = torch.stack([F.pad(r, (length - r.numel(), 0)) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (length - r.numel(), 0)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat([t for s in tile_sets for t in s])}


def test_internvl_equals_stock_model_on_fewer_tiles(internvl):
    big = tiles_of(smooth_picture(64, 96, seed=5), 12)  # 7 tiles
    wide = tiles_of(smooth_picture(40, 100, seed=6), 6)  # 4 tiles
    single = tiles_of(smooth_picture(32, 32, seed=7), 6)  # 1 tile: nothing fewer to give
    full = internvl_inputs([[big, wide, single]], seed=1)
    ratio = 0.5
    pixels, items = InternVLAdapter(internvl).resize_image_inputs(full, budget(ratio))
    counts = [i.new_grid[0] for i in items]
    assert counts == [3, 1, 1]  # 56 tokens: 2x1 + thumbnail; 32: the thumbnail; one tile stays
    small = internvl_inputs([list(torch.split(pixels["pixel_values"], counts))], seed=1)
    ref, ref_seen = run(internvl, small)
    with vlmprune.apply(internvl, "downsample", ratio=ratio) as handle:
        out, seen = run(internvl, full)
        rec = handle.stats.last
        gen = internvl.generate(**full, max_new_tokens=5, do_sample=False, eos_token_id=None)
    torch.testing.assert_close(seen["inputs_embeds"], ref_seen["inputs_embeds"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    ref_gen = internvl.generate(**small, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(gen[:, -5:], ref_gen[:, -5:])
    assert rec.visual_in == [12 * MERGED] and rec.visual_out == [5 * MERGED] and rec.image_tokens == [48, 16, 16]
    vision, projector = flops_mod.vision_flops(internvl, small)
    assert rec.vision_flops == pytest.approx(vision) and rec.projector_flops == pytest.approx(projector)
    assert "thumbnail" in rec.variant


def test_internvl_batch_equals_each_alone_and_remove(internvl):
    a = [tiles_of(smooth_picture(64, 96, seed=8), 12)]
    b = [tiles_of(smooth_picture(40, 100, seed=9), 6), tiles_of(smooth_picture(100, 40, seed=10), 6)]
    batch = internvl_inputs([a, b], seed=3)
    ref = internvl(**batch).logits
    with vlmprune.apply(internvl, "downsample", ratio=0.75) as handle:
        out = internvl(**batch).logits
        assert handle.stats.last.visual_out == [MERGED, 2 * MERGED]
        gen = internvl.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)
        for s, tiles in enumerate([a, b]):
            one = internvl_inputs([tiles], seed=3 + s)
            alone = internvl(**one).logits
            torch.testing.assert_close(out[s : s + 1, -alone.shape[1] :], alone, atol=1e-5, rtol=0)
            alone_gen = internvl.generate(**one, max_new_tokens=4, do_sample=False, eos_token_id=None)
            assert torch.equal(gen[s, -4:], alone_gen[0, -4:])
    assert "get_image_features" not in internvl.model.__dict__
    assert torch.equal(internvl(**batch).logits, ref)


# -- where it does not apply, and options -----------------------------------------------------------
def test_fixed_resolution_towers_refuse_clearly():
    model = tiny_llava()
    inputs = llava_inputs(model)
    ref = model(**inputs).logits
    with pytest.raises(ValueError, match="fixed resolution") as err:
        vlmprune.apply(model, "downsample", ratio=0.5)
    for name in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                 "InternVLForConditionalGeneration"):
        assert name in str(err.value)
    assert "_vlmprune_handles" not in model.__dict__ and not model._forward_pre_hooks
    assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize(("options", "error"), [
    (dict(ratio=1.0), ValueError), (dict(ratio=-0.1), ValueError), (dict(ratio="half"), TypeError),
    (dict(resample="nearest"), ValueError), (dict(positions="original"), TypeError),
])
def test_bad_options(options, error):
    with pytest.raises(error):
        vlmprune.apply(tiny_qwen2_vl(), "downsample", **options)


@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "internvl"])
def test_second_chat_turn_on_the_cache_equals_a_fresh_run(family):
    from test_flops import FAMILIES
    from test_multiturn import _gap, _two_turns

    torch.manual_seed(0)
    model, inputs, _ = FAMILIES[family]("sdpa")
    inputs = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
    stock_cached, stock_fresh, *_ = _two_turns(model, inputs)
    with vlmprune.apply(model, "downsample", ratio=0.75) as handle:
        cached, fresh, *_ = _two_turns(model, inputs)
        assert sum(handle.stats.records[0].visual_out) < sum(handle.stats.records[0].visual_in)
    assert torch.equal(cached.sequences, fresh.sequences)
    assert _gap(cached, fresh) <= 2 * _gap(stock_cached, stock_fresh) + 1e-4


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "internvl"])
def test_flops_of_the_smaller_images_match_the_flop_counter(family):
    """What the patched forward really runs (smaller vision side, shorter LLM), by FlopCounterMode, is
    what ``handle.flops`` reports besides the resize itself (an interpolation the counter has no
    formula for)."""
    from test_flops import FAMILIES, TOL, _counted, _rel

    model, inputs, _ = FAMILIES[family]("sdpa")
    full = flops_mod.estimate(model, inputs, int(inputs["input_ids"].shape[1]))
    with vlmprune.apply(model, "downsample", ratio=0.75) as handle:
        measured, _ = _counted(lambda: model(**inputs, use_cache=False))
        report = handle.flops(inputs)
    assert report.vision < full.vision and report.llm_prefill < full.llm_prefill and report.overhead > 0
    assert _rel(report.total - report.overhead, measured) < TOL, (report.as_dict(), measured)
