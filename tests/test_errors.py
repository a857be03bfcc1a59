"""FastAPI's and Starlette's own errors in the one format (in-process app, no model): routing, body parsing,
validation with the server's field rules, and an unexpected exception, logged once."""

import json
import logging

import httpx
import pytest
from conftest import app_in_thread, assert_error, wait_until
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from fastcache.serving import errors


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    n: StrictInt = 1


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    errors.install(app)
    app.state.field_rules = {"prompt": "a non-empty string", "n": "an integer between 1 and 4"}

    @app.post("/v1/things")
    async def things(body: Body):
        return {"ok": body.n}

    @app.get("/v1/fails")
    async def fails():
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def post(client, content: bytes, content_type: str | None = "application/json"):
    return client.post("/v1/things", content=content, headers={"Content-Type": content_type} if content_type else {})


def test_routing_errors_name_the_endpoints(client):
    missing = client.get("/v1/nothing")
    assert "POST /v1/things" in assert_error(missing.status_code, missing.content, 404)["message"]
    wrong = client.get("/v1/things")
    error = assert_error(wrong.status_code, wrong.content, 405)
    assert "use POST" in error["message"] and wrong.headers["allow"] == "POST"


@pytest.mark.parametrize("content, content_type, message, code", [
    (b'{"prompt": "\xff"}', "application/json", "not valid UTF-8", "invalid_json"),
    (b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}", "application/json", "number too long", "invalid_json"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", "nested too deeply", "invalid_json"),
    (b'{"prompt": "x"', "application/json", "not valid JSON", "invalid_json"),
    (b"\x1f\x8b\x08\x00garbage", "application/json", "not valid UTF-8", "invalid_json"),
    (b'{"prompt": "x"}', "text/plain", "Content-Type: application/json (got text/plain)", "invalid_body"),
    (b'{"prompt": "x"}', None, "Content-Type: application/json (got none)", "invalid_body"),
    (b"[1, 2]", "application/json", "must be a JSON object", "invalid_body"),
    (b"", "application/json", "must be a JSON object", "invalid_body"),
])
def test_bodies_that_cannot_be_read_get_400(client, content, content_type, message, code):
    response = post(client, content, content_type)
    error = assert_error(response.status_code, response.content, 400)
    assert message in error["message"] and error["code"] == code
    assert "9999" not in error["message"]  # the body is not echoed


def test_validation_names_what_is_valid_on_this_server(client):
    wrong = assert_error(*_status_body(post(client, json.dumps({"prompt": "x", "n": "2"}).encode())), 400)
    assert wrong["param"] == "n" and "n must be an integer between 1 and 4" in wrong["message"]
    unknown = assert_error(*_status_body(post(client, json.dumps({"prompt": "x", "nn": 2}).encode())), 400)
    assert unknown["code"] == "unknown_field" and "'nn' is not a field" in unknown["message"]
    assert "(did you mean 'n'?); it has 2 fields (prompt, n)." in unknown["message"]
    missing = assert_error(*_status_body(post(client, b"{}")), 400)
    assert missing["param"] == "prompt" and "prompt must be a non-empty string (field required)" in missing["message"]


def test_an_unexpected_exception_is_a_500_that_names_only_its_type(client):
    response = client.get("/v1/fails")
    error = assert_error(response.status_code, response.content, 500)
    assert error["message"] == "internal error: RuntimeError" and error["type"] == "server_error"


class _Tracebacks(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.logged: list[str] = []

    def emit(self, record):
        if record.exc_info:
            self.logged.append(f"{record.name}: {record.getMessage()}")


def test_an_unexpected_exception_is_logged_once_not_again_by_the_server():
    app = FastAPI()
    errors.install(app)

    @app.get("/ready")
    async def ready():
        return {"status": "ready"}

    @app.get("/v1/fails")
    async def fails():
        raise RuntimeError("a bug")

    tracebacks = _Tracebacks()
    # after uvicorn configured its loggers, which drops their handlers; its loggers stop at "uvicorn"
    loggers = [logging.getLogger(name) for name in ("uvicorn", "")]
    with app_in_thread(app, timeout=60) as url:
        for logger in loggers:
            logger.addHandler(tracebacks)
        try:
            response = httpx.get(f"{url}/v1/fails", timeout=30)
            try:  # the server logs what escapes the app after the answer is sent: give it the time to
                wait_until(lambda: len(tracebacks.logged) > 1, 2, "a second traceback")
            except TimeoutError:
                pass
        finally:
            for logger in loggers:
                logger.removeHandler(tracebacks)
    assert_error(response.status_code, response.content, 500)
    assert tracebacks.logged == ["fastcache.serving.errors: fastcache: GET /v1/fails failed"]


def test_many_invalid_fields_are_counted_within_the_bound():
    app = FastAPI()
    errors.install(app)
    app.state.field_rules = {name: f"the rule of field {name}, " + "long " * 30 for name in ("prompt", "n")}

    class Wide(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: StrictStr
        n: StrictInt = 1

    @app.post("/v1/wide")
    async def wide(body: Wide):
        return {}

    response = TestClient(app).post("/v1/wide", json={"prompt": 1, "n": "x", **{f"x{i}": i for i in range(50)}})
    error = assert_error(response.status_code, response.content, 400)
    assert error["message"].startswith("invalid request: 50 fields (e.g. 'x0', 'x1', 'x2') are not fields")
    assert error["message"].endswith("more.") and error["code"] == "unknown_field"




def _status_body(response):
    return response.status_code, response.content
