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
    # DyMU (encoder-stage merging); None for methods that leave the vision tower alone
    image_tokens: list[int] | None = None  # visual tokens the LLM got per image / crop
    encoder_layer_tokens: list[list[int]] | None = None  # real tokens per image after each vision block run
    vision_flops: float | None = None  # vision-encoder FLOPs actually run (replaces the full-length figure)
    projector_flops: float | None = None  # projector FLOPs actually run
    kv_len: list[int] | None = None  # real KV-cache length per sample after prefill, when it differs from llm_tokens
    vtu: str | None = None  # DyMU unmerging kernel: "fast", "exact" or "off"
    fast_tokens: list[int] | None = None  # slow-fast: fast (pooled) video tokens in the sequence, per sample
    slow_tokens: list[int] | None = None  # slow-fast: slow tokens (hybrid: cross-attended, outside the sequence)
    cross_attn_flops: float = 0.0  # slow-fast hybrid: kv projection + attention products (part of overhead_flops)
    # in-LLM pruning (FastV, PyramidDrop, DART, SparseVLM); None for other methods
    stage_layers: list[int] | None = None  # first decoder layer of each pruning stage
    stage_visual: list[list[int]] | None = None  # visual tokens kept per sample after each stage
    variant: str | None = None  # labelled deviations from the method's reference on this model

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DecodeRecord:
    """One speculative ``generate`` call (FLASH): rounds, acceptance and where the time went."""

    method: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0  # draft-and-verify rounds per prompt, summed (the first token comes from the prefill)
    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # drafted tokens the target accepted
    accept_lengths: list[int] = field(default_factory=list)  # accepted drafts per round
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    draft_forwards: int = 0
    target_forwards: int = 0
    #: FLOPs of the target's decode forwards after the prefill: every verified position, rejected
    #: ones included, at the cache length it attended over (vlmprune.flops' convention)
    target_decode_flops: float = 0.0
    #: FLOPs of the draft (its forwards, LM-head rows and prompt compression), as its drafter counted
    draft_flops: float = 0.0
    depth: int = 0
    k: int = 1
    tree: str | None = None
    batch: int = 1  # prompts in the call; rounds, drafted, accepted and new_tokens sum over them

    @property
    def mean_accepted(self) -> float:
        """Accepted drafted tokens per round of one prompt (EAGLE's tau is this plus one)."""
        return self.accepted / max(self.rounds, 1)

    @property
    def tokens_per_round(self) -> float:
        return (self.new_tokens - self.batch) / max(self.rounds, 1) if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first over the time after the prefill."""
        t = self.total_s - self.prefill_s
        return (self.new_tokens - self.batch) / t if t > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_accepted": self.mean_accepted, "tokens_per_round": self.tokens_per_round,
                "tokens_per_second": self.tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


@dataclass
class Stats:
    """Per-handle log. ``records`` keeps the latest forwards; the totals cover every one."""

    records: list[ForwardRecord] = field(default_factory=list)
    samples: int = 0
    visual_in_total: int = 0
    visual_out_total: int = 0
    llm_tokens_total: int = 0
    decode: list[DecodeRecord] = field(default_factory=list)  # speculative generate calls (FLASH)

    def add_decode(self, record: DecodeRecord) -> None:
        self.decode.append(record)
        if len(self.decode) > _MAX_RECORDS:
            del self.decode[: len(self.decode) - _MAX_RECORDS]

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
        self.decode.clear()
        self.samples = self.visual_in_total = self.visual_out_total = self.llm_tokens_total = 0

    def summary(self) -> dict[str, float]:
        n = max(self.samples, 1)
        out = {
            "samples": self.samples,
            "visual_tokens_in": self.visual_in_total / n,
            "visual_tokens_out": self.visual_out_total / n,
            "llm_tokens": self.llm_tokens_total / n,
        }
        if self.decode:
            rounds = sum(r.rounds for r in self.decode)
            new = sum(r.new_tokens for r in self.decode)
            total = sum(r.total_s for r in self.decode)
            out.update({
                "generate_calls": len(self.decode),
                "mean_accepted": sum(r.accepted for r in self.decode) / max(rounds, 1),
                "tokens_per_round": sum(r.new_tokens - 1 for r in self.decode) / max(rounds, 1),
                "draft_s": sum(r.draft_s for r in self.decode),
                "verify_s": sum(r.verify_s for r in self.decode),
                "tokens_per_second": new / total if total > 0 else 0.0,
            })
        return out
