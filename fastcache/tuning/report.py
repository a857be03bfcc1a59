"""The results of ``fastcache tune``: the Pareto front of speed-up against PSNR, the pick for a quality budget, the
table, the chart, and the tune file that ``fastcache serve --tuned`` (and later, per-request cache levels) reads.

``sweep.py`` measures; this module only decides and reports, so the front and the pick can be checked on a
hand-made table.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..extras import missing

logger = logging.getLogger(__name__)

TUNE_FILE = "tune.json"


def model_name(model: str | None, preset: str) -> str:
    """How a tune file names its model: a local folder's absolute path, a hub id, or the preset."""
    if model and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model or preset


def random_weights_note(label: str) -> str:
    """The first line of every output measured on a random-weight model."""
    return (f"RANDOM WEIGHTS ({label.split(' ')[0]}): these fidelity numbers say nothing about real models; they only "
            f"show that the tool runs")


@dataclass(frozen=True)
class Candidate:
    """One setting to measure. At interval 1 nothing is cached, so branch and schedule do not matter."""

    interval: int
    branch: int
    schedule: str = "uniform"

    @property
    def name(self) -> str:
        return f"I{self.interval}B{self.branch}" + ("" if self.schedule == "uniform" else f" {self.schedule}")

    @staticmethod
    def grid(intervals: Sequence[int], branches: Sequence[int], schedules: Sequence[str]) -> list[Candidate]:
        """Every interval x branch x schedule, interval 1 once (the cheapest branch, uniform)."""
        grid = [Candidate(i, b, s) for s in schedules for i in intervals if i > 1 for b in branches]
        return ([Candidate(1, min(branches))] if 1 in intervals else []) + grid


@dataclass
class Measurement:
    """One candidate as measured against the uncached reference (same prompts, seeds, size, steps)."""

    interval: int
    branch: int
    schedule: str
    seconds: float  # median per image over the timed calls, compilation excluded
    speedup: float  # the reference's seconds over ``seconds``
    first_call_s: float  # the first call: compilation and CUDA-graph capture included
    unet_tflop: float  # UNet TFLOP per image, counted on an eager run (device-independent)
    flop_ratio: float  # ``unet_tflop`` over the reference's
    psnr_db: float  # mean over images of each image's PSNR against its reference image (inf: identical)
    psnr_min_db: float  # the worst image
    ssim: float  # mean over images
    lpips: float | None = None  # mean; None unless asked for and its weights are here
    clip_score: float | None = None  # mean CLIP score against the prompts; None without --clip-model
    drift: list = field(default_factory=list)  # [[step, cosine of the cached feature to the previous full step's]]
    full_per_image: float = 0.0  # UNet evaluations per image on the full path ...
    shallow_per_image: float = 0.0  # ... and on the shallow path
    fallbacks: int = 0  # evaluations that ran the original forward (a speed bug if not 0)

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.interval, self.branch, self.schedule)

    @property
    def name(self) -> str:
        return self.candidate.name

    @classmethod
    def from_dict(cls, row: dict) -> Measurement:
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    def min_drift(self) -> tuple[int, float] | None:
        """The full step whose feature moved most since the previous one, and that cosine."""
        return min(((int(step), cos) for step, cos in self.drift), key=lambda item: item[1], default=None)


@dataclass(frozen=True)
class Budget:
    """The quality a pick must keep: minimum mean PSNR (dB), SSIM and CLIP score. None: no limit."""

    min_psnr: float | None = None
    min_ssim: float | None = None
    min_clip: float | None = None

    def __post_init__(self):
        for name, low, high in (("min_psnr", -math.inf, math.inf), ("min_ssim", -1, 1), ("min_clip", 0, 100)):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and low <= value <= high):
                bounds = f" from {low:g} to {high:g}" if math.isfinite(low) else ""
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number{bounds}; got {value}")

    def __bool__(self) -> bool:
        return bool(self.limits())

    def limits(self) -> dict[str, float]:
        """Measurement field -> the least value it may have."""
        pairs = (("psnr_db", self.min_psnr), ("ssim", self.min_ssim), ("clip_score", self.min_clip))
        return {name: value for name, value in pairs if value is not None}

    def meets(self, row: Measurement) -> bool:
        return all(getattr(row, name) is not None and getattr(row, name) >= low for name, low in self.limits().items())

    def shortfall(self, row: Measurement) -> float:
        """How far ``row`` is from the budget: the largest relative shortfall over the limits (0 when it meets it)."""
        gaps = [math.inf if getattr(row, name) is None else max(0.0, low - getattr(row, name)) / max(abs(low), 1e-9)
                for name, low in self.limits().items()]
        return max(gaps, default=0.0)

    def describe(self) -> str:
        units = {"psnr_db": ("--min-psnr", " dB"), "ssim": ("--min-ssim", ""), "clip_score": ("--min-clip", "")}
        return ", ".join(f"{units[name][0]} {low:g}{units[name][1]}" for name, low in self.limits().items())


def dominates(a: Measurement, b: Measurement) -> bool:
    """``a`` is at least as fast and as close as ``b``, and better in one of the two."""
    return (a.speedup >= b.speedup and a.psnr_db >= b.psnr_db) and (a.speedup > b.speedup or a.psnr_db > b.psnr_db)


def pareto_front(rows: Sequence[Measurement]) -> list[Measurement]:
    """The candidates no other candidate dominates in (speed-up, PSNR), fastest first."""
    front = [row for row in rows if not any(dominates(other, row) for other in rows)]
    return sorted(front, key=lambda row: (-row.speedup, -row.psnr_db))


def pick(rows: Sequence[Measurement], budget: Budget) -> Measurement | None:
    """The fastest candidate that meets ``budget`` (the closer one on a tie); None without a budget or a match."""
    meeting = [row for row in rows if budget and budget.meets(row)]
    return max(meeting, key=lambda row: (row.speedup, row.psnr_db), default=None)


def closest(rows: Sequence[Measurement], budget: Budget) -> Measurement | None:
    """The candidate nearest to meeting ``budget`` (smallest relative shortfall; the faster on a tie)."""
    return min(rows, key=lambda row: (budget.shortfall(row), -row.speedup), default=None)


@dataclass
class Report:
    """Everything a tune run found: written as the tune file, the markdown table and the chart."""

    note: str  # the first line of every output: the model, or that its weights are random
    label: str
    identity: dict  # what the measurements depend on (model, size, steps, scheduler, prompts, seeds, ...)
    environment: dict
    reference: dict  # the uncached run: seconds, first_call_s, unet_tflop, clip_score
    rows: list[Measurement]
    budget: Budget = field(default_factory=Budget)
    notes: list[str] = field(default_factory=list)  # metrics skipped, and why

    @property
    def front(self) -> list[Measurement]:
        return pareto_front(self.rows)

    @property
    def pick(self) -> Measurement | None:
        return pick(self.rows, self.budget)

    def verdict(self) -> str:
        """One line: the pick, or the front when no budget was given, or the closest candidate."""
        chosen = self.pick
        if chosen is not None:
            return f"pick: {chosen.name} ({_summary(chosen)}), the fastest with {self.budget.describe()}"
        if not self.budget:
            return (f"no budget given (--min-psnr, --min-ssim, --min-clip): the Pareto front is "
                    f"{', '.join(row.name for row in self.front) or 'empty'}")
        near = closest(self.rows, self.budget)
        return (f"no candidate meets {self.budget.describe()}; the closest is "
                f"{near.name} ({_summary(near)})" if near else f"no candidate measured for {self.budget.describe()}")

    def to_dict(self) -> dict:
        chosen = self.pick
        return dict(note=self.note, label=self.label, identity=self.identity, environment=self.environment,
                    reference=self.reference, candidates=[asdict(row) for row in self.rows],
                    front=[row.name for row in self.front], budget=asdict(self.budget),
                    pick=asdict(chosen) if chosen else None, verdict=self.verdict(), notes=self.notes)

    def write(self, folder: Path) -> Path:
        """``tune.json`` in ``folder``; its first line carries the note (a random-weight model says so there)."""
        text = json.dumps(self.to_dict(), indent=2)
        path = Path(folder) / TUNE_FILE
        path.write_text("{" + text[1:].lstrip() + "\n")
        return path

    def markdown(self) -> str:
        """The table: the reference, then every candidate, fastest first; front and pick marked."""
        ident, env, ref = self.identity, self.environment, self.reference
        rows = sorted(self.rows, key=lambda row: -row.speedup)
        front, chosen = {row.name for row in self.front}, self.pick
        extra = [name for name in ("lpips", "clip_score") if any(getattr(row, name) is not None for row in rows)]
        header = ["candidate", "speed-up", "s/image", "first call s", "UNet TFLOP/image (ratio)", "PSNR dB (worst)",
                  "SSIM", *({"lpips": "LPIPS", "clip_score": "CLIP"}[name] for name in extra),
                  "drift: min cos (step)", "full/shallow per image", ""]
        table = [header, ["---"] * len(header),
                 ["uncached (reference)", "1.00x", f"{ref['seconds']:.3f}", f"{ref['first_call_s']:.2f}",
                  f"{ref['unet_tflop']:.4g}", "inf", "1.000",
                  *(_fmt(ref.get(name), ".3f") for name in extra), "—", f"{ident['steps']}/0", ""]]
        for row in rows:
            drift = row.min_drift()
            marks = [mark for mark, on in (("**pick**", row is chosen), ("front", row.name in front),
                                           (f"{row.fallbacks} fallbacks", row.fallbacks)) if on]
            table.append([row.name, f"{row.speedup:.2f}x", f"{row.seconds:.3f}", f"{row.first_call_s:.2f}",
                          f"{row.unet_tflop:.4g} ({row.flop_ratio:.2f})",
                          f"{_fmt(row.psnr_db, '.2f')} ({_fmt(row.psnr_min_db, '.2f')})", f"{row.ssim:.3f}",
                          *(_fmt(getattr(row, name), ".3f") for name in extra),
                          "—" if drift is None else f"{drift[1]:.4f} ({drift[0]})",
                          f"{row.full_per_image:g}/{row.shallow_per_image:g}", " ".join(marks)])
        width, height = ident["size"]
        return "\n".join([
            self.note,
            f"{self.label} | {env.get('card', '?')} | torch {env.get('torch', '?')} | {width}x{height}, "
            f"{ident['steps']} steps, scheduler {ident['scheduler']}, guidance {ident['guidance']:g} | "
            f"{len(ident['prompts'])} prompts x {len(ident['seeds'])} seeds | compile: {ident['compile']}", "",
            *("| " + " | ".join(cells) + " |" for cells in table), "",
            *(f"- {note}" for note in self.notes), f"- {self.verdict()}"])

    def chart(self, path: Path) -> str | None:
        """Speed-up against PSNR with the Pareto front and each point labelled (I, B), beside the drift of the cached
        feature at each full step. Returns why no chart was written (matplotlib missing), or None."""
        if why := missing("tune", ("matplotlib",)):
            return f"no chart: {why}"
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        finite = [row.psnr_db for row in self.rows if math.isfinite(row.psnr_db)]
        top = max(finite, default=30.0) + 5  # where identical images (inf) are drawn

        def y(row):
            return row.psnr_db if math.isfinite(row.psnr_db) else top

        fig, (speed, drift) = plt.subplots(1, 2, figsize=(12, 4.8))
        front = self.front
        speed.scatter([row.speedup for row in self.rows], [y(row) for row in self.rows], color="tab:blue",
                      label="candidate")
        speed.plot([row.speedup for row in front], [y(row) for row in front], "o-", color="tab:red",
                   label="Pareto front")
        if self.pick is not None:
            speed.scatter([self.pick.speedup], [y(self.pick)], s=200, facecolors="none", edgecolors="black",
                          label=f"pick ({self.budget.describe()})")
        for row in self.rows:
            text = row.name + ("" if math.isfinite(row.psnr_db) else " (identical)")
            speed.annotate(text, (row.speedup, y(row)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        speed.set_xlabel("speed-up vs uncached")
        speed.set_ylabel("PSNR vs uncached, dB (mean over images)")
        speed.legend(fontsize=8)
        for row in self.rows:
            if row.drift:
                drift.plot([step for step, _ in row.drift], [cos for _, cos in row.drift], marker=".", label=row.name)
        drift.set_xlabel("full step")
        drift.set_ylabel("cosine of the cached feature to the previous full step's")
        if len(self.rows) <= 12:
            drift.legend(fontsize=7)
        fig.suptitle(f"{self.note}\n{self.label.split(' (')[0]}, {self.identity['size'][0]}x{self.identity['size'][1]}"
                     f", {self.identity['steps']} steps, {self.environment.get('card', '?')}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return None


def _fmt(value, spec: str) -> str:
    if value is None:
        return "—"
    return "inf" if value == math.inf else format(value, spec)


def _summary(row: Measurement) -> str:
    clip = f", CLIP {row.clip_score:.2f}" if row.clip_score is not None else ""
    return f"{row.speedup:.2f}x, PSNR {_fmt(row.psnr_db, '.2f')} dB, SSIM {row.ssim:.3f}{clip}"


# -- the tune file, for fastcache serve --tuned and per-request cache levels -------------------------------------

@dataclass(frozen=True)
class TunedPick:
    """What ``serve --tuned`` applies: the pick's settings, and the labels measured for each interval level."""

    interval: int
    branch: int
    schedule: str
    size: tuple[int, int]  # the width and height it was tuned at
    levels: dict[int, dict]
    note: str


def load(path: str | os.PathLike) -> dict:
    """A tune file's contents; ``ValueError`` with one line when it cannot be read or is not a tune file."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    if not isinstance(data, dict) or not {"identity", "candidates", "pick"} <= data.keys():
        raise ValueError(f"{path}: not a fastcache tune file ({TUNE_FILE}, written by fastcache tune)")
    return data


def levels(path: str | os.PathLike, branch: int | None = None, schedule: str | None = None) -> dict[int, dict]:
    """``{interval: labels}`` measured at one branch and schedule (default: the pick's): speed-up, PSNR, SSIM and
    seconds per image, for every interval the tune measured there (interval 1, if measured, at any branch)."""
    data = load(path)
    if branch is None or schedule is None:
        if data["pick"] is None:
            raise ValueError(f"{path}: the tune has no pick ({data.get('verdict', 'no budget given')}); name the "
                             f"branch and schedule, or re-pick with fastcache tune --resume --min-psnr ...")
        branch = data["pick"]["branch"] if branch is None else branch
        schedule = data["pick"]["schedule"] if schedule is None else schedule
    found = {}
    for row in data["candidates"]:
        if row["interval"] == 1 or (row["branch"], row["schedule"]) == (branch, schedule):
            found[row["interval"]] = {name: row.get(name) for name in ("speedup", "psnr_db", "ssim", "seconds")}
    return dict(sorted(found.items()))


def tuned_pick(path: str | os.PathLike, *, model: str | None, preset: str, size: tuple[int, int] | None,
               steps: int) -> TunedPick:
    """The pick of a tune file made for this model, size and steps; ``ValueError`` (one line) for any other."""
    data = load(path)
    ident = data["identity"]
    made_for, serving = ident["model"], model_name(model, preset)
    if made_for != serving:
        raise ValueError(f"{path} was tuned for {made_for}, not {serving}")
    if size is not None and tuple(ident["size"]) != tuple(size):
        raise ValueError(f"{path} was tuned at {ident['size'][0]}x{ident['size'][1]}, not {size[0]}x{size[1]}")
    if ident["steps"] != steps:
        raise ValueError(f"{path} was tuned for {ident['steps']} steps, not {steps} (pass --steps {ident['steps']})")
    if ident.get("scheduler", "default") != "default":
        raise ValueError(f"{path} was tuned with --scheduler {ident['scheduler']}; fastcache serve runs the model's "
                         f"own scheduler (tune with --scheduler default)")
    chosen = data["pick"]
    if chosen is None:
        raise ValueError(f"{path} has no pick ({data.get('verdict', 'no budget given')}); re-pick without measuring "
                         f"again: fastcache tune --resume --out FOLDER --min-psnr DB")
    return TunedPick(chosen["interval"], chosen["branch"], chosen["schedule"], tuple(ident["size"]), levels(path),
                     data["note"])
