"""vlmprune as an lmms-eval model: ``lmms-eval --model vlmprune --model_args pretrained=...,method=...``.

The model loads a checkpoint (the shipped built-in model by default, or any local checkpoint an
adapter supports), applies the method through ``vlmprune.apply`` and answers lmms-eval's
``loglikelihood`` and ``generate_until`` requests in batches. Batches are left-padded with
mask-aware positions, so a batch gives the same scores as one request at a time (the field's
known lmms-eval batch>1 bug is a padding bug; tests compare both). Next to lmms-eval's own
per-sample logs it writes one JSON line per request with the visual tokens the LLM saw and the
FLOPs of that request (the toolkit's convention), which ``vlmprune-eval`` reads to put lmms-eval
tasks on the same accuracy-vs-FLOPs plot as the built-in ones.

Registration: lmms-eval finds this class through the ``lmms_eval.models`` entry point declared
in vlmprune's package metadata, and :func:`register` adds it explicitly (the launcher
``vlmprune-lmms-eval`` calls it before lmms-eval parses its arguments).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

MODEL_NAME = "vlmprune"
TASKS_DIR = Path(__file__).parent / "lmms_tasks"


def manifest() -> Any:
    """The lmms-eval model manifest (the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="vlmprune.evals.lmms.VlmpruneLMM")


def register() -> None:
    """Register the model with lmms-eval's registry (idempotent)."""
    from lmms_eval import models

    models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    models.AVAILABLE_MODELS[MODEL_NAME] = "VlmpruneLMM"


def _lmms_base() -> type:
    try:
        from lmms_eval.api.model import lmms
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "lmms-eval is not installed; install it with `pip install --no-deps lmms-eval==0.7.3` "
            "(see docs/evaluation.md: its own pins conflict with the CPU torch wheel)"
        ) from exc
    return lmms


def _to_image(visual: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(visual, np.ndarray):
        return visual
    if isinstance(visual, Image.Image):
        return np.asarray(visual.convert("RGB"))
    raise TypeError(f"vlmprune: unsupported visual {type(visual).__name__}; expected a PIL image or a video path")


def scored(loss: float, greedy: bool) -> Any:
    """One loglikelihood answer ``(loss, is_greedy)`` in a form lmms-eval 0.7.3 keeps intact.

    Its evaluator passes every response through ``unwrap_generation_output``, which turns anything
    that is neither a string nor a ``GenerationResult`` into ``str(...)``, and its CLI then strips
    reasoning tags from every string, after which multiple-choice scoring can no longer unpack the
    pair. Wrapped as a ``GenerationResult`` the pair reaches the scoring untouched.
    """
    from lmms_eval.api.instance import GenerationResult

    return GenerationResult(text=(float(loss), bool(greedy)))  # type: ignore[arg-type]


class VlmpruneLMM(_lmms_base()):
    """lmms-eval model args: ``pretrained`` ('builtin', a local checkpoint directory or a hub id), ``method``
    ('none' or a registered method) with its options (``ratio`` and any other, e.g.
    ``exit_layer``), ``device``, ``dtype``, ``batch_size``, ``attn_implementation``, ``stats_file``
    (per-request visual tokens and FLOPs, JSON lines), ``seed``."""

    def __init__(
        self,
        pretrained: str = "builtin",
        method: str = "none",
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 1,
        attn_implementation: str | None = None,
        stats_file: str | None = None,
        seed: int = 0,
        max_new_tokens: int = 32,
        **method_options: Any,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        from . import harness

        accelerator = Accelerator()
        if device is None or accelerator.num_processes > 1:
            device = str(accelerator.device)
        em = harness.load_model(None if pretrained in (None, "builtin") else str(pretrained), device=device, seed=seed)
        if dtype != "float32":
            em.model.to(getattr(torch, dtype))
        if attn_implementation:
            em.model.set_attn_implementation(attn_implementation)
        handle = None
        if method not in (None, "none"):
            import vlmprune

            handle = vlmprune.apply(em.model, method, **method_options)
        elif method_options:
            raise TypeError(f"options {sorted(method_options)} given without a method")
        self._setup(em, method, handle, stats_file, batch_size, max_new_tokens, accelerator)

    @classmethod
    def wrap(cls, em: Any, method: str, handle: Any, stats_file: str | None = None, batch_size: int = 1,
             max_new_tokens: int = 32) -> VlmpruneLMM:
        """Around an already loaded (and patched) model: ``vlmprune-eval`` reuses its model per cell."""
        obj = cls.__new__(cls)
        super(VlmpruneLMM, obj).__init__()
        obj._setup(em, method, handle, stats_file, batch_size, max_new_tokens, None)
        return obj

    def _setup(self, em: Any, method: str, handle: Any, stats_file: str | None, batch_size: int | str,
               max_new_tokens: int, accelerator: Any) -> None:
        self.em, self.method, self.handle = em, method, handle
        self.accelerator = accelerator
        if accelerator is not None:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        # launched by accelerate / torchrun: the environment is the ground truth for the rank
        self._rank = max(self._rank, int(os.environ.get("RANK", "0")))
        self._world_size = max(self._world_size, int(os.environ.get("WORLD_SIZE", "1")))
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.stats_file = Path(stats_file) if stats_file else None
        if self.stats_file is not None and self._rank > 0:
            self.stats_file = self.stats_file.with_name(f"{self.stats_file.stem}.rank{self._rank}{self.stats_file.suffix}")
        if self.stats_file is not None:
            self.stats_file.parent.mkdir(parents=True, exist_ok=True)
            self.stats_file.write_text("")

    # -- prompts ------------------------------------------------------------------------------
    def _visuals(self, request: Any) -> list[np.ndarray]:
        doc_to_visual, doc_id, task, split = request.args[2:6]
        return self._images(doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else [])

    def _images(self, visuals: Any) -> list[np.ndarray]:
        """Images as arrays; a video path becomes its frames (the built-in model: its two mosaics)."""
        from . import data

        out: list[np.ndarray] = []
        for v in visuals or []:
            if isinstance(v, (str, os.PathLike)):  # a video file
                frames = data.read_video(v)
                out += data.mosaic(frames) if self.em.builtin else [f for f in frames]
            else:
                out.append(_to_image(v))
        return out

    def _prompt(self, context: str, n_images: int) -> str:
        from . import builtin

        if self.em.builtin:
            return builtin.image_prompt(context.strip().split(), n_images)
        proc = self.em.processor
        if getattr(proc, "chat_template", None):
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": context}]
            return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return " ".join([self.em.image_token] * n_images + [context])

    def _encode(self, prompts: Sequence[str], images: Sequence[list[np.ndarray]]) -> dict[str, Tensor]:
        from . import builtin

        if self.em.builtin:
            inputs = builtin.encode(self.em.processor, prompts, images)
        else:
            flat = [img for group in images for img in group]
            inputs = dict(self.em.processor(text=list(prompts), images=flat or None, return_tensors="pt", padding=True))
        return {k: v.to(self.em.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}

    # -- accounting ---------------------------------------------------------------------------
    def _log(self, requests: Sequence[Any], inputs: dict[str, Tensor], generated: list[int],
             keys: Sequence[tuple[Any, Any]] | None = None) -> None:
        """``keys``: (task, doc_id) per request when its arguments are not laid out as
        ``(context, target/kwargs, doc_to_visual, doc_id, task, split)``."""
        if self.stats_file is None:
            return
        from . import harness

        cell = harness._Cell()
        records = list(self.handle.stats.records) if self.handle is not None else []
        decode = list(getattr(self.handle.stats, "decode", [])) if self.handle is not None else []
        if self.handle is not None:
            self.handle.stats.reset()  # the next batch's records are its own (overhead is summed over them)
        result = harness.BatchResult([0.0] * len(requests), [""] * len(requests), generated)
        harness._account(cell, self.em, inputs, records, result, decode)
        n = len(requests)
        counted = [r for r in decode if r.target_decode_flops > 0]  # speculative decoding: its real work
        draft = sum(r.draft_flops for r in counted)
        vision = (cell.flops["vision"] + cell.flops["projector"] + cell.flops["overhead"] - draft) / n
        share = [g / max(sum(generated), 1) for g in generated]
        lines = []
        keys = keys or [(req.args[4], req.args[3]) for req in requests]
        for i, req in enumerate(requests):
            llm = harness._llm_flops(self.em.model, cell.llm_raw[i], int(generated[i]))
            if counted:
                total = vision + llm.llm_prefill + share[i] * (cell.flops["decode"] + draft)
            else:
                total = vision + llm.llm_prefill + llm.decode
            lines.append(json.dumps({
                "task": keys[i][0], "doc_id": keys[i][1], "request_type": req.request_type, "method": self.method,
                "rank": self._rank,
                "visual_tokens": cell.visual[i], "visual_tokens_in": cell.visual_in[i], "tflops": total / 1e12,
            }))
        with self.stats_file.open("a") as fh:
            fh.write("\n".join(lines) + "\n")

    def _batches(self, requests: Sequence[Any]) -> list[list[Any]]:
        size = max(1, self.batch_size_per_gpu)
        return [list(requests[i : i + size]) for i in range(0, len(requests), size)]

    # -- request types ------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        """Per request ``(loss, is_greedy)``: the continuation's summed negative log-likelihood
        after the prompt (lmms-eval's multiple choice takes the argmin, i.e. it expects a loss, as
        its bundled models return) and whether greedy decoding would produce it. The continuation
        is appended to the prompt and scored in one forward, right-aligned so that left padding
        never shifts it."""
        from tqdm.auto import tqdm

        from . import harness

        out: list[Any] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlmprune loglikelihood")
        for batch in self._batches(requests):
            prompts, images, conts = [], [], []
            for req in batch:
                context, continuation = req.args[0], req.args[1]
                if callable(continuation):
                    doc_id, task, split = req.args[3:6]
                    continuation = continuation(self.task_dict[task][split][doc_id])
                imgs = self._visuals(req)
                prompt = self._prompt(context, len(imgs))
                if self.em.builtin:  # word-level: the continuation's tokens are its words
                    words = str(continuation).split()
                    full = prompt + " " + " ".join(words)
                    n = len(words)
                else:  # count the continuation's tokens as lm-eval does: whole minus context
                    full = prompt + str(continuation)
                    tok = self.em.tokenizer
                    n = len(tok(full, add_special_tokens=False)["input_ids"]) - len(tok(prompt, add_special_tokens=False)["input_ids"])
                if n < 1:
                    raise ValueError(f"empty continuation {continuation!r} after tokenisation")
                prompts.append(full)
                images.append(imgs)
                conts.append(n)
            inputs = self._encode(prompts, images)
            fwd = harness._forward_inputs(self.em, inputs)
            width = max(conts)
            logits = self.em.model(**fwd, use_cache=False, logits_to_keep=width + 1).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position j predicts token j+1
            ids = inputs["input_ids"]
            for b, n in enumerate(conts):
                target = ids[b, -n:]
                lp = logp[b, -n:].gather(-1, target.unsqueeze(-1)).squeeze(-1)
                greedy = bool((logp[b, -n:].argmax(-1) == target).all())
                out.append(scored(-float(lp.sum()), greedy))
            self._log(batch, inputs, [0] * len(batch))
            bar.update(len(batch))
        bar.close()
        return out

    @torch.inference_mode()
    def generate_until(self, requests: list[Any]) -> list[str]:
        from tqdm.auto import tqdm

        out: list[str] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlmprune generate")
        for batch in self._batches(requests):
            prompts, images = [], []
            for req in batch:
                imgs = self._visuals(req)
                prompts.append(self._prompt(req.args[0], len(imgs)))
                images.append(imgs)
            texts, counts, inputs = self._generate(prompts, images, dict(batch[0].args[1] or {}))
            out += texts
            self._log(batch, inputs, counts)
            bar.update(len(batch))
        bar.close()
        return out

    def _generate(self, prompts: list[str], images: list[list[np.ndarray]], kwargs: dict[str, Any]
                  ) -> tuple[list[str], list[int], dict[str, Tensor]]:
        """Greedy continuations cut at ``until``, the tokens each generated, and the inputs."""
        tok = self.em.tokenizer
        inputs = self._encode(prompts, images)
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.get("max_new_tokens", self.max_new_tokens))
        generated = self.em.model.generate(
            **inputs, max_new_tokens=max_new, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        texts, counts = [], []
        for row in generated[:, inputs["input_ids"].shape[1]:].tolist():
            stop = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            counts.append(stop)
            text = " ".join(self.em.words(row)) if self.em.builtin else tok.decode(row[:stop], skip_special_tokens=True)
            for u in until:
                if u and u in text:
                    text = text[: text.index(u)]
            texts.append(text.strip())
        return texts, counts, inputs

    @torch.inference_mode()
    def generate_until_multi_round(self, requests: list[Any]) -> list[list[str]]:
        """lmms-eval's multi-round protocol, one request at a time: after each round the task's
        ``doc_to_text(doc, previous_output=, round_idx=, previous_round_info=)`` returns the next
        round's visuals and context, whether to stop, the round answers to keep and its state;
        the answer is the list of kept round outputs."""
        from tqdm.auto import tqdm

        out: list[list[str]] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlmprune multi-round")
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = self._images(doc_to_visual(doc) if doc_to_visual is not None else [])
            rounds: list[str] = []
            info = None
            for round_idx in itertools.count():
                if round_idx:
                    visuals, context, terminal, kept, info = doc_to_text(
                        doc, previous_output=list(rounds), round_idx=round_idx, previous_round_info=info
                    )
                    rounds = list(kept)
                    if terminal:
                        break
                    visuals = self._images(visuals or [])
                texts, counts, inputs = self._generate([self._prompt(context, len(visuals))], [visuals],
                                                       dict(gen_kwargs or {}))
                rounds.append(texts[0])
                self._log([req], inputs, counts, keys=[(task, doc_id)])
            out.append(rounds)
            bar.update(1)
        bar.close()
        return out
