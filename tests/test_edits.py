"""Image edits: uploads refused on their header when they cannot be served, images fitted or refused (never cropped),
and edits (img2img, inpainting by the base model or by an inpainting model) batched, each image equal to a direct
``from_pipe`` call with its seed."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import rel_l2
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting
from PIL import Image, ImageFile

from fastcache import compile_pipeline
from fastcache.models import build_pipeline, prompt_inputs
from fastcache.serving.edits import fit, fit_mask, inpainting_model, read_image
from fastcache.serving.engine import Engine, EngineConfig, Target
from fastcache.serving.request import ImageRequest, InvalidRequest, smallest_strength

SIZE = 32
STEPS = 4


def picture(width=SIZE, height=SIZE, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def bomb(width: int, height: int) -> bytes:
    """A PNG of a few bytes that declares ``width`` x ``height`` pixels."""
    def chunk(name: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + name + data + struct.pack(">I", zlib.crc32(name + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_uploads_decode(kind):
    image = read_image(encoded(picture(48, 32), kind), "image", max_size=64)
    assert image.size == (48, 32)


@pytest.mark.parametrize("data, message", [
    (b"", "image is an empty file"),
    (b"not an image at all", "image is not a PNG, JPEG or WebP image"),
    (encoded(picture(), "GIF"), "image is not a PNG, JPEG or WebP image"),
    (encoded(picture())[:200], "image could not be decoded as a PNG image"),
    (encoded(picture(80, 32)), "image is 80x32 pixels; each side must be at most 64 pixels"),
])
def test_uploads_that_cannot_be_served_are_refused_naming_why(data, message):
    with pytest.raises(InvalidRequest, match=message) as error:
        read_image(data, "image", max_size=64)
    assert error.value.param == "image"


@pytest.mark.parametrize("width, height", [(5000, 5000), (60_000, 60_000)])  # past max_size; past PIL's own limit
def test_a_decompression_bomb_is_refused_before_any_pixel_is_decoded(width, height, monkeypatch):
    data = bomb(width, height)
    assert len(data) < 100

    def decode(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with pytest.raises(InvalidRequest, match="each side must be at most 2048 pixels"):
        read_image(data, "mask", max_size=2048)


def test_a_mismatched_image_is_resized_when_asked_and_refused_otherwise_never_cropped():
    image = picture(48, 32)
    with pytest.raises(InvalidRequest, match="image is 48x32 pixels, not the size asked for .32x32.; send resize=true"):
        fit(image, SIZE, SIZE, resize=False)
    resized = fit(image, SIZE, SIZE, resize=True)
    assert np.array_equal(np.asarray(resized), np.asarray(image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)))
    assert fit(picture(), SIZE, SIZE, resize=False).size == (SIZE, SIZE)
    with pytest.raises(InvalidRequest, match="mask is 32x32 pixels but the image is 48x32") as error:
        fit_mask(Image.new("L", (SIZE, SIZE)), image, SIZE, SIZE, resize=True)
    assert error.value.param == "mask"
    assert fit_mask(Image.new("L", (48, 32), 255), image, SIZE, SIZE, resize=True).size == (SIZE, SIZE)


@pytest.mark.parametrize("fields, param, message", [
    (dict(mask=Image.new("L", (SIZE, SIZE))), "mask", "mask needs an image"),
    (dict(strength=0.5), "strength", "strength applies to edits"),
    (dict(image=picture(48, 32)), "image", "image is 48x32 pixels, but the request's size is 32x32"),
    (dict(image=picture(), mask=Image.new("L", (16, 16))), "mask", "mask is 16x16 pixels"),
    (dict(image=picture(), strength=0.0), "strength", r"strength must be a number in \(0, 1\]"),
    (dict(image=picture(), strength=float("nan")), "strength", "strength must be a number"),
    (dict(image=b"png bytes"), "image", "image must be a PIL image"),
    (dict(interval=0), "cache", "cache.interval must be an integer >= 1"),
    (dict(image=picture(), strength=0.2), "strength", r"strength 0.2 leaves no step of 4 .* at least 0.25\."),
    (dict(image=picture(), mask=Image.new("L", (SIZE, SIZE)), strength=0.24), "strength", "at least 0.25"),
])
def test_an_edit_request_checks_its_images_strength_and_level(fields, param, message):
    with pytest.raises(InvalidRequest, match=message) as error:
        ImageRequest("a cat", SIZE, SIZE, STEPS, 7.5, **fields)
    assert error.value.param == param


def test_an_edit_request_takes_diffusers_default_strength_and_normalises_its_images():
    img2img = ImageRequest("a cat", SIZE, SIZE, STEPS, 7.5, image=picture().convert("RGBA"))
    inpaint = ImageRequest("a cat", SIZE, SIZE, STEPS, 7.5, image=picture(), mask=Image.new("RGB", (SIZE, SIZE)))
    assert (img2img.kind, img2img.strength, img2img.image.mode) == ("img2img", 0.8, "RGB")
    assert (inpaint.kind, inpaint.strength, inpaint.mask.mode) == ("inpaint", 1.0, "L")
    assert img2img.batch_key != inpaint.batch_key != ImageRequest("a cat", SIZE, SIZE, STEPS, 7.5).batch_key
    assert img2img.batch_key != ImageRequest("a cat", SIZE, SIZE, STEPS, 7.5, image=picture(), strength=0.5).batch_key


def test_the_smallest_strength_named_is_the_smallest_that_leaves_a_step():
    for steps in range(1, 1001):
        strength = smallest_strength(steps)
        assert int(steps * strength) >= 1 and (strength == 1.0 or int(steps * (strength - 1e-4)) == 0), steps
    with pytest.raises(InvalidRequest, match="at 1 steps strength must be at least 1"):  # the img2img default
        ImageRequest("a cat", SIZE, SIZE, 1, 7.5, image=picture())


@pytest.fixture(scope="module")
def served():
    """The base model (eager handle, interval 2) and an inpainting model with its own handle."""
    pipe = build_pipeline("tiny-sd")
    inpainter = inpainting_model(build_pipeline("tiny-sd-inpaint", seed=1))
    handles = [compile_pipeline(pipe, 2, 0, compile=False), compile_pipeline(inpainter, 2, 0, compile=False)]
    yield pipe, inpainter, handles
    for handle in handles:
        handle.disable()


def direct(pipe, request: ImageRequest) -> list[np.ndarray]:
    """``request``'s images as plain calls of ``pipe``, one per image: its prompt, image, mask, strength, seed + i."""
    images = []
    for i in range(request.n):
        extra = dict(mask_image=request.mask, height=request.height, width=request.width) if request.mask else {}
        images.append(pipe(**prompt_inputs(pipe, [request.prompt]), image=request.image, strength=request.strength,
                           num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                           output_type="np", generator=torch.Generator().manual_seed(request.seed + i),
                           **extra).images[0])
    return images


def test_batched_edits_equal_direct_from_pipe_calls_with_their_seeds(served):
    pipe, inpainter, handles = served
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 24))
    calls = []
    for targets, inpaint_pipe in (({}, AutoPipelineForInpainting.from_pipe(pipe)),
                                  ({"inpaint": Target(inpainter, handles[1])}, inpainter)):
        engine = Engine(pipe, EngineConfig(batch_sizes=(1, 2, 4), sizes=((SIZE, SIZE),), steps=STEPS), handles[0],
                        on_batch=lambda images, padded: calls.append((images, padded)), targets=targets)
        assert engine.handles == handles[:1 + bool(targets)]
        for kind, extra in (("img2img", {}), ("inpaint", dict(mask=mask))):
            requests = [ImageRequest("a red house", SIZE, SIZE, STEPS, 7.5, n=1, seed=5, image=picture(seed=1),
                                     strength=0.6, **extra),
                        ImageRequest("a boat", SIZE, SIZE, STEPS, 7.5, n=2, seed=7, image=picture(seed=2),
                                     strength=0.6, negative_prompt="", **extra)]
            results = engine.run(requests)
            oracle = AutoPipelineForImage2Image.from_pipe(pipe) if kind == "img2img" else inpaint_pipe
            oracle.set_progress_bar_config(disable=True)
            for request, images in zip(requests, results, strict=True):
                for got, want in zip(images, direct(oracle, request), strict=True):
                    assert rel_l2(got, want) < 1e-4, (kind, targets)
    assert calls == [(3, 4)] * 4  # three images, one call each, padded to the warmed batch of four
    # the inpainting model's images are its own: not the base model's inpainting
    assert rel_l2(direct(inpainter, requests[0])[0], direct(AutoPipelineForInpainting.from_pipe(pipe),
                                                             requests[0])[0]) > 0.01


@pytest.mark.parametrize("mask", [None, "half"])
def test_the_smallest_strength_runs_and_below_it_diffusers_has_no_step(served, mask):
    """Our check is diffusers' own condition: at 25 steps, 0.04 runs one step and 0.039 fails inside the pipeline
    (the probe's 500s), which the request now refuses first."""
    pipe, inpainter, _ = served
    mask_image = None if mask is None else Image.new("L", (SIZE, SIZE), 0)
    if mask_image is not None:
        mask_image.paste(255, (0, 0, SIZE // 2, SIZE))
    edit = inpainter if mask_image is not None else AutoPipelineForImage2Image.from_pipe(pipe)
    extra = dict(mask_image=mask_image, height=SIZE, width=SIZE) if mask_image is not None else {}
    steps_run = []

    def call(strength: float):
        return edit(**prompt_inputs(edit, ["a cat"]), image=picture(), strength=strength, num_inference_steps=25,
                    output_type="np", generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=lambda *args: (steps_run.append(args[1]), args[3])[1], **extra)

    assert call(smallest_strength(25)).images.shape == (1, SIZE, SIZE, 3) and len(steps_run) == 1
    with pytest.raises((ValueError, RuntimeError)):
        call(0.039)
    with pytest.raises(InvalidRequest, match="at 25 steps strength must be at least 0.04"):
        ImageRequest("a cat", SIZE, SIZE, 25, 7.5, image=picture(), mask=mask_image, strength=0.039)


def test_an_inpainting_model_needs_a_nine_channel_unet():
    with pytest.raises(ValueError, match="UNet takes 9 input channels; this one takes 4"):
        inpainting_model(build_pipeline("tiny-sd"))


def test_edits_not_served_are_refused_naming_what_is():
    pipe = build_pipeline("tiny-sd")
    engine = Engine(pipe, EngineConfig(sizes=((SIZE, SIZE),), steps=STEPS, edits=("img2img",)))
    mask = Image.new("L", (SIZE, SIZE))
    with pytest.raises(InvalidRequest, match=r"inpaint edits are not served \(edits served: img2img\)") as error:
        engine.check(ImageRequest("x", SIZE, SIZE, STEPS, 7.5, image=picture(), mask=mask))
    assert error.value.param == "mask"
    engine.check(ImageRequest("x", SIZE, SIZE, STEPS, 7.5, image=picture()))
    assert [bucket.kind for bucket in engine.config.buckets()] == ["generate", "img2img"]
