"""The extra-layers seam: a method's own computation added inside chosen decoder layers.

Contract: the method gives the layer indices, a per-call state getter and a ``mix`` function. In
each chosen layer the seam captures what the self-attention received and computed (the rotary
``(cos, sin)`` and the query projection, with the model's own RoPE applied, so the queries are
exactly the self-attention's) and lets ``mix(i, layer, a, q, state)`` rewrite the self-attention
output ``a`` before ``o_proj``. ``o_proj``, the residual and the MLP stay the layer's own; nothing
is patched on a class and no module is replaced, so ``handle.remove()`` restores the model
exactly. ``get_state()`` returns the method's per-call state, which carries a ``scratch`` dict the
seam uses between its hooks; with None (another handle's call, a text-only call) the hooks do
nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

#: mix(layer_index, layer, attention_output (B, n, H*d), queries (B, H, n, d) with RoPE, state) -> new output
Mix = Callable[[int, nn.Module, Tensor, Tensor, Any], Tensor]


def rope_fn(attn: nn.Module) -> Callable:
    """The ``apply_rotary_pos_emb`` of the module that defines ``attn``'s class."""
    module = sys.modules.get(type(attn).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"vlmprune: cannot find apply_rotary_pos_emb for {type(attn).__name__}")
    return fn


def install_extra_layers(
    hooks: Any, decoder_layers: nn.ModuleList, indices: Iterable[int], mix: Mix, get_state: Callable[[], Any],
) -> None:
    """Hook the chosen layers of this model instance (three read-mostly hooks per layer)."""
    for i in indices:
        layer = decoder_layers[i]
        attn = layer.self_attn
        rope = rope_fn(attn)

        def pre_attn(module: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            state = get_state()
            if state is not None:
                state.scratch[i] = {"pe": kwargs.get("position_embeddings")}

        def on_q(module: nn.Module, args: tuple, output: Tensor, i: int = i) -> None:
            state = get_state()
            if state is not None and i in state.scratch:
                state.scratch[i]["q"] = output

        def pre_o(module: nn.Module, args: tuple, i: int = i, layer: nn.Module = layer, attn: nn.Module = attn,
                  rope: Callable = rope) -> tuple | None:
            state = get_state()
            if state is None or i not in state.scratch:
                return None
            seen = state.scratch.pop(i)
            a = args[0]
            bsz, n, _ = a.shape
            q = seen["q"].view(bsz, n, -1, attn.head_dim).transpose(1, 2)
            cos, sin = seen["pe"]
            q, _ = rope(q, q, cos, sin)
            return (mix(i, layer, a, q, state), *args[1:])

        hooks.forward_pre(attn, pre_attn, with_kwargs=True)
        hooks.forward(attn.q_proj, on_q)
        hooks.forward_pre(attn.o_proj, pre_o)
