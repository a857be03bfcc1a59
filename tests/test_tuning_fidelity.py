"""Image metrics against hand computations on known images; latents refused; LPIPS and CLIP only from local files."""

import math

import numpy as np
import pytest
import torch
from conftest import save_tiny_clip

from fastcache.tuning import fidelity


def test_psnr_is_10_log10_of_one_over_the_mse_per_image():
    reference = np.full((2, 16, 16, 3), 0.5)
    images = reference.copy()
    images[0, :8] += 0.1  # half the pixels off by 0.1: MSE 0.005
    assert fidelity.psnr(images, reference) == [pytest.approx(10 * math.log10(1 / 0.005)), math.inf]


def test_ssim_of_flat_images_is_the_luminance_term_and_identical_images_score_one():
    # flat images have no variance, so SSIM reduces to (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), C1 = (0.01 L)^2
    x, y, c1 = 0.5, 0.25, 0.01**2
    values = fidelity.ssim(np.full((1, 16, 16, 3), x), np.full((1, 16, 16, 3), y))
    assert values == [pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), abs=1e-9)]
    noise = np.random.default_rng(0).random((2, 16, 16, 3))
    assert fidelity.ssim(noise, noise) == [pytest.approx(1.0)] * 2
    assert fidelity.ssim(noise[::-1].copy(), noise)[0] < 0.5


@pytest.mark.parametrize("images, message", [
    (np.zeros((1, 4, 16, 16)), "decoded RGB images"),  # latents, not images
    (np.full((1, 8, 8, 3), 2.0), r"values in \[0, 1\]"),
])
def test_no_metric_on_latents_or_unscaled_images(images, message):
    with pytest.raises(ValueError, match=message):
        fidelity.psnr(images, np.zeros_like(images))


def test_clip_score_from_a_local_folder_is_100_times_the_cosine(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = save_tiny_clip(tmp_path / "clip")
    assert fidelity.clip_model_problem(str(folder)) is None
    images = np.random.default_rng(1).random((2, 32, 32, 3))
    prompts = ["a red house", "a blue boat"]
    score = fidelity.ClipScore(str(folder))(images, prompts)
    # by hand: CLIP's own normalised embeddings of the same uint8 pixels
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    pixels = list(torch.from_numpy(np.round(images * 255)).to(torch.uint8).permute(0, 3, 1, 2))
    with torch.no_grad():
        out = model(**processor(text=prompts, images=pixels, return_tensors="pt", padding=True))
    cosines = (out.image_embeds * out.text_embeds).sum(-1)  # torchmetrics clamps the mean at 0, not each image
    assert score == pytest.approx(max(float(100 * cosines.mean()), 0.0), abs=1e-4) and score > 0


def test_missing_weights_are_named_not_downloaded(tmp_path):
    assert "no such folder" in fidelity.clip_model_problem(str(tmp_path / "nothing"))
    (tmp_path / "config.json").write_text("{}")
    assert "processor" in fidelity.clip_model_problem(str(tmp_path))
    why = fidelity.lpips_unavailable()
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert "torchvision is not installed" in why
    else:  # with torchvision, only its AlexNet weights already in torch's hub cache count
        assert why is None or "nothing is downloaded" in why
