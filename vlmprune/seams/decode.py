"""Speculative decoding loop (FLASH's draft-and-verify rounds), model-agnostic.

One round: the drafter proposes ``depth`` tokens after the last emitted token ``b``; the target
runs once over ``[b, d_1..d_D]`` on its KV cache; verification keeps the longest agreeing prefix
plus one token of the target's own (the bonus), so every round emits at least one token and, for
greedy decoding, exactly the tokens plain greedy decoding would. The target cache is then cropped
to the accepted path, and the drafter is told the accepted tokens with their *real* target
features (its speculative cache entries are dropped).

Chain drafting runs on a batch (:func:`speculative_decode`, transformers' ``generate`` prepares
the call and hands it the logits processors and stopping criteria): every row accepts its own
number of drafts per round. The rows share one cache length; a row's rejected columns stay in
the cache masked out (attention mask 0) until the columns no row needs are cropped or the rows are
compacted, and each row's positions continue from its own accepted length, so every row sees
exactly what plain ``generate`` gives it. Rows that finish leave the batch.

The verification rules are pure functions (``verify_greedy``, ``verify_chain_sampling``,
``verify_chain_sampling_batch``, ``verify_siblings``) so their losslessness is tested on tiny
vocabularies without a model.
"""

from __future__ import annotations

import copy
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
from .pre_llm import cache_length

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



def cache_kwarg(model: Any) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` since transformers 5.20,
    ``past_key_values`` before (vLLM 0.32 pins transformers 5.19)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

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


def verify_chain_sampling_batch(
    target_probs: Tensor, draft_probs: Tensor, draft_tokens: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Chain speculative sampling for a batch: (accepted drafts (B,), next token (B,)).

    ``target_probs`` (B, D+1, V), ``draft_probs`` (B, D, V) the q each draft token (B, D) was drawn
    from. Draft ``i`` of a row is accepted with probability ``min(1, p_i(x)/q_i(x))`` (one uniform
    per draft, so this is :func:`verify_chain_sampling` with its draws made at once); at the first
    rejection the token comes from ``norm(max(p - q, 0))``, after a fully accepted chain from
    ``p_D``. Every emitted token is distributed as the target's ``p``.
    """
    bsz, depth = draft_tokens.shape
    vocab = target_probs.shape[-1]
    p = target_probs.float()
    if depth == 0:
        return (torch.zeros(bsz, dtype=torch.long, device=p.device),
                torch.multinomial(p[:, 0], 1, generator=generator).squeeze(1))
    q = draft_probs.float().to(p.device)
    x = draft_tokens.to(p.device).unsqueeze(-1)
    px = p[:, :depth].gather(-1, x).squeeze(-1)
    qx = q.gather(-1, x).squeeze(-1)
    u = torch.rand(bsz, depth, generator=generator, device=p.device if generator is None else generator.device)
    ok = (qx > 0) & (u.to(p.device) * qx < px)  # u < min(1, p/q)
    accepted = ok.long().cumprod(1).sum(1)
    p_at = p.gather(1, accepted.view(bsz, 1, 1).expand(bsz, 1, vocab)).squeeze(1)
    q_at = q.gather(1, accepted.clamp(max=depth - 1).view(bsz, 1, 1).expand(bsz, 1, vocab)).squeeze(1)
    q_at = q_at * (accepted < depth).unsqueeze(1).to(q_at.dtype)  # a full chain samples p_D itself
    residual = (p_at - q_at).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    dist = torch.where(total > 0, residual / total.clamp(min=1e-30), p_at)
    return accepted, torch.multinomial(dist, 1, generator=generator).squeeze(1)


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


class BatchDrafter(Protocol):
    """The batched form of :class:`Drafter` (rows in the batch's current order; ``select_rows``
    drops the rows that finished). A drafter without it is run row by row (:class:`RowDrafters`)."""

    def reset_batch(self, prompts: list[PromptView], first_tokens: list[int]) -> None: ...

    def extend_batch(self, next_tokens: list[Tensor], features: list[Tensor]) -> None: ...

    def propose_batch(
        self, depth: int, sampling: Sampling | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]: ...

    def select_rows(self, rows: Tensor) -> None: ...


class RowDrafters:
    """A one-sequence :class:`Drafter` run once per row: row 0 is the drafter itself, the other rows
    shallow copies (each ``reset`` gives a copy its own state; modules stay shared)."""

    def __init__(self, drafter: Any) -> None:
        self.template = drafter
        self.rows: list[Any] = []

    @property
    def forwards(self) -> int:
        return sum(int(getattr(d, "forwards", 0)) for d in self.rows)

    @property
    def flops(self) -> float:
        return sum(float(getattr(d, "flops", 0.0)) for d in self.rows)

    def reset_batch(self, prompts: list[PromptView], first_tokens: list[int]) -> None:
        self.rows = [self.template if i == 0 else copy.copy(self.template) for i in range(len(prompts))]
        for drafter, prompt, first in zip(self.rows, prompts, first_tokens):
            drafter.reset(prompt, int(first))

    def extend_batch(self, next_tokens: list[Tensor], features: list[Tensor]) -> None:
        for drafter, tokens, feats in zip(self.rows, next_tokens, features):
            drafter.extend(tokens, feats)

    def propose_batch(
        self, depth: int, sampling: Sampling | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        out = [drafter.propose(depth, sampling, generator) for drafter in self.rows]
        for tokens, _ in out:
            if tokens.shape[0] != depth:
                raise RuntimeError(f"flash: the drafter proposed {tokens.shape[0]} tokens for depth {depth}")
        tokens = torch.stack([t for t, _ in out])
        qs = [q for _, q in out]
        return tokens, (torch.stack(qs) if all(q is not None for q in qs) else None)

    def select_rows(self, rows: Tensor) -> None:
        self.rows = [self.rows[i] for i in rows.tolist()]


def verify_flops(model: nn.Module, tokens: int, past: int) -> float:
    """FLOPs of one row's verification forward: ``tokens`` positions (the last emitted token and the
    drafts) after ``past`` cache columns, logits at every position (vlmprune.flops' convention; 0.0
    for a family it cannot count)."""
    from ..flops import llm_flops

    try:
        return llm_flops(model.config, int(tokens), past=int(past), logits_positions=int(tokens))
    except ValueError:
        return 0.0


def as_batch_drafter(drafter: Any) -> Any:
    return drafter if hasattr(drafter, "reset_batch") else RowDrafters(drafter)


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
    for state in decode_states(modules, cache):
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
            record.target_decode_flops += verify_flops(model, cand.shape[1], cache_length(cache))
            if d > 0 and tree == "static":
                table, depths, anc = static_tree(toks.shape[0], d)
                out = model(input_ids=cand, **{cache_kwarg(model): cache}, use_cache=True,
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
                out = model(input_ids=cand, **{cache_kwarg(model): cache}, use_cache=True)
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
    record.draft_flops = float(getattr(drafter, "flops", 0.0))
    _sync(device)
    record.total_s = time.perf_counter() - began
    out_ids = torch.cat([input_ids, torch.tensor([emitted], dtype=input_ids.dtype, device=device)], dim=1)
    return out_ids, record


# -- the batched chain loop (transformers' generate prepares it) -------------------------------------


def decode_states(modules: list[nn.Module], cache: Any) -> list[Any]:
    """The decode bookkeeping that seams keep for ``cache`` (the pre-LLM seam continues positions and
    the mask after a pruned prefill from it); the loop keeps it in step with the cache."""
    from .pre_llm import DecodeState

    found = []
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
            found.append(state)
    return found


def _row_groups(lengths: list[int]) -> list[tuple[int, Tensor]]:
    """Active rows (by position) with the same current length."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [(n, torch.tensor(rows)) for n, rows in groups.items()]


def _full_batch(history: Tensor, length: int, rows: Tensor, tail: Tensor) -> Tensor:
    """The whole batch's ids at ``length + tail`` columns, as plain generate's processors and
    criteria get them: rows ``rows`` hold their sequence and ``tail``; the other rows filler (their
    outputs are not read). Processors may keep per-row state (e.g. the repetition penalty's
    per-row prompt length), so they always see every row at its own index."""
    ids = torch.cat([history[:, :length], history.new_zeros(history.shape[0], tail.shape[1])], dim=1)
    ids[rows, length:] = tail
    return ids


def _processed(processors: Any, history: Tensor, active: Tensor, cand: Tensor, logits: Tensor,
               lengths: list[int]) -> Tensor:
    """Scores at each verified position: ``processors(ids so far, logits)`` where the ids so far are
    the row's sequence plus the drafts before that position, exactly what plain ``generate`` would
    pass at that step (transformers' assisted decoding does the same)."""
    if not processors:
        return logits
    out = torch.empty_like(logits)
    n = cand.shape[1]
    for length, local in _row_groups(lengths):
        local = local.to(cand.device)
        rows = active.to(cand.device)[local]
        full = _full_batch(history, length, rows, cand[local, 1:])
        scores = logits.new_zeros(history.shape[0], logits.shape[-1])
        for i in range(n):
            scores[rows] = logits[local, i]
            out[local, i] = processors(full[:, : length + i], scores.clone())[rows]
    return out


def _first_stops(criteria: Any, history: Tensor, active: Tensor, new: Tensor, count: Tensor, lengths: list[int],
                 check: Tensor) -> Tensor:
    """Per active row, the index of the first new token after which ``criteria`` stop it (-1: none);
    only rows where ``check`` is set are examined."""
    first = torch.full((new.shape[0],), -1, dtype=torch.long)
    counts = count.tolist()
    for length, local in _row_groups(lengths):
        local = local[check[local]]
        if local.numel() == 0:
            continue
        rows = active[local].to(history.device)
        full = _full_batch(history, length, rows, new[local.to(new.device)])
        for j in range(max(counts[r] for r in local.tolist())):
            live = torch.tensor([counts[r] > j and int(first[r]) < 0 for r in local.tolist()])
            if not bool(live.any()):
                break
            done = criteria(full[:, : length + j + 1], None)[rows].cpu()
            first[local[live & done]] = j
    return first


def _compact_cache(cache: Any, start: int, index: Tensor) -> None:
    """Per row, keep the cache columns ``start + index[row]`` after the first ``start`` (in order)."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        for name in ("keys", "values"):
            x = getattr(layer, name)
            b, h, _, d = x.shape
            idx = index.to(x.device)[:, None, :, None].expand(b, h, index.shape[1], d)
            setattr(layer, name, torch.cat([x[:, :, :start], torch.gather(x[:, :, start:], 2, idx)], dim=2))


def _check_cache(cache: Any, rows: int) -> None:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache):
        raise ValueError(f"flash: speculative decoding needs a DynamicCache (it crops rejected columns); got "
                         f"{type(cache).__name__}. Leave cache_implementation unset")
    if rows > 1:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer or getattr(layer, "is_sliding", False):
                raise ValueError(
                    f"flash: batched speculative decoding keeps rejected columns masked in the cache, which a "
                    f"{type(layer).__name__} (sliding window / linear attention) would count as context; "
                    "call generate once per prompt for this model"
                )


@torch.no_grad()
def speculative_decode(
    model: nn.Module,
    input_ids: Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    *,
    adapter: Any,
    drafter: Any,
    depth: int,
    draft_sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
    streamer: Any = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    record: DecodeRecord,
    started: float | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """The speculative chain loop as a transformers decoding method (``generate(custom_generate=...)``
    calls it with the prepared batch, cache, processors and criteria, as it calls ``_sample``).

    ``input_ids`` (B, L) may be left-padded. Each target logit row is processed by
    ``logits_processor`` with the ids that plain ``generate`` would have at that step; greedy takes
    the argmax, sampling uses :func:`verify_chain_sampling_batch` (``draft_sampling``: how the
    drafter draws, its q). ``stopping_criteria`` end rows as in ``_sample``: with an EOS criterion a
    finished row is padded with the pad token, without one it keeps decoding until every row is
    done. Returns the (B, L + new) ids; ``record`` gets the stats (its clock from ``started``, e.g.
    when ``generate`` was called, so that ``prefill_s`` covers the preparation as well).
    """
    gc = generation_config
    if model_kwargs.get("inputs_embeds") is not None or input_ids.shape[1] == 0:
        raise ValueError("flash: generate needs input_ids (the draft reads the prompt's token ids); "
                         "inputs_embeds is not supported")
    device = input_ids.device
    bsz, prompt_len = input_ids.shape
    do_sample = bool(gc.do_sample)
    pad = gc._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    simple_stops = all(type(c) in (EosTokenCriteria, MaxLengthCriteria) for c in stopping_criteria)
    eos = torch.cat([c.eos_token_id.view(-1).to(device) for c in stopping_criteria if isinstance(c, EosTokenCriteria)]
                    or [torch.empty(0, dtype=torch.long, device=device)])
    max_new = int(gc.max_length) - prompt_len
    drafter = as_batch_drafter(drafter)
    sink: list[Tensor] = []
    token = _CAPTURE.set(sink)
    pruned_columns: list[Any] = [None, None]
    record.prompt_tokens = prompt_len
    record.batch = bsz
    began = started if started is not None else time.perf_counter()
    try:
        # -- prefill (exactly plain generate's) ------------------------------------------------
        prompt_mask = model_kwargs.get("attention_mask")

        def probe(module: nn.Module, args: tuple, output: Any) -> None:
            pruned_columns[:] = _pruned_columns(model)

        probe_handle = adapter.decoder.register_forward_hook(probe)
        try:
            outputs = model._prefill(input_ids, gc, model_kwargs)
        finally:
            probe_handle.remove()
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        cache = model_kwargs.get(cache_kwarg(model))
        _check_cache(cache, bsz)
        hidden = torch.cat(sink, dim=1) if len(sink) > 1 else sink[-1]
        sink.clear()
        scores = logits_processor(input_ids, outputs.logits[:, -1].to(copy=True, dtype=torch.float32))
        del outputs
        if do_sample:
            first = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(1)
        else:
            first = scores.argmax(-1)
        fill = int(pad) if pad is not None else 0
        history = torch.full((bsz, prompt_len + max(max_new, 1)), fill, dtype=input_ids.dtype, device=device)
        history[:, :prompt_len] = input_ids
        history[:, prompt_len] = first
        generated = torch.ones(bsz, dtype=torch.long)  # per row (CPU bookkeeping)
        if simple_stops:
            stopped = torch.isin(first, eos).cpu() | (max_new <= 1)
        else:
            stopped = stopping_criteria(history[:, : prompt_len + 1], None).cpu()
        stop_at = torch.where(stopped, 1, -1)
        if streamer is not None:
            streamer.put(first.cpu())
        _sync(device)
        record.prefill_s = time.perf_counter() - began
        record.target_forwards = 1

        # -- per-row state ---------------------------------------------------------------------
        cache_start = cache_length(cache)  # the prefill's columns (fewer than L after pruning)
        states = decode_states([adapter.decoder], cache)
        positions = model_kwargs.get("position_ids")
        next_pos = positions[..., -1:].clone() if positions is not None else None  # (..., B, 1)
        static = {key: value for key, value in model_kwargs.items()
                  if key not in ("attention_mask", "position_ids", "cache", "past_key_values", "token_type_ids", "mm_token_type_ids",
                                 "moe_mm_token_type_ids", "logits_to_keep", "use_cache")}
        token_types = model_kwargs.get("token_type_ids")
        last_type = token_types[:, -1:] if token_types is not None else None
        mm_types = [key for key in ("mm_token_type_ids", "moe_mm_token_type_ids") if model_kwargs.get(key) is not None]
        dec_mask = torch.ones(bsz, 0, dtype=torch.bool, device=device)  # the cache's columns after the prefill
        limit = None  # rows' common length once every row has stopped (no EOS criterion)

        def finished(rows: Tensor) -> Tensor:
            """With an EOS criterion a stopped row is done (pads follow); without one every row
            decodes until all have stopped (``limit``: the step plain generate would end at)."""
            out = generated[rows] >= max_new
            if has_eos:
                return out | stopped[rows]
            return out | (generated[rows] >= limit) if limit is not None else out

        if not has_eos and bool(stopped.all()):
            limit = int(stop_at.max())
        active = torch.arange(bsz)[~finished(torch.arange(bsz))]
        if active.numel():
            prompts = _prompt_views(adapter, input_ids, prompt_mask, hidden, pruned_columns, active, device)
            drafter.reset_batch(prompts, first[active.to(device)].tolist())
            if active.numel() < bsz:
                _select(active, cache, states, None)  # the drafter was given the active rows only
                dec_mask = dec_mask[active.to(device)]
                if next_pos is not None:
                    next_pos = next_pos.index_select(-2, active.to(device))
                last_type = last_type[active.to(device)] if last_type is not None else None
        del hidden

        # -- rounds ----------------------------------------------------------------------------
        while active.numel():
            rows_dev = active.to(device)
            n_rows = active.numel()
            cap = (limit if limit is not None else max_new) - generated[active]
            d = max(0, min(depth, int(cap.max()) - 1))
            t0 = time.perf_counter()
            if d > 0:
                drafted, q = drafter.propose_batch(d, draft_sampling, generator)
                drafted = drafted.to(device)
            else:
                drafted, q = torch.empty(n_rows, 0, dtype=torch.long, device=device), None
            _sync(device)
            t1 = time.perf_counter()
            lengths = (prompt_len + generated[active]).tolist()
            last = history[rows_dev, (prompt_len + generated[active] - 1).to(device)]
            cand = torch.cat([last.unsqueeze(1), drafted], dim=1)
            n = d + 1
            holes = not bool(dec_mask.all())
            if prompt_mask is None and not holes:
                mask = None
            else:
                pm = prompt_mask[rows_dev] if prompt_mask is not None else torch.ones(
                    n_rows, prompt_len, dtype=torch.long, device=device)
                mask = torch.cat([pm, dec_mask.to(pm.dtype), pm.new_ones(n_rows, n)], dim=1)
            kwargs = dict(static)
            if next_pos is not None:
                kwargs["position_ids"] = next_pos + torch.arange(n, device=device)
            elif n_rows > 1 or holes:
                raise ValueError("flash: the model takes no position_ids, so a batch cannot continue per row")
            if last_type is not None:
                kwargs["token_type_ids"] = last_type.expand(n_rows, n)
            for key in mm_types:
                kwargs[key] = torch.zeros(n_rows, n, dtype=model_kwargs[key].dtype, device=device)
            inputs = model.prepare_inputs_for_generation(cand, next_sequence_length=n, **{cache_kwarg(model): cache},
                                                         attention_mask=mask, use_cache=True, **kwargs)
            inputs.pop("logits_to_keep", None)
            record.target_decode_flops += n_rows * verify_flops(model, n, cache_length(cache))
            out = model(**inputs, return_dict=True)
            feats = sink[-1]
            sink.clear()
            logits = out.logits[:, -n:].to(dtype=torch.float32)
            del out
            scores = _processed(logits_processor, history, active, cand, logits, lengths)
            if do_sample:
                accepted, bonus = verify_chain_sampling_batch(torch.softmax(scores, -1), q, drafted, generator)
            else:
                best = scores.argmax(-1)
                accepted = (best[:, :d] == drafted).long().cumprod(1).sum(1) if d else torch.zeros_like(best[:, 0])
                bonus = best.gather(1, accepted.unsqueeze(1)).squeeze(1)
            new = torch.cat([drafted, drafted.new_zeros(n_rows, 1)], dim=1)
            new.scatter_(1, accepted.unsqueeze(1), bonus.unsqueeze(1))
            count = (accepted + 1).cpu()
            acc_cpu = accepted.cpu()
            # -- stops -----------------------------------------------------------------------
            steps = torch.arange(n)
            fresh = ~stopped[active]
            if simple_stops:
                hit = (torch.isin(new, eos).cpu() | ((generated[active] + 1).unsqueeze(1) + steps >= max_new))
                hit &= steps < count.unsqueeze(1)
                first_stop = torch.where(hit.any(1), hit.long().argmax(1), -1)
            else:
                first_stop = _first_stops(stopping_criteria, history, active, new, count, lengths, fresh)
            first_stop = torch.where(fresh, first_stop, -1)
            newly = first_stop >= 0
            stop_at[active[newly]] = generated[active[newly]] + first_stop[newly] + 1
            stopped[active[newly]] = True
            keep = count.clone()
            if has_eos:
                keep = torch.where(newly, first_stop + 1, keep)
            if not has_eos and limit is None and bool(stopped.all()):
                limit = int(stop_at.max())
            keep = torch.minimum(keep, (limit if limit is not None else max_new) - generated[active]).clamp(min=0)
            # -- emit ------------------------------------------------------------------------
            cols = (prompt_len + generated[active]).unsqueeze(1) + steps
            write = steps < keep.unsqueeze(1)
            history[rows_dev.unsqueeze(1).expand(-1, n)[write.to(device)], cols[write].to(device)] = new[write.to(device)]
            if streamer is not None and int(keep[0]) > 0:
                for tok in new[0, : int(keep[0])].tolist():
                    streamer.put(torch.tensor([tok]))
            generated[active] += keep
            if limit is not None:
                generated.clamp_(max=limit)  # rows that ran ahead of the last row to stop end with it
            # -- the cache: accepted columns stay, rejected ones are masked, then cropped -----
            accepted_cols = torch.arange(n, device=device).unsqueeze(0) < (accepted + 1).unsqueeze(1)
            dec_mask = torch.cat([dec_mask, accepted_cols], dim=1)
            rejected = (n - 1 - accepted)
            if next_pos is not None:
                shape = [1] * (next_pos.dim() - 2) + [n_rows, 1]
                next_pos = next_pos + (accepted + 1).view(shape).to(next_pos.dtype)
            for state in states:
                state.next_position = state.next_position - rejected.to(state.next_position.device)
            record.rounds += n_rows
            record.drafted += n_rows * d
            record.accepted += int(acc_cpu.sum())
            record.accept_lengths.extend(acc_cpu.tolist())
            record.target_forwards += 1
            done = finished(active)
            going = (~done).nonzero().squeeze(1)
            if done.any():
                active = active[~done]
            if done.any() and active.numel():
                _select(going, cache, states, drafter)
                dec_mask = dec_mask[going.to(device)]
                if next_pos is not None:
                    next_pos = next_pos.index_select(-2, going.to(device))
                last_type = last_type[going.to(device)] if last_type is not None else None
            dec_mask = _trim(cache, cache_start, dec_mask, depth)
            for state in states:
                region = dec_mask.to(state.mask.dtype)
                state.mask = torch.cat([state.mask[:, :cache_start], region], dim=1)
                state.pass_mask = state.pass_mask or not bool(dec_mask.all())
            if cache_length(cache) != cache_start + dec_mask.shape[1]:
                raise RuntimeError("flash: the target cache does not hold the accepted sequences")
            if active.numel():
                t3 = time.perf_counter()
                kept = going.to(device)
                acc_kept = accepted[kept]
                drafter.extend_batch([new[r, : int(a) + 1] for r, a in zip(kept.tolist(), acc_kept.tolist())],
                                     [feats[r, : int(a) + 1] for r, a in zip(kept.tolist(), acc_kept.tolist())])
                record.draft_s += time.perf_counter() - t3
            _sync(device)
            t2 = time.perf_counter()
            record.draft_s += t1 - t0
            record.verify_s += t2 - t1
            if on_round is not None:
                on_round({"cache": cache, "accepted": acc_cpu.tolist(), "drafted": drafted, "drafter": drafter,
                          "rows": active.tolist(), "mask": dec_mask, "cache_start": cache_start,
                          "sequences": [history[r, : prompt_len + int(generated[r])] for r in range(bsz)],
                          "sequence": history[0, : prompt_len + int(generated[0]) - 1] if bsz == 1 else None,
                          "done": not active.numel()})
    finally:
        _CAPTURE.reset(token)
    if streamer is not None:
        streamer.end()
    total = int(generated.max())
    record.new_tokens = int(generated.sum())
    record.draft_forwards = int(getattr(drafter, "forwards", 0))
    record.draft_flops = float(getattr(drafter, "flops", 0.0))
    _sync(device)
    record.total_s = time.perf_counter() - began
    return history[:, : prompt_len + total]


def _prompt_views(adapter: Any, input_ids: Tensor, prompt_mask: Tensor | None, hidden: Tensor,
                  pruned: list[Any], rows: Tensor, device: torch.device) -> list[PromptView]:
    """Each row's decoder columns for the drafter, padding left out (and pruned columns, via the
    seam's column map)."""
    visual_ids = torch.tensor(adapter.placeholder_ids(), device=device)
    mask = prompt_mask.bool() if prompt_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    if hidden.shape[1] == input_ids.shape[1]:
        ids, visual, valid = input_ids, torch.isin(input_ids, visual_ids), mask
    else:
        columns, vis = pruned
        if columns is None:
            raise RuntimeError(
                "flash: the decoder saw a different number of columns than the prompt has, and no "
                "pruning seam reported its column map; cannot align the draft's context"
            )
        from ..sequence import gather_columns

        ids = gather_columns(input_ids, columns, 0)
        visual = vis if vis is not None else torch.isin(ids, visual_ids)
        valid = gather_columns(mask.long(), columns, 0).bool()
    out = []
    for r in rows.tolist():
        keep = valid[r].to(hidden.device)
        out.append(PromptView(ids[r][keep.to(ids.device)], hidden[r][keep], visual[r][keep.to(visual.device)]))
    return out


def _select(rows: Tensor, cache: Any, states: list[Any], drafter: Any | None) -> None:
    """Keep only batch rows ``rows`` (finished rows leave) in the cache, the seams' states and the drafter."""
    cache.batch_select_indices(rows.to(cache.layers[0].keys.device))
    for state in states:
        state.mask = state.mask[rows.to(state.mask.device)]
        state.next_position = state.next_position[rows.to(state.next_position.device)]
    if drafter is not None:
        drafter.select_rows(rows)


def _trim(cache: Any, start: int, dec_mask: Tensor, depth: int) -> Tensor:
    """Crop the columns after ``start`` that no row uses; compact the rows once the masked columns
    would fill a round (rows' accepted columns first, in order). Returns the new column mask."""
    width = dec_mask.shape[1]
    used = dec_mask.any(0).nonzero()
    keep = int(used.max()) + 1 if used.numel() else 0
    if keep < width:
        cache.crop(keep - width)
        dec_mask = dec_mask[:, :keep]
    if keep - int(dec_mask.sum(1).max()) >= depth + 1:
        from vlmprune.methods.flash.draft import compact_index

        index, dec_mask = compact_index(dec_mask)
        _compact_cache(cache, start, index)
    return dec_mask


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
