"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025); ``docs/methods/dart.md``.

After layer ``k-1``, a few pivot tokens (largest key norm) each claim the visual tokens least
similar to them; everything else visual leaves. No attention weights are needed: the keys are the
layer's own (captured by the in-LLM seam), the similarity is measured on its output.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmprune.registry import register_method
from vlmprune.seams.in_llm import InLLMMethod, Keep, LayerSignals

from .config import DARTConfig
from .ops import dart_select, key_l1, per_pivot


class DARTPolicy:
    scoring = "pivots by key L1 norm in layer k-1; cosine of the final-normed output"
    variant = None

    def __init__(self, config: DARTConfig, positions: str) -> None:
        self.config, self.positions = config, positions
        self.k = config.k
        self.attention_layers = frozenset({config.k - 1})
        self.label = "dart-sorted" if config.pivot_order == "sorted" else "dart"

    def initial(self, state: Any) -> None:
        return None

    def select(self, layer: int, signals: LayerSignals, state: Any) -> Keep | None:
        if layer != self.k - 1:
            return None
        c = self.config
        norms = key_l1(signals.attention().keys(from_first_token=True))  # a padded row = the sample alone
        states = signals.final_norm()
        visual, valid = signals.visual, signals.valid
        keep = ~visual.clone()
        flops = 0.0
        for b in range(visual.shape[0]):
            image = torch.nonzero(visual[b], as_tuple=False).squeeze(1)
            if image.numel() == 0:
                continue
            if c.ratio == 0 and c.tokens is None:
                keep[b] = True
                continue
            first = int(torch.nonzero(valid[b], as_tuple=False)[0])  # indices as the sample alone numbers them
            last = int(image[-1])
            after = torch.nonzero(valid[b] & ~visual[b], as_tuple=False).squeeze(1)
            text = after[after > last]
            t = per_pivot(image.numel(), c.ratio, c.pivot_image + c.pivot_text, c.tokens)
            kept = dart_select(
                states[b, first:].float(), norms[b, first:], (image - first).tolist(), (text - first).tolist(), t,
                c.pivot_image, c.pivot_text, c.pivot_order,
            )
            keep[b, torch.tensor(kept, dtype=torch.long, device=keep.device) + first] = True
            pivots = min(c.pivot_image, image.numel()) + min(c.pivot_text, text.numel())
            flops += 2.0 * pivots * image.numel() * states.shape[-1]  # cosine similarities
        return Keep(keep, flops=flops)


@register_method
class DART(InLLMMethod):
    config_class = DARTConfig

    def __init__(self, config: DARTConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        layers = len(adapter.decoder_layers)
        if config.k >= layers:
            raise ValueError(f"k must be in 1..{layers - 1} (this model has {layers} decoder layers), got {config.k}")
        self.policy = DARTPolicy(config, config.positions or "original")
