import sys

import numpy as np
import pytest

from fastcache.video_output import write_video


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
