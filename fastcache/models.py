"""Pipelines to run on: real ones via ``from_pretrained``, or SD-architecture ones built from config.

No machine of ours can download weights, so tests, the demo and benchmarks build the real architectures (or tiny
ones) with random weights. Speed does not depend on the weights; images from random weights are noise, and every
output that uses them says so.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

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

# UNet/VAE configs as published with the models (the keys that differ from diffusers' defaults), plus the
# width of the text embeddings the pipeline is called with.
PRESETS: dict[str, dict[str, Any]] = {
    "sd15": dict(unet=dict(_SD_UNET, cross_attention_dim=768, attention_head_dim=8, sample_size=64),
                 vae=dict(_SD_VAE, sample_size=512), pipeline=StableDiffusionPipeline),
    "sd21": dict(unet=dict(_SD_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                           use_linear_projection=True, sample_size=64),
                 vae=dict(_SD_VAE, sample_size=512), pipeline=StableDiffusionPipeline),
    "sdxl": dict(unet=dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
                           transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=2816, sample_size=128),
                 vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
                 pipeline=StableDiffusionXLPipeline),
    "tiny-sd": dict(unet=dict(_TINY_UNET,
                              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                    vae=_TINY_VAE, pipeline=StableDiffusionPipeline),
    "tiny-sdxl": dict(unet=dict(_TINY_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                              "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + 6 * 8),
                      vae=_TINY_VAE, pipeline=StableDiffusionXLPipeline),
}

# The schedule Stable Diffusion ships with, as a DDIM scheduler.
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


def build_pipeline(preset: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   seed: int = 0) -> DiffusionPipeline:
    """A pipeline of the ``preset`` architecture with random weights and no text encoder."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}.")
    spec = PRESETS[preset]
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the target device: seconds instead of a minute for SDXL
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    if spec["pipeline"] is StableDiffusionXLPipeline:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def load_pipeline(model: str, *, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda"):
    """A real pipeline from a local diffusers folder or a hub id (``DiffusionPipeline.from_pretrained``)."""
    if not os.path.isdir(model) and os.environ.get("HF_HUB_OFFLINE"):
        raise ValueError(f"{model!r} is not a local folder and HF_HUB_OFFLINE is set.")
    return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)


def random_prompt_embeds(pipe: DiffusionPipeline, batch_size: int = 1, *, seed: int = 0,
                         seq_len: int = 77) -> dict[str, torch.Tensor]:
    """Stand-ins for encoded prompts (positive and negative), for pipelines built without a text encoder.

    Returns the keyword arguments the pipeline takes instead of ``prompt``: ``prompt_embeds`` and
    ``negative_prompt_embeds``, plus the pooled ones for SDXL.
    """
    unet = pipe.unet
    generator = torch.Generator("cpu").manual_seed(seed)
    dtype, device = unet.dtype, unet.device

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    width = unet.config.cross_attention_dim
    kwargs = dict(prompt_embeds=randn(batch_size, seq_len, width),
                  negative_prompt_embeds=randn(batch_size, seq_len, width))
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs.update(pooled_prompt_embeds=randn(batch_size, pooled),
                      negative_pooled_prompt_embeds=randn(batch_size, pooled))
    return kwargs


def with_controlnet(pipe: DiffusionPipeline, count: int = 1, seed: int = 0) -> DiffusionPipeline:
    """The ControlNet pipeline of ``pipe``'s kind, sharing its components, with ``count`` ControlNets made from its
    UNet (``ControlNetModel.from_unet``, as ControlNets are trained) whose zero-initialised layers get random
    weights, so that their residuals are not zero. ``count`` > 1 gives a ``MultiControlNetModel``."""
    torch.manual_seed(seed)
    scale = pipe.vae_scale_factor  # the conditioning embedding downsamples the image to the latents' size
    channels = (16, 32, 96, 256)[: scale.bit_length()]
    nets = []
    for _ in range(count):
        net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=channels)
        for layer in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
            torch.nn.init.normal_(layer.weight, std=0.05)
        nets.append(net.to(device=pipe.unet.device, dtype=pipe.unet.dtype))
    controlnet = nets[0] if count == 1 else MultiControlNetModel(nets)
    kind = StableDiffusionXLControlNetPipeline if isinstance(pipe, StableDiffusionXLPipeline) else (
        StableDiffusionControlNetPipeline)
    controlled = kind.from_pipe(pipe, controlnet=controlnet)
    controlled.set_progress_bar_config(disable=True)
    return controlled
