"""Prefill benchmark: does the FLOPs reduction of a pruning method show up as wall-clock time?

A random-init model with LLaVA-1.5's visual geometry (336 px, patch 14, 576 visual tokens per
image) runs one prefill (``use_cache=True, logits_to_keep=1``, as ``generate`` does) per
measurement. Pre-LLM and in-LLM methods alike: an in-LLM method's FLOPs count every decoder layer
at the length it ran at, and at ratio 0 the measured speed-up shows its own overhead (hooks,
scoring). The machine is noisy, so each ratio is measured as interleaved pairs of
(unpatched, patched) runs, alternating which goes first, and we report medians of the per-pair
ratios rather than ratios of medians.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from . import flops
from .api import apply

SIZES: dict[str, dict[str, int]] = {
    # vision tower narrow (its cost is not what pruning changes), LLM big enough that prefill > 100 ms
    "default": dict(v_hidden=256, v_layers=4, hidden=768, layers=4, heads=12, kv_heads=4, mlp=2048),
    "tiny": dict(v_hidden=64, v_layers=2, hidden=64, layers=4, heads=4, kv_heads=2, mlp=128),  # 4 layers: room for in-LLM methods
}
IMAGE_TOKEN = 32000


@dataclass
class BenchRow:
    method: str
    ratio: float
    visual_tokens: int
    llm_tokens: int
    latency_ms: float  # median patched prefill
    base_latency_ms: float  # median unpatched prefill
    peak_mem_mb: float | None  # peak memory growth during a patched prefill
    base_peak_mem_mb: float | None
    kv_cache_mb: float
    tflops: float
    predicted_speedup: float  # FLOPs(unpatched) / FLOPs(patched)
    measured_speedup: float  # median over pairs of t(unpatched) / t(patched)

    @property
    def efficiency(self) -> float:
        return self.measured_speedup / self.predicted_speedup

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "efficiency": self.efficiency}


def build_model(size: str = "default", seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A random-init LLaVA-1.5-geometry model; weights do not matter for timing."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=s["v_hidden"], intermediate_size=4 * s["v_hidden"], num_hidden_layers=s["v_layers"],
        num_attention_heads=max(1, s["v_hidden"] // 64), image_size=336, patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=32064, hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=4096,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(cfg).to(dtype).eval()


def make_inputs(model: Any, text_before: int = 8, text_after: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = (336 // 14) ** 2
    ids = torch.cat([
        torch.randint(10, 32000, (text_before,), generator=g),
        torch.full((n,), IMAGE_TOKEN),
        torch.randint(10, 32000, (text_after,), generator=g),
    ]).unsqueeze(0)
    pixels = torch.randn(1, 3, 336, 336, generator=g).to(model.dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


_peak_rss_reset, _rss_kb = peak_rss_reset, rss_kb  # earlier names


def _prefill(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[float, Any]:
    if inputs["input_ids"].device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    if inputs["input_ids"].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _peak_mem_mb(model: Any, inputs: dict[str, torch.Tensor]) -> float | None:
    """Peak memory growth of one prefill: the CUDA allocator's peak, or peak RSS on Linux CPUs."""
    gc.collect()
    if inputs["input_ids"].device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _prefill(model, inputs)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not peak_rss_reset():
        return None
    base = rss_kb("VmRSS")
    _prefill(model, inputs)
    return (rss_kb("VmHWM") - base) / 1024


def _kv_mb(cache: Any) -> float:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / 2**20


def method_options(method: str, ratio: float, num_layers: int) -> dict[str, Any]:
    """The options that run ``method`` at ``ratio``: the ratio itself for a method that has one,
    else the cell its config's eval grid makes for that ratio (e.g. PyramidDrop's lambda for a
    layer-averaged budget of ``1 - ratio``)."""
    from .method import EvalContext
    from .registry import lookup

    config_cls, _ = lookup(method)
    if "ratio" in config_cls.option_names():
        return {"ratio": ratio}
    for cell in config_cls.eval_cells([ratio], EvalContext(num_layers=num_layers), {}):
        if cell.get("ratio") == ratio:
            return {k: v for k, v in cell.items() if k != "ratio"}
    raise ValueError(
        f"vlmprune bench sweeps ratios, and {method!r} reaches no setting at ratio {ratio} on a "
        f"{num_layers}-layer model; use bench --model with --option for its own options"
    )


def run(
    ratios: list[float],
    *,
    method: str = "fastervlm",
    size: str = "default",
    repeats: int = 15,
    warmup: int = 3,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> list[BenchRow]:
    """Measure every ratio against the unpatched model in the same process."""
    model = build_model(size, seed).to(device)
    inputs = {k: v.to(device) for k, v in make_inputs(model, seed=seed).items()}
    rows = []
    with torch.inference_mode():
        for _ in range(warmup):
            _prefill(model, inputs)
        base_tokens = inputs["input_ids"].shape[1]
        base_flops = flops.estimate(model, inputs, base_tokens, generated_tokens=1).total
        base_mem = _peak_mem_mb(model, inputs)
        bar = tqdm(total=len(ratios) * repeats, desc="prefill pairs", disable=not progress)
        depth = model.config.get_text_config().num_hidden_layers
        for ratio in ratios:
            options = method_options(method, ratio, depth)
            handle = apply(model, method, **options)
            for _ in range(warmup):
                _prefill(model, inputs)
            _, out = _prefill(model, inputs)
            rec = handle.stats.last
            kv = _kv_mb(out.cache)
            mem = _peak_mem_mb(model, inputs)
            # in-LLM methods: every decoder layer at its own length
            tokens = rec.layer_tokens[0] if rec.layer_tokens else rec.llm_tokens[0]
            report = flops.estimate(model, inputs, tokens, generated_tokens=1, overhead=rec.overhead_flops)
            handle.remove()
            base_t, patched_t, pair = [], [], []
            for i in range(repeats):
                order = (False, True) if i % 2 == 0 else (True, False)
                times = {}
                for patched in order:
                    if patched:
                        with apply(model, method, **options):
                            times[True], _ = _prefill(model, inputs)
                    else:
                        times[False], _ = _prefill(model, inputs)
                base_t.append(times[False])
                patched_t.append(times[True])
                pair.append(times[False] / times[True])
                bar.update(1)
            rows.append(
                BenchRow(
                    method=method, ratio=ratio, visual_tokens=rec.visual_out[0], llm_tokens=rec.llm_tokens[0],
                    latency_ms=1e3 * statistics.median(patched_t), base_latency_ms=1e3 * statistics.median(base_t),
                    peak_mem_mb=mem, base_peak_mem_mb=base_mem, kv_cache_mb=kv, tflops=report.total / 1e12,
                    predicted_speedup=base_flops / report.total, measured_speedup=statistics.median(pair),
                )
            )
        bar.close()
    return rows


def format_table(rows: list[BenchRow]) -> str:
    def mem(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}"

    head = (
        "| method | ratio | visual tokens | LLM tokens | prefill ms (patched / base) | peak mem MB (patched / base) "
        "| KV cache MB | TFLOPs | predicted speed-up | measured speed-up | measured / predicted |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.ratio:g} | {r.visual_tokens} | {r.llm_tokens} | {r.latency_ms:.1f} / {r.base_latency_ms:.1f} "
            f"| {mem(r.peak_mem_mb)} / {mem(r.base_peak_mem_mb)} | {r.kv_cache_mb:.2f} | {r.tflops:.4f} "
            f"| {r.predicted_speedup:.2f}x | {r.measured_speedup:.2f}x | {r.efficiency:.2f} |"
        )
    return "\n".join(lines)
