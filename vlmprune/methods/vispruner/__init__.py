"""VisPruner: [CLS]-attention importance plus similarity-based diversity, before the LLM."""

from .config import VisPrunerConfig
from .method import VisPruner

__all__ = ["VisPrunerConfig", "VisPruner"]
