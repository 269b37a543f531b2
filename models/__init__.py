"""Single-device models, written as if no parallelism existed."""

from unroll.models.config import ModelConfig
from unroll.models.lm import LM

__all__ = ["LM", "ModelConfig"]
