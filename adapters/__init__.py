"""Model-family adapters (installed as ``vlmprune.adapters``)."""

from __future__ import annotations

import importlib

from torch import nn

from .base import Adapter

_MODULES = ("llava", "llava_next", "qwen2_vl", "internvl")


def _collect() -> list[type[Adapter]]:
    found: list[type[Adapter]] = []
    for name in _MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Adapter) and obj.model_classes and obj not in found:
                found.append(obj)
    return found


ADAPTERS: list[type[Adapter]] = _collect()


def supported_classes() -> list[str]:
    return sorted(name for cls in ADAPTERS for name in cls.model_classes)


def for_model(model: nn.Module) -> Adapter:
    """The adapter for this model instance, or a clear error naming the supported classes."""
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model)
    for cls in ADAPTERS:  # subclasses of a supported class (e.g. a user's wrapper)
        if any(base.__name__ in cls.model_classes for base in type(model).__mro__):
            return cls(model)
    raise TypeError(
        f"vlmprune does not support {name}. Supported model classes: {', '.join(supported_classes())}. "
        "Pass the *ForConditionalGeneration model, not its inner model or vision tower."
    )


__all__ = ["Adapter", "ADAPTERS", "for_model", "supported_classes"]
