"""Train DyVTE's exit gates on a frozen model (``vlmprune train-gates``), as the reference does.

Each step draws one layer ``k`` for the whole batch, runs the frozen model twice under teacher
forcing (in full, and with every visual token gone from layer ``k + 1`` on), labels each sample
"exit" when the exited model's greedy answer tokens agree with the full model's on more than 99%
of positions and its answer loss is below 1.03 times the full one, and trains router ``k`` with
cross-entropy on the text features of layer ``k``'s output. Only the routers get gradients.

Data: ``builtin`` (the built-in benchmark's train split: image and video questions and captions)
or a JSON-lines file with one ``{"image": path | [paths], "prompt": str, "answer": str}`` per
line, where ``prompt`` already holds the processor's image placeholder(s) and chat template.
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
from torch import Tensor, nn

import vlmprune
from vlmprune.training import LoopConfig, add_run_args, prepare_run, train_loop
from vlmprune.training.data import (
    Batch,
    answer_batches,
    answer_labels,
    load_model,
    train_and_held_out,
)

from .method import (
    DyVTEConfig,
    ExitGates,
    exit_decision,
    exit_labels,
    gate_features,
    load_gates,
    save_gates,
)


def layer_outputs(model: Any, adapter: Any, inputs: dict[str, Tensor], t: int,
                  layers: list[int]) -> tuple[list[Tensor], Tensor]:
    """The outputs of decoder ``layers`` (in order) and the logits that score the last ``t``
    tokens, from one full forward (teacher forcing)."""
    captured: list[Tensor] = []
    hooks = [adapter.decoder_layers[i].register_forward_hook(
        lambda m, a, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
        for i in layers]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[:, -t - 1 : -1]
    finally:
        for h in hooks:
            h.remove()
    return captured, logits


def prompt_masks(adapter: Any, inputs: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """(visual, prompt) masks for ``gate_features``: the router reads the prompt only (the answer
    columns masked), which is what the gates see at inference, where the prefill holds the prompt
    alone. Causal attention makes the prompt's hidden states under teacher forcing the same as at
    inference."""
    ids = inputs["input_ids"]
    visual = torch.zeros_like(ids, dtype=torch.bool)
    for tok in adapter.placeholder_ids():
        visual |= ids == tok
    valid = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(visual)
    prompt = valid.clone()
    prompt[:, -labels.shape[1]:] &= labels == -100
    return visual, prompt


def gate_step(model: Any, adapter: Any, gates: ExitGates, batch: Batch, layer: int) -> tuple[Tensor, dict[str, float]]:
    """Loss of router ``layer`` on one batch, and the share of samples labelled "exit"."""
    inputs, answer_len = batch
    labels = answer_labels(inputs["input_ids"], answer_len)
    t = labels.shape[1]
    (hidden,), full = layer_outputs(model, adapter, inputs, t, [layer])
    with torch.no_grad(), vlmprune.apply(model, DyVTEConfig(exit_layer=layer + 1)):
        exited = model(**inputs).logits[:, -t - 1 : -1]
    y = exit_labels(full, exited, labels)
    visual, prompt = prompt_masks(adapter, inputs, labels)
    feats = gate_features(hidden, visual.to(hidden.device), prompt.to(hidden.device))
    logits = gates.logits(layer, feats)
    loss = nn.functional.cross_entropy(logits, y.to(logits.device))
    return loss, {"exit_share": float(y.float().mean()), "layer": float(layer)}


# -- data --------------------------------------------------------------------------------------------


def builtin_batches(processor: Any, batch_size: int, seed: int, split: str = "train",
                    video_share: float = 0.3) -> Callable[[int], Batch]:
    """Batch ``step`` of built-in questions and captions with their answers (deterministic)."""
    return answer_batches(processor, batch_size, seed, split=split, video_share=video_share)


# -- entry point -------------------------------------------------------------------------------------


def train_gates(model: Any, batches: Callable[[int], Batch], args: argparse.Namespace) -> tuple[ExitGates, dict[str, Any]]:
    from vlmprune.adapters import for_model

    adapter = for_model(model)
    model.requires_grad_(False)
    model.eval()
    layers = len(adapter.decoder_layers)
    hidden = adapter.text_config.hidden_size
    torch.manual_seed(args.seed)
    gates = ExitGates(layers, hidden, args.width)
    gates.reset_parameters()
    gates.to(next(model.parameters()).device)
    layer_of = np.random.default_rng(args.seed).integers(0, layers, size=args.steps)  # one k per step

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        return gate_step(model, adapter, gates, batches(step), int(layer_of[step]))

    out = Path(args.output)
    cfg = LoopConfig(
        steps=args.steps, lr=args.lr, weight_decay=0.0, warmup=max(1, int(0.03 * args.steps)), seed=args.seed,
        max_minutes=args.minutes, log_every=10, checkpoint_every=25,
        resume_file=out / "train-state.pt" if not args.no_resume else None, desc="dyvte gates",
    )
    with torch.enable_grad():  # callers may sit in no_grad / inference mode
        result = train_loop({"gates": gates}, list(gates.parameters()), step_fn, cfg)
    return gates.eval(), result


@torch.no_grad()
def exit_report(model: Any, gates_file: str | Path, batches: Callable[[int], Batch], steps: int) -> dict[str, Any]:
    """Exit layers the trained gates choose on held-out prompts, and how often the exited model's
    greedy answer agrees with the full model's.

    The gates decide from the prompt alone, as in a real prefill (a teacher-forced pass with the
    answer inside would hand them the answer's last token instead); each sample's answer is then
    scored with the visual tokens gone from its own exit layer on.
    """
    from vlmprune.adapters import for_model

    adapter = for_model(model)
    layers = len(adapter.decoder_layers)
    gates = load_gates(gates_file, layers, adapter.text_config.hidden_size)
    gates.to(next(model.parameters()).device, torch.float32)
    exits, agree = [], []
    for step in range(steps):
        inputs, answer_len = batches(step)
        labels = answer_labels(inputs["input_ids"], answer_len)
        t = labels.shape[1]
        captured, full = layer_outputs(model, adapter, inputs, t, list(range(layers)))
        visual, prompt = (m.to(full.device) for m in prompt_masks(adapter, inputs, labels))
        exit_at = torch.full((labels.shape[0],), layers)
        for layer in reversed(range(layers)):  # the first router that fires wins
            fire = exit_decision(gates.logits(layer, gate_features(captured[layer], visual, prompt))).cpu()
            exit_at[fire] = layer + 1
        out = full.argmax(-1)
        for k in exit_at.unique().tolist():
            if k < layers:
                with vlmprune.apply(model, DyVTEConfig(exit_layer=k)):
                    pred = model(**inputs).logits[:, -t - 1 : -1].argmax(-1)
                out[exit_at == k] = pred[exit_at == k]
        ok = ((full.argmax(-1) == out) | (labels < 0)).all(dim=1)
        exits += exit_at.tolist()
        agree += ok.tolist()
    counts = {int(k): int(v) for k, v in zip(*np.unique(exits, return_counts=True))}
    return {"mean_exit_layer": float(np.mean(exits)), "exit_layer_counts": counts,
            "agreement_with_full": float(np.mean(agree)), "samples": len(exits)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmprune train-gates", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin", help="'builtin' or a local checkpoint directory")
    p.add_argument("--data", default="builtin", help="'builtin' or a JSON-lines file (see the module docstring)")
    p.add_argument("--output", required=True, help="directory for gates.safetensors, its JSON recipe and the resume state")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="the reference uses 6e-5 for 7B/13B models at batch 128")
    p.add_argument("--width", type=int, default=2048, help="router hidden width (the reference: 2048)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the exit report")
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prepare_run(args, ("steps", "batch_size", "width"))
    began = time.time()
    model, processor = load_model(args.model, args.device)
    batches, held_out = train_and_held_out(processor, args, builtin_batches)
    gates, result = train_gates(model, batches, args)
    recipe = dict(vars(args))
    info = {"recipe": recipe, "steps": result["steps"], "train_minutes": round(result["minutes"], 2),
            "last": result["history"][-1:]}
    path = save_gates(gates, args.output, extra=info)
    report = exit_report(model, path, held_out, args.eval_batches)
    info["held_out"] = report
    save_gates(gates, args.output, extra=info)
    print(json.dumps({"gates": str(path), "minutes": round((time.time() - began) / 60, 2), **report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
