"""A video job's life outside HTTP: progress written at a bounded rate, jobs a shutdown never started failed with a
reason, files of no finished job removed at start, a deleted running job stopped."""

import time

import pytest
from conftest import tiny_animatediff, video_model, wait_until
from prometheus_client import CollectorRegistry

from fastcache.serving import video_jobs
from fastcache.serving.video_jobs import VideoJobs
from fastcache.serving.video_request import VideoRequest


@pytest.fixture(scope="module")
def pipe():
    return tiny_animatediff()


def jobs_in(pipe, data_dir, **options) -> VideoJobs:
    model = video_model(pipe, sizes=((32, 32),), frames=(4,), data_dir=str(data_dir), crf=0, **options)
    return VideoJobs(model, "tiny", CollectorRegistry())


def request(steps=2, seed=0) -> VideoRequest:
    return VideoRequest("x", 32, 32, 4, 8, steps, 7.5, seed=seed)


def test_progress_is_written_at_a_bounded_rate_and_reaches_the_denoising_share(pipe, tmp_path, monkeypatch):
    jobs = jobs_in(pipe, tmp_path)
    writes = []
    set_progress = jobs.store.set_progress
    monkeypatch.setattr(jobs.store, "set_progress", lambda job_id, value: writes.append(
        (time.monotonic(), value)) or set_progress(job_id, value))
    jobs.engine.start()
    try:
        start = time.monotonic()
        job = jobs.submit(request(steps=12))
        wait_until(lambda: jobs.get(job["id"])["status"] == "completed", 120, "the job's end")
        elapsed = time.monotonic() - start
        assert writes[-1][1] == video_jobs.DENOISING_PERCENT and [v for _, v in writes] == sorted(v for _, v in writes)
        gaps = [b - a for (a, _), (b, _) in zip(writes[:-2], writes[1:-1], strict=True)]  # the last always writes
        assert all(gap >= video_jobs.PROGRESS_WRITE_S for gap in gaps), gaps
        assert len(writes) <= elapsed / video_jobs.PROGRESS_WRITE_S + 2
    finally:
        jobs.engine.stop(60)
        jobs.stop()


def test_a_shutdown_fails_the_jobs_it_never_started_and_frees_the_folder(pipe, tmp_path):
    jobs = jobs_in(pipe, tmp_path)  # its engine is never started: the job stays queued
    job = jobs.submit(request())
    jobs.engine.stop(1)
    jobs.stop()
    again = jobs_in(pipe, tmp_path)  # the folder is free for the next process
    try:
        failed = again.get(job["id"])
        assert (failed["status"], failed["error_code"]) == ("failed", "server_shut_down")
        assert "the server shut down before this job started" in failed["error_message"]
    finally:
        again.stop()


def test_files_of_no_finished_job_are_removed_at_start(pipe, tmp_path):
    jobs = jobs_in(pipe, tmp_path)
    jobs.engine.start()
    try:
        job = jobs.submit(request())
        wait_until(lambda: jobs.get(job["id"])["status"] == "completed", 120, "the job's end")
    finally:
        jobs.engine.stop(60)
        jobs.stop()
    videos = tmp_path / "videos"
    (videos / "video_left.part.mp4").write_bytes(b"half")
    (videos / "video_orphan.mp4").write_bytes(b"no row")
    jobs_in(pipe, tmp_path).stop()
    assert sorted(path.name for path in videos.iterdir()) == [f"{job['id']}.mp4"]


def test_a_deleted_running_job_stops_at_its_next_step(pipe, tmp_path):
    jobs = jobs_in(pipe, tmp_path)
    jobs.engine.start()
    try:
        job = jobs.submit(request(steps=50))  # the most this model serves (video_model)
        wait_until(lambda: jobs.get(job["id"])["progress"] > 0, 120, "the job's start")
        stopped = time.monotonic()
        assert jobs.delete(job["id"])["status"] == "in_progress"
        assert jobs.engine.run_on_worker(time.monotonic).result(60) - stopped < 30  # the engine is free again
        assert jobs.get(job["id"]) is None and not list((tmp_path / "videos").iterdir())
    finally:
        jobs.engine.stop(60)
        jobs.stop()


def test_a_stopping_engine_ends_the_video_warm_up_before_its_next_bucket(pipe):
    model = video_model(pipe, sizes=((16, 16), (32, 32)), frames=(4,))
    model.engine.stop(1)
    assert model.warm_up(progress=False) == {}
