"""Scale-out on Ray Serve: N replicas of the same HTTP service behind Ray's HTTP proxy.

Each replica is one ``Service`` (one GPU on CUDA) that warms up in its constructor, from the shared ``--cache-dir``,
so that Ray routes requests to warmed replicas only; the API is ``server.make_app``'s, unchanged, with the same edge
(``EdgeConfig``): each replica checks the API keys, the body limit (413 at once for a declared ``Content-Length``) and
the body's read timeout itself. Ray's proxy has no deadline of its own for a request's head; its ``request_timeout_s``
bounds a whole request, reading, queueing and generating, to ``read_timeout + drain_seconds``. Without an address
a local Ray is started on 127.0.0.1 alone (every Ray process listens on loopback); with one (``auto``,
``ray://HOST:10001``) the deployment joins that cluster. ``/metrics`` through the proxy answers for the replica
that took the request; Ray exports its own per-replica metrics too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading

from .edge import EdgeConfig
from .probe import status, wait_until
from .server import make_app
from .service import Service, ServiceOptions

logger = logging.getLogger(__name__)

APP_NAME = "fastcache"


def _replica_class():
    """The deployment class, built on first use so that importing this module does not need Ray."""
    from ray import serve

    @serve.deployment(name="FastcacheReplica", health_check_period_s=10, health_check_timeout_s=30)
    @serve.ingress()
    class FastcacheReplica:
        def __init__(self, options: ServiceOptions, edge: EdgeConfig, loopback: bool):
            if loopback:
                _loopback_replica_grpc()
            self.edge = edge
            self.service = Service(options)
            self.service.warm_up(progress=False)
            self.service.engine.start()

        def __serve_build_asgi_app__(self):  # Serve asks each replica for its app after __init__
            return make_app(self.service, self.edge, warm_up=False)

        def check_health(self):
            if not self.service.engine.alive:
                raise RuntimeError("the engine's worker thread is not running")

    return FastcacheReplica


def start(options: ServiceOptions, replicas: int, *, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, timeout: float = 3600.0, cancel: threading.Event | None = None,
          edge: EdgeConfig | None = None) -> str:
    """Deploy ``replicas`` replicas behind ``edge`` and wait (at most ``timeout`` seconds, or until ``cancel`` is set)
    until the proxy answers ``/ready``; the service's URL. ``ValueError`` if ``host`` must not be served without a
    key, ``RuntimeError`` if the deployment fails."""
    from ray import serve

    edge = edge or EdgeConfig()
    problem = edge.bind_problem(host)
    if problem:
        raise ValueError(problem)

    loopback = address is None
    connect(address)
    cuda = options.device.startswith("cuda")
    if cuda:  # Ray gives each replica its own GPU as cuda:0
        options = dataclasses.replace(options, device="cuda")
    resources = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": min(1.0, (os.cpu_count() or 1) / replicas)}
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": edge.read_timeout + edge.drain_seconds,
                              "keep_alive_timeout_s": max(1, math.ceil(edge.keep_alive_timeout))})
    deployment = _replica_class().options(num_replicas=replicas, ray_actor_options=resources)
    serve.run_many([serve.RunTarget(deployment.bind(options, edge, loopback), name=APP_NAME, route_prefix="/")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"

    def ready() -> bool:  # every replica running (each warmed up in its constructor), and the proxy answers
        if cancel is not None and cancel.is_set():
            raise RuntimeError("stopped before the replicas were ready")
        state = serve.status().applications.get(APP_NAME)
        if state is not None and state.status == "DEPLOY_FAILED":
            raise RuntimeError("the Ray Serve deployment failed: " +
                               "; ".join(d.message for d in state.deployments.values()))
        return state is not None and state.status == "RUNNING" and status(f"{url}/ready") == 200

    try:
        wait_until(ready, timeout, "the Ray Serve replicas ready", poll=0.5)
    except TimeoutError:
        raise RuntimeError(f"the Ray Serve replicas were not ready within {timeout} s "
                           f"({serve.status().applications.get(APP_NAME)})") from None
    logger.info("fastcache: %d replicas ready behind Ray Serve at %s", replicas, url)
    return url


def connect(address: str | None = None) -> None:
    """Start a local Ray on 127.0.0.1 alone (``address`` None), or join the cluster at ``address``; nothing if this
    process is connected already."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        # NOTE: without this, Ray binds its GCS, raylet and agents to the host's routable address
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def run_replicas(options: ServiceOptions, replicas: int, *, host: str, port: int, address: str | None,
                 edge: EdgeConfig | None = None) -> int:
    """``fastcache serve --replicas N``: deploy, serve until SIGTERM or Ctrl-C (also while the replicas start), then
    shut Ray Serve and a local Ray down; 0, or 1 if the deployment failed (said in one line)."""
    done = threading.Event()
    try:
        connect(address)
        # NOTE: after ray.init, which sets its own SIGTERM handlers: Python's (sys.exit) and its core worker's (a stack
        # dump, then an abort: exit -6 with Ray Serve still up)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        start(options, replicas, host=host, port=port, address=address, cancel=done, edge=edge)
        done.wait()
    except RuntimeError as error:
        if not done.is_set():
            logger.error("fastcache: %s", error)
            return 1
    finally:
        stop()
    return 0


def _loopback_replica_grpc() -> None:
    """Each replica opens a gRPC server for calls between deployments (unused here) on ``[::]``; a local loopback
    cluster moves it to 127.0.0.1. Private Ray API, so guarded: nothing happens where it is missing."""
    try:
        import ray.serve._private.replica as replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(replica, "_fastcache_loopback", False):
        return
    replica._fastcache_loopback = True
    replica.add_port_to_grpc_server = lambda server, address: original(server, address.replace("[::]", "127.0.0.1"))
