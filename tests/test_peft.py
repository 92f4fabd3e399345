"""A peft-wrapped model (an unmerged LoRA fine-tune, the usual shape of a researcher's checkpoint):
``apply`` on the wrapper patches its base model, so every call through the wrapper is pruned exactly
as the merged model would be, and ``remove()`` restores it."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import vlmprune  # noqa: E402

from tiny import llava_inputs, tiny_llava  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "gate_proj"]


@pytest.fixture(scope="module")
def lora():
    """(peft model with non-zero LoRA deltas in the tower and the LM, the same weights merged, inputs)."""
    model = tiny_llava()
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"))
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    return wrapped, merged, llava_inputs(model, batch=2)


@pytest.mark.parametrize("method,options", [
    ("fastervlm", dict(ratio=0.5)), ("fastv", dict(k=1, ratio=0.5)), ("vispruner", dict(ratio=0.5)),
    ("dymu", dict(thresholds=[0.9, 0.9, 0.9])),
])
def test_apply_on_a_lora_wrapper_equals_the_merged_model(lora, method, options):
    wrapped, merged, inputs = lora
    with torch.no_grad():
        stock = wrapped(**inputs).logits
        with vlmprune.apply(wrapped, method, **options) as handle:
            got = wrapped(**inputs).logits[:, -1]
            kept = handle.stats.last.visual_out
            out = wrapped.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vlmprune.apply(merged, method, **options) as ref_handle:
            want = merged(**inputs).logits[:, -1]
            ref_out = merged.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert kept == ref_handle.stats.last.visual_out
        assert torch.equal(wrapped(**inputs).logits, stock)
    assert sum(kept) < 2 * 16 or method == "fastv"
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(out, ref_out)


def test_labels_through_the_wrapper_are_aligned_with_the_pruned_logits(lora):
    wrapped, merged, inputs = lora
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        with vlmprune.apply(wrapped, "fastervlm", ratio=0.5):
            got = wrapped(**inputs, labels=labels).loss
        with vlmprune.apply(merged, "fastervlm", ratio=0.5):
            want = merged(**inputs, labels=labels).loss
    assert torch.isfinite(got) and torch.allclose(got, want, atol=1e-5)


def test_prompt_learning_wrappers_are_refused():
    model = tiny_llava()
    wrapped = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(TypeError, match="virtual tokens"):
        vlmprune.apply(wrapped, "fastervlm", ratio=0.5)
