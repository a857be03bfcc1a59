"""Fused schedulers in pipeline calls and hand-written loops: same latents as diffusers' own schedulers."""

from functools import partial

import numpy as np
import pytest
import torch
from conftest import Img2ImgRunner, rel_l2
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from fastcache import compile_pipeline
from fastcache.fused_step import FusedDDIMScheduler, fused_scheduler
from fastcache.models import SD_SCHEDULER

pytestmark = pytest.mark.usefixtures("kernel_only")  # the fused schedulers step with the kernel, not its fallback

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


def test_fused_ddim_reads_a_view_of_its_timesteps_from_the_host_copy():
    """Reading a timestep's value would be a host sync on a GPU; the pipeline's loop passes views of ``timesteps``.

    On a CPU a read costs nothing, so the test tells the two apart by what each sees: once ``set_timesteps`` has run,
    the tensor is overwritten in place (standing in for memory the host must not read). A view's step still takes the
    value ``set_timesteps`` made; a tensor that is not a view (a value) is read, and its step takes what it holds."""
    scheduler = fused_scheduler(DDIMScheduler(**SD_SCHEDULER))
    scheduler.set_timesteps(10)
    view = list(scheduler.timesteps[4:])[0]  # as img2img's loop gets it
    made, overwritten = int(scheduler.timesteps[4]), int(scheduler.timesteps[5])
    scheduler.timesteps[4] = overwritten
    generator = torch.Generator().manual_seed(1)
    x, eps = (torch.randn(SHAPE, generator=generator) for _ in range(2))

    def diffusers_step(value: int) -> torch.Tensor:
        reference = DDIMScheduler(**SD_SCHEDULER)
        reference.set_timesteps(10)
        return reference.step(eps, value, x).prev_sample

    at_made, at_overwritten = diffusers_step(made), diffusers_step(overwritten)
    assert rel_l2(at_made, at_overwritten) > 1e-3, "the two timesteps must step differently for this test to tell"
    for timestep in (view, view.expand(2)):
        assert rel_l2(scheduler.step(eps, timestep, x).prev_sample, at_made) < 1e-5
    assert rel_l2(scheduler.step(eps, view.clone(), x).prev_sample, at_overwritten) < 1e-5  # not a view: read


SHAPE = (1, 4, 8, 8)


def assert_fused_ddim_matches(loop, **config):
    """``loop(scheduler, randn)`` on diffusers' DDIM and on the fused one: the same latents, step by step.

    ``randn()`` draws the next model output or sample from a generator seeded afresh for each scheduler.
    """
    original = DDIMScheduler(**SD_SCHEDULER, **config)
    results = []
    for scheduler in (original, fused_scheduler(original)):
        results.append(loop(scheduler, partial(torch.randn, SHAPE, generator=torch.Generator().manual_seed(0))))
    expected, fused = results
    assert expected
    for ours, theirs in zip(fused, expected, strict=True):
        assert rel_l2(ours, theirs) < 1e-5


@pytest.mark.parametrize("steps_again", [10, 7])
def test_fused_ddim_in_a_loop_that_restarts(steps_again):
    def loop(scheduler, randn):
        latents = []
        for steps, stop in ((10, 4), (steps_again, None)):
            scheduler.set_timesteps(steps)
            x = randn()
            for t in scheduler.timesteps[:stop]:
                x = scheduler.step(randn(), t, x).prev_sample
                latents.append(x)
        return latents

    assert_fused_ddim_matches(loop)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fused_ddim_stepping_two_samples_per_timestep(prediction_type):
    """MultiDiffusion-style: several views of one image, each stepped with the same timestep."""
    def loop(scheduler, randn):
        scheduler.set_timesteps(10)
        latents = [randn(), randn()]
        for t in scheduler.timesteps:
            latents[-2:] = [scheduler.step(randn(), t, x).prev_sample for x in latents[-2:]]
        return latents

    assert_fused_ddim_matches(loop, prediction_type=prediction_type)


def test_fused_ddim_looping_twice_over_one_set_timesteps():
    def loop(scheduler, randn):
        scheduler.set_timesteps(10)
        latents = []
        for _ in range(2):
            x = randn()
            for t in scheduler.timesteps:
                x = scheduler.step(randn(), t, x).prev_sample
                latents.append(x)
        return latents

    assert_fused_ddim_matches(loop)


@pytest.mark.parametrize("as_argument", [int, lambda t: torch.tensor(int(t)), lambda t: np.int64(t)],
                         ids=["int", "fresh-tensor", "numpy"])
def test_fused_ddim_takes_timesteps_as_values(as_argument):
    def loop(scheduler, randn):
        scheduler.set_timesteps(10)
        x, latents = randn(), []
        for t in scheduler.timesteps.tolist():
            x = scheduler.step(randn(), as_argument(t), x).prev_sample
            latents.append(x)
        return latents

    assert_fused_ddim_matches(loop)


class OnTheDevice:
    """Stands in for ``alphas_cumprod`` once ``add_noise`` has moved it to the GPU: a lookup would be a host sync."""

    def __getitem__(self, index):
        raise AssertionError("step() indexed the scheduler's alphas_cumprod")


def test_fused_ddim_after_add_noise_never_indexes_alphas_cumprod():
    """img2img: ``add_noise`` moves ``alphas_cumprod`` to the sample's device; the fused step keeps a host copy."""
    def loop(scheduler, randn):
        scheduler.set_timesteps(10)
        timesteps = scheduler.timesteps[4:]  # as img2img at strength 0.6
        x = scheduler.add_noise(randn(), randn(), timesteps[:1])
        if isinstance(scheduler, FusedDDIMScheduler):
            scheduler.alphas_cumprod = OnTheDevice()
        latents = [x]
        for t in timesteps:
            latents.append(scheduler.step(randn(), t, latents[-1]).prev_sample)
        return latents

    assert_fused_ddim_matches(loop)
