"""The vLLM plugin on Qwen2-VL / Qwen2.5-VL videos (vlmprune.vllm.qwen2_vl), against the Hugging Face
path (``vlmprune.apply``) on the same tiny random-init checkpoints as tests/test_vllm_qwen.py.

A video is one group per frame slot under ``vlmprune.apply`` (each of the grid_t slices of the merged
grid). The videos here have 5 frames of 84 x 140 pixels: the processor pads them to 6 (temporal patch
2), so grid_t = 3 slots of 3 x 5 = 15 merged tokens, non-square. The Qwen2.5-VL checkpoint gets
transformers' Qwen2.5-VL processor (it reports ``second_per_grid_ts``, 2 / fps) and
``tokens_per_second = 2``: at 2 fps the slots sit at temporal positions 0, 2, 4, at 1 fps at 0, 4, 8,
past max(h, w) = 5, where ``get_rope_index`` still continues the text (at the video start + 5).

Checked for each method: the placeholder count equals the HF path's kept count (grid_t times one
slot's), the (3, L) M-RoPE positions vLLM's decoder gets in the prefill equal the HF decoder's, and
the greedy answers are equal. Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), one at
a time, reused while the configuration stays the same.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from test_vllm_qwen import run_requests
from vllm_engines import one_at_a_time

import vlmprune

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (docs/vllm.md: its own environment)")

FRAMES, HEIGHT, WIDTH = 5, 84, 140  # 6 x 10 patches of 14, 3 x 5 merged tokens per slot
SLOTS, PER_SLOT = 3, 15
VIDEOS = 3
KV_BYTES = 64 << 20
VIDEO_PROMPT = "<|vision_start|><|video_pad|><|vision_end|> what is in the video ?"
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|> what is in the image ?"
VIDEO_TOKEN, IMAGE_TOKEN = 6, 5
NEW_TOKENS = 4
#: (method, options) whose placeholder counts, prefill positions and greedy answers must equal the HF path's
METHODS = [("fastervlm", {"ratio": 0.5}), ("fastervlm", {"ratio": 0.9}), ("random", {"ratio": 0.75}),
           ("pool", {"ratio": 0.75}), ("divprune", {"ratio": 0.5}), ("visionzip", {"ratio": 0.5}),
           ("vispruner", {"ratio": 0.5})]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tmp_path_factory) -> Path:
    from test_vllm_qwen import save_tiny_qwen

    path = tmp_path_factory.mktemp(request.param + "_video")
    save_tiny_qwen(path, request.param)
    if request.param == "qwen2_5_vl":  # its own processor: second_per_grid_ts = temporal_patch / fps
        from transformers import AutoProcessor, Qwen2_5_VLProcessor

        p = AutoProcessor.from_pretrained(path)
        Qwen2_5_VLProcessor(image_processor=p.image_processor, tokenizer=p.tokenizer,
                            video_processor=p.video_processor).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model, AutoProcessor.from_pretrained(checkpoint)


def videos(n: int = VIDEOS, frames: int = FRAMES, seed: int = 0) -> list[np.ndarray]:
    """Smooth blobs that move a little from frame to frame (scores and diversity have structure)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (HEIGHT // 14 + 2, WIDTH // 14 + 2, 3)).astype(np.uint8)
        big = np.kron(base, np.ones((14, 14, 1), dtype=np.uint8))
        out.append(np.stack([big[f : f + HEIGHT, 2 * f : 2 * f + WIDTH] for f in range(frames)]))
    return out


def metadata(frames: int, fps: float) -> dict:
    return {"fps": fps, "duration": frames / fps, "total_num_frames": frames, "frames_indices": list(range(frames)),
            "video_backend": "opencv", "do_sample_frames": False}


def image() -> np.ndarray:
    rng = np.random.default_rng(5)
    return np.kron(rng.integers(0, 256, (5, 7, 3)).astype(np.uint8), np.ones((28, 28, 1), dtype=np.uint8))


def hf_inputs(processor, prompt: str, video: np.ndarray | None = None, fps: float = 2.0, picture=None):
    from transformers.video_utils import VideoMetadata

    if video is None:
        return processor(text=[prompt], images=[picture], return_tensors="pt")
    md = {k: v for k, v in metadata(len(video), fps).items() if k != "do_sample_frames"}
    return processor(text=[prompt], videos=[video], video_metadata=[VideoMetadata(**md)], do_sample_frames=False,
                     return_tensors="pt")


def hf_run(model, processor, method, options, items, fps: float = 2.0):
    """Greedy tokens, the prefill's decoder positions (3, L) and kept counts under vlmprune.apply."""
    seen: list = []

    def on_decoder(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is not None and pos.shape[-1] > 1:
            seen.append(pos[-3:, 0].clone())  # generate's (4, B, L): the text row first

    handle = vlmprune.apply(model, method, **options) if method else None
    hook = model.model.language_model.register_forward_pre_hook(on_decoder, with_kwargs=True)
    tokens, positions, kept = [], [], []
    try:
        with torch.no_grad():
            for video in items:
                inputs = hf_inputs(processor, VIDEO_PROMPT, video, fps)
                length = inputs["input_ids"].shape[1]
                gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
                tokens.append(gen[0, length:].tolist())
                positions.append(seen[-1])
                if handle is not None:
                    kept.append([r.visual_out for r in handle.stats.records if r.seq_len > 1][-1][0])
    finally:
        hook.remove()
        if handle is not None:
            handle.remove()
    return tokens, positions, kept


@pytest.fixture(scope="module")
def engine(checkpoint):
    """``engine(additional_config, **engine_args)`` -> a vLLM LLM on the checkpoint (one at a time in this
    process; the same configuration reuses the running engine)."""
    yield from one_at_a_time(str(checkpoint), reuse=True, dtype="float32", max_model_len=512, enforce_eager=True,
                             kv_cache_memory_bytes=KV_BYTES, limit_mm_per_prompt={"image": 1, "video": 1})


def vllm_run(llm, items, fps: float = 2.0):
    """One request per video (see ``run_requests``)."""
    return run_requests(llm, [{"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": (v, metadata(len(v), fps))}}
                              for v in items])


def expected_kept(method: str, options: dict) -> int:
    from vlmprune.vllm.core import build_method, kept_count, settings_from

    settings = settings_from({"vlmprune": {"method": method, **options}})
    return SLOTS * kept_count(build_method(settings, "nocls", positions="original"), (3, 5), 0, 64, cls_row=False)


def same(a, b) -> bool:
    return a is not None and torch.equal(a.cpu(), b.cpu())


def test_vllm_video_pruning_is_refused_with_the_plugin(engine):
    """vLLM's own video pruning (EVS) on top of the plugin's method: a start-up error."""
    with pytest.raises(ValueError, match="video_pruning_rate"):
        engine({"vlmprune": {"method": "fastervlm", "ratio": 0.5}}, video_pruning_rate=0.5)


def test_plain_engine_serves_videos_unchanged(engine, hf):
    """No "vlmprune" entry: no method, vLLM's own multimodal config (no pruning), every video token, the HF
    model's answers and positions. (vLLM registers model_class_overrides for the whole process, so after
    a configured engine the class may be the plugin's subclass, which then acts as vLLM's own.)"""
    from vllm.config.multimodal import MultiModalConfig

    items = videos()
    llm = engine({})
    mm = llm.llm_engine.model_config.multimodal_config
    assert type(mm) is MultiModalConfig and not mm.is_multimodal_pruning_enabled()
    assert llm.apply_model(lambda m: getattr(m, "_vlmprune", None)) == [None]
    ours, prompts, positions = vllm_run(llm, items)
    theirs, hf_positions, _ = hf_run(*hf, None, {}, items)
    assert [p.count(VIDEO_TOKEN) for p in prompts] == [SLOTS * PER_SLOT] * len(items)
    assert all(same(a, b) for a, b in zip(positions, hf_positions))
    assert ours == theirs


def test_time_positions_past_the_grid(engine, hf):
    """1 fps: Qwen2.5-VL's slots sit at temporal positions 0, 4, 8, past max(h, w) = 5, where
    get_rope_index continues the text anyway; the pruned prefill's positions still equal HF's."""
    model, _ = hf
    items = videos(2, seed=3)
    ours, prompts, positions = vllm_run(engine({"vlmprune": {"method": "fastervlm", "ratio": 0.5}}), items, fps=1.0)
    theirs, hf_positions, hf_kept = hf_run(*hf, "fastervlm", {"ratio": 0.5}, items, fps=1.0)
    start = prompts[0].index(VIDEO_TOKEN)
    times = sorted(set(hf_positions[0][0, start: start + hf_kept[0]].tolist()))
    step = 4 if model.config.model_type == "qwen2_5_vl" else 1
    assert [t - times[0] for t in times] == [0, step, 2 * step]
    assert [p.count(VIDEO_TOKEN) for p in prompts] == hf_kept
    assert all(same(a, b) for a, b in zip(positions, hf_positions))
    assert ours == theirs


def test_video_and_image_prompts_in_one_batch(engine, hf):
    """Video prompts (5 and 3 frames: 3 and 2 slots) and an image prompt submitted together: each item its
    own kept count, the same greedy answers as the HF path."""
    from PIL import Image
    from vllm import SamplingParams

    model, processor = hf
    five, three = videos(1, seed=7)[0], videos(1, frames=3, seed=8)[0]
    picture = image()
    cases = [("video", five), ("image", picture), ("video", three)]
    llm = engine({"vlmprune": {"method": "fastervlm", "ratio": 0.5}})
    requests = [{"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": (x, metadata(len(x), 2.0))}} if kind == "video"
                else {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": Image.fromarray(x)}} for kind, x in cases]
    outs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    theirs = []
    with torch.no_grad(), vlmprune.apply(model, "fastervlm", ratio=0.5):
        for kind, x in cases:
            inputs = hf_inputs(processor, VIDEO_PROMPT, x) if kind == "video" else \
                hf_inputs(processor, IMAGE_PROMPT, picture=x)
            gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            theirs.append(gen[0, inputs["input_ids"].shape[1]:].tolist())
    per_slot = expected_kept("fastervlm", {"ratio": 0.5}) // SLOTS
    assert [o.prompt_token_ids.count(VIDEO_TOKEN) for o in outs] == [3 * per_slot, 0, 2 * per_slot]
    assert outs[1].prompt_token_ids.count(IMAGE_TOKEN) == 18  # 5 x 7 merged tokens at 0.5
    assert [list(o.outputs[0].token_ids) for o in outs] == theirs


@pytest.mark.parametrize("method, options", METHODS)
def test_pruned_video_answers_positions_and_counts_equal_the_hf_path(engine, hf, method, options):
    model, _ = hf
    if method not in vlmprune.available_methods():
        pytest.skip(f"{method} is not in this tree")
    items = videos()
    ours, prompts, positions = vllm_run(engine({"vlmprune": {"method": method, **options}}), items)
    theirs, hf_positions, hf_kept = hf_run(*hf, method, options, items)
    expected = expected_kept(method, options)
    agree = sum(a == b for a, b in zip(ours, theirs))
    same_pos = sum(same(a, b) for a, b in zip(positions, hf_positions))
    print(f"vllm {model.config.model_type} video agreement {method} {options}: {agree}/{len(items)} greedy answers, "
          f"{same_pos}/{len(items)} prefill positions, {expected} of {SLOTS * PER_SLOT} tokens kept")
    assert [p.count(VIDEO_TOKEN) for p in prompts] == hf_kept == [expected] * len(items)
    assert expected < SLOTS * PER_SLOT
    assert same_pos == len(items)
    assert agree == len(items)
