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

Each scenario is a module beside this script: serve_faults_soak.py, _burst.py, _fuzz.py and _ray.py (Ray is
imported only for its run), with what they share in serve_faults_common.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scenarios, serve_load.py and serve_fuzz.py, beside this
from serve_faults_burst import burst  # noqa: E402
from serve_faults_common import PRESET, SIZE, STEPS  # noqa: E402
from serve_faults_fuzz import fuzz  # noqa: E402
from serve_faults_soak import soak  # noqa: E402

logger = logging.getLogger("bench.faults")

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


def _ray_fault(args) -> dict:
    from serve_faults_ray import ray_fault  # Ray is imported only for this run

    return ray_fault(args)


def main(argv=None) -> dict[str, dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fastcache.environment import environment

    results = {}
    for run in RUNS if args.run == "all" else (args.run,):
        figures = {"soak": soak, "burst": burst, "fuzz": fuzz, "ray": _ray_fault}[run](args)
        figures["environment"] = dict(environment("cpu"), cores=os.cpu_count())
        results[run] = figures
        (out / f"serve_faults_{run}.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
        (out / f"serve_faults_{run}.md").write_text(markdown(run, figures))
        held = all(figures["targets"].values())
        logger.info("%s: %s", run, "every target held" if held else f"MISSED: {figures['targets']}")
    return results


if __name__ == "__main__":
    sys.exit(0 if all(all(f["targets"].values()) for f in main().values()) else 1)
