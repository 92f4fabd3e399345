"""CDPruner's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.method import check_choice
from vlmprune.seams.pre_llm import PreLLMConfig

RELEVANCE = ("instruction", "none")


@dataclass(frozen=True)
class CDPrunerConfig(PreLLMConfig):
    """Per image / crop / tile / frame, CDPruner keeps ``T = round(n * (1 - ratio))`` of the ``n``
    visual tokens the LLM would receive (``tokens`` sets T directly, the reference's
    ``visual_token_num``), chosen by the greedy MAP of a determinantal point process whose kernel is
    the tokens' cosine similarity weighted by their relevance to the instruction.

    ``relevance``: ``"instruction"`` (default: relevance from the instruction's LLM-input
    embeddings, the labelled stand-in ``cdpruner-llmtext`` for the reference's CLIP text tower) or
    ``"none"`` (uniform relevance: a pure similarity DPP, ``cdpruner-norelevance``). Kept tokens
    stay in their original order."""

    method: ClassVar[str] = "cdpruner"
    tokens: int | None = None
    relevance: str = "instruction"

    def validate(self) -> None:
        super().validate()
        if self.tokens is not None and (
            isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1
        ):
            raise ValueError(f"tokens must be an integer >= 1 (tokens kept per group), got {self.tokens!r}")
        if self.relevance is None:  # the eval CLI reads a bare "none" as None
            object.__setattr__(self, "relevance", "none")
        check_choice("relevance", self.relevance, RELEVANCE)
