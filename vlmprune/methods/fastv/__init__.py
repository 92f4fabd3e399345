"""FastV: visual tokens ranked by the attention the last token pays them, pruned after layer K."""

from .config import FastVConfig
from .method import FastV

__all__ = ["FastVConfig", "FastV"]
