"""``vlmprune calibrate dymu``: find DyMU's per-block merge thresholds for a target token count.

The reference procedure (the paper's calibration): with a fixed merge schedule r_i summing to ``N − target``,
every block merges the batch-wide best ``B · r_i`` edges (redundant images give more), and the block's
threshold is the running mean, over batches, of the score of the best edge left unmerged (clamped to >= 0).

Per-image thresholds do not reproduce the batch-level counts exactly (the reference code's inference
counts exceed its targets), so by default vlmprune then measures the mean kept count in
threshold mode on the calibration images and, if it misses the target by more than ``tolerance``,
re-runs the same procedure with a corrected ``r_total`` (integer bisection, at most ``max_rounds``
rounds). The file records the ``r_total`` finally used, the target, and the mean it achieved.

Only the vision tower runs (up to the feature block), so calibration is cheap.

Inputs are each family's own processor output: ``pixel_values`` plus whatever else the processor returns
for them (the grids of packed patches, the ``image_sizes`` of AnyRes crops, ...), passed as keyword
arguments. The adapter splits them into images the way the model encodes them
(:meth:`~vlmprune.adapters.Adapter.split_images`). An AnyRes image (5-D ``pixel_values`` of shape
(images, crops, 3, H, W) with ``image_sizes``, as the LLaVA-NeXT / OneVision processors return them)
contributes every real crop the model would encode, padding crops dropped, each crop calibrated as an
image of its own (not the base view only), because at inference every crop merges on its own with these
thresholds; ``target_tokens`` is then the mean tokens per crop.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmprune.hooks import HookSet
from vlmprune.method import check_choice
from vlmprune.seams.encoder import EmittedLayout

from . import merge as tm
from .method import POST_MERGE_ROUNDS, EncoderRun, Merger, encoder_layout, post_merge, threshold_rule
from .thresholds import preset_dir, save_thresholds

#: target kept patch tokens of the built-in model's presets (256 patches; by analogy with the paper's
#: low / mid / high means of about 89 / 195 / 394 of 576, i.e. ~15 / 34 / 68 %; "low" is 19 % because the
#: built-in tower merges in only 3 blocks, each of which can at most halve the sequence)
PRESET_TARGETS = {"low": 48, "mid": 90, "high": 170}
#: how ``r_total`` is spread over the tower's blocks (see :func:`calibrate`)
SPREADS = ("merging", "all")


class _Slot:
    """The one encoder run a calibration pass tracks (no per-call context needed: single caller)."""

    def __init__(self) -> None:
        self.run: EncoderRun | None = None

    def start(self, hidden: Tensor) -> EncoderRun:
        self.run = EncoderRun(tm.MergeState.start(hidden.shape[0], hidden.shape[1], hidden.device))
        return self.run

    def current(self) -> EncoderRun | None:
        return self.run


@dataclass
class _Batch:
    """Processor outputs of ``images`` consecutive calibration images, joined for one encoder call."""

    images: int
    inputs: dict[str, Any]


def _layout(model: Any) -> tuple[Any, Any]:
    from vlmprune.adapters import for_model

    adapter = for_model(model)
    return adapter, encoder_layout(adapter)


def _is_post(layout: Any) -> bool:
    return isinstance(layout, EmittedLayout)


def _merging(layout: Any) -> int:
    """Blocks (or post-merge rounds) that merge."""
    return POST_MERGE_ROUNDS if _is_post(layout) else layout.feature_block + 1


def _protected(layout: Any) -> int:
    return 0 if _is_post(layout) else int(layout.has_cls)


def patch_count(model: Any, pixel_values: Tensor | None = None, **processor_outputs: Any) -> int:
    """Tokens per image (crop, tile) before merging: the encoder's fixed count, or, where it varies per
    image (packed patches of any size), the mean over the given images' processor outputs."""
    _, layout = _layout(model)
    if layout.tokens is not None:
        return int(layout.tokens)
    sizes = layout.group_sizes({"pixel_values": pixel_values, **processor_outputs})
    return int(round(sum(sizes) / len(sizes)))


def min_reachable(model: Any, pixel_values: Tensor | None = None, **processor_outputs: Any) -> int:
    """Fewest tokens the merging blocks / rounds can reach: each at most halves the sequence."""
    _, layout = _layout(model)
    cls = _protected(layout)
    n = patch_count(model, pixel_values, **processor_outputs) + cls
    for _ in range(_merging(layout)):
        n = n - (n - cls) // 2
    return n - cls


def check_target(model: Any, target: int, pixel_values: Tensor | None = None, **processor_outputs: Any) -> None:
    n = patch_count(model, pixel_values, **processor_outputs)
    low = min_reachable(model, pixel_values, **processor_outputs)
    if isinstance(target, bool) or not isinstance(target, int) or not low <= target < n:
        raise ValueError(
            f"target tokens must be an integer in [{low}, {n - 1}] for this model ({n} tokens per image; "
            f"its merging blocks can at most halve the sequence each, so fewer than {low} is unreachable); got {target!r}"
        )


def _batches(model: Any, pixel_values: Tensor, batch_size: int, **processor_outputs: Any) -> list[_Batch]:
    """Batches of ``batch_size`` images, each image as the adapter splits the processor's outputs."""
    adapter, _ = _layout(model)
    images = adapter.split_images(pixel_values, **processor_outputs)
    return [_Batch(len(images[i : i + batch_size]), adapter.join_images(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)]


def _as_batch(batch: Any) -> _Batch:
    """A batch from :func:`_batches`, a dict of processor outputs, or a (n, 3, H, W) tensor of images."""
    if isinstance(batch, _Batch):
        return batch
    inputs = dict(batch) if isinstance(batch, Mapping) else {"pixel_values": batch}
    return _Batch(int(inputs["pixel_values"].shape[0]), inputs)


def _on(param: Tensor, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` on the model's device; floating-point tensors (pixels) in its dtype too."""
    return {
        k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
        if isinstance(v, Tensor) else v
        for k, v in inputs.items()
    }


def _runs(model: Any, batches: Iterable[Any], rule: Any) -> Iterable[tuple[int, EncoderRun]]:
    """(images, run) per batch, with ``rule`` deciding every block's / round's merges."""
    adapter, layout = _layout(model)
    param = next(model.parameters())
    if _is_post(layout):
        for batch in map(_as_batch, batches):
            inputs = _on(param, batch.inputs)
            feats = layout.features(inputs)
            sizes = [int(k) for k in layout.group_sizes(inputs)]
            yield batch.images, post_merge(feats.reshape(-1, feats.shape[-1]), sizes, POST_MERGE_ROUNDS, rule)[1]
        return
    slot = _Slot()
    hooks = HookSet()
    try:
        Merger(layout, rule, slot.current, slot.start).install(hooks)
        for batch in map(_as_batch, batches):
            adapter.encode_images(**_on(param, batch.inputs))
            yield batch.images, slot.run
    finally:
        hooks.remove()


@torch.no_grad()
def _batch_pass(model: Any, batches: list[Any], r: list[int], progress: Any = None) -> list[float]:
    """One reference calibration pass: fixed batch-wide merges, running-mean thresholds per block."""
    _, layout = _layout(model)
    count = POST_MERGE_ROUNDS if _is_post(layout) else len(layout.blocks)
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
    """Threshold mode: tokens each image (crop, tile) keeps (patch tokens at the feature block, [CLS] not
    counted), and the mean tokens per block / round. ``batches``: (n, 3, H, W) image tensors or dicts of
    processor outputs (one encoder call each)."""
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
    spread: str = "merging",
    tolerance: float = 0.02,
    max_rounds: int = 8,
    progress: bool = False,
    **processor_outputs: Any,
) -> dict[str, Any]:
    """Per-block thresholds so that images keep ``target_tokens`` patch tokens on average (see module doc).
    ``pixel_values`` and ``processor_outputs``: the processor's outputs for the calibration images, as the
    model takes them (e.g. the grids that come with packed patches, ``image_sizes=...`` with 5-D AnyRes
    crops); ``batch_size`` images per encoder call. ``spread``: the blocks the schedule spreads ``r_total``
    over: ``"merging"`` (default) the blocks whose merges reach the features (up to the feature block),
    ``"all"`` every block of the tower, as the reference code does (for a tower read at its second-to-last
    block, the last block's share is never merged, so fewer merges happen than ``r_total``).
    Returns the thresholds file's content (:func:`write`)."""
    check_choice("spread", spread, SPREADS)
    check_target(model, target_tokens, pixel_values, **processor_outputs)
    _, layout = _layout(model)
    n_patches = patch_count(model, pixel_values, **processor_outputs)
    merging = _merging(layout)
    batches = _batches(model, pixel_values, batch_size, **processor_outputs)
    n_images = sum(batch.images for batch in batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="img", desc=f"dymu calibrate ({target_tokens} tokens)", file=sys.stderr)

    spread_over = merging if spread == "merging" or _is_post(layout) else max(merging, len(layout.blocks))

    def attempt(r_total: int) -> tuple[list[float], float, list[float]]:
        r = tm.schedule(r_total, spread_over, schedule)[:merging]
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
        "spread": spread,
        "spread_blocks": int(spread_over),
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


def load_images(source: str, processor: Any, limit: int) -> tuple[Tensor, dict[str, Any] | None]:
    """Processed pixel values of the calibration images (``builtin``: the built-in train split), and the
    processor's other outputs for them (e.g. patch grids, ``image_sizes``; keyword arguments of
    :func:`calibrate`), or None when it returns pixel values only."""
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
    extras = {k: v for k, v in out.items() if k != "pixel_values"}
    return out["pixel_values"], extras or None


def load_model(name: str) -> tuple[Any, Any]:
    """``builtin``, ``captioner``, a local checkpoint directory or a hub id (as the trainers take it)."""
    from vlmprune.training.data import load_model as load

    return load(name, "cpu")


def make_presets(output_dir: str | Path | None = None, images: int = 256, batch_size: int = 32) -> list[Path]:
    """Calibrate the built-in model's low / mid / high presets on the built-in train images."""
    torch.manual_seed(0)
    model, processor = load_model("builtin")
    pv, extras = load_images("builtin", processor, images)
    out = Path(output_dir) if output_dir is not None else preset_dir()
    written = []
    for name, target in PRESET_TARGETS.items():
        result = calibrate(model, pv, target, batch_size=batch_size, progress=True, **(extras or {}))
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
    parser.add_argument("--spread", choices=SPREADS, default="merging",
                        help="blocks the merge schedule spreads r_total over: 'merging' (default) the blocks up to the "
                             "feature block, 'all' every block of the tower as the reference code does "
                             "(with --no-match: the reference procedure exactly)")
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
        if _layout(model)[1].tokens is not None:  # (also a clear error for an unsupported model)
            check_target(model, args.target_tokens)  # before loading images, when the count is fixed
        pv, extras = load_images(args.data, processor, args.images)
        extras = extras or {}
        check_target(model, args.target_tokens, pv, **extras)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    result = calibrate(model, pv, args.target_tokens, batch_size=args.batch_size, schedule=args.schedule,
                       match_target=not args.no_match, spread=args.spread, progress=True, **extras)
    path = write(args.output, model, {**result, "model": args.model})
    print(f"mean kept tokens {result['calib_mean_tokens']:.1f} (target {args.target_tokens}) -> {path}")
    return 0


if __name__ == "__main__":  # python -m vlmprune.methods.dymu.calibrate [dymu] --presets | --target-tokens N --output F
    _args = sys.argv[1:]
    raise SystemExit(main(_args if _args[:1] == ["dymu"] else ["dymu", *_args]))
