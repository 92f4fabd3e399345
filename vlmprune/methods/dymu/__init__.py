"""DyMU: dynamic token merging in the vision encoder, virtual unmerging in the LLM."""

from .config import PRESETS, VTU_CHOICES, DyMUConfig, ThresholdsError
from .method import DyMU, VTUState, flops, post_merge, threshold_rule, vtu_attention
from .thresholds import FORMAT, fingerprint, load_thresholds, preset_dir, save_thresholds

__all__ = ["PRESETS", "VTU_CHOICES", "DyMUConfig", "ThresholdsError", "DyMU", "VTUState", "flops", "post_merge",
           "threshold_rule", "vtu_attention", "FORMAT", "fingerprint", "load_thresholds", "preset_dir",
           "save_thresholds"]
