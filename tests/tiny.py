"""Tiny random-init models of every supported family, built from configs in milliseconds."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE_TOKEN = 3
PAD = 0


def llama_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llava(seed: int = 0, attn: str = "sdpa", **kw) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=llama_config(), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default", **kw,
    )
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    return model


def llava_inputs(model, batch: int = 1, text_before: int = 3, text_after: int = 4, seed: int = 0, images_per_sample=1):
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    rows = []
    for _ in range(batch):
        before = torch.randint(4, 64, (text_before,), generator=g)
        after = torch.randint(4, 64, (text_after,), generator=g)
        img = torch.full((n * images_per_sample,), IMAGE_TOKEN)
        rows.append(torch.cat([before, img, after]))
    input_ids = torch.stack(rows)
    pixel_values = torch.randn(batch * images_per_sample, 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}
