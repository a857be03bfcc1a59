"""``fastcache tune``: its options, checked before any model is built (one line, exit code 2), and the run.

The parser of ``fastcache`` imports this module to add the command, so what it imports at its top is light (no
diffusers pipelines); the model and the runtime are imported once the arguments are checked.

Exit codes: 0 with a pick (or, without a budget, the Pareto front), 1 when no candidate meets the budget (the
closest is named), 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli_options import (
    add_compile_options,
    add_model_options,
    check_compile_options,
    check_finite,
    check_model,
    check_writable,
    model_errors,
    parse_size,
    quiet_imports,
    require_extra,
)
from ..errors_text import one_line
from ..presets import default_dtype
from ..schedule import SCHEDULE_KINDS, make_schedule
from .fidelity import clip_model_problem
from .report import Budget, Candidate
from .sweep import BUILTIN_PROMPTS, SCHEDULERS, SweepSpec, logged_grid, resume_problem, run

logger = logging.getLogger("fastcache")

GRID_DEFAULTS = dict(intervals="2,3,4,5", branches="0,1,2", schedules="uniform")


def add_tune_command(commands) -> None:
    tune = commands.add_parser(
        "tune", help="measure interval/branch candidates on your model and pick one for a quality budget",
        description="Run every prompt x seed uncached, then with each candidate (interval x branch x schedule) "
                    "through compile_pipeline, in one process on one device; report latency, UNet FLOPs, fidelity "
                    "to the uncached images and the drift of the cached feature; pick the fastest candidate "
                    "meeting the budget. Writes tune.jsonl, tune.json (for serve --tuned), tune.md and tune.png.")
    add_model_options(tune)
    serving = tune.add_argument_group("what you serve")
    serving.add_argument("--size", help="N or WIDTHxHEIGHT in pixels (default: the model's native size)")
    serving.add_argument("--steps", type=int, default=25, help="denoising steps")
    serving.add_argument("--scheduler", default="default", choices=sorted(SCHEDULERS),
                         help="default: the model's own scheduler; the others are made from its config")
    serving.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    prompts = tune.add_argument_group("prompts")
    prompts.add_argument("--prompts", metavar="FILE",
                         help=f"one prompt per line (default: a built-in list of {len(BUILTIN_PROMPTS)})")
    prompts.add_argument("--num-prompts", type=int, help="use the first N prompts (default: all)")
    prompts.add_argument("--seeds", default="0", help="comma-separated seeds; one image per prompt and seed")
    grid = tune.add_argument_group("candidates")
    grid.add_argument("--intervals", help=f"comma-separated intervals; 1 is compiled without caching (default: "
                                          f"{GRID_DEFAULTS['intervals']}, or the resumed run's)")
    grid.add_argument("--branches", help=f"comma-separated DeepCache branches (default: {GRID_DEFAULTS['branches']}, "
                                         f"or the resumed run's)")
    grid.add_argument("--schedules", help=f"comma-separated, of {', '.join(SCHEDULE_KINDS)} (default: "
                                          f"{GRID_DEFAULTS['schedules']}, or the resumed run's)")
    measure = tune.add_argument_group("measurements")
    measure.add_argument("--repeat", type=int, default=1, help="timed passes over every prompt and seed")
    add_compile_options(measure)
    measure.add_argument("--lpips", action="store_true",
                         help="also LPIPS (AlexNet), if torchvision and its weights are on this machine; skipped "
                              "with a note otherwise")
    measure.add_argument("--clip-model", metavar="PATH",
                         help="also the CLIP score, with the CLIP model in this local folder (nothing is downloaded)")
    budget = tune.add_argument_group("budget (the pick: the fastest candidate meeting all that are given)")
    budget.add_argument("--min-psnr", type=float, help="mean PSNR against the uncached images, dB")
    budget.add_argument("--min-ssim", type=float, help="mean SSIM against the uncached images")
    budget.add_argument("--min-clip", type=float, help="mean CLIP score against the prompts (needs --clip-model)")
    output = tune.add_argument_group("output")
    output.add_argument("--out", default="out/tune", help="folder for tune.jsonl, tune.json, tune.md, tune.png")
    output.add_argument("--resume", action="store_true",
                        help="keep what the --out folder's tune.jsonl measured and measure only the rest (the same "
                             "options are needed); with everything measured, it re-picks for a new budget")


def _int_list(parser, text: str, flag: str, low: int) -> tuple[int, ...]:
    try:
        values = tuple(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        parser.error(f"{flag} takes comma-separated integers, e.g. 2,3,5; got {text!r}")
    if min(values) < low:
        parser.error(f"{flag} values must be >= {low}; got {text!r}")
    return values


def _read_prompts(parser, path: str) -> tuple[str, ...]:
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as error:
        parser.error(f"--prompts {path}: cannot read it ({getattr(error, 'strerror', None) or error})")
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        parser.error(f"--prompts {path}: no prompts in it (one per line)")
    return prompts


def check_tune_args(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """``(spec, candidates, grid, budget, folder)``, every argument checked; a bad one exits 2 with one line."""
    geometry = check_model(parser, args)
    check_compile_options(parser, args)
    if args.size is not None:
        size = parse_size(parser, args.size, geometry)
    elif geometry is not None:
        size = (geometry.native_size,) * 2
    else:
        parser.error("--size is needed for a hub model (its native size is not known before loading)")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1; got {args.steps}")
    check_finite(parser, args.guidance, "--guidance", 0, 50)
    prompts = _read_prompts(parser, args.prompts) if args.prompts else BUILTIN_PROMPTS
    if args.num_prompts is not None:
        if not 1 <= args.num_prompts <= len(prompts):
            parser.error(f"--num-prompts must be between 1 and {len(prompts)} (the prompts there are); "
                         f"got {args.num_prompts}")
        prompts = prompts[:args.num_prompts]
    seeds = _int_list(parser, args.seeds, "--seeds", 0)
    if max(seeds) >= 2**63:
        parser.error(f"--seeds must be below 2**63; got {args.seeds!r}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1; got {args.repeat}")
    if args.clip_model:
        if problem := clip_model_problem(args.clip_model):
            parser.error(f"--clip-model {problem}")
    if args.min_clip is not None and not args.clip_model:
        parser.error("--min-clip needs --clip-model (a local CLIP folder)")
    try:
        budget = Budget(args.min_psnr, args.min_ssim, args.min_clip)
    except ValueError as error:
        parser.error(str(error))
    check_writable(parser, args.out, "--out", folder=True)
    folder = Path(args.out).expanduser()
    spec = SweepSpec(model=args.model, preset=args.preset, device=args.device, size=size, steps=args.steps,
                     scheduler=args.scheduler, guidance=args.guidance, prompts=prompts, seeds=seeds,
                     compile=args.compile, mode=args.mode, repeat=args.repeat, lpips=args.lpips,
                     clip_model=args.clip_model)
    if args.resume and (problem := resume_problem(spec, folder)):
        parser.error(f"--resume: {problem}")
    logged = (logged_grid(folder) if args.resume else None) or GRID_DEFAULTS
    grid = {name: getattr(args, name) or logged[name] for name in GRID_DEFAULTS}
    intervals = _int_list(parser, grid["intervals"], "--intervals", 1)
    branches = _int_list(parser, grid["branches"], "--branches", 0)
    schedules = tuple(dict.fromkeys(grid["schedules"].split(",")))
    if unknown := [kind for kind in schedules if kind not in SCHEDULE_KINDS]:
        parser.error(f"--schedules must be of {', '.join(SCHEDULE_KINDS)}; got {one_line(', '.join(unknown), 80)}")
    if max(intervals) > args.steps:
        parser.error(f"--intervals must be between 1 and --steps ({args.steps}); got {max(intervals)}")
    if geometry is not None and max(branches) >= geometry.branches:
        parser.error(f"--branches must be between 0 and {geometry.branches - 1} for this model; got {max(branches)}")
    for kind in schedules:
        for interval in intervals:
            try:
                make_schedule(kind, interval).full_steps(args.steps)
            except ValueError as error:
                parser.error(f"--schedules {kind} --intervals {interval}: {error}")
    return spec, Candidate.grid(intervals, branches, schedules), grid, budget, folder


def tune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    spec, candidates, grid, budget, folder = check_tune_args(parser, args)
    require_extra(parser, "tune")

    def open_model():
        with quiet_imports():
            from ..handle import compile_pipeline
            from ..models import open_pipeline

        with model_errors(parser, args):
            pipe, label = open_pipeline(spec.model, spec.preset, device=spec.device, dtype=default_dtype(spec.device))
            # a hub model's branch range is known only now: checked before anything is measured
            compile_pipeline(pipe, 1, max(c.branch for c in candidates), compile=False).disable()
        if spec.scheduler != "default":
            import diffusers

            pipe.scheduler = getattr(diffusers, SCHEDULERS[spec.scheduler]).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        logger.info("model: %s | %s, %dx%d, %d steps, %s scheduler, %d candidates", label, spec.device, *spec.size,
                    spec.steps, type(pipe.scheduler).__name__, len(candidates))
        return pipe, label

    def write(report) -> str:
        """tune.png, tune.json and tune.md: after every candidate, so that a run cut short keeps a current report."""
        if why := report.chart(folder / "tune.png"):
            report.notes.append(why)
        report.write(folder)
        table = report.markdown()
        (folder / "tune.md").write_text(table + "\n")
        return table

    report = run(spec, candidates, folder, grid=grid, resume=args.resume, budget=budget, open_model=open_model,
                 on_report=write)
    print(write(report))
    if budget and report.pick is None:
        logger.error("%s", report.verdict())
        return 1
    logger.info("%s (written to %s)", report.verdict(), folder / "tune.json")
    return 0
