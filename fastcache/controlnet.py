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


def controlnet_nets(controlnet) -> list[ControlNetModel]:
    """The ControlNets behind a pipeline's ``controlnet`` (a ``MultiControlNetModel``'s, or itself)."""
    return list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]


def down_layout(model) -> list[tuple[str, int, bool]]:
    """A UNet's or a ControlNet's down blocks: type, layers, downsampler. A ControlNet's residuals meet the UNet's
    skips one for one when the layouts are equal."""
    return [(type(b).__name__, len(b.resnets), b.downsamplers is not None) for b in model.down_blocks]


class ControlNetPartition:
    """The full and the shallow forward of one or several ControlNets at one cache branch, stateless."""

    # ControlNetModel.forward's arguments these paths implement; attention masks and cross_attention_kwargs run the
    # original forward (guess mode too: ``unsupported``)
    arguments = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale",
                 "added_cond_kwargs", "timestep_cond", "class_labels", "guess_mode")
    per_frame = True  # a video pipeline runs it on every frame: its sample is the UNet's per-frame images

    def __init__(self, nets: list[ControlNetModel], boundary: Boundary):
        self.nets, self.boundary = nets, boundary

    @classmethod
    def takes(cls, controlnet: Any) -> bool:
        return all(type(net) is ControlNetModel for net in controlnet_nets(controlnet))

    @classmethod
    def check(cls, controlnet, unet) -> None:
        """``ValueError`` unless each net's encoder is laid out as the UNet's, so that its residuals meet the UNet's
        skips one for one (a ControlNet made with ``ControlNetModel.from_unet`` is)."""
        for net in controlnet_nets(controlnet):
            layout = down_layout(net)
            # an AnimateDiff UNet's blocks are SD's with motion modules: its ControlNet is SD's, run on every frame
            expected = [(name.replace("Motion", "2D"), *rest) for name, *rest in down_layout(unet)]
            if layout != expected:
                raise ValueError(f"fastcache needs a ControlNet whose down blocks are the UNet's {expected}; "
                                 f"got {layout}.")
            if net.config.addition_embed_type not in (None, "text", "text_time"):
                raise ValueError(f"fastcache supports ControlNets with addition_embed_type None, 'text' or "
                                 f"'text_time'; got {net.config.addition_embed_type!r}.")

    @classmethod
    def of(cls, controlnet, boundary: Boundary) -> ControlNetPartition:
        return cls(controlnet_nets(controlnet), boundary)

    def unsupported(self, call: dict) -> bool:
        """Guess mode scales residuals by depth, and the UNet's batch cannot be told from its own: the whole forward
        runs."""
        return call["guess_mode"]

    def inputs(self, call: dict, constant) -> dict:
        """The paths' inputs from a bound forward call, on the sample's device: conditions and scales as lists, one
        per net; ``constant(value, dtype, device)`` gives each scale as a device scalar made once."""
        device = call["sample"].device
        multi = len(self.nets) > 1
        conds = call["controlnet_cond"] if multi else [call["controlnet_cond"]]
        scales = call["conditioning_scale"] if multi else [call["conditioning_scale"]]
        inputs = {name: on_device(call[name], device)
                  for name in ("sample", "encoder_hidden_states", "added_cond_kwargs", "timestep_cond", "class_labels")}
        return dict(inputs, timestep=device_timestep(call["timestep"], device),
                    controlnet_cond=on_device(list(conds), device),
                    conditioning_scale=[constant(float(scale), torch.float32, device) for scale in scales])

    def residual_shapes(self, sample_shape) -> tuple[list[tuple], tuple]:
        return residual_shapes(self.nets[0], sample_shape)

    @staticmethod
    def output(down: list, mid: torch.Tensor) -> ControlNetOutput:
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)

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
            convs = net.controlnet_down_blocks
            down = scaled_residuals(net, [block(s) for s, block in zip(skips, convs, strict=True)], scale)
            mid = scaled_residuals(net, [net.controlnet_mid_block(h)], scale)[0]
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
            convs = net.controlnet_down_blocks  # the first ones: as many as the skips
            down = scaled_residuals(net, [block(s) for s, block in zip(skips, convs, strict=False)], scale)
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


def scaled_residuals(net: ControlNetModel, residuals: list, scale) -> list:
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

    def __init__(self, module: torch.nn.Module, partition, paths):
        # module: the hooked one; partition: its family's (ControlNetPartition, SparseControlNetPartition)
        self.module, self.partition, self.paths = module, partition, paths
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
        inputs = self.partition.inputs(call, self._constant)
        thread = threading.get_ident()
        if shallow:
            residuals = self.paths(False, shape_key(inputs), inputs)
            shapes, mid_shape = self.partition.residual_shapes(sample.shape)
            dtype, device = residuals[0].dtype, sample.device
            down = [*residuals, *(self._nan(shape, dtype, device) for shape in shapes[len(residuals):])]
            mid = self._nan(mid_shape, dtype, device)
            self._partial[thread] = _Partial(down, mid, original)
        else:
            down, mid = self.paths(True, shape_key(inputs), inputs)
            self._partial.pop(thread, None)
        return self.partition.output(down, mid) if call["return_dict"] else (down, mid)

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


def device_timestep(timestep, device) -> torch.Tensor:
    return timestep.to(device) if torch.is_tensor(timestep) else torch.as_tensor(timestep, device=device)
