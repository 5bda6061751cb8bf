"""Hostile inputs on the real launcher: no request, however hostile, may hurt another request or
the server.

Each case sends one hostile request to the TGI routes (/generate, /generate_stream, POST /,
/tokenize, /chat_tokenize) or the OpenAI ones (/v1/chat/completions, /v1/completions):
- numbers: every sampling and limit parameter of both APIs × boundary and out-of-range literals,
  written raw into the body (2**64, 1e308, a 5000-digit integer, NaN, strings, null, arrays, ...);
- nesting: 10k-deep bodies, and values nested just under and far over a parser's depth limit in
  message fields, tool-call arguments, grammars and tool schemas;
- sizes: thousands of tools and messages, 100k-entry logit_bias, 100k-char and 10k stop strings,
  multi-MB inputs under and over --payload-limit, out-of-vocabulary and huge token-id prompts;
- encoding: invalid UTF-8, lone surrogates, hostile Content-Type and Content-Encoding;
- grammars whose compile time explodes (huge and nested repeats, patternProperties, enums);
- a disconnect storm of streams closed before or after their first chunk;
- non-UTF-8 `Authorization` headers (on a second launcher, started with --api-key).

Every answer must be a 2xx or a 4xx: never a 5xx nor a dropped connection. A 4xx is JSON in its
route family's envelope (TGI: {"error", "error_type"}; OpenAI: {"error": {"message", "type",
"param", "code"}}); a 2xx stream's error events follow the same envelope and are never server
errors; and no error text leaks internals (tracebacks, socket paths, exception class names).
A failed answer is the test's FAILURE.

After every case the server must be unharmed (fixture teardown: a failure there is the test's
ERROR): the launcher runs, /health answers 200, and a greedy bystander request returns exactly the
text it returned at module start (after grammar cases, a grammar-constrained bystander must answer
as it did at module start too). The bystander costs three decoding steps (1-2 s on 2 busy CPU
cores), so cases come in groups: it runs after a group's last case, and after any case answered
with a 5xx or nothing. Groups are a few parameters of the number matrix, a route's NASTY literals,
one Content-Type, or one subject (deep bodies, huge stops, one grammar across the APIs, ...).

The --api-key cases need a second launcher (30-50 s to start on 2 CPU cores): they run only with
PYTGI_HOSTILE_API_KEY=1. Every run covers non-UTF-8 keys on the keyed launcher that
integration-tests/test_operations.py starts anyway.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import aiohttp
import pytest
import requests
from conftest import Server, assert_kv_returned, start_launcher, stop_launcher

TIMEOUT = 120  # seconds per request: grammar compiles may take their full 5 s timeout
PROMPT = "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"
BYSTANDER = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}  # a prefill and two decode steps
GRAMMAR_BYSTANDER = {"inputs": PROMPT, "parameters": {
    "max_new_tokens": 2, "grammar": {"type": "regex", "value": "[0-9]{1,3}"}}}
VOCAB_SIZE = 49152  # the bundled SmolLM2-135M-Instruct
PAYLOAD_LIMIT = 2_000_000  # the launcher's default --payload-limit
API_KEY = "hostile-test-key"
JSON_HEADERS = {"Content-Type": "application/json"}
DEEP = 10_000  # far past any JSON parser's recursion limit
NEAR = 900  # just under Python's default recursion limit: parses, then meets the code behind
PATHS = {"generate": "/generate", "generate_stream": "/generate_stream", "compat": "/",
         "tokenize": "/tokenize", "chat_tokenize": "/chat_tokenize",
         "chat": "/v1/chat/completions", "chat_stream": "/v1/chat/completions",
         "completions": "/v1/completions", "completions_stream": "/v1/completions"}
LEAK = re.compile(r"Traceback|File \"|/tmp/|unix:|\.sock\b|\b[A-Z]\w*(?:Error|Exception)\b")
CHAT_ROUTES = ("chat", "chat_tokenize")
TGI_SERVER_ERRORS = {"generation", "incomplete_generation", "incomplete_generation_stream", "internal"}

# JSON literals written raw into a body (json.dumps cannot write most of them).
HOLE = "@@hole@@"
LITERALS = {
    "0": "0", "-1": "-1", "2^31-1": str(2**31 - 1), "2^31": str(2**31), "2^32": str(2**32),
    "2^63": str(2**63), "2^64": str(2**64), "-2^63-1": str(-(2**63) - 1),
    "1e308": "1e308", "-1e308": "-1e308", "1e-45": "1e-45", "1.5": "1.5", "2.0": "2.0",
    "1e999": "1e999", "5000-digit-int": "9" * 5000, "5000-digit-float": "1" + "0" * 5000 + ".5",
    "NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity", "string": '"1"', "null": "null",
    "true": "true", "array": "[1]", "object": '{"a": 1}',
}
NASTY = ("5000-digit-int", "NaN")  # the literals every other route gets too
TGI_PARAMETERS = ("temperature", "top_k", "top_p", "typical_p", "min_p", "repetition_penalty",
                  "frequency_penalty", "presence_penalty", "max_new_tokens", "seed", "best_of",
                  "top_n_tokens", "truncate")
SAMPLING = ("temperature", "top_k", "top_p", "typical_p", "min_p", "repetition_penalty",
            "frequency_penalty", "presence_penalty", "seed", "n", "logit_bias")
CHAT_ONLY_PARAMETERS = ("max_tokens", "max_completion_tokens", "logprobs", "top_logprobs")
CHAT_PARAMETERS = (*SAMPLING, *CHAT_ONLY_PARAMETERS)
COMPLETION_PARAMETERS = (*SAMPLING, "max_tokens", "best_of", "logprobs")


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: bytes
    headers: dict = field(default_factory=lambda: dict(JSON_HEADERS))
    check_greedy: bool = True  # False: checked by its group's last case (unless it got a 5xx)
    check_grammar: bool = False  # also run the grammar-constrained bystander

    @property
    def family(self) -> str:
        return "openai" if self.path.startswith("/v1/") else "tgi"


def hole(body: dict, literal: str) -> bytes:
    """`body` as JSON with its one HOLE value replaced by the raw `literal`."""
    text, marker = json.dumps(body), json.dumps(HOLE)
    assert text.count(marker) == 1, text[:200]
    return text.replace(marker, literal).encode()


def dumps(body) -> bytes:
    return json.dumps(body).encode()


def case(name: str, route: str, body, **kwargs) -> Case:
    return Case(f"{route}-{name}", PATHS[route], body if isinstance(body, bytes) else dumps(body), **kwargs)


def group(cases: list[Case]) -> list[Case]:
    """The greedy bystander runs after the last of `cases` (and after any answered with a 5xx)."""
    return [replace(c, check_greedy=False) for c in cases[:-1]] + [replace(cases[-1], check_greedy=True)]


def nested_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def nested_schema(levels: int) -> str:
    """An object schema `levels` properties deep (JSON depth 2 × levels)."""
    return '{"type":"object","properties":{"a":' * levels + '{"type":"string"}' + "}}" * levels


def tgi_body(route: str, parameters: dict, inputs: str = "Hello") -> dict:
    body = {"inputs": inputs, "parameters": parameters}
    if route == "compat":
        body["stream"] = False
    return body


def tgi_generation(route: str, **parameters) -> dict:
    return tgi_body(route, {"max_new_tokens": 1, **parameters})


def chat_body(route: str = "chat", content="Hello", **fields) -> dict:
    body = {"model": "tgi", "messages": [{"role": "user", "content": content}], "max_tokens": 1, **fields}
    if route == "chat_stream":
        body["stream"] = True
    return body


def completion_body(route: str = "completions", prompt="Hello", **fields) -> dict:
    body = {"model": "tgi", "prompt": prompt, "max_tokens": 1, **fields}
    if route == "completions_stream":
        body["stream"] = True
    return body


def openai_body(route: str, **fields) -> dict:
    return completion_body(route, **fields) if route.startswith("completions") else chat_body(route, **fields)


# ----------------------------------------------------------------------------------- cases


def number_body(route: str, param: str) -> dict:
    if route in ("generate", "generate_stream", "compat"):
        return tgi_generation(route, **{param: HOLE})
    if route == "tokenize":
        return tgi_body(route, {param: HOLE})
    fields = {"logit_bias": {"1": HOLE}} if param == "logit_bias" else {param: HOLE}
    if param == "top_logprobs":
        fields["logprobs"] = True
    return openai_body("chat" if route == "chat_tokenize" else route, **fields)


def number_cases() -> list[Case]:
    """Every parameter gets every literal on one route of its API (the OpenAI sampling parameters
    on /v1/completions, whose one-token prompt is the cheapest to accept), and the NASTY literals
    on every other route that reads it. Groups: 4 parameters of the full rows, or one route."""

    def literal_cases(route: str, params: tuple[str, ...], values: tuple[str, ...]) -> list[Case]:
        return [case(f"{param}={value}", route, hole(number_body(route, param), LITERALS[value]))
                for param in params for value in values
                # null means absent: a generation up to the context limit (or 16 tokens), not hostile
                if not (value == "null" and param in ("max_new_tokens", "max_tokens"))]

    cases = []
    for route, params in (("generate", TGI_PARAMETERS), ("completions", COMPLETION_PARAMETERS),
                          ("chat", CHAT_ONLY_PARAMETERS)):
        for i in range(0, len(params), 4):
            cases += group(literal_cases(route, params[i:i + 4], tuple(LITERALS)))
    for route, params in (("generate_stream", TGI_PARAMETERS), ("compat", TGI_PARAMETERS),
                          ("tokenize", TGI_PARAMETERS), ("chat", SAMPLING), ("chat_stream", CHAT_PARAMETERS),
                          ("chat_tokenize", CHAT_PARAMETERS), ("completions_stream", COMPLETION_PARAMETERS)):
        cases += group(literal_cases(route, params, NASTY))
    keys = {"-1": "-1", "vocab": str(VOCAB_SIZE), "2^64": str(2**64), "1.5": "1.5", "1e3": "1e3",
            "NaN": "NaN", "empty": "", "space": " 1", "plus": "+1", "underscore": "1_0",
            "arabic-digit": "\u0661", "nul": "\u0000", "5000-digits": "9" * 5000}
    cases += group([case(f"logit_bias-key={name}", "chat", chat_body(logit_bias={key: 1}))
                    for name, key in keys.items()])
    return cases


def tool(name: str, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {
        "type": "object", "properties": {"x": {"type": "string"}}}}}


def tool_call_message(arguments: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": arguments}}]}


def tool_conversation(arguments: str) -> list[dict]:
    return [{"role": "user", "content": "Hi"}, tool_call_message(arguments),
            {"role": "tool", "tool_call_id": "call_0", "content": "ok"}]


def nesting_cases() -> list[Case]:
    routes = ("generate", "generate_stream", "compat", "tokenize", "chat_tokenize", "chat", "completions")
    cases = group([case(f"body-{DEEP}-deep", route, nested_array(DEEP).encode()) for route in routes]
                  + [case(f"body-{DEEP}-deep-object", "generate", nested_object(DEEP).encode())])
    for depth in (NEAR, DEEP):
        message = {"role": "user", "content": "Hello", "metadata": HOLE}
        cases += group([
            case(f"unknown-field-{depth}-deep", "generate",
                 hole(tgi_generation("generate", extra=HOLE), nested_array(depth))),
            case(f"unknown-field-{depth}-deep", "completions",
                 hole(completion_body(extra=HOLE), nested_object(depth))),
            *[case(f"message-field-{depth}-deep", route,
                   hole(chat_body(messages=[message]), nested_object(depth))) for route in CHAT_ROUTES],
        ])
        cases += group([case(f"tool-call-arguments-{depth}-deep", route,
                             chat_body(messages=tool_conversation(nested_object(depth))))
                        for route in CHAT_ROUTES])
    levels = NEAR // 2  # a schema level is two JSON levels
    schema_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": HOLE}}
    cases += group([
        case(f"grammar-schema-{levels}-levels", "generate",
             hole(tgi_generation("generate", grammar={"type": "json", "value": HOLE}),
                  nested_schema(levels))),
        case(f"grammar-schema-text-{DEEP}-levels", "generate",
             tgi_generation("generate", grammar={"type": "json", "value": nested_schema(DEEP)})),
        case(f"response_format-{levels}-levels", "chat",
             hole(chat_body(response_format=schema_format), nested_schema(levels))),
        case(f"grammar-schema-text-{DEEP}-levels", "chat",
             chat_body(grammar={"type": "json", "value": nested_schema(DEEP)})),
        *[case(f"tool-parameters-{levels}-levels", route,
               hole(chat_body(tools=[tool("f", HOLE)]), nested_schema(levels))) for route in CHAT_ROUTES],
    ])
    return cases


def size_cases() -> list[Case]:
    tools = [tool(f"f{i}") for i in range(3000)]
    messages = [{"role": ("user", "assistant")[i % 2], "content": "hi"} for i in range(10_000)]
    near_limit = "hello world " * ((PAYLOAD_LIMIT - 1000) // 12)  # a few hundred bytes under the limit
    over_limit = "a" * (PAYLOAD_LIMIT + 500_000)
    long_stop = "a" * 100_000
    token_ids = {"vocab-size": f"[{VOCAB_SIZE}]", "-1": "[-1]", "2^63": f"[{2**63}]",
                 "5000-digits": f"[{'9' * 5000}]", "float": "[1.5]", "bool": "[true]", "empty-inner": "[[]]",
                 "nested-out-of-vocab": f"[[1], [{2**64}]]"}
    return [
        *group([*[case(f"3000-tools-tool_choice={choice}", "chat", chat_body(tools=tools, tool_choice=choice))
                  for choice in ("auto", "required", "none", "f2999")],
                case("3000-tools", "chat_tokenize", chat_body(tools=tools))]),
        *group([case("10000-messages", route, chat_body(messages=messages)) for route in CHAT_ROUTES]),
        *group([
            case("logit_bias-100k-keys", "chat", chat_body(logit_bias={str(i): 1 for i in range(100_000)})),
            case("logit_bias-whole-vocab", "chat",
                 chat_body(logit_bias={str(i): -100 for i in range(VOCAB_SIZE)})),
            case("logit_bias-100k-duplicate-keys", "chat",
                 hole(chat_body(logit_bias=HOLE), "{" + ", ".join(['"1": 100'] * 100_000) + "}")),
            case("logit_bias-whole-vocab", "completions",
                 completion_body(logit_bias={str(i): 100 for i in range(VOCAB_SIZE)})),
        ]),
        *group([
            case("stop-100k-chars", "generate",
                 tgi_generation("generate", max_new_tokens=2, stop=[long_stop])),
            case("stop-4x100k-chars", "generate_stream",
                 tgi_generation("generate_stream", max_new_tokens=2, stop=[long_stop] * 4)),
            case("stop-10000", "generate", tgi_generation("generate", stop=["a"] * 10_000)),
            case("stop-empty-string", "generate", tgi_generation("generate", max_new_tokens=2, stop=[""])),
            case("stop-100k-chars", "chat", chat_body(max_tokens=2, stop=long_stop)),
            case("stop-10000", "chat", chat_body(stop=["a"] * 10_000)),
            case("stop-empty-string", "chat_stream", chat_body("chat_stream", max_tokens=2, stop=[""])),
            case("stop-4x100k-chars", "completions", completion_body(stop=[long_stop] * 4)),
        ]),
        *group([
            case("input-near-payload-limit", "tokenize", tgi_body("tokenize", {}, near_limit)),
            case("input-over-payload-limit", "tokenize", tgi_body("tokenize", {}, over_limit)),
            case("input-near-payload-limit", "generate",
                 tgi_body("generate", {"max_new_tokens": 1}, near_limit)),
            case("input-near-payload-limit-truncate=1", "generate",
                 tgi_body("generate", {"max_new_tokens": 1, "truncate": 1}, near_limit)),
            case("input-over-payload-limit", "generate", tgi_body("generate", {}, over_limit)),
        ]),
        *group([
            case("content-near-payload-limit", "chat_tokenize", chat_body(content=near_limit)),
            case("content-over-payload-limit", "chat_tokenize", chat_body(content=over_limit)),
            case("content-near-payload-limit", "chat", chat_body(content=near_limit)),
            case("content-over-payload-limit", "chat", chat_body(content=over_limit)),
            case("prompt-near-payload-limit", "completions", completion_body(prompt=near_limit)),
        ]),
        *group([
            *[case(f"token-ids-{name}", "completions", hole(completion_body(prompt=HOLE), literal))
              for name, literal in token_ids.items()],
            case("token-ids-300k", "completions", completion_body(prompt=[1] * 300_000)),
            case("token-ids-4x100k", "completions", completion_body(prompt=[[2] * 100_000] * 4)),
        ]),
    ]


def encoding_cases() -> list[Case]:
    invalid = {  # name → raw bytes standing in for a string's contents
        "invalid-utf8": b"\xff\xfe", "encoded-surrogate": b"\xed\xa0\x80", "overlong": b"\xc0\xaf"}
    templates = {  # route → body with its one string field as HOLE
        "generate": tgi_generation("generate", stop=["x"]) | {"inputs": HOLE},
        "generate_stream": tgi_generation("generate_stream") | {"inputs": HOLE},
        "compat": tgi_generation("compat") | {"inputs": HOLE},
        "tokenize": tgi_body("tokenize", {}, HOLE),
        "chat_tokenize": chat_body(content=HOLE),
        "chat": chat_body(content=HOLE),
        "completions": completion_body(prompt=HOLE),
    }

    def raw(route: str, content: bytes) -> bytes:
        head, tail = json.dumps(templates[route]).encode().split(json.dumps(HOLE).encode())
        return head + b'"' + content + b'"' + tail

    cases = []
    for name, content in invalid.items():
        cases += group([case(name, route, raw(route, content)) for route in templates])
    cases += group([
        case("truncated-multibyte-at-end", "generate", b'{"inputs": "\xe4\xb8'),
        case("truncated-multibyte-at-end", "chat", b'{"messages": [{"role": "user", "content": "\xe4\xb8'),
        *[case("lone-surrogate", route, hole(templates[route], '"\\ud800"')) for route in templates],
        case("reversed-surrogate-pair", "generate", hole(templates["generate"], '"\\udfff\\ud800"')),
    ])
    surrogate = "\ud800"
    schema_format = {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {surrogate: {"type": "string"}}}}}
    cases += group([
        case("lone-surrogate-stop", "generate",
             tgi_generation("generate", max_new_tokens=2, stop=[surrogate])),
        case("lone-surrogate-stop", "generate_stream",
             tgi_generation("generate_stream", max_new_tokens=2, stop=[surrogate])),
        case("lone-surrogate-regex", "generate",
             tgi_generation("generate", grammar={"type": "regex", "value": surrogate})),
        case("lone-surrogate-stop", "chat_stream", chat_body("chat_stream", max_tokens=2, stop=surrogate)),
    ])
    cases += group([
        case("lone-surrogate-model", "chat", chat_body(model=surrogate)),
        case("lone-surrogate-model", "chat_stream", chat_body("chat_stream", model=surrogate)),
        case("lone-surrogate-model", "completions_stream",
             completion_body("completions_stream", model=surrogate)),
        case("lone-surrogate-user", "chat", chat_body(user=surrogate)),
        case("lone-surrogate-role", "chat", chat_body(messages=[{"role": surrogate, "content": "Hello"}])),
    ])
    cases += group([
        case("lone-surrogate-tool-description", "chat",
             chat_body(tools=[{"type": "function", "function": {"name": "f", "description": surrogate}}])),
        case("lone-surrogate-logit_bias-key", "chat", chat_body(logit_bias={surrogate: 1})),
        case("lone-surrogate-tool-call-arguments", "chat",
             chat_body(messages=tool_conversation(json.dumps({"x": surrogate})))),
        case("lone-surrogate-schema-key", "chat", chat_body(response_format=schema_format)),
    ])
    gzip_headers = {**JSON_HEADERS, "Content-Encoding": "gzip"}
    cases += group([
        case("gzip-garbage", "generate", tgi_generation("generate"), headers=gzip_headers),
        case("gzip-garbage", "chat", chat_body(), headers=gzip_headers),
        case("gzip-bomb", "generate", gzip_bomb(), headers=gzip_headers),
        case("utf16-body", "generate", json.dumps(tgi_generation("generate")).encode("utf-16"),
             headers={"Content-Type": "application/json; charset=utf-16"}),
        case("bom-body", "chat", b"\xef\xbb\xbf" + dumps(chat_body())),
    ])
    return cases


def gzip_bomb() -> bytes:
    """{"inputs": "aaa…"} that inflates to 50 MB, far over --payload-limit."""
    return gzip.compress(b'{"inputs": "' + b"a" * 50_000_000 + b'"}', compresslevel=9)


def content_type_cases() -> list[Case]:
    kinds = {"text-xml": "text/xml", "multipart": "multipart/form-data; boundary=x",
             "json-charset-bogus": "application/json; charset=bogus-8", "none": None}
    bodies = {"generate": tgi_generation("generate"), "generate_stream": tgi_generation("generate_stream"),
              "compat": tgi_generation("compat"), "tokenize": tgi_body("tokenize", {}),
              "chat_tokenize": chat_body(), "chat": chat_body(), "completions": completion_body()}
    cases = []
    for name, mime in kinds.items():
        headers = {"Content-Type": mime} if mime else {}
        cases += group([case(f"content-type={name}", route, body, headers=headers)
                        for route, body in bodies.items()])
    return cases


def grammar_cases() -> list[Case]:
    """The last ones would keep a compile thread busy for minutes if nothing bounded them."""
    huge_repeats = "a{50000}" * 20
    nested_repeats = "(a{1000}){1000}"
    schemas = {
        "maxLength-in-maxItems": {"type": "array", "maxItems": 50_000,
                                  "items": {"type": "string", "maxLength": 50_000}},
        "enum-20k": {"enum": [str(i) for i in range(20_000)]},
        "enum-150k": {"enum": [str(i) for i in range(150_000)]},
        "patternProperties-50000-repeat": {"type": "object",
                                           "patternProperties": {"^a{50000}$": {"type": "string"}}},
        "pattern-50000-repeat-x20": {"type": "string", "pattern": huge_repeats},
    }
    cases = group([
        case("regex-50000-repeat-x20", "generate",
             tgi_generation("generate", grammar={"type": "regex", "value": huge_repeats})),
        case("regex-50000-repeat-x20", "chat",
             chat_body(response_format={"type": "regex", "value": huge_repeats})),
        case("regex-nested-repeats", "generate",
             tgi_generation("generate", grammar={"type": "regex", "value": nested_repeats})),
        case("regex-3-nested-repeats", "generate",
             tgi_generation("generate", grammar={"type": "regex", "value": "((a{1000}){1000}){1000}"})),
        case("regex-nested-repeats", "chat",
             chat_body(grammar={"type": "regex", "value": nested_repeats * 5})),
    ])
    for name, schema in schemas.items():
        in_tool = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
        cases += group([
            case(name, "generate", tgi_generation("generate", grammar={"type": "json", "value": schema})),
            case(name, "chat", chat_body(response_format={"type": "json_schema",
                                                          "json_schema": {"name": "n", "schema": schema}})),
            case(f"tool-{name}", "chat", chat_body(tools=[tool("f", in_tool)], tool_choice="required")),
        ])
    return [replace(c, check_grammar=c.check_greedy) for c in cases]


def authorization_cases() -> list[Case]:
    headers = {"non-utf8": b"Bearer \xff\xfe", "no-scheme-non-utf8": b"\xff\xff\xff",
               "key-then-non-utf8": f"Bearer {API_KEY}".encode() + b"\xff", "latin1": b"Bearer caf\xe9"}
    bodies = {"generate": tgi_generation("generate"), "tokenize": tgi_body("tokenize", {}),
              "chat": chat_body()}
    return group([case(f"authorization={name}", route, body, headers={**JSON_HEADERS, "Authorization": value})
                  for name, value in headers.items() for route, body in bodies.items()])


# ------------------------------------------------------------------------------- checking


def sse_events(text: str) -> list:
    return [json.loads(line[5:]) for line in text.splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def check_error(family: str, body, where: str) -> None:
    """`body` is an error in `family`'s envelope, and leaks nothing."""
    if family == "tgi":
        assert isinstance(body, dict) and set(body) == {"error", "error_type"}, where
        assert isinstance(body["error"], str) and isinstance(body["error_type"], str), where
    else:
        assert isinstance(body, dict) and set(body) == {"error"}, where
        error = body["error"]
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and isinstance(error["type"], str), where
        assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), where
    leak = LEAK.search(json.dumps(body, ensure_ascii=False))
    assert leak is None, f"{where}: the error leaks {leak.group()!r}"


def check_answer(case: Case, response: requests.Response) -> None:
    status = response.status_code
    where = f"{case.id}: {status} {response.headers.get('Content-Type')} {response.text[:400]!r}"
    assert status < 500, where
    assert 200 <= status < 300 or 400 <= status < 500, where
    if status >= 400:
        assert response.headers.get("Content-Type", "").startswith("application/json"), where
        check_error(case.family, response.json(), where)
    elif response.headers.get("Content-Type", "").startswith("text/event-stream"):
        for event in sse_events(response.text):
            if isinstance(event, dict) and "error" in event:
                check_error(case.family, event, where)
                server_error = (event["error_type"] in TGI_SERVER_ERRORS if case.family == "tgi"
                                else event["error"]["type"] == "server_error")
                assert not server_error, f"{where}: a server error in the stream"
    else:
        response.json()


class Target:
    """A launched server, its bystanders' reference answers (taken before any hostile case), and
    what the current test's after-check needs."""

    def __init__(self, server: Server, headers: dict | None = None) -> None:
        self.server = server
        self.headers = headers or {}
        self.reference = self.generate(BYSTANDER)
        self.grammar_reference = self.answer(GRAMMAR_BYSTANDER)  # whatever it is (grammars may be off)
        self.reset()

    def reset(self) -> None:
        self.last = "(nothing sent)"
        self.check_greedy = self.check_grammar = False

    def answer(self, body: dict) -> tuple[int, str]:
        response = requests.post(f"{self.server.url}/generate", json=body, headers=self.headers,
                                 timeout=TIMEOUT)
        return response.status_code, response.text

    def generate(self, body: dict) -> str:
        status, text = self.answer(body)
        assert status == 200, f"bystander {body}: {status} {text[:400]}"
        return json.loads(text)["generated_text"]

    def send(self, case: Case) -> requests.Response:
        """Send `case` and check its answer; what it was decides the after-check."""
        self.last, self.check_greedy, self.check_grammar = case.id, True, case.check_grammar
        try:
            response = requests.post(f"{self.server.url}{case.path}", data=case.body, headers=case.headers,
                                     timeout=TIMEOUT)
        except requests.RequestException as error:
            pytest.fail(f"{case.id}: no answer ({error!r})")
        self.check_greedy = case.check_greedy or response.status_code >= 500
        check_answer(case, response)
        return response

    def assert_unharmed(self) -> None:
        after = f"after {self.last}"
        assert self.server.process.poll() is None, \
            f"{after}: the launcher exited:\n{self.server.log()[-3000:]}"
        health = requests.get(f"{self.server.url}/health", timeout=TIMEOUT)
        assert health.status_code == 200, f"{after}: /health {health.status_code} {health.text[:400]}"
        if self.check_greedy:
            assert self.generate(BYSTANDER) == self.reference, f"{after}: the greedy bystander changed"
        if self.check_grammar:
            status, text = self.answer(GRAMMAR_BYSTANDER)
            assert (status, text) == self.grammar_reference, \
                f"{after}: the grammar bystander answered {status} {text[:300]}, not {self.grammar_reference}"


@pytest.fixture(scope="module")
def main_target(server) -> Target:
    return Target(server)


@pytest.fixture
def target(main_target):
    """The shared launcher; after the test it must be unharmed."""
    main_target.reset()
    yield main_target
    main_target.assert_unharmed()


@pytest.fixture(scope="module")
def keyed_server():
    if os.environ.get("PYTGI_HOSTILE_API_KEY") != "1":
        pytest.skip("needs a second launcher with --api-key: set PYTGI_HOSTILE_API_KEY=1")
    server = start_launcher("--api-key", API_KEY)
    yield Target(server, {"Authorization": f"Bearer {API_KEY}"})
    stop_launcher(server)


@pytest.fixture
def keyed_target(keyed_server):
    keyed_server.reset()
    yield keyed_server
    keyed_server.assert_unharmed()


def cases_of(cases: list[Case]):
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


# ----------------------------------------------------------------------------------- tests


@cases_of(number_cases())
def test_numbers(target, case):
    target.send(case)


@cases_of(nesting_cases())
def test_nesting(target, case):
    target.send(case)


@cases_of(size_cases())
def test_sizes(target, case):
    target.send(case)


@cases_of(encoding_cases())
def test_encoding(target, case):
    target.send(case)


@cases_of(content_type_cases())
def test_content_type(target, case):
    target.send(case)


async def storm(url: str) -> list[int]:
    """48 streams (TGI and OpenAI, n=1 and n=2) and 8 plain generations, all at once; each client
    leaves before any byte of the answer, right after the headers, or after the first chunk.
    Returns the statuses the clients saw."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    statuses: list[int] = []

    def request(i: int) -> tuple[str, dict]:
        story = f"Tell me a long story about dragon number {i}."
        kind = i % 4
        if kind == 0:
            inputs = PROMPT.replace("Name three colors.", story)
            return "/generate_stream", {"inputs": inputs, "parameters": {"max_new_tokens": 64}}
        if kind == 1:
            return "/v1/chat/completions", chat_body("chat_stream", content=story, max_tokens=64,
                                                     n=1 + i // 4 % 2)
        if kind == 2:
            return "/v1/completions", completion_body("completions_stream", prompt=story, max_tokens=64)
        return "/", {**tgi_body("compat", {"max_new_tokens": 64}, story), "stream": True}

    async def before_any_byte(i: int) -> None:
        path, body = request(i) if i < 48 else ("/generate", {"inputs": f"Story {i}", "parameters": {
            "max_new_tokens": 64}})
        data = dumps(body)
        _, writer = await asyncio.open_connection(host, port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        await asyncio.sleep(0.05 * (i % 5))  # some leave before admission, some while queued or running
        writer.close()
        await writer.wait_closed()

    async def after(session: aiohttp.ClientSession, i: int, first_chunk: bool) -> None:
        path, body = request(i)
        async with session.post(f"{url}{path}", json=body) as response:
            statuses.append(response.status)
            if first_chunk:
                async for line in response.content:
                    if line.startswith(b"data:"):
                        return

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        await asyncio.gather(*(
            before_any_byte(i) if i % 3 == 0 or i >= 48 else after(session, i, first_chunk=i % 3 == 2)
            for i in range(56)))
    return statuses


def test_disconnect_storm(target):
    target.last, target.check_greedy = "the disconnect storm", True
    statuses = asyncio.run(storm(target.server.url))
    assert statuses and all(200 <= s < 300 for s in statuses), statuses
    assert_kv_returned(target.server.url)  # every abandoned request's blocks came back


@cases_of(grammar_cases())
def test_grammar(target, case):
    target.send(case)


@cases_of(authorization_cases())
def test_authorization_bytes(keyed_target, case):
    assert keyed_target.send(case).status_code == 401, case.id  # a wrong key, however encoded
