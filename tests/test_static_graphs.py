"""StaticGraphPaths (mode="static-cudagraphs") on a CPU: the compiled paths run directly, nothing is captured,
graphs captured on CUDA are dropped at the next call once the weights moved, and a graph is captured per settings
and replayed only under them (its bookkeeping, with a stand-in capture). Capture and replay are test_gpu's."""

import torch

from fastcache.counters import Counters
from fastcache.graphs import CompiledPaths
from fastcache.partition import UNetPartition, feature_shape
from fastcache.settings import path_settings
from fastcache.static_graphs import StaticGraphPaths, _Graph


def static_paths(unet, monkeypatch) -> tuple[StaticGraphPaths, UNetPartition, Counters]:
    """Static-graph paths over compiled paths whose compiled functions are the eager ones (no inductor here)."""
    partition, counters = UNetPartition(unet, 0), Counters()
    compiled = CompiledPaths(partition, counters, "default")
    monkeypatch.setattr(compiled, "full", partition.full)
    monkeypatch.setattr(compiled, "shallow", partition.shallow)
    return StaticGraphPaths(compiled, unet, counters, path_settings(partition, unet)), partition, counters


def test_without_cuda_the_compiled_paths_run_directly_and_nothing_is_captured(sd_runner, monkeypatch):
    unet = sd_runner.pipe.unet
    paths, partition, counters = static_paths(unet, monkeypatch)
    inputs = dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor(10), encoder_hidden_states=torch.randn(
        2, 77, unet.config.cross_attention_dim), added_cond_kwargs=None, timestep_cond=None, class_labels=None,
        down_block_additional_residuals=None, mid_block_additional_residual=None)
    cache = torch.zeros(feature_shape(unet, partition.boundary, (2, 4, 16, 16)))
    with torch.no_grad():
        expected_full = partition.full(**inputs, cache=cache.clone())
        full = paths(True, "key", dict(inputs, cache=cache))
        shallow = paths(False, "key", dict(inputs, cache=cache))
        expected_shallow = partition.shallow(**inputs, cache=cache)
    assert torch.equal(full, expected_full) and torch.equal(shallow, expected_shallow)
    # the compiled functions are the eager ones here: dynamo made no graph, so counters.compiles counts none
    assert (counters.captures, counters.replays, counters.compiles, paths.graphs) == (0, 0, 0, {})


def test_graphs_are_dropped_at_the_next_call_once_the_weights_moved(sd_runner, monkeypatch):
    paths, _, _ = static_paths(sd_runner.pipe.unet, monkeypatch)
    paths.graphs["captured"] = ["graph"]  # what a capture on CUDA leaves
    paths.pool = "pool"
    paths.start_call()
    assert paths.graphs, "nothing moved: the graphs are kept"
    sd_runner.pipe.unet.to(memory_format=torch.channels_last)
    paths.start_call()
    assert paths.graphs == {} and paths.pool is None


def test_static_graphs_are_captured_once_per_settings_and_the_matching_one_replayed(sd_runner, monkeypatch):
    """The bookkeeping of mode="static-cudagraphs" (a stand-in capture: no CUDA here): settings A, B, A capture two
    graphs and replay A's the third time; new weights drop them, and the next capture is counted with its reason."""
    unet = sd_runner.pipe.unet
    paths, _, counters = static_paths(unet, monkeypatch)
    captures = []

    def capture(full, key, leaves, spec, cache, settings):
        captures.append(len(captures))
        counters.captures += 1
        return _Graph(f"graph {len(captures)}", [], None, settings)

    monkeypatch.setattr(paths, "_capture", capture)
    inputs = dict(sample=torch.zeros(2, 4, 16, 16), cache=None)

    def graph():
        return paths.graph_for(False, "key", inputs, [], None).graph

    assert graph() == "graph 1" and graph() == "graph 1"
    unet.enable_freeu(0.9, 0.2, 1.2, 1.4)
    assert graph() == "graph 2"
    unet.disable_freeu()
    assert graph() == "graph 1"
    assert (counters.captures, counters.recaptures, counters.recapture_reasons) == (2, 1, {"FreeU values": 1})
    unet.to(memory_format=torch.channels_last)
    paths.start_call()
    assert graph() == "graph 3"
    assert counters.recapture_reasons == {"FreeU values": 1, "weights moved or modules changed": 1}
