"""The HTTP edge of a real ``fastcache serve`` on 127.0.0.1: API keys (never logged, even in a query string), slow,
idle and broken clients, the connection caps (in all, and per client address: loopback's 127.0.0.2, 127.0.0.3, ...
stand for other clients), SIGTERM with a stalled client and with work the drain cuts short, and a seeded fuzz of
malformed requests. Every socket has a timeout; the servers are this module's own processes, stopped by their pid."""

import random
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import HOST, ServerProcess, assert_error, load_script, png_array, wait_until

from fastcache.serving.edge import EdgeConfig

KEY, ENV_KEY = "sk-edge-test-4f9a1c", "sk-from-environment-77b2"  # one by --api-key, one by FASTCACHE_API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT, HEADER_TIMEOUT, KEEP_ALIVE, MAX_BODY, MAX_SIZE = 3.0, 2.0, 1.0, 2**20, 64
MAX_CONNECTIONS, PER_CLIENT = 8, 5
GENERATIONS = "/v1/images/generations"
serve_fuzz = load_script("bench/serve_fuzz.py")


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--preset", "tiny-sd", "--no-compile", "--sizes", "32", "--batch-sizes", "1,2", "--steps",
                           "2", "--max-steps", "8", "--max-delay-ms", "0", "--api-key", KEY, "--read-timeout",
                           str(READ_TIMEOUT), "--header-timeout", str(HEADER_TIMEOUT), "--keep-alive-timeout",
                           str(KEEP_ALIVE), "--max-connections", str(MAX_CONNECTIONS), "--max-connections-per-client",
                           str(PER_CLIENT), "--max-body-mb", "1", "--max-size", str(MAX_SIZE),
                           env={"FASTCACHE_API_KEY": ENV_KEY}, headers=AUTH)
    yield server
    server.stop()


@pytest.mark.parametrize("fields, message", [
    ({"read_timeout": 0}, "read_timeout must be a finite number from 0.1 to 3600"),
    ({"read_timeout": float("inf")}, "read_timeout must be a finite number"),
    ({"header_timeout": 0}, "header_timeout must be a finite number from 0.1 to 3600"),
    ({"max_connections_per_client": 0}, "max_connections_per_client must be an integer from 1"),
    ({"keep_alive_timeout": -1}, "keep_alive_timeout must be a finite number"),
    ({"max_connections": 0}, "max_connections must be an integer from 1"),
    ({"max_connections": 2.5}, "max_connections must be an integer"),
    ({"max_body_mb": 0}, "max_body_mb must be a finite number from 0.001"),
    ({"drain_seconds": -1}, "drain_seconds must be a finite number from 0 to 86400"),
    ({"metrics_public": "yes"}, "metrics_public must be True or False"),
    ({"api_keys": "sk-one-string"}, "api_keys must be a sequence of keys"),
    ({"api_keys": ("sk-good", "sk bad")}, "api_keys must be 1 to 256 visible ASCII characters"),
])
def test_edge_config_checks_itself(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        EdgeConfig(**fields)
    assert "sk bad" not in str(error.value)


def test_edge_config_hides_its_keys_and_refuses_an_open_host_without_them():
    edge = EdgeConfig(api_keys=("sk-secret-1", "sk-secret-1", "sk-secret-2"))
    assert edge.api_keys == ("sk-secret-1", "sk-secret-2") and "sk-secret" not in repr(edge)
    assert edge.bind_problem("0.0.0.0") is None
    assert EdgeConfig().bind_problem("127.0.0.1") is None and EdgeConfig().bind_problem("localhost") is None
    problem = EdgeConfig().bind_problem("0.0.0.0")
    assert "refusing to serve on 0.0.0.0 without an API key" in problem and "\n" not in problem
    assert EdgeConfig(allow_unauthenticated=True).bind_problem("0.0.0.0") is None
    assert EdgeConfig(metrics_public=True).open_paths == ("/health", "/ready", "/metrics")


def raw_exchange(port: int, data: bytes, source: str | None = None) -> tuple[int | None, bytes, float]:
    """``serve_fuzz.raw_exchange``, bounded by this server's read timeout."""
    return serve_fuzz.raw_exchange(port, data, READ_TIMEOUT + 2, source=source)


def connect(port: int, source: str, timeout: float = 10) -> socket.socket:
    """A connection from loopback address ``source`` (Linux routes all of 127.0.0.0/8 to this machine)."""
    return socket.create_connection((HOST, port), timeout=timeout, source_address=(source, 0))


def generate(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{GENERATIONS}", json=body, headers=AUTH, timeout=60)


def test_every_endpoint_but_health_and_ready_needs_a_key(server):
    url = server.url
    for path in ("/health", "/ready"):
        assert httpx.get(url + path).status_code == 200
    for method, path in (("POST", GENERATIONS), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/docs"),
                         ("GET", "/no/such/path")):
        for headers, code in (({}, "missing_api_key"), ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key"),
                              ({"Authorization": f"Basic {KEY}"}, "missing_api_key"),
                              ({"Authorization": f"Bearer {KEY}x"}, "invalid_api_key")):
            response = httpx.request(method, url + path, headers=headers, json={"prompt": "x"})
            error = assert_error(response.status_code, response.content, 401)
            assert error["code"] == code and error["type"] == "authentication_error"
            assert response.headers["www-authenticate"] == "Bearer"
    for key in (KEY, ENV_KEY):  # the flag's key and the environment's
        response = httpx.post(url + GENERATIONS, json={"prompt": "x", "seed": 3}, timeout=60,
                              headers={"Authorization": f"bearer {key}"})
        assert response.status_code == 200 and len(response.json()["data"]) == 1
    assert httpx.get(url + "/metrics", headers=AUTH).status_code == 200
    missing = httpx.get(url + "/no/such/path", headers=AUTH)
    assert "POST /v1/images/generations" in assert_error(missing.status_code, missing.content, 404)["message"]


def test_the_three_hanging_clients_are_answered_within_the_read_timeout(server):
    head = f"POST {GENERATIONS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    cases = {  # name: (request, the status expected, within how many seconds)
        "short body": ((head + "Content-Length: 100\r\n\r\n").encode() + b"{" * 50, 408, READ_TIMEOUT + 1),
        "huge length": ((head + "Content-Length: 18446744073709551616\r\n\r\n").encode(), 413, 1.0),
        "endless head": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 4096, 408, HEADER_TIMEOUT + 1),
        "nothing sent": (b"", None, HEADER_TIMEOUT + 1),
    }
    results = {}

    def exchange(name: str, data: bytes):
        try:
            results[name] = raw_exchange(server.port, data)
        except AssertionError as error:  # no answer and no close
            results[name] = error

    threads = [threading.Thread(target=exchange, args=(name, data)) for name, (data, _, _) in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(READ_TIMEOUT + 10)
    for name, (_, status, within) in cases.items():
        assert isinstance(results[name], tuple), (name, results[name])
        got, body, seconds = results[name]
        assert got == status, (name, got, body)
        assert seconds < within, (name, seconds)
        if status is not None:
            assert_error(got, body)
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_an_idle_keep_alive_connection_is_closed(server):
    with socket.create_connection((HOST, server.port), timeout=KEEP_ALIVE + 3) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        start, received = time.monotonic(), b""
        while chunk := sock.recv(65536):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and time.monotonic() - start < KEEP_ALIVE + 1.5


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_connections_over_the_cap_are_refused_with_a_503_until_the_idle_ones_time_out(server):
    held = [connect(server.port, f"127.0.0.{10 + i}") for i in range(MAX_CONNECTIONS)]  # 8 clients, one each
    try:
        time.sleep(0.3)  # the server has taken them all
        status, body, seconds = raw_exchange(server.port, HEALTH)
        error = assert_error(status, body, 503)
        assert error["code"] == "too_many_connections" and seconds < 2
        held[0].sendall(HEALTH)
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")  # the connections it holds are served
        held[0].close()
        held[0] = connect(server.port, "127.0.0.18")  # the server is full again, of idle connections
        start = time.monotonic()
        # each is closed when its header timeout ends (nothing of a request came), and the server takes new clients
        wait_until(lambda: raw_exchange(server.port, HEALTH)[0] == 200, HEADER_TIMEOUT + 5, "a connection after")
        assert time.monotonic() - start < HEADER_TIMEOUT + 2
        for sock in held:
            assert sock.recv(65536) == b""
    finally:
        for sock in held:
            sock.close()


def test_one_client_address_cannot_hold_the_server(server):
    held = [connect(server.port, "127.0.0.2") for _ in range(PER_CLIENT)]
    try:
        time.sleep(0.3)
        status, body, seconds = raw_exchange(server.port, HEALTH, source="127.0.0.2")
        error = assert_error(status, body, 429)
        assert error["code"] == "too_many_client_connections" and seconds < 2
        for source in ("127.0.0.1", "127.0.0.3"):  # everyone else is served at once
            status, _, seconds = raw_exchange(server.port, HEALTH, source=source)
            assert status == 200 and seconds < 2, source
        start = time.monotonic()
        for sock in held:  # idle: closed by the header timeout (it counts from the connection)
            sock.settimeout(HEADER_TIMEOUT + 3)
            assert sock.recv(65536) == b""
        assert time.monotonic() - start < HEADER_TIMEOUT + 1
        assert raw_exchange(server.port, HEALTH, source="127.0.0.2")[0] == 200  # and the address may come back
    finally:
        for sock in held:
            sock.close()


# -- the fuzz (bench/serve_fuzz.py's cases; bench/serve_faults.py fuzz runs more) ------------------------------------

def test_a_seeded_fuzz_of_malformed_generations_and_edits_gets_4xx_in_one_format(server):
    reference = generate(server, {"prompt": "the same before and after", "seed": 11})
    assert reference.status_code == 200
    rng = random.Random(18)
    cases = (serve_fuzz.generation_cases(rng, 325, KEY, MAX_BODY)
             + serve_fuzz.edit_cases(rng, 200, KEY, MAX_BODY, size=32, max_size=MAX_SIZE))
    outcomes = serve_fuzz.run_cases(server.url, server.port, cases, READ_TIMEOUT + 2)
    failures = [o for o in outcomes if not o["ok"] or o["seconds"] >= READ_TIMEOUT]
    assert not failures, failures[:10]
    assert {o["kind"] for o in outcomes} == {"http", "raw"} and len(outcomes) == 525
    assert server.proc.poll() is None and httpx.get(f"{server.url}/ready").status_code == 200
    assert "Traceback" not in server.output(), server.output()[-3000:]  # bad input is no error of the server's
    again = generate(server, {"prompt": "the same before and after", "seed": 11})
    assert again.status_code == 200
    assert np.array_equal(png_array(again.json()["data"][0]["b64_json"]),
                          png_array(reference.json()["data"][0]["b64_json"]))


def test_keys_appear_in_no_log_metric_or_model_listing(server):
    generate(server, {"prompt": "logged?", "seed": 1})
    httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-wrong-key-in-a-log"})
    in_query = {name: f"sk-in-query-{name}" for name in ("api_key", "key", "access_token")}
    for name, secret in (*in_query.items(), ("api_key", KEY)):  # a key in the URL is no key (401), and not logged
        response = httpx.post(f"{server.url}{GENERATIONS}?{name}={secret}&x=1", json={"prompt": "x"}, timeout=60)
        assert_error(response.status_code, response.content, 401)
    exposed = server.output() + httpx.get(f"{server.url}/metrics", headers=AUTH).text + httpx.get(
        f"{server.url}/v1/models", headers=AUTH).text
    assert f'"POST {GENERATIONS} HTTP/1.1" 401' in server.output()  # the access log has the path, without its query
    for secret in (KEY, ENV_KEY, "sk-wrong-key-in-a-log", *in_query.values()):
        assert secret not in exposed
    assert server.metrics()['fastcache_requests_total{status="401"}'] >= 1  # refused requests are counted


def test_sigterm_closes_a_stalled_client_at_once_and_finishes_the_work_in_flight():
    # a drain far longer than the work, however slow the machine; timeouts longer than the test
    server = ServerProcess("--preset", "tiny-sd", "--no-compile", "--sizes", "32", "--steps", "2", "--max-steps",
                           "100", "--max-delay-ms", "0", "--drain-seconds", "600", "--header-timeout", "300",
                           "--read-timeout", "300")
    try:
        stalled = socket.create_connection((HOST, server.port), timeout=10)
        stalled.sendall(f"POST {GENERATIONS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        f"Content-Length: 100\r\n\r\n".encode() + b'{"prompt": ')
        half_head = socket.create_connection((HOST, server.port), timeout=10)
        half_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        steps = server.metrics()['fastcache_unet_steps_total{path="full"}']
        answer = {}

        def in_flight():  # ~3 s on a quiet 2-core CPU; minutes on a busy one: every wait here allows for it
            answer["response"] = httpx.post(f"{server.url}{GENERATIONS}", timeout=600,
                                            json={"prompt": "in flight", "num_inference_steps": 100})
            answer["at"] = time.monotonic()

        thread = threading.Thread(target=in_flight)
        thread.start()
        wait_until(lambda: server.metrics()['fastcache_unet_steps_total{path="full"}'] > steps, 120,
                   "the generation in flight")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=600) == 0, server.output()
        exited = time.monotonic()
        thread.join(30)
        assert answer["response"].status_code == 200  # the work in flight was finished ...
        assert exited - answer["at"] < 5.0  # ... and then the process exited, whatever the stalled clients do
        for sock in (stalled, half_head):
            assert sock.recv(65536) == b""  # closed, not answered: neither request arrived whole
            sock.close()
    finally:
        server.stop()


def test_a_request_the_drain_cuts_short_gets_a_503_to_retry_and_the_process_exits_0():
    server = ServerProcess("--preset", "tiny-sd", "--no-compile", "--sizes", "32", "--steps", "2", "--max-steps",
                           "900", "--max-delay-ms", "0", "--drain-seconds", "1")  # 1 s; the work ~25 s on 2 cores
    try:
        steps = server.metrics()['fastcache_unet_steps_total{path="full"}']
        answer = {}

        def in_flight():
            answer["response"] = httpx.post(f"{server.url}{GENERATIONS}", timeout=120,
                                            json={"prompt": "cut short", "num_inference_steps": 900})

        thread = threading.Thread(target=in_flight)
        thread.start()
        wait_until(lambda: server.metrics()['fastcache_unet_steps_total{path="full"}'] > steps, 120,
                   "the generation in flight")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0, server.output()
        thread.join(30)
        response = answer["response"]
        error = assert_error(response.status_code, response.content, 503)
        assert error["code"] == "shutting_down" and response.headers["retry-after"] == "1"
        assert "drain of 1 s ended" in error["message"]
        assert "Exception in ASGI application" not in server.output()
    finally:
        server.stop()
