"""The compiled runtime: inductor on CPU here (CUDA graphs on CUDA), same code path as on a GPU."""

import pytest
import torch
from conftest import Runner, helper_run, rel_l2
from torch._dynamo.utils import counters as dynamo_counters

from fastcache import compile_pipeline
from fastcache.counters import Counters
from fastcache.graphs import UNET_INDUCTOR_OPTIONS, CompiledPaths, Paths, compile_options
from fastcache.partition import UNetPartition, feature_shape
from fastcache.variants import speed_switches


@pytest.mark.parametrize("preset, guidance", [("tiny-sd", 7.5), ("tiny-sdxl", 1.0)], ids=["sd-cfg", "sdxl-no-cfg"])
def test_compiled_paths_match_the_helper_and_never_recompile(preset, guidance):
    runner = Runner(preset)
    expected = helper_run(runner, 3, 1, guidance_scale=guidance)
    handle = compile_pipeline(runner.pipe, 3, 1)
    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    first = runner(guidance_scale=guidance)
    assert rel_l2(first, expected) < 1e-4
    assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 2, "one graph per path"

    with torch.compiler.set_stance("fail_on_recompile"):
        second = runner(guidance_scale=guidance)
    assert torch.equal(second, first)
    assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 2
    assert (handle.counters.full, handle.counters.shallow, handle.counters.shapes) == (8, 12, 1)
    assert handle.counters.compiles == 2, "one compilation per (shape, path)"

    handle.disable()
    assert torch.equal(runner(guidance_scale=guidance), Runner(preset)(guidance_scale=guidance))


def test_compile_false_runs_the_partition_itself(sd_runner):
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    assert type(handle.paths) is Paths
    assert handle.paths.path(True) == handle.partition.full and handle.paths.path(False) == handle.partition.shallow


def test_tuned_pipeline_with_inductor_options_and_compiled_decoder(sd_runner):
    """The guides' recipe: fused QKV, channels_last, inductor options, compiled VAE decoder; three graphs."""
    pipe = sd_runner.pipe
    with speed_switches(pipe):
        plain = sd_runner(output_type="pt")
        expected_latents = helper_run(sd_runner, 3, 1)
        eager = compile_pipeline(pipe, 3, 1, compile=False)
        expected_images = sd_runner(output_type="pt")
        eager.disable()
        decoder_attributes = dict(vars(pipe.vae.decoder))

        handle = compile_pipeline(pipe, 3, 1, inductor_options=UNET_INDUCTOR_OPTIONS, compile_vae=True)
        graphs_before = dynamo_counters["stats"]["unique_graphs"]
        assert rel_l2(sd_runner(), expected_latents) < 1e-4
        images = sd_runner(output_type="pt")
        assert rel_l2(images, expected_images) < 1e-4
        assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 3, "full, shallow, decoder"
        with torch.compiler.set_stance("fail_on_recompile"):
            assert torch.equal(sd_runner(output_type="pt"), images)
        handle.disable()
        assert vars(pipe.vae.decoder) == decoder_attributes
        assert torch.equal(sd_runner(output_type="pt"), plain), "disable() restores the eager decoder"


def test_inductor_options_merge_into_the_mode():
    assert compile_options("reduce-overhead", None) == {"mode": "reduce-overhead"}
    assert compile_options("reduce-overhead", {"conv_1x1_as_mm": True}) == {
        "options": {"triton.cudagraphs": True, "conv_1x1_as_mm": True}}


def test_a_shape_whose_compile_fails_runs_eagerly_from_then_on(sd_runner, monkeypatch):
    partition = UNetPartition(sd_runner.pipe.unet, 0)
    counters = Counters()
    paths = CompiledPaths(partition, counters, "default")
    attempts = []

    def failing_compile(**inputs):  # stands in for inductor failing at this shape
        attempts.append(1)
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(paths, "full", failing_compile)
    unet = sd_runner.pipe.unet
    inputs = dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor(10), encoder_hidden_states=torch.randn(
        2, 77, unet.config.cross_attention_dim), added_cond_kwargs=None, timestep_cond=None, class_labels=None,
        down_block_additional_residuals=None, mid_block_additional_residual=None,
        cache=torch.empty(feature_shape(unet, partition.boundary, (2, 4, 16, 16))))
    with torch.no_grad():
        expected = partition.full(**dict(inputs, cache=inputs["cache"].clone()))
        first = paths(True, "key", inputs)
        second = paths(True, "key", inputs)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert attempts == [1]  # not compiled again at every call
    assert counters.compile_failures == 1 and counters.compiles == 0


def test_the_recompile_limit_is_raised_while_compiled_handles_are_enabled_and_then_put_back():
    first, second = Runner("tiny-sd"), Runner("tiny-sd")
    with torch._dynamo.config.patch(recompile_limit=8):
        eager = compile_pipeline(first.pipe, 3, 0, compile=False)
        assert torch._dynamo.config.recompile_limit == 8, "an eager handle compiles nothing"
        eager.disable()
        handles = [compile_pipeline(runner.pipe, 3, 0) for runner in (first, second)]  # nothing compiles yet
        assert torch._dynamo.config.recompile_limit == 64
        handles[0].disable()
        assert torch._dynamo.config.recompile_limit == 64, "the second handle is still enabled"
        handles[1].disable()
        assert torch._dynamo.config.recompile_limit == 8
        handles[0].enable()
        torch._dynamo.config.recompile_limit = 100  # the user's own setting wins over ours
        handles[0].disable()
        assert torch._dynamo.config.recompile_limit == 100
