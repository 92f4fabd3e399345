"""Spatial average pooling of visual tokens before the LLM."""

from .config import PoolConfig
from .method import SpatialPool

__all__ = ["PoolConfig", "SpatialPool"]
