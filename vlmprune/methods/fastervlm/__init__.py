"""FasterVLM: [CLS]-attention pruning before the LLM."""

from .config import FasterVLMConfig
from .method import FasterVLM

__all__ = ["FasterVLMConfig", "FasterVLM"]
