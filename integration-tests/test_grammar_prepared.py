"""Grammars through the real launcher: compiled and pinned on the shard before the request is
queued, so no shard ever compiles one inside a step."""

from __future__ import annotations

import json

import requests


def generate(url: str, grammar: dict) -> requests.Response:
    body = {"inputs": "<|im_start|>user\nA number?<|im_end|>\n<|im_start|>assistant\n",
            "parameters": {"max_new_tokens": 12, "grammar": grammar}}
    return requests.post(f"{url}/generate", json=body, timeout=120)


def test_no_grammar_is_compiled_in_a_shard_step(server):
    grammar = {"type": "regex", "value": r"(4[0-9]|5[0-9]) apples"}
    for _ in range(2):  # the second one: a cache hit on the router, pinned again on the shard
        response = generate(server.url, grammar)
        assert response.status_code == 200, response.text
    log = server.log()
    assert "grammar support ready" in log  # the shard's log is in there...
    assert "nobody prepared" not in log  # ...without shard.grammar's warning for a compile in a step


def test_nested_repeats_are_refused_before_compiling(server):
    schema = {"type": "array", "maxItems": 1000, "items": {"type": "string", "maxLength": 1000}}
    response = generate(server.url, {"type": "json", "value": schema})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "nested repeats multiply" in error and "the limit is 100000" in error, error
    response = generate(server.url, {"type": "json", "value": json.dumps({"type": "integer"})})
    assert response.status_code == 200, response.text
