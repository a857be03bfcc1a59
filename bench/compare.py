"""Side-by-side benchmark: diffusers eager, the DeepCache helper, torch.compile alone, and fastcache variants.

All peers run in one process on one card, on pipelines built from the real configs with random weights (speed is
the real models'; images are noise). For each configuration it prints and writes:
time per pipeline call (VAE decode included), speed-ups as ratios, fidelity of each cached run against the
uncached output of the same seed (relative L2 of the final latents, PSNR of the decoded images; with --fidelity
also their SSIM, so that every speed claim carries its quality cost), cold
compile/warm-up seconds, peak GPU memory (reserved during the timed calls; the warm-up's peak is in the JSON), and
the dynamo graphs and CUDA graphs recorded after warm-up (both must stay flat). Output: ``results.jsonl``,
``results.md`` and ``results.png`` under --out.

    python bench/compare.py --subset gpu-check        # SD2.1 512 b1 I=3 B=0: the core runtime's GPU check
    python bench/compare.py --subset sdxl-check       # SDXL 1024 b1 I=3 B=0: the second target
    python bench/compare.py --subset table            # the DeepCache docs table, extended
    python bench/compare.py --subset controlnet       # SD1.5 + ControlNet 512 I3B0, with TFLOP per call
    python bench/compare.py --subset pipelines --peers eager,deepcache,compile,fastcache
                                                      # SD1.5 512 with a LoRA (hot-swap, per-call scale), FreeU,
                                                      # an IP-Adapter, PAG: ms per image, seconds per change
    python bench/compare.py --smoke                   # tiny configs on CPU (CI)
    python bench/compare.py --peers all               # every peer, the tuned and autotuned variants included
    python bench/compare.py --cache-mode shared       # one inductor cache for all peers: shorter, warm-ups less cold
    python bench/compare.py --fidelity                # PSNR and SSIM of the decoded images against the uncached ones

The fastcache peers are ``fastcache.variants.VARIANTS``: plain, hand-captured CUDA graphs ("static"), the fused
scheduler step ("fused"), and "tuned"/"autotune" with the speed switches of PyTorch's and diffusers' SDXL guides
(fused QKV, channels_last, a compiled VAE decoder, inductor settings). "compile-tuned" gives torch.compile the
same switches, so that the comparison stays like for like.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters as dynamo_counters
from torch._inductor.utils import clear_caches as clear_inductor_caches
from torch.utils.flop_counter import FlopCounterMode

from fastcache.environment import environment
from fastcache.graphs import UNET_INDUCTOR_OPTIONS, compile_decoder, compile_options, cudagraph_recordings
from fastcache.models import (
    build_pipeline,
    random_ip_adapter,
    random_lora,
    random_prompt_embeds,
    with_controlnet,
    with_text_encoder,
)
from fastcache.tuning.fidelity import psnr, ssim
from fastcache.variants import VARIANTS, speed_switches

logger = logging.getLogger("bench")


FASTCACHE = {name: v for name, v in VARIANTS.items() if v.config.compile}  # fastcache-eager is DeepCache's speed
PEERS = ("eager", "deepcache", "compile", "compile-tuned", *FASTCACHE)
DEFAULT_PEERS = ("eager", "deepcache", "compile", "fastcache", "fastcache-static-fused", "fastcache-tuned")
SMOKE_PEERS = ("eager", "deepcache", "compile", "fastcache", "fastcache-tuned")


@dataclass(frozen=True)
class Config:
    preset: str
    size: int
    batch: int
    interval: int
    branch: int
    controlnets: int = 0  # a ControlNet pipeline with this many ControlNets (made from the UNet, random weights)
    feature: str | None = None  # one of FEATURES, on top of the UNet (random weights too)

    @property
    def name(self) -> str:
        controlnet = f" +{self.controlnets} ControlNet" if self.controlnets else ""
        feature = f" +{self.feature}" if self.feature else ""
        return f"{self.preset}{controlnet}{feature} {self.size} b{self.batch} I{self.interval}B{self.branch}"


def _grid(preset, sizes, batches, cache):
    return [Config(preset, s, b, i, br) for s in sizes for b in batches for i, br in cache]


SUBSETS: dict[str, list[Config]] = {
    "gpu-check": [Config("sd21", 512, 1, 3, 0)],
    "sdxl-check": [Config("sdxl", 1024, 1, 3, 0)],  # the second target alone, to fit a device call of its own
    "targets": [Config("sd21", 512, 1, 3, 0), Config("sdxl", 1024, 1, 3, 0)],
    "table": (_grid("sd21", (512, 768, 1024), (1, 4, 8), ((3, 0), (5, 0), (5, 1)))
              + _grid("sd15", (512,), (1,), ((3, 0), (5, 0))) + _grid("sdxl", (1024,), (1,), ((3, 0), (5, 0)))),
    "controlnet": [Config("sd15", 512, 1, 3, 0, controlnets=1)],  # also counts FLOPs per call
    "smoke": [Config("tiny-sd", 32, 1, 3, 1)],
    "controlnet-smoke": [Config("tiny-sd", 32, 1, 3, 1, controlnets=1)],
}
# What users run on top of the UNet: a LoRA (hot-swapped, with a per-call scale), FreeU, an IP-Adapter, PAG.
FEATURES = ("lora", "freeu", "ip-adapter", "pag")
SUBSETS["pipelines"] = [Config("sd15", 512, 1, 3, 0, feature=feature) for feature in FEATURES]
SUBSETS["pipelines-smoke"] = [Config("tiny-sd", 32, 1, 3, 1, feature=feature) for feature in FEATURES]
FLOP_PEERS = ("eager", "deepcache", "fastcache")  # whose FLOPs per call a ControlNet subset counts (eagerly)


@dataclass
class Result:
    config: str
    peer: str
    seconds: float  # median time per pipeline call
    warmup_s: float  # first call, compilation and capture included
    rel_l2_latents: float | None = None  # vs the uncached (eager) run of the same seed
    psnr_db: float | None = None  # mean over images of each decoded image's PSNR against the uncached image
    ssim: float | None = None  # the same for SSIM (with --fidelity)
    peak_mem_gib: float | None = None  # reserved during the timed calls, CUDA-graph pools included
    extra: dict = field(default_factory=dict)


class Runner:
    """Times one pipeline at one configuration; keeps the final latents and images of the last call."""

    def __init__(self, pipe, config: Config, steps: int, repeat: int, extra: dict | None = None,
                 change: Callable[[bool], None] | None = None):
        self.pipe, self.config, self.steps, self.repeat = pipe, config, steps, repeat
        self.extra, self.change = extra if extra is not None else {}, change  # a feature's call arguments, change
        self.embeds = random_prompt_embeds(pipe, config.batch)
        if config.controlnets:  # conditioning images, one per ControlNet
            generator = torch.Generator("cpu").manual_seed(1)
            images = [torch.rand(config.batch, 3, config.size, config.size, generator=generator).to(
                device=pipe.unet.device, dtype=pipe.unet.dtype) for _ in range(config.controlnets)]
            self.embeds["image"] = images[0] if config.controlnets == 1 else images

    def call(self):
        latents = {}

        def keep_latents(pipe, step, timestep, kwargs):
            latents["final"] = kwargs["latents"]
            return kwargs

        sync()
        start = time.perf_counter()
        out = self.pipe(num_inference_steps=self.steps, height=self.config.size, width=self.config.size,
                        guidance_scale=7.5, output_type="np", generator=torch.Generator("cpu").manual_seed(0),
                        callback_on_step_end=keep_latents, **self.embeds, **self.extra)
        sync()
        return time.perf_counter() - start, latents["final"].float().cpu(), out.images

    def measure(self, peer: str, captures: Callable[[], int] = lambda: 0) -> tuple[Result, torch.Tensor, np.ndarray]:
        """Warm-up call, then ``repeat`` timed calls; ``captures`` counts CUDA graphs a peer captures by hand."""
        reset_peak_memory()
        warmup, latents, images = self.call()
        warmup_peak = peak_memory()
        reset_peak_memory()  # the timed calls' peak is what serving holds: compile-time scratch is not part of it

        def compiled() -> tuple[int, int]:  # dynamo graphs, and CUDA graphs recorded by cudagraph trees or by hand
            return dynamo_counters["stats"]["unique_graphs"], cudagraph_recordings() + captures()

        before = compiled()
        times = []
        for _ in range(self.repeat):
            seconds, latents, images = self.call()
            times.append(seconds)
        peak = peak_memory()
        result = Result(self.config.name, peer, statistics.median(times), warmup,
                        peak_mem_gib=peak and peak["reserved"])
        # anything compiled or recorded after the warm-up call is a recompile or a re-record
        after = compiled()
        result.extra.update(graphs_after_warmup=after[0] - before[0], recordings_after_warmup=after[1] - before[1],
                            peak_allocated_gib=peak and peak["allocated"],
                            warmup_peak_gib=warmup_peak and warmup_peak["reserved"],
                            ms_per_image=1e3 * result.seconds / self.config.batch)
        if self.change is not None:  # what a change of setting costs: the first call after it, compiles included
            self.change(True)
            try:
                seconds = self.call()[0]
            finally:
                self.change(False)
            changed = compiled()
            result.extra.update(change_s=seconds, change_compile_s=max(seconds - result.seconds, 0.0),
                                graphs_on_change=changed[0] - after[0], recordings_on_change=changed[1] - after[1])
        return result, latents, images


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory():
    """Free what is no longer used (earlier peers' graphs and pools, cached blocks) and restart the peak counters."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict | None:
    """GiB at most allocated to tensors, and at most reserved by the caching allocator (CUDA-graph pools included:
    their memory is reserved for replays but not counted as allocated) since the last reset."""
    if not torch.cuda.is_available():
        return None
    return dict(allocated=torch.cuda.max_memory_allocated() / 2**30, reserved=torch.cuda.max_memory_reserved() / 2**30)


CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# what each result says about its warm-up: cold, or helped by the kernels earlier peers compiled
CACHE_MODES = {"per-peer": "per-peer (cold)", "shared": "shared (later peers may reuse earlier peers' kernels)"}


@contextmanager
def compile_cache_root(cache_dir: str | None) -> Iterator[str]:
    """Where the compiled peers' caches go: ``cache_dir`` (kept for a later run, the profiler) or a
    temporary folder removed afterwards. On exit the caller's cache variables are restored and inductor's in-memory
    caches, which point into this root, are cleared."""
    saved = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    with ExitStack() as stack:
        try:
            yield cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-inductor-"))
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            clear_inductor_caches()


def fresh_compile_cache(peer: str, cache_root: str) -> None:
    """Give each compiled peer its own empty inductor/triton cache, ``cache_root/peer``, so that neither's cold
    start borrows the other's kernels."""
    empty_compile_cache(os.path.join(cache_root, peer))


def empty_compile_cache(path: str) -> None:
    """Point inductor and triton at an empty cache in ``path`` and forget what was compiled so far."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
    torch._dynamo.reset()
    clear_inductor_caches()  # in-memory kernels and code too, as torch's own fresh_cache does


def run_config(pipe, config: Config, peers: list[str], steps: int, repeat: int,
               cache_root: str, cache_mode: str = "per-peer", fidelity: bool = False, extra: dict | None = None,
               change: Callable[[bool], None] | None = None) -> Iterator[Result]:
    """Each peer's result as soon as it is measured, so that a run cut short by a lease keeps what it measured.

    A peer that fails (out of memory at a large shape, say) is logged with its traceback and skipped.
    ``cache_mode`` "per-peer" compiles each peer cold in its own cache; "shared" leaves the run's one cache (set up
    by the caller) and inductor's in-memory caches as they are, so a peer may reuse the kernels of the peers before
    it: dynamo still starts afresh, so each warm-up still traces, compiles what is new and captures its graphs.
    """
    runner = Runner(pipe, config, steps, repeat, extra, change)
    base, base_latents, base_images = runner.measure("eager")
    base.extra.update(speedup_vs_eager=1.0, compile_cache=CACHE_MODES[cache_mode])
    if config.controlnets:
        base.extra["tflop_per_call"] = tflop_per_call(runner, pipe, "eager")
    if "eager" in peers:
        yield base
    deepcache_latents = None
    for peer in (p for p in PEERS if p in peers and p != "eager"):
        if peer != "deepcache":  # a compiled peer traces afresh, in a cold cache of its own or in the shared one
            if cache_mode == "shared":
                torch._dynamo.reset()
            else:
                fresh_compile_cache(peer, cache_root)
        try:
            result, latents, images = measure_peer(runner, pipe, peer)
        except Exception:
            logger.exception("%s failed at %s; going on with the next peer", peer, config.name)
            continue
        result.rel_l2_latents = float((latents - base_latents).norm() / base_latents.norm())
        result.psnr_db = statistics.fmean(psnr(images, base_images))
        if fidelity:
            result.ssim = statistics.fmean(ssim(images, base_images))
        result.extra.update(speedup_vs_eager=base.seconds / result.seconds, compile_cache=CACHE_MODES[cache_mode])
        if config.controlnets and peer in FLOP_PEERS:
            result.extra["tflop_per_call"] = tflop_per_call(runner, pipe, peer)
        if peer == "deepcache":
            deepcache_latents = latents
        elif deepcache_latents is not None and peer in FASTCACHE:
            result.extra["rel_l2_vs_deepcache"] = float((latents - deepcache_latents).norm() / deepcache_latents.norm())
        yield result


def measure_peer(runner: Runner, pipe, peer: str) -> tuple[Result, torch.Tensor, np.ndarray]:
    """One peer on ``pipe``, which is left as it was found."""
    config = runner.config
    if peer == "deepcache":
        with deepcache_helper(pipe, config):
            return runner.measure(peer)
    if peer in ("compile", "compile-tuned"):
        return measure_compile(runner, pipe, peer, tuned=peer == "compile-tuned")
    with FASTCACHE[peer].applied(pipe, config.interval, config.branch) as handle:
        result, latents, images = runner.measure(peer, lambda: handle.counters.captures)  # static-cudagraphs
        result.extra.update(counters=asdict(handle.counters))
    return result, latents, images


def tflop_per_call(runner: Runner, pipe, peer: str) -> float:
    """TFLOP of one whole call (VAE decode included) as ``peer`` computes it, counted by torch's FlopCounterMode on
    an eager run: what caching saves, whatever the kernels. fastcache is counted with its eager runtime."""
    with ExitStack() as stack:
        if peer == "deepcache":
            stack.enter_context(deepcache_helper(pipe, runner.config))
        elif peer in FASTCACHE:
            stack.enter_context(VARIANTS["fastcache-eager"].applied(pipe, runner.config.interval, runner.config.branch))
        counter = stack.enter_context(FlopCounterMode(display=False))
        runner.call()
    return counter.get_total_flops() / 1e12


@contextmanager
def deepcache_helper(pipe, config: Config) -> Iterator[None]:
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=config.interval, cache_branch_id=config.branch)
    helper.enable()
    try:
        yield
    finally:
        helper.disable()


def measure_compile(runner: Runner, pipe, peer: str, tuned: bool):
    """``torch.compile(unet, mode="reduce-overhead")``; tuned: the guides' recipe (switches, inductor options and
    a compiled VAE decoder, as in diffusers' SDXL guide, with reduce-overhead instead of max-autotune), the decoder
    compiled as ``fastcache-autotune`` compiles it."""
    unet, decoder, controlnet = pipe.unet, pipe.vae.decoder, getattr(pipe, "controlnet", None)
    options = compile_options("reduce-overhead", UNET_INDUCTOR_OPTIONS if tuned else None)
    with speed_switches(pipe, tuned):
        pipe.unet = torch.compile(unet, fullgraph=True, **options)
        if controlnet is not None:  # the ControlNet too: torch.compile alone, on everything that runs per step
            pipe.controlnet = torch.compile(controlnet, fullgraph=True, **options)
        if tuned:
            decoder.forward = compile_decoder(decoder, UNET_INDUCTOR_OPTIONS)
        try:
            return runner.measure(peer)
        finally:
            pipe.unet = unet
            if controlnet is not None:
                pipe.controlnet = controlnet
            vars(decoder).pop("forward", None)


# the first line of the table: every model here has random weights
FIDELITY_NOTE = ("RANDOM WEIGHTS: speed is the real models', but the fidelity columns (rel L2, PSNR, SSIM) say nothing "
                 "about real models")


@contextmanager
def feature_applied(pipe, feature: str | None) -> Iterator[tuple[object, dict, Callable[[bool], None] | None]]:
    """``pipe`` with ``feature`` on (random weights), as ``(pipeline to call, its extra call arguments, change)``;
    ``change(True)`` switches to the setting whose first call the benchmark times after the warm-up, ``change(False)``
    back. LoRA: a hot-swap to a LoRA of twice the rank and a new per-call scale (both free for fastcache); FreeU: new
    values; IP-Adapter: a new scale; PAG: nothing (the next call installs its processors again). Undone on exit."""
    unet, extra, change = pipe.unet, {}, None
    if feature == "lora":
        text_encoder = pipe.text_encoder
        with_text_encoder(pipe)  # SD pipelines scale the text encoder's LoRA layers for a per-call scale
        loras = [random_lora(unet, rank=rank, seed=rank) for rank in (8, 16)]
        pipe.enable_lora_hotswap(target_rank=16)
        pipe.load_lora_weights(loras[0], adapter_name="style")

        def change(on: bool) -> None:
            pipe.load_lora_weights(loras[on], adapter_name="style", hotswap=True)
            extra["cross_attention_kwargs"] = {"scale": 0.6 if on else 0.8}

        change(False)
    elif feature == "freeu":
        values = ((0.9, 0.2, 1.5, 1.6), (0.8, 0.3, 1.4, 1.5))  # FreeU's SD1.5 values, then others

        def change(on: bool) -> None:
            unet.enable_freeu(*values[on])

        change(False)
    elif feature == "ip-adapter":
        embed_dim = 1024 if unet.config.cross_attention_dim >= 768 else 16  # SD1.5's IP-Adapter: a ViT-H encoder
        unet._load_ip_adapter_weights([random_ip_adapter(unet, embed_dim)])
        generator = torch.Generator("cpu").manual_seed(3)  # negative and positive image embeddings, one image
        extra["ip_adapter_image_embeds"] = [torch.randn(2, 1, embed_dim, generator=generator).to(unet.device,
                                                                                                  unet.dtype)]

        def change(on: bool) -> None:
            pipe.set_ip_adapter_scale(0.5 if on else 1.0)
    elif feature == "pag":
        from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

        kind = StableDiffusionXLPAGPipeline if unet.config.addition_embed_type == "text_time" else (
            StableDiffusionPAGPipeline)
        pipe = kind.from_pipe(pipe, pag_applied_layers=["mid"])
        pipe.set_progress_bar_config(disable=True)
        extra["pag_scale"] = 3.0

        def change(on: bool) -> None:  # nothing: the next call installs the PAG processors again
            pass
    try:
        yield pipe, extra, change
    finally:
        if feature == "lora":
            pipe.unload_lora_weights()
            unet._prepare_lora_hotswap_kwargs = None
            pipe.text_encoder = text_encoder
        elif feature == "freeu":
            unet.disable_freeu()
        elif feature == "ip-adapter":
            pipe.unload_ip_adapter()


def markdown(results: list[Result], env: dict, cache_mode: str = "per-peer") -> str:
    with_ssim = any(r.ssim is not None for r in results)
    lines = [FIDELITY_NOTE,
             f"{env['card']} | driver {env.get('driver', '—')} | torch {env['torch']} | diffusers {env['diffusers']} "
             f"| weights: {env['weights']} | inductor cache: {CACHE_MODES[cache_mode]}", "",
             "| config | peer | s/call | ms/image | speed-up vs eager | vs DeepCache | vs compile | rel L2 | PSNR dB "
             + ("| SSIM " if with_ssim else "") + "| warm-up s | peak reserved GiB | TFLOP/call "
             "| change: first call s (graphs) |",
             "|---" * (13 + with_ssim) + "|"]
    by_config: dict[str, dict[str, Result]] = {}
    for r in results:
        by_config.setdefault(r.config, {})[r.peer] = r
    for config, peers in by_config.items():
        for peer, r in peers.items():
            ratio = {p: (peers[p].seconds / r.seconds if p in peers else None) for p in PEERS}

            def fmt(value, spec):
                return "—" if value is None else format(value, spec)

            change = "—" if "change_s" not in r.extra else (
                f"{r.extra['change_s']:.2f} ({r.extra['graphs_on_change'] + r.extra['recordings_on_change']})")
            lines.append(f"| {config} | {peer} | {r.seconds:.3f} | {fmt(r.extra.get('ms_per_image'), '.1f')} | "
                         f"{fmt(ratio['eager'], '.2f')}x | "
                         f"{fmt(ratio['deepcache'], '.2f')}x | {fmt(ratio['compile'], '.2f')}x | "
                         f"{fmt(r.rel_l2_latents, '.2e')} | {fmt(r.psnr_db, '.1f')} | "
                         + (f"{fmt(r.ssim, '.4f')} | " if with_ssim else "") + f"{r.warmup_s:.1f} | "
                         f"{fmt(r.peak_mem_gib, '.2f')} | {fmt(r.extra.get('tflop_per_call'), '.3f')} | {change} |")
    return "\n".join(lines)


def chart(results: list[Result], path: Path, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r.config for r in results))
    peers = [p for p in PEERS if any(r.peer == p for r in results)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs)), 4))
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        seconds = [next((r.seconds for r in results if r.config == c and r.peer == peer), 0) for c in configs]
        ax.bar(np.arange(len(configs)) + i * width, seconds, width, label=peer)
    ax.set_xticks(np.arange(len(configs)) + width * (len(peers) - 1) / 2, configs, rotation=20, ha="right")
    ax.set_ylabel("seconds per pipeline call")
    ax.set_title(f"{env['card']}, torch {env['torch']}, random weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", default="gpu-check", choices=sorted(SUBSETS))
    p.add_argument("--smoke", action="store_true", help="tiny configs, few steps, on CPU: what CI runs")
    p.add_argument("--peers", help=f"comma-separated subset of {PEERS}, or all (default: {DEFAULT_PEERS}; "
                                   f"--smoke: {SMOKE_PEERS})")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="out/bench")
    p.add_argument("--cache-dir", help="keep the inductor caches under CACHE_DIR for a later run to reuse: CACHE_DIR/"
                                       "PEER, emptied before the peer runs, or CACHE_DIR/shared, emptied at the start")
    p.add_argument("--fidelity", action="store_true",
                   help="also the SSIM of each peer's decoded images against the uncached (eager) ones, beside PSNR")
    p.add_argument("--cache-mode", default="per-peer", choices=sorted(CACHE_MODES),
                   help="per-peer: each compiled peer cold in its own inductor cache; shared: one cache for the run, "
                        "so later peers may reuse earlier peers' kernels (warm-ups shorter, still reported)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    peers = (list(PEERS) if args.peers == "all" else args.peers.split(",") if args.peers
             else list(SMOKE_PEERS if args.smoke else DEFAULT_PEERS))
    if unknown := set(peers) - set(PEERS):
        p.error(f"unknown peers {sorted(unknown)}; valid: {PEERS}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.subset = next((f"{kind}-smoke" for kind in ("controlnet", "pipelines") if args.subset.startswith(kind)),
                           "smoke")
        args.steps, args.repeat = min(args.steps, 6), 1
    elif device == "cpu":
        p.error("the full benchmark needs a CUDA device; use --smoke on CPU")
    dtype = torch.float16 if device == "cuda" else torch.float32
    env = dict(environment(device), weights="random, models built from config")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("environment: %s; inductor cache: %s", env, CACHE_MODES[args.cache_mode])

    results: list[Result] = []
    pipes = {}
    with open(out / "results.jsonl", "w") as jsonl, compile_cache_root(args.cache_dir) as cache_root:
        if args.cache_mode == "shared":
            empty_compile_cache(os.path.join(cache_root, "shared"))
        for config in SUBSETS[args.subset]:
            model = (config.preset, config.controlnets)
            if model not in pipes:
                pipes.clear()  # one model resident at a time
                pipe = build_pipeline(config.preset, dtype=dtype, device=device)
                pipes[model] = with_controlnet(pipe, config.controlnets) if config.controlnets else pipe
            logger.info("== %s", config.name)
            with feature_applied(pipes[model], config.feature) as (pipe, extra, change):
                for r in run_config(pipe, config, peers, args.steps, args.repeat, cache_root, args.cache_mode,
                                    args.fidelity, extra, change):
                    results.append(r)
                    jsonl.write(json.dumps(dict(asdict(r), steps=args.steps, **env)) + "\n")
                    jsonl.flush()
                    (out / "results.md").write_text(markdown(results, env, args.cache_mode) + "\n")
                    logger.info("   %-10s %.3f s/call (warm-up %.1f s) %s", r.peer, r.seconds, r.warmup_s, r.extra)
    table = markdown(results, env, args.cache_mode)
    chart(results, out / "results.png", env)
    print(table)
    return results


if __name__ == "__main__":
    main()
