"""Speculative decoding loop (FLASH's draft-and-verify rounds), model-agnostic.

One round: the drafter proposes ``depth`` tokens after the last emitted token ``b``; the target
runs once over ``[b, d_1..d_D]`` on its KV cache; verification keeps the longest agreeing prefix
plus one token of the target's own (the bonus), so every round emits at least one token and, for
greedy decoding, exactly the tokens plain greedy decoding would. The target cache is then cropped
to the accepted path, and the drafter is told the accepted tokens with their *real* target
features (its speculative cache entries are dropped).

The verification rules are pure functions (``verify_greedy``, ``verify_chain_sampling``,
``verify_siblings``) so their losslessness is tested on tiny vocabularies without a model.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .. import context
from ..stats import DecodeRecord

#: where the decoder's last hidden states go while a speculative call runs (None otherwise)
_CAPTURE: ContextVar[list | None] = ContextVar("vlmprune_flash_capture", default=None)


# -- sampling and verification (pure) --------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """The processed distribution both target (p) and draft (q) are sampled from."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def probs(self, logits: Tensor) -> Tensor:
        """softmax(logits / T) restricted to the top-k / nucleus, renormalised (fp32)."""
        x = logits.float() / max(self.temperature, 1e-6)
        if self.top_k is not None and 0 < self.top_k < x.shape[-1]:
            kth = torch.topk(x, self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
            drop = cum - torch.softmax(sorted_x, dim=-1) > self.top_p  # keep the token crossing top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
        return torch.softmax(x, dim=-1)


def _sample(p: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=generator).item())


def verify_greedy(target_logits: Tensor, draft_tokens: Tensor) -> tuple[int, int]:
    """(accepted drafts, bonus token): ``target_logits`` (D+1, V) at ``[b, d_1..d_D]``."""
    best = target_logits.argmax(-1)
    d = draft_tokens.shape[0]
    agree = (best[:d] == draft_tokens.to(best.device)).long()
    accepted = int(agree.cumprod(0).sum()) if d else 0
    return accepted, int(best[accepted])


def verify_siblings(
    p: Tensor, q: Tensor, candidates: list[int], generator: torch.Generator | None
) -> tuple[int, int]:
    """Multi-candidate speculative sampling at one depth.

    ``candidates`` were drawn one after the other from ``q`` *without replacement* (each from q
    with the earlier ones zeroed and renormalised). Walk them: accept ``x`` with probability
    ``min(1, p(x)/q(x))``; on rejection ``p <- norm(max(p - q, 0))`` and ``q`` loses ``x``. If all
    are rejected, sample the residual ``p``. Returns (index of the accepted candidate or -1, token);
    the token is distributed exactly as the original ``p``.
    """
    p = p.float().clone()
    q = q.float().clone()
    for i, x in enumerate(candidates):
        px, qx = float(p[x]), float(q[x])
        u = float(torch.rand((), generator=generator))
        if qx > 0 and u < min(1.0, px / qx):
            return i, x
        residual = torch.clamp(p - q, min=0)
        total = float(residual.sum())
        p = residual / total if total > 0 else p
        q[x] = 0.0
        qs = float(q.sum())
        if qs <= 0:
            break
        q = q / qs
    return -1, _sample(p, generator)


def verify_chain_sampling(
    target_probs: Tensor, draft_probs: Tensor, draft_tokens: Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """Chain speculative sampling: (accepted drafts, next token). ``target_probs`` (D+1, V),
    ``draft_probs`` (D, V) the q each draft token was sampled from."""
    d = draft_tokens.shape[0]
    for i in range(d):
        idx, tok = verify_siblings(target_probs[i], draft_probs[i], [int(draft_tokens[i])], generator)
        if idx < 0:
            return i, tok
    return d, _sample(target_probs[d], generator)


def static_tree(branches: int, depth: int) -> tuple[Tensor, Tensor, Tensor]:
    """The toolkit's static tree: a root (the last emitted token), ``branches`` children (top-w at
    offset 1), each continued by a chain to ``depth``. Returns (table (w, D) node index of branch
    j at depth d, depths (N,) with the root at 0, ancestor mask (N, N) incl. the diagonal)."""
    n = 1 + branches * depth
    table = 1 + torch.arange(branches * depth).view(branches, depth)
    depths = torch.zeros(n, dtype=torch.long)
    depths[1:] = torch.arange(1, depth + 1).repeat(branches)
    anc = torch.eye(n, dtype=torch.bool)
    anc[:, 0] = True
    for j in range(branches):
        for d in range(depth):
            anc[table[j, d], table[j, : d + 1]] = True
    return table, depths, anc


def verify_tree_greedy(target_logits: Tensor, tokens: Tensor, table: Tensor) -> tuple[int, int, int]:
    """(branch, accepted drafts, bonus): the branch with the longest prefix agreeing with the
    target's argmax at each parent (ties: the first branch)."""
    best = target_logits.argmax(-1).tolist()
    toks = tokens.tolist()
    choice, length, last = 0, 0, 0
    for j, row in enumerate(toks):
        parent, a = 0, 0
        for d, tok in enumerate(row):
            if tok != best[parent]:
                break
            parent, a = int(table[j, d]), a + 1
        if a > length:
            choice, length, last = j, a, parent
    return choice, length, best[last]


def verify_tree_sampling(
    target_probs: Tensor, tokens: Tensor, draft_probs: Tensor, table: Tensor, generator: torch.Generator | None
) -> tuple[int, int, int]:
    """Tree speculative sampling: the depth-1 siblings (drawn without replacement from one q) go
    through :func:`verify_siblings`; the accepted branch then continues as a chain."""
    idx, tok = verify_siblings(target_probs[0], draft_probs[0, 0], [int(t) for t in tokens[:, 0]], generator)
    if idx < 0:
        return 0, 0, tok
    parent, a = int(table[idx, 0]), 1
    for d in range(1, tokens.shape[1]):
        i2, t2 = verify_siblings(target_probs[parent], draft_probs[idx, d], [int(tokens[idx, d])], generator)
        if i2 < 0:
            return idx, a, t2
        parent, a = int(table[idx, d]), a + 1
    return idx, a, _sample(target_probs[parent], generator)


# -- drafters --------------------------------------------------------------------------------------


@dataclass
class PromptView:
    """What the drafter sees of the prompt: the decoder's sequence (after any pre-LLM pruning)."""

    ids: Tensor  # (n,) token ids of the decoder's columns (visual columns hold placeholder ids)
    hidden: Tensor  # (n, H) the target's last hidden state (after the final norm)
    visual: Tensor | None  # (n,) bool visual columns, or None


class Drafter(Protocol):
    """What the loop needs from a draft (FLASH's head, or a test oracle)."""

    def reset(self, prompt: PromptView, first_token: int) -> None: ...

    def extend(self, next_tokens: Tensor, features: Tensor) -> None: ...

    def propose(
        self, depth: int, sampling: Sampling | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]: ...


# -- target side -----------------------------------------------------------------------------------


def feature_hook(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook on the decoder: record its last hidden state while a speculative call runs."""
    sink = _CAPTURE.get()
    if sink is None:
        return
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0]
    sink.append(hidden.detach())


def rewind_decode_states(modules: list[nn.Module], cache: Any, dropped: int) -> None:
    """Drop ``dropped`` rejected columns from the decode bookkeeping that seams keep per cache.

    The pre-LLM seam continues positions and the mask after a pruned prefill from a state keyed by
    the cache object; cropping the cache must rewind it too, or later rounds would be shifted.
    """
    if dropped <= 0:
        return
    from .pre_llm import DecodeState

    for module in modules:
        for hook in list(module._forward_pre_hooks.values()):
            owner = getattr(hook, "__self__", None)
            states = getattr(owner, "_states", None)
            if not isinstance(states, weakref.WeakKeyDictionary) or cache not in states:
                continue
            state = states[cache]
            if not isinstance(state, DecodeState):
                raise ValueError(
                    f"flash: cannot roll back the decode state of {type(owner).__name__} after rejected "
                    "drafts; speculative decoding does not compose with that method"
                )
            state.mask = state.mask[:, : state.mask.shape[1] - dropped]
            state.next_position = state.next_position - dropped


def _pruned_columns(model: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """Column map and visual mask of the last pruned prefill, from the open contexts of the
    handles on ``model`` (only while that forward runs)."""
    for handle in reversed(model.__dict__.get("_vlmprune_handles", [])):
        ctx = context.current(handle)
        if ctx is not None and ctx.columns is not None:
            return ctx.columns, ctx.visual
    return None, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def speculative_generate(
    model: nn.Module,
    adapter: Any,
    drafter: Drafter,
    inputs: dict[str, Any],
    *,
    max_new_tokens: int,
    depth: int,
    eos_ids: list[int] | None = None,
    sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    label: str = "flash",
    k: int = 1,
    tree: str | None = None,
    branches: int = 1,
) -> tuple[Tensor, DecodeRecord]:
    """Generate up to ``max_new_tokens`` for one prompt; returns (ids incl. prompt, record).

    ``inputs`` are the model's call kwargs (input_ids (1, L), pixel values, ...). ``on_round`` is
    called after each round with the cache and the accepted sequence (tests check the cache).
    """
    input_ids: Tensor = inputs["input_ids"]
    device = input_ids.device
    eos = set(eos_ids or [])
    sink: list[Tensor] = []
    token = _CAPTURE.set(sink)
    pruned_columns: list[Any] = [None, None]
    record = DecodeRecord(method=label, prompt_tokens=int(input_ids.shape[1]), depth=depth, k=k)
    dtype = next(adapter.decoder.parameters()).dtype
    began = time.perf_counter()
    try:
        # -- prefill ---------------------------------------------------------------------------
        kwargs = dict(inputs)
        kwargs["use_cache"] = True
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs.setdefault("logits_to_keep", 1)  # only the last prefill position is scored

        def probe(module: nn.Module, args: tuple, output: Any) -> None:
            # the call context is closed once the model returns: read the column map now
            pruned_columns[:] = _pruned_columns(model)

        probe_handle = adapter.decoder.register_forward_hook(probe)
        try:
            out = model(**kwargs)
        finally:
            probe_handle.remove()
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        hidden = sink[-1][0]
        sink.clear()
        logits = out.logits[0, -1]
        ids = input_ids[0]
        visual_ids = torch.tensor(adapter.placeholder_ids(), device=device)
        if hidden.shape[0] == ids.shape[0]:
            dec_ids, visual = ids, torch.isin(ids, visual_ids)
        else:
            columns, vis = pruned_columns
            if columns is None:
                raise RuntimeError(
                    "flash: the decoder saw a different number of columns than the prompt has, and no "
                    "pruning seam reported its column map; cannot align the draft's context"
                )
            from ..sequence import gather_columns

            dec_ids = gather_columns(input_ids, columns, 0)[0]
            visual = vis[0] if vis is not None else torch.isin(dec_ids, visual_ids)
        first = int(logits.argmax()) if sampling is None else _sample(sampling.probs(logits), generator)
        _sync(device)
        record.prefill_s = time.perf_counter() - began
        emitted = [first]
        record.target_forwards = 1
        done = first in eos or max_new_tokens <= 1
        if not done:
            drafter.reset(PromptView(dec_ids, hidden, visual), first)
        # -- rounds ----------------------------------------------------------------------------
        while not done:
            remaining = max_new_tokens - len(emitted)
            d = min(depth, remaining - 1)
            t0 = time.perf_counter()
            past = int(cache.get_seq_length())
            if d > 0 and tree == "static":
                toks, q = drafter.propose_tree(d, branches, sampling, generator)
                toks = toks.to(device)
                drafted = toks.flatten()
            elif d > 0:
                drafted, q = drafter.propose(d, sampling, generator)
                drafted = drafted.to(device)
            else:
                drafted, q = torch.empty(0, dtype=torch.long, device=device), None
            _sync(device)
            t1 = time.perf_counter()
            cand = torch.cat([input_ids.new_tensor([emitted[-1]]), drafted]).unsqueeze(0)
            if d > 0 and tree == "static":
                table, depths, anc = static_tree(toks.shape[0], d)
                out = model(input_ids=cand, cache=cache, use_cache=True,
                            **_tree_inputs(adapter, anc, depths, past, cand.device, dtype))
                feats_all = sink[-1][0]
                sink.clear()
                tl = out.logits[0]
                if sampling is None:
                    branch, accepted, bonus = verify_tree_greedy(tl, toks, table)
                else:
                    branch, accepted, bonus = verify_tree_sampling(sampling.probs(tl), toks, q, table, generator)
                path = [0] + table[branch, :accepted].tolist()
                _keep_columns(cache, past, torch.tensor(path, device=device))
                feats = feats_all[path]
                new = [int(t) for t in toks[branch, :accepted]] + [bonus]
            else:
                out = model(input_ids=cand, cache=cache, use_cache=True)
                feats = sink[-1][0]
                sink.clear()
                tl = out.logits[0]
                if sampling is None:
                    accepted, bonus = verify_greedy(tl, drafted)
                else:
                    accepted, bonus = verify_chain_sampling(sampling.probs(tl), q, drafted, generator)
                new = [int(t) for t in drafted[:accepted]] + [bonus]
                if d > accepted:  # transformers 5: a negative count removes that many trailing columns
                    cache.crop(-(d - accepted))
                    rewind_decode_states([adapter.decoder], cache, d - accepted)
            if int(cache.get_seq_length()) != past + accepted + 1:
                raise RuntimeError("flash: the target cache does not hold exactly the accepted sequence")
            _sync(device)
            t2 = time.perf_counter()
            record.draft_s += t1 - t0
            record.verify_s += t2 - t1
            record.rounds += 1
            record.drafted += int(drafted.numel())
            record.accepted += accepted
            record.accept_lengths.append(accepted)
            record.target_forwards += 1
            stop = next((i for i, t in enumerate(new) if t in eos), None)
            if stop is not None:
                new = new[: stop + 1]
                done = True
            emitted += new
            if len(emitted) >= max_new_tokens:
                done = True
            if not done:
                t3 = time.perf_counter()
                drafter.extend(torch.tensor(new, device=device), feats[: accepted + 1])
                record.draft_s += time.perf_counter() - t3
            if on_round is not None:
                on_round({"cache": cache, "accepted": accepted, "drafted": drafted,
                          "sequence": torch.cat([ids, torch.tensor(emitted[:-1], dtype=ids.dtype, device=device)]),
                          "drafter": drafter, "done": done})
    finally:
        _CAPTURE.reset(token)
    record.new_tokens = len(emitted)
    record.draft_forwards = int(getattr(drafter, "forwards", 0))
    _sync(device)
    record.total_s = time.perf_counter() - began
    out_ids = torch.cat([input_ids, torch.tensor([emitted], dtype=input_ids.dtype, device=device)], dim=1)
    return out_ids, record


def _tree_inputs(adapter: Any, anc: Tensor, depths: Tensor, past: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, Tensor]:
    """A custom 4-D additive mask (every node sees the cache and its ancestors) and positions
    ``past + depth``, in the form the model takes for tokens after its prefill (the adapter's
    ``continuation_positions``: e.g. shifted multi-axis RoPE positions)."""
    n = anc.shape[0]
    allowed = torch.cat([torch.ones(n, past, dtype=torch.bool), anc], dim=1).to(device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    pos = adapter.continuation_positions((past + depths).to(device).unsqueeze(0))
    return {"attention_mask": mask[None, None], "position_ids": pos}


def _keep_columns(cache: Any, past: int, path: Tensor) -> None:
    """Keep the cache's prefix and the accepted tree path (compacted right after it)."""
    keep = torch.cat([torch.arange(past, device=path.device), past + path])
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None:
            continue
        layer.keys = layer.keys.index_select(-2, keep.to(layer.keys.device))
        layer.values = layer.values.index_select(-2, keep.to(layer.values.device))


class DecodeSeam:
    """The decode seam: ``generate`` on this instance becomes the method's own loop.

    Contract: the method implements ``generate(handle, input_ids=None, **kwargs)`` (built on
    :func:`speculative_generate` or its own loop); the seam records the decoder's last hidden states
    for drafters (:func:`feature_hook`) and swaps ``generate`` on the instance only, so
    ``handle.remove()`` gives the stock ``generate`` back."""

    def __init__(self, adapter: Any, method: Any, handle: Any) -> None:
        self.adapter = adapter
        self.method = method
        self.handle = handle

    def install(self, hooks: Any) -> None:
        hooks.forward(self.adapter.decoder, feature_hook)
        method, handle = self.method, self.handle

        def generate(*args: Any, **kwargs: Any) -> Tensor:
            return method.generate(handle, *args, **kwargs)

        generate.__doc__ = f"{method.label}: generate on this instance through the decode seam (vlmprune)."
        hooks.set_attr(self.adapter.model, "generate", generate)
