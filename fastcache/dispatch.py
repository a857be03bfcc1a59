"""Per-call state that decides, for each UNet evaluation, whether it is a full or a shallow step."""

from __future__ import annotations

from typing import Any

from .schedule import Schedule, step_count


class StepDispatcher:
    """Follows the scheduler's progress through one pipeline call, with no host sync.

    A pipeline call starts when the scheduler holds a new ``timesteps`` tensor (``set_timesteps`` makes one on
    every call), so that is where all state resets: no feature survives into the next call. The step index is
    the number of UNet evaluations so far divided by ``scheduler.order``, so both evaluations of a Heun step
    share one decision, and repeated timesteps (PNDM) need no lookup of the timestep value.
    """

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.reset()

    def reset(self) -> None:
        """Forget the current call: the next evaluation is step 0 of a new one."""
        self._timesteps = None  # the scheduler tensor that identifies the current call
        self._evaluations = 0
        self._order = 1
        self._full_steps: frozenset[int] = frozenset()
        self._filled: set[Any] = set()  # cache keys written by a full step in this call

    @property
    def evaluations(self) -> int:
        """UNet evaluations so far in the current pipeline call."""
        return self._evaluations

    @property
    def step(self) -> int:
        """Index of the denoising step the next evaluation belongs to."""
        return self._evaluations // self._order

    def next_is_full(self, scheduler: Any, cache_key: Any) -> bool:
        """Decide the next evaluation; a key with no feature yet in this call always gets a full step.

        ``scheduler`` is read on every call so that swapping ``pipe.scheduler`` just works.
        """
        timesteps = scheduler.timesteps
        if timesteps is not self._timesteps:
            self.reset()
            self._timesteps = timesteps
            self._order = scheduler.order
            begin = getattr(scheduler, "begin_index", None) or 0
            self._full_steps = self.schedule.full_steps(step_count(len(timesteps) - begin, self._order))
        full = self.step in self._full_steps or cache_key not in self._filled
        self._evaluations += 1
        if full:
            self._filled.add(cache_key)
        return full
