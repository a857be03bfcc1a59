"""The soak of bench/serve_faults.py: many requests from a few clients; errors, resident memory, the queue, latency,
and sampled images against direct calls."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from serve_faults_common import GENERATIONS, SERVER, Reference, percentiles, post, resident_mb, scrape, server_latency
from serve_load import batch_counts, batch_distribution, launched

from fastcache.serving.probe import status


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
            code, response, seconds = await post(http, GENERATIONS, body, args.bound)
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
    mean_latency = server_latency(before, after)
    figures = dict(requests=args.soak_requests, clients=args.soak_clients, ok=len(load["latencies"]),
                   errors=len(load["errors"]), first_errors=load["errors"][:10], answered_200_by_metrics=answered,
                   seconds=round(load["seconds"], 1),
                   throughput_rps=round(len(load["latencies"]) / load["seconds"], 2), **percentiles(load["latencies"]),
                   server_latency_mean_s=mean_latency,
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
