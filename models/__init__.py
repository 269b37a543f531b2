"""Single-device models, written as if no parallelism existed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from unroll.models.config import ModelConfig

if TYPE_CHECKING:
    from unroll.models.lm import LM

__all__ = ["LM", "ModelConfig"]


def __getattr__(name: str) -> object:
    # LM imports torch (seconds): only when asked, so that the config schema, `--keys`, `presets` and every
    # config error of the command line answer without it
    if name == "LM":
        from unroll.models.lm import LM

        return LM
    raise AttributeError(f"module 'unroll.models' has no attribute {name!r}")
