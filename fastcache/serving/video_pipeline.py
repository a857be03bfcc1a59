"""The served video model: which pipelines make video, the one function that calls them, and what a server serves.

``video_kwargs``/``run_video`` are the only place a video pipeline is called (a request's job, its warm-up, and a
test's direct call give the same video for the same seed): text to video (AnimateDiff) from prompt embeddings as the
images API makes them, image to video (Stable Video Diffusion) from an image; progress from the pipeline's
``callback_on_step_end``. ``VideoModel`` holds the served buckets (sizes x frames x guidance), checks a request
against them and warms them up; its calls run on the engine's thread, as image batches do.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AnimateDiffPipeline, StableVideoDiffusionPipeline
from PIL import Image

from ..models import prompt_inputs
from ..partition import downsampling_factor
from .edits import WARMUP_GRAY
from .request import InvalidRequest, size_problem
from .video_options import VideoOptions
from .video_request import VideoRequest

logger = logging.getLogger(__name__)

# the pipelines served at /v1/videos (a family's call is video_kwargs'); other video pipelines are refused at start
TEXT_TO_VIDEO = (AnimateDiffPipeline,)
IMAGE_TO_VIDEO = (StableVideoDiffusionPipeline,)
WARMUP_PROMPT = "fastcache warm-up"
# the defaults of each family's pipeline call: frames per second (SVD is conditioned on it), guidance
_DEFAULT_FPS = {"text": 8, "image": 7}
_DEFAULT_GUIDANCE = {"text": 7.5, "image": 3.0}  # SVD: max_guidance_scale (its guidance rises per frame from 1)


def is_video_pipeline(pipe) -> bool:
    return isinstance(pipe, TEXT_TO_VIDEO + IMAGE_TO_VIDEO)


def video_kwargs(pipe, request: VideoRequest) -> dict:
    """The keyword arguments of the pipeline call that makes ``request``'s video (frames as floats in [0, 1])."""
    kwargs = dict(num_frames=request.frames, height=request.height, width=request.width,
                  num_inference_steps=request.steps, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(request.seed))
    if isinstance(pipe, IMAGE_TO_VIDEO):
        return dict(kwargs, image=request.image, fps=request.fps, min_guidance_scale=1.0,
                    max_guidance_scale=request.guidance_scale)
    negatives = [request.negative_prompt] if request.negative_prompt else None
    return dict(kwargs, guidance_scale=request.guidance_scale, **prompt_inputs(pipe, [request.prompt], negatives))


def run_video(pipe, request: VideoRequest, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """One pipeline call: the video's frames, (frames, height, width, 3) floats in [0, 1]. ``progress(done, total)``
    after each denoising step (it may raise to stop the call)."""
    kwargs = video_kwargs(pipe, request)
    if progress is not None:
        def on_step_end(pipeline, step, timestep, tensors):
            progress(step + 1, pipeline.num_timesteps)
            return tensors

        kwargs["callback_on_step_end"] = on_step_end
    return pipe(**kwargs).frames[0]


@dataclass(frozen=True)
class VideoBucket:
    """One video shape warmed up: pixels, frames, classifier-free guidance on/off."""

    width: int
    height: int
    frames: int
    guidance: bool

    def __str__(self) -> str:
        return f"video {self.width}x{self.height}, {self.frames} frames, guidance {'on' if self.guidance else 'off'}"


class VideoModel:
    """A video pipeline as a server serves it: its buckets (``options``' sizes and frames, or the model's own, with
    the engine's guidance modes), steps and cache levels (the engine's, whose handle is the pipeline's), its defaults,
    and the call of a request. ``default_frames``: a preset's frame count (else AnimateDiff's call's, at most its
    motion adapter's limit, or SVD's UNet's). ``ValueError`` at construction for buckets the model cannot make
    (frames beyond the motion adapter's limit, sizes off its pixel multiple)."""

    def __init__(self, pipe, engine, options: VideoOptions, default_frames: int | None = None):
        self.pipe, self.engine, self.options = pipe, engine, options
        self.handle = engine.handle
        self.takes_image = isinstance(pipe, IMAGE_TO_VIDEO)
        family = "image" if self.takes_image else "text"
        config = pipe.unet.config
        self.pixel_multiple = pipe.vae_scale_factor * downsampling_factor(pipe.unet)
        native = config.sample_size * pipe.vae_scale_factor
        self.sizes = options.sizes or ((native, native),)
        # AnimateDiff's motion modules have positional embeddings for so many frames (FreeNoise, not served, windows)
        self.max_frames = config.get("motion_max_seq_length") if not self.takes_image else None
        default = config.get("num_frames") if self.takes_image else inspect.signature(
            type(pipe).__call__).parameters["num_frames"].default
        self.frames = options.frames or (default_frames or min(default, self.max_frames or default),)
        self.default_fps = options.fps or _DEFAULT_FPS[family]
        self.default_guidance = _DEFAULT_GUIDANCE[family]
        for width, height in self.sizes:
            problem = size_problem(width, height, self.pixel_multiple)
            if problem:
                raise ValueError(f"video_sizes must be multiples of {self.pixel_multiple} pixels for this model; got "
                                 f"{width}x{height}")
        if self.max_frames and max(self.frames) > self.max_frames:
            raise ValueError(f"video_frames must be at most {self.max_frames} for this model (its motion adapter's "
                             f"motion_max_seq_length); got {max(self.frames)}")

    # -- what is served ------------------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        return self.engine.config.steps

    @property
    def max_steps(self) -> int:
        return self.engine.config.max_steps

    @property
    def levels(self) -> tuple[int, ...]:
        return self.engine.levels

    @property
    def max_upload(self) -> int:
        return self.engine.config.max_size

    def buckets(self) -> list[VideoBucket]:
        return [VideoBucket(width, height, frames, guidance) for width, height in self.sizes
                for frames in self.frames for guidance in self.engine.config.guidance]

    def check_size(self, width: int, height: int) -> None:
        if (width, height) not in self.sizes:
            sizes = ", ".join(f"{w}x{h}" for w, h in self.sizes)
            raise InvalidRequest(f"size {width}x{height} is not served for video; served sizes: {sizes}.", "size")

    def lengths(self, fps: int) -> str:
        """The served frame counts and how long each lasts at ``fps``."""
        return ", ".join(f"{n} ({n / fps:.3g} s)" for n in self.frames)

    def check_frames(self, frames: int, fps: int) -> None:
        if frames not in self.frames:
            raise InvalidRequest(f"num_frames {frames} is not served; served frame counts (at {fps} fps): "
                                 f"{self.lengths(fps)}.", "num_frames")

    def check(self, request: VideoRequest) -> None:
        """``InvalidRequest`` naming what is served unless a warmed bucket and this server's levels and adapters
        take ``request``."""
        self.check_size(request.width, request.height)
        self.check_frames(request.frames, request.fps)
        if not 1 <= request.steps <= self.max_steps:
            raise InvalidRequest(f"num_inference_steps must be between 1 and {self.max_steps}; got {request.steps}.",
                                 "num_inference_steps")
        guidance = request.guidance_scale > 1
        if guidance not in self.engine.config.guidance:
            raise InvalidRequest(f"guidance_scale {request.guidance_scale:g} turns classifier-free guidance "
                                 f"{'on' if guidance else 'off'}, which this server did not warm up: guidance_scale "
                                 f"must be {'<= 1' if guidance else '> 1'}.", "guidance_scale")
        if request.interval is not None and request.interval not in self.levels:
            levels = ", ".join(map(str, self.levels)) or "none (no cache level on this server)"
            raise InvalidRequest(f"cache.interval {request.interval} is not served; served levels: {levels}.",
                                 "cache")
        if request.lora:
            if self.engine.loras is None:
                raise InvalidRequest("lora: this server serves no LoRA adapters (fastcache serve --lora NAME=PATH "
                                     "loads them).", "lora")
            self.engine.loras.check(request.lora)

    def describe(self) -> dict:
        """What ``/v1/models`` says about video on this server."""
        return {"input": "input_reference (an image)" if self.takes_image else "prompt",
                "sizes": [f"{w}x{h}" for w, h in self.sizes], "frames": list(self.frames),
                "max_frames": self.max_frames, "fps": self.default_fps, "guidance_scale": self.default_guidance,
                "max_jobs": self.options.max_jobs, "ttl_seconds": self.options.ttl,
                "encoding": "H.264 MP4, " + ("lossless RGB" if self.options.crf == 0 else f"crf {self.options.crf}")}

    # -- running -------------------------------------------------------------------------------------------------

    def run(self, request: VideoRequest, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """``request``'s video, with its LoRA adapters and at its cache level (the engine's thread only)."""
        if self.engine.loras is not None:  # every call sets them, as for images
            self.engine.loras.apply(self.pipe.unet, request.lora)
        with self.engine.at_level(self.handle, request.interval):
            return run_video(self.pipe, request, progress)

    def warm_up(self, progress: bool = True) -> dict[VideoBucket, float]:
        """Run every bucket once (compiling and capturing it), until the engine stops; seconds per bucket."""
        from tqdm.auto import tqdm

        seconds = {}
        for bucket in tqdm(self.buckets(), desc="fastcache video warm-up", unit="bucket", disable=not progress):
            if self.engine.stopping:  # shutting down: the remaining buckets are not needed
                logger.info("fastcache: warm-up stopped before %s", bucket)
                break
            image = Image.new("RGB", (bucket.width, bucket.height), (WARMUP_GRAY,) * 3) if self.takes_image else None
            guidance = self.default_guidance if bucket.guidance else 1.0
            request = VideoRequest(WARMUP_PROMPT, bucket.width, bucket.height, bucket.frames, self.default_fps,
                                   self.steps, guidance, seed=0, image=image)
            failures = self.handle.counters.compile_failures if self.handle is not None else 0
            start = time.perf_counter()
            self.run(request)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[bucket] = time.perf_counter() - start
            if self.handle is not None and self.handle.counters.compile_failures > failures:
                self.engine.eager_buckets.append(bucket)
                logger.warning("fastcache: %s failed to compile; it is served by the eager runtime.", bucket)
            logger.info("fastcache: warmed %s in %.1f s", bucket, seconds[bucket])
        return seconds
