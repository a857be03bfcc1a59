"""Cold start of ``fastcache warmup``: a dynamic batch dimension (one compile per path) against static shapes.

In one run, each warm-up in a fresh process (``fastcache warmup``'s own code: its parser, ``Service.warm_up`` and
the ``--cache-dir`` compile cache):

- **cold** (an empty ``--cache-dir``): the warm-up of ``--single`` (default batch size 1) alone, then of every
  ``--batch-sizes`` (default 1,2,4,8), guidance on;
- **warm**: the restart of the second from the same ``--cache-dir`` (what a restarted or scaled-up replica pays),
  then, with ``--speed-repeats N``, each bucket timed N times after it (median seconds per call and per image);

for each of ``--modes`` (dynamic: the default; static: ``--static-shapes``). It prints and writes (``--out``,
``cold_start_<tag>.json`` and ``.md``) the warm-up seconds, dynamo's compilations (``counters.compiles``), the
ratios (cold all / cold single, warm / cold, dynamic / static), versions, machine and load. The ratios within one
run are what counts: the processes run one after the other on the same machine. ``--budget-s`` skips what would
start too late (a stage cut short keeps what it measured); the files are rewritten after every process.

    python bench/cold_start.py                                    # tiny-sd, 32 px, CPU (the committed CPU figures)
    python bench/cold_start.py --preset sd21 --device cuda --size 512 --steps 50 --batch-sizes 1,4 --single= \\
        --speed-repeats 5 --tag gpu                               # bench/device_check.sh serve
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "COLD_START_RESULT "
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-sd")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="32", help="pixels, N or WIDTHxHEIGHT")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-sizes", default="1,2,4,8", help="the buckets of the full warm-up (guidance on)")
    p.add_argument("--single", default="1", help="the buckets of the baseline warm-up; empty: skip it")
    p.add_argument("--modes", default="dynamic,static", help="dynamic (default batch handling), static "
                                                             "(--static-shapes), or both")
    p.add_argument("--speed-repeats", type=int, default=0, help="time each bucket this many times after the warm "
                                                                "restart (0: no speed figures)")
    p.add_argument("--warm-only", action="store_true", help="only the warm restarts, from the folders of an earlier "
                                                           "run with the same --scratch (e.g. for speed figures)")
    p.add_argument("--budget-s", type=float, default=3600.0, help="no process starts with less than its cap left")
    p.add_argument("--cap-s", type=float, default=1200.0, help="the longest one process may take")
    p.add_argument("--scratch", default=None, help="where the cache folders go (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="cpu", help="names the output files")
    p.add_argument("--note", default="", help="a line for the report (e.g. the machine's load)")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or not set(modes) <= {"dynamic", "static"}:
        p.error(f"--modes must be dynamic, static or both; got {args.modes!r}")
    args.modes = modes
    return args


def warmup_args(args, batch_sizes: str, cache_dir: Path, mode: str) -> list[str]:
    """``fastcache warmup``'s arguments for one process."""
    return (["--preset", args.preset, "--device", args.device, "--sizes", args.size, "--batch-sizes", batch_sizes,
             "--guidance-modes", "on", "--steps", str(args.steps), "--edits", "none", "--cache-dir", str(cache_dir)]
            + (["--static-shapes"] if mode == "static" else []))


def child(argv: list[str], speed_repeats: int) -> None:
    """One warm-up, as ``fastcache warmup`` runs it (same parser, same ``Service``); then, optionally, each bucket
    timed. Prints one result line."""
    import torch

    from fastcache.cli import build_parser, service_options
    from fastcache.serving.service import Service

    start = time.perf_counter()
    parser, commands = build_parser()
    args = parser.parse_args(["warmup", *argv])
    service = Service(service_options(commands["warmup"], args))
    built = time.perf_counter() - start
    report = service.warm_up(progress=False)
    speed = {}
    engine = service.engine
    for bucket in engine.config.buckets() if speed_repeats else ():
        times = []
        for _ in range(speed_repeats):
            begin = time.perf_counter()
            engine.run([engine._warmup_request(bucket)], record=False)  # the warm-up's own request for the bucket
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - begin)
        median = sorted(times)[len(times) // 2]
        speed[str(bucket)] = dict(seconds=median, per_image=median / bucket.batch)
    counters = [handle.counters for handle in engine.handles]
    print(MARK + json.dumps(dict(report, build_seconds=built, speed=speed,
                                 recompiles=sum(c.recompiles for c in counters),
                                 fallbacks=sum(c.fallbacks for c in counters))), flush=True)


def run_child(args, batch_sizes: str, cache_dir: Path, mode: str, speed_repeats: int, deadline: float) -> dict:
    """A fresh process for one warm-up; its result, with the process's wall seconds and the load around it."""
    cap = min(args.cap_s, deadline - time.monotonic())
    if cap < 30:
        return dict(skipped=f"{cap:.0f} s of the budget left")
    command = [sys.executable, __file__, "--child", str(speed_repeats), *warmup_args(args, batch_sizes, cache_dir,
                                                                                      mode)]
    load = os.getloadavg()[0]
    begin = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=cap, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
                                  "PYTHONPATH", "")])))
    except subprocess.TimeoutExpired:
        return dict(skipped=f"timed out after {cap:.0f} s")
    wall = time.perf_counter() - begin
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        sys.stderr.write(done.stderr[-4000:])
        return dict(failed=f"exit code {done.returncode}", stderr_tail=done.stderr[-1000:])
    return dict(json.loads(lines[-1][len(MARK):]), process_seconds=wall, load_before=load,
                load_after=os.getloadavg()[0])


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "seconds" not in a or "seconds" not in b:
        return None
    return a["seconds"] / b["seconds"]


def summarise(args, runs: dict) -> dict:
    """Ratios per mode, and dynamic against static."""
    ratios = {}
    for mode in args.modes:
        single, cold, warm = (runs.get(f"{mode}/{name}") for name in ("cold-single", "cold-all", "warm-all"))
        ratios[mode] = {"cold all / cold single (target <= 1.5)": ratio(cold, single),
                        "warm all / cold all (target <= 0.25)": ratio(warm, cold)}
    if {"dynamic", "static"} <= set(args.modes):
        ratios["dynamic / static"] = {name: ratio(runs.get(f"dynamic/{name}"), runs.get(f"static/{name}"))
                                      for name in ("cold-single", "cold-all", "warm-all")}
    return ratios


def markdown(result: dict) -> str:
    setup, env = result["setup"], result["environment"]
    lines = [f"# Cold start: dynamic batch vs static shapes ({result['tag']})", "",
             f"{setup['preset']} {setup['size']} px, {setup['steps']} steps, guidance on, buckets "
             f"{{{setup['batch_sizes']}}} (baseline {{{setup['single'] or '-'}}}), `fastcache warmup` in a fresh "
             f"process each, `--cache-dir` empty (cold) or reused (warm). "
             f"{env.get('card', '?')}, {setup['cpus']} CPUs, torch {env.get('torch')}, diffusers "
             f"{env.get('diffusers')}, Python {env.get('python')}. {setup['note']}", "",
             "| mode | run | warm-up s | compiles | process s | build s | load (1 min) | fxgraph hit/miss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        mode, label = name.split("/")
        if "seconds" not in run:
            lines.append(f"| {mode} | {label} | {run.get('skipped') or run.get('failed')} | | | | | |")
            continue
        lines.append(f"| {mode} | {label} | {run['seconds']:.1f} | {run['compiles']} | {run['process_seconds']:.1f} "
                     f"| {run['build_seconds']:.1f} | {run['load_before']:.1f}-{run['load_after']:.1f} | "
                     f"{run['fxgraph_hit']}/{run['fxgraph_miss']} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for group, values in result["ratios"].items():
        for name, value in values.items():
            lines.append(f"| {group}: {name} | {'-' if value is None else f'{value:.2f}'} |")
    speeds = {name: run["speed"] for name, run in result["runs"].items() if run.get("speed")}
    if speeds:
        lines += ["", "| mode | bucket | s/call | s/image |", "|---|---|---|---|"]
        for name, speed in speeds.items():
            for bucket, figures in speed.items():
                lines.append(f"| {name.split('/')[0]} | {bucket} | {figures['seconds']:.4f} | "
                             f"{figures['per_image']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[2:], int(argv[1]))
        return 0
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="cold-start-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(tag=args.tag, setup=dict(preset=args.preset, device=args.device, size=args.size, steps=args.steps,
                                           batch_sizes=args.batch_sizes, single=args.single, cpus=os.cpu_count(),
                                           machine=platform.machine(), note=args.note),
                  environment={}, runs={}, ratios={})
    plan = []
    for mode in args.modes:
        if args.single and not args.warm_only:
            plan.append((f"{mode}/cold-single", args.single, scratch / f"{mode}-single", 0))
        if not args.warm_only:
            plan.append((f"{mode}/cold-all", args.batch_sizes, scratch / f"{mode}-all", 0))
        plan.append((f"{mode}/warm-all", args.batch_sizes, scratch / f"{mode}-all", args.speed_repeats))
    for name, batch_sizes, cache_dir, repeats in plan:
        if "cold" in name:
            shutil.rmtree(cache_dir, ignore_errors=True)
        print(f"== {name}: batch sizes {batch_sizes}", flush=True)
        run = run_child(args, batch_sizes, cache_dir, name.split("/")[0], repeats, deadline)
        result["runs"][name] = run
        if "seconds" in run:
            result["environment"] = {key: run[key] for key in ("torch", "diffusers", "fastcache", "python", "card",
                                                               "cuda", "driver", "device") if key in run}
            print(f"   warm-up {run['seconds']:.1f} s ({run['cache']}), {run['compiles']} compiles, process "
                  f"{run['process_seconds']:.1f} s, load {run['load_before']:.1f}", flush=True)
        else:
            print(f"   {run}", flush=True)
        result["ratios"] = summarise(args, result["runs"])
        (out / f"cold_start_{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"cold_start_{args.tag}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
