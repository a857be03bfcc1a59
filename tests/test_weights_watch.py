"""WeightsWatch: what a captured CUDA graph cannot see (moved weights, changed modules) is noticed; in-place updates,
which a graph reads by itself, are not. (Attention processors that are plain objects are a setting, checked before
every replay: test_settings.py.)"""

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

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
        "a processor that is a module (IP-Adapter)": lambda: unet.set_attn_processor(
            IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=32)),
        "replaced parameter": lambda: setattr(unet.conv_in, "bias", torch.nn.Parameter(unet.conv_in.bias.clone())),
        "new buffer": lambda: unet.conv_in.register_buffer("scale", torch.ones(1)),
    }
    for change, apply in changes.items():
        watch.snapshot()
        apply()
        assert watch.moved(), change
        watch.snapshot()
        assert not watch.moved(), change
