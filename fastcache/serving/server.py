"""The HTTP service: an OpenAI-style images API in front of a ``Service`` (FastAPI; run by uvicorn or Ray Serve).

``POST /v1/images/generations`` (JSON) makes images from text; ``POST /v1/images/edits`` (multipart: an image, an
optional mask) edits an uploaded image. Every error is ``errors``' one format (``{"error": {"message", "type",
"param", "code"}}``): 400 for a bad request, naming what is valid on this server; 401 without a valid API key; 408
and 413 from the edge; 415 for a body of another media type; 429 with ``Retry-After`` when the queue is full; 503 with
``Retry-After`` until the warm-up is done. ``api`` holds the request models with this server's limits, which
``/openapi.json`` states. The edge's layers (``edge.EdgeConfig``: keys, read deadline, body limit) wrap every route,
so a route added here is covered by them. A GET endpoint answers HEAD as well, and a path with a trailing slash is the
path without it (``edge.TrailingSlash``). ``/v1/videos`` (``videos``) serves a model that makes video instead.
"""


import asyncio
import base64
import io
import logging
import os
import re
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Form, Request
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel, ValidationError

from . import api, errors
from .api import EDITS, GENERATIONS, CacheLevel, CheckedBodyRoute, depth_problem, form_lora
from .edge import EdgeConfig, TrailingSlash
from .edits import fit, fit_mask, read_image
from .engine import QueueFull, ShuttingDown
from .errors import error_response
from .request import ImageRequest, InvalidRequest
from .service import Service

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a waiting request checks whether its client is still there
MAX_FAILURE_CHARS = 200  # of an exception's text in a 500's message


def make_app(service: Service, edge: EdgeConfig | None = None, *, warm_up: bool = True) -> FastAPI:
    """The FastAPI app serving ``service`` behind ``edge``'s layers. With ``warm_up``, its lifespan starts the warm-up
    on a thread (``/ready`` answers 503 until it is done) and the engine; on shutdown it finishes the queued requests
    (at most ``edge.drain_seconds``) and stops a warm-up in progress after its current bucket."""
    engine, metrics, config = service.engine, service.metrics, service.engine.config
    edge = edge or EdgeConfig()
    drain_seconds = edge.drain_seconds

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        if videos is not None:
            videos.start()
        warming = None
        if warm_up and not engine.ready.is_set():
            warming = threading.Thread(target=_warm_up, args=(service,), name="fastcache-warmup", daemon=True)
            warming.start()
        yield
        await asyncio.to_thread(engine.stop, drain_seconds)
        if warming is not None:
            await asyncio.to_thread(warming.join, drain_seconds)
        if videos is not None:
            await asyncio.to_thread(videos.stop, drain_seconds)

    contract = api.api_for(config, tuple(engine.levels), service.options.lora.names)
    GenerationBody, EditForm = contract.generation, contract.edit  # classes, made for this server
    app = FastAPI(title="fastcache", version=_version(), lifespan=lifespan, redirect_slashes=False,
                  description="OpenAI-style images API of a fastcache server: every error is the one ErrorResponse.")
    app.router.route_class = CheckedBodyRoute
    errors.install(app)
    app.state.field_rules, app.state.fields = contract.rules, contract.fields  # named by invalid fields' messages
    app.state.media_types, app.state.open_paths = api.MEDIA_TYPES, edge.open_paths
    app.state.request_models = (GenerationBody, EditForm)
    from .videos import install as install_videos  # here: the video modules import the api's readers

    videos = install_videos(app, service)  # the video routes and jobs; on a video server, its field rules

    def openapi() -> dict:  # FastAPI's, made once, with what it cannot know (api.openapi)
        if app.openapi_schema is None:
            app.openapi_schema = api.openapi(app, bool(edge.api_keys))
        return app.openapi_schema

    app.openapi = openapi
    edge.install(app)
    app.add_middleware(_Measure, metrics=metrics)  # the edge's answers (401, 408, 413) are counted too
    app.add_middleware(TrailingSlash)  # outermost: every layer sees the path without its trailing slash

    @app.post(GENERATIONS, operation_id="generations",
              responses={200: {"model": api.ImagesResponse}, **api.IMAGE_ERRORS})
    async def generations(body: GenerationBody, http: Request):
        if not engine.ready.is_set():
            return error_response(503, "the server is warming up; retry shortly.", code="warming_up", retry_after=5)
        try:
            request = _image_request(body, service)
        except InvalidRequest as error:
            return error_response(400, str(error), error.param, code="invalid_value")
        return await _answer(request, http)

    @app.post(EDITS, operation_id="edits", responses={200: {"model": api.ImagesResponse}, **api.IMAGE_ERRORS})
    async def edits(form: Annotated[EditForm, Form(media_type="multipart/form-data")], http: Request):
        if not engine.ready.is_set():
            return error_response(503, "the server is warming up; retry shortly.", code="warming_up", retry_after=5)
        uploads = {"image": await form.image.read(), "mask": await form.mask.read() if form.mask else None}
        try:
            request = await asyncio.to_thread(_edit_request, form, uploads, service)
        except InvalidRequest as error:
            return error_response(400, str(error), error.param, code="invalid_value")
        return await _answer(request, http)

    async def _answer(request: ImageRequest, http: Request):
        """Queue ``request``, wait for its images (dropping it if the client leaves), and answer them as PNGs."""
        try:
            future = engine.submit(request)
        except InvalidRequest as error:
            return error_response(400, str(error), error.param, code="invalid_value")
        except QueueFull as error:
            return error_response(429, f"too many requests: {error}", code="queue_full", retry_after=1)
        except ShuttingDown as error:
            return error_response(503, str(error), code="shutting_down", retry_after=1)  # another replica may take it
        waiter = asyncio.wrap_future(future)
        try:
            while not (await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S))[0]:
                if await http.is_disconnected():  # a queued request is dropped; a running batch finishes without it
                    future.cancel()
                    return error_response(499, "the client closed the request.", code="client_closed")
        except asyncio.CancelledError:  # the server cancelled the handler (Ray Serve does when a client leaves)
            future.cancel()
            raise
        try:
            images = waiter.result()
        except Exception as error:  # logged by the engine, which keeps serving
            return error_response(500, f"the generation failed: {type(error).__name__}: "
                                       f"{str(error)[:MAX_FAILURE_CHARS]}", code="generation_failed")
        data = await asyncio.to_thread(lambda: [_png_b64(image) for image in images])
        return {"created": int(time.time()),
                "data": [{"b64_json": png, "seed": request.seed + i} for i, png in enumerate(data)]}

    def get_and_head(path: str, **kwargs):
        """A GET endpoint that answers HEAD too (load balancers probe with either); one route, so that a 405 says
        both in its Allow header."""
        return app.api_route(path, methods=["GET", "HEAD"], **kwargs)

    @get_and_head("/v1/models", responses={200: {"model": api.ModelList}, **api.EDGE_ERRORS})
    async def models():
        options = service.options
        return {"object": "list", "data": [{
            "id": options.model_name, "object": "model", "owned_by": "fastcache",
            "description": service.label,
            "prompt_embeddings": "text encoder" if service.text_encoder else (
                "derived deterministically from the prompt text (no text encoder)"),
            "sizes": [f"{w}x{h}" for w, h in config.sizes], "batch_sizes": list(config.batch_sizes),
            "guidance": ["on" if g else "off" for g in config.guidance], "steps": config.steps,
            "max_steps": config.max_steps, "max_delay_ms": config.max_delay_ms,
            "interval": options.cache.interval, "branch": options.cache.branch,
            "cache_levels": [dict((options.level_labels or {}).get(level, {}), interval=level)
                             for level in engine.levels],
            "edits": list(config.edits), "inpaint_model": options.inpainting_model,
            "lora_adapters": list(options.lora.names), "lora_slots": options.lora.slot_count,
            "max_body_mb": edge.max_body_mb, "max_image_size": config.max_size,
            "compile": options.cache.mode if options.cache.compile else "eager",
            "runtime": service.environment(),
            "images": engine.images, "video": service.video.describe() if service.video is not None else None,
        }]}

    @get_and_head("/health", responses={200: {"model": api.Health}, **api.EDGE_ERRORS})
    async def health():
        return {"status": "ok", "pid": os.getpid()}  # the pid tells replicas apart behind a proxy

    @get_and_head("/ready", responses={200: {"model": api.Ready}, **api.READY_ERRORS})
    async def ready():
        if engine.ready.is_set() and engine.alive:
            return {"status": "ready", "warmup_seconds": service.warmup_seconds, "compile_cache": service.warmup_cache,
                    "pid": os.getpid()}  # which replica answered behind a proxy, and how it warmed up
        if engine.ready.is_set():
            return error_response(503, "the engine is not running.", code="engine_stopped")
        return error_response(503, "the server is warming up; retry shortly.", code="warming_up", retry_after=5)

    @get_and_head("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus' text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **api.EDGE_ERRORS})
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app


class _Measure:
    """Latency and status of every image request (generations and edits), as plain ASGI middleware: FastAPI's
    ``@app.middleware`` wraps ``receive`` so that a handler no longer sees its client disconnect."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in (GENERATIONS, EDITS):
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if status == 200:  # the latency of generations; errors are counted by status alone
                self.metrics.latency.observe(time.perf_counter() - start)
            self.metrics.requests.labels(str(status)).inc()


def _warm_up(service: Service) -> None:
    try:
        service.warm_up()
    except Exception:  # the process stays up (health 200, ready 503) so that the logs can be read
        logger.exception("fastcache: warm-up failed; the server will not become ready")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastcache")
    except PackageNotFoundError:
        return "0+unknown"


def _image_request(body: BaseModel, service: Service) -> ImageRequest:
    """The engine's request for a generations body; ``InvalidRequest`` names the field at fault and what is valid."""
    config = service.engine.config
    _check_format(body.response_format)
    width, height = _parse_size(body.size, config) if body.size is not None else config.sizes[0]
    steps = config.steps if body.num_inference_steps is None else body.num_inference_steps
    return ImageRequest(body.prompt, width, height, steps, float(body.guidance_scale), n=body.n,
                        negative_prompt=body.negative_prompt, seed=body.seed,
                        interval=body.cache.interval if body.cache else None, lora=body.lora)


def _edit_request(form: BaseModel, uploads: dict[str, bytes | None], service: Service) -> ImageRequest:
    """The engine's request for an edits form and its files (decoded and fitted here, on a worker thread)."""
    config = service.engine.config
    _check_format(form.response_format)
    interval = None
    if form.cache is not None:
        problem = depth_problem(form.cache, "cache")
        if problem:
            raise InvalidRequest(problem, "cache")
        try:
            interval = CacheLevel.model_validate_json(form.cache).interval
        except ValidationError:
            raise InvalidRequest(f"cache must be JSON like {{\"interval\": 2}}; got {form.cache[:40]!r}.",
                                 "cache") from None
    lora = form_lora(form.lora) if form.lora is not None else None
    image = read_image(uploads["image"], "image", config.max_size)
    mask = read_image(uploads["mask"], "mask", config.max_size) if uploads["mask"] is not None else None
    if form.size is not None:
        width, height = _parse_size(form.size, config)
        service.engine.check_size(width, height)  # before the image is fitted to it
    else:  # the image's own size if it is served, else the first served size
        try:
            service.engine.check_size(*image.size)
            width, height = image.size
        except InvalidRequest:
            width, height = config.sizes[0]
    fitted_mask = fit_mask(mask, image, width, height, form.resize) if mask is not None else None
    steps = config.steps if form.num_inference_steps is None else form.num_inference_steps
    return ImageRequest(form.prompt, width, height, steps, form.guidance_scale, n=form.n,
                        negative_prompt=form.negative_prompt, seed=form.seed,
                        image=fit(image, width, height, form.resize).convert("RGB"), mask=fitted_mask,
                        strength=form.strength, interval=interval, lora=lora)


def _check_format(response_format: str) -> None:
    if response_format != "b64_json":
        raise InvalidRequest(f"response_format must be 'b64_json' (this server keeps no image files); "
                             f"got {response_format!r}.", "response_format")


def _parse_size(size: str, config) -> tuple[int, int]:
    match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", size)
    if match is None:
        raise InvalidRequest(f"size must be {api.field_rules(config)['size']}; got {size[:40]!r}.", "size")
    return int(match[1]), int(match[2])


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype("uint8")).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
