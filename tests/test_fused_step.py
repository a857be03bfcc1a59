"""Fused schedulers in real pipeline calls: same latents as diffusers' own schedulers, alone and under fastcache."""

import pytest
import torch
from conftest import Img2ImgRunner, rel_l2
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from fastcache import compile_pipeline
from fastcache.fused_step import FusedDDIMScheduler, fused_scheduler

SCHEDULERS = [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler]


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_fused_scheduler_matches_the_original_in_a_pipeline(sd_runner, scheduler_cls):
    original = scheduler_cls.from_config(sd_runner.pipe.scheduler.config)
    sd_runner.pipe.scheduler = original
    expected = sd_runner()
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    expected_cached = sd_runner()
    handle.disable()

    sd_runner.pipe.scheduler = fused_scheduler(original)
    assert type(sd_runner.pipe.scheduler).__mro__[1] is scheduler_cls
    assert rel_l2(sd_runner(), expected) < 1e-5
    handle.enable()
    assert rel_l2(sd_runner(), expected_cached) < 1e-5
    assert rel_l2(sd_runner(guidance_scale=1.0), _with(sd_runner, original, guidance_scale=1.0)) < 1e-5


def _with(runner, scheduler, **kwargs):
    fused, runner.pipe.scheduler = runner.pipe.scheduler, scheduler
    try:
        return runner(**kwargs)
    finally:
        runner.pipe.scheduler = fused


def test_options_the_kernel_does_not_cover_run_the_parent_step(sd_runner):
    original = sd_runner.pipe.scheduler
    sd_runner.pipe.scheduler = fused_scheduler(original)
    assert isinstance(sd_runner.pipe.scheduler, FusedDDIMScheduler)
    assert torch.equal(sd_runner(eta=0.5, seed=3), _with(sd_runner, original, eta=0.5, seed=3))


def test_unsupported_schedulers_and_settings_are_refused(sd_runner):
    with pytest.raises(ValueError, match="supports .*DDIMScheduler"):
        fused_scheduler(PNDMScheduler.from_config(sd_runner.pipe.scheduler.config))
    with pytest.raises(ValueError, match="clip_sample=False"):
        fused_scheduler(DDIMScheduler.from_config(sd_runner.pipe.scheduler.config, clip_sample=True))


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_img2img_starting_mid_schedule(sd_runner, scheduler_cls):
    img2img = Img2ImgRunner(sd_runner)
    original = scheduler_cls.from_config(img2img.pipe.scheduler.config)
    img2img.pipe.scheduler = original
    expected = img2img()
    img2img.pipe.scheduler = fused_scheduler(original)
    assert rel_l2(img2img(), expected) < 1e-5


def test_fused_ddim_finds_where_a_call_starts_from_the_view_it_is_given(sd_runner):
    """Reading the first timestep's value would be a host sync on a GPU; the pipeline's loop passes views."""
    scheduler = fused_scheduler(sd_runner.pipe.scheduler)
    scheduler.set_timesteps(10)
    first = list(scheduler.timesteps[4:])[0]  # as img2img's loop gets it
    assert scheduler._schedule_index(int(first)) == scheduler._schedule_index(first.clone()) == 4  # values: looked up

    class Unsearchable(list):
        def index(self, *args):
            raise AssertionError("the timestep's value was looked up")

    scheduler._host_timesteps = Unsearchable(scheduler._host_timesteps)
    assert scheduler._schedule_index(first) == 4
