"""The one call of a video pipeline (AnimateDiff from a prompt, SVD from an image): the same video as a direct call
for the same seed, progress per step; a served video model's defaults, and what it refuses."""

import re

import numpy as np
import pytest
import torch
from conftest import rel_l2, tiny_animatediff, tiny_svd, video_model
from test_edits import picture

from fastcache.models import prompt_inputs
from fastcache.serving.request import InvalidRequest
from fastcache.serving.video_pipeline import run_video
from fastcache.serving.video_request import VideoRequest


@pytest.fixture(scope="module")
def animatediff():
    return tiny_animatediff()


@pytest.fixture(scope="module")
def svd():
    return tiny_svd()


def test_text_to_video_equals_a_direct_call_with_the_same_seed(animatediff):
    request = VideoRequest("a cat", 32, 32, 4, 8, 2, 7.5, negative_prompt="blurry", seed=11)
    steps = []
    frames = run_video(animatediff, request, progress=lambda done, total: steps.append((done, total)))
    direct = animatediff(**prompt_inputs(animatediff, ["a cat"], ["blurry"]), num_frames=4, height=32, width=32,
                         num_inference_steps=2, guidance_scale=7.5, output_type="np",
                         generator=torch.Generator().manual_seed(11)).frames[0]
    assert frames.shape == (4, 32, 32, 3) and np.array_equal(frames, direct)
    assert steps == [(1, 2), (2, 2)]
    other = run_video(animatediff, VideoRequest("a cat", 32, 32, 4, 8, 2, 7.5, negative_prompt="blurry", seed=12))
    assert rel_l2(other, frames) > 0.01


def test_image_to_video_equals_a_direct_call_with_the_same_seed(svd):
    image = picture(seed=4)
    request = VideoRequest("", 32, 32, 4, 7, 2, 3.0, seed=5, image=image)
    frames = run_video(svd, request)
    direct = svd(image, height=32, width=32, num_frames=4, num_inference_steps=2, fps=7, max_guidance_scale=3.0,
                 output_type="np", generator=torch.Generator().manual_seed(5)).frames[0]
    assert frames.shape == (4, 32, 32, 3) and np.array_equal(frames, direct)


def test_a_served_video_model_derives_its_defaults_from_the_model(animatediff, svd):
    text, image = video_model(animatediff), video_model(svd)
    assert (text.sizes, text.frames, text.default_fps, text.default_guidance) == (((16, 16),), (16,), 8, 7.5)
    assert text.max_frames == 32  # the motion adapter's motion_max_seq_length
    assert video_model(animatediff, default_frames=4).frames == (4,)  # a preset's
    assert (image.sizes, image.frames, image.default_fps, image.default_guidance) == (((16, 16),), (4,), 7, 3.0)
    assert [str(bucket) for bucket in video_model(animatediff, guidance=(True, False), frames=(4,)).buckets()] == [
        "video 16x16, 4 frames, guidance on", "video 16x16, 4 frames, guidance off"]


@pytest.mark.parametrize("options, message", [
    (dict(frames=(33,)), "video_frames must be at most 32 for this model (its motion adapter's motion_max_seq_length)"),
    (dict(sizes=((36, 32),)), "video_sizes must be multiples of 8 pixels for this model; got 36x32"),
])
def test_buckets_the_model_cannot_make_are_refused_at_start(animatediff, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        video_model(animatediff, **options)


@pytest.mark.parametrize("fields, message", [
    (dict(steps=51), "num_inference_steps must be between 1 and 50; got 51."),
    (dict(guidance_scale=1.0), "guidance_scale 1 turns classifier-free guidance off, which this server did not "
                               "warm up"),
    (dict(interval=2), "cache.interval 2 is not served; served levels: none (no cache level on this server)"),
    (dict(lora="style"), "lora: this server serves no LoRA adapters"),
])
def test_what_a_server_does_not_serve_is_refused_naming_what_it_does(animatediff, fields, message):
    model = video_model(animatediff, frames=(4,), sizes=((32, 32),))
    request = VideoRequest(**{**dict(prompt="x", width=32, height=32, frames=4, fps=8, steps=2, guidance_scale=7.5),
                              **fields})
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        model.check(request)


@pytest.mark.slow  # torch.compile of two buckets on CPU: minutes on 2 cores (19 min measured on a shared, loaded one)
def test_the_warm_up_compiles_every_video_bucket_and_a_request_then_compiles_nothing(tmp_path):
    from fastcache import FastCacheConfig
    from fastcache.serving.engine import EngineConfig
    from fastcache.serving.service import Service, ServiceOptions
    from fastcache.serving.video_options import VideoOptions

    service = Service(ServiceOptions(preset="tiny-animatediff", cache=FastCacheConfig(interval=2),
                                     engine=EngineConfig(sizes=((16, 16),), steps=2, guidance=(True, False)),
                                     video=VideoOptions(data_dir=str(tmp_path))))
    report = service.warm_up(progress=False)
    handle = service.handle
    assert sorted(report["buckets"]) == ["video 16x16, 4 frames, guidance off", "video 16x16, 4 frames, guidance on"]
    assert service.engine.ready.is_set() and report["compiles"] == handle.counters.compiles > 0
    compiles = handle.counters.compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        for guidance in (7.5, 1.0):
            frames = service.video.run(VideoRequest("a cat", 16, 16, 4, 8, 2, guidance, seed=1))
            assert frames.shape == (4, 16, 16, 3)
    assert handle.counters.compiles == compiles
    assert (handle.counters.fallbacks, handle.counters.compile_failures) == (0, 0) and not service.engine.eager_buckets
