"""Teacher-forcing batches from the built-in benchmark's data, shared by the trainers.

Each prompt is ``<image>... question answer </s>`` with the answer last (left padding keeps it
right-aligned), so a trainer scores the last ``answer_len`` tokens. Deterministic per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: model inputs (left-padded, answers last) and the number of answer tokens per sample
Batch = tuple[dict[str, Tensor], Tensor]


def answer_batches(processor: Any, batch_size: int, seed: int, *, split: str = "train", video_share: float = 0.3,
                   caption_share: float = 0.3, offset: int = 500_000) -> Callable[[int], Batch]:
    """Batch ``step``: a clip with ``video_share`` (its question, or its caption with
    ``caption_share``), else an image with one of its questions; sample indices start at
    ``offset``, away from the ones the built-in model was trained on first."""
    from . import builtin, data

    eos = processor.tokenizer.eos_token

    def make(step: int) -> Batch:
        rng = np.random.default_rng(seed * 1_000_003 + step)
        prompts, images, lengths = [], [], []
        for i in range(batch_size):
            index = (offset + step * batch_size + i) % 999_999
            if video_share >= 1.0 or rng.random() < video_share:
                clip = data.make_video(split, index)
                imgs = data.mosaic(clip.frames)
                if rng.random() < caption_share:
                    words, answer = list(builtin.CAPTION_WORDS), clip.caption.split()
                else:
                    q = clip.questions[int(rng.integers(len(clip.questions)))]
                    words, answer = list(q.words), [q.answer]
            else:
                sample = data.make_image(split, index)
                imgs = [sample.image]
                q = sample.questions[int(rng.integers(len(sample.questions)))]
                words, answer = list(q.words), [q.answer]
            prompts.append(builtin.image_prompt(words + answer + [eos], len(imgs)))
            images.append(imgs)
            lengths.append(len(answer) + 1)
        return builtin.encode(processor, prompts, images), torch.tensor(lengths)

    return make
