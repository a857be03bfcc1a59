"""The main job: one generation with the plain pipeline and with ``compile_pipeline``, timed side by side.

    python -m fastcache                       # embedded tiny SD-architecture model, random weights, CPU ok
    python -m fastcache --model PATH_OR_ID    # a real diffusers pipeline via from_pretrained
    python -m fastcache --variant fastcache-tuned   # a named configuration of fastcache.variants
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
from .presets import default_dtype
from .variants import VARIANTS

logger = logging.getLogger("fastcache")


@dataclass
class Timing:
    seconds: float  # median over the timed runs
    warmup: float  # first call: compilation and capture included
    image: np.ndarray


def parse_args(argv=None) -> argparse.Namespace:
    """The options, every one checked before a model is built: a bad one gets one line and exit code 2."""
    p = Parser(prog="python -m fastcache", description=__doc__)
    add_model_options(p)
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
    run.add_argument("--output", default="fastcache.png", help="where to write the accelerated image")
    args = p.parse_args(argv)
    geometry = check_model_options(p, args)
    check_steps(p, args, args.steps)
    args.size = parse_size(p, args.size, geometry) if args.size is not None else None
    check_finite(p, args.guidance, "--guidance")
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1; got {args.repeat}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0; got {args.seed}")
    if not Path(args.output).parent.is_dir():
        p.error(f"--output {args.output}: its folder does not exist")
    args.parser = p
    return args


def time_pipeline(pipe, call_kwargs: dict, repeat: int, seed: int) -> Timing:
    """Warm up once, then time ``repeat`` calls (synchronised), all with the same seed."""

    def call():
        generator = torch.Generator("cpu").manual_seed(seed)
        start = time.perf_counter()
        image = pipe(generator=generator, output_type="np", **call_kwargs).images
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
    dtype = default_dtype(args.device)
    with model_errors(args.parser, args):
        pipe, label = open_pipeline(args.model, args.preset, device=args.device, dtype=dtype, seed=args.seed)
        # a hub model's branch range is known only now: checked before the plain pipeline runs
        compile_pipeline(pipe, args.interval, args.branch, compile=False).disable()
    pipe.set_progress_bar_config(disable=True)
    width, height = args.size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    prompt = prompt_inputs(pipe, [args.prompt])
    call_kwargs = dict(num_inference_steps=args.steps, height=height, width=width, guidance_scale=args.guidance,
                       **prompt)

    logger.info("model: %s | %s, %s, %dx%d, %d steps", label, args.device, dtype, width, height, args.steps)
    logger.info("running the plain pipeline ...")
    base = time_pipeline(pipe, call_kwargs, args.repeat, args.seed)
    logger.info("running %s (interval=%d, branch=%d) ...", args.variant, args.interval, args.branch)
    with VARIANTS[args.variant].applied(pipe, args.interval, args.branch, args.schedule):
        fast = time_pipeline(pipe, call_kwargs, args.repeat, args.seed)

    rel = float(np.linalg.norm(fast.image - base.image) / np.linalg.norm(base.image))
    pipe.numpy_to_pil(fast.image)[0].save(args.output)
    result = dict(baseline_s=base.seconds, fastcache_s=fast.seconds, speedup=base.seconds / fast.seconds,
                  warmup_s=fast.warmup, rel_l2_image=rel, output=args.output)
    print(f"\n{'':12}{'time/call':>12}{'first call':>12}\n"
          f"{'plain':12}{base.seconds:>11.3f}s{base.warmup:>11.2f}s\n"
          f"{'fastcache':12}{fast.seconds:>11.3f}s{fast.warmup:>11.2f}s\n"
          f"speed-up {result['speedup']:.2f}x | image rel. L2 vs plain {rel:.4f} | "
          f"torch {torch.__version__} | image written to {args.output}")
    return result


if __name__ == "__main__":
    main()
