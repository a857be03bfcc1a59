"""Counters: each field counts the event it documents, as one handle sees them (eager runtime)."""

import torch

from fastcache import compile_pipeline
from fastcache.counters import Counters


def test_each_unet_evaluation_is_counted_by_what_it_did(sd_runner):
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    assert handle.counters == Counters()
    sd_runner(steps=4)  # full at steps 0 and 3
    assert (handle.counters.full, handle.counters.shallow, handle.counters.unplaced) == (2, 2, 0)
    unet = sd_runner.pipe.unet
    with torch.no_grad():  # a timestep no scheduler holds: placed in no loop, full
        unet(torch.randn(2, 4, 16, 16), 500, sd_runner.embeds["prompt_embeds"].repeat(2, 1, 1))
    assert (handle.counters.full, handle.counters.unplaced) == (3, 1)
    sd_runner(steps=2, cross_attention_kwargs={"unused": 1})  # an argument the paths do not split: the original
    assert handle.counters.fallbacks == 2 and handle.counters.full == 3
    sd_runner(steps=2, size=64)
    assert handle.counters.shapes == 2
    assert (handle.counters.compiles, handle.counters.captures, handle.counters.replays,
            handle.counters.compile_failures, handle.counters.restores) == (0, 0, 0, 0, 0)
    handle.disable()
