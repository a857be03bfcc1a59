"""The machine and versions a result or a compiled artifact belongs to: benchmarks, servers and caches report it."""

from __future__ import annotations

import functools
import platform

import torch


@functools.cache
def environment(device: str) -> dict:
    """Card, driver (CUDA), versions of torch, CUDA, diffusers, fastcache and Python; fixed for a process."""
    import diffusers

    from . import __version__

    env = dict(torch=torch.__version__, diffusers=diffusers.__version__, fastcache=__version__,
               python=platform.python_version(), device=device)
    if device.startswith("cuda"):
        env.update(card=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as error:  # nvidia-ml-py missing or NVML unavailable: say so, keep going
            env["driver"] = f"unknown ({type(error).__name__})"
    else:
        env["card"] = platform.processor() or platform.machine()
    return env
