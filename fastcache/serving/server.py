"""The HTTP service: an OpenAI-style images API in front of a ``Service`` (FastAPI; run by uvicorn or Ray Serve).

Every error is ``errors``' one format (``{"error": {"message", "type", "param", "code"}}``): 400 for a bad request,
naming what is valid on this server; 401 without a valid API key; 408 and 413 from the edge; 429 with
``Retry-After`` when the queue is full; 503 with ``Retry-After`` until the warm-up is done. The edge's layers
(``edge.EdgeConfig``: keys, read deadline, body limit) wrap every route, so a route added here is covered by them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import re
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr

from . import errors
from .edge import EdgeConfig
from .engine import (
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    EngineConfig,
    ImageRequest,
    InvalidRequest,
    QueueFull,
    ShuttingDown,
)
from .errors import error_response
from .service import Service

logger = logging.getLogger(__name__)

GENERATIONS = "/v1/images/generations"
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks whether its client is still there


class GenerationBody(BaseModel):
    """``POST /v1/images/generations``: OpenAI's fields, plus diffusers' own. ``model`` and ``user`` are accepted and
    ignored, as OpenAI clients send them; any other field is refused (a misspelt field would be silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    n: StrictInt = 1
    size: StrictStr | None = None  # "WxH"; default: the first served size
    response_format: StrictStr = "b64_json"
    negative_prompt: StrictStr = ""
    num_inference_steps: StrictInt | None = None  # default: the server's --steps
    guidance_scale: StrictFloat = 7.5  # integers are numbers too
    seed: StrictInt | None = None  # image i of the request uses seed + i; default: random
    model: StrictStr | None = None
    user: StrictStr | None = None


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
        warming = None
        if warm_up and not engine.ready.is_set():
            warming = threading.Thread(target=_warm_up, args=(service,), name="fastcache-warmup", daemon=True)
            warming.start()
        yield
        await asyncio.to_thread(engine.stop, drain_seconds)
        if warming is not None:
            await asyncio.to_thread(warming.join, drain_seconds)

    app = FastAPI(title="fastcache", lifespan=lifespan)
    errors.install(app)
    app.state.field_rules = field_rules(config)
    edge.install(app)
    app.add_middleware(_Measure, metrics=metrics)  # outermost: the edge's answers (401, 408, 413) are counted too

    @app.post(GENERATIONS)
    async def generations(body: GenerationBody, http: Request):
        if not engine.ready.is_set():
            return error_response(503, "the server is warming up; retry shortly.", code="warming_up", retry_after=5)
        try:
            request = _image_request(body, service)
            future = engine.submit(request)
        except InvalidRequest as error:
            return error_response(400, str(error), error.param, code="invalid_value")
        except QueueFull as error:
            return error_response(429, f"too many requests: {error}", code="queue_full", retry_after=1)
        except ShuttingDown as error:
            return error_response(503, str(error), code="shutting_down")
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
            return error_response(500, f"the generation failed: {type(error).__name__}: {error}",
                                  code="generation_failed")
        data = await asyncio.to_thread(lambda: [_png_b64(image) for image in images])
        return {"created": int(time.time()),
                "data": [{"b64_json": png, "seed": request.seed + i} for i, png in enumerate(data)]}

    @app.get("/v1/models")
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
            "compile": options.cache.mode if options.cache.compile else "eager",
            "runtime": service.environment(),
        }]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "pid": os.getpid()}  # the pid tells replicas apart behind a proxy

    @app.get("/ready")
    async def ready():
        if engine.ready.is_set() and engine.alive:
            return {"status": "ready", "warmup_seconds": service.warmup_seconds}
        if engine.ready.is_set():
            return error_response(503, "the engine is not running.", code="engine_stopped")
        return error_response(503, "the server is warming up; retry shortly.", code="warming_up", retry_after=5)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app


class _Measure:
    """Latency and status of every generations request, as plain ASGI middleware: FastAPI's ``@app.middleware``
    wraps ``receive`` so that a handler no longer sees its client disconnect."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != GENERATIONS:
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


def field_rules(config: EngineConfig) -> dict[str, str]:
    """What each field of a generations request may be on this server (added to the messages of invalid fields)."""
    sizes = ", ".join(f"{w}x{h}" for w, h in config.sizes)
    guidance = "" if len(config.guidance) == 2 else (" and above 1 (classifier-free guidance is warmed on only)"
                                                      if config.guidance[0] else
                                                      " and at most 1 (classifier-free guidance is warmed off only)")
    return {
        "prompt": f"a non-empty string of at most {MAX_PROMPT_CHARS} characters",
        "n": f"an integer between 1 and {config.max_batch} (the largest batch size served)",
        "size": (f"'WIDTHxHEIGHT', multiples of {config.pixel_multiple} pixels from {config.pixel_multiple} to "
                 f"{config.max_size}" if config.on_demand else f"'WIDTHxHEIGHT', one of the served sizes: {sizes}"),
        "response_format": "'b64_json'",
        "negative_prompt": f"a string of at most {MAX_PROMPT_CHARS} characters",
        "num_inference_steps": f"an integer between 1 and {config.max_steps} (default {config.steps})",
        "guidance_scale": f"a number between 0 and {MAX_GUIDANCE:g}{guidance}",
        "seed": f"an integer between 0 and {MAX_SEED} - (n - 1) (image i uses seed + i)",
        "model": "a string (ignored)",
        "user": "a string (ignored)",
    }


def _image_request(body: GenerationBody, service: Service) -> ImageRequest:
    """The engine's request for a generations body; ``InvalidRequest`` names the field at fault and what is valid."""
    config = service.engine.config
    if body.response_format != "b64_json":
        raise InvalidRequest(f"response_format must be 'b64_json' (this server keeps no image files); "
                             f"got {body.response_format!r}.", "response_format")
    width, height = config.sizes[0]
    if body.size is not None:
        match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", body.size)
        if match is None:
            raise InvalidRequest(f"size must be {field_rules(config)['size']}; got {body.size[:40]!r}.", "size")
        width, height = int(match[1]), int(match[2])
    steps = config.steps if body.num_inference_steps is None else body.num_inference_steps
    return ImageRequest(body.prompt, width, height, steps, float(body.guidance_scale), n=body.n,
                        negative_prompt=body.negative_prompt, seed=body.seed)


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype("uint8")).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
