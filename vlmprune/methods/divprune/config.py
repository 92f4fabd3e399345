"""DivPrune's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.method import check_choice
from vlmprune.seams.pre_llm import PreLLMConfig

ORDERS = ("sorted", "selection")


@dataclass(frozen=True)
class DivPruneConfig(PreLLMConfig):
    """Per image / crop / tile / frame, DivPrune keeps ``k = round(n * (1 - ratio))`` of the ``n``
    visual tokens the LLM would receive, chosen greedily to be far apart (max-min cosine distance
    between their LLM-input embeddings).

    ``order``: ``"sorted"`` (default, the public reference code: kept tokens stay in their
    original order) or ``"selection"`` (the order the paper's numbers were produced with: a group's
    kept tokens enter the LLM in the order the greedy picked them; only with contiguous positions,
    where the order of tokens is the only thing that tells them apart)."""

    method: ClassVar[str] = "divprune"
    order: str = "sorted"

    def validate(self) -> None:
        super().validate()
        check_choice("order", self.order, ORDERS)
