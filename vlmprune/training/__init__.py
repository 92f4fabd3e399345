"""The one training loop the trainable parts share (the built-in model, DyVTE gates, slow-fast
hybrid layers, FLASH drafts); each method's training step lives in its own folder."""

from .loop import LoopConfig, add_run_args, prepare_run, train_loop

__all__ = ["LoopConfig", "add_run_args", "prepare_run", "train_loop"]
