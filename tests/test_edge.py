"""The HTTP edge of a real ``fastcache serve`` on 127.0.0.1: API keys, slow and broken clients, the connection cap,
SIGTERM with a stalled client, and a seeded fuzz of malformed requests. Every socket has a timeout; the servers are
this module's own processes, stopped by their pid."""

import json
import random
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import HOST, ServerProcess, assert_error, png_array, wait_until

from fastcache.serving.edge import EdgeConfig

KEY, ENV_KEY = "sk-edge-test-4f9a1c", "sk-from-environment-77b2"  # one by --api-key, one by FASTCACHE_API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT, KEEP_ALIVE, MAX_CONNECTIONS, MAX_BODY = 3.0, 1.0, 8, 2**20
GENERATIONS = "/v1/images/generations"
FIELDS = ("prompt", "n", "size", "response_format", "negative_prompt", "num_inference_steps", "guidance_scale",
          "seed", "model", "user")


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--preset", "tiny-sd", "--no-compile", "--sizes", "32", "--batch-sizes", "1,2", "--steps",
                           "2", "--max-steps", "8", "--max-delay-ms", "0", "--api-key", KEY, "--read-timeout",
                           str(READ_TIMEOUT), "--keep-alive-timeout", str(KEEP_ALIVE), "--max-connections",
                           str(MAX_CONNECTIONS), "--max-body-mb", "1", env={"FASTCACHE_API_KEY": ENV_KEY},
                           headers=AUTH)
    yield server
    server.stop()


@pytest.mark.parametrize("fields, message", [
    ({"read_timeout": 0}, "read_timeout must be a finite number from 0.1 to 3600"),
    ({"read_timeout": float("inf")}, "read_timeout must be a finite number"),
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


def raw_exchange(port: int, data: bytes, wait: float = READ_TIMEOUT + 2) -> tuple[int | None, bytes, float]:
    """Send ``data`` on a new connection and read until the server closes it (at most ``wait`` seconds): the status
    (None if nothing came), the body, and the seconds it took."""
    start = time.monotonic()
    with socket.create_connection((HOST, port), timeout=wait) as sock:
        try:
            sock.sendall(data)
        except OSError:  # the server may answer and close before a long request is written
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            raise AssertionError(f"no close within {wait} s; got {received[:200]!r}") from None
        except ConnectionResetError:
            pass
    seconds = time.monotonic() - start
    if not received:
        return None, b"", seconds
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, seconds


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
    cases = {  # name: (request, the status expected, whether it must come at once)
        "short body": ((head + "Content-Length: 100\r\n\r\n").encode() + b"{" * 50, 408, False),
        "huge length": ((head + "Content-Length: 18446744073709551616\r\n\r\n").encode(), 413, True),
        "endless head": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 4096, 408, False),
        "nothing sent": (b"", None, False),
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
    for name, (_, status, at_once) in cases.items():
        assert isinstance(results[name], tuple), (name, results[name])
        got, body, seconds = results[name]
        assert got == status, (name, got, body)
        assert seconds < (1.0 if at_once else READ_TIMEOUT + 1.0), (name, seconds)
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


def test_connections_over_the_cap_are_refused_with_a_503(server):
    held = [socket.create_connection((HOST, server.port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # the server has taken them all
        status, body, seconds = raw_exchange(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        error = assert_error(status, body, 503)
        assert error["code"] == "too_many_connections" and seconds < 2
        held[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")  # the connections it holds are served
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 200, 10, "a connection after the cap")


# -- the fuzz ----------------------------------------------------------------------------------------------------

def _valid(rng: random.Random) -> dict:
    return {"prompt": rng.choice(["a cat", "x", "ünïcode ☃"]), "n": rng.choice([1, 2]), "seed": rng.randrange(1000)}


WRONG_TYPES = {  # per field: values of a type it does not take (None only where the field is required)
    "str": [5, 1.5, True, [], ["x"], {"a": 1}], "opt_str": [5, 1.5, False, [], {}],
    "int": ["2", 1.5, 2.0, True, [1], {"n": 1}], "opt_int": ["7", 0.5, False, [], {}],
    "float": ["7.5", True, [7.5], {}, None],
}
FIELD_KIND = {"prompt": "str", "response_format": "str", "negative_prompt": "str", "size": "opt_str",
              "model": "opt_str", "user": "opt_str", "n": "int", "num_inference_steps": "opt_int", "seed": "opt_int",
              "guidance_scale": "float"}
BAD_NUMBERS = {"n": [0, -1, 3, 10**30, -(10**30)], "num_inference_steps": [0, -1, 9, 10**40],
               "seed": [-1, 2**63, 10**40, -(10**40)], "guidance_scale": [-0.5, 50.5, 1e308, -1e308, 1.0, 0.0],
               "size": ["0x0", "99999x99999", "64x64", "32x33", "32", "x", "", "32x32x32", "-32x32", "３２x32"]}


def fuzz_cases(rng: random.Random, count: int) -> list[tuple[str, object]]:
    """``count`` malformed requests: ("http", (method, path, headers, body)) or ("raw", bytes)."""
    json_type = {"Content-Type": "application/json"}

    def http(body: bytes, headers=None, method="POST", path=GENERATIONS, auth=True):
        return "http", (method, path, {**(AUTH if auth else {}), **json_type, **(headers or {})}, body)

    def encoded(body) -> bytes:
        return json.dumps(body).encode()

    def wrong_type():
        field = rng.choice(FIELDS)
        return http(encoded({**_valid(rng), field: rng.choice(WRONG_TYPES[FIELD_KIND[field]])}))

    def bad_number():
        field = rng.choice(sorted(BAD_NUMBERS))
        return http(encoded({**_valid(rng), field: rng.choice(BAD_NUMBERS[field])}))

    def not_finite():
        literal = rng.choice(["NaN", "Infinity", "-Infinity"])
        return http(f'{{"prompt": "x", "guidance_scale": {literal}}}'.encode())

    def not_utf8():
        text = encoded(_valid(rng))
        cut = text.index(b'"prompt": "') + 11
        return http(text[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88"])
                    + text[cut:])

    def truncated():
        text = encoded(_valid(rng))
        return http(text[:rng.randrange(len(text))])

    def nested():
        depth = rng.choice([50, 2_000, 100_000])
        inner = "[" * depth + "]" * depth
        return http((f'{{"prompt": {inner}}}' if rng.random() < 0.5 else inner).encode())

    def wrong_content_type():
        kind = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b",
                           "application/xml", "image/png", None])
        return "http", ("POST", GENERATIONS, {**AUTH, **({"Content-Type": kind} if kind else {})},
                        encoded(_valid(rng)))

    def unknown_field():
        name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(1, 12)))
        name = name if name not in FIELDS else name + "_x"
        return http(encoded({**_valid(rng), name: rng.choice([1, "x", None, [], {}])}))

    def gzip_body():
        garbage = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        return http(b"\x1f\x8b\x08\x00" + garbage, {"Content-Encoding": "gzip"})

    def no_or_wrong_key():
        headers = rng.choice([{}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}])
        return "http", ("POST", GENERATIONS, {**json_type, **headers}, encoded(_valid(rng)))

    def routing():
        if rng.random() < 0.5:
            return http(b"", method=rng.choice(["GET", "PUT", "DELETE", "PATCH"]))
        return http(encoded(_valid(rng)), path=rng.choice(["/v1/images/edit", "/v1/images", "/v2/x", "/v1/models/x"]))

    def bad_text():
        field = rng.choice(["prompt", "negative_prompt"])
        value = rng.choice(["", "   ", "x" * 10_001, "\ud800"]) if field == "prompt" else rng.choice(
            ["y" * 10_001, "\udfff"])
        return http(encoded({**_valid(rng), field: value}))

    def raw():
        head = rng.choice([
            b"GARBAGE\r\n\r\n", bytes(rng.randrange(256) for _ in range(40)) + b"\r\n\r\n",
            b"G(T /health HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /health HTTP/1.1\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(MAX_BODY + 1).encode()
            + b"\r\n\r\n",
            b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
        ])
        return "raw", head

    kinds = [wrong_type, bad_number, not_finite, not_utf8, truncated, nested, wrong_content_type, unknown_field,
             gzip_body, no_or_wrong_key, routing, bad_text, raw]
    return [kinds[i % len(kinds)]() for i in range(count)]


def test_a_seeded_fuzz_of_malformed_requests_gets_4xx_in_one_format(server):
    reference = generate(server, {"prompt": "the same before and after", "seed": 11})
    assert reference.status_code == 200
    cases = fuzz_cases(random.Random(18), 325)
    failures = []
    with httpx.Client(base_url=server.url, timeout=READ_TIMEOUT + 2) as client:
        for index, (kind, request) in enumerate(cases):
            if kind == "raw":
                status, body, seconds = raw_exchange(server.port, request)
            else:
                method, path, headers, content = request
                start = time.monotonic()
                response = client.request(method, path, headers=headers, content=content)
                status, body, seconds = response.status_code, response.content, time.monotonic() - start
            try:
                assert status is not None and 400 <= status < 500 and seconds < READ_TIMEOUT
                assert_error(status, body)
            except (AssertionError, ValueError, KeyError):
                failures.append((index, kind, str(request)[:200], status, body[:200], round(seconds, 2)))
    assert not failures, failures[:10]
    assert server.proc.poll() is None and httpx.get(f"{server.url}/ready").status_code == 200
    again = generate(server, {"prompt": "the same before and after", "seed": 11})
    assert again.status_code == 200
    assert np.array_equal(png_array(again.json()["data"][0]["b64_json"]),
                          png_array(reference.json()["data"][0]["b64_json"]))


def test_keys_appear_in_no_log_metric_or_model_listing(server):
    generate(server, {"prompt": "logged?", "seed": 1})
    httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-wrong-key-in-a-log"})
    exposed = server.output() + httpx.get(f"{server.url}/metrics", headers=AUTH).text + httpx.get(
        f"{server.url}/v1/models", headers=AUTH).text
    for secret in (KEY, ENV_KEY, "sk-wrong-key-in-a-log"):
        assert secret not in exposed
    assert server.metrics()['fastcache_requests_total{status="401"}'] >= 1  # refused requests are counted


def test_sigterm_closes_a_stalled_client_at_once_and_finishes_the_work_in_flight():
    server = ServerProcess("--preset", "tiny-sd", "--no-compile", "--sizes", "32", "--steps", "2", "--max-steps",
                           "100", "--max-delay-ms", "0", "--drain-seconds", "30")  # read timeout: 30 s by default
    try:
        stalled = socket.create_connection((HOST, server.port), timeout=10)
        stalled.sendall(f"POST {GENERATIONS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        f"Content-Length: 100\r\n\r\n".encode() + b'{"prompt": ')
        half_head = socket.create_connection((HOST, server.port), timeout=10)
        half_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        steps = server.metrics()['fastcache_unet_steps_total{path="full"}']
        answer = {}

        def in_flight():
            answer["response"] = httpx.post(f"{server.url}{GENERATIONS}", timeout=120,
                                            json={"prompt": "in flight", "num_inference_steps": 100})
            answer["at"] = time.monotonic()

        thread = threading.Thread(target=in_flight)
        thread.start()
        wait_until(lambda: server.metrics()['fastcache_unet_steps_total{path="full"}'] > steps, 60,
                   "the generation in flight")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0, server.output()
        exited = time.monotonic()
        thread.join(30)
        assert answer["response"].status_code == 200  # the work in flight was finished ...
        assert exited - answer["at"] < 5.0  # ... and then the process exited, whatever the stalled clients do
        for sock in (stalled, half_head):
            assert sock.recv(65536) == b""  # closed, not answered: neither request arrived whole
            sock.close()
    finally:
        server.stop()
