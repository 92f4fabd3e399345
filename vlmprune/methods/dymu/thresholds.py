"""DyMU's thresholds files: the calibrated per-block thresholds, tied to one vision tower by a
fingerprint, and the presets shipped for the built-in model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vlmprune.artifacts import shipped

from .config import ThresholdsError, _as_threshold

FORMAT = "vlmprune-dymu-thresholds/1"

#: how to make thresholds for a model, named in every thresholds error (the CLI and the Python call)
HOW_TO_CALIBRATE = (
    "calibrate thresholds for this model with `vlmprune calibrate dymu --model <model dir> --target-tokens N "
    "--output thresholds.json` or, in Python, `result = vlmprune.methods.dymu.calibrate.calibrate(model, "
    "pixel_values, target_tokens=N, **other_processor_outputs)` then "
    "`vlmprune.methods.dymu.calibrate.write('thresholds.json', model, result)`"
)


def preset_dir() -> Path:
    """Where the built-in model's presets live (its shipped ``dymu/`` folder)."""
    return shipped("dymu")


def fingerprint(vision_config: Any) -> dict[str, Any]:
    """The vision-tower sizes a thresholds file is tied to."""
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "image_size", "patch_size", "depth", "embed_dim")
    return {k: getattr(vision_config, k, None) for k in keys if getattr(vision_config, k, None) is not None}


def save_thresholds(path: str | Path, thresholds: list[float], vision_config: Any, **info: Any) -> Path:
    """Write the thresholds file: per-block thresholds, calibration info and the model fingerprint (inf as null)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": FORMAT,
        "encoder_id": vision_config.model_type,
        "image_size": getattr(vision_config, "image_size", None),
        **info,
        "thresholds": [None if not math.isfinite(t) else float(t) for t in thresholds],
        "fingerprint": fingerprint(vision_config),
    }
    p.write_text(json.dumps(data, indent=1))
    return p


def load_thresholds(source: Any, vision_config: Any, count: int | None = None) -> tuple[list[float], dict[str, Any]]:
    """Thresholds (one per vision block, or ``count`` merge rounds) from a file, a preset name resolved by
    the caller, or a list; checked against this model's vision tower."""
    layers = int(count if count is not None else vision_config.num_hidden_layers)
    if isinstance(source, (list, tuple)):
        values, info = [_as_threshold(t) for t in source], {}
    else:
        p = Path(source)
        if not p.is_file():
            raise ThresholdsError(f"no DyMU thresholds file at {str(source)!r}; {HOW_TO_CALIBRATE}")
        try:
            info = json.loads(p.read_text())
            values = [_as_threshold(t) for t in info["thresholds"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ThresholdsError(f"{p} is not a DyMU thresholds file ({exc}); {HOW_TO_CALIBRATE}") from exc
        want = fingerprint(vision_config)
        have = info.get("fingerprint")
        diff = {k: (v, want.get(k)) for k, v in (have or {}).items() if v != want.get(k)}
        if diff:
            raise ThresholdsError(
                f"the DyMU thresholds in {p} were calibrated for another vision tower "
                f"(file vs this model: {diff}); {HOW_TO_CALIBRATE}"
            )
    if len(values) != layers:
        raise ThresholdsError(
            f"{len(values)} DyMU thresholds given, but this model merges in {layers} blocks / rounds; {HOW_TO_CALIBRATE}"
        )
    return values, info
