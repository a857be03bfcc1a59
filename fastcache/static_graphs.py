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
from .weights_watch import WeightsWatch

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list  # static copies of the call's tensors (other leaves as they were), in tree_flatten order
    output: torch.Tensor | list[torch.Tensor]


class StaticGraphPaths:
    """Wraps compiled paths (inductor, no cudagraph trees) and replays hand-captured graphs of them on CUDA.

    The feature buffer is already static, so it is passed as is. Without CUDA the compiled paths run directly.
    Every input is a device tensor by the time it gets here (the handle moves CPU tensors and numbers), and the
    graph key (the handle's shape key) holds every other value, so nothing is captured stale.
    """

    mode = "static-cudagraphs"

    def __init__(self, compiled: CompiledPaths, model: torch.nn.Module, counters: Counters):
        self.compiled, self.counters = compiled, counters
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None
        self.stream = None  # one capture stream: warm-up and capture on it, so library workspaces exist before capture
        self.weights = WeightsWatch(model)
        self.uncaptured: set[tuple] = set()  # (shape key, is_full) whose capture failed

    def start_call(self) -> None:
        """Drop every graph if the model's weights moved since capture: a replay would read the old addresses."""
        if self.graphs and self.weights.moved():
            logger.info("fastcache: the %s's weights moved (.to(), fused projections, adapters); recapturing "
                        "its %d CUDA graphs on their next use", type(self.weights.module).__name__, len(self.graphs))
            self.graphs.clear()
            self.pool = None

    def __call__(self, full: bool, key: tuple, inputs: dict) -> torch.Tensor:
        if not inputs["sample"].is_cuda:
            return self.compiled(full, key, inputs)
        cache = inputs["cache"]
        leaves, spec = tree_flatten({k: v for k, v in inputs.items() if k != "cache"})
        entry = self.graphs.get((key, full))
        if entry is None:
            if (key, full) in self.uncaptured or (key, full) in self.compiled.failed:
                return self.compiled(full, key, inputs)
            if not self.graphs:
                self.weights.snapshot()
            start = time.perf_counter()
            try:
                entry = self._capture(full, key, leaves, spec, cache)
            except Exception:  # slower, never down: this shape runs without a hand-captured graph from now on
                logger.warning("fastcache: capturing the %s path at %s failed; it runs uncaptured from now on.",
                               "full" if full else "shallow", tuple(inputs["sample"].shape), exc_info=True)
                self.uncaptured.add((key, full))
                self.counters.compile_failures += 1
                return self.compiled(full, key, inputs)
            if entry is None:  # its compilation failed (counted there): it runs eagerly
                return self.compiled(full, key, inputs)
            self.graphs[key, full] = entry
            logger.info("fastcache: %s path at %s captured in %.1f s", "full" if full else "shallow",
                        tuple(inputs["sample"].shape), time.perf_counter() - start)
        for static, new in zip(entry.inputs, leaves, strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(new, non_blocking=True)
        entry.graph.replay()
        self.counters.replays += 1
        return clone(entry.output)

    def _capture(self, full: bool, key: tuple, leaves, spec, cache) -> _Graph | None:
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
        return _Graph(graph, static, output)
