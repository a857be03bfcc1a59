"""One serving process: the pipeline, its fastcache handle, the engine, the metrics, and the warm-up.

``fastcache serve`` and each Ray Serve replica build one ``Service`` from the same ``ServiceOptions``; the warm-up
runs every declared bucket through the serving path, loading and then saving the persistent compile cache.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from ..config import FastCacheConfig
from ..environment import environment
from ..handle import compile_pipeline
from ..models import PRESETS, check_device, default_dtype, has_text_encoder, open_pipeline
from ..partition import downsampling_factor
from . import compile_cache
from .compile_cache import CompileCache
from .engine import Engine, EngineConfig
from .metrics import ServeMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceOptions:
    """What to serve and how (``fastcache serve``'s options). Checks itself at construction (``ValueError`` naming the
    field and what is valid), so a Python or Ray caller gets the command line's checks; what needs the model's
    configs (the branch's range, the pixel multiple) is checked once the model is loaded."""

    model: str | None = None  # a diffusers folder or hub id; None: the preset
    preset: str = "tiny-sd"
    device: str = "cpu"
    cache: FastCacheConfig = field(default_factory=FastCacheConfig)  # compile_pipeline's options
    cache_dir: str | None = None  # persistent compile cache
    seed: int = 0  # of the preset's random weights
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        if self.model is None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {self.preset!r}.")
        check_device(self.device)
        for name, kind in (("cache", FastCacheConfig), ("engine", EngineConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}; got {type(getattr(self, name)).__name__}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {self.seed!r}.")

    @property
    def dtype(self) -> torch.dtype:
        return default_dtype(self.device)

    @property
    def model_name(self) -> str:
        return self.model or self.preset


class Service:
    """Everything one process serves with. ``warm_up()`` then ``engine.ready`` is set."""

    def __init__(self, options: ServiceOptions):
        self.options = options
        # the compile cache's folders are set before anything compiles
        self.cache = CompileCache(options.cache_dir, self.identity()) if options.cache_dir else None
        self.pipe, self.label = open_pipeline(options.model, options.preset, device=options.device,
                                              dtype=options.dtype, seed=options.seed)
        self.handle = compile_pipeline(self.pipe, config=options.cache)
        self.metrics = ServeMetrics(self.handle)
        self.engine = Engine(self.pipe, self._engine_config(), self.handle, self.metrics.on_batch)
        self.metrics.queue_depth.set_function(lambda: self.engine.queue_depth)
        self.warmup_seconds: float | None = None
        logger.info("fastcache: serving %s on %s (%s)", self.label, options.device, options.dtype)

    def _engine_config(self) -> EngineConfig:
        """The engine's options, with the loaded model's real pixel multiple (a hub model's is known only now)."""
        multiple = self.pipe.vae_scale_factor * downsampling_factor(self.pipe.unet)
        return replace(self.options.engine, pixel_multiple=multiple)  # checks the sizes against it

    def identity(self) -> dict:
        """What the compiled code depends on: the compile cache of another process is reused only if all match."""
        options = asdict(self.options)
        for unrelated in ("cache_dir", "seed"):  # the weights' values are graph inputs, not code
            del options[unrelated]
        if self.options.model and os.path.isdir(self.options.model):
            options["model"] = os.path.abspath(self.options.model)
        options["engine"] = {key: options["engine"][key] for key in ("batch_sizes", "sizes", "guidance")}
        return dict(options, **self.environment())

    def environment(self) -> dict:
        """Card and versions, for ``/v1/models``, the warm-up report and the compile cache's identity."""
        return environment(self.options.device)

    @property
    def text_encoder(self) -> bool:
        return has_text_encoder(self.pipe)

    def warm_up(self, progress: bool = True) -> dict:
        """Compile and capture every bucket (from the compile cache where it has them), then mark the engine ready;
        a report: seconds in all and per bucket, the cache's state, its hits, the environment."""
        loaded = self.cache.load() if self.cache else False
        start = time.perf_counter()
        per_bucket = self.engine.warm_up(progress)
        self.warmup_seconds = seconds = time.perf_counter() - start
        state = "warm" if loaded else "cold"
        cache = self.options.cache
        self.metrics.warmup_seconds.labels(state).set(seconds)
        self.metrics.eager_buckets.set(len(self.engine.eager_buckets))
        saved = self.cache.save() if self.cache else 0
        hits = compile_cache.hits()
        logger.info("fastcache: warm-up of %d buckets done in %.1f s (%s compile cache; %s)", len(per_bucket), seconds,
                    state, ", ".join(f"{name} {count}" for name, count in hits.items()))
        self.engine.ready.set()
        return dict(seconds=seconds, cache=state, artifacts_loaded=self.cache.loaded if self.cache else 0,
                    artifacts_saved=saved, buckets={str(bucket): s for bucket, s in per_bucket.items()},
                    eager_buckets=[str(bucket) for bucket in self.engine.eager_buckets], model=self.options.model_name,
                    interval=cache.interval, branch=cache.branch, compile=cache.compile and cache.mode, **hits,
                    **self.environment())
