"""The built-in model: a small LLaVA-1.5-architecture VLM the project trains on its synthetic tasks.

It is a stock ``LlavaForConditionalGeneration`` (CLIP-style vision tower with a [CLS] token, 224 px,
patch 14 -> 256 visual tokens; Llama-style LM) with a word-level tokenizer, so that every answer is
one token and multiple choice is a comparison of candidate logits at one position. Everything
loads offline with ``from_pretrained`` / ``AutoProcessor`` from the checkpoint shipped in the
package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import GRID, IMAGE_SIZE, PATCH, VOCAB

CHECKPOINT = Path(__file__).parent / "checkpoint"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
IMAGE_TOKEN = "<image>"
CAPTION_WORDS = ("describe", "the", "video", "?")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Sizes:
    """Architecture of the built-in model (about 2.0 M parameters)."""

    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_mlp: int = 512
    max_positions: int = 2048


def vocabulary(extra: Sequence[str] = ()) -> list[str]:
    """The word list, ids in order; ``extra`` words (the captioner's) come after the built-in ones,
    so the built-in ids are the same in both tokenizers."""
    words = list(SPECIALS)
    for w in (*VOCAB, *CAPTION_WORDS, *extra):
        if w not in words:
            words.append(w)
    return words


def build_tokenizer(extra_words: Sequence[str] = ()) -> Any:
    """Word-level tokenizer: one token per word, so each answer is a single token. Every encoded
    text starts with ``<s>``, as Llama tokenizers do: the LM needs that fixed first token as an
    attention sink, or a question whose answer depends on whether something is in the image
    ("is there a red circle?") has nothing to attend to when it is not, and never trains."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def build_processor(tokenizer: Any | None = None) -> Any:
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )


def build_config(tokenizer: Any, sizes: Sizes = Sizes()) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_mlp, num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=sizes.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.text_hidden, intermediate_size=sizes.text_mlp,
        num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_heads, max_position_embeddings=sizes.max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=GRID * GRID,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_untrained(seed: int = 0, sizes: Sizes = Sizes()) -> tuple[Any, Any]:
    """The built-in architecture with random weights (tests, and the start of training)."""
    from transformers import LlavaForConditionalGeneration

    processor = build_processor()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(processor.tokenizer, sizes))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval(), processor


def load_builtin(path: str | Path | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """The shipped trained model and its processor, loaded offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else CHECKPOINT
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no built-in checkpoint at {path}; train one with `vlmprune train-builtin --output {path}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def save_builtin(model: Any, processor: Any, path: str | Path) -> None:
    """Save in the layout of the published llava-hf checkpoints (``vision_tower.vision_model.*``),
    which transformers and vLLM both load (transformers 5 would write ``vision_tower.*``, which
    vLLM does not)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    published_layout(path)


def published_layout(path: str | Path) -> None:
    """Rename the vision tower's weights of a saved LLaVA checkpoint to ``vision_tower.vision_model.*``
    (in place; a checkpoint already in that layout is left as it is)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    def rename(key: str) -> str:
        for prefix in ("vision_tower.", "model.vision_tower."):
            rest = key[len(prefix):]
            if key.startswith(prefix) and not rest.startswith("vision_model."):
                return f"{prefix}vision_model.{rest}"
        return key

    path = Path(path)
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            keys, metadata = list(f.keys()), f.metadata()
            if all(rename(k) == k for k in keys):
                continue
            tensors = {rename(k): f.get_tensor(k) for k in keys}
        save_file(tensors, file, metadata=metadata)
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2) + "\n")


# -- prompts ---------------------------------------------------------------------------------------


def image_prompt(words: Sequence[str], num_images: int = 1) -> str:
    """``<image>`` placeholders then the question; the answer is the next token."""
    return " ".join([IMAGE_TOKEN] * num_images + list(words))


def caption_prompt(num_images: int) -> str:
    return image_prompt(CAPTION_WORDS, num_images)


def encode(processor: Any, prompts: Sequence[str], images: Sequence[Sequence[np.ndarray]]) -> dict[str, Tensor]:
    """Left-padded batch of prompts, each with its list of 224 px images."""
    flat = [img for group in images for img in group]
    for prompt, group in zip(prompts, images):
        if prompt.split().count(IMAGE_TOKEN) != len(group):
            raise ValueError(f"prompt has {prompt.split().count(IMAGE_TOKEN)} <image> tokens but {len(group)} images")
    return dict(processor(images=flat or None, text=list(prompts), return_tensors="pt", padding=True))


def choice_ids(tokenizer: Any, choices: Sequence[str]) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(choices))
    unknown = [c for c, i in zip(choices, ids) if i == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(f"answer words {unknown} are not in the built-in vocabulary")
    return ids
