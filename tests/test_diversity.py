"""DivPrune and CDPruner (pre-LLM, diversity over the LLM-input embeddings) on tiny random-init models.

The references are written from the reference repositories, independently of vlmprune's code:
DivPrune's greedy loop transcribed from ``vbdi/divprune`` (``LLaVA/llava/model/llava_arch.py``,
``DivPrune``), CDPruner's relevance, kernel and fast greedy MAP transcribed from
``Theia-4869/CDPruner`` (``llava/model/llava_arch.py::encode_images``, batched), and an independent
oracle for the DPP: the naive greedy that adds the token maximising ``log det(L[S + j])`` in float64.
On the models, each visual group's kept columns are compared with the references applied to the
stock decoder input (the projector outputs at the group's columns, the instruction's embeddings).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_internvl import batch as ivl_batch
from test_internvl import prompt as ivl_prompt
from test_internvl import tiny_internvl
from test_llava_next import call, make_inputs, same_length, tiny_next, tiny_onevision
from test_qwen2_vl import BUILDERS as QWEN_BUILDERS
from test_qwen2_vl import MIXED, decoder_recorder, group_recorder, make_batch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmprune
from vlmprune.method import keep_count
from vlmprune.methods.cdpruner import CDPrunerConfig
from vlmprune.methods.cdpruner import ops as cdp
from vlmprune.methods.divprune import DivPruneConfig
from vlmprune.methods.divprune import ops as divp

from tiny import IMAGE_TOKEN, llama_config, llava_inputs

ATOL = 1e-5


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


# ---- the reference code, transcribed ---------------------------------------------------------------
def divprune_reference(visual_feature_vectors, image_feature_length, threshold_ratio):
    """vbdi/divprune @ 799e2d9, ``DivPrune`` with ``pairwise_cosine_similarity``: the selection
    sequence (unsorted; the caller sorts)."""
    threshold_terms = int(round(threshold_ratio * image_feature_length))
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


def cdpruner_reference(image_features, image_embeds, text_embeds, visual_token_num):
    """Theia-4869/CDPruner @ 9541616, ``encode_images`` after the projector (batched over B crops):
    the selection sequence (T, B), the relevance (B, N) and the kernel (B, N, N)."""
    B, N, C = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    return select_idx, relevance, kernel


def logdet_greedy(L, t):
    """The naive DPP greedy MAP in float64: add the token that maximises log det(L[S + j])."""
    L = L.double()
    chosen: list[int] = []
    for _ in range(t):
        best, best_j = -float("inf"), -1
        for j in range(L.shape[0]):
            if j in chosen:
                continue
            idx = torch.tensor(chosen + [j])
            sign, logdet = torch.linalg.slogdet(L[idx][:, idx])
            value = float(logdet) if float(sign) > 0 else -float("inf")
            if value > best:
                best, best_j = value, j
        chosen.append(best_j)
    return torch.tensor(chosen)


def relevance_formula(feats, text):
    """The relevance written out pair by pair: r_i = mean_m(-cos(x_i, t_m)), min-max with 1e-6."""
    r = torch.stack([torch.stack([-F.cosine_similarity(x, y, dim=0) for y in text.float()]).mean()
                     for x in feats.float()])
    return (r - r.min() + 1e-6) / (r.max() - r.min())


# ---- 1. the pure rules -------------------------------------------------------------------------------
def test_divprune_greedy_equals_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    for n, d, k in ((576, 64, 56), (256, 128, 26), (64, 32, 63), (40, 8, 13), (2, 4, 1)):
        x = torch.randn(n, d, generator=g)
        ref = divprune_reference(x, n, k / n)
        assert ref.numel() == k
        picks, _ = divp.select(x, k)
        assert torch.equal(picks, ref), (n, d, k)
    # half precision, as the reference runs it: the same sequence while the reference repeats nothing
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(128, 32, generator=g).to(dtype)
        ref = divprune_reference(x, 128, 20 / 128)
        assert ref.unique().numel() == 20 and torch.equal(divp.select(x, 20)[0], ref)


def test_divprune_ties_go_to_the_lower_index():
    x = torch.eye(12)  # every pair at distance 1: every step is a tie
    assert torch.equal(divp.select(x, 7)[0], divprune_reference(x, 12, 7 / 12))
    assert divp.select(x, 7)[0].tolist() == list(range(7))
    x = torch.cat([torch.eye(4), torch.eye(4)[:2] * 3.0])  # rows 4, 5 duplicate rows 0, 1 (cosine)
    assert torch.equal(divp.select(x, 4)[0], divprune_reference(x, 6, 4 / 6))


def test_divprune_duplicates_keep_k_distinct_where_the_reference_repeats():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 16, generator=g)
    x = base.repeat(3, 1)  # 18 tokens, 6 distinct
    ref = divprune_reference(x, 18, 9 / 18)
    assert ref.unique().numel() < 9  # the reference picks an index again
    picks, _ = divp.select(x, 9)
    assert picks.unique().numel() == 9
    first_repeat = next(i for i in range(9) if int(ref[i]) in ref[:i].tolist())
    assert torch.equal(picks[:first_repeat], ref[:first_repeat])
    assert set(picks[:6].tolist()) == set(ref[:6].tolist()) and len({int(p) % 6 for p in picks[:6]}) == 6


def test_divprune_count_convention():
    # the reference keeps int(round(r * N)) with r the kept share; vlmprune's ratio is the share removed
    for n, kept in ((576, 0.098), (576, 0.2222), (256, 0.1), (2340, 0.098), (256, 0.05)):
        assert keep_count(n, 1.0 - kept) == int(round(kept * n))


def test_cdpruner_relevance_and_kernel_are_the_formulas():
    g = torch.Generator().manual_seed(2)
    feats, text = torch.randn(30, 16, generator=g), torch.randn(5, 16, generator=g)
    r = cdp.relevance(feats, text)
    torch.testing.assert_close(r, relevance_formula(feats, text))
    idx, ref_r, ref_kernel = cdpruner_reference(feats[None], feats[None].float(), text.float(), 8)
    torch.testing.assert_close(r, ref_r[0])
    L = cdp.kernel(cdp.similarity(feats), r)
    torch.testing.assert_close(L, ref_kernel[0])
    s = F.cosine_similarity(feats[:, None], feats[None], dim=-1)
    torch.testing.assert_close(L, r[:, None] * s * r[None], atol=1e-6, rtol=1e-5)
    cos = (F.normalize(feats) @ F.normalize(text).T).mean(-1)
    # the most instruction-similar token (largest cosine) gets the smallest relevance, 1e-6 / (max - min):
    # the reference's sign and offset
    assert int(r.argmin()) == int(cos.argmax())
    assert float(r.min()) == pytest.approx(1e-6 / float(cos.max() - cos.min()))
    # no instruction text, or all tokens alike: uniform relevance
    assert torch.equal(cdp.relevance(feats, text[:0]), torch.ones(30))
    assert torch.equal(cdp.relevance(feats[:1].repeat(4, 1), text), torch.ones(4))


def test_cdpruner_greedy_equals_the_reference_and_the_logdet_oracle():
    g = torch.Generator().manual_seed(3)
    for n, d, m, t in ((40, 64, 3, 20), (64, 96, 1, 32), (25, 32, 7, 25), (16, 24, 2, 1)):
        feats, text = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
        picks, _ = cdp.select(feats, text, t)
        ref, _, kernel = cdpruner_reference(feats[None], feats[None].float(), text.float(), t)
        assert torch.equal(picks, ref[:, 0]), (n, d, t)
        assert torch.equal(picks, logdet_greedy(kernel[0], t)), (n, d, t)
        assert picks.unique().numel() == t
    # pure DPP (relevance off): the oracle on the similarity kernel
    feats = torch.randn(30, 48, generator=g)
    picks, _ = cdp.select(feats, None, 15)
    assert torch.equal(picks, logdet_greedy(cdp.similarity(feats), 15))
    # batched reference = each crop alone (our per-group call), given the same relevance
    crops, text = torch.randn(3, 20, 32, generator=g), torch.randn(2, 32, generator=g)
    ref, rel, kernel = cdpruner_reference(crops, crops, text, 6)
    for b in range(3):
        assert torch.equal(cdp.greedy_map(kernel[b], 6), ref[:, b])


def test_cdpruner_beyond_the_kernel_rank_keeps_t_distinct():
    g = torch.Generator().manual_seed(4)
    feats, text = torch.randn(30, 6, generator=g), torch.randn(2, 6, generator=g)
    picks, _ = cdp.select(feats, text, 20)
    assert picks.unique().numel() == 20
    ref, _, kernel = cdpruner_reference(feats[None], feats[None], text, 20)
    assert torch.equal(picks[:6], ref[:6, 0])  # the steps the rank supports are the reference's
    assert torch.equal(picks[:6], logdet_greedy(kernel[0], 6))


def _counted(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def test_decision_flops_match_flop_counter():
    g = torch.Generator().manual_seed(5)
    x, text = torch.randn(256, 128, generator=g), torch.randn(9, 128, generator=g)
    counted, (_, flops) = _counted(lambda: divp.select(x, 26))
    assert counted > 0 and flops == counted
    for instruction in (text, None, text[:0]):
        counted, (_, flops) = _counted(lambda instruction=instruction: cdp.select(x, instruction, 64))
        assert counted > 0 and abs(flops - counted) <= 0.01 * counted
    assert cdp.greedy_map_flops(256, 64) == 256 * 64 * 63  # the DPP: N * T * (T - 1)


# ---- 2. LLaVA-1.5 (64 tokens per image) against the references on the stock decoder input ------------
def tiny_llava64(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=64, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=llama_config(), image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def llava():
    return tiny_llava64()


def hook_ids(model) -> set:
    return {(name, key) for name, m in model.named_modules()
            for d in (m._forward_hooks, m._forward_pre_hooks) for key in d}


def placeholders(model) -> list[int]:
    cfg = model.config
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return [int(getattr(cfg, k)) for k in names if getattr(cfg, k, None) is not None]


def stock_decoder_input(model, inputs) -> dict:
    seen, hook = decoder_recorder(model)
    try:
        model(**inputs)
    finally:
        hook.remove()
    return seen[-1]


def run_patched(model, inputs, method, **options):
    """(what the decoder received, the groups the adapter formed, the handle)."""
    handle = vlmprune.apply(model, method, **options)
    calls = group_recorder(handle)
    seen, hook = decoder_recorder(model)
    try:
        model(**inputs)
    finally:
        hook.remove()
        handle.remove()
    return seen[-1], calls[-1], handle


def instruction_of(model, inputs, embeds, sample):
    """The sample's real tokens after its last placeholder token, as LLM-input embeddings."""
    ids = inputs["input_ids"][sample]
    real = inputs["attention_mask"][sample].bool() if "attention_mask" in inputs else torch.ones_like(ids, dtype=torch.bool)
    visual = torch.isin(ids, torch.tensor(placeholders(model)))
    last = int(torch.nonzero(visual).max())
    after = real & (torch.arange(ids.numel()) > last) & ~visual
    return embeds[sample][after]


def expected_kept(model, inputs, full, groups, method, ratio):
    """Per sample, the set of visual columns the references keep (every group of the call)."""
    embeds = full["inputs_embeds"]
    out: dict[int, set[int]] = {}
    for group in groups:
        cols = group.columns[group.columns >= 0]
        feats = embeds[group.sample, cols]
        n = cols.numel()
        k = keep_count(n, ratio)
        if k >= n:
            seq = torch.arange(n)
        elif method == "divprune":
            seq = divprune_reference(feats, n, k / n)
        else:
            text = instruction_of(model, inputs, embeds, group.sample)
            seq = cdpruner_reference(feats[None], feats[None].float(), text.float(), k)[0][:, 0]
        out.setdefault(group.sample, set()).update(cols[seq].tolist())
    return out


def assert_kept(model, inputs, got, full, groups, method, ratio, positions="contiguous"):
    expected = expected_kept(model, inputs, full, groups, method, ratio)
    grouped = {s: set() for s in expected}
    for group in groups:
        grouped[group.sample].update(group.columns[group.columns >= 0].tolist())
    for s, kept in expected.items():
        cols = got["columns"][s]
        real = cols >= 0
        row = cols[real]
        visual_kept = set(row.tolist()) & grouped[s]
        assert visual_kept == kept, (s, sorted(visual_kept ^ kept))
        assert torch.equal(row, torch.sort(row).values)  # kept columns stay in order
        assert set(range(full["inputs_embeds"].shape[1])) - grouped[s] <= set(row.tolist()) | set(
            torch.nonzero(~inputs["attention_mask"][s].bool()).flatten().tolist())  # text and other tokens stay
        torch.testing.assert_close(got["inputs_embeds"][s][real], full["inputs_embeds"][s][row], atol=ATOL, rtol=1e-4)
        pos = got["position_ids"]
        if positions == "original":
            ref = full["position_ids"]
            ref = ref[1:] if ref.dim() == 3 and ref.shape[0] == 4 else ref
            assert torch.equal(pos[..., s, :][..., real], ref[..., s, row])
        elif pos is not None:
            p = pos[..., s, :][..., real] if pos.dim() == 3 else pos[s][real]
            assert torch.equal(p - p[..., :1], torch.arange(int(real.sum())).expand_as(p))


@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_llava_equals_the_reference(llava, method, ratio):
    inputs = llava_inputs(llava, batch=2, seed=3)
    full = stock_decoder_input(llava, inputs)
    got, groups, handle = run_patched(llava, inputs, method, ratio=ratio)
    assert len(groups) == 2 and all(g.columns.numel() == 64 for g in groups)
    assert_kept(llava, inputs, got, full, groups, method, ratio)
    rec = handle.stats.last
    assert rec.visual_out == [keep_count(64, ratio)] * 2 and rec.visual_in == [64, 64]
    assert rec.method == {"divprune": "divprune", "cdpruner": "cdpruner-llmtext"}[method]


def test_divprune_selection_order_places_tokens_as_picked(llava):
    inputs = llava_inputs(llava, batch=2, seed=4)
    full = stock_decoder_input(llava, inputs)
    got, groups, _ = run_patched(llava, inputs, "divprune", ratio=0.8, order="selection")
    embeds = full["inputs_embeds"]
    for group in groups:
        s, cols = group.sample, group.columns
        seq = divprune_reference(embeds[s, cols], 64, keep_count(64, 0.8) / 64)
        kept = got["columns"][s]
        slots = torch.isin(kept, cols)
        assert torch.equal(kept[slots], torch.sort(cols[seq]).values)
        torch.testing.assert_close(got["inputs_embeds"][s][slots], embeds[s, cols[seq]])
    sorted_got, _, _ = run_patched(llava, inputs, "divprune", ratio=0.8)
    assert torch.equal(sorted_got["columns"], got["columns"])


def test_cdpruner_relevance_follows_the_instruction(llava):
    inputs = llava_inputs(llava, batch=1, seed=6)
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    other["input_ids"][0, -4:] = torch.tensor([10, 20, 30, 40])
    kept = {}
    for relevance in ("instruction", "none"):
        for name, inp in (("a", inputs), ("b", other)):
            got, _, handle = run_patched(llava, inp, "cdpruner", ratio=0.75, relevance=relevance)
            kept[relevance, name] = got["columns"][0]
        label = handle.stats.last.method
        assert label == {"instruction": "cdpruner-llmtext", "none": "cdpruner-norelevance"}[relevance]
    assert not torch.equal(kept["instruction", "a"], kept["instruction", "b"])
    assert torch.equal(kept["none", "a"], kept["none", "b"])
    # relevance off is the pure similarity DPP
    full = stock_decoder_input(llava, inputs)
    cols = torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN).squeeze(1)
    picks = logdet_greedy(cdp.similarity(full["inputs_embeds"][0, cols]), 16)
    assert set(kept["none", "a"].tolist()) & set(cols.tolist()) == set(cols[picks].tolist())


@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
def test_llava_batch_equals_each_alone_and_remove_is_exact(llava, method):
    inputs = llava_inputs(llava, batch=2, seed=5)
    ref = llava(**inputs).logits
    hooks = hook_ids(llava)
    with vlmprune.apply(llava, method, ratio=0.0):
        assert torch.equal(llava(**inputs).logits, ref)  # nothing removed: the stock model
    with vlmprune.apply(llava, method, ratio=0.8):
        both = llava(**inputs).logits
        for s in range(2):
            alone = {k: v[s : s + 1] for k, v in inputs.items()}
            torch.testing.assert_close(llava(**alone).logits[0], both[s], atol=ATOL, rtol=1e-4)
        text = {"input_ids": inputs["input_ids"][:, :3], "attention_mask": inputs["attention_mask"][:, :3]}
        plain = llava(**text).logits  # text only: passes through
    assert torch.equal(plain, llava(**text).logits)
    assert torch.equal(llava(**inputs).logits, ref)
    assert hook_ids(llava) == hooks


@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
def test_recorded_overhead_is_what_the_decision_runs(llava, method):
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
        assert measured > 0 and abs(recorded - measured) <= 0.01 * measured
    assert handle.stats.last.overhead_flops == pytest.approx(sum(r for _, r in found))


def test_bad_options_name_the_valid_values(llava):
    hooks = hook_ids(llava)
    with pytest.raises(ValueError, match="'sorted', 'selection'"):
        vlmprune.apply(llava, "divprune", order="random")
    with pytest.raises(ValueError, match="'instruction', 'none'"):
        vlmprune.apply(llava, "cdpruner", relevance="clip")
    with pytest.raises(ValueError, match="tokens must be"):
        CDPrunerConfig(tokens=0)
    assert CDPrunerConfig(relevance=None).relevance == "none"  # vlmprune-eval reads "none" as None
    with pytest.raises(ValueError, match="ratio must be"):
        DivPruneConfig(ratio=1.0)
    with pytest.raises(ValueError, match="'contiguous', 'original'"):
        vlmprune.apply(llava, "cdpruner", positions="shuffled")
    with pytest.raises(Exception, match="valid options"):
        vlmprune.apply(llava, "divprune", tokens=3)
    qwen = QWEN_BUILDERS["qwen2_vl"](seed=0)
    qhooks = hook_ids(qwen)
    with pytest.raises(ValueError, match="order='selection'.*contiguous"):
        vlmprune.apply(qwen, "divprune", order="selection")
    assert hook_ids(qwen) == qhooks
    vlmprune.apply(qwen, "divprune", order="selection", positions="contiguous").remove()
    assert hook_ids(llava) == hooks


def test_cdpruner_tokens_sets_the_budget(llava):
    inputs = llava_inputs(llava, batch=1, seed=7)
    full = stock_decoder_input(llava, inputs)
    got, groups, handle = run_patched(llava, inputs, "cdpruner", tokens=10)
    assert handle.stats.last.visual_out == [10]
    assert_kept(llava, inputs, got, full, groups, "cdpruner", 1 - 10 / 64)


# ---- 3. the other families: per crop / tile / image / frame, against the references -------------------
def _next_inputs(model, video=False):
    specs = [dict(images=[(12, 96)], seed=0, video=video), dict(images=[(96, 30)], seed=1, video=video)]  # unpadded
    return call(make_inputs(model, same_length(model, specs)))


@pytest.mark.parametrize("family", ["llava_next", "onevision"])
def test_anyres_per_crop_among_present_tokens(family):
    model = tiny_next() if family == "llava_next" else tiny_onevision()
    inputs = _next_inputs(model, video=family == "onevision")
    full = stock_decoder_input(model, inputs)
    for method in ("divprune", "cdpruner"):
        got, groups, handle = run_patched(model, inputs, method, ratio=0.7)
        assert any(bool((g.columns < 0).any()) for g in groups)  # unpadding removed some crop tokens
        assert_kept(model, inputs, got, full, groups, method, 0.7)
        expect = [sum(keep_count(int((g.columns >= 0).sum()), 0.7) for g in groups if g.sample == s) for s in (0, 1)]
        visual_in = handle.stats.last.visual_in
        grouped = [sum(int((g.columns >= 0).sum()) for g in groups if g.sample == s) for s in (0, 1)]
        # newline tokens are visual placeholders in no group: they all stay
        assert handle.stats.last.visual_out == [e + i - g for e, i, g in zip(expect, visual_in, grouped)]


@pytest.mark.parametrize("family", sorted(QWEN_BUILDERS))
def test_qwen_per_image_and_frame_original_positions(family):
    model = QWEN_BUILDERS[family](seed=0)
    inputs = make_batch(model, MIXED)
    full = stock_decoder_input(model, inputs)
    for method in ("divprune", "cdpruner"):
        got, groups, handle = run_patched(model, inputs, method, ratio=0.5)
        assert [g.columns.numel() for g in groups] == [24, 4, 8, 8, 8]
        assert_kept(model, inputs, got, full, groups, method, 0.5, positions="original")
        assert handle.stats.last.visual_out == [12 + 2 + 3 * 4]


def test_qwen_batch_equals_each_alone():
    model = QWEN_BUILDERS["qwen2_vl"](seed=0)
    inputs = make_batch(model, [dict(images=[(1, 8, 12)]), dict(images=[(1, 8, 12)], before=3)], seed=1)
    rows = 96
    alone = [{"input_ids": inputs["input_ids"][s : s + 1], "attention_mask": inputs["attention_mask"][s : s + 1],
              "mm_token_type_ids": inputs["mm_token_type_ids"][s : s + 1],
              "pixel_values": inputs["pixel_values"][s * rows : (s + 1) * rows],
              "image_grid_thw": inputs["image_grid_thw"][s : s + 1]} for s in range(2)]
    for method in ("divprune", "cdpruner"):
        with vlmprune.apply(model, method, ratio=0.6):
            both = model(**inputs).logits
            for s in range(2):
                torch.testing.assert_close(model(**alone[s]).logits[0], both[s], atol=ATOL, rtol=1e-4)


def test_internvl_per_tile():
    model = tiny_internvl()
    inputs = ivl_batch([ivl_prompt([2]), ivl_prompt([1], seed=1, before=19)], 3)
    full = stock_decoder_input(model, inputs)
    for method in ("divprune", "cdpruner"):
        got, groups, handle = run_patched(model, inputs, method, ratio=0.75)
        assert [g.columns.numel() for g in groups] == [16, 16, 16]
        assert_kept(model, inputs, got, full, groups, method, 0.75)
        assert handle.stats.last.visual_out == [8, 4]
    both_in = inputs
    with vlmprune.apply(model, "cdpruner", ratio=0.75):
        both = model(**both_in).logits
        one = model(**{"input_ids": inputs["input_ids"][:1], "attention_mask": inputs["attention_mask"][:1],
                       "pixel_values": inputs["pixel_values"][:2]}).logits[0]
    torch.testing.assert_close(one, both[0, both.shape[1] - one.shape[0]:], atol=ATOL, rtol=1e-4)


# ---- 4. every family generates and comes back exactly -------------------------------------------------
def _families():
    def llava():
        m = tiny_llava64()
        return m, llava_inputs(m, batch=2, seed=8)

    def nxt():
        m = tiny_next()
        return m, _next_inputs(m)

    def ov():
        m = tiny_onevision()
        return m, _next_inputs(m, video=True)

    def qwen(name):
        def build():
            m = QWEN_BUILDERS[name](seed=0)
            return m, make_batch(m, MIXED + [dict(images=[(1, 4, 8)], videos=[(2, 4, 4)])])
        return build

    def ivl():
        m = tiny_internvl()
        return m, ivl_batch([ivl_prompt([2]), ivl_prompt([1], before=19, seed=1)], 3)

    return {"llava": llava, "llava_next": nxt, "onevision": ov, "qwen2_vl": qwen("qwen2_vl"),
            "qwen2_5_vl": qwen("qwen2_5_vl"), "internvl": ivl}


FAMILIES = _families()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_generates_and_restores(family):
    model, inputs = FAMILIES[family]()
    model.generation_config.eos_token_id = None
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    for method, options in (("divprune", {}), ("cdpruner", {}), ("cdpruner", {"relevance": "none"})):
        with vlmprune.apply(model, method, ratio=0.0, **options):
            assert torch.equal(model(**inputs).logits, ref)
        with vlmprune.apply(model, method, ratio=0.75, **options) as handle:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert out.shape == ref_gen.shape
            rec = handle.stats.last
            assert all(o < i for o, i in zip(rec.visual_out, rec.visual_in)) and rec.overhead_flops > 0
    assert torch.equal(model(**inputs).logits, ref)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ref_gen)
