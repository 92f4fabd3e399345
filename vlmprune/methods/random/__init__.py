"""Random visual-token selection before the LLM."""

from .config import RandomConfig
from .method import RandomPrune

__all__ = ["RandomConfig", "RandomPrune"]
