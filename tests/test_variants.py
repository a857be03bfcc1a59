"""Named variants: each attaches cleanly, runs DeepCache's computation, and leaves the pipeline as it found it."""

from dataclasses import replace

import pytest
import torch
from conftest import helper_run, rel_l2
from diffusers.hooks import HookRegistry

from fastcache.variants import VARIANTS, speed_switches


def snapshot(pipe) -> dict:
    unet = pipe.unet
    return dict(scheduler=pipe.scheduler, unet=dict(vars(unet)), decoder=dict(vars(pipe.vae.decoder)),
                processors={k: type(v) for k, v in unet.attn_processors.items()},
                modules=[name for name, _ in unet.named_modules()],
                channels_last=unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last))


def parameter_count(pipe) -> int:
    return sum(p.numel() for model in (pipe.unet, pipe.vae) for p in model.parameters())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_attaches_and_leaves_the_pipeline_as_it_was(sd_runner, name):
    pipe = sd_runner.pipe
    before, weights = snapshot(pipe), {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    count = parameter_count(pipe)
    with VARIANTS[name].applied(pipe, 3, 0) as handle:
        assert handle.enabled and HookRegistry.check_if_exists_or_initialize(pipe.unet).get_hook("fastcache")
        if VARIANTS[name].switches:
            assert snapshot(pipe)["channels_last"] and hasattr(pipe.unet.mid_block.attentions[0]
                                                                .transformer_blocks[0].attn1, "to_qkv")
        assert parameter_count(pipe) == count, "fused copies must replace the unfused weights, not add to them"
    assert snapshot(pipe) == before
    after = pipe.unet.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())


def test_switches_and_fused_step_compute_what_the_helper_computes(runner):
    """The tuned variant's computation, eagerly: fused QKV + channels_last + the fused step vs the helper."""
    tuned = VARIANTS["fastcache-tuned"]
    variant = replace(tuned, config=tuned.config.replace(compile=False, inductor_options=None, compile_vae=False))
    baseline = runner()
    with speed_switches(runner.pipe):
        expected = helper_run(runner, 3, 1)
    with variant.applied(runner.pipe, 3, 1):
        assert rel_l2(runner(), expected) < 1e-5
    assert torch.equal(runner(), baseline)
