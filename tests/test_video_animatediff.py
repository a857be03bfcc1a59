"""AnimateDiff through ``compile_pipeline``: the DeepCache helper's result on the same pipeline, every step placed."""

import pytest
import torch
from conftest import VideoRunner, helper_run, rel_l2

from fastcache import compile_pipeline


@pytest.fixture(scope="module")
def animatediff() -> VideoRunner:
    return VideoRunner("tiny-animatediff")


@pytest.mark.parametrize("interval, branch", [(2, 0), (3, 4), (2, 8)])
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
