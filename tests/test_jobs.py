"""The SQLite job store: a job's life, pages of the list, the limit, what a restart finds, expiry, one process per
folder."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from fastcache.serving.jobs import DataDirInUse, JobLimit, JobStore

JOB = dict(model="m", size="32x32", frames=4, fps=8, seed=1)


@pytest.fixture
def store(tmp_path):
    store = JobStore(tmp_path)
    yield store
    store.close()


def test_a_job_goes_queued_in_progress_completed(store):
    job = store.create(**JOB, max_active=4)
    assert job["id"].startswith("video_") and len(job["id"]) == 38
    assert job["status"] == "queued" and job["progress"] == 0 and job["completed_at"] is None
    assert store.start(job["id"]) and not store.start(job["id"])  # once only
    assert store.set_progress(job["id"], 40) and store.get(job["id"])["progress"] == 40
    assert store.complete(job["id"], "x.mp4", ttl=60)
    done = store.get(job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["file"] == "x.mp4"
    assert done["expires_at"] == pytest.approx(done["completed_at"] + 60)
    assert not store.set_progress(job["id"], 10)  # a finished job's progress stays


def test_a_failed_job_keeps_its_reason(store):
    job = store.create(**JOB, max_active=4)
    assert store.fail(job["id"], "generation_failed", "it broke", ttl=60)
    failed = store.get(job["id"])
    assert (failed["status"], failed["error_code"], failed["error_message"]) == ("failed", "generation_failed",
                                                                                   "it broke")
    assert not store.complete(job["id"], "x.mp4", ttl=60)  # a failed job is not completed later


def test_a_deleted_job_is_not_started_or_completed(store):
    queued, running = store.create(**JOB, max_active=4), store.create(**JOB, max_active=4)
    store.start(running["id"])
    assert store.delete(queued["id"])["status"] == "queued" and store.delete(queued["id"]) is None
    assert store.delete(running["id"])["status"] == "in_progress"
    assert not store.start(queued["id"]) and not store.complete(running["id"], "x.mp4", ttl=60)
    assert store.get(queued["id"]) is None and store.counts() == dict.fromkeys(
        ("queued", "in_progress", "completed", "failed"), 0)


def test_at_the_limit_of_jobs_queued_or_running_one_more_is_refused(store):
    jobs = [store.create(**JOB, max_active=2) for _ in range(2)]
    with pytest.raises(JobLimit, match="2 video jobs are queued or running"):
        store.create(**JOB, max_active=2)
    store.start(jobs[0]["id"])
    store.complete(jobs[0]["id"], "x.mp4", ttl=60)  # a finished job frees its place
    store.create(**JOB, max_active=2)
    assert store.counts() == {"queued": 2, "in_progress": 0, "completed": 1, "failed": 0}


def test_pages_follow_creation_order_both_ways(store):
    ids = [store.create(**JOB, max_active=10)["id"] for _ in range(5)]
    page, more = store.page(2)
    assert [job["id"] for job in page] == ids[:-3:-1] and more  # newest first
    page, more = store.page(2, after=page[-1]["id"])
    assert [job["id"] for job in page] == [ids[2], ids[1]] and more
    page, more = store.page(2, after=page[-1]["id"])
    assert [job["id"] for job in page] == [ids[0]] and not more
    page, more = store.page(3, order="asc")
    assert [job["id"] for job in page] == ids[:3] and more
    assert [job["id"] for job in store.page(10, after=ids[2], order="asc")[0]] == ids[3:]
    with pytest.raises(KeyError):
        store.page(2, after="video_" + "0" * 32)


def test_a_restart_marks_unfinished_jobs_failed_and_keeps_finished_ones(tmp_path):
    store = JobStore(tmp_path)
    queued, running, done = (store.create(**JOB, max_active=4) for _ in range(3))
    store.start(running["id"])
    store.start(done["id"])
    store.complete(done["id"], "done.mp4", ttl=60)
    store.close()
    reopened = JobStore(tmp_path)
    try:
        assert sorted(reopened.fail_unfinished("server_restarted", "it stopped", ttl=60)) == sorted(
            [queued["id"], running["id"]])
        for job in (queued, running):
            row = reopened.get(job["id"])
            assert (row["status"], row["error_code"], row["error_message"]) == ("failed", "server_restarted",
                                                                                  "it stopped")
        assert reopened.get(done["id"])["status"] == "completed" and reopened.files() == {"done.mp4"}
    finally:
        reopened.close()


def test_finished_jobs_expire_and_unfinished_ones_do_not(store):
    done, failed, running = (store.create(**JOB, max_active=4) for _ in range(3))
    for job in (done, running):
        store.start(job["id"])
    store.complete(done["id"], "done.mp4", ttl=10)
    store.fail(failed["id"], "x", "y", ttl=20)
    assert store.expire(now=time.time() + 5) == []
    assert [job["id"] for job in store.expire(now=time.time() + 15)] == [done["id"]]
    assert [job["id"] for job in store.expire(now=time.time() + 10**6)] == [failed["id"]]
    assert store.get(running["id"])["status"] == "in_progress"


def test_one_process_per_folder_and_a_killed_holder_releases_it(tmp_path):
    store = JobStore(tmp_path)
    with pytest.raises(DataDirInUse, match=f"in use by another fastcache process \\(pid {os.getpid()}\\)"):
        JobStore(tmp_path)
    store.close()
    # jobs.py alone (the standard library is all it imports): the child holds the store, then sleeps
    holder = subprocess.Popen([sys.executable, "-c", "import importlib.util as u, sys, time; s = u.spec_from_file_"
                               "location('jobs', sys.argv[1]); m = u.module_from_spec(s); s.loader.exec_module(m); "
                               "held = m.JobStore(sys.argv[2]); print('held', flush=True); time.sleep(120)",
                               str(ROOT / "fastcache" / "serving" / "jobs.py"), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # bounded: the child sleeps 120 s at most
        with pytest.raises(DataDirInUse, match=f"pid {holder.pid}"):
            JobStore(tmp_path)
        holder.send_signal(signal.SIGKILL)  # the kernel releases a dead holder's lock
        holder.wait(30)
        JobStore(tmp_path).close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
