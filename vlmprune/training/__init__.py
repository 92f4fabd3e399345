"""The one training loop the trainable parts share (built-in model now; gates, drafts later)."""

from .loop import LoopConfig, train_loop

__all__ = ["LoopConfig", "train_loop"]
