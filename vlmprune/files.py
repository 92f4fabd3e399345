"""Small trained files (gates, drafts, adapters, thresholds): one rule for finding them."""

from __future__ import annotations

import os
import re
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


def _first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_dir(path: str | Path, option: str = "--output") -> Path:
    """``path`` as a directory this process can create or write into, checked before any long work
    (a run that trains or evaluates for minutes must not fail at its very end); a ValueError naming
    ``option`` otherwise. Nothing is created here."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{option} {str(path)!r} is an existing file; give a directory")
    base = _first_existing(p)
    if not base.is_dir():
        raise ValueError(f"{option} {str(path)!r}: {str(base)!r} is a file, so no directory can be made below it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {str(path)!r}: {str(base)!r} is not writable")
    return p


def writable_file(path: str | Path, option: str = "--output") -> Path:
    """``path`` as a file this process can write (its directory may not exist yet); see :func:`writable_dir`."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a directory; give a file name")
    writable_dir(p.parent, option)
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{option} {str(path)!r} is not writable")
    return p


#: what a Hugging Face hub id looks like: ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
#: endings of files, which a model argument never names
_FILE_ENDINGS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".gguf", ".onnx")


def looks_like_hub_id(spec: str) -> bool:
    """Whether a ``--model`` value that is not a local directory could be a hub id
    (``llava-hf/llava-1.5-7b-hf``, dots included) rather than a mistyped path (``./ckpt``,
    ``/data/model``, ``a/b/c``, ``model.safetensors``)."""
    return bool(_HUB_ID.fullmatch(spec)) and not spec.lower().endswith(_FILE_ENDINGS)
