"""Pure tensor functions: sequence surgery, scores and selections, tested without a model."""

from __future__ import annotations

import pytest
import torch

from vlmprune.method import keep_count
from vlmprune.scoring import (
    adaptive_pool_weights,
    cls_attention_scores,
    mean_received_attention,
    pooled_grid,
    topk_indices,
)
from vlmprune.seams.pre_llm import Reduction, VisualGroup, apply_reductions
from vlmprune.sequence import decode_positions, gather_columns, padding_side, prune_sequence


def test_keep_count_convention():
    # the README's LLaVA-1.5 counts: 576 tokens at 25/50/75/90/95 %
    assert [keep_count(576, r) for r in (0.25, 0.5, 0.75, 0.9, 0.95)] == [432, 288, 144, 58, 29]
    assert keep_count(576, 0.0) == 576
    assert keep_count(10, 0.99) == 1  # never zero


def test_cls_scores_equal_eager_softmax_row():
    torch.manual_seed(0)
    b, n, c, h = 2, 9, 16, 4
    q, k = torch.randn(b, n + 1, c), torch.randn(b, n + 1, c)
    qh = q.view(b, n + 1, h, c // h).transpose(1, 2)
    kh = k.view(b, n + 1, h, c // h).transpose(1, 2)
    full = torch.softmax(qh @ kh.transpose(-1, -2) * (c // h) ** -0.5, dim=-1)
    ref = full[:, :, 0, 1:].mean(1)
    got = cls_attention_scores(q[:, 0], k, h)
    assert torch.allclose(got, ref, atol=1e-6)
    assert (got.sum(-1) < 1).all()  # not renormalised after dropping the [CLS] column


def test_mean_received_attention_chunking_is_exact():
    torch.manual_seed(1)
    q, k = torch.randn(1, 37, 8), torch.randn(1, 37, 8)
    qh, kh = q.view(1, 37, 2, 4).transpose(1, 2), k.view(1, 37, 2, 4).transpose(1, 2)
    full = torch.softmax(qh @ kh.transpose(-1, -2) * 0.5, dim=-1)
    ref = full.mean(dim=2).mean(dim=1)
    assert torch.allclose(mean_received_attention(q, k, 2, chunk=5), ref, atol=1e-6)


def test_topk_indices_are_sorted_and_correct():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05, 0.7])
    assert topk_indices(scores, 3).tolist() == [1, 3, 5]


def test_pool_weights_average_bins():
    anchors, w = adaptive_pool_weights((4, 4), (2, 2))
    assert anchors.tolist() == [0, 2, 8, 10]
    assert torch.allclose(w.sum(1), torch.ones(4))
    assert w[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert pooled_grid((24, 24), 0.75) == (12, 12)


def _seq(b=2, length=6, d=3):
    return torch.arange(b * length * d, dtype=torch.float32).view(b, length, d)


def test_prune_sequence_contiguous_and_original():
    x = _seq()
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pos = torch.arange(6).expand(2, 6)
    out = prune_sequence(x, keep, None, pos, positions="contiguous")
    # sample 0 lost two tokens and is left-padded by two
    assert out.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6]
    assert out.position_ids[0, 2:].tolist() == [0, 1, 2, 3]
    assert torch.equal(out.inputs_embeds[0, 2:], x[0, [0, 2, 3, 5]])
    assert out.removed.tolist() == [2, 0]
    assert out.next_position.tolist() == [4, 6]
    orig = prune_sequence(x, keep, None, pos, positions="original")
    assert orig.position_ids[0, 2:].tolist() == [0, 2, 3, 5]
    assert orig.next_position.tolist() == [6, 6]


def test_prune_sequence_keeps_everything_unchanged():
    x = _seq()
    keep = torch.ones(2, 6, dtype=torch.bool)
    out = prune_sequence(x, keep, None, torch.arange(6)[None], positions="contiguous")
    assert torch.equal(out.inputs_embeds, x) and out.attention_mask is None


def test_prune_sequence_right_padding_and_mrope():
    x = _seq()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    keep = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert padding_side(mask) == "right"
    pos = torch.stack([torch.arange(6).expand(2, 6)] * 3)  # (3, B, L) M-RoPE
    out = prune_sequence(x, keep, mask, pos, positions="original")
    assert out.position_ids.shape == (3, 2, 6)
    assert out.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert out.columns[0, :3].tolist() == [0, 2, 3]
    labels = torch.arange(12).view(2, 6)
    assert gather_columns(labels, out.columns, -100)[0].tolist() == [0, 2, 3, -100, -100, -100]  # old pads dropped, re-padded


def test_decode_positions():
    nxt = torch.tensor([4, 6])
    assert decode_positions(nxt, 2, None).tolist() == [[4, 5], [6, 7]]
    assert decode_positions(nxt, 1, 3).shape == (3, 2, 1)


def test_apply_reductions_pooling_ignores_absent_members():
    x = _seq(b=1, length=5, d=2)
    # a 2x2 grid whose last token the model does not feed (column -1), then one text column
    group = VisualGroup(sample=0, columns=torch.tensor([0, 1, 2, -1]), grid=(2, 2))
    red = Reduction(anchors=torch.tensor([0]), weights=torch.full((1, 4), 0.25))
    keep, out = apply_reductions(x, [group], [red])
    assert keep.tolist() == [[True, False, False, True, True]]
    assert torch.allclose(out[0, 0], x[0, :3].mean(0))


@pytest.mark.parametrize("bad", ["middle"])
def test_prune_sequence_rejects_unknown_positions(bad):
    with pytest.raises(ValueError, match="positions must be one of"):
        prune_sequence(_seq(), torch.ones(2, 6, dtype=torch.bool), None, torch.arange(6)[None], positions=bad)
