"""API keys: with keys set, every request but the open paths needs ``Authorization: Bearer KEY``.

An ASGI layer in front of routing, not a route dependency: a route added later is protected without a line of its
own, and a request without a valid key is refused before its body is read (a FastAPI dependency runs after the body
is parsed). Keys are held as SHA-256 digests and compared in constant time, against every key (no early exit), and
are never logged, echoed in an error or exported.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Mapping

from .errors import send_error

ENV_VAR = "FASTCACHE_API_KEY"  # comma-separated keys
OPEN_PATHS = ("/health", "/ready")  # for load balancers and orchestrators, which hold no key
MAX_KEY_CHARS = 256
_KEY_CHARS = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # visible ASCII but the comma, which separates keys


def keys_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    text = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return tuple(key.strip() for key in text.split(",") if key.strip())


def key_problem(keys: Iterable) -> str | None:
    """Why ``keys`` cannot be API keys, naming a key by its position only."""
    for position, key in enumerate(keys, 1):
        if not isinstance(key, str) or not _KEY_CHARS.fullmatch(key) or len(key) > MAX_KEY_CHARS:
            return (f"must be 1 to {MAX_KEY_CHARS} visible ASCII characters, without spaces or commas; key "
                    f"{position} is not")
    return None


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is a loopback address (reachable from this machine only)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


class ApiKeys:
    """ASGI layer: ``401`` in the one error format (with ``WWW-Authenticate: Bearer``) for a request to a path not in
    ``open_paths`` without one of ``keys``; everything passes when there are no keys."""

    def __init__(self, app, keys: Iterable[str], open_paths: Iterable[str] = OPEN_PATHS):
        self.app = app
        self._digests = tuple(_digest(key.encode()) for key in keys)
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not self._digests or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        token = _bearer_token(scope["headers"])
        if token is not None and self._known(token):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        message = ("this server needs an API key: send the header 'Authorization: Bearer KEY'." if token is None
                   else "the API key is not valid for this server.")
        await send_error(send, 401, message, "missing_api_key" if token is None else "invalid_api_key",
                         [("WWW-Authenticate", "Bearer")])

    def _known(self, token: bytes) -> bool:
        digest, match = _digest(token), False
        for known in self._digests:  # every key, so the time does not tell which one matched
            match |= hmac.compare_digest(digest, known)
        return match


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _bearer_token(headers) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            return token.strip() or None
    return None
