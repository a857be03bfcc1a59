"""How close images are to reference images: PSNR and SSIM (torchmetrics), LPIPS and CLIP score from local weights.

Images are what pipelines return with ``output_type="np"``: float arrays (N, H, W, 3) in [0, 1]. Every metric here
is computed on decoded images, never on latents. LPIPS and CLIP score need network weights; they run only from
files already on this machine (nothing is downloaded), and a caller that asked for them gets a note saying why
they were skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def as_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) images in [0, 1] as a float64 (N, 3, H, W) tensor; ``ValueError`` for anything else (latents)."""
    tensor = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"images must be decoded RGB images of shape (N, H, W, 3); got {tuple(tensor.shape)}.")
    if ((tensor < 0) | (tensor > 1)).any():  # NaN passes: a broken image gets a NaN score, not an error
        raise ValueError("images must have values in [0, 1] (a pipeline's output_type='np').")
    return tensor.permute(0, 3, 1, 2)


def _pair(images, reference) -> tuple[torch.Tensor, torch.Tensor]:
    images, reference = as_tensor(images), as_tensor(reference)
    if images.shape != reference.shape:
        raise ValueError(f"{tuple(images.shape)} images against {tuple(reference.shape)} reference images.")
    return images, reference


def psnr(images, reference) -> list[float]:
    """Per image PSNR in dB, ``10 log10(1 / MSE)`` over all pixels and channels; ``inf`` for identical images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    images, reference = _pair(images, reference)
    values = peak_signal_noise_ratio(images, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return [float(v) for v in values]


def ssim(images, reference) -> list[float]:
    """Per image SSIM (Gaussian window 11, sigma 1.5, as in Wang et al. 2004); 1 for identical images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    images, reference = _pair(images, reference)
    values = structural_similarity_index_measure(images, reference, data_range=1.0, reduction="none")
    return [float(v) for v in values]


def lpips_unavailable() -> str | None:
    """Why LPIPS cannot run from local weights (a note for the output), or ``None`` when it can.

    torchmetrics' LPIPS needs torchvision and its ImageNet AlexNet weights in torch's hub cache; its own linear
    layers ship with torchmetrics.
    """
    try:
        import torchvision
    except ImportError:
        return "LPIPS skipped: torchvision is not installed (torchmetrics' LPIPS needs it)"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url.rsplit(
        "/", 1)[-1]
    if not weights.is_file():
        return f"LPIPS skipped: its AlexNet weights are not on this machine ({weights}); nothing is downloaded"
    return None


class LPIPS:
    """Mean LPIPS (AlexNet) of images against reference images; lower is closer. Only with ``lpips_unavailable()``
    ``None``."""

    def __init__(self, device: str | torch.device = "cpu"):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.device = device
        self.metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device)

    def __call__(self, images, reference) -> float:
        images, reference = _pair(images, reference)
        self.metric.reset()
        self.metric.update(images.float().to(self.device), reference.float().to(self.device))
        return float(self.metric.compute())


def clip_model_problem(path: str) -> str | None:
    """What is wrong with ``path`` as a local CLIP model folder, or ``None``."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"{path}: no such folder (a local CLIP model folder as save_pretrained writes it; nothing is downloaded)"
    if not (folder / "config.json").is_file():
        return f"{path}: no config.json: not a saved CLIP model"
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        return f"{path}: no preprocessor_config.json or processor_config.json: the CLIP processor is missing"
    return None


class ClipScore:
    """CLIP score of images against their prompts as torchmetrics defines it (``100 cos(image, text)`` averaged over
    the images, at least 0), with a CLIP model loaded from a local folder only."""

    def __init__(self, path: str, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = str(Path(path).expanduser())
        self.model = _Features(CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval())
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)

    def __call__(self, images, prompts: list[str]) -> float:
        from torchmetrics.functional.multimodal import clip_score

        pixels = (as_tensor(images) * 255).round().to(torch.uint8)
        if len(pixels) != len(prompts):
            raise ValueError(f"{len(pixels)} images for {len(prompts)} prompts.")
        with torch.no_grad():
            return float(clip_score(list(pixels), list(prompts), lambda: (self.model, self.processor)))


class _Features(torch.nn.Module):
    """A CLIP model whose ``get_*_features`` return the projected embeddings as tensors, which torchmetrics expects
    (transformers 5 returns an output object holding them as ``pooler_output``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_text_features(*args, **kwargs))


def _embedding(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output
