"""Seeded malformed requests for ``fastcache serve``: generations (JSON and raw HTTP) and edits (multipart uploads).

Every case is invalid in at least one way a client can get wrong (a type, a range, an encoding, a header, an upload,
JSON nested thousands deep, a key in the query string instead of the header), so a correct server answers each with
a 4xx in its one error format, in bounded time, and keeps serving. The cases
are drawn from a ``random.Random``: the same seed gives the same cases. ``bench/serve_faults.py fuzz`` runs them
against a launched server; ``tests/test_edge.py`` runs a share of them.

``idle_flood`` measures what idle connections do to everyone else (what a schema cannot express either):

    python bench/serve_fuzz.py idle-flood --port 8000 --count 600            # 600 idle connections from 127.0.0.2
    python bench/serve_fuzz.py idle-flood --port 8000 --count 600 --spread   # from 600 loopback addresses
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import selectors
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from fastcache.serving.errors import ErrorResponse

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
FIELDS = ("prompt", "n", "size", "response_format", "negative_prompt", "num_inference_steps", "guidance_scale",
          "seed", "model", "user")
WRONG_TYPES = {  # per field: values of a type it does not take (None only where the field is required)
    "str": [5, 1.5, True, [], ["x"], {"a": 1}], "opt_str": [5, 1.5, False, [], {}],
    "int": ["2", 1.5, 2.5, True, [1], {"n": 1}], "opt_int": ["7", 0.5, False, [], {}],  # 2.0 is an integer in JSON
    "float": ["7.5", True, [7.5], {}, None],
}
FIELD_KIND = {"prompt": "str", "response_format": "str", "negative_prompt": "str", "size": "opt_str",
              "model": "opt_str", "user": "opt_str", "n": "int", "num_inference_steps": "opt_int", "seed": "opt_int",
              "guidance_scale": "float"}
# for a server of size 32x32 only, batch sizes up to 2, at most 8 steps, guidance on only, its own cache level only
BAD_NUMBERS = {"n": [0, -1, 3, 10**30, -(10**30)], "num_inference_steps": [0, -1, 9, 10**40],
               "seed": [-1, 2**63, 10**40, -(10**40)], "guidance_scale": [-0.5, 50.5, 1e308, -1e308, 1.0, 0.0],
               "size": ["0x0", "99999x99999", "64x64", "32x33", "32", "x", "", "32x32x32", "-32x32", "３２x32"]}
# edits' form fields arrive as text: values no server of that kind takes (an empty text would mean "the default")
BAD_FORM_VALUES = {"n": ["0", "-1", "3", "abc", "1e3", "9" * 30], "strength": ["0", "-0.5", "1.5", "nan", "inf", "x"],
                   "num_inference_steps": ["0", "9", "-3", "x", "2.5"],
                   "guidance_scale": ["-1", "51", "nan", "inf", "1", "0.5", "x"],
                   "seed": ["-1", str(2**63), "x", "1.5"], "size": ["64x64", "x", "32x33", "0x0", "３２x32", "9" * 40],
                   "cache": ["{bad", '{"interval": 7}', '{"interval": 1}', '{"interval": "x"}', "5", "[]",
                             '{"interval": 3, "x": 1}'],
                   "response_format": ["url", "png"], "resize": ["maybe", "2"], "prompt": [" ", "x" * 10_001],
                   "negative_prompt": ["y" * 10_001],
                   "lora": ["[" * 2_000, '{"a":' * 2_000, "[" * 40 + "]" * 40, '[{"name": 5}]'],
                   "strenght": ["0.5"], "stength": ["0.1"], "nn": ["2"]}  # misspelt fields: refused, not ignored


def _valid(rng: random.Random) -> dict:
    return {"prompt": rng.choice(["a cat", "x", "ünïcode ☃"]), "n": rng.choice([1, 2]), "seed": rng.randrange(1000)}


def generation_cases(rng: random.Random, count: int, key: str, max_body: int) -> list[tuple[str, object]]:
    """``count`` malformed generations for a server with API key ``key`` and a body limit of ``max_body`` bytes:
    ("http", (method, path, headers, body)) or ("raw", bytes)."""
    auth = {"Authorization": f"Bearer {key}"}
    json_type = {"Content-Type": "application/json"}

    def http(body: bytes, headers=None, method="POST", path=GENERATIONS):
        return "http", (method, path, {**auth, **json_type, **(headers or {})}, body)

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
        depth = rng.choice([33, 50, 900, 958, 959, 961, 964, 965, 2_000, 5_000, 100_000])
        inner = rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
        where = rng.choice(["prompt", "lora", "cache", "whole"])
        return http((inner if where == "whole" else f'{{"prompt": "x", "{where}": {inner}}}').encode())

    def key_in_query():
        name = rng.choice(["api_key", "key", "access_token"])
        return "http", ("POST", f"{GENERATIONS}?{name}={key}", json_type, encoded(_valid(rng)))

    def wrong_content_type():
        kind = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b",
                           "application/xml", "image/png", None])
        return "http", ("POST", GENERATIONS, {**auth, **({"Content-Type": kind} if kind else {})},
                        encoded(_valid(rng)))

    def unknown_field():
        name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(1, 12)))
        name = name if name not in FIELDS else name + "_x"
        return http(encoded({**_valid(rng), name: rng.choice([1, "x", None, [], {}])}))

    def gzip_body():
        garbage = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        return http(b"\x1f\x8b\x08\x00" + garbage, {"Content-Encoding": "gzip"})

    def no_or_wrong_key():
        headers = rng.choice([{}, {"Authorization": "Bearer nope"}, {"Authorization": key}])
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
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(max_body + 1).encode()
            + b"\r\n\r\n",
            b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
        ])
        return "raw", head

    kinds = [wrong_type, bad_number, not_finite, not_utf8, truncated, nested, wrong_content_type, unknown_field,
             gzip_body, no_or_wrong_key, routing, bad_text, raw, key_in_query]
    return [kinds[i % len(kinds)]() for i in range(count)]


def picture(side: int, seed: int, kind: str = "PNG", mode: str = "RGB") -> bytes:
    """An encoded ``side`` x ``side`` image of random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=kind)
    return buffer.getvalue()


def declaring(png: bytes, width: int, height: int) -> bytes:
    """``png`` with its header rewritten to declare ``width`` x ``height`` pixels (a decompression bomb's header)."""
    header = png[16:29]
    header = struct.pack(">II", width, height) + header[8:]
    return png[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + png[33:]


def edit_cases(rng: random.Random, count: int, key: str, max_body: int, size: int = 32,
               max_size: int = 64) -> list[tuple[str, object]]:
    """``count`` malformed edits for a server with API key ``key``, a body limit of ``max_body`` bytes, one served
    size ``size`` x ``size``, uploads up to ``max_size`` pixels a side, and ``BAD_NUMBERS``' other limits."""
    auth = {"Authorization": f"Bearer {key}"}

    def multipart(fields: dict, files: dict, headers=None, method="POST"):
        request = httpx.Request(method, f"http://x{EDITS}", data=fields, files=files, headers={**auth, **(headers or
                                                                                                        {})})
        return "http", (method, EDITS, dict(request.headers), request.read())

    def valid() -> tuple[dict, dict]:
        fields = {"prompt": rng.choice(["a cat", "x", "ünïcode ☃"]), "seed": str(rng.randrange(1000))}
        files = {"image": ("image.png", picture(size, rng.randrange(1000)), "image/png")}
        if rng.random() < 0.5:
            files["mask"] = ("mask.png", picture(size, rng.randrange(1000), mode="L"), "image/png")
        return fields, files

    def bad_field():
        fields, files = valid()
        name = rng.choice(sorted(BAD_FORM_VALUES))
        return multipart({**fields, name: rng.choice(BAD_FORM_VALUES[name])}, files)

    def bad_image():
        fields, files = valid()
        good = picture(size, rng.randrange(1000))
        data = rng.choice([
            b"", bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))), good[:rng.randrange(8, len(good))],
            picture(size, 1, "GIF"), picture(size, 2, "BMP"), picture(size, 3, "TIFF"),
            declaring(good, 100_000, 100_000), declaring(good, max_size + 1, size), declaring(good, 0, size),
            picture(max_size + 16, 4), picture(size + 16, 5),  # too large; another size, without resize
            b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b"GIF89a" + b"\0" * 20, b"\xff\xd8\xff" + b"\0" * 40,
        ])
        return multipart(fields, {**files, "image": ("image.png", data, "image/png")})

    def bad_mask():
        fields, files = valid()
        data = rng.choice([b"", b"not a mask", picture(size + 16, 6, mode="L"), picture(size // 2, 7),
                           declaring(picture(size, 8), 50_000, 50_000)])
        return multipart(fields, {**files, "mask": ("mask.png", data, "image/png")})

    def missing():
        fields, files = valid()
        if rng.random() < 0.5:
            return multipart(fields, {k: v for k, v in files.items() if k != "image"})  # no image
        return multipart({k: v for k, v in fields.items() if k != "prompt"}, files)  # no prompt

    def image_as_text():
        fields, _ = valid()
        return multipart({**fields, "image": "not a file"}, {"mask": ("mask.png", picture(size, 9), "image/png")})

    def wrong_body():
        fields, _ = valid()
        kind = rng.choice(["json", "form", "garbage", "boundary"])
        if kind == "json":
            return "http", ("POST", EDITS, {**auth, "Content-Type": "application/json"}, json.dumps(fields).encode())
        if kind == "form":
            return "http", ("POST", EDITS, {**auth, "Content-Type": "application/x-www-form-urlencoded"},
                            "&".join(f"{k}=x" for k in fields).encode())
        if kind == "garbage":
            return "http", ("POST", EDITS, {**auth, "Content-Type": "multipart/form-data; boundary=zz"},
                            bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))))
        return "http", ("POST", EDITS, {**auth, "Content-Type": "multipart/form-data"}, b"--zz\r\n\r\n--zz--\r\n")

    def no_or_wrong_key():
        fields, files = valid()
        _, (method, path, headers, body) = multipart(fields, files)
        headers.pop("authorization")
        if rng.random() < 0.5:
            headers["authorization"] = rng.choice(["Bearer nope", key, f"Basic {key}"])
        return "http", (method, path, headers, body)

    def too_large():
        fields, files = valid()
        padded = files["image"][1] + b"\0" * (max_body + 1)
        return multipart(fields, {**files, "image": ("image.png", padded, "image/png")})

    def wrong_method():
        return "http", (rng.choice(["GET", "PUT", "DELETE"]), EDITS, auth, b"")

    def not_utf8_text():
        fields, files = valid()
        _, (method, path, headers, body) = multipart({**fields, "prompt": "PROMPT"}, files)
        broken = rng.choice([b"\xff", b"a\xc3\x28", b"\xed\xa0\x80"])  # a lone byte, a bad pair, a surrogate
        headers = {name: value for name, value in headers.items() if name.lower() != "content-length"}
        return "http", (method, path, headers, body.replace(b"PROMPT", broken))

    def no_step_left():  # int(steps * strength) == 0: BAD_NUMBERS' servers run 2 or more steps, at most 8
        fields, files = valid()
        steps = rng.choice([2, 4, 8])
        strength = rng.choice([0.01, 0.1, 0.9 / steps])
        return multipart({**fields, "num_inference_steps": str(steps), "strength": f"{strength:.4f}"}, files)

    kinds = [bad_field, bad_field, bad_image, bad_image, bad_mask, missing, image_as_text, wrong_body,
             no_or_wrong_key, too_large, wrong_method, not_utf8_text, no_step_left]
    return [kinds[i % len(kinds)]() for i in range(count)]


def raw_exchange(port: int, data: bytes, wait: float, host: str = "127.0.0.1",
                 source: str | None = None) -> tuple[int | None, bytes, float]:
    """Send ``data`` on a new connection (from address ``source``, e.g. 127.0.0.2 on loopback) and read until the
    server closes it (at most ``wait`` seconds): the status (None if nothing came), the body of the first answer, and
    the seconds it took; ``AssertionError`` if the connection stays open."""
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=wait,
                                  source_address=(source, 0) if source else None) as sock:
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
    for line in head.split(b"\r\n")[1:]:  # the first answer's body only (pipelined garbage may get a second one)
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            body = body[:int(value)]
    return int(head.split(b" ", 2)[1]), body, seconds


def error_of(body: bytes) -> dict | None:
    """The ``error`` object of ``body`` if it is the server's one error format (``errors.ErrorResponse``: a message of
    at most 400 characters, a type, a code), else ``None``."""
    try:
        return ErrorResponse.model_validate_json(body).error.model_dump()
    except ValueError:
        return None


def run_cases(url: str, port: int, cases: list, wait: float) -> list[dict]:
    """Send every case (one connection each for raw ones), each answer bounded by ``wait`` seconds: per case its
    index, kind, status, seconds, error code, and whether the answer was a 4xx in the one format within ``wait``."""
    outcomes = []
    with httpx.Client(base_url=url, timeout=wait) as client:
        for index, (kind, request) in enumerate(cases):
            try:
                if kind == "raw":
                    status, body, seconds = raw_exchange(port, request, wait)
                else:
                    method, path, headers, content = request
                    start = time.monotonic()
                    response = client.request(method, path, headers=headers, content=content)
                    status, body, seconds = response.status_code, response.content, time.monotonic() - start
            except (AssertionError, httpx.HTTPError) as error:
                status, body, seconds = None, repr(error).encode(), wait
            error = error_of(body)
            ok = status is not None and 400 <= status < 500 and seconds < wait and error is not None
            outcomes.append(dict(index=index, kind=kind, status=status, seconds=round(seconds, 3), ok=ok,
                                 code=error["code"] if error else None,
                                 request=str(request)[:200], answer=body[:200].decode(errors="replace")))
    return outcomes


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
GENERATION = {"prompt": "a red fox", "num_inference_steps": 4}  # a normal request, small, at the served size


def generation_seconds(port: int, source: str, api_key: str | None, wait: float = 120.0) -> tuple[int | None, float]:
    """One normal generation from ``source``: its status (None if it failed to connect or timed out) and seconds."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.monotonic()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=wait) as client:
            status = client.post(f"http://127.0.0.1:{port}{GENERATIONS}", json=GENERATION, headers=headers).status_code
    except httpx.HTTPError:
        status = None
    return status, round(time.monotonic() - start, 3)


def _generate_into(result: dict, port: int, source: str, api_key: str | None) -> None:
    result["status"], result["seconds"] = generation_seconds(port, source, api_key)


def idle_flood(port: int, count: int, sources: list[str], watch: float, host: str = "127.0.0.1",
               probe_source: str = "127.0.0.1", probe_every: float = 0.25, api_key: str | None = None,
               generate_at: float = 1.0) -> dict:
    """Open ``count`` connections that send nothing, from ``sources`` in turn (loopback addresses: Linux routes all of
    127.0.0.0/8 here), then for ``watch`` seconds probe ``GET /health`` from ``probe_source`` (another client) and
    watch the idle ones: how many the server held and for how long, what it answered the others, and what the other
    client got and for how long it was kept out. One normal generation from ``probe_source`` before the flood and
    one ``generate_at`` seconds into the watch give the latency of a real request without and with the flood."""
    before = generation_seconds(port, probe_source, api_key)
    selector, opened, flood = selectors.DefaultSelector(), {}, time.monotonic()
    for i in range(count):
        try:
            sock = socket.create_connection((host, port), timeout=5, source_address=(sources[i % len(sources)], 0))
        except OSError as error:
            opened[f"failed {i}"] = {"error": str(error)}
            continue
        sock.setblocking(False)
        opened[sock] = {"answer": b"", "closed": None}
        selector.register(sock, selectors.EVENT_READ)
    opening_seconds = round(time.monotonic() - flood, 3)
    probes, start, during = [], time.monotonic(), None
    next_probe = start
    while (now := time.monotonic()) - start < watch:
        if during is None and now - start >= generate_at:  # in a thread: the idle ones are watched meanwhile
            during = {"at": round(now - start, 2)}
            worker = threading.Thread(target=_generate_into, args=(during, port, probe_source, api_key), daemon=True)
            worker.start()
        for key, _ in selector.select(timeout=max(0.0, min(0.05, next_probe - now))):
            state = opened[key.fileobj]
            try:
                chunk = key.fileobj.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                chunk = b""
            state["answer"] += chunk
            if not chunk:
                state["closed"] = time.monotonic() - flood
                selector.unregister(key.fileobj)
        if time.monotonic() >= next_probe:
            try:
                status, _, seconds = raw_exchange(port, HEALTH, 10, host, probe_source)
            except (AssertionError, OSError):
                status, seconds = None, 10.0
            probes.append((round(time.monotonic() - start, 2), status, round(seconds, 3)))
            next_probe = time.monotonic() + probe_every
    if during is not None:
        worker.join(timeout=120)  # bounded: generation_seconds waits at most 120 s
    for sock in opened:
        if isinstance(sock, socket.socket):
            sock.close()
    states = [state for state in opened.values() if "answer" in state]
    answered = Counter(state["answer"].split(b" ", 2)[1].decode() if state["answer"] else "none"
                       for state in states)
    held = [state for state in states if not state["answer"]]
    held_closed = [state["closed"] for state in held if state["closed"] is not None]
    kept_out = [t for t, status, _ in probes if status != 200]
    return {"idle connections": count, "sources": len(set(sources)), "watched seconds": watch,
            "seconds to open them": opening_seconds,
            "connect failures": sum(1 for key in opened if isinstance(key, str)),
            "answers to the idle ones": dict(answered),  # 'none': held open without an answer
            "held": len(held), "held closed by the server": len(held_closed),
            "held for seconds (max)": round(max(held_closed), 2) if held_closed else None,
            "other client: probes": len(probes), "other client: 200": sum(1 for _, s, _ in probes if s == 200),
            "other client: statuses": dict(Counter(str(status) for _, status, _ in probes)),
            "other client: kept out for seconds": round(max(kept_out), 2) if kept_out else 0.0,
            "other client: slowest answer seconds": max((s for _, _, s in probes), default=None),
            "other client: health median seconds": (sorted(s for _, _, s in probes)[len(probes) // 2]
                                                    if probes else None),
            "generation before the flood (status, seconds)": list(before),
            "generation during the flood": during}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="idle connections against a running fastcache serve (loopback)")
    parser.add_argument("what", choices=["idle-flood"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--spread", action="store_true", help="one loopback address per connection (127.0.1.1, ...)")
    parser.add_argument("--watch", type=float, default=40.0, help="seconds to watch (longer than the timeouts)")
    parser.add_argument("--label", default="", help="a name for this run in the output files")
    parser.add_argument("--api-key", default=None, help="the server's API key, if it has one (for the generations)")
    parser.add_argument("--note", default="", help="what was measured (the server's command line, its version)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    sources = ([f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(args.count)] if args.spread else ["127.0.0.2"])
    figures = {"note": args.note, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
               **idle_flood(args.port, args.count, sources, args.watch, api_key=args.api_key)}
    name = f"serve_idle_flood{'_spread' if args.spread else ''}{'_' + args.label if args.label else ''}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=1) + "\n")
    (out / f"{name}.md").write_text("| figure | value |\n|---|---|\n" + "".join(
        f"| {key} | {value} |\n" for key, value in figures.items()))
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
