"""The pipelines people run on top of the UNet, each against the DeepCache helper on the same pipeline: inpainting
(SD and SDXL, 9- and 4-channel UNets), the SDXL refiner and the base+refiner hand-off, T2I-Adapters. Each runs the
cached path: no fallback to the original forward, shallow steps as the schedule says."""

import contextlib

import pytest
import torch
from conftest import STEPS, AdapterRunner, InpaintRunner, RefinerRunner, deepcache_helper, helper_run, rel_l2
from torch._dynamo.utils import counters as dynamo_counters

from fastcache import compile_pipeline

slow = pytest.mark.slow


def assert_cached_like_the_helper(runner, interval: int, branch: int, oracle=helper_run, **kwargs):
    """``runner`` under an eager handle equals ``oracle`` (the helper) within float rounding, on the cached path."""
    expected = oracle(runner, interval, branch, **kwargs)
    handle = compile_pipeline(runner.pipe, interval, branch, compile=False)
    try:
        assert rel_l2(runner(**kwargs), expected) < 1e-5
    finally:
        handle.disable()
    counters = handle.counters
    assert counters.fallbacks == 0 and counters.unplaced == 0 and counters.shallow > 0, counters
    return counters


@pytest.mark.parametrize("preset, channels, strength, crop, branch", [
    ("tiny-sd", 9, 1.0, None, 4),
    ("tiny-sdxl", 4, 0.6, None, 1),
    ("tiny-sd", 4, 1.0, 2, 2),
    *(pytest.param(preset, channels, strength, crop, branch, marks=slow)
      for preset, branch in (("tiny-sd", 0), ("tiny-sdxl", 5)) for channels in (9, 4) for strength in (0.6, 1.0)
      for crop in (None, 2)),
])
def test_inpainting_equals_the_helper(preset, channels, strength, crop, branch):
    """A 9-channel UNet takes the mask and masked image as input; with a 4-channel one the pipeline blends the
    masked image back in after every step; strength < 1 starts mid-schedule; padding_mask_crop crops the image and
    mask around the masked area (the UNet sees the same size) and pastes the result back."""
    runner = InpaintRunner(preset, channels)
    counters = assert_cached_like_the_helper(runner, 3, branch, strength=strength, padding_mask_crop=crop)
    steps = round(10 * strength)
    assert (counters.full, counters.shallow) == ((steps + 2) // 3, steps - (steps + 2) // 3)


def test_the_sdxl_refiner_equals_the_helper():
    """The refiner's UNet takes aesthetic-score time ids and a narrower context than the base's."""
    runner = RefinerRunner()
    counters = assert_cached_like_the_helper(runner, 3, 3)
    assert (counters.full, counters.shallow) == (2, 4), "20 steps at strength 0.3: 6 steps"


@pytest.mark.parametrize("branches", [(0, 0), pytest.param((5, 9), marks=slow)])
def test_the_base_and_refiner_hand_off_equals_two_helpers(branches):
    """Base until 80 %, refiner from there on its latents: two pipelines, two UNets, each its own handle."""
    runner = RefinerRunner()
    base_branch, refiner_branch = branches
    with deepcache_helper(runner.base.pipe, 3, base_branch), deepcache_helper(runner.pipe, 3, refiner_branch):
        expected = runner.hand_off()
    base = compile_pipeline(runner.base.pipe, 3, base_branch, compile=False)
    refiner = compile_pipeline(runner.pipe, 3, refiner_branch, compile=False)
    assert rel_l2(runner.hand_off(), expected) < 1e-5
    assert (base.counters.full, base.counters.shallow, base.counters.fallbacks) == (6, 10, 0), "16 of 20 steps"
    assert (refiner.counters.full, refiner.counters.shallow, refiner.counters.fallbacks) == (2, 2, 0), "4 steps"


@contextlib.contextmanager
def helper_without_in_place_mid(pipe, interval: int, branch: int, **corrections):
    """The helper, except that the UNet's in-place add of an adapter's mid residual (``sample += ...``) lands on a
    copy of the mid block's output instead of on the helper's cached one. Unchanged, the helper adds that residual
    again to its cache at every skip step (relative L2 1e-3 at SDXL's deepest branch): a defect we do not copy.
    ``corrections``: ``deepcache_helper``'s."""
    with deepcache_helper(pipe, interval, branch, **corrections):
        mid = pipe.unet.mid_block
        cached_forward = mid.forward
        mid.forward = lambda *args, **kwargs: cached_forward(*args, **kwargs).clone()
        try:
            yield
        finally:
            mid.forward = cached_forward


def adapter_oracle(runner, interval, branch, extra_full=(), **kwargs):
    with helper_without_in_place_mid(runner.pipe, interval, branch, extra_full=extra_full):
        return runner(**kwargs)


ADAPTER_CASES = [("tiny-sd", 1, 2),  # the shallow path adds the first block's residual (after its last layer)
                 ("tiny-sdxl", 2, 8)]  # the cached feature is the mid block's output: its residual is added to it


@pytest.mark.parametrize("preset, count, branch", [
    *ADAPTER_CASES,
    *(pytest.param(preset, count, branch, marks=slow) for preset in ("tiny-sd", "tiny-sdxl") for count in (1, 2)
      for branch in range(9) if (preset, count, branch) not in ADAPTER_CASES),
])
def test_t2i_adapters_equal_the_helper(preset, count, branch):
    runner = AdapterRunner(preset, count)
    scales = dict(adapter_conditioning_scale=[0.8, 1.2]) if count > 1 else {}
    assert_cached_like_the_helper(runner, 3, branch, oracle=adapter_oracle, **scales)


@slow
@pytest.mark.parametrize("factor, full", [(0.6, 4), (0.5, 5)], ids=["ends-on-a-full-step", "ends-on-a-skip-step"])
def test_an_sdxl_adapter_that_stops_early(factor, full):
    """With ``adapter_conditioning_factor`` < 1 the residuals stop mid-call: another input signature, whose buffer
    holds no feature of this call, so that step runs full (one more than the helper's when it was a skip step). The
    oracle is the helper with that one step run full too (``extra_full``); the helper alone reuses there the feature
    of a step with the adapter's residuals, which fastcache does not."""
    runner = AdapterRunner("tiny-sdxl")
    first_without = int(STEPS * factor)  # the pipeline adds the residuals while i < int(steps * factor)
    expected = adapter_oracle(runner, 3, 5, extra_full={first_without}, adapter_conditioning_factor=factor)
    handle = compile_pipeline(runner.pipe, 3, 5, compile=False)
    out = runner(adapter_conditioning_factor=factor)
    assert (handle.counters.full, handle.counters.fallbacks, handle.counters.shapes) == (full, 0, 2)
    assert rel_l2(out, expected) < 1e-5


@slow  # ~2.5 min compiled: CI's compiled representative of residuals added to the UNet is test_controlnet's
def test_a_compiled_t2i_adapter_pipeline_equals_the_helper_and_never_recompiles():
    runner = AdapterRunner("tiny-sdxl")
    expected = adapter_oracle(runner, 3, 5)
    handle = compile_pipeline(runner.pipe, 3, 5)
    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    first = runner()
    assert rel_l2(first, expected) < 1e-4
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(runner(), first)
    assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 2 == handle.counters.compiles
    assert (handle.counters.shallow, handle.counters.fallbacks) == (12, 0)
    handle.disable()


@slow
def test_compiled_inpainting_and_hand_off_equal_the_helper():
    inpaint = InpaintRunner("tiny-sdxl", 9)
    expected = helper_run(inpaint, 3, 4)
    handle = compile_pipeline(inpaint.pipe, 3, 4)
    assert rel_l2(inpaint(), expected) < 1e-4
    assert (handle.counters.compiles, handle.counters.fallbacks) == (2, 0)
    handle.disable()
    runner = RefinerRunner()
    with deepcache_helper(runner.base.pipe, 3, 0), deepcache_helper(runner.pipe, 3, 0):
        expected = runner.hand_off()
    handles = [compile_pipeline(pipe, 3, 0) for pipe in (runner.base.pipe, runner.pipe)]
    assert rel_l2(runner.hand_off(), expected) < 1e-4
    assert [(h.counters.compiles, h.counters.fallbacks) for h in handles] == [(2, 0), (2, 0)]


@torch.no_grad()
def test_adapter_residuals_the_paths_cannot_add_as_the_unet_would_run_the_original_forward(caplog):
    """Residuals whose shapes differ from where they land (the UNet would broadcast them, or fail), and diffusers'
    deprecated T2I call (down_block_additional_residuals without a mid residual): the plain UNet, counted."""
    runner = AdapterRunner("tiny-sd")
    unet = runner.pipe.unet
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = runner.embeds["prompt_embeds"].repeat(2, 1, 1)
    features = [f.repeat(2, 1, 1, 1) for f in runner.pipe.adapter(runner.image)]
    calls = [dict(down_intrablock_additional_residuals=[features[0][:1], *features[1:]]),  # batch 1 of 2
             dict(down_block_additional_residuals=features)]
    plain = [unet(sample, 501, context, **{k: list(v) for k, v in call.items()}).sample for call in calls]
    handle = compile_pipeline(runner.pipe, 3, 0, compile=False)
    for call, expected in zip(calls, plain, strict=True):
        assert torch.equal(unet(sample, 501, context, **{k: list(v) for k, v in call.items()}).sample, expected)
    assert handle.counters.fallbacks == 2 and handle.counters.full == 0
    assert "T2I-Adapter residuals of shapes [(1, 32, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]" in caplog.text
    assert "deprecated T2I-Adapter call" in caplog.text
