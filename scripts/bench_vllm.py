"""Serving benchmark of the vLLM plugin: throughput and time to first token, pruned against unpruned.

A random-init model of LLaVA-1.5 geometry (CLIP ViT-L/14 at 336 px: 576 visual tokens per image,
a 4096-wide Llama decoder with a 32064-token vocabulary) is saved locally in the layout vLLM
loads; ``--vision-layers`` / ``--lm-layers`` reduce the depths (the full model is 24 / 32) so the
benchmark fits a small CPU. For each ratio an engine is started (ratio 0: stock vLLM, no plugin
configuration; otherwise ``additional_config={"vlmprune": {"method": METHOD, "ratio": R}}``), and
at each concurrency ``--requests`` requests (at least the concurrency) are sent through vLLM's
AsyncLLM (the engine ``vllm serve`` runs), each one image of random pixels and a short prompt,
``--max-tokens`` tokens generated with EOS ignored. Reported: requests/s, output tokens/s, mean and
median time to first token, and the FLOPs-predicted speed-ups of prefill (vision + projector + LLM
prefill, what TTFT pays) and of the whole request (vlmprune.flops).

    python scripts/bench_vllm.py --lm-layers 2 --vision-layers 2 --output results/bench-vllm.json

Run it with the vLLM environment's python (docs/vllm.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def build_checkpoint(path: Path, vision_layers: int, lm_layers: int, seed: int = 0) -> Path:
    """A random-init LLaVA-1.5-geometry checkpoint with the built-in word tokenizer."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vlmprune.evals import builtin

    marker = path / "bench.json"
    want = {"vision_layers": vision_layers, "lm_layers": lm_layers, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return path
    tok = builtin.build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu",
                              projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=576, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                         image_mean=list(builtin.CLIP_MEAN), image_std=list(builtin.CLIP_STD))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    builtin.save_builtin(model, processor, path)
    marker.write_text(json.dumps(want))
    return path


def predicted(config: Any, visual_tokens: int, text_tokens: int, new_tokens: int) -> dict[str, float]:
    """FLOPs of one request (vlmprune.flops): prefill side (vision + projector + LLM prefill) and total."""
    import torch

    from vlmprune.flops import estimate

    pixels = torch.zeros(1, 3, 336, 336)
    rep = estimate(config, {"pixel_values": pixels}, visual_tokens + text_tokens, generated_tokens=new_tokens)
    prefill = rep.vision + rep.projector + rep.llm_prefill
    return {"prefill": prefill, "total": prefill + rep.decode}


async def run_level(engine: Any, prompt: str, images: list[Any], concurrency: int, max_tokens: int,
                    tag: str) -> dict[str, float]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with gate:
            start = time.perf_counter()
            first = None
            last = None
            async for out in engine.generate({"prompt": prompt, "multi_modal_data": {"image": images[i]}}, params,
                                             f"{tag}-{i}"):
                if first is None and out.outputs and out.outputs[0].token_ids:
                    first = time.perf_counter() - start
                last = out
            ttfts.append(first if first is not None else float("nan"))
            tokens += len(last.outputs[0].token_ids) if last is not None else 0

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(images))))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(images), "wall_s": wall,
            "requests_per_s": len(images) / wall, "output_tokens_per_s": tokens / wall,
            "ttft_mean_s": statistics.fmean(ttfts), "ttft_median_s": statistics.median(ttfts)}


async def bench_ratio(model_dir: Path, method: str, ratio: float, args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    extra = {"vlmprune": {"method": method, "ratio": ratio}} if ratio > 0 else {}
    engine_args = AsyncEngineArgs(model=str(model_dir), dtype=args.dtype, max_model_len=1024, enforce_eager=True,
                                  kv_cache_memory_bytes=args.kv_cache_mib << 20, additional_config=extra,
                                  limit_mm_per_prompt={"image": 1}, max_num_seqs=max(args.concurrency))
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(engine_args)
    load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = "<image> describe the image ?"
    try:
        warm = [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(2)]
        await run_level(engine, prompt, warm, 2, args.max_tokens, f"warm-{ratio}")
        levels = []
        for c in args.concurrency:
            n = max(c, args.requests)
            images = [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(n)]
            level = await run_level(engine, prompt, images, c, args.max_tokens, f"r{ratio}-c{c}")
            print(f"ratio {ratio:<5} concurrency {c:<3} {level['requests_per_s']:.3f} req/s "
                  f"{level['output_tokens_per_s']:.2f} tok/s TTFT mean {level['ttft_mean_s']:.3f} s", flush=True)
            levels.append(level)
    finally:
        engine.shutdown()
    return {"ratio": ratio, "method": method if ratio > 0 else "none", "load_s": load, "levels": levels}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="fastervlm")
    ap.add_argument("--ratios", default="0,0.75,0.9")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level (at least the level)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--vision-layers", type=int, default=24)
    ap.add_argument("--lm-layers", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-mib", type=int, default=2048)
    ap.add_argument("--model-dir", default="results/bench-vllm-model")
    ap.add_argument("--output", default="results/bench-vllm.json")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]

    from transformers import AutoConfig

    from vlmprune.vllm.core import build_method, kept_count, settings_from

    model_dir = build_checkpoint(Path(args.model_dir), args.vision_layers, args.lm_layers)
    config = AutoConfig.from_pretrained(model_dir)
    text_tokens = 1 + len("describe the image ?".split())
    runs = []
    for ratio in ratios:
        kept = 576 if ratio == 0 else kept_count(
            build_method(settings_from({"vlmprune": {"method": args.method, "ratio": ratio}})), (24, 24))
        run = asyncio.run(bench_ratio(model_dir, args.method, ratio, args))
        run["visual_tokens"] = kept
        run["flops"] = predicted(config, kept, text_tokens, args.max_tokens)
        runs.append(run)
    base = runs[0]
    for run in runs:
        run["predicted_prefill_speedup"] = base["flops"]["prefill"] / run["flops"]["prefill"]
        run["predicted_request_speedup"] = base["flops"]["total"] / run["flops"]["total"]
        for level, ref in zip(run["levels"], base["levels"]):
            level["throughput_speedup"] = level["requests_per_s"] / ref["requests_per_s"]
            level["ttft_speedup"] = ref["ttft_mean_s"] / level["ttft_mean_s"]
    out = {"geometry": {"vision_layers": args.vision_layers, "lm_layers": args.lm_layers, "image": 336,
                        "visual_tokens": 576, "lm_hidden": 4096, "dtype": args.dtype},
           "max_tokens": args.max_tokens, "runs": runs}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'ratio':>5} {'tokens':>6} {'conc':>4} {'req/s':>8} {'tok/s':>8} {'TTFT s':>8} "
          f"{'thr x':>6} {'TTFT x':>6} {'pred prefill x':>14} {'pred req x':>10}")
    for run in runs:
        for level in run["levels"]:
            print(f"{run['ratio']:>5} {run['visual_tokens']:>6} {level['concurrency']:>4} {level['requests_per_s']:>8.3f} "
                  f"{level['output_tokens_per_s']:>8.2f} {level['ttft_mean_s']:>8.3f} {level['throughput_speedup']:>6.2f} "
                  f"{level['ttft_speedup']:>6.2f} {run['predicted_prefill_speedup']:>14.2f} "
                  f"{run['predicted_request_speedup']:>10.2f}")


if __name__ == "__main__":
    main()
