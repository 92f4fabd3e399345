"""``vlmprune bench --model``: time a user's own checkpoint, pruned against unpruned.

The fixed-size benchmark (:mod:`vlmprune.bench`) answers "does the FLOPs cut show up as time" on a
random model; users need the same answer for *their* checkpoint, processor, dtype and device. This
loads any local Hugging Face VLM directory (or a hub id where the hub is reachable) with its own
processor and chat template, builds one image prompt, and measures for every method and setting,
against the unpatched model in interleaved pairs (alternating which runs first):

* time to first token (``generate`` with one new token: vision tower, prefill, first token);
* prefill throughput (prompt tokens over that time) and decode throughput (the tokens after the
  first over the rest of a ``max_new_tokens`` generation, which is forced to its full length);
* peak memory growth of one generation (the CUDA allocator's peak, or peak RSS on a Linux CPU);
* the FLOPs-predicted prefill speed-up from the method's own record (:mod:`vlmprune.flops`).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import flops
from .api import apply
from .bench import peak_rss_reset, rss_kb
from .files import looks_like_hub_id
from .registry import lookup

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PROMPT = "Describe the image in detail."


class ModelBenchError(ValueError):
    """The checkpoint, image or options cannot be benchmarked (a one-line reason)."""


@dataclass
class ModelBenchRow:
    method: str
    setting: str
    visual_tokens: int
    llm_tokens: int
    ttft_ms: float  # median, patched
    base_ttft_ms: float
    prefill_tok_s: float  # prompt tokens / time to first token, patched
    base_prefill_tok_s: float
    decode_tok_s: float  # tokens after the first / the rest of the generation, patched
    base_decode_tok_s: float
    peak_mem_mb: float | None
    base_peak_mem_mb: float | None
    predicted_speedup: float  # prefill FLOPs (unpatched / patched)
    measured_speedup: float  # median over pairs of TTFT(unpatched) / TTFT(patched)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load(spec: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """A checkpoint and its processor: a local directory, or a hub id (downloads where allowed)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise ModelBenchError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    local = Path(spec).expanduser()
    if not local.is_dir() and not looks_like_hub_id(spec):
        raise ModelBenchError(f"--model {spec!r}: no such directory")
    source = str(local) if local.is_dir() else spec
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=DTYPES[dtype], local_files_only=local.is_dir()
        ).to(device).eval()
        processor = AutoProcessor.from_pretrained(source, local_files_only=local.is_dir())
    except Exception as exc:  # noqa: BLE001 - one line for the command line, whatever went wrong
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = "a local checkpoint directory" if local.is_dir() else "a hub id (is the hub reachable?)"
        raise ModelBenchError(f"cannot load {spec!r} as {where}: {first}") from None
    return model, processor


def default_image(size: tuple[int, int] = (640, 480)) -> Any:
    """A deterministic scene (gradient sky, ground, a few shapes), so the bench needs no file."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / max(h - 1, 1)
        draw.line([(0, y), (w, y)], fill=(int(90 + 100 * t), int(150 + 60 * t), int(230 - 80 * t)))
    draw.rectangle([0, int(0.7 * h), w, h], fill=(70, 130, 60))
    draw.ellipse([int(0.1 * w), int(0.1 * h), int(0.25 * w), int(0.3 * h)], fill=(250, 220, 60))
    draw.rectangle([int(0.45 * w), int(0.4 * h), int(0.7 * w), int(0.75 * h)], fill=(180, 40, 40))
    draw.polygon([(int(0.42 * w), int(0.4 * h)), (int(0.575 * w), int(0.22 * h)), (int(0.73 * w), int(0.4 * h))],
                 fill=(90, 50, 30))
    return img


def build_inputs(processor: Any, image: Any, prompt: str) -> dict[str, torch.Tensor]:
    """One chat-formatted prompt with one image, as the processor and its chat template make it."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = f"{getattr(processor, 'image_token', '<image>')} {prompt}"
    return dict(processor(images=[image], text=[text], return_tensors="pt"))


def settings(methods: list[str], ratios: list[float], options: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(method, options) per row: one row per ratio for methods with a ``ratio`` option, one row
    otherwise; ``options`` go to every method that has them."""
    rows = []
    for name in methods:
        cls = lookup(name)[0]
        fields = {f.name for f in dataclasses.fields(cls)}
        own = {k: v for k, v in options.items() if k in fields}
        if "ratio" in fields:
            rows.extend((name, {**own, "ratio": r}) for r in ratios)
        else:
            rows.append((name, own))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _generate(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> float:
    device = inputs["input_ids"].device
    _sync(device)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(device)
    return time.perf_counter() - start


def _peak_mb(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> float | None:
    gc.collect()
    device = inputs["input_ids"].device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _generate(model, inputs, new_tokens)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not peak_rss_reset():
        return None
    base = rss_kb("VmRSS")
    _generate(model, inputs, new_tokens)
    return (rss_kb("VmHWM") - base) / 1024


def _prefill_flops(model: Any, inputs: dict[str, Any], record: Any | None) -> float:
    if record is None:
        return flops.estimate(model, inputs, int(inputs["input_ids"].shape[1]), generated_tokens=1).total
    tokens = record.layer_tokens[0] if record.layer_tokens else record.llm_tokens[0]
    report = flops.estimate(model, inputs, tokens, generated_tokens=1, overhead=record.overhead_flops)
    if record.vision_flops is not None:
        return report.total - report.vision - report.projector + record.vision_flops + (record.projector_flops or 0.0)
    return report.total


def run(
    model: Any,
    processor: Any,
    methods: list[str],
    ratios: list[float],
    *,
    options: dict[str, Any] | None = None,
    image: Any = None,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    progress: bool = True,
) -> list[ModelBenchRow]:
    """Measure every (method, setting) against the unpatched model, interleaved, on one prompt."""
    if max_new_tokens < 2:
        raise ModelBenchError("--max-new-tokens must be at least 2 (decode throughput needs a token after the first)")
    device = next(model.parameters()).device
    inputs = build_inputs(processor, image if image is not None else default_image(), prompt)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    cells = settings(methods, ratios, options or {})
    base_flops = _prefill_flops(model, inputs, None)
    rows = []
    with torch.inference_mode():
        for _ in range(warmup):
            _generate(model, inputs, 2)
        base_mem = _peak_mb(model, inputs, max_new_tokens)
        bar = tqdm(total=len(cells) * repeats, desc="generation pairs", disable=not progress)
        for name, opts in cells:
            handle = apply(model, name, **opts)
            try:
                for _ in range(warmup):
                    _generate(model, inputs, 2)
                handle.stats.reset()
                _generate(model, inputs, 1)
                record = handle.stats.last if handle.stats.records else None
                mem = _peak_mb(model, inputs, max_new_tokens)
            finally:
                handle.remove()
            times: dict[bool, dict[str, list[float]]] = {p: {"ttft": [], "full": []} for p in (False, True)}
            pair = []
            for i in range(repeats):
                order = (False, True) if i % 2 == 0 else (True, False)
                got: dict[bool, float] = {}
                for patched in order:
                    h = apply(model, name, **opts) if patched else None
                    try:
                        got[patched] = _generate(model, inputs, 1)
                        times[patched]["full"].append(_generate(model, inputs, max_new_tokens))
                    finally:
                        if h is not None:
                            h.remove()
                    times[patched]["ttft"].append(got[patched])
                pair.append(got[False] / got[True])
                bar.update(1)
            med = {p: {k: statistics.median(v) for k, v in t.items()} for p, t in times.items()}
            rate = {p: _decode_rate(med[p], max_new_tokens) for p in med}

            rows.append(ModelBenchRow(
                method=name, setting=",".join(f"{k}={v}" for k, v in opts.items()),
                visual_tokens=int(record.visual_out[0]) if record is not None else 0,
                llm_tokens=int(record.llm_tokens[0]) if record is not None else prompt_tokens,
                ttft_ms=1e3 * med[True]["ttft"], base_ttft_ms=1e3 * med[False]["ttft"],
                prefill_tok_s=prompt_tokens / med[True]["ttft"], base_prefill_tok_s=prompt_tokens / med[False]["ttft"],
                decode_tok_s=rate[True], base_decode_tok_s=rate[False],
                peak_mem_mb=mem, base_peak_mem_mb=base_mem,
                predicted_speedup=base_flops / _prefill_flops(model, inputs, record),
                measured_speedup=statistics.median(pair),
            ))
        bar.close()
    return rows


def _decode_rate(median: dict[str, float], new_tokens: int) -> float:
    """Tokens after the first over the time after the first token (medians)."""
    rest = median["full"] - median["ttft"]
    return (new_tokens - 1) / rest if rest > 0 else float("nan")


def format_table(rows: list[ModelBenchRow]) -> str:
    def mem(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}"

    lines = [
        "| method | setting | visual tokens | LLM tokens | TTFT ms (patched / base) | prefill tok/s (patched / base) "
        "| decode tok/s (patched / base) | peak mem MB (patched / base) | predicted prefill speed-up "
        "| measured TTFT speed-up |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.setting} | {r.visual_tokens} | {r.llm_tokens} | {r.ttft_ms:.1f} / {r.base_ttft_ms:.1f} "
            f"| {r.prefill_tok_s:.0f} / {r.base_prefill_tok_s:.0f} | {r.decode_tok_s:.1f} / {r.base_decode_tok_s:.1f} "
            f"| {mem(r.peak_mem_mb)} / {mem(r.base_peak_mem_mb)} | {r.predicted_speedup:.2f}x | {r.measured_speedup:.2f}x |"
        )
    return "\n".join(lines)
