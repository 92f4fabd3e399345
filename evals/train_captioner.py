"""Train the built-in dense video captioner (``vlmprune train-captioner``).

Why a second built-in model: FLASH's speed-up is a decode speed-up, and the built-in model's LM
(128 wide, 4 layers) writes ~10-token captions so cheaply that a one-layer draft costs a quarter
of a decoding step. The captioner is a stock ``LlavaForConditionalGeneration`` with the shipped
model's vision tower (frozen, copied unchanged) and a larger Llama LM (8 layers, 256 wide), trained
on the ``video_dense_caption`` task's 33-47 word captions, so plain decoding dominates a caption
and a one-layer draft costs about an eighth of a target step.

Recipe, sized for a 2-core CPU (the whole run well under 45 minutes):

1. The tower's features (feature layer, bf16) of ``--clips`` train clips (both mosaics) are
   computed once: the tower is frozen, so the LM never needs pixels again.
2. Projector and LM start as a function-preserving enlargement of the built-in model's
   (:func:`grow_from`), which already reads the tower's features and captions short clips, and
   learn to write the dense caption after ``describe the video in detail ?`` (loss on the caption
   words and the end token). Every row keeps all object patches and some random background
   patches at their original positions (the built-in model's curriculum): ``--keep-background``
   in the first ``--curriculum-share`` of the steps, ``--late-background`` after, except every
   ``--full-every``-th batch after the curriculum, which sees every patch. A full row is ~560
   tokens, a kept one ~100-200, so those steps are several times cheaper; the captioner is
   measured on full sequences (every patch) only.

Use one thread on a CPU shared with other jobs (``--threads 1``): two threads on one free core
made steps about ten times slower here.

The tokenizer is the built-in word-level one with :data:`evals.data.DENSE_WORDS` appended, so every
built-in word keeps its id. Data come from the train split's seeds; nothing is downloaded.
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
from torch import Tensor
from tqdm.auto import tqdm

from vlmprune.files import writable_dir
from vlmprune.training import LoopConfig, train_loop

from . import builtin, data
from .train import answer_step, to_pixels

CAPTIONER = Path(__file__).parent / "captioner"
#: the captioner's LM: 8 layers, 256 wide, heads of 32 like the built-in LM (6.8 M LM parameters,
#: 6.5x the built-in LM)
SIZES = builtin.Sizes(text_hidden=256, text_layers=8, text_heads=8, text_mlp=768)
DENSE_MAX_NEW_TOKENS = 56


def dense_prompt(num_images: int = 2) -> str:
    return builtin.image_prompt(data.DENSE_PROMPT, num_images)


def build_captioner(seed: int = 0, vision_from: str | Path | None = None, grow: bool = True) -> tuple[Any, Any]:
    """The captioner's architecture: the built-in tokenizer plus the dense words, the shipped
    built-in model's vision tower (weights copied), and a projector and LM grown from the built-in
    model's (:func:`grow_from`; ``grow=False``: random)."""
    from transformers import LlavaForConditionalGeneration

    processor = builtin.build_processor(builtin.build_tokenizer(data.DENSE_WORDS))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(builtin.build_config(processor.tokenizer, SIZES))
    source, _ = builtin.load_builtin(vision_from)
    model.model.vision_tower.load_state_dict(source.model.vision_tower.state_dict())
    if grow:
        grow_from(source, model)
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), processor


@torch.no_grad()
def grow_from(source: Any, target: Any) -> None:
    """Initialise the target's projector and LM as a function-preserving enlargement of the
    source's (Net2Net style): the source's weights fill the first ``h`` of the target's ``H``
    residual dimensions, its heads and MLP units; its layer ``j`` becomes layer ``2j`` and the
    layers between start as identities (zero output projections); every added input weight is
    small and random, every added output weight zero, and the RMSNorm gains are scaled by
    ``sqrt(h / H)`` because the norm now averages over ``H`` dimensions of which ``H - h`` are zero.
    So the grown model starts computing exactly what the source computes (same greedy output on
    the source's vocabulary) and training only has to teach it the dense captions, instead of
    learning to read the tower's features from scratch: on a shared 2-core CPU that is the
    difference between fitting in the time budget and not.

    Needs: same head size, ``H >= h``, at least as many heads, MLP units and twice the layers,
    and the source's vocabulary as a prefix of the target's."""
    s_cfg, t_cfg = source.config.text_config, target.config.text_config
    h, big = s_cfg.hidden_size, t_cfg.hidden_size
    s_head = getattr(s_cfg, "head_dim", None) or h // s_cfg.num_attention_heads
    t_head = getattr(t_cfg, "head_dim", None) or big // t_cfg.num_attention_heads
    if s_head != t_head or big < h or t_cfg.intermediate_size < s_cfg.intermediate_size:
        raise ValueError("grow_from needs the same head size and a wider, deeper target")
    if t_cfg.num_hidden_layers < 2 * s_cfg.num_hidden_layers or t_cfg.vocab_size < s_cfg.vocab_size:
        raise ValueError("grow_from needs twice the layers and the source vocabulary as a prefix")
    gain = (h / big) ** 0.5
    std = 0.02

    def fill(dst: Tensor, src: Tensor | None, rest: str) -> None:
        if rest == "zero":
            dst.zero_()
        else:
            dst.normal_(0.0, std)
        if src is not None:
            dst[tuple(slice(0, n) for n in src.shape)] = src

    def norm(dst: Any, src: Any | None) -> None:
        dst.weight.fill_(gain)
        if src is not None:
            dst.weight[:h] = src.weight * gain

    s_lm, t_lm = source.model.language_model, target.model.language_model
    fill(t_lm.embed_tokens.weight, s_lm.embed_tokens.weight, "random")
    t_lm.embed_tokens.weight[: s_cfg.vocab_size, h:] = 0
    fill(target.lm_head.weight, source.lm_head.weight, "zero")
    target.lm_head.weight[s_cfg.vocab_size:, :].normal_(0.0, std)
    norm(t_lm.norm, s_lm.norm)
    for i, layer in enumerate(t_lm.layers):
        old = s_lm.layers[i // 2] if i % 2 == 0 and i // 2 < len(s_lm.layers) else None
        att, mlp = layer.self_attn, layer.mlp
        o_att = old.self_attn if old is not None else None
        o_mlp = old.mlp if old is not None else None
        for name in ("q_proj", "k_proj", "v_proj"):
            fill(getattr(att, name).weight, getattr(o_att, name).weight if old is not None else None, "random")
        fill(att.o_proj.weight, o_att.o_proj.weight if old is not None else None, "zero")
        for name in ("gate_proj", "up_proj"):
            fill(getattr(mlp, name).weight, getattr(o_mlp, name).weight if old is not None else None, "random")
        fill(mlp.down_proj.weight, o_mlp.down_proj.weight if old is not None else None, "zero")
        norm(layer.input_layernorm, old.input_layernorm if old is not None else None)
        norm(layer.post_attention_layernorm, old.post_attention_layernorm if old is not None else None)
    s_proj, t_proj = source.model.multi_modal_projector, target.model.multi_modal_projector
    fill(t_proj.linear_1.weight, s_proj.linear_1.weight, "random")
    fill(t_proj.linear_1.bias, s_proj.linear_1.bias, "zero")
    fill(t_proj.linear_2.weight, s_proj.linear_2.weight, "zero")
    fill(t_proj.linear_2.bias, s_proj.linear_2.bias, "zero")


def object_mask(clip: data.DenseVideoSample) -> np.ndarray:
    """(512,) bool: the mosaic patches (both images, row-major, as the processor orders them) that
    hold any pixel of a visible object."""
    pos = _positions(clip)
    per_frame = np.zeros((data.NUM_FRAMES, data.FRAME_GRID, data.FRAME_GRID), bool)
    for t in range(data.NUM_FRAMES):
        placed = [(o, int(pos[t, i, 0]), int(pos[t, i, 1]), data.FRAME_SIZE_PX[o.size])
                  for i, o in enumerate(clip.objects) if t >= clip.appear[i]]
        if placed:
            per_frame[t] = data._patch_counts(placed, data.FRAME_SIZE).max(axis=0) > 0
    tiles = [np.block([[per_frame[s], per_frame[s + 1]], [per_frame[s + 2], per_frame[s + 3]]])
             for s in range(0, data.NUM_FRAMES, 4)]
    return np.concatenate([t.reshape(-1) for t in tiles])


def _positions(clip: data.DenseVideoSample) -> np.ndarray:
    return data._track(clip.objects, clip.motions, clip.speeds, clip.appear, data.NUM_FRAMES)


@dataclass
class ClipCache:
    captions: list[list[str]]
    feats: Tensor  # (N, 512, hidden) bf16
    objects: Tensor  # (N, 512) bool


@torch.no_grad()
def build_cache(tower: Any, layer: int, n: int, batch: int = 32) -> ClipCache:
    clips = [data.make_dense_video("train", i) for i in range(n)]
    feats = []
    for i in tqdm(range(0, n, batch // 2), desc="captioner: caching tower features", dynamic_ncols=True):
        pictures = [tile for c in clips[i : i + batch // 2] for tile in data.mosaic(c.frames)]
        out = tower(to_pixels(pictures), output_hidden_states=True).hidden_states[layer][:, 1:]
        feats.append(out.to(torch.bfloat16).reshape(-1, 2 * data.GRID * data.GRID, out.shape[-1]))
    masks = torch.from_numpy(np.stack([object_mask(c) for c in clips]))
    return ClipCache([c.caption.split() for c in clips], torch.cat(feats), masks)


def caption_batch(step: int, cache: ClipCache, batch: int, tok: Any, image_token_id: int,
                  keep_background: int | None) -> dict[str, Tensor]:
    """Right-padded ``<s> <visual> prompt caption </s>`` rows over cached features, labels on the
    caption and its end token. ``keep_background``: keep the object patches and that many random
    others at their original positions (None: every patch)."""
    rng = np.random.default_rng(30_000_000 + step)
    prompt = tok.convert_tokens_to_ids(list(data.DENSE_PROMPT))
    rows, labels, positions, feats = [], [], [], []
    for _ in range(batch):
        j = int(rng.integers(len(cache.captions)))
        f, objects = cache.feats[j], cache.objects[j]
        full = f.shape[0]
        if keep_background is None:
            keep = torch.arange(full)
        else:
            background = torch.nonzero(~objects).flatten()
            extra = background[torch.from_numpy(rng.permutation(len(background))[:keep_background])]
            keep = torch.sort(torch.cat([torch.nonzero(objects).flatten(), extra])).values
        answer = tok.convert_tokens_to_ids(cache.captions[j]) + [tok.eos_token_id]
        ids = [tok.bos_token_id] + [image_token_id] * len(keep) + prompt + answer
        rows.append(ids)
        labels.append([-100] * (len(ids) - len(answer)) + answer)
        positions.append([0] + (keep + 1).tolist() + list(range(full + 1, full + len(ids) - len(keep))))
        feats.append(f[keep])
    width = max(len(r) for r in rows)
    out = {k: torch.full((batch, width), v) for k, v in
           (("input_ids", tok.pad_token_id), ("labels", -100), ("attention_mask", 0), ("position_ids", 0))}
    for i, (r, lab, p) in enumerate(zip(rows, labels, positions)):
        out["input_ids"][i, : len(r)] = torch.tensor(r)
        out["labels"][i, : len(r)] = torch.tensor(lab)
        out["attention_mask"][i, : len(r)] = 1
        out["position_ids"][i, : len(r)] = torch.tensor(p)
    out["image_features"] = torch.cat(feats)
    return out


def train(model: Any, processor: Any, args: argparse.Namespace, resume_dir: Path | None) -> dict[str, Any]:
    tok = processor.tokenizer
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    tower.eval()
    began = time.time()
    cache = build_cache(tower, model.config.vision_feature_layer, args.clips)
    cache_minutes = (time.time() - began) / 60
    trainable = [*model.model.multi_modal_projector.parameters(), *model.model.language_model.parameters(),
                 *model.lm_head.parameters()]
    short_steps = int(args.steps * args.curriculum_share)
    if args.late_background is not None and args.late_background < 0:
        args.late_background = None

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        if step < short_steps:
            keep = args.keep_background
        elif args.full_every and (step - short_steps) % args.full_every == args.full_every - 1:
            keep = None
        else:
            keep = args.late_background
        b = caption_batch(step, cache, args.batch, tok, model.config.image_token_id, keep)
        loss, acc = answer_step(model, b, args.bf16)
        return loss, {"token_acc": acc}

    model.model.multi_modal_projector.train()
    model.model.language_model.train()
    cfg = LoopConfig(
        steps=args.steps, lr=args.lr, warmup=args.warmup, seed=args.seed + 1, max_minutes=args.minutes,
        resume_file=resume_dir / "captioner.pt" if resume_dir else None, desc="captioner: projector + LM",
    )
    result = train_loop({"model": model}, trainable, step_fn, cfg)
    model.eval()
    result["cache_minutes"] = round(cache_minutes, 2)
    return result


@torch.no_grad()
def evaluate(model: Any, processor: Any, split: str = "val", n: int = 100, batch: int = 8) -> dict[str, float]:
    """Mean per-fact score and token F1 (percent) of greedy captions of ``n`` clips of ``split``
    (frames in memory; the eval task reads them back from mp4)."""
    from .harness import token_f1

    tok = processor.tokenizer
    facts, f1s = [], []
    for start in range(0, n, batch):
        clips = [data.make_dense_video(split, i) for i in range(start, min(n, start + batch))]
        inputs = builtin.encode(processor, [dense_prompt()] * len(clips), [data.mosaic(c.frames) for c in clips])
        out = model.generate(**inputs, max_new_tokens=DENSE_MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for c, row in zip(clips, out[:, inputs["input_ids"].shape[1]:].tolist()):
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            words = tok.decode(row, skip_special_tokens=True).split()
            ref = c.caption.split()
            facts.append(data.fact_score(words, ref))
            f1s.append(token_f1(words, ref))
    return {"fact_score": 100.0 * float(np.mean(facts)), "token_f1": 100.0 * float(np.mean(f1s)), "clips": n}


def save_half(model: Any, processor: Any, path: str | Path) -> None:
    """Save with fp16 weights (half the repository size) but ``dtype: float32`` in the config, so
    ``from_pretrained`` (whose default dtype is the config's) upcasts on load: CPU kernels are
    slow or missing in fp16, and the weights lose nothing they had after training in bf16."""
    model.half()
    try:
        builtin.save_builtin(model, processor, path)
    finally:
        model.float()
    cfg_file = Path(path) / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["dtype"] = "float32"
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict) and "dtype" in cfg[sub]:
            cfg[sub]["dtype"] = "float32"
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmprune train-captioner", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default=str(CAPTIONER), help="checkpoint directory (fp16 safetensors + processor)")
    p.add_argument("--vision-from", default=None, help="checkpoint whose vision tower is reused (default: the shipped built-in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-grow", dest="grow", action="store_false",
                   help="random projector and LM instead of growing them from the built-in model's")
    p.add_argument("--clips", type=int, default=2000, help="train clips whose tower features are cached")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--minutes", type=float, default=31.0, help="time cap of the training loop")
    p.add_argument("--curriculum-share", type=float, default=0.3)
    p.add_argument("--keep-background", type=int, default=16)
    p.add_argument("--late-background", type=int, default=96,
                   help="background patches kept after the curriculum (-1: every patch); the default keeps "
                        "the run within budget on a shared 2-core CPU, where a full 512-patch row costs ~4x")
    p.add_argument("--full-every", type=int, default=4,
                   help="after the curriculum, every Nth batch sees every patch (0: none), so the LM also "
                        "trains on the full 512-patch sequences it is evaluated on")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--eval-clips", type=int, default=60)
    p.add_argument("--resume-dir", default=None, help="resumable training state (default: <output>-train-state)")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = writable_dir(args.output)
    resume_dir = Path(args.resume_dir) if args.resume_dir else out.parent / f"{out.name}-train-state"
    writable_dir(resume_dir, "--resume-dir")
    began = time.time()
    model, processor = build_captioner(args.seed, args.vision_from, args.grow)
    result = train(model, processor, args, resume_dir)
    minutes = (time.time() - began) / 60
    save_half(model, processor, out)
    scores = evaluate(model, processor, "val", args.eval_clips)
    log = {
        "seed": args.seed, "minutes": round(minutes, 1), "threads": torch.get_num_threads(),
        "train": {k: v for k, v in result.items() if k != "history"} | {"last": result["history"][-1:]},
        "val": scores, "args": vars(args),
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({"minutes": round(minutes, 1), "val": scores}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
