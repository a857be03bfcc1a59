"""Pipelines to run on: real ones via ``from_pretrained``, or SD-architecture ones built from config (the presets'
configs, in ``fastcache.presets``).

No machine of ours can download weights, so tests, the demo and benchmarks build the real architectures (or tiny
ones) with random weights. Speed does not depend on the weights; images from random weights are noise, and every
output that uses them says so.
"""

from __future__ import annotations

import hashlib
import json
import os

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    MultiAdapter,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLAdapterPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from .presets import (  # noqa: F401 (the presets' names, re-exported: fastcache.models has always had them)
    INPAINT_PRESETS,
    PRESETS,
    SD_SCHEDULER,
    TINY_REFINER_UNET,
    VIDEO_PRESETS,
    Geometry,
    check_device,
    default_dtype,
    model_geometry,
    preset_spec,
)
from .video_models import build_video_pipeline


def build_pipeline(preset: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   seed: int = 0) -> DiffusionPipeline:
    """A pipeline of the ``preset`` architecture (``PRESETS``, ``INPAINT_PRESETS`` or ``VIDEO_PRESETS``) with random
    weights and no text encoder."""
    spec = preset_spec(preset)
    if preset in VIDEO_PRESETS:
        return build_video_pipeline(preset, dtype=dtype, device=device, seed=seed)
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the target device: seconds instead of a minute for SDXL
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    kind = getattr(diffusers, spec["pipeline"])
    if kind is StableDiffusionXLPipeline:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler)
    else:
        pipe = kind(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def load_pipeline(model: str, *, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu"):
    """A real pipeline from a local diffusers folder or a hub id (``DiffusionPipeline.from_pretrained``).

    Components a local folder saved as null (a preset's missing text encoder, tokenizer, safety checker) are passed
    as ``None``, which ``from_pretrained`` otherwise refuses; such a pipeline takes ``prompt_inputs`` embeddings.
    """
    missing = {}
    if os.path.isdir(model):
        index_path = os.path.join(model, "model_index.json")
        if not os.path.isfile(index_path):
            raise ValueError(f"{model!r} is a folder without model_index.json: not a saved diffusers pipeline.")
        with open(index_path) as f:
            index = json.load(f)
        missing = {name: None for name, value in index.items()
                   if isinstance(value, list) and all(part is None for part in value)}
        if "safety_checker" in missing:
            missing["requires_safety_checker"] = False
    elif os.environ.get("HF_HUB_OFFLINE"):
        raise ValueError(f"{model!r} is not a local folder and HF_HUB_OFFLINE is set.")
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **missing)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def open_pipeline(model: str | None, preset: str, *, device: str, dtype: torch.dtype, seed: int = 0):
    """``(pipe, label)``: the pipeline at ``model`` (a folder or hub id), else the preset with random weights; the
    label says which, and that random weights make noise."""
    if model:
        pipe = load_pipeline(model, dtype=dtype, device=device)
        label = model if has_text_encoder(pipe) else f"{model} (no text encoder: prompt embeddings derived from text)"
        return pipe, label
    pipe = build_pipeline(preset, dtype=dtype, device=device, seed=seed)
    kind = "a tiny stand-in, not a real model" if preset.startswith("tiny") else "speed equals the real model's"
    return pipe, (f"{preset} (built from config with RANDOM WEIGHTS: images are noise, {kind}; prompt embeddings "
                  f"derived from the prompt text)")


def has_text_encoder(pipe: DiffusionPipeline) -> bool:
    return getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None


def prompt_inputs(pipe: DiffusionPipeline, prompts: list[str], negative_prompts: list[str] | None = None) -> dict:
    """The pipeline's prompt arguments for one image per entry of ``prompts``.

    A pipeline with a text encoder gets the texts (``negative_prompts=None`` passes ``None``, as a call without a
    negative prompt does: SDXL then uses zeros). One without (the presets, folders saved from them) gets embeddings
    derived from each text alone (a seed from its SHA-256), so equal texts give equal images, in any batch:
    stand-ins that carry no meaning, as the presets' random weights do.
    """
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts.")
    if has_text_encoder(pipe):
        return dict(prompt=list(prompts), negative_prompt=None if negative_prompts is None else list(negative_prompts))
    negative_prompts = negative_prompts or [""] * len(prompts)
    positive = [_text_embeds(pipe, text) for text in prompts]
    negative = [_text_embeds(pipe, text) for text in negative_prompts]
    kwargs = dict(prompt_embeds=torch.cat([p[0] for p in positive]),
                  negative_prompt_embeds=torch.cat([n[0] for n in negative]))
    if positive[0][1] is not None:
        kwargs.update(pooled_prompt_embeds=torch.cat([p[1] for p in positive]),
                      negative_pooled_prompt_embeds=torch.cat([n[1] for n in negative]))
    return kwargs


def _text_embeds(pipe: DiffusionPipeline, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings (and SDXL's pooled ones) for one text, from a seed that only the text decides."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    embeds = random_prompt_embeds(pipe, seed=seed)
    return embeds["prompt_embeds"], embeds.get("pooled_prompt_embeds")


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
    # SDXL: 6 time ids, or the refiner's 5 with aesthetic scores (a video UNet's config may not have the key)
    if unet.config.get("addition_embed_type") == "text_time":
        time_ids = 5 if pipe.config.get("requires_aesthetics_score") else 6
        pooled = unet.config.projection_class_embeddings_input_dim - time_ids * unet.config.addition_time_embed_dim
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
    kind = StableDiffusionXLControlNetPipeline if _is_sdxl(pipe) else StableDiffusionControlNetPipeline
    return _ready(kind.from_pipe(pipe, controlnet=controlnet))


def _is_sdxl(pipe: DiffusionPipeline) -> bool:
    return pipe.unet.config.addition_embed_type == "text_time"


def _like(model: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """``new`` on ``model``'s device, in its dtype (cast only if it differs: diffusers warns on every cast)."""
    new = new.to(model.device)
    return new if model.dtype == torch.float32 else new.to(dtype=model.dtype)


def _ready(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint_pipeline(pipe: DiffusionPipeline, unet_channels: int = 9, seed: int = 0) -> DiffusionPipeline:
    """The inpainting pipeline of ``pipe``'s kind (SD or SDXL), sharing its components. ``unet_channels=9``: with a
    UNet of its own, ``pipe``'s config with the inpainting models' 9 input channels (latents, mask, masked image
    latents), random weights; ``4``: ``pipe``'s own UNet, which the pipeline blends with the masked image per step."""
    if unet_channels not in (4, 9):
        raise ValueError(f"unet_channels must be 4 or 9; got {unet_channels!r}.")
    kind = StableDiffusionXLInpaintPipeline if _is_sdxl(pipe) else StableDiffusionInpaintPipeline
    components = {}
    if unet_channels == 9:
        torch.manual_seed(seed)
        components["unet"] = _like(pipe.unet, UNet2DConditionModel.from_config(pipe.unet.config, in_channels=9))
    return _ready(kind.from_pipe(pipe, **components))


def refiner_pipeline(base: DiffusionPipeline, unet_config: dict | None = None, seed: int = 1) -> DiffusionPipeline:
    """An SDXL refiner for ``base``: ``StableDiffusionXLImg2ImgPipeline`` with ``requires_aesthetics_score=True``, a
    UNet of its own (``unet_config``, default ``TINY_REFINER_UNET``; random weights), ``base``'s VAE, a scheduler of
    the same config, and no text encoder (call it with prompt embeddings of its UNet's widths)."""
    torch.manual_seed(seed)
    with torch.device(base.unet.device):
        unet = _like(base.unet, UNet2DConditionModel(**(unet_config or TINY_REFINER_UNET)))
    scheduler = type(base.scheduler).from_config(base.scheduler.config)
    return _ready(StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=scheduler, requires_aesthetics_score=True))


def with_adapter(pipe: DiffusionPipeline, count: int = 1, seed: int = 0) -> DiffusionPipeline:
    """The T2I-Adapter pipeline of ``pipe``'s kind, sharing its components, with ``count`` adapters (random weights;
    ``count`` > 1: a ``MultiAdapter``) whose features have the shapes the UNet adds them at: SD's full adapter, one
    feature per down block from the latents' size down; SDXL's, one more for the mid block, the first after the
    first block's downsampler."""
    torch.manual_seed(seed)
    channels = list(pipe.unet.config.block_out_channels)
    scale = pipe.vae_scale_factor
    if _is_sdxl(pipe):
        config = dict(channels=[*channels, channels[-1]], downscale_factor=2 * scale, adapter_type="full_adapter_xl")
    else:
        config = dict(channels=channels, downscale_factor=scale, adapter_type="full_adapter")
    adapters = [_like(pipe.unet, T2IAdapter(in_channels=3, num_res_blocks=1, **config)) for _ in range(count)]
    adapter = adapters[0] if count == 1 else MultiAdapter(adapters)
    kind = StableDiffusionXLAdapterPipeline if _is_sdxl(pipe) else StableDiffusionAdapterPipeline
    return _ready(kind.from_pipe(pipe, adapter=adapter))


def with_text_encoder(pipe: DiffusionPipeline, seed: int = 0) -> DiffusionPipeline:
    """``pipe`` with a random one-layer CLIP text encoder if it was built without one, in place.

    The encoder never runs (the presets' pipelines take prompt embeddings): SD pipelines scale the text encoder's
    LoRA layers for a per-call LoRA scale (``cross_attention_kwargs={"scale": s}``) and fail without one.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    if getattr(pipe, "text_encoder", True) is not None:
        return pipe
    torch.manual_seed(seed)
    width = pipe.unet.config.cross_attention_dim
    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                            num_attention_heads=8 if width % 8 == 0 else 1, vocab_size=1000)
    pipe.register_modules(text_encoder=CLIPTextModel(config).to(device=pipe.unet.device, dtype=pipe.unet.dtype))
    return pipe


def random_lora(unet: UNet2DConditionModel, rank: int = 8, seed: int = 0,
                targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")) -> dict[str, torch.Tensor]:
    """A LoRA for ``unet``'s attention projections with random weights (so it changes the output), keyed as
    ``save_lora_weights`` writes them (``unet.<module>.lora_A.weight``): a stand-in for a downloaded LoRA, for
    ``pipe.load_lora_weights``."""
    generator = torch.Generator("cpu").manual_seed(seed)
    state_dict = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{target}") for target in targets):
            for part, shape in (("lora_A", (rank, module.in_features)), ("lora_B", (module.out_features, rank))):
                weight = torch.randn(shape, generator=generator) * 0.3 / shape[1] ** 0.5
                state_dict[f"unet.{name}.{part}.weight"] = weight.to(device=unet.device, dtype=unet.dtype)
    return state_dict


def random_ip_adapter(unet: UNet2DConditionModel, embed_dim: int, seed: int = 0) -> dict:
    """An IP-Adapter for ``unet`` (image projection, and the cross-attentions' image keys and values) with random
    weights, in the layout ``unet._load_ip_adapter_weights`` reads; ``embed_dim``: the image encoder's."""
    generator = torch.Generator("cpu").manual_seed(seed)

    def random(*shape):
        return (torch.randn(*shape, generator=generator) * 0.3 / shape[-1] ** 0.5).to(unet.device, unet.dtype)

    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": random(4 * cross, embed_dim), "proj.bias": random(4 * cross),
                  "norm.weight": random(cross) + 1, "norm.bias": random(cross)}
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:
        # cross-attentions, numbered 1, 3, 5, ... as diffusers reads them (AnimateDiff's motion modules have none)
        if not name.endswith("attn1.processor") and "motion_modules" not in name:
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            ip_adapter[f"{key}.to_k_ip.weight"] = random(hidden, cross)
            ip_adapter[f"{key}.to_v_ip.weight"] = random(hidden, cross)
            key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}
