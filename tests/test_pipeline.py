"""transformers' ``pipeline("image-text-to-text")`` on a patched model: the pipeline preprocesses and
calls ``generate`` itself, so the method must act there too, batched pipeline calls must equal single
ones, and the pipeline must answer as before once the handle is removed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

import vlmprune
from vlmprune.artifacts import named_checkpoint


@pytest.fixture(scope="module")
def pipe():
    path = named_checkpoint("builtin")
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    return pipeline("image-text-to-text", model=model, processor=AutoProcessor.from_pretrained(path))


def scenes() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(224, 224, 3) * 255).astype(np.uint8)) for _ in range(2)]


def test_pipeline_calls_are_pruned_and_restored(pipe):
    imgs, prompts = scenes(), ["<image> how many objects ?", "<image> what color is the square ?"]
    before = [pipe(images=i, text=p, max_new_tokens=2) for i, p in zip(imgs, prompts)]
    with vlmprune.apply(pipe.model, "fastervlm", ratio=0.9) as handle:
        single = [pipe(images=i, text=p, max_new_tokens=2) for i, p in zip(imgs, prompts)]
        prefill = [r for r in handle.stats.records if r.visual_in]
        assert prefill and all(r.visual_in == [256] and r.visual_out == [26] for r in prefill)
        batched = pipe(images=imgs, text=prompts, max_new_tokens=2, batch_size=2)
        assert [b["generated_text"] for b in batched] == [s[0]["generated_text"] for s in single]
    after = [pipe(images=i, text=p, max_new_tokens=2) for i, p in zip(imgs, prompts)]
    assert after == before
