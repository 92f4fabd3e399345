"""Slow-fast video tokens: pooled fast tokens in the sequence, gated cross-attention to slow ones."""

from .config import SlowFastConfig
from .method import SlowFast, SlowFastSeam

__all__ = ["SlowFastConfig", "SlowFast", "SlowFastSeam"]
