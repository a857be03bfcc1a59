"""Load and fault figures of ``fastcache serve``, on 127.0.0.1 only, every loop bounded in count and time.

    python bench/serve_faults.py soak    # 2,000 requests from 8 clients: errors, resident memory, queue, latency
    python bench/serve_faults.py burst   # 300 requests at once against --max-queue 32: each 200 or 429, none lost
    python bench/serve_faults.py fuzz    # 650 malformed generations and edits: 4xx only, still ready, still exact
    python bench/serve_faults.py ray     # 2 Ray Serve replicas under load, one killed -9: 5xx, never a hang; recovery
    python bench/serve_faults.py all

The served model is the tiny preset at its smallest size (32 px), 2 steps, eager (no compile), except the Ray run's
replicas, which compile (``--ray-no-compile`` to not) so that the restarted one can warm up from the compile cache.
Every image answered 200 in the burst, and the good requests around the fuzz, are compared with a direct call of the
same model, seed and cache settings in this process (decoded pixels, within the PNG's rounding). Each run writes
``serve_faults_<run>.json`` and ``.md`` under ``--out`` with its targets and whether they held; the exit status is 1
if one did not. The servers are this script's own processes (Ray's replica processes included: a pid is killed only
after it is found to descend from this process).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_load.py and serve_fuzz.py, beside this file
from serve_fuzz import edit_cases, generation_cases, picture, run_cases  # noqa: E402
from serve_load import batch_counts, batch_distribution, launched  # noqa: E402

from fastcache import FastCacheConfig, compile_pipeline  # noqa: E402
from fastcache.models import build_pipeline  # noqa: E402
from fastcache.serving.edits import edit_pipeline  # noqa: E402
from fastcache.serving.probe import free_port, status, wait_until  # noqa: E402
from fastcache.serving.request import ImageRequest, pipeline_kwargs  # noqa: E402

logger = logging.getLogger("bench.faults")

PRESET, SIZE, STEPS = "tiny-sd", 32, 2
SERVER = ["--preset", PRESET, "--no-compile", "--sizes", str(SIZE), "--steps", str(STEPS)]
GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
FUZZ_KEY, FUZZ_READ_TIMEOUT, FUZZ_MAX_SIZE = "sk-fuzz-5b1e", 3.0, 64
FUZZ_MAX_BODY = 2**20
RUNS = ("soak", "burst", "fuzz", "ray")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", choices=(*RUNS, "all"))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    p.add_argument("--soak-requests", type=int, default=2000)
    p.add_argument("--soak-clients", type=int, default=8)
    p.add_argument("--soak-memory-at", type=int, default=200, help="the request after which memory is the baseline")
    p.add_argument("--memory-mb", type=float, default=50.0, help="most resident memory the soak may add, MB")
    p.add_argument("--burst-requests", type=int, default=300)
    p.add_argument("--burst-max-queue", type=int, default=32)
    p.add_argument("--fuzz-requests", type=int, default=650, help="half generations, half edits")
    p.add_argument("--fuzz-seed", type=int, default=16)
    p.add_argument("--ray-clients", type=int, default=4)
    p.add_argument("--ray-no-compile", action="store_true", help="eager replicas (no compile cache to warm from)")
    p.add_argument("--ray-cache-dir", help="the replicas' compile cache (default: a new folder, filled first by "
                                           "`fastcache warmup`)")
    p.add_argument("--bound", type=float, default=120.0, help="seconds any one request may take before it counts as "
                                                               "hung")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    if min(args.soak_requests, args.soak_clients, args.burst_requests, args.fuzz_requests) < 1 or not (
            1 <= args.soak_memory_at <= args.soak_requests):
        p.error("counts must be >= 1 and --soak-memory-at at most --soak-requests")
    return args


# -- what is measured ------------------------------------------------------------------------------------------------

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


def _server_latency(before: dict, after: dict) -> float | None:
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


async def _post(http: httpx.AsyncClient, path: str, body: dict, bound: float) -> tuple[object, httpx.Response | None,
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


# -- soak ------------------------------------------------------------------------------------------------------------

async def _soak_load(url: str, pid: int, args) -> dict:
    total, memory_at = args.soak_requests, args.soak_memory_at
    checked_every = max(1, total // 20)
    done, next_index, latencies, errors, kept, memory, queue = 0, 0, [], [], {}, {}, []
    finished = asyncio.Event()

    async def client(http: httpx.AsyncClient):
        nonlocal done, next_index
        while next_index < total:
            index, next_index = next_index, next_index + 1
            body = {"prompt": f"soak prompt {index % 16}", "seed": 10_000 + index}
            code, response, seconds = await _post(http, GENERATIONS, body, args.bound)
            if code == 200:
                latencies.append(seconds)
                if index % checked_every == 0:
                    kept[index] = response.json()["data"][0]["b64_json"]
            else:
                errors.append((index, code, response.text[:200] if response is not None else ""))
            done += 1
            if done in (memory_at, total):
                memory[done] = resident_mb(pid)

    async def sampler(http: httpx.AsyncClient):  # the queue and memory while the soak runs
        while not finished.is_set():
            text = (await http.get("/metrics")).text
            depth = next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                         if s.name == "fastcache_queue_depth")
            queue.append(dict(done=done, queue_depth=depth, rss_mb=round(resident_mb(pid), 1)))
            try:
                await asyncio.wait_for(finished.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=args.bound) as http:
        watch = asyncio.create_task(sampler(http))
        await asyncio.gather(*(client(http) for _ in range(args.soak_clients)))
        finished.set()
        await watch
    return dict(seconds=time.monotonic() - start, latencies=latencies, errors=errors, kept=kept, memory=memory,
                samples=queue)


def soak(args) -> dict:
    with launched(" ".join([*SERVER, "--batch-sizes", "1,2,4,8", "--max-delay-ms", "20", "--edits", "none"]),
                  args.ready_timeout, quiet=True) as (url, proc):
        before, batches_before = scrape(url), batch_counts(url)
        load = asyncio.run(_soak_load(url, proc.pid, args))
        after, batches = scrape(url), batch_distribution(batches_before, batch_counts(url))
        ready = status(f"{url}/ready") == 200
    reference = Reference()
    mismatched = [index for index, b64 in sorted(load["kept"].items())
                  if not reference.same(b64, reference.generate(f"soak prompt {index % 16}", 10_000 + index))]
    memory = load["memory"]
    baseline, final = memory.get(args.soak_memory_at), memory.get(args.soak_requests)
    growth = final - baseline if baseline is not None and final is not None else None
    depths = [sample["queue_depth"] for sample in load["samples"]]
    answered = after.get('fastcache_requests_total{"status": "200"}', 0) - before.get(
        'fastcache_requests_total{"status": "200"}', 0)
    server_latency = _server_latency(before, after)
    figures = dict(requests=args.soak_requests, clients=args.soak_clients, ok=len(load["latencies"]),
                   errors=len(load["errors"]), first_errors=load["errors"][:10], answered_200_by_metrics=answered,
                   seconds=round(load["seconds"], 1),
                   throughput_rps=round(len(load["latencies"]) / load["seconds"], 2), **percentiles(load["latencies"]),
                   server_latency_mean_s=server_latency,
                   rss_mb_at={str(k): round(v, 1) for k, v in memory.items()},
                   rss_growth_mb=round(growth, 1) if growth is not None else None, memory_limit_mb=args.memory_mb,
                   rss_mb_max=max((sample["rss_mb"] for sample in load["samples"]), default=None),
                   queue_depth_max=max(depths, default=None), queue_depth_mean=round(float(np.mean(depths)), 2)
                   if depths else None, queue_samples=len(depths), batches=batches,
                   images_checked=len(load["kept"]), images_mismatched=mismatched, ready_after=ready,
                   samples=load["samples"])
    figures["targets"] = {
        "no error": figures["errors"] == 0 and figures["ok"] == args.soak_requests and answered == args.soak_requests,
        f"memory growth after request {args.soak_memory_at} <= {args.memory_mb:g} MB":
            growth is not None and growth <= args.memory_mb,
        "sampled images equal direct calls": not mismatched,
        "ready afterwards": ready}
    return figures


# -- burst -----------------------------------------------------------------------------------------------------------

async def _burst_load(url: str, count: int, bound: float) -> list[dict]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=bound, limits=limits) as http:
        async def one(index: int):
            code, response, seconds = await _post(http, GENERATIONS, burst_body(index), bound)
            return dict(index=index, status=code, seconds=seconds,
                        retry_after=response.headers.get("retry-after") if response is not None else None,
                        b64=response.json()["data"][0]["b64_json"] if code == 200 else None)

        return await asyncio.gather(*(one(index) for index in range(count)))


def burst_body(index: int) -> dict:
    return {"prompt": f"burst prompt {index % 7}", "seed": 20_000 + index}


def burst(args) -> dict:
    with launched(" ".join([*SERVER, "--batch-sizes", "1,2,4,8", "--max-delay-ms", "20", "--edits", "none",
                            "--max-queue", str(args.burst_max_queue)]), args.ready_timeout, quiet=True) as (url, _):
        before = scrape(url)
        start = time.monotonic()
        results = asyncio.run(_burst_load(url, args.burst_requests, args.bound))
        seconds = time.monotonic() - start
        wait_until(lambda: scrape(url)["fastcache_queue_depth"] == 0, 60, "the queue empty")
        after = scrape(url)
        ready = status(f"{url}/ready") == 200
    reference = Reference()
    ok = [r for r in results if r["status"] == 200]
    mismatched = [r["index"] for r in ok if not reference.same(r["b64"], reference.generate(**burst_body(r["index"])))]
    outcomes = Counter(str(r["status"]) for r in results)
    refused = [r for r in results if r["status"] == 429]
    counted = {code: after.get(f'fastcache_requests_total{{"status": "{code}"}}', 0) - before.get(
        f'fastcache_requests_total{{"status": "{code}"}}', 0) for code in ("200", "429")}
    figures = dict(requests=args.burst_requests, max_queue=args.burst_max_queue, seconds=round(seconds, 1),
                   outcomes=dict(outcomes), counted_by_metrics=counted,
                   retry_after_missing=sum(1 for r in refused if not r["retry_after"]),
                   ok_latency=percentiles([r["seconds"] for r in ok]), ok_server_latency_mean_s=_server_latency(before,
                                                                                                               after),
                   refused_latency=percentiles([r["seconds"] for r in refused]),
                   images_checked=len(ok), images_mismatched=mismatched, ready_after=ready)
    figures["targets"] = {
        "each 200 or 429": set(outcomes) <= {"200", "429"},
        "every 429 has Retry-After": figures["retry_after_missing"] == 0,
        "none lost or hung": sum(outcomes.values()) == args.burst_requests and not any(
            key.startswith(("hung", "lost")) for key in outcomes),
        "the server counted each": counted["200"] == outcomes["200"] and counted["429"] == outcomes["429"],
        "every 200 equals a direct call": not mismatched, "ready afterwards": ready}
    return figures


# -- fuzz ------------------------------------------------------------------------------------------------------------

def fuzz(args) -> dict:
    rng = random.Random(args.fuzz_seed)
    half = args.fuzz_requests // 2
    cases = (generation_cases(rng, half, FUZZ_KEY, FUZZ_MAX_BODY)
             + edit_cases(rng, args.fuzz_requests - half, FUZZ_KEY, FUZZ_MAX_BODY, SIZE, FUZZ_MAX_SIZE))
    server = [*SERVER, "--batch-sizes", "1,2", "--max-steps", "8", "--max-delay-ms", "0", "--api-key", FUZZ_KEY,
              "--read-timeout", str(FUZZ_READ_TIMEOUT), "--max-body-mb", str(FUZZ_MAX_BODY / 2**20), "--max-size",
              str(FUZZ_MAX_SIZE)]
    with launched(" ".join(server), args.ready_timeout, quiet=True) as (url, proc):
        good = good_requests(url)
        start = time.monotonic()
        outcomes = run_cases(url, int(url.rsplit(":", 1)[1]), cases, FUZZ_READ_TIMEOUT + 2)
        seconds = time.monotonic() - start
        ready = proc.poll() is None and status(f"{url}/ready") == 200
        again = good_requests(url)
    reference = Reference()
    image = picture(SIZE, 1)
    wants = [reference.generate("after the fuzz", 11), reference.edit("after the fuzz", 12, image)]
    exact = [response is not None and reference.same(response, want)
             for response, want in zip(again, wants, strict=True)]
    statuses = {endpoint: dict(sorted(Counter(str(o["status"]) for o in part).items()))
                for endpoint, part in (("generations", outcomes[:half]), ("edits", outcomes[half:]))}
    figures = dict(requests=len(cases), seed=args.fuzz_seed, seconds=round(seconds, 1), statuses=statuses,
                   error_codes=dict(Counter(str(o["code"]) for o in outcomes).most_common()),
                   server_errors=sum(1 for o in outcomes if isinstance(o["status"], int) and o["status"] >= 500),
                   failures=[o for o in outcomes if not o["ok"]][:20], ready_after=ready,
                   good_requests_before=[r is not None for r in good], good_requests_exact_after=exact)
    figures["targets"] = {"at least 500 requests": len(cases) >= 500, "no 5xx": figures["server_errors"] == 0,
                          "every answer a 4xx in the one format, in bounded time": all(o["ok"] for o in outcomes),
                          "ready afterwards": ready,
                          "a good generation and edit afterwards equal direct calls": all(exact)}
    return figures


def good_requests(url: str) -> list[str | None]:
    """A good generation and a good edit (img2img) on the fuzz server: their images (b64), None for a failure."""
    headers = {"Authorization": f"Bearer {FUZZ_KEY}"}
    generation = httpx.post(f"{url}{GENERATIONS}", json={"prompt": "after the fuzz", "seed": 11}, headers=headers,
                            timeout=120)
    edit = httpx.post(f"{url}{EDITS}", data={"prompt": "after the fuzz", "seed": "12"}, headers=headers, timeout=120,
                      files={"image": ("image.png", picture(SIZE, 1), "image/png")})
    return [r.json()["data"][0]["b64_json"] if r.status_code == 200 else None for r in (generation, edit)]


# -- Ray: a replica killed under load --------------------------------------------------------------------------------

def ray_fault(args) -> dict:
    from fastcache.serving import ray_serve
    from fastcache.serving.engine import EngineConfig
    from fastcache.serving.service import ServiceOptions

    compiled = not args.ray_no_compile
    cache_dir = args.ray_cache_dir or tempfile.mkdtemp(prefix="fastcache-ray-fault-")
    options = ServiceOptions(cache=FastCacheConfig(compile=compiled), cache_dir=cache_dir,
                             engine=EngineConfig(batch_sizes=(1,), sizes=((SIZE, SIZE),), steps=STEPS, edits=()))
    prepared = _prepare_cache(cache_dir, args.ready_timeout) if compiled else None
    start = time.monotonic()
    url = ray_serve.start(options, 2, host="127.0.0.1", port=free_port(), timeout=args.ready_timeout)
    deploy_seconds = time.monotonic() - start
    log, stop = [], threading.Event()
    try:
        pids = wait_until(lambda: _replica_pids(url, 2), 120, "both replicas seen through the proxy")
        strangers = [pid for pid in pids if not descends_from(pid, os.getpid())]
        if strangers:
            raise RuntimeError(f"replica pids {strangers} are not this process's descendants: not killing them")
        load = threading.Thread(target=lambda: asyncio.run(_ray_load(url, args.ray_clients, args.bound, log, stop)))
        load.start()
        time.sleep(5)  # the load runs on both replicas
        victim = sorted(pids)[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        logger.info("killed replica pid %d", victim)
        replacement = wait_until(lambda: _new_replica(url, set(pids)), args.ready_timeout, "a replacement replica",
                                 poll=0.5)
        recovery = time.monotonic() - killed_at
        time.sleep(5)  # the load runs on the replacement too
        stop.set()
        load.join(args.bound + 30)
        after = _replica_pids(url, 2) or []
    finally:
        stop.set()
        ray_serve.stop()
    during = [entry for entry in log if killed_at <= entry["sent"] <= killed_at + recovery]
    outcomes = Counter(str(entry["status"]) for entry in log)
    during_outcomes = Counter(str(entry["status"]) for entry in during)
    figures = dict(replicas=2, clients=args.ray_clients, compiled=compiled, cache_prepared=prepared,
                   deploy_seconds=round(deploy_seconds, 1),
                   killed_pid=victim, replacement_pid=replacement["pid"],
                   replacement_compile_cache=replacement.get("compile_cache"),
                   replacement_warmup_seconds=replacement.get("warmup_seconds"),
                   recovery_seconds=round(recovery, 1), requests=len(log), outcomes=dict(outcomes),
                   outcomes_during_recovery=dict(during_outcomes),
                   latency_ok=percentiles([e["seconds"] for e in log if e["status"] == 200]),
                   slowest_failure_s=round(max((e["seconds"] for e in log if e["status"] != 200), default=0), 2),
                   failure_answers=sorted({e["answer"] for e in log if e["answer"]})[:5],
                   pids_after=sorted(after))
    figures["targets"] = {
        "every request 200 or 5xx, none hung or lost": all(key == "200" or key.startswith("5") for key in outcomes),
        "the other replica kept answering": during_outcomes.get("200", 0) > 0,
        "the killed replica was replaced": replacement["pid"] not in pids and len(after) == 2,
        **({"the replacement warmed up from the compile cache": replacement.get("compile_cache") == "warm"}
           if compiled else {})}
    return figures


def _prepare_cache(cache_dir: str, timeout: float) -> dict:
    """``fastcache warmup`` of the replicas' configuration into ``cache_dir``, as an operator does before a scale-out
    (so that the replicas, and a replacement, warm up from the compile cache); its report."""
    report = Path(cache_dir) / "warmup-report.jsonl"
    subprocess.run([sys.executable, "-m", "fastcache.cli", "warmup", "--preset", PRESET, "--sizes", str(SIZE),
                    "--batch-sizes", "1", "--steps", str(STEPS), "--edits", "none", "--cache-dir", cache_dir,
                    "--report", str(report)], check=True, timeout=timeout, capture_output=True)
    last = json.loads(report.read_text().splitlines()[-1])
    return {key: last.get(key) for key in ("seconds", "cache", "artifacts_saved")}


def _replica_pids(url: str, count: int) -> list[int] | None:
    """The pids of ``count`` replicas, from their /health answers through the proxy (at most 40 asks)."""
    seen = set()
    for _ in range(40):
        try:
            response = httpx.get(f"{url}/health", timeout=10)
        except httpx.HTTPError:
            continue
        if response.status_code == 200:
            seen.add(response.json()["pid"])
        if len(seen) == count:
            return sorted(seen)
    return None


def _new_replica(url: str, old: set[int]) -> dict | None:
    """A /ready answer from a replica whose pid is not in ``old``, or None."""
    try:
        response = httpx.get(f"{url}/ready", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code == 200 and response.json().get("pid") not in old:
        return response.json()
    return None


async def _ray_load(url: str, clients: int, bound: float, log: list, stop: threading.Event) -> None:
    async def client(http: httpx.AsyncClient, number: int):
        index = 0
        while not stop.is_set():
            sent = time.monotonic()
            code, response, seconds = await _post(http, GENERATIONS, {"prompt": f"ray {number}", "seed": index},
                                                  bound)
            log.append(dict(sent=sent, status=code, seconds=seconds,
                            answer=response.text[:160] if response is not None and code != 200 else None))
            index += 1
            if code != 200:
                await asyncio.sleep(0.2)  # a failed request is retried by its client, not at once

    async with httpx.AsyncClient(base_url=url, timeout=bound) as http:
        await asyncio.gather(*(client(http, number) for number in range(clients)))


# -- report ----------------------------------------------------------------------------------------------------------

def markdown(run: str, figures: dict) -> str:
    shown = {key: value for key, value in figures.items() if key not in ("targets", "samples", "failures")}
    cores = figures.get("environment", {}).get("cores")
    lines = [f"# fastcache serve, {run}: {PRESET} {SIZE} px, {STEPS} steps, "
             f"{'compiled' if figures.get('compiled') else 'eager'}, on 127.0.0.1", "",
             f"CPU, {cores} cores shared with other work: the times are noisy; the targets are counts, memory and "
             f"equality with direct calls, not times.", "", "| figure | value |", "|---|---|"]
    lines += [f"| {key} | {json.dumps(value) if not isinstance(value, str) else value} |"
              for key, value in shown.items()]
    lines += ["", "| target | held |", "|---|---|"]
    lines += [f"| {target} | {'yes' if held else '**no**'} |" for target, held in figures["targets"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fastcache.environment import environment

    results = {}
    for run in RUNS if args.run == "all" else (args.run,):
        figures = {"soak": soak, "burst": burst, "fuzz": fuzz, "ray": ray_fault}[run](args)
        figures["environment"] = dict(environment("cpu"), cores=os.cpu_count())
        results[run] = figures
        (out / f"serve_faults_{run}.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
        (out / f"serve_faults_{run}.md").write_text(markdown(run, figures))
        held = all(figures["targets"].values())
        logger.info("%s: %s", run, "every target held" if held else f"MISSED: {figures['targets']}")
    return results


if __name__ == "__main__":
    sys.exit(0 if all(all(f["targets"].values()) for f in main().values()) else 1)
