"""DyVTE: visual tokens exit the LLM after a fixed or learned layer (the in-LLM seam)."""

from .config import DyVTEConfig
from .method import (
    DyVTE,
    ExitGates,
    FixedExit,
    GatedExit,
    GatesError,
    Router,
    exit_decision,
    exit_labels,
    gate_features,
    load_gates,
    save_gates,
)

__all__ = ["DyVTEConfig", "DyVTE", "ExitGates", "FixedExit", "GatedExit", "GatesError", "Router", "exit_decision",
           "exit_labels", "gate_features", "load_gates", "save_gates"]
