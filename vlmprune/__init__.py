"""vlmprune: visual-token reduction for Hugging Face vision-language models."""

from .api import Handle, apply
from .methods.base import MethodConfig, Stage
from .methods.baselines import PoolConfig, RandomConfig
from .methods.dymu import DyMUConfig
from .methods.dyvte import DyVTEConfig
from .methods.fastervlm import FasterVLMConfig
from .methods.flash import FlashConfig
from .methods.slowfast import SlowFastConfig
from .registry import available_methods

__version__ = "0.1.0"

__all__ = [
    "apply",
    "Handle",
    "available_methods",
    "MethodConfig",
    "Stage",
    "FasterVLMConfig",
    "RandomConfig",
    "PoolConfig",
    "DyVTEConfig",
    "DyMUConfig",
    "FlashConfig",
    "SlowFastConfig",
]
