"""State for one forward call, kept out of module globals.

A patched forward opens a :class:`CallContext` when the outermost patched module is entered and
closes it when that module returns (also on an exception). Hooks deeper in the model (the vision
encoder layer that scores tokens, the decoder seam that removes them) find it through a
``ContextVar``, so two threads running the same patched model never see each other's state.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

_CURRENT: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("vlmprune_call", default=None)


@dataclass
class CallContext:
    owner: object  # the Handle that opened it
    inputs: dict[str, Any] = field(default_factory=dict)  # the multimodal model's call kwargs
    captured: dict[str, list[Any]] = field(default_factory=dict)  # per vision-tower call, in call order
    columns: Any = None  # column map of the last pruning, for labels
    token: contextvars.Token | None = None
    depth: int = 0

    def capture(self, key: str, value: Any) -> None:
        self.captured.setdefault(key, []).append(value)


def current() -> CallContext | None:
    return _CURRENT.get()


def enter(owner: object, inputs: dict[str, Any]) -> CallContext:
    """Open a context for ``owner`` or re-enter the one already open (nested patched modules)."""
    ctx = _CURRENT.get()
    if ctx is not None and ctx.owner is owner:
        ctx.depth += 1
        for key, value in inputs.items():
            if value is not None:
                ctx.inputs.setdefault(key, value)
        return ctx
    ctx = CallContext(owner=owner, inputs={k: v for k, v in inputs.items() if v is not None})
    ctx.token = _CURRENT.set(ctx)
    return ctx


def leave(owner: object) -> CallContext | None:
    ctx = _CURRENT.get()
    if ctx is None or ctx.owner is not owner:
        return None
    if ctx.depth > 0:
        ctx.depth -= 1
        return None
    _CURRENT.reset(ctx.token)
    return ctx
