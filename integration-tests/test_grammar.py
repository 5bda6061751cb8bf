"""TGI's native `grammar` parameter on /generate and /generate_stream, through the real launcher."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import requests

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
    "languages": {"type": "array", "items": {"enum": ["python", "rust", "go"]}, "minItems": 1, "maxItems": 2}},
    "required": ["name", "age", "languages"], "additionalProperties": False}
PHONE = r"\d{3}-\d{3}-\d{4}"


def prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def generate(url: str, question: str, grammar: dict, **params) -> requests.Response:
    body = {"inputs": prompt(question), "parameters": {"max_new_tokens": 80, "details": True, "grammar": grammar,
                                                        **params}}
    return requests.post(f"{url}/generate", json=body, timeout=120)


def test_json_grammar(url):
    response = generate(url, "Describe a programmer as JSON.", {"type": "json", "value": PERSON})
    assert response.status_code == 200, response.text
    body = response.json()
    jsonschema.validate(json.loads(body["generated_text"]), PERSON)
    assert body["details"]["finish_reason"] == "eos_token"
    # The value may also be the schema's JSON text, and json_object is an alias.
    again = generate(url, "Describe a programmer as JSON.", {"type": "json_object", "value": json.dumps(PERSON)})
    assert again.json()["generated_text"] == body["generated_text"]


def test_regex_grammar_sampled_and_streamed(url):
    response = generate(url, "What is your phone number?", {"type": "regex", "value": PHONE},
                        do_sample=True, temperature=1.5, seed=3)
    assert response.status_code == 200, response.text
    assert re.fullmatch(PHONE, response.json()["generated_text"])
    body = {"inputs": prompt("Phone?"), "parameters": {"max_new_tokens": 30,
                                                       "grammar": {"type": "regex", "value": PHONE}}}
    stream = requests.post(f"{url}/generate_stream", json=body, timeout=120, stream=True)
    events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith(b"data:")]
    text = "".join(e["token"]["text"] for e in events)
    assert re.fullmatch(PHONE, text) and events[-1]["generated_text"] == text


def test_constrained_and_free_requests_together(url):
    jobs = [("Describe a programmer as JSON.", {"type": "json", "value": PERSON}),
            ("Phone number?", {"type": "regex", "value": PHONE}),
            ("Tell me a joke.", None)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: generate(url, job[0], job[1], max_new_tokens=40), jobs))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    jsonschema.validate(json.loads(responses[0].json()["generated_text"]), PERSON)
    assert re.fullmatch(PHONE, responses[1].json()["generated_text"])
    assert responses[2].json()["generated_text"]


def test_invalid_grammars_are_422(url):
    for grammar, message in [
        ({"type": "json", "value": {"type": "nope"}}, 'Unsupported type "nope"'),
        ({"type": "regex", "value": "(unclosed"}, "parenthesis"),
        ({"type": "json", "value": "{not json"}, "not valid JSON"),
        ({"type": "json", "value": {"type": "string", "maxLength": 10**9}}, "the limit is"),
    ]:
        response = generate(url, "hi", grammar)
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error_type"] == "validation"
        assert body["error"].startswith("Input validation error: grammar is not valid: ") and message in body["error"]
