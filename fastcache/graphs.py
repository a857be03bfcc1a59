"""Compilation of the two UNet paths, and the static feature buffers they share.

All torch.compile / inductor settings of fastcache live here. Each path is compiled on its own with
``fullgraph=True, dynamic=False``: one graph per path and static shape, so a warmed-up shape never recompiles.
The cached feature crosses from the full graph to the shallow graph only through a buffer whose address never
changes (``mark_static_address``), written in place by the full graph. Returning the feature from one graph and
feeding it to the other is what breaks under CUDA graphs: cudagraph trees reuse a call's output memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .partition import UNetPartition, feature_shape

logger = logging.getLogger(__name__)

# torch.compile modes, plus "static-cudagraphs": inductor without cudagraph trees, each (shape, path) captured by
# hand into one torch.cuda.CUDAGraph (vLLM's pattern), to cut the per-call host cost of cudagraph trees.
COMPILE_MODES = ("reduce-overhead", "static-cudagraphs", "default", "max-autotune", "max-autotune-no-cudagraphs")

# Every (batch, height, width, guidance) shape is one cache entry per path; serving a handful of shapes must not
# hit dynamo's default limit of 8 and fall back to eager.
MIN_RECOMPILE_LIMIT = 64

# The inductor settings PyTorch's and diffusers' SDXL speed-up guides apply to UNets (with fused QKV projections and
# channels_last weights, which are the pipeline's own switches). Opt-in through ``inductor_options`` until the
# benchmark shows what each is worth here; coordinate-descent tuning lengthens the cold compile.
UNET_INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                         "coordinate_descent_check_all_directions": True}


def compile_options(mode: str, inductor_options: Mapping[str, Any] | None) -> dict:
    """``torch.compile`` keyword arguments for ``mode`` plus extra inductor options.

    torch.compile takes a mode or an options dict, not both, so extra options are merged into the mode's own.
    ``ValueError`` names any key inductor does not know.
    """
    if not inductor_options:
        return dict(mode=mode)
    known = torch._inductor.config.get_config_copy()
    unknown = sorted(key for key in inductor_options if key.replace("-", "_") not in known)
    if unknown:
        raise ValueError(f"unknown inductor options {unknown}: keys must be torch._inductor.config settings, "
                         f"e.g. {sorted(UNET_INDUCTOR_OPTIONS)}.")
    return dict(options={**torch._inductor.list_mode_options(mode), **inductor_options})


class Paths:
    """Runs the full or the shallow path for one UNet evaluation; this base class runs them eagerly."""

    mode = None

    def __init__(self, partition: UNetPartition):
        self.full, self.shallow = partition.full, partition.shallow

    def __call__(self, full: bool, key: tuple, inputs: dict) -> torch.Tensor:
        return (self.full if full else self.shallow)(**inputs)

    def start_call(self) -> None:
        """Called at the first UNet evaluation of every pipeline call."""


class CompiledPaths(Paths):
    """Both paths through ``torch.compile``; with ``mode="reduce-overhead"`` cudagraph trees capture them on CUDA."""

    def __init__(self, partition: UNetPartition, mode: str, inductor_options: Mapping[str, Any] | None = None):
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, MIN_RECOMPILE_LIMIT)
        options = dict(compile_options(mode, inductor_options), fullgraph=True, dynamic=False)
        self.full, self.shallow = torch.compile(partition.full, **options), torch.compile(partition.shallow, **options)
        self.mode = mode
        self._warm: set[tuple] = set()  # (shape key, is_full) already compiled

    def __call__(self, full: bool, key: tuple, inputs: dict) -> torch.Tensor:
        # NOTE: each UNet evaluation starts a new cudagraph-tree step, which may reuse the previous evaluation's
        # output memory; schedulers keep some outputs (PNDM), so we hand out a clone.
        torch.compiler.cudagraph_mark_step_begin()
        fn = self.full if full else self.shallow
        if (key, full) in self._warm:
            return fn(**inputs).clone()
        self._warm.add((key, full))
        return _timed(fn, f"{'full' if full else 'shallow'} path at {key[0]}", inputs).clone()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static copies of the call's tensors, in tree_flatten order
    output: torch.Tensor


class StaticGraphPaths(CompiledPaths):
    """Compiled paths captured by hand: one CUDA graph per (shape, path), all in one memory pool.

    A replay is: copy the call's tensors into the graph's static inputs, replay, clone the static output. The
    feature buffer is already static, so it is passed as is. Without CUDA this runs the compiled paths directly.
    """

    def __init__(self, partition: UNetPartition, inductor_options: Mapping[str, Any] | None = None):
        super().__init__(partition, "default", inductor_options)
        self.mode = "static-cudagraphs"
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None
        self.captures = self.replays = 0
        self.weights = WeightsWatch(partition.unet)

    def start_call(self) -> None:
        """Drop every graph if the UNet's weights moved since capture: a replay would read the old addresses."""
        if self.graphs and self.weights.moved():
            logger.info("fastcache: the UNet's weights moved (.to(), fused projections, adapters); recapturing "
                        "its %d CUDA graphs on their next use", len(self.graphs))
            self.graphs.clear()
            self.pool = None

    def __call__(self, full: bool, key: tuple, inputs: dict) -> torch.Tensor:
        if not inputs["sample"].is_cuda:
            return Paths.__call__(self, full, key, inputs)
        cache = inputs["cache"]
        # tensors only (pytree counts None as a leaf): absent optional arguments take their defaults
        leaves, spec = tree_flatten({k: v for k, v in inputs.items() if k != "cache" and v is not None})
        # the timestep's dtype and shape change with the scheduler (DDIM int64, Euler float): a graph per kind
        graph_key = (key, full, spec, *((leaf.dtype, leaf.shape) for leaf in leaves))
        entry = self.graphs.get(graph_key)
        if entry is None:
            if not self.graphs:
                self.weights.snapshot()
            start = time.perf_counter()
            entry = self.graphs[graph_key] = self._capture(self.full if full else self.shallow, leaves, spec, cache)
            logger.info("fastcache: %s path at %s captured in %.1f s", "full" if full else "shallow", key[0],
                        time.perf_counter() - start)
        for static, new in zip(entry.inputs, leaves, strict=True):
            static.copy_(new)
        entry.graph.replay()
        self.replays += 1
        return entry.output.clone()

    def _capture(self, fn, leaves, spec, cache) -> _Graph:
        static = [leaf.clone() for leaf in leaves]
        inputs = dict(tree_unflatten(static, spec), cache=cache)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile, autotune and warm up outside the graph
            for _ in range(2):
                fn(**inputs)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = fn(**inputs)
        self.captures += 1
        return _Graph(graph, static, output)


class WeightsWatch:
    """Tells whether a module's weights moved or its modules changed since a snapshot.

    A captured CUDA graph reads the weights at the addresses they had during capture and runs the modules and
    attention processors it saw: after ``.to()``, ``fuse_qkv_projections``, an injected LoRA adapter or
    ``set_attn_processor`` it would read freed memory or compute the old model. In-place updates (``fuse_lora``)
    keep the addresses and need nothing. The check reads saved dictionaries, no module walk, so it costs a fraction
    of a millisecond and runs once per pipeline call.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.snapshot()

    def snapshot(self) -> None:
        modules = list(self.module.modules())
        self._sizes = [(store, len(store)) for m in modules for store in (m._modules, m._parameters, m._buffers)]
        self._children = [(m._modules, name, child) for m in modules for name, child in m._modules.items()]
        self._processors = [(m, vars(m)["processor"]) for m in modules if "processor" in vars(m)]
        self._tensors = [(store, name, tensor, tensor.data_ptr())
                         for m in modules for store in (m._parameters, m._buffers)
                         for name, tensor in store.items() if tensor is not None]

    def moved(self) -> bool:
        return (any(len(store) != size for store, size in self._sizes)
                or any(store[name] is not child for store, name, child in self._children)
                or any(vars(m).get("processor") is not processor for m, processor in self._processors)
                or any(store[name] is not tensor or tensor.data_ptr() != ptr
                       for store, name, tensor, ptr in self._tensors))


def build_paths(partition: UNetPartition, compile: bool, mode: str,
                inductor_options: Mapping[str, Any] | None = None) -> Paths:
    """The eager paths, or both compiled separately in ``mode``; ``ValueError`` for an unknown mode or option."""
    if compile and mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}; got {mode!r}.")
    if not compile:
        return Paths(partition)
    if mode == "static-cudagraphs":
        return StaticGraphPaths(partition, inductor_options)
    return CompiledPaths(partition, mode, inductor_options)


def compile_decoder(decoder: torch.nn.Module, inductor_options: Mapping[str, Any] | None = None) -> Callable:
    """The VAE decoder's forward through ``torch.compile`` (``fullgraph=True``), without CUDA graphs.

    The decoder runs once per pipeline call with large kernels, so graph replay would save nothing, while a
    CUDA-graph pool would keep its activations (GBs at 1024 px) reserved between calls. The class's forward is
    bound here: compiling the module itself would re-enter the hook that calls this function.
    """
    return torch.compile(decoder.forward, **compile_options("default", inductor_options), fullgraph=True, dynamic=False)


class FeatureBuffers:
    """One static feature buffer per input shape, allocated on first use and kept for the handle's life."""

    def __init__(self, partition: UNetPartition):
        self.partition = partition
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._buffers)

    def __contains__(self, key: tuple) -> bool:
        return key in self._buffers

    def get(self, key: tuple, sample: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None:
            shape = feature_shape(self.partition.unet, self.partition.boundary, sample.shape)
            buffer = torch.zeros(shape, dtype=self.partition.unet.dtype, device=sample.device)
            torch._dynamo.mark_static_address(buffer)
            self._buffers[key] = buffer
            logger.info("fastcache: new shape %s, feature buffer %s (%.1f MiB)", tuple(sample.shape), shape,
                        buffer.numel() * buffer.element_size() / 2**20)
        return buffer


def _timed(fn: Callable[..., torch.Tensor], label: str, inputs: dict) -> torch.Tensor:
    """Run ``fn`` and log how long it took (the first call at a shape includes compilation and capture)."""
    start = time.perf_counter()
    out = fn(**inputs)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    logger.info("fastcache: %s ready in %.1f s", label, time.perf_counter() - start)
    return out


def cudagraph_recordings() -> int:
    """CUDA graphs recorded so far by cudagraph trees on all devices (0 without CUDA).

    Reads inductor's tree managers (internal API, read only): a count that grows after warm-up means re-recording.
    """
    if not torch.cuda.is_available():
        return 0
    from torch._inductor import cudagraph_trees

    total = 0
    for device in range(torch.cuda.device_count()):
        manager = cudagraph_trees.get_manager(device, create_if_none_exists=False)
        if manager is None:
            continue
        stack = [node for nodes in manager.roots.values() for node in nodes]
        while stack:
            node = stack.pop()
            total += 1
            stack.extend(child for children in node.children.values() for child in children)
    return total
