"""Which denoising steps of a call run the full UNet; the rest reuse the cached feature."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCHEDULE_KINDS = ("uniform", "quad-center")


def as_int(value, name: str, minimum: int = 0) -> int:
    """``value`` as a plain ``int`` (numpy integers accepted, bools and floats not); errors name what is valid."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}; got {value!r} ({type(value).__name__}).")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}.")
    return value


@dataclass(frozen=True)
class Schedule:
    """A rule for the full steps of one pipeline call.

    - ``"uniform"``: step ``i`` is full when ``i % interval == 0`` (the helper's ``skip_mode='uniform'``).
    - ``"quad-center"``: DeepCache's non-uniform schedule as its pipelines compute it: ``ceil(steps / interval)``
      full steps packed around step ``center`` with exponent ``pow`` (every step when ``interval`` is 1).
    - ``"explicit"``: the given ``steps``; it must contain 0 (the first step fills the cache).
    """

    kind: str = "uniform"
    interval: int = 3
    center: int = 15
    pow: float = 1.4
    steps: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "interval", as_int(self.interval, "interval", 1))
        if self.kind not in (*SCHEDULE_KINDS, "explicit"):
            raise ValueError(f"schedule must be one of {SCHEDULE_KINDS} or a list of step indices; got {self.kind!r}.")
        if self.kind == "quad-center":
            object.__setattr__(self, "center", as_int(self.center, "center", 0))
            if isinstance(self.pow, bool) or not isinstance(self.pow, numbers.Real) or not self.pow > 1:
                raise ValueError(f"quad-center needs a real pow > 1; got pow={self.pow!r}.")
        if self.kind == "explicit":
            steps = tuple(as_int(s, "every explicit schedule entry") for s in self.steps)
            if 0 not in steps:
                raise ValueError(f"an explicit schedule must contain step 0, which fills the cache; got {steps!r}.")
            object.__setattr__(self, "steps", steps)

    def full_steps(self, num_steps: int) -> frozenset[int]:
        """The full-step indices among ``range(num_steps)``; ``ValueError`` naming valid intervals if none exists."""
        steps = self._full_steps(num_steps, self.interval)
        if steps is None:
            valid = [i for i in range(1, num_steps + 1) if self._full_steps(num_steps, i) is not None]
            raise ValueError(f"quad-center has no schedule for {num_steps} steps at interval {self.interval} "
                             f"(center {self.center}, pow {self.pow}); valid intervals for {num_steps} steps: {valid}.")
        return frozenset(steps)

    def _full_steps(self, num_steps: int, interval: int) -> Sequence[int] | None:
        if self.kind == "uniform":
            return range(0, num_steps, interval)
        if self.kind == "explicit":
            return [s for s in self.steps if s < num_steps]
        if interval == 1:
            return range(num_steps)
        return quad_center_steps(num_steps, math.ceil(num_steps / interval), self.center, self.pow)


def make_schedule(schedule: str | Sequence[int], interval: int, center: int = 15, pow: float = 1.4) -> Schedule:
    """Build a ``Schedule`` from ``compile_pipeline``'s ``schedule`` argument (a kind name or a step list)."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULE_KINDS:
            raise ValueError(f"schedule must be one of {SCHEDULE_KINDS} or a list of step indices; got {schedule!r}.")
        return Schedule(schedule, interval, center, pow)
    if not isinstance(schedule, (Sequence, np.ndarray)) or len(schedule) == 0:
        raise TypeError(f"schedule must be one of {SCHEDULE_KINDS} or a non-empty list of step indices containing 0; "
                        f"got {schedule!r}.")
    return Schedule("explicit", interval, center, pow, tuple(schedule))


def quad_center_steps(num_steps: int, n_full: int, center: int, pow: float) -> list[int] | None:
    """DeepCache's ``sample_from_quad_center``: ``n_full`` steps evenly spaced in ``x ** (1 / pow)`` around ``center``.

    Computed exactly as the reference does, Python's and numpy's arithmetic included: ``(-center) ** (1 / pow)`` is
    a complex root, the spacing runs along that complex segment and the real part is truncated. So 50 steps, 10 full,
    center 15, pow 1.4 gives the published ``[0, 5, 9, 13, 17, 21, 26, 31, 37, 43]``. ``pow`` is lowered by 0.02
    until exactly ``n_full`` steps come out; ``None`` where the reference raises (no such ``pow`` above 1).
    """
    while pow > 1:
        x = np.linspace((-center) ** (1 / pow), (num_steps - center) ** (1 / pow), n_full + 1) ** pow
        truncated = (x.real if np.iscomplexobj(x) else x).astype(np.int32)
        steps = [0] + [int(o) + center for o in np.unique(truncated)[1:-1]]
        if len(steps) == n_full:
            return steps
        pow -= 0.02
    return None


def step_count(num_timesteps: int, order: int) -> int:
    """Denoising steps in a call of ``num_timesteps`` UNet evaluations with a scheduler of ``order``."""
    return math.ceil(num_timesteps / order)
