"""The per-call scope every seam shares: open the call context, and fix the loss afterwards.

Seams that shorten the LLM's sequence (pre-LLM pruning, DyVTE's exit) make the model's logits
shorter than the ``labels`` a user passed. The scope takes the labels out of the call before the
stock model sees them and, when the call returns, computes the loss on the columns that survived
(``ctx.columns``), so training and evaluation losses stay correct under any composition.
It is installed once per handle, however many seams the handle's methods use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import context
from ..sequence import gather_columns

#: inputs of the multimodal model that adapters may need to locate visual tokens
CAPTURED_INPUTS = (
    "input_ids",
    "inputs_embeds",
    "attention_mask",
    "mm_token_type_ids",
    "image_sizes",
    "image_grid_thw",
    "video_grid_thw",
    "pixel_values",
    "pixel_values_videos",
    "image_sizes_videos",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "mm_encoder_outputs",
    "batch_num_images",
    "vision_aspect_ratio",
)


def refuse_compiled_call() -> None:
    """Patched forwards run eagerly: under ``torch.compile`` the hooks would be traced once (or
    skipped, for a wrapper compiled before ``apply``) and the per-call state they share would not
    survive tracing, so the method would be bypassed or fail obscurely. Say so instead. Checked
    where the call enters the model, which runs eagerly even inside a compiled wrapper."""
    in_wrapper = getattr(torch._dynamo.eval_frame, "_is_in_optimized_module", lambda: False)
    if torch.compiler.is_compiling() or in_wrapper():
        raise RuntimeError(
            "vlmprune: a model patched by vlmprune.apply cannot run under torch.compile (the number of "
            "visual tokens kept is decided at run time); call the model itself instead of the compiled "
            "wrapper, or compile after handle.remove()"
        )


def install_scope(adapter: Any, hooks: Any, handle: Any) -> None:
    """Open ``handle``'s call context around the top model and its inner model (once per handle)."""
    if getattr(handle, "_scope_installed", False):
        return
    handle._scope_installed = True

    def enter(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        refuse_compiled_call()
        inputs = {k: kwargs.get(k) for k in CAPTURED_INPUTS}
        if args and inputs["input_ids"] is None and isinstance(args[0], Tensor):
            inputs["input_ids"] = args[0]
        ctx = context.enter(handle, inputs)
        if module is adapter.model and kwargs.get("labels") is not None:
            kwargs = dict(kwargs)
            ctx.inputs["labels"] = kwargs.pop("labels")
        return args, kwargs

    def leave(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        ctx = context.current(handle)
        if ctx is not None and ctx.depth == 0 and output is not None and "labels" in ctx.inputs:
            labels = ctx.inputs["labels"]
            if ctx.columns is not None:
                labels = gather_columns(labels, ctx.columns, -100)
            logits = output.logits
            output.loss = module.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        context.leave(handle)
        return output

    for module in (adapter.model, adapter.inner):
        hooks.forward_pre(module, enter, with_kwargs=True)
        hooks.forward(module, leave, with_kwargs=True, always_call=True)


def ensure_cache(module: Any, kwargs: dict, cache_key: str, cache: Any) -> Any:
    """The KV cache a decoder call will fill, created now (and put into ``kwargs``) when the call
    caches but brought none: seams key their decode-step state on this object, so it must exist
    before the decoder would otherwise create its own."""
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", False)
    if use_cache and cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=module.config)
        kwargs[cache_key] = cache
    return cache
