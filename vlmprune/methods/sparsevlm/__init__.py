"""SparseVLM: text raters score the visual tokens at a few layers; pruned ones are recycled into
a handful of merged tokens."""

from .config import SparseVLMConfig
from .method import SparseVLM

__all__ = ["SparseVLMConfig", "SparseVLM"]
