"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024); ``docs/methods/fastv.md``.

After layer ``k-1`` the visual tokens that the last prompt token attends to least leave the
sequence, its KV cache and every later layer. The attention row is computed from layer ``k-1``'s
own queries and keys (captured by the in-LLM seam), so the model keeps its SDPA kernels.
"""

from __future__ import annotations

from typing import Any

from vlmprune.registry import register_method
from vlmprune.seams.in_llm import InLLMMethod, Keep, LayerSignals, last_rows

from .config import FastVConfig
from .ops import fastv_keep, last_token_scores


class FastVPolicy:
    """Score after layer ``k - 1`` and keep the top visual rows from layer ``k`` on."""

    label = "fastv"
    scoring = "attention of the last prompt token in layer k-1, mean over heads"
    variant = None

    def __init__(self, k: int, ratio: float, positions: str) -> None:
        self.k, self.ratio, self.positions = k, ratio, positions
        self.attention_layers = frozenset({k - 1})

    def initial(self, state: Any) -> None:
        return None

    def select(self, layer: int, signals: LayerSignals, state: Any) -> Keep | None:
        if layer != self.k - 1:
            return None
        probs = signals.attention().probs(last_rows(signals.valid))
        return Keep(fastv_keep(last_token_scores(probs), signals.visual, self.ratio))


@register_method
class FastV(InLLMMethod):
    config_class = FastVConfig

    def __init__(self, config: FastVConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        layers = len(adapter.decoder_layers)
        if config.k >= layers:
            raise ValueError(f"k must be in 1..{layers - 1} (this model has {layers} decoder layers), got {config.k}")
        self.policy = FastVPolicy(config.k, config.ratio, config.positions or "original")
