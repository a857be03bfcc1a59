"""The HTTP service: an OpenAI-style images API in front of a ``Service`` (FastAPI; run by uvicorn or Ray Serve).

Errors are OpenAI-style JSON (``{"error": {"message", "type", "param"}}``): 400 for a bad request, naming what is
valid; 429 with ``Retry-After`` when the queue is full; 503 with ``Retry-After`` until the warm-up is done.
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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr

from .engine import ImageRequest, InvalidRequest, QueueFull, ShuttingDown
from .service import Service

logger = logging.getLogger(__name__)

GENERATIONS = "/v1/images/generations"
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks whether its client is still there


class GenerationBody(BaseModel):
    """``POST /v1/images/generations``: OpenAI's fields, plus diffusers' own. Other fields (``model``, ``user``) are
    accepted and ignored, as OpenAI clients send them."""

    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr
    n: StrictInt = 1
    size: StrictStr | None = None  # "WxH"; default: the first served size
    response_format: StrictStr = "b64_json"
    negative_prompt: StrictStr = ""
    num_inference_steps: StrictInt | None = None  # default: the server's --steps
    guidance_scale: StrictFloat = 7.5  # integers are numbers too
    seed: StrictInt | None = None  # image i of the request uses seed + i; default: random


def make_app(service: Service, *, warm_up: bool = True, drain_seconds: float = 600.0) -> FastAPI:
    """The FastAPI app serving ``service``. With ``warm_up``, its lifespan starts the warm-up on a thread (``/ready``
    answers 503 until it is done) and the engine; on shutdown it finishes the queued requests (at most
    ``drain_seconds``) and stops a warm-up in progress after its current bucket."""
    engine, metrics, config = service.engine, service.metrics, service.engine.config

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

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return _error(400, _describe(error), _param(error))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("fastcache: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(error).__name__}")

    app.add_middleware(_Measure, metrics=metrics)

    @app.post(GENERATIONS)
    async def generations(body: GenerationBody, http: Request):
        if not engine.ready.is_set():
            return _error(503, "the server is warming up; retry shortly.", retry_after=5)
        try:
            request = _image_request(body, service)
            future = engine.submit(request)
        except InvalidRequest as error:
            return _error(400, str(error), error.param)
        except QueueFull as error:
            return _error(429, f"too many requests: {error}", retry_after=1)
        except ShuttingDown as error:
            return _error(503, str(error))
        waiter = asyncio.wrap_future(future)
        try:
            while not (await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S))[0]:
                if await http.is_disconnected():  # a queued request is dropped; a running batch finishes without it
                    future.cancel()
                    return _error(499, "the client closed the request.")
        except asyncio.CancelledError:  # the server cancelled the handler (Ray Serve does when a client leaves)
            future.cancel()
            raise
        try:
            images = waiter.result()
        except Exception as error:  # logged by the engine, which keeps serving
            return _error(500, f"the generation failed: {type(error).__name__}: {error}")
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
        return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "5"})

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


def _image_request(body: GenerationBody, service: Service) -> ImageRequest:
    """The engine's request for a generations body; ``InvalidRequest`` names the field at fault and what is valid."""
    config = service.engine.config
    if body.response_format != "b64_json":
        raise InvalidRequest(f"response_format must be 'b64_json' (this server keeps no image files); "
                             f"got {body.response_format!r}.", "response_format")
    width, height = config.sizes[0]
    if body.size is not None:
        match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", body.size)
        sizes = ", ".join(f"{w}x{h}" for w, h in config.sizes)
        if match is None:
            raise InvalidRequest(f"size must be 'WIDTHxHEIGHT', one of: {sizes}; got {body.size[:40]!r}.", "size")
        width, height = int(match[1]), int(match[2])
    steps = config.steps if body.num_inference_steps is None else body.num_inference_steps
    return ImageRequest(body.prompt, width, height, steps, float(body.guidance_scale), n=body.n,
                        negative_prompt=body.negative_prompt, seed=body.seed)


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype("uint8")).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _describe(error: RequestValidationError) -> str:
    problems = []
    for item in error.errors():
        if item.get("type") == "json_invalid":
            return "the request body is not valid JSON."
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {item.get('msg')}")
    return "invalid request: " + "; ".join(problems) + (
        ". Fields: prompt (string, required), n (integer), size ('WxH'), response_format ('b64_json'), "
        "negative_prompt (string), num_inference_steps (integer), guidance_scale (number), seed (integer).")


def _param(error: RequestValidationError) -> str | None:
    for item in error.errors():
        loc = [part for part in item.get("loc", ()) if part != "body" and item.get("type") != "json_invalid"]
        if loc:
            return str(loc[0])
    return None


def _error(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    kind = {429: "rate_limit_error", 499: "client_closed", 500: "server_error", 503: "server_unavailable"}.get(
        status, "invalid_request_error")
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status,
                        headers=headers)
