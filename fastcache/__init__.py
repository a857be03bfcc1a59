"""fastcache: DeepCache and torch.compile with CUDA graphs, stacked, for diffusers UNet pipelines."""

from .config import FastCacheConfig
from .counters import Counters
from .handle import FastCacheHandle, compile_pipeline
from .schedule import Schedule, quad_center_steps

__all__ = ["Counters", "FastCacheConfig", "FastCacheHandle", "Schedule", "compile_pipeline", "quad_center_steps"]
__version__ = "0.1.0"
