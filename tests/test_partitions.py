import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel, UNetSpatioTemporalConditionModel

from fastcache.models import PRESETS
from fastcache.partition import UNetPartition
from fastcache.partition_motion import MotionPartition
from fastcache.partition_svd import SpatioTemporalPartition
from fastcache.partitions import check_unet, make_partition
from fastcache.video_models import VIDEO_PRESETS, motion_unet


def test_each_unet_family_gets_its_partition():
    torch.manual_seed(0)
    tiny = VIDEO_PRESETS["tiny-animatediff"]
    assert type(make_partition(UNet2DConditionModel(**PRESETS["tiny-sd"]["unet"]), 0)) is UNetPartition
    assert type(make_partition(motion_unet(tiny["unet"], tiny["motion"]), 0)) is MotionPartition
    svd = UNetSpatioTemporalConditionModel(**VIDEO_PRESETS["tiny-svd"]["unet"])
    assert type(make_partition(svd, 0)) is SpatioTemporalPartition


def test_an_unsupported_unet_class_is_refused_naming_the_supported_ones():
    unet = UNet2DModel(block_out_channels=(32, 64), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2)
    message = ("supports UNet2DConditionModel, UNetMotionModel, UNetSpatioTemporalConditionModel and "
               "UNet3DConditionModel; got UNet2DModel")
    with pytest.raises(ValueError, match=message):
        check_unet(unet)
    with pytest.raises(ValueError, match=message):
        make_partition(unet, 0)


def test_a_branch_out_of_range_names_the_range_for_a_video_unet():
    svd = UNetSpatioTemporalConditionModel(**VIDEO_PRESETS["tiny-svd"]["unet"])
    with pytest.raises(ValueError, match=r"branch must be an int in \[0, 5\]"):
        make_partition(svd, 6)


def test_i2vgenxl_is_refused_naming_the_supported_unets():
    from diffusers import I2VGenXLUNet

    unet = I2VGenXLUNet(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                        attention_head_dim=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    with pytest.raises(ValueError, match="fastcache supports UNet2DConditionModel, .* got I2VGenXLUNet"):
        make_partition(unet, 0)
