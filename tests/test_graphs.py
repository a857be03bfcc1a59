"""The compiled runtime: inductor on CPU here (CUDA graphs on CUDA), same code path as on a GPU."""

import pytest
import torch
from conftest import Runner, rel_l2
from test_handle import helper_run
from torch._dynamo.utils import counters as dynamo_counters

from fastcache import compile_pipeline
from fastcache.graphs import COMPILE_MODES, Paths, build_paths
from fastcache.partition import UNetPartition


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

    handle.disable()
    assert torch.equal(runner(guidance_scale=guidance), Runner(preset)(guidance_scale=guidance))


def test_compile_false_returns_the_eager_methods(sd_runner):
    partition = UNetPartition(sd_runner.pipe.unet, 0)
    paths = build_paths(partition, compile=False, mode="reduce-overhead")
    assert type(paths) is Paths and paths.full == partition.full and paths.shallow == partition.shallow
    assert "reduce-overhead" in COMPILE_MODES
