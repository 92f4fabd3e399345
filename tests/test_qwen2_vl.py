"""Qwen2-VL / Qwen2.5-VL adapter: FasterVLM (no-[CLS] fallback) and the baselines end to end.

Tiny random-init models: a 2-block ViT (patch 4, temporal patch 2, spatial_merge_size 2) and a
2-layer decoder with M-RoPE (head_dim 16, mrope_section [2, 3, 3]). An image with grid_thw
(1, h, w) gives (h/2) x (w/2) LLM tokens; a video with (t, h, w) gives t frames of that many.
Qwen2.5-VL uses window_size 16 (2x2 merged tokens per window) so its ViT really runs in window
order, and its last block is the full-attention block. The reference scores come from the eager
attention maps of the last vision block (recorded from ``eager_attention_forward`` of an eager
copy of the model), pooled over each 2x2 merge unit and put in raster order by matching the
merger's rows with the tower's output rows, independently of the adapter's bookkeeping.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from transformers import (
    DynamicCache,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import vlmprune
from vlmprune import context
from vlmprune.adapters.qwen2_vl import Qwen2VLAdapter, frame_received_attention
from vlmprune.method import keep_count
from vlmprune.scoring import mean_received_attention, pooled_grid


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

IMG, VID, VSTART, VEND, PAD = 5, 6, 7, 8, 0
TIE_TOL = 1e-6  # reference scores this close to the k-th one may go either way (eager vs SDPA)


# -- tiny models and inputs ----------------------------------------------------------------------
def _text_config() -> dict:
    return dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )


def _tokens() -> dict:
    return dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def _no_eos(model):
    """Greedy runs always produce max_new_tokens, so generations compare position by position."""
    model.generation_config.eos_token_id = None
    return model


def tiny_qwen2_vl(seed: int = 0, attn: str = "sdpa") -> Qwen2VLForConditionalGeneration:
    """Tiny Qwen2-VL whose weights depend only on ``seed``."""
    torch.manual_seed(seed)
    vision = dict(
        depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, mlp_ratio=2, initializer_range=0.2,
    )
    cfg = Qwen2VLConfig(vision_config=vision, text_config=_text_config(), **_tokens())
    cfg._attn_implementation = attn
    return _no_eos(Qwen2VLForConditionalGeneration(cfg).eval())


def tiny_qwen2_5_vl(seed: int = 0, attn: str = "sdpa") -> Qwen2_5_VLForConditionalGeneration:
    """Tiny Qwen2.5-VL (window attention in block 0, full attention in the last block)."""
    torch.manual_seed(seed)
    vision = dict(
        depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
        tokens_per_second=2, initializer_range=0.2,
    )
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=_text_config(), **_tokens())
    cfg._attn_implementation = attn
    return _no_eos(Qwen2_5_VLForConditionalGeneration(cfg).eval())


BUILDERS: dict[str, Callable] = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


def make_batch(model, samples: list[dict], seed: int = 0) -> dict:
    """Processor-like inputs for a batch, left-padded.

    Each sample is ``dict(images=[(t, h, w), ...], videos=[...], before=3, after=4)``; every image /
    video becomes ``<vision_start> placeholder * prod(grid)/merge**2 <vision_end>``, and the pixels
    are flattened patches ``(sum(t*h*w), C * temporal_patch * patch * patch)`` in batch order.
    """
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    merge = vc.spatial_merge_size
    width = 3 * vc.temporal_patch_size * vc.patch_size**2
    rows, types, images, videos = [], [], [], []
    for s in samples:
        ids = [torch.randint(9, 64, (s.get("before", 3),), generator=g)]
        typ = [torch.zeros(s.get("before", 3), dtype=torch.long)]
        for token, kind, grids, bucket in ((IMG, 1, s.get("images", ()), images), (VID, 2, s.get("videos", ()), videos)):
            for t, h, w in grids:
                n = t * h * w // merge**2
                ids += [torch.tensor([VSTART]), torch.full((n,), token), torch.tensor([VEND])]
                typ += [torch.zeros(1, dtype=torch.long), torch.full((n,), kind), torch.zeros(1, dtype=torch.long)]
                bucket.append((t, h, w))
        ids.append(torch.randint(9, 64, (s.get("after", 4),), generator=g))
        typ.append(torch.zeros(s.get("after", 4), dtype=torch.long))
        rows.append(torch.cat(ids))
        types.append(torch.cat(typ))
    length = max(r.numel() for r in rows)
    pad = [length - r.numel() for r in rows]
    out = {
        "input_ids": torch.stack([torch.cat([torch.full((p,), PAD), r]) for p, r in zip(pad, rows)]),
        "mm_token_type_ids": torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), t]) for p, t in zip(pad, types)]),
        "attention_mask": torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), torch.ones(r.numel(), dtype=torch.long)]) for p, r in zip(pad, rows)]),
    }
    if images:
        out["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in images), width, generator=g)
        out["image_grid_thw"] = torch.tensor(images)
    if videos:
        out["pixel_values_videos"] = torch.randn(sum(t * h * w for t, h, w in videos), width, generator=g)
        out["video_grid_thw"] = torch.tensor(videos)
    return out


MIXED = [dict(images=[(1, 8, 12), (1, 4, 4)], videos=[(3, 4, 8)])]  # 24 + 4 image, 3 x 8 video tokens


# -- recorders --------------------------------------------------------------------------------------
def decoder_recorder(model) -> tuple[list[dict], object]:
    """Record what the decoder receives, plus the seam's column map of the call (if any).

    Install it after ``vlmprune.apply`` so that it runs after the seam's hook."""
    seen: list[dict] = []

    def hook(module, args, kwargs):
        ctx = context.current()
        rec = {k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")}
        rec["columns"] = None if ctx is None or ctx.columns is None else ctx.columns.clone()
        seen.append(rec)

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def group_recorder(handle) -> list:
    """Wrap the handle's adapter ``visual_groups`` on the instance to record the groups it returns."""
    adapter = handle.methods[0].adapter
    calls: list = []
    inner = adapter.visual_groups

    def wrapped(ctx, visual, scores):
        groups = inner(ctx, visual, scores)
        calls.append(groups)
        return groups

    adapter.visual_groups = wrapped
    return calls


def kept_grid_indices(group, columns: torch.Tensor) -> torch.Tensor:
    """Grid indices of ``group`` whose column survived (``columns``: the seam's (B, L') map)."""
    kept = columns[group.sample]
    return torch.nonzero(torch.isin(group.columns, kept), as_tuple=False).squeeze(1)


def eager_reference_scores(family: str, inputs: dict, monkeypatch) -> list[torch.Tensor]:
    """Spec section 7 fallback on EAGER attention maps: per image / frame, in LLM token order.

    The eager copy of the model records the attention probabilities of its last vision block
    (rope included, exactly as the module computes them), takes the mean over heads and queries
    of each image / frame, pools each 2x2 merge unit (4 consecutive ViT tokens), and maps the
    merger's rows to the tower's output rows by exact feature equality (Qwen2.5-VL's window order).
    """
    ref = BUILDERS[family](seed=0, attn="eager")
    tower = ref.model.visual
    mod = sys.modules[type(tower.blocks[-1].attn).__module__]
    original = mod.eager_attention_forward
    state = {"on": False, "maps": []}

    def recording(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        if state["on"]:
            state["maps"].append(weights.float())
        return out, weights

    monkeypatch.setattr(mod, "eager_attention_forward", recording)
    last = tower.blocks[-1].attn
    h1 = last.register_forward_pre_hook(lambda *a: state.update(on=True))
    h2 = last.register_forward_hook(lambda *a: state.update(on=False))
    merged = []
    h3 = tower.merger.register_forward_hook(lambda m, a, out: merged.append(out))
    per_frame: list[torch.Tensor] = []
    try:
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if pixels not in inputs:
                continue
            state["maps"].clear()
            merged.clear()
            out = tower(inputs[pixels], grid_thw=inputs[grid])
            vit = torch.cat([w[0].mean(dim=(0, 1)) for w in state["maps"]])  # (N,) ViT order
            pooled = vit.view(-1, 4).mean(-1)
            rows = merged[0]
            perm = [int(torch.nonzero((rows == r).all(-1))[0]) for r in out.pooler_output]
            pooled = pooled[torch.tensor(perm)]
            sizes = [(h // 2) * (w // 2) for t, h, w in inputs[grid].tolist() for _ in range(t)]
            per_frame.extend(torch.split(pooled, sizes))
    finally:
        h1.remove(), h2.remove(), h3.remove()
    return per_frame


def assert_topk(kept: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    """``kept`` is the top-k of ``ref``, up to swaps within TIE_TOL of the k-th value."""
    assert kept.numel() == k
    assert torch.equal(kept, torch.sort(kept).values), "kept tokens must stay in raster order"
    kth = torch.topk(ref, k).values[-1]
    must = torch.nonzero(ref > kth + TIE_TOL).squeeze(1)
    may = torch.nonzero(ref >= kth - TIE_TOL).squeeze(1)
    assert torch.isin(must, kept).all(), (must, kept)
    assert torch.isin(kept, may).all(), (kept, may)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~100x faster on one thread on a shared machine (no thread spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return BUILDERS[family](seed=0)


def stock_decoder_inputs(model, inputs: dict) -> dict:
    seen, hook = decoder_recorder(model)
    try:
        out = model(**inputs)
    finally:
        hook.remove()
    return {**seen[-1], "logits": out.logits}


# -- 1. ratio 0 and remove() -----------------------------------------------------------------------
def test_adapter_is_selected(model):
    handle = vlmprune.apply(model, "fastervlm", ratio=0.5)
    try:
        adapter = handle.methods[0].adapter
        assert isinstance(adapter, Qwen2VLAdapter)
        assert adapter.vision_tower is model.model.visual
        assert adapter.decoder is model.model.language_model
        assert adapter.default_positions == "original"
    finally:
        handle.remove()


def test_ratio0_bit_identical_and_remove_restores(model):
    inputs = make_batch(model, MIXED)
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with vlmprune.apply(model, "fastervlm", ratio=0.0) as handle:
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), ref_gen)
        assert handle.stats.last.scoring == "nocls"
        assert handle.stats.last.method == "fastervlm-nocls"
    handle = vlmprune.apply(model, "fastervlm", ratio=0.75)
    assert model(**inputs).logits.shape[1] < ref.shape[1]
    handle.remove()
    assert torch.equal(model(**inputs).logits, ref)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), ref_gen)
    assert not model._forward_pre_hooks and not model.model.visual.blocks[-1].attn._forward_pre_hooks


# -- 2. counts, sequence and cache lengths ----------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_counts_per_image_and_frame(model, ratio):
    inputs = make_batch(model, MIXED)
    full = inputs["input_ids"].shape[1]
    sizes = [24, 4] + [8] * 3  # two images, then three video frames (2x4 merged tokens each)
    expected = [keep_count(n, ratio) for n in sizes]
    with vlmprune.apply(model, "fastervlm", ratio=ratio) as handle:
        calls = group_recorder(handle)
        seen, hook = decoder_recorder(model)
        out = model(**inputs, use_cache=True)
        hook.remove()
    groups = calls[-1]
    assert [g.kind for g in groups] == ["image", "image", "video", "video", "video"]
    assert [g.columns.numel() for g in groups] == sizes
    assert [tuple(g.grid) for g in groups] == [(4, 6), (2, 2), (2, 4), (2, 4), (2, 4)]
    columns = seen[-1]["columns"]
    assert [kept_grid_indices(g, columns).numel() for g in groups] == expected
    removed = sum(sizes) - sum(expected)
    rec = handle.stats.last
    assert rec.visual_in == [sum(sizes)] and rec.visual_out == [sum(expected)]
    assert out.logits.shape[1] == full - removed
    assert out.cache.get_seq_length() == full - removed
    assert rec.llm_tokens == [full - removed] and rec.positions == "original"
    assert rec.overhead_flops > 0


def test_scores_pool_to_merged_token_count(model):
    inputs = make_batch(model, [dict(images=[(1, 8, 12)], videos=[(2, 4, 4)])])
    with vlmprune.apply(model, "fastervlm", ratio=0.5) as handle:
        calls = group_recorder(handle)
        model(**inputs)
    assert [g.scores.numel() for g in calls[-1]] == [24, 4, 4]
    assert all(g.scores.dtype == torch.float32 and torch.isfinite(g.scores).all() for g in calls[-1])


# -- 3. scores and kept tokens against the eager reference ------------------------------------------
@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_kept_tokens_are_topk_of_eager_reference(family, model, ratio, monkeypatch):
    inputs = make_batch(model, MIXED, seed=1)
    ref_scores = eager_reference_scores(family, inputs, monkeypatch)
    stock = stock_decoder_inputs(model, inputs)
    with vlmprune.apply(model, "fastervlm", ratio=ratio) as handle:
        calls = group_recorder(handle)
        seen, hook = decoder_recorder(model)
        model(**inputs)
        hook.remove()
    groups, columns = calls[-1], seen[-1]["columns"]
    assert len(groups) == len(ref_scores) == 5
    for group, ref in zip(groups, ref_scores):
        torch.testing.assert_close(group.scores, ref, atol=1e-6, rtol=1e-4)
        assert_topk(kept_grid_indices(group, columns), ref, keep_count(ref.numel(), ratio))
    # the embeddings the decoder saw are the stock ones at the kept columns
    cols = columns[0]
    assert torch.equal(seen[-1]["inputs_embeds"][0], stock["inputs_embeds"][0, cols])


def test_frame_received_attention_matches_dense_masked_reference():
    """Window segments inside a frame: the mean runs over every query of the frame (zeros included)."""
    g = torch.Generator().manual_seed(0)
    heads, n = 2, 12
    q, k = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    frames = [8, 4]
    cu = torch.tensor([0, 4, 8, 12])  # frame 0 split into two windows, frame 1 one window
    got = frame_received_attention(q, k, cu, frames, heads, 0.5)
    qh, kh = q.view(n, heads, 4).transpose(0, 1), k.view(n, heads, 4).transpose(0, 1)
    logits = (qh * 0.5) @ kh.transpose(-1, -2)
    seg = torch.repeat_interleave(torch.arange(3), 4)
    probs = torch.softmax(logits.masked_fill(seg[:, None] != seg[None, :], float("-inf")), -1)
    frame = torch.repeat_interleave(torch.arange(2), torch.tensor(frames))
    # mean over heads and over the queries of each key's frame (the map is zero across windows)
    want = torch.cat([probs[:, frame == f][:, :, frame == f].mean(dim=(0, 1)) for f in range(2)])
    torch.testing.assert_close(got, want)
    # full-attention segments (one per frame) reduce to the plain mean received attention
    full = frame_received_attention(q, k, torch.tensor([0, 8, 12]), frames, heads, 0.5)
    torch.testing.assert_close(full[:8], mean_received_attention(q[None, :8], k[None, :8], heads, 0.5)[0])


# -- positions ------------------------------------------------------------------------------------
def test_original_positions_and_decode_continuation(model):
    inputs = make_batch(model, MIXED, seed=2)
    stock = stock_decoder_inputs(model, inputs)
    full = inputs["input_ids"].shape[1]
    stock_seen, hook = decoder_recorder(model)
    stock_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    hook.remove()
    stock_next = full + int(model.model.rope_deltas[0, 0])
    with vlmprune.apply(model, "fastervlm", ratio=0.75):
        seen, hook = decoder_recorder(model)
        model(**inputs)
        cols = seen[-1]["columns"][0]
        # prefill: kept tokens keep their original (t, h, w) positions, text keeps its own
        assert seen[-1]["position_ids"].shape[0] == 3
        assert torch.equal(seen[-1]["position_ids"][:, 0], stock["position_ids"][:, 0, cols])
        seen.clear()
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        hook.remove()
    assert gen.shape == stock_gen.shape
    prefill, steps = seen[0], seen[1:]
    assert torch.equal(prefill["position_ids"][:, 0], stock["position_ids"][:, 0, cols])
    # decoding continues where the unpruned model would: L + rope_deltas, on every M-RoPE axis
    stock_steps = [s["position_ids"][-3:, 0, -1] for s in stock_seen[1:]]
    assert int(stock_steps[0][0]) == stock_next
    for step, want in zip(steps, stock_steps):
        assert torch.equal(step["position_ids"][-3:, 0, -1], want)


def test_contiguous_positions_run(model):
    inputs = make_batch(model, MIXED)
    with vlmprune.apply(model, "fastervlm", ratio=0.75, positions="contiguous") as handle:
        seen, hook = decoder_recorder(model)
        out = model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        hook.remove()
    assert handle.stats.last.positions == "contiguous"
    pos = seen[0]["position_ids"]
    length = out.logits.shape[1]
    assert pos.shape == (3, 1, length)
    assert int(pos.max()) < length  # no gaps: every axis fits in the shortened sequence
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


# -- 4. batch invariance ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "samples",
    [
        [dict(images=[(1, 8, 12)]), dict(images=[(1, 12, 8)])],  # same prompt length, different grids
        [dict(images=[(1, 8, 8)], videos=[(2, 4, 4)]), dict(images=[(1, 4, 8)], videos=[(2, 8, 4)])],
    ],
    ids=["images", "images+videos"],
)
def test_batch_equals_single(model, samples):
    batch = make_batch(model, samples, seed=3)
    assert batch["attention_mask"].all()
    singles = []
    # rebuild each sample alone from the batch (same tokens and pixels)
    img_rows = [int(t * h * w) for s in samples for (t, h, w) in s.get("images", ())]
    vid_rows = [int(t * h * w) for s in samples for (t, h, w) in s.get("videos", ())]
    img_split = torch.split(batch["pixel_values"], img_rows)
    vid_split = torch.split(batch["pixel_values_videos"], vid_rows) if vid_rows else None
    ii = vi = 0
    for b, s in enumerate(samples):
        one = {k: batch[k][b : b + 1] for k in ("input_ids", "mm_token_type_ids", "attention_mask")}
        n_img, n_vid = len(s.get("images", ())), len(s.get("videos", ()))
        one["pixel_values"] = torch.cat(img_split[ii : ii + n_img])
        one["image_grid_thw"] = batch["image_grid_thw"][ii : ii + n_img]
        if n_vid:
            one["pixel_values_videos"] = torch.cat(vid_split[vi : vi + n_vid])
            one["video_grid_thw"] = batch["video_grid_thw"][vi : vi + n_vid]
        ii, vi = ii + n_img, vi + n_vid
        singles.append(one)
    with vlmprune.apply(model, "fastervlm", ratio=0.75):
        out = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
        for b, one in enumerate(singles):
            alone = model(**one).logits
            assert alone.shape[1] == out.shape[1]
            torch.testing.assert_close(out[b : b + 1], alone, atol=1e-5, rtol=0)
            assert torch.equal(gen[b : b + 1], model.generate(**one, max_new_tokens=5, do_sample=False))


def test_batch_with_padding_equals_single(model):
    """Different visual token counts: the batch is left-padded, each sample keeps its own k."""
    samples = [dict(images=[(1, 8, 8)]), dict(images=[(1, 8, 12)])]
    batch = make_batch(model, samples, seed=4)
    with vlmprune.apply(model, "fastervlm", ratio=0.75) as handle:
        out = model(**batch).logits
        assert handle.stats.last.visual_out == [keep_count(16, 0.75), keep_count(24, 0.75)]
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        rows = [64, 96]
        pix = torch.split(batch["pixel_values"], rows)
        for b in range(2):
            real = batch["attention_mask"][b].bool()
            one = {k: batch[k][b : b + 1, real] for k in ("input_ids", "mm_token_type_ids", "attention_mask")}
            one["pixel_values"], one["image_grid_thw"] = pix[b], batch["image_grid_thw"][b : b + 1]
            alone = model(**one).logits
            torch.testing.assert_close(out[b : b + 1, -alone.shape[1] :], alone, atol=1e-5, rtol=0)
            alone_gen = model.generate(**one, max_new_tokens=4, do_sample=False)
            assert torch.equal(gen[b, -4:], alone_gen[0, -4:])


# -- 5. generate equals a greedy loop on the kept embeddings ------------------------------------------
def test_generate_equals_greedy_on_kept_embeddings(model):
    inputs = make_batch(model, MIXED, seed=5)
    stock = stock_decoder_inputs(model, inputs)
    new = 6
    with vlmprune.apply(model, "fastervlm", ratio=0.9):
        seen, hook = decoder_recorder(model)
        gen = model.generate(**inputs, max_new_tokens=new, do_sample=False)
        hook.remove()
    cols = seen[0]["columns"][0]
    embeds = stock["inputs_embeds"][:, cols]
    pos = stock["position_ids"][:, :, cols]
    decoder, cache, tokens = model.model.language_model, DynamicCache(config=model.config.text_config), []
    next_pos = int(pos.max()) + 1
    assert next_pos == inputs["input_ids"].shape[1] + int(model.model.rope_deltas[0, 0])
    for step in range(new):
        hidden = decoder(inputs_embeds=embeds, position_ids=pos, cache=cache, use_cache=True).last_hidden_state
        tok = model.lm_head(hidden[:, -1]).argmax(-1)
        tokens.append(tok)
        embeds = decoder.embed_tokens(tok)[:, None]
        pos = torch.full((3, 1, 1), next_pos + step)
    assert torch.equal(gen[0, -new:], torch.stack(tokens, 1)[0])


# -- 6. baselines, text-only and image-less samples -----------------------------------------------------
@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_random_and_pool_counts(model, ratio):
    inputs = make_batch(model, MIXED)
    grids = [(4, 6), (2, 2), (2, 4), (2, 4), (2, 4)]
    with vlmprune.apply(model, "random", ratio=ratio, seed=1) as handle:
        calls = group_recorder(handle)
        seen, hook = decoder_recorder(model)
        a = model(**inputs).logits
        b = model(**inputs).logits
        hook.remove()
    assert torch.equal(a, b)  # seeded: the same input keeps the same tokens
    want = [keep_count(h * w, ratio) for h, w in grids]
    assert [kept_grid_indices(g, seen[-1]["columns"]).numel() for g in calls[-1]] == want
    assert handle.stats.last.visual_out == [sum(want)]
    with vlmprune.apply(model, "pool", ratio=ratio) as handle:
        calls = group_recorder(handle)
        seen, hook = decoder_recorder(model)
        out = model(**inputs)
        hook.remove()
    pooled = [pooled_grid(g, ratio) for g in grids]
    want = [h * w for h, w in pooled]
    assert [kept_grid_indices(g, seen[-1]["columns"]).numel() for g in calls[-1]] == want
    assert handle.stats.last.visual_out == [sum(want)]
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - (52 - sum(want))


def test_text_only_and_imageless_sample_pass_through(model):
    text = make_batch(model, [dict(before=5, after=6)])
    ref = model(**text).logits
    batch = make_batch(model, [dict(images=[(1, 8, 8)]), dict(before=12, after=13)], seed=6)
    assert batch["attention_mask"].all()  # both samples have 25 tokens
    stock = model(**batch).logits
    for method in ("fastervlm", "random", "pool"):
        with vlmprune.apply(model, method, ratio=0.75) as handle:
            assert torch.equal(model(**text).logits, ref)
            assert handle.stats.last is None
            out = model(**batch).logits
            assert handle.stats.last.visual_out == [keep_count(16, 0.75) if method != "pool" else 4, 0]
            torch.testing.assert_close(out[1], stock[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["random", "pool"])
def test_unscored_methods_decode_positions(model, method):
    inputs = make_batch(model, MIXED, seed=2)
    stock_seen, hook = decoder_recorder(model)
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    hook.remove()
    with vlmprune.apply(model, method, ratio=0.0):
        seen, hook = decoder_recorder(model)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        hook.remove()
    for step, want in zip(seen[1:], stock_seen[1:]):
        assert torch.equal(step["position_ids"][-3:, 0, -1], want["position_ids"][-3:, 0, -1])
