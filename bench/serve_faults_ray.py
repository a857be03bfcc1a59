"""The Ray run of bench/serve_faults.py: two Ray Serve replicas under load, one killed -9; every request 200 or 5xx,
never a hang; the replacement warms up from the compile cache. A pid is killed only after it is found to descend
from this process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from serve_faults_common import GENERATIONS, PRESET, SIZE, STEPS, descends_from, percentiles, post

from fastcache import FastCacheConfig
from fastcache.serving.probe import free_port, wait_until

logger = logging.getLogger("bench.faults")


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
            code, response, seconds = await post(http, GENERATIONS, {"prompt": f"ray {number}", "seed": index},
                                                  bound)
            log.append(dict(sent=sent, status=code, seconds=seconds,
                            answer=response.text[:160] if response is not None and code != 200 else None))
            index += 1
            if code != 200:
                await asyncio.sleep(0.2)  # a failed request is retried by its client, not at once

    async with httpx.AsyncClient(base_url=url, timeout=bound) as http:
        await asyncio.gather(*(client(http, number) for number in range(clients)))
