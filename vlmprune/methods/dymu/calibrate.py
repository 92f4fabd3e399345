"""``vlmprune calibrate dymu``: find DyMU's per-block merge thresholds for a target token count.

The reference procedure (spec §3): with a fixed merge schedule r_i summing to ``N − target``, every block
merges the batch-wide best ``B · r_i`` edges (redundant images give more), and the block's threshold is
the running mean, over batches, of the score of the best edge left unmerged (clamped to >= 0).

Per-image thresholds do not reproduce the batch-level counts exactly (the spec notes the reference's
inference counts exceed its targets), so by default vlmprune then measures the mean kept count in
threshold mode on the calibration images and, if it misses the target by more than ``tolerance``,
re-runs the same procedure with a corrected ``r_total`` (integer bisection, at most ``max_rounds``
rounds). The file records the ``r_total`` finally used, the target, and the mean it achieved.

Only the vision tower runs (up to the feature block), so calibration is cheap.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmprune.hooks import HookSet

from . import merge as tm
from .method import EncoderRun, Merger, threshold_rule
from .thresholds import preset_dir, save_thresholds

#: target kept patch tokens of the built-in model's presets (256 patches; by analogy with the paper's
#: low / mid / high means of about 89 / 195 / 394 of 576, i.e. ~15 / 34 / 68 %; "low" is 19 % because the
#: built-in tower merges in only 3 blocks, each of which can at most halve the sequence)
PRESET_TARGETS = {"low": 48, "mid": 90, "high": 170}


class _Slot:
    """The one encoder run a calibration pass tracks (no per-call context needed: single caller)."""

    def __init__(self) -> None:
        self.run: EncoderRun | None = None

    def start(self, hidden: Tensor) -> EncoderRun:
        self.run = EncoderRun(tm.MergeState.start(hidden.shape[0], hidden.shape[1], hidden.device))
        return self.run

    def current(self) -> EncoderRun | None:
        return self.run


def _layout(model: Any) -> tuple[Any, Any]:
    from vlmprune.adapters import for_model

    adapter = for_model(model)
    return adapter, adapter.merge_layout()


def _is_post(layout: Any) -> bool:
    from vlmprune.adapters.base import PostMergeLayout

    return isinstance(layout, PostMergeLayout)


def _merging(layout: Any) -> int:
    """Blocks (or post-merge rounds) that merge."""
    return layout.rounds if _is_post(layout) else layout.feature_block + 1


def _protected(layout: Any) -> int:
    return 0 if _is_post(layout) else int(layout.has_cls)


def patch_count(model: Any, image_grid_thw: Tensor | None = None) -> int:
    """Tokens per image before merging (Qwen2-VL: the mean over the calibration images' grids)."""
    _, layout = _layout(model)
    if _is_post(layout) and layout.tokens is not None:  # fixed tokens per group (InternVL tiles)
        return int(layout.tokens)
    if _is_post(layout):
        if image_grid_thw is None:
            raise ValueError("vlmprune: Qwen2-VL calibration needs image_grid_thw with the pixel values")
        m = layout.merge_size
        sizes = (image_grid_thw.prod(-1) // (m * m)).tolist()
        return int(round(sum(sizes) / len(sizes)))
    vc = model.config.vision_config
    return (int(vc.image_size) // int(vc.patch_size)) ** 2


def min_reachable(model: Any, image_grid_thw: Tensor | None = None) -> int:
    """Fewest tokens the merging blocks / rounds can reach: each at most halves the sequence."""
    _, layout = _layout(model)
    cls = _protected(layout)
    n = patch_count(model, image_grid_thw) + cls
    for _ in range(_merging(layout)):
        n = n - (n - cls) // 2
    return n - cls


def check_target(model: Any, target: int, image_grid_thw: Tensor | None = None) -> None:
    n = patch_count(model, image_grid_thw)
    low = min_reachable(model, image_grid_thw)
    if isinstance(target, bool) or not isinstance(target, int) or not low <= target < n:
        raise ValueError(
            f"target tokens must be an integer in [{low}, {n - 1}] for this model ({n} tokens per image; "
            f"its merging blocks can at most halve the sequence each, so fewer than {low} is unreachable); got {target!r}"
        )


def _batches(pixel_values: Tensor, batch_size: int, image_grid_thw: Tensor | None = None) -> list[Any]:
    """Batches of images: tensors (n, 3, H, W), or (patches, grid) pairs for Qwen2-VL's packed pixels."""
    if image_grid_thw is None:
        return [pixel_values[i : i + batch_size] for i in range(0, pixel_values.shape[0], batch_size)]
    ends = image_grid_thw.prod(-1).cumsum(0).tolist()
    out = []
    for i in range(0, len(ends), batch_size):
        lo = ends[i - 1] if i else 0
        hi = ends[min(i + batch_size, len(ends)) - 1]
        out.append((pixel_values[lo:hi], image_grid_thw[i : i + batch_size]))
    return out


def _runs(model: Any, batches: list[Any], rule: Any) -> Iterable[tuple[int, EncoderRun]]:
    """(images, run) per batch, with ``rule`` deciding every block's / round's merges."""
    adapter, layout = _layout(model)
    param = next(model.parameters())
    if _is_post(layout) and layout.features is not None:  # fixed-size groups (InternVL tiles)
        from .method import post_merge

        for pv in batches:
            feats = layout.features(pv.to(param.device, param.dtype))
            sizes = [int(feats.shape[1])] * int(feats.shape[0])
            yield len(sizes), post_merge(feats.reshape(-1, feats.shape[-1]), sizes, layout.rounds, rule)[1]
        return
    if _is_post(layout):
        from .method import post_merge

        m = layout.merge_size
        for pv, grid in batches:
            feats = adapter.vision_tower(pv.to(param.device, param.dtype), grid_thw=grid.to(param.device)).pooler_output
            sizes = (grid.prod(-1) // (m * m)).tolist()
            yield len(sizes), post_merge(feats, sizes, layout.rounds, rule)[1]
        return
    slot = _Slot()
    hooks = HookSet()
    try:
        Merger(layout, rule, slot.current, slot.start).install(hooks)
        for pv in batches:
            adapter.vision_tower(pv.to(param.device, param.dtype))
            yield pv.shape[0], slot.run
    finally:
        hooks.remove()


@torch.no_grad()
def _batch_pass(model: Any, batches: list[Any], r: list[int], progress: Any = None) -> list[float]:
    """One reference calibration pass: fixed batch-wide merges, running-mean thresholds per block."""
    _, layout = _layout(model)
    count = layout.rounds if _is_post(layout) else len(layout.blocks)
    protect = bool(_protected(layout))
    tau = [math.inf] * count
    seen = [0] * count

    def rule(index: int, metric: Tensor, state: tm.MergeState) -> tuple[Tensor | None, Any]:
        if index >= len(r) or r[index] <= 0:
            return None, None
        match = tm.bipartite_match(metric, state.valid, protect)
        merge, tau_b = tm.batch_topk_merges(match, r[index])
        if math.isfinite(tau_b):
            c = seen[index]
            tau[index] = tau_b if c == 0 else (tau[index] * c + tau_b) / (c + 1)
            seen[index] = c + 1
        return merge, match

    for images, _ in _runs(model, batches, rule):
        if progress is not None:
            progress.update(images)
    return tau


@torch.no_grad()
def kept_tokens(model: Any, batches: list[Any], thresholds: Sequence[float]) -> tuple[list[int], list[list[float]]]:
    """Threshold mode: tokens each image keeps (patch tokens at the feature block, [CLS] not counted),
    and the mean tokens per block / round."""
    _, layout = _layout(model)
    cls = _protected(layout)
    rule = threshold_rule(list(thresholds), bool(cls))
    kept: list[int] = []
    per_block: list[list[int]] = []
    for _, run in _runs(model, batches, rule):
        kept += [c - cls for c in run.block_tokens[-1]]
        per_block += [[layer[r] for layer in run.block_tokens] for r in range(len(run.block_tokens[0]))]
    means = [sum(row[i] for row in per_block) / len(per_block) for i in range(len(per_block[0]))]
    return kept, means


def calibrate(
    model: Any,
    pixel_values: Tensor,
    target_tokens: int,
    *,
    batch_size: int = 32,
    schedule: str = "constant",
    match_target: bool = True,
    tolerance: float = 0.02,
    max_rounds: int = 8,
    progress: bool = False,
    image_grid_thw: Tensor | None = None,
) -> dict[str, Any]:
    """Per-block thresholds so that images keep ``target_tokens`` patch tokens on average (see module doc).
    ``pixel_values``: (n, 3, H, W) processed calibration images (Qwen2-VL: the processor's packed patches
    with ``image_grid_thw``). Returns the thresholds file's content."""
    check_target(model, target_tokens, image_grid_thw)
    _, layout = _layout(model)
    n_patches = patch_count(model, image_grid_thw)
    merging = _merging(layout)
    batches = _batches(pixel_values, batch_size, image_grid_thw)
    n_images = pixel_values.shape[0] if image_grid_thw is None else image_grid_thw.shape[0]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="img", desc=f"dymu calibrate ({target_tokens} tokens)", file=sys.stderr)

    def attempt(r_total: int) -> tuple[list[float], float, list[float]]:
        r = tm.schedule(r_total, merging, schedule)
        if bar is not None:
            bar.total += n_images
            bar.refresh()
        tau = _batch_pass(model, batches, r, bar)
        kept, means = kept_tokens(model, batches, tau)
        return tau, sum(kept) / len(kept), means

    r_total = n_patches - target_tokens
    tried: dict[int, tuple[list[float], float, list[float]]] = {r_total: attempt(r_total)}
    if match_target:
        lo, hi = 0, n_patches - 1  # r_total bounds: more r_total -> fewer kept tokens
        for _ in range(max_rounds):
            mean = tried[r_total][1]
            if abs(mean - target_tokens) <= tolerance * target_tokens:
                break
            if mean > target_tokens:
                lo = r_total + 1
            else:
                hi = r_total - 1
            if lo > hi:
                break
            r_total = (lo + hi) // 2
            if r_total in tried:
                break
            tried[r_total] = attempt(r_total)
        r_total = min(tried, key=lambda k: abs(tried[k][1] - target_tokens))
    if bar is not None:
        bar.close()
    tau, mean, means = tried[r_total]
    thresholds = [t if i < merging else math.inf for i, t in enumerate(tau)]
    return {
        "thresholds": thresholds,
        "target_tokens": int(target_tokens),
        "r_total": int(r_total),
        "r_reference": int(n_patches - target_tokens),
        "schedule": schedule,
        "n_images": int(n_images),
        "calib_mean_tokens": float(mean),
        "calib_block_mean_tokens": [float(m) for m in means],
    }


def write(path: str | Path, model: Any, result: dict[str, Any]) -> Path:
    info = {k: v for k, v in result.items() if k != "thresholds"}
    return save_thresholds(path, result["thresholds"], model.config.vision_config, **info)


# -- data -----------------------------------------------------------------------------------------


def _image_paths(source: str) -> list[Path]:
    p = Path(source)
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix.lower() in exts)
    if p.is_file() and p.suffix == ".json":
        items = json.loads(p.read_text())
        out = []
        for item in items:
            rel = item["image"] if isinstance(item, dict) else item
            q = Path(rel)
            out.append(q if q.is_absolute() else p.parent / q)
        return out
    raise ValueError(f"--data must be 'builtin', a directory of images or a JSON list of image files; got {source!r}")


def load_images(source: str, processor: Any, limit: int) -> tuple[Tensor, Tensor | None]:
    """Processed pixel values of the calibration images (``builtin``: the built-in train split), and
    ``image_grid_thw`` for processors that pack patches (Qwen2-VL), else None."""
    if source == "builtin":
        from vlmprune.artifacts import builtin_benchmark

        make_image = builtin_benchmark().data.make_image

        images: Iterable[Any] = [make_image("train", i).image for i in range(limit)]
    else:
        from PIL import Image

        paths = _image_paths(source)[:limit]
        if not paths:
            raise ValueError(f"no images found in {source!r}")
        images = [Image.open(f).convert("RGB") for f in paths]
    image_processor = getattr(processor, "image_processor", processor)
    out = image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"], out.get("image_grid_thw")


def load_model(name: str) -> tuple[Any, Any]:
    if name == "builtin":
        from vlmprune.artifacts import builtin_benchmark

        load_builtin = builtin_benchmark().load_model

        return load_builtin()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(name, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(name, local_files_only=True)


def make_presets(output_dir: str | Path | None = None, images: int = 256, batch_size: int = 32) -> list[Path]:
    """Calibrate the built-in model's low / mid / high presets on the built-in train images."""
    torch.manual_seed(0)
    model, processor = load_model("builtin")
    pv, _ = load_images("builtin", processor, images)
    out = Path(output_dir) if output_dir is not None else preset_dir()
    written = []
    for name, target in PRESET_TARGETS.items():
        result = calibrate(model, pv, target, batch_size=batch_size, progress=True)
        written.append(write(out / f"{name}.json", model, {**result, "preset": name, "model": "builtin"}))
        print(f"{name}: target {target}, mean kept {result['calib_mean_tokens']:.1f} -> {written[-1]}")
    return written


def main(argv: list[str] | None = None, prog: str = "vlmprune calibrate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="calibrate a method's parameters on images (DyMU thresholds)")
    parser.add_argument("method", choices=["dymu"])
    parser.add_argument("--model", default="builtin", help="'builtin' or a local model directory")
    parser.add_argument("--data", default="builtin", help="'builtin', a directory of images, or a JSON list of image files")
    parser.add_argument("--target-tokens", type=int, help="mean patch tokens per image to keep")
    parser.add_argument("--output", help="thresholds JSON to write")
    parser.add_argument("--images", type=int, default=256, help="calibration images to use (at most)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--schedule", choices=["constant", "linear", "reverse_linear"], default="constant")
    parser.add_argument("--no-match", action="store_true",
                        help="keep the reference r_total = N - target (no correction to hit the target in threshold mode)")
    parser.add_argument("--presets", action="store_true",
                        help="write the built-in model's low/mid/high presets (ignores the other options but --images)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.presets:
        make_presets(images=args.images, batch_size=args.batch_size)
        return 0
    if args.target_tokens is None or not args.output:
        parser.error("--target-tokens and --output are required (or --presets)")
    model, processor = load_model(args.model)
    try:
        if not _is_post(_layout(model)[1]):  # (also a clear error for an unsupported model)
            check_target(model, args.target_tokens)  # before loading images, when the count is fixed
        pv, grid = load_images(args.data, processor, args.images)
        check_target(model, args.target_tokens, grid)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    result = calibrate(model, pv, args.target_tokens, batch_size=args.batch_size, schedule=args.schedule,
                       match_target=not args.no_match, progress=True, image_grid_thw=grid)
    path = write(args.output, model, {**result, "model": args.model})
    print(f"mean kept tokens {result['calib_mean_tokens']:.1f} (target {args.target_tokens}) -> {path}")
    return 0


if __name__ == "__main__":  # python -m vlmprune.methods.dymu.calibrate [dymu] --presets | --target-tokens N --output F
    _args = sys.argv[1:]
    raise SystemExit(main(_args if _args[:1] == ["dymu"] else ["dymu", *_args]))
