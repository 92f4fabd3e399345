"""vlmprune's pre-LLM methods inside vLLM: an out-of-tree plugin (``vllm.general_plugins``).

Ask for a method through vLLM's own ``additional_config``::

    vllm serve DIR --additional-config '{"vlmprune": {"method": "fastervlm", "ratio": 0.9}}'
    LLM(model=DIR, additional_config={"vlmprune": {"method": "fastervlm", "ratio": 0.9}})

Then each image gets ``kept`` placeholder tokens instead of the full grid, and the model's
multimodal embedding returns exactly the rows the method's own ``reduce`` keeps (on [CLS] scores
recomputed from vLLM's own vision attention with :func:`vlmprune.scoring.cls_attention_scores`).
Models: LLaVA-1.5 (:mod:`.llava`), LLaVA-NeXT images (:mod:`.llava_next`: the stock
unpadded AnyRes packing, one group per crop, newlines kept), Qwen2-VL and Qwen2.5-VL (:mod:`.qwen2_vl`: no [CLS], the
adapter's labelled fallback score; kept tokens keep their M-RoPE grid positions through vLLM's own
position recomputation for pruned multimodal embeddings).

How it is wired: vLLM calls :func:`register` in every process, without the configuration. It
installs one inert wrapper on ``EngineArgs.create_engine_config``: without a ``"vlmprune"`` entry
the call goes through untouched and vLLM runs exactly as without the plugin (it also wraps the CPU
model runner's ``load_model``, which acts only on this plugin's configured Qwen models). With one, the
settings are checked (unknown or unsupported method, bad ratio, unsupported model: an error at
start-up) and the engine's ``model_class_overrides`` (a ModelConfig field every vLLM process
applies) points the supported architectures at this package's subclasses, whose processor emits
the kept count and whose ``embed_multimodal`` returns the kept rows.
"""

from __future__ import annotations

import functools
from typing import Any

from .core import CONFIG_KEY, PluginConfigError, Settings, build_method, engine_methods, settings_from

__all__ = ["CONFIG_KEY", "PluginConfigError", "Settings", "register", "settings_from", "build_method",
           "engine_methods", "SUPPORTED"]

#: vLLM architecture -> "module:class" of the plugin's subclass
SUPPORTED = {
    "LlavaForConditionalGeneration": "vlmprune.vllm.llava:PrunedLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "vlmprune.vllm.llava_next:PrunedLlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "vlmprune.vllm.qwen2_vl:PrunedQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vlmprune.vllm.qwen2_vl:PrunedQwen2_5_VLForConditionalGeneration",
}
#: architectures whose kept tokens keep their M-RoPE grid positions (vLLM's position recomputation)
MROPE = frozenset({"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"})
#: the attribute of vLLM's ModelConfig that carries the settings to the processor in every process
MODEL_CONFIG_ATTR = "vlmprune_settings"


def register() -> None:
    """The ``vllm.general_plugins`` entry point (called once per process, idempotent)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_vlmprune", False):
        return

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        settings = settings_from(getattr(self, "additional_config", None))
        if settings is None:
            return original(self, *args, **kwargs)
        build_method(settings)  # method, options, ratio: fail before anything loads
        self.model_class_overrides = {**SUPPORTED, **dict(self.model_class_overrides or {})}
        _forget_resolved_architectures()
        config = original(self, *args, **kwargs)
        check_model(settings, config.model_config)
        object.__setattr__(config.model_config, MODEL_CONFIG_ATTR, settings.as_dict())
        return config

    create_engine_config._vlmprune = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config
    _patch_cpu_runner()


def _patch_cpu_runner() -> None:
    """vLLM's CPU model runner loads the model without setting ``is_multimodal_pruning_enabled`` (the
    GPU runner's ``load_model`` sets it), so it never recomputes M-RoPE positions from pruned
    embeddings. Set it after loading, for this plugin's pruning models only (an engine without the
    configuration never loads one, and keeps vLLM's stock behaviour)."""
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except Exception:  # pragma: no cover - not a CPU build
        return
    original = CPUModelRunner.load_model
    if getattr(original, "_vlmprune", False):
        return

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        model = self.get_model()
        mm = self.model_config.multimodal_config
        if (getattr(model, "_vlmprune", None) is not None and getattr(model, "supports_multimodal_pruning", False)
                and mm is not None and mm.is_multimodal_pruning_enabled()):
            self.is_multimodal_pruning_enabled = True
        return out

    load_model._vlmprune = True  # type: ignore[attr-defined]
    CPUModelRunner.load_model = load_model


def _forget_resolved_architectures() -> None:
    """vLLM memoises the model class per model path in a process; a process that already ran the
    same checkpoint unpruned would otherwise keep the stock class for the processor."""
    try:
        from vllm.model_executor.model_loader import utils
    except ImportError:  # pragma: no cover - a vLLM without the memo
        return
    memo = getattr(utils, "_MODEL_ARCH_BY_HASH", None)
    if isinstance(memo, dict):
        memo.clear()


def settings_of(model_config: Any) -> Settings | None:
    """The settings an engine's ModelConfig carries (None: this engine runs unpruned)."""
    raw = getattr(model_config, MODEL_CONFIG_ATTR, None)
    return None if raw is None else settings_from({CONFIG_KEY: raw})


def check_model(settings: Settings, model_config: Any) -> None:
    """A clear start-up error for a model the plugin cannot prune."""
    archs = list(getattr(model_config, "architectures", None) or [])
    if not any(a in SUPPORTED for a in archs):
        raise PluginConfigError(
            f"vlmprune (vLLM plugin): the architecture {', '.join(archs) or '?'} is not supported; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    if any(a in MROPE for a in archs):
        from .qwen2_vl import check_qwen2_vl_config, enable_position_recompute

        check_qwen2_vl_config(settings, model_config.hf_config)
        enable_position_recompute(model_config)
        return
    if "LlavaNextForConditionalGeneration" in archs:
        from .llava_next import check_next_config

        check_next_config(settings, model_config.hf_config)
        return
    from .llava import check_llava_config

    check_llava_config(settings, model_config.hf_config)
