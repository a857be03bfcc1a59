"""WeightsWatch: what a captured CUDA graph cannot see (moved weights, changed modules or processors) is noticed;
in-place updates, which a graph reads by itself, are not."""

import torch
from diffusers.models.attention_processor import AttnProcessor

from fastcache.weights_watch import WeightsWatch


def test_moved_weights_and_changed_modules_are_noticed_but_not_in_place_updates(sd_runner):
    pipe = sd_runner.pipe
    unet = pipe.unet
    watch = WeightsWatch(unet)
    with torch.no_grad():
        unet.conv_in.weight.mul_(0.5)  # in place: a captured graph reads the new values itself
    assert not watch.moved()
    changes = {
        "moved weights": lambda: unet.to(memory_format=torch.channels_last),
        "added modules": pipe.fuse_qkv_projections,
        "replaced module": lambda: setattr(unet, "conv_out", torch.nn.Conv2d(32, 4, 3, padding=1)),
        "new attention processor": lambda: unet.set_attn_processor(AttnProcessor()),
        "replaced parameter": lambda: setattr(unet.conv_in, "bias", torch.nn.Parameter(unet.conv_in.bias.clone())),
        "new buffer": lambda: unet.conv_in.register_buffer("scale", torch.ones(1)),
    }
    for change, apply in changes.items():
        watch.snapshot()
        apply()
        assert watch.moved(), change
        watch.snapshot()
        assert not watch.moved(), change
