"""The fuzz of bench/serve_faults.py: seeded malformed generations and edits (bench/serve_fuzz.py's cases) against a
keyed server with tight limits; 4xx only, in the one error format, still ready and still exact afterwards."""

from __future__ import annotations

import random
import time
from collections import Counter

import httpx
from serve_faults_common import EDITS, GENERATIONS, SERVER, SIZE, Reference
from serve_fuzz import edit_cases, generation_cases, picture, run_cases
from serve_load import launched

from fastcache.serving.probe import status

FUZZ_KEY, FUZZ_READ_TIMEOUT, FUZZ_MAX_SIZE = "sk-fuzz-5b1e", 3.0, 64
FUZZ_MAX_BODY = 2**20


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
