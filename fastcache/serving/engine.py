"""The serving engine: one compiled pipeline, its declared buckets, and a worker thread that batches requests.

Requests that share a size, step count and guidance scale are run as one pipeline call, up to the largest warmed
batch, after waiting at most ``max_delay_ms`` for company. A batch is padded to the smallest warmed batch size that
holds it, so that every call runs a shape compiled during warm-up. Each image has its own generator
(``seed + i`` for the ``i``-th image of a request), so an image does not depend on what it was batched with.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import prompt_inputs

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "fastcache warm-up"


class QueueFull(RuntimeError):
    """More images wait than the engine's ``max_queue``: the caller should retry later."""


class ShuttingDown(RuntimeError):
    """The engine is draining its queue before the process exits: the caller should go elsewhere."""


class InvalidRequest(ValueError):
    """A request that cannot be served as asked; the message names what is valid, ``param`` the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


MAX_SEED = 2**63 - 1  # image i of a request uses seed + i: the last of them must fit too
MAX_GUIDANCE = 50.0
MAX_PROMPT_CHARS = 10_000  # text encoders read 77 tokens; this only bounds the work a request asks
MAX_DELAY_MS = 60_000.0


def size_problem(width: int, height: int, multiple: int, max_size: int | None = None) -> str | None:
    """Why ``width`` x ``height`` pixels cannot be generated (each side a multiple of the model's pixel multiple, the
    VAE's scale times the UNet's downsampling, and at most ``max_size``), or ``None``. The one place this is said."""
    largest = max_size if max_size is not None else max(width, height, multiple)
    if all(multiple <= side <= largest and side % multiple == 0 for side in (width, height)):
        return None
    return f"width and height must be multiples of {multiple} pixels, from {multiple} to {largest}; got " \
           f"{width}x{height}."


def request_problem(prompt, negative_prompt: str = "", n: int = 1, guidance_scale: float = 7.5,
                    seed: int | None = None) -> tuple[str, str] | None:
    """``(message, field)`` for the first field of an image request that no server could serve, or ``None``.
    ``ImageRequest`` checks itself with it, the command line its arguments before a model is built; the ranges a
    server serves (``n``, steps, sizes) are ``Engine.check``'s."""
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            return f"{name} must be a string; got {type(text).__name__}.", name
        if len(text) > MAX_PROMPT_CHARS:
            return f"{name} must be at most {MAX_PROMPT_CHARS} characters; got {len(text)}.", name
        try:
            text.encode()
        except UnicodeEncodeError:
            return f"{name} must be valid Unicode text (it has unpaired surrogates).", name
    if not prompt.strip():
        return "prompt must be a non-empty string.", "prompt"
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)
            and 0 <= guidance_scale <= MAX_GUIDANCE):
        return (f"guidance_scale must be a finite number between 0 and {MAX_GUIDANCE:g}; got {guidance_scale!r}.",
                "guidance_scale")
    last = MAX_SEED - (n - 1) if isinstance(n, int) and 1 <= n <= MAX_SEED else MAX_SEED  # n: Engine.check
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= last):
        return f"seed must be between 0 and {last} (image i uses seed + i); got {seed!r}.", "seed"
    return None


@dataclass(frozen=True)
class Bucket:
    """One shape compiled and captured during warm-up: images per call, pixels, classifier-free guidance on/off."""

    batch: int
    width: int
    height: int
    guidance: bool

    def __str__(self) -> str:
        return f"batch {self.batch}, {self.width}x{self.height}, guidance {'on' if self.guidance else 'off'}"


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
    max_size: int = 2048  # pixels, the largest width or height served on demand

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

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000

    def buckets(self) -> list[Bucket]:
        return [Bucket(batch, width, height, guidance) for width, height in self.sizes
                for guidance in self.guidance for batch in sorted(self.batch_sizes)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ImageRequest:
    """One request: ``n`` images of one prompt; image ``i`` is generated from ``seed + i``. Fields no server could
    serve raise ``InvalidRequest`` at construction; what this server serves is ``Engine.check``'s."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    n: int = 1
    negative_prompt: str = ""
    seed: int | None = None
    future: Future = field(default_factory=Future, repr=False)
    arrived: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self):
        problem = request_problem(self.prompt, self.negative_prompt, self.n, self.guidance_scale, self.seed)
        if problem:
            raise InvalidRequest(*problem)
        if self.seed is None:
            self.seed = secrets.randbits(31)

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share a pipeline call. Empty and given negative prompts do not mix: without
        any, a text-encoder pipeline gets ``negative_prompt=None``, as in a direct call (SDXL then uses zeros)."""
        return self.width, self.height, self.steps, float(self.guidance_scale), bool(self.negative_prompt)


def pipeline_kwargs(pipe, requests: list[ImageRequest], pad_to: int | None = None) -> dict:
    """The keyword arguments of the one pipeline call that makes the images of ``requests`` (same batch key), padded
    with copies of the first request's first image up to ``pad_to`` images. A direct call with these arguments gives
    the images the engine serves."""
    first = requests[0]
    prompts, negatives, seeds = [], [], []
    for request in requests:
        prompts += [request.prompt] * request.n
        negatives += [request.negative_prompt] * request.n
        seeds += [request.seed + i for i in range(request.n)]
    padding = (pad_to or len(prompts)) - len(prompts)
    prompts += prompts[:1] * padding
    negatives += negatives[:1] * padding
    seeds += seeds[:1] * padding
    return dict(prompt_inputs(pipe, prompts, negatives if any(negatives) else None), num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale, width=first.width, height=first.height,
                num_images_per_prompt=1, output_type="np",
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds])


class Engine:
    """Runs ``ImageRequest``s on ``pipe`` (with fastcache enabled on it, or not), batching them on one thread.

    ``submit`` is thread-safe and returns a future of the request's images (float arrays, HxWx3 in [0, 1]).
    ``on_batch(images, padded)`` is called after each pipeline call (metrics).
    """

    def __init__(self, pipe, config: EngineConfig, handle=None, on_batch: Callable[[int, int], None] | None = None):
        self.pipe, self.config, self.handle = pipe, config, handle
        self.on_batch = on_batch
        self.ready = threading.Event()  # set when warm-up is done
        self.eager_buckets: list[Bucket] = []  # buckets whose compile failed: served by the eager paths
        self._queue: deque[ImageRequest] = deque()
        self._waiting_images = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- requests --------------------------------------------------------------------------------------------

    def check(self, request: ImageRequest) -> None:
        """Raise ``InvalidRequest`` naming what is served if no warmed bucket takes ``request``."""
        config = self.config
        if not 1 <= request.n <= config.max_batch:
            raise InvalidRequest(f"n must be between 1 and {config.max_batch} (the largest batch size served); "
                                 f"got {request.n}.", "n")
        if not 1 <= request.steps <= config.max_steps:
            raise InvalidRequest(f"num_inference_steps must be between 1 and {config.max_steps}; got {request.steps}.",
                                 "num_inference_steps")
        if config.on_demand:
            problem = size_problem(request.width, request.height, config.pixel_multiple, config.max_size)
            if problem:
                raise InvalidRequest(problem, "size")
        elif (request.width, request.height) not in config.sizes:
            sizes = ", ".join(f"{w}x{h}" for w, h in config.sizes)
            raise InvalidRequest(f"size {request.width}x{request.height} is not served; served sizes: {sizes}.",
                                 "size")
        guidance = request.guidance_scale > 1
        if guidance not in config.guidance:
            raise InvalidRequest(f"guidance_scale {request.guidance_scale:g} turns classifier-free guidance "
                                 f"{'on' if guidance else 'off'}, which this server did not warm up: guidance_scale "
                                 f"must be {'<= 1' if guidance else '> 1'}.", "guidance_scale")

    def submit(self, request: ImageRequest) -> Future:
        """Queue ``request``; ``InvalidRequest`` if no bucket takes it, ``QueueFull`` if too many images wait."""
        self.check(request)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down.")
            if self._waiting_images + request.n > self.config.max_queue:
                raise QueueFull(f"{self._waiting_images} images are waiting (at most {self.config.max_queue}).")
            self._queue.append(request)
            self._waiting_images += request.n
            self._cond.notify_all()
        return request.future

    @property
    def queue_depth(self) -> int:
        """Images waiting for a pipeline call (what ``max_queue`` bounds)."""
        return self._waiting_images

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (started and not stopped)."""
        return self._thread is not None and self._thread.is_alive()

    def run(self, requests: list[ImageRequest], record: bool = True) -> list[list[np.ndarray]]:
        """One pipeline call for ``requests`` (same batch key), padded to a warmed batch size; the images of each
        (``record``: report the batch to ``on_batch``)."""
        total = sum(request.n for request in requests)
        pad_to = min((size for size in self.config.batch_sizes if size >= total), default=total)
        images = self.pipe(**pipeline_kwargs(self.pipe, requests, pad_to)).images
        if record and self.on_batch is not None:
            self.on_batch(total, pad_to)
        out, start = [], 0
        for request in requests:
            out.append(list(images[start:start + request.n]))
            start += request.n
        return out

    # -- warm-up ---------------------------------------------------------------------------------------------

    def warm_up(self, progress: bool = True) -> dict[Bucket, float]:
        """Run every bucket once through the serving path (compiling and capturing it); seconds per bucket.

        A bucket whose compilation fails is served by the eager paths (the runtime falls back per shape), with a
        warning; it is listed in ``eager_buckets``.
        """
        seconds = {}
        buckets = self.config.buckets()
        bar = tqdm(buckets, desc="fastcache warm-up", unit="bucket", disable=not progress)
        for bucket in bar:
            if self._stopping:  # shutting down: the remaining buckets are not needed
                logger.info("fastcache: warm-up stopped before %s", bucket)
                break
            failures = self.handle.counters.compile_failures if self.handle is not None else 0
            start = time.perf_counter()
            request = ImageRequest(WARMUP_PROMPT, bucket.width, bucket.height, self.config.steps,
                                   7.5 if bucket.guidance else 1.0, n=bucket.batch, seed=0)
            self.run([request], record=False)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[bucket] = time.perf_counter() - start
            if self.handle is not None and self.handle.counters.compile_failures > failures:
                self.eager_buckets.append(bucket)
                logger.warning("fastcache: %s failed to compile; it is served by the eager runtime.", bucket)
            bar.set_postfix_str(f"{bucket}: {seconds[bucket]:.1f} s")
            logger.info("fastcache: warmed %s in %.1f s", bucket, seconds[bucket])
        return seconds

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

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:  # every request of it was cancelled while queued
                continue
            try:
                self._answer(batch)
            except Exception:  # never let the thread die: requests would wait forever
                logger.exception("fastcache: the engine failed to answer a batch")

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


def _resolve(future: Future, images=None, error: BaseException | None = None) -> None:
    """Set a running future's outcome (it cannot be cancelled any more once taken off the queue)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(images)
