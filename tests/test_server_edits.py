"""``POST /v1/images/edits`` and per-request cache levels over HTTP: a real uvicorn server on a loopback port in this
process (tiny models, eager runtime, an inpainting model beside the base model, cache levels 1, 2 and 3)."""

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from conftest import app_in_thread, assert_error
from diffusers import AutoPipelineForImage2Image
from PIL import Image
from test_edits import bomb, direct, encoded, picture

from fastcache import FastCacheConfig, compile_pipeline
from fastcache.models import build_pipeline, prompt_inputs
from fastcache.serving.edge import EdgeConfig
from fastcache.serving.edits import inpainting_model
from fastcache.serving.engine import EngineConfig
from fastcache.serving.request import ImageRequest
from fastcache.serving.server import make_app
from fastcache.serving.service import Service, ServiceOptions

HOST = "127.0.0.1"
STEPS = 4
SIZE = 32
LIMIT_MB = 0.05  # ~52 kB: the tiny PNGs pass, a padded upload does not


@pytest.fixture(scope="module")
def url():
    options = ServiceOptions(cache=FastCacheConfig(interval=2, compile=False), inpaint_preset="tiny-sd-inpaint",
                             level_labels={1: {"speedup": 1.0}},
                             engine=EngineConfig(sizes=((SIZE, SIZE), (48, 48)), batch_sizes=(1, 2), steps=STEPS,
                                                 intervals=(1, 2, 3), max_size=64))
    service = Service(options)
    app = make_app(service, EdgeConfig(max_body_mb=LIMIT_MB))
    with app_in_thread(app) as address:
        yield address


@pytest.fixture(scope="module")
def models():
    """The server's models for direct calls: the base model (interval 2, eager) and the inpainting model."""
    pipe = build_pipeline("tiny-sd")
    inpainter = inpainting_model(build_pipeline("tiny-sd-inpaint"))
    handles = [compile_pipeline(pipe, 2, 0, compile=False), compile_pipeline(inpainter, 2, 0, compile=False)]
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    yield dict(generate=pipe, img2img=img2img, inpaint=inpainter, handles=handles)
    for handle in handles:
        handle.disable()


def edit(url: str, image: bytes | None = None, mask: bytes | None = None, timeout: float = 120, **fields):
    files = {"image": ("image.png", image, "image/png")} if image is not None else {}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return httpx.post(f"{url}/v1/images/edits", data={"prompt": "a cat", **fields}, files=files, timeout=timeout)


def pixels(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), np.int16)
            for item in response.json()["data"]]


def as_png_pixels(images) -> list[np.ndarray]:
    return [(image * 255).round().astype(np.int16) for image in images]


def assert_same(got: list[np.ndarray], want: list[np.ndarray]):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1  # equal up to the PNG's rounding


def test_img2img_and_inpainting_equal_direct_calls_of_their_pipelines(url, models):
    image, mask = picture(seed=3), Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, 16, 32))
    response = edit(url, encoded(image), seed="11", n="2", strength="0.5", negative_prompt="blurry")
    want = ImageRequest("a cat", SIZE, SIZE, STEPS, 7.5, n=2, seed=11, image=image, strength=0.5,
                        negative_prompt="blurry")
    assert [item["seed"] for item in response.json()["data"]] == [11, 12]
    assert_same(pixels(response), as_png_pixels(direct_with_negative(models["img2img"], want)))
    response = edit(url, encoded(image), encoded(mask), seed="4")
    want = ImageRequest("a cat", SIZE, SIZE, STEPS, 7.5, seed=4, image=image, mask=mask)  # strength 1.0
    assert_same(pixels(response), as_png_pixels(direct(models["inpaint"], want)))


def direct_with_negative(pipe, request: ImageRequest) -> list[np.ndarray]:
    embeds = prompt_inputs(pipe, [request.prompt], [request.negative_prompt])
    return [pipe(**embeds, image=request.image, strength=request.strength, num_inference_steps=request.steps,
                 guidance_scale=request.guidance_scale, output_type="np",
                 generator=torch.Generator().manual_seed(request.seed + i)).images[0] for i in range(request.n)]


def test_size_is_the_images_own_when_served_and_a_mismatch_is_resized_only_when_asked(url, models):
    served = picture(48, 48, seed=5)
    assert pixels(edit(url, encoded(served), seed="1"))[0].shape == (48, 48, 3)
    odd = picture(40, 24, seed=6)  # not a served size: the first served size, 32x32, if resizing is allowed
    refused = edit(url, encoded(odd), seed="1")
    assert "send resize=true" in assert_error(refused.status_code, refused.content, 400)["message"]
    resized = edit(url, encoded(odd), seed="1", resize="true", strength="0.7")
    want = ImageRequest("a cat", SIZE, SIZE, STEPS, 7.5, seed=1, image=odd.resize((SIZE, SIZE), Image.LANCZOS),
                        strength=0.7)
    assert_same(pixels(resized), as_png_pixels(direct(models["img2img"], want)))
    refused = edit(url, encoded(served), seed="1", size="32x32")
    assert assert_error(refused.status_code, refused.content, 400)["param"] == "image"


def test_interval_one_is_the_plain_pipeline_and_levels_batch_apart(url, models):
    body = {"prompt": "a lighthouse", "seed": 21}
    plain_handle = models["handles"][0]
    plain_handle.disable()
    try:
        plain = models["generate"](**prompt_inputs(models["generate"], ["a lighthouse"]), num_inference_steps=STEPS,
                                   height=SIZE, width=SIZE, output_type="np",
                                   generator=torch.Generator().manual_seed(21)).images
    finally:
        plain_handle.enable()
    got = {level: pixels(httpx.post(f"{url}/v1/images/generations", json=dict(body, cache={"interval": level}),
                                    timeout=120))[0] for level in (1, 2, 3)}
    assert_same([got[1]], as_png_pixels(plain))
    default = pixels(httpx.post(f"{url}/v1/images/generations", json=body, timeout=120))[0]
    assert np.array_equal(default, got[2]) and not np.array_equal(got[3], got[2])
    over_form = pixels(edit(url, encoded(picture(seed=8)), seed="2", cache='{"interval": 1}'))
    assert len(over_form) == 1


BAD_EDITS = [
    (dict(mask=encoded(Image.new("L", (SIZE, SIZE)))),
     "image must be a PNG, JPEG or WebP file of at most 64 pixels a side (edits only) (field required)"),
    (dict(image=b"not an image"), "image is not a PNG, JPEG or WebP image"),
    (dict(image=encoded(picture(80, 80))), "image is 80x80 pixels; each side must be at most 64 pixels"),
    (dict(image=bomb(60_000, 60_000)), "each side must be at most 64 pixels"),
    (dict(image=encoded(picture()), mask=encoded(picture(48, 48))), "mask is 48x48 pixels but the image is 32x32"),
    (dict(image=encoded(picture()), mask=b"GIF89a"), "mask is not a PNG, JPEG or WebP image"),
    (dict(image=encoded(picture()), strength="0"), "strength must be a number in (0, 1]"),
    (dict(image=encoded(picture()), strength="much"), "strength must be a number in (0, 1]"),
    (dict(image=encoded(picture()), n="3"), "n must be an integer between 1 and 2"),
    (dict(image=encoded(picture()), size="64x64"), "one of 2 served sizes (32x32, 48x48)"),
    (dict(image=encoded(picture()), cache='{"interval": 5}'), "cache.interval 5 is not served; this server serves 3"),
    (dict(image=encoded(picture()), cache="5"), "cache must be JSON like"),
    (dict(image=encoded(picture()), cache='{"interval": 2, "branch": 1}'), "cache must be JSON like"),
    (dict(image=encoded(picture()), response_format="url"), "response_format must be 'b64_json'"),
    (dict(image=encoded(picture()), prompt=" "), "prompt must be a non-empty string"),
    # what a probe found: a misspelt field was ignored, a strength leaving no step and deep JSON in lora gave 500
    (dict(image=encoded(picture()), strenght="0.1"), "'strenght' is not a field of this request (did you mean "
                                                     "'strength'?)"),
    (dict(image=encoded(picture()), strength="0.2"), "strength 0.2 leaves no step of 4"),
    (dict(image=encoded(picture()), mask=encoded(Image.new("L", (SIZE, SIZE))), strength="0.24"),
     "at 4 steps strength must be at least 0.25"),
    (dict(image=encoded(picture()), num_inference_steps="1"), "strength 0.8 leaves no step of 1"),
    (dict(image=encoded(picture()), lora="[" * 2000), "lora nests JSON 2000 levels deep"),
    (dict(image=encoded(picture()), lora='{"a":' * 2000), "(string should have at most 4096 characters)"),
    (dict(image=encoded(picture()), lora='{"a":' * 800), "lora nests JSON 800 levels deep"),
    (dict(image=encoded(picture()), cache="[" * 100 + "]" * 100), "cache nests JSON 100 levels deep"),
]


@pytest.mark.parametrize("fields, message", BAD_EDITS, ids=[m[:30] for _, m in BAD_EDITS])
def test_bad_edits_get_a_400_naming_what_is_valid_and_the_service_keeps_serving(url, fields, message):
    response = edit(url, **fields)
    error = assert_error(response.status_code, response.content, 400)
    assert message in error["message"] and error["type"] == "invalid_request_error", error


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "lora"])
def test_a_form_text_that_is_not_utf8_gets_a_400_as_on_generations(url, field):
    request = httpx.Request("POST", f"{url}/v1/images/edits", data={"prompt": "a cat", field: "TEXT"},
                            files={"image": ("image.png", encoded(picture()), "image/png")})
    body = request.read().replace(b"TEXT", b"caf\xe9")  # Latin-1, not UTF-8
    response = httpx.post(f"{url}/v1/images/edits", content=body, timeout=60,
                          headers={"content-type": request.headers["content-type"]})
    error = assert_error(response.status_code, response.content, 400)
    assert error["message"] == f"{field} must be valid UTF-8 text (the form field is not)." and error["param"] == field
    for other in ({"json": {"prompt": "a cat"}}, {"data": {"prompt": "a cat"}}):  # JSON, or a form without files
        response = httpx.post(f"{url}/v1/images/edits", timeout=60, **other)
        error = assert_error(response.status_code, response.content, 415)
        assert error["code"] == "unsupported_media_type" and "takes multipart/form-data" in error["message"]


def test_uploads_over_the_limit_get_a_413_declared_or_streamed(url):
    big = encoded(picture()) + b"\0" * int(LIMIT_MB * 2**20)  # a valid PNG, padded past the limit
    declared = edit(url, big)
    assert "this server takes at most" in assert_error(declared.status_code, declared.content, 413)["message"]
    request = httpx.Request("POST", url, data={"prompt": "x"}, files={"image": ("a.png", big)})
    body, content_type = request.read(), request.headers["content-type"]

    def chunks():  # no Content-Length: sent chunked
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    streamed = httpx.post(f"{url}/v1/images/edits", content=chunks(), headers={"content-type": content_type},
                          timeout=60)
    assert assert_error(streamed.status_code, streamed.content, 413)["type"] == "invalid_request_error"
    assert edit(url, encoded(picture()), seed="1").status_code == 200


def test_models_lists_cache_levels_edits_and_the_inpainting_model(url):
    model = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert model["cache_levels"] == [{"speedup": 1.0, "interval": 1}, {"interval": 2}, {"interval": 3}]
    assert model["interval"] == 2 and model["edits"] == ["img2img", "inpaint"]
    assert model["inpaint_model"] == "tiny-sd-inpaint" and model["max_body_mb"] == LIMIT_MB
