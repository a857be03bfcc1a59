"""Which denoising steps of a call run the full UNet; the rest reuse the cached feature."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCHEDULE_KINDS = ("uniform", "quad-center", "explicit")


@dataclass(frozen=True)
class Schedule:
    """A rule for the full steps of one pipeline call.

    - ``"uniform"``: step ``i`` is full when ``i % interval == 0`` (the helper's ``skip_mode='uniform'``).
    - ``"quad-center"``: the paper's non-uniform schedule, ``num_steps // interval`` full steps packed
      around step ``center`` with exponent ``pow``.
    - ``"explicit"``: the given ``steps``; it must contain 0 (the first step fills the cache).
    """

    kind: str = "uniform"
    interval: int = 3
    center: int = 15
    pow: float = 1.4
    steps: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule must be one of {SCHEDULE_KINDS} or a list of step indices; got {self.kind!r}.")
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise ValueError(f"interval must be an int >= 1; got {self.interval!r}.")
        if self.kind == "quad-center" and not (self.pow > 1 and self.center >= 0):
            raise ValueError(f"quad-center needs pow > 1 and center >= 0; got pow={self.pow}, center={self.center}.")
        if self.kind == "explicit":
            steps = self.steps
            if not steps or any(not isinstance(s, int) or s < 0 for s in steps):
                raise ValueError(f"an explicit schedule must be a non-empty list of step indices >= 0; got {steps!r}.")
            if 0 not in steps:
                raise ValueError(f"an explicit schedule must contain step 0, which fills the cache; got {steps!r}.")

    def full_steps(self, num_steps: int) -> frozenset[int]:
        """The full-step indices among ``range(num_steps)``."""
        if self.kind == "uniform":
            return frozenset(range(0, num_steps, self.interval))
        if self.kind == "explicit":
            return frozenset(s for s in self.steps if s < num_steps)
        return frozenset(quad_center_steps(num_steps, max(1, num_steps // self.interval), self.center, self.pow))


def make_schedule(schedule: str | Sequence[int], interval: int, center: int = 15, pow: float = 1.4) -> Schedule:
    """Build a ``Schedule`` from ``compile_pipeline``'s ``schedule`` argument (a kind name or a step list)."""
    if isinstance(schedule, str):
        return Schedule(schedule, interval, center, pow)
    return Schedule("explicit", interval, center, pow, tuple(schedule))


def quad_center_steps(num_steps: int, n_full: int, center: int, pow: float) -> list[int]:
    """DeepCache's ``sample_from_quad_center``: ``n_full`` steps evenly spaced in ``x ** (1 / pow)`` around ``center``.

    The reference evaluates ``(-center) ** (1 / pow)`` with Python numbers, which is a complex root; the
    spacing is along that complex segment and the real part is kept. We do the same on purpose, so that
    50 steps, 10 full, center 15, pow 1.4 gives the published ``[0, 5, 9, 13, 17, 21, 26, 31, 37, 43]``.
    ``pow`` is lowered by 0.02 until exactly ``n_full`` distinct steps come out.
    """
    while pow > 1:
        start = complex(-center) ** (1 / pow)
        stop = complex(num_steps - center) ** (1 / pow)
        x = np.linspace(start, stop, n_full + 1) ** pow
        offsets = np.unique(np.trunc(x.real).astype(np.int64))[1:-1]
        steps = [0] + [int(o) + center for o in offsets]
        if len(steps) == n_full:
            return steps
        pow -= 0.02
    raise ValueError(
        f"no quad-center schedule with {n_full} full steps in {num_steps} (center {center}); "
        "lower the interval or the center."
    )


def step_count(num_timesteps: int, order: int) -> int:
    """Denoising steps in a call of ``num_timesteps`` UNet evaluations with a scheduler of ``order``."""
    return math.ceil(num_timesteps / order)
