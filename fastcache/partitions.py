"""Which partition cuts a UNet: one class per UNet family, looked up by the UNet's class."""

from __future__ import annotations

from typing import Any

from .partition import UNetPartition
from .partition_3d import TemporalConvPartition
from .partition_motion import MotionPartition
from .partition_svd import SpatioTemporalPartition

# The UNet families fastcache cuts, by the UNet class each partition takes.
PARTITIONS: tuple[type[UNetPartition], ...] = (UNetPartition, MotionPartition, SpatioTemporalPartition,
                                                TemporalConvPartition)


def partition_class(unet: Any) -> type[UNetPartition]:
    """The partition class for ``unet``; ``ValueError`` naming the supported UNet classes."""
    for partition in PARTITIONS:
        if isinstance(unet, partition.unet_class):
            return partition
    names = [p.unet_class.__name__ for p in PARTITIONS]
    raise ValueError(f"fastcache supports {', '.join(names[:-1])} and {names[-1]}; got {type(unet).__name__}.")


def check_unet(unet: Any) -> None:
    """``ValueError`` naming what is supported unless ``unet`` is of a family fastcache cuts (``PARTITIONS``) with the
    standard down/mid/up layout."""
    partition_class(unet).check(unet)


def make_partition(unet: Any, branch: int) -> UNetPartition:
    """The partition of ``unet`` at ``branch``; ``ValueError`` (before anything is built) naming what is valid."""
    return partition_class(unet)(unet, branch)
