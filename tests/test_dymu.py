"""DyMU (dynamic token merging + virtual token unmerging): the spec's oracles on tiny random-init models.

Pure functions first (matching, merging, conservation, batch padding, calibration rule, VTU kernels),
then the wiring on a tiny LLaVA-1.5: no-op equality, VTU against the expanded reference, batch
invariance with different kept counts, generation, FLOPs against FlopCounterMode, calibration and the
error messages.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmprune
import vlmprune.adapters
import vlmprune.flops
from vlmprune.methods import dymu
from vlmprune.methods.dymu import calibrate as cal
from vlmprune.methods.dymu import merge as tm
from vlmprune.methods.dymu import unmerge as vtu

sys.path.insert(0, str(Path(__file__).parent))
from tiny import IMAGE_TOKEN, PAD, llama_config  # noqa: E402


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tiny(attn: str = "sdpa", seed: int = 0, vision_layers: int = 4, hidden: int = 32) -> LlavaForConditionalGeneration:
    """CLIP tower 32px / patch 4 = 64 patches + [CLS]; feature layer -2 (3 merging blocks); Llama 2 layers, GQA."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=32, patch_size=4, projection_dim=hidden)
    cfg = LlavaConfig(vision_config=vision, text_config=llama_config(hidden_size=hidden, intermediate_size=2 * hidden,
                                                                     initializer_range=0.2),
                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


N_PATCH = 64


def images(n: int, seed: int = 0) -> torch.Tensor:
    """A mix of smooth (redundant) and noisy (detailed) images, so kept counts differ per image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        smooth = torch.randn(1, 3, 2 + i % 3, 2 + i % 3, generator=g)
        img = torch.nn.functional.interpolate(smooth, size=(32, 32), mode="bilinear", align_corners=False)[0]
        img = img + (0.1 + 0.6 * (i % 4)) * torch.randn(3, 32, 32, generator=g)
        out.append(img)
    return torch.stack(out)


def prompt(pixel_values: torch.Tensor, before: list[int], after: list[int], seed: int = 0) -> dict:
    """Left-padded prompts: ``before[i]`` text tokens, the image, ``after[i]`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(4, 64, (b,), generator=g), torch.full((N_PATCH,), IMAGE_TOKEN),
                       torch.randint(4, 64, (a,), generator=g)]) for b, a in zip(before, after)]
    width = max(r.numel() for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - r.numel(),), PAD), r]) for r in rows])
    mask = (torch.arange(width).unsqueeze(0) >= (width - torch.tensor([r.numel() for r in rows])).unsqueeze(1)).long()
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}


def one(inputs: dict, i: int) -> dict:
    keep = inputs["attention_mask"][i].bool()
    return {"input_ids": inputs["input_ids"][i : i + 1, keep], "attention_mask": inputs["attention_mask"][i : i + 1, keep],
            "pixel_values": inputs["pixel_values"][i : i + 1]}


_THRESHOLDS: dict = {}


def thresholds(model, target: int = 24) -> list[float]:
    """Thresholds calibrated on this tiny model (cached per model seed / size)."""
    key = (model.config.vision_config.hidden_size, target,
           float(sum(p.double().sum() for p in model.model.vision_tower.parameters())))
    if key not in _THRESHOLDS:
        _THRESHOLDS[key] = cal.calibrate(model, images(16, seed=1), target, batch_size=8)["thresholds"]
    return _THRESHOLDS[key]


# -- pure functions ------------------------------------------------------------------------------


def _run_layers(x, taus, protect=True, state=None):
    """Merge a padded batch through several 'layers' (metric = the features themselves)."""
    state = state or tm.MergeState.start(x.shape[0], x.shape[1], x.device)
    states = []
    for tau in taus:
        match = tm.bipartite_match(x, state.valid, protect)
        merge = tm.threshold_merges(match, state.valid, tau, protect)
        x, state = tm.merge_tokens(x, state, match, merge)
        states.append((x, state))
    return states


def _clustered(bsz=3, n=33, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(bsz, 4, c, generator=g)
    assign = torch.randint(0, 4, (bsz, n), generator=g)
    noise = torch.tensor([0.05, 0.3, 1.0][:bsz]).view(bsz, 1, 1)
    return torch.gather(centers, 1, assign.unsqueeze(-1).expand(-1, -1, c)) + noise * torch.randn(bsz, n, c, generator=g)


def test_conservation_sizes_membership_and_weighted_mean():
    x0 = _clustered()
    n0 = x0.shape[1]
    x, state = x0, tm.MergeState.start(3, n0, "cpu")
    for tau in (0.9, 0.8, 0.5):
        match = tm.bipartite_match(x, state.valid, True)
        merge = tm.threshold_merges(match, state.valid, tau, True)
        x, state = tm.merge_tokens(x, state, match, merge)
        assert torch.allclose(state.size.sum(1), torch.full((3,), float(n0)))  # [CLS] + every patch, once
        assert torch.equal(state.pos.sum(1), torch.ones(3, n0))  # every original token in exactly one row
        assert torch.allclose(state.pos.sum(-1), state.size)
        assert torch.equal(state.pos[:, 0, 0], torch.ones(3))  # [CLS] first and alone
        assert torch.equal(state.size[:, 0], torch.ones(3))
        # the size-weighted mean of the members reproduces each merged token (x is linear here)
        ref = (state.pos @ x0) / state.size.clamp_min(1).unsqueeze(-1)
        assert torch.allclose(ref[state.valid], x[state.valid], atol=1e-5)
    counts = state.counts.tolist()
    assert len(set(counts)) > 1, "rows of different redundancy should keep different counts"


def test_threshold_rule_is_strict_capped_and_monotone():
    score = torch.tensor([[-math.inf, 0.5, 0.7, 0.7, 0.2]])
    match = tm.Matching(score, torch.zeros_like(score, dtype=torch.long))
    valid = torch.ones(1, 10, dtype=torch.bool)
    assert tm.threshold_merges(match, valid, 0.7, True).sum() == 0  # strict
    assert tm.threshold_merges(match, valid, 0.4, True).tolist() == [[False, True, True, True, False]]
    small = torch.ones(1, 5, dtype=torch.bool)  # (5 - 1) // 2 = 2 merges at most, the best first
    assert tm.threshold_merges(match, small, 0.0, True).tolist() == [[False, False, True, True, False]]
    x = _clustered(seed=3)
    state = tm.MergeState.start(3, x.shape[1], "cpu")
    m = tm.bipartite_match(x, state.valid, True)
    counts = [int(tm.threshold_merges(m, state.valid, t, True).sum()) for t in torch.linspace(-1, 1, 21).tolist()]
    assert counts == sorted(counts, reverse=True)  # oracle 6: raising tau never adds merges


def test_batched_padded_merging_equals_each_row_alone():
    x = _clustered(seed=5)
    taus = (0.95, 0.7, 0.4)
    batched = _run_layers(x, taus)[-1]
    xb, sb = tm.canonical_order(*batched)
    for i in range(3):
        xa, sa = tm.canonical_order(*_run_layers(x[i : i + 1], taus)[-1])
        n = int(sa.counts[0])
        assert int(sb.counts[i]) == n
        assert torch.equal(sb.pos[i, :n], sa.pos[0, :n])
        assert torch.allclose(xb[i, :n], xa[0, :n], atol=1e-6)
    assert len(set(sb.counts.tolist())) > 1


def test_no_merge_keeps_order_and_values():
    x = _clustered(seed=1)
    state = tm.MergeState.start(3, x.shape[1], "cpu")
    match = tm.bipartite_match(x, state.valid, True)
    merge = torch.zeros_like(match.score, dtype=torch.bool)
    merge[0, 3] = True  # only row 0 merges: the others must be untouched (order included)
    out, st = tm.merge_tokens(x, state, match, merge)
    assert torch.equal(out[1:, : x.shape[1]], x[1:, : out.shape[1]])
    assert st.counts.tolist() == [x.shape[1] - 1, x.shape[1], x.shape[1]]
    assert tm.attention_bias(tm.MergeState.start(1, 4, "cpu"), torch.float32) is None


def _tome_reference(x, size, r, class_token):
    """ToMe's batch-size-1 bipartite soft matching and size-weighted merge, written literally:
    A = even, B = odd tokens; the r best edges merge; the output is [unmerged A ; B], unmerged A
    re-sorted by index only with a class token (else left in descending-score order)."""
    m = x / x.norm(dim=-1, keepdim=True)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    unm_idx, src_idx = edge_idx[:, r:, :], edge_idx[:, :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t):
        src, dst = t[:, ::2], t[:, 1::2]
        c = t.shape[-1]
        unm = src.gather(dim=-2, index=unm_idx.expand(-1, -1, c))
        src = src.gather(dim=-2, index=src_idx.expand(-1, -1, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(-1, -1, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    w = merge(x * size[..., None])
    s = merge(size[..., None])
    return w / s, s[..., 0]


@pytest.mark.parametrize("class_token", [True, False])
def test_merge_layout_equals_tome_batch_size_one(class_token):
    """The layout after each merge is ToMe's: [unmerged A ; B]; without a [CLS] token the reference
    leaves the unmerged A tokens in descending-score order (``unmerged_by_score``)."""
    x = _clustered(bsz=1, n=32, seed=7)
    state = tm.MergeState.start(1, x.shape[1], "cpu")
    ref, ref_size = x, torch.ones(1, x.shape[1])
    for r in (6, 5, 4):
        match = tm.bipartite_match(x, state.valid, class_token)
        order = match.score.argsort(dim=1, descending=True, stable=True)
        merge = torch.zeros_like(match.score, dtype=torch.bool)
        merge[0, order[0, :r]] = True
        x, state = tm.merge_tokens(x, state, match, merge, unmerged_by_score=not class_token)
        ref, ref_size = _tome_reference(ref, ref_size, r, class_token)
        assert torch.allclose(x, ref, atol=1e-5)
        assert torch.equal(state.size, ref_size)


def test_reference_order_without_vtu_feeds_the_emitted_order():
    """order="reference", vtu=False: the LLM receives the merged tokens in the order the encoder emitted
    them (ToMe's layout, not re-sorted), with consecutive positions; canonical order is the sorted one."""
    model = tiny(seed=3)
    inputs = prompt(images(1, seed=2), [3], [2])
    seen: dict = {}
    proj = model.model.multi_modal_projector
    first = proj.register_forward_hook(lambda m, a, out: seen.__setitem__("projected", out.detach().clone()))
    try:
        for order in ("canonical", "reference"):
            with vlmprune.apply(model, vlmprune.DyMUConfig(thresholds=thresholds(model), vtu=False, order=order)) as h:
                grab = model.model.language_model.register_forward_pre_hook(
                    lambda m, a, kw, key=order: seen.__setitem__(key, kw["inputs_embeds"].detach().clone()),
                    with_kwargs=True)
                model(**inputs)
                grab.remove()
                k = h.stats.last.image_tokens[0]
            assert k < N_PATCH
            seen[order + "_rows"] = seen["projected"][0]
            seen[order + "_k"] = k
    finally:
        first.remove()
    k = seen["reference_k"]
    assert seen["canonical_k"] == k
    ref_rows, can_rows = seen["reference_rows"], seen["canonical_rows"]
    assert ref_rows.shape[0] == k and can_rows.shape[0] == k  # the projector ran on the compact tokens
    assert torch.allclose(seen["reference"][0, 3 : 3 + k], ref_rows, atol=1e-6)
    assert torch.allclose(seen["canonical"][0, 3 : 3 + k], can_rows, atol=1e-6)
    assert not torch.allclose(ref_rows, can_rows)  # same tokens, another order
    assert torch.allclose(ref_rows.sum(0), can_rows.sum(0), atol=1e-4)
    with pytest.raises(ValueError, match="order must be one of"):
        vlmprune.apply(model, "dymu", thresholds=thresholds(model), order="sorted")


def test_batch_topk_rule_and_schedule():
    score = torch.tensor([[0.9, 0.1, -math.inf], [0.8, 0.95, 0.3]])
    match = tm.Matching(score, torch.zeros_like(score, dtype=torch.long))
    merge, tau = tm.batch_topk_merges(match, 1)  # 2 edges batch-wide: 0.95 and 0.9 (both in... rows 1 and 0)
    assert merge.tolist() == [[True, False, False], [False, True, False]]
    assert tau == pytest.approx(0.8)  # best unmerged edge
    _, tau_all = tm.batch_topk_merges(match, 5)
    assert tau_all == 0.0
    neg = tm.Matching(torch.tensor([[-0.5, -0.2]]), torch.zeros(1, 2, dtype=torch.long))
    assert tm.batch_topk_merges(neg, 1)[1] == 0.0  # clamped to >= 0
    assert tm.schedule(10, 3) == [4, 3, 3]
    for kind in ("linear", "reverse_linear"):
        r = tm.schedule(100, 4, kind)
        assert sum(r) == 100 and (r == sorted(r, reverse=kind == "linear"))
    with pytest.raises(ValueError):
        tm.schedule(10, 3, "cosine")


def test_scatter_mean_and_exact_rope_scores():
    g = torch.tensor([[0, 1, 1, 2, 1], [2, 2, 0, 1, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x = torch.randn(2, 5, 3)
    out = vtu.scatter_mean(x, g, valid, 3)
    assert torch.allclose(out[0, 1], x[0, 1:3].mean(0)) and torch.allclose(out[1, 2], x[1, :2].mean(0))
    assert vtu.group_counts(g, valid, 3).tolist() == [[1, 2, 1], [2, 1, 2]]
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rot = LlamaRotaryEmbedding(llama_config(hidden_size=32, num_attention_heads=2))
    q, k = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    cos, sin = rot(q, torch.arange(5).expand(2, 5))
    qf, kf = apply_rotary_pos_emb(vtu.expand(q, g, 2), vtu.expand(k, g, 2), cos, sin)
    ref = qf @ kf.transpose(-1, -2)
    assert torch.allclose(vtu.exact_rope_scores(q, k, g, cos, sin, chunk=2), ref, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kernel", ["fast", "exact"])
def test_vtu_attention_equals_expanded_reference(attn, kernel):
    """Oracle 2: the patched attention on the compact rows equals the unmodified attention module run
    on the expanded sequence at positions 0..N-1, averaged per group (o_proj is affine, so before or
    after it is the same); singleton groups give the stock module's output."""
    model = tiny(attn)
    lm = model.model.language_model
    layer_attn = lm.layers[1].self_attn
    rope_fn = vlmprune.adapters.for_model(model).llm_rope(layer_attn)
    torch.manual_seed(1)
    h = torch.randn(2, 5, 32)
    g = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 4], [0, 0, 1, 2, 2, 3, 4, 4]])
    valid = torch.ones_like(g, dtype=torch.bool)
    pos = torch.arange(8).expand(2, 8)
    cos, sin = lm.rotary_emb(h, pos)
    from vlmprune.sequence import layer_mask

    stock_mask = None if attn == "sdpa" else layer_mask(valid, 8, torch.zeros(1, dtype=torch.float32))
    full, _ = layer_attn(vtu.expand(h, g, 1), position_embeddings=(cos, sin), attention_mask=stock_mask)
    ref = vtu.scatter_mean(full, g, valid, 5)
    state = dymu.VTUState(g, valid, pos, 5, kernel)
    like = stock_mask if attn == "eager" else None
    out, _ = dymu.vtu_attention(layer_attn, h, state, rope_fn, lm.rotary_emb, None, like)
    assert torch.allclose(out, ref, atol=1e-5)
    ident = torch.arange(8).expand(2, 8)
    state = dymu.VTUState(ident, valid, pos, 8, kernel)
    h8 = torch.randn(2, 8, 32)
    out, _ = dymu.vtu_attention(layer_attn, h8, state, rope_fn, lm.rotary_emb, None, like)
    stock, _ = layer_attn(h8, position_embeddings=(cos, sin), attention_mask=stock_mask)
    assert torch.allclose(out, stock, atol=1e-5)


# -- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vtu_kind", ["fast", "exact", False])
def test_infinite_thresholds_are_a_no_op(vtu_kind):
    model = tiny()
    inputs = prompt(images(2), [3, 5], [4, 2])
    ref = model(**inputs, output_hidden_states=True)
    feats = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2,
                                           vision_feature_select_strategy="default").pooler_output
    with vlmprune.apply(model, "dymu", thresholds=[None] * 4, vtu=vtu_kind) as handle:
        out = model(**inputs)
        rec = handle.stats.last
    assert torch.equal(out.logits, ref.logits)
    assert rec.visual_out == [N_PATCH, N_PATCH] and rec.image_tokens == [N_PATCH, N_PATCH]
    assert rec.encoder_layer_tokens == [[N_PATCH + 1] * 3] * 2
    after = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2,
                                           vision_feature_select_strategy="default").pooler_output
    assert all(torch.equal(a, b) for a, b in zip(feats, after))


def test_remove_restores_bit_identical_and_stats():
    model = tiny()
    inputs = prompt(images(2), [3, 5], [4, 2])
    ref = model(**inputs).logits
    handle = vlmprune.apply(model, "dymu", thresholds=thresholds(model))
    out = model(**inputs)
    rec = handle.stats.last
    assert out.logits.shape[1] < ref.shape[1]
    assert rec.vtu == "fast" and rec.positions == "original"
    assert rec.kv_len == inputs["attention_mask"].sum(1).tolist()  # VTU keeps the full-length KV cache
    assert all(v < N_PATCH for v in rec.visual_out) and rec.visual_out == rec.image_tokens
    assert [row[-1] - 1 for row in rec.encoder_layer_tokens] == rec.image_tokens
    assert all(a >= b for row in rec.encoder_layer_tokens for a, b in zip(row, row[1:]))
    handle.remove()
    assert torch.equal(model(**inputs).logits, ref)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("vtu_kind", ["fast", False])
def test_batch_of_two_with_different_counts_equals_each_alone(vtu_kind):
    model = tiny()
    pv = images(4)[[0, 3]]  # smooth and noisy
    inputs = prompt(pv, [3, 6], [5, 2])
    with vlmprune.apply(model, "dymu", thresholds=thresholds(model), vtu=vtu_kind) as handle:
        batched = model(**inputs)
        rec = handle.stats.last
        counts = rec.image_tokens
        assert counts[0] != counts[1], counts
        for i in range(2):
            alone = model(**one(inputs, i))
            assert handle.stats.last.image_tokens == [counts[i]]
            n = alone.logits.shape[1]
            # left padding: the sample's real columns are the last n of its row
            assert torch.allclose(batched.logits[i, -n:], alone.logits[0], atol=1e-4), i


@pytest.mark.parametrize("vtu_kind", ["fast", "exact", False])
def test_generate_batch_matches_single(vtu_kind):
    model = tiny()
    inputs = prompt(images(4)[[0, 3]], [3, 6], [5, 2])
    with vlmprune.apply(model, "dymu", thresholds=thresholds(model), vtu=vtu_kind):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for i in range(2):
            alone = model.generate(**one(inputs, i), max_new_tokens=4, do_sample=False)
            assert torch.equal(out[i, -4:], alone[0, -4:])
        # the first new token is the prefill's greedy choice on the compact sequence
        logits = model(**one(inputs, 0)).logits
        assert int(out[0, -4]) == int(logits[0, -1].argmax())


def test_vtu_decode_uses_the_full_length_cache():
    """Oracle 2, third check: after a VTU prefill the cache holds the full-length rotated K/V, and a
    decode step is the stock attention over it (positions continue at N)."""
    from transformers import DynamicCache

    model = tiny("eager")
    inputs = one(prompt(images(1), [3], [4]), 0)
    n_full = inputs["input_ids"].shape[1]
    with vlmprune.apply(model, "dymu", thresholds=thresholds(model)) as handle:
        cache = DynamicCache(config=model.config.get_text_config())
        pre = model(**inputs, cache=cache, use_cache=True)
        assert cache.get_seq_length() == n_full > pre.logits.shape[1]
        nxt = pre.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
        step = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True).logits
        assert handle.stats.last.kv_len == [n_full]
    # reference: the stock decoder on the same cache contents, with the stock positions
    cache2 = DynamicCache(config=model.config.get_text_config())
    for i, layer in enumerate(cache.layers):
        cache2.update(layer.keys[:, :, :n_full].clone(), layer.values[:, :, :n_full].clone(), i)
    ref = model(input_ids=nxt, attention_mask=mask, cache=cache2, use_cache=True).logits
    assert torch.allclose(step, ref, atol=1e-6)


def test_flops_match_flop_counter():
    from test_flops import SDPA_CPU

    model = tiny("sdpa", hidden=64)
    inputs = prompt(images(2)[[0]], [3], [4])
    with vlmprune.apply(model, "dymu", thresholds=thresholds(model), vtu="fast") as handle:
        with FlopCounterMode(display=False, custom_mapping=SDPA_CPU) as counter:
            model(**inputs)
        report = dymu.flops(handle, inputs)
        rec = handle.stats.last
    counted = float(counter.get_total_flops())
    assert rec.image_tokens[0] < N_PATCH
    assert abs(report.total - counted) / counted < 0.02, (report, counted)
    stock = vlmprune.flops.estimate(model, inputs, inputs["input_ids"].shape[1])
    assert report.vision < stock.vision  # the encoder really ran shorter


def test_calibration_hits_target_and_is_deterministic():
    model = tiny(seed=2)
    pv = images(16, seed=4)
    res = cal.calibrate(model, pv, 20, batch_size=8)
    assert abs(res["calib_mean_tokens"] - 20) <= 0.05 * 20
    assert all(t >= 0 for t in res["thresholds"])
    assert math.isinf(res["thresholds"][3])  # the block after the feature layer never runs
    assert res == cal.calibrate(model, pv, 20, batch_size=8)
    kept, _ = cal.kept_tokens(model, [pv], res["thresholds"])
    assert sum(kept) / len(kept) == pytest.approx(res["calib_mean_tokens"])
    with vlmprune.apply(model, "dymu", thresholds=res["thresholds"]) as handle:
        model(**prompt(pv[:4], [2] * 4, [2] * 4))
        assert handle.stats.last.image_tokens == kept[:4]


def test_calibration_spread_over_all_blocks_is_the_reference_schedule():
    """spread="all": r_total is shared over all 4 blocks as the reference does, so the three blocks up to
    the feature layer merge the first three shares only and more tokens stay than the target."""
    model = tiny(seed=2)
    pv = images(16, seed=4)
    ref = cal.calibrate(model, pv, 20, batch_size=8, match_target=False, spread="all")
    mine = cal.calibrate(model, pv, 20, batch_size=8, match_target=False)
    r_total = N_PATCH - 20
    assert ref["spread_blocks"] == 4 and mine["spread_blocks"] == 3
    expected = cal._batch_pass(model, cal._batches(model, pv, 8), tm.schedule(r_total, 4, "constant")[:3])
    assert ref["thresholds"][:3] == pytest.approx(expected[:3])
    assert ref["thresholds"][:3] != pytest.approx(mine["thresholds"][:3])
    assert ref["calib_mean_tokens"] > mine["calib_mean_tokens"]
    with pytest.raises(ValueError, match="spread must be one of"):
        cal.calibrate(model, pv, 20, spread="last")


def test_thresholds_file_round_trip_and_errors(tmp_path):
    model = tiny()
    res = cal.calibrate(model, images(8), 30, batch_size=8)
    path = cal.write(tmp_path / "t.json", model, res)
    data = json.loads(path.read_text())
    for key in ("encoder_id", "image_size", "r_total", "schedule", "thresholds", "n_images", "calib_mean_tokens",
                "fingerprint", "target_tokens"):
        assert key in data
    assert data["thresholds"][3] is None  # +inf = never merge
    with vlmprune.apply(model, "dymu", thresholds=str(path)) as handle:
        model(**prompt(images(1), [2], [2]))
        assert handle.stats.last.image_tokens[0] < N_PATCH
    other = tiny(hidden=64)
    with pytest.raises(dymu.ThresholdsError, match="calibrated for another vision tower"):
        vlmprune.apply(other, "dymu", thresholds=str(path))
    with pytest.raises(ValueError, match="4 blocks"):
        vlmprune.apply(model, "dymu", thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="unknown DyMU preset"):
        vlmprune.apply(model, "dymu", preset="extreme")
    with pytest.raises(ValueError, match="exactly one"):
        vlmprune.apply(model, "dymu")
    with pytest.raises(ValueError, match="vtu must be"):
        vlmprune.apply(model, "dymu", thresholds=[None] * 4, vtu="approx")
    with pytest.raises(dymu.ThresholdsError, match="no DyMU thresholds file"):
        vlmprune.apply(model, "dymu", thresholds=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"target tokens must be an integer in \[8, 63\]"):
        cal.calibrate(model, images(2), 64)
    with pytest.raises(ValueError, match="target tokens"):
        cal.calibrate(model, images(2), 3)
    assert cal.main(["dymu", "--model", "builtin", "--target-tokens", "5", "--output", str(tmp_path / "x.json")]) == 2
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_builtin_presets_load_or_give_a_clear_error():
    model = tiny()
    for name in dymu.PRESETS:
        if not (dymu.preset_dir() / f"{name}.json").is_file():
            pytest.skip("presets not generated")
        with pytest.raises(dymu.ThresholdsError, match="another vision tower"):  # made for the built-in model
            vlmprune.apply(model, "dymu", preset=name)


def test_unsupported_family_and_composition():
    from types import SimpleNamespace

    from vlmprune.adapters.base import Adapter

    with pytest.raises(ValueError, match="not supported for Adapter models.*InternVL"):
        dymu.encoder_layout(Adapter(SimpleNamespace(model=None, config=None)))
    model = tiny()
    with pytest.raises(ValueError, match="vtu=False"):
        vlmprune.apply(model, [vlmprune.DyMUConfig(thresholds=[None] * 4), vlmprune.DyVTEConfig(exit_layer=1)])
    # without VTU, DyMU's merged tokens are pruned further by DyVTE's exit
    inputs = prompt(images(2), [3, 5], [4, 2])
    with vlmprune.apply(model, [vlmprune.DyMUConfig(thresholds=thresholds(model), vtu=False),
                                vlmprune.DyVTEConfig(exit_layer=1)]) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        recs = handle.stats.records
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert recs[0].method == "dymu-novtu" and recs[-1].exit_layers == [1, 1]
    assert recs[-1].visual_in == recs[0].visual_out


@pytest.fixture(scope="module")
def builtin():
    from vlmprune.evals.builtin import load_builtin

    try:
        return load_builtin()
    except FileNotFoundError:
        pytest.skip("no built-in checkpoint")


def test_builtin_presets_on_the_builtin_model(builtin):
    """The shipped presets on held-out built-in images: mean kept tokens near each preset's target, ordered
    low < mid < high, and a full prefill runs."""
    from vlmprune.evals.data import make_image

    if not all((dymu.preset_dir() / f"{p}.json").is_file() for p in dymu.PRESETS):
        pytest.skip("presets not generated (python -m vlmprune.methods.dymu.calibrate --presets)")
    model, processor = builtin
    imgs = [make_image("test", i).image for i in range(24)]
    pv = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
    means = []
    for name in dymu.PRESETS:
        data = json.loads((dymu.preset_dir() / f"{name}.json").read_text())
        kept, _ = cal.kept_tokens(model, [pv], dymu.load_thresholds(dymu.preset_dir() / f"{name}.json",
                                                                    model.config.vision_config)[0])
        mean = sum(kept) / len(kept)
        assert abs(mean - data["target_tokens"]) <= 0.15 * data["target_tokens"], (name, mean)
        means.append(mean)
    assert means == sorted(means)
    from vlmprune.evals.builtin import caption_prompt, encode

    inputs = encode(processor, [caption_prompt(1)], [[imgs[0]]])
    with vlmprune.apply(model, "dymu", preset="mid") as handle:
        model(**inputs)
        assert 0 < handle.stats.last.image_tokens[0] < 256


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_anyres_families_noop_and_batch_invariance(family):
    """LLaVA-NeXT (CLIP) and OneVision (SigLIP, no [CLS]): each crop merges on its own; the stock unpad /
    newline layout is the virtual full sequence (spec §7 option (b)); batched equals alone."""
    from test_llava_next import SIZE, call, make_inputs, tiny_next, tiny_onevision

    model = tiny_next() if family == "next" else tiny_onevision()
    inputs = call(make_inputs(model, [{"images": [(SIZE, 2 * SIZE)], "seed": 0},
                                      {"images": [(2 * SIZE, 2 * SIZE)], "seed": 1, "before": 5}]))
    layers = model.config.vision_config.num_hidden_layers
    ref = model(**inputs).logits
    with vlmprune.apply(model, "dymu", thresholds=[None] * layers):
        assert torch.equal(model(**inputs).logits, ref)
    n = (SIZE // model.config.vision_config.patch_size) ** 2
    th = cal.calibrate(model, torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), n // 2)["thresholds"]
    with vlmprune.apply(model, "dymu", thresholds=th) as handle:
        batched = model(**inputs).logits
        rec = handle.stats.last
        assert all(v < i for v, i in zip(rec.visual_out, rec.visual_in))
        assert len(rec.image_tokens) == 8  # 3 + 5 crops
        for i in range(2):
            keep = inputs["attention_mask"][i].bool()
            alone = {k: v[i : i + 1] for k, v in inputs.items()}
            alone["input_ids"], alone["attention_mask"] = alone["input_ids"][:, keep], alone["attention_mask"][:, keep]
            logits = model(**alone).logits
            assert torch.allclose(batched[i, -logits.shape[1]:], logits[0], atol=1e-4)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_calibration_per_block_counts_on_the_builtin_model(builtin):
    """Spec §6.5 on the built-in model: with the reference r_total (no target correction), held-out mean
    kept counts per block in threshold mode are within 10% of N0 - Σ r_k; thresholds are >= 0."""
    from vlmprune.evals.data import make_image

    model, processor = builtin
    pv, grid = cal.load_images("builtin", processor, 48)
    assert grid is None
    held = processor.image_processor(images=[make_image("test", i).image for i in range(24)],
                                     return_tensors="pt")["pixel_values"]
    res = cal.calibrate(model, pv, 90, match_target=False)
    assert all(t >= 0 for t in res["thresholds"])
    r = tm.schedule(res["r_total"], 3)
    expected = [257 - sum(r[: i + 1]) for i in range(3)]
    _, means = cal.kept_tokens(model, [held], res["thresholds"])
    for got, want in zip(means, expected):
        assert abs(got - want) <= 0.10 * want, (means, expected)


# -- Qwen2-VL / Qwen2.5-VL: merging after the ViT (spec §7 option 1) -----------------------------------


def _qwen(kind: str):
    from test_qwen2_vl import tiny_qwen2_5_vl, tiny_qwen2_vl

    model = tiny_qwen2_vl() if kind == "qwen2_vl" else tiny_qwen2_5_vl()
    model.generation_config.eos_token_id = None
    return model


def _qwen_batch(model, samples, seed=0):
    from test_qwen2_vl import make_batch

    return {k: v for k, v in make_batch(model, samples, seed=seed).items() if not k.startswith("_")}


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_post_merger_noop_batch_invariance_and_calibration(kind):
    model = _qwen(kind)
    samples = [dict(images=[(1, 8, 8)], before=3, after=4), dict(images=[(1, 4, 8), (1, 8, 4)], before=2, after=5)]
    inputs = _qwen_batch(model, samples)
    ref = model(**inputs).logits
    with vlmprune.apply(model, "dymu", thresholds=[None] * 3):
        assert torch.equal(model(**inputs).logits, ref)
    calib = _qwen_batch(model, [dict(images=[(1, 8, 8)] * 2 + [(1, 4, 8)] * 2) for _ in range(4)], seed=3)
    res = cal.calibrate(model, calib["pixel_values"], 8, batch_size=4, image_grid_thw=calib["image_grid_thw"])
    assert abs(res["calib_mean_tokens"] - 8) <= 0.05 * 8 and all(t >= 0 for t in res["thresholds"])
    for vtu_kind in ("fast", False):
        with vlmprune.apply(model, "dymu", thresholds=res["thresholds"], vtu=vtu_kind) as handle:
            batched = model(**inputs).logits
            rec = handle.stats.last
            assert all(o < i for o, i in zip(rec.visual_out, rec.visual_in))
            assert rec.positions == "original" and len(rec.image_tokens) == 3
            for i in range(len(samples)):
                alone = model(**_one_qwen(inputs, model, samples, i)).logits
                assert torch.allclose(batched[i, -alone.shape[1]:], alone[0], atol=1e-4), (vtu_kind, i)
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def _one_qwen(inputs, model, samples, i):
    """Sample ``i`` of a make_batch batch, alone (same pixels: the images of the earlier samples skipped)."""
    keep = inputs["attention_mask"][i].bool()
    grid = inputs["image_grid_thw"]
    before = sum(len(s["images"]) for s in samples[:i])
    count = len(samples[i]["images"])
    patches = grid.prod(-1)
    lo = int(patches[:before].sum())
    hi = lo + int(patches[before : before + count].sum())
    out = {k: inputs[k][i : i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    return {**out, "pixel_values": inputs["pixel_values"][lo:hi], "image_grid_thw": grid[before : before + count]}


@pytest.mark.parametrize("kernel", ["fast", "exact"])
def test_vtu_with_mrope_equals_expanded_reference(kernel):
    """Oracle 2 with Qwen2-VL's 3-D M-RoPE positions (the fast form generalises directly; the exact kernel
    too, since transformers folds the M-RoPE sections into one rotate-half cos/sin)."""
    model = _qwen("qwen2_vl")
    lm = model.model.language_model
    attn = lm.layers[0].self_attn
    rope_fn = vlmprune.adapters.for_model(model).llm_rope(attn)
    torch.manual_seed(0)
    g = torch.tensor([[0, 1, 1, 1, 2, 3, 3, 4]])
    pos = torch.stack([torch.tensor([[0, 1, 1, 1, 1, 3, 4, 5]]), torch.tensor([[0, 1, 1, 2, 2, 3, 4, 5]]),
                       torch.tensor([[0, 1, 2, 1, 2, 3, 4, 5]])])
    h = torch.randn(1, 5, lm.config.hidden_size)
    valid = torch.ones_like(g, dtype=torch.bool)
    cos, sin = lm.rotary_emb(h, pos)
    full, _ = attn(vtu.expand(h, g, 1), position_embeddings=(cos, sin), attention_mask=None)
    ref = vtu.scatter_mean(full, g, valid, 5)
    out, _ = dymu.vtu_attention(attn, h, dymu.VTUState(g, valid, pos, 5, kernel), rope_fn, lm.rotary_emb)
    assert torch.allclose(out, ref, atol=1e-5)


# -- InternVL: merging after the pixel shuffle (spec §7), one group per tile ------------------------------

IVL_TAUS = [0.5, 0.5, 0.5]  # merges some but not all of the tiny model's 16 tokens per tile


def _ivl_padded():
    """Left-padded batch: sample 0 one 1-tile image, sample 1 images of 2 and 1 tiles (4 tiles in all)."""
    from test_internvl import PAD
    from test_internvl import prompt as ivl_prompt

    a, b = ivl_prompt([1], seed=15), ivl_prompt([2, 1], seed=16)
    pad = b.shape[0] - a.shape[0]
    ids = torch.stack([torch.cat([torch.full((pad,), PAD), a]), b])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    g = torch.Generator().manual_seed(15)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(4, 3, 32, 32, generator=g)}


def _ivl_one(inputs, i):
    keep = inputs["attention_mask"][i].bool()
    lo, hi = [(0, 1), (1, 4)][i]
    return {"input_ids": inputs["input_ids"][i : i + 1, keep], "attention_mask": inputs["attention_mask"][i : i + 1, keep],
            "pixel_values": inputs["pixel_values"][lo:hi]}


@pytest.fixture(scope="module")
def ivl():
    from test_internvl import tiny_internvl

    model = tiny_internvl()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("vtu_kind", ["fast", "exact", False])
def test_internvl_noop_thresholds_are_bit_identical(ivl, vtu_kind):
    from test_internvl import batch as ivl_batch
    from test_internvl import prompt as ivl_prompt

    inputs = ivl_batch([ivl_prompt([2, 1], seed=1), ivl_prompt([2, 1], seed=2)], 6)
    ref = ivl(**inputs).logits
    with vlmprune.apply(ivl, "dymu", thresholds=[None] * 3, vtu=vtu_kind) as handle:
        assert torch.equal(ivl(**inputs).logits, ref)
        rec = handle.stats.last
    assert rec.image_tokens == [16] * 6 and rec.visual_out == [48, 48]
    assert rec.encoder_layer_tokens == [[16] * 3] * 6
    with pytest.raises(dymu.ThresholdsError, match="3 blocks / rounds"):
        vlmprune.apply(ivl, "dymu", thresholds=[None] * 2)


def test_internvl_merges_per_tile_sizes_and_remove(ivl):
    inputs = _ivl_padded()
    ref = ivl(**inputs).logits
    handle = vlmprune.apply(ivl, "dymu", thresholds=IVL_TAUS)
    rec = (ivl(**inputs), handle.stats.last)[1]
    assert rec.positions == "original" and rec.vtu == "fast"
    assert len(rec.image_tokens) == 4 and all(1 <= k < 16 for k in rec.image_tokens)
    assert rec.visual_out == [rec.image_tokens[0], sum(rec.image_tokens[1:])] and rec.visual_in == [16, 48]
    assert [row[-1] for row in rec.encoder_layer_tokens] == rec.image_tokens
    assert rec.kv_len == inputs["attention_mask"].sum(1).tolist()
    # the merge state: each tile's sizes sum to its 16 tokens, every token in exactly one merged token
    feats = ivl.model.get_image_features(inputs["pixel_values"]).pooler_output
    _, run = dymu.post_merge(feats.reshape(-1, feats.shape[-1]), [16] * 4, 3, dymu.threshold_rule(IVL_TAUS, False))
    st = run.state
    assert torch.equal((st.size * st.valid).sum(1), torch.full((4,), 16.0))
    assert torch.equal((st.pos * st.valid.unsqueeze(-1)).sum(1), torch.ones(4, 16))
    assert st.counts.tolist() == rec.image_tokens
    handle.remove()
    assert torch.equal(ivl(**inputs).logits, ref)
    assert not any("forward" in m.__dict__ for m in ivl.modules())


@pytest.mark.parametrize("vtu_kind", ["fast", "exact", False])
def test_internvl_batch_of_two_with_different_counts_equals_each_alone(ivl, vtu_kind):
    inputs = _ivl_padded()
    with vlmprune.apply(ivl, "dymu", thresholds=IVL_TAUS, vtu=vtu_kind) as handle:
        batched = ivl(**inputs).logits
        rec = handle.stats.last
        assert rec.visual_out[0] != rec.visual_out[1] and all(o < i for o, i in zip(rec.visual_out, rec.visual_in))
        for i, tiles in enumerate([rec.image_tokens[:1], rec.image_tokens[1:]]):
            alone = ivl(**_ivl_one(inputs, i)).logits
            assert handle.stats.last.image_tokens == tiles
            assert torch.allclose(batched[i, -alone.shape[1]:], alone[0], atol=1e-4), (vtu_kind, i)
        out = ivl.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_internvl_calibration_lands_near_target(ivl):
    """Calibration on InternVL tiles (16 tokens each after the pixel shuffle) hits its target."""
    g = torch.Generator().manual_seed(3)
    pv = torch.randn(24, 3, 32, 32, generator=g)
    assert cal.patch_count(ivl) == 16
    res = cal.calibrate(ivl, pv, 8, batch_size=8)
    assert len(res["thresholds"]) == 3 and all(t >= 0 for t in res["thresholds"])
    assert abs(res["calib_mean_tokens"] - 8) <= 0.05 * 8 + 0.5
    with pytest.raises(ValueError, match="target tokens"):
        cal.calibrate(ivl, pv, 16, batch_size=8)


# -- each family's own processor output, and errors that say how to calibrate ------------------------------

# (height, width) of the calibration images: 1x2, 2x2 and 1x1 AnyRes grids, so the processor pads to 5 crops
ONEVISION_SIZES = [(40, 90), (100, 100), (30, 30), (90, 40), (60, 70), (20, 50)]


def _onevision_processor(model):
    import warnings

    from test_llava_next import SIZE
    from transformers import LlavaOnevisionImageProcessor

    side = {"height": SIZE, "width": SIZE}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlavaOnevisionImageProcessor(size=side, crop_size=side,
                                            image_grid_pinpoints=model.config.image_grid_pinpoints)


def _pil_images(sizes, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        smooth = torch.rand(1, 3, 3, 3, generator=g)
        img = torch.nn.functional.interpolate(smooth, size=(h, w), mode="bilinear", align_corners=False)[0]
        img = (img + 0.3 * torch.rand(3, h, w, generator=g)).clamp(0, 1)
        out.append(Image.fromarray((img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()))
    return out


def test_onevision_calibration_takes_the_processors_5d_pixel_values(tmp_path, monkeypatch):
    """LLaVA-OneVision's processor returns (images, crops, 3, H, W) padded to the most crops: calibration
    takes it with image_sizes, every real crop an image of its own (the model's own crop count), padding
    dropped; the CLI passes the processor's outputs itself."""
    from test_llava_next import SIZE, tiny_onevision
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    model = tiny_onevision()
    processor = _onevision_processor(model)
    out = processor(images=_pil_images(ONEVISION_SIZES), return_tensors="pt")
    pv = out["pixel_values"]
    assert pv.dim() == 5
    counts = [image_size_to_num_patches(image_size=s, grid_pinpoints=model.config.image_grid_pinpoints,
                                        patch_size=SIZE) for s in out["image_sizes"]]
    assert max(counts) == pv.shape[1] > min(counts)  # padded crops are present
    crops = torch.cat([pv[i, :n] for i, n in enumerate(counts)])
    n = (SIZE // model.config.vision_config.patch_size) ** 2
    res = cal.calibrate(model, pv, n // 2, batch_size=64, image_sizes=out["image_sizes"],
                        batch_num_images=out["batch_num_images"])
    assert res["n_images"] == len(ONEVISION_SIZES)
    assert res["thresholds"] == cal.calibrate(model, crops, n // 2, batch_size=64)["thresholds"]
    kept, _ = cal.kept_tokens(model, [crops], res["thresholds"])
    assert len(kept) == sum(counts)
    with pytest.raises(ValueError, match="image_sizes"):
        cal.calibrate(model, pv, n // 2)
    # the CLI: the processor's other outputs (image_sizes, batch_num_images) reach calibrate
    data = tmp_path / "images"
    data.mkdir()
    for i, img in enumerate(_pil_images(ONEVISION_SIZES)):
        img.save(data / f"{i}.png")
    monkeypatch.setattr(cal, "load_model", lambda name: (model, processor))
    path = tmp_path / "ov.json"
    assert cal.main(["dymu", "--model", "tiny-ov", "--data", str(data), "--target-tokens", str(n // 2),
                     "--output", str(path), "--batch-size", "64"]) == 0
    saved = json.loads(path.read_text())
    assert saved["n_images"] == len(ONEVISION_SIZES)
    assert [t for t in saved["thresholds"] if t is not None] == [t for t in res["thresholds"] if math.isfinite(t)]
    with vlmprune.apply(model, "dymu", thresholds=str(path)):
        pass


def test_thresholds_errors_name_the_cli_and_the_python_call(tmp_path):
    """Every thresholds mismatch says how to calibrate: the CLI and the real Python call."""
    import inspect

    model = tiny()
    path = cal.write(tmp_path / "t.json", model, cal.calibrate(model, images(8), 30, batch_size=8))
    cases = [lambda: vlmprune.apply(model, "dymu", thresholds=[0.5, 0.5]),
             lambda: vlmprune.apply(tiny(hidden=64), "dymu", thresholds=str(path)),
             lambda: vlmprune.apply(model, "dymu", thresholds=str(tmp_path / "missing.json"))]
    for case in cases:
        with pytest.raises(dymu.ThresholdsError) as err:
            case()
        message = str(err.value)
        assert "`vlmprune calibrate dymu --model" in message
        assert "vlmprune.methods.dymu.calibrate.calibrate(model, pixel_values, target_tokens=N" in message
        assert "vlmprune.methods.dymu.calibrate.write(" in message
    # the call the message names is the real one
    params = list(inspect.signature(cal.calibrate).parameters)
    assert params[:3] == ["model", "pixel_values", "target_tokens"]
    assert list(inspect.signature(cal.write).parameters) == ["path", "model", "result"]
