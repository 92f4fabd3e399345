"""FLASH: lossless speculative decoding with a latent-aware, semi-autoregressive draft
(Wang et al., arXiv 2505.12728), see ``shared/methods/flash.md``.

``vlmprune.apply(model, "flash", draft=...)`` replaces ``generate`` *on this instance* with the
speculative loop of :mod:`vlmprune.speculative`; the draft (:mod:`vlmprune.methods.draft`) reads
the target's last hidden states, compresses each visual span to a few learned latents on its own
side, and proposes ``k`` tokens per forward. Greedy output is the target's greedy output token for
token, whatever the draft; with sampling, speculative rejection sampling keeps the target's
distribution. ``handle.remove()`` gives the stock ``generate`` back.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Method, MethodConfig, Stage
from .draft import DraftError, DraftHead, DraftSpec, load_draft

#: learned latents per visual span when a draft is built from the config (the paper's 64 for
#: 576-token LLaVA images; families with shorter spans get fewer); a trained draft keeps its own
FAMILY_LATENTS = {"llava": 64, "llava_next": 64, "llava_onevision": 64, "qwen2_vl": 64, "internvl": 64}
TREE_CHOICES = (None, "chain", "static")

#: generation options the speculative loop honours
_SUPPORTED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
              "pad_token_id", "bos_token_id", "use_cache"}
#: options with a neutral value the loop can ignore; anything else set is refused
_NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
            "min_new_tokens": 0, "min_length": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
            "encoder_repetition_penalty": 1.0, "diversity_penalty": 0.0, "num_beam_groups": 1,
            "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
            "output_attentions": False, "output_hidden_states": False}
_REFUSED_KWARGS = ("logits_processor", "stopping_criteria", "streamer", "assistant_model", "prefix_allowed_tokens_fn",
                   "negative_prompt_ids", "synced_gpus")


@dataclass(frozen=True)
class FlashConfig(MethodConfig):
    """``draft``: a draft directory / ``.safetensors`` file, a :class:`DraftHead`, a drafter object
    (``reset`` / ``extend`` / ``propose``, e.g. a test oracle), or None for an untrained head built
    from the model's config (lossless, but slow: it accepts little). ``depth``: drafted tokens per
    round. ``k``: tokens per draft forward (None: the draft's own; may be lowered, not raised).
    ``tree``: drafting structure: None / "chain", or "static" (``branches`` top-w children of the
    last token, each continued as a chain to ``depth``, verified in one target forward with a
    tree mask). ``latents``: Q for a head built from the config
    (None: the family default). ``seed``: seeds the sampling generator (None: torch's global RNG)."""

    method: ClassVar[str] = "flash"
    stage: ClassVar[Stage] = Stage.DECODE
    draft: Any = None
    depth: int = 4
    k: int | None = None
    tree: str | None = None
    branches: int = 3
    latents: int | None = None
    seed: int | None = None

    def validate(self) -> None:
        for name in ("depth", "k", "branches", "latents", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"flash: {name} must be an integer, got {value!r}")
        if self.depth < 1:
            raise ValueError(f"flash: depth (drafted tokens per round) must be >= 1, got {self.depth}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"flash: k (tokens per draft forward) must be >= 1, got {self.k}")
        if self.branches < 1:
            raise ValueError(f"flash: branches (tree children of the last token) must be >= 1, got {self.branches}")
        if self.latents is not None and self.latents < 0:
            raise ValueError(f"flash: latents must be >= 0, got {self.latents}")
        if self.tree not in TREE_CHOICES:
            raise ValueError(
                f"flash: tree must be one of {', '.join(map(repr, TREE_CHOICES))}; got {self.tree!r} "
                "(dynamic EAGLE-2 trees are not implemented)"
            )

    def to_dict(self) -> dict[str, Any]:
        draft = self.draft
        if draft is not None and not isinstance(draft, (str, Path)):
            draft = type(draft).__name__
        return {"method": self.method, "draft": None if draft is None else str(draft), "depth": self.depth,
                "k": self.k, "tree": self.tree, "branches": self.branches, "latents": self.latents, "seed": self.seed}


def _check_spec(spec: DraftSpec, expect: DraftSpec, where: str) -> None:
    for name, what in (("hidden_size", "hidden width"), ("vocab_size", "vocabulary size"),
                       ("target_layers", "number of decoder layers")):
        if getattr(spec, name) != getattr(expect, name):
            raise DraftError(
                f"FLASH draft {where} was built for another model: its target has {what} "
                f"{getattr(spec, name)}, this model has {getattr(expect, name)}"
            )


class Flash(Method):
    def __init__(self, config: FlashConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        from vlmprune.speculative import HeadDrafter

        draft = config.draft
        latents = config.latents if config.latents is not None else FAMILY_LATENTS.get(adapter.family, 64)
        expect = DraftSpec.for_target(adapter, k=config.k or 1, num_latents=latents)
        self.head: DraftHead | None = None
        if draft is None:
            warnings.warn(
                "flash: draft=None builds an UNTRAINED draft head from the model's config; output stays "
                "identical to the model's, but few drafts are accepted, so decoding gets slower. Train one "
                "with `vlmprune train-draft`.", UserWarning, stacklevel=4,
            )
            self.head = DraftHead(expect)
        elif isinstance(draft, (str, Path)):
            self.head = load_draft(draft, expect)
        elif isinstance(draft, DraftHead):
            _check_spec(draft.spec, expect, f"module {type(draft).__name__}")
            self.head = draft
        elif all(hasattr(draft, name) for name in ("reset", "extend", "propose")):
            self.drafter: Any = draft
        else:
            raise TypeError(
                f"flash: draft must be a path, a DraftHead, a drafter object or None; got {type(draft).__name__}"
            )
        if self.head is not None:
            if config.k is not None and config.k > self.head.spec.k:
                raise ValueError(
                    f"flash: k={config.k} but the draft predicts {self.head.spec.k} token(s) per forward; "
                    f"use k <= {self.head.spec.k}"
                )
            param = next(adapter.decoder.parameters())
            self.head.to(param.device, param.dtype).eval().requires_grad_(False)
            self.drafter = HeadDrafter(self.head, adapter.inner.get_input_embeddings(),
                                       adapter.model.get_output_embeddings(), config.k)
        self.k = config.k or (self.head.spec.k if self.head is not None else 1)

    def install(self, hooks: Any, handle: Any) -> None:
        from vlmprune.speculative import feature_hook

        model = self.adapter.model
        hooks.forward(self.adapter.decoder, feature_hook)

        def generate(*args: Any, **kwargs: Any) -> torch.Tensor:
            return self.generate(handle, *args, **kwargs)

        generate.__doc__ = "Speculative (FLASH) generate on this instance; see vlmprune.methods.flash."
        hooks.set_attr(model, "generate", generate)

    # -- generate ----------------------------------------------------------------------------------
    def generate(self, handle: Any, input_ids: torch.Tensor | None = None, on_round: Any = None,
                 **kwargs: Any) -> torch.Tensor:
        from vlmprune.speculative import Sampling, speculative_generate

        model = self.adapter.model
        for name in _REFUSED_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(f"flash: generate(..., {name}=...) is not supported by speculative decoding; "
                                 "remove the flash handle (handle.remove()) to use it")
        tree = self.config.tree if self.config.tree != "chain" else None
        for h in model.__dict__.get("_vlmprune_handles", []):
            if any(m.config.stage == Stage.LLM for m in h.methods):
                raise ValueError("flash: speculative decoding does not compose with in-LLM methods (e.g. dyvte) yet")
            if tree and any(m.config.stage <= Stage.PRE_LLM for m in h.methods):
                raise ValueError("flash: tree drafting does not compose with token pruning yet (the pruning seam "
                                 "owns the decode mask); use tree=None (chain drafting)")
        if tree and not hasattr(self.drafter, "propose_tree"):
            raise ValueError(f"flash: tree drafting needs a drafter with propose_tree(); {type(self.drafter).__name__} has none")
        gc = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
        model_kwargs = gc.update(**kwargs)
        for name, neutral in _NEUTRAL.items():
            value = getattr(gc, name, None)
            if value is not None and value != neutral:
                raise ValueError(f"flash: generation option {name}={value!r} is not supported by speculative "
                                 "decoding; remove the flash handle (handle.remove()) to use it")
        for name in ("bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                     "forced_eos_token_id", "min_p", "stop_strings", "guidance_scale"):
            if getattr(gc, name, None) is not None:
                raise ValueError(f"flash: generation option {name} is not supported by speculative decoding")
        if input_ids is None:
            input_ids = model_kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("flash: generate needs input_ids")
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"flash: speculative generate supports batch size 1 only (got a batch of {input_ids.shape[0]}); "
                "call generate once per prompt, or remove the flash handle for batched plain generate"
            )
        mask = model_kwargs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("flash: the prompt has padding columns; pass an unpadded batch of one prompt")
        prompt_len = int(input_ids.shape[1])
        max_new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - prompt_len
        eos = gc.eos_token_id
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        if isinstance(eos, torch.Tensor):
            eos_ids = [int(e) for e in eos.flatten().tolist()]
        sampling = None
        if gc.do_sample:
            sampling = Sampling(temperature=float(gc.temperature if gc.temperature is not None else 1.0),
                                top_k=gc.top_k or None, top_p=gc.top_p if gc.top_p is not None else None)
        generator = None
        if self.config.seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(self.config.seed)
        model_kwargs.pop("use_cache", None)
        if max_new < 1:
            return input_ids
        out, record = speculative_generate(
            model, self.adapter, self.drafter, {"input_ids": input_ids, **model_kwargs},
            max_new_tokens=int(max_new), depth=self.config.depth, eos_ids=eos_ids, sampling=sampling,
            generator=generator, on_round=on_round, label=self.label, k=self.k, tree=tree,
            branches=self.config.branches,
        )
        record.tree = tree or "chain"
        handle.stats.add_decode(record)
        return out


def untrained_head(model: nn.Module, k: int = 1, latents: int | None = None) -> DraftHead:
    """A fresh draft head sized for ``model`` (the start of training)."""
    from vlmprune.adapters import for_model

    adapter = for_model(model)
    q = latents if latents is not None else FAMILY_LATENTS.get(adapter.family, 64)
    return DraftHead(DraftSpec.for_target(adapter, k=k, num_latents=q))
