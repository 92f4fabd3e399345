"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247); ``docs/methods/pyramiddrop.md``.

The LLM is cut into stages; at the end of each stage the visual tokens are ranked by the attention
the last instruction token would pay them in the next layer (that layer's own norm, query and key
projections applied to the current hidden states, a light computation beside the model's own
attention, which keeps its backend), and a fraction ``lam`` of them goes on.
"""

from __future__ import annotations

from typing import Any

from vlmprune.registry import register_method
from vlmprune.seams.in_llm import InLLMMethod, Keep, LayerSignals, last_rows

from .config import PyramidDropConfig
from .ops import default_layers, last_token_scores, pyramid_keep


class PyramidDropPolicy:
    label = "pyramiddrop"
    scoring = "attention of the last instruction token with the next layer's norm and q/k, mean over heads"
    variant = None
    attention_layers = frozenset()

    def __init__(self, layers: list[int], lam: float, positions: str) -> None:
        self.layers, self.lam, self.positions = list(layers), float(lam), positions
        self.stage_after = {layer - 1: s for s, layer in enumerate(self.layers, start=1)}

    def initial(self, state: Any) -> None:
        return None

    def select(self, layer: int, signals: LayerSignals, state: Any) -> Keep | None:
        stage = self.stage_after.get(layer)
        if stage is None:
            return None
        probs = signals.projected(layer + 1).probs(last_rows(signals.valid))
        n_input = state.visual.sum(dim=1)
        return Keep(pyramid_keep(last_token_scores(probs), signals.visual, n_input, self.lam, stage))


@register_method
class PyramidDrop(InLLMMethod):
    config_class = PyramidDropConfig

    def __init__(self, config: PyramidDropConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        depth = len(adapter.decoder_layers)
        layers = list(config.layers) if config.layers is not None else default_layers(depth)
        bad = [v for v in layers if not 1 <= v < depth]
        if bad:
            raise ValueError(f"layers must be in 1..{depth - 1} (this model has {depth} decoder layers), got {bad}")
        positions = config.positions or adapter.default_positions
        self.policy = PyramidDropPolicy(layers, config.lam, positions)
