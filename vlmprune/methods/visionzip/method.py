"""VisionZip: per image / crop / tile / frame, keep the "dominant" tokens the vision encoder's
[CLS] token attends to most and merge the rest into a few "contextual" tokens by key similarity.

Signals (from the adapter): the [CLS] attention row of the layer that produces the features
(towers without a [CLS] token: the labelled fallback, mean attention received in the last layer);
that layer's keys averaged over heads; what the projector receives per token (merged there, then
projected, as the reference merges before the projector) and the [CLS] row; and the group's
LLM-input features, which the dominant tokens keep unchanged.

Where the new tokens go: with contiguous positions (LLaVA, InternVL) only their order matters,
and they take the group's first kept slots in the reference order: [CLS], dominant tokens in
raster order, contextual tokens in target order. With original positions (Qwen2-VL's M-RoPE) each
token stays at a grid place of its own: a dominant token at its own, a contextual token at its
target's (as LightCompress's Qwen2.5-VL port places them), the [CLS] token at the first free one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmprune.method import keep_count
from vlmprune.registry import register_method
from vlmprune.scoring import topk_indices
from vlmprune.seams.pre_llm import PreLLMMethod, Reduction, VisualGroup

from .config import VisionZipConfig
from .ops import contextual_merge, split_budget


def _projection_flops(project: object, rows: int) -> float:
    """What projecting ``rows`` new rows costs, where the adapter's projector says (``flops(rows)``)."""
    flops = getattr(project, "flops", None)
    return float(flops(rows)) if callable(flops) and rows > 0 else 0.0


@register_method
class VisionZip(PreLLMMethod):
    config_class = VisionZipConfig

    needs_scores = "cls"
    needs = frozenset({"features", "vision", "keys"})

    def counts(self, n: int) -> tuple[int, int] | None:
        """(dominant, contextual) for a group of ``n`` grid tokens; None when the budget covers every
        token (nothing is merged or removed: the stock model)."""
        cfg = self.config
        if cfg.dominant is not None:
            return int(cfg.dominant), int(cfg.contextual)
        total = min(n, int(cfg.tokens)) if cfg.tokens is not None else keep_count(n, cfg.ratio)
        if total >= n:
            return None
        return split_budget(total, cfg.contextual_share)

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        missing = [name for name in ("scores", "keys", "vision", "features") if getattr(group, name) is None]
        if missing or group.project is None:
            raise RuntimeError(f"VisionZip needs {', '.join(missing) or 'project'} but the adapter gave none")
        n = group.columns.numel()
        counts = self.counts(n)
        if counts is None:
            return Reduction(torch.arange(n))
        dominant, contextual = counts
        device = group.scores.device
        has_cls = group.vision_cls is not None
        patches = min(n, dominant - 1 if has_cls else dominant)
        dom = topk_indices(group.scores, patches).to(device)
        present = group.present.to(device)
        is_dom = torch.zeros(n, dtype=torch.bool, device=device)
        is_dom[dom] = True
        dom_kept = dom[present[dom]]
        remaining = torch.nonzero(~is_dom & present).squeeze(1)

        space = group.vision if self.config.merge_space == "vision" else group.features
        merge = contextual_merge(group.keys.to(device)[remaining], space.to(device)[remaining], contextual)
        flops = merge.flops
        dtype = group.features.dtype
        ctx_tokens = merge.tokens
        projected = 0
        if ctx_tokens.shape[0] == 0:
            ctx_tokens = group.features.new_zeros(0, group.features.shape[-1])
        elif self.config.merge_space == "vision":
            ctx_tokens = group.project(ctx_tokens)
            projected += int(merge.tokens.shape[0])
        parts = []
        if has_cls:
            parts.append(group.project(group.vision_cls.reshape(1, -1)).to(device, dtype))
            projected += 1
        flops += _projection_flops(group.project, projected)
        dom_tokens = group.features.to(device)[dom_kept].to(dtype)
        ctx_tokens = ctx_tokens.to(device, dtype)
        anchors, tokens = self._place(present, dom_kept, remaining[merge.targets], parts, dom_tokens, ctx_tokens)
        return Reduction(anchors, tokens=tokens, flops=flops)

    def _place(self, present: Tensor, dom: Tensor, targets: Tensor, cls: list[Tensor], dom_tokens: Tensor,
               ctx_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Anchors (ascending grid indices of present tokens) and the token each one holds."""
        positions = self.config.positions or self.adapter.default_positions
        if positions == "original":
            anchors = torch.cat([dom, targets])
            tokens = torch.cat([dom_tokens, ctx_tokens])
            if cls:
                free = present.clone()
                free[anchors] = False
                slot = torch.nonzero(free).flatten()[:1]  # no free slot: the [CLS] token is left out
                anchors = torch.cat([slot, anchors])
                tokens = torch.cat([cls[0][: slot.numel()], tokens])
            order = torch.argsort(anchors)
            return anchors[order], tokens[order]
        tokens = torch.cat([*cls, dom_tokens, ctx_tokens])
        slots = torch.nonzero(present).flatten()
        k = min(int(tokens.shape[0]), int(slots.numel()))  # a crop mostly lost to unpadding keeps fewer
        return slots[:k], tokens[:k]

    @property
    def label(self) -> str:
        return "visionzip" if self.adapter.score_kind == "cls" else "visionzip-nocls"
