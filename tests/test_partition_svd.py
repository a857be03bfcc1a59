import torch
from conftest import svd_unet_inputs
from diffusers import UNetSpatioTemporalConditionModel

from fastcache.partition import branch_positions
from fastcache.partition_svd import SpatioTemporalPartition
from fastcache.video_models import VIDEO_PRESETS


def tiny_unet() -> UNetSpatioTemporalConditionModel:
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(**VIDEO_PRESETS["tiny-svd"]["unet"]).eval()


@torch.no_grad()
def test_every_branch_full_path_equals_the_forward_and_shallow_reproduces_it():
    """Bit for bit: the full path is the UNet's forward at every branch, and a shallow path reading the feature its
    full path wrote from the same inputs changes nothing."""
    unet = tiny_unet()
    inputs = svd_unet_inputs(unet)
    expected = unet(**inputs).sample
    for branch in range(len(branch_positions(unet))):
        part = SpatioTemporalPartition(unet, branch)
        cache = torch.zeros(part.feature_shape(inputs["sample"].shape))
        full = part.full(cache=cache, **inputs)
        assert torch.equal(full, expected), branch
        assert cache.abs().sum() > 0, "the full path must write the feature"
        assert torch.equal(part.shallow(cache=cache, **inputs), full), branch


@torch.no_grad()
def test_feature_is_per_frame_and_read_by_the_shallow_path():
    unet = tiny_unet()
    inputs = svd_unet_inputs(unet, batch=1)
    part = SpatioTemporalPartition(unet, 0)
    assert part.feature_shape(inputs["sample"].shape) == (4, 32, 8, 8)  # batch * frames leading
    cache = torch.zeros(part.feature_shape(inputs["sample"].shape))
    full = part.full(cache=cache, **inputs)
    cache.mul_(0.5)
    assert not torch.allclose(part.shallow(cache=cache, **inputs), full)
