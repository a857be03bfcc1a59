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

The calling function is read from the stack, and nothing in that reading depends on where files live (moving a file
of fastcache, torch or diffusers must not move a call to another loop). It relies on three things:

- fastcache's own frames are those of this package's modules (by module name, ``__name__``);
- torch calls a module through ``Module.__call__`` and diffusers' hook registry sits between that call and the hook;
  the code objects of both are learnt once, from calls of a throwaway module hooked as the handle hooks the UNet
  (called directly, through ``forward``, and with a torch forward hook, which takes another path in torch);
- everything between a module's own ``Module.__call__`` and fastcache's hook belongs to that call (other hooks
  registered on the UNet, say): the caller is the frame above the nearest module call.

If the throwaway calls do not show that layout (a torch or diffusers whose module calls look different), no caller
can be told: every evaluation is placed in no loop and runs full, with one warning. Slower, never wrong.
"""

from __future__ import annotations

import functools
import itertools
import logging
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from types import CodeType

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .schedule import Schedule, step_count

# Loops a thread may have left unfinished and still resume where it left them (generator-style hand loops).
RETIRED_PER_THREAD = 8
# How far up the stack to look for the scheduler that owns a new loop's timesteps, and for the module call that
# reached fastcache's hook.
MAX_FRAMES = 16
# fastcache's own modules, by name: wherever their files are
_PACKAGE = __name__.partition(".")[0]

logger = logging.getLogger(__name__)


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
    """The code of the function that called the hooked module (the UNet, a ControlNet), or of the first function
    outside fastcache when no module call is on the way (a direct use of the tracker); ``None`` when it cannot be
    told. A direct call from a pipeline's callback comes from another function than the pipeline's own loop."""
    machinery = _module_call_machinery()
    if machinery is None:
        return None
    module_call, registry = machinery
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == _PACKAGE:
        frame = frame.f_back
    call = frame  # the nearest module call above fastcache's hook: whatever lies between belongs to it
    for _ in range(MAX_FRAMES):
        if call is None or call.f_code in module_call:
            break
        call = call.f_back
    if call is not None and call.f_code in module_call:
        frame = call
        while frame is not None and frame.f_code in module_call:
            frame = frame.f_back
    else:  # forward() called directly, or the tracker used directly
        while frame is not None and frame.f_code in registry:
            frame = frame.f_back
    return frame.f_code if frame is not None else None


class _Probe(ModelHook):
    """A hook that records the code of every frame between itself and ``_probe_calls``, per call style."""

    def __init__(self):
        super().__init__()
        self.frames: dict[str, list[CodeType] | None] = {}

    def new_forward(self, module, style: str):
        frames, frame = [], sys._getframe(1)
        while frame is not None and frame.f_code is not _probe_calls.__code__:
            frames.append(frame.f_code)
            frame = frame.f_back
        self.frames[style] = frames if frame is not None else None
        return style


def _probe_calls(module: torch.nn.Module) -> None:
    module.forward("forward")
    module("call")
    hook = module.register_forward_hook(lambda *args: None)  # torch's module call takes its slower path
    try:
        module("call with a torch hook")
    finally:
        hook.remove()


@functools.cache
def _module_call_machinery() -> tuple[frozenset[CodeType], frozenset[CodeType]] | None:
    """The code objects of torch's module call and of diffusers' hook registry, learnt from calls of a throwaway
    module hooked as the handle hooks the UNet; ``None`` (logged once) if those calls do not show that layout."""
    probe, module = _Probe(), torch.nn.Identity()
    HookRegistry.check_if_exists_or_initialize(module).register_hook(probe, "fastcache-probe")
    _probe_calls(module)
    frames = probe.frames
    if len(frames) != 3 or any(found is None for found in frames.values()):
        logger.warning("fastcache: cannot tell which function calls the UNet with this torch/diffusers (a hooked "
                       "module call did not reach its hook as expected); every step runs the full path.")
        return None
    registry = frozenset(frames.pop("forward"))
    module_call = frozenset(code for found in frames.values() for code in found) - registry
    return module_call, registry


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
        located, caller = locate(timestep), calling_code()
        if located is None or caller is None:
            return None, None
        storage, index = located
        loop = self._find(threading.get_ident(), (storage.device, storage.data_ptr()), caller)
        if loop is None or loop.finished or loop.broken or index != loop.next:
            return None, None
        return loop, (index - loop.start) // loop.order

    def place(self, timestep, schedulers=()) -> Placement:
        """Place one evaluation; raises ``ValueError`` (before anything changes) if a new loop has no schedule."""
        located, caller = locate(timestep), calling_code()
        if located is None or caller is None:  # no caller: its loop cannot be told apart from others
            return Placement(None, None)
        storage, index = located
        address, thread = (storage.device, storage.data_ptr()), threading.current_thread()
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
