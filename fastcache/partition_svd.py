"""Stable Video Diffusion's ``UNetSpatioTemporalConditionModel`` cut as the 2-D UNet is.

Its sample is ``(batch, frames, channels, h, w)`` (the image latents concatenated on channels by the pipeline),
flattened to ``batch * frames`` images; the time embedding (with ``added_time_ids``: fps, motion bucket, noise
augmentation) and the image embedding are repeated per frame. Its layers are a ``SpatioTemporalResBlock`` and, in
cross-attention blocks, a ``TransformerSpatioTemporalModel``, both of which mix frames themselves and take the
``image_only_indicator``. The cached feature is per frame: ``batch * frames`` leading.
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_spatio_temporal_condition import (
    UNetSpatioTemporalConditionModel,
    UNetSpatioTemporalConditionOutput,
)

from .partition import UNetPartition


class SpatioTemporalPartition(UNetPartition):
    """The full and shallow paths of a ``UNetSpatioTemporalConditionModel`` (SVD, SVD-XT)."""

    arguments = ("sample", "timestep", "encoder_hidden_states", "added_time_ids")
    output = UNetSpatioTemporalConditionOutput
    unet_class = UNetSpatioTemporalConditionModel
    blocks = dict(down=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                  up=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"), mid=("UNetMidBlockSpatioTemporal",))

    def frames(self, sample_shape) -> int:
        return sample_shape[1]

    def feature_shape(self, sample_shape) -> tuple[int, ...]:
        batch, frames, channels, height, width = sample_shape
        return super().feature_shape((batch * frames, channels, height, width))

    def full(self, sample, timestep, encoder_hidden_states, added_time_ids, cache):
        """Whole UNet; writes the per-frame feature at the boundary into ``cache``."""
        emb, context, h = self._stem(sample, timestep, encoder_hidden_states, added_time_ids)
        return self._full(h, emb, context, cache).reshape(sample.shape[:2] + (-1,) + sample.shape[3:])

    def shallow(self, sample, timestep, encoder_hidden_states, added_time_ids, cache):
        """Only the layers above the branch; everything deeper comes from ``cache``."""
        emb, context, h = self._stem(sample, timestep, encoder_hidden_states, added_time_ids)
        return self._shallow(h, emb, context, cache).reshape(sample.shape[:2] + (-1,) + sample.shape[3:])

    def _stem(self, sample, timestep, encoder_hidden_states, added_time_ids):
        """Embeddings repeated per frame, the frames flattened into the batch, ``conv_in`` and the indicator: as
        ``UNetSpatioTemporalConditionModel.forward`` computes them (held to it bit for bit by the tests)."""
        unet = self.unet
        batch, frames = sample.shape[:2]
        timesteps = timestep[None] if timestep.dim() == 0 else timestep
        emb = unet.time_embedding(unet.time_proj(timesteps.expand(batch)).to(dtype=sample.dtype))
        time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((batch, -1)).to(emb.dtype)
        emb = emb + unet.add_embedding(time_embeds)
        emb = emb.repeat_interleave(frames, dim=0, output_size=emb.shape[0] * frames)
        context = encoder_hidden_states.repeat_interleave(frames, dim=0,
                                                          output_size=encoder_hidden_states.shape[0] * frames)
        h = unet.conv_in(sample.flatten(0, 1))
        indicator = torch.zeros(batch, frames, dtype=h.dtype, device=h.device)  # every frame is video
        return emb, (context, indicator), h

    @staticmethod
    def _call_block(block, *args, encoder_hidden_states, **kwargs):
        """A whole block: the image context to blocks that attend to it, the indicator to every block."""
        context, indicator = encoder_hidden_states
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = context
        return block(*args, image_only_indicator=indicator, **kwargs)

    @staticmethod
    def _layer(block, i, h, emb, context):
        """Layer ``i`` of a block: its spatio-temporal resnet, then its spatio-temporal transformer if it has one."""
        context, indicator = context
        h = block.resnets[i](h, emb, image_only_indicator=indicator)
        if getattr(block, "attentions", None) is not None:
            h = block.attentions[i](h, encoder_hidden_states=context, image_only_indicator=indicator,
                                    return_dict=False)[0]
        return h
