"""Load benchmark of ``fastcache serve``: concurrent clients (dynamic batching) against sequential batch-1 calls.

Both phases send the same requests to the same server, one after the other: first ``--clients`` closed-loop clients
at once, then one client, one request at a time (so every pipeline call holds one image). For each it reports
throughput, latency percentiles and the distribution of images per pipeline call (from the server's /metrics), plus
the server's card and versions; ratios side by side. Output: ``serve_load.jsonl`` and ``serve_load.md`` under --out.

    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 16 --requests 64
    python bench/serve_load.py --launch "--preset tiny-sd --sizes 32 --batch-sizes 1,2,4,8 --steps 10"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from fastcache.serving.auth import keys_from_env
from fastcache.serving.probe import free_port, wait_ready

# a server with API keys is measured with the first key of FASTCACHE_API_KEY
HEADERS = {"Authorization": f"Bearer {keys_from_env()[0]}"} if keys_from_env() else {}

logger = logging.getLogger("bench")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--launch", help="start `fastcache serve` with these arguments on a free loopback port, "
                                         "wait for /ready, measure, then stop it with SIGTERM")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients in the batched phase")
    p.add_argument("--requests", type=int, default=64, help="requests per phase")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps per request (default: the server's)")
    p.add_argument("--size", default=None, help="WxH per request (default: the server's first size)")
    p.add_argument("--ready-timeout", type=float, default=1800, help="seconds to wait for a launched server's warm-up")
    p.add_argument("--out", default="bench-results/serve-load", help="output folder")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        p.error("--clients and --requests must be >= 1")
    return args


@contextmanager
def launched(arguments: str, ready_timeout: float, quiet: bool = False):
    """``fastcache serve`` on a free 127.0.0.1 port; its URL and process once ready; SIGTERM (a drain) at the end.
    ``quiet``: its log goes to a temporary file (named in this log) instead of this terminal."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("wb", prefix="fastcache-serve-", suffix=".log", delete=False) if quiet else None
    if log is not None:
        logger.info("server log: %s", log.name)
    proc = subprocess.Popen([sys.executable, "-m", "fastcache.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             *shlex.split(arguments)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, ready_timeout, alive=lambda: proc.poll() is None)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log is not None:
            log.close()


def batch_counts(url: str) -> dict[float, float]:
    """The server's cumulative histogram of images per pipeline call, as {upper bound: calls}."""
    text = httpx.get(f"{url}/metrics", timeout=30, headers=HEADERS).text
    return {float(sample.labels["le"]): sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "fastcache_batch_images_bucket"}


def batch_distribution(before: dict, after: dict) -> dict[str, int]:
    """Calls per batch-size bucket between two scrapes (the cumulative histogram taken apart)."""
    out, previous = {}, 0.0
    for bound in sorted(after):
        cumulative = after[bound] - before.get(bound, 0.0)
        if cumulative - previous > 0:
            out["+Inf" if bound == float("inf") else f"<={bound:g}"] = int(cumulative - previous)
        previous = cumulative
    return out


async def run_phase(url: str, bodies: list[dict], clients: int) -> dict:
    """``clients`` closed-loop clients share ``bodies``; latency of each request and the wall time of all."""
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies, failures = [], 0

    async def client(http: httpx.AsyncClient):
        nonlocal failures
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/images/generations", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1
                logger.warning("request failed: %s %s", response.status_code, response.text[:200])

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, headers=HEADERS) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if latencies else (float("nan"),) * 3
    return dict(clients=clients, requests=len(bodies), ok=len(latencies), failed=failures, seconds=wall,
                throughput_rps=len(latencies) / wall, p50_s=float(p50), p95_s=float(p95), p99_s=float(p99))


def markdown(results: list[dict], model: dict) -> str:
    runtime = model.get("runtime", {})
    batched, sequential = results
    lines = [f"# fastcache serve load: {model['id']} on {runtime.get('card', '?')} ({runtime.get('device', '?')})",
             "", f"torch {runtime.get('torch')}, diffusers {runtime.get('diffusers')}, fastcache "
             f"{runtime.get('fastcache')}; {model.get('compile')}, interval {model.get('interval')}, branch "
             f"{model.get('branch')}; batch sizes "
             f"{model.get('batch_sizes')}; {model.get('description', '')}", "",
             "| phase | clients | ok/requests | req/s | p50 s | p95 s | p99 s | images per pipeline call |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['phase']} | {r['clients']} | {r['ok']}/{r['requests']} | {r['throughput_rps']:.2f} | "
                     f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['p99_s']:.3f} | {r['batches']} |")
    lines += ["", f"throughput, batched / sequential: {batched['throughput_rps'] / sequential['throughput_rps']:.2f}x; "
              f"p50 latency, batched / sequential: {batched['p50_s'] / sequential['p50_s']:.2f}x. Both phases ran on "
              f"the same server: the sequential one pays its batching delay ({model.get('max_delay_ms', 0):g} ms) on "
              f"every request, as a lone client does."]
    return "\n".join(lines)


def measure(url: str, args: argparse.Namespace) -> list[dict]:
    model = httpx.get(f"{url}/v1/models", timeout=30, headers=HEADERS).json()["data"][0]
    extra = {key: value for key, value in (("num_inference_steps", args.steps), ("size", args.size)) if value}
    bodies = [dict(prompt=f"load test prompt {i}", seed=i, **extra) for i in range(args.requests)]
    results = []
    for phase, clients in (("batched", args.clients), ("sequential batch-1", 1)):
        before = batch_counts(url)
        result = asyncio.run(run_phase(url, bodies, clients))
        result.update(phase=phase, batches=batch_distribution(before, batch_counts(url)), model=model["id"],
                      **model.get("runtime", {}))
        logger.info("%s: %.2f req/s, p50 %.3f s", phase, result["throughput_rps"], result["p50_s"])
        results.append(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "serve_load.jsonl", "w") as f:
        for result in results:
            f.write(json.dumps(result) + "\n")
    table = markdown(results, model)
    (out / "serve_load.md").write_text(table + "\n")
    print(table)
    return results


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.url:
        return measure(args.url, args)
    with launched(args.launch, args.ready_timeout) as (url, _):
        return measure(url, args)


if __name__ == "__main__":
    main()
