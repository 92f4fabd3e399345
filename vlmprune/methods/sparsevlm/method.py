"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417); ``docs/methods/sparsevlm.md``.

Text tokens relevant to the image (the *raters*, chosen once from the LLM's input embeddings) rate
the visual tokens with their attention at a few layers; each of those layers runs on its full
input and its output keeps the best-rated visual tokens, while the best of the pruned ones are
clustered into a few merged tokens placed after the kept ones. The rater rows of the attention are
computed from the layer's own queries and keys (captured by the in-LLM seam), so the model keeps
SDPA; the reference materialises every layer's full attention map instead.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmprune.registry import register_method
from vlmprune.seams.in_llm import InLLMMethod, Keep, LayerSignals

from .config import SparseVLMConfig
from .ops import (
    REFERENCE_DEPTH,
    V1_PRESETS,
    cluster_and_merge,
    default_layers,
    rank_count,
    rater_scores,
    recycle_counts,
    select_raters,
    stage_count,
)


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values, largest first (exact ties to the lowest index)."""
    return torch.sort(values, descending=True, stable=True).indices[: max(0, int(k))]


class SparseVLMPolicy:
    label = "sparsevlm"
    scoring = "raters' attention (rater rows from q,k), mean over heads then raters"

    def __init__(self, config: SparseVLMConfig, layers: list[int], positions: str, scaled_layers: bool) -> None:
        self.config, self.layers, self.positions = config, list(layers), positions
        self.stage_of = {layer: s for s, layer in enumerate(self.layers)}
        self.attention_layers = frozenset(self.layers)
        if config.version == "v1":
            preset = V1_PRESETS.get(config.budget, (None, None))
            self.scale = config.scale if config.scale is not None else preset[0]
            self.bias = config.bias if config.bias is not None else preset[1]
        notes = [config.version]
        if config.version == "v1.5":
            notes.append("stage counts x N/576")
        if scaled_layers:
            notes.append(f"layers {self.layers} scaled from {REFERENCE_DEPTH}-layer defaults")
        if config.merge:
            notes.append(f"merge noise seeded ({config.seed})")
        else:
            notes.append("no merging")
        if positions == "original":
            notes.append("original positions (merged at their centre's)")
        self.variant = "; ".join(notes)

    def initial(self, state: Any) -> None:
        """Pick each sample's raters from the decoder's input embeddings (decoder-input columns)."""
        embeds, visual, valid = state.embeds, state.visual, state.valid
        cols = torch.arange(visual.shape[1], device=visual.device)
        raters = []
        for b in range(visual.shape[0]):
            vis = torch.nonzero(visual[b], as_tuple=False).squeeze(1)
            if vis.numel() == 0:
                raters.append(vis)
                continue
            text = torch.nonzero(valid[b] & ~visual[b] & (cols > vis[-1]), as_tuple=False).squeeze(1)
            if text.numel() == 0:
                raters.append(text)
                continue
            chosen = select_raters(embeds[b, vis], embeds[b, text])
            state.overhead += 2.0 * vis.numel() * text.numel() * embeds.shape[-1]
            raters.append(text[chosen.to(text.device)])
        state.scratch["raters"] = raters

    def select(self, layer: int, signals: LayerSignals, state: Any) -> Keep | None:
        stage = self.stage_of.get(layer)
        if stage is None:
            return None
        c = self.config
        visual, valid, columns, hidden = signals.visual, signals.valid, signals.columns, signals.hidden
        bsz = visual.shape[0]
        raters = state.scratch["raters"]
        rows = [torch.nonzero(torch.isin(columns[b], raters[b].to(columns.device)) & valid[b], as_tuple=False).squeeze(1)
                for b in range(bsz)]
        width = max(1, max(r.numel() for r in rows))
        row_idx = torch.zeros(bsz, width, dtype=torch.long, device=visual.device)
        weights = torch.zeros(bsz, width, device=visual.device)
        for b, r in enumerate(rows):
            row_idx[b, : r.numel()] = r
            weights[b, : r.numel()] = 1.0
        probs = signals.attention().probs(row_idx)
        scores = rater_scores(probs, weights)
        n_input = state.visual.sum(dim=1).tolist()
        keep = ~visual.clone()
        extras, anchors, flops = [], [], 0.0
        for b in range(bsz):
            vis = torch.nonzero(visual[b], as_tuple=False).squeeze(1)
            v = vis.numel()
            if v == 0 or rows[b].numel() == 0:  # nothing to rate, or no rater: the sample keeps all
                keep[b, vis] = True
                extras.append(None)
                continue
            if c.version == "v1.5":
                k = min(stage_count(c.budget, stage, int(n_input[b])), v - 1)
            else:
                attention = probs[b, :, : rows[b].numel()].mean(dim=0)[:, vis]
                rank, count = rank_count(attention, self.scale, self.bias)
                if v - rank == 0:
                    keep[b, vis] = True
                    extras.append(None)
                    continue
                k = min(count, v - 1)
            order = _top(scores[b, vis].float(), v)
            kept, pruned = vis[order[:k]], vis[order[k:]]
            keep[b, kept] = True
            pruned = pruned.sort().values
            recycled, clusters = recycle_counts(pruned.numel()) if c.merge else (0, 0)
            if recycled == 0:
                extras.append(None)
                continue
            top = pruned[_top(scores[b, pruned].float(), recycled)]
            gen = torch.Generator().manual_seed(c.seed * 1_000_003 + stage)
            merged, centres = cluster_and_merge(hidden[b, top], clusters, gen)
            extras.append(merged)
            anchors.append((b, top[centres]))
            flops += 3.0 * recycled * recycled * hidden.shape[-1] + recycled * hidden.shape[-1]
        counts = torch.tensor([0 if e is None else e.shape[0] for e in extras], device=visual.device)
        if int(counts.sum()) == 0:
            return Keep(keep, flops=flops)
        width = int(counts.max())
        extra = hidden.new_zeros(bsz, width, hidden.shape[-1])
        anchor = torch.zeros(bsz, width, dtype=torch.long, device=visual.device)
        for b, e in enumerate(extras):
            if e is not None:
                extra[b, : e.shape[0]] = e
        for b, a in anchors:
            anchor[b, : a.numel()] = a
        return Keep(keep, extra=extra, extra_count=counts, extra_anchor=anchor, flops=flops)


@register_method
class SparseVLM(InLLMMethod):
    config_class = SparseVLMConfig

    def __init__(self, config: SparseVLMConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        depth = len(adapter.decoder_layers)
        layers = list(config.layers) if config.layers is not None else default_layers(config.version, depth)
        bad = [v for v in layers if not 0 <= v < depth - 1]
        if bad:
            raise ValueError(f"layers must be in 0..{depth - 2} (this model has {depth} decoder layers), got {bad}")
        positions = config.positions or adapter.default_positions
        scaled = config.layers is None and depth != REFERENCE_DEPTH
        self.policy = SparseVLMPolicy(config, layers, positions, scaled)
