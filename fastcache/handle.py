"""``compile_pipeline``: attach DeepCache-as-two-graphs to a diffusers pipeline, and the handle that owns it."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .config import FastCacheConfig
from .controlnet import ControlNetPartition, SplitControlNet, check_controlnet, controlnet_nets
from .counters import Counters
from .dispatch import Decision, StepDispatcher
from .graphs import RECOMPILE_LIMIT, CompiledPaths, Paths, compile_decoder
from .lora import LoraLayers, refuse_wide_hotswaps, split_scale
from .partition import UNetPartition, adapter_residuals_problem, downsampling_factor
from .partitions import make_partition
from .schedule import Schedule
from .settings import path_settings
from .shapes import FeatureBuffers, on_device, shape_key, signature
from .static_graphs import StaticGraphPaths

logger = logging.getLogger(__name__)

HOOK_NAME = "fastcache"

# The UNet arguments the two paths implement are the partition's (``UNetPartition.arguments``, per UNet family). A
# call that sets any other one (attention masks, whatever a later diffusers adds) runs the original forward; so does a
# cross_attention_kwargs with more than a LoRA scale, which the handle applies itself.
# The same for the ControlNet's shallow path (guess mode, too, runs the whole ControlNet).
CONTROLNET_ARGUMENTS = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale",
                        "added_cond_kwargs", "timestep_cond", "class_labels", "guess_mode")


class _Arguments:
    """Binds a hooked call's arguments against the model's own ``forward`` signature, so no copy of it can drift."""

    def __init__(self, forward: Callable, supported: Sequence[str]):
        self.signature = inspect.signature(forward)  # the class's function: its first parameter is ``self``
        self.names = list(self.signature.parameters)[1:]
        self.defaults = {name: self.signature.parameters[name].default for name in self.names}
        self.required = [name for name, default in self.defaults.items() if default is inspect.Parameter.empty]
        # any of these set: the original forward runs
        self.others = [name for name in self.names if name not in (*supported, "return_dict")]

    def bind(self, module, args: tuple, kwargs: dict) -> dict[str, Any]:
        positional = self.names[:len(args)]
        if len(args) <= len(self.names) and kwargs.keys() <= self.defaults.keys() and not kwargs.keys() & positional:
            bound = {**self.defaults, **dict(zip(positional, args, strict=True)), **kwargs}
            if not any(bound[name] is inspect.Parameter.empty for name in self.required):
                return bound
        # the rare call the quick bind cannot take: bind it properly, which raises the TypeError forward would
        bound = self.signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        return dict(list(bound.arguments.items())[1:])


@dataclass
class FastCacheHandle:
    """Everything fastcache added to one pipeline: partition, schedule, compiled paths, buffers and state.

    ``disable()`` removes the hooks and leaves the pipeline exactly as it was; ``enable()`` puts them back
    (compiled graphs and buffers are kept, so re-enabling costs nothing). UNet evaluations run one at a time
    (a lock): threads may share the UNet, each loop keeping its own features.
    """

    pipe: Any = field(repr=False)
    config: FastCacheConfig
    partition: UNetPartition = field(repr=False)
    schedule: Schedule
    paths: Paths | StaticGraphPaths = field(repr=False)
    dispatcher: StepDispatcher = field(repr=False)
    buffers: FeatureBuffers = field(repr=False)
    counters: Counters
    decoder: Callable | None = field(default=None, repr=False)  # the compiled VAE decoder, if any
    controlnet: SplitControlNet | None = field(default=None, repr=False)  # for a ControlNet pipeline
    lora: LoraLayers | None = field(default=None, repr=False)  # applies a per-call LoRA scale around the paths
    enabled: bool = False
    _warned: set = field(default_factory=set, repr=False)  # fallback reasons already logged
    _added: dict = field(default_factory=dict, repr=False)  # hooked module -> the attributes enable() created
    _lock: Any = field(default_factory=threading.Lock, repr=False)
    _hooks: dict = field(default_factory=dict, repr=False)  # hooked module -> its hook (it keeps the original forward)
    _stream: Any = field(default=None, repr=False)  # the CUDA stream that last used the buffers
    _restore_loader: Any = field(default=None, repr=False)  # undoes refuse_wide_hotswaps

    def __post_init__(self):
        self._arguments = _Arguments(type(self.unet).forward, (*self.partition.arguments, "cross_attention_kwargs"))
        self.lora = self.lora or LoraLayers(self.unet)
        if self.controlnet is not None:
            self._controlnet_arguments = _Arguments(type(self.controlnet.module).forward, CONTROLNET_ARGUMENTS)

    @property
    def unet(self):
        return self.partition.unet

    def enable(self) -> FastCacheHandle:
        with self._lock:  # not in the middle of another thread's evaluation
            if self.enabled:
                return self
            registry = getattr(self.unet, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(HOOK_NAME) is not None:
                raise ValueError("fastcache is already enabled on this UNet by another handle; disable that one first.")
            self.dispatcher.reset()
            self._attach(self.unet, _Hook(self.forward))
            if self.controlnet is not None:
                self.controlnet.reset()
                self._attach(self.controlnet.module, _Hook(self._controlnet_forward))
            if self.decoder is not None:
                self._attach(self.pipe.vae.decoder, _Hook(self._decode))
            if self.config.compile:
                RECOMPILE_LIMIT.hold()
            self._restore_loader = refuse_wide_hotswaps(self.unet)  # before they change anything
            self.enabled = True
            return self

    def disable(self) -> FastCacheHandle:
        with self._lock:
            if self.enabled:
                self._restore_loader()
                for module, added in self._added.items():
                    registry = module._diffusers_hook
                    registry.remove_hook(HOOK_NAME, recurse=False)
                    if not registry.hooks:  # nothing else hooked: drop what enable() created, leaving it as it was
                        for name in added:
                            delattr(module, name)
                self._added.clear()
                self.dispatcher.reset()
                if self.controlnet is not None:
                    self.controlnet.reset()
                if self.config.compile:
                    RECOMPILE_LIMIT.release()
                self.enabled = False
            return self

    def set_interval(self, interval: int) -> FastCacheHandle:
        """Run denoising loops that start from now on with a full UNet step every ``interval`` steps (1: uncached, the
        plain pipeline's output); loops already running keep the schedule they started with.

        The interval decides which steps run full, not what the graphs compute, so nothing compiles or captures
        again: a server can give each pipeline call its own cache level. The schedule's kind, ``center`` and ``pow``
        stay; an explicit list of full steps has no interval to change (``ValueError``). Invalid values raise before
        anything changes."""
        if self.schedule.kind == "explicit":
            raise ValueError("an explicit schedule (a list of full steps) has no interval to change.")
        config = self.config.replace(interval=interval)  # TypeError/ValueError naming what is valid
        with self._lock:  # a loop starting on another thread reads the schedule under this lock
            self.config, self.schedule = config, config.plan
            self.dispatcher.loops.schedule = self.schedule  # read when a loop starts
        return self

    def _attach(self, module: torch.nn.Module, hook: ModelHook) -> None:
        self._added[module] = [name for name in ("_diffusers_hook", "forward") if name not in vars(module)]
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
        self._hooks[module] = hook  # it keeps the forward it wraps, for fallbacks, even once removed

    def _original(self, module: torch.nn.Module) -> Callable:
        return self._hooks[module].fn_ref.original_forward

    def _controlnet_forward(self, controlnet, *args, **kwargs):
        """Replacement for the pipeline's ``controlnet.forward``: its compiled paths, shallow where the UNet step that
        follows will be shallow; guess mode, attention masks and ``cross_attention_kwargs`` run the original."""
        call = self._controlnet_arguments.bind(controlnet, args, kwargs)
        original = functools.partial(self._original(controlnet), *args, **kwargs)
        if (any(_is_set(call[name]) for name in self._controlnet_arguments.others) or call["guess_mode"]
                or torch.is_grad_enabled()):
            return original()
        # at the deepest branch a skip step needs the mid residual too: the whole ControlNet
        at_mid = self.partition.boundary.at_mid_output
        with self._lock:
            shallow = not at_mid and self.dispatcher.peek(call["timestep"], signature(call["sample"]),
                                                          self.partition.frame_signature)
            self.counters.controlnet_shallow += shallow
        return self.controlnet.run(call, shallow, original)

    def _decode(self, decoder, *args, **kwargs) -> torch.Tensor:
        """Replacement for ``vae.decoder.forward``: the same forward, compiled."""
        return self.decoder(*args, **kwargs)

    def forward(self, unet, *args, **kwargs):
        """Replacement for ``unet.forward`` while the handle is enabled: the full or the shallow path."""
        call = self._arguments.bind(unet, args, kwargs)
        scale, processor_kwargs = split_scale(call.get("cross_attention_kwargs"))  # the handle applies a LoRA scale
        # residuals of a shallow ControlNet: the UNet step must be shallow, or the whole ControlNet runs again
        partial = self.controlnet and self.controlnet.take_partial(call.get("down_block_additional_residuals"),
                                                                   call.get("mid_block_additional_residual"))
        inputs, key = self._inputs(call)
        if key not in self.buffers:  # a new shape: what the UNet itself cannot take gets a clear error, nothing runs
            self.partition.check_input(inputs["sample"].shape)
        unsupported = self._unsupported(call, processor_kwargs, inputs, key)
        if unsupported:
            if partial:
                args, kwargs = (), dict(call, **self.controlnet.whole(partial))
            return self._fallback(unsupported, args, kwargs)
        with self._lock:
            out = self._evaluate(inputs, key, call["timestep"], partial, scale)
        return self.partition.output(sample=out) if call["return_dict"] else (out,)

    # -- the pieces of an evaluation ---------------------------------------------------------------------

    def _inputs(self, call: dict) -> tuple[dict, tuple]:
        """The paths' inputs, every tensor on the sample's device (a Python-number timestep too: it would be baked
        into the graph), and their shape key."""
        sample = call["sample"]
        inputs = {name: on_device(call[name], sample.device) for name in self.partition.arguments}
        if not torch.is_tensor(call["timestep"]):
            inputs["timestep"] = torch.as_tensor(call["timestep"], device=sample.device)
        return inputs, shape_key(inputs)

    def _unsupported(self, call: dict, processor_kwargs, inputs: dict, key: tuple) -> list[str]:
        """Why this evaluation cannot take the paths; empty if it can."""
        reasons = [name for name in self._arguments.others if _is_set(call[name])]
        if _is_set(processor_kwargs):  # keys for the attention processors (IP-Adapter masks, ...)
            reasons.append(f"cross_attention_kwargs {sorted(processor_kwargs)}")
        if torch.is_grad_enabled():  # the feature buffer would keep the full step's autograd graph alive
            reasons.append("autograd (call the UNet under torch.no_grad(), as pipelines do)")
        if key not in self.buffers:  # a new shape: checked once, not on every step
            reasons += self._size_problem(inputs["sample"]) + self._residuals_problem(inputs)
        return reasons

    def _evaluate(self, inputs: dict, key: tuple, timestep, partial, scale: float) -> torch.Tensor:
        """Place the evaluation in its loop, then run the full or the shallow path (under the lock)."""
        sample = inputs["sample"]
        cache = self.buffers.get(key, sample)
        self.counters.shapes = len(self.buffers)
        self._follow_stream(cache)
        # the timestep as the caller passed it: a view of the scheduler's timesteps names the loop and step
        decision = self.dispatcher.decide(timestep, key, cache, (self.pipe.scheduler,))
        if decision.new_call:
            self._start_call(sample.device)
        if decision.full and partial:
            inputs.update(on_device(self.controlnet.whole(partial), sample.device))
        inputs = SplitControlNet.residuals_for_step(inputs, decision.full, self.partition.boundary)
        adapter = inputs.get("down_intrablock_additional_residuals")
        if not decision.full and adapter is not None:  # T2I-Adapter: a skip step gets those it adds only
            inputs["down_intrablock_additional_residuals"] = adapter[:self.partition.boundary.shallow_adapter_residuals]
        with self.lora.scaled(scale):  # as the UNet's forward scales its LoRA layers
            out = self.paths(decision.full, key, dict(inputs, cache=cache))
        self._count(decision)
        return out

    def _start_call(self, device: torch.device) -> None:
        """At the first evaluation of a denoising loop (a pipeline call)."""
        self.paths.start_call()
        if self.controlnet is not None:
            self.controlnet.paths.start_call()
        self.lora.start_call(device)

    def _count(self, decision: Decision) -> None:
        counters = self.counters
        counters.full += decision.full
        counters.shallow += not decision.full
        counters.unplaced += not decision.placed
        counters.restores += decision.restored

    def _follow_stream(self, buffer: torch.Tensor) -> None:
        """Order this evaluation after the last one if they run on different CUDA streams (say, two threads'):
        both read and write the same buffers. Stream waits are device-side: no host sync."""
        if not buffer.is_cuda:
            return
        stream = torch.cuda.current_stream(buffer.device)
        if self._stream is not None and stream != self._stream:
            stream.wait_stream(self._stream)
        self._stream = stream

    def _residuals_problem(self, inputs: dict) -> list[str]:
        """ControlNet residuals must meet the UNet's skip connections one for one, T2I-Adapter residuals the hidden
        states they are added to shape for shape."""
        down, skips = inputs.get("down_block_additional_residuals"), self.partition.skip_count
        problems = adapter_residuals_problem(self.unet, inputs.get("down_intrablock_additional_residuals"),
                                             inputs["sample"].shape)
        if down is not None and inputs.get("mid_block_additional_residual") is None:
            problems.append("down_block_additional_residuals without mid_block_additional_residual (diffusers' "
                            "deprecated T2I-Adapter call; pass down_intrablock_additional_residuals)")
        elif down is not None and len(down) != skips:
            problems.append(f"{len(down)} ControlNet residuals for a UNet of {skips} skip connections")
        return problems

    def _size_problem(self, sample: torch.Tensor) -> list[str]:
        """The paths cut the UNet between its blocks, which needs latents divisible by every downsampling."""
        factor = downsampling_factor(self.unet)
        height, width = sample.shape[-2:]
        if height % factor == 0 and width % factor == 0:
            return []
        scale = int(getattr(self.pipe, "vae_scale_factor", 1) or 1)
        return [f"latents of {height}x{width} ({height * scale}x{width * scale} pixels; fastcache needs multiples "
                f"of {factor} latents, {factor * scale} pixels)"]

    def _fallback(self, reasons: list[str], args: tuple, kwargs: dict) -> Any:
        """Run the UNet's original forward (correct, uncached) for a call fastcache cannot split."""
        with self._lock:
            self.counters.fallbacks += 1
            warn = tuple(reasons) not in self._warned
            self._warned.add(tuple(reasons))
        if warn:
            logger.warning("fastcache: %s not supported; running the original UNet forward for these calls.",
                           ", ".join(reasons))
        return self._original(self.unet)(*args, **kwargs)


class _Hook(ModelHook):
    """The diffusers hook that routes a module's forward to a method of the handle; it holds no state of its own."""

    def __init__(self, forward: Callable):
        super().__init__()
        self.forward = forward

    def new_forward(self, module, *args, **kwargs):
        return self.forward(module, *args, **kwargs)


def _is_set(value: Any) -> bool:
    return value is not None and not (isinstance(value, dict) and not value)


def compile_pipeline(pipe: Any, interval: int | None = None, branch: int | None = None, *,
                     config: FastCacheConfig | None = None, **options: Any) -> FastCacheHandle:
    """Make ``pipe`` run DeepCache with its full and shallow UNet paths compiled as two graphs.

    Args:
        pipe: a diffusers pipeline whose ``pipe.unet`` is a ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL, ...), a
            ``UNetMotionModel`` (AnimateDiff), a ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion) or a
            ``UNet3DConditionModel`` (ModelScope text-to-video): ``partitions.PARTITIONS``.
        interval: a full UNet step every ``interval`` steps (``FastCacheConfig.interval``).
        branch: the DeepCache branch id (``FastCacheConfig.branch``).
        config: a ``FastCacheConfig`` to start from (the keywords given override its fields).
        **options: ``FastCacheConfig``'s other fields (``schedule``, ``compile``, ``mode``, ``inductor_options``,
            ``compile_vae``, ...), which document them; defaults are its defaults.

    Returns the enabled handle. Call ``pipe(...)`` exactly as before. Nothing changes, on the pipeline or in
    torch's process-wide settings, if an argument is invalid: every check runs first.
    """
    given = {name: value for name, value in (("interval", interval), ("branch", branch)) if value is not None}
    config = (config or FastCacheConfig()).replace(**given, **options)
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(getattr(pipe, "scheduler", None), "timesteps"):
        raise ValueError(
            f"compile_pipeline needs a diffusers pipeline with a `unet` and a `scheduler`; got {type(pipe).__name__}."
        )
    controlnet = getattr(pipe, "controlnet", None)
    nets = controlnet_nets(controlnet) if controlnet is not None else []
    for net in nets:
        check_controlnet(net, unet)
    if hasattr(unet, "_orig_mod"):
        raise ValueError("pipe.unet is already torch.compile'd; pass the plain UNet: fastcache compiles it itself.")
    if hasattr(unet, "_hf_hook"):
        raise ValueError("fastcache keeps the UNet on one device: disable model CPU offload (accelerate hooks) first.")
    if config.compile_vae and not hasattr(getattr(pipe, "vae", None), "decoder"):
        raise ValueError(f"compile_vae needs a pipeline with a VAE decoder (pipe.vae.decoder); "
                         f"{type(pipe).__name__} has none.")
    plan = config.plan
    partition = make_partition(unet, config.branch)

    # every argument is valid: from here on, things are built (and enable() changes dynamo's recompile limit)
    counters = Counters()
    paths = _build_paths(partition, unet, counters, config)
    split_controlnet = None
    if nets:
        controlnet_partition = ControlNetPartition(nets, partition.boundary)
        split_controlnet = SplitControlNet(controlnet, nets, controlnet_partition,
                                           _build_paths(controlnet_partition, controlnet, counters, config))
    decoder = (compile_decoder(pipe.vae.decoder, config.inductor_options, config.dynamic_batch) if config.compile_vae
               else None)
    handle = FastCacheHandle(pipe, config, partition, plan, paths, StepDispatcher(plan), FeatureBuffers(partition),
                             counters, decoder, split_controlnet)
    handle.enable()
    logger.info("fastcache: enabled on %s (%s)", type(pipe).__name__, config.describe())
    return handle


def _build_paths(partition, model: torch.nn.Module, counters: Counters,
                 config: FastCacheConfig) -> Paths | StaticGraphPaths:
    """A partition's paths: eager, or each compiled on its own in ``config.mode`` (hand-captured CUDA graphs wrap
    them)."""
    if not config.compile:
        return Paths(partition, counters)
    compiled = CompiledPaths(partition, counters, config.mode, config.inductor_options, config.dynamic_batch)
    if config.mode == "static-cudagraphs":
        return StaticGraphPaths(compiled, model, counters, path_settings(partition, model))
    return compiled
