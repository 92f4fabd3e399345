"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity."""

from .config import VisionZipConfig
from .method import VisionZip

__all__ = ["VisionZipConfig", "VisionZip"]
