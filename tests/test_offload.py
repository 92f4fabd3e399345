"""A model dispatched by accelerate (``device_map`` with layers offloaded to disk, the usual way to run a
checkpoint larger than the device): accelerate swaps the offloaded modules' ``forward`` and keeps their
weights on the meta device until called, so a method that read weights directly or replaced a forward
naively would break or silently differ. Every stage is checked against the same model loaded plainly."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")

from transformers import LlavaForConditionalGeneration  # noqa: E402

import vlmprune  # noqa: E402

from tiny import llava_inputs, tiny_llava  # noqa: E402

MAP = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model.embed_tokens": "cpu",
       "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
       "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = tiny_llava()
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    offloaded = LlavaForConditionalGeneration.from_pretrained(
        path, device_map=MAP, offload_folder=str(tmp_path_factory.mktemp("offload"))).eval()
    return model, offloaded, llava_inputs(model, batch=2)


@pytest.mark.parametrize("method,options", [
    ("fastervlm", dict(ratio=0.5)), ("dart", dict(k=1, ratio=0.5)), ("pyramiddrop", {}),
    ("dyvte", dict(exit_layer=1)), ("dymu", dict(thresholds=[0.9, 0.9, 0.9])),
])
def test_offloaded_model_is_pruned_like_the_plain_one(pair, method, options):
    model, offloaded, inputs = pair
    assert any(v == "disk" for v in offloaded.hf_device_map.values())
    with torch.no_grad():
        stock = offloaded(**inputs).logits
        with vlmprune.apply(model, method, **options) as ref:
            want = model(**inputs).logits[:, -1]
            want_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vlmprune.apply(offloaded, method, **options) as handle:
            got = offloaded(**inputs).logits[:, -1]
            got_tokens = offloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert handle.stats.last.visual_out == ref.stats.last.visual_out
        assert torch.equal(offloaded(**inputs).logits, stock)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)
