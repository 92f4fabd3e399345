"""LLaVA-NeXT and LLaVA-OneVision on tiny random-init models: AnyRes crops, unpadding, newlines,
OneVision's interpolated grids, multi-image samples and pooled video frames.

The expected layouts here are derived independently of the adapter: crops are stitched and
unpadded with explicit loops over the geometry (not the model's packing code the adapter reuses),
and reference scores come from eager forwards with ``output_attentions=True``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_processing_utils import select_best_resolution

import vlmprune
from vlmprune.method import keep_count

from tiny import PAD, llama_config


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

IMAGE, VIDEO = 3, 4
SIZE, PATCH = 48, 8  # 6x6 patch grid per crop
SIDE = SIZE // PATCH
N = SIDE * SIDE
FRAMES = 3
POOLED = math.ceil(SIDE / 2) ** 2  # OneVision pools video frames 2x2 (bilinear)
TEXT_AFTER = 4

# ---- tiny models ------------------------------------------------------------------------------


def tiny_next(seed: int = 0, attn: str = "sdpa") -> LlavaNextForConditionalGeneration:
    """CLIP tower (with [CLS]) + LLaMA, crops on a 1x2 / 2x1 / 2x2 grid of 48px crops."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=SIZE, patch_size=PATCH, projection_dim=32,
    )
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=llama_config(), image_token_id=IMAGE,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]],
    )
    cfg._attn_implementation = attn
    return LlavaNextForConditionalGeneration(cfg).eval()


def tiny_onevision(seed: int = 0, attn: str = "sdpa", aspect: str = "anyres_max_9") -> LlavaOnevisionForConditionalGeneration:
    """SigLIP tower (no [CLS]) + Qwen2; ``anyres_max_1`` makes the model interpolate big grids."""
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=SIZE, patch_size=PATCH, vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE, video_token_index=VIDEO,
        image_grid_pinpoints=[[SIZE, SIZE], [SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]],
        vision_aspect_ratio=aspect,
    )
    cfg._attn_implementation = attn
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


# ---- independent geometry -------------------------------------------------------------------


def grid_shape(model, size) -> tuple[int, int]:
    """Crop rows x cols the AnyRes processor picks for an image of ``size`` (h, w)."""
    h, w = select_best_resolution(size, model.config.image_grid_pinpoints)
    return h // SIZE, w // SIZE


def unpad_window(model, size) -> tuple[range, range, int, int]:
    """Rows and columns of the stitched crop grid that survive unpadding, and the stitched shape."""
    nph, npw = grid_shape(model, size)
    hh, ww = nph * SIDE, npw * SIDE
    oh, ow = size
    if ow / oh > ww / hh:
        pad = (hh - int(round(oh * ww / ow, 7))) // 2
        return range(pad, hh - pad), range(ww), hh, ww
    pad = (ww - int(round(ow * hh / oh, 7))) // 2
    return range(hh), range(pad, ww - pad), hh, ww


def image_layout(model, size) -> tuple[list[dict[int, int]], list[int], int]:
    """For a patched image: per crop (base first) a map grid token -> offset in the image's
    placeholder run (tokens lost to unpadding absent), the newline offsets, and the run length."""
    nph, npw = grid_shape(model, size)
    rows, cols, _, _ = unpad_window(model, size)
    maps = [{t: t for t in range(N)}] + [{} for _ in range(nph * npw)]
    newlines = []
    pos = N
    for r in rows:
        for c in cols:
            crop = 1 + (r // SIDE) * npw + (c // SIDE)
            maps[crop][(r % SIDE) * SIDE + (c % SIDE)] = pos
            pos += 1
        newlines.append(pos)
        pos += 1
    return maps, newlines, pos


_TOKENS: dict = {}


def image_tokens(model, size, patched: bool = True) -> int:
    """Placeholder tokens of one image, from the model's own feature extraction (memoised on
    what the count depends on: the family and its grid settings, fixed in this file)."""
    key = (type(model).__name__, getattr(model.config, "vision_aspect_ratio", None), tuple(size), patched)
    if key not in _TOKENS:
        if patched:
            pix, sizes, kw = torch.zeros(1, num_crops(model, size), 3, SIZE, SIZE), [size], {}
        else:  # OneVision: a sample with two images keeps only their base views
            pix, sizes, kw = torch.zeros(2, 1, 3, SIZE, SIZE), [size, size], {"batch_num_images": torch.tensor([2])}
        out = model.model.get_image_features(pix, torch.tensor(sizes), **kw)
        _TOKENS[key] = out.pooler_output[0].shape[0]
    return _TOKENS[key]


def num_crops(model, size) -> int:
    nph, npw = grid_shape(model, size)
    return 1 + nph * npw


# ---- inputs ---------------------------------------------------------------------------------


def make_inputs(model, specs: list[dict], pad_to_same: bool = False) -> dict:
    """A batch of prompts ``[text][image tokens...][text][video tokens][text]``.

    Each spec: ``images`` (list of (h, w)), ``video`` (bool), ``seed`` (pixels and text) and
    ``before`` (text tokens ahead of the images). ``batch_num_images`` is passed when asked."""
    rows, pixels, sizes, videos, starts = [], [], [], [], []
    for spec in specs:
        g = torch.Generator().manual_seed(spec["seed"])
        images = spec.get("images", [])
        patched = spec.get("patched", len(images) == 1)
        row = [torch.randint(5, 64, (spec.get("before", 3),), generator=g)]
        start = {}
        for size in images:
            n_tok = image_tokens(model, size, patched)
            start.setdefault("images", []).append(sum(r.numel() for r in row))
            row.append(torch.full((n_tok,), IMAGE))
            crops = num_crops(model, size) if patched else 1
            pixels.append(torch.randn(crops, 3, SIZE, SIZE, generator=g))
            sizes.append(size)
        row.append(torch.randint(5, 64, (2,), generator=g))
        if spec.get("video"):
            start["video"] = sum(r.numel() for r in row)
            row.append(torch.full((FRAMES * POOLED + 1,), VIDEO))
            videos.append(torch.randn(FRAMES, 3, SIZE, SIZE, generator=g))
        row.append(torch.randint(5, 64, (TEXT_AFTER,), generator=g))
        rows.append(torch.cat(row))
        starts.append(start)
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.numel() :] = r
        mask[i, width - r.numel() :] = 1
        for key, val in starts[i].items():
            shift = width - r.numel()
            starts[i][key] = [v + shift for v in val] if isinstance(val, list) else val + shift
    out = {"input_ids": ids, "attention_mask": mask}
    if pixels:
        most = max(p.shape[0] for p in pixels)
        pv = torch.zeros(len(pixels), most, 3, SIZE, SIZE)  # padding crops, dropped by the model
        for i, p in enumerate(pixels):
            pv[i, : p.shape[0]] = p
        out["pixel_values"] = pv
        out["image_sizes"] = torch.tensor(sizes)
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)
    out["_starts"] = starts
    out["_crops"] = [p.shape[0] for p in pixels]
    return out


def call(inp: dict) -> dict:
    return {k: v for k, v in inp.items() if not k.startswith("_")}


def same_length(model, specs: list[dict]) -> list[dict]:
    """Lengthen the leading text so every prompt has the same length (no padding needed)."""
    lengths = [make_inputs(model, [s])["input_ids"].shape[1] for s in specs]
    return [dict(s, before=s.get("before", 3) + max(lengths) - n) for s, n in zip(specs, lengths)]


def decoder_recorder(model):
    """Record what the decoder receives; install after ``vlmprune.apply`` (runs after the seam)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


# ---- reference scores -------------------------------------------------------------------------


def reference_scores(eager, inp) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Per image (crops, N) and per video frame (frames, pooled) scores from eager attention maps:
    FasterVLM's [CLS] row at the feature layer for CLIP, the documented no-[CLS] fallback (mean
    attention received in the last layer, over queries then heads) for SigLIP; video frames are
    pooled like the features (bilinear to ceil(h/2) x ceil(w/2))."""
    tower = eager.model.vision_tower
    layers = len(tower.encoder.layers)
    cls = isinstance(eager, LlavaNextForConditionalGeneration)

    def scores(pix):
        att = tower(pix, output_attentions=True).attentions
        if cls:
            return att[layers + eager.config.vision_feature_layer][:, :, 0, 1:].mean(1)
        return att[-1].mean(dim=-2).mean(dim=1)

    images = []
    if "pixel_values" in inp:
        for pv, n in zip(inp["pixel_values"], inp["_crops"]):
            images.append(scores(pv[:n]))
    frames = None
    if "pixel_values_videos" in inp:
        s = scores(inp["pixel_values_videos"].flatten(0, 1)).view(-1, 1, SIDE, SIDE)
        frames = F.interpolate(s, size=[math.ceil(SIDE / 2)] * 2, mode="bilinear").flatten(1)
    return images, frames


def topk_set(scores: torch.Tensor, k: int) -> set[int]:
    vals, idx = torch.sort(scores, descending=True)
    if k < scores.numel():  # the oracle is only meaningful without a near-tie at the boundary
        assert float(vals[k - 1] - vals[k]) > 1e-6 * float(vals[0]), "near-tie at the top-k boundary"
    return set(idx[:k].tolist())


def expected_columns(model, inp, sample: int, ratio: float, ref_images, ref_frames) -> set[int]:
    """Visual columns the LLM must see: per crop top-k over the full crop grid, carried through
    unpadding; newline tokens always; video frames top-k on the pooled grid plus the newline."""
    spec_starts = inp["_starts"][sample]
    keep: set[int] = set()
    image_idx = sum(len(s.get("images", [])) for s in inp["_starts"][:sample])
    sizes = inp["image_sizes"].tolist() if "image_sizes" in inp else []
    for start in spec_starts.get("images", []):
        size = tuple(sizes[image_idx])
        ref = ref_images[image_idx]
        image_idx += 1
        if ref.shape[0] == 1:  # unpatched (multi-image sample): base view + one newline
            keep |= {start + t for t in topk_set(ref[0], keep_count(N, ratio))} | {start + N}
            continue
        maps, newlines, _ = image_layout(model, size)
        for crop, m in enumerate(maps):
            kept = topk_set(ref[crop], keep_count(N, ratio))
            keep |= {start + m[t] for t in kept if t in m}
        keep |= {start + p for p in newlines}
    if "video" in spec_starts:
        video_idx = sum(1 for s in inp["_starts"][:sample] if "video" in s)
        start = spec_starts["video"]
        for f in range(FRAMES):
            kept = topk_set(ref_frames[video_idx * FRAMES + f], keep_count(POOLED, ratio))
            keep |= {start + f * POOLED + t for t in kept}
        keep.add(start + FRAMES * POOLED)
    return keep


def kept_visual_columns(model, inp, method: str, ratio: float) -> tuple[list[set[int]], object]:
    """Run with original positions, so the positions the decoder gets are the kept columns."""
    with vlmprune.apply(model, method, ratio=ratio, positions="original") as handle:
        seen, hook = decoder_recorder(model)
        model(**call(inp))
        hook.remove()
    ids = inp["input_ids"]
    visual = (ids == IMAGE) | (ids == VIDEO)
    out = []
    for b in range(ids.shape[0]):
        pad = int((inp["attention_mask"][b] == 0).sum())
        pos = seen[0]["position_ids"][b].tolist()
        mask = seen[0]["attention_mask"]
        real = [p for i, p in enumerate(pos) if mask is None or int(mask[b, i]) == 1]
        out.append({p + pad for p in real if visual[b, p + pad]})
    return out, handle


# ---- fixtures ---------------------------------------------------------------------------------

WIDE, TALL, SQUARE, BIG = (12, 96), (96, 30), (96, 96), (50, 90)


@pytest.fixture(scope="module")
def nxt():
    return tiny_next()


@pytest.fixture(scope="module")
def nxt_eager(nxt):
    eager = tiny_next(attn="eager")
    eager.load_state_dict(nxt.state_dict())
    return eager


@pytest.fixture(scope="module")
def ov():
    return tiny_onevision()


@pytest.fixture(scope="module")
def ov_eager(ov):
    eager = tiny_onevision(attn="eager")
    eager.load_state_dict(ov.state_dict())
    return eager


def test_geometry_helpers_match_the_model(nxt, ov):
    """The test's own stitching/unpadding reproduces the models' placeholder counts."""
    for model in (nxt, ov):
        for size in (WIDE, TALL, SQUARE, BIG, (90, 60)):
            assert image_layout(model, size)[2] == image_tokens(model, size)
    _, _, n_tok = image_layout(nxt, WIDE)
    assert n_tok < N + SIDE * (2 * SIDE + 1)  # the wide image really loses rows to unpadding


# ---- 1. ratio 0 is the stock model; remove() restores it --------------------------------------


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_ratio_zero_bit_identical_and_remove_restores(family, nxt, ov):
    model = nxt if family == "next" else ov
    spec = [{"images": [BIG], "seed": 1, "video": family == "onevision"}]
    inp = call(make_inputs(model, spec))
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    with vlmprune.apply(model, "fastervlm", ratio=0.0) as handle:
        assert torch.equal(model(**inp).logits, ref)
        assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen)
        assert handle.stats.last.visual_out == handle.stats.last.visual_in
    handle = vlmprune.apply(model, "fastervlm", ratio=0.9)
    assert model(**inp).logits.shape[1] < ref.shape[1]
    handle.remove()
    assert torch.equal(model(**inp).logits, ref)
    assert not model.model.language_model._forward_pre_hooks
    assert "_vlmprune_handles" not in model.__dict__


def test_onevision_interpolated_grid():
    """``anyres_max_1``: the model bilinearly shrinks the stitched grid; the grid is then one group
    on the interpolated grid (its tokens are blends of crop tokens) whose scores are the stitched,
    unpadded crop scores interpolated alike, and the base view is another group."""
    model = tiny_onevision(aspect="anyres_max_1")
    eager = tiny_onevision(attn="eager", aspect="anyres_max_1")
    eager.load_state_dict(model.state_dict())
    full = make_inputs(model, [{"images": [BIG], "seed": 2}])
    inp = call(full)
    ref = model(**inp).logits
    with vlmprune.apply(model, "fastervlm", ratio=0.0):
        assert torch.equal(model(**inp).logits, ref)
    # independent size of the interpolated grid (the model's anyres_max_N rule)
    rows, cols, _, _ = unpad_window(model, BIG)
    scale = math.sqrt(len(rows) * len(cols) / (1 * SIDE**2))
    assert scale > 1.1
    gh, gw = int(len(rows) // scale), int(len(cols) // scale)
    assert image_tokens(model, BIG) == N + gh * (gw + 1)
    (crops,), _ = reference_scores(eager, full)
    nph, npw = grid_shape(model, BIG)
    stitched = crops[1:].view(nph, npw, SIDE, SIDE).permute(0, 2, 1, 3).reshape(nph * SIDE, npw * SIDE)
    window = stitched[rows.start : rows.stop, cols.start : cols.stop]
    pooled = F.interpolate(window[None, None], size=[gh, gw], mode="bilinear").flatten()
    start = full["_starts"][0]["images"][0]
    for ratio in (0.75, 0.9):
        got, handle = kept_visual_columns(model, full, "fastervlm", ratio)
        assert handle.stats.last.visual_out == [keep_count(N, ratio) + keep_count(gh * gw, ratio) + gh]
        base = {start + t for t in topk_set(crops[0], keep_count(N, ratio))}
        grid = {start + N + (t // gw) * (gw + 1) + t % gw for t in topk_set(pooled, keep_count(gh * gw, ratio))}
        lines = {start + N + r * (gw + 1) + gw for r in range(gh)}
        assert got[0] == base | grid | lines


def test_inputs_embeds_instead_of_input_ids(nxt):
    inp = call(make_inputs(nxt, [{"images": [BIG], "seed": 16}]))
    embeds = nxt.get_input_embeddings()(inp["input_ids"])
    rest = {k: v for k, v in inp.items() if k != "input_ids"}
    with vlmprune.apply(nxt, "fastervlm", ratio=0.75) as handle:
        by_ids = nxt(**inp).logits
        counts = handle.stats.last.visual_out
        by_embeds = nxt(inputs_embeds=embeds, **rest).logits
        assert handle.stats.last.visual_out == counts
    assert torch.equal(by_ids, by_embeds)


# ---- 2. counts, sequence and cache length -----------------------------------------------------


@pytest.mark.parametrize("ratio", [0.75, 0.9])
@pytest.mark.parametrize("size", [WIDE, TALL, BIG])
def test_next_counts_follow_unpadding(nxt, nxt_eager, size, ratio):
    """Kept = k x (#crops incl. base) - kept crop tokens lost to unpadding + one newline per row."""
    inp = make_inputs(nxt, [{"images": [size], "seed": 3}])
    length = inp["input_ids"].shape[1]
    (ref,), _ = reference_scores(nxt_eager, inp)
    k = keep_count(N, ratio)
    maps, newlines, n_tok = image_layout(nxt, size)
    lost = sum(len(topk_set(ref[c], k) - set(maps[c])) for c in range(1, len(maps)))
    expected = k * len(maps) - lost + len(newlines)
    with vlmprune.apply(nxt, "fastervlm", ratio=ratio) as handle:
        out = nxt(**call(inp), use_cache=True)
    assert handle.stats.last.visual_in == [n_tok]
    assert handle.stats.last.visual_out == [expected]
    removed = n_tok - expected
    assert out.logits.shape[1] == length - removed
    assert out.cache.get_seq_length() == length - removed


@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_onevision_counts_image_and_video(ov, ov_eager, ratio):
    inp = make_inputs(ov, [{"images": [TALL], "video": True, "seed": 4}])
    length = inp["input_ids"].shape[1]
    (ref,), _ = reference_scores(ov_eager, inp)
    k = keep_count(N, ratio)
    maps, newlines, n_tok = image_layout(ov, TALL)
    lost = sum(len(topk_set(ref[c], k) - set(maps[c])) for c in range(1, len(maps)))
    video = FRAMES * keep_count(POOLED, ratio) + 1  # one newline per video, always kept
    expected = k * len(maps) - lost + len(newlines) + video
    with vlmprune.apply(ov, "fastervlm", ratio=ratio) as handle:
        out = ov(**call(inp), use_cache=True)
    assert handle.stats.last.scoring == "nocls" and handle.methods[0].label == "fastervlm-nocls"
    assert handle.stats.last.visual_in == [n_tok + FRAMES * POOLED + 1]
    assert handle.stats.last.visual_out == [expected]
    removed = handle.stats.last.visual_in[0] - expected
    assert out.logits.shape[1] == length - removed
    assert out.cache.get_seq_length() == length - removed


# ---- 3. kept tokens equal the eager top-k -----------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_next_kept_tokens_match_eager_topk(nxt, nxt_eager, ratio):
    specs = same_length(nxt, [{"images": [WIDE], "seed": 5}, {"images": [BIG], "seed": 6}])
    inp = make_inputs(nxt, specs)
    ref_images, _ = reference_scores(nxt_eager, inp)
    got, handle = kept_visual_columns(nxt, inp, "fastervlm", ratio)
    assert handle.stats.last.scoring == "cls"
    for b in range(2):
        assert got[b] == expected_columns(nxt, inp, b, ratio, ref_images, None)


@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_onevision_kept_tokens_match_eager_fallback(ov, ov_eager, ratio):
    specs = same_length(ov, [{"images": [WIDE], "video": True, "seed": 7}, {"images": [BIG], "video": True, "seed": 8}])
    inp = make_inputs(ov, specs)
    ref_images, ref_frames = reference_scores(ov_eager, inp)
    got, _ = kept_visual_columns(ov, inp, "fastervlm", ratio)
    for b in range(2):
        assert got[b] == expected_columns(ov, inp, b, ratio, ref_images, ref_frames)


def test_onevision_multi_image_sample(ov, ov_eager):
    """Two images in one sample (batch_num_images=[2]): base views only, one newline each."""
    inp = make_inputs(ov, [{"images": [WIDE, BIG], "patched": False, "seed": 9}])
    inp["batch_num_images"] = torch.tensor([2])
    ref = ov(**call(inp)).logits
    with vlmprune.apply(ov, "fastervlm", ratio=0.0):
        assert torch.equal(ov(**call(inp)).logits, ref)
    ref_images, _ = reference_scores(ov_eager, inp)
    got, handle = kept_visual_columns(ov, inp, "fastervlm", 0.75)
    assert got[0] == expected_columns(ov, inp, 0, 0.75, ref_images, None)
    assert handle.stats.last.visual_out == [2 * (keep_count(N, 0.75) + 1)]


def test_onevision_two_patched_images_without_batch_num_images(ov):
    """Without batch_num_images the model patches every image, even two in one sample."""
    inp = make_inputs(ov, [{"images": [WIDE, BIG], "patched": True, "seed": 10}])
    with vlmprune.apply(ov, "fastervlm", ratio=0.75) as handle:
        ov(**call(inp))
    lines = len(image_layout(ov, WIDE)[1]) + len(image_layout(ov, BIG)[1])
    assert handle.stats.last.visual_in == [image_tokens(ov, WIDE) + image_tokens(ov, BIG)]
    crops = num_crops(ov, WIDE) + num_crops(ov, BIG)
    assert lines < handle.stats.last.visual_out[0] <= keep_count(N, 0.75) * crops + lines


# ---- 4. batch == each alone -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["next", "onevision"])
@pytest.mark.parametrize("pad", [False, True], ids=["same-length", "left-padded"])
def test_batch_equals_each_alone(family, pad, nxt, ov):
    model = nxt if family == "next" else ov
    video = family == "onevision"
    specs = [{"images": [WIDE], "seed": 11, "video": video}, {"images": [BIG], "seed": 12, "video": video}]
    if not pad:
        specs = same_length(model, specs)
    batch = make_inputs(model, specs)
    assert bool(batch["attention_mask"].all()) != pad
    width = batch["input_ids"].shape[1]
    with vlmprune.apply(model, "fastervlm", ratio=0.75) as handle:
        logits = model(**call(batch)).logits
        gen = model.generate(**call(batch), max_new_tokens=4, do_sample=False)
        counts = handle.stats.last.visual_out
        for i, spec in enumerate(specs):
            single = call(make_inputs(model, [spec]))
            alone = model(**single).logits
            assert handle.stats.last.visual_out == [counts[i]]
            assert torch.allclose(logits[i, -alone.shape[1] :], alone[0], atol=1e-5)
            new = model.generate(**single, max_new_tokens=4, do_sample=False)[0, single["input_ids"].shape[1] :]
            assert torch.equal(gen[i, width : width + new.numel()], new)
    assert counts[0] != counts[1]  # different crop grids really give different counts


# ---- 5. generate == decoding the kept embeddings ----------------------------------------------


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_generate_equals_kept_embeddings(family, nxt, ov):
    model = nxt if family == "next" else ov
    inp = call(make_inputs(model, [{"images": [BIG], "seed": 13, "video": family == "onevision"}]))
    with vlmprune.apply(model, "fastervlm", ratio=0.75):
        seen, hook = decoder_recorder(model)
        pruned = model.generate(**inp, max_new_tokens=6, do_sample=False)
        hook.remove()
    kept = seen[0]["inputs_embeds"]
    assert seen[0]["position_ids"][0].tolist() == list(range(kept.shape[1]))
    direct = model.generate(
        inputs_embeds=kept, attention_mask=torch.ones(kept.shape[:2], dtype=torch.long),
        max_new_tokens=6, do_sample=False,
    )
    assert torch.equal(pruned[:, inp["input_ids"].shape[1] :], direct)


# ---- 6. baselines, text-only and mixed batches ------------------------------------------------


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_pool_and_random_counts(family, nxt, ov):
    """A square image on a 2x2 grid loses nothing to unpadding, so the counts are exact:
    per crop k tokens (random) or a 3x3 pooled grid (pool), plus 12 newlines; video frames
    keep k of the pooled 3x3 grid (random) or a 2x2 grid (pool), plus one newline."""
    model = nxt if family == "next" else ov
    video = family == "onevision"
    inp = call(make_inputs(model, [{"images": [SQUARE], "seed": 14, "video": video}]))
    crops, rows = num_crops(model, SQUARE), 2 * SIDE
    assert crops == 5 and image_tokens(model, SQUARE) == N + rows * (rows + 1)
    per = {"random": keep_count(N, 0.75), "pool": 3 * 3}
    per_frame = {"random": keep_count(POOLED, 0.75), "pool": 2 * 2}
    for method in ("random", "pool"):
        with vlmprune.apply(model, method, ratio=0.75) as handle:
            model(**inp)
        expected = crops * per[method] + rows + (FRAMES * per_frame[method] + 1 if video else 0)
        assert handle.stats.last.visual_out == [expected], method


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_text_only_and_mixed_batch_pass_through(family, nxt, ov):
    model = nxt if family == "next" else ov
    with_img = make_inputs(model, [{"images": [WIDE], "seed": 15}])
    text = torch.randint(5, 64, (6,), generator=torch.Generator().manual_seed(1))
    ref_text = model(input_ids=text[None]).logits
    width = with_img["input_ids"].shape[1]
    ids = torch.full((2, width), PAD)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0], mask[0] = with_img["input_ids"][0], 1
    ids[1, -6:], mask[1, -6:] = text, 1
    n_tok = image_tokens(model, WIDE)
    with vlmprune.apply(model, "fastervlm", ratio=0.9) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=with_img["pixel_values"],
                    image_sizes=with_img["image_sizes"]).logits
        assert handle.stats.last.visual_in == [n_tok, 0]
        assert handle.stats.last.visual_out[1] == 0 and handle.stats.last.visual_out[0] < n_tok
        assert torch.allclose(out[1, -6:], ref_text[0], atol=1e-5)
        before = len(handle.stats.records)
        assert torch.equal(model(input_ids=text[None]).logits, ref_text)
        assert len(handle.stats.records) == before
