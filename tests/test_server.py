"""The HTTP service, as a real uvicorn server on a loopback port (tiny model, eager runtime, every wait bounded)."""

import asyncio
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import HOST, ServerProcess, assert_error, free_port, png_array, wait_until
from PIL import Image

from fastcache import FastCacheConfig, compile_pipeline
from fastcache.models import build_pipeline
from fastcache.serving.engine import EngineConfig
from fastcache.serving.probe import status, wait_ready
from fastcache.serving.request import ImageRequest, pipeline_kwargs
from fastcache.serving.server import make_app
from fastcache.serving.service import Service, ServiceOptions

STEPS = 4


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--preset", "tiny-sd", "--no-compile", "--sizes", "32", "--batch-sizes", "1,2,4",
                           "--steps", str(STEPS), "--max-steps", "50", "--max-delay-ms", "300", "--max-queue", "64")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference():
    """Direct pipeline calls with the server's model and cache settings (interval 3, branch 0, eager)."""
    pipe = build_pipeline("tiny-sd")
    handle = compile_pipeline(pipe, 3, 0, compile=False)

    def image(prompt: str, seed: int, negative: str = "", n: int = 1) -> list[np.ndarray]:
        request = ImageRequest(prompt, 32, 32, STEPS, 7.5, n=n, seed=seed, negative_prompt=negative)
        images = pipe(**pipeline_kwargs(pipe, [request])).images
        return [(im * 255).round().astype(np.int16) for im in images]

    yield image
    handle.disable()


async def post_all(url: str, bodies: list, timeout: float = 300) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/images/generations", json=b) for b in bodies))


def test_32_concurrent_requests_are_batched_and_equal_direct_calls(server, reference):
    before = server.metrics()
    bodies = [{"prompt": f"prompt {i % 5}", "seed": 1000 + i, "n": 1 + (i % 3 == 0), "negative_prompt": "blurry"}
              for i in range(32)]
    responses = asyncio.run(post_all(server.url, bodies))
    assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
    for body, response in zip(bodies, responses, strict=True):
        data = response.json()["data"]
        assert len(data) == body["n"] and [d["seed"] for d in data] == [body["seed"] + i for i in range(body["n"])]
        for got, want in zip(data, reference(body["prompt"], body["seed"], "blurry", body["n"]), strict=True):
            diff = np.abs(png_array(got["b64_json"]) - want)
            assert diff.max() <= 1 and diff.mean() < 0.01  # equal up to the PNG's rounding of float noise
    after = server.metrics()
    images = sum(b["n"] for b in bodies)
    calls = after["fastcache_batch_images_count"] - before.get("fastcache_batch_images_count", 0)
    assert after["fastcache_images_total"] - before.get("fastcache_images_total", 0) == images
    assert calls < 32  # batching happened: fewer pipeline calls than requests
    assert after['fastcache_requests_total{status="200"}'] - before.get('fastcache_requests_total{status="200"}',
                                                                          0) == 32
    assert after['fastcache_unet_steps_total{path="shallow"}'] > before['fastcache_unet_steps_total{path="shallow"}']
    assert after["fastcache_request_seconds_count"] - before["fastcache_request_seconds_count"] == 32


BAD_REQUESTS = [
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({}, "prompt"),
    ({"prompt": "   "}, "prompt must be a non-empty string"),
    ({"prompt": "\ud800"}, "unable to parse raw data as a unicode string"),  # a lone surrogate
    ({"prompt": "x" * 10_001}, "at most 10000 characters"),
    ({"prompt": "x", "negative_prompt": "\udfff"}, "negative_prompt must be a string of at most 10000 characters "
                                                  "(input should be a valid string, unable to parse raw data as a "
                                                  "unicode string)"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "size": "64x64"}, "one of 1 served size (32x32)"),
    ({"prompt": "x", "size": "big"}, "'WIDTHxHEIGHT'"),
    ({"prompt": "x", "size": "9" * 5000 + "x1"}, "'WIDTHxHEIGHT'"),
    ({"prompt": "x", "size": "\uff13\uff12x\uff13\uff12"}, "'WIDTHxHEIGHT'"),  # full-width digits
    ({"prompt": "x", "n": 0}, "n must be an integer between 1 and 4"),
    ({"prompt": "x", "n": 99}, "n must be an integer between 1 and 4"),
    ({"prompt": "x", "n": "2"}, "n must be an integer between 1 and 4 (the largest batch size served) (input should "
                                "be a valid integer)"),
    ({"prompt": "x", "n": True}, "n must be an integer between 1 and 4"),
    ({"prompt": "x", "num_inference_step": 3}, "'num_inference_step' is not a field of this request"),
    ({"prompt": "x", "n": 10**23, "seed": 1}, "n must be an integer between 1 and 4"),
    ({"prompt": "x", "num_inference_steps": 0}, "between 1 and 50"),
    ({"prompt": "x", "num_inference_steps": 51}, "between 1 and 50"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale must be a number between 0 and 50"),
    ({"prompt": "x", "guidance_scale": 1.0}, "and above 1 (classifier-free guidance is warmed on only)"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "seed": -1}, "seed must be an integer between 0"),
    ({"prompt": "x", "seed": 2**64}, "seed must be an integer between 0"),
    ({"prompt": "x", "n": 2, "seed": 2**63 - 1}, "seed must be between 0 and 9223372036854775806"),
    ({"prompt": "x", "response_format": "url"}, "response_format must be 'b64_json'"),
    ({"prompt": "x", "cache": {"interval": 2, "branch": 1}}, "cache must be {\"interval\": k}"),
    ({"prompt": "x", "lora": "style"}, "this server serves no LoRA adapters"),
    # what a probe found: JSON nested ~960 deep in lora, or 2000 anywhere, recursed past Python's limit (500)
    *(({"prompt": "x", "lora": "LORA"}, f"nests JSON {depth + 1} levels deep") for depth in (959, 961, 964, 2000)),
    ('{"prompt": "x", "cache": ' + "[" * 5000 + "]" * 5000 + "}", "nests JSON 5001 levels deep"),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS, ids=[str(b)[:40] + m[:20] for b, m in BAD_REQUESTS])
def test_bad_input_gets_a_400_naming_what_is_valid_and_the_service_keeps_serving(server, body, message):
    url = f"{server.url}/v1/images/generations"
    content = body if isinstance(body, str) else json.dumps(body)  # ASCII: lone surrogates travel as escapes
    if "LORA" in content:  # {"a": {"a": ... 1}} as deep as the message says, less the body's own level
        depth = int(message.split()[2]) - 1
        content = content.replace('"LORA"', '{"a":' * depth + "1" + "}" * depth)
    response = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
    error = assert_error(response.status_code, response.content, 400)
    assert message in error["message"] and error["type"] == "invalid_request_error"
    good = httpx.post(url, json={"prompt": "still serving", "seed": 1}, timeout=120)
    assert good.status_code == 200 and len(good.json()["data"]) == 1


def test_an_edits_lora_nested_thousands_deep_gets_a_400(server):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 150)).save(buffer, format="PNG")
    for lora, why in (("[" * 2000, "levels deep; this server reads at most 32"),
                      ('[{"name": ' * 400, "levels deep; this server reads at most 32"),
                      ('{"a":' * 2000, "string should have at most 4096 characters")):  # the form field's limit
        response = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "x", "lora": lora},
                              files={"image": ("a.png", buffer.getvalue(), "image/png")}, timeout=60)
        error = assert_error(response.status_code, response.content, 400)
        assert why in error["message"] and error["param"] == "lora"
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_head_answers_as_get_and_a_trailing_slash_as_the_path_without_it(server):
    for path in ("/health", "/ready", "/v1/models", "/metrics"):
        get, head = httpx.get(server.url + path), httpx.head(server.url + path)
        assert get.status_code == head.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
        slash = httpx.get(f"{server.url}{path}/")
        assert slash.status_code == 200 and slash.headers["content-type"] == get.headers["content-type"], path
    generated = httpx.post(f"{server.url}/v1/images/generations/", json={"prompt": "slash", "seed": 5}, timeout=120)
    assert generated.status_code == 200 and len(generated.json()["data"]) == 1


def test_models_health_and_metrics(server):
    model = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert model["id"] == "tiny-sd" and "derived deterministically from the prompt text" in model["prompt_embeddings"]
    assert model["sizes"] == ["32x32"] and model["batch_sizes"] == [1, 2, 4]
    health, ready = httpx.get(f"{server.url}/health"), httpx.get(f"{server.url}/ready")
    assert health.status_code == ready.status_code == 200
    assert ready.json()["pid"] == health.json()["pid"] == server.proc.pid  # which process answered, behind a proxy
    assert ready.json()["compile_cache"] == "cold" and ready.json()["warmup_seconds"] > 0  # no --cache-dir
    metrics = server.metrics()
    assert metrics['fastcache_warmup_seconds{cache="cold"}'] > 0
    assert "fastcache_queue_depth" in metrics and "fastcache_unet_fallbacks_total" in metrics


def test_ready_is_503_until_the_warm_up_is_done():
    service = Service(ServiceOptions(cache=FastCacheConfig(compile=False), engine=EngineConfig(sizes=((32, 32),),
                                                                                              steps=2)))
    gate = threading.Event()
    warm_up = service.warm_up
    service.warm_up = lambda: (gate.wait(60), warm_up(progress=False))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(service), host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{HOST}:{port}"
    try:
        wait_until(lambda: server.started, 60, "uvicorn's start")
        assert httpx.get(f"{url}/health").status_code == 200
        response = httpx.get(f"{url}/ready")
        assert response.status_code == 503 and response.headers["retry-after"]
        early = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"})
        assert early.status_code == 503 and early.headers["retry-after"]
        gate.set()
        wait_ready(url, 120)
        assert httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"}, timeout=60).status_code == 200
    finally:
        gate.set()
        server.should_exit = True
        thread.join(60)
    assert not thread.is_alive()


def test_a_full_queue_answers_429_and_sigterm_drains_in_flight_requests():
    server = ServerProcess("--preset", "tiny-sd", "--no-compile", "--sizes", "32", "--batch-sizes", "1,2",
                           "--steps", "2", "--max-queue", "2", "--max-delay-ms", "0")
    try:
        # distinct step counts never share a call: the queue fills
        flood = asyncio.run(post_all(server.url, [{"prompt": "x", "num_inference_steps": 30 + i} for i in range(12)]))
        codes = [r.status_code for r in flood]
        assert codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        assert all(r.headers["retry-after"] for r in flood if r.status_code == 429)
        after = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "after"}, timeout=120)
        assert after.status_code == 200

        async def drain():
            async with httpx.AsyncClient(timeout=300) as client:
                tasks = [asyncio.create_task(client.post(f"{server.url}/v1/images/generations",
                                                         json={"prompt": "y", "num_inference_steps": 40 + i}))
                         for i in range(2)]  # within --max-queue
                await asyncio.to_thread(wait_until, lambda: server.metrics()["fastcache_queue_depth"] >= 1, 60,
                                        "requests queued")
                server.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        drained = asyncio.run(drain())
        assert [r.status_code for r in drained] == [200] * 2
        assert server.proc.wait(timeout=120) == 0, server.output()
    finally:
        server.stop()


def test_clients_that_disconnect_are_dropped_and_the_service_keeps_serving():
    server = ServerProcess("--preset", "tiny-sd", "--no-compile", "--sizes", "32", "--batch-sizes", "1",
                           "--steps", "2", "--max-delay-ms", "0")
    try:
        for steps in (96, 97):  # ~2.7 s each here: the client is gone long before the images are
            body = json.dumps({"prompt": "gone", "num_inference_steps": steps}).encode()
            with socket.create_connection((HOST, server.port), timeout=30) as client:
                client.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                time.sleep(0.3)  # the whole request is sent; then the client closes its socket
        wait_until(lambda: server.metrics().get('fastcache_requests_total{status="499"}', 0) >= 1, 120,
                   "a disconnected request dropped")
        good = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "here"}, timeout=120)
        assert good.status_code == 200 and httpx.get(f"{server.url}/ready").status_code == 200
    finally:
        server.stop()


def test_sigterm_during_the_warm_up_exits_0():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastcache.cli", "serve", "--host", HOST, "--port", str(port),
                             "--preset", "tiny-sd", "--no-compile", "--sizes", "32,48,64", "--batch-sizes", "1,2,4,8",
                             "--guidance-modes", "on,off", "--steps", "20"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: status(f"http://{HOST}:{port}/ready") == 503, 120, "the warm-up's start")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert "warm-up stopped before" in err
    finally:
        if proc.poll() is None:
            proc.kill()
