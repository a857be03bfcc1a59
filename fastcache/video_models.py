"""Video pipelines to run on: AnimateDiff and Stable Video Diffusion built from their configs with random weights.

As for the image presets (``models.py``), no weights are downloaded: the architectures are built from the published
configs (the tiny ones are stand-ins small enough for CPU tests), so speed is the real model's and every frame is
noise, which the outputs say.
"""

from __future__ import annotations

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

from .presets import VIDEO_PRESETS  # noqa: F401 (re-exported: the video presets' configs live with the others)

# The scheduler diffusers' AnimateDiff examples use with SD 1.5 checkpoints.
ANIMATEDIFF_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                             timestep_spacing="linspace", steps_offset=1)
# SVD's EulerDiscreteScheduler (EDM: Karras sigmas, v-prediction, continuous timesteps), as published.
SVD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
                     num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                     steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)


def build_video_pipeline(preset: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         seed: int = 0):
    """A video pipeline of the ``preset`` architecture with random weights (AnimateDiff: no text encoder)."""
    spec = VIDEO_PRESETS[preset]
    torch.manual_seed(seed)
    with torch.device(device):
        if spec["pipeline"] == "AnimateDiffPipeline":
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
