"""FLASH: lossless speculative decoding with a latent-aware, semi-autoregressive draft
(Wang et al., arXiv 2505.12728); ``docs/methods/flash.md``.

``vlmprune.apply(model, "flash", draft=...)`` replaces ``generate`` *on this instance* with the
speculative loop of the decode seam (:mod:`vlmprune.seams.decode`); the draft (:mod:`vlmprune.methods.flash.draft`) reads
the target's last hidden states, compresses each visual span to a few learned latents on its own
side, and proposes ``k`` tokens per forward. Greedy output is the target's greedy output token for
token, whatever the draft; with sampling, speculative rejection sampling keeps the target's
distribution. ``handle.remove()`` gives the stock ``generate`` back.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmprune.method import Method, Stage
from vlmprune.registry import register_method
from vlmprune.seams.decode import DecodeSeam, Sampling, speculative_generate
from vlmprune.seams.pre_llm import cache_length

from .config import DEFAULT_LATENTS, FlashConfig
from .draft import DraftError, DraftHead, DraftSpec, load_draft
from .drafter import HeadDrafter

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


def _check_spec(spec: DraftSpec, expect: DraftSpec, where: str) -> None:
    for name, what in (("hidden_size", "hidden width"), ("vocab_size", "vocabulary size"),
                       ("target_layers", "number of decoder layers")):
        if getattr(spec, name) != getattr(expect, name):
            raise DraftError(
                f"FLASH draft {where} was built for another model: its target has {what} "
                f"{getattr(spec, name)}, this model has {getattr(expect, name)}"
            )


@register_method
class Flash(Method):
    """Speculative decoding through the decode seam, with a FLASH draft head (or any drafter)."""

    config_class = FlashConfig
    commands = {
        "train-draft": ("vlmprune.methods.flash.training:main", "train a FLASH speculative-decoding draft on a frozen model (see vlmprune train-draft --help)"),
        "bench-flash": ("vlmprune.methods.flash.bench:main", "FLASH decode speed-up over plain greedy generate, interleaved (see vlmprune bench-flash --help)"),
    }
    seams = (DecodeSeam,)

    def __init__(self, config: FlashConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        draft = config.draft
        latents = config.latents if config.latents is not None else DEFAULT_LATENTS
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

    # -- generate ----------------------------------------------------------------------------------
    def generate(self, handle: Any, input_ids: torch.Tensor | None = None, on_round: Any = None,
                 **kwargs: Any) -> torch.Tensor:
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
        for key in ("past_key_values", "cache"):
            if cache_length(model_kwargs.get(key)) > 0:
                raise ValueError(
                    "flash: speculative decoding starts every generate call from its own prefill, so it cannot "
                    "continue on a filled KV cache (a later chat turn); pass the whole history with its "
                    "pixel_values and no cache, or remove the flash handle (handle.remove()) to continue on the cache"
                )
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
    q = latents if latents is not None else DEFAULT_LATENTS
    return DraftHead(DraftSpec.for_target(adapter, k=k, num_latents=q))
