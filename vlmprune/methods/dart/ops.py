"""DART's rule as pure functions (no model knowledge): pivots by key norm, then a greedy pick of
the visual tokens least duplicated with each pivot."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def per_pivot(n_visual: int, ratio: float, pivots: int, tokens: int | None = None) -> int:
    """``t``, the tokens each pivot claims: ``floor(N * (1 - ratio) / pivots)``, or
    ``tokens // pivots`` when a fixed budget is given (the reference's ``max_num_trunction``)."""
    if tokens is not None:
        return int(tokens) // pivots
    return int((n_visual * (1.0 - ratio)) // pivots)


def key_l1(keys: Tensor) -> Tensor:
    """(B, L): L1 norm of each token's keys, all heads concatenated. ``keys`` (B, H, L, d)."""
    return keys.abs().sum(dim=(1, 3))


def _top(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest values (exact ties to the lowest index)."""
    k = max(0, min(int(k), values.numel()))
    return torch.sort(values, descending=True, stable=True).indices[:k]


def dart_select(
    states: Tensor, key_norms: Tensor, image: list[int], text: list[int], t: int, pivot_image: int = 4,
    pivot_text: int = 4, order: str = "reference",
) -> list[int]:
    """The visual tokens DART keeps for one sample, ascending.

    ``states`` (L, D): the hidden states the similarity is measured on (the reference: layer K-1's
    output through the final norm); ``key_norms`` (L,): the pivot criterion; ``image`` / ``text``:
    the indices of the visual tokens and of the text tokens after them. ``order="reference"`` visits
    the pivots in the iteration order of a CPython ``set`` of their indices, as the reference code
    does; ``"sorted"`` in ascending order. Each pivot claims (up to) ``t`` of the remaining visual
    tokens with the lowest cosine similarity to it; the visual pivots and every claimed token stay.
    """
    img = torch.tensor(image, dtype=torch.long, device=key_norms.device)
    txt = torch.tensor(text, dtype=torch.long, device=key_norms.device)
    image_pivots = img[_top(key_norms[img], pivot_image)].tolist() if img.numel() else []
    text_pivots = txt[_top(key_norms[txt], pivot_text)].tolist() if txt.numel() else []
    pivots = list(set(image_pivots + text_pivots)) if order == "reference" else sorted(image_pivots + text_pivots)
    remaining = set(image) - set(image_pivots)
    chosen = set(image_pivots)
    candidates = list(remaining)
    for pivot in pivots:
        if not candidates or t <= 0:
            break
        vectors = states[torch.tensor(candidates, dtype=torch.long, device=states.device)]
        similarity = -F.cosine_similarity(states[pivot], vectors, dim=-1)
        picked = [candidates[i] for i in _top(similarity, t).tolist()]
        chosen.update(picked)
        remaining.difference_update(picked)
        candidates = list(remaining)
    return sorted(chosen)
