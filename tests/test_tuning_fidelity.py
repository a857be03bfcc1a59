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


# -- video: every frame, and the consecutive-frame differences ---------------------------------------------------------

def flat_video(levels, size: int = 16) -> np.ndarray:
    """A video of flat frames, one grey level each: (frames, size, size, 3)."""
    return np.stack([np.full((size, size, 3), level) for level in levels])


REFERENCE_LEVELS = (0.2, 0.3, 0.4)


def psnr_of(mse: float) -> float:
    return 10 * math.log10(1 / mse)


def test_temporal_psnr_tells_a_steady_error_from_flicker_with_the_same_frame_psnr():
    reference = flat_video(REFERENCE_LEVELS)
    steady = flat_video([level + 0.05 for level in REFERENCE_LEVELS])  # every frame 0.05 too bright
    flicker = flat_video([level + off for level, off in zip(REFERENCE_LEVELS, (0.05, -0.05, 0.05), strict=True)])
    assert fidelity.psnr(steady, reference) == fidelity.psnr(flicker, reference) == [
        pytest.approx(psnr_of(0.05**2))] * 3
    # differences: steady equals the reference's (inf); flicker's are off by -0.1 then +0.1 (MSE 0.01: 20 dB)
    values = fidelity.temporal_psnr(np.stack([steady, flicker]), np.stack([reference, reference]))
    assert values == [[math.inf, math.inf], [pytest.approx(20.0), pytest.approx(20.0)]]


def test_temporal_psnr_of_a_change_in_part_of_one_frame():
    reference = flat_video(REFERENCE_LEVELS)
    video = reference.copy()
    video[2, :8] += 0.1  # half of the last frame: its difference to frame 1 is off by 0.1 on half the pixels
    assert fidelity.temporal_psnr(video[None], reference[None]) == [[math.inf, pytest.approx(psnr_of(0.005))]]


def test_video_fidelity_is_the_mean_and_worst_over_every_frame_and_every_pair():
    reference = flat_video(REFERENCE_LEVELS)
    videos = np.stack([flat_video([level + off * amplitude for level, off in zip(REFERENCE_LEVELS, (1, -1, 1),
                                                                                  strict=True)])
                       for amplitude in (0.05, 0.1)])
    scores = fidelity.video_fidelity(videos, np.stack([reference, reference]))
    # frames: three at MSE 0.0025, three at 0.01; pairs: two off by 0.1 (MSE 0.01), two by 0.2 (0.04)
    assert scores["psnr_db"] == pytest.approx((3 * psnr_of(0.0025) + 3 * psnr_of(0.01)) / 6)
    assert scores["psnr_min_db"] == pytest.approx(20.0)
    assert scores["temporal_psnr_db"] == pytest.approx((2 * 20.0 + 2 * psnr_of(0.04)) / 4)
    assert scores["temporal_psnr_min_db"] == pytest.approx(psnr_of(0.04))
    # flat frames: SSIM is the luminance term (2xy + C1) / (x^2 + y^2 + C1)
    c1 = 0.01**2
    luminance = [(2 * (y + d) * y + c1) / ((y + d) ** 2 + y * y + c1) for amplitude in (0.05, 0.1)
                 for y, d in zip(REFERENCE_LEVELS, (amplitude, -amplitude, amplitude), strict=True)]
    assert scores["ssim"] == pytest.approx(sum(luminance) / 6, abs=1e-9)
    assert scores["ssim_min"] == pytest.approx(min(luminance), abs=1e-9)


@pytest.mark.parametrize("videos, message", [
    (np.zeros((2, 8, 8, 3)), r"shape \(videos, frames, H, W, 3\)"),  # images, not videos
    (np.zeros((1, 3, 4, 8, 8)), r"shape \(videos, frames, H, W, 3\)"),  # latents
    (np.full((1, 2, 8, 8, 3), 1.5), r"values in \[0, 1\]"),
    (np.zeros((1, 1, 8, 8, 3)), "at least 2 frames"),
])
def test_no_temporal_figure_on_images_latents_unscaled_frames_or_one_frame(videos, message):
    with pytest.raises(ValueError, match=message):
        fidelity.temporal_psnr(videos, np.zeros_like(videos))


def test_videos_of_other_shapes_are_refused():
    with pytest.raises(ValueError, match="reference videos"):
        fidelity.video_fidelity(np.zeros((1, 3, 8, 8, 3)), np.zeros((1, 4, 8, 8, 3)))
