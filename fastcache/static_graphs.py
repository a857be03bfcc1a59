"""``mode="static-cudagraphs"``: the compiled paths captured by hand, one CUDA graph per (shape, path), one pool.

cudagraph trees cost host time on every call (guards, checks); a shallow step is little GPU work, so that host time
can dominate. vLLM's pattern instead: compile without cudagraph trees, capture each (shape, path) once into a
``torch.cuda.CUDAGraph``, and replay it after copying the call's tensors into the graph's static inputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .counters import Counters
from .graphs import CompiledPaths, clone
from .settings import Reading, SettingsWatch
from .weights_watch import WeightsWatch

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list  # static copies of the call's tensors (other leaves as they were), in tree_flatten order
    output: torch.Tensor | list[torch.Tensor]
    settings: Reading  # the Python-level settings it was captured under: it is replayed only under the same


class StaticGraphPaths:
    """Wraps compiled paths (inductor, no cudagraph trees) and replays hand-captured graphs of them on CUDA.

    The feature buffer is already static, so it is passed as is. Without CUDA the compiled paths run directly.
    Every input is a device tensor by the time it gets here (the handle moves CPU tensors and numbers), and the
    graph key (the handle's shape key) holds every other value. What a graph bakes in besides its inputs is checked
    too: the weights' addresses once per pipeline call (``WeightsWatch``), the Python-level settings before every
    replay (``SettingsWatch``, per path); a graph is captured for each settings it meets, so nothing is replayed stale
    and going back to earlier settings captures nothing.
    """

    mode = "static-cudagraphs"

    def __init__(self, compiled: CompiledPaths, model: torch.nn.Module, counters: Counters,
                 settings: tuple[SettingsWatch, SettingsWatch]):
        self.compiled, self.counters, self.settings = compiled, counters, settings  # settings: (full, shallow)
        self.graphs: dict[tuple, list[_Graph]] = {}  # (shape key, is_full) -> its graphs, newest first
        self.pool = None
        self.stream = None  # one capture stream: warm-up and capture on it, so library workspaces exist before capture
        self.weights = WeightsWatch(model)
        self.uncaptured: set[tuple] = set()  # (shape key, is_full) whose capture failed
        self._dropped: set[tuple] = set()  # (shape key, is_full) whose graphs the weights watch dropped

    def start_call(self) -> None:
        """Drop every graph if the model's weights moved since capture: a replay would read the old addresses."""
        if self.graphs and self.weights.moved():
            logger.info("fastcache: the %s's weights moved (.to(), fused projections, adapters); recapturing "
                        "its %d CUDA graphs on their next use", type(self.weights.module).__name__, len(self.graphs))
            self._dropped.update(self.graphs)
            self.graphs.clear()
            self.pool = None
            for settings in self.settings:  # the modules may have changed: plan what to read again
                settings.plan()

    def __call__(self, full: bool, key: tuple, inputs: dict) -> torch.Tensor:
        if not inputs["sample"].is_cuda:
            return self.compiled(full, key, inputs)
        if (key, full) in self.uncaptured or (key, full) in self.compiled.failed:
            return self.compiled(full, key, inputs)
        leaves, spec = tree_flatten({k: v for k, v in inputs.items() if k != "cache"})
        entry = self.graph_for(full, key, inputs, leaves, spec)
        if entry is None:
            return self.compiled(full, key, inputs)
        for static, new in zip(entry.inputs, leaves, strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(new, non_blocking=True)
        entry.graph.replay()
        self.counters.replays += 1
        return clone(entry.output)

    def graph_for(self, full: bool, key: tuple, inputs: dict, leaves, spec) -> _Graph | None:
        """The graph to replay for this call: the one captured under the current settings, else a new capture
        (None if it cannot be captured: the call runs uncaptured)."""
        settings = self.settings[0 if full else 1]
        reading = settings.read()
        graphs = self.graphs.setdefault((key, full), [])
        entry = next((graph for graph in graphs if settings.same(reading, graph.settings)), None)
        return entry or self._new_graph(full, key, inputs, leaves, spec, reading)

    def _new_graph(self, full: bool, key: tuple, inputs: dict, leaves, spec, reading: Reading) -> _Graph | None:
        """Capture a graph for this shape and path under the current settings; None if it cannot be captured."""
        label = f"{'full' if full else 'shallow'} path at {tuple(inputs['sample'].shape)}"
        if not any(self.graphs.values()):
            self.weights.snapshot()
        start = time.perf_counter()
        try:
            entry = self._capture(full, key, leaves, spec, inputs["cache"], reading)
        except Exception:  # slower, never down: this shape runs without a hand-captured graph from now on
            logger.warning("fastcache: capturing the %s failed; it runs uncaptured from now on.", label, exc_info=True)
            self.uncaptured.add((key, full))
            self.counters.compile_failures += 1
            return None
        if entry is None:  # its compilation failed (counted there): it runs eagerly
            return None
        graphs = self.graphs[key, full]
        if graphs:
            reason = ", ".join(self.settings[0 if full else 1].changed(reading, graphs[0].settings)) or "settings"
        elif (key, full) in self._dropped:
            reason = "weights moved or modules changed"
        else:
            reason = None
        self._dropped.discard((key, full))
        if reason and self.counters.recaptured(reason):
            logger.info("fastcache: %s captured again: %s changed", label, reason)
        graphs.insert(0, entry)
        logger.info("fastcache: %s captured in %.1f s", label, time.perf_counter() - start)
        return entry

    def _capture(self, full: bool, key: tuple, leaves, spec, cache, settings: Reading) -> _Graph | None:
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        inputs = dict(tree_unflatten(static, spec), cache=cache)
        fn = self.compiled.path(full)
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):  # compile, autotune and warm up outside the graph, on the capture stream
            self.compiled(full, key, inputs)
            compiled = (key, full) not in self.compiled.failed
            if compiled:
                fn(**inputs)
        torch.cuda.current_stream().wait_stream(self.stream)
        if not compiled:
            return None
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = fn(**inputs)
        self.counters.captures += 1
        return _Graph(graph, static, output, settings)
