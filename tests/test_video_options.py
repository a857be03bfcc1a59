"""The video options check themselves naming the command line's flag; a model makes video or not, known before it
is loaded where its configs say so."""

import json
import re
import sys

import pytest

from fastcache.extras import MissingExtra, require
from fastcache.serving.video_options import VideoOptions, default_data_dir, makes_video


@pytest.mark.parametrize("fields, message", [
    (dict(sizes=((32, 0),)), "video_sizes must be (width, height) pairs of positive integers"),
    (dict(sizes=(32,)), "video_sizes must be"),
    (dict(frames=(0,)), "video_frames must be integers from 1 to 1024"),
    (dict(frames=(True,)), "video_frames must be integers"),
    (dict(fps=0), "video_fps must be an integer from 1 to 120"),
    (dict(ttl=0), "video_ttl must be a number of seconds above 0"),
    (dict(ttl=float("inf")), "video_ttl must be"),
    (dict(max_jobs=0), "max_video_jobs must be an integer from 1 to 100000"),
    (dict(crf=52), "video_crf must be an integer from 0 (lossless) to 51"),
    (dict(data_dir=3), "data_dir must be a folder's path"),
])
def test_bad_video_options_are_refused_naming_the_flag(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        VideoOptions(**fields)


def test_video_options_normalise_what_they_hold(tmp_path, monkeypatch):
    options = VideoOptions(sizes=[[64, 32], (64, 32)], frames=[16, 8, 16], data_dir=str(tmp_path / "x" / ".."))
    assert options.sizes == ((64, 32),) and options.frames == (8, 16) and options.data_dir == str(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert VideoOptions().data_dir == default_data_dir() == str(tmp_path / "fastcache" / "videos")


def test_whether_a_model_makes_video_is_read_from_its_folder_or_preset(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "AnimateDiffPipeline"}))
    assert makes_video(str(tmp_path), "") is True
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert makes_video(str(tmp_path), "") is False
    assert makes_video("org/some-hub-model", "") is None  # known once loaded
    assert makes_video(None, "StableVideoDiffusionPipeline") and not makes_video(None, "StableDiffusionPipeline")


def test_without_pyav_serving_video_is_one_line_naming_the_install(monkeypatch):
    require("video")  # installed here
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails as where it is not installed
    with pytest.raises(MissingExtra) as error:
        require("video")
    assert str(error.value) == 'the video extra is not installed (no av): pip install "fastcache[video]"'
