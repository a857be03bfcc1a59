"""A video request read from its fields: the length from seconds and/or num_frames at fps, the size, the prompt or
the image, and the fields images and videos share checked by the images API's own rules."""

import re

import pytest
from conftest import tiny_animatediff, tiny_svd, video_model
from test_edits import bomb, encoded, picture

from fastcache.serving.request import InvalidRequest
from fastcache.serving.video_request import VideoBody, VideoForm, VideoRequest, parse_seconds, video_request


@pytest.fixture(scope="module")
def text_model():
    return video_model(tiny_animatediff(), sizes=((32, 32), (48, 32)), frames=(4, 8), fps=8)


@pytest.fixture(scope="module")
def image_model():
    return video_model(tiny_svd(), sizes=((32, 32),), frames=(4,))


def read(model, upload=None, form=False, **fields):
    return video_request((VideoForm if form else VideoBody)(**fields), upload, model)


def test_the_length_is_num_frames_or_seconds_at_fps(text_model):
    assert read(text_model, prompt="x").frames == 4  # the first served count
    assert read(text_model, prompt="x", seconds="1").frames == 8  # OpenAI's clients send a string
    assert read(text_model, prompt="x", seconds=0.5, fps=8).frames == 4
    assert read(text_model, prompt="x", seconds=2, fps=4).frames == 8
    request = read(text_model, prompt="x", num_frames=8, seconds=1.0)
    assert (request.frames, request.fps, request.seconds) == (8, 8, 1.0)


@pytest.mark.parametrize("fields, message", [
    (dict(num_frames=8, seconds="2"), "num_frames 8 at 8 fps lasts 1 s, not 2; give one of seconds and num_frames"),
    (dict(seconds="0.3"), "seconds 0.3 at 8 fps is not a whole number of frames; served frame counts (at 8 fps): "
                          "4 (0.5 s), 8 (1 s)."),
    (dict(num_frames=5), "num_frames 5 is not served; served frame counts (at 8 fps): 4 (0.5 s), 8 (1 s)."),
    (dict(seconds="3"), "num_frames 24 is not served"),
    (dict(seconds="four"), "seconds must be a positive number of at most 1024"),
    (dict(seconds=-1), "seconds must be a positive number"),
    (dict(seconds="1e9"), "seconds must be a positive number"),
    (dict(fps=0), "fps must be an integer from 1 to 120"),
    (dict(size="64x64"), "size 64x64 is not served for video; served sizes: 32x32, 48x32."),
    (dict(size="big"), "size must be 'WIDTHxHEIGHT', one of the served sizes: 32x32, 48x32"),
    (dict(prompt=""), "prompt is required"),
    (dict(prompt="   "), "prompt must be a non-empty string"),  # the images' rule
    (dict(seed=-1), "seed must be between 0"),
    (dict(guidance_scale=60.0), "guidance_scale must be a finite number between 0 and 50"),
    (dict(lora=[{"name": "a", "scale": 99}]), "lora 'a': scale must be a finite number from -10 to 10"),
    (dict(input_reference={"image_url": "data:..."}), "input_reference must be uploaded as a file"),
])
def test_bad_fields_name_what_is_valid(text_model, fields, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        read(text_model, **{"prompt": "x", **fields})


def test_a_multipart_form_reads_cache_and_lora_as_image_edits_do(text_model):
    request = read(text_model, form=True, prompt="x", num_frames="8", cache=None, lora="style", seed="3")
    assert (request.frames, request.seed, request.lora) == (8, 3, (("style", 1.0),))
    with pytest.raises(InvalidRequest, match=re.escape('cache must be JSON like {"interval": 2}')):
        read(text_model, form=True, prompt="x", cache="{interval")
    with pytest.raises(InvalidRequest, match="input_reference is not taken: this model makes video from a prompt"):
        read(text_model, upload=encoded(picture()), form=True, prompt="x")


def test_image_to_video_takes_an_upload_checked_on_its_header(image_model):
    request = read(image_model, upload=encoded(picture(seed=1)), form=True, prompt="ignored")
    assert request.image.size == (32, 32) and request.image.mode == "RGB" and request.frames == 4
    assert request.fps == 7 and request.guidance_scale == 3.0  # SVD's defaults
    resized = read(image_model, upload=encoded(picture(48, 48)), form=True, resize="true")
    assert resized.image.size == (32, 32)
    for upload, fields, message in [
        (None, {}, "input_reference is required: this model makes video from an image"),
        (b"not an image", {}, "input_reference is not a PNG, JPEG or WebP image"),
        (bomb(100_000, 100_000), {}, "input_reference declares more pixels than any served image"),
        (encoded(picture(48, 48)), {}, "input_reference is 48x48 pixels, not the size asked for (32x32); send "
                                       "resize=true"),
        (encoded(picture()), {"negative_prompt": "blur"}, "negative_prompt is not taken by image to video"),
    ]:
        with pytest.raises(InvalidRequest, match=re.escape(message)):
            read(image_model, upload=upload, form=True, **fields)


def test_a_video_request_checks_what_no_server_could_serve():
    with pytest.raises(InvalidRequest, match="num_frames must be an integer from 1 to 1024"):
        VideoRequest("x", 32, 32, 0, 8, 2, 7.5)
    with pytest.raises(InvalidRequest, match="prompt must be a non-empty string"):
        VideoRequest("", 32, 32, 4, 8, 2, 7.5)
    assert VideoRequest("x", 32, 32, 4, 8, 2, 7.5).seed >= 0  # a random seed when none is given
    assert parse_seconds(" 2.5 ") == 2.5 and parse_seconds(4) == 4.0
