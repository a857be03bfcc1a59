"""The HTTP edge: who may connect, how long a request may take to arrive, how large it may be, how long SIGTERM waits.

What uvicorn and h11 offer is used as is (``timeout_keep_alive`` for idle connections, ``timeout_graceful_shutdown``
for the drain, h11's 16 KiB bound on a request's head); the rest are small layers:

- ``EdgeProtocol``, uvicorn's h11 protocol with what only a protocol can do: a short deadline for a request's head
  (``header_timeout``; uvicorn has none: a client that never ends its headers held a connection forever, and 512 idle
  connections held every other client out), a real cap on open connections (uvicorn's ``limit_concurrency`` still
  accepts them and answers 503 in plain text) and one per client address, malformed HTTP answered in the one error
  format, on SIGTERM a connection whose request has not arrived whole closed at once (uvicorn waits for it as if it
  were in flight), and a request the drain cuts short answered 503 with ``Retry-After`` (uvicorn answers 500);
- ``RequestBounds``, ASGI: the body's deadline (``read_timeout`` from the head's arrival; else 408), the body limit
  (413, at once for a declared ``Content-Length``), and ``Connection: close`` on any answer given before the body was
  read. Being ASGI, it holds in Ray Serve's replicas too;
- ``TrailingSlash``, ASGI: ``/health/`` is ``/health`` (a redirect would send an empty body, and most clients do not
  follow a redirect of a POST);
- ``PathsOnly``, a logging filter: the access log writes a request's path, never its query string, which may carry
  a key (``?api_key=...``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import h11
import uvicorn
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # as uvicorn reads it
from uvicorn.protocols.http.h11_impl import H11Protocol

from .auth import OPEN_PATHS, ApiKeys, is_loopback, key_problem
from .errors import CLOSE, raw_response, send_error

READ_DEADLINE = "fastcache.read_deadline"  # scope["extensions"]: when the body must have arrived (time.monotonic)
REFUSED_LINGER_S = 1.0  # a refused connection stays open this long, so that its client can read why
DRAINED_RETRY_S = 1  # Retry-After of a request the drain cut short: another replica can take it now


@dataclass(frozen=True)
class EdgeConfig:
    """How the HTTP server meets its clients (``fastcache serve``'s edge options). Checks itself at construction
    (``ValueError`` naming the field and what is valid, never a key), so a Python or Ray caller gets the command
    line's checks. ``api_keys`` is left out of ``repr``."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)  # Bearer keys; none: no authentication
    metrics_public: bool = False  # /metrics without a key, for a scraper on a private network
    allow_unauthenticated: bool = False  # bind a non-loopback address without keys
    read_timeout: float = 30.0  # seconds for a request's body to arrive, from its head's arrival
    header_timeout: float = 5.0  # seconds for a request's head to arrive, from the connection (or its first byte)
    keep_alive_timeout: float = 5.0  # seconds an idle connection stays open between requests
    max_connections: int = 512  # open connections (below the usual 1024 file descriptors)
    max_connections_per_client: int = 64  # open connections from one client address (behind a proxy: its address)
    max_body_mb: float = 16.0  # MiB of request body
    drain_seconds: float = 300.0  # on SIGTERM, how long in-flight requests may take to finish

    def __post_init__(self):
        if isinstance(self.api_keys, str):
            raise ValueError("api_keys must be a sequence of keys, not one string")
        object.__setattr__(self, "api_keys", tuple(dict.fromkeys(self.api_keys)))
        problem = key_problem(self.api_keys)
        if problem:
            raise ValueError(f"api_keys {problem}")
        for name in ("metrics_public", "allow_unauthenticated"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        for name, low, high in (("read_timeout", 0.1, 3600), ("header_timeout", 0.1, 3600),
                                ("keep_alive_timeout", 0.1, 3600), ("max_body_mb", 0.001, 4096),
                                ("drain_seconds", 0, 86_400)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{name} must be a finite number from {low:g} to {high:g}; got {value!r}")
        for name in ("max_connections", "max_connections_per_client"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
                raise ValueError(f"{name} must be an integer from 1 to 1000000; got {value!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def open_paths(self) -> tuple[str, ...]:
        return OPEN_PATHS + (("/metrics",) if self.metrics_public else ())

    def bind_problem(self, host: str) -> str | None:
        """Why the server must not listen on ``host`` (one line), or ``None``: without keys, only loopback."""
        if self.api_keys or self.allow_unauthenticated or is_loopback(host):
            return None
        return (f"refusing to serve on {host} without an API key: anyone who can reach it could use the model; set "
                f"--api-key or FASTCACHE_API_KEY, or pass --allow-unauthenticated on a trusted network")

    def install(self, app) -> None:
        """Add the ASGI layers (keys inside, bounds outside) to a FastAPI ``app``; its own middleware added after
        these wraps them."""
        app.add_middleware(ApiKeys, keys=self.api_keys, open_paths=self.open_paths)
        app.add_middleware(RequestBounds, edge=self)

    def uvicorn_config(self, app, **kwargs) -> uvicorn.Config:
        protocol = type("EdgeProtocol", (EdgeProtocol,), {"edge": self})
        config = uvicorn.Config(app, http=protocol, timeout_keep_alive=self.keep_alive_timeout,
                                timeout_graceful_shutdown=self.drain_seconds, **kwargs)
        PathsOnly.install()  # after uvicorn configured its loggers
        return config


class PathsOnly(logging.Filter):
    """uvicorn's access log (``'%s - "%s %s HTTP/%s" %d'``: client, method, path with query, version, status) with the
    path alone: a query string may carry a key or a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True

    @classmethod
    def install(cls, logger: str = "uvicorn.access") -> None:
        access = logging.getLogger(logger)
        if not any(isinstance(existing, cls) for existing in access.filters):
            access.addFilter(cls())


class TrailingSlash:
    """ASGI: a path with a trailing slash is served as the path without it (``/health/`` as ``/health``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
        await self.app(scope, receive, send)


class RequestBounds:
    """ASGI layer: a request's body must arrive by its read deadline (else 408) and within the body limit (else 413:
    at once for a declared ``Content-Length``, when it is passed for a chunked body); an answer given before the body
    has arrived closes the connection, so that a client cannot keep sending into it."""

    def __init__(self, app, edge: EdgeConfig):
        self.app, self.edge = app, edge

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.edge.max_body_bytes
        length, chunked = _declared_body(scope["headers"])
        if length is not None and length > limit:
            message = f"the request body is {length} bytes; this server takes at most {limit} " \
                      f"({self.edge.max_body_mb:g} MiB)."
            return await send_error(send, 413, message, "request_too_large", CLOSE)
        deadline = (scope.get("extensions") or {}).get(READ_DEADLINE) or time.monotonic() + self.edge.read_timeout
        received, arrived, answered, started = 0, not (length or chunked), False, False

        async def answer(status: int, message: str, code: str):
            nonlocal answered
            answered = True
            if not started:
                await send_error(send, status, message, code, CLOSE)

        async def bounded_receive():
            nonlocal received, arrived
            if answered:
                return {"type": "http.disconnect"}
            if arrived:  # the whole body is in: the app now only listens for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await answer(408, f"the request did not arrive whole within {self.edge.read_timeout:g} s "
                                  f"(the server's read timeout).", "request_timeout")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    await answer(413, f"the request body is over {limit} bytes ({self.edge.max_body_mb:g} MiB), "
                                      f"the most this server takes.", "request_too_large")
                    return {"type": "http.disconnect"}
                arrived = not message.get("more_body", False)
            return message

        async def guarded_send(message):
            nonlocal started
            if answered and not started:
                return  # the app's answer to a request this layer already answered
            if message["type"] == "http.response.start":
                started = True
                if not arrived:
                    message = dict(message, headers=[*message.get("headers", ()), (b"connection", b"close")])
            await send(message)

        await self.app(scope, bounded_receive, guarded_send)


def _declared_body(headers) -> tuple[int | None, bool]:
    """The declared ``Content-Length`` (None if absent or unreadable) and whether the body is chunked."""
    length, chunked = None, False
    for name, value in headers:
        if name.lower() == b"content-length" and value.strip().isdigit():
            length = int(value)
        elif name.lower() == b"transfer-encoding":
            chunked = True
    return length, chunked


class EdgeProtocol(H11Protocol):
    """uvicorn's h11 protocol, bounded: a connection over ``max_connections`` is refused with a 503, one over
    ``max_connections_per_client`` from its address with a 429; a request's head must arrive within
    ``header_timeout``, its body then within ``read_timeout`` (``RequestBounds``); malformed HTTP is answered in the
    one error format; on SIGTERM a request that has not arrived whole is dropped at once, and one that the drain cuts
    short is answered 503. ``edge`` is set on a subclass per server (``EdgeConfig.uvicorn_config``)."""

    edge: EdgeConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clock: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # when the body of the request being read must have arrived
        self._refused = False
        self._draining = False
        self._malformed: h11.RemoteProtocolError | None = None
        self.app = self._bounded
        next_event = self.conn.next_event

        def next_event_noting_errors():  # uvicorn drops h11's reason; the answer says it
            try:
                return next_event()
            except h11.RemoteProtocolError as error:
                self._malformed = error
                raise

        self.conn.next_event = next_event_noting_errors

    async def _bounded(self, scope, receive, send):
        """The app, with its body's deadline; a request still running when the drain ends gets a 503."""
        scope["extensions"] = {**(scope.get("extensions") or {}), READ_DEADLINE: self._deadline}
        started = False

        async def noting_start(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.config.loaded_app(scope, receive, noting_start)
        except asyncio.CancelledError:
            if not self._draining or started:
                raise
            # NOTE: uvicorn cancels what still runs when the drain ends, and would answer 500: the request was fine,
            # and another replica can take it
            await send_error(send, 503, f"the server shut down before this request was done (its drain of "
                                        f"{self.edge.drain_seconds:g} s ended); retry it.", "shutting_down",
                             [("retry-after", str(DRAINED_RETRY_S)), *CLOSE])

    def connection_made(self, transport):
        if len(self.connections) >= self.edge.max_connections:
            return self._refuse(transport, 503, f"this server holds {self.edge.max_connections} connections, the "
                                                f"most it takes; retry shortly.", "too_many_connections")
        host = _host(transport.get_extra_info("peername"))
        held = sum(1 for connection in self.connections if _host(getattr(connection, "client", None)) == host)
        if held >= self.edge.max_connections_per_client:
            return self._refuse(transport, 429, f"this client address holds {held} connections, the most one address "
                                                f"may; reuse them, or retry shortly.", "too_many_client_connections")
        super().connection_made(transport)
        self._start_clock()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped, so that closing does not reset the connection before the answer is read
        if self._clock is None and (self.cycle is None or self.cycle.response_complete):
            self._start_clock()  # the first bytes of a new request
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # its head has arrived: RequestBounds times its body from now
            self._stop_clock()
            self._deadline = time.monotonic() + self.edge.read_timeout

    def on_response_complete(self) -> None:
        self._deadline = time.monotonic() + self.edge.read_timeout  # for a request pipelined behind this one
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        self._draining = True
        if not self._refused and self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body:
            self.transport.close()  # its request never arrived whole: nothing of it is in flight
            return
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        error = self._malformed
        status = getattr(error, "error_status_hint", 400)
        if status == 431:
            limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
            message = f"the request head (request line and headers) is over {limit} bytes, the most this server reads."
        else:
            message = f"malformed HTTP/1.1 request ({str(error or msg)[:200]})."
        self.transport.write(raw_response(status, message, "malformed_request"))
        self.transport.close()

    def _refuse(self, transport, status: int, message: str, code: str) -> None:
        self._refused = True
        self.transport = transport
        transport.write(raw_response(status, message, code, [("retry-after", "1")]))
        if transport.can_write_eof():
            transport.write_eof()
        self._clock = self.loop.call_later(REFUSED_LINGER_S, transport.close)

    def _start_clock(self) -> None:
        self._clock = self.loop.call_later(self.edge.header_timeout, self._head_timed_out)

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    def _head_timed_out(self) -> None:
        self._clock = None
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request arrived: say why the connection closes
            self.transport.write(raw_response(408, f"the request head did not arrive whole within "
                                                   f"{self.edge.header_timeout:g} s (the server's header timeout).",
                                              "request_timeout"))
        self.transport.close()


def _host(address) -> str | None:
    """The host of a socket's peer address (``None`` when unknown)."""
    return address[0] if isinstance(address, (tuple, list)) and address else None
