"""DivPrune: max-min diversity selection of the visual tokens before the LLM."""

from .config import DivPruneConfig
from .method import DivPrune

__all__ = ["DivPruneConfig", "DivPrune"]
