"""Train a FLASH draft head on a frozen target (``vlmprune train-draft``), the paper's self-distillation.

Self-distillation: the frozen target answers image and video prompts greedily; one more forward
over prompt + answer gives its last hidden states ``f`` (after the final norm). The draft learns,
at every answer position, to predict the next ``k`` features from ``(e(x_{t+1}), f_t)`` with the
visual spans compressed to its learned latents:

    L = sum over offsets i of [ SmoothL1(f̂, f) + 0.1 * CE_soft(lm_head(f), lm_head(f̂)) ]

averaged over the answer positions, with uniform noise ``(U - 0.5) * 0.2 * 512 / L`` on the input
features. The target, its embeddings and LM head stay frozen; fc, the layer and the latents train.

Data: ``builtin`` (the built-in benchmark's train split: video captioning and image questions),
``builtin-dense`` (its dense video captions, for the captioner: ``--model evals/captioner``) or
a JSON-lines file with one ``{"image": path | [paths], "prompt": str}`` per line (the prompt holds
the processor's image placeholders and chat template; the target writes the answer). The
distilled features are cached in ``--state-dir`` so an interrupted run resumes without regenerating.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlmprune.training import LoopConfig, add_run_args, prepare_run, train_loop

from .draft import DraftHead, DraftSpec, draft_context, draft_loss, save_draft

#: one distilled sample: decoder ids (n,), features (n, H), visual mask (n,), answer mask (n,)
Sample = dict[str, Tensor]


# -- data --------------------------------------------------------------------------------------------


def builtin_prompts(processor: Any, n: int, seed: int, split: str = "train",
                    video_share: float = 0.7) -> list[dict[str, Tensor]]:
    """``n`` single-prompt inputs: video captioning (two mosaic images per clip) and image questions."""
    from vlmprune.artifacts import builtin_benchmark

    bench = builtin_benchmark()
    builtin, data = bench.builtin, bench.data

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        index = 700_000 + seed * 10_007 + i
        if rng.random() < video_share:
            clip = data.make_video(split, index % 999_999)
            imgs = data.mosaic(clip.frames)
            text = builtin.caption_prompt(len(imgs))
        else:
            sample = data.make_image(split, index % 999_999)
            imgs = [sample.image]
            q = sample.questions[int(rng.integers(len(sample.questions)))]
            text = builtin.image_prompt(list(q.words), 1)
        out.append(builtin.encode(processor, [text], [imgs]))
    return out


def dense_prompts(processor: Any, n: int, seed: int, split: str = "train") -> list[dict[str, Tensor]]:
    """``n`` dense-captioning prompts (two mosaic images per clip), away from the captioner's
    training clips (indices from 700,000)."""
    from vlmprune.artifacts import builtin_benchmark

    bench = builtin_benchmark()
    builtin, data = bench.builtin, bench.data
    out = []
    for i in range(n):
        clip = data.make_dense_video(split, (700_000 + seed * 10_007 + i) % 999_999)
        imgs = data.mosaic(clip.frames)
        out.append(builtin.encode(processor, [builtin.image_prompt(data.DENSE_PROMPT, len(imgs))], [imgs]))
    return out


def jsonl_prompts(processor: Any, path: str | Path, n: int) -> list[dict[str, Tensor]]:
    from PIL import Image

    out = []
    base = Path(path).parent
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            paths = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
            prompt = str(rec["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{line_no}: expected {{\"image\", \"prompt\"}} ({exc})") from None
        imgs = [Image.open(p if Path(p).is_absolute() else base / p).convert("RGB") for p in paths]
        out.append(dict(processor(images=imgs, text=[prompt], return_tensors="pt")))
        if len(out) >= n:
            break
    if not out:
        raise ValueError(f"{path}: no records")
    return out


@torch.no_grad()
def distill(model: Any, prompts: list[dict[str, Tensor]], max_new_tokens: int) -> list[Sample]:
    """Greedy answers of the target and its last hidden states over prompt + answer."""
    from vlmprune.adapters import for_model

    adapter = for_model(model)
    visual_ids = torch.tensor(adapter.placeholder_ids())
    captured: list[Tensor] = []
    hook = adapter.decoder.register_forward_hook(
        lambda m, a, out: captured.append((out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).detach())
    )
    samples = []
    try:
        for inputs in prompts:
            device = next(model.parameters()).device
            inputs = {k: v.to(device) for k, v in inputs.items()}
            full = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            captured.clear()
            extra = full.shape[1] - inputs["input_ids"].shape[1]
            call = dict(inputs, input_ids=full, attention_mask=torch.ones_like(full))
            if "mm_token_type_ids" in inputs:
                call["mm_token_type_ids"] = torch.cat(
                    [inputs["mm_token_type_ids"], inputs["mm_token_type_ids"].new_zeros(1, extra)], dim=1)
            model(**call)
            hidden = captured[-1][0].float().cpu()
            ids = full[0].cpu()
            answer = torch.zeros_like(ids, dtype=torch.bool)
            answer[inputs["input_ids"].shape[1]:] = True
            samples.append({"ids": ids, "hidden": hidden, "visual": torch.isin(ids, visual_ids), "answer": answer})
    finally:
        hook.remove()
    return samples


# -- one step ----------------------------------------------------------------------------------------


def sample_tensors(head: DraftHead, embed: torch.nn.Module, sample: Sample, noise: float,
                   generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """Draft inputs (m, H), targets (m, k, H) and loss mask (m, k) of one distilled sample."""
    ids, hidden, visual, answer = sample["ids"], sample["hidden"], sample["visual"], sample["answer"]
    device = head.fc.weight.device
    hidden, ids = hidden.to(device), ids.to(device)
    n, k = ids.shape[0], head.spec.k
    feats = hidden[:-1]
    if noise > 0:
        u = torch.rand(feats.shape, generator=generator).to(device)
        feats = feats + (u - 0.5) * noise * 512 / n
    seq, src = draft_context(head, embed(ids[1:]), feats, visual[:-1].to(device))
    pos = src.unsqueeze(1) + 1 + torch.arange(k, device=device).unsqueeze(0)  # (m, k) target positions
    ok = (src.unsqueeze(1) >= 0) & (pos < n)
    pos = pos.clamp(0, n - 1)
    mask = ok & answer.to(device)[pos]
    return seq, hidden[pos], mask


def draft_step(head: DraftHead, embed: torch.nn.Module, lm_head: torch.nn.Module, batch: list[Sample],
               noise: float = 0.2, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """Loss of one batch: samples padded on the right, the k offsets summed."""
    parts = [sample_tensors(head, embed, s, noise, generator) for s in batch]
    m = max(p[0].shape[0] for p in parts)
    bsz, k, h = len(parts), head.spec.k, head.spec.hidden_size
    device = head.fc.weight.device
    seq = torch.zeros(bsz, m, h, device=device)
    tgt = torch.zeros(bsz, m, k, h, device=device)
    mask = torch.zeros(bsz, m, k, dtype=torch.bool, device=device)
    valid = torch.zeros(bsz, m, dtype=torch.bool, device=device)
    for i, (s, t, mk) in enumerate(parts):
        seq[i, : s.shape[0]] = s
        tgt[i, : s.shape[0]] = t
        mask[i, : s.shape[0]] = mk
        valid[i, : s.shape[0]] = True
    pred = head(seq, valid=valid)
    total, metrics = torch.zeros((), device=device), {}
    for i in range(k):
        loss, info = draft_loss(pred[:, :, i], tgt[:, :, i], mask[:, :, i], lm_head)
        total = total + loss
        metrics[f"acc{i}"] = info["acc"]
    return total, metrics


# -- acceptance report -------------------------------------------------------------------------------


@torch.no_grad()
def acceptance_report(model: Any, draft: str | Path, prompts: list[dict[str, Tensor]], depth: int,
                      max_new_tokens: int) -> dict[str, Any]:
    """Mean accepted drafts per round on held-out prompts, and whether every output equals greedy."""
    import vlmprune

    same, accepted, rounds = [], 0, 0
    for inputs in prompts:
        ref = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        with vlmprune.apply(model, "flash", draft=str(draft), depth=depth) as h:
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            rec = h.stats.decode[-1]
        same.append(bool(torch.equal(out, ref)))
        accepted += rec.accepted
        rounds += rec.rounds
    return {"prompts": len(prompts), "identical": all(same), "mean_accepted": accepted / max(rounds, 1),
            "depth": depth}


# -- entry point -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmprune train-draft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin", help="'builtin', 'captioner' or a local checkpoint directory")
    p.add_argument("--data", default="builtin",
                   help="'builtin', 'builtin-dense' or a JSON-lines file (see the module docstring)")
    p.add_argument("--output", required=True, help="directory for draft.safetensors, its JSON recipe and the resume state")
    p.add_argument("--state-dir", default=None,
                   help="distilled features and resume state (default: <output>-train-state, kept out of the shipped folder)")
    p.add_argument("--samples", type=int, default=240, help="distilled prompts (the target answers each once)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest distilled answer")
    p.add_argument("--video-share", type=float, default=0.7, help="share of video-captioning prompts (builtin data)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--k", type=int, default=2, help="tokens per draft forward (semi-autoregressive head)")
    p.add_argument("--latents", type=int, default=16, help="learned latents Q per visual span (0: no compression)")
    p.add_argument("--lr", type=float, default=1e-3, help="the paper uses 3e-5 for 7B targets")
    p.add_argument("--noise", type=float, default=0.2, help="input-feature noise scale (EAGLE's 0.2)")
    p.add_argument("--depth", type=int, default=4, help="draft depth of the held-out acceptance report")
    p.add_argument("--eval-prompts", type=int, default=8)
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from vlmprune.adapters import for_model
    from vlmprune.training.data import load_model

    args = build_parser().parse_args(argv)
    out = Path(args.output)
    # the shared checks know 'builtin' and files; 'builtin-dense' is this trainer's own name
    checked = argparse.Namespace(**{**vars(args), "data": "builtin" if args.data == "builtin-dense" else args.data})
    prepare_run(checked, ("samples", "steps", "batch_size", "max_new_tokens", "k"),
                (("--state-dir", args.state_dir or out.parent / f"{out.name}-train-state"),))
    began = time.time()
    model, processor = load_model(args.model, args.device)
    out.mkdir(parents=True, exist_ok=True)
    model.requires_grad_(False)
    adapter = for_model(model)
    state_dir = Path(args.state_dir) if args.state_dir else out.parent / f"{out.name}-train-state"
    state_dir.mkdir(parents=True, exist_ok=True)
    cache_file = state_dir / "distill-data.pt"
    fingerprint = {"lm_head_sum": float(model.get_output_embeddings().weight.double().sum()),
                   "embed_sum": float(adapter.inner.get_input_embeddings().weight.double().sum())}
    marker = state_dir / "target.json"
    if marker.exists() and json.loads(marker.read_text()) != fingerprint:
        print("the target model changed since the saved state: distilling and training afresh", flush=True)
        for stale in (cache_file, state_dir / "train-state.pt"):
            stale.unlink(missing_ok=True)
    marker.write_text(json.dumps(fingerprint))
    recipe_key = {k: getattr(args, k) for k in ("model", "data", "samples", "max_new_tokens", "video_share", "seed")}
    samples = None
    if cache_file.exists() and not args.no_resume:
        stored = torch.load(cache_file, weights_only=False)
        if stored.get("recipe") == recipe_key:
            samples = stored["samples"]
    if samples is None:
        print(f"distilling {args.samples} target answers ...", flush=True)
        if args.data == "builtin":
            prompts = builtin_prompts(processor, args.samples, args.seed, video_share=args.video_share)
        elif args.data == "builtin-dense":
            prompts = dense_prompts(processor, args.samples, args.seed)
        else:
            prompts = jsonl_prompts(processor, args.data, args.samples)
        samples = distill(model, prompts, args.max_new_tokens)
        torch.save({"recipe": recipe_key, "samples": samples}, cache_file)
    torch.manual_seed(args.seed)
    head = DraftHead(DraftSpec.for_target(adapter, k=args.k, num_latents=args.latents))
    head.to(args.device).train()
    embed = adapter.inner.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    order = np.random.default_rng(args.seed)
    picks = [order.choice(len(samples), size=min(args.batch_size, len(samples)), replace=False) for _ in range(args.steps)]
    noise_gen = torch.Generator().manual_seed(args.seed)

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        return draft_step(head, embed, lm_head, [samples[i] for i in picks[step]], args.noise, noise_gen)

    cfg = LoopConfig(steps=args.steps, lr=args.lr, weight_decay=0.0, warmup=max(1, args.steps // 20), seed=args.seed,
                     max_minutes=args.minutes, log_every=20, checkpoint_every=100, grad_clip=0.5,
                     resume_file=None if args.no_resume else state_dir / "train-state.pt", desc="flash draft")
    with torch.enable_grad():
        result = train_loop({"draft": head}, list(head.parameters()), step_fn, cfg)
    head.eval()
    info = {"recipe": {k: v for k, v in vars(args).items()}, "steps": result["steps"],
            "train_minutes": round(result["minutes"], 2), "last": result["history"][-1:],
            "target": {"hidden_size": head.spec.hidden_size, "vocab_size": head.spec.vocab_size,
                       "layers": head.spec.target_layers}}
    path = save_draft(head, out, extra=info)
    if args.data in ("builtin", "builtin-dense") and args.eval_prompts > 0:
        held_out = (builtin_prompts(processor, args.eval_prompts, args.seed + 1, split="val", video_share=1.0)
                    if args.data == "builtin" else dense_prompts(processor, args.eval_prompts, args.seed + 1, split="val"))
        info["held_out"] = acceptance_report(model, path, held_out, args.depth, args.max_new_tokens)
        save_draft(head, out, extra=info)
    print(json.dumps({"draft": str(path), "minutes": round((time.time() - began) / 60, 2),
                      "params": sum(p.numel() for p in head.parameters()), **info.get("held_out", {})}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
