"""The adapter interface that keeps family knowledge out of methods and seams: the encoder layout,
the images-for-the-tower helpers, the positions interface and the FLOPs facts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig, Qwen2VLConfig

import vlmprune.flops
from vlmprune import adapters
from vlmprune.adapters import Adapter, for_config, for_model, for_text_config
from vlmprune.adapters.llava import LlavaAdapter
from vlmprune.adapters.qwen2_vl import Qwen2VLAdapter
from vlmprune.seams.encoder import EmittedLayout, EncoderLayout, EncoderLayoutError
from vlmprune.sequence import PrunedSequence

from tiny import llava_inputs, tiny_llava  # noqa: E402

OLD_SUPPORTED = {  # the table vlmprune.flops kept before the adapters held it
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_every_adapter_names_its_config_types():
    for cls in adapters.ADAPTERS:
        assert len(cls.model_types) == len(cls.model_classes), cls
    assert vlmprune.flops.supported_model_types() == OLD_SUPPORTED
    assert vlmprune.flops.SUPPORTED_MODEL_TYPES == OLD_SUPPORTED
    assert for_config(LlavaConfig()) is LlavaAdapter
    assert for_config(LlamaConfig()) is None


def test_text_head_dim_is_a_family_fact():
    qwen = Qwen2VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4, head_dim=32))
    assert for_text_config(qwen.text_config) is Qwen2VLAdapter
    assert Qwen2VLAdapter.text_head_dim(qwen.text_config) == 16  # hidden // heads, whatever head_dim says
    llama = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32)
    assert for_text_config(llama) is Adapter and Adapter.text_head_dim(llama) == 32


def test_encoder_layouts_per_family():
    from test_internvl import tiny_internvl
    from test_qwen2_vl import make_batch, tiny_qwen2_vl

    llava = for_model(tiny_llava())
    layout = llava.encoder_layout()
    assert isinstance(layout, EncoderLayout)
    assert len(layout.blocks) == 3 and layout.has_cls and layout.feature_block == 1 and layout.tokens == 16
    assert layout.projector is llava.inner.multi_modal_projector

    qwen = for_model(tiny_qwen2_vl())
    layout = qwen.encoder_layout()
    inputs = make_batch(qwen.model, [dict(images=[(1, 8, 8), (1, 4, 8)])])
    assert isinstance(layout, EmittedLayout) and layout.tokens is None
    assert layout.group_sizes(inputs) == qwen.image_group_sizes(inputs) == [16, 8]
    assert layout.features(inputs).shape[0] == 24

    ivl = for_model(tiny_internvl())
    layout = ivl.encoder_layout()
    assert isinstance(layout, EmittedLayout) and layout.module is ivl.inner.multi_modal_projector
    assert layout.group_sizes({"pixel_values": torch.zeros(3, 3, 32, 32)}) == [layout.tokens] * 3

    with pytest.raises(EncoderLayoutError, match="exposes no encoder block layout"):
        Adapter(SimpleNamespace(model=None, config=None)).encoder_layout()


def test_split_join_and_encode_images():
    from test_llava_next import SIZE, tiny_onevision
    from test_qwen2_vl import make_batch, tiny_qwen2_vl

    qwen = for_model(tiny_qwen2_vl())
    inputs = make_batch(qwen.model, [dict(images=[(1, 8, 8), (1, 4, 8), (1, 8, 4)])])
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    images = qwen.split_images(pv, image_grid_thw=grid)
    assert [im["pixel_values"].shape[0] for im in images] == [64, 32, 32]
    joined = qwen.join_images(images)
    assert torch.equal(joined["pixel_values"], pv) and torch.equal(joined["image_grid_thw"], grid)
    ref = qwen.vision_tower(pv, grid_thw=grid).pooler_output
    assert torch.equal(qwen.encode_images(**joined).pooler_output, ref)
    with pytest.raises(ValueError, match="image_grid_thw"):
        qwen.split_images(pv)

    ov = for_model(tiny_onevision())
    crops = torch.randn(2, 5, 3, SIZE, SIZE)
    sizes = torch.tensor([[40, 90], [100, 100]])  # 3 and 5 crops
    images = ov.split_images(crops, image_sizes=sizes)
    assert [im["pixel_values"].shape[0] for im in images] == [3, 5]
    assert torch.equal(ov.join_images(images)["pixel_values"], torch.cat([crops[0, :3], crops[1]]))
    # an image in a several-image sample is not AnyRes-patched: its base view only
    assert [im["pixel_values"].shape[0] for im in ov.split_images(crops, image_sizes=sizes,
                                                                  batch_num_images=[2])] == [1, 1]
    flat = torch.cat([crops[0, :3], crops[1]])
    got = ov.encode_images(crops, image_sizes=sizes).last_hidden_state
    assert torch.equal(got, ov.vision_tower(flat).last_hidden_state)
    with pytest.raises(ValueError, match="image_sizes"):
        ov.split_images(crops)


def test_positions_interface_defaults_and_mrope():
    from test_qwen2_vl import make_batch, tiny_qwen2_vl

    llava = for_model(tiny_llava())
    pos = torch.arange(6).unsqueeze(0)
    assert llava.rope_positions(pos) is pos and llava.continuation_positions(pos) is pos
    pruned = PrunedSequence(torch.zeros(1, 6, 4), None, pos, pos, pos[:, -1] + 1, torch.zeros(1))
    assert llava.pooled_video_positions(pruned, pos, []) is pruned

    model = tiny_qwen2_vl()
    qwen = for_model(model)
    with_text = torch.arange(4 * 2 * 5).view(4, 2, 5)
    assert torch.equal(qwen.rope_positions(with_text), with_text[1:])
    assert torch.equal(qwen.rope_positions(with_text[1:]), with_text[1:])
    inputs = make_batch(model, [dict(images=[(1, 8, 8)])])
    model(**inputs)  # the prefill sets the model's rope_deltas
    length = inputs["input_ids"].shape[1]
    nxt = qwen.continuation_positions(torch.tensor([[length, length + 1]]))
    want = torch.tensor([length, length + 1]) + int(model.model.rope_deltas[0, 0])
    assert nxt.shape == (3, 1, 2) and all(torch.equal(nxt[a, 0], want) for a in range(3))


def test_vision_flops_come_from_the_adapter():
    model = tiny_llava()
    inputs = llava_inputs(model, batch=2)
    got = vlmprune.flops.vision_flops(model, inputs)
    assert got == LlavaAdapter.vision_flops(model.config, inputs) and got[0] > 0 and got[1] > 0
    with pytest.raises(ValueError, match="no encoder block layout"):
        Adapter.vision_flops_at_lengths(model.config, 1, [(17, 17)], 16, 1)
