"""The eval harness behind ``vlmprune-eval``: tasks, scoring, the (task x method x ratio) grid, outputs.

A *task* turns a split into items, encodes a batch of items into model inputs once (the same
tensors are reused for every method and ratio of the grid, so preprocessing is neither repeated
nor timed), and scores a batch with one model call (a forward for multiple choice, ``generate``
for short answers and captions). The runner owns everything method-related: it applies each
method in a ``with vlmprune.apply(...)`` block, times the model calls, reads what the method did
from ``handle.stats`` and turns it into FLOPs with :mod:`vlmprune.flops`, so a new task kind
(issue 4: lmms-eval tasks) only has to implement the :class:`Task` protocol and register itself
in :data:`TASKS`.

Conventions of the numbers in a row (one row per task x method x ratio):

* ``accuracy``: percent of items scored correct; for ``video_caption`` it is the mean token F1
  against the reference caption, in percent (``metric`` says which).
* ``tflops``: per sample, the toolkit's convention (vlmprune.flops), with the LLM counted at the
  length each sample really had after pruning (its own unpadded length, so the batch size does
  not change it), the generated tokens of that sample for generation tasks (up to and including
  its end token), ``lm_head`` on one position (we ask for the answer position only), the vision
  side of every image and the method's own scoring overhead.
* ``visual_tokens``: visual tokens the LLM saw, mean per sample (256 per image unpruned).
* ``latency_s``: mean wall time of the model calls per sample (batch time / batch size).
* ``peak_mem_mb``: growth of peak memory over the whole run of that grid cell (the CUDA
  allocator's peak on GPUs, the process's peak RSS on Linux CPUs; None where neither exists).
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

import vlmprune
from vlmprune import flops as flops_mod
from vlmprune.bench import _peak_rss_reset, _rss_kb

BUILTIN_TASKS: tuple[str, ...] = ("image_mc", "image_short", "video_mc", "video_caption")
DEFAULT_METHODS: tuple[str, ...] = ("none", "fastervlm", "random", "pool")
DEFAULT_RATIOS: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95)
#: items per task of the default run, sized so that the whole default grid (4 tasks x 13 cells)
#: finishes in under 5 minutes on a 2-core CPU (measured with the untrained built-in model, which
#: never stops a caption early, 1 thread, the other core busy: 3 min 20 s wall, videos written cold).
DEFAULT_LIMITS: dict[str, int] = {"image_mc": 300, "image_short": 150, "video_mc": 150, "video_caption": 60}
DEFAULT_VIDEO_DIR = Path("~/.cache/vlmprune/builtin-videos")
IMAGE_SHORT_MAX_NEW_TOKENS = 3
CAPTION_MAX_NEW_TOKENS = 24
#: Decoders that build their own (M-RoPE) positions from the attention mask; everyone else gets
#: mask-aware 1-D positions so that a left-padded sample sees the positions it would see alone.
_OWN_POSITIONS = ("qwen2_vl", "qwen2_5_vl")


# ------------------------------------------------------------------------------------ the model


@dataclass
class EvalModel:
    """A model, its processor and the few model-specific details the tasks need.

    The built-in tasks speak the built-in model's prompt format ("<image> what color ..."), one
    word per answer. For another checkpoint the ``<image>`` placeholder is replaced by the
    processor's own image token, and multiple choice compares the logit of each choice's first
    token (a clear error when two choices share it).
    """

    model: Any
    processor: Any
    name: str
    builtin: bool = True
    path: Path | None = None  # the checkpoint directory, when loaded from one

    def __post_init__(self) -> None:
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        self.tokenizer = tok
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        cfg = self.model.config
        tid = getattr(cfg, "image_token_id", None)
        self.image_token_id = tid if tid is not None else getattr(cfg, "image_token_index", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, text: str) -> str:
        from . import builtin

        if self.builtin or self.image_token == builtin.IMAGE_TOKEN:
            return text
        return text.replace(builtin.IMAGE_TOKEN, self.image_token)

    def choice_ids(self, choices: Sequence[str]) -> list[int]:
        return _choice_ids(self, tuple(choices))

    def words(self, ids: Sequence[int]) -> list[str]:
        """The words of a generated continuation, up to its end token."""
        eos = self.tokenizer.eos_token_id
        ids = list(ids)
        if eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).split()

    def mask_positions(self) -> bool:
        return getattr(self.model.config, "model_type", None) not in _OWN_POSITIONS


def _choice_ids(em: EvalModel, choices: tuple[str, ...]) -> list[int]:
    cache = em.__dict__.setdefault("_choice_cache", {})
    if choices in cache:
        return cache[choices]
    if em.builtin:
        from . import builtin

        ids = builtin.choice_ids(em.tokenizer, choices)
    else:
        ids = [em.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"choices {choices} share a first token under {em.name}'s tokenizer")
    cache[choices] = ids
    return ids


class ModelLoadError(Exception):
    """A model that cannot be loaded, with a one-line reason for the command line."""


def load_model(spec: str | None = None, device: str = "cpu", seed: int = 0) -> EvalModel:
    """``None``: the shipped built-in checkpoint. ``"untrained"``: the built-in architecture with
    random weights (tests, timing). A directory: a checkpoint saved with ``builtin.save_builtin``,
    or another local Hugging Face checkpoint loadable with ``AutoModelForImageTextToText`` and
    ``AutoProcessor`` (nothing is downloaded)."""
    from . import builtin

    if spec is None:
        try:
            model, processor = builtin.load_builtin(device=device)
        except FileNotFoundError as exc:
            raise ModelLoadError(str(exc)) from None
        return EvalModel(model, processor, "builtin", path=builtin.CHECKPOINT)
    if spec == "untrained":
        model, processor = builtin.build_untrained(seed=seed)
        return EvalModel(model.to(device), processor, "builtin-untrained")
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"--model {spec!r} is not a directory; pass a checkpoint saved with "
            "vlmprune.evals.builtin.save_builtin or a local Hugging Face checkpoint, or omit --model "
            "for the shipped built-in model"
        )
    if _is_builtin_checkpoint(path):
        model, processor = builtin.load_builtin(path, device=device)
        return EvalModel(model, processor, str(path), path=path)
    try:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).to(device).eval()
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - one line for the command line, whatever went wrong
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot load {path} with AutoModelForImageTextToText/AutoProcessor: {first}") from None
    return EvalModel(model, processor, str(path), builtin=False, path=path)


#: where a checkpoint's DyVTE gates live, next to its weights
GATES_DIR = "dyvte-gates"


def shipped_gates(em: EvalModel) -> str | None:
    """The DyVTE gates saved next to the model's checkpoint, if any."""
    if em.path is None:
        return None
    candidate = Path(em.path) / GATES_DIR / "gates.safetensors"
    return str(candidate) if candidate.exists() else None


def _is_builtin_checkpoint(path: Path) -> bool:
    """A LLaVA checkpoint whose tokenizer has the built-in word-level vocabulary."""
    from . import builtin

    cfg, tok = path / "config.json", path / "tokenizer.json"
    if not (cfg.exists() and tok.exists() and (path / "model.safetensors").exists()):
        return False
    try:
        if json.loads(cfg.read_text()).get("model_type") != "llava":
            return False
        vocab = json.loads(tok.read_text()).get("model", {}).get("vocab", {})
    except (OSError, ValueError):
        return False
    return isinstance(vocab, dict) and set(builtin.vocabulary()) <= set(vocab)


# ------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Item:
    """One scored unit: a prompt with its images and the reference answer."""

    uid: str
    qtype: str
    prompt: str  # in the built-in format; EvalModel.prompt adapts it
    images: tuple[np.ndarray, ...]
    answer: str  # a word, or the reference caption
    choices: tuple[str, ...] = ()


@dataclass
class BatchResult:
    """What a task reports for one batch, one entry per item."""

    scores: list[float]  # 1/0 for correct/wrong, or a partial score in [0, 1] (token F1)
    predictions: list[str]
    generated_tokens: list[int]  # new tokens per item (0 for scoring by logits)


class Task(Protocol):
    """A task kind the runner can grid over (built-in tasks here; lmms-eval tasks later)."""

    name: str
    metric: str  # "accuracy" or e.g. "token_f1"; reported in percent as the row's ``accuracy``

    def load(self, limit: int, data_dir: Path) -> list[Item]:
        """The first ``limit`` items of the task's test split, deterministically."""
        ...

    def encode(self, em: EvalModel, items: Sequence[Item]) -> dict[str, Tensor]:
        """Model inputs for a batch (left-padded); computed once and reused for the whole grid."""
        ...

    def evaluate(self, em: EvalModel, items: Sequence[Item], inputs: dict[str, Tensor]) -> BatchResult:
        """Score a batch with exactly one prefill (a forward or one ``generate``)."""
        ...


def _balanced_pick(questions: Sequence[Any], order: Sequence[str], i: int) -> Any:
    """Item i asks the question of type order[i % len(order)] when its sample has one, else the
    next type in that order that it has: one question per image / clip, types balanced."""
    by_type = {q.qtype: q for q in questions}
    for k in range(len(order)):
        q = by_type.get(order[(i + k) % len(order)])
        if q is not None:
            return q
    return questions[i % len(questions)]


@lru_cache(maxsize=4)
def _images(n: int) -> tuple[Any, ...]:
    from . import data

    return tuple(data.image_split("test", n))


@lru_cache(maxsize=4)
def _videos(n: int, directory: str) -> tuple[Any, ...]:
    from . import data

    return tuple(data.video_split("test", n, directory))


def _forward_inputs(em: EvalModel, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    if em.mask_positions() and "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        return {**inputs, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}
    return inputs


def answer_logits(em: EvalModel, inputs: dict[str, Tensor]) -> Tensor:
    """(B, vocab) logits at the answer position (the last one: prompts are left-padded)."""
    out = em.model(**_forward_inputs(em, inputs), logits_to_keep=1, use_cache=False)
    return out.logits[:, -1]


def greedy(em: EvalModel, inputs: dict[str, Tensor], max_new_tokens: int) -> tuple[list[list[str]], list[int]]:
    """Greedy continuation of each prompt: (words before the end token, tokens generated incl. it)."""
    tok = em.tokenizer
    out = em.model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    counts = [row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row) for row in new]
    return [em.words(row) for row in new], counts


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Bag-of-words F1 (SQuAD style, with multiplicity): 1 for two empty strings."""
    if not prediction or not reference:
        return float(not prediction and not reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    p, r = common / len(prediction), common / len(reference)
    return 2 * p * r / (p + r)


class _BuiltinTask:
    name = ""
    metric = "accuracy"
    video = False  # video-only methods (slow-fast) get no rows on image tasks

    def encode(self, em: EvalModel, items: Sequence[Item]) -> dict[str, Tensor]:
        from . import builtin

        inputs = builtin.encode(em.processor, [em.prompt(it.prompt) for it in items], [list(it.images) for it in items])
        return {k: v.to(em.device) for k, v in inputs.items()}


class MultipleChoiceTask(_BuiltinTask):
    """Argmax over the question's choices of the answer-position logits (lmms-eval's loglikelihood
    requests reduce to this when every choice is one token)."""

    def evaluate(self, em: EvalModel, items: Sequence[Item], inputs: dict[str, Tensor]) -> BatchResult:
        logits = answer_logits(em, inputs).float()
        preds = []
        for it, row in zip(items, logits):
            ids = em.choice_ids(it.choices)
            preds.append(it.choices[int(row[ids].argmax())])
        return BatchResult([float(p == it.answer) for p, it in zip(preds, items)], preds, [0] * len(items))


class ImageMC(MultipleChoiceTask):
    name = "image_mc"

    def load(self, limit: int, data_dir: Path) -> list[Item]:
        from . import builtin, data

        out = []
        for i, s in enumerate(_images(limit)):
            q = _balanced_pick(s.questions, data.IMAGE_QTYPES, i)
            out.append(Item(f"{s.uid}/{q.qtype}", q.qtype, builtin.image_prompt(q.words), (s.image,), q.answer, q.choices))
        return out


class ImageShort(ImageMC):
    """The image questions answered by greedy generation: exact match of the first word."""

    name = "image_short"
    generates = True

    def evaluate(self, em: EvalModel, items: Sequence[Item], inputs: dict[str, Tensor]) -> BatchResult:
        words, counts = greedy(em, inputs, IMAGE_SHORT_MAX_NEW_TOKENS)
        preds = [w[0] if w else "" for w in words]
        return BatchResult([float(p == it.answer) for p, it in zip(preds, items)], preds, counts)


class VideoMC(MultipleChoiceTask):
    """The clip's 8 frames tiled into 2 mosaic images (4 frames each), then as image_mc."""

    name = "video_mc"
    video = True

    def load(self, limit: int, data_dir: Path) -> list[Item]:
        from . import builtin, data

        out = []
        for i, v in enumerate(_videos(limit, str(data_dir))):
            q = _balanced_pick(v.questions, data.VIDEO_QTYPES, i)
            imgs = tuple(data.mosaic(v.frames))
            out.append(Item(f"{v.uid}/{q.qtype}", q.qtype, builtin.image_prompt(q.words, len(imgs)), imgs, q.answer, q.choices))
        return out


class VideoCaption(_BuiltinTask):
    """Greedy caption of the clip's mosaics, scored by token F1 against the reference caption."""

    name = "video_caption"
    metric = "token_f1"
    video = True
    generates = True

    def load(self, limit: int, data_dir: Path) -> list[Item]:
        from . import builtin, data

        out = []
        for v in _videos(limit, str(data_dir)):
            imgs = tuple(data.mosaic(v.frames))
            out.append(Item(f"{v.uid}/caption", "caption", builtin.caption_prompt(len(imgs)), imgs, v.caption))
        return out

    def evaluate(self, em: EvalModel, items: Sequence[Item], inputs: dict[str, Tensor]) -> BatchResult:
        words, counts = greedy(em, inputs, CAPTION_MAX_NEW_TOKENS)
        scores = [token_f1(w, it.answer.split()) for w, it in zip(words, items)]
        return BatchResult(scores, [" ".join(w) for w in words], counts)


#: task name -> factory; issue 4 registers lmms-eval task kinds here.
TASKS: dict[str, Callable[[], Task]] = {
    "image_mc": ImageMC,
    "image_short": ImageShort,
    "video_mc": VideoMC,
    "video_caption": VideoCaption,
}


# ------------------------------------------------------------------------------------ measurement


class _PeakMemory:
    """Peak memory growth over a block: CUDA allocator peak, or peak RSS via /proc on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.value: float | None = None

    def __enter__(self) -> _PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.ok = _peak_rss_reset()
            self.base = _rss_kb("VmRSS") if self.ok else 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.value = max(0.0, (torch.cuda.max_memory_allocated() - self.base) / 2**20)
        elif self.ok:
            # RSS can shrink below the base after the reset; that is "no growth", not negative
            self.value = max(0.0, (_rss_kb("VmHWM") - self.base) / 1024)


@dataclass
class _Cell:
    """Accumulates one grid cell (task x method x ratio)."""

    scores: list[float] = field(default_factory=list)
    qtypes: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    visual: list[int] = field(default_factory=list)
    visual_in: list[int] = field(default_factory=list)
    llm: list[int] = field(default_factory=list)
    llm_raw: list[Any] = field(default_factory=list)  # per sample: a length, or one per decoder layer
    decode: list[Any] = field(default_factory=list)  # FLASH: one DecodeRecord per speculative generate
    generated: list[int] = field(default_factory=list)
    seconds: float = 0.0
    positions: str | None = None  # what the seam actually used (the model's default unless asked)
    flops: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def _llm_flops(model: Any, llm_tokens: int | tuple[int, ...], generated: int) -> flops_mod.FlopsReport:
    key = (id(model.config), llm_tokens, generated)
    cache = _llm_flops.__dict__.setdefault("cache", {})
    if key not in cache:
        cache[key] = flops_mod.estimate(model, None, llm_tokens, generated_tokens=generated, logits_positions=1)
    return cache[key]


def _account(cell: _Cell, em: EvalModel, inputs: dict[str, Tensor], records: list[Any], result: BatchResult) -> None:
    """Token counts and FLOPs of one batch, from what the method recorded (or the inputs, unpatched)."""
    if records:
        rec = records[-1]
        cell.positions = rec.positions
        first = [r for r in records if r.call == rec.call][0]  # the first seam of the call saw the stock input
        visual, visual_in = list(rec.visual_out), list(first.visual_in)
        llm = [tuple(t) for t in rec.layer_tokens] if rec.layer_tokens else list(rec.llm_tokens)
        overhead = sum(r.overhead_flops for r in records)
        call = [r for r in records if r.call == rec.call]
        vision_run = [r for r in call if r.vision_flops is not None]
    else:
        ids = inputs["input_ids"]
        visual = (ids == em.image_token_id).sum(1).tolist() if em.image_token_id is not None else [0] * len(ids)
        visual_in = list(visual)
        llm = inputs["attention_mask"].sum(1).tolist() if "attention_mask" in inputs else [ids.shape[1]] * len(ids)
        overhead = 0.0
    enc, proj = flops_mod.vision_flops(em.model, inputs)
    if records and vision_run:  # DyMU: the encoder ran at its shrinking length
        enc, proj = vision_run[-1].vision_flops, vision_run[-1].projector_flops or proj
    cell.flops["vision"] += enc
    cell.flops["projector"] += proj
    cell.flops["overhead"] += overhead
    for n, g in zip(llm, result.generated_tokens):
        rep = _llm_flops(em.model, n if isinstance(n, tuple) else int(n), int(g))
        cell.flops["llm_prefill"] += rep.llm_prefill
        cell.flops["decode"] += rep.decode
    cell.visual += [int(v) for v in visual]
    cell.visual_in += [int(v) for v in visual_in]
    cell.llm += [float(np.mean(n)) if isinstance(n, tuple) else int(n) for n in llm]
    cell.llm_raw += [n if isinstance(n, tuple) else int(n) for n in llm]
    cell.generated += list(result.generated_tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run_cell(
    task: Task, em: EvalModel, batches: list[tuple[list[Item], dict[str, Tensor]]], handle: Any, bar: Any
) -> _Cell:
    cell = _Cell()
    device = em.device
    for items, inputs in batches:
        if handle is not None:
            handle.stats.reset()
        _sync(device)
        start = time.perf_counter()
        result = task.evaluate(em, items, inputs)
        _sync(device)
        cell.seconds += time.perf_counter() - start
        records = list(handle.stats.records) if handle is not None else []
        if handle is not None:
            cell.decode += list(getattr(handle.stats, "decode", []))
        _account(cell, em, inputs, records, result)
        cell.scores += result.scores
        cell.qtypes += [it.qtype for it in items]
        cell.predictions += result.predictions
        if bar is not None:
            bar.update(len(items))
    return cell


def _row(task: Task, spec: GridCell, cell: _Cell, em: EvalModel, extra: dict[str, Any]) -> dict[str, Any]:
    method, ratio = spec.method, spec.ratio
    if ratio is None:  # methods without a ratio (DyVTE): the measured share of visual tokens removed
        seen, given = float(np.sum(cell.visual)), float(np.sum(cell.visual_in))
        ratio = round(1.0 - seen / given, 4) if given else 0.0
    n = max(len(cell.scores), 1)
    per_type: dict[str, list[float]] = defaultdict(list)
    for q, s in zip(cell.qtypes, cell.scores):
        per_type[q].append(s)
    per_sample = {k: v / n for k, v in cell.flops.items()}
    per_sample["total"] = sum(per_sample.values())
    return {
        "task": task.name,
        "metric": task.metric,
        "method": method,
        "ratio": ratio,
        "setting": spec.setting,
        "accuracy": 100.0 * float(np.mean(cell.scores)) if cell.scores else float("nan"),
        "per_type": {q: 100.0 * float(np.mean(v)) for q, v in sorted(per_type.items())},
        "per_type_n": {q: len(v) for q, v in sorted(per_type.items())},
        "n": len(cell.scores),
        "visual_tokens": float(np.mean(cell.visual)) if cell.visual else 0.0,
        "llm_tokens": float(np.mean(cell.llm)) if cell.llm else 0.0,
        "generated_tokens": float(np.mean(cell.generated)) if cell.generated else 0.0,
        "tflops": per_sample["total"] / 1e12,
        "flops": per_sample,
        "latency_s": cell.seconds / n,
        "model": em.name,
        **_decode_fields(cell),
        **extra,
    }


def _decode_fields(cell: _Cell) -> dict[str, Any]:
    """FLASH rows: accepted draft tokens and new tokens per verification round (the rows' FLOPs
    are the target's plain decoding; the draft's and the multi-token verification's extra work is
    not in them, the latency is measured)."""
    if not cell.decode:
        return {}
    rounds = sum(r.rounds for r in cell.decode)
    new = sum(r.new_tokens for r in cell.decode)
    total = sum(r.total_s for r in cell.decode)
    return {
        "mean_accepted": sum(r.accepted for r in cell.decode) / max(rounds, 1),
        "tokens_per_round": sum(r.new_tokens - 1 for r in cell.decode) / max(rounds, 1),
        "draft_s": sum(r.draft_s for r in cell.decode),
        "verify_s": sum(r.verify_s for r in cell.decode),
        "tokens_per_second": new / total if total else float("nan"),
    }


@dataclass(frozen=True)
class GridCell:
    """One method setting of the grid. ``ratio`` is None for methods that are not set by a ratio
    (DyVTE: its row reports the measured share of visual tokens removed); ``setting`` labels the
    row in tables and plots."""

    method: str
    ratio: float | None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def setting(self) -> str:
        if self.ratio is not None:
            return f"{self.ratio:g}"
        if self.method == "slowfast":
            return dict(self.options).get("mode", "")
        if self.method == "flash":
            return "draft=" + (Path(dict(self.options)["draft"]).name if "draft" in dict(self.options) else "untrained")
        return ",".join(f"{k}={Path(v).name if k == 'gates' else v}" for k, v in self.options)


def _method_options(spec: GridCell, seed: int, positions: str | None) -> dict[str, Any]:
    from vlmprune.registry import lookup

    names = lookup(spec.method)[0].option_names()
    options: dict[str, Any] = dict(spec.options)
    if spec.ratio is not None and "ratio" in names:
        options["ratio"] = spec.ratio
    if "seed" in names:
        options["seed"] = seed
    if positions is not None and "positions" in names:
        options["positions"] = positions
    return options


#: slow-fast cells on the built-in model (8 frames as two 2x2 mosaics of 8x8-patch frames):
#: fast-only (s1 t4 p2: 32 tokens), training-free SlowFast pooling (1 slow frame at stride 2 +
#: all 8 frames at stride 8: 24 tokens) and the trained hybrid (the fast tokens + cross-attention)
SLOWFAST_CELLS: dict[str, dict[str, Any]] = {
    "fast": {"mode": "fast"},
    "pooling": {"mode": "pooling", "slow_frames": 1, "slow_stride": 2, "fast_stride": 8},
    "hybrid": {"mode": "hybrid"},
}
DYMU_PRESETS: tuple[str, ...] = ("low", "mid", "high")
SLOWFAST_ADAPTER_DIR = "slowfast-hybrid"
FLASH_DRAFT_DIR = "flash-draft"


def grid(
    methods: Sequence[str], ratios: Sequence[float], exit_layers: Sequence[int] = (), gates: str | None = None,
    presets: Sequence[str] = DYMU_PRESETS, slowfast_modes: Sequence[str] = tuple(SLOWFAST_CELLS),
    extras: dict[str, dict[str, Any]] | None = None,
) -> list[GridCell]:
    """Cells: ``none`` once, every pruning method at every ratio, ``dyvte`` at every fixed exit
    layer and with ``gates`` (when given), ``dymu`` per preset, ``slowfast`` per mode, ``flash``
    once, stacks (``a+b``) at every ratio. ``extras``: per method, options this model needs (see
    :func:`method_extras`: the built-in model's mosaic layout, its shipped adapter and draft)."""
    extras = extras or {}
    flash = tuple(extras.get("flash", {}).items())
    cells: list[GridCell] = []
    for m in methods:
        if m == "none":
            cells.append(GridCell("none", 0.0))
        elif m == "dyvte":
            cells += [GridCell(m, None, (("exit_layer", int(k)),)) for k in exit_layers]
            if gates is not None:
                cells.append(GridCell(m, None, (("gates", str(gates)),)))
            if not exit_layers and gates is None:
                raise ValueError("dyvte needs --exit-layer K[,K...] or --gates PATH (no shipped gates for this model)")
        elif m == "dymu":
            cells += [GridCell(m, None, (("preset", p),)) for p in presets]
        elif m == "flash":
            cells.append(GridCell(m, 0.0, flash))
        elif m == "slowfast":
            for mode in slowfast_modes:
                if mode not in SLOWFAST_CELLS:
                    raise ValueError(f"unknown slow-fast mode {mode!r}; modes: {', '.join(SLOWFAST_CELLS)}")
                opts = {**SLOWFAST_CELLS[mode], **extras.get("slowfast", {})}
                if mode != "hybrid":
                    opts.pop("adapter", None)
                cells.append(GridCell(m, None, tuple(opts.items())))
        elif "+" in m:  # a stack, e.g. fastervlm+flash: the pruning part at every ratio
            cells += [GridCell(m, float(r), flash if "flash" in m.split("+") else ()) for r in ratios]
        else:
            cells += [GridCell(m, float(r)) for r in ratios]
    return cells


def _configs(spec: GridCell, seed: int, positions: str | None) -> list[Any]:
    """Config objects for a stacked cell (``a+b``): each part gets the options it knows."""
    from vlmprune.registry import make_config

    out = []
    for part in spec.method.split("+"):
        sub = GridCell(part, spec.ratio, spec.options if part == "flash" else ())
        out.append(make_config(part, _method_options(sub, seed, positions)))
    return out


def method_extras(em: EvalModel) -> dict[str, dict[str, Any]]:
    """Per method, the options this model needs: slow-fast gets the built-in model's mosaic layout
    and the trained adapter shipped next to the checkpoint, FLASH the shipped draft."""
    slowfast: dict[str, Any] = {"mosaic": 2} if em.builtin else {}
    extras: dict[str, dict[str, Any]] = {"slowfast": slowfast}
    if em.path is not None and (Path(em.path) / SLOWFAST_ADAPTER_DIR).exists():
        slowfast["adapter"] = str(Path(em.path) / SLOWFAST_ADAPTER_DIR)
    if em.path is not None and (Path(em.path) / FLASH_DRAFT_DIR).exists():
        extras["flash"] = {"draft": str(Path(em.path) / FLASH_DRAFT_DIR)}
    return extras


def _batched(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def run_eval(
    em: EvalModel,
    tasks: Sequence[str] = BUILTIN_TASKS,
    methods: Sequence[str] = DEFAULT_METHODS,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    positions: str | None = None,
    data_dir: str | os.PathLike | None = None,
    exit_layers: Sequence[int] = (),
    gates: str | None = None,
    presets: Sequence[str] = DYMU_PRESETS,
    slowfast_modes: Sequence[str] = tuple(SLOWFAST_CELLS),
    progress: bool | None = None,
    keep_predictions: bool = False,
) -> list[dict[str, Any]]:
    """Run the grid and return one row per (task, method, ratio); see the module docstring.

    ``limit``: items per task (default :data:`DEFAULT_LIMITS`). ``progress``: a tqdm bar over the
    whole grid (None: only on a terminal). ``keep_predictions`` adds each row's per-item
    ``predictions`` and ``scores`` (for tests and analysis)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    directory = Path(data_dir if data_dir is not None else DEFAULT_VIDEO_DIR).expanduser()
    cells = grid(methods, ratios, exit_layers, gates, presets, slowfast_modes, method_extras(em))
    torch.manual_seed(seed)
    task_objs = [TASKS[name]() for name in tasks]
    loaded = [(t, t.load(limit if limit is not None else DEFAULT_LIMITS.get(t.name, 100), directory)) for t in task_objs]
    total = sum(len(items) for _, items in loaded) * len(cells)
    bar = tqdm(total=total, desc="vlmprune-eval", unit="item", disable=(not progress) if progress is not None else None)
    rows = []
    plain: dict[str, tuple[dict[str, Any], list[str]]] = {}  # the unpatched row and predictions per task
    try:
        with torch.inference_mode():
            for task, items in loaded:
                batches = [(b, task.encode(em, b)) for b in _batched(items, batch_size)]
                if batches:  # warm-up (untimed): first-call allocations and lazy initialisation
                    answer_logits(em, batches[0][1])
                for spec in cells:
                    flash = "flash" in spec.method.split("+")
                    if (spec.method == "slowfast" and not getattr(task, "video", True)) or (
                        flash and not getattr(task, "generates", False)
                    ):
                        bar.update(len(items))
                        continue
                    cell_batches = batches
                    if flash:  # speculative decoding runs one prompt per call
                        cell_batches = [([it], task.encode(em, [it])) for it in items]
                    bar.set_postfix_str(f"{task.name} {spec.method} {spec.setting}")
                    with _PeakMemory(em.device) as mem:
                        if spec.method == "none":
                            cell = _run_cell(task, em, batches, None, bar)
                        else:
                            if "+" in spec.method:
                                patch = vlmprune.apply(em.model, _configs(spec, seed, positions))
                            else:
                                patch = vlmprune.apply(em.model, spec.method, **_method_options(spec, seed, positions))
                            with patch as handle:
                                cell = _run_cell(task, em, cell_batches, handle, bar)
                    extra = {"peak_mem_mb": mem.value, "batch_size": batch_size, "seed": seed,
                             "positions": cell.positions}
                    row = _row(task, spec, cell, em, extra)
                    if spec.method == "none":
                        plain[task.name] = row, cell.predictions
                    elif spec.method == "flash" and task.name in plain:  # lossless? and how much faster
                        base, preds = plain[task.name]
                        row["identical_to_none"] = cell.predictions == preds
                        row["speedup_vs_none"] = base["latency_s"] / row["latency_s"] if row["latency_s"] else float("nan")
                    if keep_predictions:
                        row["predictions"] = cell.predictions
                        row["scores"] = cell.scores
                    rows.append(row)
                del batches
    finally:
        bar.close()
    return rows


# ------------------------------------------------------------------------------------ outputs


def write_json(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in r.items() if k not in ("predictions", "scores")} for r in rows]
    path.write_text(json.dumps(clean, indent=1, allow_nan=True))
    return path


def _metric_label(metric: str) -> str:
    return {"accuracy": "accuracy", "token_f1": "token F1"}.get(metric, metric)


def _fmt_mem(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _setting(r: dict[str, Any]) -> str:
    """The ratio column: the ratio asked for, or for DyVTE its setting and the measured ratio."""
    setting = r.get("setting", f"{r['ratio']:g}")
    return setting if setting == f"{r['ratio']:g}" else f"{setting} ({r['ratio']:.2f})"


def summary_tables(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the main table and one per-question-type table per task."""
    head = ["task", "metric", "method", "ratio", "accuracy %", "visual tokens", "TFLOPs", "latency ms", "peak mem MB"]
    body = [
        [r["task"], _metric_label(r["metric"]), r["method"], _setting(r), f"{r['accuracy']:.1f}",
         f"{r['visual_tokens']:.1f}", f"{r['tflops']:.5f}", f"{1e3 * r['latency_s']:.1f}", _fmt_mem(r["peak_mem_mb"])]
        for r in rows
    ]
    tables = [("results (per sample: TFLOPs, latency; accuracy % or token F1 %)", head, body)]
    for task in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == task]
        qtypes = list(dict.fromkeys(q for r in trows for q in r["per_type"]))
        head_t = ["method", "ratio", *qtypes]
        body_t = [[r["method"], _setting(r), *(f"{r['per_type'][q]:.1f}" if q in r["per_type"] else "-" for q in qtypes)]
                  for r in trows]
        tables.append((f"{task}: {_metric_label(trows[0]['metric'])} % per question type", head_t, body_t))
    return tables


def format_plain(tables: Sequence[tuple[str, list[str], list[list[str]]]]) -> str:
    """Markdown tables (what the README shows and what a non-terminal gets)."""
    out = []
    for title, head, body in tables:
        out += [f"{title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in body]
        out.append("")
    return "\n".join(out)


def print_tables(rows: Sequence[dict[str, Any]], plain: bool = False) -> None:
    """Rich tables on a terminal when rich is installed, markdown otherwise."""
    tables = summary_tables(rows)
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_plain(tables))
        return
    console = Console()
    if not console.is_terminal:
        print(format_plain(tables))
        return
    for title, head, body in tables:
        table = Table(title=title)
        for h in head:
            table.add_column(h, justify="left" if h in ("task", "metric", "method") else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Accuracy versus TFLOPs per sample: one subplot per task, one line per method (labelled by
    ratio), the unpatched model as a star and a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cols = min(2, len(tasks)) or 1
    nrows = math.ceil(len(tasks) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.2 * nrows), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    for ax, task in zip(axes.flat, tasks):
        trows = [r for r in rows if r["task"] == task]
        for r in (r for r in trows if r["method"] == "none"):
            ax.axhline(r["accuracy"], color="black", linestyle="--", linewidth=0.8)
            ax.plot(r["tflops"], r["accuracy"], marker="*", markersize=12, color="black", linestyle="none",
                    label="none (unpruned)")
        for m in methods:
            pts = sorted((r for r in trows if r["method"] == m), key=lambda r: r["tflops"])
            if not pts:
                continue
            ax.plot([p["tflops"] for p in pts], [p["accuracy"] for p in pts], marker="o", color=colours[m], label=m)
            for p in pts:
                ax.annotate(p.get("setting", f"{p['ratio']:g}").replace("exit_layer=", "K="), (p["tflops"], p["accuracy"]), textcoords="offset points",
                            xytext=(3, 3), fontsize=7, color=colours[m])
        ylabel = "token F1 %" if trows[0]["metric"] == "token_f1" else "accuracy %"
        ax.set(title=task, xlabel="TFLOPs per sample", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
