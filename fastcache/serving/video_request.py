"""One video request, read from a JSON body or a multipart form (``POST /v1/videos``), checked field by field.

The fields images and videos share (prompt, negative prompt, guidance, seed, cache level, LoRA) are checked by the
images API's own rule (``request.request_problem``) and parsed by its own readers (``api.CacheLevel``, its form
``lora``); an upload (``input_reference``) by the edits' (``edits.read_image``: refused on its header, before any
pixel is decoded). What only video has is here: the length (``seconds`` and/or ``num_frames`` at ``fps``) and the
served sizes; what the server serves beyond that is ``video_pipeline.VideoModel.check``'s.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr

from .api import CacheLevel, depth_problem, form_lora  # the images API's readers
from .edits import fit, read_image
from .request import (
    LORA_FORM,
    MAX_GUIDANCE,
    MAX_LORA_SCALE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    InvalidRequest,
    lora_adapters,
    request_problem,
)
from .video_options import MAX_FPS, MAX_FRAMES

if TYPE_CHECKING:
    from .video_pipeline import VideoModel

# image-to-video (SVD) takes no prompt: the text a client sends (OpenAI's clients always send one) is checked as text
# only, standing in for the prompt the images' rule requires
_NO_PROMPT = "(image to video)"


class VideoBody(BaseModel):
    """``POST /v1/videos`` as JSON: OpenAI's fields (``prompt``, ``size``, ``seconds``, ``model``), plus diffusers'
    own. ``model`` and ``user`` are accepted and ignored; any other field is refused."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr | None = None  # text to video: required; image to video: ignored
    size: StrictStr | None = None
    seconds: StrictStr | StrictInt | StrictFloat | None = None  # OpenAI's clients send "4"
    num_frames: StrictInt | None = None
    fps: StrictInt | None = None
    seed: StrictInt | None = None
    num_inference_steps: StrictInt | None = None
    guidance_scale: StrictFloat | None = None
    negative_prompt: StrictStr = ""
    cache: CacheLevel | None = None
    lora: Any = None
    input_reference: Any = None  # refused: an image is uploaded as a file (multipart)
    model: StrictStr | None = None
    user: StrictStr | None = None


class VideoForm(BaseModel):
    """``POST /v1/videos`` as multipart: the text fields beside the ``input_reference`` file (every value arrives as
    text). ``cache`` is JSON; ``lora`` a name or JSON, as in image edits."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    size: str | None = None
    seconds: str | None = None
    num_frames: int | None = None
    fps: int | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str = ""
    cache: str | None = None
    lora: str | None = None
    resize: bool = False
    model: str | None = None
    user: str | None = None


@dataclass
class VideoRequest:
    """One video: ``frames`` frames of ``width`` x ``height`` at ``fps``, from a prompt (text to video) or an
    ``image`` of that size (image to video). Fields no server could serve raise ``InvalidRequest`` at construction."""

    prompt: str
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance_scale: float
    negative_prompt: str = ""
    seed: int | None = None
    image: Image.Image | None = field(default=None, repr=False)
    interval: int | None = None
    lora: Any = ()  # after construction: sorted (name, scale) pairs

    def __post_init__(self):
        prompt = self.prompt if self.image is None else (self.prompt or _NO_PROMPT)
        problem = request_problem(prompt, self.negative_prompt, 1, self.guidance_scale, self.seed,
                                  interval=self.interval, lora=self.lora)
        if problem:
            raise InvalidRequest(*problem)
        self.lora = lora_adapters(self.lora)
        if not (_is_int(self.frames) and 1 <= self.frames <= MAX_FRAMES):
            raise InvalidRequest(f"num_frames must be an integer from 1 to {MAX_FRAMES}; got {self.frames!r}.",
                                 "num_frames")
        if not (_is_int(self.fps) and 1 <= self.fps <= MAX_FPS):
            raise InvalidRequest(f"fps must be an integer from 1 to {MAX_FPS}; got {self.fps!r}.", "fps")
        if self.image is not None:
            if self.image.size != (self.width, self.height):
                raise InvalidRequest(f"input_reference is {self.image.size[0]}x{self.image.size[1]} pixels, not the "
                                     f"video's {self.width}x{self.height}.", "input_reference")
            self.image = self.image.convert("RGB")
        if self.seed is None:
            self.seed = secrets.randbits(31)

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def field_rules(model: VideoModel) -> dict[str, str]:
    """What each field of ``POST /v1/videos`` may be on this server (added to the messages of invalid fields)."""
    sizes = ", ".join(f"{w}x{h}" for w, h in model.sizes)
    lengths = ", ".join(f"{n} ({n / model.default_fps:g} s at {model.default_fps} fps)" for n in model.frames)
    text = model.takes_image is False
    return {
        "prompt": (f"a non-empty string of at most {MAX_PROMPT_CHARS} characters" if text else
                   "a string (ignored: this model makes video from input_reference)"),
        "input_reference": (f"a PNG, JPEG or WebP file of at most {model.max_upload} pixels a side, uploaded as "
                            f"multipart/form-data" if not text else "not taken: this model makes video from a prompt"),
        "size": f"'WIDTHxHEIGHT', one of the served sizes: {sizes}",
        "seconds": f"a number of seconds, num_frames / fps: served frame counts {lengths}",
        "num_frames": f"one of the served frame counts: {', '.join(map(str, model.frames))}",
        "fps": f"an integer from 1 to {MAX_FPS} (default {model.default_fps})",
        "seed": f"an integer between 0 and {MAX_SEED}",
        "num_inference_steps": f"an integer between 1 and {model.max_steps} (default {model.steps})",
        "guidance_scale": f"a number between 0 and {MAX_GUIDANCE:g} (default {model.default_guidance:g})",
        "negative_prompt": (f"a string of at most {MAX_PROMPT_CHARS} characters" if text else
                            "not taken by image to video"),
        "cache": f"{{\"interval\": k}} with k one of {', '.join(map(str, model.levels)) or 'none served'} "
                 f"(1: uncached)",
        "lora": f"{LORA_FORM} (S from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}); multipart: the name, or that JSON",
        "resize": "true or false: resize an input_reference of another size than size (multipart only)",
        "model": "a string (ignored)",
        "user": "a string (ignored)",
    }


def video_request(fields: VideoBody | VideoForm, upload: bytes | None, model: VideoModel) -> VideoRequest:
    """The request that ``fields`` (and the uploaded ``input_reference``) ask for, with the server's defaults;
    ``InvalidRequest`` naming the field at fault and what is valid. Decodes the upload: call it off the event loop."""
    if isinstance(fields, VideoBody) and fields.input_reference is not None:
        raise InvalidRequest("input_reference must be uploaded as a file (multipart/form-data), not given in JSON.",
                             "input_reference")
    if model.takes_image and upload is None:
        raise InvalidRequest("input_reference is required: this model makes video from an image (upload it as a "
                             "file, multipart/form-data).", "input_reference")
    if not model.takes_image and upload is not None:
        raise InvalidRequest("input_reference is not taken: this model makes video from a prompt.", "input_reference")
    if model.takes_image and fields.negative_prompt:
        raise InvalidRequest("negative_prompt is not taken by image to video.", "negative_prompt")
    if not model.takes_image and not fields.prompt:
        raise InvalidRequest("prompt is required: a non-empty string.", "prompt")
    fps = model.default_fps if fields.fps is None else fields.fps
    frames = _frames(fields.seconds, fields.num_frames, fps, model)
    image = read_image(upload, "input_reference", model.max_upload) if upload is not None else None
    width, height = _size(fields.size, image, model)
    if image is not None:
        image = fit(image, width, height, getattr(fields, "resize", False), "input_reference")
    if isinstance(fields, VideoForm):
        interval, lora = _form_cache(fields.cache), form_lora(fields.lora) if fields.lora is not None else None
    else:
        interval, lora = fields.cache.interval if fields.cache else None, fields.lora
    steps = model.steps if fields.num_inference_steps is None else fields.num_inference_steps
    guidance = model.default_guidance if fields.guidance_scale is None else fields.guidance_scale
    return VideoRequest(fields.prompt or "", width, height, frames, fps, steps, guidance,
                        negative_prompt=fields.negative_prompt, seed=fields.seed, image=image, interval=interval,
                        lora=lora)


def _form_cache(text: str | None) -> int | None:
    """A form's ``cache``: JSON, as in image edits."""
    if text is None:
        return None
    problem = depth_problem(text, "cache")
    if problem:
        raise InvalidRequest(problem, "cache")
    try:
        return CacheLevel.model_validate_json(text).interval
    except ValueError:
        raise InvalidRequest(f"cache must be JSON like {{\"interval\": 2}}; got {text[:40]!r}.", "cache") from None


def parse_seconds(value) -> float:
    """A request's ``seconds`` (a number, or a string of one as OpenAI's clients send it) as a float."""
    if isinstance(value, str):
        try:
            value = float(value.strip()) if re.fullmatch(r"\s*[0-9]{1,6}(\.[0-9]{1,6})?\s*", value) else None
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0 < value <= MAX_FRAMES):
        raise InvalidRequest(f"seconds must be a positive number of at most {MAX_FRAMES} (e.g. \"2\"); got "
                             f"{str(value)[:40]!r}.", "seconds")
    return float(value)


def _frames(seconds, num_frames: int | None, fps: int, model: VideoModel) -> int:
    """The frame count a request asks for: ``num_frames``, else ``seconds`` x ``fps``, else the first served; both
    given must agree."""
    if not (_is_int(fps) and 1 <= fps <= MAX_FPS):
        raise InvalidRequest(f"fps must be an integer from 1 to {MAX_FPS}; got {fps!r}.", "fps")
    lasting = None if seconds is None else parse_seconds(seconds)
    if num_frames is None and lasting is None:
        return model.frames[0]
    frames = num_frames if num_frames is not None else round(lasting * fps)
    if lasting is not None and abs(frames - lasting * fps) > 1e-6:
        said = (f"num_frames {num_frames} at {fps} fps lasts {num_frames / fps:g} s, not {lasting:g}; give one of "
                f"seconds and num_frames" if num_frames is not None else
                f"seconds {lasting:g} at {fps} fps is not a whole number of frames")
        raise InvalidRequest(f"{said}; served frame counts (at {fps} fps): {model.lengths(fps)}.", "seconds")
    model.check_frames(frames, fps)
    return frames


def _size(size: str | None, image: Image.Image | None, model: VideoModel) -> tuple[int, int]:
    """``size`` as (width, height); without one, the image's own size if it is served, else the first served."""
    if size is None:
        return image.size if image is not None and image.size in model.sizes else model.sizes[0]
    match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", size)
    if match is None:
        raise InvalidRequest(f"size must be {field_rules(model)['size']}; got {size[:40]!r}.", "size")
    width, height = int(match[1]), int(match[2])
    model.check_size(width, height)
    return width, height
