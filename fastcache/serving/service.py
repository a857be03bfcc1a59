"""One serving process: the pipeline, its fastcache handle, the engine, the metrics, and the warm-up.

``fastcache serve`` and each Ray Serve replica build one ``Service`` from the same ``ServiceOptions``; the warm-up
runs every declared bucket through the serving path, loading and then saving the persistent compile cache. A model
that makes video (AnimateDiff, SVD) is served as ``video`` (``video_pipeline.VideoModel``): its buckets are warmed
too, and the engine's thread runs its jobs; such a server serves no images.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..config import FastCacheConfig
from ..environment import environment
from ..handle import compile_pipeline
from ..models import INPAINT_PRESETS, PRESETS, check_device, default_dtype, has_text_encoder, open_pipeline
from ..partition import downsampling_factor
from ..video_models import VIDEO_PRESETS
from . import compile_cache
from .compile_cache import CompileCache
from .edits import inpainting_model
from .engine import Engine, EngineConfig, Target
from .loras import LoraOptions, ServedLoras
from .metrics import ServeMetrics
from .video_options import VideoOptions

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
    # an inpainting model (9-channel UNet) for masked edits, with a fastcache handle of its own; neither: the base
    # model inpaints
    inpaint_model: str | None = None  # a diffusers folder or hub id
    inpaint_preset: str | None = None  # one of models.INPAINT_PRESETS (random weights)
    # measured speed and fidelity per cache level, shown by /v1/models: {interval: {"speedup": ..., "psnr_db": ...}},
    # as fastcache.tuning.report.levels(FILE) gives them (serve --tuned FILE passes them)
    level_labels: Mapping[int, Mapping[str, Any]] | None = None
    lora: LoraOptions = field(default_factory=LoraOptions)  # LoRA adapters a request may ask for (--lora NAME=PATH)
    video: VideoOptions = field(default_factory=VideoOptions)  # a video model's buckets, job store and limits

    def __post_init__(self):
        if self.model is None and self.preset not in PRESETS and self.preset not in VIDEO_PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)} (or a video preset: {sorted(VIDEO_PRESETS)}); "
                             f"got {self.preset!r}.")
        check_device(self.device)
        for name, kind in (("cache", FastCacheConfig), ("engine", EngineConfig), ("lora", LoraOptions),
                           ("video", VideoOptions)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}; got {type(getattr(self, name)).__name__}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {self.seed!r}.")
        if self.level_labels is not None and not (isinstance(self.level_labels, Mapping) and all(
                isinstance(labels, Mapping) for labels in self.level_labels.values())):
            raise TypeError(f"level_labels must map intervals to mappings of labels; got {self.level_labels!r}.")
        if self.inpaint_model is not None and self.inpaint_preset is not None:
            raise ValueError("inpaint_model and inpaint_preset are exclusive: give one of them.")
        if self.inpaint_preset is not None and self.inpaint_preset not in INPAINT_PRESETS:
            raise ValueError(f"inpaint_preset must be one of {sorted(INPAINT_PRESETS)}; got {self.inpaint_preset!r}.")
        if self.inpainting_model and "inpaint" not in self.engine.edits:
            raise ValueError("inpaint_model/inpaint_preset serve masked edits: engine.edits must include 'inpaint'.")
        intervals, interval = self.engine.intervals, self.cache.interval
        if intervals and self.cache.plan.kind == "explicit":
            raise ValueError("intervals need a uniform or quad-center schedule (an explicit one has no interval).")
        if intervals and interval not in intervals:
            raise ValueError(f"intervals must include the server's interval ({interval}); got {intervals!r}.")

    @property
    def dtype(self) -> torch.dtype:
        return default_dtype(self.device)

    @property
    def model_name(self) -> str:
        return self.model or self.preset

    @property
    def inpainting_model(self) -> str | None:
        """The inpainting model's name, if one is served beside the base model."""
        return self.inpaint_model or self.inpaint_preset


class Service:
    """Everything one process serves with. ``warm_up()`` then ``engine.ready`` is set."""

    def __init__(self, options: ServiceOptions):
        self.options = options
        # the compile cache's folders are set before anything compiles
        self.cache = CompileCache(options.cache_dir, self.identity()) if options.cache_dir else None
        self.pipe, self.label = open_pipeline(options.model, options.preset, device=options.device,
                                              dtype=options.dtype, seed=options.seed)
        video = self._video_module()  # None: the model makes images
        # the LoRA slots go in before anything compiles: the graphs are made with them
        self.loras = ServedLoras(options.lora, type(self.pipe), options.dtype) if options.lora.adapters else None
        if self.loras is not None:
            self.loras.attach(self.pipe)
        self.handle = compile_pipeline(self.pipe, config=options.cache)
        targets = {"inpaint": self._inpainting_target()} if options.inpainting_model else {}
        self.engine = Engine(self.pipe, self._engine_config(images=video is None), self.handle, targets=targets,
                             loras=self.loras, images=video is None)
        frames = VIDEO_PRESETS.get(options.preset, {}).get("frames") if options.model is None else None
        self.video = video.VideoModel(self.pipe, self.engine, options.video, frames) if video else None
        self.metrics = ServeMetrics(self.engine.handles, self.loras)
        self.engine.on_batch = self.metrics.on_batch
        self.metrics.queue_depth.set_function(lambda: self.engine.queue_depth)
        self.warmup_seconds: float | None = None
        self.warmup_cache: str | None = None  # cold or warm: whether the compile cache had this configuration
        logger.info("fastcache: serving %s on %s (%s)", self.label, options.device, options.dtype)

    def _video_module(self):
        """The ``video_pipeline`` module if the model makes video (checking that PyAV is there to encode it, that no
        inpainting model is asked for, and that LoRAs are only asked of a pipeline that loads them), else ``None``."""
        from ..extras import require
        from ..video_models import is_video
        from . import video_pipeline
        from .video_options import VIDEO_PIPELINES

        if not video_pipeline.is_video_pipeline(self.pipe):
            if is_video(self.pipe):
                raise ValueError(f"{type(self.pipe).__name__} is not served; the video pipelines served are "
                                 f"{', '.join(VIDEO_PIPELINES)}.")
            return None
        require("video")  # PyAV encodes the MP4s: one line naming the pip install
        if self.options.inpainting_model:
            raise ValueError(f"{self.options.model_name} makes video: it takes no inpainting model (image edits).")
        if self.options.lora.adapters and not hasattr(self.pipe, "lora_state_dict"):
            raise ValueError(f"lora: {type(self.pipe).__name__} loads no LoRA adapters; serve it without --lora.")
        return video_pipeline

    def _inpainting_target(self) -> Target:
        """The inpainting model's pipeline with its own fastcache handle (same options); its sizes must be the base
        model's."""
        options = self.options
        pipe, label = open_pipeline(options.inpaint_model, options.inpaint_preset or "", device=options.device,
                                    dtype=options.dtype, seed=options.seed)
        pipe = inpainting_model(pipe)
        multiple = pipe.vae_scale_factor * downsampling_factor(pipe.unet)
        if multiple != self.pipe.vae_scale_factor * downsampling_factor(self.pipe.unet):
            raise ValueError(f"inpaint model {options.inpainting_model} makes multiples of {multiple} pixels, the base "
                             f"model other ones: serve models of one family.")
        logger.info("fastcache: inpainting with %s", label)
        if self.loras is not None:
            self.loras.attach(pipe)
        return Target(pipe, compile_pipeline(pipe, config=options.cache))

    def _engine_config(self, images: bool = True) -> EngineConfig:
        """The engine's options, with the loaded model's real pixel multiple (a hub model's is known only now); a
        video model's engine serves no image edits; its steps must be fewer than the scheduler's training timesteps
        (diffusers fails at as many: a 500 per request)."""
        multiple = self.pipe.vae_scale_factor * downsampling_factor(self.pipe.unet)
        timesteps = self.pipe.scheduler.config.get("num_train_timesteps")
        if timesteps and self.options.engine.max_steps >= timesteps:
            raise ValueError(f"max_steps must be below this model's {timesteps} training timesteps (its scheduler "
                             f"fails at {timesteps}); got {self.options.engine.max_steps}.")
        edits = {} if images else {"edits": ()}
        return replace(self.options.engine, pixel_multiple=multiple, **edits)  # checks the sizes against it

    def identity(self) -> dict:
        """What the compiled code depends on: the compile cache of another process is reused only if all match."""
        options = asdict(self.options)
        for unrelated in ("cache_dir", "seed", "level_labels"):  # the weights' values are graph inputs, not code
            del options[unrelated]
        for name in ("model", "inpaint_model"):
            if options[name] and os.path.isdir(options[name]):
                options[name] = os.path.abspath(options[name])
        options["engine"] = {key: options["engine"][key] for key in ("batch_sizes", "sizes", "guidance", "edits")}
        options["video"] = {key: options["video"][key] for key in ("sizes", "frames")}  # the video buckets
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
        if self.video is not None:
            per_bucket.update(self.video.warm_up(progress))
        self.warmup_seconds = seconds = time.perf_counter() - start
        self.warmup_cache = state = "warm" if loaded else "cold"
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
                    interval=cache.interval, intervals=list(self.engine.levels), branch=cache.branch,
                    compile=cache.compile and cache.mode, dynamic_batch=cache.dynamic_batch,
                    compiles=sum(handle.counters.compiles for handle in self.engine.handles), **hits,
                    **self.environment())
