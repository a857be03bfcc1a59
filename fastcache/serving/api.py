"""The HTTP API's contract: each endpoint's request with this server's limits, its answers and its errors (OpenAPI).

The request models are built per server (``api_for``): ``n`` up to its largest batch, ``size`` one of its sizes,
``num_inference_steps`` up to its ``max_steps``, ``cache.interval`` one of its levels, so that ``/openapi.json``
states the limits this server enforces, and FastAPI enforces them from the same fields. What a schema cannot say
(a prompt of blanks, a strength that leaves no step, an adapter not loaded) is checked by ``request.ImageRequest``
and ``engine.Engine.check`` and answered 400 like the rest.

Bodies are read with two bounds before a parser recurses or guesses (``CheckedBodyRoute``): JSON at most
``MAX_JSON_DEPTH`` levels deep (Python's parser recurses once per level), and multipart text fields in UTF-8
(Starlette decodes a field that is not as Latin-1, silently).
"""

import json
import re
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Request, UploadFile
from fastapi.routing import APIRoute
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    create_model,
)
from starlette.requests import ClientDisconnect

from ..errors_text import examples, listing
from .engine import EngineConfig
from .errors import ErrorResponse, error_response
from .request import LORA_FORM, MAX_GUIDANCE, MAX_LORA_SCALE, MAX_PROMPT_CHARS, MAX_SEED, InvalidRequest

try:
    from python_multipart.multipart import MultipartParser, parse_options_header
except ModuleNotFoundError:  # python-multipart before 0.0.13 (the name Starlette falls back to as well)
    from multipart.multipart import MultipartParser, parse_options_header

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
MEDIA_TYPES = {GENERATIONS: "application/json", EDITS: "multipart/form-data"}
MAX_JSON_DEPTH = 32  # a request nests 3 levels ({"lora": [{"name": ...}]}); Python's parser recurses per level
NOT_BLANK = r"\S"  # JSON Schema's pattern: a non-space character somewhere


def _integral(value):
    """JSON Schema's integers include 3.0 (a JSON number with no fraction): as 3. Strings and booleans stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[StrictInt, BeforeValidator(_integral)]  # an integer as JSON says it: 3 or 3.0, not "3" or true


class CacheLevel(BaseModel):
    """``"cache": {"interval": k}``: a full UNet step every ``k`` steps, ``k`` one of the served levels (1: uncached,
    the exact image of the plain pipeline). Requests batch only with requests of the same level."""

    model_config = ConfigDict(extra="forbid")

    interval: Integer = Field(ge=1)


class ImageData(BaseModel):
    b64_json: str = Field(description="a PNG, base64")
    seed: int = Field(description="the seed of this image: image i of a request uses seed + i")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time of the answer")
    data: list[ImageData]


class Health(BaseModel):
    status: Literal["ok"]
    pid: int = Field(description="the process that answered (tells replicas apart behind a proxy)")


class Ready(BaseModel):
    status: Literal["ready"]
    warmup_seconds: float | None
    compile_cache: Literal["cold", "warm"] | None = Field(description="whether the warm-up found the compile cache")
    pid: int


class ModelCard(BaseModel):
    """What this server serves: ``GET /v1/models``' one model."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"]
    owned_by: str
    sizes: list[str]
    batch_sizes: list[int]
    steps: int
    max_steps: int
    cache_levels: list[dict[str, Any]]
    edits: list[Literal["img2img", "inpaint"]]
    lora_adapters: list[str]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def error_doc(description: str, *headers: str) -> dict:
    described = {"Retry-After": "seconds to wait before retrying", "WWW-Authenticate": "Bearer",
                 "Allow": "the methods this path takes"}
    return {"model": ErrorResponse, "description": description,
            "headers": {name: {"description": described[name], "schema": {"type": "string"}} for name in headers}}


# what any request may get from the layers in front of the routes (edge.py, auth.py); 401 only with API keys
EDGE_ERRORS = {
    400: error_doc("malformed HTTP, or a request that is invalid (the message names the field and what is valid)"),
    401: error_doc("no valid API key ('Authorization: Bearer KEY'); only when the server has keys", "WWW-Authenticate"),
    408: error_doc("the request's head or body did not arrive in time (--header-timeout, --read-timeout)"),
    413: error_doc("the body is over --max-body-mb"),
    429: error_doc("this client address holds --max-connections-per-client connections", "Retry-After"),
    431: error_doc("the request head is over 16 KiB"),
    503: error_doc("the server holds --max-connections connections, or is shutting down", "Retry-After"),
}
IMAGE_ERRORS = {
    **EDGE_ERRORS,
    415: error_doc("the body is not of the media type this endpoint takes"),
    429: error_doc("too many images wait (--max-queue), or this client holds too many connections", "Retry-After"),
    500: error_doc("the generation failed (the server keeps serving)"),
    503: error_doc("warming up, shutting down (a request the drain cut short), or too many connections", "Retry-After"),
}
READY_ERRORS = {**EDGE_ERRORS, 503: error_doc("warming up, or the engine stopped", "Retry-After")}
# no route of this API can answer these: documented once, in components
ROUTING_ERRORS = {404: error_doc("no such endpoint (the message lists them)"),
                  405: error_doc("a method this path does not take", "Allow")}


@dataclass(frozen=True)
class Api:
    """One server's request models and what each field may be (added to the messages of invalid fields)."""

    generation: type[BaseModel]
    edit: type[BaseModel]
    rules: dict[str, str]

    @property
    def fields(self) -> dict[str, tuple[str, ...]]:
        """Each endpoint's fields, as a message lists them."""
        return {GENERATIONS: tuple(self.generation.model_fields), EDITS: tuple(self.edit.model_fields)}


def api_for(config: EngineConfig, levels: tuple[int, ...], adapters: tuple[str, ...] = ()) -> Api:
    """The request models of a server of ``config`` serving cache ``levels`` and LoRA ``adapters``."""
    rules = field_rules(config, levels, adapters)

    def described(name: str, **limits) -> Any:
        return Field(description=f"{name} must be {rules[name]}", **limits)

    sizes = tuple(f"{w}x{h}" for w, h in config.sizes)
    size_type = StrictStr if config.on_demand else Literal[sizes]
    size_limits = {"pattern": r"^[0-9]{1,5}x[0-9]{1,5}$"} if config.on_demand else {}
    guidance = dict(ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    if config.guidance == (True,):
        guidance = dict(guidance, ge=None, gt=1)
    elif config.guidance == (False,):
        guidance = dict(guidance, le=1)
    interval_type = Annotated[Literal[tuple(levels)], BeforeValidator(_integral)] if levels else Integer
    # NOTE: an optional field's bounds go inside its type, before the validator: on the union, or after it, pydantic
    # writes "ge"/"le" into the schema, not JSON Schema's minimum/maximum
    steps_type = Annotated[StrictInt, Field(ge=1, le=config.max_steps), BeforeValidator(_integral)]
    seed_type = Annotated[StrictInt, Field(ge=0, le=MAX_SEED), BeforeValidator(_integral)]
    lora_schema = _lora_schema(adapters)

    served_level = create_model("CacheLevel", __config__=ConfigDict(extra="forbid"), __doc__=CacheLevel.__doc__,
                                interval=(interval_type, ...))

    class GenerationBody(BaseModel):
        """``POST /v1/images/generations``: OpenAI's fields, plus diffusers' own. ``model`` and ``user`` are accepted
        and ignored, as OpenAI clients send them; any other field is refused (a misspelt field would be silently
        ignored)."""

        model_config = ConfigDict(extra="forbid")

        prompt: StrictStr = described("prompt", min_length=1, max_length=MAX_PROMPT_CHARS, pattern=NOT_BLANK)
        n: Integer = described("n", default=1, ge=1, le=config.max_batch)
        size: size_type | None = described("size", default=None, **size_limits)  # default: the first served size
        response_format: Literal["b64_json"] = described("response_format", default="b64_json")
        negative_prompt: StrictStr = described("negative_prompt", default="", max_length=MAX_PROMPT_CHARS)
        num_inference_steps: steps_type | None = described("num_inference_steps", default=None)  # default: --steps
        guidance_scale: StrictFloat = described("guidance_scale", default=7.5, **guidance)  # integers too
        seed: seed_type | None = described("seed", default=None)  # default: random
        cache: served_level | None = described("cache", default=None)  # default: the server's --interval
        # "name", {"name": "x", "scale": 0.8} or a list of them: request.lora_adapters reads it, with its messages
        lora: Annotated[Any, WithJsonSchema(lora_schema)] = described("lora", default=None)
        model: StrictStr | None = described("model", default=None)
        user: StrictStr | None = described("user", default=None)

    class EditForm(BaseModel):
        """``POST /v1/images/edits`` (multipart): an ``image``, an optional ``mask`` (white: repaint), and text
        fields. ``size`` defaults to the image's own size when that is served, else the first served size; an image
        of another size is resized when ``resize`` is true, else refused. ``cache`` is JSON (``{"interval": 2}``),
        ``lora`` an adapter's name or JSON as in generations. Any other field is refused."""

        model_config = ConfigDict(extra="forbid")

        prompt: str = described("prompt", min_length=1, max_length=MAX_PROMPT_CHARS, pattern=NOT_BLANK)
        image: UploadFile = described("image")
        # NOTE: optional form fields are not nullable: a form has no null (absent: the default)
        mask: UploadFile = described("mask", default=None)
        n: int = described("n", default=1, ge=1, le=config.max_batch)
        size: size_type = described("size", default=None, **size_limits)
        response_format: Literal["b64_json"] = described("response_format", default="b64_json")
        negative_prompt: str = described("negative_prompt", default="", max_length=MAX_PROMPT_CHARS)
        num_inference_steps: int = described("num_inference_steps", default=None, ge=1, le=config.max_steps)
        guidance_scale: float = described("guidance_scale", default=7.5, **guidance)
        seed: int = described("seed", default=None, ge=0, le=MAX_SEED)
        # default: diffusers' per kind
        strength: float = described("strength", default=None, gt=0, le=1, allow_inf_nan=False)
        resize: bool = described("resize", default=False)
        cache: str = described("cache", default=None, max_length=200,
                                      json_schema_extra={"contentMediaType": "application/json"})
        lora: str = described("lora", default=None, max_length=4096)

    return Api(GenerationBody, EditForm, rules)


def _lora_schema(adapters: tuple[str, ...]) -> dict:
    if not adapters:  # nothing to name: none, or an empty list
        return {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]}
    name = {"type": "string", "enum": list(adapters)}
    item = {"anyOf": [name, {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
        "name": name, "scale": {"type": "number", "minimum": -MAX_LORA_SCALE, "maximum": MAX_LORA_SCALE}}}]}
    return {"anyOf": [item, {"type": "array", "items": item, "uniqueItems": True}, {"type": "null"}]}


def field_rules(config: EngineConfig, levels: tuple[int, ...] = (), adapters: tuple[str, ...] = ()) -> dict[str, str]:
    """What each field of a generations or edits request may be on this server, in a few words and a few names."""
    sizes = listing((f"{w}x{h}" for w, h in config.sizes), "served size", ordered=True)
    served_levels = f"the served levels {examples(levels, ordered=True)}" if levels else "the served interval"
    guidance = "" if len(config.guidance) == 2 else (" and above 1 (classifier-free guidance is warmed on only)"
                                                      if config.guidance[0] else
                                                      " and at most 1 (classifier-free guidance is warmed off only)")
    return {
        "prompt": f"a non-empty string of at most {MAX_PROMPT_CHARS} characters",
        "n": f"an integer between 1 and {config.max_batch} (the largest batch size served)",
        "size": (f"'WIDTHxHEIGHT', multiples of {config.pixel_multiple} pixels from {config.pixel_multiple} to "
                 f"{config.max_size}" if config.on_demand else f"'WIDTHxHEIGHT', one of {sizes}"),
        "response_format": "'b64_json'",
        "negative_prompt": f"a string of at most {MAX_PROMPT_CHARS} characters",
        "num_inference_steps": f"an integer between 1 and {config.max_steps} (default {config.steps})",
        "guidance_scale": f"a number between 0 and {MAX_GUIDANCE:g}{guidance}",
        "seed": f"an integer between 0 and {MAX_SEED} - (n - 1) (image i uses seed + i)",
        "cache": f"{{\"interval\": k}} with k one of {served_levels} (1: uncached)",
        "lora": (f"{LORA_FORM} (S from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}, default 1), NAME one of the "
                 f"{listing(adapters, 'loaded adapter') if adapters else 'none (this server serves no LoRA)'}"),
        "image": f"a PNG, JPEG or WebP file of at most {config.max_size} pixels a side (edits only)",
        "mask": "an image file of the image's size, white where the image is repainted (edits only)",
        "strength": "a number in (0, 1] leaving at least one step: steps x strength >= 1 (edits only; default 0.8 "
                    "without a mask, 1 with one)",
        "resize": "true or false: resize an image of another size than size (edits only; default false: refused)",
        "model": "a string (ignored)",
        "user": "a string (ignored)",
    }


# -- reading bodies -------------------------------------------------------------------------------------------------

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPENERS, _CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def json_depth(data: bytes | str) -> int:
    """How deep ``data`` (JSON text, valid or not) nests arrays and objects, read without parsing it: brackets in
    strings do not count."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    codes = np.frombuffer(_STRING.sub(b"", data), np.uint8)
    steps = np.isin(codes, _OPENERS).astype(np.int32) - np.isin(codes, _CLOSERS)
    return int(np.cumsum(steps).max(initial=0))


def depth_problem(data: bytes | str, what: str) -> str | None:
    """Why JSON ``data`` (``what``: "the request body", a field's name) is nested too deeply to read, or ``None``."""
    depth = json_depth(data)
    if depth <= MAX_JSON_DEPTH:
        return None
    return f"{what} nests JSON {depth} levels deep; this server reads at most {MAX_JSON_DEPTH}."


def form_lora(text: str):
    """A form's ``lora`` (image edits, videos): JSON (a list, an object or a quoted name), or else an adapter's name
    as it is; ``InvalidRequest`` if it is nested too deeply or is not JSON."""
    if not text.lstrip().startswith(("[", "{", '"')):
        return text
    problem = depth_problem(text, "lora")
    if problem:
        raise InvalidRequest(problem, "lora")
    try:
        return json.loads(text)
    except ValueError:
        raise InvalidRequest(f"lora must be {LORA_FORM}, as JSON or a bare name; got {text[:40]!r}.",
                             "lora") from None


def form_text_problem(body: bytes, content_type: str) -> tuple[str, str] | None:
    """``(message, field)`` for the first text field of a multipart ``body`` that is not UTF-8, or ``None`` (a body
    that cannot be parsed is left to Starlette's parser, which says so)."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        return None
    part: dict = {}
    found: list[tuple[str, str]] = []

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["header"] = part.get("header", b"") + data[start:end]

    def on_header_end() -> None:
        if part.get("header", b"").lower().startswith(b"form-data"):
            _, params = parse_options_header(part["header"])
            part.update(name=params.get(b"name", b""), file=b"filename" in params)
        part["header"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if not part.get("file"):
            part["data"] = part.get("data", b"") + data[start:end]

    def on_part_end() -> None:
        if not part.get("file") and not found:
            try:
                part.get("data", b"").decode("utf-8")
            except UnicodeDecodeError:
                name = part.get("name", b"").decode("utf-8", "replace")[:40]
                found.append((f"{name} must be valid UTF-8 text (the form field is not).", name))
        part.clear()

    parser = MultipartParser(boundary, {"on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data, "on_part_end": on_part_end,
                                        "on_part_begin": part.clear})
    try:
        parser.write(body)
        parser.finalize()
    except Exception:  # noqa: BLE001 (python-multipart's parse errors): Starlette's parser answers them
        return None
    return found[0] if found else None


class CheckedBodyRoute(APIRoute):
    """FastAPI's route, with the body checked before FastAPI parses it: JSON nested at most ``MAX_JSON_DEPTH``
    deep (400 ``invalid_json``), multipart text fields in UTF-8 (400 naming the field)."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request):
            content_type = request.headers.get("content-type", "")
            media = content_type.split(";")[0].strip().lower()
            is_json = media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
            if is_json or media == "multipart/form-data":
                try:
                    body = await request.body()
                except ClientDisconnect:  # the edge answered it (408, 413), or its client left: no one reads this
                    return error_response(400, "the request body did not arrive whole.", code="incomplete_body")
                if is_json and (problem := depth_problem(body, "the request body")):
                    return error_response(400, problem, code="invalid_json")
                if not is_json and (problem := form_text_problem(body, content_type)):
                    return error_response(400, *problem, code="invalid_value")
            return await handler(request)

        return checked


def _exact_bounds(schema, exact) -> None:
    """Pydantic's integer bounds, put back where FastAPI's OpenAPI model made them floats (the seed's 2**63 - 1
    became 2**63)."""
    if isinstance(schema, dict) and isinstance(exact, dict):
        for key, value in exact.items():
            if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") and isinstance(value, int):
                schema[key] = value
            elif key in schema:
                _exact_bounds(schema[key], value)
    elif isinstance(schema, list) and isinstance(exact, list):
        for inner, exact_inner in zip(schema, exact, strict=False):
            _exact_bounds(inner, exact_inner)


def openapi(app, keys: bool) -> dict:
    """``app``'s OpenAPI document as FastAPI makes it, with what FastAPI cannot know: no 422 (validation errors are
    400s in the one error format), the routing errors in components, and the API key's scheme where keys are set."""
    from fastapi.openapi.utils import get_openapi

    with warnings.catch_warnings():  # a GET and HEAD route gives both operations its one id: told apart below
        warnings.simplefilter("ignore", UserWarning)
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in app.state.request_models:
        _exact_bounds(schemas[model.__name__], model.model_json_schema())
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    open_paths = set(app.state.open_paths)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method == "head":
                operation["operationId"] = f"head_{operation['operationId']}"
            operation["responses"].pop("422", None)
            if path in open_paths:
                operation["responses"].pop("401", None)
            elif keys:
                operation["security"] = [{"apiKey": []}]
            if not keys:
                operation["responses"].pop("401", None)
    components["responses"] = {str(status): {"description": error["description"], "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for status, error in ROUTING_ERRORS.items()}
    if keys:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer",
                                                    "description": "one of the server's API keys"}}
    return document
