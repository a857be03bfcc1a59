"""Classifier-free guidance and a first/second-order scheduler update, fused into one elementwise pass.

Per denoising step a diffusers pipeline splits the UNet output, combines it (three launches) and the scheduler
converts it to x0 and updates the sample (five to ten more). With DeepCache's cheap shallow steps these small
launches are a large share of the step. All the schedulers this covers (DDIM with eta 0, Euler, DPM-Solver++ 2M)
are affine in the model output, the sample and at most one earlier x0, so one kernel does the whole update:

    eps    = u + g * (c - u)            # u, c: the unconditional and conditional halves of the UNet output
    x0     = px * x + pe * eps          # the scheduler's x0 prediction (epsilon or v parameterisation)
    x_next = kx * x + ke * eps + k0 * x0 + kp * x0_prev

The coefficients come from ``step_coefficients`` (host floats, no device sync). The kernel reads each input once
and writes ``x_next`` (and ``x0`` for multistep solvers), computing in fp32 whatever the storage type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class StepCoefficients:
    """Scalars of one fused step; ``guidance=None`` means the model output is already the prediction."""

    guidance: float | None
    px: float
    pe: float
    kx: float
    ke: float = 0.0
    k0: float = 0.0
    kp: float = 0.0


def guided_step_reference(model_output: torch.Tensor, x: torch.Tensor, c: StepCoefficients,
                          x0_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, fp32: ``model_output`` is (2B, ...) with guidance, (B, ...) without; returns (x_next, x0)."""
    out, xf = model_output.float(), x.float()
    if c.guidance is not None:
        uncond, cond = out.chunk(2)
        eps = uncond + c.guidance * (cond - uncond)
    else:
        eps = out
    x0 = c.px * xf + c.pe * eps
    x_next = c.kx * xf + c.ke * eps + c.k0 * x0
    if c.kp:
        x_next = x_next + c.kp * x0_prev.float()
    return x_next.to(x.dtype), x0.to(x.dtype)


@triton.jit
def _guided_step_kernel(out_ptr, x_ptr, prev_ptr, x_next_ptr, x0_ptr, n, g, px, pe, kx, ke, k0, kp,
                        GUIDED: tl.constexpr, HAS_PREV: tl.constexpr, STORE_X0: tl.constexpr,
                        BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    if GUIDED:  # the conditional half of the UNet output starts n elements after the unconditional one
        uncond = tl.load(out_ptr + offsets, mask=mask).to(tl.float32)
        cond = tl.load(out_ptr + n + offsets, mask=mask).to(tl.float32)
        eps = uncond + g * (cond - uncond)
    else:
        eps = tl.load(out_ptr + offsets, mask=mask).to(tl.float32)
    x0 = px * x + pe * eps
    x_next = kx * x + ke * eps + k0 * x0
    if HAS_PREV:
        x_next += kp * tl.load(prev_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(x_next_ptr + offsets, x_next.to(x_next_ptr.dtype.element_ty), mask=mask)
    if STORE_X0:
        tl.store(x0_ptr + offsets, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def guided_step(model_output: torch.Tensor, x: torch.Tensor, c: StepCoefficients,
                x0_prev: torch.Tensor | None = None, store_x0: bool = False,
                block: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused step; returns ``(x_next, x0)``, ``x0`` only when ``store_x0`` (multistep solvers).

    Off CUDA, unless Triton's interpreter is on (``TRITON_INTERPRET=1``, as in the tests), the reference runs.
    """
    guided = c.guidance is not None
    expected = (2 * x.shape[0] if guided else x.shape[0], *x.shape[1:])
    if tuple(model_output.shape) != expected:
        raise ValueError(f"model_output must have shape {expected} for this sample; got {tuple(model_output.shape)}.")
    has_prev = bool(c.kp)
    if has_prev and (x0_prev is None or x0_prev.shape != x.shape):
        raise ValueError("this step needs x0_prev, the previous step's x0, shaped like the sample.")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes"):
        x_next, x0 = guided_step_reference(model_output, x, c, x0_prev)
        return x_next, x0 if store_x0 else None
    model_output, x = model_output.contiguous(), x.contiguous()
    x_next = torch.empty_like(x)
    x0 = torch.empty_like(x) if store_x0 else None
    n = x.numel()
    _guided_step_kernel[(triton.cdiv(n, block),)](
        model_output, x, x0_prev.contiguous() if has_prev else x, x_next, x0 if store_x0 else x_next, n,
        float(c.guidance or 0.0), c.px, c.pe, c.kx, c.ke, c.k0, c.kp,
        GUIDED=guided, HAS_PREV=has_prev, STORE_X0=store_x0, BLOCK=block)
    return x_next, x0
