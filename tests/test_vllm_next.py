"""The vLLM plugin on LLaVA-NeXT images (vlmprune.vllm.llava_next): placeholder counts and greedy answers
against the Hugging Face path (``vlmprune.apply``) on the same tiny random-init checkpoint saved
locally (a 3-layer CLIP tower with 56 px crops of 4 x 4 patches, pinpoints 1 x 2, 2 x 1, 2 x 2,
1 x 3 and 3 x 1 crops; a 2-layer Llama decoder; a word-level tokenizer and transformers' own
LLaVA-NeXT processor).

The pictures have several sizes and aspect ratios, so they get different crop grids and different
unpadding (rows or columns of the stitched grid removed, or none). The layout and count tests need
no engine; the engine tests need vLLM (its own virtual environment, docs/vllm.md) and skip when it
is not importable; one engine runs at a time in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0).
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

CROP, PATCH = 56, 14
IMAGE_TOKEN = 3
#: (h, w): several crop grids (1 x 3, 3 x 1, 1 x 2, 2 x 2) with columns or rows unpadded away, or
#: none (56 x 112 has its pinpoint's aspect ratio)
SIZES = [(70, 150), (150, 70), (56, 112), (100, 100), (40, 160), (56, 56)]
PROMPT = "<s> <image> what is in this image ?"
NEW_TOKENS = 4
KV_BYTES = 64 << 20
#: (method, options) served on LLaVA-NeXT: answers and counts must equal the HF path's
AGREEMENT = [("random", {"ratio": 0.5}), ("random", {"ratio": 0.9}), ("pool", {"ratio": 0.75}),
             ("divprune", {"ratio": 0.5}), ("fastervlm", {"ratio": 0.0})]
#: methods whose kept count on an unpadded image depends on its content: refused at start-up
DATA_DEPENDENT = [("fastervlm", {"ratio": 0.5}), ("fastervlm", {"ratio": 0.9}), ("visionzip", {"ratio": 0.5}),
                  ("vispruner", {"ratio": 0.5})]


def save_tiny_next(path: Path) -> None:
    """A random-init LLaVA-NeXT with transformers' processor, in the published weight layout (which
    stock vLLM loads too)."""
    from published import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, tokenizer
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from vlmprune.evals.builtin import published_layout

    tok = tokenizer({0: "<unk0>", 1: "<s>", 2: "</s>", IMAGE_TOKEN: "<image>", 4: "<pad>"}, pad="<pad>", eos="</s>",
                    bos="<s>")
    pinpoints = [[CROP, 2 * CROP], [2 * CROP, CROP], [2 * CROP, 2 * CROP], [CROP, 3 * CROP], [3 * CROP, CROP]]
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=CROP, patch_size=PATCH, projection_dim=64)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024, pad_token_id=4,
                       bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                          image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_seq_length=16, pad_token_id=4)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    image = LlavaNextImageProcessor(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP},
                                    image_grid_pinpoints=pinpoints, image_mean=OPENAI_CLIP_MEAN,
                                    image_std=OPENAI_CLIP_STD)
    LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1).save_pretrained(path)
    published_layout(path)


def pictures(sizes=SIZES, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:  # smooth blobs, so scores and diversity have structure to act on
        base = rng.integers(0, 256, (h // PATCH + 1, w // PATCH + 1, 3)).astype(np.uint8)
        out.append(np.kron(base, np.ones((PATCH, PATCH, 1), dtype=np.uint8))[:h, :w])
    return out


def settings(method: str, **options: object):
    from vlmprune.vllm.core import settings_from

    return settings_from({"vlmprune": {"method": method, **options}})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llava_next")
    save_tiny_next(path)
    return path


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model, AutoProcessor.from_pretrained(checkpoint)


def hf_run(model, processor, method, options, cases):
    """Greedy tokens and kept image tokens per prompt under vlmprune.apply (stock model: ``method=None``).
    ``cases``: (prompt, images) pairs, one generate call each."""
    handle = vlmprune.apply(model, method, **options) if method else None
    tokens, kept = [], []
    try:
        with torch.no_grad():
            for prompt, images in cases:
                inputs = processor(text=[prompt], images=images, return_tensors="pt")
                gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
                tokens.append(gen[0, inputs["input_ids"].shape[1]:].tolist())
                if handle is None:
                    kept.append(int((inputs["input_ids"] == IMAGE_TOKEN).sum()))
                else:
                    kept.append([r.visual_out for r in handle.stats.records if r.seq_len > 1][-1][0])
    finally:
        if handle is not None:
            handle.remove()
    return tokens, kept


@pytest.fixture(scope="module")
def engine(checkpoint):
    """``engine(additional_config)`` -> a vLLM LLM on the tiny checkpoint (one at a time, in this process)."""
    yield from one_at_a_time(str(checkpoint), dtype="float32", max_model_len=1024, enforce_eager=True,
                             kv_cache_memory_bytes=KV_BYTES, limit_mm_per_prompt={"image": 2})


def vllm_run(llm, cases):
    """Every prompt submitted at once (one encoder batch of images of several sizes)."""
    from PIL import Image
    from vllm import SamplingParams

    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": [Image.fromarray(im) for im in ims]}}
                         for p, ims in cases],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.prompt_token_ids.count(IMAGE_TOKEN) for o in outs]


# -- without an engine ----------------------------------------------------------------------------


def test_packed_layout_is_the_hf_packing(hf):
    """The plugin's layout (vLLM's packing on index rows) is transformers' own packing on index rows,
    for crop grids with and without unpadding; newline rows close each stitched row."""
    from vlmprune.vllm.llava_next import packed_layout

    model, _ = hf
    n = (CROP // PATCH) ** 2
    for h, w in SIZES:
        layout, crops = packed_layout(model.config, (h, w))
        index = torch.arange(crops * n, dtype=torch.float64).view(crops, n, 1)
        packed, _ = model.model.pack_image_features(
            [index], torch.tensor([[h, w]]), vision_feature_select_strategy="default",
            image_newline=torch.full((1,), -1.0, dtype=torch.float64))
        assert torch.equal(layout, packed[0].squeeze(-1).round().long()), (h, w)
    layout, crops = packed_layout(model.config, (70, 150))  # 1 x 3 crops: a 4 x 12 grid cut to 4 x 8
    assert crops == 4 and int((layout == -1).sum()) == CROP // PATCH and int((layout >= 0).sum()) == n + 4 * 8
    layout, crops = packed_layout(model.config, (56, 112))  # 1 x 2 crops, the pinpoint's own aspect ratio
    assert crops == 3 and int((layout >= 0).sum()) == 3 * n


@pytest.mark.parametrize("method, options", AGREEMENT)
def test_kept_count_is_what_the_hf_path_keeps(hf, method, options):
    from vlmprune.vllm.llava_next import check_next_config, made_up_count

    model, processor = hf
    method_obj = check_next_config(settings(method, **options), model.config)
    _, hf_kept = hf_run(model, processor, method, options, [(PROMPT, [im]) for im in pictures()])
    assert [made_up_count(method_obj, model.config, size) for size in SIZES] == hf_kept


@pytest.mark.parametrize("method, options", DATA_DEPENDENT)
def test_content_dependent_counts_are_refused(hf, method, options):
    """FasterVLM, VisionZip and VisPruner pick over the full crop grid and lose the picks the
    unpadding removes: the HF path keeps different counts for same-size images, which vLLM cannot
    reserve; the plugin refuses them (and the HF path does vary, so the refusal is not spurious)."""
    from vlmprune.vllm.core import PluginConfigError
    from vlmprune.vllm.llava_next import check_next_config

    model, processor = hf
    with pytest.raises(PluginConfigError, match="depends on what the image shows"):
        check_next_config(settings(method, **options), model.config)
    if method == "fastervlm" and options["ratio"] == 0.5:
        _, kept = hf_run(model, processor, method, options, [(PROMPT, [im]) for im in pictures([(150, 70)] * 4)])
        assert len(set(kept)) > 1


@pytest.mark.parametrize(
    "options, change, message",
    [
        ({"method": "random", "anyres": "spatial"}, {}, "anyres='spatial'.*not served in vLLM"),
        ({"method": "random", "positions": "original"}, {}, "numbered contiguously"),
        ({"method": "cdpruner"}, {}, "instruction"),
        ({"method": "random"}, {"vision_feature_select_strategy": "full"}, "'default' strategy"),
        ({"method": "random"}, {"vision_feature_layer": [-2, -1]}, "several vision feature layers"),
    ],
)
def test_layouts_that_cannot_equal_the_hf_path_are_refused(hf, options, change, message):
    from vlmprune.vllm.core import PluginConfigError, settings_from
    from vlmprune.vllm.llava_next import check_next_config

    if options["method"] not in vlmprune.available_methods():
        pytest.skip(f"{options['method']} is not in this tree")
    config = hf[0].config
    if change:
        config = type(config).from_dict({**config.to_dict(), **change})
    with pytest.raises(PluginConfigError, match=message):
        check_next_config(settings_from({"vlmprune": options}), config)


# -- inside vLLM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method, options", [(None, {})] + AGREEMENT)
def test_engine_answers_and_counts_equal_the_hf_path(engine, hf, method, options):
    """Six images of six sizes in one batch: vLLM + plugin gives each image the HF path's kept count of
    placeholders and the same greedy answers (unconfigured: the stock model's counts and answers)."""
    cases = [(PROMPT, [im]) for im in pictures()]
    ours, placeholders = vllm_run(engine({"vlmprune": {"method": method, **options}} if method else {}), cases)
    theirs, hf_kept = hf_run(*hf, method, options, cases)
    agree = sum(a == b for a, b in zip(ours, theirs))
    print(f"vllm llava_next agreement {method or 'none'} {options}: {agree}/{len(cases)} greedy answers, "
          f"placeholders {placeholders}")
    assert placeholders == hf_kept
    assert agree == len(cases)
    stock = [int((hf[1](text=[p], images=ims, return_tensors="pt")["input_ids"] == IMAGE_TOKEN).sum())
             for p, ims in cases]
    if method is None or options["ratio"] == 0:  # the stock packing: base view + unpadded grid + newlines
        assert placeholders == stock
    else:
        assert all(k < s for k, s in zip(placeholders, stock))


def test_two_images_per_prompt_in_one_batch(engine, hf):
    """Prompts with two images of different sizes next to single-image prompts, in one batch: each
    image its own crop grid and count, the same answers as the HF path (pool: deterministic, so the
    second image of a prompt decides as under vlmprune.apply)."""
    two = "<s> <image> what is <image> in this image ?"
    big, small = pictures([(100, 100), (70, 150), (150, 70), (40, 160)]), pictures([(56, 112), (56, 56)], seed=1)
    cases = [(two, [big[i], small[i % 2]]) for i in range(4)] + [(PROMPT, [im]) for im in small]
    options = {"ratio": 0.75}
    ours, placeholders = vllm_run(engine({"vlmprune": {"method": "pool", **options}}), cases)
    theirs, hf_kept = hf_run(*hf, "pool", options, cases)
    assert placeholders == hf_kept
    assert ours == theirs


def test_content_dependent_method_is_refused_at_engine_start_up(engine):
    with pytest.raises(ValueError, match="depends on what the image shows"):
        engine({"vlmprune": {"method": "fastervlm", "ratio": 0.9}})


def test_anyres_unpad_is_accepted_only_where_served():
    """``anyres="unpad"`` (the stock layout, spelled out) runs on LLaVA-NeXT; models without AnyRes
    crops refuse any ``anyres``; the method's own validation still applies."""
    from vlmprune.vllm.core import PluginConfigError, build_method

    with pytest.raises(PluginConfigError, match=r"ratio must be in \[0, 1\)"):
        build_method(settings("random", ratio=1.0), anyres=("unpad",))
    with pytest.raises(PluginConfigError, match="this model has none"):
        build_method(settings("random", ratio=0.5, anyres="unpad"))
    assert build_method(settings("random", ratio=0.5, anyres="unpad"), anyres=("unpad",)).config.anyres == "unpad"
