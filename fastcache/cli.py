"""The ``fastcache`` command: ``generate``, ``warmup``, ``serve``, ``tune`` and ``bench``.

Every argument is checked before a model is built, against the model's own configs where they can be read without
weights (presets, local folders); a bad one gets one line and exit code 2. The checks (``cli_options``) import
neither diffusers' pipelines nor the wings; a command imports what it runs once its arguments are checked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .cli_options import (
    CACHE_DEFAULTS,
    Parser,
    add_cache_options,
    add_model_options,
    cache_config,
    check_model_options,
    check_model_path,
    check_steps,
    check_writable,
    extra_errors,
    fail,
    field_errors,
    model_errors,
    parse_int_list,
    parse_size,
    quiet_imports,
    require_extra,
)
from .extras import missing_module
from .presets import INPAINT_PRESETS, VIDEO_PRESETS, default_dtype

logger = logging.getLogger("fastcache")

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {"compare": "bench/compare.py", "serve-load": "bench/serve_load.py",
              "serve-faults": "bench/serve_faults.py", "cold-start": "bench/cold_start.py"}


# -- commands ------------------------------------------------------------------------------------------------------

def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The ``fastcache`` parser, and its commands' parsers by name."""
    parser = Parser(prog="fastcache", description="DeepCache and torch.compile with CUDA graphs for diffusers UNet "
                                                  "pipelines: generate images, warm up, serve, tune, benchmark.")
    from .serving.video_options import add_video_arguments  # the standard library only: a parser may import it

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="prompts to PNG files", description="Generate images with "
                                   "fastcache on, one pipeline call per prompt, and write them as PNG files.")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    add_model_options(generate)
    add_cache_options(generate)
    generate.add_argument("--negative-prompt", default="", help="what the images should not show")
    generate.add_argument("--steps", type=int, default=25, help="denoising steps")
    generate.add_argument("--size", help="N or WIDTHxHEIGHT in pixels (default: the model's native size)")
    generate.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    generate.add_argument("--seed", type=int, default=0, help="image i of each prompt uses SEED + i")
    generate.add_argument("--batch", type=int, default=1, help="images per prompt, in one pipeline call")
    generate.add_argument("--output-dir", default=".", help="where the PNG files go")

    for name, text in (("warmup", "compile and capture every bucket, storing the compile cache"),
                       ("serve", "the OpenAI-style HTTP images API (videos: /v1/videos)")):
        sub = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        add_model_options(sub)
        preset = next(action for action in sub._actions if action.dest == "preset")
        preset.choices = sorted([*preset.choices, *VIDEO_PRESETS])  # served at /v1/videos
        add_cache_options(sub, tuned=True)
        sub.add_argument("--sizes", default=None, help="comma-separated sizes to serve, N or WIDTHxHEIGHT "
                                                       "(default: the model's native size)")
        sub.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (images per pipeline call) "
                                                            "to warm up; requests are batched up to the largest")
        sub.add_argument("--guidance-modes", default="on",
                         help="warm up buckets with classifier-free guidance on (guidance_scale > 1), off, or both: "
                              "on, off or on,off")
        sub.add_argument("--steps", type=int, default=25, help="steps of the warm-up and of requests that give none")
        sub.add_argument("--max-steps", type=int, default=100, help="the most steps a request may ask for")
        sub.add_argument("--static-shapes", action="store_true",
                         help="compile each path once per batch size (fully static graphs) instead of once for all "
                              "batch sizes (a dynamic batch dimension); CUDA graphs are per bucket either way")
        sub.add_argument("--cache-dir", help="persistent compile cache: a restart with the same model, options, "
                                             "buckets and versions warms up from it")
        sub.add_argument("--edits", default="img2img,inpaint",
                         help="edits served by POST /v1/images/edits and warmed up: img2img (no mask), inpaint (a "
                              "mask), both, or none")
        sub.add_argument("--inpaint-model", help="an inpainting model (9-channel UNet; folder or hub id) for masked "
                                                 "edits, with a fastcache handle of its own; default: the base model "
                                                 "inpaints")
        sub.add_argument("--inpaint-preset", choices=sorted(INPAINT_PRESETS),
                         help="an inpainting architecture with RANDOM weights, instead of --inpaint-model")
        sub.add_argument("--intervals", help="comma-separated cache levels a request may ask for with "
                                             "\"cache\": {\"interval\": K}; must include --interval (default: "
                                             "--interval alone)")
        lora = sub.add_argument_group("LoRA adapters a request may ask for (see README, Serving)")
        lora.add_argument("--lora", action="append", metavar="NAME=PATH",
                          help="load a LoRA (a .safetensors file, or a folder holding one) as adapter NAME; repeat for "
                               "several. Requests pick theirs with \"lora\": switching compiles nothing (hot-swaps "
                               "into prepared slots)")
        # NOTE: "at most 4" is serving.loras.DEFAULT_MAX_SLOTS, which a parser must not import (a test pins it)
        lora.add_argument("--lora-slots", type=int,
                          help="adapters one request may combine; each slot costs a LoRA of --lora-rank on every "
                               "layer the adapters target, used or not (default: the adapters loaded, at most 4)")
        lora.add_argument("--lora-rank", type=int,
                          help="the slots' rank: an adapter of a wider rank is refused (default: the widest "
                               "adapter's)")
        add_video_arguments(sub, serving=name == "serve")
        if name == "warmup":
            sub.add_argument("--report", help="append the warm-up's report (seconds per bucket, cold or warm, cache "
                                              "hits, card, versions) to this JSON-lines file")
        if name == "serve":
            sub.add_argument("--host", default="127.0.0.1", help="address to bind")
            sub.add_argument("--port", type=int, default=8000, help="port to bind")
            sub.add_argument("--max-queue", type=int, default=64, help="images that may wait; more get HTTP 429")
            sub.add_argument("--max-delay-ms", type=float, default=50.0,
                             help="how long a request waits for others to batch with")
            sub.add_argument("--on-demand", action="store_true",
                             help="serve sizes that were not warmed up (compiled on their first request) instead "
                                  "of answering 400")
            sub.add_argument("--max-size", type=int, default=2048,
                             help="the largest width or height of an uploaded image and, with --on-demand, of a "
                                  "generated one, in pixels")
            sub.add_argument("--drain-seconds", type=float, default=300.0,
                             help="on SIGTERM, how long in-flight requests may take to finish (a connection whose "
                                  "request has not arrived whole is closed at once)")
            edge = sub.add_argument_group("security and limits (see README, Security)")
            edge.add_argument("--api-key", action="append", metavar="KEY",
                              help="require 'Authorization: Bearer KEY' on every endpoint but /health and /ready; "
                                   "repeat for several keys. FASTCACHE_API_KEY (comma-separated) adds keys without "
                                   "showing them in the process list")
            edge.add_argument("--allow-unauthenticated", action="store_true",
                              help="serve a non-loopback --host without any API key (refused otherwise)")
            edge.add_argument("--metrics-public", action="store_true",
                              help="/metrics without a key, for a scraper on a private network")
            edge.add_argument("--read-timeout", type=float, default=30.0,
                              help="seconds a request's body may take to arrive after its headers; else 408 and "
                                   "the connection closes")
            edge.add_argument("--header-timeout", type=float, default=5.0,
                              help="seconds a connection's request headers may take to arrive; else it is closed "
                                   "(408 if part of them came)")
            edge.add_argument("--keep-alive-timeout", type=float, default=5.0,
                              help="seconds an idle connection stays open between requests")
            edge.add_argument("--max-connections", type=int, default=512,
                              help="open connections; one more is answered 503 and closed")
            edge.add_argument("--max-connections-per-client", type=int, default=64,
                              help="open connections from one client address; one more is answered 429 and closed "
                                   "(behind a proxy every client has its address: set --max-connections)")
            edge.add_argument("--max-body-mb", type=float, default=16.0,
                              help="the largest request body, MiB; a larger one gets 413 (at once when its "
                                   "Content-Length says so)")
            sub.add_argument("--replicas", type=int, default=0,
                             help="run N replicas with Ray Serve (one per GPU on CUDA) behind Ray's HTTP proxy; "
                                  "0: one process, uvicorn")
            sub.add_argument("--ray-address", default=None,
                             help="with --replicas: an existing Ray cluster ('auto' or ray://HOST:PORT); default: "
                                  "a local Ray on 127.0.0.1")

    from .tuning.command import add_tune_command  # the tuning wing's options (its module imports only light ones)

    add_tune_command(commands)

    bench = commands.add_parser("bench", help=f"run a benchmark of bench/ ({', '.join(BENCHMARKS)})",
                                description="Run a benchmark script of the source tree's bench/ folder; arguments "
                                            "after the name go to the script (try: fastcache bench compare --help).")
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS),
                       help="compare: the peers side by side on one model; serve-load: load on a running server; "
                            "serve-faults: soak, burst, fuzz and Ray fault figures; cold-start: cold and warm "
                            "warm-ups, dynamic batch vs static shapes")
    bench.add_argument("arguments", nargs=argparse.REMAINDER, help="passed to the script")
    return parser, commands.choices


def service_options(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Validated ``ServiceOptions`` for ``warmup`` and ``serve``: the command line's own checks (parsing, files,
    ports), then, once the serving wing is imported, the dataclasses' (``EngineConfig``, ``LoraOptions``,
    ``ServiceOptions``), said with the flags' names."""
    pick = apply_tuned(parser, args)
    tuned_size = pick.size if pick and pick.frames is None else None  # a video pick's size is a video bucket's
    geometry = check_model_options(parser, args)
    cache = cache_config(parser, args)
    check_steps(parser, args, args.steps)
    sizes = tuple(parse_size(parser, text, geometry) for text in args.sizes.split(",")) if (
        args.sizes) else ((geometry.native_size,) * 2,) if geometry else None
    if sizes is None:
        parser.error("--sizes is needed for a hub model (its native size is not known before loading)")
    if tuned_size and tuned_size not in sizes:
        parser.error(f"--tuned {args.tuned} was tuned at {tuned_size[0]}x{tuned_size[1]}, which --sizes leaves out")
    serving = args.command == "serve"
    if serving and not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535; got {args.port}")
    batch_sizes = parse_int_list(parser, args.batch_sizes, "--batch-sizes")
    modes = args.guidance_modes.split(",")
    if not modes or not set(modes) <= {"on", "off"} or len(set(modes)) != len(modes):
        parser.error(f"--guidance-modes must be on, off or on,off; got {args.guidance_modes!r}")
    if args.cache_dir:
        check_writable(parser, args.cache_dir, "--cache-dir", folder=True)
    if getattr(args, "report", None):
        check_writable(parser, args.report, "--report")
    edits = () if args.edits == "none" else tuple(args.edits.split(","))
    intervals = parse_int_list(parser, args.intervals, "--intervals") if args.intervals else ()
    for interval in intervals:
        check_steps(parser, args, args.steps, interval=interval)
    engine = dict(batch_sizes=batch_sizes, sizes=sizes, guidance=tuple(mode == "on" for mode in modes),
                  steps=args.steps, max_steps=args.max_steps, pixel_multiple=geometry.pixel_multiple if geometry else 8,
                  edits=edits, intervals=intervals)
    if serving:
        if args.replicas < 0:
            parser.error(f"--replicas must be >= 0; got {args.replicas}")
        engine.update(max_queue=args.max_queue, max_delay_ms=args.max_delay_ms, on_demand=args.on_demand,
                      max_size=args.max_size)
    else:  # warm-up only: the largest size warmed bounds nothing else
        engine.update(max_size=max(max(size) for size in sizes))
    if args.inpaint_model:
        check_model_path(parser, args.inpaint_model, "--inpaint-model")
    if args.lora:
        require_extra(parser, "serve", "peft")
    video = dict(sizes=tuple(parse_size(parser, text, geometry) for text in args.video_sizes.split(",")) if (
        args.video_sizes) else (), frames=parse_int_list(parser, args.video_frames, "--video-frames") if (
        args.video_frames) else ())
    if pick and pick.frames is not None:
        if pick.size not in video["sizes"]:
            parser.error(f"--tuned {args.tuned} was tuned at {pick.size[0]}x{pick.size[1]}, which --video-sizes "
                         f"leaves out")
        if pick.frames not in video["frames"]:
            parser.error(f"--tuned {args.tuned} was tuned at {pick.frames} frames, which --video-frames leaves out")
    if serving:
        video.update(fps=args.video_fps, data_dir=args.data_dir, ttl=args.video_ttl, max_jobs=args.max_video_jobs,
                     crf=args.video_crf)
    with quiet_imports():
        from .serving.engine import EngineConfig
        from .serving.loras import LoraOptions, parse_adapter
        from .serving.service import ServiceOptions
        from .serving.video_options import VideoOptions
    with field_errors(parser):
        lora = LoraOptions(adapters=tuple(parse_adapter(text) for text in args.lora or ()), slots=args.lora_slots,
                           rank=args.lora_rank)
        return ServiceOptions(model=args.model, preset=args.preset, device=args.device, cache=cache,
                              cache_dir=args.cache_dir, engine=EngineConfig(**engine),
                              inpaint_model=args.inpaint_model, inpaint_preset=args.inpaint_preset,
                              level_labels=pick.levels if pick else None, lora=lora, video=VideoOptions(**video))


def apply_tuned(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Fill --interval, --branch and --schedule: from the pick of the --tuned file (one made for this model and
    steps; its size becomes --sizes if none is given, and for a video model its size and frames become --video-sizes
    and --video-frames), else their defaults. Returns the ``TunedPick`` (its size, and the labels measured per
    interval, which /v1/models shows beside the cache levels), or ``None``."""
    given = [f"--{name}" for name in CACHE_DEFAULTS if getattr(args, name) is not None]
    if not args.tuned:
        for name, value in CACHE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        return None
    from .tuning.report import tuned_pick

    if given:
        parser.error(f"--tuned sets --interval, --branch and --schedule from its pick; drop {', '.join(given)}")
    try:
        pick = tuned_pick(args.tuned, model=args.model, preset=args.preset, size=None, steps=args.steps)
    except ValueError as error:
        parser.error(f"--tuned {error}")
    args.interval, args.branch, args.schedule = pick.interval, pick.branch, pick.schedule
    if pick.frames is None:
        args.sizes = args.sizes or "{}x{}".format(*pick.size)
    else:  # a video model: the size and frame count tuned are a video bucket
        args.video_sizes = args.video_sizes or "{}x{}".format(*pick.size)
        args.video_frames = args.video_frames or str(pick.frames)
    logger.info("%s", pick.note)
    levels = "; ".join(f"I{level}: {labels['speedup']:.2f}x, PSNR {labels['psnr_db']:.2f} dB" + (
        f", temporal PSNR {labels['temporal_psnr_db']:.2f} dB" if "temporal_psnr_db" in labels else "")
                       for level, labels in pick.levels.items())
    logger.info("--tuned %s: interval %d, branch %d, schedule %s; measured levels: %s", args.tuned, pick.interval,
                pick.branch, pick.schedule, levels)
    return pick


def edge_config(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The validated ``EdgeConfig`` of ``serve`` (keys from --api-key and FASTCACHE_API_KEY); a host that must not be
    served without a key is refused here, before anything is bound or built."""
    with quiet_imports():
        from .serving.auth import keys_from_env
        from .serving.edge import EdgeConfig

    with field_errors(parser):
        edge = EdgeConfig(api_keys=(*(args.api_key or ()), *keys_from_env()), metrics_public=args.metrics_public,
                          allow_unauthenticated=args.allow_unauthenticated, read_timeout=args.read_timeout,
                          keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections,
                          max_body_mb=args.max_body_mb, drain_seconds=args.drain_seconds,
                          header_timeout=args.header_timeout,
                          max_connections_per_client=args.max_connections_per_client)
    problem = edge.bind_problem(args.host)
    if problem:
        parser.error(problem)
    return edge


def generate(parser, args) -> int:
    geometry = check_model_options(parser, args)
    cache = cache_config(parser, args)
    check_steps(parser, args, args.steps)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1; got {args.batch}")
    if args.size is not None:
        width, height = parse_size(parser, args.size, geometry)
    check_writable(parser, args.output_dir, "--output-dir", folder=True)
    with quiet_imports():
        from .handle import compile_pipeline
        from .models import open_pipeline
        from .serving.request import ImageRequest, pipeline_kwargs, request_problem
    for prompt in args.prompts:
        problem = request_problem(prompt, args.negative_prompt, args.batch, args.guidance, args.seed)
        if problem:
            with field_errors(parser):
                raise ValueError(problem[0])
    output = Path(args.output_dir)
    dtype = default_dtype(args.device)
    with model_errors(parser, args):
        pipe, label = open_pipeline(args.model, args.preset, device=args.device, dtype=dtype)
        compile_pipeline(pipe, config=cache)
    if args.size is None:
        width = height = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    logger.info("model: %s | %s, %dx%d, %d steps, interval %d, branch %d", label, args.device, width, height,
                args.steps, args.interval, args.branch)
    output.mkdir(parents=True, exist_ok=True)
    for index, prompt in enumerate(args.prompts):
        request = ImageRequest(prompt, width, height, args.steps, args.guidance, n=args.batch,
                               negative_prompt=args.negative_prompt, seed=args.seed)
        start = time.perf_counter()
        images = pipe(**pipeline_kwargs(pipe, [request])).images
        logger.info("prompt %d: %d image(s) in %.2f s", index, len(images), time.perf_counter() - start)
        for i, image in enumerate(pipe.numpy_to_pil(images)):
            path = output / f"fastcache-{index:03d}-seed{args.seed + i}.png"
            image.save(path)
            logger.info("wrote %s", path)
    return 0


def warmup(parser, args) -> int:
    require_extra(parser, "serve")
    options = service_options(parser, args)
    from .serving.service import Service

    with model_errors(parser, args):
        service = Service(options)
    report = service.warm_up(progress=True)
    if args.report:
        with open(args.report, "a") as f:
            f.write(json.dumps(report) + "\n")
    return 0


def serve(parser, args) -> int:
    require_extra(parser, "serve")
    if args.replicas > 0:
        require_extra(parser, "ray")
    options = service_options(parser, args)
    edge = edge_config(parser, args)
    check_video_serving(parser, args, options)
    if args.replicas:
        with quiet_imports():
            try:
                import ray.serve  # noqa: F401 (its own dependencies, which the ray extra installs)
            except ModuleNotFoundError as error:
                fail(parser, missing_module("ray", error.name))
            from .serving.ray_serve import run_replicas

        return run_replicas(options, args.replicas, host=args.host, port=args.port, address=args.ray_address,
                            edge=edge)
    with quiet_imports():
        import uvicorn

        from .serving.server import make_app
        from .serving.service import Service

    sock = _bind(parser, args.host, args.port)  # a busy port fails now, not after the model is built
    with model_errors(parser, args):
        service = Service(options)
        app = make_app(service, edge)  # a video server opens its --data-dir here (one server per folder)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, runs the app's shutdown (the engine's queue), then raises
    # the signal again with the handler it found: after a drained SIGTERM, that one exits 0
    signal.signal(signal.SIGTERM, _exit_drained)
    uvicorn.Server(edge.uvicorn_config(app, log_level="info")).run(sockets=[sock])
    return 0


def check_video_serving(parser: argparse.ArgumentParser, args: argparse.Namespace, options) -> None:
    """A model known to make video (a preset, a local folder) needs PyAV and one process, before it is built."""
    from .presets import preset_spec
    from .serving.video_options import makes_video

    if not makes_video(args.model, "" if args.model else preset_spec(args.preset)["pipeline"]):
        return
    if args.replicas:
        fail(parser, "--replicas: video jobs live in one process's --data-dir; serve video from one process")
    require_extra(parser, "video")
    check_writable(parser, options.video.data_dir, "--data-dir", folder=True)


def _exit_drained(*_) -> None:
    """Exit 0 once uvicorn has drained. NOTE: the interpreter's teardown of what torch, diffusers and transformers
    import takes ~2.5 s of CPU here (its last garbage collection); a drained server has nothing left to tear down."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _bind(parser: argparse.ArgumentParser, host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        parser.error(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})")
    return sock


def bench(parser, args) -> int:
    import runpy

    script = ROOT / BENCHMARKS[args.benchmark]
    if not script.is_file():
        parser.error(f"{script} not found: the benchmarks live in the source tree (install with pip install -e .)")
    sys.argv = [str(script), *args.arguments]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .tuning.command import tune

    run = {"generate": generate, "warmup": warmup, "serve": serve, "bench": bench, "tune": tune}[args.command]
    with extra_errors(commands[args.command]):
        return run(commands[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
