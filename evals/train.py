"""Train the built-in model from scratch on the synthetic tasks (``vlmprune train-builtin``).

Two stages, as CLIP-then-LLaVA training does, sized for a 2-core CPU:

1. Vision tower alone. Dense per-patch heads (shape and colour of every patch) on the feature
   layer teach a from-scratch ViT to see small objects; heads on the [CLS] token of the same
   layer (which shape-colour pairs are present, how many objects) make [CLS] summarise the scene,
   as contrastive pre-training does for CLIP, so its attention has a reason to land on objects.
   Video mosaics (four 112 px frames tiled in one image) are mixed in.
   Stage 1b adds per-patch heads for the patch's grid row and column, the object's size and its
   (shape, colour) pair. Without them a patch feature does not say where it is (a linear probe
   read row and column at chance), so "left of", "above", "small or large" and a clip's
   direction of motion were unanswerable for an LM that only sees the features.
2. Vision frozen; projector and LM trained on many question/answer turns per image (loss on the
   answer words and the end token only) and on video questions and captions. The tower's features
   are computed once for a fixed pool of train scenes (it is frozen), and the first part of stage
   2 shows the LM only the object patches plus a few random background patches, at their
   original positions: a curriculum that makes each step several times cheaper and lets the LM
   learn to bind a question's words to object tokens before it has to find them among 256.
   After it, half the batches see every patch and half keep the object patches with a random
   share of the background (background dropout, numbered at original positions or contiguously),
   so the model reads a count from the object tokens and not from their share of the sequence.

Data are generated from the train split's seeds; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vlmprune.files import writable_dir
from vlmprune.training import LoopConfig, train_loop

from . import builtin, data

COLOR_IDS = {c: i for i, c in enumerate(data.COLORS)}
SHAPE_IDS = {s: i for i, s in enumerate(data.SHAPES)}


def to_pixels(images: list[np.ndarray]) -> Tensor:
    """Normalise 224 px uint8 images as the built-in processor does (no resize needed)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(builtin.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(builtin.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def mosaic_labels(video: data.VideoSample) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch labels of the two mosaic images of a clip, tiled like :func:`data.mosaic`."""
    shapes, colors = video.frame_patch_labels()
    out_s, out_c = [], []
    for start in range(0, shapes.shape[0], 4):
        s = np.block([[shapes[start], shapes[start + 1]], [shapes[start + 2], shapes[start + 3]]])
        c = np.block([[colors[start], colors[start + 1]], [colors[start + 2], colors[start + 3]]])
        out_s.append(s)
        out_c.append(c)
    return np.stack(out_s), np.stack(out_c)


class VisionHeads(nn.Module):
    """Stage-1 heads on the feature layer: dense per-patch and [CLS] scene heads."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.patch_shape = nn.Linear(hidden, len(data.SHAPES) + 1)
        self.patch_color = nn.Linear(hidden, len(data.COLORS) + 1)
        self.cls_pairs = nn.Linear(hidden, len(data.SHAPES) * len(data.COLORS))
        self.cls_count = nn.Linear(hidden, 6)  # 0..5 objects (mosaics: 0..2 per frame summed)


class PlaceHeads(nn.Module):
    """Stage-1b per-patch heads: grid row and column, object size (0 background, 1 small, 2
    large) and (shape, colour) pair (0 background, 1 + shape * colours + colour)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.row = nn.Linear(hidden, data.GRID)
        self.col = nn.Linear(hidden, data.GRID)
        self.size = nn.Linear(hidden, len(data.SIZES) + 1)
        self.pair = nn.Linear(hidden, len(data.SHAPES) * len(data.COLORS) + 1)


def size_labels(sample: data.ImageSample) -> np.ndarray:
    """(GRID * GRID,) int64 per-patch size ids of an image (0 on background patches)."""
    shapes, _ = sample.patch_labels()
    out = np.zeros((data.GRID, data.GRID), np.int64)
    for o in sample.objects:
        side = data.IMAGE_SIZE_PX[o.size] // data.PATCH
        out[o.row : o.row + side, o.col : o.col + side] = 1 + data.SIZES.index(o.size)
    out[shapes == 0] = 0
    return out.reshape(-1)


def pair_targets(objects: tuple[data.Obj, ...]) -> np.ndarray:
    """Multi-hot (shape, colour) presence: what the [CLS] head must read off the scene."""
    pair = np.zeros(len(data.SHAPES) * len(data.COLORS), dtype=np.float32)
    for o in objects:
        pair[SHAPE_IDS[o.shape] * len(data.COLORS) + COLOR_IDS[o.color]] = 1
    return pair


def vision_batch(step: int, batch: int, video_share: float, offset: int = 0) -> dict[str, Any]:
    """A stage-1 batch; ``offset`` moves stage 1b onto scenes stage 1 did not see. ``size`` is -100
    (ignored) on video mosaics, whose objects are not patch-aligned."""
    rng = np.random.default_rng(step + offset)
    images, shapes, colors, pairs, counts, sizes = [], [], [], [], [], []
    index = step * batch + offset
    while len(images) < batch:
        index += 1
        if rng.random() < video_share:
            clip = data.make_video("train", index)
            tiles = data.mosaic(clip.frames)
            ms, mc = mosaic_labels(clip)
            for img, s, c in zip(tiles, ms, mc):
                images.append(img)
                shapes.append(s)
                colors.append(c)
                pairs.append(pair_targets(clip.objects))
                counts.append(len(clip.objects))
                sizes.append(np.full(data.GRID * data.GRID, -100, np.int64))
        else:
            sample = data.make_image("train", index)
            s, c = sample.patch_labels()
            images.append(sample.image)
            shapes.append(s)
            colors.append(c)
            pairs.append(pair_targets(sample.objects))
            counts.append(len(sample.objects))
            sizes.append(size_labels(sample))
    images, shapes, colors, pairs, counts, sizes = (x[:batch] for x in (images, shapes, colors, pairs, counts, sizes))
    return {
        "size": torch.from_numpy(np.stack(sizes)),
        "pixel_values": to_pixels(images),
        "shape": torch.from_numpy(np.stack(shapes)).long().flatten(1),
        "color": torch.from_numpy(np.stack(colors)).long().flatten(1),
        "pairs": torch.from_numpy(np.stack(pairs)),
        "count": torch.tensor(counts).clamp(max=5),
    }


def train_vision(model: Any, args: argparse.Namespace, resume_dir: Path | None) -> dict[str, Any]:
    tower = model.model.vision_tower
    heads = VisionHeads(tower.config.hidden_size)
    layer = model.config.vision_feature_layer
    tower.train()

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        b = vision_batch(step, args.vision_batch, args.video_share)
        out = tower(b["pixel_values"], output_hidden_states=True)
        feats = out.hidden_states[layer]
        cls, patches = feats[:, 0], feats[:, 1:]
        patch_loss = _patch_loss(heads, patches, b)
        lp = F.binary_cross_entropy_with_logits(heads.cls_pairs(cls), b["pairs"])
        ln = F.cross_entropy(heads.cls_count(cls), b["count"])
        with torch.no_grad():
            obj = b["shape"] > 0
            acc = (heads.patch_shape(patches).argmax(-1)[obj] == b["shape"][obj]).float().mean()
        return patch_loss + lp + ln, {"patch_shape_acc": float(acc), "count": float(ln.detach())}

    cfg = LoopConfig(
        steps=args.vision_steps, lr=args.vision_lr, warmup=50, seed=args.seed, max_minutes=args.vision_minutes,
        resume_file=resume_dir / "vision.pt" if resume_dir else None, desc="stage 1: vision",
    )
    result = train_loop({"tower": tower, "heads": heads}, [*tower.parameters(), *heads.parameters()], step_fn, cfg)
    place = PlaceHeads(tower.config.hidden_size)
    grid = torch.arange(data.GRID * data.GRID)

    def place_step(step: int) -> tuple[Tensor, dict[str, float]]:
        b = vision_batch(step, args.vision_batch, args.video_share, offset=500_000)
        feats = tower(b["pixel_values"], output_hidden_states=True).hidden_states[layer][:, 1:]
        n = feats.shape[0]
        pair = torch.where(b["shape"] > 0, (b["shape"] - 1) * len(data.COLORS) + b["color"], 0)
        loss = (
            _patch_loss(heads, feats, b)
            + F.cross_entropy(place.row(feats).flatten(0, 1), (grid // data.GRID).repeat(n))
            + F.cross_entropy(place.col(feats).flatten(0, 1), (grid % data.GRID).repeat(n))
            + F.cross_entropy(place.size(feats).flatten(0, 1), b["size"].flatten(), weight=_bg_weight(3))
            + F.cross_entropy(place.pair(feats).flatten(0, 1), pair.flatten(), weight=_bg_weight(25))
        )
        with torch.no_grad():
            col = (place.col(feats).argmax(-1) == grid % data.GRID).float().mean()
        return loss, {"col_acc": float(col)}

    cfg_b = LoopConfig(
        steps=args.place_steps, lr=1e-3, warmup=20, seed=args.seed + 2, max_minutes=args.place_minutes,
        resume_file=resume_dir / "vision_place.pt" if resume_dir else None, desc="stage 1b: place heads",
    )
    modules = {"tower": tower, "heads": heads, "place": place}
    result_b = train_loop(modules, [*tower.parameters(), *heads.parameters(), *place.parameters()], place_step, cfg_b)
    tower.eval()
    return result | {"place": {k: v for k, v in result_b.items() if k != "history"} | {"last": result_b["history"][-1:]}}


def _patch_loss(heads: VisionHeads, patches: Tensor, b: dict[str, Any]) -> Tensor:
    """The dense shape + colour loss both stage 1 and stage 1b train on (1b keeps it so the new
    heads do not pull the features away from what stage 1 taught)."""
    shape = F.cross_entropy(heads.patch_shape(patches).flatten(0, 1), b["shape"].flatten(), weight=_bg_weight(5))
    color = F.cross_entropy(heads.patch_color(patches).flatten(0, 1), b["color"].flatten(), weight=_bg_weight(7))
    return shape + color


def _bg_weight(n: int) -> Tensor:
    w = torch.ones(n)
    w[0] = 0.2  # background patches dominate; do not let them drown the objects
    return w


# -- stage 2 ---------------------------------------------------------------------------------------


@dataclass
class FeatureCache:
    """Frozen-tower features of a fixed pool of train scenes (stage 2 never changes the tower, so
    computing them once saves a third of every step), with each scene's object-patch mask for the
    curriculum. Features are bf16: 8000 images and 2500 clips hold about 850 MB."""

    images: list[data.ImageSample]
    image_feats: Tensor  # (N, 256, hidden) bf16
    image_objects: Tensor  # (N, 256) bool
    clips: list[data.VideoSample]
    clip_feats: Tensor  # (M, 512, hidden) bf16
    clip_objects: Tensor  # (M, 512) bool


@torch.no_grad()
def build_feature_cache(tower: Any, layer: int, n_images: int, n_clips: int, batch: int = 32) -> FeatureCache:
    images = [data.make_image("train", i) for i in range(n_images)]
    clips = [data.make_video("train", i) for i in range(n_clips)]
    pictures = [s.image for s in images] + [tile for c in clips for tile in data.mosaic(c.frames)]
    feats = []
    for i in tqdm(range(0, len(pictures), batch), desc="stage 2: caching tower features", dynamic_ncols=True):
        out = tower(to_pixels(pictures[i : i + batch]), output_hidden_states=True).hidden_states[layer][:, 1:]
        feats.append(out.to(torch.bfloat16))
    allf = torch.cat(feats) if feats else torch.zeros(0, data.GRID * data.GRID, tower.config.hidden_size, dtype=torch.bfloat16)
    hidden = allf.shape[-1]
    img_obj = [torch.from_numpy(s.patch_labels()[0].reshape(-1) > 0) for s in images]
    clip_obj = [torch.from_numpy(mosaic_labels(c)[0].reshape(-1) > 0) for c in clips]
    tokens = data.GRID * data.GRID
    return FeatureCache(
        images, allf[:n_images], torch.stack(img_obj) if img_obj else torch.zeros(0, tokens, dtype=torch.bool),
        clips, allf[n_images:].reshape(n_clips, 2 * tokens, hidden),
        torch.stack(clip_obj) if clip_obj else torch.zeros(0, 2 * tokens, dtype=torch.bool),
    )


def _pick(rng: np.random.Generator, qtype: str, pool: list[data.Question]) -> data.Question:
    if qtype in ("relation", "exist"):
        return data._pick_balanced(rng, pool)  # yes/no drawn 50/50 first
    return pool[int(rng.integers(len(pool)))]


#: The two-object and conjunction types, which the LM learns last: the extra turns of an image go to them.
HARD_TYPES = ("relation", "exist")


def image_turns(sample: data.ImageSample, rng: np.random.Generator, n: int) -> list[tuple[list[str], list[str]]]:
    """``n`` question/answer turns drawn afresh from the image's whole candidate pool: every
    applicable type once, then :data:`HARD_TYPES`, so a scene seen again asks new questions."""
    cands = {t: pool for t, pool in data.image_question_candidates(sample.objects).items() if pool}
    types = list(cands)
    chosen = [_pick(rng, t, cands[t]) for t in types]
    extra = [t for t in HARD_TYPES if t in cands] or types
    while len(chosen) < n:
        t = extra[int(rng.integers(len(extra)))]
        chosen.append(_pick(rng, t, cands[t]))
    order = rng.permutation(len(chosen))[:n]
    return [(list(chosen[i].words), [chosen[i].answer]) for i in order]


def clip_turns(clip: data.VideoSample, rng: np.random.Generator) -> list[tuple[list[str], list[str]]]:
    """One question of each applicable video type, drawn afresh, plus the caption, in random order."""
    cands = {t: pool for t, pool in data.video_question_candidates(clip.objects, clip.motions, clip.appear).items() if pool}
    turns = [(list(q.words), [q.answer]) for q in (_pick(rng, t, p) for t, p in cands.items())]
    turns.append((list(builtin.CAPTION_WORDS), clip.caption.split()))
    order = rng.permutation(len(turns))
    return [turns[i] for i in order]


@dataclass(frozen=True)
class BatchPlan:
    """What one stage-2 batch shows. ``kind`` "image" or "video" makes the batch one kind only
    (rows are padded to the longest, so one 512-token clip in a batch of images makes every image
    row cost as much as a clip: one-kind batches make the full-sequence steps about 1.5x
    cheaper); None draws each row's kind. ``keep_background`` (a count) or ``background_share``
    (a fraction): keep every object patch and that many random background patches; both None:
    all patches. ``contiguous``: number a shortened sequence as a pruned one is (0, 1, 2, ...)
    instead of at the patches' original positions."""

    kind: str | None = None
    keep_background: int | None = None
    background_share: float | None = None
    contiguous: bool = False


def stage2_plan(step: int, args: argparse.Namespace) -> BatchPlan:
    """The curriculum, then background dropout: the first ``curriculum_share`` of the steps keep
    only the object patches plus ``keep_background`` others; after that a ``dropout_share`` of
    the batches keep a random share of the background (numbered originally or contiguously, half
    each, with ``dropout_positions`` "mixed") and the rest see every patch. Dropout is why the
    model reads a count from the object tokens rather than from their share of the sequence
    (README, "What pruning does"); it is drawn per batch from the step, so a resumed run repeats it."""
    rng = np.random.default_rng(20_000_000 + step)
    kind = None if args.mixed_batches else ("video" if rng.random() < args.video_share else "image")
    if step < int(args.lm_steps * args.curriculum_share):
        return BatchPlan(kind, keep_background=args.keep_background,
                         contiguous=args.curriculum_positions == "contiguous")
    if rng.random() < args.dropout_share:
        share = float(rng.random())
        mode = args.dropout_positions
        contiguous = mode == "contiguous" or (mode == "mixed" and rng.random() < 0.5)
        return BatchPlan(kind, background_share=share, contiguous=contiguous)
    return BatchPlan(kind)


def lm_batch(step: int, cache: FeatureCache, batch: int, video_share: float, turns: int, tok: Any,
             image_token_id: int, plan: BatchPlan = BatchPlan()) -> dict[str, Tensor]:
    """Right-padded multi-turn sequences over cached features; labels only on answers and their
    end token; each row starts with ``<s>`` like a processor-encoded prompt. A ``plan`` that drops
    background keeps the object patches and some random background patches, at their original
    positions (text positions continue after the full visual span, as in an unpruned sequence)
    unless ``plan.contiguous``."""
    rng = np.random.default_rng(10_000_000 + step)
    rows, labels, positions, feats = [], [], [], []
    eos = tok.eos_token_id
    short = plan.keep_background is not None or plan.background_share is not None
    for _ in range(batch):
        video = rng.random() < video_share if plan.kind is None else plan.kind == "video"
        if len(cache.clips) and (video or not len(cache.images)):
            j = int(rng.integers(len(cache.clips)))
            f, objects, qa = cache.clip_feats[j], cache.clip_objects[j], clip_turns(cache.clips[j], rng)
        else:
            j = int(rng.integers(len(cache.images)))
            f, objects, qa = cache.image_feats[j], cache.image_objects[j], image_turns(cache.images[j], rng, turns)
        full = f.shape[0]
        if not short:
            keep = torch.arange(full)
        else:
            background = torch.nonzero(~objects).flatten()
            n_bg = plan.keep_background if plan.background_share is None else round(plan.background_share * len(background))
            extra = background[torch.from_numpy(rng.permutation(len(background))[:n_bg])]
            keep = torch.sort(torch.cat([torch.nonzero(objects).flatten(), extra])).values
        ids = [tok.bos_token_id] + [image_token_id] * len(keep)  # as the processor encodes a prompt
        lab = [-100] * len(ids)
        for q, a in qa:
            q_ids = tok.convert_tokens_to_ids(q)
            a_ids = tok.convert_tokens_to_ids(a) + [eos]
            ids += q_ids + a_ids
            lab += [-100] * len(q_ids) + a_ids
        rows.append(ids)
        labels.append(lab)
        if short and plan.contiguous:  # numbered as a pruned sequence is
            positions.append(list(range(len(ids))))
        else:
            positions.append([0] + (keep + 1).tolist() + list(range(full + 1, full + len(ids) - len(keep))))
        feats.append(f[keep])
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch, width), tok.pad_token_id)
    label_t = torch.full((batch, width), -100)
    mask = torch.zeros((batch, width), dtype=torch.long)
    pos = torch.zeros((batch, width), dtype=torch.long)
    for i, (r, lab, p) in enumerate(zip(rows, labels, positions)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_t[i, : len(r)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
        pos[i, : len(r)] = torch.tensor(p)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "position_ids": pos,
            "image_features": torch.cat(feats)}


def _embed(model: Any, input_ids: Tensor, image_features: Tensor) -> Tensor:
    """The LLaVA input embedding (projected features at the image-token slots) from cached features."""
    embeds = model.get_input_embeddings()(input_ids)
    projected = model.model.multi_modal_projector(image_features.to(embeds.dtype))
    slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(slots, projected.to(embeds.dtype))


def answer_step(model: Any, b: dict[str, Tensor], bf16: bool) -> tuple[Tensor, float]:
    """One LM step on a batch of cached features: the loss on the labelled tokens and the accuracy of
    the next-token argmax there (the progress bar's signal that the answers are being learned)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        embeds = _embed(model, b["input_ids"], b["image_features"])
        out = model(inputs_embeds=embeds, attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                    labels=b["labels"])
    with torch.no_grad():
        pred = out.logits[:, :-1].argmax(-1)
        gold = b["labels"][:, 1:]
        sel = gold != -100
        acc = (pred[sel] == gold[sel]).float().mean()
    return out.loss.float(), float(acc)


def train_language(model: Any, processor: Any, args: argparse.Namespace, resume_dir: Path | None) -> dict[str, Any]:
    tok = processor.tokenizer
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    tower.eval()
    cache = build_feature_cache(tower, model.config.vision_feature_layer, args.cache_images, args.cache_clips)
    trainable = [*model.model.multi_modal_projector.parameters(), *model.model.language_model.parameters(),
                 *model.lm_head.parameters()]

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        b = lm_batch(step, cache, args.lm_batch, args.video_share, args.turns, tok, model.config.image_token_id,
                     plan=stage2_plan(step, args))
        loss, acc = answer_step(model, b, args.bf16 and b["input_ids"].device.type == "cpu")
        return loss, {"answer_token_acc": acc}

    model.model.multi_modal_projector.train()
    model.model.language_model.train()
    cfg = LoopConfig(
        steps=args.lm_steps, lr=args.lm_lr, warmup=100, seed=args.seed + 1, max_minutes=args.lm_minutes,
        resume_file=resume_dir / "language.pt" if resume_dir else None, desc="stage 2: projector + LM",
    )
    result = train_loop({"model": model}, trainable, step_fn, cfg)
    model.eval()
    return result


@torch.no_grad()
def quick_accuracy(model: Any, processor: Any, split: str = "val", n: int = 200) -> dict[str, float]:
    """Multiple-choice accuracy per question type on ``n`` images and ``n // 2`` clips of a split."""
    tok = processor.tokenizer
    correct: dict[str, list[bool]] = {}
    samples = [(s.questions, [s.image]) for s in data.image_split(split, n)]
    samples += [(v.questions, data.mosaic(v.frames)) for v in (data.make_video(split, i) for i in range(n // 2))]
    for questions, imgs in samples:
        prompts = [builtin.image_prompt(q.words, len(imgs)) for q in questions]
        inputs = builtin.encode(processor, prompts, [imgs] * len(prompts))
        mask = inputs["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(**inputs, position_ids=pos, logits_to_keep=1).logits[:, -1]
        for q, row in zip(questions, logits):
            ids = builtin.choice_ids(tok, q.choices)
            pred = q.choices[int(row[ids].argmax())]
            key = ("video_" if len(imgs) > 1 else "image_") + q.qtype
            correct.setdefault(key, []).append(pred == q.answer)
    out = {k: 100.0 * float(np.mean(v)) for k, v in sorted(correct.items())}
    img = [x for k, v in correct.items() if k.startswith("image_") for x in v]
    vid = [x for k, v in correct.items() if k.startswith("video_") for x in v]
    out["image_mc"] = 100.0 * float(np.mean(img)) if img else float("nan")
    out["video_mc"] = 100.0 * float(np.mean(vid)) if vid else float("nan")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmprune train-builtin", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default=str(builtin.CHECKPOINT), help="checkpoint directory (safetensors + processor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision-steps", type=int, default=3000)
    p.add_argument("--vision-batch", type=int, default=16)
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--vision-minutes", type=float, default=15.0)
    p.add_argument("--place-steps", type=int, default=300, help="stage 1b: row/column/size/pair heads")
    p.add_argument("--place-minutes", type=float, default=3.0)
    p.add_argument("--lm-steps", type=int, default=5000)
    p.add_argument("--lm-batch", type=int, default=16)
    p.add_argument("--lm-lr", type=float, default=1.5e-3)
    p.add_argument("--lm-minutes", type=float, default=26.0, help="time cap of stage 2 (a guard; the steps should fit)")
    p.add_argument("--turns", type=int, default=10, help="question/answer turns per training image")
    p.add_argument("--cache-images", type=int, default=8000, help="train images whose tower features stage 2 caches")
    p.add_argument("--cache-clips", type=int, default=2500, help="train clips whose tower features stage 2 caches")
    p.add_argument("--curriculum-share", type=float, default=0.5,
                   help="share of stage-2 steps that see only object patches plus --keep-background others")
    p.add_argument("--keep-background", type=int, default=16)
    p.add_argument("--curriculum-positions", choices=("original", "contiguous"), default="original",
                   help="how the curriculum's short sequences are numbered: at the patches' original positions "
                        "(shipped), or contiguously as FasterVLM's reference numbers a pruned sequence (README: "
                        "FasterVLM keeps more of the accuracy, the unpruned model is weaker)")
    p.add_argument("--dropout-share", type=float, default=0.5,
                   help="after the curriculum, share of batches that keep every object patch but only a random "
                        "share of the background (0 = all later batches see every patch)")
    p.add_argument("--dropout-positions", choices=("original", "contiguous", "mixed"), default="mixed",
                   help="numbering of the background-dropout batches; mixed: half each")
    p.add_argument("--one-kind-batches", dest="mixed_batches", action="store_false",
                   help="one kind (images or clips) per batch instead of drawing each row's kind: phase-B steps "
                        "about 1.5x cheaper, but measured to learn less per step (README)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="stage 2 in fp32 instead of bf16 autocast")
    p.add_argument("--video-share", type=float, default=0.3, help="share of video clips in the batches")
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--resume-dir", default=None, help="resumable training state (default: <output>/../train-state)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; use 1 on a CPU shared with other jobs (2 threads thrash there)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = writable_dir(args.output)
    resume_dir = Path(args.resume_dir) if args.resume_dir else out.parent / f"{out.name}-train-state"
    writable_dir(resume_dir, "--resume-dir")
    began = time.time()
    model, processor = builtin.build_untrained(seed=args.seed)
    stage1 = train_vision(model, args, resume_dir)
    stage2 = train_language(model, processor, args, resume_dir)
    minutes = (time.time() - began) / 60
    accuracy = quick_accuracy(model, processor, "val", args.eval_samples)
    builtin.save_builtin(model, processor, out)
    log = {
        "seed": args.seed, "minutes": round(minutes, 1), "threads": torch.get_num_threads(),
        "training_minutes": round(stage1["minutes"] + stage1["place"]["minutes"] + stage2["minutes"], 1),
        "stage1": {k: v for k, v in stage1.items() if k != "history"} | {"last": stage1["history"][-1:]},
        "stage2": {k: v for k, v in stage2.items() if k != "history"} | {"last": stage2["history"][-1:]},
        "val_accuracy": accuracy, "args": vars(args),
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({"minutes": round(minutes, 1), "val_accuracy": accuracy}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
