"""Where the time goes in one fastcache pipeline call.

Per configuration it prints: time per full step and per shallow step (device time from CUDA events; host time from
the clock, the time to issue the work, which nears the device time where the host is the bottleneck), time per
step outside the UNet (CFG combine, scheduler update, pipeline Python: the gap between two UNet calls), VAE decode,
the whole call, how busy the GPU was (kernel time from ``torch.profiler`` over an unprofiled call's wall time),
FLOPs per full and shallow step and the TFLOP/s achieved against a matmul peak measured on the same card, and
NVML readings polled while whole calls run (energy per image, power, SM clock, memory). ``--trace`` exports the
profiler's Chrome trace.

    python tools/profile_steps.py --preset sd21 --size 512 --interval 3 --branch 0 --trace out/trace.json
    python tools/profile_steps.py --variant fastcache-tuned   # any of fastcache.variants.VARIANTS
    python tools/profile_steps.py --smoke        # tiny model on CPU (device time = host time there)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.utils.flop_counter import FlopCounterMode

from fastcache.models import build_pipeline, random_prompt_embeds
from fastcache.partition import feature_shape
from fastcache.variants import VARIANTS

logger = logging.getLogger("profile")


class Clock:
    """Device-side timestamps (CUDA events) with host timestamps beside them; host only on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return time.perf_counter(), event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed_ms(self, start, end) -> tuple[float, float]:
        """(device ms, host ms) between two marks; call after synchronising."""
        host = (end[0] - start[0]) * 1e3
        return (start[1].elapsed_time(end[1]) if self.cuda else host), host


class UNetTimer:
    """Marks the start and end of every UNet call with torch's own module hooks, tagged full or shallow."""

    def __init__(self, unet, handle, clock: Clock):
        self.handle, self.clock, self.calls = handle, clock, []
        self._hooks = [unet.register_forward_pre_hook(self._before), unet.register_forward_hook(self._after)]

    def _before(self, module, args):
        self._start, self._full = self.clock.mark(), self.handle.counters.full

    def _after(self, module, args, output):
        self.calls.append((self._start, self.clock.mark(), self.handle.counters.full > self._full))

    def remove(self):
        for hook in self._hooks:
            hook.remove()

    def summary(self) -> dict:
        """Median device/host ms per full step, per shallow step, and per gap between UNet calls."""
        rows = {"full": [], "shallow": [], "outside_unet": []}
        for i, (start, end, full) in enumerate(self.calls):
            rows["full" if full else "shallow"].append(self.clock.elapsed_ms(start, end))
            if i + 1 < len(self.calls):
                rows["outside_unet"].append(self.clock.elapsed_ms(end, self.calls[i + 1][0]))
        return {name: dict(count=len(v), device_ms=_median(d for d, _ in v), host_ms=_median(h for _, h in v))
                for name, v in rows.items()}


def _median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def unet_flops(handle, pipe, batch: int, size: int) -> dict:
    """FLOPs of one full and one shallow UNet evaluation at this shape (eager paths, counted by torch)."""
    unet, part = pipe.unet, handle.partition
    latent = size // pipe.vae_scale_factor
    sample = torch.randn(batch, unet.config.in_channels, latent, latent, device=unet.device, dtype=unet.dtype)
    embeds = random_prompt_embeds(pipe, batch)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=unet.device, dtype=unet.dtype)
        kwargs["added_cond_kwargs"] = dict(text_embeds=embeds["pooled_prompt_embeds"], time_ids=time_ids)
    cache = torch.zeros(feature_shape(unet, part.boundary, sample.shape), device=unet.device, dtype=unet.dtype)
    result = {}
    for name, path in (("full", part.full), ("shallow", part.shallow)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            path(sample, torch.tensor(500, device=unet.device), embeds["prompt_embeds"], cache, **kwargs)
        result[name] = counter.get_total_flops()
    return result


def matmul_peak_tflops(device: torch.device) -> float | None:
    """A large fp16 matrix product's rate on this card: the ceiling the FLOP floor is measured against."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) * 1e-3) / 1e12


class NVML:
    """Energy, power, SM clock and memory via nvidia-ml-py while a block runs; no readings where NVML is missing."""

    def __init__(self, device: torch.device, period_s: float = 0.01):
        self.handle, self.period_s = None, period_s
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as error:  # no nvidia-ml-py, or no NVML on this machine: report without it
            logger.warning("NVML unavailable (%s); no power or energy readings", error)

    @contextmanager
    def sampling(self) -> Iterator[dict]:
        """Yields a dict filled on exit: the energy counter's difference over the block, and power, SM clock and
        used memory polled by a thread every ``period_s`` (a reading after the work would show an idle card).
        A reading the card does not support (MIG, some VMs) is left out with a warning."""
        readings: dict = {}
        if not self.handle:
            yield readings
            return
        nvml, handle, samples, stop = self.nvml, self.handle, [], threading.Event()

        def poll():
            try:
                while True:
                    samples.append((nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                                    nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                                    nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30))
                    if stop.wait(self.period_s):
                        return
            except Exception as error:
                logger.warning("NVML: no power, clock or memory readings (%s)", error)

        energy_mj = self._energy_mj()
        thread = threading.Thread(target=poll, name="nvml-poll", daemon=True)
        thread.start()
        try:
            yield readings
        finally:
            stop.set()
            thread.join()
            end_mj = self._energy_mj() if energy_mj is not None else None
            if end_mj is not None:
                readings["energy_j"] = (end_mj - energy_mj) / 1e3
            if samples:
                power, clock, memory = zip(*samples, strict=True)
                readings.update(power_w_mean=statistics.mean(power), power_w_max=max(power),
                                sm_clock_mhz_mean=statistics.mean(clock), memory_used_gib_max=max(memory),
                                nvml_samples=len(samples))

    def _energy_mj(self) -> int | None:
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception as error:
            logger.warning("NVML: no energy reading (%s)", error)
            return None


def profile(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build_pipeline(args.preset, dtype=dtype, device=device)
    with VARIANTS[args.variant].applied(pipe, args.interval, args.branch) as handle:
        return measure(pipe, handle, args, device)


def measure(pipe, handle, args, device: torch.device) -> dict:
    """The measurements of ``profile`` on a pipeline that has the variant applied."""
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    embeds = random_prompt_embeds(pipe, args.batch)
    clock, nvml = Clock(device), NVML(device)

    def call(**kwargs):
        return pipe(num_inference_steps=args.steps, height=size, width=size, guidance_scale=7.5,
                    generator=torch.Generator("cpu").manual_seed(0), **embeds, **kwargs).images

    start = time.perf_counter()
    call(output_type="np")  # warms the UNet paths and, if compiled, the VAE decoder
    warmup_s = time.perf_counter() - start

    timer = UNetTimer(pipe.unet, handle, clock)
    begin = clock.mark()
    call(output_type="latent")
    end = clock.mark()
    clock.sync()
    denoise_ms = clock.elapsed_ms(begin, end)
    timer.remove()

    vae_marks = []  # the pipeline's own decode call (SDXL upcasts the VAE first), timed in place
    decode = pipe.vae.decode

    def timed_decode(*args, **kwargs):
        vae_marks.append(clock.mark())
        out = decode(*args, **kwargs)
        vae_marks.append(clock.mark())
        return out

    pipe.vae.decode = timed_decode
    try:
        start = time.perf_counter()
        call(output_type="np")
        clock.sync()
        wall_ms = (time.perf_counter() - start) * 1e3  # the whole call, not slowed down by the profiler
    finally:
        del pipe.vae.decode

    with nvml.sampling() as power:  # whole calls, decode included: energy per image
        for _ in range(args.energy_calls):
            call(output_type="np")
        clock.sync()

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        call(output_type="np")
        clock.sync()
    if args.trace:
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(args.trace)
    # kernels only: CPU ops also carry the device time of the kernels they launched (counted twice otherwise)
    kernel_ms = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA
                    and not getattr(e, "is_user_annotation", False)) / 1e3 if device.type == "cuda" else None

    steps = timer.summary()
    flops = unet_flops(handle, pipe, 2 * args.batch, size)
    peak = matmul_peak_tflops(device)
    for name in ("full", "shallow"):
        ms = steps[name]["device_ms"]
        steps[name]["tflop"] = flops[name] / 1e12
        steps[name]["achieved_tflops"] = flops[name] / (ms * 1e-3) / 1e12 if ms else None
        steps[name]["floor_ms"] = flops[name] / (peak * 1e12) * 1e3 if peak else None
    energy = power.pop("energy_j", None)
    return dict(config=f"{args.preset} {size} b{args.batch} I{args.interval}B{args.branch}", variant=args.variant,
                device=str(device),
                card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, weights="random, built from config", warmup_s=warmup_s,
                steps=steps, denoise_ms=dict(zip(("device", "host"), denoise_ms, strict=True)),
                vae_decode_ms=clock.elapsed_ms(*vae_marks)[0], call_wall_ms=wall_ms, kernel_ms=kernel_ms,
                gpu_busy=kernel_ms / wall_ms if kernel_ms else None, matmul_peak_tflops=peak,
                energy_j_per_image=energy / (args.energy_calls * args.batch) if energy is not None else None, **power)


def report(result: dict) -> str:
    def f(value, spec=".3f"):
        return "—" if value is None else format(value, spec)

    lines = [f"{result['config']} {result['variant']} on {result['card']} "
             f"(torch {result['torch']}, weights {result['weights']})",
             f"{'':14}{'count':>6}{'device ms':>11}{'host ms':>10}{'TFLOP':>8}{'TFLOP/s':>9}{'floor ms':>10}"]
    for name, row in result["steps"].items():
        lines.append(f"{name:14}{row['count']:>6}{f(row['device_ms']):>11}{f(row['host_ms']):>10}"
                     f"{f(row.get('tflop')):>8}{f(row.get('achieved_tflops'), '.1f'):>9}{f(row.get('floor_ms')):>10}")
    lines += [f"VAE decode {f(result['vae_decode_ms'])} ms | whole call {f(result['call_wall_ms'], '.1f')} ms | "
                 f"GPU busy {f(result['gpu_busy'], '.0%')} | warm-up {f(result['warmup_s'], '.1f')} s | "
                 f"matmul peak {f(result['matmul_peak_tflops'], '.0f')} TFLOP/s",
             f"NVML over whole calls: energy/image {f(result['energy_j_per_image'], '.1f')} J | power "
             f"{f(result.get('power_w_mean'), '.0f')} W mean, {f(result.get('power_w_max'), '.0f')} W max | SM clock "
             f"{f(result.get('sm_clock_mhz_mean'), '.0f')} MHz | memory used "
             f"{f(result.get('memory_used_gib_max'), '.1f')} GiB max"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd21")
    p.add_argument("--size", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--variant", default="fastcache", choices=sorted(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--energy-calls", type=int, default=5, help="whole calls averaged for energy per image (NVML)")
    p.add_argument("--trace", help="write the torch.profiler Chrome trace here")
    p.add_argument("--json", help="append the result as one JSON line here")
    p.add_argument("--smoke", action="store_true", help="tiny-sd, 6 steps, eager: runs on CPU")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smoke:
        args.preset, args.steps, args.variant, args.energy_calls = "tiny-sd", 6, "fastcache-eager", 1
    result = profile(args)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(report(result))
    return result


if __name__ == "__main__":
    main()
