"""The vLLM plugin on Qwen2-VL and Qwen2.5-VL (vlmprune.vllm.qwen2_vl): pruned placeholder counts, kept M-RoPE grid
positions and greedy answers, each against the Hugging Face path (``vlmprune.apply``) on the same
tiny random-init checkpoint saved locally (a 2-block ViT, patch 14, merge 2; a 2-layer Qwen2
decoder with M-RoPE; a word-level tokenizer and transformers' own Qwen2-VL processor).

The pictures are 140 x 196: a 10 x 14 patch grid, 5 x 7 = 35 merged tokens, non-square so the text
after the image continues from max(h, w) of the full grid. The engine tests need vLLM (its own
virtual environment, docs/vllm.md) and skip when it is not importable; one engine per method runs in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), shared by the tests through a module fixture.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from vllm_engines import one_at_a_time

import vlmprune

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (docs/vllm.md: its own environment)")

SIZE = (140, 196)  # (h, w): 10 x 14 patches of 14, 5 x 7 merged tokens
MERGED = 35
IMAGES = 6
KV_BYTES = 64 << 20
PROMPT = "<|vision_start|><|image_pad|><|vision_end|> what is in the image ?"
NEW_TOKENS = 4
#: (method, options) whose greedy answers and positions must equal the HF path's
AGREEMENT = [("fastervlm", {"ratio": 0.5}), ("fastervlm", {"ratio": 0.9}), ("random", {"ratio": 0.75}),
             ("pool", {"ratio": 0.75}), ("divprune", {"ratio": 0.5}), ("visionzip", {"ratio": 0.5}),
             ("vispruner", {"ratio": 0.5})]


def save_tiny_qwen(path: Path, family: str = "qwen2_vl") -> None:
    """A random-init Qwen2-VL (or Qwen2.5-VL: window attention in ViT block 0, windows of 2 x 2 merged
    tokens, full attention in the last block) with a local word-level tokenizer and transformers'
    Qwen2-VL processor, saved as vLLM loads it."""
    from published import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, tokenizer
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 3: "<|vision_start|>", 4: "<|vision_end|>",
                5: "<|image_pad|>", 6: "<|video_pad|>"}
    tok = tokenizer(specials, pad="<|endoftext|>", eos="<|im_end|>")
    common = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  initializer_range=0.2)
    if family == "qwen2_vl":
        vision = dict(embed_dim=64, hidden_size=64, mlp_ratio=2, **common)
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision = dict(hidden_size=64, out_hidden_size=64, intermediate_size=128, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2, **common)
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                pad_token_id=0, eos_token_id=2)
    cfg = config_cls(vision_config=vision, text_config=text, image_token_id=5, video_token_id=6,
                        vision_start_token_id=3, vision_end_token_id=4)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    geometry = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
                    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**geometry), tokenizer=tok,
                     video_processor=Qwen2VLVideoProcessor(**geometry)).save_pretrained(path)


def pictures(n: int = IMAGES) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):  # smooth blobs, so scores and diversity have structure to act on
        base = rng.integers(0, 256, (SIZE[0] // 14 + 1, SIZE[1] // 14 + 1, 3)).astype(np.uint8)
        out.append(np.kron(base, np.ones((14, 14, 1), dtype=np.uint8))[: SIZE[0], : SIZE[1]])
    return out


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    save_tiny_qwen(path, request.param)
    return path


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model, AutoProcessor.from_pretrained(checkpoint)


def hf_run(model, processor, method, options, images):
    """Greedy tokens, the prefill's decoder positions (3, L) and kept counts under vlmprune.apply."""
    seen: list = []

    def on_decoder(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is not None and pos.shape[-1] > 1:
            seen.append(pos[-3:, 0].clone())  # generate's (4, B, L): the text row first

    handle = vlmprune.apply(model, method, **options) if method else None
    # after the method's own hooks: the positions the decoder really gets
    hook = model.model.language_model.register_forward_pre_hook(on_decoder, with_kwargs=True)
    tokens, positions, kept = [], [], []
    try:
        with torch.no_grad():
            for im in images:
                inputs = processor(text=[PROMPT], images=[im], return_tensors="pt")
                length = inputs["input_ids"].shape[1]
                gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
                tokens.append(gen[0, length:].tolist())
                positions.append(seen[-1])
                if handle is not None:
                    kept.append(handle.stats.last.visual_out[0] if handle.stats.last.seq_len > 1 else
                                [r.visual_out for r in handle.stats.records if r.seq_len > 1][-1][0])
    finally:
        hook.remove()
        if handle is not None:
            handle.remove()
    return tokens, positions, kept


@pytest.fixture(scope="module")
def engine(checkpoint):
    """``engine(additional_config)`` -> a vLLM LLM on the tiny checkpoint (one at a time, in this process)."""
    yield from one_at_a_time(str(checkpoint), dtype="float32", max_model_len=512, enforce_eager=True,
                             kv_cache_memory_bytes=KV_BYTES, limit_mm_per_prompt={"image": 2, "video": 1})


_VLLM_POSITIONS: list = []


def _hook_positions(model) -> None:
    """Record the decoder's M-RoPE positions of each prefill (runs inside the engine, in this process)."""
    def on_decoder(module, args, kwargs):
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if pos is not None and pos.dim() == 2 and pos.shape[-1] > 1:
            _VLLM_POSITIONS.append(pos.clone())

    if not getattr(model, "_test_positions_hooked", False):  # an engine may serve several runs
        model.register_forward_pre_hook(on_decoder, with_kwargs=True)
        model._test_positions_hooked = True


def run_requests(llm, requests: list[dict]):
    """Greedy tokens, prompt ids and prefill M-RoPE positions of each request, sent one at a time so
    that each prefill's positions are read for its own request."""
    from vllm import SamplingParams

    _VLLM_POSITIONS.clear()
    llm.apply_model(_hook_positions)
    tokens, prompts, positions = [], [], []
    for request in requests:
        n = len(_VLLM_POSITIONS)
        out = llm.generate([request], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                           use_tqdm=False)[0]
        tokens.append(list(out.outputs[0].token_ids))
        prompts.append(list(out.prompt_token_ids))
        positions.append(_VLLM_POSITIONS[n][:, : len(out.prompt_token_ids)] if len(_VLLM_POSITIONS) > n else None)
    return tokens, prompts, positions


def vllm_run(llm, images):
    from PIL import Image

    return run_requests(llm, [{"prompt": PROMPT, "multi_modal_data": {"image": Image.fromarray(im)}} for im in images])


def test_unpruned_engine_answers_as_the_hf_model(engine, hf):
    images = pictures()
    ours, prompts, positions = vllm_run(engine({}), images)
    theirs, hf_positions, _ = hf_run(*hf, None, {}, images)
    assert ours == theirs
    assert {p.count(5) for p in prompts} == {MERGED}
    for a, b in zip(positions, hf_positions):
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("method, options", AGREEMENT)
def test_pruned_engine_answers_and_positions_equal_the_hf_path(engine, hf, method, options):
    from vlmprune.vllm.core import build_method, kept_count, settings_from

    if method not in vlmprune.available_methods():
        pytest.skip(f"{method} is not in this tree")
    images = pictures()
    ours, prompts, positions = vllm_run(engine({"vlmprune": {"method": method, **options}}), images)
    theirs, hf_positions, hf_kept = hf_run(*hf, method, options, images)
    placeholders = [p.count(5) for p in prompts]
    settings = settings_from({"vlmprune": {"method": method, **options}})
    expected = kept_count(build_method(settings, "nocls", positions="original"), (5, 7), 0, 64, cls_row=False)
    agree = sum(a == b for a, b in zip(ours, theirs))
    same_pos = sum(torch.equal(a.cpu(), b.cpu()) for a, b in zip(positions, hf_positions))
    print(f"vllm {hf[0].config.model_type} agreement {method} {options}: {agree}/{len(images)} greedy answers, "
          f"{same_pos}/{len(images)} prefill positions, {expected} of {MERGED} tokens kept")
    assert placeholders == hf_kept == [expected] * len(images)
    assert same_pos == len(images)
    assert agree == len(images)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"vlmprune": {"method": "fastervlm", "ratio": 1.5}}, r"ratio must be in \[0, 1\)"),
        ({"vlmprune": {"method": "fastervlm", "ratio": 0.5, "positions": "contiguous"}}, "original M-RoPE"),
        ({"vlmprune": {"method": "fastv", "ratio": 0.5}}, "cannot run in vLLM"),
    ],
)
def test_start_up_errors(engine, extra, message):
    with pytest.raises(ValueError, match=message):
        engine(extra)


def test_two_images_per_prompt_in_one_batch(engine, hf):
    """Prompts with two images of different sizes (5 x 7 and 4 x 4 merged grids) and single-image
    prompts, submitted together (one encoder batch, several media per request in vLLM's position
    recomputation): the same greedy answers as the HF path, each image with its own kept count."""
    from PIL import Image
    from vllm import SamplingParams

    model, processor = hf
    rng = np.random.default_rng(1)
    small = [np.kron(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8), np.ones((28, 28, 1), dtype=np.uint8))
             for _ in range(2)]
    two = "<|vision_start|><|image_pad|><|vision_end|> what is <|vision_start|><|image_pad|><|vision_end|> the image ?"
    cases = [(two, [big, small[i % 2]]) for i, big in enumerate(pictures(4))] + [(PROMPT, [im]) for im in small]
    llm = engine({"vlmprune": {"method": "fastervlm", "ratio": 0.5}})
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": [Image.fromarray(im) for im in ims]}}
                         for p, ims in cases],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    theirs = []
    with torch.no_grad(), vlmprune.apply(model, "fastervlm", ratio=0.5):
        for p, ims in cases:
            inputs = processor(text=[p], images=ims, return_tensors="pt")
            gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            theirs.append(gen[0, inputs["input_ids"].shape[1]:].tolist())
    assert [o.prompt_token_ids.count(5) for o in outs] == [18 + 8] * 4 + [8] * 2
    assert [list(o.outputs[0].token_ids) for o in outs] == theirs
