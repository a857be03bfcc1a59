"""ModelScope's UNet3DConditionModel: the partition against the UNet's forward, and TextToVideoSDPipeline against the
DeepCache helper."""

import pytest
import torch
from conftest import FRAMES, VideoRunner, helper_run, motion_unet_inputs, rel_l2
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel

from fastcache import compile_pipeline
from fastcache.partition import branch_positions
from fastcache.partition_3d import TemporalConvPartition
from fastcache.video_models import ANIMATEDIFF_SCHEDULER, VIDEO_PRESETS

TINY_UNET3D = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, attention_head_dim=8,
                   cross_attention_dim=32, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                   up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))


def tiny_unet() -> UNet3DConditionModel:
    torch.manual_seed(0)
    return UNet3DConditionModel(**TINY_UNET3D).eval()


@torch.no_grad()
def test_every_branch_full_path_equals_the_forward_and_shallow_reproduces_it():
    unet = tiny_unet()
    inputs = motion_unet_inputs(unet)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][::FRAMES]  # per video: the UNet repeats it
    expected = unet(**inputs).sample
    for branch in range(len(branch_positions(unet))):
        part = TemporalConvPartition(unet, branch)
        cache = torch.zeros(part.feature_shape(inputs["sample"].shape))
        full = part.full(cache=cache, **inputs)
        assert torch.equal(full, expected), branch
        assert torch.equal(part.shallow(cache=cache, **inputs), full), branch


@pytest.mark.parametrize("interval, branch", [(2, 0), pytest.param(3, 3, marks=pytest.mark.slow)])
def test_text_to_video_equals_the_helper(interval, branch):
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline(vae=AutoencoderKL(**VIDEO_PRESETS["tiny-animatediff"]["vae"]), text_encoder=None,
                                 tokenizer=None, unet=tiny_unet(), scheduler=DDIMScheduler(**ANIMATEDIFF_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    runner = VideoRunner("tiny-animatediff", pipe)
    expected = helper_run(runner, interval, branch)
    handle = compile_pipeline(pipe, interval, branch, compile=False)
    try:
        got = runner()
    finally:
        handle.disable()
    assert rel_l2(got, expected) < 1e-5
    assert (handle.counters.fallbacks, handle.counters.unplaced) == (0, 0) and handle.counters.shallow > 0
