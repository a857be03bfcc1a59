"""The ControlNet split as the UNet is: on a skip step, only the residuals the shallow UNet path consumes.

A ControlNet is the UNet's encoder again, so on a cached step it would dominate the cost: the UNet runs its shallow
path, but a whole ControlNet still runs. Yet the shallow path adds residuals only to the skip connections it
computes itself: ``conv_in``'s and those of the down layers above the cache branch. The shallow ControlNet computes
exactly those, from the ControlNet's own submodules: embeddings, conditioning embedding, ``conv_in``, the same down
layers, their zero convolutions and the output scaling. Its deeper blocks and mid block are skipped.
``MultiControlNetModel``'s nets run one after the other and their residuals are summed, as it sums them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.controlnet import ControlNetOutput
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from .partition import Boundary, UNetPartition, run_down
from .shapes import on_device, shape_key

SUPPORTED_CONTROLNETS = ("ControlNetModel", "MultiControlNetModel of ControlNetModels")


def controlnet_nets(controlnet) -> list[ControlNetModel]:
    """The ControlNets behind a pipeline's ``controlnet``; ``ValueError`` naming what is supported."""
    nets = list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]
    bad = sorted({type(net).__name__ for net in nets if type(net) is not ControlNetModel})
    if bad:
        raise ValueError(f"fastcache supports {' and '.join(SUPPORTED_CONTROLNETS)}; this pipeline has {bad}.")
    return nets


def check_controlnet(net: ControlNetModel, unet) -> None:
    """``ValueError`` unless ``net``'s encoder is laid out as the UNet's, so that its residuals meet the UNet's skips
    one for one (a ControlNet made with ``ControlNetModel.from_unet`` is)."""
    layout = [(type(b).__name__, len(b.resnets), b.downsamplers is not None) for b in net.down_blocks]
    # an AnimateDiff UNet's blocks are SD's with motion modules: its ControlNet is SD's, run on every frame
    expected = [(type(b).__name__.replace("Motion", "2D"), len(b.resnets), b.downsamplers is not None)
                for b in unet.down_blocks]
    if layout != expected:
        raise ValueError(f"fastcache needs a ControlNet whose down blocks are the UNet's {expected}; got {layout}.")
    if net.config.addition_embed_type not in (None, "text", "text_time"):
        raise ValueError(f"fastcache supports ControlNets with addition_embed_type None, 'text' or 'text_time'; "
                         f"got {net.config.addition_embed_type!r}.")


class ControlNetPartition:
    """The full and the shallow forward of one or several ControlNets at one cache branch, stateless."""

    def __init__(self, nets: list[ControlNetModel], boundary: Boundary):
        self.nets, self.boundary = nets, boundary

    def full(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
             added_cond_kwargs=None, timestep_cond=None, class_labels=None):
        """Every residual and the mid block's, summed over the nets: what the ControlNet's forward returns."""
        total_down = total_mid = None
        for net, cond, scale in zip(self.nets, controlnet_cond, conditioning_scale, strict=True):
            emb, h = _stem(net, sample, timestep, encoder_hidden_states, cond, added_cond_kwargs, timestep_cond,
                           class_labels)
            h, skips = run_down(net.down_blocks, h, emb, encoder_hidden_states)
            if net.mid_block is not None:
                h = UNetPartition._call_block(net.mid_block, h, emb, encoder_hidden_states=encoder_hidden_states)
            down = _scaled(net, [block(s) for s, block in zip(skips, net.controlnet_down_blocks, strict=True)], scale)
            mid = _scaled(net, [net.controlnet_mid_block(h)], scale)[0]
            total_down = down if total_down is None else [a + b for a, b in zip(total_down, down, strict=True)]
            total_mid = mid if total_mid is None else total_mid + mid
        return total_down, total_mid

    def shallow(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                added_cond_kwargs=None, timestep_cond=None, class_labels=None):
        """The residuals of the first ``boundary.shallow_skips`` skip connections only, summed over the nets."""
        total = None
        for net, cond, scale in zip(self.nets, controlnet_cond, conditioning_scale, strict=True):
            emb, h = _stem(net, sample, timestep, encoder_hidden_states, cond, added_cond_kwargs, timestep_cond,
                           class_labels)
            _, skips = run_down(net.down_blocks, h, emb, encoder_hidden_states, self.boundary)
            down = _scaled(net, [block(s) for s, block in zip(skips, net.controlnet_down_blocks, strict=False)], scale)
            total = down if total is None else [a + b for a, b in zip(total, down, strict=True)]
        return total


def residual_shapes(net: ControlNetModel, sample_shape) -> tuple[list[tuple], tuple]:
    """Shapes of a ControlNet's down residuals and of its mid residual for a latent of ``sample_shape``."""
    batch, _, height, width = sample_shape
    pooled = net.config.global_pool_conditions
    shapes, blocks = [], iter(net.controlnet_down_blocks)

    def add(h, w):
        channels = next(blocks).out_channels
        shapes.append((batch, channels, 1, 1) if pooled else (batch, channels, h, w))

    add(height, width)
    for down in net.down_blocks:
        for _ in down.resnets:
            add(height, width)
        if down.downsamplers is not None:
            height, width = (height + 1) // 2, (width + 1) // 2
            add(height, width)
    channels = net.controlnet_mid_block.out_channels
    return shapes, (batch, channels, 1, 1) if pooled else (batch, channels, height, width)


def _stem(net: ControlNetModel, sample, timestep, encoder_hidden_states, controlnet_cond, added_cond_kwargs,
          timestep_cond, class_labels):
    """Time, class and added embeddings, ``conv_in`` and the conditioning embedding, as ``ControlNetModel.forward``
    computes them (the tests hold this to the forward bit for bit)."""
    if net.config.controlnet_conditioning_channel_order == "bgr":
        controlnet_cond = torch.flip(controlnet_cond, dims=[1])
    timesteps = timestep[None] if timestep.dim() == 0 else timestep
    timesteps = timesteps.to(sample.device).expand(sample.shape[0])
    emb = net.time_embedding(net.time_proj(timesteps).to(dtype=sample.dtype), timestep_cond)
    if net.class_embedding is not None:
        if net.config.class_embed_type == "timestep":
            class_labels = net.time_proj(class_labels)
        emb = emb + net.class_embedding(class_labels).to(dtype=net.dtype)
    kind = net.config.addition_embed_type
    if kind == "text":
        emb = emb + net.add_embedding(encoder_hidden_states)
    elif kind == "text_time":
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = net.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
        emb = emb + net.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
    return emb, net.conv_in(sample) + net.controlnet_cond_embedding(controlnet_cond)


def _scaled(net: ControlNetModel, residuals: list, scale) -> list:
    """The forward's output scaling without guess mode (which runs the whole ControlNet), and its pooling."""
    residuals = [r * scale for r in residuals]
    if net.config.global_pool_conditions:
        residuals = [torch.mean(r, dim=(2, 3), keepdim=True) for r in residuals]
    return residuals


@dataclass(eq=False)
class _Partial:
    """Residuals a shallow ControlNet returned: real for the first skips, NaN placeholders for the rest."""

    down: list
    mid: torch.Tensor
    recompute: Callable[[], tuple]  # the whole ControlNet on the same call

    def passed_in(self, down, mid) -> bool:
        """Whether a UNet call got exactly these tensors (pipelines pass them on as they are)."""
        return mid is self.mid and down is not None and len(down) == len(self.down) and all(
            a is b for a, b in zip(down, self.down, strict=True))


class SplitControlNet:
    """Runs the pipeline's ControlNet through its own paths: whole on full steps, shallow where the UNet evaluation
    that follows will be shallow (compiled, with CUDA graphs, as the UNet's paths are).

    The deep residuals a shallow run does not compute are NaN placeholders of the right shapes: nothing can add them
    silently. The UNet hook asks ``take_partial`` whether its call carries such residuals; if that evaluation cannot
    be shallow after all (it falls back, or its step turned full), the whole ControlNet runs again on the same call
    and its residuals replace them.
    """

    def __init__(self, module: torch.nn.Module, nets: list[ControlNetModel], partition: ControlNetPartition, paths):
        self.module, self.nets, self.partition, self.paths = module, nets, partition, paths  # module: the hooked one
        self._partial: dict[int, _Partial] = {}  # thread ident -> the residuals it was last handed
        self._constants: dict[tuple, torch.Tensor] = {}  # scales and NaN placeholders, made once per value

    def reset(self) -> None:
        self._partial.clear()

    def whole(self, partial: _Partial) -> dict:
        """The whole ControlNet's residuals, for a UNet evaluation that got a shallow ControlNet's but runs full."""
        self.paths.counters.controlnet_recomputes += 1
        down, mid = partial.recompute()[:2]
        return dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def run(self, call: dict, shallow: bool, original: Callable[[], Any]) -> Any:
        """The ControlNet on ``call`` (bound ``forward`` arguments), returned as the ControlNet returns it."""
        sample = call["sample"]
        multi = len(self.nets) > 1
        conds = call["controlnet_cond"] if multi else [call["controlnet_cond"]]
        scales = call["conditioning_scale"] if multi else [call["conditioning_scale"]]
        inputs = {name: on_device(call[name], sample.device)
                  for name in ("sample", "encoder_hidden_states", "added_cond_kwargs", "timestep_cond", "class_labels")}
        scales = [self._constant(float(scale), torch.float32, sample.device) for scale in scales]
        inputs.update(timestep=_device_timestep(call["timestep"], sample.device),
                      controlnet_cond=on_device(list(conds), sample.device), conditioning_scale=scales)
        thread = threading.get_ident()
        if shallow:
            residuals = self.paths(False, shape_key(inputs), inputs)
            shapes, mid_shape = residual_shapes(self.nets[0], sample.shape)
            dtype, device = residuals[0].dtype, sample.device
            down = [*residuals, *(self._nan(shape, dtype, device) for shape in shapes[len(residuals):])]
            mid = self._nan(mid_shape, dtype, device)
            self._partial[thread] = _Partial(down, mid, original)
        else:
            down, mid = self.paths(True, shape_key(inputs), inputs)
            self._partial.pop(thread, None)
        if call["return_dict"]:
            return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
        return down, mid

    @staticmethod
    def residuals_for_step(inputs: dict, full: bool, boundary: Boundary) -> dict:
        """The UNet inputs with the ControlNet residuals its step consumes (whoever computed them): all on a full
        step; on a skip step those of the skip connections it computes, and the mid residual only where the cached
        feature is the mid block's output (elsewhere the cached feature already holds it)."""
        down, mid = inputs.get("down_block_additional_residuals"), inputs.get("mid_block_additional_residual")
        if full or (down is None and mid is None):
            return inputs
        return dict(inputs, down_block_additional_residuals=None if down is None else down[:boundary.shallow_skips],
                    mid_block_additional_residual=mid if boundary.at_mid_output else None)

    def take_partial(self, down, mid) -> _Partial | None:
        """This thread's partial residuals, if a UNet call got them; forgotten either way."""
        partial = self._partial.pop(threading.get_ident(), None)
        return partial if partial is not None and partial.passed_in(down, mid) else None

    def _constant(self, value: float, dtype, device) -> torch.Tensor:
        key = (value, dtype, device)
        if key not in self._constants:  # made once: creating a device tensor per step would copy from the host
            self._constants[key] = torch.full((), value, dtype=dtype, device=device)
        return self._constants[key]

    def _nan(self, shape, dtype, device) -> torch.Tensor:
        return self._constant(float("nan"), dtype, device).expand(shape)


def _device_timestep(timestep, device) -> torch.Tensor:
    return timestep.to(device) if torch.is_tensor(timestep) else torch.as_tensor(timestep, device=device)
