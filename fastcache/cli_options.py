"""The command line's shared options and checks: ``fastcache``'s commands (``cli``, ``tuning.command``) and the main
job (``python -m fastcache``) build their parsers from these, so no command imports another.

Everything here is light: it reads the presets and the cache options' own checks, and imports neither diffusers'
pipelines nor transformers, so a bad argument is refused at once, in one line (exit code 2), before anything that
prints notices is imported. A command imports what it runs after its arguments are checked, under ``quiet_imports``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import FastCacheConfig
from .errors_text import one_line
from .extras import MissingExtra, missing
from .graphs import COMPILE_MODES
from .presets import PRESETS, Geometry, check_device, model_geometry, size_problem
from .schedule import SCHEDULE_KINDS, make_schedule


class Parser(argparse.ArgumentParser):
    """argparse with defaults in ``--help`` and one-line errors (exit code 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless its help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not any(action.default is nothing for nothing in (None, argparse.SUPPRESS, False)) and (
                "default" not in text):
            text += " (default: %(default)s)"
        return text


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="a local diffusers pipeline folder or a hub id (loaded with from_pretrained); "
                                       "default: --preset")
    group.add_argument("--preset", default="tiny-sd", choices=sorted(PRESETS),
                       help="an architecture built from its config with RANDOM weights (images are noise; sd15, sd21 "
                            "and sdxl run at the real models' speed, tiny-* are small stand-ins); prompt embeddings "
                            "are derived from the prompt text")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu, cuda or cuda:N (float16 on CUDA, float32 on CPU)")


# the cache options' defaults; warmup and serve leave them unset on the command line so that --tuned can fill them
CACHE_DEFAULTS = {name: getattr(FastCacheConfig, name) for name in ("interval", "branch", "schedule")}


def add_cache_options(parser: argparse.ArgumentParser, compile_flag: bool = True, tuned: bool = False) -> None:
    group = parser.add_argument_group("cache")
    default = ("default: %s, or the --tuned file's pick" if tuned else "default: %s")
    group.add_argument("--interval", type=int, default=None if tuned else CACHE_DEFAULTS["interval"],
                       help=f"a full UNet step every INTERVAL steps (1: no caching) "
                            f"({default % CACHE_DEFAULTS['interval']})")
    group.add_argument("--branch", type=int, default=None if tuned else CACHE_DEFAULTS["branch"],
                       help=f"DeepCache branch: how deep the shallow path goes (0: shallowest, fastest) "
                            f"({default % CACHE_DEFAULTS['branch']})")
    group.add_argument("--schedule", default=None if tuned else CACHE_DEFAULTS["schedule"], choices=SCHEDULE_KINDS,
                       help=f"which steps are full: every INTERVAL-th, or DeepCache's quad-center schedule "
                            f"({default % CACHE_DEFAULTS['schedule']})")
    if tuned:
        group.add_argument("--tuned", metavar="FILE",
                           help="use the pick of a `fastcache tune` run (its tune.json) for --interval, --branch and "
                                "--schedule; refused if it was made for another model, size or steps")
    if compile_flag:
        add_compile_options(group)


def add_compile_options(group) -> None:
    group.add_argument("--compile", default=True, action=argparse.BooleanOptionalAction,
                       help="compile the two UNet paths (CUDA graphs on CUDA); --no-compile runs them eagerly")
    group.add_argument("--mode", choices=COMPILE_MODES,
                       help="torch.compile mode (default: reduce-overhead); static-cudagraphs: CUDA graphs "
                            "captured by hand (see README)")


def check_compile_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.mode is not None and not args.compile:
        parser.error("--mode needs --compile (--no-compile runs the paths eagerly)")
    if getattr(args, "static_shapes", False) and not args.compile:
        parser.error("--static-shapes needs --compile (--no-compile runs the paths eagerly)")
    args.mode = args.mode or FastCacheConfig.mode


def check_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Geometry | None:
    """Validate --device and --model; the model's geometry where its configs are readable."""
    device = args.device
    with field_errors(parser):
        check_device(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if args.model:
        check_model_path(parser, args.model, "--model")
    return model_geometry(str(Path(args.model).expanduser()) if args.model else None, args.preset)


def check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Geometry | None:
    """Validate the model and cache options; the model's geometry where its configs are readable."""
    geometry = check_model(parser, args)
    if args.interval < 1:
        parser.error(f"--interval must be >= 1 (1 means no caching); got {args.interval}")
    if geometry is not None and not 0 <= args.branch < geometry.branches:
        parser.error(f"--branch must be between 0 and {geometry.branches - 1} for this model; got {args.branch}")
    if args.branch < 0:
        parser.error(f"--branch must be >= 0; got {args.branch}")
    if hasattr(args, "compile"):
        check_compile_options(parser, args)
    return geometry


def check_model_path(parser: argparse.ArgumentParser, model: str, flag: str) -> None:
    """``model`` is a diffusers pipeline folder, or may be a hub id (one line, exit code 2 otherwise)."""
    path = Path(model).expanduser()
    if path.exists() and not (path / "model_index.json").is_file():
        parser.error(f"{flag} {model}: not a diffusers pipeline folder (no model_index.json)")
    hub_id = not model.startswith((".", "/", "~")) and model.count("/") <= 1
    if not path.exists() and (not hub_id or os.environ.get("HF_HUB_OFFLINE")):
        parser.error(f"{flag} {model}: no such folder")


def cache_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> FastCacheConfig:
    """The cache options as a ``FastCacheConfig`` (which checks them); a bad one: one line, exit code 2."""
    options = dict(interval=args.interval, branch=args.branch, schedule=args.schedule)
    if hasattr(args, "compile"):
        options.update(compile=args.compile, mode=args.mode, dynamic_batch=not getattr(args, "static_shapes", False))
    with field_errors(parser):
        return FastCacheConfig(**options)


# flags whose name is not the field's (the fields of FastCacheConfig, EngineConfig, EdgeConfig and image requests)
FLAGS = {"guidance": "--guidance-modes", "guidance_scale": "--guidance", "n": "--batch",
         "num_inference_steps": "--steps", "prompt": "PROMPT", "api_keys": "--api-key (or FASTCACHE_API_KEY)"}


@contextmanager
def field_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A dataclass's own check, said with the command line's flag: 'max_queue must ...' becomes '--max-queue must
    ...'. The dataclasses name the field first in every message."""
    try:
        yield
    except (TypeError, ValueError) as error:
        message = str(error)
        field = getattr(error, "param", None) or message.split(" ", 1)[0]
        flag = FLAGS.get(field, "--" + field.replace("_", "-"))
        parser.error(flag + message[len(field):] if message.startswith(field) else message)


def check_finite(parser: argparse.ArgumentParser, value: float, flag: str, low: float = float("-inf"),
                 high: float = float("inf")) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        parser.error(f"{flag} must be a finite number" + (f" from {low:g} to {high:g}" if math.isfinite(low) and
                                                          math.isfinite(high) else "") + f"; got {value}")


def check_writable(parser: argparse.ArgumentParser, path: str, flag: str, folder: bool = False) -> None:
    """``path`` (a folder, or a file whose folder exists) can be created or written."""
    target = Path(path).expanduser().resolve()
    if folder and target.exists() and not target.is_dir():
        parser.error(f"{flag} {path}: not a folder")
    existing = target if folder else target.parent
    while not existing.exists():
        if not folder:
            parser.error(f"{flag} {path}: the folder {existing} does not exist")
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        parser.error(f"{flag} {path}: {existing} is not a writable folder")


@contextmanager
def model_errors(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[None]:
    """A model that cannot be loaded, or that fastcache refuses (known only once loaded, for hub ids): one line."""
    try:
        yield
    except (OSError, ValueError, ImportError) as error:  # ImportError: an extra the model needs (video: PyAV)
        fail(parser, f"{args.model or args.preset}: {one_line(error)}")


def check_steps(parser: argparse.ArgumentParser, args: argparse.Namespace, steps: int, flag: str = "--steps",
                interval: int | None = None) -> None:
    """``steps`` has a schedule at ``interval`` (default ``--interval``): quad-center has none for some pairs."""
    if steps < 1:
        parser.error(f"{flag} must be >= 1; got {steps}")
    try:
        make_schedule(args.schedule, args.interval if interval is None else interval).full_steps(steps)
    except ValueError as error:
        parser.error(f"{flag} {steps}: {error}")


def parse_size(parser: argparse.ArgumentParser, text: str, geometry: Geometry | None) -> tuple[int, int]:
    """``N`` or ``WxH`` pixels, each a positive multiple of the model's pixel multiple."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(part.isdigit() for part in parts):
        parser.error(f"a size is N or WIDTHxHEIGHT in pixels; got {text!r}")
    width, height = int(parts[0]), int(parts[-1])
    multiple = geometry.pixel_multiple if geometry else 8
    if size_problem(width, height, multiple):
        parser.error(f"sizes must be positive multiples of {multiple} pixels for this model; got {text!r}")
    return width, height


def parse_int_list(parser: argparse.ArgumentParser, text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        parser.error(f"{flag} takes comma-separated integers, e.g. 1,2,4; got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{flag} values must be >= 1; got {text!r}")
    return tuple(sorted(set(values)))


def fail(parser: argparse.ArgumentParser, message: str) -> None:
    """One line and exit code 2, without the usage hint: for what no option changes (a missing extra)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def require_extra(parser: argparse.ArgumentParser, extra: str, *modules: str) -> None:
    """The command's extra (or those ``modules`` of it) is installed, else one line naming the ``pip install`` that
    adds it, exit code 2. Checked before any work, without importing anything."""
    problem = missing(extra, modules)
    if problem:
        fail(parser, problem)


@contextmanager
def extra_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A ``MissingExtra`` raised inside (a feature found its extra missing): one line, exit code 2, no traceback."""
    try:
        yield
    except MissingExtra as error:
        fail(parser, str(error))


@contextmanager
def quiet_imports() -> Iterator[None]:
    """transformers' notices silenced while what a command runs is imported. diffusers' pipelines import
    transformers' processors, which log notices such as "requires torchvision ... falling back": noise before the
    command's own output, and before the one-line error of an argument checked after the import."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # no transformers: no notices
        yield
        return
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
