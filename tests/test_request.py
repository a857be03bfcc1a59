"""One image request (serving/request.py): the checks no server could pass, the forms of ``lora``, which requests share
a pipeline call, and the keyword arguments of the call that answers a batch. (An edit's image, mask and strength
checks are in test_edits.py, beside the edit pipelines.)"""

import re
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import rel_l2

from fastcache.models import build_pipeline
from fastcache.serving.request import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    ImageRequest,
    InvalidRequest,
    lora_adapters,
    pipeline_kwargs,
    request_problem,
    size_problem,
)

SIZE, STEPS = 32, 4


def request(seed: int = 1, lora=(), **fields) -> ImageRequest:
    return ImageRequest(**{"prompt": "a lighthouse", "width": SIZE, "height": SIZE, "steps": STEPS,
                           "guidance_scale": 7.5, "seed": seed, "lora": lora, **fields})


@pytest.mark.parametrize("fields, param", [
    (dict(prompt=" "), "prompt"), (dict(prompt="\ud800"), "prompt"), (dict(negative_prompt="x" * 10_001),
                                                                        "negative_prompt"),
    (dict(guidance_scale=float("inf")), "guidance_scale"), (dict(guidance_scale=51.0), "guidance_scale"),
    (dict(seed=-1), "seed"), (dict(seed=2**63 - 1, n=2), "seed"),  # image 1 would use seed 2**63
])
def test_an_image_request_checks_what_no_server_could_serve(fields, param):
    arguments = dict(prompt="a cat", width=SIZE, height=SIZE, steps=STEPS, guidance_scale=7.5) | fields
    with pytest.raises(InvalidRequest) as error:
        ImageRequest(**arguments)
    assert error.value.param == param


@pytest.mark.parametrize("arguments, expected", [
    (dict(prompt=3), ("prompt must be a string; got int.", "prompt")),
    (dict(negative_prompt=None), ("negative_prompt must be a string; got NoneType.", "negative_prompt")),
    (dict(prompt="x" * (MAX_PROMPT_CHARS + 1)), (f"prompt must be at most {MAX_PROMPT_CHARS} characters; got "
                                                 f"{MAX_PROMPT_CHARS + 1}.", "prompt")),
    (dict(guidance_scale=True), ("guidance_scale must be a finite number between 0 and 50; got True.",
                                 "guidance_scale")),
    (dict(seed=1.0), (f"seed must be between 0 and {MAX_SEED} (image i uses seed + i); got 1.0.", "seed")),
    (dict(seed=MAX_SEED - 2, n=4), (f"seed must be between 0 and {MAX_SEED - 3} (image i uses seed + i); got "
                                    f"{MAX_SEED - 2}.", "seed")),
    (dict(strength=1.5), ("strength must be a number in (0, 1] (1: the image is fully renoised); got 1.5.",
                          "strength")),
    (dict(interval=True), ("cache.interval must be an integer >= 1 (1: uncached); got True.", "cache")),
    (dict(lora=[{"name": "a"}, "a"]), ("lora must name each adapter once (one scale per adapter).", "lora")),
    (dict(prompt="a cat", negative_prompt="blurry", n=4, seed=MAX_SEED - 3, strength=1.0, interval=1, lora="a"),
     None),
])
def test_request_problem_names_the_first_field_at_fault_and_what_is_valid(arguments, expected):
    """What ``ImageRequest`` raises, and what the command line checks before it builds a model."""
    assert request_problem(**{"prompt": "a cat", **arguments}) == expected


@pytest.mark.parametrize("width, height, multiple, max_size, expected", [
    (32, 64, 8, 64, None), (8, 8, 8, None, None), (36, 32, 8, 64, "multiples of 8 pixels, from 8 to 64; got 36x32."),
    (32, 72, 8, 64, "from 8 to 64; got 32x72."), (0, 32, 8, 64, "got 0x32."),
    (16, 16, 32, None, "width and height must be multiples of 32 pixels, from 32 to 32; got 16x16."),
])
def test_size_problem_says_the_multiple_and_the_range(width, height, multiple, max_size, expected):
    problem = size_problem(width, height, multiple, max_size)
    if expected is None:
        assert problem is None
    else:
        assert problem.endswith(expected), problem


LORA_FORMS = [
    (None, ()), ("a", (("a", 1.0),)), ({"name": "a", "scale": 0.5}, (("a", 0.5),)), ({"name": "a"}, (("a", 1.0),)),
    (["b", {"name": "a", "scale": -2}], (("a", -2.0), ("b", 1.0))), ((("b", 0.3), "a"), (("a", 1.0), ("b", 0.3))),
    ([], ()),
    ({"name": "a", "path": "/x"}, "lora must be an adapter's name, {\"name\": NAME, \"scale\": S} or a list"),
    (5, "got 5."), ([""], "lora must be"), ({"scale": 1}, "lora must be"), ([{"name": 3}], "lora must be"),
    ({"name": "a", "scale": "1"}, "lora 'a': scale must be a finite number from -10 to 10; got \"1\""),
    (("a", float("nan")), "lora must be"), ([("a", float("inf"))], "scale must be a finite number"),
    ([("a", True)], "scale must be a finite number"), ([{"name": "a", "scale": 10.5}], "from -10 to 10"),
    (["a", ("a", 2)], "lora must name each adapter once"),
]


@pytest.mark.parametrize("value, expected", LORA_FORMS, ids=[repr(v)[:30] for v, _ in LORA_FORMS])
def test_a_request_reads_every_form_of_lora_and_names_the_forms_otherwise(value, expected):
    if isinstance(expected, str):
        with pytest.raises(InvalidRequest, match=re.escape(expected)) as error:
            request(1, value)
        assert error.value.param == "lora"
    else:
        assert request(1, value).lora == expected == lora_adapters(value)


def test_a_request_without_a_seed_draws_one():
    seeds = {request(seed=None).seed for _ in range(8)}
    assert all(isinstance(seed, int) and 0 <= seed < 2**31 for seed in seeds) and len(seeds) > 1
    assert request(seed=0).seed == 0


def test_requests_share_a_call_only_with_the_same_kind_size_steps_guidance_negative_kind_level_and_lora():
    """Prompt, seed and count are per image: they never split a batch; everything the call takes once does."""
    key = request().batch_key
    assert request(seed=9, prompt="a boat", n=3).batch_key == key
    assert request(negative_prompt="blurry").batch_key == request(negative_prompt="dark").batch_key
    apart = [dict(width=64), dict(height=64), dict(steps=STEPS + 1), dict(guidance_scale=5.0),
             dict(negative_prompt="blurry"), dict(interval=2), dict(lora="a"), dict(lora={"name": "a", "scale": 0.5})]
    keys = [key] + [request(**fields).batch_key for fields in apart]
    assert len(set(keys)) == len(keys), "each of these calls is a call of its own"
    assert request(lora=["b", "a"]).batch_key == request(lora=[("a", 1.0), ("b", 1)]).batch_key


def test_a_batchs_call_has_a_prompt_a_negative_prompt_and_a_generator_per_image_padded_with_the_first_image():
    """With a text encoder the call takes the texts (``negative_prompt=None`` when no request has one, as a direct
    call without one); the padding repeats the first request's first image."""
    with_encoder = SimpleNamespace(text_encoder=object(), tokenizer=object())
    first, second = request(seed=5, prompt="a cat", n=1), request(seed=7, prompt="a dog", n=2)
    kwargs = pipeline_kwargs(with_encoder, [first, second], pad_to=4)
    assert (kwargs["prompt"], kwargs["negative_prompt"]) == (["a cat", "a dog", "a dog", "a cat"], None)
    assert [generator.initial_seed() for generator in kwargs.pop("generator")] == [5, 7, 8, 5]
    assert {k: v for k, v in kwargs.items() if k not in ("prompt", "negative_prompt")} == dict(
        num_inference_steps=STEPS, guidance_scale=7.5, num_images_per_prompt=1, output_type="np", width=SIZE,
        height=SIZE)
    negatives = pipeline_kwargs(with_encoder, [request(negative_prompt="blurry"), request(negative_prompt="dark")])
    assert negatives["negative_prompt"] == ["blurry", "dark"]


def test_an_edits_call_takes_each_images_picture_and_strength_and_img2img_its_size_from_the_picture():
    from PIL import Image

    with_encoder = SimpleNamespace(text_encoder=object(), tokenizer=object())
    picture, other, mask = (Image.new(mode, (SIZE, SIZE), color) for mode, color in (("RGB", 10), ("RGB", 20),
                                                                                     ("L", 255)))
    img2img = pipeline_kwargs(with_encoder, [request(image=picture, n=2), request(image=other)], pad_to=4)
    assert img2img["image"] == [picture, picture, other, picture] and img2img["strength"] == 0.8
    assert "width" not in img2img and "height" not in img2img and "mask_image" not in img2img
    inpaint = pipeline_kwargs(with_encoder, [request(image=picture, mask=mask, strength=0.5)])
    assert (inpaint["image"], inpaint["mask_image"], inpaint["strength"]) == ([picture], [mask], 0.5)
    assert (inpaint["width"], inpaint["height"]) == (SIZE, SIZE)


def test_a_batchs_call_gives_each_request_the_images_of_its_own_call():
    """The tiny preset takes embeddings made from each text alone: the batch's images are those of one call per
    request (image i of a request from seed + i), and the padding is the first image again."""
    pipe = build_pipeline("tiny-sd")
    first = request(seed=5, prompt="a cat", negative_prompt="dark")
    second = request(seed=7, prompt="a dog", n=2, negative_prompt="blurry")
    assert first.batch_key == second.batch_key
    batch = pipe(**pipeline_kwargs(pipe, [first, second], pad_to=4)).images
    alone = [pipe(**pipeline_kwargs(pipe, [r])).images for r in (first, second)]
    expected = np.concatenate([*alone, alone[0]])
    assert batch.shape == expected.shape == (4, SIZE, SIZE, 3)
    for got, want in zip(batch, expected, strict=True):
        assert rel_l2(got, want) < 1e-4
    assert rel_l2(batch[1], batch[2]) > 1e-2, "image 1 of a request is not image 0"
