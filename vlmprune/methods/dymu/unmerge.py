"""Virtual Token Unmerging (VTU, DyMU's LLM half) as pure tensor functions.

The LLM runs on the *compact* sequence (one row per merged token), but every attention layer behaves
as if each merged token sat at all of its original positions: ``g`` (B, N) maps each position of the
*full* (virtual) sequence to its compact row. Queries, keys and values are expanded with ``g``,
rotated at the full positions, attended over the full length, and each compact row's output is the
mean over its copies (``scatter_mean`` via ``index_add_``; no torch_scatter dependency).

Two kernels give the same result:

* fast (:func:`expand` + the model's own attention backend + :func:`scatter_mean`): what the reference
  ships as default; attention runs at N × N (wired in :func:`vlmprune.methods.dymu.vtu_attention`).
* :func:`exact_rope_scores`: the paper's decomposition. The q·k products are formed on the compact
  N_un × N_un grid per frequency (P = q1k1 + q2k2, X = q2k1 − q1k2) and only then gathered to N × N
  and weighted by cos/sin of the position differences; it equals RoPE(q, i)·RoPE(k, j) exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expand(x: Tensor, g: Tensor, dim: int) -> Tensor:
    """Gather compact rows to the full length: ``out[b, ..., j, ...] = x[b, ..., g[b, j], ...]``.
    ``x`` has its batch on axis 0 and its sequence on ``dim``."""
    if dim < 0:
        dim += x.dim()
    shape = [1] * x.dim()
    shape[0], shape[dim] = g.shape
    index = g.view(shape)
    target = list(x.shape)
    target[dim] = g.shape[1]
    return torch.gather(x, dim, index.expand(*target))


def scatter_mean(x: Tensor, g: Tensor, valid: Tensor, n_out: int) -> Tensor:
    """Mean of the full rows ``x`` (B, N, C) over each compact row: ``out[b, k] = mean_{j: g[b,j]=k,
    valid[b,j]} x[b, j]`` (zeros for a compact row nothing maps to). Computed in fp32."""
    bsz, n, c = x.shape
    flat = (g + torch.arange(bsz, device=g.device).unsqueeze(1) * n_out).reshape(-1)
    w = valid.reshape(-1).to(torch.float32)
    total = torch.zeros(bsz * n_out, c, dtype=torch.float32, device=x.device)
    total.index_add_(0, flat, x.reshape(-1, c).float() * w.unsqueeze(1))
    count = torch.zeros(bsz * n_out, dtype=torch.float32, device=x.device)
    count.index_add_(0, flat, w)
    return (total / count.clamp_min(1).unsqueeze(1)).view(bsz, n_out, c).to(x.dtype)


def group_counts(g: Tensor, valid: Tensor, n_out: int) -> Tensor:
    """(B, n_out) how many valid full positions each compact row stands for."""
    out = torch.zeros(g.shape[0], n_out, dtype=torch.long, device=g.device)
    return out.scatter_add(1, g, valid.long())


def exact_rope_scores(q: Tensor, k: Tensor, g: Tensor, cos: Tensor, sin: Tensor, chunk: int = 128) -> Tensor:
    """(B, H, N, N) RoPE(q_{g(i)}, i) · RoPE(k_{g(j)}, j), unscaled, from compact ``q`` (B, H, Nu, d) and
    ``k`` (B, H, Nu, d) (key heads already repeated) and full-length ``cos``/``sin`` (B, N, d) of the
    rotate-half convention (each frequency in both halves). Per frequency, with halves (x1, x2):
    score = Σ_d P·(c_i c_j + s_i s_j) + X·(c_i s_j − s_i c_j), P = q1k1 + q2k2, X = q2k1 − q1k2.
    Rows are done ``chunk`` at a time to bound the (B, H, chunk, N, d/2) intermediate."""
    half = q.shape[-1] // 2
    if not torch.equal(cos[..., :half], cos[..., half:]):
        raise ValueError("exact VTU needs the rotate-half RoPE layout (each frequency in both halves)")
    q1, q2 = q[..., :half].float(), q[..., half:].float()
    k1, k2 = k[..., :half].float(), k[..., half:].float()
    c, s = cos[..., :half].float(), sin[..., :half].float()  # (B, N, d/2)
    bsz, heads, _, _ = q.shape
    n = g.shape[1]
    kg1, kg2 = expand(k1, g, 2), expand(k2, g, 2)  # (B, H, N, d/2): key side at full length
    out = torch.empty(bsz, heads, n, n, dtype=torch.float32, device=q.device)
    for start in range(0, n, chunk):
        gi = g[:, start : start + chunk]
        qi1, qi2 = expand(q1, gi, 2), expand(q2, gi, 2)  # (B, H, r, d/2)
        # P and X per frequency over (query row, key column); the compact products gathered to full
        p = qi1.unsqueeze(3) * kg1.unsqueeze(2) + qi2.unsqueeze(3) * kg2.unsqueeze(2)  # (B, H, r, N, d/2)
        x = qi2.unsqueeze(3) * kg1.unsqueeze(2) - qi1.unsqueeze(3) * kg2.unsqueeze(2)
        ci, si = c[:, start : start + chunk].unsqueeze(2), s[:, start : start + chunk].unsqueeze(2)  # (B, r, 1, d/2)
        cj, sj = c.unsqueeze(1), s.unsqueeze(1)  # (B, 1, N, d/2)
        w_p = (ci * cj + si * sj).unsqueeze(1)
        w_x = (ci * sj - si * cj).unsqueeze(1)
        out[:, :, start : start + chunk] = (p * w_p + x * w_x).sum(-1)
    return out


def unmerged_attention(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, scaling: float
) -> Tensor:
    """The exact-kernel attention output at full length, (B, N, H, d): softmax(scores·scale + mask)·V[g]
    in fp32. ``mask`` is additive (B, 1, N, N) or boolean (True = attend)."""
    scores = exact_rope_scores(q, k, g, cos, sin) * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    vf = expand(v.float(), g, 2)
    return (probs @ vf).transpose(1, 2).to(v.dtype)
