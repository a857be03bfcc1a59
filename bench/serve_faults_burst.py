"""The burst of bench/serve_faults.py: many requests at once against a small queue; each 200 or 429, none lost, every
200 equal to a direct call."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
from serve_faults_common import GENERATIONS, SERVER, Reference, percentiles, post, scrape, server_latency
from serve_load import launched

from fastcache.serving.probe import status, wait_until


async def _burst_load(url: str, count: int, bound: float) -> list[dict]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=bound, limits=limits) as http:
        async def one(index: int):
            code, response, seconds = await post(http, GENERATIONS, burst_body(index), bound)
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
                   ok_latency=percentiles([r["seconds"] for r in ok]), okserver_latency_mean_s=server_latency(before,
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
