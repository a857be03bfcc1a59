"""For each UNet evaluation: full or shallow, and whose cached feature the shared buffer holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .loops import Loop, LoopTracker
from .schedule import Schedule


@dataclass(frozen=True)
class Decision:
    full: bool
    new_call: bool  # the evaluation starts a denoising loop (a pipeline call)
    placed: bool  # it belongs to a loop (whose step may be unknown: a broken loop)
    restored: bool = False  # the loop's feature was put back after another evaluation used the buffer


class StepDispatcher:
    """Decides each evaluation from its loop's step, and keeps every loop's feature its own.

    A shallow step reads the feature buffer of its input shape, so it runs only when that buffer holds the feature
    its own loop wrote at its last full step. Loops of other threads, and evaluations placed in no loop, may run in
    between and overwrite the buffer: the feature of a loop they displace is saved first and put back before that
    loop's next shallow step, so concurrent callers get exactly what each would get alone. A step whose loop is
    unknown or broken, or whose feature is gone, is full. All state starts afresh with each loop: nothing leaks
    between calls.
    """

    def __init__(self, schedule: Schedule):
        self.loops = LoopTracker(schedule)
        self.reset()

    def reset(self) -> None:
        """Forget every loop and every buffer's owner: the next evaluation of any loop is full."""
        self.loops.reset()
        self._owner: dict[Any, Loop | None] = {}  # shape key -> the loop whose feature the buffer holds

    def decide(self, timestep, key: Any, buffer: torch.Tensor, schedulers=()) -> Decision:
        """Place the evaluation and make ``buffer`` ready for it; the caller then runs the path it says."""
        placement = self.loops.place(timestep, schedulers)
        loop, owner = placement.loop, self._owner.get(key)
        shallow = (placement.step is not None and placement.step not in loop.full_steps
                   and (owner is loop or key in loop.saved))
        restored = shallow and owner is not loop
        if not shallow or restored:
            self._keep(owner, key, buffer, loop)
        if restored:
            buffer.copy_(loop.saved.pop(key))
            self._owner[key] = loop
        if not shallow:
            self._owner[key] = loop if placement.step is not None else None  # nobody may read a stray feature
            if loop is not None:  # the loop's latest full step is this one: its features at other shapes are stale
                loop.saved.clear()
                for other in [k for k, o in self._owner.items() if o is loop and k != key]:
                    self._owner[other] = None
        if loop is not None and loop.finished:
            loop.saved.clear()
        return Decision(not shallow, placement.new_loop, loop is not None, restored)

    def peek(self, timestep, sample_signature, per_frame=None) -> bool:
        """Whether the UNet evaluation that an evaluation at ``timestep`` from this caller would be is shallow, for
        a UNet input of ``sample_signature``: asked by the ControlNet hook before the UNet runs. Changes nothing.
        ``per_frame`` maps a UNet sample's signature to the per-frame one a video pipeline's ControlNet gets."""
        loop, step = self.loops.peek(timestep)
        if loop is None or step in loop.full_steps:
            return False
        keys = [key for key, owner in self._owner.items() if owner is loop] + list(loop.saved)
        per_frame = per_frame or (lambda found: found)
        return any(per_frame(dict(key).get("sample")) == sample_signature for key in keys)

    def _keep(self, owner: Loop | None, key: Any, buffer: torch.Tensor, by: Loop | None) -> None:
        """Save ``owner``'s feature before evaluation ``by`` overwrites the buffer, if ``owner`` will read it again.

        That is a loop still running in another thread, or the running loop of this thread when ``by`` is an
        evaluation placed in no loop (a direct call from a callback). A thread that moves on to another loop of its
        own has retired the old one, whose feature is left behind: if that loop resumes, its next step is full.
        """
        if owner is not None and owner is not by and self.loops.is_running(owner):
            owner.saved[key] = buffer.clone()
