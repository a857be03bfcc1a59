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

import numpy as np
import torch

from .models import PRESETS, build_pipeline, load_pipeline, random_prompt_embeds
from .variants import VARIANTS

logger = logging.getLogger("fastcache")


@dataclass
class Timing:
    seconds: float  # median over the timed runs
    warmup: float  # first call: compilation and capture included
    image: np.ndarray


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastcache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local diffusers folder or hub id; default: --preset with random weights")
    p.add_argument("--preset", default="tiny-sd", choices=sorted(PRESETS), help="architecture built from config")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--size", type=int, help="height and width in pixels (default: the model's native size)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="timed runs after the warm-up run")
    p.add_argument("--variant", default="fastcache", choices=sorted(VARIANTS),
                   help="fastcache-eager: no compilation; see fastcache/variants.py for the others")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="fastcache.png", help="where to write the accelerated image")
    return p.parse_args(argv)


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
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    if args.model:
        pipe = load_pipeline(args.model, dtype=dtype, device=args.device)
        prompt = dict(prompt=args.prompt)
        label = args.model
    else:
        pipe = build_pipeline(args.preset, dtype=dtype, device=args.device, seed=args.seed)
        prompt = random_prompt_embeds(pipe, seed=args.seed)
        tiny = args.preset.startswith("tiny")
        kind = "a tiny stand-in, not a real model" if tiny else "speed equals the real model's"
        label = f"{args.preset} (built from config with RANDOM WEIGHTS: the image is noise; {kind})"
    pipe.set_progress_bar_config(disable=True)
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    call_kwargs = dict(num_inference_steps=args.steps, height=size, width=size, guidance_scale=args.guidance, **prompt)

    logger.info("model: %s | %s, %s, %dx%d, %d steps", label, args.device, dtype, size, size, args.steps)
    logger.info("running the plain pipeline ...")
    base = time_pipeline(pipe, call_kwargs, args.repeat, args.seed)
    logger.info("running %s (interval=%d, branch=%d) ...", args.variant, args.interval, args.branch)
    with VARIANTS[args.variant].applied(pipe, args.interval, args.branch):
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
