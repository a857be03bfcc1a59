"""AnimateDiff's ``UNetMotionModel`` cut as the 2-D UNet is, with each motion module in the layer it follows.

The motion UNet is SD's UNet run on every frame (the 5-D sample ``(batch, channels, frames, h, w)`` flattened to
``batch * frames`` images) with a motion module (a temporal transformer, ``motion_modules[i]``) after layer ``i``'s
resnet and attention. A motion module belongs to its layer: a skip step runs exactly the motion modules of the layers
it computes, and the cached feature (per frame, ``batch * frames`` leading) is the output of the last skipped layer's
motion module. ``DeepCacheSDHelper``, which wraps resnets and attentions only, recomputes the skipped layers' motion
modules from their cached inputs: the same values, computed again.
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_motion_model import UNetMotionModel, UNetMotionOutput

from .partition import UNetPartition


class MotionPartition(UNetPartition):
    """The full and shallow paths of a ``UNetMotionModel`` (AnimateDiff, AnimateDiff SDXL)."""

    arguments = ("sample", "timestep", "encoder_hidden_states", "timestep_cond", "added_cond_kwargs",
                 "down_block_additional_residuals", "mid_block_additional_residual")
    output = UNetMotionOutput
    unet_class = UNetMotionModel
    blocks = dict(down=("CrossAttnDownBlockMotion", "DownBlockMotion"), up=("CrossAttnUpBlockMotion", "UpBlockMotion"),
                  mid=("UNetMidBlockCrossAttnMotion", "UNetMidBlock2DCrossAttn"))
    layer_parts = ("resnets", "attentions", "motion_modules")

    def frames(self, sample_shape) -> int:
        return sample_shape[2]

    def feature_shape(self, sample_shape) -> tuple[int, ...]:
        batch, channels, frames, height, width = sample_shape
        return super().feature_shape((batch * frames, channels, height, width))

    def check_input(self, sample_shape) -> None:
        """The motion modules' positional embeddings hold ``motion_max_seq_length`` frames: a longer video fails in
        diffusers with a shape error, unless FreeNoise windows the frames (its window must fit)."""
        frames, limit = sample_shape[2], self.unet.config.motion_max_seq_length
        block = self.unet.down_blocks[0].motion_modules[0].transformer_blocks[0]
        window = getattr(block, "context_length", None)  # FreeNoise's transformer blocks window the frames
        if window is None and frames > limit:
            raise ValueError(f"this motion adapter takes at most {limit} frames (motion_max_seq_length); got {frames}. "
                             f"For longer videos enable FreeNoise (pipe.enable_free_noise(context_length={limit})).")
        if window is not None and window > limit:
            raise ValueError(f"FreeNoise's context_length must be at most {limit} (motion_max_seq_length); "
                             f"got {window}.")

    def frame_signature(self, sample_signature):
        if sample_signature is None:
            return None
        dtype, (batch, channels, frames, height, width), device = sample_signature
        return dtype, torch.Size((batch * frames, channels, height, width)), device

    def full(self, sample, timestep, encoder_hidden_states, cache, timestep_cond=None, added_cond_kwargs=None,
             down_block_additional_residuals=None, mid_block_additional_residual=None):
        """Whole UNet; writes the per-frame feature at the boundary into ``cache``."""
        emb, context, h = self._stem(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs)
        h = self._full(h, emb, context, cache, down_block_additional_residuals, mid_block_additional_residual)
        return _to_video(h, sample.shape[2])

    def shallow(self, sample, timestep, encoder_hidden_states, cache, timestep_cond=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None):
        """Only the layers above the branch, with their motion modules; everything deeper comes from ``cache``."""
        emb, context, h = self._stem(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs)
        h = self._shallow(h, emb, context, cache, down_block_additional_residuals, mid_block_additional_residual)
        return _to_video(h, sample.shape[2])

    def _stem(self, sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs):
        """Embeddings repeated per frame, the frames flattened into the batch, and ``conv_in``: as
        ``UNetMotionModel.forward`` computes them (the tests hold the full path to the forward bit for bit)."""
        unet = self.unet
        batch, frames = sample.shape[0], sample.shape[2]
        timesteps = timestep[None] if timestep.dim() == 0 else timestep
        t_emb = unet.time_proj(timesteps.expand(batch)).to(dtype=unet.dtype)
        emb = unet.time_embedding(t_emb, timestep_cond)
        if unet.config.addition_embed_type == "text_time":  # AnimateDiff SDXL
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            time_embeds = unet.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
            emb = emb + unet.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        emb = emb.repeat_interleave(frames, dim=0, output_size=emb.shape[0] * frames)
        if unet.encoder_hid_proj is not None and unet.config.encoder_hid_dim_type == "ip_image_proj":  # IP-Adapter
            image_embeds = unet.encoder_hid_proj(added_cond_kwargs["image_embeds"])
            image_embeds = [embeds.repeat_interleave(frames, dim=0, output_size=embeds.shape[0] * frames)
                            for embeds in image_embeds]
            encoder_hidden_states = (encoder_hidden_states, image_embeds)
        sample = sample.permute(0, 2, 1, 3, 4).reshape((batch * frames, -1) + sample.shape[3:])
        return emb, (encoder_hidden_states, frames), unet.conv_in(sample)

    @staticmethod
    def _call_block(block, *args, encoder_hidden_states, **kwargs):
        """A whole block: the text context to blocks that attend to it, the frame count to blocks with motion
        modules (a UNet without a motion mid block has SD's)."""
        context, frames = encoder_hidden_states
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = context
        if hasattr(block, "motion_modules"):
            kwargs["num_frames"] = frames
        return block(*args, **kwargs)

    @staticmethod
    def _layer(block, i, h, emb, context):
        """Layer ``i`` of a block: its resnet, its transformer if it has one, then its motion module."""
        context, frames = context  # called with the keywords the motion blocks use: FreeNoise's split inference
        h = block.resnets[i](input_tensor=h, temb=emb)  # splits the inputs it finds by name
        if getattr(block, "attentions", None) is not None:
            h = block.attentions[i](hidden_states=h, encoder_hidden_states=context, return_dict=False)[0]
        return block.motion_modules[i](h, num_frames=frames)


def _to_video(h: torch.Tensor, frames: int) -> torch.Tensor:
    """``(batch * frames, c, h, w)`` back to ``(batch, c, frames, h, w)``, as the UNet's forward reshapes it."""
    return h[None, :].reshape((-1, frames) + h.shape[1:]).permute(0, 2, 1, 3, 4)
