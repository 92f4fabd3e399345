"""Small trained files (gates, drafts, adapters, thresholds): one rule for finding them."""

from __future__ import annotations

from pathlib import Path


def local_file(path: str | Path, default_name: str, error: type[Exception], what: str, hint: str) -> Path:
    """``path`` itself, or ``path/default_name`` for a directory; ``error`` naming ``what`` and the
    ``hint`` (how to make one) when it does not exist. Nothing is ever downloaded."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.exists():
        raise error(f"no {what} at {str(path)!r} (expected a .safetensors file or a directory with {default_name}); {hint}")
    return p
