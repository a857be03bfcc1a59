import sys

import numpy as np
import pytest
from conftest import decode_mp4

from fastcache.video_output import to_uint8, write_video


def frames(count=5, height=18, width=14):
    ramp = np.linspace(0, 1, count)[:, None, None, None]
    return np.broadcast_to(ramp, (count, height, width, 3)).copy()


def test_mp4_holds_every_frame_in_order(tmp_path):
    import av

    path = write_video(frames(), tmp_path / "video.mp4", fps=8)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5 and decoded[0].shape == (18, 14, 3)
    means = [frame.mean() for frame in decoded]
    assert means == sorted(means) and means[0] < 10 and means[-1] > 245


def test_odd_sizes_are_padded_for_yuv420(tmp_path):
    import av

    path = write_video(frames(height=17, width=15), tmp_path / "odd.mp4")
    with av.open(str(path)) as container:
        assert (container.streams.video[0].height, container.streams.video[0].width) == (18, 16)


def test_animated_webp(tmp_path):
    from PIL import Image

    path = write_video(frames(), tmp_path / "video.webp", fps=4)
    with Image.open(path) as image:
        assert image.n_frames == 5 and image.size == (14, 18)


def test_other_suffixes_are_refused_naming_the_formats(tmp_path):
    with pytest.raises(ValueError, match=r"a video is written as \.mp4 or \.webp; got .*video\.gif"):
        write_video(frames(), tmp_path / "video.gif")


def test_without_pyav_mp4_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    with pytest.raises(ImportError, match=r'pip install "fastcache\[video\]"'):
        write_video(frames(), tmp_path / "video.mp4")


def test_crf_0_is_lossless_rgb_exactly_the_frames_given(tmp_path):
    noise = np.random.default_rng(0).random((5, 17, 14, 3), dtype=np.float32)  # odd sizes: RGB needs no padding
    decoded, rate = decode_mp4(write_video(noise, tmp_path / "exact.mp4", fps=8, crf=0))
    assert rate == 8 and np.array_equal(decoded, to_uint8(noise))  # the bytes a PNG of the frames would hold


def test_the_default_yuv420_is_close_on_smooth_frames(tmp_path):
    # yuv420p halves the colour resolution and crf 18 quantises: bit-exactness is not its point. On smooth moving
    # frames (what real video is) it stays above 35 dB PSNR; measured here 42.6 dB.
    y, x = np.mgrid[0:64, 0:96]
    smooth = np.stack([np.stack([(x + 4 * i) % 256 / 255, y / 63, np.full(x.shape, 0.5)], -1) for i in range(8)])
    decoded, rate = decode_mp4(write_video(smooth, tmp_path / "smooth.mp4", fps=24, crf=18))
    assert decoded.shape == smooth.shape and rate == 24
    assert 10 * np.log10(1 / np.mean((decoded / 255.0 - smooth) ** 2)) > 35


def test_frames_that_are_not_a_video_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"frames must be \(frames, height, width, 3\)"):
        write_video(np.zeros((4, 4, 3)), tmp_path / "flat.mp4")
