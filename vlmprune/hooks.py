"""Instance-scoped, removable patches.

Everything a method changes goes through a :class:`HookSet`, so that ``Handle.remove()`` can put
the model back exactly as it was: PyTorch hook handles are removed and instance attributes that
were replaced are restored (or deleted when the class attribute was showing through). Nothing is
ever patched on a class, so other instances of the same class are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_MISSING = object()


class HookSet:
    """Owns every hook and attribute override one ``apply`` installed."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._overrides: list[tuple[object, str, object]] = []

    def forward_pre(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def forward(
        self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False, always_call: bool = False
    ) -> None:
        self._handles.append(
            module.register_forward_hook(fn, with_kwargs=with_kwargs, always_call=always_call)
        )

    def set_attr(self, obj: object, name: str, value: object) -> None:
        """Override an attribute on this instance only (e.g. wrap a bound method)."""
        previous = obj.__dict__.get(name, _MISSING)
        self._overrides.append((obj, name, previous))
        setattr(obj, name, value)

    def scrub_copy(self, memo: dict[int, Any]) -> None:
        """Take this set's patches off a deep copy of the patched objects (``memo`` is the copy's
        memo: original id -> copy): hooks leave the copied hook dicts, overridden attributes get
        their previous values back, as :meth:`remove` does on the originals."""
        for handle in self._handles:
            for ref in (handle.hooks_dict_ref, *handle.extra_dict_ref):
                original = ref()
                copied = memo.get(id(original)) if original is not None else None
                if copied is not None and handle.id in copied:
                    del copied[handle.id]
        for obj, name, previous in reversed(self._overrides):
            copied = memo.get(id(obj))
            if copied is None:
                continue
            if previous is _MISSING:
                copied.__dict__.pop(name, None)
            else:
                copied.__dict__[name] = memo.get(id(previous), previous)

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        for obj, name, previous in reversed(self._overrides):
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous
        self._overrides.clear()
