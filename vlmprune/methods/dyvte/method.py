"""DyVTE: dynamic visual-token exit (Wu et al., arXiv 2411.19628); ``docs/methods/dyvte.md``.

After a few decoder layers the text has read what it needs from the image, so every visual
token can leave the sequence at once. A fixed exit drops them before layer ``exit_layer``; the
learned variant runs one small router per layer on the text tokens' state (mean of the text after
the image, and the last prompt token) and exits each sample at the first layer whose router says
so. This module holds the config, the routers and their decision and label rules as plain tensor
functions, and the policies the in-LLM seam (:mod:`vlmprune.seams.in_llm`) calls; it knows no model
class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmprune.files import local_file
from vlmprune.method import Method
from vlmprune.registry import register_method
from vlmprune.seams.in_llm import InLLMSeam

from .config import DyVTEConfig

GATES_FILE = "gates.safetensors"
#: the reference implementation's state-dict prefix (``model.visual_gates_router.{i}.w{1,2}.weight``)
REFERENCE_PREFIX = "model.visual_gates_router."
PREFIX = "visual_gates_router."


class GatesError(ValueError):
    """A gates file is missing, corrupt, or was trained for a different model."""


# -- routers ---------------------------------------------------------------------------------------


class Router(nn.Module):
    """The per-layer hyper-network of the reference: Linear(2H, W) -> exact GELU -> Linear(W, 2),
    no biases; logit 0 = keep, logit 1 = exit."""

    def __init__(self, dim: int, width: int = 2048) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, width, bias=False)
        self.act = nn.GELU()
        self.w2 = nn.Linear(width, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.act(self.w1(x)))


class ExitGates(nn.Module):
    """One router per decoder layer (the reference's ``visual_gates_router``)."""

    def __init__(self, num_layers: int, hidden_size: int, width: int = 2048) -> None:
        super().__init__()
        self.num_layers, self.hidden_size, self.width = num_layers, hidden_size, width
        self.visual_gates_router = nn.ModuleList(Router(2 * hidden_size, width) for _ in range(num_layers))

    def reset_parameters(self) -> None:
        """Xavier-uniform weights, as the reference initialises fresh gates."""
        for router in self.visual_gates_router:
            nn.init.xavier_uniform_(router.w1.weight)
            nn.init.xavier_uniform_(router.w2.weight)

    def logits(self, layer: int, features: Tensor) -> Tensor:
        router = self.visual_gates_router[layer]
        return router(features.to(router.w1.weight.dtype))

    def metadata(self) -> dict[str, str]:
        return {"num_layers": str(self.num_layers), "hidden_size": str(self.hidden_size), "width": str(self.width)}


def gate_features(hidden: Tensor, visual: Tensor, valid: Tensor) -> Tensor:
    """(B, 2H) router input in fp32: [mean of the text after the last visual token excluding the
    last prompt token, the last prompt token], read from a layer's output (the residual stream).

    Padding and visual columns never count; a sample with no text between the image and its last
    token uses the last token for both halves (a guard for an empty mean).
    """
    bsz, n, _ = hidden.shape
    h = hidden.float()
    cols = torch.arange(n, device=hidden.device).unsqueeze(0).expand(bsz, n)
    last = torch.where(valid, cols, torch.full_like(cols, -1)).amax(dim=1)  # last real column
    last_visual = torch.where(visual, cols, torch.full_like(cols, -1)).amax(dim=1)
    text = valid & ~visual & (cols > last_visual.unsqueeze(1)) & (cols < last.unsqueeze(1))
    text_last = h[torch.arange(bsz, device=h.device), last.clamp(min=0)]
    count = text.sum(dim=1, keepdim=True)
    mean = (h * text.unsqueeze(-1)).sum(dim=1) / count.clamp(min=1)
    mean = torch.where(count > 0, mean, text_last)
    return torch.cat([mean, text_last], dim=-1)


def exit_decision(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """(B,) bool: exit where the softmax exit probability is above ``threshold``. At 0.5 this is
    the reference's rule ``logits[0] < logits[1]`` exactly (compared on the logits, so a tie keeps)."""
    logits = logits.float()
    if threshold == 0.5:
        return logits[..., 0] < logits[..., 1]
    return torch.softmax(logits, dim=-1)[..., 1] > threshold


def exit_labels(
    logits_full: Tensor, logits_exit: Tensor, labels: Tensor, agree: float = 0.99, loss_margin: float = 1.03
) -> Tensor:
    """(B,) long training targets (1 = exit is safe), the reference's rule per sample: the exited
    model's greedy tokens agree with the full model's on more than ``agree`` of the answer
    positions AND its answer loss is below ``loss_margin`` times the full model's.

    ``logits_*``: (B, T, V) over the same columns; ``labels``: (B, T), -100 outside answers, aligned
    with the logits (labels already shifted so position t scores logits t).
    """
    answer = labels >= 0
    n = answer.sum(dim=1).clamp(min=1)
    same = (logits_full.argmax(-1) == logits_exit.argmax(-1)) & answer
    acc = same.sum(dim=1).float() / n

    def loss(logits: Tensor) -> Tensor:
        ce = nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
        return (ce * answer).sum(dim=1) / n

    return ((acc > agree) & (loss(logits_exit) < loss_margin * loss(logits_full))).long()


# -- files -----------------------------------------------------------------------------------------


def gates_path(path: str | Path) -> Path:
    return local_file(path, GATES_FILE, GatesError, "DyVTE gates", 'train them with `vlmprune train-gates`. Gates are read from local files only.')


def save_gates(gates: ExitGates, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``gates`` as safetensors (our key layout, sizes in the metadata) plus a JSON sidecar
    with ``extra`` (training recipe, model fingerprint)."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / GATES_FILE
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in gates.state_dict().items()}
    save_file(tensors, str(p), metadata=gates.metadata())
    if extra is not None:
        p.with_suffix(".json").write_text(json.dumps(extra, indent=1))
    return p


def load_gates(path: str | Path, num_layers: int | None = None, hidden_size: int | None = None) -> ExitGates:
    """Read gates (our layout or the reference's ``model.visual_gates_router.*`` keys) and check
    them against the model: one router per decoder layer, input width twice the hidden size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = gates_path(path)
    try:
        raw = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GatesError(f"cannot read DyVTE gates {p}: the file is corrupt or not safetensors ({exc})") from exc
    state = {}
    for key, value in raw.items():
        if key.startswith(REFERENCE_PREFIX):
            key = PREFIX + key[len(REFERENCE_PREFIX):]
        if key.startswith(PREFIX):
            state[key] = value
    layers = sorted({int(k.split(".")[1]) for k in state})
    if not layers or layers != list(range(len(layers))):
        raise GatesError(f"{p} holds no complete set of DyVTE routers (keys visual_gates_router.<i>.w1/w2.weight)")
    w1 = state.get(f"{PREFIX}0.w1.weight")
    if w1 is None or w1.dim() != 2 or w1.shape[1] % 2:
        raise GatesError(f"{p}: router 0 has no valid w1 weight")
    width, dim = w1.shape
    n_layers, hidden = len(layers), dim // 2
    if num_layers is not None and n_layers != num_layers:
        raise GatesError(f"gates in {p} were trained for a model with {n_layers} decoder layers; this one has {num_layers}")
    if hidden_size is not None and hidden != hidden_size:
        raise GatesError(f"gates in {p} expect hidden size {hidden} (input width {dim}); this model's is {hidden_size}")
    gates = ExitGates(n_layers, hidden, width)
    try:
        gates.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GatesError(f"gates in {p} do not fit the router layout: {exc}") from exc
    return gates.eval()


# -- policies for the in-LLM seam ------------------------------------------------------------------


class FixedExit:
    """Every sample with visual tokens exits before ``layer``."""

    label = "dyvte"

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def initial(self, state: Any) -> None:
        has_visual = state.visual.any(dim=1)
        state.exit_at[has_visual] = self.layer
        state.decided[:] = True

    def after_layer(self, layer: int, hidden: Tensor, state: Any) -> None:
        return None


class GatedExit:
    """Router ``i`` reads layer ``i``'s output; the first router that fires sets ``exit = i + 1``."""

    label = "dyvte-gates"

    def __init__(self, gates: ExitGates, threshold: float) -> None:
        self.gates = gates
        self.threshold = threshold
        self.calls = 0

    def initial(self, state: Any) -> None:
        self.calls = 0

    @torch.no_grad()
    def after_layer(self, layer: int, hidden: Tensor, state: Any) -> Tensor:
        todo = ~state.decided
        feats = gate_features(hidden[todo], state.visual[todo], state.valid[todo])
        self.calls += int(todo.sum())
        fire = torch.zeros_like(todo)
        fire[todo] = exit_decision(self.gates.logits(layer, feats.to(self.gates.visual_gates_router[0].w1.weight.device)).to(fire.device), self.threshold)
        return fire

    def overhead_flops(self, state: Any) -> float:
        g = self.gates
        return float(self.calls * 2 * (2 * g.hidden_size * g.width + 2 * g.width))


@register_method
class DyVTE(Method):
    """Visual tokens exit inside the LLM: the in-LLM seam asks :attr:`policy` which samples exit
    after each layer (a fixed layer or the trained routers)."""

    config_class = DyVTEConfig
    commands = {
        "train-gates": ("vlmprune.methods.dyvte.training:main", "train DyVTE exit gates on a frozen model (see vlmprune train-gates --help)"),
    }
    seams = (InLLMSeam,)

    def __init__(self, config: DyVTEConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        layers = len(adapter.decoder_layers)
        if config.exit_layer is not None:
            if config.exit_layer > layers:
                raise ValueError(f"exit_layer must be in 0..{layers} (this model has {layers} decoder layers), got {config.exit_layer}")
            self.policy: Any = FixedExit(config.exit_layer)
        else:
            gates = load_gates(config.gates, layers, adapter.text_config.hidden_size)
            param = next(adapter.decoder.parameters())
            self.policy = GatedExit(gates.to(param.device, torch.float32), config.threshold)

    @property
    def label(self) -> str:
        return self.policy.label
