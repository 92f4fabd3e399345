"""What each patched forward did, for users and for the eval harness."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

_MAX_RECORDS = 10_000


@dataclass
class ForwardRecord:
    """One prefill that went through a token-reducing seam."""

    method: str
    visual_in: list[int]  # visual tokens the stock model would have fed the LLM, per sample
    visual_out: list[int]  # visual tokens the LLM saw, per sample
    llm_tokens: list[int]  # real (unpadded) tokens the LLM processed, per sample
    seq_len: int  # padded length of the pruned batch
    positions: str  # "contiguous" or "original"
    scoring: str | None = None  # e.g. "cls", or "nocls" for the labelled fallback
    attn_backend: str | None = None
    overhead_flops: float = 0.0  # the method's own work (e.g. computing the [CLS] row)
    exit_layers: list[int] | None = None  # DyVTE: layers that saw each sample's visual tokens
    layer_tokens: list[list[int]] | None = None  # real tokens per sample per decoder layer, when they differ
    layer_seq_len: list[int] | None = None  # padded length per decoder layer, when it differs
    call: int = 0  # serial of the forward call (records of composed methods share it)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Stats:
    """Per-handle log. ``records`` keeps the latest forwards; the totals cover every one."""

    records: list[ForwardRecord] = field(default_factory=list)
    samples: int = 0
    visual_in_total: int = 0
    visual_out_total: int = 0
    llm_tokens_total: int = 0

    def add(self, record: ForwardRecord) -> None:
        self.records.append(record)
        if len(self.records) > _MAX_RECORDS:
            del self.records[: len(self.records) - _MAX_RECORDS]
        self.samples += len(record.visual_in)
        self.visual_in_total += sum(record.visual_in)
        self.visual_out_total += sum(record.visual_out)
        self.llm_tokens_total += sum(record.llm_tokens)

    @property
    def last(self) -> ForwardRecord | None:
        return self.records[-1] if self.records else None

    def reset(self) -> None:
        self.records.clear()
        self.samples = self.visual_in_total = self.visual_out_total = self.llm_tokens_total = 0

    def summary(self) -> dict[str, float]:
        n = max(self.samples, 1)
        return {
            "samples": self.samples,
            "visual_tokens_in": self.visual_in_total / n,
            "visual_tokens_out": self.visual_out_total / n,
            "llm_tokens": self.llm_tokens_total / n,
        }
