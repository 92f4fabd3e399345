"""Data and model loading the trainers share: teacher-forcing batches (the built-in benchmark's,
through :func:`vlmprune.artifacts.builtin_benchmark`, or a JSON-lines file with one
``{"image": path | [paths], "prompt": str, "answer": str}`` per line, where ``prompt`` already holds
the processor's image placeholder(s) and chat template), and ``--model builtin`` or a local
checkpoint. Nothing is downloaded."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: model inputs (left-padded, answers last) and the number of answer tokens per sample
Batch = tuple[dict[str, Tensor], Tensor]


def answer_batches(processor: Any, batch_size: int, seed: int, **options: Any) -> Callable[[int], Batch]:
    """The built-in benchmark's batches (see its ``answer_batches``)."""
    from vlmprune.artifacts import builtin_benchmark

    return builtin_benchmark().answer_batches(processor, batch_size, seed, **options)


def answer_labels(input_ids: Tensor, answer_len: Tensor) -> Tensor:
    """(B, T) targets of the last T tokens (T = the longest answer), -100 where a sample's answer
    is shorter; logits ``[:, -T-1:-1]`` score them."""
    t = int(answer_len.max())
    labels = input_ids[:, -t:].clone()
    cols = torch.arange(t).unsqueeze(0)
    labels[cols < (t - answer_len.unsqueeze(1))] = -100
    return labels


def train_and_held_out(processor: Any, args: Any, builtin: Callable[..., Callable[[int], Batch]]
                       ) -> tuple[Callable[[int], Batch], Callable[[int], Batch]]:
    """Training and held-out batches for a trainer's ``--data``: the built-in split's train and val
    seeds, or a JSONL file (which has no held-out part, so the report reuses it)."""
    if args.data == "builtin":
        return (builtin(processor, args.batch_size, args.seed),
                builtin(processor, args.batch_size, args.seed + 1, split="val"))
    batches = jsonl_batches(processor, args.data, args.batch_size, args.seed)
    return batches, batches


def jsonl_batches(processor: Any, path: str | Path, batch_size: int, seed: int) -> Callable[[int], Batch]:
    """Batches from a JSON-lines file (see the module docstring), shuffled per epoch."""
    from PIL import Image

    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            images = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
            records.append((images, str(rec["prompt"]), str(rec["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected {{\"image\", \"prompt\", \"answer\"}} ({exc})") from None
    if not records:
        raise ValueError(f"{path}: no records")
    tok = processor.tokenizer
    tok.padding_side = "left"
    base = Path(path).parent

    def make(step: int) -> Batch:
        per_epoch = max(1, len(records) // batch_size)
        order = np.random.default_rng(seed + step // per_epoch).permutation(len(records))
        chosen = [records[i] for i in order[(step % per_epoch) * batch_size :][:batch_size]]
        texts, imgs, lengths = [], [], []
        for images, prompt, answer in chosen:
            texts.append(prompt + answer)
            imgs += [Image.open(p if Path(p).is_absolute() else base / p).convert("RGB") for p in images]
            lengths.append(len(tok(answer, add_special_tokens=False)["input_ids"]))
        inputs = dict(processor(images=imgs, text=texts, return_tensors="pt", padding=True))
        return inputs, torch.tensor(lengths)

    return make


def load_model(spec: str, device: str) -> tuple[Any, Any]:
    if spec == "builtin":
        from vlmprune.artifacts import builtin_benchmark

        return builtin_benchmark().load_model(device=device)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmprune.artifacts import named_checkpoint
    from vlmprune.files import looks_like_hub_id

    path = Path(named_checkpoint(spec))
    hub = not path.is_dir() and looks_like_hub_id(spec)
    if not path.is_dir() and not hub:
        raise ValueError(f"--model {spec!r}: expected 'builtin', 'captioner', a local checkpoint directory "
                         "or a hub id")
    source = spec if hub else path
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=not hub).to(device).eval()
        processor = AutoProcessor.from_pretrained(source, local_files_only=not hub)
    except OSError as exc:  # not found locally / on the hub, or the hub unreachable
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--model {spec!r}: cannot load it{' from the hub' if hub else ''}: {first}") from None
    return model, processor


def check_data(spec: str, option: str = "--data") -> None:
    """``builtin`` or an existing JSON-lines file, checked before the model loads."""
    if spec != "builtin" and not Path(spec).is_file():
        raise ValueError(f"{option} {spec!r}: expected 'builtin' or an existing JSON-lines file")
