"""The measurements behind ``fastcache tune``: the uncached reference, then each candidate through
``compile_pipeline``, in one process on one device, appended as JSON lines as they finish so that ``--resume`` picks
up a killed run.

Per candidate: an untimed pass that keeps the images (fidelity) and watches the cached feature after every full step
(drift), then ``repeat`` timed passes (latency, the median; the first call, which compiles, is reported apart), then
one eager call whose UNet FLOPs torch's ``FlopCounterMode`` counts.
"""

from __future__ import annotations

import gc
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..environment import environment
from .fidelity import LPIPS, ClipScore, lpips_unavailable, psnr, ssim
from .report import Budget, Candidate, Measurement, Report, model_name, random_weights_note

if TYPE_CHECKING:
    from ..handle import FastCacheHandle

logger = logging.getLogger(__name__)

LOG_FILE, REFERENCE_FILE = "tune.jsonl", "reference.npz"

# Varied subjects, styles and compositions (the DeepCache paper's kind of evaluation prompts); --prompts replaces them.
BUILTIN_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red fox in a snowy forest at dawn, telephoto",
    "an isometric illustration of a tiny island city",
    "a bowl of ramen on a wooden table, food photography",
    "portrait of an old fisherman, dramatic lighting, 85mm",
    "a watercolor painting of a lighthouse in a storm",
    "a futuristic train station, concept art, wide angle",
    "macro photograph of a dew drop on a leaf",
    "a cozy reading nook with a cat, warm light",
    "an oil painting of sunflowers in a blue vase",
    "aerial view of a winding river through autumn hills",
    "a robot playing chess in a park, 35mm film",
    "a medieval castle on a cliff above the sea at sunset",
    "a minimalist poster of a mountain range, flat colors",
    "street market at night in the rain, neon reflections",
    "a detailed pencil sketch of a hummingbird",
)

# --scheduler: diffusers classes made from the model's own scheduler config; "default" keeps the model's.
SCHEDULERS = {"default": None, "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
              "euler-a": "EulerAncestralDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler",
              "pndm": "PNDMScheduler", "unipc": "UniPCMultistepScheduler", "heun": "HeunDiscreteScheduler"}


@dataclass(frozen=True)
class SweepSpec:
    """What a tune run measures on, besides the candidates: one image per (prompt, seed), one pipeline call each."""

    model: str | None  # a diffusers folder or hub id; None: the preset, with random weights
    preset: str
    device: str
    size: tuple[int, int]  # width, height in pixels
    steps: int
    scheduler: str = "default"
    guidance: float = 7.5
    prompts: tuple[str, ...] = BUILTIN_PROMPTS
    seeds: tuple[int, ...] = (0,)
    compile: bool = True
    mode: str = "reduce-overhead"
    repeat: int = 1  # timed passes over every (prompt, seed) per candidate
    lpips: bool = False
    clip_model: str | None = None  # a local CLIP folder

    def identity(self) -> dict:
        """What the measurements depend on: a run resumes only with the same, and serve --tuned checks model, size
        and steps."""
        clip = str(Path(self.clip_model).expanduser().resolve()) if self.clip_model else None
        return dict(model=model_name(self.model, self.preset), size=list(self.size), steps=self.steps,
                    scheduler=self.scheduler, guidance=self.guidance, prompts=list(self.prompts),
                    seeds=list(self.seeds), device=self.device, compile=self.compile and self.mode, repeat=self.repeat,
                    lpips=self.lpips, clip_model=clip)

    @property
    def note(self) -> str:
        return random_weights_note(self.preset) if self.model is None else f"fastcache tune: {self.model}"


class RunLog:
    """``tune.jsonl``: a header (note, identity, grid), the reference, then one line per candidate as measured.
    A line cut off by a kill is skipped when read back; the last reference line wins."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOG_FILE

    def read(self) -> tuple[dict | None, dict | None, dict[str, dict]]:
        """(header, reference, {candidate name: row}) as far as the file goes."""
        header, reference, rows = None, None, {}
        if not self.path.is_file():
            return header, reference, rows
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                logger.warning("%s line %d is incomplete (a killed run); it is measured again", self.path, number)
                continue
            kind = record.pop("kind", None)
            if kind == "header":
                header = record
            elif kind == "reference":
                reference = record
            elif kind == "candidate":
                rows[Measurement.from_dict(record).name] = record
        return header, reference, rows

    def start(self, header: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(dict(kind="header", **header)) + "\n")

    def append(self, kind: str, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(kind=kind, **record)) + "\n")


def resume_problem(spec: SweepSpec, folder: Path) -> str | None:
    """Why ``folder``'s run cannot be resumed with ``spec`` (the settings that differ), or None."""
    header = RunLog(folder).read()[0]
    if header is None:
        return None
    logged, now = header["identity"], spec.identity()
    differ = [f"{key} {_short(logged.get(key))} (now {_short(now[key])})" for key in now if logged.get(key) != now[key]]
    if differ:
        more = f"; and {len(differ) - 2} more" if len(differ) > 2 else ""
        return (f"{folder / LOG_FILE} was measured with {'; '.join(differ[:2])}{more}: pass the same options, or drop "
                f"--resume")
    return None


def logged_grid(folder: Path) -> dict | None:
    """The grid a logged run measured (``--resume`` without a grid re-uses it), or None."""
    header = RunLog(folder).read()[0]
    return header and header.get("grid")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@contextmanager
def unet_flops(unet: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the FLOPs of every UNet evaluation (text encoder, scheduler and VAE left out) into ``counted[0]``.

    Attention runs through the math kernel while counting: FlopCounterMode counts fused attention only where it
    knows the kernel (CUDA's, not CPU's), and the math kernel's matmuls are the same FLOPs on every device.
    """
    counted, active = [0], []

    def enter(module, args, kwargs):
        mode = FlopCounterMode(display=False)
        mode.__enter__()
        active.append(mode)

    def leave(module, args, kwargs, output):
        mode = active.pop()
        mode.__exit__(None, None, None)
        counted[0] += mode.get_total_flops()

    hooks = [unet.register_forward_pre_hook(enter, with_kwargs=True),
             unet.register_forward_hook(leave, with_kwargs=True)]
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield counted
    finally:
        for hook in hooks:
            hook.remove()
        while active:  # an evaluation that raised
            active.pop().__exit__(None, None, None)


class DriftObserver:
    """A ``callback_on_step_end`` that reads the handle's cached feature after every step in which a UNet evaluation
    ran the full path (``counters.full`` grew), and keeps its cosine similarity to the previous full step's feature.

    It only reads: the buffer is the one static feature buffer of the run's single shape, written in place by the
    full path. The cosines stay on the device until the call is over (no host sync inside the loop).
    """

    def __init__(self, handle: FastCacheHandle):
        self.handle, self.full, self.previous = handle, handle.counters.full, None
        self.cosines: list[tuple[int, torch.Tensor]] = []

    def __call__(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        if self.handle.counters.full != self.full:
            self.full = self.handle.counters.full
            (buffer,) = self.handle.buffers.values()
            feature = buffer.detach().flatten().double()  # a new tensor: the buffer is rewritten in place
            if self.previous is not None:
                self.cosines.append((step, torch.nn.functional.cosine_similarity(feature, self.previous, dim=0)))
            self.previous = feature
        return kwargs

    def values(self) -> list[tuple[int, float]]:
        return [(step, float(cosine)) for step, cosine in self.cosines]


class Sweep:
    """Runs one pipeline through the reference and the candidates. One image per call: (prompt, seed) pairs."""

    def __init__(self, spec: SweepSpec, pipe):
        from ..models import prompt_inputs

        self.spec, self.pipe = spec, pipe
        self.pairs = [(prompt, seed) for seed in spec.seeds for prompt in spec.prompts]
        self.inputs = {prompt: prompt_inputs(pipe, [prompt]) for prompt in spec.prompts}
        self.lpips = LPIPS(spec.device) if spec.lpips and lpips_unavailable() is None else None
        self.clip = ClipScore(spec.clip_model, spec.device) if spec.clip_model else None

    def call(self, index: int, callback: Callable | None = None) -> tuple[float, np.ndarray]:
        """Seconds (synchronised) and the image of pair ``index``."""
        prompt, seed = self.pairs[index]
        width, height = self.spec.size
        _sync()
        start = time.perf_counter()
        images = self.pipe(**self.inputs[prompt], num_inference_steps=self.spec.steps, width=width, height=height,
                           guidance_scale=self.spec.guidance, output_type="np", callback_on_step_end=callback,
                           generator=torch.Generator("cpu").manual_seed(seed)).images
        _sync()
        return time.perf_counter() - start, images[0]

    def _timed(self) -> list[float]:
        return [self.call(i)[0] for _ in range(self.spec.repeat) for i in range(len(self.pairs))]

    def _flops(self) -> float:
        """UNet TFLOP of one image (pair 0), counted eagerly."""
        with unet_flops(self.pipe.unet) as counted:
            self.call(0)
        return counted[0] / 1e12

    def reference(self) -> tuple[dict, np.ndarray]:
        """The uncached pipeline: its images, seconds per image and UNet TFLOP per image."""
        first = self.call(0)[0]
        images = np.stack([self.call(i)[1] for i in range(len(self.pairs))])
        seconds = statistics.median(self._timed())
        clip = self.clip(images, [prompt for prompt, _ in self.pairs]) if self.clip else None
        return dict(seconds=seconds, first_call_s=first, unet_tflop=self._flops(), clip_score=clip), images

    def measure(self, candidate: Candidate, reference: dict, reference_images: np.ndarray) -> Measurement:
        from ..handle import compile_pipeline

        spec = self.spec
        handle = compile_pipeline(self.pipe, candidate.interval, candidate.branch, schedule=candidate.schedule,
                                  compile=spec.compile, mode=spec.mode)
        try:
            first = self.call(0)[0]  # compiles and captures
            images, drifts = [], []
            for i in range(len(self.pairs)):
                observer = DriftObserver(handle)
                images.append(self.call(i, observer)[1])
                drifts.append(observer.values())
            seconds = statistics.median(self._timed())
            counters = handle.counters
        finally:
            handle.disable()
            _release(spec.compile)
        eager = compile_pipeline(self.pipe, candidate.interval, candidate.branch, schedule=candidate.schedule,
                                 compile=False)
        try:
            tflop = self._flops()
        finally:
            eager.disable()
        images = np.stack(images)
        psnrs, calls = psnr(images, reference_images), 1 + len(self.pairs) * (1 + spec.repeat)
        clip = self.clip(images, [prompt for prompt, _ in self.pairs]) if self.clip else None
        return Measurement(
            candidate.interval, candidate.branch, candidate.schedule, seconds=seconds,
            speedup=reference["seconds"] / seconds, first_call_s=first, unet_tflop=tflop,
            flop_ratio=tflop / reference["unet_tflop"], psnr_db=statistics.fmean(psnrs), psnr_min_db=min(psnrs),
            ssim=statistics.fmean(ssim(images, reference_images)),
            lpips=self.lpips(images, reference_images) if self.lpips else None, clip_score=clip,
            drift=_mean_by_step(drifts), full_per_image=counters.full / calls,
            shallow_per_image=counters.shallow / calls, fallbacks=counters.fallbacks)


def run(spec: SweepSpec, candidates: Sequence[Candidate], folder: Path, *, grid: dict, resume: bool = False,
        budget: Budget | None = None, open_model: Callable | None = None, progress: bool = True,
        on_report: Callable[[Report], None] | None = None) -> Report:
    """Measure what ``folder``'s log lacks (everything, without ``resume``) and report. ``open_model()`` gives
    ``(pipe, label)`` and is called only if something is left to measure; ``on_report`` gets the report so far after
    each candidate (a run cut short keeps a current table)."""
    from tqdm import tqdm

    folder, log = Path(folder), RunLog(folder)
    header, reference, rows = log.read() if resume else (None, None, {})
    label = spec.model or f"{spec.preset} (built from config with RANDOM WEIGHTS)"
    if header is None:
        header = dict(note=spec.note, label=label, identity=spec.identity(), grid=grid,
                      environment=environment(spec.device))
        log.start(header)
    logger.info("%s", spec.note)
    todo = [c for c in candidates if c.name not in rows]
    images_path = folder / REFERENCE_FILE
    reference_images = _load_images(images_path, len(spec.prompts) * len(spec.seeds)) if reference else None
    notes = [] if spec.clip_model else ["CLIP score skipped: no --clip-model (a local CLIP folder)"]
    if spec.lpips and (why := lpips_unavailable()):
        notes.append(why)

    def report() -> Report:
        measured = [Measurement.from_dict(rows[c.name]) for c in candidates if c.name in rows]
        missing = [] if len(measured) == len(candidates) else [
            f"measured {len(measured)} of {len(candidates)} candidates (--resume measures the rest)"]
        return Report(header["note"], header["label"], header["identity"], header["environment"], reference,
                      measured, budget or Budget(), notes + missing)

    if todo or reference_images is None:
        pipe, label = open_model()
        sweep = Sweep(spec, pipe)
        if reference_images is None:
            logger.info("reference: %d images uncached", len(sweep.pairs))
            reference, reference_images = sweep.reference()
            np.savez(images_path, images=reference_images)
            log.append("reference", reference)
        bar = tqdm(total=len(candidates), initial=len(candidates) - len(todo), desc="tune", unit="candidate",
                   disable=not progress)
        for candidate in todo:
            bar.set_postfix_str(candidate.name)
            try:
                row = sweep.measure(candidate, reference, reference_images)
            except Exception as error:  # one candidate failing (out of memory, say) leaves the others measured
                logger.exception("%s failed; going on with the next candidate", candidate.name)
                notes.append(f"{candidate.name} failed: {type(error).__name__}: {error}".replace("\n", " "))
            else:
                rows[candidate.name] = asdict(row)
                log.append("candidate", rows[candidate.name])
                logger.info("%s: %.2fx, PSNR %.2f dB, SSIM %.3f", row.name, row.speedup, row.psnr_db, row.ssim)
                if on_report:
                    on_report(report())
            bar.update()
        bar.close()
    return report()


def _mean_by_step(drifts: list[list[tuple[int, float]]]) -> list[list[float]]:
    """Each full step's cosine, averaged over the images."""
    by_step: dict[int, list[float]] = {}
    for drift in drifts:
        for step, cosine in drift:
            by_step.setdefault(step, []).append(cosine)
    return [[step, statistics.fmean(values)] for step, values in sorted(by_step.items())]


def _load_images(path: Path, count: int) -> np.ndarray | None:
    """The reference images a resumed run measures against, if they were saved whole."""
    try:
        with np.load(path) as data:
            images = data["images"]
    except (OSError, KeyError, ValueError):
        return None
    return images if len(images) == count else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release(compiled: bool) -> None:
    """Drop a candidate's compiled graphs (dynamo's caches, cudagraph trees) before the next compiles; inductor's
    on-disk cache stays, so a later candidate with the same branch reuses its kernels."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
