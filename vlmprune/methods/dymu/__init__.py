"""DyMU: dynamic token merging in the vision encoder, virtual unmerging in the LLM."""

from .config import PRESETS, VTU_CHOICES, DyMUConfig, ThresholdsError
from .method import (
    POST_MERGE_ROUNDS,
    DyMU,
    VTUState,
    encoder_layout,
    flops,
    post_merge,
    supported_models,
    threshold_rule,
    vtu_attention,
)
from .thresholds import FORMAT, HOW_TO_CALIBRATE, fingerprint, load_thresholds, preset_dir, save_thresholds

__all__ = ["PRESETS", "VTU_CHOICES", "DyMUConfig", "ThresholdsError", "DyMU", "VTUState", "POST_MERGE_ROUNDS",
           "encoder_layout", "flops", "post_merge", "supported_models", "threshold_rule", "vtu_attention", "FORMAT",
           "HOW_TO_CALIBRATE", "fingerprint", "load_thresholds", "preset_dir", "save_thresholds"]
