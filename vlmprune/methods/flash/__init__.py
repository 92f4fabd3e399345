"""FLASH: lossless speculative decoding with a latent-aware draft (the decode seam)."""

from .config import FlashConfig
from .method import Flash, untrained_head

__all__ = ["FlashConfig", "Flash", "untrained_head"]
