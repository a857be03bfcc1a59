"""Ray Serve scale-out: two CPU replicas of the service answer through Ray's HTTP proxy, everything on loopback."""

import asyncio
import base64
import io
import socket

import httpx
import numpy as np
import pytest
from PIL import Image

from fastcache import FastCacheConfig, compile_pipeline
from fastcache.models import build_pipeline
from fastcache.serving.engine import EngineConfig, ImageRequest, pipeline_kwargs
from fastcache.serving.service import ServiceOptions

ray_serve = pytest.importorskip("fastcache.serving.ray_serve")
pytest.importorskip("ray.serve")

STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_answer_through_rays_proxy():
    options = ServiceOptions(cache=FastCacheConfig(compile=False),
                             engine=EngineConfig(batch_sizes=(1, 2), sizes=((32, 32),), steps=STEPS))
    try:
        url = ray_serve.start(options, 2, host="127.0.0.1", port=free_port(), timeout=300)

        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                health = await asyncio.gather(*(client.get(f"{url}/health") for _ in range(24)))
                images = await asyncio.gather(*(client.post(f"{url}/v1/images/generations",
                                                            json={"prompt": f"p{i}", "seed": i}) for i in range(6)))
                return health, images

        health, images = asyncio.run(burst())
    finally:
        ray_serve.stop()
    assert len({r.json()["pid"] for r in health}) == 2  # both replicas took requests
    assert [r.status_code for r in images] == [200] * 6
    pipe = build_pipeline("tiny-sd")
    compile_pipeline(pipe, 3, 0, compile=False)
    for i, response in enumerate(images):
        want = pipe(**pipeline_kwargs(pipe, [ImageRequest(f"p{i}", 32, 32, STEPS, 7.5, seed=i)])).images[0]
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))), np.int16)
        assert np.abs(got - (want * 255).round()).max() <= 1
