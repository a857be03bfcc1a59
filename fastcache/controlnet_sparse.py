"""SparseCtrl (``SparseControlNetModel``, ``AnimateDiffSparseControlNetPipeline``) split as the motion UNet is.

SparseCtrl is AnimateDiff's encoder again, motion modules included, with a conditioning embedding of the sparse
condition frames and their mask; its noisy input is zeroed in its forward, so only the timestep, the text and the
condition reach its residuals. The semantics are the DeepCache helper's on the same pipeline: the helper wraps only
``pipe.unet``'s modules, so SparseCtrl runs whole at every step and a skip step adds the current residuals of the
skips it computes. A residual depends only on the layers before it (motion modules mix frames within a layer), so
the shallow SparseCtrl computes exactly those residuals, from its own submodules: embeddings, ``conv_in``, the
conditioning embedding, the down layers above the branch with their motion modules, their zero convolutions and the
output scaling. Its deeper blocks and mid block are skipped.

Why it once seemed not to equal the helper: ``prepare_image`` VAE-encodes the condition frames by sampling the
posterior with torch's global RNG, not the call's ``generator``, so two calls with one seed differ (rel L2 0.03 on the
tiny model, 0.0 while the zero convolutions were zero). Comparisons seed the global RNG before each call.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SparseControlNetModel
from diffusers.models.controlnets.controlnet_sparsectrl import SparseControlNetOutput

from .controlnet import device_timestep, down_layout, residual_shapes, scaled_residuals
from .partition import Boundary, run_down
from .partition_motion import MotionPartition
from .shapes import on_device


class SparseControlNetPartition:
    """The full and the shallow forward of a ``SparseControlNetModel`` at one cache branch, stateless."""

    # SparseControlNetModel.forward's arguments these paths implement; attention masks and cross_attention_kwargs
    # run the original forward
    arguments = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale",
                 "timestep_cond", "conditioning_mask", "guess_mode")
    per_frame = False  # it takes the UNet's own 5-D sample, not per-frame images

    def __init__(self, net: SparseControlNetModel, boundary: Boundary):
        self.net, self.boundary = net, boundary

    @classmethod
    def takes(cls, controlnet: Any) -> bool:
        return isinstance(controlnet, SparseControlNetModel)

    @classmethod
    def check(cls, net: SparseControlNetModel, unet) -> None:
        """``ValueError`` unless ``net``'s down blocks are the motion UNet's, so its residuals meet the UNet's skips
        one for one."""
        layout, expected = down_layout(net), down_layout(unet)
        if layout != expected:
            raise ValueError(f"fastcache needs a SparseControlNetModel whose down blocks are the UNet's {expected}; "
                             f"got {layout}.")

    @classmethod
    def of(cls, controlnet: SparseControlNetModel, boundary: Boundary) -> SparseControlNetPartition:
        return cls(controlnet, boundary)

    def frames(self, sample_shape) -> int:
        """Frames per sample: its text embeddings hold ``batch * frames`` rows."""
        return sample_shape[2]

    def unsupported(self, call: dict) -> bool:
        """Guess mode scales its residuals by depth (the whole forward runs); a missing mask the forward needs makes
        the forward raise its own error."""
        return call["guess_mode"] or (call["conditioning_mask"] is None and self.net.concat_conditioning_mask)

    def inputs(self, call: dict, constant) -> dict:
        """The paths' inputs from a bound forward call, on the sample's device; ``constant(value, dtype, device)``
        gives the scale as a device scalar made once."""
        device = call["sample"].device
        inputs = {name: on_device(call[name], device) for name in
                  ("sample", "encoder_hidden_states", "controlnet_cond", "conditioning_mask", "timestep_cond")}
        scale = constant(float(call["conditioning_scale"]), torch.float32, device)
        return dict(inputs, timestep=device_timestep(call["timestep"], device), conditioning_scale=scale)

    def residual_shapes(self, sample_shape) -> tuple[list[tuple], tuple]:
        """Its residuals are per frame: ``batch * frames`` images."""
        batch, channels, frames, height, width = sample_shape
        return residual_shapes(self.net, (batch * frames, channels, height, width))

    @staticmethod
    def output(down: list, mid: torch.Tensor) -> SparseControlNetOutput:
        return SparseControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)

    def full(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
             conditioning_mask=None, timestep_cond=None):
        """Every residual and the mid block's: what the forward returns (guess mode aside)."""
        net = self.net
        emb, h = self._stem(sample, timestep, controlnet_cond, conditioning_mask, timestep_cond)
        context = (encoder_hidden_states, sample.shape[2])
        h, skips = run_down(net.down_blocks, h, emb, context, calls=MotionPartition)
        if net.mid_block is not None:
            h = MotionPartition._call_block(net.mid_block, h, emb, encoder_hidden_states=context)
        convs = net.controlnet_down_blocks
        down = scaled_residuals(net, [block(s) for s, block in zip(skips, convs, strict=True)], conditioning_scale)
        return down, scaled_residuals(net, [net.controlnet_mid_block(h)], conditioning_scale)[0]

    def shallow(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                conditioning_mask=None, timestep_cond=None):
        """The residuals of the first ``boundary.shallow_skips`` skip connections only."""
        net = self.net
        emb, h = self._stem(sample, timestep, controlnet_cond, conditioning_mask, timestep_cond)
        context = (encoder_hidden_states, sample.shape[2])
        _, skips = run_down(net.down_blocks, h, emb, context, self.boundary, calls=MotionPartition)
        convs = net.controlnet_down_blocks  # the first ones: as many as the skips
        return scaled_residuals(net, [block(s) for s, block in zip(skips, convs, strict=False)], conditioning_scale)

    def _stem(self, sample, timestep, controlnet_cond, conditioning_mask, timestep_cond):
        """Time embedding per frame, and ``conv_in`` of zeros plus the embedded condition (with its mask), as the
        forward computes them (held to it bit for bit): the noisy sample gives only its shape, dtype and device."""
        net = self.net
        batch, channels, frames, height, width = sample.shape
        if net.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        timesteps = timestep[None] if timestep.dim() == 0 else timestep
        emb = net.time_embedding(net.time_proj(timesteps.expand(batch)).to(dtype=sample.dtype), timestep_cond)
        emb = emb.repeat_interleave(frames, dim=0, output_size=emb.shape[0] * frames)
        h = net.conv_in(sample.new_zeros((batch * frames, channels, height, width)))
        h = h[:, None].reshape((batch, frames) + h.shape[1:])
        if net.concat_conditioning_mask:
            controlnet_cond = torch.cat([controlnet_cond, conditioning_mask], dim=1)
        cond_batch = controlnet_cond.shape[0]  # 1 beside a guided batch of 2: the sum broadcasts
        cond = controlnet_cond.permute(0, 2, 1, 3, 4).reshape((cond_batch * frames, -1) + controlnet_cond.shape[3:])
        cond = net.controlnet_cond_embedding(cond)
        h = h + cond[:, None].reshape((cond_batch, frames) + cond.shape[1:])
        return emb, h.reshape((batch * frames,) + h.shape[2:])
