"""``vlmprune.apply``: patch one model instance, get a handle that can undo it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from . import registry
from .hooks import HookSet
from .method import Method, MethodConfig, Stage
from .stats import Stats

_ATTR = "_vlmprune_handles"


class Handle:
    """What ``apply`` returns: the installed methods, their stats, and ``remove()``.

    Usable as a context manager; removing restores the model's modules and attributes exactly,
    and removing twice is a no-op.
    """

    def __init__(self, model: nn.Module, methods: list[Method], hooks: HookSet) -> None:
        self.model = model
        self.methods = methods
        self._hooks = hooks
        self.stats = Stats()
        self.removed = False

    @property
    def config(self) -> MethodConfig | list[MethodConfig]:
        configs = [m.config for m in self.methods]
        return configs[0] if len(configs) == 1 else configs

    @property
    def stages(self) -> list[Stage]:
        return [m.config.stage for m in self.methods]

    def flops(self, inputs: dict[str, Any], generated_tokens: int = 0) -> Any:
        """FLOPs of the last patched call on ``inputs`` (the convention of docs/flops.md), as a FlopsReport.

        The LLM is counted at the padded length it really ran at, plus the method's own overhead.
        """
        from .flops import estimate

        record = self.stats.last
        if record is None:
            raise RuntimeError("no patched call has run yet: call the model (or generate) first")
        import dataclasses

        lengths = record.layer_seq_len or record.seq_len  # per decoder layer for in-LLM exits
        call = [r for r in self.stats.records if r.call == record.call]
        overhead = sum(r.overhead_flops for r in call)
        report = estimate(
            self.model, inputs, lengths, generated_tokens=generated_tokens,
            overhead=overhead, batch_size=len(record.llm_tokens),
        )
        ran = [r for r in call if r.vision_flops is not None]  # an encoder-stage method (DyMU) shrank it
        if ran:
            report = dataclasses.replace(report, vision=ran[-1].vision_flops,
                                         projector=ran[-1].projector_flops or report.projector)
        return report

    def remove(self) -> None:
        if self.removed:
            return
        self._hooks.remove()
        handles = self.model.__dict__.get(_ATTR, [])
        if self in handles:
            handles.remove(self)
        if not handles:
            self.model.__dict__.pop(_ATTR, None)
        self.removed = True

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = "+".join(m.label for m in self.methods)
        state = "removed" if self.removed else "active"
        return f"<vlmprune.Handle {names} on {type(self.model).__name__} ({state})>"


def _as_configs(method: Any, options: dict) -> list[MethodConfig]:
    if isinstance(method, MethodConfig):
        if options:
            raise TypeError("pass options inside the config object, not as keyword arguments")
        return [method]
    if isinstance(method, str):
        return [registry.make_config(method, options)]
    if isinstance(method, Sequence):
        items = list(method)
        if not items:
            raise ValueError("no method given")
        if options and any(isinstance(m, str) for m in items) and len(items) > 1:
            raise TypeError(
                "keyword options are ambiguous with several methods; pass config objects, e.g. "
                "vlmprune.apply(model, [vlmprune.FasterVLMConfig(ratio=0.9), ...])"
            )
        out = []
        for item in items:
            out.extend(_as_configs(item, options if isinstance(item, str) else {}))
        return out
    raise TypeError(f"method must be a name, a config object or a list of them; got {method!r}")


def _check_composition(existing: list[MethodConfig], new: list[MethodConfig]) -> None:
    seen = list(existing)
    for cfg in new:
        for other in seen:
            if other.stage == cfg.stage and not (
                cfg.method in other.composes_with or other.method in cfg.composes_with
            ):
                raise ValueError(
                    f"cannot apply {cfg.method!r} on top of {other.method!r}: both act at stage "
                    f"{cfg.stage.name.lower()} and do not compose. Remove the first handle "
                    "(handle.remove()) before applying another method at the same stage."
                )
        seen.append(cfg)


class _UnpatchedCopy:
    """``model.__deepcopy__`` / ``model.__reduce_ex__`` while a handle is active (instance attributes,
    restored by ``remove()``): a deep copy, ``pickle`` and ``torch.save(model)`` give the *unpatched*
    model, like ``save_pretrained``. Copying the hooks would give a copy whose hooks still act for the
    original's handle (an unpruned copy listing a stale "active" handle); pickling them fails. Apply
    the method again on the copy (or after loading) to patch it."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        self.model = model
        self.kind = kind

    def __call__(self, arg: Any = None) -> Any:
        if self.kind == "deepcopy":
            return unpatched_copy(self.model, arg if isinstance(arg, dict) else {})
        clean = unpatched_copy(self.model, {})
        local = sorted({fn.__qualname__ for module in clean.modules()
                        for hooks in (module._forward_hooks, module._forward_pre_hooks) for fn in hooks.values()
                        if "<locals>" in getattr(fn, "__qualname__", "")})
        if local:
            raise TypeError(
                f"vlmprune: this model cannot be pickled: it carries hooks pickle cannot save ({', '.join(local)}), "
                "which are not vlmprune's (the unpatched model fails the same way; transformers installs them "
                "on the first forward). Save with model.save_pretrained(DIR) (the weights, without vlmprune's "
                "patches) or torch.save(model.state_dict(), PATH), and apply the method again after loading."
            )
        return clean.__reduce_ex__(arg if isinstance(arg, int) else 4)


def unpatched_copy(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy of ``model`` without any vlmprune patch or handle (the original stays patched)."""
    import copy

    memo = {} if memo is None else memo
    handles: list[Handle] = model.__dict__.get(_ATTR, [])
    memo[id(handles)] = []  # the copy starts with no handles (and the handles are not copied)
    for handle in handles:
        memo[id(handle)] = None
    own = {k: model.__dict__.pop(k) for k in ("__deepcopy__", "__reduce_ex__") if k in model.__dict__}
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        model.__dict__.update(own)
    for handle in handles:
        handle._hooks.scrub_copy(memo)
    clone.__dict__.pop(_ATTR, None)
    for key in own:
        clone.__dict__.pop(key, None)
    return clone


def _refuse_compiled(model: nn.Module) -> None:
    """A model already compiled with ``torch.compile`` would keep running its traced graph, in which
    hooks added later never run (dynamo does not guard on hooks): the method would be silently
    bypassed. Refuse the wrapper itself, and drop the traces of this model class's forward so a
    compiled wrapper made earlier re-traces and meets the patched forward's own refusal."""
    import torch

    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "vlmprune.apply got a torch.compile wrapper; apply to the model itself (compiled._orig_mod). "
            "A patched model runs eagerly: the number of visual tokens kept is decided at run time. "
            "To compile, remove the handle first."
        )
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise TypeError(
            "vlmprune.apply: this model was compiled in place (model.compile()); a patched model runs "
            "eagerly, so load or build it again without compiling, then apply."
        )
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    code = type(model).forward.__code__
    if _debug_get_cache_entry_list(code):
        torch._dynamo.reset_code(code)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """A peft model (LoRA and the like, unmerged) runs its base model's forward and generate, whose
    layers already apply the adapters; patching that base instance covers every call through the
    wrapper. Duck-typed, so peft is imported only by whoever built the wrapper."""
    if type(model).__module__.split(".")[0] != "peft" or not callable(getattr(model, "get_base_model", None)):
        return model
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        raise TypeError(
            f"vlmprune.apply: this peft model uses {type(config).__name__}, which prepends virtual tokens "
            "to the sequence outside the model; the visual token columns would not be where the model's "
            "own forward puts them. Weight adapters (LoRA, IA3, ...) are supported."
        )
    return model.get_base_model()


def apply(model: nn.Module, method: Any = "fastervlm", **options: Any) -> Handle:
    """Patch ``model`` in place with one method (or a list, composed in stage order).

    ``method`` is a registered name (see :func:`available_methods`) with its options as keyword
    arguments, a config object such as ``FasterVLMConfig(ratio=0.9)``, or a list of either.
    Only this instance changes; ``handle.remove()`` or leaving a ``with`` block restores it. A peft
    wrapper (e.g. an unmerged LoRA fine-tune) is patched through its base model.
    """
    from vlmprune.adapters import for_model

    _refuse_compiled(model)
    model = _unwrap_peft(model)
    _refuse_compiled(model)
    configs = sorted(_as_configs(method, options), key=lambda c: int(c.stage))
    adapter = for_model(model)
    active: list[Handle] = model.__dict__.get(_ATTR, [])
    _check_composition([c for h in active for c in (m.config for m in h.methods)], configs)
    hooks = HookSet()
    methods = [registry.method_for_config(cfg)(cfg, adapter) for cfg in configs]
    handle = Handle(model, methods, hooks)
    try:
        for m in methods:
            m.install(hooks, handle)
        hooks.set_attr(model, "__deepcopy__", _UnpatchedCopy(model, "deepcopy"))
        hooks.set_attr(model, "__reduce_ex__", _UnpatchedCopy(model, "pickle"))
    except BaseException:
        hooks.remove()
        raise
    model.__dict__.setdefault(_ATTR, []).append(handle)
    return handle
