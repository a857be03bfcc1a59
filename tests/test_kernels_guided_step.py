"""The fused guidance + scheduler-update kernel against its PyTorch reference (Triton's interpreter on CPU: conftest
forces it, and ``kernel_only`` makes sure the kernel ran, not the fallback to the reference)."""

import pytest
import torch
from conftest import rel_l2

from fastcache_kernels.guided_step import StepCoefficients, guided_step, guided_step_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COEFFS = dict(px=1.3, pe=-0.7, kx=0.9, ke=0.2, k0=0.4)


@pytest.mark.usefixtures("kernel_only")
@pytest.mark.parametrize("guidance", [7.5, None], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("with_prev", [False, True], ids=["first-order", "second-order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(guidance, with_prev, dtype):
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 9, 13)  # not a multiple of the block: the tail must be masked
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    out = torch.randn((2 * shape[0] if guidance else shape[0], *shape[1:]), generator=g).to(DEVICE, dtype)
    prev = torch.randn(shape, generator=g).to(DEVICE, dtype) if with_prev else None
    c = StepCoefficients(guidance, **COEFFS, kp=-0.3 if with_prev else 0.0)
    x_next, x0 = guided_step(out, x, c, prev, store_x0=True, block=128)
    ref_next, ref_x0 = guided_step_reference(out, x, c, prev)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3
    assert x_next.dtype == dtype and rel_l2(x_next, ref_next) < tolerance
    assert rel_l2(x0, ref_x0) < tolerance


@pytest.mark.usefixtures("kernel_only")
def test_without_store_x0_only_the_sample_is_written():
    x, out = torch.randn(1, 4, 8, 8, device=DEVICE), torch.randn(2, 4, 8, 8, device=DEVICE)
    c = StepCoefficients(5.0, **COEFFS)
    x_next, x0 = guided_step(out, x, c)
    assert x0 is None and rel_l2(x_next, guided_step_reference(out, x, c)[0]) < 1e-6


def test_shapes_are_checked():
    x = torch.randn(1, 4, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"model_output must have shape \(2, 4, 8, 8\)"):
        guided_step(torch.randn(1, 4, 8, 8, device=DEVICE), x, StepCoefficients(5.0, **COEFFS))
    with pytest.raises(ValueError, match="needs x0_prev"):
        guided_step(torch.randn(2, 4, 8, 8, device=DEVICE), x, StepCoefficients(5.0, **COEFFS, kp=0.1))


def test_cpu_tensors_run_the_reference_when_the_interpreter_is_off(monkeypatch):
    import fastcache_kernels.guided_step as kernel

    ran = []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernel, "guided_step_reference", lambda *args: ran.append(args) or guided_step_reference(*args))
    x, out = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)
    c = StepCoefficients(5.0, **COEFFS)
    x_next, x0 = guided_step(out, x, c)
    assert len(ran) == 1, "the reference answers, and no kernel is launched after it"
    assert x0 is None and torch.equal(x_next, guided_step_reference(out, x, c)[0])
