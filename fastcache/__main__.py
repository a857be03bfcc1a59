"""The main job: one generation with the plain pipeline and with ``compile_pipeline``, timed side by side.

    python -m fastcache                       # embedded tiny SD-architecture model, random weights, CPU ok
    python -m fastcache --model PATH_OR_ID    # a real diffusers pipeline via from_pretrained
    python -m fastcache --variant fastcache-tuned   # a named configuration of fastcache.variants
    python -m fastcache --preset tiny-animatediff --output out.mp4   # video: AnimateDiff or SVD, MP4 or WebP
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cli_options import (
    Parser,
    add_cache_options,
    add_model_options,
    check_finite,
    check_model_options,
    check_steps,
    model_errors,
    parse_size,
    quiet_imports,
)
from .extras import missing
from .presets import VIDEO_PRESETS, default_dtype
from .variants import VARIANTS
from .video_output import check_video_path, write_video

logger = logging.getLogger("fastcache")


@dataclass
class Timing:
    seconds: float  # median over the timed runs
    warmup: float  # first call: compilation and capture included
    image: np.ndarray  # images, or a video's frames


def parse_args(argv=None) -> argparse.Namespace:
    """The options, every one checked before a model is built: a bad one gets one line and exit code 2."""
    p = Parser(prog="python -m fastcache", description=__doc__)
    add_model_options(p)
    preset = next(action for action in p._actions if action.dest == "preset")
    preset.choices = sorted([*preset.choices, *VIDEO_PRESETS])  # the main job runs video presets too
    add_cache_options(p, compile_flag=False)
    run = p.add_argument_group("run")
    run.add_argument("--prompt", default="a photograph of an astronaut riding a horse",
                     help="the prompt (presets and folders without a text encoder derive embeddings from it)")
    run.add_argument("--steps", type=int, default=25, help="denoising steps")
    run.add_argument("--size", help="N or WIDTHxHEIGHT in pixels (default: the model's native size)")
    run.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    run.add_argument("--seed", type=int, default=0, help="seed of the latents (and of a preset's random weights)")
    run.add_argument("--repeat", type=int, default=3, help="timed runs after the warm-up run, for each side")
    run.add_argument("--variant", default="fastcache", choices=sorted(VARIANTS),
                     help="fastcache-eager: no compilation; see fastcache/variants.py for the others")
    run.add_argument("--output", help="where to write the accelerated image (default fastcache.png) or video "
                                      "(.mp4 or .webp; default fastcache.mp4)")
    video = p.add_argument_group("video (AnimateDiff, Stable Video Diffusion)")
    video.add_argument("--frames", type=int, help="frames per video (default: the preset's, else 16)")
    video.add_argument("--fps", type=int, default=8, help="frames per second of the written video")
    args = p.parse_args(argv)
    geometry = check_model_options(p, args)
    check_steps(p, args, args.steps)
    args.size = parse_size(p, args.size, geometry) if args.size is not None else None
    check_finite(p, args.guidance, "--guidance")
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1; got {args.repeat}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0; got {args.seed}")
    if args.frames is not None and args.frames < 1:
        p.error(f"--frames must be >= 1; got {args.frames}")
    if args.fps < 1:
        p.error(f"--fps must be >= 1; got {args.fps}")
    video_preset = args.model is None and args.preset in VIDEO_PRESETS
    args.output = args.output or ("fastcache.mp4" if video_preset else "fastcache.png")
    if video_preset:
        check_output(p, args.output)
    if not Path(args.output).parent.is_dir():
        p.error(f"--output {args.output}: its folder does not exist")
    args.parser = p
    return args


def time_pipeline(pipe, call_kwargs: dict, repeat: int, seed: int) -> Timing:
    """Warm up once, then time ``repeat`` calls (synchronised), all with the same seed."""

    def call():
        generator = torch.Generator("cpu").manual_seed(seed)
        start = time.perf_counter()
        out = pipe(generator=generator, output_type="np", **call_kwargs)
        image = out.frames if hasattr(out, "frames") else out.images
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, image

    warmup, image = call()
    times = []
    for _ in range(repeat):
        seconds, image = call()
        times.append(seconds)
    return Timing(statistics.median(times), warmup, image)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with quiet_imports():
        from .handle import compile_pipeline
        from .models import open_pipeline, prompt_inputs
        from .video_models import is_video
    dtype = default_dtype(args.device)
    with model_errors(args.parser, args):
        pipe, label = open_pipeline(args.model, args.preset, device=args.device, dtype=dtype, seed=args.seed)
        # a hub model's branch range is known only now: checked before the plain pipeline runs
        compile_pipeline(pipe, args.interval, args.branch, compile=False).disable()
    pipe.set_progress_bar_config(disable=True)
    width, height = args.size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    video = is_video(pipe)
    if video:
        check_output(args.parser, args.output)
        call_kwargs = video_inputs(pipe, args, width, height)
    else:
        call_kwargs = dict(num_inference_steps=args.steps, height=height, width=width, guidance_scale=args.guidance,
                           **prompt_inputs(pipe, [args.prompt]))

    logger.info("model: %s | %s, %s, %dx%d, %d steps", label, args.device, dtype, width, height, args.steps)
    logger.info("running the plain pipeline ...")
    base = time_pipeline(pipe, call_kwargs, args.repeat, args.seed)
    logger.info("running %s (interval=%d, branch=%d) ...", args.variant, args.interval, args.branch)
    with VARIANTS[args.variant].applied(pipe, args.interval, args.branch, args.schedule):
        fast = time_pipeline(pipe, call_kwargs, args.repeat, args.seed)

    rel = float(np.linalg.norm(fast.image - base.image) / np.linalg.norm(base.image))
    if video:
        write_video(fast.image[0], args.output, args.fps)
    else:
        pipe.numpy_to_pil(fast.image)[0].save(args.output)
    result = dict(baseline_s=base.seconds, fastcache_s=fast.seconds, speedup=base.seconds / fast.seconds,
                  warmup_s=fast.warmup, rel_l2_image=rel, output=args.output)
    print(f"\n{'':12}{'time/call':>12}{'first call':>12}\n"
          f"{'plain':12}{base.seconds:>11.3f}s{base.warmup:>11.2f}s\n"
          f"{'fastcache':12}{fast.seconds:>11.3f}s{fast.warmup:>11.2f}s\n"
          f"speed-up {result['speedup']:.2f}x | image rel. L2 vs plain {rel:.4f} | "
          f"torch {torch.__version__} | {'video' if video else 'image'} written to {args.output}")
    return result


def check_output(parser: Parser, output: str) -> None:
    """A video's --output must name a format ``write_video`` writes, and an MP4 needs the video extra (PyAV)."""
    try:
        check_video_path(output)
    except ValueError as error:
        parser.error(f"--output: {error}")
    problem = Path(output).suffix.lower() == ".mp4" and missing("video")
    if problem:
        parser.error(f"--output {output}: {problem} (or write .webp)")


def video_inputs(pipe, args, width: int, height: int) -> dict:
    """The call of a video pipeline: AnimateDiff's prompt (embeddings without a text encoder), SVD's image (a fixed
    stand-in) and guidance range; the frame count the preset's unless ``--frames``."""
    from .models import prompt_inputs
    from .video_models import conditioning_image

    frames = args.frames or (VIDEO_PRESETS[args.preset]["frames"] if args.model is None else 16)
    kwargs = dict(num_inference_steps=args.steps, height=height, width=width, num_frames=frames)
    if hasattr(pipe, "motion_adapter"):  # AnimateDiff
        return dict(kwargs, guidance_scale=args.guidance, **prompt_inputs(pipe, [args.prompt]))
    guidance = max(args.guidance, 1.0)  # SVD's guidance rises per frame from 1 to max_guidance_scale
    return dict(kwargs, image=conditioning_image((width, height), args.seed), max_guidance_scale=guidance,
                decode_chunk_size=frames)


if __name__ == "__main__":
    main()
