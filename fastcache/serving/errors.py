"""One error format for every layer of the HTTP service: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI's shape, from every layer a request passes: the HTTP protocol (malformed requests, refused connections, a
request that does not arrive in time), the edge (API keys, body limits), routing (404, 405), body parsing and
validation (400), the handlers and the engine (400, 429, 499, 500, 503). A client parses one shape, and each message
names what is valid on this server, in at most ``MAX_MESSAGE_CHARS`` characters (a list of names: a count and a few
examples). ``ErrorResponse`` is its model (OpenAPI's, and a client's or test's check). ``install`` registers the
handlers that turn FastAPI's and Starlette's own errors into it, and logs an unexpected one once; the edge layers send
it with ``send_error`` (ASGI) or ``raw_response`` (bytes on a socket).
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors_text import count, examples, listing

logger = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 429: "rate_limit_error", 499: "client_closed", 500: "server_error",
          503: "server_unavailable"}  # any other status: invalid_request_error
CLOSE = (("connection", "close"),)  # for answers sent before the request's body was read: the rest is not read
MAX_MESSAGE_CHARS = 400  # a message a person reads: a list of names gives a count and a few (errors_text)
MAX_PROBLEMS = 3  # invalid fields named in one message (the rest are counted)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS, description="what is wrong and what is valid")
    type: Literal["invalid_request_error", "authentication_error", "rate_limit_error", "client_closed",
                  "server_error", "server_unavailable"]
    param: str | None = Field(description="the request's field at fault, if one is")
    code: str = Field(min_length=1, description="a stable name of the error, e.g. invalid_value, queue_full")


class ErrorResponse(BaseModel):
    """Every error of every layer of the service, OpenAI's shape."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    kind = _TYPES.get(status, "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None, retry_after: int | None = None) -> Response:
    headers = dict(headers or {}, **({"Retry-After": str(retry_after)} if retry_after else {}))
    return Response(error_body(status, message, param, code), status, headers, media_type="application/json")


async def send_error(send, status: int, message: str, code: str, headers: Iterable[tuple[str, str]] = ()) -> None:
    """Answer on an ASGI ``send`` (the edge layers, in front of FastAPI)."""
    body = error_body(status, message, code=code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *((name.lower().encode(), value.encode()) for name, value in headers)]})
    await send({"type": "http.response.body", "body": body})


def raw_response(status: int, message: str, code: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A whole HTTP/1.1 answer with ``Connection: close``, for the protocol layer (no request was parsed)."""
    body = error_body(status, message, code=code)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def install(app: FastAPI) -> None:
    """FastAPI's and Starlette's own errors in the one format. ``app.state.field_rules`` (field -> what is valid on
    this server) is added to the messages of invalid fields."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        state, path = request.app.state, request.url.path
        media = _media_type(request.headers.get("content-type"))
        expected = getattr(state, "media_types", {}).get(path)
        if expected is not None and not _is_media(media, expected):
            return error_response(415, f"{request.method} {path[:60]} takes {expected} (Content-Type: {expected}); "
                                       f"got {media[:60] or 'no Content-Type'}.", code="unsupported_media_type")
        rules = getattr(state, "field_rules", {})
        fields = getattr(state, "fields", {}).get(path, tuple(rules))
        message, param, code = _describe(error, rules, fields, media)
        return error_response(400, message, param, code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        if error.status_code == 404:
            return error_response(404, f"no endpoint {request.url.path[:100]!r}; this server has {_endpoints(app)} "
                                       f"(GET /openapi.json describes them).", code="not_found")
        if error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            return error_response(405, f"{request.method[:20]} is not allowed on {request.url.path[:100]}; use "
                                       f"{allowed}.",
                                  code="method_not_allowed", headers={"Allow": allowed})
        if error.status_code == 400 and error.__cause__ is not None:  # FastAPI could not read the body as JSON
            return error_response(400, _unreadable(error.__cause__), code="invalid_json")
        return error_response(error.status_code, str(error.detail), code=_code(error.status_code),
                              headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("fastcache: %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}", code="internal_error")

    # NOTE: Starlette's outermost layer answers with the handler above and then raises the error again, for the
    # server to log: uvicorn and Ray would log a second traceback of an error logged and answered here
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: _AnsweredOnce(build())


class _AnsweredOnce:
    """ASGI: the errors that Starlette raises again after the ``Exception`` handler answered (and logged) them stop
    here. A ``BaseException`` (a cancelled task) still passes."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except Exception:
            if scope["type"] != "http":
                raise


def _endpoints(app: FastAPI) -> str:
    return listing([f"{'/'.join(sorted(route.methods))} {route.path}" for route in app.routes
                    if isinstance(route, APIRoute)], "endpoint", ordered=True)


def _media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` header, without its parameters ("" without one)."""
    return (content_type or "").split(";")[0].strip().lower()


def _is_media(media: str, expected: str) -> bool:
    """Whether ``media`` is ``expected`` (JSON: also ``application/*+json``, as FastAPI reads them)."""
    if expected == "application/json":
        return media == expected or (media.startswith("application/") and media.endswith("+json"))
    return media == expected


def _code(status: int) -> str:
    try:
        return HTTPStatus(status).name.lower()
    except ValueError:
        return f"http_{status}"


def _unreadable(cause: BaseException) -> str:
    """Why a body is not JSON, without echoing it."""
    if isinstance(cause, UnicodeDecodeError):
        return "the request body is not valid UTF-8; send a JSON object encoded as UTF-8."
    if isinstance(cause, RecursionError):
        return "the request body is nested too deeply to parse; send a flat JSON object."
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "the request body has a number too long to parse (at most 4300 digits); numbers must fit their fields."
    return f"the request body could not be read as JSON ({type(cause).__name__})."


def _describe(error: RequestValidationError, rules: Mapping[str, str], fields: Iterable[str], media: str):
    """``(message, param, code)`` for pydantic's errors: the fields at fault (at most ``MAX_PROBLEMS``, the first with
    what is valid on this server), unknown ones with the closest field and the request's fields."""
    problems, unknown, param, code = [], [], None, "invalid_value"
    for item in error.errors():
        kind, loc = item.get("type"), [str(part) for part in item.get("loc", ()) if part != "body"]
        if kind == "json_invalid":
            return "the request body is not valid JSON.", None, "invalid_json"
        if not loc:  # the body as a whole: not an object, or absent
            hint = "" if "json" in media else f", sent with Content-Type: application/json (got {media or 'none'})"
            return f"the request body must be a JSON object{hint[:100]}.", None, "invalid_body"
        field = loc[0][:40]
        param = param or field
        if kind == "extra_forbidden" and len(loc) == 1:  # inside a field ({"cache": {"branch": 1}}): its rule
            unknown.append(field)
            code = "unknown_field"
            continue
        reason = str(item.get("msg", "")).lower()[:100]
        if field in rules and not any(field == earlier for earlier, _ in problems):
            problems.append((field, f"{field} must be {rules[field]} ({reason})"))
        else:
            problems.append((field, f"{'.'.join(loc)[:60]}: {reason}"))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        what = (f"{unknown[0]!r} is not a field" if len(unknown) == 1 else
                f"{count(unknown, 'field')} {examples(map(repr, unknown), 3, ordered=True)} are not fields")
        problems.insert(0, (unknown[0], f"{what} of this request{hint}; it has "
                                        f"{listing(fields, 'field', ordered=True)}"))
    shown, left = [], len(problems)
    for _, text in problems[:MAX_PROBLEMS]:
        candidate = "; ".join([*shown, text])
        if len(candidate) + 40 > MAX_MESSAGE_CHARS and shown:
            break
        shown.append(text[:MAX_MESSAGE_CHARS - 60])
        left -= 1
    more = f"; and {left} more" if left else ""
    return "invalid request: " + "; ".join(shown) + more + ".", problems[0][0] if problems else param, code
