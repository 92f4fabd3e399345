"""FastV, PyramidDrop, DART and SparseVLM on the in-LLM seam, on tiny random-init models of every
family (LLaVA with a CLIP and a SigLIP tower, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
InternVL), each with 4 decoder layers.

Two kinds of reference, both computed here independently of the seam, on the same tensors:

* each method's selection rule, reimplemented from its reference code: FastV and SparseVLM from
  the eager attention maps of an unpatched copy (``output_attentions=True``, eager in the test only),
  DART from an unpatched run's KV cache and hidden states, PyramidDrop from the hidden states the
  stage's layer received;
* a masking oracle: the stock model with every dropped visual key column blocked for the kept
  queries from the stage's first layer on, and, for contiguous positions, each stage's positions
  given to its layers (the new tokens of decoding or of a later turn at the stock position minus
  the tokens that stage dropped). Removal must equal it on every kept row, in greedy generation
  and in a second chat turn on the cache, while the caches of later layers really are shorter.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import vlmprune
from vlmprune.method import EvalContext

sys.path.insert(0, str(Path(__file__).parent))
import test_flops  # noqa: E402
import test_qwen2_vl  # noqa: E402
from test_flops import FAMILIES, _counted  # noqa: E402

from tiny import IMAGE_TOKEN, PAD, llama_config  # noqa: E402

LAYERS = 4
FAMS = sorted(FAMILIES)
METHODS = ("fastv", "pyramiddrop", "dart", "sparsevlm")
#: options that prune visibly on the tiny models
OPTIONS = {
    "fastv": dict(ratio=0.5),
    "pyramiddrop": dict(),
    "dart": dict(ratio=0.5, pivot_image=2, pivot_text=2),
    "sparsevlm": dict(budget=128),
}
#: options that remove nothing (the scores are still computed)
NOOP = {
    "fastv": dict(ratio=0.0),
    "pyramiddrop": dict(lam=1.0),
    "dart": dict(ratio=0.0),
    "sparsevlm": dict(layers=[]),
}
TIE_TOL = 1e-6
pytestmark = pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# -- models and inputs -----------------------------------------------------------------------------
def _deeper(make, layers: int):
    """Call a test_flops factory with ``layers`` decoder layers instead of its 2."""
    original = test_flops._text

    def text(kind):
        cfg = original(kind)
        if isinstance(cfg, dict):
            return {**cfg, "num_hidden_layers": layers}
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [cfg.layer_types[0]] * layers
        return cfg

    with mock.patch.object(test_flops, "_text", text):
        return make()


@functools.cache
def _model(family: str, attn: str):
    torch.manual_seed(0)
    model, inputs, n = _deeper(lambda: FAMILIES[family](attn), LAYERS)
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, inputs, n


def build(family: str, attn: str = "sdpa"):
    """(model, inputs with a mask, sequence length); weights and inputs depend only on the family."""
    model, inputs, n = _model(family, attn)
    return model, dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"])), n


def tiny_llava4():
    """4-layer tiny LLaVA (16 visual tokens per 32 px image)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=llama_config(num_hidden_layers=LAYERS, initializer_range=0.2),
                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def llava_mixed(seed: int = 0) -> tuple[dict, list[int]]:
    """Left-padded batch: 2 images, 1 image, text only (different visual counts per sample),
    with the positions generate would give (first real token at 0)."""
    g = torch.Generator().manual_seed(seed)
    spec = [(3, 2, 4), (1, 1, 6), (4, 0, 5)]  # (text before, images, text after)
    rows = [torch.cat([torch.randint(4, 64, (b,), generator=g), torch.full((16 * i,), IMAGE_TOKEN),
                       torch.randint(4, 64, (a,), generator=g)]) for b, i, a in spec]
    width = max(r.numel() for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - r.numel(),), PAD), r]) for r in rows])
    mask = (torch.arange(width).unsqueeze(0) >= torch.tensor([width - r.numel() for r in rows]).unsqueeze(1)).long()
    images = [i for _, i, _ in spec]
    x = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(sum(images), 3, 32, 32, generator=g),
         "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    return x, images


def llava_one(x: dict, images: list[int], i: int) -> dict:
    keep = x["attention_mask"][i].bool()
    out = {"input_ids": x["input_ids"][i : i + 1, keep], "attention_mask": x["attention_mask"][i : i + 1, keep]}
    out["position_ids"] = torch.arange(int(keep.sum())).unsqueeze(0)
    first = sum(images[:i])
    if images[i]:
        out["pixel_values"] = x["pixel_values"][first : first + images[i]]
    return out


@functools.cache
def tiny_qwen4(builder: str = "qwen2_vl"):
    original = test_qwen2_vl._text_config
    with mock.patch.object(test_qwen2_vl, "_text_config", lambda: {**original(), "num_hidden_layers": LAYERS}):
        return test_qwen2_vl.BUILDERS[builder]()


QWEN_SAMPLES = [dict(images=[(1, 8, 8)], before=3, after=5), dict(images=[(1, 4, 8), (1, 4, 4)], before=2, after=3),
                dict(images=[], before=4, after=4)]


def qwen_one(x: dict, samples: list[dict], i: int) -> dict:
    keep = x["attention_mask"][i].bool()
    out = {k: x[k][i : i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    sizes = [t * h * w for s in samples for t, h, w in s["images"]]
    owner = [j for j, s in enumerate(samples) for _ in s["images"]]
    mine = [k for k, o in enumerate(owner) if o == i]
    if mine:
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        out["pixel_values"] = torch.cat([x["pixel_values"][starts[k] : starts[k] + sizes[k]] for k in mine])
        out["image_grid_thw"] = x["image_grid_thw"][mine]
    return out


# -- what the seam did -----------------------------------------------------------------------------
def state_of(handle):
    return handle.methods[-1].seam.last


def stage_sets(state, b: int = 0) -> list[tuple[int, list[int], list[int]]]:
    """Per layout: (first layer, kept decoder-input columns of original tokens, rows of merged tokens)."""
    out, prev_len = [], state.valid.shape[1]
    for lay in state.layouts:
        real = lay.valid[b]
        merged = real & (lay.rows[b] >= prev_len)
        cols = lay.columns[b][real & ~merged].tolist()
        out.append((lay.start, cols, torch.nonzero(merged).squeeze(1).tolist()))
        prev_len = lay.length
    return out


def visual_columns(state, b: int = 0) -> list[int]:
    return torch.nonzero(state.visual[b]).squeeze(1).tolist()


def assert_topk(kept: list[int], scores: torch.Tensor, columns: list[int], k: int) -> None:
    """``kept`` (columns) is the top-k of ``scores`` over ``columns``, up to swaps within TIE_TOL."""
    assert len(kept) == k, (len(kept), k)
    col = torch.tensor(columns)
    kth = torch.topk(scores, k).values[-1] if k else torch.tensor(float("inf"))
    must = set(col[scores > kth + TIE_TOL].tolist())
    may = set(col[scores >= kth - TIE_TOL].tolist())
    assert must <= set(kept) <= may, (sorted(must), sorted(kept))


# -- the masking oracle ----------------------------------------------------------------------------
class StageOracle:
    """The stock model with a patched prefill's stages expressed as masks (see the module doc)."""

    def __init__(self, model, state) -> None:
        self.model = model
        self.n = state.valid.shape[1]
        self.valid = state.valid
        self.stages = []
        for lay in state.layouts:
            kept = torch.zeros_like(state.valid)
            spos = None if lay.shift is None else torch.zeros(state.valid.shape, dtype=torch.long)
            for b in range(state.batch):
                real = lay.columns[b] >= 0
                kept[b, lay.columns[b][real]] = True
                if spos is not None:
                    spos[b, lay.columns[b][real]] = lay.positions[b][real] if lay.positions.dim() == 2 else lay.positions[0, b][real]
            self.stages.append((lay.start, kept, spos, lay.shift))
        self.handles = []

    def __enter__(self):
        lm = self.model.model.language_model
        self.handles.append(lm.register_forward_pre_hook(self._decoder, with_kwargs=True))
        for i, layer in enumerate(lm.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _decoder(self, module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        bsz, q = embeds.shape[:2]
        cache = kwargs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        kv = past + q
        mask = kwargs.get("attention_mask")
        self.key_valid = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else torch.ones(bsz, kv, dtype=torch.bool)
        pos = kwargs.get("position_ids")
        if not isinstance(pos, torch.Tensor) or pos.dim() == 3:
            pos = torch.arange(past, kv).unsqueeze(0)
        self.q, self.kv, self.pos = q, kv, pos.expand(bsz, q)

    def _layer(self, i):
        def hook(module, args, kwargs):
            stage = [s for s in self.stages if s[0] <= i]
            if not stage:
                return None
            _, kept, spos, shift = stage[-1]
            q, kv, n = self.q, self.kv, self.n
            bsz = kept.shape[0]
            dropped = torch.zeros(bsz, kv, dtype=torch.bool)
            dropped[:, :n] = self.valid & ~kept
            rows = torch.arange(kv - q, kv)
            causal = torch.arange(kv).unsqueeze(0) <= rows.unsqueeze(1)
            allowed = causal.unsqueeze(0) & self.key_valid.unsqueeze(1)
            allowed &= ~(dropped.unsqueeze(1) & ~dropped[:, rows].unsqueeze(2))
            allowed |= ~allowed.any(-1, keepdim=True)
            kwargs["attention_mask"] = allowed.unsqueeze(1)
            if spos is not None:
                inside = rows < n
                prefix = spos[:, rows.clamp(max=n - 1)]
                p = torch.where(inside.unsqueeze(0), prefix, self.pos - shift.view(-1, 1))
                kwargs["position_embeddings"] = self.model.model.language_model.rotary_emb(args[0], p)
                kwargs["position_ids"] = p
            return args, kwargs

        return hook


def assert_kept_rows_equal(patched: torch.Tensor, oracle: torch.Tensor, state, atol=2e-5) -> None:
    lay = state.layouts[-1] if state.layouts else None
    for b in range(oracle.shape[0]):
        if lay is None:
            torch.testing.assert_close(patched[b], oracle[b], atol=atol, rtol=1e-4)
            continue
        real = lay.columns[b] >= 0
        torch.testing.assert_close(patched[b, real], oracle[b, lay.columns[b][real]], atol=atol, rtol=1e-4)


def _suppress(model) -> list[int]:
    from vlmprune.adapters import for_model

    return for_model(model).placeholder_ids()


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- no-op settings, remove() ----------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMS)
def test_nothing_removed_equals_stock_and_remove_restores(family, method):
    model, x, n = build(family)
    ref = model(**x).logits
    gen = model.generate(**x, max_new_tokens=3, do_sample=False)
    hooks = _hooks(model)
    with vlmprune.apply(model, method, **NOOP[method]) as h:
        assert torch.equal(model(**x).logits, ref)
        assert torch.equal(model.generate(**x, max_new_tokens=3, do_sample=False), gen)
        rec = h.stats.last
        assert rec.layer_seq_len == [n] * LAYERS and rec.visual_out == rec.visual_in
        with pytest.raises(ValueError, match="do not compose"):  # refused before anything is installed
            vlmprune.apply(model, method, **OPTIONS[method])
    assert _hooks(model) == hooks
    assert torch.equal(model(**x).logits, ref)
    with vlmprune.apply(model, method, **OPTIONS[method]):
        assert not torch.equal(model(**x).logits[:, -1], ref[:, -1])
    assert torch.equal(model(**x).logits, ref) and _hooks(model) == hooks


# -- every family: removal equals the masking oracle, caches really shrink -------------------------
def _oracle_options(method: str) -> dict:
    return dict(OPTIONS[method], merge=False) if method == "sparsevlm" else OPTIONS[method]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMS)
def test_removal_equals_masking_and_caches_shrink(family, method):
    model, x, n = build(family)
    with vlmprune.apply(model, method, **_oracle_options(method)) as h:
        out = model(**x, use_cache=True)
        state = state_of(h)
        gen = model.generate(**x, max_new_tokens=4, do_sample=False, suppress_tokens=_suppress(model),
                             return_dict_in_generate=True, output_logits=True)
    rec = h.stats.records[0]
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == rec.layer_seq_len and lengths[0] == n and lengths[-1] < n
    assert rec.stage_layers and len(rec.stage_visual[0]) == len(rec.stage_layers)
    assert rec.visual_out[0] == round(sum(
        int(state.layout_at(j).visual[0].sum()) if state.layout_at(j) is not None else rec.visual_in[0] for j in range(LAYERS)
    ) / LAYERS)
    for _start, cols, merged in stage_sets(state):
        assert cols == sorted(cols) and not merged
        assert set(range(n)) - set(cols) <= set(visual_columns(state))  # only visual tokens leave
    lay = state.layouts[-1]
    if lay.shift is None:  # original positions: each kept token carries the position it had
        expect = state.positions[..., 0, lay.columns[0]] if state.positions.dim() == 3 else state.positions[0, lay.columns[0]]
        assert torch.equal(lay.positions[..., 0, :] if lay.positions.dim() == 3 else lay.positions[0], expect)
    else:
        assert lay.positions[0].tolist() == list(range(lay.length))  # the reference renumbers 0..L'-1
    with StageOracle(model, state) as oracle:
        ref = model(**x).logits
        ref_gen = model.generate(**x, max_new_tokens=4, do_sample=False, suppress_tokens=_suppress(model),
                                 return_dict_in_generate=True, output_logits=True)
        del oracle
    assert_kept_rows_equal(out.logits, ref, state)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for step, (a, b) in enumerate(zip(gen.logits, ref_gen.logits)):  # decode steps at their stage positions
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"step {step}")


def test_contiguous_positions_on_m_rope_are_refused():
    model, x, _ = build("qwen2_vl")
    with vlmprune.apply(model, "pyramiddrop", positions="contiguous"):
        with pytest.raises(ValueError, match="M-RoPE"):
            model(**x)


# -- each paper's rule on the same tensors ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMS)
def test_fastv_keeps_the_topk_of_the_eager_attention_row(family):
    model, x, _ = build(family)
    eager, _, _ = build(family, "eager")
    k, ratio = 2, 0.5
    with vlmprune.apply(model, "fastv", k=k, ratio=ratio) as h:
        model(**x)
    state = state_of(h)
    attn = eager(**x, output_attentions=True).attentions[k - 1]  # (1, H, L, L)
    vis = visual_columns(state)
    scores = attn.mean(dim=1)[0, -1, vis]  # last query row, mean over heads, no renormalisation
    start, cols, _ = stage_sets(state)[0]
    assert start == k and h.stats.last.stage_layers == [k]
    assert_topk(sorted(set(cols) & set(vis)), scores, vis, round(len(vis) * (1 - ratio)))


def _pdrop_reference(model, hidden, layer, positions, visual_cols, keep):
    """PyramidDrop's ranking, written from the reference: layer ``layer``'s norm, q and k on the
    hidden states, RoPE at the current positions, last query row, softmax in fp32, mean over heads."""
    lm = model.model.language_model
    block = lm.layers[layer]
    attn = block.self_attn
    h = block.input_layernorm(hidden)
    d = attn.head_dim
    q = attn.q_proj(h).view(1, h.shape[1], -1, d).transpose(1, 2)
    kk = attn.k_proj(h).view(1, h.shape[1], -1, d).transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden, positions)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, kk = rope(q, kk, cos, sin)
    kk = kk.repeat_interleave(q.shape[1] // kk.shape[1], dim=1)
    w = torch.matmul(q[:, :, -1:], kk.transpose(2, 3)) / math.sqrt(d)
    w = torch.softmax(w, dim=-1, dtype=torch.float32)
    scores = w.mean(dim=1)[0, 0, visual_cols]
    return scores, keep


@pytest.mark.parametrize("family", ["llava-clip", "llava_onevision", "qwen2_vl", "internvl"])
def test_pyramiddrop_stages_follow_the_reference_rule(family):
    model, x, n = build(family)
    lam = 0.5
    seen = {}
    handles = []
    with vlmprune.apply(model, "pyramiddrop", lam=lam) as h:
        for layer in h.methods[0].policy.layers:  # hooks after the seam's: the output before the drop
            handles.append(model.model.language_model.layers[layer - 1].register_forward_hook(
                lambda m, a, o, layer=layer: seen.__setitem__(layer, o[0] if isinstance(o, tuple) else o)))
        out = model(**x, use_cache=True)
        for hd in handles:
            hd.remove()
        state = state_of(h)
        layers = h.methods[0].policy.layers
        assert layers == [1, 2, 3]
        n0 = len(visual_columns(state))
        prev_cols, prev_pos = list(range(n)), state.positions
        for s, (lay, layer) in enumerate(zip(state.layouts, layers), start=1):
            assert lay.start == layer
            vis_rows = [r for r, c in enumerate(prev_cols) if c in set(visual_columns(state))]
            scores, _ = _pdrop_reference(model, seen[layer], layer, prev_pos, vis_rows, None)
            start, cols, _ = stage_sets(state)[s - 1]
            kept_rows = [r for r, c in enumerate(prev_cols) if c in set(cols) and r in vis_rows]
            assert_topk(kept_rows, scores, vis_rows, int(n0 * lam**s))
            prev_cols, prev_pos = cols, lay.positions
            assert out.past_key_values.layers[layer].keys.shape[2] == lay.length
        # decode: a new token's position in each stage is the stock one minus that stage's drops
        if state.layouts[0].shift is not None:
            for lay in state.layouts:
                assert int(lay.shift[0]) == n - lay.length


def _dart_reference(keys, states, image, text, t, pi, pt):
    """DART's pivot-and-greedy loop as the reference writes it (CPython set order, torch.topk)."""
    flat = keys.permute(0, 2, 1, 3).reshape(keys.shape[0], keys.shape[2], -1)[0]
    norms = torch.norm(flat, p=1, dim=-1)
    img_piv = [image[i] for i in norms[image].topk(pi).indices.tolist()]
    txt_piv = [text[i] for i in norms[text].topk(pt).indices.tolist()]
    chosen = set(img_piv + txt_piv)
    valid = set(image) - set(img_piv)
    valid_list = list(valid)
    for item in list(chosen):
        sim = -torch.nn.functional.cosine_similarity(states[item], states[valid_list], dim=-1)
        top = [valid_list[i] for i in sim.topk(t).indices.tolist()]
        chosen.update(top)
        valid.difference_update(top)
        valid_list = list(valid)
    chosen.difference_update(txt_piv)
    return sorted(chosen)


@pytest.mark.parametrize("family", FAMS)
def test_dart_replays_the_reference_greedy(family):
    model, x, _ = build(family)
    k, ratio, pi, pt = 2, 0.5, 2, 2
    ref = model(**x, use_cache=True, output_hidden_states=True)
    with vlmprune.apply(model, "dart", k=k, ratio=ratio, pivot_image=pi, pivot_text=pt) as h:
        model(**x)
    state = state_of(h)
    vis = visual_columns(state)
    text = [c for c in range(vis[-1] + 1, state.valid.shape[1])]
    keys = ref.past_key_values.layers[k - 1].keys  # post-RoPE, before repeat_kv
    heads = model.config.get_text_config().num_attention_heads
    keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
    states = model.model.language_model.norm(ref.hidden_states[k])[0]  # layer k-1's output, final norm
    t = int(len(vis) * (1 - ratio)) // (pi + pt)
    expect = _dart_reference(keys, states, vis, text, t, pi, pt)
    _, cols, _ = stage_sets(state)[0]
    kept = sorted(set(cols) & set(vis))
    assert kept == expect and len(kept) == pi + (pi + pt) * t


def _cluster_reference(x, cluster_num, noise):
    """The reference's DPC-kNN ``cluster_and_merge`` for one sample (noise given)."""
    n, c = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / (c**0.5)
    near = torch.topk(dist, k=cluster_num, dim=-1, largest=False).values
    density = (-(near**2).mean(dim=-1)).exp() + noise * 1e-6
    mask = (density[None, :] > density[:, None]).float()
    parent = (dist * mask + dist.max() * (1 - mask)).min(dim=-1).values
    centres = torch.topk(parent * density, k=cluster_num).indices
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(cluster_num)
    weight = torch.zeros(cluster_num).index_add_(0, assign, torch.ones(n)) + 1e-6
    return torch.zeros(cluster_num, c).index_add_(0, assign, x / weight[assign].unsqueeze(1))


@pytest.mark.parametrize("family", ["llava-clip", "llava_next", "qwen2_5_vl", "internvl"])
def test_sparsevlm_first_stage_follows_the_reference(family):
    model, x, _ = build(family)
    eager, _, _ = build(family, "eager")
    budget, seed = 128, 0
    fed = {}
    with vlmprune.apply(model, "sparsevlm", budget=budget, seed=seed) as h:
        loc = h.methods[0].policy.layers[0]
        hook = model.model.language_model.layers[loc + 1].register_forward_pre_hook(
            lambda m, a, k: fed.__setitem__("h", a[0] if a else k["hidden_states"]), with_kwargs=True)
        model(**x)
        hook.remove()
    state = state_of(h)
    ref = eager(**x, output_attentions=True, output_hidden_states=True)
    vis = visual_columns(state)
    text = list(range(vis[-1] + 1, state.valid.shape[1]))
    emb = ref.hidden_states[0][0]
    m = (emb[vis] @ emb[text].T).softmax(1).mean(0)
    raters = [text[i] for i in torch.where(m > m.mean())[0].tolist()]
    rel = ref.attentions[loc].mean(dim=1)[0][raters][:, vis].mean(dim=0)  # (V,)
    v = len(vis)
    k_s = min(int(round(303 * v / 576)), v - 1)
    start, cols, merged = stage_sets(state)[0]
    assert start == loc + 1
    kept = sorted(set(cols) & set(vis))
    assert_topk(kept, rel, vis, k_s)
    pruned = [i for i, c in enumerate(vis) if c not in set(kept)]
    recycled = int(len(pruned) * 0.3) + 1
    clusters = int(recycled / 10) + 1
    assert len(merged) == clusters
    top = torch.tensor(pruned)[rel[pruned].topk(recycled).indices]
    tokens = ref.hidden_states[loc + 1][0][torch.tensor(vis)[top]]
    noise = torch.rand(recycled, generator=torch.Generator().manual_seed(seed * 1_000_003 + 0))
    expect = _cluster_reference(tokens.float(), clusters, noise)
    torch.testing.assert_close(fed["h"][0, merged], expect, atol=1e-4, rtol=1e-4)
    assert merged[0] == max(i for i, c in enumerate(state.layouts[0].columns[0].tolist()) if c in set(kept)) + 1
    # later stages: min(count, v - 1) of the current visual tokens, plus the merged ones
    counts = (303, 110, 36)
    visual_now = k_s + clusters
    for s, lay in enumerate(state.layouts[1:], start=1):
        k = min(int(round(counts[s] * v / 576)), visual_now - 1)
        p = visual_now - k
        c = int((int(p * 0.3) + 1) / 10) + 1
        visual_now = k + c
        assert int(lay.visual[0].sum()) == visual_now


def test_sparsevlm_v1_counts_from_the_rank():
    model, x, _ = build("llava-clip")
    eager, _, _ = build("llava-clip", "eager")
    with vlmprune.apply(model, "sparsevlm", version="v1", budget=128, merge=False) as h:
        model(**x)
    state = state_of(h)
    loc = h.methods[0].policy.layers[0]
    ref = eager(**x, output_attentions=True, output_hidden_states=True)
    vis = visual_columns(state)
    text = list(range(vis[-1] + 1, state.valid.shape[1]))
    emb = ref.hidden_states[0][0]
    m = (emb[vis] @ emb[text].T).softmax(1).mean(0)
    raters = [text[i] for i in torch.where(m > m.mean())[0].tolist()]
    relation = ref.attentions[loc].mean(dim=1)[0][raters][:, vis]
    rank = int(torch.linalg.matrix_rank(relation.float()))
    k = min(int(rank * 9 + 6), len(vis) - 1)
    _, cols, _ = stage_sets(state)[0]
    assert_topk(sorted(set(cols) & set(vis)), relation.mean(0), vis, k)


def test_loss_is_computed_on_the_kept_rows():
    model, x, n = build("llava-clip")
    labels = torch.full_like(x["input_ids"], -100)
    labels[:, -4:] = x["input_ids"][:, -4:]  # an answer after the prompt; the image carries no loss
    with vlmprune.apply(model, "fastv", ratio=0.75) as h:
        loss = model(**x, labels=labels).loss
        state = state_of(h)
    with StageOracle(model, state):
        ref = model(**x, labels=labels).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


# -- batches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_llava_batch_equals_each_sample_alone(method):
    model = tiny_llava4()
    x, images = llava_mixed()
    with vlmprune.apply(model, method, **OPTIONS[method]) as h:
        batched = model(**x).logits
        counts = h.stats.last.stage_visual
        assert counts[0] != counts[1] and counts[2] == [0] * len(counts[2])  # different keeps; no image passes
        gen = model.generate(**{k: v for k, v in x.items() if k != "position_ids"}, max_new_tokens=4, do_sample=False)
        for i in range(3):
            xi = llava_one(x, images, i)
            records = len(h.stats.records)
            alone = model(**xi).logits
            if images[i]:
                assert h.stats.last.stage_visual[0] == counts[i]
            else:
                assert len(h.stats.records) == records  # no visual token: the seam stays out of the way
            torch.testing.assert_close(batched[i, -alone.shape[1]:], alone[0], atol=3e-5, rtol=1e-4)
            xi.pop("position_ids")
            assert torch.equal(gen[i, -4:], model.generate(**xi, max_new_tokens=4, do_sample=False)[0, -4:])
    stock = model(**llava_one(x, images, 2)).logits
    torch.testing.assert_close(batched[2, -stock.shape[1]:], stock[0], atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_qwen_batch_equals_each_sample_alone(method):
    model = tiny_qwen4()
    x = test_qwen2_vl.make_batch(model, QWEN_SAMPLES, seed=1)
    with vlmprune.apply(model, method, **OPTIONS[method]) as h:
        batched = model(**x).logits
        counts = h.stats.last.stage_visual
        gen = model.generate(**x, max_new_tokens=3, do_sample=False)
        for i in range(len(QWEN_SAMPLES)):
            xi = qwen_one(x, QWEN_SAMPLES, i)
            alone = model(**xi).logits
            if QWEN_SAMPLES[i]["images"]:
                assert h.stats.last.stage_visual[0] == counts[i]
            torch.testing.assert_close(batched[i, -alone.shape[1]:], alone[0], atol=5e-5, rtol=1e-4)
            assert torch.equal(gen[i, -3:], model.generate(**xi, max_new_tokens=3, do_sample=False)[0, -3:])


# -- composition -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_composes_after_fastervlm(method):
    model = tiny_llava4()
    x, images = llava_mixed(seed=2)
    config = vlmprune.registry.make_config(method, OPTIONS[method])
    with vlmprune.apply(model, [vlmprune.FasterVLMConfig(ratio=0.5), config]) as h:
        out = model(**x, use_cache=True)
        before, inside = h.stats.records[-2], h.stats.records[-1]
        assert before.method == "fastervlm" and inside.method.startswith(method)
        assert inside.visual_in == before.visual_out == [16, 8, 0]
        lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
        assert lengths == inside.layer_seq_len and lengths[0] == int(x["attention_mask"].sum(1).max()) - 16
        for i in range(3):
            xi = llava_one(x, images, i)
            alone = model(**xi).logits
            torch.testing.assert_close(out.logits[i, -alone.shape[1]:], alone[0], atol=3e-5, rtol=1e-4)
        model.generate(**{k: v for k, v in x.items() if k != "position_ids"}, max_new_tokens=3, do_sample=False)


def test_dyvte_and_an_inllm_method_do_not_stack():
    model = tiny_llava4()
    with pytest.raises(ValueError, match="do not compose"):
        vlmprune.apply(model, [vlmprune.DyVTEConfig(exit_layer=2), vlmprune.FastVConfig()])
    with vlmprune.apply(model, "dyvte", exit_layer=2):
        with pytest.raises(ValueError, match="do not compose"):
            vlmprune.apply(model, "pyramiddrop")
    assert "_vlmprune_handles" not in model.__dict__


# -- a second chat turn on the cache ---------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llava-clip", "qwen2_vl", "internvl"])
def test_second_turn_on_the_cache_equals_the_oracle(family, method):
    model, x, n = build(family)
    quiet = dict(do_sample=False, suppress_tokens=_suppress(model), return_dict_in_generate=True, output_logits=True)
    visual = {k: v for k, v in x.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with vlmprune.apply(model, method, **_oracle_options(method)) as h:
        first = model.generate(**x, max_new_tokens=3, **quiet)
        state = state_of(h)
        history = torch.cat([first.sequences, torch.tensor([[7, 8, 9, 10, 11, 12]])], dim=1)
        mask = torch.ones_like(history)
        cached = model.generate(input_ids=history, attention_mask=mask, past_key_values=first.past_key_values,
                                max_new_tokens=4, **quiet)
        lengths = [layer.keys.shape[2] for layer in cached.past_key_values.layers]
        assert lengths == [length + history.shape[1] + 3 - n for length in h.stats.records[0].layer_seq_len]
    with StageOracle(model, state):
        ref_first = model.generate(**x, max_new_tokens=3, **quiet)
        fresh = model.generate(input_ids=history, attention_mask=mask, **visual, max_new_tokens=4, **quiet)
    assert torch.equal(first.sequences, ref_first.sequences)
    assert torch.equal(cached.sequences, fresh.sequences)
    gap = max(float((a - b).abs().max()) for a, b in zip(cached.logits, fresh.logits))
    assert gap < (5e-3 if family.startswith("qwen") else 1e-4), gap  # the stock model's own chunked-prefill noise


# -- FLOPs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava-clip", "qwen2_vl", "llava_onevision"])
@pytest.mark.parametrize("method", METHODS)
def test_flops_count_each_layer_at_its_length(method, family, attn):
    model, x, n = build(family, attn)
    with vlmprune.apply(model, method, **OPTIONS[method]) as h:
        measured, _ = _counted(lambda: model(**x, use_cache=False))
        report = h.flops(x)
    rec = h.stats.last
    assert rec.layer_seq_len[0] == n and rec.layer_seq_len[-1] < n
    assert rec.overhead_flops > 0 and report.overhead == rec.overhead_flops
    assert abs(report.total - measured) / measured < 0.02, (report.total, measured)
    if method in ("fastv", "pyramiddrop"):  # their scoring is all matrix products: counted exactly
        assert abs(report.total - measured) / measured < 1e-9
    full = vlmprune.flops.estimate(model, x, n)
    assert report.llm_prefill < full.llm_prefill


# -- options ---------------------------------------------------------------------------------------
def test_bad_options_name_the_valid_values():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        vlmprune.FastVConfig(ratio=1.0)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        vlmprune.FastVConfig(k=0)
    with pytest.raises(ValueError, match="positions must be one of None, 'original', 'contiguous'"):
        vlmprune.DARTConfig(positions="gapless")
    with pytest.raises(ValueError, match="pivot_order must be one of 'reference', 'sorted'"):
        vlmprune.DARTConfig(pivot_order="random")
    with pytest.raises(ValueError, match="at least one pivot"):
        vlmprune.DARTConfig(pivot_image=0, pivot_text=0)
    with pytest.raises(ValueError, match=r"lam must be a number in \(0, 1\]"):
        vlmprune.PyramidDropConfig(lam=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        vlmprune.PyramidDropConfig(layers=[3, 2])
    with pytest.raises(ValueError, match="budget must be one of 192, 128, 96, 64"):
        vlmprune.SparseVLMConfig(budget=100)
    with pytest.raises(ValueError, match="version must be one of 'v1.5', 'v1'"):
        vlmprune.SparseVLMConfig(version="v2")
    with pytest.raises(ValueError, match="budget must be one of 192, 128, 64"):
        vlmprune.SparseVLMConfig(version="v1", budget=96)
    with pytest.raises(TypeError, match="unknown option.*valid options: k, ratio, positions"):
        vlmprune.apply(tiny_llava4(), "fastv", layer=2)
    model = tiny_llava4()
    for method, options, message in [
        ("fastv", dict(k=4), r"k must be in 1\.\.3"),
        ("dart", dict(k=5), r"k must be in 1\.\.3"),
        ("pyramiddrop", dict(layers=[1, 4]), r"layers must be in 1\.\.3"),
        ("sparsevlm", dict(layers=[3]), r"layers must be in 0\.\.2"),
    ]:
        with pytest.raises(ValueError, match=message):
            vlmprune.apply(model, method, **options)
    assert "_vlmprune_handles" not in model.__dict__


def test_eval_grids():
    ctx = EvalContext(num_layers=4)
    assert vlmprune.FastVConfig.eval_cells([0.5, 0.9], ctx, {}) == [{"ratio": 0.5}, {"ratio": 0.9}]
    cells = vlmprune.PyramidDropConfig.eval_cells([0.5, 0.6, 0.9], ctx, {})
    assert [c["ratio"] for c in cells] == [0.5, 0.6]  # layers 0 sees all: at most 75% can go on 4 layers
    from vlmprune.methods.pyramiddrop.ops import layer_mean_share

    for c in cells:
        assert abs(layer_mean_share([1, 2, 3], 4, c["lam"]) - (1 - c["ratio"])) < 1e-3
    assert vlmprune.PyramidDropConfig.eval_cells([0.5], ctx, {"lam": [0.5]}) == [{"lam": 0.5}]
    assert [c["budget"] for c in vlmprune.SparseVLMConfig.eval_cells([0.5], ctx, {})] == [192, 128, 96, 64]
