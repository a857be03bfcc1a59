"""One error format for every layer of the HTTP service: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI's shape, from every layer a request passes: the HTTP protocol (malformed requests, refused connections, a
request that does not arrive in time), the edge (API keys, body limits), routing (404, 405), body parsing and
validation (400), the handlers and the engine (400, 429, 499, 500, 503). A client parses one shape, and each message
names what is valid on this server. ``install`` registers the handlers that turn FastAPI's and Starlette's own
errors into it; the edge layers send it with ``send_error`` (ASGI) or ``raw_response`` (bytes on a socket).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 429: "rate_limit_error", 499: "client_closed", 500: "server_error",
          503: "server_unavailable"}  # any other status: invalid_request_error
CLOSE = (("connection", "close"),)  # for answers sent before the request's body was read: the rest is not read


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
        rules = getattr(request.app.state, "field_rules", {})
        message, param, code = _describe(error, rules, request.headers.get("content-type"))
        return error_response(400, message, param, code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        if error.status_code == 404:
            return error_response(404, f"no endpoint {request.url.path[:100]!r}; endpoints: {_endpoints(app)}.",
                                  code="not_found")
        if error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            return error_response(405, f"{request.method} is not allowed on {request.url.path}; use {allowed}.",
                                  code="method_not_allowed", headers={"Allow": allowed})
        if error.status_code == 400 and error.__cause__ is not None:  # FastAPI could not read the body as JSON
            return error_response(400, _unreadable(error.__cause__), code="invalid_json")
        return error_response(error.status_code, str(error.detail), code=_code(error.status_code),
                              headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("fastcache: %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}", code="internal_error")


def _endpoints(app: FastAPI) -> str:
    return ", ".join(f"{'/'.join(sorted(route.methods))} {route.path}" for route in app.routes
                     if isinstance(route, APIRoute))


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


def _describe(error: RequestValidationError, rules: Mapping[str, str], content_type: str | None):
    """``(message, param, code)`` for pydantic's errors: each field at fault with what is valid on this server; the
    fields and their rules when one is unknown or missing."""
    problems, param, code, listing = [], None, "invalid_value", False
    for item in error.errors():
        kind, loc = item.get("type"), [str(part) for part in item.get("loc", ()) if part != "body"]
        if kind == "json_invalid":
            return "the request body is not valid JSON.", None, "invalid_json"
        if not loc:  # the body as a whole: not an object, or absent
            media = (content_type or "none").split(";")[0].strip()[:60]
            hint = "" if "json" in media else f", sent with Content-Type: application/json (got {media})"
            return f"the request body must be a JSON object{hint}.", None, "invalid_body"
        field = loc[0][:40]
        param = param or field
        if kind == "extra_forbidden" and len(loc) == 1:  # inside a field ({"cache": {"branch": 1}}): its rule
            problems.append(f"{field!r} is not a field of this request")
            code, listing = "unknown_field", True
        elif field in rules:
            problems.append(f"{field} must be {rules[field]} ({item.get('msg', '').lower()})")
            listing |= kind == "missing"
        else:
            problems.append(f"{'.'.join(loc)[:80]}: {item.get('msg')}")
    fields = f" Fields: {'; '.join(f'{name}: {rule}' for name, rule in rules.items())}." if listing and rules else ""
    return "invalid request: " + "; ".join(problems) + "." + fields, param, code
