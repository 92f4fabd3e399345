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

import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmprune.method import Method, Stage
from vlmprune.registry import register_method
from vlmprune.seams.decode import DecodeSeam, Sampling, speculative_decode, speculative_generate
from vlmprune.seams.pre_llm import cache_length
from vlmprune.stats import DecodeRecord

from .config import DEFAULT_LATENTS, FlashConfig
from .draft import DraftError, DraftHead, DraftSpec, load_draft
from .drafter import HeadDrafter

#: generate() arguments the loop refuses, and why (chain drafting; everything else goes through
#: transformers' own preparation, logits processors and stopping criteria)
_REFUSED_KWARGS = {
    "assistant_model": "FLASH is itself speculative decoding; a second assistant would draft for the draft",
    "assistant_tokenizer": "FLASH is itself speculative decoding; a second assistant would draft for the draft",
    "negative_prompt_ids": "classifier-free guidance runs its own unconditional model pass step by step, which the "
                           "multi-token rounds would desynchronise",
    "negative_prompt_attention_mask": "classifier-free guidance runs its own unconditional model pass step by step",
    "custom_generate": "FLASH's loop is already the decoding method",
    "synced_gpus": "multi-GPU synchronised generation is not implemented in the speculative loop",
}
#: generation-config options the loop cannot honour: (neutral value, why)
_REFUSED_OPTIONS = {
    "num_beams": (1, "beam search keeps num_beams hypotheses per prompt and re-ranks them every step by their "
                     "cumulative scores; verification accepts one continuation per prompt"),
    "num_beam_groups": (1, "group beam search is beam search"),
    "diversity_penalty": (0.0, "diversity penalty belongs to group beam search"),
    "force_words_ids": (None, "constrained beam search is beam search"),
    "constraints": (None, "constrained beam search is beam search"),
    "penalty_alpha": (None, "contrastive search re-scores every step's top-k candidates with extra forwards"),
    "dola_layers": (None, "DoLa contrasts early-exit layers every step"),
    "prompt_lookup_num_tokens": (None, "prompt lookup is another speculative drafter"),
    "guidance_scale": (None, "classifier-free guidance runs its own unconditional model pass step by step, "
                             "which the multi-token rounds would desynchronise"),
    "return_dict_in_generate": (False, "per-step scores, logits, attentions and hidden states are not collected: "
                                       "a round verifies several positions in one target forward"),
    "output_scores": (False, "per-step scores are not collected"),
    "output_logits": (False, "per-step logits are not collected"),
    "output_attentions": (False, "per-step attentions are not collected"),
    "output_hidden_states": (False, "per-step hidden states are not collected"),
    "use_cache": (True, "verification runs the drafts on the KV cache"),
    "cache_implementation": (None, "rejected drafts are cropped from a DynamicCache; static and offloaded caches "
                                   "cannot be cropped per row"),
    "token_healing": (False, "transformers does not hand the tokenizer on to a custom decoding method"),
    "prefill_chunk_size": (None, "the draft reads the prompt's hidden states from one prefill forward"),
}
#: what a tree round honours (the one-prompt tree loop verifies with the raw target logits)
_TREE_OPTIONS = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                 "pad_token_id", "bos_token_id", "use_cache", "generation_config", "attention_mask", "input_ids",
                 "pixel_values", "image_sizes", "image_grid_thw", "video_grid_thw", "pixel_values_videos",
                 "mm_token_type_ids", "image_flags", "vision_feature_layer", "vision_feature_select_strategy",
                 "batch_num_images"}


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
        elif all(hasattr(draft, name) for name in ("reset", "extend", "propose")) or all(
                hasattr(draft, name) for name in ("reset_batch", "extend_batch", "propose_batch", "select_rows")):
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
    def generate(self, handle: Any, *args: Any, on_round: Any = None, **kwargs: Any) -> torch.Tensor:
        """``model.generate`` with speculative chain (or one-prompt static-tree) decoding.

        Chain drafting hands transformers' ``generate`` the loop as its decoding method, so the
        batch (left-padded as processors pad it), special tokens, lengths, logits processors and
        stopping criteria are prepared exactly as for plain ``generate``; what the loop cannot
        honour is refused with the reason (``_REFUSED_KWARGS``, ``_REFUSED_OPTIONS``)."""
        from transformers.generation.configuration_utils import GenerationMode

        model = self.adapter.model
        tree = self.config.tree if self.config.tree != "chain" else None
        for h in model.__dict__.get("_vlmprune_handles", []):
            if any(m.config.stage == Stage.LLM for m in h.methods):
                raise ValueError("flash: speculative decoding does not compose with in-LLM methods (e.g. dyvte) yet")
            if tree and any(m.config.stage <= Stage.PRE_LLM for m in h.methods):
                raise ValueError("flash: tree drafting does not compose with token pruning yet (the pruning seam "
                                 "owns the decode mask); use tree=None (chain drafting)")
        if tree and not hasattr(self.drafter, "propose_tree"):
            raise ValueError(f"flash: tree drafting needs a drafter with propose_tree(); {type(self.drafter).__name__} has none")
        for name, why in _REFUSED_KWARGS.items():
            if kwargs.get(name) is not None:
                raise ValueError(f"flash: generate(..., {name}=...) is not supported by speculative decoding: {why}. "
                                 "Remove the flash handle (handle.remove()) to use it")
        for key in ("past_key_values", "cache"):
            if cache_length(kwargs.get(key)) > 0:
                raise ValueError(
                    "flash: speculative decoding starts every generate call from its own prefill, so it cannot "
                    "continue on a filled KV cache (a later chat turn); pass the whole history with its "
                    "pixel_values and no cache, or remove the flash handle (handle.remove()) to continue on the cache"
                )
        options = {k: v for k, v in kwargs.items() if k not in ("generation_config", "streamer", "tokenizer",
                                                               "logits_processor", "stopping_criteria")}
        gc, _ = model._prepare_generation_config(kwargs.get("generation_config"), **options)
        for name, (neutral, why) in _REFUSED_OPTIONS.items():
            value = getattr(gc, name, None)
            if value is not None and value != neutral and not (name == "guidance_scale" and value == 1):
                raise ValueError(f"flash: generation option {name}={value!r} is not supported by speculative "
                                 f"decoding: {why}. Remove the flash handle (handle.remove()) to use it")
        mode = gc.get_generation_mode()
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise ValueError(f"flash: {mode.value} is not supported by speculative decoding (greedy and sampling "
                             "are); remove the flash handle (handle.remove()) to use it")
        sampling = None
        if gc.do_sample:  # how the draft draws (its q); the target's p is transformers' processed distribution
            sampling = Sampling(temperature=float(gc.temperature if gc.temperature is not None else 1.0),
                                top_k=gc.top_k or None, top_p=gc.top_p if gc.top_p is not None else None)
        generator = None
        if self.config.seed is not None:
            device = next(self.adapter.decoder.parameters()).device
            generator = torch.Generator(device=device).manual_seed(self.config.seed)
        if tree:
            return self._generate_tree(handle, gc, args, kwargs, sampling, generator, on_round, tree)
        record = DecodeRecord(method=self.label, depth=self.config.depth, k=self.k, tree="chain")
        started = time.perf_counter()  # the record's clock covers generate's own preparation
        streamer = kwargs.get("streamer")
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        if streamer is not None and isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] > 1:
            raise ValueError("flash: a streamer takes one prompt's tokens; stream a batch of one")
        adapter, drafter, depth = self.adapter, self.drafter, self.config.depth

        def decode(model: nn.Module, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                   generation_config: Any, synced_gpus: bool = False, tokenizer: Any = None,
                   **model_kwargs: Any) -> torch.Tensor:
            if streamer is not None and input_ids.shape[0] > 1:
                raise ValueError("flash: a streamer takes one prompt's tokens; stream a batch of one")
            return speculative_decode(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                      adapter=adapter, drafter=drafter, depth=depth, draft_sampling=sampling,
                                      generator=generator, streamer=streamer, on_round=on_round, record=record,
                                      started=started, **model_kwargs)

        tokenizer = kwargs.pop("tokenizer", None)
        if gc.stop_strings:
            # transformers drops ``tokenizer`` when the decoding method is a callable, so the stop-string
            # criterion is built here (its own class) and the prepared config goes without stop_strings
            from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

            if tokenizer is None:
                raise ValueError("flash: stop_strings need the model's tokenizer: pass tokenizer=... to generate, "
                                 "as with plain generate")
            criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
            criteria.append(StopStringCriteria(stop_strings=gc.stop_strings, tokenizer=tokenizer))
            gc.stop_strings = None
            kwargs = {k: v for k, v in kwargs.items() if not hasattr(gc, k) or k in ("input_ids", "attention_mask")}
            kwargs.update(generation_config=gc, stopping_criteria=criteria)
        out = type(model).generate(model, *args, custom_generate=decode, **kwargs)
        handle.stats.add_decode(record)
        return out

    def _generate_tree(self, handle: Any, gc: Any, args: tuple, kwargs: dict, sampling: Sampling | None,
                       generator: torch.Generator | None, on_round: Any, tree: str) -> torch.Tensor:
        """Static-tree drafting: one unpadded prompt, greedy or temperature / top-k / top-p sampling."""
        extra = sorted(k for k, v in kwargs.items() if k not in _TREE_OPTIONS and v is not None)
        changed = [name for name in ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "min_length",
                                     "bad_words_ids", "stop_strings", "sequence_bias", "suppress_tokens",
                                     "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "min_p",
                                     "typical_p", "epsilon_cutoff", "eta_cutoff", "max_time")
                   if getattr(gc, name, None) not in (None, 0, 0.0, 1.0)]
        if extra or changed:
            raise ValueError(f"flash: tree drafting verifies with the target's raw logits, so {', '.join(extra + changed)} "
                             "is not supported with tree='static'; use chain drafting (tree=None), which applies "
                             "transformers' logits processors and stopping criteria")
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("flash: generate needs input_ids")
        if input_ids.shape[0] != 1:
            raise ValueError(f"flash: tree drafting takes one prompt per call (got a batch of {input_ids.shape[0]}); "
                             "use chain drafting (tree=None) for batches")
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("flash: tree drafting needs an unpadded prompt; use chain drafting (tree=None)")
        model_kwargs = {k: v for k, v in kwargs.items() if k not in _TREE_OPTIONS - {
            "attention_mask", "pixel_values", "image_sizes", "image_grid_thw", "video_grid_thw", "pixel_values_videos",
            "mm_token_type_ids", "image_flags", "vision_feature_layer", "vision_feature_select_strategy",
            "batch_num_images"}}
        prompt_len = int(input_ids.shape[1])
        max_new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - prompt_len
        eos = gc.eos_token_id
        if isinstance(eos, torch.Tensor):
            eos_ids = [int(e) for e in eos.flatten().tolist()]
        else:
            eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        if max_new < 1:
            return input_ids
        out, record = speculative_generate(
            self.adapter.model, self.adapter, self.drafter, {"input_ids": input_ids, **model_kwargs},
            max_new_tokens=int(max_new), depth=self.config.depth, eos_ids=eos_ids, sampling=sampling,
            generator=generator, on_round=on_round, label=self.label, k=self.k, tree=tree,
            branches=self.config.branches,
        )
        record.tree = tree
        handle.stats.add_decode(record)
        return out


def untrained_head(model: nn.Module, k: int = 1, latents: int | None = None) -> DraftHead:
    """A fresh draft head sized for ``model`` (the start of training)."""
    from vlmprune.adapters import for_model

    adapter = for_model(model)
    q = latents if latents is not None else DEFAULT_LATENTS
    return DraftHead(DraftSpec.for_target(adapter, k=k, num_latents=q))
