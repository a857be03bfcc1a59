"""The persistent compile cache: a second warm-up, in a new process, loads what the first one wrote."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from fastcache.serving.compile_cache import CompileCache

WARMUP = [sys.executable, "-m", "fastcache.cli", "warmup", "--preset", "tiny-sd", "--sizes", "32", "--batch-sizes",
          "1", "--guidance-modes", "off", "--steps", "2", "--interval", "1"]  # one bucket, the full path only


def warm_up(cache_dir) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_CACHE"))}
    done = subprocess.run([*WARMUP, "--cache-dir", str(cache_dir)], capture_output=True, text=True, timeout=900,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow  # two processes compiling (~3.5 min on CI's CPU); bench/cold_start.py measures the same warm restart
def test_a_second_process_warms_up_from_the_artifacts_the_first_wrote(tmp_path):
    first = warm_up(tmp_path / "first")
    assert "cold warm-up" in first and "(cold compile cache;" in first
    saved = int(re.search(r"saved (\d+) compile cache artifacts", first)[1])
    assert saved > 0 and "fxgraph_miss 1" in first
    # a new replica elsewhere: an empty folder with only the artifacts file in it
    (tmp_path / "second").mkdir()
    for artifact in (tmp_path / "first").glob("artifacts-*.bin"):
        shutil.copy(artifact, tmp_path / "second")
    second = warm_up(tmp_path / "second")
    assert f"loaded {saved} compile cache artifacts" in second and "(warm compile cache;" in second
    assert "fxgraph_hit 1" in second and "fxgraph_miss 0" in second


def test_the_artifacts_file_is_named_by_what_the_code_depends_on(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")  # restored after the test
    monkeypatch.setenv("TRITON_CACHE_DIR", "unchanged")
    one = CompileCache(tmp_path, {"model": "a", "torch": "2.13"})
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert CompileCache(tmp_path, {"torch": "2.13", "model": "a"}).path == one.path
    assert CompileCache(tmp_path, {"model": "b", "torch": "2.13"}).path != one.path
    assert not one.load()  # nothing saved yet
    one.path.write_bytes(b"not an artifact")
    assert not one.load()  # unreadable: a cold warm-up, not a crash
