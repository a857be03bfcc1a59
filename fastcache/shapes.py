"""Static shapes: the key that names a UNet input signature, and the feature buffer kept for each.

Every distinct input signature (batch, height, width, guidance on/off, dtypes) is its own static shape: one graph
per path, one feature buffer. One function builds the key, for the buffers and for hand-captured graphs alike.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import torch

from .partition import UNetPartition

logger = logging.getLogger(__name__)


def shape_key(inputs: dict[str, Any]) -> tuple:
    """What a compiled graph specialises on: each tensor's dtype, shape and device, and every other value itself."""
    return tuple((name, signature(value)) for name, value in inputs.items() if value is not None)


def signature(value: Any) -> Any:
    """A value's part of a shape key."""
    if isinstance(value, torch.Tensor):  # runs on every UNet evaluation: the common case first
        return value.dtype, value.shape, value.device
    if isinstance(value, dict):
        return tuple((name, signature(v)) for name, v in value.items())
    if isinstance(value, (list, tuple)):  # IP-Adapter's image embeddings are a list of tensors
        return type(value), tuple(signature(v) for v in value)
    return value if isinstance(value, Hashable) else repr(value)


def on_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it on ``device`` and contiguous: a CPU tensor would be baked into a CUDA graph as
    it was, and the graphs specialise on strides, which the shape key does not hold (img2img's latents, encoded by
    the VAE, arrive channels-last: without this they compiled both paths again)."""
    if isinstance(value, torch.Tensor):
        value = value if value.device == device else value.to(device, non_blocking=True)
        return value.contiguous()
    if isinstance(value, dict):
        return {name: on_device(v, device) for name, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_device(v, device) for v in value)
    return value


class FeatureBuffers:
    """One static feature buffer per input shape, allocated on first use and kept for the handle's life.

    Its address never changes (``mark_static_address``): the full graph writes it in place and the shallow graph
    reads it, so no graph output crosses from one graph to the other (cudagraph trees reuse output memory).
    """

    def __init__(self, partition: UNetPartition):
        self.partition = partition
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._buffers)

    def __contains__(self, key: tuple) -> bool:
        return key in self._buffers

    def values(self):
        return self._buffers.values()

    def get(self, key: tuple, sample: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None:
            shape = self.partition.feature_shape(sample.shape)
            buffer = torch.zeros(shape, dtype=self.partition.unet.dtype, device=sample.device)
            torch._dynamo.mark_static_address(buffer)
            self._buffers[key] = buffer
            logger.info("fastcache: new shape %s, feature buffer %s (%.1f MiB)", tuple(sample.shape), shape,
                        buffer.numel() * buffer.element_size() / 2**20)
        return buffer
