"""Train Slow-Fast hybrid layers on a frozen VLM (``vlmprune train-slowfast``).

The reference's training code is unreleased; this follows its stage-2 idea at toolkit
scale: the fast tokens replace the video in the sequence, the hybrid layers' new parameters
(kv projection, gate, warm-up scalar) are trained with the answer tokens' cross-entropy, and,
optionally (``--lora-rank``), LoRA deltas on the LLM's q/v projections; the vision tower, the
projector and the LLM stay frozen. Training starts from the fast-only model exactly (warm-up gate
0). The output is a small adapter file (:mod:`vlmprune.methods.slowfast.hybrid`): only the new parameters
and the LoRA deltas, plus the fast-pathway options they were trained with.

Data: ``builtin`` (the built-in benchmark's train-split videos: 8 frames as two 2x2 mosaics, with
their questions and captions) or a JSON-lines file with one ``{"image": [paths], "prompt": str,
"answer": str}`` per line whose images are frame mosaics (``--mosaic``) and whose prompt already
holds the image placeholders.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import vlmprune
from vlmprune.training import LoopConfig, add_run_args, prepare_run, train_loop
from vlmprune.training.data import (
    Batch,
    answer_batches,
    answer_labels,
    load_model,
    train_and_held_out,
)

from .config import SlowFastConfig
from .hybrid import LoRA, save_adapter


def full_labels(input_ids: Tensor, answer_len: Tensor) -> Tensor:
    """(B, L) labels: the answer tokens (the last ones, left padding), -100 elsewhere."""
    labels = torch.full_like(input_ids, -100)
    tail = answer_labels(input_ids, answer_len)
    labels[:, -tail.shape[1]:] = tail
    return labels


def builtin_video_batches(processor: Any, batch_size: int, seed: int, split: str = "train",
                          caption_share: float = 0.3) -> Callable[[int], Batch]:
    """Batch ``step`` of built-in clips (mosaics) with a question or the caption as the answer."""
    return answer_batches(processor, batch_size, seed, split=split, video_share=1.0,
                          caption_share=caption_share, offset=300_000)


def sf_config(args: argparse.Namespace, adapter: str | None = None, **extra: Any) -> SlowFastConfig:
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    return SlowFastConfig(
        mode="hybrid", s=args.s, t=args.t, p=args.p, video_pooling_stride=args.video_pooling_stride,
        layers=layers if adapter is None else None, every_n_layers=args.every_n_layers,
        cross_attn_impl=args.cross_attn_impl, mosaic=args.mosaic, adapter=adapter, **extra,
    )


def train_slowfast(model: Any, batches: Callable[[int], Batch], args: argparse.Namespace) -> tuple[Any, LoRA | None, dict]:
    """Train the hybrid parameters (and LoRA deltas) on ``batches``; the model stays frozen."""
    model.requires_grad_(False)
    model.eval()
    torch.manual_seed(args.seed)
    handle = vlmprune.apply(model, sf_config(args, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha))
    method = handle.methods[0]
    hybrid, lora = method.hybrid, method.lora
    hybrid.requires_grad_(True)
    modules: dict[str, Any] = {"hybrid": hybrid}
    params = list(hybrid.parameters())
    if lora is not None:
        lora.requires_grad_(True)
        modules["lora"] = lora
        params += list(lora.parameters())

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        inputs, answer_len = batches(step)
        out = model(**inputs, labels=full_labels(inputs["input_ids"], answer_len))
        warm = torch.stack([hybrid.layers[str(i)].cross_attn_warm_up_gate for i in hybrid.layer_indices])
        return out.loss, {"warm": float(warm.detach().abs().mean())}

    out = Path(args.output)
    cfg = LoopConfig(
        steps=args.steps, lr=args.lr, weight_decay=0.0, warmup=max(1, int(0.05 * args.steps)), seed=args.seed,
        max_minutes=args.minutes, log_every=10, checkpoint_every=50,
        resume_file=None if args.no_resume else Path(args.resume_file) if args.resume_file else out / "train-state.pt",
        desc="slow-fast hybrid",
    )
    try:
        with torch.enable_grad():
            result = train_loop(modules, params, step_fn, cfg)
    finally:
        handle.remove()
    return hybrid.eval(), lora, result


@torch.no_grad()
def held_out_report(model: Any, adapter_path: str | Path, batches: Callable[[int], Batch], steps: int,
                    args: argparse.Namespace) -> dict[str, Any]:
    """Answer loss and first-answer-token accuracy on held-out batches: fast-only vs hybrid."""
    report: dict[str, Any] = {}
    losses = []
    for step in range(steps):  # the unpatched model with every video token, for reference
        inputs, answer_len = batches(step)
        losses.append(float(model(**inputs, labels=full_labels(inputs["input_ids"], answer_len)).loss))
    report["all_tokens"] = {"answer_loss": float(np.mean(losses))}
    fast_cfg = SlowFastConfig(mode="fast", s=args.s, t=args.t, p=args.p,
                              video_pooling_stride=args.video_pooling_stride, mosaic=args.mosaic)
    for name, cfg in (("fast_only", fast_cfg), ("hybrid", sf_config(args, adapter=str(adapter_path)))):
        losses, correct, n = [], 0, 0
        fast = slow = 0.0
        with vlmprune.apply(model, cfg) as h:
            for step in range(steps):
                inputs, answer_len = batches(step)
                labels = full_labels(inputs["input_ids"], answer_len)
                out = model(**inputs, labels=labels)
                losses.append(float(out.loss))
                t = int(answer_len.max())
                first = inputs["input_ids"].shape[1] - answer_len  # column of each answer's first token
                pred = out.logits[:, -t - 1 : -1].argmax(-1)
                for b in range(len(answer_len)):
                    j = int(first[b]) - (inputs["input_ids"].shape[1] - t)
                    correct += int(pred[b, j] == inputs["input_ids"][b, first[b]])
                    n += 1
                rec = h.stats.last
                fast += float(np.mean(rec.fast_tokens))
                slow += float(np.mean(rec.slow_tokens))
        report[name] = {"answer_loss": float(np.mean(losses)), "first_token_accuracy": correct / max(n, 1),
                        "fast_tokens": fast / steps, "slow_tokens": slow / steps}
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmprune train-slowfast", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin", help="'builtin' or a local checkpoint directory")
    p.add_argument("--data", default="builtin", help="'builtin' or a JSON-lines file (see the module docstring)")
    p.add_argument("--output", required=True, help="directory for the adapter file, its JSON recipe and the resume state")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--s", type=int, default=1, help="fast pathway temporal sampling stride")
    p.add_argument("--t", type=int, default=4, help="fast pathway temporal pooling stride")
    p.add_argument("--p", type=int, default=2, help="fast pathway spatial stride")
    p.add_argument("--video-pooling-stride", type=int, default=1)
    p.add_argument("--layers", default="", help="comma-separated hybrid layer indices (default: every 2nd from 0)")
    p.add_argument("--every-n-layers", type=int, default=2)
    p.add_argument("--cross-attn-impl", default="text-only-vanilla",
                   choices=["vanilla", "text-only-vanilla", "text-only-vanilla-masksystem"])
    p.add_argument("--mosaic", type=int, default=2, help="frames per mosaic side (the built-in videos: 2)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the LLM's q/v projections (0: none)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the report")
    p.add_argument("--resume-file", default=None,
                   help="resume state (optimiser, step, RNG); default <output>/train-state.pt, keep it out of a shipped adapter directory")
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prepare_run(args, ("steps", "batch_size"))
    began = time.time()
    model, processor = load_model(args.model, args.device)
    batches, held_out = train_and_held_out(processor, args, builtin_video_batches)
    hybrid, lora, result = train_slowfast(model, batches, args)
    recipe = {k: v for k, v in vars(args).items()}
    info: dict[str, Any] = {
        "recipe": recipe, "steps": result["steps"], "train_minutes": round(result["minutes"], 2),
        "last": result["history"][-1:], "lora_alpha": args.lora_alpha,
        "fast": {"s": args.s, "t": args.t, "p": args.p, "min_fast_frames": 1,
                 "video_pooling_stride": args.video_pooling_stride},
    }
    deltas = lora.deltas() if lora is not None else None
    path = save_adapter(hybrid, args.output, lora=deltas, extra=info)
    if args.eval_batches > 0:
        info["held_out"] = held_out_report(model, path, held_out, args.eval_batches, args)
        save_adapter(hybrid, args.output, lora=deltas, extra=info)
    print(json.dumps({"adapter": str(path), "minutes": round((time.time() - began) / 60, 2),
                      "steps": result["steps"], **info.get("held_out", {})}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
