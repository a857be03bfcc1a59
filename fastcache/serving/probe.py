"""Waiting for a server: a free loopback port, an HTTP status, and polling until ``/ready`` answers 200.

The one copy of these for the Ray launcher, the load benchmark and the tests. Standard library only, so that every
install (``fastcache[ray]`` included) can import it.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

# NOTE: no proxy: these probes talk to 127.0.0.1 or the cluster's own proxy, never through an HTTP(S)_PROXY
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def status(url: str, timeout: float = 10.0) -> int | None:
    """The HTTP status of ``GET url``, or ``None`` while nothing answers there."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def wait_until(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    """Call ``check`` until it returns something true, and return that; ``TimeoutError`` naming ``what`` after
    ``timeout`` seconds. ``check`` may raise to give up early (a process that died, a deployment that failed)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(poll)


def wait_ready(url: str, timeout: float, alive: Callable[[], bool] | None = None, poll: float = 0.2) -> None:
    """Poll ``url``/ready until it answers 200 (the warm-up is done), at most ``timeout`` seconds; ``RuntimeError``
    as soon as ``alive()`` says the server is gone (a process that exited, a deployment that failed)."""

    def ready() -> bool:
        if alive is not None and not alive():
            raise RuntimeError(f"the server at {url} stopped before it was ready")
        return status(f"{url}/ready") == 200

    wait_until(ready, timeout, f"{url} ready", poll)
