"""Compilation of the two UNet paths, and the static feature buffers they share.

All torch.compile / inductor settings of fastcache live here. Each path is compiled on its own with
``fullgraph=True, dynamic=False``: one graph per path and static shape, so a warmed-up shape never recompiles.
The cached feature crosses from the full graph to the shallow graph only through a buffer whose address never
changes (``mark_static_address``), written in place by the full graph. Returning the feature from one graph and
feeding it to the other is what breaks under CUDA graphs: cudagraph trees reuse a call's output memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .partition import UNetPartition, feature_shape

logger = logging.getLogger(__name__)

COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")

# Every (batch, height, width, guidance) shape is one cache entry per path; serving a handful of shapes must not
# hit dynamo's default limit of 8 and fall back to eager.
MIN_RECOMPILE_LIMIT = 64


@dataclass
class Paths:
    """The two callables the dispatcher chooses between, compiled or eager."""

    full: Callable[..., torch.Tensor]
    shallow: Callable[..., torch.Tensor]
    compiled: bool
    mode: str | None


def build_paths(partition: UNetPartition, compile: bool, mode: str) -> Paths:
    """Compile ``partition.full`` and ``partition.shallow`` separately, or return them as they are."""
    if not compile:
        return Paths(partition.full, partition.shallow, compiled=False, mode=None)
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}; got {mode!r}.")
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, MIN_RECOMPILE_LIMIT)
    options = dict(mode=mode, fullgraph=True, dynamic=False)
    return Paths(torch.compile(partition.full, **options), torch.compile(partition.shallow, **options),
                 compiled=True, mode=mode)


class FeatureBuffers:
    """One static feature buffer per input shape, allocated on first use and kept for the handle's life."""

    def __init__(self, partition: UNetPartition):
        self.partition = partition
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._buffers)

    def get(self, key: tuple, sample: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None:
            shape = feature_shape(self.partition.unet, self.partition.boundary, sample.shape)
            buffer = torch.zeros(shape, dtype=self.partition.unet.dtype, device=sample.device)
            torch._dynamo.mark_static_address(buffer)
            self._buffers[key] = buffer
            logger.info("fastcache: new shape %s, feature buffer %s (%.1f MiB)", tuple(sample.shape), shape,
                        buffer.numel() * buffer.element_size() / 2**20)
        return buffer

    def clear(self) -> None:
        self._buffers.clear()


def timed_first_call(fn: Callable[..., torch.Tensor], label: str, *args, **kwargs) -> torch.Tensor:
    """Run ``fn`` and log how long it took (the first call at a shape includes compilation and capture)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    logger.info("fastcache: %s ready in %.1f s", label, time.perf_counter() - start)
    return out


def cudagraph_recordings() -> int:
    """CUDA graphs recorded so far by cudagraph trees on all devices (0 without CUDA).

    Reads inductor's tree managers (internal API, read only): a count that grows after warm-up means re-recording.
    """
    if not torch.cuda.is_available():
        return 0
    from torch._inductor import cudagraph_trees

    total = 0
    for device in range(torch.cuda.device_count()):
        manager = cudagraph_trees.get_manager(device, create_if_none_exists=False)
        if manager is None:
            continue
        stack = [node for nodes in manager.roots.values() for node in nodes]
        while stack:
            node = stack.pop()
            total += 1
            stack.extend(child for children in node.children.values() for child in children)
    return total
