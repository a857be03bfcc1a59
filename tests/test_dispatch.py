"""The dispatcher's decisions and feature ownership, unit by unit and through every supported scheduler."""

import threading

import pytest
import torch
from conftest import deepcache_helper, fastcache_run, helper_run, rel_l2
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from fastcache import compile_pipeline
from fastcache.dispatch import StepDispatcher
from fastcache.schedule import Schedule


class Evaluations:
    """Drives a dispatcher as the handle does, with a buffer per key that a full step writes its loop's name into."""

    def __init__(self, interval=3):
        self.dispatcher = StepDispatcher(Schedule("uniform", interval))
        self.buffers, self.schedulers, self.loops = {}, [], []  # loops: each loop an evaluation was placed in
        place = self.dispatcher.loops.place

        def placed(*args):
            placement = place(*args)
            if placement.loop is not None and placement.loop not in self.loops:
                self.loops.append(placement.loop)
            return placement

        self.dispatcher.loops.place = placed

    def timesteps(self, n: int = 6) -> torch.Tensor:
        """Fresh timesteps of a scheduler (kept here), as ``set_timesteps`` makes them for each call."""
        scheduler = DDIMScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(n)
        self.schedulers.append(scheduler)
        return scheduler.timesteps

    def __call__(self, timestep, name, key="k") -> tuple[bool, float]:
        """(full?, the feature the evaluation reads: what a full step wrote, by the loop called ``name``)."""
        buffer = self.buffers.setdefault(key, torch.zeros(()))
        decision = self.dispatcher.decide(timestep, key, buffer, self.schedulers)
        if decision.full:
            buffer.fill_(name)
        return decision.full, buffer.item()


def test_uniform_decisions_and_a_fresh_start_with_every_new_timesteps_tensor():
    run = Evaluations()
    timesteps = run.timesteps(7)
    assert [run(t, 1)[0] for t in timesteps] == [True, False, False, True, False, False, True]
    timesteps = run.timesteps(7)  # set_timesteps of the next pipeline call
    assert [run(t, 2)[0] for t in timesteps[:2]] == [True, False]


def test_a_new_shape_gets_a_full_step_first():
    run = Evaluations()
    timesteps = run.timesteps()
    assert [run(t, 1, key="a")[0] for t in timesteps[:2]] == [True, False]
    assert [run(t, 1, key="b")[0] for t in timesteps[2:5]] == [True, True, False]  # steps 2, 3, 4


def test_evaluations_placed_in_no_loop_are_full_and_the_loop_gets_its_feature_back():
    """A direct call with a hand-made timestep, from a callback in the middle of a loop."""
    run = Evaluations()
    timesteps = run.timesteps()
    assert run(timesteps[0], 1) == (True, 1)
    assert run(torch.tensor(500), 9) == (True, 9)
    assert run(timesteps[1], 1) == (False, 1), "the loop reads its own feature, put back"
    assert run(700, 9) == (True, 9)
    assert run(timesteps[2], 1) == (False, 1)


def test_loops_of_two_threads_keep_their_own_features():
    run = Evaluations()
    mine, theirs = run.timesteps(), run.timesteps()
    read = []
    assert run(mine[0], 1) == (True, 1)
    thread = threading.Thread(target=lambda: read.extend(run(t, 2) for t in theirs[:2]))
    thread.start()
    thread.join(timeout=30)
    assert read == [(True, 2), (False, 2)]
    assert run(mine[1], 1) == (False, 1), "restored after the other thread's loop overwrote the buffer"


def test_a_thread_moving_to_another_loop_leaves_the_old_ones_feature_behind():
    """Nothing is saved for a loop its own thread left (it may never come back); if it does, its next step is full."""
    run = Evaluations()
    first, second = run.timesteps(), run.timesteps()
    assert run(first[0], 1) == (True, 1)
    assert run(second[0], 2) == (True, 2)
    assert run(first[1], 1) == (True, 1), "step 1 is shallow by the schedule, but its feature is gone"
    assert run(first[2], 1) == (False, 1)
    back, left = run.loops  # the thread went back to the first loop, leaving the second
    assert left.saved == {} and not run.dispatcher.loops.is_running(left), "nothing kept for the loop it left"
    assert run.dispatcher.loops.is_running(back)


def test_a_broken_loop_never_reads_the_buffer():
    run = Evaluations()
    timesteps = run.timesteps()
    assert run(timesteps[0], 1) == (True, 1)
    assert run(timesteps[0], 2) == (True, 2)  # a second view at step 0
    assert [run(t, 3)[0] for t in timesteps[1:]] == [True] * 5


def test_after_a_full_step_at_another_shape_the_old_shapes_feature_is_stale():
    """Guidance switched off for a step and on again: the loop's last full step ran at the other batch size."""
    run = Evaluations()
    timesteps = run.timesteps()
    assert run(timesteps[0], 1, key="guided") == (True, 1)
    assert run(timesteps[1], 2, key="unguided") == (True, 2)  # a first step at this shape
    assert run(timesteps[2], 3, key="guided") == (True, 3), "step 2 is shallow by the schedule, but step 0 is stale"


UNIQUE_TIMESTEP_SCHEDULERS = [DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                              DPMSolverMultistepScheduler, UniPCMultistepScheduler, LMSDiscreteScheduler]


@pytest.mark.parametrize("scheduler_cls", UNIQUE_TIMESTEP_SCHEDULERS, ids=lambda c: c.__name__)
def test_matches_the_helper_with_every_scheduler_of_unique_timesteps(sd_runner, scheduler_cls):
    sd_runner.pipe.scheduler = scheduler_cls.from_config(sd_runner.pipe.scheduler.config)
    for interval, branch in [(2, 0), (3, 4)]:
        expected = helper_run(sd_runner, interval, branch)
        assert rel_l2(fastcache_run(sd_runner, interval, branch), expected) < 1e-5


@pytest.mark.parametrize("scheduler, interval, evaluations, full", [
    # as Stable Diffusion ships it; timesteps [t0, t1, t1, t2, ...]: at interval 3 the helper's miscount of the third
    # evaluation (step 1, not 2) changes no decision, at interval 2 it does
    (lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True), 2, 11, 6),
    (HeunDiscreteScheduler.from_config, 3, 19, 7),
], ids=["PNDM", "Heun"])
def test_repeated_timestep_schedulers(sd_runner, scheduler, interval, evaluations, full):
    """The helper mis-indexes repeated timesteps; we follow the evaluation count and the scheduler order.

    The oracle is the helper with its step counter fixed (conftest's ``StepCountingHelper``: the step is the call's
    evaluations so far divided by the scheduler's order), everything else its own: the schedule of full steps is
    asserted below from the decisions, and the output must equal the helper's computation on that schedule. The
    helper as published steps elsewhere: its output differs, which shows that the oracle tells the two apart."""
    sd_runner.pipe.scheduler = scheduler(sd_runner.pipe.scheduler.config)
    assert torch.equal(fastcache_run(sd_runner, 1, 0), sd_runner())
    with deepcache_helper(sd_runner.pipe, interval, 0, count_steps=True):
        expected = sd_runner()
    assert rel_l2(helper_run(sd_runner, interval, 0), expected) > 1e-3, "the published helper mis-steps here"

    handle = compile_pipeline(sd_runner.pipe, interval, 0, compile=False)
    seen = []
    decide = handle.dispatcher.decide

    def spy(*args):
        decision = decide(*args)
        seen.append(decision.full)
        return decision

    handle.dispatcher.decide = spy
    out = sd_runner()
    assert len(seen) == evaluations and sum(seen) == full
    order = sd_runner.pipe.scheduler.order
    steps = [seen[i:i + order] for i in range(0, evaluations, order)]
    assert all(len(set(s)) == 1 for s in steps), "both evaluations of a step must take one decision"
    assert [s[0] for s in steps] == [i % interval == 0 for i in range(len(steps))]
    assert rel_l2(out, expected) < 1e-5
    assert (handle.counters.full, handle.counters.shallow, handle.counters.fallbacks) == (full, evaluations - full, 0)
