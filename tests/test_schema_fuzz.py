"""The API fuzzed from its own schema: schemathesis reads a live ``fastcache serve``'s /openapi.json (loopback, tiny
eager model, an API key) and sends every operation a fixed number of derandomized examples, valid and invalid, with
the key and without it. Every answer must be no 5xx, a status the operation documents, of the documented content
type, with the documented headers, and a body that conforms (errors: the one format, messages of at most 400
characters); data the schema forbids must get a 4xx. The server must still be ready after, and have logged no
traceback. The run is bounded: EXAMPLES per operation and test, each call at most CALL_TIMEOUT_S, and no call once
BUDGET_S is spent (the figures say how many were sent)."""

import logging
import time
from collections import Counter

import httpx
import pytest
import schemathesis
from conftest import ServerProcess
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

KEY = "sk-schema-fuzz-5c2e"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25  # per operation, per test (with the key, and without)
CALL_TIMEOUT_S = 60
BUDGET_S = 240  # all calls of the module; CI's tiny eager server answers them in a fraction of it
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
logger = logging.getLogger(__name__)
sent: Counter = Counter()  # (test, operation) -> examples sent
seconds: Counter = Counter()  # operation -> seconds of its calls
statuses: Counter = Counter()
clock = {"start": None}  # when the schema was read: the budget counts from there


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--preset", "tiny-sd", "--no-compile", "--sizes", "32", "--batch-sizes", "1,2", "--steps",
                           "1", "--max-steps", "2", "--max-delay-ms", "0", "--intervals", "1,3", "--api-key", KEY,
                           headers=AUTH)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(server):
    clock["start"] = time.monotonic()
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)


fuzzed = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def fuzz(api, mode: GenerationMode, headers: dict | None, name: str) -> None:
    """EXAMPLES cases of ``mode`` for each operation of ``api``, sent with ``headers`` and checked."""
    for result in api.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not len(operation.body):
            continue  # nothing to break in an operation without inputs

        @fuzzed
        @given(case=operation.as_strategy(generation_mode=mode))
        def send(case):
            if time.monotonic() - clock["start"] > BUDGET_S:
                return  # the budget is spent: the figures say how many were sent
            called = time.monotonic()
            response = case.call(headers=headers, timeout=CALL_TIMEOUT_S)
            seconds[case.operation.label] += time.monotonic() - called
            sent[name, case.operation.label] += 1
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)

        send()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_every_operation_answers_as_its_schema_says_with_the_key(api, mode):
    fuzz(api, mode, AUTH, f"{mode.value} with key")


def test_every_operation_answers_as_its_schema_says_without_the_key(api):
    fuzz(api, GenerationMode.POSITIVE, None, "without key")  # 401 in the one format, but /health and /ready


def test_the_server_is_still_ready_and_logged_no_traceback(server):
    figures = {"operations": len({operation for _, operation in sent}), "examples": sum(sent.values()),
               "seconds": round(time.monotonic() - clock["start"], 1), "statuses": dict(sorted(statuses.items())),
               "per operation": {f"{test}: {operation}": count for (test, operation), count in sorted(sent.items())},
               "seconds per operation": {operation: round(s, 1) for operation, s in sorted(seconds.items())}}
    logger.info("schemathesis: %s", figures)
    assert httpx.get(f"{server.url}/ready").status_code == 200 and server.proc.poll() is None
    assert "Traceback" not in server.output(), server.output()[-3000:]
    # POST generations and edits; GET and HEAD models, health, ready and metrics
    assert figures["operations"] == 10, figures
    assert len(sent) == 10 + 2 + 10, figures  # the invalid run: the 2 operations with a body
    # an operation without inputs has one case; the others had EXAMPLES, unless the budget ran out
    assert all(count >= 5 for (_, operation), count in sent.items() if operation.startswith("POST")), figures
    assert statuses[401] > 0 and statuses[200] > 0 and statuses[400] > 0, figures
