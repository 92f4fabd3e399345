"""VisionZip and VisPruner (pre-LLM, vision-side signals) on tiny random-init models of every family.

The references are computed independently of the adapters: eager copies of each model
(``output_attentions`` / ``output_hidden_states``, hooks on the modules the reference code reads)
give the [CLS] row (or the no-[CLS] fallback), the feature-layer rows, the head-mean keys and the
projector, and the papers' rules are applied to them by code written from the reference
implementations (a line-by-line transcription of each repository's batched code where it runs, and
a per-group transcription where the reference breaks, odd residual lengths for VisPruner). What
the decoder receives is then compared with the stock decoder input with those tokens put in.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from test_internvl import batch as ivl_batch
from test_internvl import prompt as ivl_prompt
from test_internvl import tiny_internvl
from test_llava_next import VIDEO, call, image_layout, make_inputs, tiny_next, tiny_onevision
from test_qwen2_vl import BUILDERS as QWEN_BUILDERS
from test_qwen2_vl import IMG, MIXED, VID, decoder_recorder, make_batch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmprune
from vlmprune.adapters.base import RowProjector
from vlmprune.methods.visionzip import VisionZipConfig
from vlmprune.methods.visionzip.ops import contextual_merge, split_budget
from vlmprune.methods.vispruner import VisPrunerConfig
from vlmprune.methods.vispruner.ops import select

from tiny import IMAGE_TOKEN, llama_config, llava_inputs


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


ATOL = 1e-5


def hook_ids(model) -> set:
    """Every forward hook on the model (transformers registers some of its own on first use)."""
    return {(name, key) for name, m in model.named_modules()
            for d in (m._forward_hooks, m._forward_pre_hooks) for key in d}


# ---- tiny LLaVA with an 8x8 patch grid (enough tokens for several VisPruner rounds) ---------------
def tiny_llava64(seed: int = 0, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=64, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=llama_config(), image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = attn
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def llava():
    return tiny_llava64()


@pytest.fixture(scope="module")
def llava_eager():
    return tiny_llava64(attn="eager")


# ---- the reference code, transcribed --------------------------------------------------------------
def visionzip_reference(attn_weights, hidden_states, metric, dominant_num, contextual_num):
    """VisionZip @ 3151f6d, ``CLIPVisionTower_VisionZip.forward`` (batched, [CLS] tower), with
    ``dominant_num`` = dominant - 1 as ``visionzip()`` passes it. Returns (B, D + C, C) rows for the
    projector ([CLS], dominant patches in raster order, contextual tokens) and the dominant indices."""
    cls_attention = attn_weights[:, :, 0, 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(
        hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1),
                                        metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    keep = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, keep, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
                                 dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1]),
                                                            target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices


def visionzip_formula(scores, feats, keys, patches, contextual):
    """The same rule per group, written from the paper's description (no [CLS] handling): the top
    ``patches`` by score, then targets every s-th of the rest (raster order), argmax cosine of the
    keys, contextual = target + mean(members). Returns (dominant, remaining, target places, tokens)."""
    n = scores.numel()
    dom = torch.topk(scores, patches).indices.sort().values
    rest = torch.tensor([i for i in range(n) if i not in set(dom.tolist())], dtype=torch.long)
    m = keys[rest].float()
    m = m / m.norm(dim=-1, keepdim=True)
    r = rest.numel()
    step = max(1, r // contextual)
    targets = list(range(0, r, step))[:contextual]
    others = [i for i in range(r) if i not in targets]
    choice = (m[others] @ m[targets].T).argmax(dim=1)
    tokens = []
    for j, t in enumerate(targets):
        members = [others[i] for i in range(len(others)) if int(choice[i]) == j]
        extra = feats[rest][members].float().mean(dim=0) if members else 0.0
        tokens.append(feats[rest][t].float() + extra)
    return dom, rest, torch.tensor(targets, dtype=torch.long), torch.stack(tokens)


def vispruner_reference(image_features, image_attentions, visual_token_num, important_ratio):
    """VisPruner @ aefa01a, ``encode_images`` (batched): the index masks (B, N)."""
    B, N, C = image_features.shape
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    image_attentions = image_attentions.mean(dim=1)
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2],
        ], dim=-1)
    selected = torch.cat([important_indices, residual_indices], dim=-1) if diverse_token_num > 0 else important_indices
    index_masks = torch.zeros(B, N, dtype=torch.bool)
    index_masks.scatter_(1, selected, True)
    return index_masks


def vispruner_group(scores, feats, total, important_ratio):
    """The same rule for one group, for residual lengths where the batched code's index arithmetic
    fails (odd R, or fewer than q tokens in ``a``): ``a`` keeps its ceil(R/2) even places and the
    tokens it does not drop, q is capped at |a|. Returns the kept indices, ascending."""
    imp = int(total * important_ratio)
    div = total - imp
    order = torch.sort(scores, descending=True, stable=True).indices
    kept, residual = order[:imp].tolist(), order[imp:].tolist()
    unit = feats.float() / feats.float().norm(dim=-1, keepdim=True)
    while div > 0 and len(residual) - div > 0:
        q = min(8, len(residual) - div)
        a, b = residual[0::2], residual[1::2]
        q = min(q, len(a))
        best = (unit[a] @ unit[b].T).max(dim=-1).values
        ranked = torch.sort(best, descending=True, stable=True).indices.tolist()
        residual = [a[i] for i in ranked[q:]] + b
    return torch.tensor(sorted(kept + (residual if div > 0 else [])), dtype=torch.long)


# ---- what the decoder should receive -------------------------------------------------------------------
def stock_inputs(model, inputs) -> dict:
    seen, hook = decoder_recorder(model)
    try:
        model(**inputs)
    finally:
        hook.remove()
    return seen[-1]


def patched_inputs(model, inputs, method, **options) -> tuple[dict, object]:
    handle = vlmprune.apply(model, method, **options)
    seen, hook = decoder_recorder(model)
    try:
        model(**inputs)
    finally:
        hook.remove()
        handle.remove()
    return seen[-1], handle


def expected_row(full, sample, groups):
    """(kept columns, their embeddings): ``groups`` = [(columns (n,), grid slots (k,), tokens (k, D) or
    None to keep the stock tokens)]; every column in no group stays as it is."""
    row = full["inputs_embeds"][sample].clone()
    grouped = torch.cat([cols for cols, _, _ in groups])
    kept = set(range(row.shape[0])) - set(grouped.tolist())
    for cols, slots, tokens in groups:
        kept |= set(cols[slots].tolist())
        if tokens is not None:
            row[cols[slots]] = tokens.to(row.dtype)
    order = torch.tensor(sorted(kept))
    return order, row[order]


def assert_row(got, sample, order, embeds, positions=None, full=None):
    cols = got["columns"][sample]
    real = cols >= 0
    assert torch.equal(cols[real].cpu(), order), (cols[real].tolist(), order.tolist())
    torch.testing.assert_close(got["inputs_embeds"][sample][real], embeds, atol=ATOL, rtol=1e-4)
    if positions == "original":
        pos_full = full["position_ids"]
        pos_got = got["position_ids"]
        if pos_full.dim() == 3 and pos_full.shape[0] == 4:
            pos_full = pos_full[1:]
        assert torch.equal(pos_got[..., sample, :][..., real], pos_full[..., sample, order])


# ---- 1. the pure rules ---------------------------------------------------------------------------
def test_budget_split_follows_the_papers_settings():
    assert [split_budget(t) for t in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert [split_budget(t) for t in (26, 13, 2, 1)] == [(22, 4), (11, 2), (1, 1), (1, 0)]
    assert split_budget(64, 0.5) == (32, 32)


def test_contextual_merge_is_the_rule():
    g = torch.Generator().manual_seed(0)
    for r, c in ((55, 4), (31, 3), (10, 1), (5, 5), (3, 7)):
        keys, feats = torch.randn(r, 8, generator=g), torch.randn(r, 12, generator=g)
        out = contextual_merge(keys, feats, c)
        if r >= c:
            _, _, targets, tokens = visionzip_formula(torch.arange(r, 0, -1).float().neg(), feats, keys, 0, c)
            assert torch.equal(out.targets, targets)
            torch.testing.assert_close(out.tokens, tokens)
        else:  # fewer tokens than contextual slots: every token is its own target, nothing merged
            assert torch.equal(out.targets, torch.arange(r)) and torch.equal(out.tokens, feats)
        assert torch.equal(out.assign[out.targets], torch.arange(out.targets.numel()))


def test_vispruner_select_equals_the_reference_code():
    g = torch.Generator().manual_seed(1)
    for n, total, ratio in ((576, 64, 0.75), (576, 128, 0.5), (64, 16, 0.5), (64, 32, 0.75), (64, 16, 1.0)):
        scores, feats = torch.rand(n, generator=g), torch.randn(n, 16, generator=g)
        kept, _ = select(scores, feats, total, ratio)
        mask = vispruner_reference(feats[None], scores.view(1, 1, n), total, ratio)[0]
        assert torch.equal(kept, torch.nonzero(mask).squeeze(1)), (n, total, ratio)
        assert torch.equal(kept, vispruner_group(scores, feats, total, ratio))


def test_vispruner_odd_residual_runs_where_the_reference_breaks():
    g = torch.Generator().manual_seed(2)
    scores, feats = torch.rand(256, generator=g), torch.randn(256, 16, generator=g)
    with pytest.raises(IndexError):  # T=26, r=0.5: R = 243, odd
        vispruner_reference(feats[None], scores.view(1, 1, 256), 26, 0.5)
    for total in (26, 13, 5, 2):
        kept, _ = select(scores, feats, total, 0.5)
        assert kept.numel() == total and torch.equal(kept, vispruner_group(scores, feats, total, 0.5))
        important = torch.sort(scores, descending=True, stable=True).indices[: int(total * 0.5)]
        assert torch.isin(important, kept).all()


def _counted(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def test_decision_flops_match_flop_counter():
    g = torch.Generator().manual_seed(3)
    keys, feats = torch.randn(55, 16, generator=g), torch.randn(55, 32, generator=g)
    counted, out = _counted(lambda: contextual_merge(keys, feats, 4))
    assert counted > 0 and abs(out.flops - counted) <= 0.02 * counted
    scores, feats = torch.rand(256, generator=g), torch.randn(256, 32, generator=g)
    counted, (_, flops) = _counted(lambda: select(scores, feats, 26, 0.5))
    assert counted > 0 and abs(flops - counted) <= 0.02 * counted
    proj = RowProjector(torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 40)))
    counted, _ = _counted(lambda: proj(torch.randn(5, 32)))
    assert proj.flops(5) == counted


# ---- 2. LLaVA-1.5 against the reference code on eager maps ---------------------------------------------
def clip_reference(eager, pixel_values):
    """Eager tower: attentions and hidden states at the feature layer, and that layer's keys
    (``k_proj`` output, heads averaged, as the reference's patched attention returns them)."""
    tower = eager.model.vision_tower
    layers = tower.encoder.layers
    layer = eager.config.vision_feature_layer
    block = len(layers) + layer
    keys = []
    hook = layers[block].self_attn.k_proj.register_forward_hook(lambda m, a, o: keys.append(o))
    try:
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    b, t, c = keys[0].shape
    heads = eager.config.vision_config.num_attention_heads
    metric = keys[0].view(b, t, heads, c // heads).transpose(1, 2).mean(1)
    return out.attentions[block], out.hidden_states[layer], metric


def llava_columns(inputs, sample, n):
    ids = inputs["input_ids"][sample]
    return torch.nonzero(ids == IMAGE_TOKEN).squeeze(1)[:n]


@pytest.mark.parametrize("options", [dict(dominant=10, contextual=4), dict(ratio=0.75), dict(tokens=20)])
def test_llava_visionzip_equals_reference(llava, llava_eager, options):
    inputs = llava_inputs(llava, batch=2)
    attn, hidden, metric = clip_reference(llava_eager, inputs["pixel_values"])
    cfg = VisionZipConfig(**options)
    n = 64
    if cfg.dominant is not None:
        dominant, contextual = cfg.dominant, cfg.contextual
    else:
        total = cfg.tokens or round(n * (1 - cfg.ratio))
        dominant, contextual = split_budget(total)
    rows, _ = visionzip_reference(attn, hidden, metric, dominant - 1, contextual)
    expected = llava_eager.model.multi_modal_projector(rows)
    full = stock_inputs(llava, inputs)
    got, handle = patched_inputs(llava, inputs, "visionzip", **options)
    for s in range(2):
        cols = llava_columns(inputs, s, n)
        order, embeds = expected_row(full, s, [(cols, torch.arange(dominant + contextual), expected[s])])
        assert_row(got, s, order, embeds)
    rec = handle.stats.last
    assert rec.method == "visionzip" and rec.visual_out == [dominant + contextual] * 2


def test_llava_visionzip_original_positions_keep_grid_places(llava, llava_eager):
    """With original positions every new token sits at a grid place of its own: a dominant patch at
    its own, a contextual token at its target's, the [CLS] token at the first free one."""
    inputs = llava_inputs(llava, batch=1, seed=2)
    attn, hidden, metric = clip_reference(llava_eager, inputs["pixel_values"])
    scores = attn[0, :, 0, 1:].mean(0)
    dom, rest, targets, ctx = visionzip_formula(scores, hidden[0, 1:], metric[0, 1:], 9, 4)
    proj = llava_eager.model.multi_modal_projector
    full = stock_inputs(llava, inputs)
    cols = llava_columns(inputs, 0, 64)
    used = set(dom.tolist()) | set(rest[targets].tolist())
    free = min(set(range(64)) - used)
    anchors = torch.cat([torch.tensor([free]), dom, rest[targets]])
    tokens = torch.cat([proj(hidden[0, :1]), full["inputs_embeds"][0][cols[dom]], proj(ctx)])
    perm = torch.argsort(anchors)
    order, embeds = expected_row(full, 0, [(cols, anchors[perm], tokens[perm])])
    got, _ = patched_inputs(llava, inputs, "visionzip", dominant=10, contextual=4, positions="original")
    assert_row(got, 0, order, embeds)
    assert torch.equal(got["position_ids"][0], order)  # 1-D positions: each token's original column


@pytest.mark.parametrize("options", [dict(ratio=0.75), dict(tokens=32, important_ratio=0.75),
                                     dict(ratio=0.75, important_ratio=1.0)])
def test_llava_vispruner_equals_reference(llava, llava_eager, options):
    inputs = llava_inputs(llava, batch=2)
    attn, hidden, _ = clip_reference(llava_eager, inputs["pixel_values"])
    cfg = VisPrunerConfig(**options)
    total = cfg.tokens or round(64 * (1 - cfg.ratio))
    masks = vispruner_reference(hidden[:, 1:], attn[:, :, 0, 1:], total, cfg.important_ratio)
    full = stock_inputs(llava, inputs)
    got, handle = patched_inputs(llava, inputs, "vispruner", **options)
    for s in range(2):
        cols = llava_columns(inputs, s, 64)
        order, embeds = expected_row(full, s, [(cols, torch.nonzero(masks[s]).squeeze(1), None)])
        assert_row(got, s, order, embeds)
    assert handle.stats.last.visual_out == [total] * 2 and handle.stats.last.method == "vispruner"


@pytest.mark.parametrize("method", ["visionzip", "vispruner"])
def test_llava_batch_equals_each_alone_and_remove_is_exact(llava, method):
    inputs = llava_inputs(llava, batch=2, seed=5)
    ref = llava(**inputs).logits
    hooks = hook_ids(llava)
    with vlmprune.apply(llava, method, ratio=0.0):
        assert torch.equal(llava(**inputs).logits, ref)  # nothing removed or merged: the stock model
    with vlmprune.apply(llava, method, ratio=0.9):
        both = llava(**inputs).logits
        for s in range(2):
            alone = {k: v[s : s + 1] for k, v in inputs.items()}
            torch.testing.assert_close(llava(**alone).logits[0], both[s], atol=ATOL, rtol=1e-4)
    assert torch.equal(llava(**inputs).logits, ref)
    assert hook_ids(llava) == hooks


@pytest.mark.parametrize("method", ["visionzip", "vispruner"])
def test_recorded_overhead_is_what_the_decision_runs(llava, method):
    """The method's ``Reduction.flops`` is what FlopCounterMode counts in its ``reduce`` (the merge
    products, the projector on the new tokens, VisPruner's similarity rounds); the record adds the
    [CLS] row's cost."""
    inputs = llava_inputs(llava, batch=2)
    handle = vlmprune.apply(llava, method, ratio=0.75)
    reducer = handle.methods[0]
    original = reducer.reduce
    found = []

    def counted(group, generator=None):
        with FlopCounterMode(display=False) as counter:
            red = original(group, generator)
        found.append((float(counter.get_total_flops()), red.flops))
        return red

    reducer.reduce = counted
    try:
        llava(**inputs)
    finally:
        handle.remove()
    assert len(found) == 2
    for measured, recorded in found:
        assert measured > 0 and abs(recorded - measured) <= 0.02 * measured
    scoring = 2.0 * 2 * 65 * 32  # the [CLS] query row against 1 + N keys per image
    assert handle.stats.last.overhead_flops == pytest.approx(scoring + sum(r for _, r in found))


def test_bad_options_name_the_valid_values(llava):
    hooks = hook_ids(llava)
    with pytest.raises(ValueError, match="'vision', 'llm'"):
        vlmprune.apply(llava, "visionzip", merge_space="pixels")
    with pytest.raises(ValueError, match="both dominant and contextual"):
        VisionZipConfig(dominant=10)
    with pytest.raises(ValueError, match="tokens or dominant"):
        VisionZipConfig(tokens=8, dominant=6, contextual=2)
    with pytest.raises(ValueError, match="contextual_share"):
        VisionZipConfig(contextual_share=1.5)
    with pytest.raises(ValueError, match="tokens must be"):
        VisionZipConfig(tokens=0)
    with pytest.raises(ValueError, match="important_ratio"):
        vlmprune.apply(llava, "vispruner", important_ratio=1.5)
    with pytest.raises(ValueError, match="tokens must be"):
        VisPrunerConfig(tokens=0)
    with pytest.raises(ValueError, match="ratio must be"):
        VisPrunerConfig(ratio=1.0)
    with pytest.raises(Exception, match="valid options"):
        vlmprune.apply(llava, "vispruner", dominant=3)
    assert hook_ids(llava) == hooks


# ---- 3. LLaVA-NeXT (per crop, [CLS]) and OneVision (SigLIP: the no-[CLS] variant) ----------------------
def anyres_reference(eager, crops, cls: bool):
    """Per crop: scores ([CLS] row at the feature layer / mean attention received in the last layer),
    feature-layer rows (patches), the [CLS] row, and the scoring layer's head-mean keys."""
    tower = eager.model.vision_tower
    layers = tower.encoder.layers
    layer = eager.config.vision_feature_layer
    block = len(layers) + layer if cls else len(layers) - 1
    keys = []
    hook = layers[block].self_attn.k_proj.register_forward_hook(lambda m, a, o: keys.append(o))
    try:
        out = tower(crops, output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    heads = eager.config.vision_config.num_attention_heads
    b, t, c = keys[0].shape
    metric = keys[0].view(b, t, heads, c // heads).mean(2)
    hidden = out.hidden_states[layer]
    if cls:
        return out.attentions[block][:, :, 0, 1:].mean(1), hidden[:, 1:], hidden[:, 0], metric[:, 1:]
    return out.attentions[-1].mean(dim=-2).mean(dim=1), hidden, None, metric


def anyres_columns(model, inputs, size):
    start = inputs["_starts"][0]["images"][0]
    maps, _, _ = image_layout(model, size)
    return [torch.tensor([start + m[j] for j in range(len(m))]) for m in maps]


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_anyres_visionzip_per_crop(family):
    cls = family == "next"
    model = tiny_next() if cls else tiny_onevision()
    eager = tiny_next(attn="eager") if cls else tiny_onevision(attn="eager")
    size = (48, 96)  # a 1x2 grid of crops, nothing unpadded
    inputs = make_inputs(model, [dict(images=[size], seed=3)])
    crops = inputs["pixel_values"][0][: inputs["_crops"][0]]
    scores, feats, cls_rows, keys = anyres_reference(eager, crops, cls)
    dominant, contextual = 6, 3
    full = stock_inputs(model, call(inputs))
    got, handle = patched_inputs(model, call(inputs), "visionzip", dominant=dominant, contextual=contextual)
    proj = eager.model.multi_modal_projector
    stock = full["inputs_embeds"][0]
    groups = []
    for c, cols in enumerate(anyres_columns(model, inputs, size)):
        dom, rest, targets, ctx = visionzip_formula(scores[c], feats[c], keys[c], dominant - (1 if cls else 0),
                                                    contextual)
        parts = ([proj(cls_rows[c : c + 1])] if cls else []) + [stock[cols[dom]], proj(ctx)]
        tokens = torch.cat(parts)
        groups.append((cols, torch.arange(tokens.shape[0]), tokens))
    order, embeds = expected_row(full, 0, groups)
    assert_row(got, 0, order, embeds)
    assert handle.stats.last.method == ("visionzip" if cls else "visionzip-nocls")
    assert handle.stats.last.scoring == ("cls" if cls else "nocls")


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_anyres_vispruner_per_crop(family):
    cls = family == "next"
    model = tiny_next() if cls else tiny_onevision()
    eager = tiny_next(attn="eager") if cls else tiny_onevision(attn="eager")
    size = (96, 48)
    inputs = make_inputs(model, [dict(images=[size], seed=4)])
    crops = inputs["pixel_values"][0][: inputs["_crops"][0]]
    scores, feats, _, _ = anyres_reference(eager, crops, cls)
    mask = vispruner_reference(feats, scores.unsqueeze(1), 16, 0.5)  # R: 28 -> 20 -> 12 -> 8
    full = stock_inputs(model, call(inputs))
    got, _ = patched_inputs(model, call(inputs), "vispruner", tokens=16)
    groups = [(cols, torch.nonzero(mask[c]).squeeze(1), None)
              for c, cols in enumerate(anyres_columns(model, inputs, size))]
    order, embeds = expected_row(full, 0, groups)
    assert_row(got, 0, order, embeds)


def test_onevision_video_frames_use_pooled_signals():
    """OneVision pools frames 2x2 after its projector; the signals are the pre-projector rows, keys and
    scores pooled the same way (bilinear), the labelled approximation."""
    model, eager = tiny_onevision(), tiny_onevision(attn="eager")
    inputs = make_inputs(model, [dict(images=[], video=True, seed=6)])
    frames = inputs["pixel_values_videos"][0]
    scores, feats, _, keys = anyres_reference(eager, frames, False)
    side = int(math.isqrt(scores.shape[1]))
    pool = eager.model.apply_pooling
    scores, feats, keys = pool(scores.unsqueeze(-1)).squeeze(-1), pool(feats), pool(keys)
    full = stock_inputs(model, call(inputs))
    ids = inputs["input_ids"][0]
    video_cols = torch.nonzero(ids == VIDEO).squeeze(1)
    per = scores.shape[1]
    assert per == math.ceil(side / 2) ** 2
    got, _ = patched_inputs(model, call(inputs), "vispruner", tokens=5, important_ratio=0.6)
    groups = [(video_cols[f * per : (f + 1) * per], vispruner_group(scores[f], feats[f], 5, 0.6), None)
              for f in range(frames.shape[0])]
    order, embeds = expected_row(full, 0, groups)
    assert_row(got, 0, order, embeds)
    got, _ = patched_inputs(model, call(inputs), "visionzip", dominant=4, contextual=2)
    stock = full["inputs_embeds"][0]
    groups = []
    for f in range(frames.shape[0]):
        cols = video_cols[f * per : (f + 1) * per]
        dom, _, _, ctx = visionzip_formula(scores[f], feats[f], keys[f], 4, 2)
        tokens = torch.cat([stock[cols[dom]], eager.model.multi_modal_projector(ctx)])
        groups.append((cols, torch.arange(6), tokens))
    order, embeds = expected_row(full, 0, groups)
    assert_row(got, 0, order, embeds)


# ---- 4. Qwen2-VL / Qwen2.5-VL: the LightCompress form (no [CLS], merged-token signals) ----------------
def qwen_reference(family, inputs, monkeypatch):
    """Per image / frame in LLM order, from an eager copy: the last block's attention received (mean
    over heads and the frame's queries), its rope-rotated keys (heads averaged), the merger's input
    rows; each pooled / concatenated over the 4 ViT tokens of a merged token and put in LLM order by
    matching the merger's rows to the tower's output rows."""
    ref = QWEN_BUILDERS[family](seed=0, attn="eager")
    tower = ref.model.visual
    mod = sys.modules[type(tower.blocks[-1].attn).__module__]
    original = mod.eager_attention_forward
    state = {"on": False, "maps": [], "keys": []}

    def recording(module, query, key, value, *args, **kwargs):
        out, weights = original(module, query, key, value, *args, **kwargs)
        if state["on"]:
            state["maps"].append(weights.float())
            state["keys"].append(key.float())
        return out, weights

    monkeypatch.setattr(mod, "eager_attention_forward", recording)
    last = tower.blocks[-1].attn
    merged, merger_in = [], []

    def on_merger(module, args, out):
        merged.append(out)
        merger_in.append(args[0])

    hooks = [last.register_forward_pre_hook(lambda *a: state.update(on=True)),
             last.register_forward_hook(lambda *a: state.update(on=False)),
             tower.merger.register_forward_hook(on_merger)]
    groups = []
    try:
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if pixels not in inputs:
                continue
            for key in ("maps", "keys"):
                state[key].clear()
            merged.clear()
            merger_in.clear()
            out = tower(inputs[pixels], grid_thw=inputs[grid])
            received = torch.cat([w[0].mean(dim=(0, 1)) for w in state["maps"]]).view(-1, 4).mean(-1)
            keys = torch.cat([k[0].mean(0) for k in state["keys"]]).view(-1, 4, state["keys"][0].shape[-1]).mean(1)
            rows = merger_in[0].reshape(-1, 4 * merger_in[0].shape[-1])
            perm = torch.tensor([int(torch.nonzero((merged[0] == r).all(-1))[0]) for r in out.pooler_output])
            sizes = [(h // 2) * (w // 2) for t, h, w in inputs[grid].tolist() for _ in range(t)]
            for s, k, v in zip(*(torch.split(x[perm], sizes) for x in (received, keys, rows))):
                groups.append((s, k, v))
    finally:
        for h in hooks:
            h.remove()
    return ref, groups


def qwen_columns(inputs):
    ids = inputs["input_ids"][0]
    images = torch.nonzero(ids == IMG).squeeze(1)
    video = torch.nonzero(ids == VID).squeeze(1)
    sizes = [(h // 2) * (w // 2) for t, h, w in inputs["image_grid_thw"].tolist()]
    out = list(torch.split(images, sizes))
    t, h, w = inputs["video_grid_thw"][0].tolist()
    out += list(torch.split(video, [(h // 2) * (w // 2)] * t))
    return out


@pytest.mark.parametrize("family", sorted(QWEN_BUILDERS))
def test_qwen_both_methods_equal_reference(family, monkeypatch):
    model = QWEN_BUILDERS[family](seed=0)
    inputs = make_batch(model, MIXED)
    ref, signals = qwen_reference(family, inputs, monkeypatch)
    full = stock_inputs(model, inputs)
    stock = full["inputs_embeds"][0]
    cols = qwen_columns(inputs)
    merger = ref.model.visual.merger
    c = merger.ln_q.weight.shape[0]

    got, handle = patched_inputs(model, inputs, "vispruner", ratio=0.5)
    groups = [(col, vispruner_group(s, v, round(col.numel() * 0.5), 0.5), None) for col, (s, _, v) in zip(cols, signals)]
    order, embeds = expected_row(full, 0, groups)
    assert_row(got, 0, order, embeds, "original", full)
    assert handle.stats.last.method == "vispruner-nocls"

    got, handle = patched_inputs(model, inputs, "visionzip", ratio=0.5)
    groups = []
    for col, (s, k, v) in zip(cols, signals):
        dominant, contextual = split_budget(round(col.numel() * 0.5))
        dom, rest, targets, ctx = visionzip_formula(s, v, k, dominant, contextual)
        anchors = torch.cat([dom, rest[targets]])  # in place: original M-RoPE positions
        tokens = torch.cat([stock[col[dom]], merger(ctx.reshape(-1, c))])
        perm = torch.argsort(anchors)
        groups.append((col, anchors[perm], tokens[perm]))
    order, embeds = expected_row(full, 0, groups)
    assert_row(got, 0, order, embeds, "original", full)
    assert handle.stats.last.method == "visionzip-nocls"
    assert handle.stats.last.visual_out == [sum(sum(split_budget(round(col.numel() * 0.5))) for col in cols)]

    # merged on the LLM-input embeddings (LightCompress's Qwen2.5-VL port)
    got, _ = patched_inputs(model, inputs, "visionzip", ratio=0.5, merge_space="llm")
    groups = []
    for col, (s, k, _) in zip(cols, signals):
        dominant, contextual = split_budget(round(col.numel() * 0.5))
        dom, rest, targets, ctx = visionzip_formula(s, stock[col], k, dominant, contextual)
        anchors = torch.cat([dom, rest[targets]])
        perm = torch.argsort(anchors)
        groups.append((col, anchors[perm], torch.cat([stock[col[dom]], ctx])[perm]))
    order, embeds = expected_row(full, 0, groups)
    assert_row(got, 0, order, embeds, "original", full)


# ---- 5. InternVL: pixel-shuffled rows, keys pooled over the 2x2 shuffle group, [CLS] not fed -------------
def test_internvl_both_methods_equal_reference():
    model, eager = tiny_internvl(), tiny_internvl(attn="eager")
    inputs = ivl_batch([ivl_prompt([2])], 2)
    tower = eager.model.vision_tower
    layers = tower.encoder.layer
    keys = []
    hook = layers[-1].attention.k_norm.register_forward_hook(lambda m, a, o: keys.append(o))
    try:
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    tiles, side = inputs["pixel_values"].shape[0], 8
    heads = eager.config.vision_config.num_attention_heads
    shuffle = eager.model.pixel_shuffle
    scores = F.avg_pool2d(out.attentions[-1][:, :, 0, 1:].mean(1).view(tiles, 1, side, side), 2).flatten(1)
    hidden = out.last_hidden_state[:, 1:].reshape(tiles, side, side, -1)
    rows = shuffle(hidden, scale_factor=0.5).reshape(tiles, 16, -1)
    k = keys[0].view(tiles, 1 + side * side, heads, -1).mean(2)[:, 1:].reshape(tiles, side, side, -1)
    pooled_keys = shuffle(k, scale_factor=0.5).reshape(tiles, 16, 4, -1).mean(2)
    full = stock_inputs(model, inputs)
    stock = full["inputs_embeds"][0]
    ids = inputs["input_ids"][0]
    cols = torch.split(torch.nonzero(ids == 3).squeeze(1), 16)

    got, _ = patched_inputs(model, inputs, "vispruner", tokens=8)
    groups = [(col, vispruner_group(scores[t], rows[t], 8, 0.5), None) for t, col in enumerate(cols)]
    order, embeds = expected_row(full, 0, groups)
    assert_row(got, 0, order, embeds)

    got, handle = patched_inputs(model, inputs, "visionzip", dominant=5, contextual=3)
    groups = []
    for t, col in enumerate(cols):
        dom, _, _, ctx = visionzip_formula(scores[t], rows[t], pooled_keys[t], 5, 3)
        tokens = torch.cat([stock[col[dom]], eager.model.multi_modal_projector(ctx)])
        groups.append((col, torch.arange(8), tokens))
    order, embeds = expected_row(full, 0, groups)
    assert_row(got, 0, order, embeds)
    assert handle.stats.last.method == "visionzip" and handle.stats.last.visual_out == [16]


# ---- 6. every family generates, batches and comes back exactly -----------------------------------------
def _families():
    from test_llava_next import same_length

    def nxt():
        m = tiny_next()
        return m, call(make_inputs(m, same_length(m, [dict(images=[(40, 90)], seed=0), dict(images=[(100, 100)], seed=1)])))

    def ov():
        m = tiny_onevision()
        return m, call(make_inputs(m, same_length(m, [dict(images=[(40, 90)], seed=0, video=True),
                                                     dict(images=[(90, 40)], seed=1, video=True)])))

    def ov_interp():
        m = tiny_onevision(aspect="anyres_max_1")
        return m, call(make_inputs(m, [dict(images=[(100, 100)], seed=0)]))

    def qwen(name):
        def build():
            m = QWEN_BUILDERS[name](seed=0)
            return m, make_batch(m, MIXED + [dict(images=[(1, 4, 8)], videos=[(2, 4, 4)])])
        return build

    def ivl():
        m = tiny_internvl()
        return m, ivl_batch([ivl_prompt([2]), ivl_prompt([1], before=19, seed=1)], 3)

    return {"llava_next": nxt, "onevision": ov, "onevision_interpolated": ov_interp, "qwen2_vl": qwen("qwen2_vl"),
            "qwen2_5_vl": qwen("qwen2_5_vl"), "internvl": ivl}


FAMILIES = _families()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_generates_batches_and_restores(family):
    model, inputs = FAMILIES[family]()
    model.generation_config.eos_token_id = None
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    for method in ("visionzip", "vispruner"):
        with vlmprune.apply(model, method, ratio=0.0):
            assert torch.equal(model(**inputs).logits, ref)
        with vlmprune.apply(model, method, ratio=0.75) as handle:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert out.shape[1] == ref_gen.shape[1]
            rec = handle.stats.last
            assert all(o < i for o, i in zip(rec.visual_out, rec.visual_in)) and rec.overhead_flops > 0
            if inputs["input_ids"].shape[0] > 1 and "attention_mask" in inputs and bool(inputs["attention_mask"].all()):
                both = model(**inputs).logits
                alone = _first_sample(family, inputs)
                if alone is not None:  # a shorter pruned sample is left-padded in the batch
                    one = model(**alone).logits[0]
                    torch.testing.assert_close(one, both[0, both.shape[1] - one.shape[0] :], atol=ATOL, rtol=1e-4)
    assert torch.equal(model(**inputs).logits, ref)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ref_gen)


def _first_sample(family, inputs):
    """The first sample of a batch on its own (families whose visual inputs split per sample simply)."""
    if family == "internvl":
        return {"input_ids": inputs["input_ids"][:1], "attention_mask": inputs["attention_mask"][:1],
                "pixel_values": inputs["pixel_values"][:2]}
    if family in ("llava_next", "onevision"):
        out = {k: v[:1] for k, v in inputs.items()}
        return out
    return None
