"""Named fastcache configurations: what the benchmark and the profiler compare, and a place for users to start.

A variant is ``compile_pipeline``'s options (a ``FastCacheConfig``) plus two switches outside it: the fused scheduler
step (``fused_step.fused_scheduler``) and the pipeline's own speed switches (fused QKV projections, channels_last
weights), which PyTorch's and diffusers' SDXL guides turn on before ``torch.compile``. Which of them pays off on a
GPU is for the benchmark to show; the defaults of ``compile_pipeline`` stay plain until it has.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .config import FastCacheConfig
from .extras import require
from .graphs import UNET_INDUCTOR_OPTIONS

if TYPE_CHECKING:  # imported where used: the variants' names are a command-line choice, read before diffusers loads
    from diffusers.models.attention_processor import Attention

    from .handle import FastCacheHandle


@contextmanager
def speed_switches(pipe, on: bool = True) -> Iterator[None]:
    """Fused QKV projections and channels_last weights for the UNet and VAE; undone exactly after.

    diffusers keeps the unfused projections beside the fused copies (a quarter of SDXL's UNet weights); while the
    switch is on their storage is released, and on exit they are cut back out of the fused weights.
    """
    if not on:
        yield
        return
    from diffusers.models.attention_processor import Attention

    models = (pipe.unet, pipe.vae)
    bookkeeping = [(pipe, "fusing_unet"), (pipe, "fusing_vae")] + [(m, "original_attn_processors") for m in models]
    created = [(obj, name) for obj, name in bookkeeping if name not in vars(obj)]  # diffusers leaves these behind
    pipe.fuse_qkv_projections()
    attentions = [module for model in models for module in model.modules() if isinstance(module, Attention)]
    fused = [_fused_pair(attn) for attn in attentions]
    for _, parts in fused:
        for param in _params(parts):
            param.data = param.data.new_empty(0)
    for model in models:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        pipe.unfuse_qkv_projections()  # restores the attention processors
        for layer, parts in fused:
            sizes = [part.out_features for part in parts]
            for name in ("weight", "bias"):
                if getattr(layer, name) is not None:
                    for part, chunk in zip(parts, getattr(layer, name).data.split(sizes), strict=True):
                        getattr(part, name).data = chunk.clone()
        for model in models:
            model.to(memory_format=torch.contiguous_format)
        for attn in attentions:
            for name in ("to_qkv", "to_kv"):
                attn._modules.pop(name, None)
        for obj, name in created:
            vars(obj).pop(name, None)


def _fused_pair(attn: Attention) -> tuple[torch.nn.Linear, tuple[torch.nn.Linear, ...]]:
    """The fused projection and the projections it replaces (cross-attention still reads ``to_q`` itself)."""
    if attn.is_cross_attention:
        return attn.to_kv, (attn.to_k, attn.to_v)
    return attn.to_qkv, (attn.to_q, attn.to_k, attn.to_v)


def _params(layers) -> list[torch.nn.Parameter]:
    return [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]


@dataclass(frozen=True)
class Variant:
    """How to run fastcache on a pipeline: ``compile_pipeline``'s options, plus two switches outside it."""

    config: FastCacheConfig = FastCacheConfig()  # interval, branch and schedule come with each application
    fused_step: bool = False  # the scheduler's step as one Triton launch
    switches: bool = False  # speed_switches: fused QKV, channels_last

    @contextmanager
    def applied(self, pipe, interval: int, branch: int, schedule: str = "uniform") -> Iterator[FastCacheHandle]:
        """The pipeline with this variant on, as a handle; everything is undone on exit."""
        from .handle import compile_pipeline

        scheduler = pipe.scheduler
        with speed_switches(pipe, self.switches):
            if self.fused_step:
                pipe.scheduler = _fused_scheduler()(scheduler)
            try:
                handle = compile_pipeline(pipe, interval, branch, schedule=schedule, config=self.config)
                try:
                    yield handle
                finally:
                    handle.disable()
            finally:
                pipe.scheduler = scheduler


def _fused_scheduler():
    require("kernels")  # the fused step is a Triton kernel
    from .fused_step import fused_scheduler

    return fused_scheduler


_STATIC = FastCacheConfig(mode="static-cudagraphs")
_STATIC_FUSED = Variant(_STATIC, fused_step=True)
# "tuned": every switch whose cost is paid once, no autotuning (the cold compile stays as it is);
# "autotune" adds the guides' coordinate-descent tuning (a longer cold compile).
_TUNED = Variant(_STATIC.replace(inductor_options={"conv_1x1_as_mm": True}, compile_vae=True), fused_step=True,
                 switches=True)
VARIANTS: dict[str, Variant] = {
    "fastcache-eager": Variant(FastCacheConfig(compile=False)),
    "fastcache": Variant(),
    "fastcache-static": Variant(_STATIC),
    "fastcache-static-fused": _STATIC_FUSED,
    "fastcache-tuned": _TUNED,
    "fastcache-autotune": replace(_TUNED, config=_TUNED.config.replace(inductor_options=UNET_INDUCTOR_OPTIONS)),
}
