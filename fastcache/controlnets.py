"""Which partition splits a pipeline's ControlNet: one class per ControlNet family, looked up by the module."""

from __future__ import annotations

from typing import Any

from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from .controlnet import ControlNetPartition, controlnet_nets
from .controlnet_sparse import SparseControlNetPartition

# The ControlNet families fastcache splits, and how an error names them.
CONTROLNET_PARTITIONS = (ControlNetPartition, SparseControlNetPartition)
SUPPORTED_CONTROLNETS = "ControlNetModel, MultiControlNetModel of ControlNetModels and SparseControlNetModel"


def controlnet_partition_class(controlnet: Any, unet: Any) -> type:
    """The partition class for a pipeline's ``controlnet`` beside ``unet``; ``ValueError`` naming what is supported,
    or what its layout must be (before anything is built)."""
    for partition in CONTROLNET_PARTITIONS:
        if partition.takes(controlnet):
            partition.check(controlnet, unet)
            return partition
    bad = sorted({type(net).__name__ for net in controlnet_nets(controlnet) if type(net) is not ControlNetModel})
    found = f"a MultiControlNetModel of {bad}" if isinstance(controlnet, MultiControlNetModel) else bad
    raise ValueError(f"fastcache supports {SUPPORTED_CONTROLNETS}; this pipeline has {found}.")
