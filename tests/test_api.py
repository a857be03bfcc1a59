"""The API's contract (in-process, tiny model, no warm-up): /openapi.json states this server's limits and its errors
in the one format; bodies nested too deep or with text fields that are not UTF-8 are refused before they are parsed."""

import asyncio
import json

import httpx
import pytest
from conftest import assert_error
from fastapi.testclient import TestClient

from fastcache import FastCacheConfig
from fastcache.serving.api import MAX_JSON_DEPTH, api_for, form_text_problem, json_depth
from fastcache.serving.edge import EdgeConfig
from fastcache.serving.engine import EngineConfig
from fastcache.serving.errors import MAX_MESSAGE_CHARS
from fastcache.serving.server import make_app
from fastcache.serving.service import Service, ServiceOptions

KEY = "sk-api-contract"
ENGINE = EngineConfig(sizes=((32, 32), (48, 32)), batch_sizes=(1, 2, 4), steps=2, max_steps=9, intervals=(1, 3),
                      guidance=(True,))


@pytest.fixture(scope="module")
def service():
    service = Service(ServiceOptions(cache=FastCacheConfig(interval=3, compile=False), engine=ENGINE))
    service.engine.ready.set()  # no warm-up: the contract does not need one, and no request here runs the model
    return service


def client(service, keys=()) -> TestClient:
    """A client of the app without its lifespan (no engine thread: every request here is refused before it)."""
    return TestClient(make_app(service, EdgeConfig(api_keys=keys), warm_up=False), raise_server_exceptions=False)


def document(service, keys=()) -> dict:
    response = client(service, keys).get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    return response.json()


def test_the_schema_states_this_servers_limits(service):
    schemas = document(service)["components"]["schemas"]
    body, form = schemas["GenerationBody"], schemas["EditForm"]
    for model in (body, form):
        fields = model["properties"]
        assert model["additionalProperties"] is False and "prompt" in model["required"]
        assert fields["prompt"]["maxLength"] == 10_000 and fields["prompt"]["pattern"] == r"\S"
        assert fields["n"]["maximum"] == 4 and fields["n"]["minimum"] == 1
        assert _variants(fields["size"])[0]["enum"] == ["32x32", "48x32"]
        assert _variants(fields["num_inference_steps"])[0]["maximum"] == 9
        assert _variants(fields["seed"])[0]["maximum"] == 2**63 - 1
        assert fields["guidance_scale"]["exclusiveMinimum"] == 1 and fields["guidance_scale"]["maximum"] == 50
        assert fields["response_format"]["const"] == "b64_json"
    assert schemas["CacheLevel"]["properties"]["interval"]["enum"] == [1, 3]
    strength = form["properties"]["strength"]
    assert (strength["type"], strength["exclusiveMinimum"], strength["maximum"]) == ("number", 0, 1)
    assert form["properties"]["image"]["contentMediaType"] == "application/octet-stream"
    assert set(form["required"]) == {"prompt", "image"}
    for name, field in form["properties"].items():  # a form has no null: an optional field is absent, not "null"
        assert "anyOf" not in field and field.get("type") != "null", name
    lora = body["properties"]["lora"]  # no adapters on this server: none, or an empty list
    assert lora["anyOf"] == [{"type": "array", "maxItems": 0}, {"type": "null"}]
    assert "none (this server serves no LoRA)" in lora["description"]


def test_the_schema_speaks_json_schema_and_integers_as_json_does(service):
    def keys(node):
        if isinstance(node, dict):
            yield from node
            for value in node.values():
                yield from keys(value)
        elif isinstance(node, list):
            for value in node:
                yield from keys(value)

    assert not {"ge", "le", "gt", "lt"} & set(keys(document(service)))  # pydantic's names, which no client reads
    body = api_for(ENGINE, levels=(1, 3)).generation
    taken = body.model_validate({"prompt": "x", "n": 2.0, "seed": 7.0, "num_inference_steps": 3.0,
                                 "cache": {"interval": 3.0}})  # JSON Schema's integers include 2.0
    assert (taken.n, taken.seed, taken.num_inference_steps, taken.cache.interval) == (2, 7, 3, 3)
    for wrong in ({"n": 1.5}, {"n": "2"}, {"n": True}, {"seed": "7"}, {"num_inference_steps": 10.0}):
        with pytest.raises(ValueError):
            body.model_validate({"prompt": "x", **wrong})


def _variants(field: dict) -> list[dict]:
    return [variant for variant in field.get("anyOf", [field]) if variant.get("type") != "null"]


def test_every_operation_answers_its_errors_in_the_one_format(service):
    spec = document(service)
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # validation errors are 400s, not 422s
    error_model = spec["components"]["schemas"]["ErrorResponse"]
    assert error_model["properties"]["error"]["$ref"] == "#/components/schemas/ErrorDetail"
    detail = spec["components"]["schemas"]["ErrorDetail"]["properties"]
    assert detail["message"]["maxLength"] == MAX_MESSAGE_CHARS
    assert set(spec["components"]["responses"]) == {"404", "405"}
    operations = {(method, path): operation for path, methods in spec["paths"].items()
                  for method, operation in methods.items()}
    assert set(operations) == {("post", "/v1/images/generations"), ("post", "/v1/images/edits"),
                               *((method, path) for method in ("get", "head")
                                 for path in ("/v1/models", "/health", "/ready", "/metrics"))}
    assert len({operation["operationId"] for operation in operations.values()}) == len(operations)
    for (method, path), operation in operations.items():
        responses = operation["responses"]
        assert "422" not in responses and "401" not in responses and "security" not in operation  # no keys
        assert {"400", "408", "413", "429", "431", "503"} <= set(responses), (method, path)
        for status, response in responses.items():
            if status != "200":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
    for path in ("/v1/images/generations", "/v1/images/edits"):
        assert {"415", "500"} <= set(operations["post", path]["responses"])
        assert "Retry-After" in operations["post", path]["responses"]["429"]["headers"]
    assert "multipart/form-data" in operations["post", "/v1/images/edits"]["requestBody"]["content"]


def test_with_keys_the_schema_says_which_operations_need_one(service):
    spec = document(service, keys=(KEY,))
    assert spec["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer",
                                                                "description": "one of the server's API keys"}}
    for path, methods in spec["paths"].items():
        for operation in methods.values():
            open_path = path in ("/health", "/ready")
            assert ("security" in operation) is not open_path and ("401" in operation["responses"]) is not open_path


@pytest.mark.parametrize("opener, closer", [("[", "]"), ('{"a":', "}")])
def test_json_depth_is_read_without_parsing_at_every_depth_to_5000(opener, closer):
    for depth in range(1, 5001):
        text = opener * depth + ("1" if opener != "[" else "") + closer * depth
        assert json_depth(text) == depth
        assert json_depth(opener * depth) == depth  # unclosed: as deep as it went
    assert json_depth('{"prompt": "[[[{{{", "n": 1}') == 1  # brackets in strings do not nest
    assert json_depth('{"p": "a\\"[[[", "q": [1]}') == 2  # an escaped quote does not end the string
    assert json_depth(b"") == 0 and json_depth(b"12") == 0


def test_nesting_is_bounded_before_anything_parses_it(service):
    http = client(service)
    for depth in (*range(1, 40), 100, 959, 962, 965, 2_000, 5_000):
        for opener, closer in (("[", "]"), ('{"a":', "}")):
            inner = opener * depth + ("1" if opener != "[" else "") + closer * depth
            # n is 0 in each: no request here reaches the engine
            for body in (f'{{"prompt": "x", "n": 0, "lora": {inner}}}', f'{{"prompt": "x", "nope": {inner}}}', inner):
                response = http.post("/v1/images/generations", content=body,
                                     headers={"Content-Type": "application/json"})
                error = assert_error(response.status_code, response.content, 400)
                too_deep = json_depth(body) > MAX_JSON_DEPTH
                assert ("levels deep" in error["message"]) is too_deep, (depth, body[:30], error)


def test_a_form_text_field_that_is_not_utf8_is_named():
    def body(prompt: bytes, negative: bytes = b"fine") -> bytes:
        return (b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n' + prompt +
                b'\r\n--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\xff\xfe\x00'
                b'\r\n--b\r\nContent-Disposition: form-data; name="negative_prompt"\r\n\r\n' + negative +
                b"\r\n--b--\r\n")

    kind = "multipart/form-data; boundary=b"
    assert form_text_problem(body("ünïcode ☃".encode()), kind) is None  # a file's bytes are not text
    assert form_text_problem(body(b"\xff"), kind) == ("prompt must be valid UTF-8 text (the form field is not).",
                                                      "prompt")
    assert form_text_problem(body(b"a", b"\xed\xa0\x80"), kind)[1] == "negative_prompt"  # a surrogate's bytes
    assert form_text_problem(b"garbage", kind) is None  # left to Starlette's parser, which says it is broken
    assert form_text_problem(body(b"\xff"), "multipart/form-data") is None  # no boundary: idem


def test_the_models_of_a_server_follow_its_configuration():
    on_demand = api_for(EngineConfig(on_demand=True, guidance=(True, False)), levels=())
    size = on_demand.generation.model_json_schema()["properties"]["size"]
    assert _variants(size)[0]["pattern"] == r"^[0-9]{1,5}x[0-9]{1,5}$"
    guidance = on_demand.generation.model_json_schema()["properties"]["guidance_scale"]
    assert guidance["minimum"] == 0 and guidance["maximum"] == 50
    off = api_for(EngineConfig(guidance=(False,)), levels=(2,))
    assert off.generation.model_json_schema()["properties"]["guidance_scale"]["maximum"] == 1
    assert "one of the served levels (2)" in off.rules["cache"]
    many = api_for(EngineConfig(sizes=tuple((32 * i, 32) for i in range(1, 13))), levels=(1,),
                   adapters=tuple(f"style-{i}" for i in range(40)))
    assert "12 served sizes (e.g. 32x32, " in many.rules["size"] and "40 loaded adapters (e.g. " in many.rules["lora"]
    assert max(len(rule) for rule in many.rules.values()) < MAX_MESSAGE_CHARS // 2


def test_an_unknown_field_names_the_closest_and_a_few_others_within_the_bound(service):
    http = client(service)
    unknown = http.post("/v1/images/generations", json={"prompt": "x", "sede": 3})
    error = assert_error(unknown.status_code, unknown.content, 400)
    assert "'sede' is not a field of this request (did you mean 'seed'?)" in error["message"]
    assert error["code"] == "unknown_field" and error["param"] == "sede"
    assert "it has 12 fields (e.g. prompt, n, " in error["message"]
    everything = {"prompt": 5, "n": "x", "size": 1, "seed": "y", "guidance_scale": "z", "cache": 2, **{
        f"extra_{i}": i for i in range(30)}}
    wrong = http.post("/v1/images/generations", json=everything)
    assert "more." in assert_error(wrong.status_code, wrong.content, 400)["message"]  # the rest are counted
    as_text = http.post("/v1/images/generations", content=json.dumps({"prompt": "x"}),
                        headers={"Content-Type": "text/plain"})
    error = assert_error(as_text.status_code, as_text.content, 415)
    assert error["code"] == "unsupported_media_type" and "takes application/json" in error["message"]
    as_json = http.post("/v1/images/edits", json={"prompt": "x"})
    assert "takes multipart/form-data" in assert_error(as_json.status_code, as_json.content, 415)["message"]


def test_head_is_get_without_a_body_and_a_trailing_slash_is_the_path_without_it(service):
    transport = httpx.ASGITransport(make_app(service, EdgeConfig(api_keys=(KEY,)), warm_up=False))

    async def exchange():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return {name: await client.request(method, path) for name, (method, path) in {
                "head": ("HEAD", "/health"), "get": ("GET", "/health"), "slash": ("GET", "/health/"),
                "ready slash": ("HEAD", "/ready/"), "models slash": ("GET", "/v1/models/"),
                "options": ("OPTIONS", "/health")}.items()}

    answers = asyncio.run(exchange())
    assert answers["head"].status_code == answers["get"].status_code == answers["slash"].status_code == 200
    assert answers["head"].content == b"" and answers["slash"].json() == answers["get"].json()
    assert answers["head"].headers["content-type"] == answers["get"].headers["content-type"]
    ready = answers["ready slash"]  # /ready's own answer (no engine thread runs here: 503), without its body
    assert ready.status_code == 503 and ready.content == b"" and ready.headers["content-type"] == "application/json"
    assert_error(answers["models slash"].status_code, answers["models slash"].content, 401)  # the key still counts
    assert_error(answers["options"].status_code, answers["options"].content, 405)
    assert set(answers["options"].headers["allow"].split(", ")) == {"GET", "HEAD"}  # schemathesis found HEAD alone
