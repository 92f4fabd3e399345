"""FasterVLM (and any pre-LLM method) on LLaVA-NeXT in the reference code's "spatial" AnyRes layout.

The expected decoder input is computed here without the adapter: the tower's feature-layer rows of
every crop through the model's projector, the eager [CLS] attention row per crop, top-k per crop,
then the base view's kept tokens followed by the grid crops' kept tokens in raster order of the
stitched grid (crops on an (rows, cols) grid, each SIDE x SIDE), no unpadding, no newlines, and
positions 0..L'-1.
"""

from __future__ import annotations

import pytest
import torch
from test_llava_next import (
    IMAGE,
    SIDE,
    SQUARE,
    TALL,
    WIDE,
    N,
    call,
    decoder_recorder,
    grid_shape,
    make_inputs,
    reference_scores,
    tiny_next,
    tiny_onevision,
)

import vlmprune
from vlmprune.method import keep_count


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def nxt():
    return tiny_next(seed=3)


@pytest.fixture(scope="module")
def nxt_eager(nxt):
    eager = tiny_next(attn="eager")
    eager.load_state_dict(nxt.state_dict())
    return eager


def spatial_reference(model, eager, inp, sample: int, ratio: float) -> torch.Tensor:
    """The decoder's input embeddings for ``sample`` (its real tokens), laid out as the reference code."""
    scores, _ = reference_scores(eager, inp)
    embed = model.get_input_embeddings()
    ids = inp["input_ids"][sample][inp["attention_mask"][sample].bool()]
    image_idx = sum(len(s.get("images", [])) for s in inp["_starts"][:sample])
    tower = model.model.vision_tower
    proj = model.model.multi_modal_projector
    pieces, i = [], 0
    while i < ids.numel():
        if int(ids[i]) != IMAGE:
            pieces.append(embed(ids[i : i + 1]))
            i += 1
            continue
        run = i
        while i < ids.numel() and int(ids[i]) == IMAGE:
            i += 1
        del run
        n_crops = inp["_crops"][image_idx]
        pix = inp["pixel_values"][image_idx][:n_crops]
        feats = proj(tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:])  # (crops, N, D)
        k = keep_count(N, ratio)
        keep = torch.zeros(n_crops, N, dtype=torch.bool)
        for c in range(n_crops):
            keep[c, torch.topk(scores[image_idx][c], k).indices] = True
        rows, cols = grid_shape(model, tuple(inp["image_sizes"][image_idx].tolist()))
        d = feats.shape[-1]
        grid = feats[1:].view(rows, cols, SIDE, SIDE, d).permute(0, 2, 1, 3, 4).reshape(-1, d)
        grid_keep = keep[1:].view(rows, cols, SIDE, SIDE).permute(0, 2, 1, 3).reshape(-1)
        pieces.append(feats[0][keep[0]])
        pieces.append(grid[grid_keep])
        image_idx += 1
    return torch.cat(pieces)


@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize("sizes", [[SQUARE], [WIDE], [TALL]])
def test_spatial_layout_equals_reference(nxt, nxt_eager, ratio, sizes):
    inp = make_inputs(nxt, [{"images": sizes, "seed": 5}, {"images": [SQUARE], "seed": 6, "before": 9}])
    with vlmprune.apply(nxt, "fastervlm", ratio=ratio, anyres="spatial") as handle:
        seen, hook = decoder_recorder(nxt)
        nxt(**call(inp))
        hook.remove()
    got = seen[0]
    mask = got["attention_mask"]
    for b in range(2):
        real = mask[b].bool() if mask is not None else torch.ones(got["inputs_embeds"].shape[1], dtype=torch.bool)
        expected = spatial_reference(nxt, nxt_eager, inp, b, ratio)
        emb = got["inputs_embeds"][b][real]
        assert emb.shape == expected.shape
        torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-4)
        pos = got["position_ids"][b][real]  # consecutive (the start follows the stock left-padding rule)
        torch.testing.assert_close(pos - pos[0], torch.arange(int(real.sum())))
    # kept count: k per crop, no newline tokens
    k = keep_count(N, ratio)
    crops0 = inp["_crops"][0]
    assert handle.stats.last.visual_out[0] == k * crops0


def test_spatial_batch_equals_each_alone(nxt):
    specs = [{"images": [WIDE], "seed": 1}, {"images": [TALL], "seed": 2, "before": 6}]
    both = make_inputs(nxt, specs)
    with vlmprune.apply(nxt, "fastervlm", ratio=0.75, anyres="spatial"):
        out = nxt.generate(**call(both), max_new_tokens=4, do_sample=False)[:, -4:]
        for b, spec in enumerate(specs):
            alone = nxt.generate(**call(make_inputs(nxt, [spec])), max_new_tokens=4, do_sample=False)[:, -4:]
            assert torch.equal(out[b], alone[0])


def test_spatial_other_methods_and_remove(nxt):
    inp = call(make_inputs(nxt, [{"images": [WIDE], "seed": 4}]))
    before = nxt(**inp).logits
    for method in ("random", "divprune", "cdpruner", "visionzip", "vispruner", "pool"):
        with vlmprune.apply(nxt, method, ratio=0.75, anyres="spatial") as handle:
            nxt(**inp)
        expected = keep_count(N, 0.75) * 3  # WIDE: base view + a 1 x 2 grid, k per crop, no newlines
        if method != "pool":  # pooling keeps whole cells of the grid
            assert handle.stats.last.visual_out[0] == expected, method
    assert torch.equal(nxt(**inp).logits, before)


def test_spatial_refusals(nxt):
    with pytest.raises(ValueError, match="anyres"):
        vlmprune.apply(nxt, "fastervlm", ratio=0.5, anyres="diagonal")
    with pytest.raises(ValueError, match="contiguous"):
        vlmprune.apply(nxt, "fastervlm", ratio=0.5, anyres="spatial", positions="original")
    with pytest.raises(ValueError, match="not offered"):
        vlmprune.apply(tiny_onevision(), "fastervlm", ratio=0.5, anyres="spatial")
    # ratio 0 keeps every crop token: more than the unpadded prompt holds for a wide image
    inp = call(make_inputs(nxt, [{"images": [WIDE], "seed": 4}]))
    with vlmprune.apply(nxt, "fastervlm", ratio=0.0, anyres="spatial"):
        with pytest.raises(ValueError, match="placeholders"):
            nxt(**inp)
