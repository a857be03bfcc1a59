import pytest
import torch
from conftest import motion_unet_inputs

from fastcache.partition import branch_positions
from fastcache.partition_motion import MotionPartition
from fastcache.video_models import VIDEO_PRESETS, motion_unet

TINY = VIDEO_PRESETS["tiny-animatediff"]


@pytest.fixture(params=[True, False], ids=["motion-mid-block", "sd-mid-block"])
def unet(request):
    """The tiny AnimateDiff UNet, with a motion module in its mid block (v1-5-2) and without (v1-5-3)."""
    torch.manual_seed(0)
    return motion_unet(TINY["unet"], dict(TINY["motion"], use_motion_mid_block=request.param)).eval()


@torch.no_grad()
def test_full_path_equals_the_unet_forward_bit_for_bit(unet):
    inputs = motion_unet_inputs(unet)
    expected = unet(**inputs).sample
    for branch in range(len(branch_positions(unet))):
        part = MotionPartition(unet, branch)
        cache = torch.zeros(part.feature_shape(inputs["sample"].shape))
        assert torch.equal(part.full(cache=cache, **inputs), expected), branch
        assert cache.abs().sum() > 0, "the full path must write the feature"


@torch.no_grad()
def test_shallow_path_on_the_same_inputs_reproduces_the_full_step(unet):
    inputs = motion_unet_inputs(unet)
    for branch in range(len(branch_positions(unet))):
        part = MotionPartition(unet, branch)
        cache = torch.zeros(part.feature_shape(inputs["sample"].shape))
        full = part.full(cache=cache, **inputs)
        assert torch.equal(part.shallow(cache=cache, **inputs), full), branch


@torch.no_grad()
def test_feature_is_per_frame_and_read_by_the_shallow_path(unet):
    inputs = motion_unet_inputs(unet, batch=2)
    part = MotionPartition(unet, 0)
    assert part.feature_shape(inputs["sample"].shape) == (2 * 4, 32, 8, 8)  # batch * frames leading
    cache = torch.zeros(part.feature_shape(inputs["sample"].shape))
    full = part.full(cache=cache, **inputs)
    cache[:4].mul_(0.5)  # the first video's frames only
    shallow = part.shallow(cache=cache, **inputs)
    assert not torch.allclose(shallow[0], full[0]) and torch.equal(shallow[1], full[1])


def test_a_skip_step_runs_the_motion_modules_of_the_layers_it_computes_and_no_others(unet):
    """Motion modules belong to the layer they follow: the shallow path at branch 0 runs those of the first down
    layer... none deeper, and the last up block's last layer's; the full path runs every one."""
    inputs = motion_unet_inputs(unet)
    part = MotionPartition(unet, 0)
    cache = torch.zeros(part.feature_shape(inputs["sample"].shape))
    ran = []
    hooks = [m.register_forward_hook(lambda module, *_: ran.append(module))
             for block in (*unet.down_blocks, *unet.up_blocks) for m in block.motion_modules]
    try:
        with torch.no_grad():
            part.full(cache=cache, **inputs)
            full, ran[:] = list(ran), []
            part.shallow(cache=cache, **inputs)
    finally:
        for hook in hooks:
            hook.remove()
    every = [m for block in (*unet.down_blocks, *unet.up_blocks) for m in block.motion_modules]
    assert sorted(map(id, full)) == sorted(map(id, every))
    assert ran == [unet.up_blocks[-1].motion_modules[-1]]  # branch 0: no down layer, the last up layer
    part = MotionPartition(unet, 1)
    ran[:] = []
    hooks = [m.register_forward_hook(lambda module, *_: ran.append(module)) for m in every]
    try:
        with torch.no_grad():
            part.shallow(cache=torch.zeros(part.feature_shape(inputs["sample"].shape)), **inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [unet.down_blocks[0].motion_modules[0], *unet.up_blocks[-1].motion_modules[-2:]]
