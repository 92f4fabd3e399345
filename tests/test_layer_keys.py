"""``LayerAttention.keys(from_first_token=True)``: a key statistic that is not rotation-invariant (DART's
L1 norm) must be the same for a left-padded row of a plain ``forward`` (positions counted from the
padding) as for the sample alone."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from vlmprune.methods.dart.ops import key_l1
from vlmprune.seams.in_llm import LayerAttention


def layer_keys(key_proj: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    rope = LlamaRotaryEmbedding(cfg)
    cos, sin = rope(key_proj, positions)
    return LayerAttention(key_proj, lambda rows: None, (cos, sin), apply_rotary_pos_emb, heads=4, head_dim=8,
                          scaling=8 ** -0.5, valid=valid, charge=lambda f: None)


def test_padded_row_keys_equal_the_sample_alone():
    torch.manual_seed(0)
    pad, length = 7, 20
    alone_proj = torch.randn(1, length, 16)
    padded_proj = torch.cat([torch.randn(1, pad, 16), alone_proj], dim=1)
    valid = torch.ones(1, pad + length, dtype=torch.bool)
    valid[0, :pad] = False
    alone = layer_keys(alone_proj, torch.arange(length).unsqueeze(0), torch.ones(1, length, dtype=torch.bool))
    padded = layer_keys(padded_proj, torch.arange(pad + length).unsqueeze(0), valid)
    # plain keys differ (rotated by the padding) and so do their L1 norms ...
    assert not torch.allclose(key_l1(padded.keys())[:, pad:], key_l1(alone.keys()), rtol=1e-3)
    # ... keys renumbered from the first valid token are the sample's own
    torch.testing.assert_close(padded.keys(from_first_token=True)[:, :, pad:], alone.keys(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(key_l1(padded.keys(from_first_token=True))[:, pad:], key_l1(alone.keys()))
    # an unpadded row is unchanged
    torch.testing.assert_close(alone.keys(from_first_token=True), alone.keys(), rtol=1e-6, atol=1e-6)
