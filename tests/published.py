"""Published geometries with their real processors, built locally (no weights, no hub).

Each entry writes the published checkpoint's config into code: the vision tower at full size, the
LLM at its real widths (hidden, heads, KV heads, MLP, vocabulary) but only ``LLM_LAYERS`` deep, the
special-token ids and the image / video processor's published preprocessing settings. The tokenizer
is built locally: a small word-level vocabulary plus the published special tokens at their published
ids, and the published chat template's shape. Random weights: this tier checks mechanics (token
counts, layouts, positions, dtypes) at real sizes, not accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

LLM_LAYERS = 4
WORDS = ["user", "assistant", "system", "describe", "the", "image", "video", "what", "is", "in", "this", "?",
         "a", "picture", "how", "many", "objects", "are", "there", "."]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tokenizer(specials: dict[int, str], pad: str, eos: str, bos: str | None = None, template: str | None = None) -> Any:
    """Word-level tokenizer: ``WORDS`` at low ids, the published special tokens at their published ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    taken = set(specials)
    vocab = dict((tok, i) for i, tok in specials.items())
    free = (i for i in range(10**7) if i not in taken)
    for w in ["<unk>", *WORDS]:
        if w not in vocab:
            vocab[w] = next(free)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    escaped = [t.replace("|", r"\|").replace("<", r"\<").replace(">", r"\>") for t in specials.values()]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("(" + "|".join(escaped) + ")", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos,
                                   unk_token="<unk>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials.values() if t not in (pad, eos, bos)]})
    if template is not None:
        fast.chat_template = template
    return fast


LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% elif c['type'] == 'video' %}VIDEO{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def chatml(image: str, video: str) -> str:
    return CHATML_TEMPLATE.replace("IMAGE", image).replace("VIDEO", video)


@dataclass
class Published:
    name: str  # the published checkpoint this geometry is copied from
    build: Callable[[], tuple[Any, Any]]  # -> (model, processor)
    image_size: tuple[int, int]  # (h, w) of the test pictures: small enough for a CPU, real preprocessing
    video: bool = False


def _finish(model: Any, processor: Any) -> tuple[Any, Any]:
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # every generation runs to max_new_tokens
    return model.eval(), processor


def llava_1_5_7b() -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=LLM_LAYERS, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=32001, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, projector_hidden_act="gelu",
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
                      pad_token_id=32001)
    cfg._attn_implementation = "sdpa"
    tok = tokenizer({0: "<unk0>", 1: "<s>", 2: "</s>", 32000: "<image>", 32001: "<pad>"}, pad="<pad>", eos="</s>",
                    bos="<s>", template=LLAVA_TEMPLATE)
    image = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                               do_center_crop=True, resample=3, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    proc = LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    torch.manual_seed(0)
    return _finish(LlavaForConditionalGeneration(cfg), proc)


def llava_v1_6_mistral_7b() -> tuple[Any, Any]:
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=LLM_LAYERS, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32064, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         rope_theta=1e6, sliding_window=None, pad_token_id=32001)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=32000, image_grid_pinpoints=pinpoints,
                          vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576)
    cfg._attn_implementation = "sdpa"
    tok = tokenizer({0: "<unk0>", 1: "<s>", 2: "</s>", 32000: "<image>", 32001: "<pad>"}, pad="<pad>", eos="</s>",
                    bos="<s>", template=LLAVA_TEMPLATE)
    image = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=pinpoints, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    proc = LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_TEMPLATE)
    torch.manual_seed(0)
    return _finish(LlavaNextForConditionalGeneration(cfg), proc)


def _qwen_tokens() -> dict[int, str]:
    return {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151652: "<|vision_start|>",
            151653: "<|vision_end|>", 151655: "<|image_pad|>", 151656: "<|video_pad|>"}


def _qwen_processor(patch: int = 14) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    template = chatml("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>")
    tok = tokenizer(_qwen_tokens(), pad="<|endoftext|>", eos="<|im_end|>", template=template)
    geometry = dict(patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
                    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**geometry), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(**geometry), chat_template=template)


def _qwen_ids() -> dict[str, int]:
    return dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def qwen2_vl_2b() -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=LLM_LAYERS, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=text, **_qwen_ids())
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return _finish(Qwen2VLForConditionalGeneration(cfg), _qwen_processor())


#: Qwen2.5-VL language models: (hidden, intermediate, heads, kv heads, vocab, tied embeddings)
QWEN2_5_VL_TEXT = {"3b": (2048, 11008, 16, 2, 151936, True), "7b": (3584, 18944, 28, 4, 152064, False)}


def qwen2_5_vl_3b() -> tuple[Any, Any]:
    return qwen2_5_vl("3b")


def qwen2_5_vl_7b() -> tuple[Any, Any]:
    return qwen2_5_vl("7b")


def qwen2_5_vl(size: str) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    width, inter, heads, kv, vocab, tied = QWEN2_5_VL_TEXT[size]
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=width, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  tokens_per_second=2, hidden_act="silu")
    text = dict(hidden_size=width, intermediate_size=inter, num_hidden_layers=LLM_LAYERS, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=tied, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_qwen_ids())
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return _finish(Qwen2_5_VLForConditionalGeneration(cfg), _qwen_processor())


def _qwen2_05b_text(**kw: Any) -> Any:
    from transformers import Qwen2Config

    base = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=LLM_LAYERS, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_theta=1e6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                pad_token_id=151643)
    base.update(kw)
    return Qwen2Config(**base)


def llava_onevision_qwen2_0_5b() -> tuple[Any, Any]:
    return llava_onevision(_qwen2_05b_text(vocab_size=152000))


def llava_onevision_qwen2_7b() -> tuple[Any, Any]:
    """Qwen2-7B language model (LLaVA-OneVision-Qwen2-7B)."""
    return llava_onevision(_qwen2_05b_text(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                           num_key_value_heads=4, vocab_size=152128, tie_word_embeddings=False))


def llava_onevision(text: Any) -> tuple[Any, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        SiglipVisionConfig,
    )

    sizes = [384 * i for i in range(1, 7)]
    pinpoints = [[h, w] for h in sizes for w in sizes]
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                image_size=384, patch_size=14, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                               image_token_index=151646, video_token_index=151647, image_grid_pinpoints=pinpoints,
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               vision_aspect_ratio="anyres_max_9")
    cfg._attn_implementation = "sdpa"
    specials = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<image>",
                151647: "<video>"}
    template = chatml("<image>\n", "<video>\n")
    tok = tokenizer(specials, pad="<|endoftext|>", eos="<|im_end|>", template=template)
    siglip = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints,
                                                     **siglip),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}, **siglip),
        tokenizer=tok, num_image_tokens=729, vision_feature_select_strategy="full", chat_template=template,
        vision_aspect_ratio="anyres_max_9",
    )
    torch.manual_seed(0)
    return _finish(LlavaOnevisionForConditionalGeneration(cfg), proc)


def internvl3_1b() -> tuple[Any, Any]:
    return internvl3(_qwen2_05b_text(vocab_size=151674))


def internvl3_2b() -> tuple[Any, Any]:
    """Qwen2.5-1.5B language model (InternVL3-2B)."""
    return internvl3(_qwen2_05b_text(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                                     num_key_value_heads=2, vocab_size=151674))


def internvl3(text: Any) -> tuple[Any, Any]:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
    )

    vision = InternVLVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=[448, 448], patch_size=[14, 14], use_qk_norm=False, use_mean_pooling=True,
                                  layer_scale_init_value=0.1, norm_type="layer_norm")
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=151667,
                         image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    specials = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151665: "<img>",
                151666: "</img>", 151667: "<IMG_CONTEXT>", 151670: "<video>"}
    template = chatml("<IMG_CONTEXT>\n", "<video>\n")
    tok = tokenizer(specials, pad="<|endoftext|>", eos="<|im_end|>", template=template)
    tok.start_image_token, tok.end_image_token, tok.context_image_token = "<img>", "</img>", "<IMG_CONTEXT>"
    tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id = 151665, 151666, 151667
    tok.video_token = "<video>"
    image = GotOcr2ImageProcessor(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                  max_patches=12, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    proc = InternVLProcessor(image_processor=image, tokenizer=tok, image_seq_length=256, chat_template=template,
                             video_processor=InternVLVideoProcessor(size={"height": 448, "width": 448}))
    torch.manual_seed(0)
    return _finish(InternVLForConditionalGeneration(cfg), proc)


PUBLISHED = {
    "llava-1.5-7b": Published("llava-hf/llava-1.5-7b-hf", llava_1_5_7b, (300, 400)),
    "llava-v1.6-mistral-7b": Published("llava-hf/llava-v1.6-mistral-7b-hf", llava_v1_6_mistral_7b, (300, 600)),
    "llava-onevision-0.5b": Published("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", llava_onevision_qwen2_0_5b, (380, 380)),
    "qwen2-vl-2b": Published("Qwen/Qwen2-VL-2B-Instruct", qwen2_vl_2b, (224, 308)),
    "qwen2.5-vl-3b": Published("Qwen/Qwen2.5-VL-3B-Instruct", qwen2_5_vl_3b, (224, 308)),
    "internvl3-1b": Published("OpenGVLab/InternVL3-1B-hf", internvl3_1b, (448, 448)),
    "llava-onevision-7b": Published("llava-hf/llava-onevision-qwen2-7b-ov-hf", llava_onevision_qwen2_7b, (380, 380)),
    "qwen2.5-vl-7b": Published("Qwen/Qwen2.5-VL-7B-Instruct", qwen2_5_vl_7b, (224, 308)),
    "internvl3-2b": Published("OpenGVLab/InternVL3-2B-hf", internvl3_2b, (448, 448)),
}
