"""CDPruner: per image / crop / tile / frame, keep a diverse and instruction-relevant subset of the
visual tokens, chosen by the greedy MAP of a conditional DPP.

Signals (from the pre-LLM seam): the group's LLM-input embeddings (the projector outputs, the
reference's similarity space) and the instruction's LLM-input embeddings (the sample's text tokens
after its last visual token).

Relevance, labelled ``cdpruner-llmtext``: the reference compares CLIP's projected patch embeddings
with CLIP's text-tower embedding of the question; stock VLMs carry no text tower, so here each
token's projector output is compared with each instruction token's input embedding (the space
the projector maps into), ``-cos`` averaged over the instruction's tokens, then min-max normalised
as the reference does. The normalisation runs per group (the reference's call normalises over all
crops of its one image together); one group's choice therefore never depends on another group or
sample. A sample without text after its visual tokens gets uniform relevance. ``relevance="none"``
(``cdpruner-norelevance``) is the pure similarity DPP.

The selection runs over the tokens the stock model feeds to the LLM (members a family drops, e.g.
LLaVA-NeXT's unpadding, are not candidates and do not count towards ``n``); kept tokens stay in
their original order.
"""

from __future__ import annotations

import torch

from vlmprune.method import keep_count
from vlmprune.registry import register_method
from vlmprune.seams.pre_llm import PreLLMMethod, Reduction, VisualGroup

from .config import CDPrunerConfig
from .ops import select


@register_method
class CDPruner(PreLLMMethod):
    config_class = CDPrunerConfig

    needs = frozenset({"features", "instruction"})

    def budget(self, n: int) -> int:
        """Tokens kept of a group of ``n``: ``tokens`` when set (at most n), else round(n * (1 - ratio))."""
        if n == 0:
            return 0
        if self.config.tokens is not None:
            return min(n, int(self.config.tokens))
        return keep_count(n, self.config.ratio)

    def reduce(self, group: VisualGroup, generator: torch.Generator | None = None) -> Reduction:
        if group.features is None:
            raise RuntimeError("CDPruner needs the group's LLM-input features but the seam gave none")
        device = group.features.device
        members = torch.nonzero(group.present.to(device)).squeeze(1)
        n = int(members.numel())
        t = self.budget(n)
        if t >= n:
            return Reduction(members)
        instruction = None
        if self.config.relevance == "instruction":
            instruction = group.instruction
            if instruction is None:
                raise RuntimeError("CDPruner needs the instruction's embeddings but the seam gave none")
        picks, flops = select(group.features[members], instruction, t)
        return Reduction(torch.sort(members[picks]).values, flops=flops)

    @property
    def label(self) -> str:
        return "cdpruner-llmtext" if self.config.relevance == "instruction" else "cdpruner-norelevance"
