"""One image request: what it asks (checked at construction), which requests may share its pipeline call, and the
keyword arguments of the call that answers a batch of them.

A request is text-to-image, or an edit of an uploaded image: without a mask img2img, with one inpainting. Each image
has its own generator (``seed + i`` for the ``i``-th image of a request), so an image does not depend on what it was
batched with.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..models import prompt_inputs
from ..presets import size_problem  # noqa: F401 (the one place of the size rule; the engine imports it here)

KINDS = ("generate", "img2img", "inpaint")
EDIT_KINDS = KINDS[1:]
# how much of an edited image is renoised when a request does not say: diffusers' own defaults
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}
MAX_SEED = 2**63 - 1  # image i of a request uses seed + i: the last of them must fit too
MAX_GUIDANCE = 50.0
MAX_PROMPT_CHARS = 10_000  # text encoders read 77 tokens; this only bounds the work a request asks
MAX_LORA_SCALE = 10.0  # the weight of one LoRA adapter in a request, either sign


class InvalidRequest(ValueError):
    """A request that cannot be served as asked; the message names what is valid, ``param`` the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def request_problem(prompt, negative_prompt: str = "", n: int = 1, guidance_scale: float = 7.5,
                    seed: int | None = None, *, strength: float | None = None, interval: int | None = None,
                    lora=()) -> tuple[str, str] | None:
    """``(message, field)`` for the first field of an image request that no server could serve, or ``None``.
    ``ImageRequest`` checks itself with it, the command line its arguments before a model is built; the ranges a
    server serves (``n``, steps, sizes, cache levels) are ``Engine.check``'s."""
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            return f"{name} must be a string; got {type(text).__name__}.", name
        if len(text) > MAX_PROMPT_CHARS:
            return f"{name} must be at most {MAX_PROMPT_CHARS} characters; got {len(text)}.", name
        try:
            text.encode()
        except UnicodeEncodeError:
            return f"{name} must be valid Unicode text (it has unpaired surrogates).", name
    if not prompt.strip():
        return "prompt must be a non-empty string.", "prompt"
    if not (_is_number(guidance_scale) and 0 <= guidance_scale <= MAX_GUIDANCE):
        return (f"guidance_scale must be a finite number between 0 and {MAX_GUIDANCE:g}; got {guidance_scale!r}.",
                "guidance_scale")
    last = MAX_SEED - (n - 1) if isinstance(n, int) and 1 <= n <= MAX_SEED else MAX_SEED  # n: Engine.check
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= last):
        return f"seed must be between 0 and {last} (image i uses seed + i); got {seed!r}.", "seed"
    if strength is not None and not (_is_number(strength) and 0 < strength <= 1):
        return f"strength must be a number in (0, 1] (1: the image is fully renoised); got {strength!r}.", "strength"
    if interval is not None and not (_is_int(interval) and interval >= 1):
        return f"cache.interval must be an integer >= 1 (1: uncached); got {interval!r}.", "cache"
    adapters = lora_adapters(lora)
    if isinstance(adapters, str):
        return adapters, "lora"
    return None


def smallest_strength(steps: int) -> float:
    """The smallest strength, to 4 decimals, that leaves an edit of ``steps`` steps at least one (diffusers runs
    ``int(steps * strength)`` of them, and fails on none)."""
    strength = math.ceil(10_000 / steps) / 10_000
    while int(steps * strength) < 1:
        strength += 1e-4
    return min(strength, 1.0)


LORA_FORM = 'an adapter\'s name, {"name": NAME, "scale": S} or a list of them'


def lora_adapters(value) -> tuple[tuple[str, float], ...] | str:
    """A request's ``lora`` as sorted ``(name, scale)`` pairs, or why it cannot be one (a message). It may be
    ``None``, an adapter's name (scale 1), ``{"name": NAME, "scale": S}`` (JSON's form), or a list or tuple of
    those or of ``(name, scale)`` pairs (Python's), each adapter once. Whether they are loaded is the server's check."""
    items = () if value is None else value if isinstance(value, (list, tuple)) else (value,)
    pairs = []
    for item in items:
        if isinstance(item, dict) and set(item) <= {"name", "scale"}:
            name, scale = item.get("name"), item.get("scale", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, scale = item
        else:
            name, scale = item, 1.0
        if not isinstance(name, str) or not name:
            return f"lora must be {LORA_FORM}; got {_shown(item)}."
        if not (_is_number(scale) and abs(scale) <= MAX_LORA_SCALE):
            return (f"lora {name[:64]!r}: scale must be a finite number from {-MAX_LORA_SCALE:g} to "
                    f"{MAX_LORA_SCALE:g}; got {_shown(scale)}.")
        pairs.append((name, float(scale)))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        return "lora must name each adapter once (one scale per adapter)."
    return tuple(sorted(pairs))


def _shown(value) -> str:
    """A value of a request as JSON, cut short (an error message repeats it)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text[:80]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ImageRequest:
    """One request: ``n`` images of one prompt; image ``i`` is generated from ``seed + i``. Fields no server could
    serve raise ``InvalidRequest`` at construction; what this server serves is ``Engine.check``'s.

    An edit carries its ``image`` (``width`` x ``height``, as the server resized or refused it) and, to inpaint, a
    ``mask`` of the same size (white: repaint); ``strength`` defaults to the kind's ``DEFAULT_STRENGTH``.
    ``interval`` is the cache level (a full UNet step every ``interval`` steps); ``None``: the server's. ``lora`` is the
    request's LoRA adapters in any form ``lora_adapters`` reads, kept as sorted ``(name, scale)`` pairs.
    """

    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    n: int = 1
    negative_prompt: str = ""
    seed: int | None = None
    image: Image.Image | None = field(default=None, repr=False)
    mask: Image.Image | None = field(default=None, repr=False)
    strength: float | None = None
    interval: int | None = None
    lora: Any = ()  # after construction: sorted (name, scale) pairs
    future: Future = field(default_factory=Future, repr=False)
    arrived: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self):
        problem = request_problem(self.prompt, self.negative_prompt, self.n, self.guidance_scale, self.seed,
                                  strength=self.strength, interval=self.interval, lora=self.lora)
        if problem:
            raise InvalidRequest(*problem)
        self.lora = lora_adapters(self.lora)
        self._check_images()
        if self.seed is None:
            self.seed = secrets.randbits(31)
        if self.image is not None and self.strength is None:
            self.strength = DEFAULT_STRENGTH[self.kind]
        if self.image is not None and _is_int(self.steps) and self.steps >= 1 and int(self.steps * self.strength) < 1:
            raise InvalidRequest(f"strength {self.strength:g} leaves no step of {self.steps} (an edit runs "
                                 f"int(steps x strength) of them): at {self.steps} steps strength must be at least "
                                 f"{smallest_strength(self.steps):g}.", "strength")

    def _check_images(self) -> None:
        if self.image is None:
            if self.mask is not None:
                raise InvalidRequest("mask needs an image to inpaint.", "mask")
            if self.strength is not None:
                raise InvalidRequest("strength applies to edits (a request with an image) only.", "strength")
            return
        for name, image, mode in (("image", self.image, "RGB"), ("mask", self.mask, "L")):
            if image is None:
                continue
            if not isinstance(image, Image.Image):
                raise InvalidRequest(f"{name} must be a PIL image; got {type(image).__name__}.", name)
            if image.size != (self.width, self.height):
                raise InvalidRequest(f"{name} is {image.size[0]}x{image.size[1]} pixels, but the request's size is "
                                     f"{self.width}x{self.height}; resize it (resize=true) or ask for its size.", name)
            if image.mode != mode:  # the pipelines read RGB images and single-channel masks
                setattr(self, name, image.convert(mode))

    @property
    def kind(self) -> str:
        """``generate`` (text to image), ``img2img`` (an image, no mask) or ``inpaint`` (an image and a mask)."""
        return "generate" if self.image is None else "img2img" if self.mask is None else "inpaint"

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share a pipeline call: same kind, size, steps, guidance, strength, cache
        level and LoRA adapters with their scales. Empty and given negative prompts do not mix: without any, a
        text-encoder pipeline gets ``negative_prompt=None``, as in a direct call (SDXL then uses zeros)."""
        return (self.kind, self.width, self.height, self.steps, float(self.guidance_scale), bool(self.negative_prompt),
                self.strength, self.interval, self.lora)


def pipeline_kwargs(pipe, requests: list[ImageRequest], pad_to: int | None = None) -> dict:
    """The keyword arguments of the one pipeline call that makes the images of ``requests`` (same batch key), padded
    with copies of the first request's first image up to ``pad_to`` images. A direct call with these arguments (on
    the pipeline of their kind) gives the images the engine serves."""
    first = requests[0]

    def per_image(value_of) -> list:
        values = [value for request in requests for value in value_of(request)]
        return values + values[:1] * ((pad_to or len(values)) - len(values))

    prompts = per_image(lambda request: [request.prompt] * request.n)
    negatives = per_image(lambda request: [request.negative_prompt] * request.n)
    seeds = per_image(lambda request: [request.seed + i for i in range(request.n)])
    kwargs = dict(prompt_inputs(pipe, prompts, negatives if any(negatives) else None),
                  num_inference_steps=first.steps, guidance_scale=first.guidance_scale, num_images_per_prompt=1,
                  output_type="np", generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds])
    if first.kind != "img2img":  # img2img takes its size from the image
        kwargs.update(width=first.width, height=first.height)
    if first.kind != "generate":
        kwargs.update(image=per_image(lambda request: [request.image] * request.n), strength=first.strength)
    if first.kind == "inpaint":
        kwargs.update(mask_image=per_image(lambda request: [request.mask] * request.n))
    return kwargs
