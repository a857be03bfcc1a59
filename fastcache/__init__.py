"""fastcache: DeepCache and torch.compile with CUDA graphs, stacked, for diffusers UNet pipelines.

The names below are imported on first use (PEP 562): ``import fastcache.cli`` then checks a command line without
importing diffusers' models (and, through them, transformers), so a bad argument is refused at once, in one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import FastCacheConfig
    from .counters import Counters
    from .handle import FastCacheHandle, compile_pipeline
    from .schedule import Schedule, quad_center_steps

_WHERE = {"FastCacheConfig": "config", "Counters": "counters", "FastCacheHandle": "handle",
          "compile_pipeline": "handle", "Schedule": "schedule", "quad_center_steps": "schedule"}

__all__ = ["Counters", "FastCacheConfig", "FastCacheHandle", "Schedule", "compile_pipeline", "quad_center_steps"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'fastcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
