"""FLASH's drafter: the draft head driven through the decode seam's drafter protocol (one
sequence for tree drafting; a batch of rows, each at its own length, for chain drafting)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmprune.seams.decode import PromptView, Sampling

from .draft import DraftCache, draft_context


class HeadDrafter:
    """FLASH's drafter: the draft head over the target's frozen embedding and LM head.

    The draft cache holds the *stable* prefix (real target features only). ``extend`` queues the
    newly accepted pairs ``(f_t, x_{t+1})``; ``propose`` first crops the speculative entries of the
    previous round, runs the queued pairs (whose last output gives the first ``k`` drafts), then,
    for depth beyond ``k``, feeds the drafted tokens with their *predicted* features (EAGLE's
    stand-in) and runs again: depth D costs ``ceil(D / k)`` forwards.
    """

    def __init__(self, head: nn.Module, embed: nn.Module, lm_head: nn.Module, k: int | None = None) -> None:
        self.head = head
        self.embed = embed
        self.lm_head = lm_head
        self.k = min(k or head.spec.k, head.spec.k)
        self.cache = DraftCache()
        self.stable = 0
        self.pending: Tensor | None = None
        self.forwards = 0
        self.flops = 0.0  # the draft's work since the last reset (DecodeRecord.draft_flops)

    def _run(self, x: Tensor, **kwargs) -> Tensor:
        """The head on ``x`` (B, m, H), counting its FLOPs: each position attends over the draft
        cache and the new positions."""
        past = self.cache.length
        self.flops += x.shape[0] * x.shape[1] * self.head.flops_per_token(past + x.shape[1])
        return self.head(x, **kwargs)

    def _logits(self, feats: Tensor) -> Tensor:
        self.flops += 2.0 * feats[..., 0].numel() * self.lm_head.weight.numel()
        return self.lm_head(feats.to(self.lm_head.weight.dtype))

    def _context(self, prompt: PromptView, first_token: int) -> Tensor:
        """The prompt's draft input (fused text pairs, each visual span compressed to Q latents)."""
        nxt = torch.cat([prompt.ids[1:], prompt.ids.new_tensor([first_token])])
        seq, _ = draft_context(self.head, self.embed(nxt.to(self.embed.weight.device)), prompt.hidden, prompt.visual)
        hidden = prompt.hidden.shape[-1]
        visual = int(prompt.visual.sum()) if prompt.visual is not None and self.head.spec.num_latents else 0
        self.flops += 4.0 * self.head.spec.num_latents * visual * hidden  # A h_v^T and the weighted sum
        return seq

    def reset(self, prompt: PromptView, first_token: int) -> None:
        self.flops = 0.0
        seq = self._context(prompt, first_token)
        self.cache = DraftCache()
        self.stable = 0
        self.pending = seq
        self.forwards = 0

    def extend(self, next_tokens: Tensor, features: Tensor) -> None:
        self.cache.crop(self.stable)  # drop the round's speculative entries: keep the accepted path only
        self.cache.keep_row(0)  # a tree round expanded it to one row per branch
        fused = self.head.fuse(self.embed(next_tokens.to(self.embed.weight.device)), features)
        self.pending = fused if self.pending is None else torch.cat([self.pending, fused], dim=0)

    def _tokens(self, feats: Tensor, sampling: Sampling | None, gen: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
        logits = self._logits(feats)
        if sampling is None:
            return logits.argmax(-1), None
        q = sampling.probs(logits)
        tok = torch.multinomial(q.reshape(-1, q.shape[-1]), 1, generator=gen).view(q.shape[:-1])
        return tok, q

    # -- a batch of rows (chain drafting) ------------------------------------------------------------
    # The cache's rows share one length; a row that accepted fewer tokens than the longest row of
    # its round gets padded (masked) entries, and ``pos`` keeps each row's own next position.

    def reset_batch(self, prompts: list[PromptView], first_tokens: list[int]) -> None:
        self.flops = 0.0
        seqs = [self._context(prompt, first) for prompt, first in zip(prompts, first_tokens)]
        self.cache = DraftCache()
        self.stable = 0
        self.pos = torch.zeros(len(seqs), dtype=torch.long, device=seqs[0].device)
        self.pending = seqs
        self.forwards = 0

    def extend_batch(self, next_tokens: list[Tensor], features: list[Tensor]) -> None:
        """Queue each row's accepted pairs ``(f_t, x_{t+1})`` (rows in the batch's current order)."""
        self.cache.crop(self.stable)
        lengths = [int(t.shape[0]) for t in next_tokens]
        dev = self.embed.weight.device
        fused = self.head.fuse(self.embed(torch.cat(next_tokens).to(dev)), torch.cat(features).to(dev)).split(lengths)
        self.pending = [f if p is None else torch.cat([p, f]) for p, f in zip(self.pending, fused)]

    def select_rows(self, rows: Tensor) -> None:
        """Keep the batch rows ``rows`` (in that order)."""
        self.cache.crop(self.stable)
        self.cache.select_rows(rows.to(self.pos.device))
        self.pos = self.pos[rows.to(self.pos.device)]
        self.pending = [self.pending[i] for i in rows.tolist()]

    def propose_batch(
        self, depth: int, sampling: Sampling | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        """(tokens (B, depth), q (B, depth, V) or None) for every row."""
        self.cache.crop(self.stable)
        if self.cache.waste() > max(8, self.cache.length // 4):
            self.cache.compact()
        pending = self.pending
        if any(p is None or p.shape[0] == 0 for p in pending):
            raise RuntimeError("flash: the drafter has no new context for a row (extend_batch() was not called)")
        lengths = torch.tensor([p.shape[0] for p in pending], device=self.pos.device)
        width = int(lengths.max())
        x = torch.nn.utils.rnn.pad_sequence(pending, batch_first=True)  # (B, width, H)
        steps = torch.arange(width, device=self.pos.device)
        valid = steps.unsqueeze(0) < lengths.unsqueeze(1)
        out = self._run(x, positions=self.pos.unsqueeze(1) + steps, cache=self.cache, valid=valid)  # (B, width, k, H)
        self.forwards += 1
        self.stable = self.cache.length
        self.pos = self.pos + lengths
        self.pending = [None] * len(pending)
        rows = torch.arange(len(pending), device=out.device)
        feats = out[rows, (lengths - 1).to(out.device), : self.k]  # (B, k, H)
        tokens, probs, ahead = [], [], 0
        while True:
            tok, q = self._tokens(feats, sampling, generator)
            tokens.append(tok)
            if q is not None:
                probs.append(q)
            ahead += tok.shape[1]
            if ahead >= depth:
                break
            nxt = self.head.fuse(self.embed(tok), feats)  # pairs (f̂_{t+i}, x_{t+1+i}) of every row
            at = self.pos.unsqueeze(1) + (ahead - tok.shape[1]) + torch.arange(tok.shape[1], device=self.pos.device)
            feats = self._run(nxt, positions=at, cache=self.cache)[:, -1, : self.k]
            self.forwards += 1
        drafted = torch.cat(tokens, dim=1)[:, :depth]
        return drafted, (torch.cat(probs, dim=1)[:, :depth] if probs else None)

    def propose(
        self, depth: int, sampling: Sampling | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        self.cache.crop(self.stable)
        x = self.pending
        if x is None or x.shape[0] == 0:
            raise RuntimeError("flash: the drafter has no new context (extend() was not called)")
        out = self._run(x.unsqueeze(0), cache=self.cache)[0]  # (m, k, H)
        self.forwards += 1
        self.stable += x.shape[0]
        self.pending = None
        tokens, probs = [], []
        feats = out[-1, : self.k]
        while True:
            tok, q = self._tokens(feats, sampling, generator)
            tokens.append(tok)
            if q is not None:
                probs.append(q)
            if sum(t.shape[0] for t in tokens) >= depth:
                break
            nxt = self.head.fuse(self.embed(tok), feats)  # pairs (f̂_{t+i}, x_{t+1+i})
            feats = self._run(nxt.unsqueeze(0), cache=self.cache)[0, -1, : self.k]
            self.forwards += 1
        drafted = torch.cat(tokens)[:depth]
        return drafted, (torch.cat(probs)[:depth] if probs else None)

    def propose_tree(
        self, depth: int, branches: int, sampling: Sampling | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        """(tokens (w, D), q (w, D, V) or None): top-w (greedy) or w draws without replacement
        (sampling) at offset 1; offsets 2..k of the same forward are shared (they do not condition
        on offset 1); deeper, every branch runs on as a chain, the branches batched."""
        self.cache.crop(self.stable)
        self.cache.keep_row(0)
        x = self.pending
        if x is None or x.shape[0] == 0:
            raise RuntimeError("flash: the drafter has no new context (extend() was not called)")
        out = self._run(x.unsqueeze(0), cache=self.cache)[0]
        self.forwards += 1
        self.stable += x.shape[0]
        self.pending = None
        feats = out[-1, : self.k]  # (k, H)
        logits = self._logits(feats)
        w = min(branches, logits.shape[-1])
        if sampling is None:
            first = torch.topk(logits[0], w).indices
            rest = logits[1:].argmax(-1)
            q = None
        else:
            q = sampling.probs(logits)
            first = torch.multinomial(q[0], w, replacement=False, generator=generator)
            rest = torch.multinomial(q[1:], 1, generator=generator).squeeze(-1) if q.shape[0] > 1 else first[:0]
        tokens = torch.cat([first.unsqueeze(1), rest.unsqueeze(0).expand(w, -1)], dim=1)  # (w, k)
        qs = None if q is None else q.unsqueeze(0).expand(w, -1, -1)
        last_feats = feats.unsqueeze(0).expand(w, -1, -1)  # (w, k, H)
        last_tokens = tokens
        if tokens.shape[1] < depth:
            self.cache.expand_rows(w)
        while tokens.shape[1] < depth:
            nxt = self.head.fuse(self.embed(last_tokens), last_feats)
            f = self._run(nxt, cache=self.cache)[:, -1, : self.k]  # (w, k, H)
            self.forwards += 1
            lg = self._logits(f)
            if sampling is None:
                tok = lg.argmax(-1)
            else:
                qq = sampling.probs(lg)
                tok = torch.multinomial(qq.flatten(0, 1), 1, generator=generator).view(w, -1)
                qs = torch.cat([qs, qq], dim=1)
            tokens = torch.cat([tokens, tok], dim=1)
            last_tokens, last_feats = tok, f
        return tokens[:, :depth], (qs[:, :depth] if qs is not None else None)
