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

from .engine import ImageRequest, InvalidRequest, QueueFull
from .service import Service

logger = logging.getLogger(__name__)

GENERATIONS = "/v1/images/generations"
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 50.0


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
    guidance_scale: StrictFloat | StrictInt = 7.5
    seed: StrictInt | None = None  # image i of the request uses seed + i; default: random


def make_app(service: Service, *, warm_up: bool = True) -> FastAPI:
    """The FastAPI app serving ``service``. With ``warm_up``, its lifespan starts the warm-up on a thread (``/ready``
    answers 503 until it is done) and the engine; on shutdown it finishes the queued requests."""
    engine, metrics, config = service.engine, service.metrics, service.options.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        if warm_up and not engine.ready.is_set():
            threading.Thread(target=_warm_up, args=(service,), name="fastcache-warmup", daemon=True).start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="fastcache", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return _error(400, _describe(error), _param(error))

    @app.middleware("http")
    async def measure(request: Request, call_next):
        if request.url.path != GENERATIONS:
            return await call_next(request)
        start = time.perf_counter()
        response = await call_next(request)
        metrics.latency.observe(time.perf_counter() - start)
        metrics.requests.labels(str(response.status_code)).inc()
        return response

    @app.post(GENERATIONS)
    async def generations(body: GenerationBody):
        if not engine.ready.is_set():
            return _error(503, "the server is warming up; retry shortly.", retry_after=5)
        try:
            request = _image_request(body, service)
            future = engine.submit(request)
        except InvalidRequest as error:
            return _error(400, str(error), error.param)
        except QueueFull as error:
            return _error(429, f"too many requests: {error}", retry_after=1)
        images = await asyncio.wrap_future(future)
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
            "max_steps": config.max_steps, "interval": options.interval, "branch": options.branch,
            "compile": options.mode if options.compile else "eager",
            "runtime": service.environment(),
        }]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "pid": os.getpid()}  # the pid tells replicas apart behind a proxy

    @app.get("/ready")
    async def ready():
        if engine.ready.is_set():
            return {"status": "ready", "warmup_seconds": service.warmup_seconds}
        return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app


def _warm_up(service: Service) -> None:
    try:
        service.warm_up()
    except Exception:  # the process stays up (health 200, ready 503) so that the logs can be read
        logger.exception("fastcache: warm-up failed; the server will not become ready")


def _image_request(body: GenerationBody, service: Service) -> ImageRequest:
    config = service.options.engine
    if not body.prompt.strip():
        raise InvalidRequest("prompt must be a non-empty string.", "prompt")
    if body.response_format != "b64_json":
        raise InvalidRequest(f"response_format must be 'b64_json' (this server keeps no image files); "
                         f"got {body.response_format!r}.", "response_format")
    steps = config.steps if body.num_inference_steps is None else body.num_inference_steps
    if not 0 <= body.guidance_scale <= MAX_GUIDANCE:
        raise InvalidRequest(f"guidance_scale must be between 0 and {MAX_GUIDANCE:g}; got {body.guidance_scale}.",
                         "guidance_scale")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED - body.n:
        raise InvalidRequest(f"seed must be between 0 and {MAX_SEED - body.n}; got {body.seed}.", "seed")
    width, height = config.sizes[0]
    if body.size is not None:
        match = re.fullmatch(r"(\d+)x(\d+)", body.size)
        sizes = ", ".join(f"{w}x{h}" for w, h in config.sizes)
        if match is None:
            raise InvalidRequest(f"size must be 'WIDTHxHEIGHT', one of: {sizes}; got {body.size!r}.", "size")
        width, height = int(match[1]), int(match[2])
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
        loc = [part for part in item.get("loc", ()) if part != "body"]
        if loc:
            return str(loc[0])
    return None


def _error(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    kind = {429: "rate_limit_error", 503: "server_unavailable"}.get(status, "invalid_request_error")
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status,
                        headers=headers)
