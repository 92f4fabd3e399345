"""State for one forward call, kept out of module globals.

A patched forward opens a :class:`CallContext` when the outermost patched module is entered and
closes it when that module returns (also on an exception). Hooks deeper in the model (the vision
encoder layer that scores tokens, the decoder seam that removes them) find it through a
``ContextVar``, so two threads running the same patched model never see each other's state.
"""

from __future__ import annotations

import contextvars
import itertools
from dataclasses import dataclass, field
from typing import Any

_SERIALS = itertools.count(1)
_CURRENT: contextvars.ContextVar[tuple[CallContext, ...]] = contextvars.ContextVar("vlmprune_call", default=())


@dataclass
class CallContext:
    owner: object  # the Handle that opened it
    inputs: dict[str, Any] = field(default_factory=dict)  # the multimodal model's call kwargs
    captured: dict[str, list[Any]] = field(default_factory=dict)  # per vision-tower call, in call order
    columns: Any = None  # column map of the last pruning, for labels
    visual: Any = None  # (B, n) bool: visual columns of the sequence the decoder received
    llm_state: Any = None  # the in-LLM seam's state for this call (vlmprune.seams.in_llm.ExitState)
    decision_flops: float = 0.0  # the pre-LLM method's own decision cost in this call (e.g. a DPP)
    token: contextvars.Token | None = None
    depth: int = 0
    serial: int = field(default_factory=lambda: next(_SERIALS))  # tells the records of one call apart

    def capture(self, key: str, value: Any) -> None:
        self.captured.setdefault(key, []).append(value)


def current(owner: object | None = None) -> CallContext | None:
    """The open context of ``owner`` (several handles on one model each have their own), or the
    innermost one when no owner is given."""
    stack = _CURRENT.get()
    if owner is None:
        return stack[-1] if stack else None
    for ctx in reversed(stack):
        if ctx.owner is owner:
            return ctx
    return None


def enter(owner: object, inputs: dict[str, Any]) -> CallContext:
    """Open a context for ``owner`` or re-enter the one already open (nested patched modules)."""
    ctx = current(owner)
    if ctx is not None:
        ctx.depth += 1
        for key, value in inputs.items():
            if value is not None:
                ctx.inputs.setdefault(key, value)
        return ctx
    ctx = CallContext(owner=owner, inputs={k: v for k, v in inputs.items() if v is not None})
    ctx.token = _CURRENT.set((*_CURRENT.get(), ctx))
    return ctx


def leave(owner: object) -> CallContext | None:
    ctx = current(owner)
    if ctx is None:
        return None
    if ctx.depth > 0:
        ctx.depth -= 1
        return None
    stack = _CURRENT.get()
    _CURRENT.set(tuple(c for c in stack if c is not ctx))
    return ctx
