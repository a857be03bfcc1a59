"""Shared fixtures: tiny SD-like and SDXL-like pipelines built from config with random weights (CPU, fp32)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastcache.models import build_pipeline, random_prompt_embeds

TINY_PRESETS = ("tiny-sd", "tiny-sdxl")
ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
SIZE = 32  # pixels; latents 16x16 with the tiny VAE


def load_script(relative_path: str):
    """Import a script of bench/ or tools/ (not packages) as a module."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Runner:
    """A tiny pipeline plus a call that returns latents for a fixed seed."""

    def __init__(self, preset: str):
        self.preset = preset
        self.pipe = build_pipeline(preset)
        self.embeds = random_prompt_embeds(self.pipe)

    def __call__(self, steps: int = STEPS, seed: int = 0, embeds=None, size: int = SIZE, output_type: str = "latent",
                 **kwargs) -> torch.Tensor:
        return self.pipe(num_inference_steps=steps, height=size, width=size, output_type=output_type,
                         generator=torch.Generator().manual_seed(seed), **(embeds or self.embeds), **kwargs).images


class Img2ImgRunner:
    """The same components as an img2img pipeline at strength 0.6: the call starts mid-schedule."""

    def __init__(self, runner: Runner):
        from diffusers import StableDiffusionImg2ImgPipeline

        self.pipe = StableDiffusionImg2ImgPipeline(**runner.pipe.components)
        self.embeds = runner.embeds
        self.image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))

    def __call__(self) -> torch.Tensor:
        return self.pipe(image=self.image, strength=0.6, num_inference_steps=STEPS, output_type="latent",
                         generator=torch.Generator().manual_seed(0), **self.embeds).images


@pytest.fixture(params=TINY_PRESETS)
def runner(request) -> Runner:
    return Runner(request.param)


@pytest.fixture
def sd_runner() -> Runner:
    return Runner("tiny-sd")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled tests must not see each other's dynamo caches or stance."""
    yield
    torch._dynamo.reset()
