"""Slow-Fast hybrid decoder layers as instance-level hooks (the paper's hybrid architecture).

A hybrid layer is a stock decoder layer plus a gated cross-attention from the text queries to the
slow video tokens. Nothing is patched on a class and no module of the model is replaced: the new
parameters live in a separate :class:`HybridAdapter` (so the model's own state dict never changes
and ``handle.remove()`` restores it exactly), and three hooks per chosen layer splice the
cross-attention in where the reference computes it:

* a pre-hook on ``self_attn`` reads the rotary ``(cos, sin)`` the layer received;
* a forward hook on ``self_attn.q_proj`` keeps the query projection (RoPE is applied to it with the
  model's own ``apply_rotary_pos_emb``, so the queries are exactly the self-attention's);
* a pre-hook on ``self_attn.o_proj`` receives the self-attention output ``a`` before ``o_proj`` and
  returns ``a + g * c``, where ``c`` attends from those queries to ``kv_proj(RMSNorm_in(slow))``
  (no RoPE on the keys) and ``g = tanh(W_g a + b) * tanh(w_warm)`` (``text-only-vanilla``) or
  ``* w_warm`` (``vanilla``). ``o_proj``, the residual and the MLP are the layer's own.

Because ``w_warm`` starts at 0, ``g`` is exactly 0 and the layer equals the stock one bit for bit.
The slow tokens reach the hooks through a per-call :class:`HybridState` (never through the KV cache).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmprune.files import local_file
from vlmprune.seams.extra_layers import install_extra_layers

ADAPTER_FILE = "slowfast_hybrid.safetensors"
IMPLS = ("vanilla", "text-only-vanilla", "text-only-vanilla-masksystem")


class AdapterFileError(ValueError):
    """A hybrid adapter file is missing, corrupt, or was trained for a different model."""


@dataclass
class HybridState:
    """What the hybrid layers need for one forward: the slow tokens and which positions query.

    ``slow``: (B, S, H) slow tokens, right-padded; ``slow_mask``: (B, S) their valid entries;
    ``query``: (B, N) positions of the decoder input that query the slow tokens (False for samples
    without slow tokens, padding and, in the text-only variants, the visual tokens).
    """

    slow: Tensor
    slow_mask: Tensor
    query: Tensor
    scratch: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def has_slow(self) -> Tensor:
        return self.slow_mask.any(dim=1)


class CrossAttention(nn.Module):
    """One hybrid layer's new parameters, named as in the reference (``cross_attn_*``)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.cross_attn_kv_proj = nn.Linear(hidden, 2 * kv_heads * head_dim, bias=True)
        self.cross_attn_gate_proj = nn.Linear(heads * head_dim, 1)
        self.cross_attn_warm_up_gate = nn.Parameter(torch.zeros(()))

    def gate(self, a: Tensor, impl: str) -> Tensor:
        """(B, N, 1) gate from the self-attention output ``a``."""
        w = self.cross_attn_gate_proj.weight
        g = torch.tanh(self.cross_attn_gate_proj(a.to(w.dtype)))
        warm = self.cross_attn_warm_up_gate
        return g * (torch.tanh(warm) if impl.startswith("text-only") else warm)

    def attend(self, q: Tensor, slow_normed: Tensor, slow_mask: Tensor, scale: float) -> Tensor:
        """Non-causal attention of ``q`` (B, heads, N, d), after RoPE, to the slow tokens; (B, N, heads*d)."""
        w = self.cross_attn_kv_proj.weight
        bsz, s, _ = slow_normed.shape
        kv = self.cross_attn_kv_proj(slow_normed.to(w.dtype))
        k, v = kv.split(self.kv_heads * self.head_dim, dim=-1)
        k = k.view(bsz, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, s, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # a sample without slow tokens attends to its padding (finite, then zeroed by the caller)
        mask = (slow_mask | ~slow_mask.any(dim=1, keepdim=True))[:, None, None, :]
        c = F.scaled_dot_product_attention(q.to(w.dtype), k, v, attn_mask=mask, scale=scale)
        return c.transpose(1, 2).reshape(bsz, q.shape[2], -1)


class HybridAdapter(nn.Module):
    """The new parameters of every hybrid layer, plus what is needed to check a file against a model."""

    def __init__(self, layers: list[int], hidden: int, heads: int, kv_heads: int, head_dim: int,
                 impl: str = "text-only-vanilla") -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"cross_attn_impl must be one of {IMPLS}, got {impl!r}")
        self.layer_indices = sorted(int(i) for i in layers)
        self.hidden, self.heads, self.kv_heads, self.head_dim, self.impl = hidden, heads, kv_heads, head_dim, impl
        self.layers = nn.ModuleDict({str(i): CrossAttention(hidden, heads, kv_heads, head_dim) for i in self.layer_indices})

    @classmethod
    def for_decoder(cls, decoder_layers: nn.ModuleList, text_config: Any, layers: list[int],
                    impl: str = "text-only-vanilla") -> HybridAdapter:
        attn = decoder_layers[0].self_attn
        head_dim = int(attn.head_dim)
        heads = attn.q_proj.out_features // head_dim
        kv_heads = attn.k_proj.out_features // head_dim
        bad = [i for i in layers if not 0 <= i < len(decoder_layers)]
        if bad:
            raise ValueError(f"hybrid layers {bad} are out of range: the model has {len(decoder_layers)} decoder layers")
        return cls(list(layers), int(text_config.hidden_size), heads, kv_heads, head_dim, impl)

    @torch.no_grad()
    def init_kv_from_lm(self, decoder_layers: nn.ModuleList) -> None:
        """``kv_proj = [k_proj; v_proj]`` of the same layer (``initialize_cross_attn_kv_from_lm``)."""
        for i in self.layer_indices:
            attn = decoder_layers[i].self_attn
            kv = self.layers[str(i)].cross_attn_kv_proj
            kv.weight.copy_(torch.cat([attn.k_proj.weight, attn.v_proj.weight], dim=0))
            kb = attn.k_proj.bias if attn.k_proj.bias is not None else torch.zeros(attn.k_proj.out_features)
            vb = attn.v_proj.bias if attn.v_proj.bias is not None else torch.zeros(attn.v_proj.out_features)
            kv.bias.copy_(torch.cat([kb.to(kv.bias), vb.to(kv.bias)]))

    def metadata(self) -> dict[str, str]:
        return {"layers": json.dumps(self.layer_indices), "hidden": str(self.hidden), "heads": str(self.heads),
                "kv_heads": str(self.kv_heads), "head_dim": str(self.head_dim), "impl": self.impl}

    def check(self, other: HybridAdapter, where: str) -> None:
        for name in ("hidden", "heads", "kv_heads", "head_dim"):
            if getattr(self, name) != getattr(other, name):
                raise AdapterFileError(
                    f"{where} was trained for {name}={getattr(other, name)}; this model has {getattr(self, name)}"
                )


# -- files -----------------------------------------------------------------------------------------


def adapter_path(path: str | Path) -> Path:
    return local_file(path, ADAPTER_FILE, AdapterFileError, "slow-fast hybrid adapter", 'train one with `vlmprune train-slowfast`. Adapters are read from local files only.')


def save_adapter(hybrid: HybridAdapter, path: str | Path, lora: dict[str, Tensor] | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write only the new parameters (and LoRA deltas, when trained) as safetensors, peft-style:
    keys ``layers.<i>.cross_attn_*`` and ``lora.<module path>.lora_{A,B}``; the architecture in the
    metadata; ``extra`` (recipe, fast-pathway options) in a JSON sidecar."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / ADAPTER_FILE
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in hybrid.state_dict().items()}
    for k, v in (lora or {}).items():
        tensors["lora." + k] = v.detach().contiguous().cpu()
    meta = hybrid.metadata()
    if extra is not None:
        meta["extra"] = json.dumps(extra)
        p.with_suffix(".json").write_text(json.dumps(extra, indent=1))
    save_file(tensors, str(p), metadata=meta)
    return p


def load_adapter(path: str | Path) -> tuple[HybridAdapter, dict[str, Tensor], dict[str, Any]]:
    """(hybrid parameters, LoRA deltas by module path, the saved extra info)."""
    from safetensors import SafetensorError, safe_open

    p = adapter_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
        layers = json.loads(meta["layers"])
        dims = [int(meta[k]) for k in ("hidden", "heads", "kv_heads", "head_dim")]
        impl = meta.get("impl", "text-only-vanilla")
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"cannot read slow-fast adapter {p}: corrupt, not safetensors, or no metadata ({exc})") from exc
    hybrid = HybridAdapter(layers, *dims, impl=impl)
    state = {k: v for k, v in raw.items() if not k.startswith("lora.")}
    lora = {k[len("lora."):]: v for k, v in raw.items() if k.startswith("lora.")}
    try:
        hybrid.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AdapterFileError(f"adapter {p} does not fit its declared layout: {exc}") from exc
    extra = json.loads(meta["extra"]) if "extra" in meta else {}
    return hybrid, lora, extra


# -- hooks -----------------------------------------------------------------------------------------


def install_hybrid_layers(
    hooks: Any, decoder_layers: nn.ModuleList, hybrid: HybridAdapter, get_state: Callable[[], HybridState | None],
) -> None:
    """Splice the gated cross-attention into the chosen layers of this model instance (through the
    extra-layers seam); a no-op for a call where ``get_state`` returns None (a text-only call,
    another handle's call, or a decode step with the flag off)."""

    def mix(i: int, layer: nn.Module, a: Tensor, q: Tensor, state: HybridState) -> Tensor:
        params: CrossAttention = hybrid.layers[str(i)]
        attn = layer.self_attn
        scale = float(getattr(attn, "scaling", attn.head_dim**-0.5))
        slow = layer.input_layernorm(state.slow)  # the same input RMSNorm as the text (the paper's hybrid layer)
        c = params.attend(q, slow, state.slow_mask, scale)
        g = params.gate(a, hybrid.impl)
        query = state.query[:, -a.shape[1]:].unsqueeze(-1)
        return a + torch.where(query, (g * c).to(a.dtype), torch.zeros((), dtype=a.dtype, device=a.device))

    install_extra_layers(hooks, decoder_layers, hybrid.layer_indices, mix, get_state)


# -- LoRA deltas (optional, trained with ``vlmprune train-slowfast --lora``) -----------------------


class LoRA(nn.Module):
    """Low-rank deltas ``y += scale * B(A(x))`` on named ``nn.Linear`` modules, applied by forward
    hooks on one instance (so ``handle.remove()`` drops them); keys follow peft's
    ``<module path>.lora_A.weight`` / ``lora_B.weight``. ``lora_B`` starts at zero (peft's init)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.paths = sorted(shapes)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for path in self.paths:
            fan_in, fan_out = shapes[path]
            key = path.replace(".", "__")
            self.A[key] = nn.Parameter(torch.empty(rank, fan_in))
            nn.init.kaiming_uniform_(self.A[key], a=5**0.5)
            self.B[key] = nn.Parameter(torch.zeros(fan_out, rank))

    @classmethod
    def for_model(cls, root: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, prefix: str = "") -> LoRA:
        shapes = {
            (prefix + name): (m.in_features, m.out_features)
            for name, m in root.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] in targets
        }
        if not shapes:
            raise ValueError(f"no nn.Linear named {targets} to put LoRA on")
        return cls(shapes, rank, alpha)

    def deltas(self) -> dict[str, Tensor]:
        out = {}
        for path in self.paths:
            key = path.replace(".", "__")
            out[f"{path}.lora_A.weight"] = self.A[key]
            out[f"{path}.lora_B.weight"] = self.B[key]
        return out

    @classmethod
    def from_deltas(cls, deltas: dict[str, Tensor], alpha: float) -> LoRA:
        paths = sorted({k.rsplit(".lora_", 1)[0] for k in deltas})
        shapes = {p: (deltas[f"{p}.lora_A.weight"].shape[1], deltas[f"{p}.lora_B.weight"].shape[0]) for p in paths}
        rank = deltas[f"{paths[0]}.lora_A.weight"].shape[0]
        lora = cls(shapes, rank, alpha)
        with torch.no_grad():
            for p in paths:
                key = p.replace(".", "__")
                lora.A[key].copy_(deltas[f"{p}.lora_A.weight"])
                lora.B[key].copy_(deltas[f"{p}.lora_B.weight"])
        return lora

    def install(self, hooks: Any, root: nn.Module, prefix: str = "") -> None:
        modules = dict(root.named_modules())
        for path in self.paths:
            name = path[len(prefix):] if path.startswith(prefix) else path
            if name not in modules:
                raise AdapterFileError(f"LoRA target {path!r} does not exist in this model")
            key = path.replace(".", "__")

            def hook(module: nn.Module, args: tuple, output: Tensor, key: str = key) -> Tensor:
                a, b = self.A[key], self.B[key]
                x = args[0].to(a.dtype)
                return output + (F.linear(F.linear(x, a), b) * self.scale).to(output.dtype)

            hooks.forward(modules[name], hook)
