"""DART: keep the visual tokens least duplicated with a few pivot tokens, pruned after layer K."""

from .config import DARTConfig
from .method import DART

__all__ = ["DARTConfig", "DART"]
