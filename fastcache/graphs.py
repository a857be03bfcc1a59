"""Compilation of the two UNet paths: every torch.compile / inductor setting of fastcache lives here.

Each path is compiled on its own with ``fullgraph=True, dynamic=False``, so a warmed-up shape never recompiles. With
``dynamic_batch`` (the default) the batch dimension of every input is marked dynamic, so one graph per path serves
every batch size at a given (height, width, guidance, dtypes): a cold start compiles once per path, not once per
bucket. Everything else stays static, and CUDA graphs are still recorded per batch size (cudagraph trees record one
per distinct size; hand-captured graphs are per shape key). Dynamo specialises sizes 0 and 1, so a batch of one
(guidance off, one image) gets a graph of its own. The cached feature crosses from the full graph to the shallow
graph only through a buffer whose address never changes (``shapes.FeatureBuffers``, one per shape key), written in
place by the full graph. Returning the feature from one graph and feeding it to the other is what breaks under CUDA
graphs: cudagraph trees reuse a call's output memory.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit
from torch._dynamo.utils import guard_failures
from torch.utils._pytree import tree_map_only

from .counters import Counters
from .errors_text import examples, listing

logger = logging.getLogger(__name__)

# torch.compile modes, plus "static-cudagraphs": inductor without cudagraph trees, each (shape, path) captured by
# hand into one torch.cuda.CUDAGraph (vLLM's pattern), to cut the per-call host cost of cudagraph trees.
COMPILE_MODES = ("reduce-overhead", "static-cudagraphs", "default", "max-autotune", "max-autotune-no-cudagraphs")


# The inductor settings PyTorch's and diffusers' SDXL speed-up guides apply to UNets (with fused QKV projections and
# channels_last weights, which are the pipeline's own switches). Opt-in through ``inductor_options`` until the
# benchmark shows what each is worth here; coordinate-descent tuning lengthens the cold compile.
UNET_INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                         "coordinate_descent_check_all_directions": True}


class RecompileLimit:
    """Dynamo's recompile limit (process-wide), raised while any compiled handle is enabled and put back after the
    last one is disabled, unless someone else changed it meanwhile.

    Every (batch, height, width, guidance) shape is one cache entry per path; serving a handful of shapes must not
    hit dynamo's default limit of 8 and fall back to eager.
    """

    def __init__(self, minimum: int = 64):
        self.minimum = minimum
        self._holders = 0
        self._saved = self._raised = None
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0:
                config = torch._dynamo.config
                self._saved = config.recompile_limit
                self._raised = config.recompile_limit = max(self._saved, self.minimum)
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and torch._dynamo.config.recompile_limit == self._raised:
                torch._dynamo.config.recompile_limit = self._saved


RECOMPILE_LIMIT = RecompileLimit()


def compile_options(mode: str, inductor_options: Mapping[str, Any] | None) -> dict:
    """``torch.compile`` keyword arguments for ``mode`` plus extra inductor options.

    torch.compile takes a mode or an options dict, not both, so extra options are merged into the mode's own.
    ``ValueError`` names any key inductor does not know.
    """
    if mode == "static-cudagraphs":  # inductor alone: the CUDA graphs are captured by hand
        mode = "default"
    if not inductor_options:
        return dict(mode=mode)
    known = torch._inductor.config.get_config_copy()
    unknown = sorted(key for key in inductor_options if key.replace("-", "_") not in known)
    if unknown:
        raise ValueError(f"unknown inductor options: {listing(unknown, 'name')}; keys must be torch._inductor.config "
                         f"settings, {examples(UNET_INDUCTOR_OPTIONS)}.")
    return dict(options={**torch._inductor.list_mode_options(mode), **inductor_options})


class Paths:
    """Runs the full or the shallow path of a partition (the UNet's, the ControlNet's); this class runs them eagerly."""

    mode = None

    def __init__(self, partition, counters: Counters):
        self.full, self.shallow, self.counters = partition.full, partition.shallow, counters

    def path(self, full: bool) -> Callable:
        return self.full if full else self.shallow

    def __call__(self, full: bool, key: tuple, inputs: dict) -> torch.Tensor:
        return self.path(full)(**inputs)

    def start_call(self) -> None:
        """Called at the first UNet evaluation of every denoising loop (pipeline call)."""


class CompiledPaths(Paths):
    """Both paths through ``torch.compile``; with ``mode="reduce-overhead"`` cudagraph trees capture them on CUDA.

    ``counters.compiles`` counts the graphs dynamo made at a shape's first call (none when the dynamic-batch graph of
    another batch size takes it), ``counters.recompiles`` those made at a warm shape because a guard failed (a
    setting the graph baked in changed), each with dynamo's reason.
    """

    def __init__(self, partition, counters: Counters, mode: str,
                 inductor_options: Mapping[str, Any] | None = None, dynamic_batch: bool = True):
        options = dict(compile_options(mode, inductor_options), fullgraph=True, dynamic=False)  # validates first
        super().__init__(partition, counters)
        self.full, self.shallow = torch.compile(partition.full, **options), torch.compile(partition.shallow, **options)
        self.mode, self.dynamic_batch = mode, dynamic_batch
        self._frames = getattr(partition, "frames", None)  # video: per-frame tensors lead with batch * frames
        self._eager = (partition.full, partition.shallow)
        # dynamo keeps its graphs, and files the guards that failed (why it compiled again), under the function's code
        self._codes = tuple(getattr(f, "__func__", f).__code__ for f in self._eager)
        self._warm: set[tuple] = set()  # (shape key, is_full) already run compiled
        self.failed: set[tuple] = set()  # (shape key, is_full) whose compilation failed: run eagerly

    def __call__(self, full: bool, key: tuple, inputs: dict) -> torch.Tensor:
        # NOTE: each UNet evaluation starts a new cudagraph-tree step, which may reuse the previous evaluation's
        # output memory; schedulers keep some outputs (PNDM), so we hand out a clone.
        torch.compiler.cudagraph_mark_step_begin()
        if (key, full) in self.failed:
            return self.eager(full, inputs)
        if self.dynamic_batch:  # at every call: a graph made again after a setting changed stays batch-generic
            mark_batch_dynamic(inputs, self._frames(inputs["sample"].shape) if self._frames else 1)
        fn = self.path(full)
        if (key, full) in self._warm:
            return clone(self._guarded(fn, full, inputs))
        return clone(self._first(fn, full, key, inputs))

    def _first(self, fn: Callable, full: bool, key: tuple, inputs: dict):
        """A shape's first call: dynamo compiles a graph for it, unless one it made already takes it (with
        ``dynamic_batch``, the graph of another batch size). A failed compilation runs the shape eagerly from now on."""
        label = f"{'full' if full else 'shallow'} path at {tuple(inputs['sample'].shape)}"
        graphs = self.graph_count(full)
        start = time.perf_counter()
        try:
            out = fn(**inputs)
            if inputs["sample"].is_cuda:
                torch.cuda.synchronize(inputs["sample"].device)
        except Exception:  # slower, never down: this shape runs eagerly from now on
            logger.warning("fastcache: compiling the %s failed; it runs eagerly from now on.", label, exc_info=True)
            self.failed.add((key, full))
            self.counters.compile_failures += 1
            return self.eager(full, inputs)
        self._warm.add((key, full))
        after = self.graph_count(full)
        new = 1 if graphs is None or after is None else after - graphs  # unreadable: count the pair, as if static
        self.counters.compiles += new
        logger.info("fastcache: %s ready in %.1f s (%s)", label, time.perf_counter() - start,
                    f"{new} graph(s) compiled" if new else "an existing graph takes it: nothing compiled")
        return out

    def graph_count(self, full: bool) -> int | None:
        """Graphs dynamo holds for a path's function (of every partition of that class, so counted around one call);
        None where this torch does not tell."""
        return dynamo_graph_count(self._codes[0 if full else 1])

    def _guarded(self, fn: Callable, full: bool, inputs: dict):
        """A warm path, counting a recompile when dynamo's guards failed: a setting the graph baked in changed."""
        failures = guard_failures[self._codes[0 if full else 1]]
        seen = len(failures)
        try:
            out = fn(**inputs)
        except FailOnRecompileLimitHit:  # slower, never down: dynamo keeps every graph it made, up to its limit
            reason = f"recompile limit ({torch._dynamo.config.recompile_limit}) hit: ran eagerly"
            if self.counters.recompiled(reason):
                logger.warning("fastcache: the %s path hit dynamo's recompile limit (settings changed too often); "
                               "calls needing a new graph run eagerly.", "full" if full else "shallow")
            return self.eager(full, inputs)
        if len(failures) > seen:  # one reason per graph it held, one compilation
            reason = _reason(failures[seen:], inputs)
            if self.counters.recompiled(reason):
                logger.info("fastcache: the %s path compiled again: %s", "full" if full else "shallow", reason)
        return out

    def eager(self, full: bool, inputs: dict) -> torch.Tensor:
        """The path's own (uncompiled) forward."""
        return self._eager[0 if full else 1](**inputs)


def dynamo_graph_count(code) -> int | None:
    """How many graphs dynamo holds for ``code``: the length of its cache-entry list, read through a private torch
    function (``_debug_get_cache_entry_list``, what dynamo's own tests read). If a torch release moves or changes it,
    this returns None after one warning, and ``counters.compiles`` counts every (shape, path) pair's first call as one
    compilation, as with static shapes: a count that may be too high, never an error."""
    global _GRAPH_COUNT_WARNED
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(code))
    except Exception:  # any change of a private API: degrade, never fail a call
        if not _GRAPH_COUNT_WARNED:
            _GRAPH_COUNT_WARNED = True
            logger.warning("fastcache: this torch (%s) does not list dynamo's graphs; counters.compiles counts every "
                           "(shape, path) pair's first call instead", torch.__version__, exc_info=True)
        return None


_GRAPH_COUNT_WARNED = False


def mark_batch_dynamic(inputs: Mapping[str, Any], frames: int = 1) -> None:
    """Mark dimension 0 of every batched tensor among ``inputs`` (nested in lists and dicts too: ControlNet
    residuals, SDXL's ``added_cond_kwargs``, IP-Adapter embeddings; the feature buffer) as dynamic, so the graph
    dynamo makes takes every batch size. A tensor is batched when its first dimension is the sample's, or for a video
    UNet the sample's times ``frames`` (per-frame tensors: the feature buffer, AnimateDiff's text embeddings).

    ``maybe_mark_dynamic``: a dimension dynamo must specialise (a batch of one) is made static without an error.
    Dynamo's guards still check every size the graph relies on, so a mark can cost a compile, never a wrong result.
    """
    batch = inputs["sample"].shape[0]
    batches = (batch, batch * frames)
    stack = list(inputs.values())
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.dim() and value.shape[0] in batches:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())


def compile_decoder(decoder: torch.nn.Module, inductor_options: Mapping[str, Any] | None = None,
                    dynamic_batch: bool = True) -> Callable:
    """The VAE decoder's forward through ``torch.compile`` (``fullgraph=True``), without CUDA graphs; with
    ``dynamic_batch`` one graph for every batch size, as the paths.

    The decoder runs once per pipeline call with large kernels, so graph replay would save nothing, while a
    CUDA-graph pool would keep its activations (GBs at 1024 px) reserved between calls. The class's forward is
    bound here: compiling the module itself would re-enter the hook that calls this function.
    """
    compiled = torch.compile(decoder.forward, **compile_options("default", inductor_options), fullgraph=True,
                             dynamic=False)
    if not dynamic_batch:
        return compiled

    def decode(sample: torch.Tensor, *args, **kwargs):
        mark_batch_dynamic({"sample": sample})
        return compiled(sample, *args, **kwargs)

    return decode


def clone(out):
    """A graph's output (a tensor, or the ControlNet's residuals), copied out of the memory the graph's next replay
    writes."""
    return tree_map_only(torch.Tensor, torch.Tensor.clone, out)


def _guard(failure: str) -> str:
    """The failed guard in dynamo's recompile reason ("0/1: L['self'].unet.up_blocks[1].b1 == 1.2  # source")."""
    first = failure.split("\n", 1)[0]
    return first.split(": ", 1)[-1].split("  #", 1)[0].strip()


def _reason(failures: list[str], inputs: Mapping[str, Any]) -> str:
    """Why a warm shape compiled again: the first failed guard that is not on an input. Each graph dynamo holds
    reports one; those made for other sizes (a batch of one beside the dynamic-batch graph) fail on the inputs'
    sizes, which says nothing, while the graph that ran this shape before fails on the setting that changed."""
    guards = [_guard(failure) for failure in failures]
    names = "|".join(map(re.escape, inputs))
    on_inputs = re.compile(rf"(?<![\w.])({names})\b")
    return next((guard for guard in guards if not on_inputs.search(guard)), guards[0])


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
