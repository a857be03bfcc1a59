"""What bench/serve_faults.py's scenarios share: the served tiny model, the measurements (resident memory, metrics,
latency percentiles), bounded requests, and the direct calls that answered images are compared with."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fastcache import FastCacheConfig, compile_pipeline
from fastcache.models import build_pipeline
from fastcache.serving.edits import edit_pipeline
from fastcache.serving.request import ImageRequest, pipeline_kwargs

PRESET, SIZE, STEPS = "tiny-sd", 32, 2
SERVER = ["--preset", PRESET, "--no-compile", "--sizes", str(SIZE), "--steps", str(STEPS)]
GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"


def resident_mb(pid: int) -> float:
    """Resident memory of process ``pid`` (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process ``pid`` is ``ancestor`` or one of its descendants (read from /proc)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            status_lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except FileNotFoundError:
            return False
        pid = int(next(line for line in status_lines if line.startswith("PPid:")).split()[1])
    return False


def scrape(url: str, headers: dict | None = None) -> dict[str, float]:
    """The server's metrics as {name{labels}: value} (histogram buckets left out)."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    return {sample.name + (json.dumps(sample.labels, sort_keys=True) if sample.labels else ""): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if not sample.name.endswith("_bucket")}


def server_latency(before: dict, after: dict) -> float | None:
    """Mean seconds from request to response of the 200s between two scrapes, as the server measured them."""
    count = after["fastcache_request_seconds_count"] - before["fastcache_request_seconds_count"]
    total = after["fastcache_request_seconds_sum"] - before["fastcache_request_seconds_sum"]
    return round(total / count, 4) if count else None


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return dict(p50_s=round(float(p50), 4), p95_s=round(float(p95), 4), p99_s=round(float(p99), 4),
                max_s=round(max(latencies), 4))


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


class Reference:
    """Direct calls of the served model in this process: the same preset and weights' seed, the server's default
    cache settings, eager. ``same(b64, image)``: an answered PNG equals a direct call's image within the PNG's
    rounding (batched images equal unbatched ones within float rounding)."""

    def __init__(self, preset: str = PRESET, steps: int = STEPS, size: int = SIZE):
        self.steps, self.size = steps, size
        self.pipe = build_pipeline(preset)
        self.handle = compile_pipeline(self.pipe, config=FastCacheConfig(compile=False))
        self.img2img = edit_pipeline(self.pipe, "img2img")

    def generate(self, prompt: str, seed: int) -> np.ndarray:
        request = ImageRequest(prompt, self.size, self.size, self.steps, 7.5, seed=seed)
        return self.pipe(**pipeline_kwargs(self.pipe, [request])).images[0]

    def edit(self, prompt: str, seed: int, image: bytes) -> np.ndarray:
        request = ImageRequest(prompt, self.size, self.size, self.steps, 7.5, seed=seed,
                               image=Image.open(io.BytesIO(image)).convert("RGB"))
        return self.img2img(**pipeline_kwargs(self.img2img, [request])).images[0]

    @staticmethod
    def same(b64: str, image: np.ndarray) -> bool:
        diff = np.abs(decoded(b64) - (image * 255).round().astype(np.int16))
        return bool(diff.max() <= 1 and diff.mean() < 0.01)


async def post(http: httpx.AsyncClient, path: str, body: dict, bound: float) -> tuple[object, httpx.Response | None,
                                                                                       float]:
    """One request bounded by ``bound`` seconds: (status, or "hung"/"lost: ERROR"; the response; seconds)."""
    start = time.monotonic()
    try:
        response = await asyncio.wait_for(http.post(path, json=body), bound)
        return response.status_code, response, time.monotonic() - start
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return "hung", None, time.monotonic() - start
    except httpx.HTTPError as error:
        return f"lost: {type(error).__name__}", None, time.monotonic() - start
