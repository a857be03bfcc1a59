"""ModelScope's ``UNet3DConditionModel`` (``TextToVideoSDPipeline``, ``VideoToVideoSDPipeline``) cut as the 2-D UNet is.

Its sample is ``(batch, channels, frames, h, w)``, flattened to ``batch * frames`` images after the stem, which also
runs a temporal transformer (``transformer_in``) on ``conv_in``'s output. Layer ``i`` of a block is its resnet, its
temporal convolution and, in cross-attention blocks, its transformer and temporal transformer, in that order: all
four belong to the layer, so a skip step runs exactly those of the layers it computes. ``DeepCacheSDHelper`` wraps
resnets and attentions only and recomputes the temporal layers of skipped layers from their cached inputs.
"""

from __future__ import annotations

from diffusers.models.unets.unet_3d_condition import UNet3DConditionModel, UNet3DConditionOutput

from .partition import UNetPartition
from .partition_motion import _to_video


class TemporalConvPartition(UNetPartition):
    """The full and shallow paths of a ``UNet3DConditionModel``."""

    arguments = ("sample", "timestep", "encoder_hidden_states", "timestep_cond", "down_block_additional_residuals",
                 "mid_block_additional_residual")
    output = UNet3DConditionOutput
    unet_class = UNet3DConditionModel
    blocks = dict(down=("CrossAttnDownBlock3D", "DownBlock3D"), up=("CrossAttnUpBlock3D", "UpBlock3D"),
                  mid=("UNetMidBlock3DCrossAttn",))
    layer_parts = ("resnets", "temp_convs", "attentions", "temp_attentions")

    def frames(self, sample_shape) -> int:
        return sample_shape[2]

    def feature_shape(self, sample_shape) -> tuple[int, ...]:
        batch, channels, frames, height, width = sample_shape
        return super().feature_shape((batch * frames, channels, height, width))

    def full(self, sample, timestep, encoder_hidden_states, cache, timestep_cond=None,
             down_block_additional_residuals=None, mid_block_additional_residual=None):
        """Whole UNet; writes the per-frame feature at the boundary into ``cache``."""
        emb, context, h = self._stem(sample, timestep, encoder_hidden_states, timestep_cond)
        h = self._full(h, emb, context, cache, down_block_additional_residuals, mid_block_additional_residual)
        return _to_video(h, sample.shape[2])

    def shallow(self, sample, timestep, encoder_hidden_states, cache, timestep_cond=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None):
        """Only the layers above the branch, with their temporal layers; everything deeper comes from ``cache``."""
        emb, context, h = self._stem(sample, timestep, encoder_hidden_states, timestep_cond)
        h = self._shallow(h, emb, context, cache, down_block_additional_residuals, mid_block_additional_residual)
        return _to_video(h, sample.shape[2])

    def _stem(self, sample, timestep, encoder_hidden_states, timestep_cond):
        """Embeddings and text repeated per frame, the frames flattened into the batch, ``conv_in`` and the temporal
        transformer after it: as ``UNet3DConditionModel.forward`` computes them (held to it bit for bit)."""
        unet = self.unet
        batch, frames = sample.shape[0], sample.shape[2]
        timesteps = timestep[None] if timestep.dim() == 0 else timestep
        emb = unet.time_embedding(unet.time_proj(timesteps.expand(batch)).to(dtype=unet.dtype), timestep_cond)
        emb = emb.repeat_interleave(frames, dim=0, output_size=emb.shape[0] * frames)
        context = encoder_hidden_states.repeat_interleave(frames, dim=0,
                                                          output_size=encoder_hidden_states.shape[0] * frames)
        sample = sample.permute(0, 2, 1, 3, 4).reshape((batch * frames, -1) + sample.shape[3:])
        h = unet.transformer_in(unet.conv_in(sample), num_frames=frames, return_dict=False)[0]
        return emb, (context, frames), h

    @staticmethod
    def _call_block(block, *args, encoder_hidden_states, **kwargs):
        """A whole block: the text context to blocks that attend to it, the frame count to every block."""
        context, frames = encoder_hidden_states
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = context
        return block(*args, num_frames=frames, **kwargs)

    @staticmethod
    def _layer(block, i, h, emb, context):
        """Layer ``i`` of a block: resnet, temporal convolution, then transformer and temporal transformer if any."""
        context, frames = context
        h = block.temp_convs[i](block.resnets[i](h, emb), num_frames=frames)
        if getattr(block, "attentions", None) is not None:
            h = block.attentions[i](h, encoder_hidden_states=context, return_dict=False)[0]
            h = block.temp_attentions[i](h, num_frames=frames, return_dict=False)[0]
        return h
