"""Where does the [CLS] attention of the built-in model land? (the FasterVLM signal, inspected)

``cls_attention(model, pixel_values)`` returns FasterVLM's score map (the [CLS] row of the
feature layer's block, head-averaged) for each image; ``object_mass`` measures how much of it
falls on patches that hold objects; ``save_heatmaps`` writes a picture for the README;
``count_when_objects_kept`` separates FasterVLM's counting errors by whether every object patch
survived the pruning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlmprune.adapters.llava import encoder_layers, feature_layer_index
from vlmprune.scoring import cls_attention_scores

from . import data


@torch.no_grad()
def cls_attention(model: Any, pixel_values: Tensor) -> Tensor:
    """(B, GRID, GRID) [CLS]-row scores at the encoder block that produces the feature layer."""
    tower = model.model.vision_tower
    layers = encoder_layers(tower)
    attn = layers[feature_layer_index(model.config.vision_feature_layer, len(layers))].self_attn
    captured: dict[str, Tensor] = {}
    hooks = [
        attn.q_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("q", o[:, 0])),
        attn.k_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("k", o)),
    ]
    try:
        tower(pixel_values.to(model.dtype))
    finally:
        for h in hooks:
            h.remove()
    scores = cls_attention_scores(captured["q"], captured["k"], model.config.vision_config.num_attention_heads)
    side = int(scores.shape[1] ** 0.5)
    return scores.view(-1, side, side)


def object_mass(scores: Tensor, samples: list[data.ImageSample]) -> tuple[float, float]:
    """(share of the [CLS] mass on object patches, share of patches that hold objects), averaged."""
    mass, share = [], []
    for s, sample in zip(scores, samples):
        obj = torch.from_numpy(sample.object_patches())
        mass.append(float(s[obj].sum() / s.sum()))
        share.append(float(obj.float().mean()))
    return float(np.mean(mass)), float(np.mean(share))


def save_heatmaps(model: Any, processor: Any, path: str | Path, n: int = 4, split: str = "test") -> Path:
    """A row of images with their [CLS]-attention heat-maps and FasterVLM's kept patches at 0.9."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmprune.method import keep_count
    from vlmprune.scoring import topk_indices

    samples = data.image_split(split, n)
    pixels = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
    scores = cls_attention(model, pixels)
    fig, axes = plt.subplots(3, n, figsize=(2.6 * n, 7.8))
    for i, (sample, score) in enumerate(zip(samples, scores)):
        g = score.shape[0]
        axes[0, i].imshow(sample.image)
        axes[0, i].set_title(", ".join(f"{o.color} {o.shape}" for o in sample.objects), fontsize=7)
        axes[1, i].imshow(sample.image)
        axes[1, i].imshow(score.numpy(), cmap="inferno", alpha=0.7, extent=(0, 224, 224, 0))
        axes[1, i].set_title("[CLS] attention", fontsize=8)
        keep = topk_indices(score.flatten(), keep_count(g * g, 0.9))
        mask = np.zeros(g * g)
        mask[keep.numpy()] = 1
        axes[2, i].imshow(sample.image)
        axes[2, i].imshow(mask.reshape(g, g), cmap="Greens", alpha=0.5, extent=(0, 224, 224, 0))
        axes[2, i].set_title(f"FasterVLM kept at 0.9 ({len(keep)})", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def dymu_tokens_by_objects(model: Any, processor: Any, presets: tuple[str, ...] = ("low", "mid", "high"),
                           n: int = 120, split: str = "test") -> dict[str, dict[int, list[int]]]:
    """Visual tokens DyMU keeps per image, grouped by the image's number of objects, per preset:
    the paper's claim is that the count follows scene complexity."""
    import vlmprune

    from . import builtin

    samples = data.image_split(split, n)
    out: dict[str, dict[int, list[int]]] = {}
    for preset in presets:
        by: dict[int, list[int]] = {}
        with vlmprune.apply(model, "dymu", preset=preset) as handle, torch.no_grad():
            for i in range(0, n, 16):
                chunk = samples[i : i + 16]
                inputs = builtin.encode(processor, [builtin.image_prompt(("how", "many", "objects", "are", "there", "?"))] * len(chunk),
                                        [[s.image] for s in chunk])
                handle.stats.reset()
                model(**inputs, logits_to_keep=1)
                kept = [r for r in handle.stats.records if r.image_tokens is not None][-1].image_tokens
                for s, k in zip(chunk, kept):
                    by.setdefault(len(s.objects), []).append(int(k))
        out[preset] = by
    return out


def save_dymu_plot(counts: dict[str, dict[int, list[int]]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for preset, by in counts.items():
        xs = sorted(by)
        means = [float(np.mean(by[x])) for x in xs]
        stds = [float(np.std(by[x])) for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"dymu {preset}")
    ax.axhline(256, color="black", linestyle="--", linewidth=0.8, label="unmerged (256)")
    ax.set(xlabel="objects in the image", ylabel="visual tokens kept (mean ± sd)", title="DyMU: tokens follow scene complexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def count_when_objects_kept(model: Any, processor: Any, ratio: float, n: int = 150, split: str = "test") -> dict[str, float]:
    """Is FasterVLM's counting loss a matter of dropped object patches? Counts are scored
    separately on images where the kept patches cover every object patch and on the others."""
    import vlmprune
    from vlmprune.method import keep_count
    from vlmprune.scoring import topk_indices

    from . import builtin, train

    samples = data.image_split(split, n)
    scores = cls_attention(model, train.to_pixels([s.image for s in samples])).flatten(1)
    keep = keep_count(scores.shape[1], ratio)
    kept_all, dropped, errors = [], [], []
    with vlmprune.apply(model, "fastervlm", ratio=ratio):
        for s, row in zip(samples, scores):
            q = data.image_question_candidates(s.objects)["count"][0]
            inputs = builtin.encode(processor, [builtin.image_prompt(q.words)], [[s.image]])
            logits = model(**inputs).logits[0, -1]
            pred = int(logits[builtin.choice_ids(processor.tokenizer, q.choices)].argmax())
            objects = torch.from_numpy(s.object_patches().reshape(-1))
            covered = bool(objects[topk_indices(row, keep)].sum() == objects.sum())
            (kept_all if covered else dropped).append(q.choices[pred] == q.answer)
            errors.append(pred + 1 - len(s.objects))
    return {
        "ratio": ratio, "images": n, "all_objects_kept": len(kept_all),
        "count_acc_all_kept": 100.0 * float(np.mean(kept_all)) if kept_all else float("nan"),
        "count_acc_some_dropped": 100.0 * float(np.mean(dropped)) if dropped else float("nan"),
        "mean_count_error": float(np.mean(errors)),
    }
