"""The scalars of ``guided_step`` for one step of a diffusers scheduler, computed on the host in float64.

Each function reads the scheduler's own tables (``alphas_cumprod``, ``sigmas``, which live on the CPU, or a host
copy of ``alphas_cumprod`` once DDIM's ``add_noise`` has moved it to the GPU) for an explicit step, so nothing waits
on the GPU, and rejects configurations whose update is not affine (clipping, thresholding, stochastic variants) with
a ``ValueError`` naming what is supported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .guided_step import StepCoefficients

PREDICTION_TYPES = ("epsilon", "v_prediction")


# What each update needs of the scheduler's config to be affine in (model output, sample, previous x0).
REQUIRED = {
    "DDIM": dict(thresholding=False, clip_sample=False),
    "Euler": {},
    "DPM-Solver++ 2M": dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", thresholding=False,
                            use_flow_sigmas=False, final_sigmas_type="zero", euler_at_final=False),
}


def check(scheduler, kind: str) -> None:
    """Raise ``ValueError`` naming the setting if ``scheduler``'s config cannot take the fused ``kind`` update."""
    config = scheduler.config
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{kind}: prediction_type must be one of {PREDICTION_TYPES}; got {config.prediction_type!r}.")
    for key, value in REQUIRED[kind].items():
        if config.get(key, value) != value:
            raise ValueError(f"{kind}: the fused step needs {key}={value!r}; this scheduler has {config[key]!r}.")


def _x0(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(px, pe) with x0 = px * x + pe * model_output, for x = alpha * x0 + sigma * noise."""
    if prediction_type == "epsilon":
        return 1 / alpha, -sigma / alpha
    return alpha, -sigma  # v_prediction


def ddim(scheduler, timestep: int, guidance: float | None,
         alphas_cumprod: Sequence[float] | None = None) -> StepCoefficients:
    """``DDIMScheduler.step`` with ``eta=0`` from ``timestep`` to the previous one.

    ``alphas_cumprod``: a host copy of the scheduler's, which ``add_noise`` moves to the sample's device (where each
    lookup would be a host sync); by default the scheduler's own.
    """
    check(scheduler, "DDIM")
    alphas = scheduler.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a = float(alphas[timestep])
    a_prev = float(alphas[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    px, pe = _x0(scheduler.config.prediction_type, math.sqrt(a), math.sqrt(1 - a))
    if scheduler.config.prediction_type == "epsilon":  # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
        return StepCoefficients(guidance, px, pe, kx=0.0, ke=math.sqrt(1 - a_prev), k0=math.sqrt(a_prev))
    # v: the predicted noise is sqrt(a) v + sqrt(1 - a) x
    direction = math.sqrt(1 - a_prev)
    return StepCoefficients(guidance, px, pe, kx=direction * math.sqrt(1 - a), ke=direction * math.sqrt(a),
                            k0=math.sqrt(a_prev))


def euler(scheduler, step_index: int, guidance: float | None) -> StepCoefficients:
    """``EulerDiscreteScheduler.step`` (no churn) from ``sigmas[step_index]`` to the next sigma."""
    check(scheduler, "Euler")
    sigma, sigma_next = float(scheduler.sigmas[step_index]), float(scheduler.sigmas[step_index + 1])
    if scheduler.config.prediction_type == "epsilon":
        px, pe = 1.0, -sigma
    else:
        px, pe = 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
    ratio = (sigma_next - sigma) / sigma  # x_next = x + (sigma_next - sigma) * (x - x0) / sigma
    return StepCoefficients(guidance, px, pe, kx=1 + ratio, k0=-ratio)


def dpmpp_2m(scheduler, step_index: int, guidance: float | None, has_previous: bool) -> StepCoefficients:
    """``DPMSolverMultistepScheduler.step`` (DPM-Solver++ 2M, midpoint): first order on the first and final steps.

    ``has_previous``: an x0 from the previous step of this call exists (the scheduler's ``lower_order_nums >= 1``;
    false on the first step, also when img2img starts mid-schedule). A second-order step uses that x0 (``kp``).
    """
    check(scheduler, "DPM-Solver++ 2M")
    sigmas = scheduler.sigmas
    i, last = step_index, len(scheduler.timesteps) - 1

    def alpha_sigma(s: float) -> tuple[float, float]:
        alpha = 1 / math.sqrt(s**2 + 1)
        return alpha, s * alpha

    def lam(alpha: float, sigma: float) -> float:
        return math.log(alpha) - math.log(sigma)

    alpha_t, sigma_t = alpha_sigma(float(sigmas[i + 1]))
    alpha_s0, sigma_s0 = alpha_sigma(float(sigmas[i]))
    px, pe = _x0(scheduler.config.prediction_type, alpha_s0, sigma_s0)
    if sigma_t == 0:  # the final step to sigma 0 lands on x0 itself
        return StepCoefficients(guidance, px, pe, kx=0.0, k0=1.0)
    h = lam(alpha_t, sigma_t) - lam(alpha_s0, sigma_s0)
    phi = alpha_t * (math.exp(-h) - 1.0)
    if not has_previous or i == last:
        return StepCoefficients(guidance, px, pe, kx=sigma_t / sigma_s0, k0=-phi)
    alpha_s1, sigma_s1 = alpha_sigma(float(sigmas[i - 1]))
    r0 = (lam(alpha_s0, sigma_s0) - lam(alpha_s1, sigma_s1)) / h
    # D0 = x0, D1 = (x0 - x0_prev) / r0; x_t = (sigma_t / sigma_s0) x - phi D0 - phi / 2 D1
    return StepCoefficients(guidance, px, pe, kx=sigma_t / sigma_s0, k0=-phi * (1 + 0.5 / r0), kp=0.5 * phi / r0)
