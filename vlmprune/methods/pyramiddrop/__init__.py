"""PyramidDrop: visual tokens dropped in stages, each keeping a fraction lambda of the previous."""

from .config import PyramidDropConfig
from .method import PyramidDrop

__all__ = ["PyramidDropConfig", "PyramidDrop"]
