"""CDPruner: instruction-conditioned diversity (a DPP's greedy MAP) before the LLM."""

from .config import CDPrunerConfig
from .method import CDPruner

__all__ = ["CDPrunerConfig", "CDPruner"]
