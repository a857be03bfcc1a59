"""Whole sampling runs: the fused step (planned coefficients + kernel) against diffusers' own schedulers."""

import pytest
import torch
from conftest import rel_l2
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from fastcache.models import SD_SCHEDULER
from fastcache_kernels import step_coefficients
from fastcache_kernels.guided_step import guided_step

pytestmark = pytest.mark.usefixtures("kernel_only")  # the kernel steps, not its PyTorch fallback

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BASE = {k: v for k, v in SD_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")}


def run_both(scheduler, plan, guidance, steps=12):
    """Drive diffusers' scheduler and the fused kernel side by side on the same model outputs."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = ours = torch.randn(1, 4, 8, 8, generator=g).to(DEVICE)
    x0_prev = None
    worst = 0.0
    for i, t in enumerate(scheduler.timesteps):
        out = torch.randn(2 if guidance else 1, 4, 8, 8, generator=g).to(DEVICE)
        if guidance:
            uncond, cond = out.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        else:
            eps = out
        x = scheduler.step(eps, t, x).prev_sample
        ours, x0_prev = guided_step(out, ours, plan(scheduler, i, int(t), guidance), x0_prev, store_x0=True)
        worst = max(worst, rel_l2(ours, x))
    return worst


CASES = {
    "ddim-eps": (lambda: DDIMScheduler(**SD_SCHEDULER), lambda s, i, t, g: step_coefficients.ddim(s, t, g)),
    "ddim-v": (lambda: DDIMScheduler(**SD_SCHEDULER, prediction_type="v_prediction"),
               lambda s, i, t, g: step_coefficients.ddim(s, t, g)),
    "euler-eps": (lambda: EulerDiscreteScheduler(**BASE), lambda s, i, t, g: step_coefficients.euler(s, i, g)),
    "euler-v": (lambda: EulerDiscreteScheduler(**BASE, prediction_type="v_prediction"),
                lambda s, i, t, g: step_coefficients.euler(s, i, g)),
    "dpmpp-2m": (lambda: DPMSolverMultistepScheduler(**BASE),
                 lambda s, i, t, g: step_coefficients.dpmpp_2m(s, i, g, i > 0)),
    "dpmpp-2m-karras": (lambda: DPMSolverMultistepScheduler(**BASE, use_karras_sigmas=True),
                        lambda s, i, t, g: step_coefficients.dpmpp_2m(s, i, g, i > 0)),
}


@pytest.mark.parametrize("guidance", [7.5, None], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_follows_the_diffusers_scheduler(case, guidance):
    make, plan = CASES[case]
    assert run_both(make(), plan, guidance) < 1e-5


@pytest.mark.parametrize("make, plan, message", [
    (lambda: DDIMScheduler(**dict(SD_SCHEDULER, clip_sample=True)), step_coefficients.ddim, "clip_sample=False"),
    (lambda: DDIMScheduler(**SD_SCHEDULER, prediction_type="sample"), step_coefficients.ddim, "prediction_type"),
    (lambda: DPMSolverMultistepScheduler(**BASE, algorithm_type="sde-dpmsolver++"), step_coefficients.dpmpp_2m,
     "algorithm_type='dpmsolver\\+\\+'"),
])
def test_non_affine_configurations_are_refused(make, plan, message):
    scheduler = make()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=message):
        if plan is step_coefficients.ddim:
            plan(scheduler, int(scheduler.timesteps[0]), 7.5)
        else:
            plan(scheduler, 0, 7.5, False)
