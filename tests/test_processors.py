"""The processors users run: transformers' own Qwen2-VL, LLaVA-OneVision and InternVL processor classes
(their image and video processors need torchvision), built locally with a small tokenizer whose special
tokens carry the tiny models' ids, and their output fed straight into a pruned model.

Skipped where torchvision does not import (the README's install has it; see its install notes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

import vlmprune  # noqa: E402
from vlmprune.method import keep_count  # noqa: E402


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tokenizer(specials: dict[int, str], eos: str):
    """A word-level tokenizer whose special tokens sit at the given ids (the tiny configs' ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["user", "assistant", "describe", "the", "image", "video", "what", "is", "this", "?"]
    vocab: dict[str, int] = {}
    free = iter(i for i in range(64) if i not in specials)
    for i, tok in sorted(specials.items()):
        vocab[tok] = i
    for w in ["<unk>", *words]:
        vocab[w] = next(free)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "(" + "|".join(t.replace("|", r"\|").replace("<", r"\<") for t in specials.values()) + ")"
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(pattern, behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], eos_token=eos, unk_token="<unk>",
                                   padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": [t for i, t in sorted(specials.items()) if i != 0]})
    return fast


def pictures(n: int, shape: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 255, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def check_pruned_run(model, inputs: dict, ratio: float = 0.5) -> None:
    """Apply FasterVLM, check the kept counts per group, batch rows against singles, and a bit-exact remove."""
    base = model(**inputs).logits
    with vlmprune.apply(model, "fastervlm", ratio=ratio) as handle:
        model(**inputs)
        rec = handle.stats.last
        assert sum(rec.visual_out) < sum(rec.visual_in)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert torch.equal(model(**inputs).logits, base)


def test_qwen2_vl_processor_images_and_videos():
    from test_qwen2_vl import IMG, PAD, VEND, VID, VSTART, tiny_qwen2_vl
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = tokenizer({PAD: "<|endoftext|>", IMG: "<|image_pad|>", VID: "<|video_pad|>", VSTART: "<|vision_start|>",
                     VEND: "<|vision_end|>", 9: "<|im_end|>"}, eos="<|im_end|>")
    geometry = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=40 * 40)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**geometry), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(**geometry))
    model = tiny_qwen2_vl()
    text = ["<|vision_start|><|image_pad|><|vision_end|> describe the image",
            "what is <|vision_start|><|image_pad|><|vision_end|> this ?"]
    inputs = dict(proc(images=pictures(2, (40, 56)), text=text, padding=True, return_tensors="pt"))
    grids = inputs["image_grid_thw"]
    with vlmprune.apply(model, "fastervlm", ratio=0.5) as handle:
        model(**inputs)
        per_image = [int(t * h * w) // 4 for t, h, w in grids.tolist()]
        assert handle.stats.last.visual_in == per_image
        assert handle.stats.last.visual_out == [keep_count(n, 0.5) for n in per_image]
    check_pruned_run(model, inputs)
    video = dict(proc(videos=[np.stack(pictures(4, (32, 32), seed=1))],
                      text=["<|vision_start|><|video_pad|><|vision_end|> describe the video"], return_tensors="pt"))
    assert "pixel_values_videos" in video
    check_pruned_run(model, video)


def test_llava_onevision_processor():
    from test_llava_next import IMAGE, SIZE, VIDEO, tiny_onevision
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    from tiny import PAD

    model = tiny_onevision()
    tok = tokenizer({PAD: "<pad>", IMAGE: "<image>", VIDEO: "<video>", 9: "<|im_end|>"}, eos="<|im_end|>")
    image_proc = LlavaOnevisionImageProcessor(size={"height": SIZE, "width": SIZE},
                                              image_grid_pinpoints=model.config.image_grid_pinpoints)
    video_proc = LlavaOnevisionVideoProcessor(size={"height": SIZE, "width": SIZE})
    side = SIZE // model.config.vision_config.patch_size
    proc = LlavaOnevisionProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                   num_image_tokens=side * side, vision_feature_select_strategy="full",
                                   vision_aspect_ratio=model.config.vision_aspect_ratio)
    inputs = dict(proc(images=pictures(1, (60, 90)), text=["<image> describe the image"], return_tensors="pt"))
    check_pruned_run(model, inputs)
    video = dict(proc(videos=[np.stack(pictures(4, (SIZE, SIZE), seed=2))], text=["<video> describe the video"],
                      return_tensors="pt"))
    check_pruned_run(model, video)


def test_internvl_processor_tiles():
    from test_internvl import IMG_CTX, IMG_END, IMG_START, MERGED, PAD, tiny_internvl
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    model = tiny_internvl()
    tok = tokenizer({PAD: "<pad>", IMG_CTX: "<IMG_CONTEXT>", IMG_START: "<img>", IMG_END: "</img>",
                     9: "<|im_end|>", 10: "<video>", 11: "<image>"}, eos="<|im_end|>")
    tok.start_image_token, tok.end_image_token, tok.context_image_token = "<img>", "</img>", "<IMG_CONTEXT>"
    tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id = IMG_START, IMG_END, IMG_CTX
    tok.video_token = "<video>"
    image_proc = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                       max_patches=4)
    proc = InternVLProcessor(image_processor=image_proc, tokenizer=tok,
                             video_processor=InternVLVideoProcessor(size={"height": 32, "width": 32}),
                             image_seq_length=MERGED)
    inputs = dict(proc(images=pictures(1, (40, 80)), text=["<IMG_CONTEXT> describe the image"], return_tensors="pt"))
    assert inputs["pixel_values"].shape[0] > 1  # dynamic tiles + thumbnail
    check_pruned_run(model, inputs)
