"""environment() (environment.py): the machine and versions a benchmark, a server's report or a compile cache names.
The CUDA case runs with stand-ins for the card's name and NVML (no GPU here)."""

import platform
import sys
import types

import diffusers
import pytest
import torch

import fastcache
from fastcache.environment import environment


@pytest.fixture(autouse=True)
def _uncached():
    """environment() is fixed for a process (cached): each test reads it afresh, and leaves no stand-in behind."""
    environment.cache_clear()
    yield
    environment.cache_clear()


def test_on_a_cpu_it_names_the_versions_and_the_processor():
    assert environment("cpu") == dict(torch=torch.__version__, diffusers=diffusers.__version__,
                                      fastcache=fastcache.__version__, python=platform.python_version(),
                                      device="cpu", card=platform.processor() or platform.machine())
    assert environment("cpu") is environment("cpu"), "read once per process"


def nvml(driver: str | None = None, error: Exception | None = None) -> types.ModuleType:
    """A stand-in ``pynvml``: reports ``driver``, or raises ``error`` at ``nvmlInit``."""
    module = types.ModuleType("pynvml")

    def init():
        if error is not None:
            raise error

    module.nvmlInit = init
    module.nvmlSystemGetDriverVersion = lambda: driver
    return module


@pytest.mark.parametrize("pynvml, driver", [
    (nvml("570.86.15"), "570.86.15"),
    (nvml(error=RuntimeError("NVML Shared Library Not Found")), "unknown (RuntimeError)"),
    (None, "unknown (ModuleNotFoundError)"),  # nvidia-ml-py not installed
], ids=["nvml", "nvml-fails", "no-nvml"])
def test_on_cuda_it_names_the_card_cuda_and_the_driver_or_why_not(monkeypatch, pynvml, driver):
    monkeypatch.setitem(sys.modules, "pynvml", pynvml)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Stand-in GPU ({device})")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    env = environment("cuda:0")
    assert (env["device"], env["card"], env["cuda"], env["driver"]) == ("cuda:0", "Stand-in GPU (cuda:0)", "12.8",
                                                                        driver)
    assert env["torch"] == torch.__version__ and env["fastcache"] == fastcache.__version__
