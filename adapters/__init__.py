"""Model-family adapters (installed as ``vlmprune.adapters``)."""

from __future__ import annotations

import importlib
from typing import Any

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


def for_config(config: Any) -> type[Adapter] | None:
    """The adapter class of a VLM config (by its ``model_type``), or None for an unsupported one;
    for work that has a config but no model (FLOPs estimates)."""
    model_type = getattr(config, "model_type", None)
    return next((cls for cls in ADAPTERS if model_type in cls.model_types), None)


def for_text_config(text_config: Any) -> type[Adapter]:
    """The adapter class whose family owns this text config (``text_model_types``), else the base
    :class:`Adapter`, whose defaults hold for the decoders the families share (Llama, Qwen2, ...)."""
    model_type = getattr(text_config, "model_type", None)
    return next((cls for cls in ADAPTERS if model_type in cls.text_model_types), Adapter)


__all__ = ["Adapter", "ADAPTERS", "for_config", "for_model", "for_text_config", "supported_classes"]
