"""The built-in benchmark as the library sees it (the ``vlmprune.benchmarks`` entry point
``builtin``): its model, its data and the checkpoint directory its artifacts ship in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import builtin, data
from .training_data import Batch, answer_batches

__all__ = ["builtin", "data", "Batch", "answer_batches", "checkpoint_dir", "load_model", "named_checkpoints"]


def checkpoint_dir() -> Path:
    return builtin.CHECKPOINT


def named_checkpoints() -> dict[str, Path]:
    """Shipped checkpoints a command line may name instead of a path (``--model captioner``)."""
    return {"builtin": builtin.CHECKPOINT, "captioner": Path(__file__).parent / "captioner"}


def load_model(path: str | Path | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """The shipped built-in model and processor (or a checkpoint saved in its layout)."""
    return builtin.load_builtin(path, device=device)
