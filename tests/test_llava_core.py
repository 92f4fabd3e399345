"""End-to-end behaviour of apply / remove / the pre-LLM seam on a tiny LLaVA-1.5."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from vlmprune.method import keep_count

from tiny import IMAGE_TOKEN, PAD, llava_inputs, tiny_llava


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def kept_columns_recorder(model):
    """Record the embeddings and positions the decoder receives (to compare with references).

    Install it after ``vlmprune.apply`` so that it runs after the seam's hook."""
    seen = []

    def hook(module, args, kwargs):
        seen.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def eager_cls_scores(model, pixel_values):
    """Reference score: the [CLS] row of the eager attention map of the feature layer's block."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    num_layers = len(tower.encoder.layers)
    layer = num_layers + model.config.vision_feature_layer
    return out.attentions[layer][:, :, 0, 1:].mean(dim=1)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava(seed=0, attn="eager")


def test_ratio_zero_is_bit_identical(model):
    inp = llava_inputs(model, batch=2)
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=4, do_sample=False)
    with vlmprune.apply(model, "fastervlm", ratio=0.0) as handle:
        assert torch.equal(model(**inp).logits, ref)
        assert torch.equal(model.generate(**inp, max_new_tokens=4, do_sample=False), ref_gen)
        assert handle.stats.last.visual_out == handle.stats.last.visual_in
    assert torch.equal(model(**inp).logits, ref)


def test_remove_restores_bit_exact(model):
    inp = llava_inputs(model, batch=2, seed=1)
    ref = model(**inp).logits
    forward_before = model.__dict__.get("forward")
    handle = vlmprune.apply(model, "fastervlm", ratio=0.9)
    assert model(**inp).logits.shape[1] < ref.shape[1]
    handle.remove()
    handle.remove()  # second remove is a no-op
    assert torch.equal(model(**inp).logits, ref)
    assert model.__dict__.get("forward") is forward_before
    assert not model._forward_pre_hooks and not model.model.language_model._forward_pre_hooks
    assert "_vlmprune_handles" not in model.__dict__


def test_config_object_form_and_registry(model):
    assert {"fastervlm", "random", "pool"} <= set(vlmprune.available_methods())
    cfg = vlmprune.FasterVLMConfig(ratio=0.5)
    with vlmprune.apply(model, cfg) as handle:
        assert handle.config is cfg
        model(**llava_inputs(model))
        assert handle.stats.last.visual_out == [keep_count(16, 0.5)]


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9, 0.95])
def test_kept_tokens_match_eager_topk(model, eager_model, ratio):
    inp = llava_inputs(model, batch=2, seed=2)
    ref_scores = eager_cls_scores(eager_model, inp["pixel_values"])
    n = ref_scores.shape[1]
    k = keep_count(n, ratio)
    with vlmprune.apply(model, "fastervlm", ratio=ratio) as handle:
        seen, hook = kept_columns_recorder(model)
        model(**inp)
    hook.remove()
    # recover which patches survived from the embeddings that reached the decoder
    feats = model.model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output
    embeds = seen[0]["inputs_embeds"]
    for b in range(2):
        start = 3  # text_before
        got = embeds[b, start : start + k]
        idx = [int(torch.argmin((feats[b] - row).abs().sum(-1))) for row in got]
        expected = torch.sort(torch.topk(ref_scores[b], k).indices).values.tolist()
        assert idx == expected, "kept set / order differs from the eager [CLS] top-k"
    assert handle.stats.last.visual_out == [k, k]
    assert handle.stats.last.scoring == "cls"


def test_sequence_and_cache_shrink(model):
    inp = llava_inputs(model, batch=1)
    length = inp["input_ids"].shape[1]
    with vlmprune.apply(model, "fastervlm", ratio=0.75):
        out = model(**inp, use_cache=True)
    k = keep_count(16, 0.75)
    assert out.logits.shape[1] == length - (16 - k)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers < 5.20
    assert cache.get_seq_length() == length - (16 - k)


def test_generate_equals_kept_embeddings(model):
    inp = llava_inputs(model, batch=1, seed=3)
    with vlmprune.apply(model, "fastervlm", ratio=0.75):
        seen, hook = kept_columns_recorder(model)
        pruned = model.generate(**inp, max_new_tokens=6, do_sample=False)
    hook.remove()
    kept = seen[0]["inputs_embeds"]
    # greedy decoding from the kept embeddings directly on the unpatched model
    direct = model.generate(
        inputs_embeds=kept, attention_mask=torch.ones(kept.shape[:2], dtype=torch.long),
        max_new_tokens=6, do_sample=False,
    )
    assert torch.equal(pruned[:, inp["input_ids"].shape[1] :], direct)
    # the prompt part of generate's output is the caller's original prompt
    assert torch.equal(pruned[:, : inp["input_ids"].shape[1]], inp["input_ids"])


def _left_pad(rows):
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.numel() :] = r
        mask[i, width - r.numel() :] = 1
    return ids, mask


@pytest.mark.parametrize("method", ["fastervlm", "random", "pool"])
def test_batch_equals_each_alone(model, method):
    a = llava_inputs(model, batch=1, seed=4, text_before=2, text_after=5)
    b = llava_inputs(model, batch=1, seed=5, text_before=4, text_after=3)
    ids, mask = _left_pad([a["input_ids"][0], b["input_ids"][0]])
    pix = torch.cat([a["pixel_values"], b["pixel_values"]])
    with vlmprune.apply(model, method, ratio=0.75):
        batch_logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        batch_gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=5, do_sample=False)
        for i, single in enumerate((a, b)):
            logits = model(**single).logits
            assert torch.allclose(batch_logits[i, -logits.shape[1] :], logits[0], atol=1e-5)
            gen = model.generate(**single, max_new_tokens=5, do_sample=False)
            new = gen[0, single["input_ids"].shape[1] :]
            assert torch.equal(batch_gen[i, ids.shape[1] : ids.shape[1] + new.numel()], new)


def test_mixed_batch_sample_without_image_passes_through(model):
    with_img = llava_inputs(model, batch=1, seed=6)
    text_row = torch.randint(4, 64, (5,), generator=torch.Generator().manual_seed(0))
    ids, mask = _left_pad([with_img["input_ids"][0], text_row])
    ref_text = model(input_ids=text_row[None]).logits
    with vlmprune.apply(model, "fastervlm", ratio=0.9) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=with_img["pixel_values"]).logits
        assert handle.stats.last.visual_in == [16, 0]
        assert handle.stats.last.visual_out == [keep_count(16, 0.9), 0]
        assert torch.allclose(out[1, -5:], ref_text[0], atol=1e-5)
        # text-only call: untouched, nothing recorded
        before = len(handle.stats.records)
        assert torch.equal(model(input_ids=text_row[None]).logits, ref_text)
        assert len(handle.stats.records) == before


def test_original_positions_option(model):
    inp = llava_inputs(model, batch=1, seed=7)
    with vlmprune.apply(model, "fastervlm", ratio=0.75, positions="original") as handle:
        seen, hook = kept_columns_recorder(model)
        out = model.generate(**inp, max_new_tokens=3, do_sample=False)
    hook.remove()
    k = keep_count(16, 0.75)
    pos = seen[0]["position_ids"][0]
    assert pos[:3].tolist() == [0, 1, 2]
    assert pos[-4:].tolist() == [19, 20, 21, 22]  # text after the image keeps its original positions
    assert pos.numel() == 3 + k + 4
    assert seen[1]["position_ids"].flatten().tolist() == [23]  # decoding continues after the original end
    assert handle.stats.last.positions == "original" and out.shape[1] == 23 + 3


def test_contiguous_positions_default(model):
    inp = llava_inputs(model, batch=1, seed=7)
    with vlmprune.apply(model, "fastervlm", ratio=0.75):
        seen, hook = kept_columns_recorder(model)
        model.generate(**inp, max_new_tokens=2, do_sample=False)
    hook.remove()
    n = seen[0]["inputs_embeds"].shape[1]
    assert seen[0]["position_ids"][0].tolist() == list(range(n))
    assert seen[1]["position_ids"].flatten().tolist() == [n]


def test_labels_are_pruned_with_the_sequence(model):
    inp = llava_inputs(model, batch=1, seed=8)
    labels = inp["input_ids"].clone()
    labels[labels == IMAGE_TOKEN] = -100
    with vlmprune.apply(model, "fastervlm", ratio=0.0):
        loss0 = model(**inp, labels=labels).loss
    assert torch.allclose(loss0, model(**inp, labels=labels).loss)
    with vlmprune.apply(model, "fastervlm", ratio=0.75):
        out = model(**inp, labels=labels)
    assert torch.isfinite(out.loss)


def test_extreme_ratio_keeps_at_least_one(model):
    with vlmprune.apply(model, "fastervlm", ratio=0.999) as handle:
        model(**llava_inputs(model))
    assert handle.stats.last.visual_out == [1]


def test_two_models_one_patched():
    a, b = tiny_llava(seed=0), tiny_llava(seed=0)
    inp = llava_inputs(a, batch=1)
    ref = b(**inp).logits
    with vlmprune.apply(a, "fastervlm", ratio=0.9):
        assert a(**inp).logits.shape[1] < ref.shape[1]
        assert torch.equal(b(**inp).logits, ref)


def test_random_is_seeded(model):
    inp = llava_inputs(model, batch=1, seed=9)
    seen = []
    for seed in (0, 0, 1):
        with vlmprune.apply(model, "random", ratio=0.75, seed=seed):
            rec, hook = kept_columns_recorder(model)
            model(**inp)
            hook.remove()
        seen += rec
    assert torch.equal(seen[0]["inputs_embeds"], seen[1]["inputs_embeds"])
    assert not torch.equal(seen[0]["inputs_embeds"], seen[2]["inputs_embeds"])


def test_pool_count(model):
    with vlmprune.apply(model, "pool", ratio=0.75) as handle:
        model(**llava_inputs(model))
    assert handle.stats.last.visual_out == [4]  # 4x4 grid -> 2x2


# ---- bad input ----------------------------------------------------------------------------


def test_unknown_method_lists_valid(model):
    with pytest.raises(ValueError, match="available methods: .*fastervlm"):
        vlmprune.apply(model, "fastvv")


def test_unknown_option_lists_valid(model):
    with pytest.raises(TypeError, match="valid options: ratio"):
        vlmprune.apply(model, "fastervlm", ratoi=0.5)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_out_of_range(model, ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        vlmprune.apply(model, "fastervlm", ratio=ratio)


def test_ratio_wrong_type(model):
    with pytest.raises(TypeError):
        vlmprune.apply(model, "fastervlm", ratio="0.5")


def test_unsupported_model():
    from transformers import LlamaForCausalLM

    from tiny import llama_config

    with pytest.raises(TypeError, match="Supported model classes: .*LlavaForConditionalGeneration"):
        vlmprune.apply(LlamaForCausalLM(llama_config()), "fastervlm")


def test_second_apply_same_stage_is_an_error(model):
    with vlmprune.apply(model, "fastervlm", ratio=0.5):
        with pytest.raises(ValueError, match="do not compose"):
            vlmprune.apply(model, "random", ratio=0.5)
        with pytest.raises(ValueError, match="do not compose"):
            vlmprune.apply(model, ["fastervlm", "pool"])
    vlmprune.apply(model, "random", ratio=0.5).remove()  # fine once the first one is gone


def test_mismatched_image_count(model):
    inp = llava_inputs(model, batch=1)
    inp["pixel_values"] = torch.cat([inp["pixel_values"], inp["pixel_values"]])
    with vlmprune.apply(model, "fastervlm", ratio=0.5):
        with pytest.raises(ValueError, match="image"):
            model(**inp)


def test_siglip_tower_uses_labelled_fallback():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from tiny import llama_config

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=llama_config(), image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration(cfg).eval()
    inp = llava_inputs(model)
    with vlmprune.apply(model, "fastervlm", ratio=0.75) as handle:
        model(**inp)
    assert handle.stats.last.scoring == "nocls"
    assert handle.methods[0].label == "fastervlm-nocls"
    assert handle.stats.last.visual_out == [4]


def test_handle_flops_falls_with_ratio(model):
    from vlmprune import flops

    inp = llava_inputs(model)
    full = flops.estimate(model, inp, inp["input_ids"].shape[1])
    with vlmprune.apply(model, "fastervlm", ratio=0.75) as handle:
        with pytest.raises(RuntimeError, match="no patched call"):
            handle.flops(inp)
        model(**inp)
        report = handle.flops(inp)
    assert report.vision == full.vision
    assert report.llm_prefill < full.llm_prefill
    assert report.overhead > 0
    # the LLM part equals a plain estimate at the pruned length
    assert report.llm_prefill == flops.estimate(model, inp, handle.stats.last.seq_len).llm_prefill


def test_per_call_feature_layer_override_is_an_error(model):
    with vlmprune.apply(model, "fastervlm", ratio=0.5):
        with pytest.raises(ValueError, match="vision_feature_layer"):
            model(**llava_inputs(model), vision_feature_layer=-1)
