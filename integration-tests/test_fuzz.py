"""Fuzz the real launcher with schemathesis, from the router's own OpenAPI document.

Every operation of `GET /api-doc/openapi.json` gets schema-driven cases, valid and invalid
(schemathesis' coverage phase: boundaries and each constraint broken in turn; then its
Hypothesis fuzzing phase). Every response must: not be a 5xx; have a documented status and
content type; match its documented JSON schema; reject schema-invalid data with a 4xx; and carry
the error envelope of its route family (TGI's on native routes, OpenAI's on /v1/*, the body's on
/invocations). Afterwards the server must still be healthy and still generate.

Cost is bounded for CI (2 CPU cores): small token limits, and any request that would generate
more than MAX_NEW_TOKENS tokens per choice (an absent `max_new_tokens`/`max_tokens`, or a value
the server would accept) is lowered to MAX_NEW_TOKENS before it is sent. Schema-invalid values are
left as generated. Cases are deterministic (the same every run) unless PYTGI_FUZZ_RANDOM=1.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import pytest
import requests
import schemathesis
from conftest import start_launcher, stop_launcher
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from router.http.openapi import DOCUMENT_PATH, ROUTE_FAMILIES

MAX_INPUT_TOKENS, MAX_TOTAL_TOKENS = 96, 128  # room for SmolLM2's chat template (its system prompt)
MAX_NEW_TOKENS = 1  # a prefill, no decode step
EXAMPLES_PER_OPERATION = int(os.environ.get("PYTGI_FUZZ_EXAMPLES", "20"))
IS_RANDOM = os.environ.get("PYTGI_FUZZ_RANDOM") == "1"
MIN_CASES = 500
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzz_server():
    server = start_launcher(
        "--max-input-tokens",
        str(MAX_INPUT_TOKENS),
        "--max-total-tokens",
        str(MAX_TOTAL_TOKENS),
        "--max-client-batch-size",
        "2",
        "--max-concurrent-requests",
        "64",
    )
    yield server
    stop_launcher(server)


@pytest.fixture(scope="module")
def tally() -> Counter:
    """Cases sent, by status class (overall and per operation), and their seconds; read by
    test_fuzz_summary."""
    return Counter()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    config = SchemathesisConfig.from_dict(
        {
            "base-url": fuzz_server.url,
            "generation": {
                "mode": "all",
                "max-examples": EXAMPLES_PER_OPERATION,
                "no-shrink": True,
                "deterministic": not IS_RANDOM,
                "database": "none",
            },
            "suppress-health-check": ["all"],
        }
    )
    document = requests.get(f"{fuzz_server.url}{DOCUMENT_PATH}", timeout=10).json()
    return schemathesis.openapi.from_dict(document, config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def node_id_for_schemathesis(request):
    # NOTE: schemathesis 4.32's lazy schema reads and renames `item._nodeid`, which pytest 9.2
    # replaced by `item._id`; a plain attribute satisfies it (subtests keep pytest's own ids).
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def is_openai_body(body: Any) -> bool:
    """/invocations' dispatch (router/openai/routes.py OpenAIRoutes.invocations)."""
    return isinstance(body, dict) and ("messages" in body or ("prompt" in body and "inputs" not in body))


def cap_generation(body: Any) -> None:
    """At most MAX_NEW_TOKENS tokens per choice; values the server rejects stay as they are."""
    if not isinstance(body, dict):
        return
    if "inputs" in body and not is_openai_body(body):
        parameters = body.setdefault("parameters", {"max_new_tokens": MAX_NEW_TOKENS})
        targets, fields = (parameters, ("max_new_tokens",)) if isinstance(parameters, dict) else (None, ())
    else:
        targets, fields = body, ("max_tokens", "max_completion_tokens")
    if targets is None:
        return
    if all(targets.get(field) is None for field in fields):
        targets[fields[0]] = MAX_NEW_TOKENS
    for field in fields:
        value = targets.get(field)
        accepted = isinstance(value, int) and not isinstance(value, bool) and value < MAX_TOTAL_TOKENS
        if accepted and value > MAX_NEW_TOKENS:
            targets[field] = MAX_NEW_TOKENS


def assert_envelope(case: schemathesis.Case, response: schemathesis.Response) -> None:
    if response.status_code < 400:
        return
    family = ROUTE_FAMILIES[case.operation.path]
    if family == "either":
        family = "openai" if is_openai_body(case.body) and response.status_code != 401 else "tgi"
    where = f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]!r}"
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), where
    body = response.json()
    if family == "tgi":
        assert set(body) == {"error", "error_type"}, body
        assert isinstance(body["error"], str) and isinstance(body["error_type"], str), body
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str), body


@schema.parametrize()
@pytest.mark.timeout(900)  # one test for every operation: ~4 min on 2 AVX2 cores
def test_fuzz(case, tally):
    start = time.monotonic()
    cap_generation(case.body)
    response = case.call(timeout=60, allow_redirects=False)  # /docs's own answer is its redirect
    elapsed = time.monotonic() - start
    tally["cases"] += 1
    tally[f"{response.status_code // 100}xx"] += 1
    tally["seconds"] += elapsed
    tally[f"{case.operation.label} {response.status_code // 100}xx"] += 1
    case.validate_response(response, checks=CHECKS)
    assert_envelope(case, response)
    # A shard failing a request the router accepted is a server error too (OpenAI answers it 500).
    assert response.status_code != 424, f"{case.method} {case.path} {case.body!r}: {response.text}"


def test_fuzz_summary(tally, fuzz_server):
    """Runs after test_fuzz (file order): enough cases, no 5xx, and a server that still works."""
    print(f"fuzz: {dict(tally)}")
    assert tally["cases"] >= MIN_CASES, tally
    assert tally["5xx"] == 0, tally
    assert requests.get(f"{fuzz_server.url}/health", timeout=10).status_code == 200
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    answer = requests.post(f"{fuzz_server.url}/generate", json=body, timeout=60)
    assert answer.status_code == 200 and answer.json()["generated_text"], answer.text
    assert fuzz_server.process.poll() is None, fuzz_server.log()[-3000:]
