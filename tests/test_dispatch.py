"""The dispatcher's decisions, unit by unit and through every supported scheduler."""

from types import SimpleNamespace

import pytest
import torch
from conftest import rel_l2
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
from test_handle import fastcache_run, helper_run

from fastcache import compile_pipeline
from fastcache.dispatch import StepDispatcher
from fastcache.schedule import Schedule


def fake_scheduler(evaluations: int, order: int = 1, begin_index=None):
    return SimpleNamespace(timesteps=torch.arange(evaluations), order=order, begin_index=begin_index)


def decisions(dispatcher, scheduler, n, key="k"):
    return [dispatcher.next_is_full(scheduler, key) for _ in range(n)]


def test_uniform_decisions_and_reset_on_new_timesteps():
    dispatcher = StepDispatcher(Schedule("uniform", 3))
    scheduler = fake_scheduler(7)
    assert decisions(dispatcher, scheduler, 7) == [True, False, False, True, False, False, True]
    scheduler.timesteps = torch.arange(7)  # set_timesteps of the next pipeline call
    assert decisions(dispatcher, scheduler, 2) == [True, False]


def test_order_two_schedulers_decide_once_per_step():
    dispatcher = StepDispatcher(Schedule("uniform", 2))
    assert decisions(dispatcher, fake_scheduler(7, order=2), 7) == [True, True, False, False, True, True, False]


def test_a_new_shape_gets_a_full_step_first():
    dispatcher = StepDispatcher(Schedule("uniform", 3))
    scheduler = fake_scheduler(6)
    assert decisions(dispatcher, scheduler, 2, key="a") == [True, False]
    assert decisions(dispatcher, scheduler, 3, key="b") == [True, True, False]  # steps 2, 3, 4


def test_quad_center_counts_steps_from_the_begin_index():
    dispatcher = StepDispatcher(Schedule("quad-center", 5))
    full = decisions(dispatcher, fake_scheduler(60, begin_index=10), 50)
    assert [i for i, f in enumerate(full) if f] == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]


UNIQUE_TIMESTEP_SCHEDULERS = [DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                              DPMSolverMultistepScheduler, UniPCMultistepScheduler, LMSDiscreteScheduler]


@pytest.mark.parametrize("scheduler_cls", UNIQUE_TIMESTEP_SCHEDULERS, ids=lambda c: c.__name__)
def test_matches_the_helper_with_every_scheduler_of_unique_timesteps(sd_runner, scheduler_cls):
    sd_runner.pipe.scheduler = scheduler_cls.from_config(sd_runner.pipe.scheduler.config)
    for interval, branch in [(2, 0), (3, 4)]:
        expected = helper_run(sd_runner, interval, branch)
        assert rel_l2(fastcache_run(sd_runner, interval, branch), expected) < 1e-5


@pytest.mark.parametrize("scheduler, evaluations, full", [
    (lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True), 11, 4),  # as Stable Diffusion ships it
    (HeunDiscreteScheduler.from_config, 19, 7),
], ids=["PNDM", "Heun"])
def test_repeated_timestep_schedulers(sd_runner, scheduler, evaluations, full):
    """The helper mis-indexes repeated timesteps; we follow the evaluation count and the scheduler order."""
    sd_runner.pipe.scheduler = scheduler(sd_runner.pipe.scheduler.config)
    baseline = sd_runner()
    assert torch.equal(fastcache_run(sd_runner, 1, 0), baseline)

    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    seen = []
    next_is_full = handle.dispatcher.next_is_full
    handle.dispatcher.next_is_full = lambda *a: seen.append(next_is_full(*a)) or seen[-1]
    out = sd_runner()
    assert len(seen) == evaluations and sum(seen) == full
    order = sd_runner.pipe.scheduler.order
    steps = [seen[i:i + order] for i in range(0, evaluations, order)]
    assert all(len(set(s)) == 1 for s in steps), "both evaluations of a step must take one decision"
    assert [s[0] for s in steps] == [i % 3 == 0 for i in range(len(steps))]
    assert 0 < rel_l2(out, baseline) < 0.2
