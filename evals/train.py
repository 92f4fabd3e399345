"""Train the built-in model from scratch on the synthetic tasks (``vlmprune train-builtin``).

Two stages, as CLIP-then-LLaVA training does, sized for a 2-core CPU:

1. Vision tower alone. Dense per-patch heads (shape and colour of every patch) on the feature
   layer teach a from-scratch ViT to see small objects; heads on the [CLS] token of the same
   layer (which shape-colour pairs are present, how many objects) make [CLS] summarise the scene,
   as contrastive pre-training does for CLIP, so its attention has a reason to land on objects.
   Video mosaics (four 112 px frames tiled in one image) are mixed in.
2. Vision frozen; projector and LM trained on several question/answer turns per image (loss on
   the answer words and the end token only) and on video questions and captions.

Data are generated on the fly from the train split's seeds; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def pair_targets(objects: tuple[data.Obj, ...]) -> np.ndarray:
    """Multi-hot (shape, colour) presence: what the [CLS] head must read off the scene."""
    pair = np.zeros(len(data.SHAPES) * len(data.COLORS), dtype=np.float32)
    for o in objects:
        pair[SHAPE_IDS[o.shape] * len(data.COLORS) + COLOR_IDS[o.color]] = 1
    return pair


def vision_batch(step: int, batch: int, video_share: float) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    images, shapes, colors, pairs, counts = [], [], [], [], []
    index = step * batch
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
        else:
            sample = data.make_image("train", index)
            s, c = sample.patch_labels()
            images.append(sample.image)
            shapes.append(s)
            colors.append(c)
            pairs.append(pair_targets(sample.objects))
            counts.append(len(sample.objects))
    images, shapes, colors, pairs, counts = (x[:batch] for x in (images, shapes, colors, pairs, counts))
    return {
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
        ls = F.cross_entropy(heads.patch_shape(patches).flatten(0, 1), b["shape"].flatten(), weight=_bg_weight(5))
        lc = F.cross_entropy(heads.patch_color(patches).flatten(0, 1), b["color"].flatten(), weight=_bg_weight(7))
        lp = F.binary_cross_entropy_with_logits(heads.cls_pairs(cls), b["pairs"])
        ln = F.cross_entropy(heads.cls_count(cls), b["count"])
        with torch.no_grad():
            obj = b["shape"] > 0
            acc = (heads.patch_shape(patches).argmax(-1)[obj] == b["shape"][obj]).float().mean()
        return ls + lc + lp + ln, {"patch_shape_acc": float(acc), "count": float(ln.detach())}

    cfg = LoopConfig(
        steps=args.vision_steps, lr=args.vision_lr, warmup=50, seed=args.seed, max_minutes=args.vision_minutes,
        resume_file=resume_dir / "vision.pt" if resume_dir else None, desc="stage 1: vision",
    )
    result = train_loop({"tower": tower, "heads": heads}, [*tower.parameters(), *heads.parameters()], step_fn, cfg)
    tower.eval()
    return result


def _bg_weight(n: int) -> Tensor:
    w = torch.ones(n)
    w[0] = 0.2  # background patches dominate; do not let them drown the objects
    return w


# -- stage 2 ---------------------------------------------------------------------------------------


def _turns(questions: tuple[data.Question, ...], caption: str | None, rng: np.random.Generator, max_q: int) -> list[tuple[list[str], list[str]]]:
    qs = list(questions)
    rng.shuffle(qs)
    turns = [(list(q.words), [q.answer]) for q in qs[:max_q]]
    if caption is not None:
        turns.insert(int(rng.integers(0, len(turns) + 1)), (list(builtin.CAPTION_WORDS), caption.split()))
    return turns


def lm_batch(step: int, batch: int, video_share: float, tok: Any, image_token_id: int) -> dict[str, Tensor]:
    """Right-padded multi-turn sequences; labels only on answers and their end token."""
    rng = np.random.default_rng(10_000_000 + step)
    rows, labels, images = [], [], []
    eos = tok.eos_token_id
    for i in range(batch):
        index = step * batch + i
        if rng.random() < video_share:
            clip = data.make_video("train", index)
            imgs = data.mosaic(clip.frames)
            turns = _turns(clip.questions, clip.caption, rng, 2)
        else:
            sample = data.make_image("train", index)
            imgs = [sample.image]
            turns = _turns(sample.questions, None, rng, 4)
        ids = [image_token_id] * (data.GRID * data.GRID * len(imgs))
        lab = [-100] * len(ids)
        for q, a in turns:
            q_ids = tok.convert_tokens_to_ids(q)
            a_ids = tok.convert_tokens_to_ids(a) + [eos]
            ids += q_ids + a_ids
            lab += [-100] * len(q_ids) + a_ids
        rows.append(ids)
        labels.append(lab)
        images.extend(imgs)
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch, width), tok.pad_token_id)
    label_t = torch.full((batch, width), -100)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_t[i, : len(r)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "pixel_values": to_pixels(images)}


def train_language(model: Any, processor: Any, args: argparse.Namespace, resume_dir: Path | None) -> dict[str, Any]:
    tok = processor.tokenizer
    model.model.vision_tower.requires_grad_(False)
    model.model.vision_tower.eval()
    trainable = [*model.model.multi_modal_projector.parameters(), *model.model.language_model.parameters(),
                 *model.lm_head.parameters()]

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        b = lm_batch(step, args.lm_batch, args.video_share, tok, model.config.image_token_id)
        out = model(**b)
        with torch.no_grad():
            pred = out.logits[:, :-1].argmax(-1)
            gold = b["labels"][:, 1:]
            sel = gold != -100
            acc = (pred[sel] == gold[sel]).float().mean()
        return out.loss, {"answer_token_acc": float(acc)}

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
    p.add_argument("--lm-steps", type=int, default=6000)
    p.add_argument("--lm-batch", type=int, default=16)
    p.add_argument("--lm-lr", type=float, default=1.5e-3)
    p.add_argument("--lm-minutes", type=float, default=29.0)
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
    out = Path(args.output)
    resume_dir = Path(args.resume_dir) if args.resume_dir else out.parent / f"{out.name}-train-state"
    began = time.time()
    model, processor = builtin.build_untrained(seed=args.seed)
    stage1 = train_vision(model, args, resume_dir)
    stage2 = train_language(model, processor, args, resume_dir)
    minutes = (time.time() - began) / 60
    accuracy = quick_accuracy(model, processor, "val", args.eval_samples)
    builtin.save_builtin(model, processor, out)
    log = {
        "seed": args.seed, "minutes": round(minutes, 1), "threads": torch.get_num_threads(),
        "training_minutes": round(stage1["minutes"] + stage2["minutes"], 1),
        "stage1": {k: v for k, v in stage1.items() if k != "history"} | {"last": stage1["history"][-1:]},
        "stage2": {k: v for k, v in stage2.items() if k != "history"} | {"last": stage2["history"][-1:]},
        "val_accuracy": accuracy, "args": vars(args),
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({"minutes": round(minutes, 1), "val_accuracy": accuracy}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
