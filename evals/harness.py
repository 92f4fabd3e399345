"""The eval harness behind ``vlmprune-eval``: tasks, scoring, the (task x method x ratio) grid, outputs.

A *task* turns a split into items, encodes a batch of items into model inputs (once for the
whole grid when a task's inputs fit :data:`ENCODED_BYTES_KEPT`, else again for every grid cell,
batch by batch, so memory stays bounded; never timed), and scores a batch with one model call (a
forward for multiple choice, ``generate`` for short answers and captions). The runner owns
everything method-related: it applies each cell's configs in a ``with vlmprune.apply(...)``
block, times the model calls, reads what the method did from ``handle.stats`` and turns it into
FLOPs with :mod:`vlmprune.flops`, so a new task kind (issue 4: lmms-eval tasks) only has to
implement the :class:`Task` protocol and register itself in :data:`TASKS`.

The harness names no method: a method's grid cells, the options a model needs, the row labels
and the traits that decide where it runs come from its config class (the eval-grid contract of
:class:`vlmprune.method.MethodConfig`); ``none``, the unpatched model, is the one name it knows.

Conventions of the numbers in a row (one row per task x method x ratio):

* ``accuracy``: percent of items scored correct; for ``video_caption`` it is the mean token F1
  against the reference caption, for ``video_dense_caption`` the mean per-fact score (its token F1
  is in ``other_metrics``), in percent (``metric`` says which).
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from vlmprune.files import looks_like_hub_id
from vlmprune.method import EvalContext, MethodConfig, axis_product
from vlmprune.registry import available_methods, lookup, make_config

BUILTIN_TASKS: tuple[str, ...] = ("image_mc", "image_short", "video_mc", "video_caption")
#: built-in tasks outside the default grid (run with ``--task``): the dense captions are written
#: by the captioner (evals/captioner); the built-in model was never trained on them
EXTRA_TASKS: tuple[str, ...] = ("video_dense_caption",)
DEFAULT_RATIOS: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95)
#: the unpatched model's name in a method list (the only method name the harness knows)
NONE = "none"


def default_methods() -> tuple[str, ...]:
    """The default grid's methods: ``none``, then every registered method whose config sets
    :attr:`~vlmprune.method.MethodConfig.eval_default_rank`, lowest rank first."""
    ranks = {name: lookup(name)[0].eval_default_rank for name in available_methods()}
    return (NONE, *sorted((n for n, r in ranks.items() if r is not None), key=lambda n: (ranks[n], n)))


#: items per task of the default run, sized so that the whole default grid (4 tasks x 13 cells)
#: finishes in under 5 minutes on a 2-core CPU (measured with the untrained built-in model, which
#: never stops a caption early, 1 thread, the other core busy: 3 min 20 s wall, videos written cold).
DEFAULT_LIMITS: dict[str, int] = {"image_mc": 300, "image_short": 150, "video_mc": 150, "video_caption": 60,
                                  "video_dense_caption": 60}
DEFAULT_VIDEO_DIR = Path("~/.cache/vlmprune/builtin-videos")
IMAGE_SHORT_MAX_NEW_TOKENS = 3
CAPTION_MAX_NEW_TOKENS = 24
#: the longest dense caption is 47 words and its end token
DENSE_CAPTION_MAX_NEW_TOKENS = 56
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
    ``AutoProcessor`` (nothing is downloaded). A hub id (``llava-hf/llava-1.5-7b-hf``): the same,
    fetched from the hub where it is reachable (or taken from the local cache)."""
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
    if spec == "builtin":
        return load_model(None, device, seed)
    if spec == "captioner":
        spec = str(Path(builtin.__file__).parent / "captioner")
    path = Path(spec).expanduser()
    hub = not path.is_dir() and looks_like_hub_id(spec)
    if not path.is_dir() and not hub:
        raise ModelLoadError(
            f"--model {spec!r} is not a directory; pass a checkpoint saved with "
            "vlmprune.evals.builtin.save_builtin, a local Hugging Face checkpoint or a hub id, or omit "
            "--model for the shipped built-in model"
        )
    if not hub and _is_builtin_checkpoint(path):
        model, processor = builtin.load_builtin(path, device=device)
        return EvalModel(model, processor, str(path), path=path)
    source = spec if hub else path
    try:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=not hub).to(device).eval()
        processor = AutoProcessor.from_pretrained(source, local_files_only=not hub)
    except Exception as exc:  # noqa: BLE001 - one line for the command line, whatever went wrong
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        what = f"hub id {spec!r} (is the hub reachable?)" if hub else str(path)
        raise ModelLoadError(f"cannot load {what} with AutoModelForImageTextToText/AutoProcessor: {first}") from None
    return EvalModel(model, processor, str(source), builtin=False, path=None if hub else path)


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
    #: secondary metrics per item (e.g. token F1 beside the per-fact score), averaged into the row's
    #: ``other_metrics`` in percent
    other: dict[str, list[float]] = field(default_factory=dict)


class Task(Protocol):
    """A task kind the runner can grid over (built-in tasks here; lmms-eval tasks later).

    Optional attributes: traits that methods may need (:attr:`MethodConfig.eval_needs`), e.g.
    ``video = True`` or ``generates = True`` (a missing trait counts as false), and
    ``split_size``, the items in the split (a larger ``limit`` is capped to it)."""

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


#: above this many samples a task's items are made on demand, batch by batch, instead of held in
#: memory for the whole grid (an image item holds ~150 KB, a clip ~1.2 MB): memory stays flat
#: whatever ``--limit`` is, at the cost of remaking the items for every cell
KEEP_ITEMS = {"image": 2000, "video": 500}


class LazyItems(Sequence):
    """``n`` items, item ``i`` made by ``make(i)`` when asked for (slices give lists)."""

    def __init__(self, n: int, make: Any) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.make(j) for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.make(i % self.n)


def _items(n: int, make: Any, kind: str) -> Sequence[Any]:
    return [make(i) for i in range(n)] if n <= KEEP_ITEMS[kind] else LazyItems(n, make)


@lru_cache(maxsize=4)
def _images(n: int) -> Sequence[Any]:
    from . import data

    return _items(n, lambda i: data.make_image("test", i), "image")


@lru_cache(maxsize=4)
def _videos(n: int, directory: str) -> Sequence[Any]:
    from . import data

    return _items(n, lambda i: data.video_clip("test", i, directory), "video")


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
    """Traits (read against :attr:`MethodConfig.eval_needs`): ``video``, ``generates``."""

    name = ""
    metric = "accuracy"
    video = False  # video-only methods get no rows on image tasks
    generates = False  # decoding methods get no rows on tasks scored by logits
    #: items in the test split: sample ``i`` has seed ``SPLIT_SEEDS["test"] + i`` and the data
    #: module refuses an index of 1,000,000 or more (it would overlap the next split)
    split_size = 1_000_000

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

        samples = _images(limit)

        def item(i: int) -> Item:
            s = samples[i]
            q = _balanced_pick(s.questions, data.IMAGE_QTYPES, i)
            return Item(f"{s.uid}/{q.qtype}", q.qtype, builtin.image_prompt(q.words), (s.image,), q.answer, q.choices)

        return _items(len(samples), item, "image")


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

        clips = _videos(limit, str(data_dir))

        def item(i: int) -> Item:
            v = clips[i]
            q = _balanced_pick(v.questions, data.VIDEO_QTYPES, i)
            imgs = tuple(data.mosaic(v.frames))
            return Item(f"{v.uid}/{q.qtype}", q.qtype, builtin.image_prompt(q.words, len(imgs)), imgs, q.answer, q.choices)

        return _items(len(clips), item, "video")


class VideoCaption(_BuiltinTask):
    """Greedy caption of the clip's mosaics, scored by token F1 against the reference caption."""

    name = "video_caption"
    metric = "token_f1"
    video = True
    generates = True

    def load(self, limit: int, data_dir: Path) -> list[Item]:
        from . import builtin, data

        clips = _videos(limit, str(data_dir))

        def item(i: int) -> Item:
            v = clips[i]
            imgs = tuple(data.mosaic(v.frames))
            return Item(f"{v.uid}/caption", "caption", builtin.caption_prompt(len(imgs)), imgs, v.caption)

        return _items(len(clips), item, "video")

    def evaluate(self, em: EvalModel, items: Sequence[Item], inputs: dict[str, Tensor]) -> BatchResult:
        words, counts = greedy(em, inputs, CAPTION_MAX_NEW_TOKENS)
        scores = [token_f1(w, it.answer.split()) for w, it in zip(words, items)]
        return BatchResult(scores, [" ".join(w) for w in words], counts)


@lru_cache(maxsize=4)
def _dense_clips(n: int, directory: str) -> Sequence[Any]:
    from . import data

    return _items(n, lambda i: data.dense_clip("test", i, directory), "video")


class VideoDenseCaption(_BuiltinTask):
    """Dense captioning: 2-3 objects per clip, a 33-47 word reference naming each object's size,
    colour, shape, where it appears, how it moves and the order of events (data.make_dense_video).
    Scored by the exact per-fact score (share of the clip's facts the caption states correctly,
    data.fact_score) as the row's accuracy, and by token F1 (``other_metrics``). Long captions are
    where decoding dominates and a speculative decoder can pay off."""

    name = "video_dense_caption"
    metric = "fact_score"
    video = True
    generates = True

    def load(self, limit: int, data_dir: Path) -> list[Item]:
        from . import builtin, data

        clips = _dense_clips(limit, str(data_dir))

        def item(i: int) -> Item:
            v = clips[i]
            imgs = tuple(data.mosaic(v.frames))
            return Item(f"{v.uid}/dense", f"{len(v.objects)}_objects", builtin.image_prompt(data.DENSE_PROMPT, len(imgs)),
                        imgs, v.caption)

        return _items(len(clips), item, "video")

    def evaluate(self, em: EvalModel, items: Sequence[Item], inputs: dict[str, Tensor]) -> BatchResult:
        from . import data

        words, counts = greedy(em, inputs, DENSE_CAPTION_MAX_NEW_TOKENS)
        facts = [data.fact_score(w, it.answer.split()) for w, it in zip(words, items)]
        f1 = [token_f1(w, it.answer.split()) for w, it in zip(words, items)]
        return BatchResult(facts, [" ".join(w) for w in words], counts, {"token_f1": f1})


#: task name -> factory; issue 4 registers lmms-eval task kinds here.
TASKS: dict[str, Callable[[], Task]] = {
    "image_mc": ImageMC,
    "image_short": ImageShort,
    "video_mc": VideoMC,
    "video_caption": VideoCaption,
    "video_dense_caption": VideoDenseCaption,
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
    other: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0
    positions: str | None = None  # what the seam actually used (the model's default unless asked)
    flops: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def _llm_flops(model: Any, llm_tokens: int | tuple[int, ...], generated: int) -> flops_mod.FlopsReport:
    key = (id(model.config), llm_tokens, generated)
    cache = _llm_flops.__dict__.setdefault("cache", {})
    if key not in cache:
        cache[key] = flops_mod.estimate(model, None, llm_tokens, generated_tokens=generated, logits_positions=1)
    return cache[key]


def _account(cell: _Cell, em: EvalModel, inputs: dict[str, Tensor], records: list[Any], result: BatchResult,
             decode: Sequence[Any] = ()) -> None:
    """Token counts and FLOPs of one batch, from what the method recorded (or the inputs, unpatched).

    ``decode``: the batch's speculative-decoding records. Where they counted the target's decode
    forwards (every verified position, rejected ones included), that replaces the estimate of plain
    decoding, and the draft's work is added as overhead, so such rows are compared at the work
    they really did."""
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
    counted = [r for r in decode if getattr(r, "target_decode_flops", 0.0) > 0]
    for n, g in zip(llm, result.generated_tokens):
        rep = _llm_flops(em.model, n if isinstance(n, tuple) else int(n), int(g))
        cell.flops["llm_prefill"] += rep.llm_prefill
        if not counted:
            cell.flops["decode"] += rep.decode
    for r in counted:
        cell.flops["decode"] += r.target_decode_flops
        cell.flops["overhead"] += r.draft_flops
    cell.visual += [int(v) for v in visual]
    cell.visual_in += [int(v) for v in visual_in]
    cell.llm += [float(np.mean(n)) if isinstance(n, tuple) else int(n) for n in llm]
    cell.llm_raw += [n if isinstance(n, tuple) else int(n) for n in llm]
    cell.generated += list(result.generated_tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run_cell(
    task: Task, em: EvalModel, batches: Iterable[tuple[list[Item], dict[str, Tensor]]], handle: Any, bar: Any
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
        decode = list(getattr(handle.stats, "decode", [])) if handle is not None else []
        cell.decode += decode
        _account(cell, em, inputs, records, result, decode)
        cell.scores += result.scores
        cell.qtypes += [it.qtype for it in items]
        cell.predictions += result.predictions
        for k, v in result.other.items():
            cell.other[k] += v
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
        **({"other_metrics": {k: 100.0 * float(np.mean(v)) for k, v in cell.other.items()}} if cell.other else {}),
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
    (e.g. an exit layer: the row reports the measured share of visual tokens removed); ``options`` are a single
    method's options (the cell's own, merged over what the model needs, ratio left out), ``parts``
    a stack's ``(part, options)`` pairs; ``label`` is the config's :meth:`setting_label` (empty:
    the row is labelled by its ratio). ``setting`` labels the row in tables and plots."""

    method: str
    ratio: float | None
    options: tuple[tuple[str, Any], ...] = ()
    label: str = ""
    parts: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    @property
    def setting(self) -> str:
        if self.label:
            return self.label
        return f"{self.ratio:g}" if self.ratio is not None else ""

    @property
    def unpatched(self) -> bool:
        return self.method == NONE

    def part_options(self) -> list[tuple[str, dict[str, Any]]]:
        """``(method, options)`` of every part: one for a single method, several for a stack."""
        if self.unpatched:
            return []
        if self.parts:
            return [(name, dict(opts)) for name, opts in self.parts]
        return [(self.method, dict(self.options))]

    def config_classes(self) -> list[type[MethodConfig]]:
        return [lookup(name)[0] for name, _ in self.part_options()]

    def needs(self) -> frozenset[str]:
        """Task traits the cell needs (the union of its parts' :attr:`MethodConfig.eval_needs`)."""
        return frozenset().union(*(c.eval_needs for c in self.config_classes()))

    @property
    def one_prompt_per_call(self) -> bool:
        return any(c.eval_one_prompt_per_call for c in self.config_classes())

    @property
    def lossless(self) -> bool:
        classes = self.config_classes()
        return bool(classes) and all(c.eval_lossless for c in classes)


@dataclass(frozen=True)
class MethodSpec:
    """A method of the grid (a registered name, or a stack ``a+b``) with the user's axes: values per
    option, e.g. ``MethodSpec("mine", (("k", (1, 2)),))``. Written ``NAME:key=v1,v2;key2=v``."""

    name: str
    axes: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def parts(self) -> list[str]:
        return self.name.split("+")

    def axes_dict(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in self.axes}

    def with_axes(self, axes: Mapping[str, Sequence[Any]]) -> MethodSpec:
        """The same method with ``axes`` added where it has that option and no axis of its own."""
        mine = self.axes_dict()
        names = set().union(*(lookup(p)[0].option_names() for p in self.parts)) if self.name != NONE else set()
        extra = {k: list(v) for k, v in axes.items() if k in names and k not in mine}
        return MethodSpec(self.name, tuple((k, tuple(v)) for k, v in {**mine, **extra}.items()))

    def __str__(self) -> str:
        if not self.axes:
            return self.name
        return self.name + ":" + ";".join(f"{k}=" + ",".join(map(str, v)) for k, v in self.axes)


def parse_value(text: str) -> Any:
    """A CLI option value: int, float, bool (true/false), None (none/null) or the string itself."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_method(text: str) -> MethodSpec:
    """``NAME`` or ``NAME:key=v1,v2;key2=v3`` (values parsed by :func:`parse_value`)."""
    name, _, rest = text.strip().partition(":")
    axes: dict[str, list[Any]] = {}
    for chunk in (c for c in rest.split(";") if c.strip()):
        key, eq, values = chunk.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"method options are written NAME:key=v1,v2;key2=v3; got {chunk.strip()!r} in {text!r}")
        axes.setdefault(key, []).extend(parse_value(v) for v in values.split(",") if v.strip())
        if not axes[key]:
            raise ValueError(f"option {key!r} of {name.strip()!r} has no value")
    return MethodSpec(name.strip(), tuple((k, tuple(v)) for k, v in axes.items()))


def _as_spec(method: str | MethodSpec) -> MethodSpec:
    return method if isinstance(method, MethodSpec) else parse_method(method)


def eval_context(em: EvalModel) -> EvalContext:
    """What the methods' eval hooks may know about ``em``: its checkpoint (shipped artifacts),
    whether it is the built-in model and its decoder depth."""
    import vlmprune.adapters

    try:
        layers: int | None = len(vlmprune.adapters.for_model(em.model).decoder_layers)
    except TypeError:  # not a supported family: only the unpatched model can run anyway
        layers = None
    return EvalContext(checkpoint=em.path, builtin=em.builtin, num_layers=layers)


def _frozen(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in options.items() if k != "ratio")


def _method_cells(spec: MethodSpec, ratios: Sequence[float], model: EvalContext) -> list[GridCell]:
    """A single method's cells: its config's eval_cells, each merged over its eval_defaults."""
    cfg = lookup(spec.name)[0]
    cells = []
    for own in cfg.eval_cells(ratios, model, spec.axes_dict()):
        ratio = own.get("ratio")
        options = {**cfg.eval_defaults(model, own), **own}
        cells.append(GridCell(spec.name, None if ratio is None else float(ratio), _frozen(options),
                              cfg.setting_label(own)))
    return cells


def _stack_cells(spec: MethodSpec, ratios: Sequence[float], model: EvalContext) -> list[GridCell]:
    """A stack (``a+b``): one cell per ratio (when a part takes a ratio) and combination of the
    axes; each axis goes to the parts that have that option, each part gets its own defaults."""
    classes = [lookup(p)[0] for p in spec.parts]
    axes = spec.axes_dict()
    known = set().union(*(c.option_names() for c in classes))
    unknown = sorted(set(axes) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {spec.name!r}; valid options: {', '.join(sorted(known))}")
    takes_ratio = any("ratio" in c.option_names() for c in classes)
    ratio_values: list[float | None] = [float(r) for r in axes.pop("ratio", ratios)] if takes_ratio else [None]
    cells = []
    for ratio in ratio_values:
        for combo in axis_product(axes):
            parts = []
            for name, cfg in zip(spec.parts, classes):
                own = {k: v for k, v in combo.items() if k in cfg.option_names()}
                parts.append((name, _frozen({**cfg.eval_defaults(model, own), **own})))
            label = MethodConfig.setting_label(combo)
            cells.append(GridCell(spec.name, ratio, label=label, parts=tuple(parts)))
    return cells


def grid(
    methods: Sequence[str | MethodSpec], ratios: Sequence[float], exit_layers: Sequence[int] = (),
    gates: str | None = None, *, axes: Mapping[str, Sequence[Any]] | None = None, model: EvalContext | None = None,
) -> list[GridCell]:
    """The grid's cells, in the order of ``methods``: ``none`` once (the unpatched model, ratio 0),
    every other method as its config's :meth:`~vlmprune.method.MethodConfig.eval_cells` makes it
    (a pruning method at every ratio; presets, modes, exit layers per the method), each merged
    over what ``model`` needs (:meth:`~vlmprune.method.MethodConfig.eval_defaults`), stacks
    (``a+b``) at every ratio.

    ``methods``: names or ``NAME:key=v1,v2;key2=v`` specs (:func:`parse_method`). ``axes``: option
    values for every method that has that option and no axis of its own (the CLI's ``--opt``).
    ``exit_layers`` / ``gates``: deprecated, the same as ``axes={"exit_layer": exit_layers,
    "gates": [gates]}``. ``model``: the model's :func:`eval_context` (None: nothing known, so no
    shipped defaults)."""
    model = model or EvalContext()
    shared = dict(axes or {})
    if exit_layers:
        shared.setdefault("exit_layer", [int(k) for k in exit_layers])
    if gates is not None:
        shared.setdefault("gates", [str(gates)])
    cells: list[GridCell] = []
    for method in methods:
        spec = _as_spec(method)
        if spec.name == NONE:
            cells.append(GridCell(NONE, 0.0))
            continue
        spec = spec.with_axes(shared)
        cells += _stack_cells(spec, ratios, model) if "+" in spec.name else _method_cells(spec, ratios, model)
    return cells


def cell_configs(spec: GridCell, seed: int, positions: str | None) -> list[MethodConfig]:
    """The config objects of a cell (several for a stack): its options, the cell's ratio where a
    part takes one, and the run's ``seed`` / ``positions`` where a part has them and the cell does
    not set them itself."""
    out = []
    for name, options in spec.part_options():
        names = lookup(name)[0].option_names()
        if spec.ratio is not None and "ratio" in names:
            options["ratio"] = spec.ratio
        if "seed" in names:
            options.setdefault("seed", seed)
        if positions is not None and "positions" in names:
            options.setdefault("positions", positions)
        out.append(make_config(name, options))
    return out


def applies_to(spec: GridCell, task: Task) -> bool:
    """Whether the cell gets rows on ``task``: the task has every trait the cell's methods need
    (a ``video`` / ``generates`` attribute that is true)."""
    return all(getattr(task, need, False) for need in spec.needs())


#: encoded inputs kept for the whole grid when a task's are estimated below this size (every
#: default run: encoded once); above it, each grid cell encodes batch by batch again, so memory
#: stays bounded whatever ``--limit`` is
ENCODED_BYTES_KEPT = 1 << 30


def _batched(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _nbytes(inputs: dict[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, Tensor))


class _Batches:
    """A task's batches and their encoded inputs, iterable once per grid cell.

    The first batch is encoded at once (the warm-up call uses it); when the whole task's inputs
    are estimated (from that batch) below :data:`ENCODED_BYTES_KEPT`, every batch is encoded up
    front and reused by every cell, else each pass encodes batch by batch (memory: one batch).
    ``one_prompt`` passes give batches of one item, encoded lazily.
    """

    def __init__(self, task: Task, em: EvalModel, items: Sequence[Item], batch_size: int) -> None:
        self.task, self.em, self.items, self.batch_size = task, em, items, batch_size
        self.first = task.encode(em, list(items[:batch_size])) if items else None
        self.kept: list[tuple[list[Item], dict[str, Tensor]]] | None = None
        if self.first is not None:
            per_item = _nbytes(self.first) / min(batch_size, len(items))
            if per_item * len(items) <= ENCODED_BYTES_KEPT:
                rest = [(b, task.encode(em, b)) for b in _batched(items[batch_size:], batch_size)]
                self.kept = [(list(items[:batch_size]), self.first), *rest]

    def passes(self, one_prompt: bool = False) -> Iterator[tuple[list[Item], dict[str, Tensor]]]:
        if one_prompt:
            return (([it], self.task.encode(self.em, [it])) for it in self.items)
        if self.kept is not None:
            return iter(self.kept)
        return ((b, self.task.encode(self.em, b)) for b in _batched(self.items, self.batch_size))


def split_size(task: Task) -> int | None:
    """Items in the task's test split (None: unknown); a larger ``limit`` is capped to it."""
    return getattr(task, "split_size", None)


def run_eval(
    em: EvalModel,
    tasks: Sequence[str] = BUILTIN_TASKS,
    methods: Sequence[str | MethodSpec] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    positions: str | None = None,
    data_dir: str | os.PathLike | None = None,
    exit_layers: Sequence[int] = (),
    gates: str | None = None,
    axes: Mapping[str, Sequence[Any]] | None = None,
    cells: Sequence[GridCell] | None = None,
    progress: bool | None = None,
    keep_predictions: bool = False,
) -> list[dict[str, Any]]:
    """Run the grid and return one row per (task, method, ratio); see the module docstring.

    ``methods`` (default: :func:`default_methods`) / ``axes`` / ``exit_layers`` / ``gates``: see
    :func:`grid` (or pass ``cells`` made by it). ``limit``: items per task (default :data:`DEFAULT_LIMITS`; capped to the task's
    split). ``progress``: a tqdm bar over the whole grid (None: only on a terminal).
    ``keep_predictions`` adds each row's per-item ``predictions`` and ``scores`` (for tests and
    analysis)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    directory = Path(data_dir if data_dir is not None else DEFAULT_VIDEO_DIR).expanduser()
    if cells is None:
        methods = default_methods() if methods is None else methods
        cells = grid(methods, ratios, exit_layers, gates, axes=axes, model=eval_context(em))
    for spec in cells:  # a bad option fails here, before any item is scored
        cell_configs(spec, seed, positions)
    torch.manual_seed(seed)
    task_objs = [TASKS[name]() for name in tasks]
    loaded = [(t, t.load(_task_limit(t, limit), directory)) for t in task_objs]
    total = sum(len(items) for _, items in loaded) * len(cells)
    bar = tqdm(total=total, desc="vlmprune-eval", unit="item", disable=(not progress) if progress is not None else None)
    rows = []
    try:
        with torch.inference_mode():
            for task, items in loaded:
                rows += _run_task(task, items, em, cells, batch_size, seed, positions, bar, keep_predictions)
    finally:
        bar.close()
    return rows


def _task_limit(task: Task, limit: int | None) -> int:
    n = limit if limit is not None else DEFAULT_LIMITS.get(task.name, 100)
    size = split_size(task)
    return n if size is None else min(n, size)


def _run_task(
    task: Task, items: Sequence[Item], em: EvalModel, cells: Sequence[GridCell], batch_size: int, seed: int,
    positions: str | None, bar: Any, keep_predictions: bool,
) -> list[dict[str, Any]]:
    """Every cell of the grid on one task's items (their inputs encoded once when they fit)."""
    batches = _Batches(task, em, items, batch_size)
    if batches.first is not None:  # warm-up (untimed): first-call allocations and lazy initialisation
        answer_logits(em, batches.first)
    rows = []
    plain: tuple[dict[str, Any], list[str]] | None = None  # the unpatched row and its predictions
    for spec in cells:
        if not applies_to(spec, task):
            bar.update(len(items))
            continue
        bar.set_postfix_str(f"{task.name} {spec.method} {spec.setting}")
        with _PeakMemory(em.device) as mem:
            if spec.unpatched:
                cell = _run_cell(task, em, batches.passes(), None, bar)
            else:
                with vlmprune.apply(em.model, cell_configs(spec, seed, positions)) as handle:
                    cell = _run_cell(task, em, batches.passes(spec.one_prompt_per_call), handle, bar)
        extra = {"peak_mem_mb": mem.value, "batch_size": batch_size, "seed": seed, "positions": cell.positions}
        row = _row(task, spec, cell, em, extra)
        if spec.unpatched:
            plain = row, cell.predictions
        elif spec.lossless and plain is not None:  # lossless? and how much faster
            base, preds = plain
            row["identical_to_none"] = cell.predictions == preds
            row["speedup_vs_none"] = base["latency_s"] / row["latency_s"] if row["latency_s"] else float("nan")
        if keep_predictions:
            row["predictions"] = cell.predictions
            row["scores"] = cell.scores
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ outputs


def write_json(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in r.items() if k not in ("predictions", "scores")} for r in rows]
    path.write_text(json.dumps(clean, indent=1, allow_nan=True))
    return path


def _metric_label(metric: str) -> str:
    return {"accuracy": "accuracy", "token_f1": "token F1", "fact_score": "per-fact score"}.get(metric, metric)


def _fmt_mem(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _fmt_gflops(tflops: float) -> str:
    """GFLOPs with three significant digits or more (the built-in model's 0.00129 TFLOPs: 1.29)."""
    g = 1e3 * tflops
    return f"{g:#.3g}" if g < 100 else f"{g:.0f}"


def _setting(r: dict[str, Any]) -> str:
    """The setting column: the ratio asked for, or the method's setting and the measured ratio."""
    setting = r.get("setting", f"{r['ratio']:g}")
    return setting if setting == f"{r['ratio']:g}" else f"{setting} ({r['ratio']:.2f})"


#: the main table's columns, sized for an 80-column terminal (the JSON keeps every field at full
#: precision): the metric is named in the title, "tokens" are the visual tokens the LLM saw, FLOPs
#: are per sample in GFLOPs, latency in ms, peak memory in MB
MAIN_COLUMNS: tuple[str, ...] = ("task", "method", "setting", "score", "tokens", "GFLOPs", "ms", "MB")
#: columns that never wrap up to this width (names), the rest ("setting") wraps
_TEXT_COLUMNS = ("task", "method", "setting")
_NAME_WIDTH = 16


def _score_title(rows: Sequence[dict[str, Any]]) -> str:
    other = {r["task"]: r["metric"] for r in rows if r["metric"] != "accuracy"}
    if not other:
        return "accuracy %"
    named = ", ".join(f"{_metric_label(m)} % for {t}" for t, m in other.items())
    return f"accuracy % ({named})" if any(r["metric"] == "accuracy" for r in rows) else named


def summary_tables(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the main table and one per-question-type table per task."""
    body = [
        [r["task"], r["method"], _setting(r), f"{r['accuracy']:.1f}", f"{r['visual_tokens']:.1f}",
         _fmt_gflops(r["tflops"]), f"{1e3 * r['latency_s']:.1f}", _fmt_mem(r["peak_mem_mb"])]
        for r in rows
    ]
    title = (f"results per sample (score: {_score_title(rows)}; tokens: visual tokens the LLM saw; "
             "GFLOPs; latency ms; peak memory MB)")
    tables = [(title, list(MAIN_COLUMNS), body)]
    for task in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == task]
        qtypes = list(dict.fromkeys(q for r in trows for q in r["per_type"]))
        head_t = ["method", "setting", *qtypes]
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


def rich_tables(tables: Sequence[tuple[str, list[str], list[list[str]]]]) -> list[Any]:
    """The tables as rich Tables that fit an 80-column terminal: light borders, one space between
    columns, names kept whole (up to 16 characters), the setting wrapped where it must be; a cell
    wraps or folds, it never ends in an ellipsis."""
    from rich import box
    from rich.table import Table

    out = []
    for title, head, body in tables:
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
        for i, h in enumerate(head):
            longest = max([len(h), *(len(row[i]) for row in body)])
            if h in _TEXT_COLUMNS:
                table.add_column(h, overflow="fold", min_width=None if h == "setting" else min(longest, _NAME_WIDTH))
            else:
                table.add_column(h, justify="right", overflow="fold", min_width=min(longest, _NAME_WIDTH))
        for row in body:
            table.add_row(*row)
        out.append(table)
    return out


def print_tables(rows: Sequence[dict[str, Any]], plain: bool = False) -> None:
    """Rich tables on a terminal when rich is installed, markdown otherwise."""
    tables = summary_tables(rows)
    try:
        if plain:
            raise ImportError
        from rich.console import Console
    except ImportError:
        print(format_plain(tables))
        return
    console = Console()
    if not console.is_terminal:
        print(format_plain(tables))
        return
    for table in rich_tables(tables):
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
