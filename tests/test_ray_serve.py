"""Ray Serve scale-out: two CPU replicas of the service answer through Ray's HTTP proxy, everything on loopback; the
replicas enforce the edge's API keys and body limit; SIGTERM to ``fastcache serve --replicas`` shuts Ray down and
exits 0."""

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray.serve  # noqa: F401 (Ray is in the test extra: without it this file fails, it is not skipped)
from conftest import HOST, assert_error, free_port, wait_until
from PIL import Image

from fastcache import FastCacheConfig, compile_pipeline
from fastcache.models import build_pipeline
from fastcache.serving import ray_serve
from fastcache.serving.edge import EdgeConfig
from fastcache.serving.engine import EngineConfig
from fastcache.serving.probe import wait_ready
from fastcache.serving.request import ImageRequest, pipeline_kwargs
from fastcache.serving.service import ServiceOptions

STEPS = 2
KEY = "sk-ray-replicas-3e1d"


def test_two_replicas_answer_through_rays_proxy():
    options = ServiceOptions(cache=FastCacheConfig(compile=False),
                             engine=EngineConfig(batch_sizes=(1, 2), sizes=((32, 32),), steps=STEPS, edits=()))
    edge = EdgeConfig(api_keys=(KEY,), max_body_mb=1)
    with pytest.raises(ValueError, match="refusing to serve on 0.0.0.0"):  # checked before Ray starts
        ray_serve.start(options, 2, host="0.0.0.0", port=free_port(), timeout=300)
    try:
        port = free_port()
        url = ray_serve.start(options, 2, host=HOST, port=port, timeout=300, edge=edge)

        async def burst():
            async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
                health = await asyncio.gather(*(client.get(f"{url}/health") for _ in range(24)))
                images = await asyncio.gather(*(client.post(f"{url}/v1/images/generations",
                                                            json={"prompt": f"p{i}", "seed": i}) for i in range(6)))
                return health, images

        health, images = asyncio.run(burst())
        refused = [httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"}, headers=headers, timeout=60)
                   for headers in ({}, {"Authorization": "Bearer sk-wrong"})]
        too_large = _declared_too_large(port)
    finally:
        ray_serve.stop()
    assert len({r.json()["pid"] for r in health}) == 2  # both replicas took requests
    assert [r.status_code for r in images] == [200] * 6
    for response in refused:
        assert_error(response.status_code, response.content, 401)
    assert_error(*too_large, 413)
    pipe = build_pipeline("tiny-sd")
    compile_pipeline(pipe, 3, 0, compile=False)
    for i, response in enumerate(images):
        want = pipe(**pipeline_kwargs(pipe, [ImageRequest(f"p{i}", 32, 32, STEPS, 7.5, seed=i)])).images[0]
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))), np.int16)
        assert np.abs(got - (want * 255).round()).max() <= 1


def _declared_too_large(port: int) -> tuple[int, bytes]:
    """A request that declares a body over the limit and sends none: answered without waiting for it."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {2 * 2**20}\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):  # the answer closes the connection: the body is never read
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body[body.find(b"{"):body.rfind(b"}") + 1]  # chunked or not


def _processes() -> dict[int, tuple[int, str]]:
    """Every process of this machine: pid -> (parent pid, start time), from /proc (Linux, as CI is)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(pid: int) -> set[tuple[int, str]]:
    """``pid``'s descendants as (pid, start time) pairs: a pid reused later is another process."""
    table, found, frontier = _processes(), set(), {pid}
    while frontier:
        children = {child for child, (parent, _) in table.items() if parent in frontier}
        found |= {(child, table[child][1]) for child in children}
        frontier = children
    return found


def _running(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    table = _processes()
    return {(pid, start) for pid, start in processes if table.get(pid, (None, None))[1] == start}


def test_sigterm_shuts_ray_serve_down_exits_0_and_leaves_no_process_behind():
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "fastcache.cli", "serve", "--replicas", "1", "--host", HOST,
                                 "--port", str(port), "--preset", "tiny-sd", "--no-compile", "--sizes", "32", "--steps",
                                 "2", "--edits", "none"], stdout=log, stderr=subprocess.STDOUT)
        family: set[tuple[int, str]] = set()
        try:
            wait_ready(f"http://{HOST}:{port}", 300, alive=lambda: proc.poll() is None)
            family = _descendants(proc.pid)  # Ray's GCS, raylet, workers, the replica and the proxy
            assert len(family) >= 3, family
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
            log.seek(0)
            output = log.read().decode(errors="replace")
            assert code == 0 and "SIGTERM received" not in output, output[-3000:]
            wait_until(lambda: not _running(family), 30, "every Ray process gone")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            for pid, _ in _running(family):  # what this test started and left: not another test's
                os.kill(pid, signal.SIGKILL)
