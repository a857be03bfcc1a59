"""``compile_pipeline``: attach DeepCache-as-two-graphs to a diffusers pipeline, and the handle that owns it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .dispatch import StepDispatcher
from .graphs import FeatureBuffers, Paths, build_paths, compile_decoder
from .partition import UNetPartition, downsampling_factor
from .schedule import Schedule, make_schedule

logger = logging.getLogger(__name__)

HOOK_NAME = "fastcache"

# UNet arguments the two paths do not implement; a call that uses one runs the original forward instead.
UNSUPPORTED_ARGUMENTS = (
    "attention_mask",
    "cross_attention_kwargs",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
    "encoder_attention_mask",
)


@dataclass
class Counters:
    """What the runtime did, for tests and logs: UNet evaluations by path, shapes seen, eager fallbacks."""

    full: int = 0
    shallow: int = 0
    shapes: int = 0
    fallbacks: int = 0


@dataclass
class FastCacheHandle:
    """Everything fastcache added to one pipeline: partition, schedule, compiled paths, buffers and state.

    ``disable()`` removes the hooks and leaves the pipeline exactly as it was; ``enable()`` puts them back
    (compiled graphs and buffers are kept, so re-enabling costs nothing).
    """

    pipe: Any = field(repr=False)
    partition: UNetPartition = field(repr=False)
    schedule: Schedule
    paths: Paths = field(repr=False)
    dispatcher: StepDispatcher = field(repr=False)
    buffers: FeatureBuffers = field(repr=False)
    decoder: Callable | None = field(default=None, repr=False)  # the compiled VAE decoder, if any
    counters: Counters = field(default_factory=Counters)
    enabled: bool = False
    _warned: set = field(default_factory=set, repr=False)  # fallback reasons already logged
    _added: dict = field(default_factory=dict, repr=False)  # hooked module -> the attributes enable() created

    @property
    def unet(self):
        return self.partition.unet

    def enable(self) -> FastCacheHandle:
        if self.enabled:
            return self
        registry = getattr(self.unet, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            raise ValueError("fastcache is already enabled on this UNet by another handle; disable that one first.")
        self.dispatcher.reset()
        self._attach(self.unet, _Hook(self.forward))
        if self.decoder is not None:
            self._attach(self.pipe.vae.decoder, _Hook(self._decode))
        self.enabled = True
        return self

    def disable(self) -> FastCacheHandle:
        if self.enabled:
            for module, added in self._added.items():
                registry = module._diffusers_hook
                registry.remove_hook(HOOK_NAME, recurse=False)
                if not registry.hooks:  # nothing else hooked: drop what enable() created, leaving it as it was
                    for name in added:
                        delattr(module, name)
            self._added.clear()
            self.dispatcher.reset()
            self.enabled = False
        return self

    def _attach(self, module: torch.nn.Module, hook: ModelHook) -> None:
        self._added[module] = [name for name in ("_diffusers_hook", "forward") if name not in vars(module)]
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)

    def _decode(self, decoder, *args, **kwargs) -> torch.Tensor:
        """Replacement for ``vae.decoder.forward``: the same forward, compiled."""
        return self.decoder(*args, **kwargs)

    def forward(self, unet, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict=True):
        """Replacement for ``unet.forward`` (same signature) while the handle is enabled."""
        args = locals()
        unsupported = [name for name in UNSUPPORTED_ARGUMENTS if args[name] not in (None, {})]
        if self._freeu_enabled():
            unsupported.append("FreeU")
        if torch.is_grad_enabled():  # the feature buffer would keep the full step's autograd graph alive
            unsupported.append("autograd (call the UNet under torch.no_grad(), as pipelines do)")
        if unsupported:
            return self._fallback(unsupported, args)
        if not torch.is_tensor(timestep) or timestep.device != sample.device:
            timestep = torch.as_tensor(timestep, device=sample.device)

        key = (tuple(sample.shape), sample.dtype, sample.device, tuple(encoder_hidden_states.shape))
        if key not in self.buffers:  # a new shape: checked once, not on every step
            self._check_size(sample)
        cache = self.buffers.get(key, sample)
        self.counters.shapes = len(self.buffers)
        full = self.dispatcher.next_is_full(self.pipe.scheduler, key)
        if self.dispatcher.evaluations == 1:  # a pipeline call starts
            self.paths.start_call()
        out = self.paths(full, key, dict(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                         cache=cache, added_cond_kwargs=added_cond_kwargs, timestep_cond=timestep_cond,
                                         class_labels=class_labels))
        if full:
            self.counters.full += 1
        else:
            self.counters.shallow += 1
        return _unet_output(out, return_dict)

    # -- helpers -----------------------------------------------------------------------------------------

    def _check_size(self, sample: torch.Tensor) -> None:
        factor = downsampling_factor(self.unet)
        height, width = sample.shape[-2:]
        if height % factor or width % factor:
            scale = _vae_scale(self.pipe)
            raise ValueError(
                f"fastcache needs height and width that are multiples of {factor * scale} pixels "
                f"(latents multiples of {factor}); got latents {height}x{width}, i.e. {height * scale}x{width * scale} "
                "pixels. Pick a valid size, or call handle.disable() to run this size uncached."
            )

    def _freeu_enabled(self) -> bool:
        return any(vars(up).get("b1") for up in self.unet.up_blocks)  # diffusers' enable_freeu sets b1..s2

    def _fallback(self, reasons: list[str], args: dict) -> Any:
        """Run the UNet's original forward (correct, uncached) for a call fastcache cannot split."""
        self.counters.fallbacks += 1
        if tuple(reasons) not in self._warned:
            self._warned.add(tuple(reasons))
            logger.warning("fastcache: %s not supported; running the original UNet forward for these calls.",
                           ", ".join(reasons))
        hook = HookRegistry.check_if_exists_or_initialize(self.unet).get_hook(HOOK_NAME)
        del args["self"], args["unet"]
        return hook.fn_ref.original_forward(**args)


class _Hook(ModelHook):
    """The diffusers hook that routes a module's forward to a method of the handle; it holds no state of its own."""

    def __init__(self, forward: Callable):
        super().__init__()
        self.forward = forward

    def new_forward(self, module, *args, **kwargs):
        return self.forward(module, *args, **kwargs)


def _unet_output(sample: torch.Tensor, return_dict: bool):
    return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)


def _vae_scale(pipe: Any) -> int:
    return int(getattr(pipe, "vae_scale_factor", 1) or 1)


def compile_pipeline(
    pipe: Any,
    interval: int = 3,
    branch: int = 0,
    *,
    schedule: str | Sequence[int] = "uniform",
    center: int = 15,
    pow: float = 1.4,
    compile: bool = True,
    mode: str = "reduce-overhead",
    inductor_options: Mapping[str, Any] | None = None,
    compile_vae: bool = False,
) -> FastCacheHandle:
    """Make ``pipe`` run DeepCache with its full and shallow UNet paths compiled as two graphs.

    Args:
        pipe: a diffusers pipeline with a ``UNet2DConditionModel`` as ``pipe.unet`` (SD 1.x/2.x, SDXL, ...).
        interval: full UNet every ``interval`` steps (1 = no caching, same output as the plain pipeline).
        branch: DeepCache branch id; 0 (shallowest, fastest) to ``3 * len(unet.down_blocks) - 1`` for the
            usual two layers per block.
        schedule: ``"uniform"``, ``"quad-center"`` (the paper's non-uniform schedule, with ``center`` and
            ``pow``) or an explicit list of full-step indices (must contain 0).
        compile: compile both paths with ``torch.compile`` (CUDA graphs on CUDA with the default ``mode``);
            ``False`` runs the same runtime eagerly.
        mode: a ``torch.compile`` mode, or ``"static-cudagraphs"`` (CUDA graphs captured by hand); see
            ``graphs.COMPILE_MODES``.
        inductor_options: extra ``torch._inductor.config`` settings for both paths (and the VAE decoder), e.g.
            ``graphs.UNET_INDUCTOR_OPTIONS``; merged into ``mode``'s own.
        compile_vae: also compile ``pipe.vae.decoder`` (without CUDA graphs); removed again by ``disable()``.

    Returns the enabled handle. Call ``pipe(...)`` exactly as before. Nothing on the pipeline changes if an
    argument is invalid: every check runs before the hook is attached.
    """
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(getattr(pipe, "scheduler", None), "timesteps"):
        raise ValueError(
            f"compile_pipeline needs a diffusers pipeline with a `unet` and a `scheduler`; got {type(pipe).__name__}."
        )
    for component in ("controlnet", "adapter"):
        if getattr(pipe, component, None) is not None:
            raise ValueError(f"fastcache does not support pipelines with a {component} yet.")
    if hasattr(unet, "_orig_mod"):
        raise ValueError("pipe.unet is already torch.compile'd; pass the plain UNet: fastcache compiles it itself.")
    if hasattr(unet, "_hf_hook"):
        raise ValueError("fastcache keeps the UNet on one device: disable model CPU offload (accelerate hooks) first.")
    if not compile and (inductor_options or compile_vae):
        raise ValueError("inductor_options and compile_vae need compile=True.")
    if compile_vae and not hasattr(getattr(pipe, "vae", None), "decoder"):
        raise ValueError(f"compile_vae needs a pipeline with a VAE decoder (pipe.vae.decoder); "
                         f"{type(pipe).__name__} has none.")
    partition = UNetPartition(unet, branch)
    plan = make_schedule(schedule, interval, center, pow)
    paths = build_paths(partition, compile, mode, inductor_options)
    decoder = compile_decoder(pipe.vae.decoder, inductor_options) if compile_vae else None
    handle = FastCacheHandle(pipe, partition, plan, paths, StepDispatcher(plan), FeatureBuffers(partition), decoder)
    handle.enable()
    logger.info("fastcache: enabled on %s (interval=%d, branch=%d, schedule=%s, compile=%s, inductor_options=%s, "
                "compile_vae=%s)", type(pipe).__name__, interval, branch, plan.kind, paths.mode if compile else False,
                dict(inductor_options or {}), compile_vae)
    return handle
