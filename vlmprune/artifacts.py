"""Where the built-in benchmark and its shipped artifacts come from, without importing it.

The library never imports ``vlmprune.evals``: the built-in benchmark (its model, data and the
small trained files shipped beside the model: DyVTE gates, DyMU presets, the slow-fast hybrid,
the FLASH draft) registers itself under the ``vlmprune.benchmarks`` entry-point group, and code
that trains or calibrates on it asks :func:`builtin_benchmark`. :func:`shipped` is the one
function that locates a shipped artifact.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "vlmprune.benchmarks"


@functools.cache
def builtin_benchmark() -> Any:
    """The built-in benchmark's provider module: ``load_model(device)``, ``checkpoint_dir()``,
    ``answer_batches(...)``, and its ``builtin`` / ``data`` modules."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "builtin"]
    if not found:
        raise RuntimeError(
            "vlmprune: the built-in benchmark is not installed (no 'builtin' entry in the "
            f"{ENTRY_POINT_GROUP!r} entry-point group); reinstall vlmprune (pip install -e .)"
        )
    return found[0].load()


def shipped(*parts: str) -> Path:
    """A file or folder shipped with the built-in model, e.g. ``shipped("dymu", "mid.json")``;
    with no parts, the checkpoint directory itself. The path may not exist (callers say what is
    missing and how to make it)."""
    return Path(builtin_benchmark().checkpoint_dir()).joinpath(*parts)


def named_checkpoint(spec: str | None) -> str | None:
    """``spec`` with a shipped checkpoint's name (``builtin``, ``captioner``) replaced by its
    directory, so an installed package's models can be named without knowing where pip put them;
    anything else is returned as given."""
    if spec is None:
        return None
    try:
        names = getattr(builtin_benchmark(), "named_checkpoints", dict)()
    except RuntimeError:
        return spec
    return str(names[spec]) if spec in names else spec
