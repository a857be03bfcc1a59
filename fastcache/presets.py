"""The preset architectures and what a model's configs say about valid arguments, known before any weights are read
and before diffusers' pipelines (which import transformers) are imported: the command line checks its arguments with
this module alone, so a bad one is refused at once, in one line.

``fastcache.models`` builds the pipelines; a preset names its pipeline class by name, resolved there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors_text import examples, listing

_SD_UNET = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
)
_SD_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
)
_TINY_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4)
_TINY_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, attention_head_dim=8,
                  cross_attention_dim=32, sample_size=16)

_DEFAULT_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # UNet2DConditionModel's default
# UNet/VAE configs as published with the models (the keys that differ from diffusers' defaults), and the name of the
# diffusers pipeline class that runs them.
PRESETS: dict[str, dict[str, Any]] = {
    "sd15": dict(unet=dict(_SD_UNET, cross_attention_dim=768, attention_head_dim=8, sample_size=64),
                 vae=dict(_SD_VAE, sample_size=512), pipeline="StableDiffusionPipeline"),
    "sd21": dict(unet=dict(_SD_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                           use_linear_projection=True, sample_size=64),
                 vae=dict(_SD_VAE, sample_size=512), pipeline="StableDiffusionPipeline"),
    "sdxl": dict(unet=dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
                           transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=2816, sample_size=128),
                 vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
                 pipeline="StableDiffusionXLPipeline"),
    "tiny-sd": dict(unet=dict(_TINY_UNET,
                              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                    vae=_TINY_VAE, pipeline="StableDiffusionPipeline"),
    "tiny-sdxl": dict(unet=dict(_TINY_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                              "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + 6 * 8),
                      vae=_TINY_VAE, pipeline="StableDiffusionXLPipeline"),
}

# A tiny stand-in for the SDXL refiner's UNet, laid out as the published one (DownBlock2D at both ends, no first
# text encoder: a narrower context, and aesthetic-score time ids: 5 of them beside a pooled embedding of 16).
TINY_REFINER_UNET = dict(_TINY_UNET, block_out_channels=(32, 64, 64, 64),
                         down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         use_linear_projection=True, cross_attention_dim=24, addition_embed_type="text_time",
                         addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 5 * 8)
# Inpainting models: a base architecture whose UNet takes 9 input channels (latents, mask, masked-image latents), as
# the published SD inpainting checkpoints do; served beside a base model (fastcache serve --inpaint-preset).
INPAINT_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(PRESETS[base], unet=dict(PRESETS[base]["unet"], in_channels=9),
               pipeline="StableDiffusionInpaintPipeline")
    for name, base in (("sd15-inpaint", "sd15"), ("tiny-sd-inpaint", "tiny-sd"))
}

# Each preset: the 2-D UNet and motion adapter (AnimateDiff) or the spatio-temporal UNet, VAE and image encoder (SVD)
# configs, the frames a call makes by default, and the name of the pipeline class (built by fastcache.video_models).
VIDEO_PRESETS: dict[str, dict[str, Any]] = {
    # SD 1.5 with the v1-5-3 motion adapter's config (no motion module in the mid block)
    "animatediff": dict(unet=PRESETS["sd15"]["unet"], vae=PRESETS["sd15"]["vae"], frames=16,
                        pipeline="AnimateDiffPipeline",
                        motion=dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                                    motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
                                    use_motion_mid_block=False)),
    "tiny-animatediff": dict(unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                                       attention_head_dim=8, cross_attention_dim=32, sample_size=8,
                                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                             vae=_TINY_VAE, frames=4, pipeline="AnimateDiffPipeline",
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
                   frames=25, pipeline="StableVideoDiffusionPipeline"),
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
                     frames=4, pipeline="StableVideoDiffusionPipeline"),
}

# The schedule Stable Diffusion ships with, as a DDIM scheduler.
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere (CPU kernels are slow or missing in half precision)."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def check_device(device: str) -> None:
    """``ValueError`` unless ``device`` is ``cpu``, ``cuda`` or ``cuda:N`` (whether that device exists is known only
    where it runs)."""
    if not isinstance(device, str) or not (device in ("cpu", "cuda") or (device.startswith("cuda:")
                                                                          and device[5:].isdigit())):
        raise ValueError(f"device must be cpu, cuda or cuda:N; got {device!r}.")


def preset_spec(preset: str) -> dict[str, Any]:
    """The configs of a preset name; ``ValueError`` naming the valid ones."""
    spec = PRESETS.get(preset) or INPAINT_PRESETS.get(preset) or VIDEO_PRESETS.get(preset)
    if spec is None:
        raise ValueError(f"preset must be one of {listing(PRESETS, 'preset')}, an inpainting preset "
                         f"{examples(INPAINT_PRESETS)} or a video preset {examples(VIDEO_PRESETS)}; got {preset!r}.")
    return spec


@dataclass(frozen=True)
class Geometry:
    """What a model's configs say about valid arguments, known before any weights are read."""

    pixel_multiple: int  # image sizes must be multiples of the VAE's scale times the UNet's downsampling
    native_size: int  # pixels
    branches: int  # DeepCache branch ids 0 .. branches - 1


def model_geometry(model: str | None = None, preset: str = "tiny-sd") -> Geometry | None:
    """The ``Geometry`` of a preset or a local diffusers folder (from its configs); ``None`` for a hub id."""
    if model is None:
        unet, vae = preset_spec(preset)["unet"], preset_spec(preset)["vae"]
    elif os.path.isdir(model):
        configs = []
        for part in ("unet", "vae"):
            path = os.path.join(model, part, "config.json")
            if not os.path.isfile(path):
                return None
            with open(path) as f:
                configs.append(json.load(f))
        unet, vae = configs
    else:
        return None
    blocks = len(unet.get("down_block_types", _DEFAULT_DOWN_BLOCKS))
    layers = unet.get("layers_per_block", 2)
    layers = [layers] * blocks if isinstance(layers, int) else list(layers)
    scale = 2 ** (len(vae.get("block_out_channels", (64,))) - 1)
    return Geometry(pixel_multiple=scale * 2 ** (blocks - 1), native_size=unet.get("sample_size", 64) * scale,
                    branches=sum(n + 1 for n in layers))


def size_problem(width: int, height: int, multiple: int, max_size: int | None = None) -> str | None:
    """Why ``width`` x ``height`` pixels cannot be generated (each side a multiple of the model's pixel multiple, the
    VAE's scale times the UNet's downsampling, and at most ``max_size``), or ``None``. The one place this is said."""
    largest = max_size if max_size is not None else max(width, height, multiple)
    if all(multiple <= side <= largest and side % multiple == 0 for side in (width, height)):
        return None
    return f"width and height must be multiples of {multiple} pixels, from {multiple} to {largest}; got " \
           f"{width}x{height}."
