"""DivPrune: per image / crop / tile / frame, keep the visual tokens that are most diverse.

The signal is the group's LLM-input embeddings (the projector outputs, as the reference reads them
off the spliced sequence); the distance is ``1 - cos``; the selection is the greedy max-min rule of
:mod:`.ops`, over the tokens the stock model feeds to the LLM (members a family drops, e.g.
LLaVA-NeXT's unpadding, are not candidates and do not count towards ``n``). The kept tokens stay in
their original order unless ``order="selection"``, which places a group's kept tokens in its kept
columns in the order they were picked (the paper's runs; contiguous positions only).
"""

from __future__ import annotations

from typing import Any

import torch

from vlmprune.method import keep_count
from vlmprune.registry import register_method
from vlmprune.seams.pre_llm import PreLLMMethod, Reduction, VisualGroup

from .config import DivPruneConfig
from .ops import select


@register_method
class DivPrune(PreLLMMethod):
    config_class = DivPruneConfig

    needs = frozenset({"features"})

    def install(self, hooks: Any, handle: Any) -> list[Any]:
        positions = self.config.positions or self.adapter.default_positions
        if self.config.order == "selection" and positions != "contiguous":
            raise ValueError(
                "divprune: order='selection' puts the kept tokens in the order they were picked, which "
                f"only applies with contiguous positions; this model numbers them {positions!r}. "
                "Use order='sorted' or positions='contiguous'."
            )
        return super().install(hooks, handle)

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        if group.features is None:
            raise RuntimeError("DivPrune needs the group's LLM-input features but the seam gave none")
        device = group.features.device
        members = torch.nonzero(group.present.to(device)).squeeze(1)
        n = int(members.numel())
        k = keep_count(n, self.config.ratio) if n else 0
        if k >= n:
            return Reduction(members)
        picks, flops = select(group.features[members], k)
        chosen = members[picks]
        anchors = torch.sort(chosen).values
        if self.config.order == "selection":
            return Reduction(anchors, tokens=group.features[chosen], flops=flops)
        return Reduction(anchors, flops=flops)
