"""Which denoising loop, and which step of it, a UNet evaluation belongs to, read from the timestep it is called with.

Pipelines and hand-written loops iterate over ``scheduler.timesteps``, and each timestep they hand the UNet is a view
of that tensor: its ``_base`` is the tensor ``set_timesteps`` made for this call, its storage offset is its index in
it. Both are tensor metadata, so reading them costs no host sync, and they tell the loop and the step whichever
pipeline, scheduler or thread drives the shared UNet (``from_pipe`` pipelines, img2img starting mid-schedule, Heun's
and PNDM's repeated timesteps, hand loops).

A loop is one thread's walk over one timesteps tensor, one index after the other. An evaluation continues its loop
only at the very next index; any other index of an unfinished loop (a second evaluation at one timestep, as
MultiDiffusion's views or a separate unconditional pass do, a jump back or ahead) breaks the loop: from then on its
evaluations cannot be told apart and take the full path. A timestep that is not such a view (a number, a tensor built
by hand) places its evaluation in no loop: it takes the full path too. Slower, never wrong.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .schedule import Schedule, step_count

# Loops a thread may have left unfinished and still resume exactly where it left them (generator-style hand loops).
RETIRED_PER_THREAD = 8
# How far up the stack to look for the scheduler that owns a new loop's timesteps.
MAX_FRAMES = 16


@dataclass(eq=False)
class Loop:
    """One thread's walk over one timesteps tensor."""

    timesteps: torch.Tensor  # kept alive: its identity names the loop
    thread: int
    start: int  # index of the loop's first evaluation (img2img starts mid-schedule)
    next: int  # the index that continues the loop
    order: int  # UNet evaluations per denoising step (2 for Heun)
    full_steps: frozenset[int]
    end: int  # len(timesteps)
    broken: bool = False  # an evaluation repeated or skipped an index: steps are unknown from then on
    saved: dict = field(default_factory=dict)  # shape key -> this loop's feature, kept while another loop ran

    @property
    def finished(self) -> bool:
        return self.next >= self.end


@dataclass(frozen=True)
class Placement:
    """Where an evaluation belongs: its loop (``None``: no loop) and step (``None``: unknown, so full)."""

    loop: Loop | None
    step: int | None
    new_loop: bool = False


def locate(timestep) -> tuple[torch.Tensor, int] | None:
    """``(timesteps, index)`` when ``timestep`` is one element of a 1-D tensor (a view of it, or a broadcast of one
    element, as ``t.expand(batch)``); ``None`` otherwise."""
    if not isinstance(timestep, torch.Tensor):
        return None
    base = timestep._base
    if base is None or base.dim() != 1 or base.dtype != timestep.dtype or any(timestep.stride()):
        return None
    index, stride = timestep.storage_offset() - base.storage_offset(), base.stride(0)
    if stride < 1 or index % stride or not 0 <= index // stride < base.shape[0]:
        return None
    return base, index // stride


def scheduler_order(timesteps: torch.Tensor, schedulers=()) -> int:
    """``order`` of the scheduler that owns ``timesteps`` (Heun-like schedulers evaluate twice per step).

    Looked for among ``schedulers``, then in the callers' frames: a pipeline's ``self.scheduler`` or a hand loop's
    scheduler variable. Runs once per loop. Not found: 1 (each evaluation its own step; still never another loop's).
    """
    candidates = list(schedulers)
    frame = sys._getframe(1)
    for _ in range(MAX_FRAMES):
        if frame is None:
            break
        for value in frame.f_locals.values():
            if isinstance(value, DiffusionPipeline):
                value = getattr(value, "scheduler", None)
            if isinstance(value, SchedulerMixin):
                candidates.append(value)
        frame = frame.f_back
    for scheduler in candidates:
        if getattr(scheduler, "timesteps", None) is timesteps:
            return int(getattr(scheduler, "order", 1))
    return 1


class LoopTracker:
    """Each thread's current loop, and the loops it left unfinished, so that every evaluation finds its own."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.reset()

    def reset(self) -> None:
        self._current: dict[int, Loop] = {}
        self._retired: dict[int, deque[Loop]] = {}

    def is_current(self, loop: Loop) -> bool:
        return self._current.get(loop.thread) is loop

    def place(self, timestep, schedulers=()) -> Placement:
        """Place one evaluation; raises ``ValueError`` (before anything changes) if a new loop has no schedule."""
        located = locate(timestep)
        if located is None:
            return Placement(None, None)
        timesteps, index = located
        thread = threading.get_ident()
        loop = self._find(thread, timesteps)
        if loop is not None and not loop.finished:
            self._make_current(loop)
            if loop.broken or index != loop.next:
                loop.broken = True
                loop.next = max(loop.next, index + 1)
                return Placement(loop, None)
            loop.next += 1
            return Placement(loop, (index - loop.start) // loop.order)
        # a new loop: the first evaluation over this tensor, or a restart after the last loop over it finished
        order = scheduler_order(timesteps, schedulers)
        full_steps = self.schedule.full_steps(step_count(len(timesteps) - index, order))
        new = Loop(timesteps, thread, index, index + 1, order, full_steps, len(timesteps))
        self._make_current(new, replacing=loop)
        self._forget_dead_threads()
        return Placement(new, 0, new_loop=True)

    def _find(self, thread: int, timesteps: torch.Tensor) -> Loop | None:
        current = self._current.get(thread)
        if current is not None and current.timesteps is timesteps:
            return current
        return next((loop for loop in self._retired.get(thread, ()) if loop.timesteps is timesteps), None)

    def _make_current(self, loop: Loop, replacing: Loop | None = None) -> None:
        """Make ``loop`` its thread's current loop; the one it displaces is retired, unless ``replacing`` it."""
        current = self._current.get(loop.thread)
        if current is loop:
            return
        retired = self._retired.setdefault(loop.thread, deque(maxlen=RETIRED_PER_THREAD))
        for gone in (loop, replacing):
            if gone in retired:
                retired.remove(gone)
        if current is not None and current is not replacing:
            current.saved.clear()  # a thread's own switches keep nothing: the loop it left may never come back
            retired.appendleft(current)
        self._current[loop.thread] = loop

    def _forget_dead_threads(self) -> None:
        alive = {thread.ident for thread in threading.enumerate()}
        for thread in [t for t in self._current if t not in alive]:
            del self._current[thread]
            self._retired.pop(thread, None)
