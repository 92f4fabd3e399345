"""FLASH's draft model (``docs/methods/flash.md``): pure modules and functions.

The draft is a light head on the target's last hidden state, EAGLE style: at draft position ``t``
it fuses the embedding of token ``x_{t+1}`` with the target feature ``f_t`` through ``fc``, runs
one causal decoder layer at the target's width, and predicts future features; logits come from
the *target's* frozen LM head, so the draft file holds no vocabulary-sized matrix and stays small.

Two multimodal twists:

* latent-aware compression: every contiguous visual span of the prompt is replaced, on the draft
  side only, by ``num_latents`` learned-query summaries (``softmax(A h_v^T) h_v``); the target is
  never compressed, so losslessness is untouched, but the draft's prefill and attention shrink;
* semi-autoregressive head: the layer's MLP ends in ``k * H`` outputs, i.e. one forward predicts
  the features of the next ``k`` positions (``k = 1`` is exactly an EAGLE-1 decoder layer).

Nothing here knows a model class: the drafter receives the target's embedding and LM head modules.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vlmprune.files import local_file

DRAFT_FILE = "draft.safetensors"


class DraftError(ValueError):
    """A draft file is missing, corrupt, or was trained for a different target model."""


# -- sizes -----------------------------------------------------------------------------------------


@dataclass
class DraftSpec:
    """Sizes of a draft and the fingerprint of the target it belongs to."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # the target LM head's output size (checked at load)
    target_layers: int  # the target's decoder depth (checked at load: features come from its last layer)
    k: int = 1  # features (tokens) one forward predicts
    num_latents: int = 64  # Q learned queries per visual span; 0 = no compression
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    target_type: str = ""  # model_type of the target's text model (informative)
    visual_ids: list[int] = field(default_factory=list)  # placeholder token ids of visual spans

    def check(self) -> None:
        if self.k < 1:
            raise ValueError(f"flash: k (tokens per draft forward) must be >= 1, got {self.k}")
        if self.num_latents < 0:
            raise ValueError(f"flash: num_latents must be >= 0, got {self.num_latents}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("flash: num_heads must be a multiple of num_kv_heads")

    @classmethod
    def for_target(cls, adapter: Any, k: int = 1, num_latents: int = 64) -> DraftSpec:
        """A draft at the target's full width (the paper's choice), one layer."""
        tc = adapter.text_config
        hidden = int(tc.hidden_size)
        heads = int(tc.num_attention_heads)
        kv = int(getattr(tc, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(tc, "head_dim", None) or hidden // heads)
        rope = getattr(tc, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0)) or 10000.0)
        spec = cls(
            hidden_size=hidden, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
            intermediate_size=int(getattr(tc, "intermediate_size", 4 * hidden)),
            vocab_size=int(adapter.model.get_output_embeddings().weight.shape[0]),
            target_layers=len(adapter.decoder_layers), k=int(k), num_latents=int(num_latents),
            rope_theta=theta, rms_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
            target_type=str(getattr(tc, "model_type", "")), visual_ids=list(adapter.placeholder_ids()),
        )
        spec.check()
        return spec


# -- the head --------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class DraftCache:
    """The draft's own KV cache: (B, kv_heads, length, head_dim) tensors that can be cropped.

    ``crop`` is how a round drops the drafted (speculative) positions and keeps the accepted ones.
    ``valid`` (B, length) marks real entries: in a batch, rows accept different numbers of tokens
    per round, so a row's shorter block is padded and its pads are masked out of attention (and
    squeezed out by ``compact``).
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.valid: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else int(self.k.shape[2])

    def append(self, k: Tensor, v: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if valid is None:
            valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        self.valid = valid.bool() if self.valid is None else torch.cat([self.valid, valid.bool()], dim=1)
        return self.k, self.v

    def expand_rows(self, rows: int) -> None:
        """One copy of the prefix per tree branch (the rows then diverge)."""
        if self.k is not None and self.k.shape[0] != rows:
            self.k = self.k[:1].expand(rows, -1, -1, -1).contiguous()
            self.v = self.v[:1].expand(rows, -1, -1, -1).contiguous()
            self.valid = self.valid[:1].expand(rows, -1).contiguous()

    def keep_row(self, row: int) -> None:
        if self.k is not None and self.k.shape[0] > 1:
            self.k = self.k[row : row + 1]
            self.v = self.v[row : row + 1]
            self.valid = self.valid[row : row + 1]

    def select_rows(self, rows: Tensor) -> None:
        """Keep the batch rows ``rows`` (finished samples leave the batch)."""
        if self.k is not None:
            self.k, self.v, self.valid = self.k[rows], self.v[rows], self.valid[rows]

    def crop(self, length: int) -> None:
        if self.k is not None and self.k.shape[2] > length:
            self.k = self.k[:, :, :length]
            self.v = self.v[:, :, :length]
            self.valid = self.valid[:, :length]

    def waste(self) -> int:
        """Columns that compacting would free (the longest row's real entries are all that is needed)."""
        return 0 if self.valid is None else self.length - int(self.valid.sum(1).max())

    def compact(self) -> None:
        """Move every row's real entries to the front (order kept) and drop the freed columns.
        Exact: the entries carry their positions in their rotated keys, and pads are masked."""
        if self.k is None:
            return
        index, valid = compact_index(self.valid)
        self.k = _gather_columns(self.k, index)
        self.v = _gather_columns(self.v, index)
        self.valid = valid


def compact_index(valid: Tensor) -> tuple[Tensor, Tensor]:
    """(index (B, T'), valid (B, T')): per row, the columns of its real entries first, in order;
    ``T'`` is the longest row's count (shorter rows end in masked filler columns)."""
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
    count = valid.sum(1)
    width = int(count.max()) if valid.numel() else 0
    index = order[:, :width]
    return index, torch.arange(width, device=valid.device).unsqueeze(0) < count.unsqueeze(1)


def _gather_columns(x: Tensor, index: Tensor) -> Tensor:
    """x (B, heads, T, d) -> (B, heads, T', d) with per-row columns ``index`` (B, T')."""
    b, h, _, d = x.shape
    return torch.gather(x, 2, index.to(x.device)[:, None, :, None].expand(b, h, index.shape[1], d))


class DraftHead(nn.Module):
    """fc fusion + one causal attention block + the semi-AR (k-output) gated MLP.

    ``forward(x)`` maps fused inputs (B, m, H) to predicted features (B, m, k, H): output
    ``[:, j, i]`` is the feature of position ``j + 1 + i``. With ``k = 1`` the block is a plain
    Llama decoder layer, the EAGLE-1 chain head.
    """

    def __init__(self, spec: DraftSpec) -> None:
        super().__init__()
        spec.check()
        self.spec = spec
        h, hd = spec.hidden_size, spec.head_dim
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.latents = nn.Parameter(torch.zeros(spec.num_latents, h))
        self.attn_norm = RMSNorm(h, spec.rms_eps)
        self.q_proj = nn.Linear(h, spec.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * hd, h, bias=False)
        self.mlp_norm = RMSNorm(h, spec.rms_eps)
        self.gate_proj = nn.Linear(h, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.k * h, bias=False)
        inv = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Small normal weights (latents too, std 0.02), unit norms, zero biases."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
        nn.init.normal_(self.latents, std=std)

    # -- pieces ----------------------------------------------------------------------------------
    def fuse(self, token_embeds: Tensor, features: Tensor) -> Tensor:
        """``fc([e(x_{t+1}); f_t])``."""
        return self.fc(torch.cat([token_embeds.to(self.fc.weight.dtype), features.to(self.fc.weight.dtype)], dim=-1))

    def compress(self, visual_hidden: Tensor) -> Tensor:
        """(n_v, H) -> (Q, H): ``softmax_over_visual(A h_v^T) h_v`` (no projections, no scaling)."""
        hv = visual_hidden.to(self.latents.dtype)
        weights = torch.softmax(self.latents @ hv.transpose(0, 1), dim=-1)
        return weights @ hv

    def _rope(self, x: Tensor, positions: Tensor) -> Tensor:
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        if emb.dim() == 3:  # per-row positions (B, m): broadcast over the heads
            emb = emb.unsqueeze(1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def forward(
        self, x: Tensor, positions: Tensor | None = None, cache: DraftCache | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """x: (B, m, H) fused inputs at ``positions``: (m,) for every row or (B, m) per row (default:
        after the cache).

        ``valid`` (B, m) marks real columns (right padding in training, a batch row's shorter block
        in decoding); padded keys, and the cache's own padded entries, are masked.
        """
        spec = self.spec
        bsz, m, _ = x.shape
        past = cache.length if cache is not None else 0
        past_valid = cache.valid if cache is not None and past > 0 else None
        if positions is None:
            positions = torch.arange(past, past + m, device=x.device)
        h = self.attn_norm(x)
        q = self.q_proj(h).view(bsz, m, spec.num_heads, spec.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(bsz, m, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(bsz, m, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        q, k = self._rope(q, positions), self._rope(k, positions)
        if cache is not None:
            k, v = cache.append(k, v, valid)
        rep = spec.num_heads // spec.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        total = k.shape[2]
        if past == 0 and valid is None:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=m > 1)
        else:
            qpos = torch.arange(past, past + m, device=x.device).unsqueeze(1)
            mask = torch.arange(total, device=x.device).unsqueeze(0) <= qpos  # (m, total)
            mask = mask.unsqueeze(0).unsqueeze(0)
            if valid is not None or past_valid is not None:
                old = past_valid if past_valid is not None else torch.ones(bsz, past, dtype=torch.bool, device=x.device)
                new = valid.bool() if valid is not None else torch.ones(bsz, m, dtype=torch.bool, device=x.device)
                keys = torch.cat([old.to(x.device), new], dim=1)
                mask = mask & keys[:, None, None, :]
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(bsz, m, -1))
        h = self.mlp_norm(x)
        out = self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)).view(bsz, m, spec.k, spec.hidden_size)
        return x.unsqueeze(2) + out

    def flops_per_token(self, context: int) -> float:
        """Multiply-adds x2 of one draft position attending over ``context`` keys (FLOPs report)."""
        s = self.spec
        h, hd = s.hidden_size, s.head_dim
        proj = 2 * h * 2 * h + 2 * h * (s.num_heads + 2 * s.num_kv_heads) * hd + 2 * s.num_heads * hd * h
        attn = 4 * s.num_heads * hd * context
        mlp = 2 * 2 * h * s.intermediate_size + 2 * s.intermediate_size * s.k * h
        return float(proj + attn + mlp)


# -- draft context (compression) -------------------------------------------------------------------


def visual_spans(visual: Tensor) -> list[tuple[int, int]]:
    """[start, end) of every contiguous run of True in a (n,) mask."""
    spans, start = [], None
    flags = visual.tolist()
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(flags)))
    return spans


def draft_context(
    head: DraftHead, token_embeds: Tensor, hidden: Tensor, visual: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The draft's input sequence for one prompt, and which target position each entry stands for.

    ``token_embeds[t]`` embeds token ``x_{t+1}``, ``hidden[t]`` is ``f_t`` (both (n, H)). Text
    positions are fused; with ``num_latents > 0`` each visual span becomes Q unfused latents
    (as in the released branch) and the sequence shrinks by ``n_vis - Q`` per span. Returns
    ``(inputs (m, H), source (m,))`` where ``source`` is the target position of a fused entry and
    -1 for a latent.
    """
    fused = head.fuse(token_embeds, hidden)
    q = head.spec.num_latents
    if visual is None or q == 0 or not bool(visual.any()):
        return fused, torch.arange(hidden.shape[0], device=hidden.device)
    pieces, sources, cursor = [], [], 0
    for start, end in visual_spans(visual):
        pieces.append(fused[cursor:start])
        sources.append(torch.arange(cursor, start, device=hidden.device))
        pieces.append(head.compress(hidden[start:end]).to(fused.dtype))
        sources.append(torch.full((q,), -1, dtype=torch.long, device=hidden.device))
        cursor = end
    pieces.append(fused[cursor:])
    sources.append(torch.arange(cursor, hidden.shape[0], device=hidden.device))
    return torch.cat(pieces, dim=0), torch.cat(sources)


# -- training layout and loss ----------------------------------------------------------------------


def rearrange_block_diag(out: Tensor, pad: float = 0.0) -> Tensor:
    """(B, L, k, H) -> (B, L*k, H): block ``i`` holds, at ``i*L + p``, the offset-``i`` prediction
    made at position ``p - i`` (whose target is the feature at shifted position ``p``); entries with
    ``p < i`` are ``pad``. With k = 1 this is the identity (up to the reshape)."""
    bsz, length, k, hidden = out.shape
    blocks = []
    for i in range(k):
        block = out.new_full((bsz, length, hidden), pad)
        if i < length:
            block[:, i:] = out[:, : length - i, i]
        blocks.append(block)
    return torch.cat(blocks, dim=1)


def tile_targets(target: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Targets (B, L, H) and mask (B, L) tiled for the k blocks; block ``i`` masks ``p < i``."""
    length = target.shape[1]
    masks = []
    for i in range(k):
        m = mask.clone()
        m[:, : min(i, length)] = 0
        masks.append(m)
    return target.repeat(1, k, 1), torch.cat(masks, dim=1)


def draft_loss(
    pred: Tensor, target: Tensor, mask: Tensor, lm_head: nn.Module, ce_weight: float = 0.1
) -> tuple[Tensor, dict[str, float]]:
    """``SmoothL1(f̂, f) + ce_weight * CE_soft``, both averaged over masked positions.

    ``CE_soft = -sum softmax(lm_head(f)) log_softmax(lm_head(f̂))``; with ``f̂ = f`` the regression
    term is 0 and the CE term is the target's entropy.
    """
    m = mask.to(pred.dtype)
    n = m.sum().clamp(min=1.0)
    reg = (F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1) * m).sum() / n
    with torch.no_grad():
        p_target = torch.softmax(lm_head(target).float(), dim=-1)
    log_q = torch.log_softmax(lm_head(pred).float(), dim=-1)
    ce = (-(p_target * log_q).sum(-1) * m).sum() / n
    with torch.no_grad():
        acc = ((lm_head(pred).argmax(-1) == p_target.argmax(-1)).float() * m).sum() / n
    return reg + ce_weight * ce, {"reg": float(reg.detach()), "ce": float(ce.detach()), "acc": float(acc)}


# -- files -----------------------------------------------------------------------------------------


def draft_path(path: str | Path) -> Path:
    return local_file(path, DRAFT_FILE, DraftError, "FLASH draft", 'train one with `vlmprune train-draft`, or pass draft=None for an untrained head')


def save_draft(head: DraftHead, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """safetensors weights with the draft's sizes and target fingerprint in the metadata."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / DRAFT_FILE
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, str(p), metadata={"flash_spec": json.dumps(asdict(head.spec))})
    if extra is not None:
        p.with_suffix(".json").write_text(json.dumps(extra, indent=1))
    return p


def load_draft(path: str | Path, expect: DraftSpec | None = None) -> DraftHead:
    """Read a draft and check it against the target (``expect``): width, vocabulary, depth."""
    from safetensors import SafetensorError, safe_open

    p = draft_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DraftError(f"cannot read FLASH draft {p}: the file is corrupt or not safetensors ({exc})") from exc
    try:
        spec = DraftSpec(**json.loads(meta["flash_spec"]))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise DraftError(f"{p} is not a FLASH draft (no valid 'flash_spec' metadata: {exc})") from exc
    if expect is not None:
        for name, what in (("hidden_size", "hidden width"), ("vocab_size", "vocabulary size"),
                           ("target_layers", "number of decoder layers")):
            got, want = getattr(spec, name), getattr(expect, name)
            if got != want:
                raise DraftError(
                    f"FLASH draft {p} was trained for another model: its target has {what} {got}, "
                    f"this model has {want}. Train a draft for this model with `vlmprune train-draft`."
                )
    head = DraftHead(spec)
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise DraftError(f"FLASH draft {p} does not fit its declared sizes: {exc}") from exc
    return head.eval()


def param_count(head: DraftHead) -> int:
    return sum(p.numel() for p in head.parameters())
