"""Schedulers whose ``step`` is one fused Triton launch, with no host sync per step.

``pipe.scheduler = fused_scheduler(pipe.scheduler)`` swaps in a subclass of the same diffusers scheduler, with the
same config and the same results (within float rounding), whose ``step`` runs ``fastcache_kernels.guided_step``:
one launch instead of the scheduler's five to ten. DDIM's ``step`` honours its ``timestep`` argument in any loop
(restarts, several samples per timestep) and reads the timestep and ``alphas_cumprod`` from host copies, where
diffusers' own ``step`` looks ``alphas_cumprod[timestep]`` up on the device once ``add_noise`` has moved it there (a
host sync every step). Per-call options the kernel does not cover (DDIM's ``eta``, Euler's churn) run the parent's
``step`` unchanged.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastcache_kernels import step_coefficients
from fastcache_kernels.guided_step import guided_step


class FusedDDIMScheduler(DDIMScheduler):
    """DDIM (``eta=0``) through the fused kernel; each step's update depends only on its ``timestep`` argument.

    The pipeline's loop hands out views of ``self.timesteps`` (img2img a slice of it): a view's storage offset is its
    index into a host copy of the timesteps, so its value is known without reading the device.
    """

    fused_kind = "DDIM"
    _host_alphas_cumprod = None  # alphas_cumprod never changes; copied before add_noise can move it to the GPU

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._host_timesteps = self.timesteps.tolist()  # one sync per pipeline call, none per step
        if self._host_alphas_cumprod is None:
            self._host_alphas_cumprod = self.alphas_cumprod.tolist()

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        if eta or use_clipped_model_output or variance_noise is not None:
            return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                variance_noise, return_dict)
        coefficients = step_coefficients.ddim(self, self._timestep_value(timestep), None, self._host_alphas_cumprod)
        prev_sample, x0 = guided_step(model_output, sample, coefficients, store_x0=True)
        return DDIMSchedulerOutput(prev_sample, x0) if return_dict else (prev_sample, x0)

    def _timestep_value(self, timestep) -> int:
        """``int(timestep)``, but a 0-d (or stride-0 expanded) view of ``self.timesteps`` is read from the host copy."""
        timesteps = self.timesteps
        if (torch.is_tensor(timestep) and not any(timestep.stride()) and timestep.dtype == timesteps.dtype
                and timesteps.is_contiguous()
                and timestep.untyped_storage().data_ptr() == timesteps.untyped_storage().data_ptr()
                and 0 <= (index := timestep.storage_offset() - timesteps.storage_offset()) < len(timesteps)):
            return self._host_timesteps[index]
        return int(timestep)  # a value, not a view: read it (a sync if it is a CUDA tensor)


class FusedEulerDiscreteScheduler(EulerDiscreteScheduler):
    """Euler (no churn) through the fused kernel."""

    fused_kind = "Euler"

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        if s_churn > 0:
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        coefficients = step_coefficients.euler(self, self.step_index, None)
        prev_sample, x0 = guided_step(model_output, sample, coefficients, store_x0=True)
        self._step_index += 1
        return EulerDiscreteSchedulerOutput(prev_sample, x0) if return_dict else (prev_sample, x0)


class FusedDPMSolverMultistepScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++ 2M through the fused kernel; keeps the scheduler's own x0 history and order counter."""

    fused_kind = "DPM-Solver++ 2M"

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        if self.step_index is None:
            self._init_step_index(timestep)
        coefficients = step_coefficients.dpmpp_2m(self, self.step_index, None, self.lower_order_nums >= 1)
        x0_prev = self.model_outputs[-1] if coefficients.kp else None
        prev_sample, x0 = guided_step(model_output, sample, coefficients, x0_prev, store_x0=True)
        self.model_outputs = [*self.model_outputs[1:], x0]
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev_sample) if return_dict else (prev_sample,)


FUSED = {cls.__mro__[1]: cls for cls in (FusedDDIMScheduler, FusedEulerDiscreteScheduler,
                                         FusedDPMSolverMultistepScheduler)}


def fused_scheduler(scheduler):
    """The fused counterpart of ``scheduler`` (same config); ``ValueError`` naming what is supported."""
    fused = FUSED.get(type(scheduler))
    if fused is None:
        names = sorted(cls.__name__ for cls in FUSED)
        raise ValueError(f"fused_scheduler supports {names}; got {type(scheduler).__name__}.")
    step_coefficients.check(scheduler, fused.fused_kind)
    return fused.from_config(scheduler.config)
