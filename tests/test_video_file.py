"""MP4 files by PyAV: lossless RGB decodes to exactly the frames given; the default H.264 is close on smooth frames;
without PyAV, one line names the install."""

import sys

import numpy as np
import pytest

from fastcache.serving import video_file
from fastcache.serving.video_file import as_uint8, decode_mp4, encode_mp4, require_av


def noise(frames=5, height=32, width=48, seed=0) -> np.ndarray:
    """Frames of random floats in [0, 1], as a random-weight pipeline makes them."""
    return np.random.default_rng(seed).random((frames, height, width, 3), dtype=np.float32)


def gradient(frames=8, height=64, width=96) -> np.ndarray:
    """Smooth moving frames, like real video: what a lossy codec is made for."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x + 4 * i) % 256 / 255, y / (height - 1), np.full(x.shape, 0.5)], -1)
                     for i in range(frames)])


def test_lossless_rgb_decodes_to_exactly_the_frames_given(tmp_path):
    frames = noise()
    size = encode_mp4(frames, 8, tmp_path / "a.mp4", crf=0)
    decoded, rate = decode_mp4(tmp_path / "a.mp4")
    assert size == (tmp_path / "a.mp4").stat().st_size > 0
    assert decoded.shape == (5, 32, 48, 3) and rate == 8
    assert np.array_equal(decoded, as_uint8(frames))  # the bytes the images API would put in its PNGs


def test_the_default_h264_is_close_on_smooth_frames(tmp_path):
    # yuv420p halves the colour resolution and crf 18 quantises: bit-exactness is not its point. On smooth frames
    # (what real video is) it stays above 35 dB PSNR; measured here 42.6 dB.
    frames = gradient()
    encode_mp4(frames, 24, tmp_path / "b.mp4")
    decoded, rate = decode_mp4(tmp_path / "b.mp4")
    assert decoded.shape == frames.shape and rate == 24
    mse = np.mean((decoded / 255.0 - frames) ** 2)
    assert 10 * np.log10(1 / mse) > 35


def test_uint8_frames_are_written_as_they_are(tmp_path):
    frames = as_uint8(noise(frames=2, seed=1))
    encode_mp4(frames, 1, tmp_path / "c.mp4", crf=0)
    assert np.array_equal(decode_mp4(tmp_path / "c.mp4")[0], frames)


def test_frames_that_are_not_a_video_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"frames must be \(frames, height, width, 3\)"):
        encode_mp4(np.zeros((4, 4, 3)), 8, tmp_path / "d.mp4")


def test_without_pyav_one_line_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails as where it is not installed
    with pytest.raises(ImportError) as error:
        require_av()
    assert str(error.value) == 'serving video needs PyAV: pip install "fastcache[video]"'
    assert str(error.value) == video_file.INSTALL_HINT
