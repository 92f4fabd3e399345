"""InternVL adapter: FasterVLM and the baselines end to end on a tiny random-init InternVL.

The tiny model has an 8x8 patch grid per 32px tile (patch 4) and ``downsample_ratio`` 0.5, so
``pixel_shuffle`` gives M = 16 LLM tokens per tile. Prompts carry several images with different
tile counts, and the reference scores come from an eager forward with ``output_attentions=True``
pooled with a plain ``avg_pool2d(2)`` (independent of the adapter's pixel_shuffle bookkeeping).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
)

import vlmprune
from vlmprune import context
from vlmprune.adapters import for_model
from vlmprune.adapters.internvl import InternVLAdapter
from vlmprune.hooks import HookSet

IMG_CTX, IMG_START, IMG_END, PAD = 3, 4, 5, 0
SIDE, MERGED = 8, 16  # patches per tile side; LLM tokens per tile after pixel_shuffle
TIE_TOL = 1e-6  # scores this close to the k-th one may go either way (fp32 SDPA vs eager)


def tiny_internvl(
    seed: int = 0, attn: str = "sdpa", qk_norm: bool = True, feature_layer: int = -1
) -> InternVLForConditionalGeneration:
    """A tiny InternVL (InternViT with [CLS] + Qwen2) whose weights depend only on ``seed``."""
    torch.manual_seed(seed)
    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=4, use_qk_norm=qk_norm, use_mean_pooling=feature_layer == -1,
        initializer_range=0.1,  # sharper attention than the 0.02 default: fewer near-ties in top-k
    )
    text = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2, initializer_range=0.2,
    )
    cfg = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=IMG_CTX, image_seq_length=MERGED,
        vision_feature_layer=feature_layer,
    )
    cfg._attn_implementation = attn
    model = InternVLForConditionalGeneration(cfg).eval()
    emb = model.model.vision_tower.embeddings
    with torch.no_grad():  # zero-init by default; random values make the [CLS] row image-specific
        emb.cls_token.normal_()
        emb.position_embeddings.normal_()
    return model


def prompt(tiles: list[int], before: int = 3, after: int = 4, seed: int = 0) -> torch.Tensor:
    """Token ids of one prompt: text, then per image <img> + M*tiles context tokens + </img>, text."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(6, 64, (before,), generator=g)]
    for t in tiles:
        parts += [torch.tensor([IMG_START]), torch.full((MERGED * t,), IMG_CTX), torch.tensor([IMG_END])]
    parts.append(torch.randint(6, 64, (after,), generator=g))
    return torch.cat(parts)


def batch(rows: list[torch.Tensor], num_tiles: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.stack(rows)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if num_tiles:
        g = torch.Generator().manual_seed(1000 + seed)
        out["pixel_values"] = torch.randn(num_tiles, 3, 32, 32, generator=g)
    return out


def split(inputs: dict, sample: int, tiles_before: int, tiles: int) -> dict[str, torch.Tensor]:
    """One sample of a batch on its own, with its tiles."""
    out = {k: v[sample : sample + 1] for k, v in inputs.items() if k != "pixel_values"}
    if tiles:
        out["pixel_values"] = inputs["pixel_values"][tiles_before : tiles_before + tiles]
    return out


@contextmanager
def record_decoder(model: InternVLForConditionalGeneration) -> Iterator[list[dict]]:
    """Record what reaches the decoder (registered after apply, so it sees the pruned inputs)."""
    seen: list[dict] = []

    def hook(module, args, kwargs):
        seen.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        h.remove()


def keep_count(n: int, ratio: float) -> int:
    return max(1, round(n * (1 - ratio)))


def reference_scores(eager: InternVLForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Spec section 9 oracle: eager [CLS] row at the feature layer, head mean, 2x2 mean -> (T, M)."""
    with torch.no_grad():
        out = eager.model.vision_tower(pixel_values, output_attentions=True)
    num_layers = len(out.attentions)
    layer = eager.config.vision_feature_layer
    block = num_layers + layer if layer < 0 else layer - 1
    row = out.attentions[block][:, :, 0, 1:].mean(dim=1)  # (T, N), not renormalised
    pooled = F.avg_pool2d(row.view(-1, 1, SIDE, SIDE), 2).flatten(1)
    assert pooled.shape == (pixel_values.shape[0], MERGED)
    return pooled


def reference_kept(eager: InternVLForConditionalGeneration, pixel_values: torch.Tensor, ratio: float) -> list:
    """Top-k per tile of the oracle scores; asserts the k-th boundary is no near-tie (exact oracle)."""
    k = keep_count(MERGED, ratio)
    kept = []
    for scores in reference_scores(eager, pixel_values):
        ordered = scores.sort(descending=True).values
        if k < MERGED:
            assert float(ordered[k - 1] - ordered[k]) > TIE_TOL
        kept.append(torch.topk(scores, k).indices.sort().values)
    return kept


def visual_columns(ids: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(ids == IMG_CTX).squeeze(1)


def expected_columns(ids_row: torch.Tensor, kept: list[torch.Tensor]) -> list[int]:
    """Kept sequence columns of one sample: every non-visual column plus the kept tile tokens."""
    vis = visual_columns(ids_row)
    keep = torch.ones(ids_row.shape[0], dtype=torch.bool)
    keep[vis] = False
    for t, idx in enumerate(kept):
        keep[vis[t * MERGED : (t + 1) * MERGED][idx]] = True
    return torch.nonzero(keep).squeeze(1).tolist()


def kept_columns(full: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
    """Which full-sequence columns the pruned decoder input holds, by exact embedding match in order."""
    cols: list[int] = []
    for i in range(pruned.shape[0]):
        if mask is not None and not bool(mask[i]):
            continue
        hits = torch.nonzero((full == pruned[i]).all(-1)).squeeze(1)
        hits = hits[hits > (cols[-1] if cols else -1)]  # kept columns stay in order; text ids repeat
        cols.append(int(hits[0]))
    return cols


TILES = [2, 3]  # two images in one prompt, with different tile counts


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box oversubscribed intra-op
    threads made this file ~10x slower; restore the setting for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> InternVLForConditionalGeneration:
    return tiny_internvl()


def test_adapter_selected_and_pixel_shuffle_grouping(model):
    adapter = for_model(model)
    assert isinstance(adapter, InternVLAdapter)
    members = adapter.merge_members(SIDE)
    assert members.shape == (MERGED, 4)
    # every merged token is one 2x2 patch block, tokens in raster order over the merged grid
    for m, row in enumerate(members.tolist()):
        r, c = divmod(m, SIDE // 2)
        assert sorted(row) == sorted([2 * r * SIDE + 2 * c + dr * SIDE + dc for dr in (0, 1) for dc in (0, 1)])
    scores = torch.rand(5, SIDE * SIDE)
    pooled = adapter.merged_scores(scores)
    assert pooled.shape == (5, MERGED)  # pooled score length == merged tokens per tile
    torch.testing.assert_close(pooled, F.avg_pool2d(scores.view(5, 1, SIDE, SIDE), 2).flatten(1))
    assert adapter.merged_grid(SIDE) == (4, 4)


def test_ratio_zero_bit_identical_and_remove(model):
    inputs = batch([prompt(TILES, seed=1), prompt(TILES, seed=2)], num_tiles=2 * sum(TILES))
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vlmprune.apply(model, "fastervlm", ratio=0.0) as handle:
            assert torch.equal(model(**inputs).logits, ref)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)
            assert handle.stats.last.visual_out == [sum(TILES) * MERGED] * 2
        handle = vlmprune.apply(model, "fastervlm", ratio=0.75)
        assert model(**inputs).logits.shape[1] < ref.shape[1]
        handle.remove()
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_counts_lengths_and_cache(model, ratio):
    ids = prompt(TILES, seed=3)
    inputs = batch([ids], num_tiles=sum(TILES))
    tiles = sum(TILES)
    k = keep_count(MERGED, ratio)
    assert k == round(MERGED * (1 - ratio))
    with torch.no_grad(), vlmprune.apply(model, "fastervlm", ratio=ratio) as handle:
        with record_decoder(model) as seen:
            out = model(**inputs, use_cache=True)
    rec = handle.stats.last
    assert rec.scoring == "cls" and rec.method == "fastervlm" and rec.positions == "contiguous"
    assert rec.visual_in == [tiles * MERGED] and rec.visual_out == [tiles * k]
    assert rec.overhead_flops == 2.0 * tiles * (SIDE * SIDE + 1) * 32 + tiles * SIDE * SIDE
    removed = tiles * (MERGED - k)
    assert out.logits.shape[1] == ids.shape[0] - removed
    assert out.cache.get_seq_length() == ids.shape[0] - removed
    pos = seen[0]["position_ids"]
    assert torch.equal(pos, torch.arange(ids.shape[0] - removed).unsqueeze(0))
    # per tile: exactly k of its M tokens reached the LLM
    with torch.no_grad(), record_decoder(model) as full_seen:
        model(**inputs)
    cols = kept_columns(full_seen[0]["inputs_embeds"][0], seen[0]["inputs_embeds"][0], None)
    vis = visual_columns(ids)
    for t in range(tiles):
        tile_cols = set(vis[t * MERGED : (t + 1) * MERGED].tolist())
        assert len(tile_cols & set(cols)) == k


@pytest.mark.parametrize(
    "qk_norm,feature_layer,ratio", [(True, -1, 0.75), (False, -2, 0.75), (True, -1, 0.9), (False, 2, 0.5)]
)
def test_kept_tokens_match_eager_reference(qk_norm, feature_layer, ratio):
    model = tiny_internvl(seed=4, qk_norm=qk_norm, feature_layer=feature_layer)
    eager = tiny_internvl(seed=4, attn="eager", qk_norm=qk_norm, feature_layer=feature_layer)
    ids = prompt(TILES, seed=5)
    inputs = batch([ids], num_tiles=sum(TILES), seed=5)
    scores_ref = reference_scores(eager, inputs["pixel_values"])
    with torch.no_grad(), record_decoder(model) as full_seen:
        model(**inputs)
    with torch.no_grad(), vlmprune.apply(model, "fastervlm", ratio=ratio), record_decoder(model) as seen:
        model(**inputs)
    assert model.config.vision_config._attn_implementation == "sdpa"  # scoring never forced eager
    cols = kept_columns(full_seen[0]["inputs_embeds"][0], seen[0]["inputs_embeds"][0], None)
    vis = visual_columns(ids)
    assert set(cols) - set(vis.tolist()) == set(range(ids.shape[0])) - set(vis.tolist())  # text kept
    k = keep_count(MERGED, ratio)
    for t, scores in enumerate(scores_ref):
        tile = vis[t * MERGED : (t + 1) * MERGED].tolist()
        kept = [j for j, c in enumerate(tile) if c in set(cols)]
        assert len(kept) == k
        kth = scores.sort(descending=True).values[k - 1]
        must_keep = torch.nonzero(scores > kth + TIE_TOL).squeeze(1).tolist()
        must_drop = torch.nonzero(scores < kth - TIE_TOL).squeeze(1).tolist()
        assert set(must_keep) <= set(kept) and not set(must_drop) & set(kept)
        if len(must_keep) + len(must_drop) == MERGED - 1:  # no tie at the boundary: exact top-k
            assert kept == torch.topk(scores, k).indices.sort().values.tolist()


def test_scores_match_eager_attention_row():
    """The q/k captured after qk-norm reproduce the eager [CLS] row to fp32 precision."""
    model = tiny_internvl(seed=6, qk_norm=True)
    eager = tiny_internvl(seed=6, attn="eager", qk_norm=True)
    pv = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = eager.model.vision_tower(pv, output_attentions=True).attentions[-1][:, :, 0, 1:].mean(1)
    adapter = for_model(model)
    hooks, owner = HookSet(), object()
    adapter.install_scoring(hooks, "cls", owner)
    ctx = context.enter(owner, {})
    try:
        with torch.no_grad():
            model.model.vision_tower(pv)
        scores = adapter.captured_scores(ctx)
    finally:
        context.leave(owner)
        hooks.remove()
    torch.testing.assert_close(scores, ref, atol=1e-6, rtol=1e-5)
    assert adapter.merged_scores(scores).shape == (3, MERGED)


def test_batch_equals_each_alone(model):
    # sample 0: images of 1 and 2 tiles; sample 1: one image of 3 tiles (+2 text tokens: same length)
    a, b = prompt([1, 2], seed=7), prompt([3], after=6, seed=8)
    assert a.shape == b.shape
    inputs = batch([a, b], num_tiles=6, seed=7)
    with torch.no_grad(), vlmprune.apply(model, "fastervlm", ratio=0.75) as handle:
        both = model(**inputs).logits
        both_gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert handle.stats.last.visual_out == [3 * 4, 3 * 4]
        for s, (before, tiles) in enumerate([(0, 3), (3, 3)]):
            alone_inputs = split(inputs, s, before, tiles)
            alone = model(**alone_inputs).logits
            torch.testing.assert_close(both[s : s + 1], alone, atol=1e-5, rtol=0)
            gen = model.generate(**alone_inputs, max_new_tokens=5, do_sample=False)
            assert torch.equal(both_gen[s : s + 1], gen)


@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_generate_equals_greedy_from_kept_embeddings(model, positions):
    ratio, steps = 0.75, 6
    eager = tiny_internvl(attn="eager")  # same seed-0 weights as the fixture
    ids = prompt(TILES, seed=9)
    inputs = batch([ids], num_tiles=sum(TILES), seed=9)
    cols = torch.tensor(expected_columns(ids, reference_kept(eager, inputs["pixel_values"], ratio)))
    with torch.no_grad(), record_decoder(model) as full_seen:
        model(**inputs)
    kept_embeds = full_seen[0]["inputs_embeds"][:, cols]
    pos = torch.arange(cols.numel()) if positions == "contiguous" else cols.clone()
    # manual greedy loop on the unpatched decoder, fed the kept embeddings directly
    lm, tokens = model.model.language_model, []
    with torch.no_grad():
        cache = DynamicCache(config=lm.config)
        embeds, p = kept_embeds, pos.unsqueeze(0)
        for _ in range(steps):
            out = lm(inputs_embeds=embeds, position_ids=p, cache=cache, use_cache=True)
            tok = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
            tokens.append(int(tok))
            embeds = model.model.get_input_embeddings()(tok).unsqueeze(1)
            p = p[:, -1:] + 1
        with vlmprune.apply(model, "fastervlm", ratio=ratio, positions=positions) as handle:
            with record_decoder(model) as seen:
                gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None)
            assert handle.stats.last.positions == positions
    assert torch.equal(seen[0]["position_ids"], pos.unsqueeze(0))
    assert torch.equal(seen[0]["inputs_embeds"], kept_embeds)
    assert gen[0, ids.shape[0] :].tolist() == tokens


def test_left_padded_batch_with_different_tile_counts(model):
    """Samples with different tile layouts and prompt lengths: each tile keeps its own top-k."""
    ratio, k = 0.75, 4
    a, b = prompt([1], seed=15), prompt([2, 1], seed=16)
    pad = b.shape[0] - a.shape[0]
    ids = torch.stack([torch.cat([torch.full((pad,), PAD), a]), b])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    g = torch.Generator().manual_seed(15)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(4, 3, 32, 32, generator=g)}
    kept = reference_kept(tiny_internvl(attn="eager"), inputs["pixel_values"], ratio)
    with torch.no_grad(), record_decoder(model) as full_seen:
        model(**inputs)
    with torch.no_grad(), vlmprune.apply(model, "fastervlm", ratio=ratio) as handle, record_decoder(model) as seen:
        out = model(**inputs)
    assert handle.stats.last.visual_out == [1 * k, 3 * k]
    new_mask = seen[0]["attention_mask"]
    assert handle.stats.last.llm_tokens == [a.shape[0] - (MERGED - k), b.shape[0] - 3 * (MERGED - k)]
    # old pad columns are dropped: the padded length is the longest pruned real row
    assert out.logits.shape[1] == max(a.shape[0] - (MERGED - k), b.shape[0] - 3 * (MERGED - k))
    for s, tiles in enumerate([kept[:1], kept[1:]]):
        cols = kept_columns(full_seen[0]["inputs_embeds"][s], seen[0]["inputs_embeds"][s], new_mask[s])
        assert cols == [c for c in expected_columns(ids[s], tiles) if mask[s, c]]


@pytest.mark.parametrize(
    # pool: a 4x4 grid -> round(4*sqrt(1-r)) per side; random: round(16*(1-r)) per tile
    "method,ratio,per_tile",
    [("pool", 0.75, 4), ("pool", 0.9, 1), ("random", 0.75, 4), ("random", 0.9, 2)],
)
def test_baselines_counts(model, method, ratio, per_tile):
    ids = prompt(TILES, seed=10)
    inputs = batch([ids], num_tiles=sum(TILES), seed=10)
    with torch.no_grad(), vlmprune.apply(model, method, ratio=ratio) as handle:
        out = model(**inputs, use_cache=True)
        again = model(**inputs).logits
    assert handle.stats.last.visual_out == [sum(TILES) * per_tile]
    assert handle.stats.last.scoring is None
    assert out.logits.shape[1] == ids.shape[0] - sum(TILES) * (MERGED - per_tile)
    assert out.cache.get_seq_length() == out.logits.shape[1]
    assert torch.equal(out.logits, again)  # random draws are seeded per call


def test_text_only_and_imageless_sample_pass_through(model):
    text = batch([prompt([], after=10, seed=11)], num_tiles=0)
    with torch.no_grad():
        ref = model(**text).logits
        with vlmprune.apply(model, "fastervlm", ratio=0.9):
            assert torch.equal(model(**text).logits, ref)
    # batch: sample 0 has a 2-tile image, sample 1 no image at all (same prompt length)
    a = prompt([2], seed=12)
    b = torch.randint(6, 64, (a.shape[0],), generator=torch.Generator().manual_seed(13))
    inputs = batch([a, b], num_tiles=2, seed=12)
    with torch.no_grad():
        b_alone = model(input_ids=b.unsqueeze(0), attention_mask=torch.ones(1, b.shape[0], dtype=torch.long)).logits
        with vlmprune.apply(model, "fastervlm", ratio=0.75) as handle:
            both = model(**inputs).logits
            rec = handle.stats.last
            a_alone = model(**split(inputs, 0, 0, 2)).logits
    assert rec.visual_out == [2 * 4, 0]
    assert rec.llm_tokens == [a.shape[0] - 2 * (MERGED - 4), b.shape[0]]
    torch.testing.assert_close(both[1:], b_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[0:1, -a_alone.shape[1] :], a_alone, atol=1e-5, rtol=0)


def test_feature_layer_override_mismatch_is_an_error(model):
    inputs = batch([prompt([1], seed=14)], num_tiles=1, seed=14)
    with torch.no_grad(), vlmprune.apply(model, "fastervlm", ratio=0.5):
        with pytest.raises(ValueError, match="vision_feature_layer"):
            model(**inputs, vision_feature_layer=-2)
