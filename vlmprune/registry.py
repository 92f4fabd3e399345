"""Method name -> (config class, plugin class)."""

from __future__ import annotations

from .methods.base import Method, MethodConfig
from .methods.baselines import PoolConfig, RandomConfig, RandomPrune, SpatialPool
from .methods.dymu import DyMU, DyMUConfig
from .methods.dyvte import DyVTE, DyVTEConfig
from .methods.fastervlm import FasterVLM, FasterVLMConfig
from .methods.flash import Flash, FlashConfig
from .methods.slowfast import SlowFast, SlowFastConfig

_REGISTRY: dict[str, tuple[type[MethodConfig], type[Method]]] = {}


def register(config_cls: type[MethodConfig], method_cls: type[Method]) -> None:
    _REGISTRY[config_cls.method] = (config_cls, method_cls)


def available_methods() -> list[str]:
    """Names accepted by ``vlmprune.apply(model, method=...)``."""
    return sorted(_REGISTRY)


def lookup(name: str) -> tuple[type[MethodConfig], type[Method]]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}")
    return _REGISTRY[name]


def method_for_config(config: MethodConfig) -> type[Method]:
    for cfg_cls, method_cls in _REGISTRY.values():
        if type(config) is cfg_cls:
            return method_cls
    raise TypeError(f"{type(config).__name__} is not a registered method config")


def make_config(name: str, options: dict) -> MethodConfig:
    config_cls, _ = lookup(name)
    valid = config_cls.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)} for method {name!r}; valid options: {', '.join(valid)}"
        )
    return config_cls(**options)


register(FasterVLMConfig, FasterVLM)
register(RandomConfig, RandomPrune)
register(PoolConfig, SpatialPool)
register(DyVTEConfig, DyVTE)
register(SlowFastConfig, SlowFast)
register(FlashConfig, Flash)
register(DyMUConfig, DyMU)
