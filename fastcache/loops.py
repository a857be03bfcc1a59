"""Which denoising loop, and which step of it, a UNet evaluation belongs to, read from the timestep it is called with.

Pipelines and hand-written loops iterate over ``scheduler.timesteps``, and each timestep they hand the UNet is an
element of that tensor: it shares its storage (the tensor ``set_timesteps`` made for this call), and its storage
offset is its index. Both are tensor metadata, so reading them costs no host sync, and they name the loop and the
step whichever pipeline, scheduler or thread drives the shared UNet (``from_pipe`` pipelines, img2img starting
mid-schedule, Heun's and PNDM's repeated timesteps, hand loops), under ``no_grad`` or ``inference_mode``.

A loop is one thread's walk over one scheduler's timesteps from one calling function (a pipeline's ``__call__``, a
hand loop), one index after the other. An evaluation continues its loop only at the very next index; any other index
of an unfinished loop (a second evaluation at one timestep, as MultiDiffusion's views or a separate unconditional
pass make, a jump back or ahead) breaks the loop: its evaluations cannot be told apart any more and take the full
path. A timestep that no scheduler's timesteps hold (a number, a tensor built by hand) places its evaluation in no
loop: the full path too. Slower, never wrong.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from types import CodeType

import diffusers.hooks
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .schedule import Schedule, step_count

# Loops a thread may have left unfinished and still resume where it left them (generator-style hand loops).
RETIRED_PER_THREAD = 8
# How far up the stack to look for the scheduler that owns a new loop's timesteps.
MAX_FRAMES = 16
# Frames between the UNet call and its caller: fastcache, torch.nn's module call, diffusers' hook registry.
_INTERNAL = tuple(os.path.dirname(path) + os.sep
                  for path in (__file__, torch.nn.modules.__file__, diffusers.hooks.__file__))


@dataclass(eq=False)
class Loop:
    """One thread's walk over one scheduler's timesteps, from one calling function; indices are storage offsets."""

    storage: torch.UntypedStorage  # kept alive, so that no other tensor can take its address
    address: tuple  # (device, data_ptr) of the storage: names the timesteps
    thread: threading.Thread
    caller: CodeType | None  # the function that calls the UNet
    start: int  # index of the loop's first evaluation (img2img starts mid-schedule)
    next: int  # the index that continues the loop
    end: int  # one past the scheduler's last timestep
    order: int  # UNet evaluations per denoising step (2 for Heun)
    full_steps: frozenset[int]
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


def locate(timestep) -> tuple[torch.UntypedStorage, int] | None:
    """``(storage, index)`` when ``timestep`` is one element (0-d, or broadcast as ``t.expand(batch)``) of a tensor's
    storage; ``None`` for anything else. Works for inference tensors too, which keep no ``_base``."""
    if not isinstance(timestep, torch.Tensor) or any(timestep.stride()):
        return None
    return timestep.untyped_storage(), timestep.storage_offset()


def calling_code() -> CodeType | None:
    """The code of the function that called the UNet: the first frame outside fastcache, torch.nn and diffusers'
    hooks. A direct call from a pipeline's callback comes from another function than the pipeline's own loop."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
    return frame.f_code if frame is not None else None


def owning_scheduler(timestep: torch.Tensor, address: tuple, schedulers=()) -> tuple[int, int] | None:
    """``(order, end)`` of the scheduler whose ``timesteps`` hold ``timestep``, or ``None`` if none does.

    Looked for among ``schedulers``, then in the callers' frames: a pipeline's ``self.scheduler``, a hand loop's
    scheduler or pipeline variable. Runs once per loop. ``order`` is the number of UNet evaluations per step (2 for
    Heun); ``end`` the storage offset one past its last timestep.
    """
    index = timestep.storage_offset()
    for scheduler in itertools.chain(schedulers, _schedulers_in_frames(sys._getframe(1))):  # frames if need be
        timesteps = getattr(scheduler, "timesteps", None)
        if (isinstance(timesteps, torch.Tensor) and timesteps.dim() == 1 and timesteps.dtype == timestep.dtype
                and (timesteps.stride(0) == 1 or len(timesteps) == 1)
                and (timesteps.device, timesteps.untyped_storage().data_ptr()) == address
                and timesteps.storage_offset() <= index < timesteps.storage_offset() + len(timesteps)):
            return int(getattr(scheduler, "order", 1)), timesteps.storage_offset() + len(timesteps)
    return None


def _schedulers_in_frames(frame):
    for _ in range(MAX_FRAMES):
        if frame is None:
            return
        for value in list(frame.f_locals.values()):
            if isinstance(value, DiffusionPipeline):
                value = getattr(value, "scheduler", None)
            if isinstance(value, SchedulerMixin):
                yield value
        frame = frame.f_back


class LoopTracker:
    """Each thread's current loop, and the loops it left unfinished, so that every evaluation finds its own."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.reset()

    def reset(self) -> None:
        self._current: dict[int, Loop] = {}  # thread ident -> the loop it evaluated last
        self._retired: dict[int, deque[Loop]] = {}

    def is_running(self, loop: Loop) -> bool:
        """Whether ``loop`` may still read its feature: its thread's current loop, unfinished, thread alive."""
        current = self._current.get(loop.thread.ident) is loop
        return current and not (loop.finished or loop.broken) and loop.thread.is_alive()

    def peek(self, timestep) -> tuple[Loop | None, int | None]:
        """The loop and step an evaluation at ``timestep`` from this caller would continue, changing nothing;
        ``(None, None)`` unless it would continue a running loop at its next index."""
        located = locate(timestep)
        if located is None:
            return None, None
        storage, index = located
        loop = self._find(threading.get_ident(), (storage.device, storage.data_ptr()), calling_code())
        if loop is None or loop.finished or loop.broken or index != loop.next:
            return None, None
        return loop, (index - loop.start) // loop.order

    def place(self, timestep, schedulers=()) -> Placement:
        """Place one evaluation; raises ``ValueError`` (before anything changes) if a new loop has no schedule."""
        located = locate(timestep)
        if located is None:
            return Placement(None, None)
        storage, index = located
        address, thread, caller = (storage.device, storage.data_ptr()), threading.current_thread(), calling_code()
        loop = self._find(thread.ident, address, caller)
        if loop is not None and not loop.finished:
            self._make_current(loop)
            if loop.broken or index != loop.next:
                loop.broken = True
                loop.next = max(loop.next, index + 1)
                return Placement(loop, None)
            loop.next += 1
            return Placement(loop, (index - loop.start) // loop.order)
        # a new loop: the first evaluation over these timesteps, or a restart after the last loop over them finished
        owner = owning_scheduler(timestep, address, schedulers)
        if owner is None:
            return Placement(None, None)
        order, end = owner
        full_steps = self.schedule.full_steps(step_count(end - index, order))
        new = Loop(storage, address, thread, caller, index, index + 1, end, order, full_steps)
        if loop is not None:
            self._drop(loop)
        self._make_current(new)
        self._forget_dead_threads()
        return Placement(new, 0, new_loop=True)

    def _find(self, thread: int, address: tuple, caller: CodeType | None) -> Loop | None:
        for loop in (self._current.get(thread), *self._retired.get(thread, ())):
            if loop is not None and loop.address == address and loop.caller is caller:
                return loop
        return None

    def _make_current(self, loop: Loop) -> None:
        thread = loop.thread.ident
        current = self._current.get(thread)
        if current is loop:
            return
        retired = self._retired.setdefault(thread, deque(maxlen=RETIRED_PER_THREAD))
        if loop in retired:
            retired.remove(loop)
        if current is not None:
            current.saved.clear()  # a thread's own switches keep nothing: the loop it left may never come back
            retired.appendleft(current)
        self._current[thread] = loop

    def _drop(self, loop: Loop) -> None:
        thread = loop.thread.ident
        if self._current.get(thread) is loop:
            del self._current[thread]
        elif loop in self._retired.get(thread, ()):
            self._retired[thread].remove(loop)

    def _forget_dead_threads(self) -> None:
        for thread in [t for t, loop in self._current.items() if not loop.thread.is_alive()]:
            del self._current[thread]
            self._retired.pop(thread, None)
