"""API keys as an ASGI layer (in-process, no model): who gets through, what a refusal says, which keys are accepted."""

import asyncio

import httpx
import pytest
from conftest import assert_error

from fastcache.serving.auth import ApiKeys, is_loopback, key_problem, keys_from_env


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _get(app, path: str, authorization: str | None = None) -> httpx.Response:
    async def go():
        headers = {"Authorization": authorization} if authorization is not None else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(go())


def test_without_keys_everything_passes():
    assert _get(ApiKeys(_ok, keys=()), "/v1/models").status_code == 200


@pytest.mark.parametrize("authorization, code", [
    (None, "missing_api_key"), ("", "missing_api_key"), ("Bearer", "missing_api_key"), ("Bearer   ", "missing_api_key"),
    ("Basic sk-first-key", "missing_api_key"), ("sk-first-key", "missing_api_key"),
    ("Bearer sk-first-ke", "invalid_api_key"), ("Bearer sk-first-key2", "invalid_api_key"),
    ("Bearer SK-FIRST-KEY", "invalid_api_key"),
])
def test_a_missing_or_wrong_key_gets_401_without_echoing_it(authorization, code):
    response = _get(ApiKeys(_ok, keys=("sk-first-key", "sk-second-key")), "/anything", authorization)
    error = assert_error(response.status_code, response.content, 401)
    assert error["code"] == code and response.headers["www-authenticate"] == "Bearer"
    assert "sk-" not in response.text


def test_every_key_is_accepted_and_open_paths_need_none():
    app = ApiKeys(_ok, keys=("sk-first-key", "sk-second-key"), open_paths=("/health", "/ready", "/metrics"))
    for authorization in ("Bearer sk-first-key", "bearer sk-second-key", "  Bearer   sk-second-key  "):
        assert _get(app, "/v1/models", authorization).status_code == 200
    for path in ("/health", "/ready", "/metrics"):
        assert _get(app, path).status_code == 200
    assert _get(app, "/health/").status_code == 401  # only the exact paths are open


@pytest.mark.parametrize("key", ["", "has space", "a,b", "tab\there", "ünï", "k" * 257, 5])
def test_a_bad_key_is_named_by_its_position_only(key):
    problem = key_problem(["good-key", key])
    assert problem and "key 2" in problem and (not isinstance(key, str) or not key or key not in problem)


def test_keys_from_the_environment_are_comma_separated():
    assert keys_from_env({"FASTCACHE_API_KEY": " sk-a, sk-b,,sk-c "}) == ("sk-a", "sk-b", "sk-c")
    assert keys_from_env({}) == ()


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                            ("no-such-host.invalid", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback
