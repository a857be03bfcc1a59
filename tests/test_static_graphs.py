"""StaticGraphPaths (mode="static-cudagraphs") on a CPU: without CUDA the compiled paths run directly; with a stand-in
for the CUDA runtime (streams, pool, graph) its own capture and replay run, and what it replays is checked against
the eager paths. Real capture and replay are test_gpu's."""

from contextlib import contextmanager, nullcontext

import pytest
import torch

from fastcache.counters import Counters
from fastcache.graphs import CompiledPaths
from fastcache.partition import UNetPartition, feature_shape
from fastcache.settings import path_settings
from fastcache.static_graphs import StaticGraphPaths

FREEU = ("s1", "s2", "b1", "b2")  # the Python floats enable_freeu sets on each up block: a graph bakes them in


def static_paths(unet, monkeypatch) -> tuple[StaticGraphPaths, UNetPartition, Counters]:
    """Static-graph paths over compiled paths whose compiled functions are the eager ones (no inductor here)."""
    partition, counters = UNetPartition(unet, 0), Counters()
    compiled = CompiledPaths(partition, counters, "default")
    monkeypatch.setattr(compiled, "full", RecordedGraph.recorded(partition.full, unet))
    monkeypatch.setattr(compiled, "shallow", RecordedGraph.recorded(partition.shallow, unet))
    return StaticGraphPaths(compiled, unet, counters, path_settings(partition, unet)), partition, counters


class RecordedGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on a CPU, with a CUDA graph's semantics: a capture records the path
    call made inside it (its static input tensors, its output tensors, and the FreeU values, which a real graph bakes
    in as constants); a replay runs it again on those same static inputs, under the recorded FreeU values, and writes
    into those same output tensors. Whatever the replay should see must have been copied into the static inputs."""

    capturing = None  # the graph being captured

    def __init__(self):
        self.calls = []

    @classmethod
    def recorded(cls, path, unet):
        def run(**inputs):
            out = path(**inputs)
            if cls.capturing is not None:
                cls.capturing.calls.append((path, unet, inputs, out, freeu_values(unet)))
            return out

        return run

    def replay(self):
        for path, unet, inputs, out, baked in self.calls:
            current = freeu_values(unet)
            set_freeu_values(unet, baked)
            try:
                out.copy_(path(**inputs))
            finally:
                set_freeu_values(unet, current)


def freeu_values(unet) -> list[tuple]:
    return [tuple(getattr(block, name, None) for name in FREEU) for block in unet.up_blocks]


def set_freeu_values(unet, values: list[tuple]) -> None:
    for block, block_values in zip(unet.up_blocks, values, strict=True):
        for name, value in zip(FREEU, block_values, strict=True):
            setattr(block, name, value)


@contextmanager
def graph_capture(graph, pool=None, stream=None):
    RecordedGraph.capturing = graph
    try:
        yield
    finally:
        RecordedGraph.capturing = None


class Stream:
    def wait_stream(self, other):
        pass


class OnTheDevice(torch.Tensor):
    """A CPU tensor that says it is on CUDA, so that StaticGraphPaths takes its capture-and-replay route (operations on
    it give plain tensors)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def is_cuda(self):
        return True


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """The CUDA runtime pieces StaticGraphPaths uses, standing in on a CPU; everything else is its own code."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordedGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())


def path_inputs(unet, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor(100 + seed),
                encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
                added_cond_kwargs=None, timestep_cond=None, class_labels=None, down_block_additional_residuals=None,
                mid_block_additional_residual=None)


class Steps:
    """Full and shallow evaluations through the static-graph paths, each beside the same evaluation of the eager
    partition on a cache of its own."""

    def __init__(self, paths, partition, unet):
        self.paths, self.partition, self.unet = paths, partition, unet
        self.cache = torch.zeros(feature_shape(unet, partition.boundary, (2, 4, 16, 16)))
        self.eager_cache = self.cache.clone()

    def __call__(self, full: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the static-graph paths' output, the eager partition's)."""
        inputs = path_inputs(self.unet, seed)
        with torch.no_grad():
            expected = (self.partition.full if full else self.partition.shallow)(**inputs, cache=self.eager_cache)
            on_device = dict(inputs, sample=inputs["sample"].as_subclass(OnTheDevice), cache=self.cache)
            got = self.paths(full, "key", on_device)
        return got, expected


def test_without_cuda_the_compiled_paths_run_directly_and_nothing_is_captured(sd_runner, monkeypatch):
    unet = sd_runner.pipe.unet
    paths, partition, counters = static_paths(unet, monkeypatch)
    inputs = path_inputs(unet, 0)
    cache = torch.zeros(feature_shape(unet, partition.boundary, (2, 4, 16, 16)))
    with torch.no_grad():
        expected_full = partition.full(**inputs, cache=cache.clone())
        full = paths(True, "key", dict(inputs, cache=cache))
        shallow = paths(False, "key", dict(inputs, cache=cache))
        expected_shallow = partition.shallow(**inputs, cache=cache)
    assert torch.equal(full, expected_full) and torch.equal(shallow, expected_shallow)
    # the compiled functions are the eager ones here: dynamo made no graph, so counters.compiles counts none
    assert (counters.captures, counters.replays, counters.compiles, paths.graphs) == (0, 0, 0, {})


@pytest.mark.usefixtures("stand_in_cuda")
def test_each_path_is_captured_once_and_replayed_on_each_calls_inputs(sd_runner, monkeypatch):
    """Every call replays its path's graph after copying its inputs in; the full path's graph writes the feature the
    shallow one reads; each output is a copy, which the next replay does not overwrite."""
    unet = sd_runner.pipe.unet
    paths, partition, counters = static_paths(unet, monkeypatch)
    step = Steps(paths, partition, unet)
    outputs = [step(full, seed) for seed, full in enumerate((True, False, False, True, False))]
    for got, expected in outputs:
        assert torch.equal(got, expected)
    assert torch.equal(step.cache, step.eager_cache)
    assert (counters.captures, counters.replays, counters.recaptures) == (2, 5, 0)


@pytest.mark.usefixtures("stand_in_cuda")
def test_a_graph_is_captured_per_settings_and_only_the_matching_one_replayed(sd_runner, monkeypatch):
    """A graph bakes in FreeU's values: settings A, B, A capture two graphs and replay A's the third time; new
    weights drop them at the next call, and the next capture is counted with its reason."""
    unet = sd_runner.pipe.unet
    paths, partition, counters = static_paths(unet, monkeypatch)
    step = Steps(paths, partition, unet)

    def assert_shallow_steps_as_eager(seed: int):
        step(True, seed)  # fills both caches under the current settings
        got, expected = step(False, seed + 1)
        assert torch.equal(got, expected)

    assert_shallow_steps_as_eager(0)
    unet.enable_freeu(0.9, 0.2, 1.2, 1.4)
    assert_shallow_steps_as_eager(2)
    unet.disable_freeu()
    assert_shallow_steps_as_eager(4)
    assert (counters.captures, counters.replays) == (4, 6), "A and B for each path, A replayed the third time"
    assert (counters.recaptures, counters.recapture_reasons) == (2, {"FreeU values": 2})

    paths.start_call()
    assert_shallow_steps_as_eager(6)
    assert counters.captures == 4, "nothing moved: the graphs are kept"
    unet.to(memory_format=torch.channels_last)
    paths.start_call()
    assert_shallow_steps_as_eager(8)
    assert (counters.captures, counters.replays) == (6, 10)
    assert counters.recapture_reasons == {"FreeU values": 2, "weights moved or modules changed": 2}
