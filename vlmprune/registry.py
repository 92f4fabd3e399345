"""Method name -> (config class, method class), filled by the methods themselves.

Every method folder under ``vlmprune/methods/`` decorates its method class with
:func:`register_method`; the registry imports those folders on first use, then loads the
``vlmprune.methods`` entry-point group, so a third-party package joins by declaring::

    [project.entry-points."vlmprune.methods"]
    mymethod = "mypackage.mymethod"      # a module that calls @vlmprune.register_method

There is no hand-written list of methods anywhere.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from importlib.metadata import entry_points

from .method import Method, MethodConfig

ENTRY_POINT_GROUP = "vlmprune.methods"

_REGISTRY: dict[str, tuple[type[MethodConfig], type[Method]]] = {}
_discovered = False


def register_method(method_cls: type[Method]) -> type[Method]:
    """Class decorator: make ``method_cls`` (whose ``config_class.method`` is its name) available to
    ``vlmprune.apply``, ``vlmprune-eval`` and the CLI. Registering a second class under a taken name
    is an error, so two packages cannot silently shadow each other."""
    config_cls = getattr(method_cls, "config_class", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"{method_cls.__name__} needs a config_class (a MethodConfig subclass) to be registered")
    name = config_cls.method
    if not name or not isinstance(name, str):
        raise TypeError(f"{config_cls.__name__}.method must be a non-empty name")
    known = _REGISTRY.get(name)
    if known is not None and known != (config_cls, method_cls):
        raise ValueError(
            f"method name {name!r} is already registered by {known[1].__module__}.{known[1].__name__}"
        )
    _REGISTRY[name] = (config_cls, method_cls)
    return method_cls


def _discover() -> None:
    """Import the built-in method folders, then the entry-point group (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    from . import methods

    for info in pkgutil.iter_modules(methods.__path__, methods.__name__ + "."):
        importlib.import_module(info.name)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the built-in methods down
            warnings.warn(f"vlmprune: could not load method plugin {ep.name!r} ({ep.value}): {exc}", stacklevel=2)
            continue
        if isinstance(obj, type) and issubclass(obj, Method) and getattr(obj, "config_class", None):
            register_method(obj)


def available_methods() -> list[str]:
    """Names accepted by ``vlmprune.apply(model, method=...)``."""
    _discover()
    return sorted(_REGISTRY)


def lookup(name: str) -> tuple[type[MethodConfig], type[Method]]:
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}")
    return _REGISTRY[name]


def config_classes() -> dict[str, type[MethodConfig]]:
    """Config class name -> class, for every registered method (``vlmprune.FasterVLMConfig`` etc.)."""
    _discover()
    return {cfg.__name__: cfg for cfg, _ in _REGISTRY.values()}


def method_for_config(config: MethodConfig) -> type[Method]:
    _discover()
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
