"""What a video server serves and keeps (``fastcache serve``'s video options), checked at construction.

Standard library only: the command line reads these before anything heavy is imported. The buckets (sizes x frames
x guidance) are compiled and warmed before ``/ready``; the jobs and their MP4 files live under ``data_dir``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

MAX_FRAMES = 1024  # per video: a bound on the work one request asks, far above what the video UNets are trained for
MAX_FPS = 120
MAX_TTL_S = 10 * 365 * 86_400.0
MAX_JOBS = 100_000
DEFAULT_TTL_S = 86_400.0  # a day, as OpenAI keeps a video's assets
DEFAULT_CRF = 18  # H.264's "visually lossless" constant rate factor; 0: lossless RGB


def default_data_dir() -> str:
    """``$XDG_DATA_HOME/fastcache/videos`` (``~/.local/share/...``): a place that outlives the process, so that a
    restart still serves what finished."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "fastcache", "videos")


@dataclass(frozen=True)
class VideoOptions:
    """The video buckets and the job store of a server whose model makes video (AnimateDiff, SVD).

    ``sizes`` (width, height) and ``frames`` are the buckets warmed up, with the engine's guidance modes; empty: the
    model's native size and default frame count. ``fps``: a request's default (None: the model's: AnimateDiff 8,
    SVD 7). Jobs and files live under ``data_dir``; finished ones are removed ``ttl`` seconds after they finish.
    ``max_jobs`` bounds the jobs queued or running (one more: HTTP 429). ``crf``: H.264's constant rate factor
    (0: lossless RGB, exact pixels; fewer players read it). ``ValueError`` names the command line's flag.
    """

    sizes: tuple[tuple[int, int], ...] = ()
    frames: tuple[int, ...] = ()
    fps: int | None = None
    data_dir: str = ""  # empty: default_data_dir()
    ttl: float = DEFAULT_TTL_S
    max_jobs: int = 16
    crf: int = DEFAULT_CRF

    def __post_init__(self):
        if not all(isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(side) and side >= 1
                                                                              for side in size) for size in self.sizes):
            raise ValueError(f"video_sizes must be (width, height) pairs of positive integers; got {self.sizes!r}")
        object.__setattr__(self, "sizes", tuple(dict.fromkeys(tuple(size) for size in self.sizes)))
        frames = tuple(self.frames)
        if not all(_is_int(count) and 1 <= count <= MAX_FRAMES for count in frames):
            raise ValueError(f"video_frames must be integers from 1 to {MAX_FRAMES}; got {self.frames!r}")
        object.__setattr__(self, "frames", tuple(sorted(set(frames))))
        if self.fps is not None and not (_is_int(self.fps) and 1 <= self.fps <= MAX_FPS):
            raise ValueError(f"video_fps must be an integer from 1 to {MAX_FPS}; got {self.fps!r}")
        if not isinstance(self.data_dir, str):
            raise ValueError(f"data_dir must be a folder's path; got {self.data_dir!r}")
        object.__setattr__(self, "data_dir", os.path.abspath(os.path.expanduser(self.data_dir or default_data_dir())))
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, (int, float)) or not (
                math.isfinite(self.ttl) and 0 < self.ttl <= MAX_TTL_S):
            raise ValueError(f"video_ttl must be a number of seconds above 0, at most {MAX_TTL_S:g}; got {self.ttl!r}")
        if not (_is_int(self.max_jobs) and 1 <= self.max_jobs <= MAX_JOBS):
            raise ValueError(f"max_video_jobs must be an integer from 1 to {MAX_JOBS}; got {self.max_jobs!r}")
        if not (_is_int(self.crf) and 0 <= self.crf <= 51):
            raise ValueError(f"video_crf must be an integer from 0 (lossless) to 51; got {self.crf!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def add_video_arguments(parser, serving: bool) -> None:
    """The video flags of ``fastcache warmup`` (the buckets) and ``serve`` (the buckets, the job store, the limits)."""
    group = parser.add_argument_group("video (a model that makes video: AnimateDiff, SVD; see docs/serving/video.md)")
    group.add_argument("--video-sizes", help="comma-separated video sizes to warm up and serve, N or WIDTHxHEIGHT "
                                             "(default: the model's native size)")
    group.add_argument("--video-frames", help="comma-separated frame counts to warm up and serve (default: the "
                                              "model's: AnimateDiff 16 or its motion adapter's limit, SVD its UNet's)")
    if not serving:
        return
    group.add_argument("--video-fps", type=int, help="frames per second of a request that gives none (default: the "
                                                     "model's: AnimateDiff 8, SVD 7)")
    group.add_argument("--data-dir", default="", help="where the video jobs (SQLite) and their MP4 files live; one "
                                                      f"server per folder (default: {default_data_dir()})")
    group.add_argument("--video-ttl", type=float, default=DEFAULT_TTL_S,
                       help="seconds a finished video job is kept; then its row and file are removed (404)")
    group.add_argument("--max-video-jobs", type=int, default=16,
                       help="video jobs queued or running; one more gets HTTP 429")
    group.add_argument("--video-crf", type=int, default=DEFAULT_CRF,
                       help="H.264 constant rate factor of the MP4 files (0: lossless RGB, exact pixels, read by "
                            "fewer players)")


VIDEO_PIPELINES = ("AnimateDiffPipeline", "StableVideoDiffusionPipeline")  # video_pipeline's served families


def makes_video(model: str | None, preset_pipeline: str) -> bool | None:
    """Whether the model to serve makes video, before it is loaded: a local folder's ``model_index.json`` says its
    pipeline, a preset its class's name (``preset_pipeline``); ``None`` for a hub id (known once loaded)."""
    if model is None:
        return preset_pipeline in VIDEO_PIPELINES
    index = os.path.join(os.path.expanduser(model), "model_index.json")
    if not os.path.isfile(index):
        return None
    import json

    with open(index) as f:
        return json.load(f).get("_class_name") in VIDEO_PIPELINES
