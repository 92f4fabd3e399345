"""Real-checkpoint check: does each method, at its paper's default, keep a published model's answers?

For a machine with a GPU and hub access (nothing here is in CI except a CPU run on a saved random-init
checkpoint). For every checkpoint and every method that runs with its defaults (methods that need a
calibrated or trained artifact take it through ``--option``, or are listed as skipped with the reason):
greedy answers on a fixed set of images and prompts, the share identical to the unpruned model's
answers (whole answer and first token), visual tokens kept, and the measured speed-up of time to first
token and of the whole answer against the unpruned model (interleaved).

    python scripts/check_checkpoints.py --model llava-hf/llava-1.5-7b-hf --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --dtype bfloat16 --device cuda --output check.json
    python scripts/check_checkpoints.py --model results/random-builtin --images 4 --max-new-tokens 8   # CPU smoke

The images: the built-in benchmark's first test images (synthetic scenes of shapes) and generated
scenes with natural-image statistics (1/f colour noise under a soft illumination gradient), since no
photographs can ship with the project. Pass ``--image-dir`` to use your own instead.

Then a short lmms-eval run on a standard task: ``vlmprune-eval --model ID --task mmbench --limit 50``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vlmprune
from vlmprune import bench_model
from vlmprune.registry import available_methods, make_config

PROMPTS = ("Describe the image in detail.", "What is in the image? Answer in one sentence.",
           "How many objects are there?")


def natural_scene(seed: int, size: int = 448) -> np.ndarray:
    """1/f (pink) colour noise under an illumination gradient: the power spectrum of natural images."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    amp = 1.0 / np.maximum(np.sqrt(fx**2 + fy**2), 1.0 / size)
    img = np.empty((size, size, 3))
    for c in range(3):
        phase = rng.uniform(0, 2 * np.pi, (size, size))
        img[..., c] = np.real(np.fft.ifft2(amp * np.exp(1j * phase)))
    img = (img - img.mean()) / (img.std() + 1e-8)
    light = np.linspace(0.7, 1.3, size)[:, None, None] * rng.uniform(0.8, 1.2, 3)
    return np.clip(127 + 40 * img * light, 0, 255).astype(np.uint8)


def images(n: int, image_dir: str | None) -> list[Any]:
    from PIL import Image

    if image_dir:
        files = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if not files:
            raise SystemExit(f"no images in {image_dir}")
        return [Image.open(p).convert("RGB") for p in files[:n]]
    from vlmprune.evals.data import make_image

    half = n // 2
    out = [Image.fromarray(make_image("test", i).image) for i in range(half)]
    out += [Image.fromarray(natural_scene(i)) for i in range(n - half)]
    return out


def methods_to_check(names: list[str], options: dict[str, Any]) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """Methods whose config validates with their defaults (plus ``options`` they have), and why the
    others are skipped."""
    run, skipped = [], {}
    for name in names:
        if name == "none":
            continue
        from vlmprune.registry import lookup

        fields = set(lookup(name)[0].option_names())
        own = {k: v for k, v in options.items() if k in fields}
        try:
            make_config(name, own)
        except (TypeError, ValueError) as exc:
            skipped[name] = str(exc).splitlines()[0]
            continue
        run.append((name, own))
    return run, skipped


def _timed_generate(model: Any, inputs: dict, new_tokens: int) -> tuple[float, torch.Tensor]:
    device = inputs["input_ids"].device
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out[:, inputs["input_ids"].shape[1]:]


def check(model: Any, processor: Any, methods: list[tuple[str, dict]], pictures: list[Any], max_new_tokens: int) -> list[dict]:
    device = next(model.parameters()).device
    cases = []
    for i, img in enumerate(pictures):
        inputs = bench_model.build_inputs(processor, img, PROMPTS[i % len(PROMPTS)])
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if inputs.get("pixel_values") is not None and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        cases.append(inputs)
    rows = []
    with torch.inference_mode():
        _timed_generate(model, cases[0], 2)  # warm-up
        for name, opts in methods:
            same = first = 0
            kept, ratios_ttft, ratios_total = [], [], []
            for k, inputs in enumerate(cases):
                results = {}
                for patched in ((False, True) if k % 2 == 0 else (True, False)):
                    handle = vlmprune.apply(model, name, **opts) if patched else None
                    try:
                        ttft, _ = _timed_generate(model, inputs, 1)
                        total, tokens = _timed_generate(model, inputs, max_new_tokens)
                        if handle is not None and handle.stats.records:
                            kept.append(handle.stats.last.visual_out[0] / max(handle.stats.last.visual_in[0], 1))
                    finally:
                        if handle is not None:
                            handle.remove()
                    results[patched] = (ttft, total, tokens)
                base, pruned = results[False], results[True]
                same += int(torch.equal(base[2], pruned[2]))
                first += int(torch.equal(base[2][:, :1], pruned[2][:, :1]))
                ratios_ttft.append(base[0] / pruned[0])
                ratios_total.append(base[1] / pruned[1])
            rows.append({
                "method": name, "options": opts, "cases": len(cases),
                "identical_answers": same / len(cases), "identical_first_token": first / len(cases),
                "visual_kept": statistics.mean(kept) if kept else None,
                "ttft_speedup": statistics.median(ratios_ttft), "answer_speedup": statistics.median(ratios_total),
            })
            print(f"  {name:12s} identical {100 * same / len(cases):5.1f}%  first token {100 * first / len(cases):5.1f}%  "
                  f"kept {100 * rows[-1]['visual_kept'] if kept else float('nan'):5.1f}%  "
                  f"TTFT x{rows[-1]['ttft_speedup']:.2f}  answer x{rows[-1]['answer_speedup']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="checkpoint directory or hub id (repeatable)")
    parser.add_argument("--methods", default=",".join(available_methods()),
                        help="comma-separated (default: every registered method that runs with its defaults)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method option for every method that has it")
    parser.add_argument("--dtype", choices=list(bench_model.DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-dir")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    from vlmprune.cli import _option_value

    options = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option takes key=value, got {item!r}")
        options[key] = _option_value(value)
    methods, skipped = methods_to_check([m for m in args.methods.split(",") if m], options)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    pictures = images(args.images, args.image_dir)
    report = {}
    for spec in args.model:
        print(f"{spec}:", flush=True)
        try:
            model, processor = bench_model.load(spec, args.dtype, args.device)
        except bench_model.ModelBenchError as exc:
            print(f"  {exc}", file=sys.stderr)
            report[spec] = {"error": str(exc)}
            continue
        usable = []
        for name, opts in methods:
            try:
                vlmprune.apply(model, name, **opts).remove()
                usable.append((name, opts))
            except (TypeError, ValueError) as exc:
                print(f"  {name:12s} does not apply: {str(exc).splitlines()[0]}", flush=True)
        report[spec] = {"rows": check(model, processor, usable, pictures, args.max_new_tokens)}
        del model
    if args.output:
        Path(args.output).write_text(json.dumps({"skipped": skipped, "models": report}, indent=1))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
