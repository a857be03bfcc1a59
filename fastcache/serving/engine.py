"""The serving engine: the served pipelines, their declared buckets, and a worker thread that batches requests.

Requests with equal batch keys (kind, size, steps, guidance, strength, cache level, LoRA adapters;
``request.ImageRequest``) are run as one pipeline call, up to the largest warmed batch, after waiting at most
``max_delay_ms`` for company. A batch is padded to the smallest warmed batch size that holds it, so that every call
runs a shape compiled during warm-up. Each image has its own generator (``seed + i`` for the ``i``-th image of a
request), so an image does not depend on what it was batched with. Each kind of request has its pipeline:
text-to-image the served one, edits its ``from_pipe`` pipelines (same UNet, same graphs) or an inpainting model's,
each with its fastcache handle. A request's LoRA adapters are put in place on its pipeline's UNet before the call
(``loras.ServedLoras``: hot-swaps, no compile).

The worker thread is the device's one user: other work (a video job, ``run_on_worker``) runs on it between batches,
never beside them. When both wait they take turns, a batch then a job: a job (minutes of video) is not preempted, so
an image waits for at most the job running and one more; a job never starves behind a steady stream of images.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors_text import listing
from .edits import edit_pipeline, warmup_inputs
from .loras import ServedLoras
from .request import DEFAULT_STRENGTH, EDIT_KINDS, ImageRequest, InvalidRequest, pipeline_kwargs, size_problem

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "fastcache warm-up"
MAX_DELAY_MS = 60_000.0


class QueueFull(RuntimeError):
    """More images wait than the engine's ``max_queue``: the caller should retry later."""


class ShuttingDown(RuntimeError):
    """The engine is draining its queue before the process exits: the caller should go elsewhere."""


@dataclass(frozen=True)
class Bucket:
    """One shape compiled and captured during warm-up: images per call, pixels, classifier-free guidance on/off, and
    the kind of request (the pipeline) it runs through."""

    batch: int
    width: int
    height: int
    guidance: bool
    kind: str = "generate"

    def __str__(self) -> str:
        kind = "" if self.kind == "generate" else f", {self.kind}"
        return f"batch {self.batch}, {self.width}x{self.height}, guidance {'on' if self.guidance else 'off'}{kind}"


@dataclass(frozen=True)
class EngineConfig:
    """What the engine warms up and serves (``fastcache serve``'s options). ``ValueError`` at construction names the
    field at fault and what is valid, so a Python or Ray caller gets every check the command line makes."""

    batch_sizes: tuple[int, ...] = (1,)
    sizes: tuple[tuple[int, int], ...] = ((512, 512),)  # (width, height)
    guidance: tuple[bool, ...] = (True,)  # buckets with classifier-free guidance on and/or off
    steps: int = 25  # default steps per request, and the warm-up's
    max_steps: int = 100
    max_queue: int = 64  # images waiting; one more is refused (HTTP 429)
    max_delay_ms: float = 50.0  # how long the first request of a batch waits for others
    on_demand: bool = False  # serve sizes that were not warmed (compiled on their first request) instead of refusing
    pixel_multiple: int = 8  # of every size (the VAE's scale times the UNet's downsampling)
    max_size: int = 2048  # pixels, the largest side of an uploaded image, and of a size served on demand
    edits: tuple[str, ...] = EDIT_KINDS  # edit kinds served and warmed up: img2img, inpaint, both or none
    intervals: tuple[int, ...] = ()  # cache levels a request may ask for; empty: only the handle's interval

    def __post_init__(self):
        def fail(field: str, message: str):
            raise ValueError(f"{field} {message}")

        batch_sizes = tuple(self.batch_sizes)
        if not batch_sizes or not all(_is_int(b) and b >= 1 for b in batch_sizes):
            fail("batch_sizes", f"must be integers >= 1; got {self.batch_sizes!r}")
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(batch_sizes))))
        if not _is_int(self.pixel_multiple) or self.pixel_multiple < 1:
            fail("pixel_multiple", f"must be an integer >= 1; got {self.pixel_multiple!r}")
        sizes = tuple(tuple(size) for size in self.sizes)
        if not sizes or not all(len(size) == 2 and all(_is_int(side) for side in size) for size in sizes):
            fail("sizes", f"must be (width, height) pairs of integers; got {self.sizes!r}")
        object.__setattr__(self, "sizes", tuple(dict.fromkeys(sizes)))
        if not _is_int(self.max_size) or self.max_size < max(self.pixel_multiple, *(max(s) for s in sizes)):
            fail("max_size", f"must be at least {self.pixel_multiple} and the largest of sizes; got {self.max_size!r}")
        for width, height in sizes:
            problem = size_problem(width, height, self.pixel_multiple, self.max_size)
            if problem:
                fail("sizes", f"must be multiples of {self.pixel_multiple} pixels for this model; got {width}x{height}")
        guidance = tuple(self.guidance)
        if not guidance or len(set(guidance)) != len(guidance) or not all(isinstance(g, bool) for g in guidance):
            fail("guidance", f"must be True, False or both, once each; got {self.guidance!r}")
        object.__setattr__(self, "guidance", guidance)
        if not _is_int(self.steps) or self.steps < 1:
            fail("steps", f"must be >= 1; got {self.steps!r}")
        if not _is_int(self.max_steps) or self.max_steps < self.steps:
            fail("max_steps", f"must be >= steps ({self.steps}); got {self.max_steps!r}")
        if not _is_int(self.max_queue) or self.max_queue < max(batch_sizes):
            fail("max_queue", f"must be at least the largest batch size ({max(batch_sizes)}); got {self.max_queue!r}")
        if not (isinstance(self.max_delay_ms, (int, float)) and math.isfinite(self.max_delay_ms)
                and 0 <= self.max_delay_ms <= MAX_DELAY_MS):
            fail("max_delay_ms", f"must be a finite number from 0 to {MAX_DELAY_MS:g}; got {self.max_delay_ms!r}")
        edits = tuple(self.edits)
        if len(set(edits)) != len(edits) or not set(edits) <= set(EDIT_KINDS):
            fail("edits", f"must be some of {EDIT_KINDS}, once each (none: no edits); got {self.edits!r}")
        object.__setattr__(self, "edits", tuple(kind for kind in EDIT_KINDS if kind in edits))
        intervals = tuple(self.intervals)
        if not all(_is_int(interval) and interval >= 1 for interval in intervals):
            fail("intervals", f"must be integers >= 1 (1: uncached); got {self.intervals!r}")
        object.__setattr__(self, "intervals", tuple(sorted(set(intervals))))

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000

    def buckets(self) -> list[Bucket]:
        return [Bucket(batch, width, height, guidance, kind) for kind in ("generate", *self.edits)
                for width, height in self.sizes for guidance in self.guidance for batch in sorted(self.batch_sizes)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Target:
    """The pipeline that serves one kind of request, and the fastcache handle on its UNet (``None``: plain)."""

    pipe: Any
    handle: Any = None


class Engine:
    """Runs ``ImageRequest``s on ``pipe`` (with fastcache enabled on it by ``handle``, or not), batching them on one
    thread. Edits run on ``targets`` given by kind (an inpainting model's pipeline and handle), else on ``from_pipe``
    pipelines of ``pipe``, which share its UNet and handle.

    ``submit`` is thread-safe and returns a future of the request's images (float arrays, HxWx3 in [0, 1]).
    ``on_batch(images, padded)`` is called after each pipeline call (metrics); ``loras`` serves requests' LoRA
    adapters (their UNets prepared with ``loras.attach``), ``None``: none are served. ``images=False``: ``pipe``
    makes video (``video_pipeline.VideoModel`` calls it through ``run_on_worker``); image requests are refused.
    """

    def __init__(self, pipe, config: EngineConfig, handle=None, on_batch: Callable[[int, int], None] | None = None,
                 targets: Mapping[str, Target] | None = None, loras: ServedLoras | None = None, images: bool = True):
        self.pipe, self.config, self.handle, self.loras = pipe, config, handle, loras
        self.images = images
        self.targets = {"generate": Target(pipe, handle)}
        for kind in config.edits if images else ():
            self.targets[kind] = (targets or {}).get(kind) or Target(edit_pipeline(pipe, kind), handle)
        # the cache levels served; the server's default is the handle's interval as it was built (an explicit list
        # of full steps has no interval: no level can be asked for)
        self.default_interval = handle.config.interval if handle is not None else None
        leveled = handle is not None and handle.schedule.kind != "explicit"
        self.levels = config.intervals or ((self.default_interval,) if leveled else ())
        self.on_batch = on_batch
        self.ready = threading.Event()  # set when warm-up is done
        self.eager_buckets: list[Bucket] = []  # buckets whose compile failed: served by the eager paths
        self._queue: deque[ImageRequest] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()  # run_on_worker's
        self._jobs_turn = False  # a batch ran last: a waiting job goes next
        self._waiting_images = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def handles(self) -> list:
        """The fastcache handles of the served pipelines, each once."""
        return list({id(t.handle): t.handle for t in self.targets.values() if t.handle is not None}.values())

    # -- requests --------------------------------------------------------------------------------------------

    def check(self, request: ImageRequest) -> None:
        """Raise ``InvalidRequest`` naming what is served if no warmed bucket takes ``request``."""
        config = self.config
        if not self.images:
            raise InvalidRequest("this server's model makes video, not images: POST /v1/videos (GET /v1/models says "
                                 "what it serves).", "model")
        if request.kind not in self.targets:
            served = ", ".join(config.edits) or "none"
            raise InvalidRequest(f"{request.kind} edits are not served (edits served: {served}).",
                                 "mask" if request.kind == "inpaint" else "image")
        if not 1 <= request.n <= config.max_batch:
            raise InvalidRequest(f"n must be between 1 and {config.max_batch} (the largest batch size served); "
                                 f"got {request.n}.", "n")
        if not 1 <= request.steps <= config.max_steps:
            raise InvalidRequest(f"num_inference_steps must be between 1 and {config.max_steps}; got {request.steps}.",
                                 "num_inference_steps")
        self.check_size(request.width, request.height)
        guidance = request.guidance_scale > 1
        if guidance not in config.guidance:
            raise InvalidRequest(f"guidance_scale {request.guidance_scale:g} turns classifier-free guidance "
                                 f"{'on' if guidance else 'off'}, which this server did not warm up: guidance_scale "
                                 f"must be {'<= 1' if guidance else '> 1'}.", "guidance_scale")
        if request.interval is not None and request.interval not in self.levels:
            levels = listing(self.levels, "level", ordered=True) if self.levels else "no level (no cache here)"
            raise InvalidRequest(f"cache.interval {request.interval} is not served; this server serves {levels}.",
                                 "cache")
        if request.lora:
            if self.loras is None:
                raise InvalidRequest("lora: this server serves no LoRA adapters (fastcache serve --lora NAME=PATH "
                                     "loads them).", "lora")
            self.loras.check(request.lora)

    def check_size(self, width: int, height: int) -> None:
        """Raise ``InvalidRequest`` naming the served sizes unless ``width`` x ``height`` is one (or, on demand, a
        size the model can make)."""
        config = self.config
        if config.on_demand:
            problem = size_problem(width, height, config.pixel_multiple, config.max_size)
            if problem:
                raise InvalidRequest(problem, "size")
        elif (width, height) not in config.sizes:
            sizes = listing((f"{w}x{h}" for w, h in config.sizes), "size", ordered=True)
            raise InvalidRequest(f"size {width}x{height} is not served; this server serves {sizes}.", "size")

    def submit(self, request: ImageRequest) -> Future:
        """Queue ``request``; ``InvalidRequest`` if no bucket takes it, ``QueueFull`` if too many images wait."""
        self.check(request)
        if request.interval is None:  # the server's level: such requests batch with those that name it
            request.interval = self.default_interval
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down.")
            if self._waiting_images + request.n > self.config.max_queue:
                raise QueueFull(f"{self._waiting_images} images are waiting (at most {self.config.max_queue}).")
            self._queue.append(request)
            self._waiting_images += request.n
            self._cond.notify_all()
        return request.future

    def run_on_worker(self, work: Callable[[], Any]) -> Future:
        """Run ``work()`` on the worker thread, between batches (one device, one pipeline call at a time); a future
        of its result. Jobs not started when the engine stops are dropped (their futures cancelled)."""
        future = Future()
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down.")
            self._jobs.append((work, future))
            self._cond.notify_all()
        return future

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def queue_depth(self) -> int:
        """Images waiting for a pipeline call (what ``max_queue`` bounds)."""
        return self._waiting_images

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (started and not stopped)."""
        return self._thread is not None and self._thread.is_alive()

    def run(self, requests: list[ImageRequest], record: bool = True) -> list[list[np.ndarray]]:
        """One pipeline call for ``requests`` (same batch key), on the pipeline of their kind at their cache level,
        padded to a warmed batch size; the images of each (``record``: report the batch to ``on_batch``)."""
        first = requests[0]
        target = self.targets[first.kind]
        total = sum(request.n for request in requests)
        pad_to = min((size for size in self.config.batch_sizes if size >= total), default=total)
        kwargs = pipeline_kwargs(target.pipe, requests, pad_to)
        if self.loras is not None:  # every call sets them: a call without adapters sets every slot to 0
            self.loras.apply(target.pipe.unet, first.lora)
        with self.at_level(target.handle, first.interval):
            images = target.pipe(**kwargs).images
        if record and self.on_batch is not None:
            self.on_batch(total, pad_to)
        if record and self.loras is not None:
            self.loras.count(first.lora, total)
        out, start = [], 0
        for request in requests:
            out.append(list(images[start:start + request.n]))
            start += request.n
        return out

    @contextmanager
    def at_level(self, handle, interval: int | None) -> Iterator[None]:
        """``handle`` at cache level ``interval`` (None: the server's) for one call; it changes which steps run
        full, not the graphs."""
        level = interval or self.default_interval
        if handle is None or level == self.default_interval:
            yield
            return
        handle.set_interval(level)
        try:
            yield
        finally:
            handle.set_interval(self.default_interval)

    # -- warm-up ---------------------------------------------------------------------------------------------

    def warm_up(self, progress: bool = True) -> dict[Bucket, float]:
        """Run every bucket once through the serving path (compiling and capturing it); seconds per bucket.

        A bucket whose compilation fails is served by the eager paths (the runtime falls back per shape), with a
        warning; it is listed in ``eager_buckets``.
        """
        seconds = {}
        buckets = self.config.buckets() if self.images else []
        bar = tqdm(buckets, desc="fastcache warm-up", unit="bucket", disable=not progress or not buckets)
        for bucket in bar:
            if self._stopping:  # shutting down: the remaining buckets are not needed
                logger.info("fastcache: warm-up stopped before %s", bucket)
                break
            handle = self.targets[bucket.kind].handle
            failures = handle.counters.compile_failures if handle is not None else 0
            start = time.perf_counter()
            self.run([self._warmup_request(bucket)], record=False)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[bucket] = time.perf_counter() - start
            if handle is not None and handle.counters.compile_failures > failures:
                self.eager_buckets.append(bucket)
                logger.warning("fastcache: %s failed to compile; it is served by the eager runtime.", bucket)
            bar.set_postfix_str(f"{bucket}: {seconds[bucket]:.1f} s")
            logger.info("fastcache: warmed %s in %.1f s", bucket, seconds[bucket])
        return seconds

    def _warmup_request(self, bucket: Bucket) -> ImageRequest:
        """A request of ``bucket``'s shape and kind (edits: a gray image; inpainting: its right half masked)."""
        image, mask = warmup_inputs(bucket.width, bucket.height) if bucket.kind != "generate" else (None, None)
        steps = self.config.steps
        # the kind's default strength, unless it leaves no step (img2img's 0.8 at 1 step): the shapes are the same
        strength = None if image is None or int(steps * DEFAULT_STRENGTH[bucket.kind]) >= 1 else 1.0
        return ImageRequest(WARMUP_PROMPT, bucket.width, bucket.height, steps, 7.5 if bucket.guidance else 1.0,
                            n=bucket.batch, seed=0, image=image, mask=mask if bucket.kind == "inpaint" else None,
                            strength=strength)

    # -- the worker thread -----------------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="fastcache-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 600.0) -> None:
        """Finish every queued request (at most ``timeout`` seconds), then end the worker thread; a warm-up in
        progress stops after its current bucket."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            while self._jobs:
                self._jobs.popleft()[1].cancel()

    def _serve(self) -> None:
        while True:
            work = self._next_work()
            if work is None:
                return
            try:
                work()
            except Exception:  # never let the thread die: requests would wait forever
                logger.exception("fastcache: the engine failed to answer a batch")

    def _next_work(self) -> Callable[[], None] | None:
        """The next batch's answer or job, taking turns when both wait; ``None`` once stopping with no image request
        queued (jobs not started stay unstarted)."""
        with self._cond:
            while not self._queue and not (self._jobs and not self._stopping):
                if self._stopping:
                    return None
                self._cond.wait()
            if self._jobs and not self._stopping and (self._jobs_turn or not self._queue):
                self._jobs_turn = False
                return partial(_run_job, *self._jobs.popleft())
            self._jobs_turn = bool(self._jobs)
        batch = self._next_batch()  # the queue holds a request: only this thread takes them
        return partial(self._answer, batch) if batch else (lambda: None)  # empty: all cancelled while queued

    def _answer(self, batch: list[ImageRequest]) -> None:
        """Run a batch and resolve its futures. If it fails, its requests run one by one, so that a request that
        cannot be served (say, a prompt the tokenizer rejects) fails alone."""
        try:
            results = self.run(batch)
        except Exception as error:
            if len(batch) > 1:
                logger.warning("fastcache: a batch of %d requests failed (%s); running them one by one", len(batch),
                               error)
                for request in batch:
                    self._answer([request])
                return
            logger.exception("fastcache: a request failed")
            _resolve(batch[0].future, error=error)
            return
        for request, images in zip(batch, results, strict=True):
            _resolve(request.future, images)

    def _next_batch(self) -> list[ImageRequest] | None:
        """The oldest request and the requests that can join it, after waiting for company at most ``max_delay_s``
        from its arrival; ``None`` once stopping with nothing queued."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue[0]
            deadline = first.arrived + self.config.max_delay_s
            while not self._stopping and self._joinable(first) < self.config.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, total = [], 0
            for request in list(self._queue):
                if request.batch_key == first.batch_key and total + request.n <= self.config.max_batch:
                    self._queue.remove(request)
                    self._waiting_images -= request.n
                    if request.future.set_running_or_notify_cancel():  # False: its client gave up while queued
                        batch.append(request)
                        total += request.n
            return batch

    def _joinable(self, first: ImageRequest) -> int:
        return sum(request.n for request in self._queue if request.batch_key == first.batch_key)


def _run_job(work: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = work()
    except Exception as error:  # the job's own failure: its future says it, the worker goes on
        future.set_exception(error)
    else:
        future.set_result(result)


def _resolve(future: Future, images=None, error: BaseException | None = None) -> None:
    """Set a running future's outcome (it cannot be cancelled any more once taken off the queue)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(images)
