"""The video jobs of a server: run on the engine's thread, kept in the ``JobStore``, their MP4 files under
``--data-dir``/videos, removed when they expire.

A job is queued on the engine (``Engine.run_on_worker``: the device's one thread, taking turns with image batches),
writes its progress from the pipeline's step callback at most every ``PROGRESS_WRITE_S``, hands its frames to an
encoder thread (the device is free for the next call while PyAV encodes) and is ``completed`` once its file is
whole (written aside, then renamed). A deleted job stops at its next step. At start the jobs a dead process left
unfinished are marked ``failed`` with a reason, and files without a finished job are removed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..video_output import write_video
from .engine import ShuttingDown
from .jobs import JobStore
from .video_pipeline import VideoModel
from .video_request import VideoRequest

logger = logging.getLogger(__name__)

PROGRESS_WRITE_S = 0.25  # the most often a running job writes its progress
DENOISING_PERCENT = 95  # of a job's progress; decoding and encoding the rest
RESTARTED = ("server_restarted", "the server stopped (a crash or a restart) while this job was queued or running; "
                                 "submit it again")
SHUT_DOWN = ("server_shut_down", "the server shut down before this job started; submit it again")
JOB_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)


class JobCancelled(Exception):
    """The job was deleted while it ran: its pipeline call stops at the next step."""


class NotReady(LookupError):
    """The job has no file (yet, or ever): its row says why."""

    def __init__(self, job: dict):
        super().__init__(job["id"])
        self.job = job


def job_object(job: dict) -> dict:
    """A job's row as OpenAI's video object (times in whole seconds, ``seconds`` a string), plus what makes it
    reproducible here: frames, fps, seed."""
    error = {"code": job["error_code"], "message": job["error_message"]} if job["status"] == "failed" else None
    return {"id": job["id"], "object": "video", "status": job["status"], "progress": job["progress"],
            "created_at": _whole(job["created_at"]), "completed_at": _whole(job["completed_at"]),
            "expires_at": _whole(job["expires_at"]), "model": job["model"], "size": job["size"],
            "seconds": f"{job['frames'] / job['fps']:g}", "num_frames": job["frames"], "fps": job["fps"],
            "seed": job["seed"], "error": error}


def _whole(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds)


class VideoJobs:
    """The jobs of one server, on ``model``'s pipeline, in ``model.options.data_dir`` (one server per folder:
    ``jobs.DataDirInUse`` otherwise). ``start``/``stop`` run the expiry; ``stop`` after the engine's."""

    def __init__(self, model: VideoModel, model_name: str, registry):
        self.model, self.engine, self.model_name = model, model.engine, model_name
        self.options = options = model.options
        self.store = JobStore(options.data_dir)
        self.files = Path(options.data_dir) / "videos"
        self.files.mkdir(exist_ok=True)
        failed = self.store.fail_unfinished(*RESTARTED, ttl=options.ttl)
        if failed:
            logger.warning("fastcache: %d video job(s) left unfinished by the last process marked failed: %s",
                           len(failed), ", ".join(failed[:5]))
        self._remove_strays()
        self.expire()
        self.metrics = VideoMetrics(registry, self.store)
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="fastcache-video-encoder")
        self._cancelled: set[str] = set()
        self._stopping = threading.Event()
        self._reaper: threading.Thread | None = None

    # -- the API's operations --------------------------------------------------------------------------------

    def submit(self, request: VideoRequest) -> dict:
        """Queue ``request``'s job; its row. ``InvalidRequest`` if this server does not serve it, ``jobs.JobLimit``
        when ``max_jobs`` are queued or running, ``ShuttingDown`` when the engine stops."""
        self.model.check(request)
        job = self.store.create(model=self.model_name, size=request.size, frames=request.frames, fps=request.fps,
                                seed=request.seed, max_active=self.options.max_jobs)
        try:
            self.engine.run_on_worker(partial(self._generate, job["id"], request, time.monotonic()))
        except ShuttingDown:
            self.store.delete(job["id"])
            raise
        return job

    def get(self, job_id: str) -> dict | None:
        """A job's row; ``None`` if there is none, or its time is up (expired on the spot, not at the next sweep)."""
        job = self.store.get(job_id)
        if job is not None and job["expires_at"] is not None and job["expires_at"] <= time.time():
            self.expire()
            return None
        return job

    def page(self, limit: int, after: str | None, order: str) -> tuple[list[dict], bool]:
        self.expire()
        return self.store.page(limit, after, order)

    def delete(self, job_id: str) -> dict | None:
        """Remove a job (a running one stops at its next step) and its file; its last row, or ``None``."""
        job = self.store.delete(job_id)
        if job is None:
            return None
        if job["status"] == "in_progress":
            self._cancelled.add(job_id)
        if job["file"]:
            (self.files / job["file"]).unlink(missing_ok=True)
        return job

    def open_content(self, job_id: str):
        """A completed job's MP4, opened (a deletion meanwhile cannot cut a download short), and its size;
        ``KeyError`` without such a job, ``NotReady`` while it has no file."""
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job["status"] != "completed":
            raise NotReady(job)
        try:
            handle = open(self.files / job["file"], "rb")  # noqa: SIM115 (the response closes it)
        except FileNotFoundError:  # expired or deleted between the two lines
            raise KeyError(job_id) from None
        return handle, os.fstat(handle.fileno()).st_size

    def expire(self) -> int:
        """Remove the jobs whose time is up, rows and files; how many."""
        expired = self.store.expire()
        for job in expired:
            if job["file"]:
                (self.files / job["file"]).unlink(missing_ok=True)
        return len(expired)

    # -- a job's life ----------------------------------------------------------------------------------------

    def _generate(self, job_id: str, request: VideoRequest, queued_at: float) -> None:
        """The engine's thread: run the pipeline for a queued job (unless deleted meanwhile)."""
        if not self.store.start(job_id):
            return
        started = time.monotonic()
        self.metrics.duration.labels("waiting").observe(started - queued_at)
        written = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal written
            if job_id in self._cancelled:
                raise JobCancelled(job_id)
            now = time.monotonic()
            if now - written >= PROGRESS_WRITE_S or done == total:
                written = now
                self.store.set_progress(job_id, DENOISING_PERCENT * done // max(total, 1))

        try:
            frames = self.model.run(request, progress)
        except JobCancelled:
            self._cancelled.discard(job_id)
            logger.info("fastcache: video job %s deleted while it ran; stopped", job_id)
            return
        except Exception as error:  # the job fails alone; the engine goes on
            logger.exception("fastcache: video job %s failed", job_id)
            self._fail(job_id, "generation_failed", f"the generation failed: {type(error).__name__}: {error}")
            return
        try:
            self._encoder.submit(self._finish, job_id, request, frames, started)
        except RuntimeError:  # the encoder was shut down: the server is stopping
            self._fail(job_id, *SHUT_DOWN)

    def _finish(self, job_id: str, request: VideoRequest, frames, started: float) -> None:
        """The encoder's thread: write the MP4 aside, rename it into place, mark the job completed."""
        name = f"{job_id}.mp4"
        path, part = self.files / name, self.files / f"{job_id}.part.mp4"
        try:
            write_video(frames, part, request.fps, crf=self.options.crf)
            os.replace(part, path)
        except Exception as error:
            logger.exception("fastcache: video job %s could not be encoded", job_id)
            part.unlink(missing_ok=True)
            self._fail(job_id, "encoding_failed", f"the MP4 could not be written: {type(error).__name__}: {error}")
            return
        self._cancelled.discard(job_id)
        if not self.store.complete(job_id, name, self.options.ttl):  # deleted while it was encoded
            path.unlink(missing_ok=True)
            return
        self.metrics.finished.labels("completed").inc()
        self.metrics.seconds.inc(request.seconds)
        self.metrics.duration.labels("running").observe(time.monotonic() - started)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        if self.store.fail(job_id, code, message, self.options.ttl):
            self.metrics.finished.labels("failed").inc()

    def _remove_strays(self) -> None:
        """Files of no completed job: a partial write, or a job that died between its file and its row."""
        keep = self.store.files()
        for path in self.files.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    # -- start and stop --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Expire finished jobs every quarter of the TTL (at most a minute apart)."""
        if self._reaper is None:
            period = min(max(self.options.ttl / 4, 0.05), 60.0)
            self._reaper = threading.Thread(target=self._reap, args=(period,), name="fastcache-video-expiry",
                                            daemon=True)
            self._reaper.start()

    def _reap(self, period: float) -> None:
        while not self._stopping.wait(period):
            try:
                self.expire()
            except Exception:  # a full disk or a locked database now and then must not end the expiry
                logger.exception("fastcache: expiring video jobs failed")

    def stop(self, timeout: float = 60.0) -> None:
        """After the engine stopped: finish the encodings under way (at most ``timeout`` s), mark the jobs that never
        started failed, close the store (releasing the folder)."""
        self._stopping.set()
        if self._reaper is not None:
            self._reaper.join(timeout)
        self._encoder.shutdown(wait=True)
        self.store.fail_unfinished(*SHUT_DOWN, ttl=self.options.ttl, statuses=("queued",))
        self.store.close()


class VideoMetrics:
    """The video metrics of ``/metrics``: jobs held by status (read from the store when scraped), jobs finished by
    outcome, seconds of video made, and how long jobs wait and run."""

    def __init__(self, registry, store: JobStore):
        self.finished = Counter("fastcache_video_jobs_finished", "Video jobs finished since start, by outcome",
                                ["status"], registry=registry)
        self.seconds = Counter("fastcache_video_seconds", "Seconds of video generated (completed jobs)",
                               registry=registry)
        self.duration = Histogram("fastcache_video_job_seconds", "Seconds a video job spent waiting for the engine "
                                  "(waiting) and from its start to its file (running)", ["stage"],
                                  buckets=JOB_SECONDS_BUCKETS, registry=registry)
        registry.register(_JobsHeld(store))


class _JobsHeld:
    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        family = GaugeMetricFamily("fastcache_video_jobs", "Video jobs held now, by status (finished ones until "
                                   "they expire)", labels=["status"])
        if not self.store.closed:
            for status, count in self.store.counts().items():
                family.add_metric([status], count)
        yield family
