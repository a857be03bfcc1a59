"""Video pipelines to run on: AnimateDiff and Stable Video Diffusion built from their configs with random weights.

As for the image presets (``models.py``), no weights are downloaded: the architectures are built from the published
configs (the tiny ones are stand-ins small enough for CPU tests), so speed is the real model's and every frame is
noise, which the outputs say.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    EulerDiscreteScheduler,
    MotionAdapter,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)

_SD15_UNET = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, sample_size=64)
_SD_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)
_TINY_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4)
# The scheduler diffusers' AnimateDiff examples use with SD 1.5 checkpoints.
ANIMATEDIFF_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                             timestep_spacing="linspace", steps_offset=1)
# SVD's EulerDiscreteScheduler (EDM: Karras sigmas, v-prediction, continuous timesteps), as published.
SVD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
                     num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                     steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)

# Each preset: the 2-D UNet and motion adapter (AnimateDiff) or the spatio-temporal UNet, VAE and image encoder (SVD)
# configs, the frames a call makes by default, and the pipeline class.
VIDEO_PRESETS: dict[str, dict[str, Any]] = {
    # SD 1.5 with the v1-5-3 motion adapter's config (no motion module in the mid block)
    "animatediff": dict(unet=_SD15_UNET, vae=_SD_VAE, frames=16, pipeline=AnimateDiffPipeline,
                        motion=dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                                    motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
                                    use_motion_mid_block=False)),
    "tiny-animatediff": dict(unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                                       attention_head_dim=8, cross_attention_dim=32, sample_size=8,
                                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                             vae=_TINY_VAE, frames=4, pipeline=AnimateDiffPipeline,
                             motion=dict(block_out_channels=(32, 64, 64), motion_layers_per_block=2,
                                         motion_num_attention_heads=2, motion_norm_num_groups=8,
                                         motion_max_seq_length=32, use_motion_mid_block=True)),
    # stabilityai/stable-video-diffusion-img2vid-xt: 25 frames at 576x1024, CLIP ViT-H/14 image encoder
    "svd-xt": dict(unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                             num_attention_heads=(5, 10, 20, 20), addition_time_embed_dim=256,
                             projection_class_embeddings_input_dim=768, in_channels=8, out_channels=4, num_frames=25,
                             sample_size=96),
                   vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            layers_per_block=2, latent_channels=4, sample_size=768),
                   image_encoder=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                      num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024),
                   frames=25, pipeline=StableVideoDiffusionPipeline),
    "tiny-svd": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
                               down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                               up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                               num_attention_heads=(2, 4), addition_time_embed_dim=8,
                               projection_class_embeddings_input_dim=24, in_channels=8, out_channels=4, num_frames=4,
                               sample_size=8),
                     vae=dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                              layers_per_block=1, latent_channels=4),
                     image_encoder=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, patch_size=32, image_size=224, projection_dim=32),
                     frames=4, pipeline=StableVideoDiffusionPipeline),
}


def build_video_pipeline(preset: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         seed: int = 0):
    """A video pipeline of the ``preset`` architecture with random weights (AnimateDiff: no text encoder)."""
    spec = VIDEO_PRESETS[preset]
    torch.manual_seed(seed)
    with torch.device(device):
        if spec["pipeline"] is AnimateDiffPipeline:
            pipe = _animatediff(spec)
        else:
            pipe = _svd(spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def motion_unet(unet_config: dict, motion_config: dict) -> UNetMotionModel:
    """A ``UNetMotionModel`` as ``AnimateDiffPipeline`` makes it: SD's UNet and a motion adapter, random weights."""
    return UNetMotionModel.from_unet2d(UNet2DConditionModel(**unet_config), MotionAdapter(**motion_config))


def _animatediff(spec: dict) -> AnimateDiffPipeline:
    """As ``from_pretrained`` makes it: SD's UNet and the motion adapter, which the pipeline makes a motion UNet of
    (and keeps: FreeNoise reads its config)."""
    unet, adapter = UNet2DConditionModel(**spec["unet"]), MotionAdapter(**spec["motion"])
    return AnimateDiffPipeline(vae=AutoencoderKL(**spec["vae"]), text_encoder=None, tokenizer=None, unet=unet,
                               motion_adapter=adapter, scheduler=DDIMScheduler(**ANIMATEDIFF_SCHEDULER))


def _svd(spec: dict) -> StableVideoDiffusionPipeline:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    size = spec["image_encoder"]["image_size"]
    return StableVideoDiffusionPipeline(
        vae=AutoencoderKLTemporalDecoder(**spec["vae"]),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**spec["image_encoder"])),
        unet=UNetSpatioTemporalConditionModel(**spec["unet"]), scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))


def is_video(pipe) -> bool:
    """Whether ``pipe`` makes videos (its UNet is a video family's)."""
    return isinstance(getattr(pipe, "unet", None), (UNetMotionModel, UNetSpatioTemporalConditionModel))


def conditioning_image(size: tuple[int, int], seed: int = 0):
    """A fixed image (smooth random colours) for image-to-video pipelines run without one: ``(width, height)``."""
    import numpy as np
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(size[1], size[0]), mode="bilinear")[0]
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
