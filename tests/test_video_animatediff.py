"""AnimateDiff through ``compile_pipeline``: the DeepCache helper's result on the same pipeline, every step placed."""

import pytest
import torch
from conftest import VideoRunner, helper_run, rel_l2
from torch._dynamo.utils import counters as dynamo_counters

from fastcache import compile_pipeline


@pytest.fixture(scope="module")
def animatediff() -> VideoRunner:
    return VideoRunner("tiny-animatediff")


slow = pytest.mark.slow


@pytest.mark.parametrize("interval, branch", [(2, 0), pytest.param(3, 4, marks=slow), pytest.param(2, 8, marks=slow)])
def test_eager_equals_the_helper(animatediff, interval, branch):
    expected = helper_run(animatediff, interval, branch)
    handle = compile_pipeline(animatediff.pipe, interval, branch, compile=False)
    try:
        got = animatediff()
    finally:
        handle.disable()
    assert rel_l2(got, expected) < 1e-5
    counters = handle.counters
    assert counters.fallbacks == 0 and counters.unplaced == 0
    assert counters.shallow > 0 and counters.full + counters.shallow == 5


def test_interval_one_is_the_plain_pipeline_bit_for_bit(animatediff):
    plain = animatediff()
    handle = compile_pipeline(animatediff.pipe, 1, 0, compile=False)
    try:
        got = animatediff()
    finally:
        handle.disable()
    assert torch.equal(got, plain) and handle.counters.fallbacks == 0


def test_compiled_equals_the_helper_and_compiles_nothing_on_a_second_call(animatediff):
    """Compiled (both paths, dynamic batch): the helper's result within 1e-4, two graphs, and a second call at the same
    shape compiles nothing (dynamo would fail on any recompile)."""
    expected = helper_run(animatediff, 2, 1)
    handle = compile_pipeline(animatediff.pipe, 2, 1)
    try:
        graphs_before = dynamo_counters["stats"]["unique_graphs"]
        first = animatediff()
        assert rel_l2(first, expected) < 1e-4
        with torch.compiler.set_stance("fail_on_recompile"):
            assert torch.equal(animatediff(), first)
        assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 2 == handle.counters.compiles
        assert (handle.counters.recompiles, handle.counters.fallbacks, handle.counters.compile_failures) == (0, 0, 0)
    finally:
        handle.disable()


def test_more_frames_than_the_motion_adapter_takes_is_a_clear_error_and_changes_nothing(animatediff):
    """diffusers fails with a shape error deep in a motion module; the handle names the limit and FreeNoise, before
    anything runs, and the next call is the helper's as before."""
    handle = compile_pipeline(animatediff.pipe, 2, 0, compile=False)
    try:
        with pytest.raises(ValueError, match=r"at most 32 frames \(motion_max_seq_length\); got 33.*enable_free_noise"):
            animatediff(frames=33, steps=2)
        assert (handle.counters.shapes, handle.counters.full, handle.counters.fallbacks) == (0, 0, 0)
        handle.disable()
        expected = helper_run(animatediff, 2, 0)
        handle.enable()
        assert rel_l2(animatediff(), expected) < 1e-5 and handle.counters.fallbacks == 0
    finally:
        handle.disable()


def test_latents_the_cut_cannot_take_run_the_original_forward(animatediff, caplog):
    """A direct call at 6x6 latents (not a multiple of the UNet's 4): the UNet's own forward, with a warning naming the
    multiple. (Pipelines refuse such sizes themselves: they need multiples of 8 pixels.)"""
    unet = animatediff.pipe.unet
    inputs = dict(sample=torch.randn(1, 4, 2, 6, 6), timestep=torch.tensor(11),
                  encoder_hidden_states=torch.randn(2, 77, 32))
    with torch.no_grad():
        expected = unet(**inputs).sample
        handle = compile_pipeline(animatediff.pipe, 2, 0, compile=False)
        try:
            got = unet(**inputs).sample
        finally:
            handle.disable()
    assert torch.equal(got, expected) and handle.counters.fallbacks == 1
    assert "fastcache needs multiples of 4 latents" in caplog.text
