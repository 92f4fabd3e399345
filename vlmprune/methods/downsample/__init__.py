from .config import DownsampleConfig
from .method import Downsample

__all__ = ["DownsampleConfig", "Downsample"]
