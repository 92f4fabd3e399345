"""vlmprune: visual-token reduction for Hugging Face vision-language models."""

from typing import Any

from .api import Handle, apply
from .method import Method, MethodConfig, Stage
from .registry import available_methods, register_method

__version__ = "0.1.0"

__all__ = ["apply", "Handle", "available_methods", "register_method", "Method", "MethodConfig", "Stage"]


def __getattr__(name: str) -> Any:
    """Every registered method's config class, e.g. ``vlmprune.FasterVLMConfig`` (no hand-kept list)."""
    if name.endswith("Config"):
        from .registry import config_classes

        found = config_classes().get(name)
        if found is not None:
            return found
    raise AttributeError(f"module 'vlmprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    from .registry import config_classes

    return sorted([*globals(), *config_classes()])
