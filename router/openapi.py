"""The OpenAPI 3.0 document of every HTTP route the router serves (TGI's `/api-doc/openapi.json`).

Built from the code, with the server's live limits, never kept as a copy:
- TGI's `GenerateParameters` properties come from the dataclass' own fields: each type from its
  annotation, each range from the validation rule that checks it (`_parameter_rules`, with
  `router/validation.py`'s bounds and the limits the server runs with).
- The OpenAI bodies are read field by field in `router/openai_schemas.py`; their schemas are
  written out here beside the same constants (`MAX_N`, `SEED_RANGE`, `RESPONSE_FORMATS`).
- Error responses use the envelope of the route's family: TGI `{"error", "error_type"}` on the
  native routes, OpenAI `{"error": {"message", "type", "param", "code"}}` on `/v1/*`; SageMaker's
  `/invocations` answers in the envelope of the body it was sent (`ROUTE_FAMILIES`).

tests/router/test_openapi.py checks the paths against the app's route table and the document
against the OpenAPI 3.0 schema. OpenAPI 3.0 (not 3.1) because the bundled Swagger UI 4 renders 3.0.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from router.openai_schemas import MAX_N, RESPONSE_FORMATS, SEED_RANGE
from router.schemas import INT_RANGES, GenerateParameters

OPENAPI_VERSION = "3.0.3"
DOCUMENT_PATH = "/api-doc/openapi.json"
# The integer type router/schemas.py parses each integer parameter as (serde's widths in TGI).
INTEGER_KINDS = {"best_of": "usize", "top_k": "i32", "max_new_tokens": "u32", "truncate": "usize",
                 "seed": "u64", "top_n_tokens": "u32"}

# Which error envelope a path answers 4xx/5xx in: "tgi", "openai" or "either" (follows the body).
ROUTE_FAMILIES = {
    "/": "tgi", "/generate": "tgi", "/generate_stream": "tgi", "/tokenize": "tgi", "/chat_tokenize": "tgi",
    "/info": "tgi", "/health": "tgi", "/ping": "tgi", "/metrics": "tgi", "/live": "tgi", "/ready": "tgi",
    "/invocations": "either",
    "/v1/chat/completions": "openai", "/v1/completions": "openai", "/v1/models": "openai",
    "/v1/models/{model}": "openai",
    DOCUMENT_PATH: "tgi", "/docs": "tgi", "/docs/": "tgi", "/docs/{asset}": "tgi",
}


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """The server's limits that bound request fields (from RouterConfig and the warmup)."""

    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_total_tokens: int
    max_client_batch_size: int
    vocab_size: int


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    # A `$ref` ignores its siblings in 3.0: wrap it so that `nullable` applies.
    if "$ref" in schema:
        return {"allOf": [schema], "nullable": True}
    return {**schema, "nullable": True}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties, **extra}
    if required:
        out["required"] = list(required)
    return out


# ------------------------------------------------------------------------------ TGI requests


def _parameter_rules(limits: ApiLimits) -> dict[str, dict[str, Any]]:
    """Ranges and meaning of GenerateParameters' fields: router/validation.py's rules (and the
    integer widths of router/schemas.py's parsers)."""
    return {
        "best_of": {"minimum": 1, "maximum": limits.max_best_of,
                    "description": "Generate best_of sequences and return the one with the highest mean "
                                   "token logprob (needs sampling, no seed, no streaming)."},
        "temperature": {"minimum": 0, "description": "Sampling temperature; 0 means greedy."},
        "repetition_penalty": {"minimum": 0, "exclusiveMinimum": True,
                               "description": "Multiplicative penalty on tokens already present; 1 is off."},
        "frequency_penalty": {"minimum": -2, "maximum": 2, "description": "Additive penalty per occurrence."},
        "presence_penalty": {"minimum": -2, "maximum": 2, "description": "Additive penalty once present."},
        "top_k": {"minimum": 1, "description": "Keep the k most likely tokens."},
        "top_p": {"minimum": 0, "exclusiveMinimum": True, "maximum": 1,
                  "description": "Nucleus sampling; 1 is off."},
        "typical_p": {"minimum": 0, "exclusiveMinimum": True, "maximum": 1, "exclusiveMaximum": True,
                      "description": "Typical decoding mass."},
        "min_p": {"minimum": 0, "maximum": 1,
                  "description": "Drop tokens below min_p × the top probability."},
        "do_sample": {"description": "Sample instead of greedy decoding (default true only when the body "
                                     "has no `parameters`)."},
        "max_new_tokens": {"minimum": 1, "maximum": limits.max_total_tokens - 1,
                           "description": "Tokens to generate; absent: up to max_total_tokens."},
        "return_full_text": {"description": "Prepend the prompt to generated_text."},
        "stop": {"maxItems": limits.max_stop_sequences,
                 "description": "Stop sequences (kept in the output)."},
        "truncate": {"minimum": 1, "maximum": limits.max_input_tokens,
                     "description": "Keep only the last `truncate` prompt tokens."},
        "watermark": {"description": "Kirchenbauer et al. watermarking."},
        "details": {"description": "Return generation details."},
        "decoder_input_details": {"description": "Return the prompt tokens and their logprobs (not when "
                                                 "streaming)."},
        "seed": {"description": "Random seed (not with best_of > 1)."},
        "top_n_tokens": {"minimum": 0, "maximum": limits.max_top_n_tokens,
                         "description": "Return the n most likely tokens at each step."},
        "grammar": {"description": "Constrain the output to a JSON schema or a regular expression."},
        "adapter_id": {"description": "LoRA adapter id (accepted, not used: no adapters are loaded)."},
    }


_SCALARS = {int: "integer", float: "number", bool: "boolean", str: "string"}


def _annotation_schema(hint: Any) -> dict[str, Any]:
    """JSON schema of a dataclass field's annotation (`int | None`, `list[str]`, `Grammar | None`…)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        assert len(members) == 1, f"unsupported union {hint}"
        return _nullable(_annotation_schema(members[0]))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return {"type": "array", "items": _annotation_schema(item)}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    return _ref(hint.__name__)  # a nested dataclass, described in components


def generate_parameters_schema(limits: ApiLimits, *, validated: bool = True) -> dict[str, Any]:
    """`validated`: with the ranges generation checks (/generate); without them, what parsing
    alone accepts (/tokenize, which only tokenizes)."""
    hints = typing.get_type_hints(GenerateParameters)
    rules = _parameter_rules(limits)
    properties = {}
    for field in dataclasses.fields(GenerateParameters):
        schema = _annotation_schema(hints[field.name])
        if field.name in INTEGER_KINDS:
            low, high = INT_RANGES[INTEGER_KINDS[field.name]]
            schema = {**schema, "minimum": low, "maximum": high}
        # A KeyError here: a new field needs its rule in _parameter_rules.
        rule = rules[field.name] if validated else {"description": rules[field.name]["description"]}
        properties[field.name] = {**schema, **rule}
    return _object(properties)


def _grammar_schema() -> dict[str, Any]:
    return {
        "description": "`json` / `json_object`: a JSON schema (object or string); `regex`: a regular "
                       "expression; `json_schema`: `{name?, schema}`.",
        "oneOf": [
            _object({"type": {"type": "string", "enum": ["json", "json_object"]}, "value": {}},
                    ("type", "value")),
            _object({"type": {"type": "string", "enum": ["regex"]}, "value": {"type": "string"}},
                    ("type", "value")),
            _object({"type": {"type": "string", "enum": ["json_schema"]}, "value": {"type": "object"}},
                    ("type", "value")),
        ],
    }


# ----------------------------------------------------------------------------- TGI responses


def _tgi_response_schemas() -> dict[str, Any]:
    token = _object({"id": {"type": "integer"}, "text": {"type": "string"},
                     "logprob": {"type": "number", "nullable": True}, "special": {"type": "boolean"}},
                    ("id", "text", "logprob", "special"))
    prefill_token = _object({"id": {"type": "integer"}, "text": {"type": "string"},
                             "logprob": {"type": "number", "nullable": True}}, ("id", "text", "logprob"))
    finish = {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]}
    sequence = {
        "finish_reason": finish, "generated_tokens": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer", "nullable": True},
        "prefill": {"type": "array", "items": _ref("PrefillToken")},
        "tokens": {"type": "array", "items": _ref("Token")},
        "top_tokens": {"type": "array", "items": {"type": "array", "items": _ref("Token")}},
    }
    required = ("finish_reason", "generated_tokens", "seed", "prefill", "tokens")
    best_of = _object({"generated_text": {"type": "string"}, **sequence}, ("generated_text", *required))
    details = _object({**sequence, "best_of_sequences": {"type": "array", "items": _ref("BestOfSequence")}},
                      required)
    return {
        "Token": token, "PrefillToken": prefill_token, "BestOfSequence": best_of, "Details": details,
        "GenerateResponse": _object({"generated_text": {"type": "string"}, "details": _ref("Details")},
                                    ("generated_text",)),
        "SimpleToken": _object({"id": {"type": "integer"}, "text": {"type": "string"},
                                "start": {"type": "integer", "minimum": 0},
                                "stop": {"type": "integer", "minimum": 0}},
                               ("id", "text", "start", "stop")),
        "ChatTokenizeResponse": _object({"tokenize_response": {"type": "array", "items": _ref("SimpleToken")},
                                         "templated_text": {"type": "string"}},
                                        ("tokenize_response", "templated_text")),
        "Info": _info_schema(),
        "ErrorResponse": _object({"error": {"type": "string"}, "error_type": {"type": "string"}},
                                 ("error", "error_type"), description="TGI's error envelope."),
    }


def _info_schema() -> dict[str, Any]:
    string, integer, boolean = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
    fields = {
        "model_id": string, "model_sha": _nullable(string), "model_pipeline_tag": _nullable(string),
        "model_dtype": string, "model_device_type": string, "max_concurrent_requests": integer,
        "max_best_of": integer, "max_stop_sequences": integer, "max_input_tokens": integer,
        "max_total_tokens": integer, "max_batch_total_tokens": integer, "max_batch_prefill_tokens": integer,
        "max_batch_size": _nullable(integer), "validation_workers": integer, "max_client_batch_size": integer,
        "router": string, "version": string, "sha": _nullable(string), "docker_label": _nullable(string),
        "block_size": integer, "prefix_caching": boolean, "attention_impl": string, "model_impl": string,
        "num_shard": integer,
    }
    return _object(fields, tuple(fields))


# --------------------------------------------------------------------------- OpenAI requests


def _sampling_properties(limits: ApiLimits) -> dict[str, Any]:
    """Fields `openai_schemas._sampling` reads, for both chat and completions."""
    def number(low: float, high: float | None = None, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "number", "nullable": True, "minimum": low, **extra}
        if high is not None:
            out["maximum"] = high
        return out

    string_list = {"type": "array", "items": {"type": "string"}, "maxItems": limits.max_stop_sequences}
    return {
        "temperature": number(0, 2, description="0 means greedy; default 1 (sampling)."),
        "top_p": number(0, 1, description="1 is off, 0 greedy."),
        "frequency_penalty": number(-2, 2), "presence_penalty": number(-2, 2), "min_p": number(0, 1),
        "typical_p": number(0, 1, exclusiveMinimum=True),
        "repetition_penalty": number(0, exclusiveMinimum=True),
        "top_k": {"type": "integer", "nullable": True, "description": "<= 0 is off."},
        "logit_bias": {"type": "object", "nullable": True,
                       "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                       "description": "Token id (as a string, within the vocabulary) to an additive bias."},
        "stop": {"nullable": True, "oneOf": [{"type": "string"}, string_list]},
        "seed": {"type": "integer", "nullable": True, "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]},
        "n": {"type": "integer", "nullable": True, "minimum": 1, "maximum": MAX_N,
              "description": "Choices per prompt."},
        "ignore_eos": {"type": "boolean", "nullable": True},
        "stream": {"type": "boolean", "nullable": True},
        "stream_options": _nullable(_object({"include_usage": {"type": "boolean", "nullable": True}},
                                            description="Only with `stream: true`.")),
        "user": {"type": "string", "nullable": True},
        "model": {"type": "string", "nullable": True},
    }


def _response_format_schema(kinds: tuple[str, ...]) -> dict[str, Any]:
    """One variant per `type`. Only what the server always checks is constrained: which of
    `value` / `schema` / `json_schema` it reads depends on which are present."""
    variants = {
        "text": _object({"type": {"type": "string", "enum": ["text"]}}, ("type",)),
        "regex": _object({"type": {"type": "string", "enum": ["regex"]}, "value": {"type": "string"}},
                         ("type", "value"), description="TGI: a regular expression."),
        "json_schema": _object({"type": {"type": "string", "enum": ["json_schema"]}}, ("type",), description=(
            "OpenAI: `json_schema: {name, schema, strict}` (name: 1 to 64 of a-z A-Z 0-9 _ . -), or TGI's "
            "`value`: a JSON schema.")),
        "json": _object({"type": {"type": "string", "enum": ["json_object", "json"]}}, ("type",),
                        description="A JSON schema in `value` (or `schema`); optional for json_object."),
    }
    return {"nullable": True, "description": "OpenAI's text / json_object / json_schema, or TGI's grammar "
                                             "shape {type: json | json_object | regex, value}.",
            "oneOf": [variant for kind, variant in variants.items() if kind in kinds]}


def _chat_request_schema(limits: ApiLimits) -> dict[str, Any]:
    text_part = _object({"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                        ("type", "text"))
    function_call = _object({"name": {"type": "string"}, "arguments": {}}, ("name",))
    content = {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}]}
    # Other keys (name, …) reach the chat template unchecked. anyOf: an assistant message with
    # content may also carry tool calls.
    message = {"anyOf": [
        _object({"role": {"type": "string", "minLength": 1}, "content": content,
                 "tool_call_id": {"description": "On `tool` messages: a string."}}, ("role", "content")),
        _object({"role": {"type": "string", "enum": ["assistant"]}, "content": _nullable(content),
                 "tool_calls": {"type": "array", "minItems": 1,
                                "items": _object({"function": function_call}, ("function",))}},
                ("role", "tool_calls"), description="An assistant's tool calls."),
    ]}
    tool = _object({"type": {"type": "string", "enum": ["function"]}, "function": _object({
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
        "description": {"type": "string", "nullable": True},
        "parameters": {"type": "object", "nullable": True}, "arguments": {"type": "object", "nullable": True},
    }, ("name",))}, ("function",))
    named_choice = _object({"type": {"type": "string", "enum": ["function"]},
                            "function": _object({"name": {"type": "string"}}, ("name",))},
                           ("type", "function"))
    # No maximum: what fits depends on the templated prompt's length (a 400 context_length_exceeded).
    token_limit = {"type": "integer", "nullable": True, "minimum": 1}
    return _object({
        "messages": {"type": "array", "minItems": 1, "items": message},
        "max_tokens": token_limit, "max_completion_tokens": token_limit,
        **_sampling_properties(limits),
        "logprobs": {"type": "boolean", "nullable": True},
        "top_logprobs": {"type": "integer", "nullable": True, "minimum": 0,
                         "maximum": limits.max_top_n_tokens,
                         "description": "Needs `logprobs: true`."},
        "tools": {"type": "array", "nullable": True, "items": tool},
        "tool_choice": {"nullable": True, "description": "'none', 'auto', 'required', a tool name, or "
                                                         "{type: function, function: {name}}.",
                        "oneOf": [{"type": "string"}, named_choice]},
        "response_format": _response_format_schema(RESPONSE_FORMATS),
        "grammar": _response_format_schema(RESPONSE_FORMATS[1:]),
        "tool_prompt": {"type": "string", "nullable": True},
        "parallel_tool_calls": {"type": "boolean", "nullable": True},
        "chat_template_kwargs": {"type": "object", "nullable": True,
                                 "description": "Extra chat-template variables, e.g. "
                                                "{\"enable_thinking\": false}; not the ones the server "
                                                "sets (messages, tools, …)."},
    }, ("messages",))


def _completion_request_schema(limits: ApiLimits) -> dict[str, Any]:
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                     "maximum": limits.vocab_size - 1}}
    text = {"type": "string", "minLength": 1}
    prompt = {"oneOf": [
        text, ids,
        {"type": "array", "minItems": 1, "maxItems": limits.max_client_batch_size,
         "items": {"oneOf": [text, ids]}},
    ], "description": "A prompt (text or token ids), or several (at most max_client_batch_size)."}
    return _object({
        "prompt": prompt,
        "max_tokens": {"type": "integer", "nullable": True, "minimum": 0,
                       "description": "Default 16; 0 only with `echo` (score the prompt)."},
        **_sampling_properties(limits),
        "echo": {"type": "boolean", "nullable": True},
        "logprobs": {"type": "integer", "nullable": True, "minimum": 0, "maximum": limits.max_top_n_tokens},
        "best_of": {"type": "integer", "nullable": True, "minimum": 1, "description": "Only 1 or `n`."},
        "suffix": {"type": "string", "nullable": True, "maxLength": 0, "description": "Not supported."},
    }, ("prompt",))


# -------------------------------------------------------------------------- OpenAI responses


def _openai_response_schemas() -> dict[str, Any]:
    integer, string = {"type": "integer"}, {"type": "string"}
    usage = _object({"prompt_tokens": integer, "completion_tokens": integer, "total_tokens": integer},
                    ("prompt_tokens", "completion_tokens", "total_tokens"))
    top = _object({"token": string, "logprob": {"type": "number"},
                   "bytes": {"type": "array", "items": integer, "nullable": True}}, ("token", "logprob"))
    logprob = _object({**top["properties"], "top_logprobs": {"type": "array", "items": top}},
                      ("token", "logprob", "top_logprobs"))
    tool_call = _object({"id": string, "type": {"type": "string", "enum": ["function"]},
                         "function": _object({"name": string, "arguments": string}, ("name", "arguments"))},
                        ("id", "type", "function"))
    message = _object({"role": {"type": "string", "enum": ["assistant"]}, "content": _nullable(string),
                       "reasoning_content": {**_nullable(string), "description": "A reasoning model's "
                                             "`<think>` section (with --reasoning-parser)."},
                       "tool_calls": {"type": "array", "items": tool_call}}, ("role", "content"))
    finish = {"type": "string", "enum": ["stop", "length", "tool_calls"]}
    chat_choice = _object({"index": integer, "message": message, "finish_reason": finish,
                           "logprobs": _nullable(_object({"content": {"type": "array", "items": logprob}},
                                                         ("content",)))},
                          ("index", "message", "finish_reason", "logprobs"))
    envelope = {"id": string, "created": integer, "model": string, "system_fingerprint": string}
    legacy_logprobs = _nullable(_object({
        "tokens": {"type": "array", "items": string},
        "token_logprobs": {"type": "array", "items": {"type": "number", "nullable": True}},
        "top_logprobs": {"type": "array", "items": {"type": "object", "nullable": True,
                                                    "additionalProperties": {"type": "number"}}},
        "text_offset": {"type": "array", "items": integer},
    }, ("tokens", "token_logprobs", "top_logprobs", "text_offset")))
    completion_choice = _object({"index": integer, "text": string, "logprobs": legacy_logprobs,
                                 "finish_reason": finish}, ("index", "text", "logprobs", "finish_reason"))
    model = _object({"id": string, "object": {"type": "string", "enum": ["model"]}, "created": integer,
                     "owned_by": string}, ("id", "object", "created", "owned_by"))
    return {
        "Usage": usage,
        "ChatCompletion": _object({**envelope, "object": {"type": "string", "enum": ["chat.completion"]},
                                   "choices": {"type": "array", "items": chat_choice},
                                   "usage": _ref("Usage")},
                                  (*envelope, "object", "choices", "usage")),
        "Completion": _object({**envelope, "object": {"type": "string", "enum": ["text_completion"]},
                               "choices": {"type": "array", "items": completion_choice},
                               "usage": _ref("Usage")},
                              (*envelope, "object", "choices", "usage")),
        "Model": model,
        "ModelList": _object({"object": {"type": "string", "enum": ["list"]},
                              "data": {"type": "array", "items": _ref("Model")}}, ("object", "data")),
        "OpenAIErrorResponse": _object({"error": _object({
            "message": string, "type": string, "param": _nullable(string), "code": _nullable(string),
        }, ("message", "type", "param", "code"))}, ("error",), description="OpenAI's error envelope."),
    }


# ------------------------------------------------------------------------------- operations

_ERROR_STATUSES = {
    400: "Malformed JSON, or (OpenAI routes, /chat_tokenize) an invalid request.",
    401: "Missing or wrong API key (only with --api-key).",
    404: "Unknown model (OpenAI routes with --strict-model-name), or not one of the UI's files (/docs).",
    408: "The body was not received within --client-body-timeout, or the request ran past --request-timeout.",
    413: "Body larger than --payload-limit.",
    415: "Body sent with a non-JSON Content-Type.",
    422: "Invalid request (TGI's validation, chat template).",
    424: "The generation failed on a shard.",
    429: "Too many concurrent requests (--max-concurrent-requests).",
    500: "The generation ended without its last token.",
    503: "A shard is unhealthy (/health), or the router is draining (every route but the public ones).",
}


def _errors(family: str, statuses: tuple[int, ...]) -> dict[str, Any]:
    schema = {"tgi": _ref("ErrorResponse"), "openai": _ref("OpenAIErrorResponse"),
              "either": {"oneOf": [_ref("ErrorResponse"), _ref("OpenAIErrorResponse")]}}[family]
    return {str(status): _json(schema, _ERROR_STATUSES[status]) for status in statuses}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _sse(description: str) -> dict[str, Any]:
    # The schema of one event (what schemathesis checks each event against; 3.2's itemSchema).
    event = _object({"data": {"type": "string"}, "event": {"type": "string"}}, ("data",),
                    description=description)
    return {"text/event-stream": {"schema": event}}


def _operation(summary: str, tag: str, responses: dict[str, Any], body: dict[str, Any] | None = None,
               **extra: Any) -> dict[str, Any]:
    out = {"summary": summary, "tags": [tag], "operationId": extra.pop("operation_id"),
           "responses": responses, **extra}
    if body is not None:
        out["requestBody"] = _body(body)
    return out


_GENERATION_ERRORS = (400, 401, 408, 413, 422, 424, 429, 500, 503)
_TOKENIZE_ERRORS = (400, 401, 408, 413, 422, 503)
_OPENAI_ERRORS = (400, 401, 404, 408, 413, 415, 429, 500, 503)
_TGI_STREAM = "`data: <StreamResponse JSON>` events; an error arrives as a `data: <ErrorResponse>` event."
_OPENAI_STREAM = ("`data: <chunk JSON>` events, then `data: [DONE]`; an error arrives as an OpenAI error "
                  "event.")


def _probe(status: str) -> dict[str, Any]:
    return _object({"status": {"type": "string", "enum": [status]}}, ("status",))


def _tgi_paths() -> dict[str, Any]:
    generate = _json(_ref("GenerateResponse"), "The generation.")
    compat_ok = {"description": "A one-element list of generations, or an SSE stream with `stream: true`.",
                 "content": {"application/json": {"schema": {"type": "array",
                                                             "items": _ref("GenerateResponse")}},
                             **_sse(_TGI_STREAM)}}
    healthy = {"200": {"description": "Every shard answers."}, **_errors("tgi", (503,))}
    return {
        "/": {"post": _operation("Generate (TGI compat: a list, or SSE when `stream` is true)", "TGI",
                                 {"200": compat_ok, **_errors("tgi", _GENERATION_ERRORS)},
                                 _ref("CompatGenerateRequest"), operation_id="compat_generate")},
        "/generate": {"post": _operation("Generate tokens", "TGI", {"200": generate,
                                                                     **_errors("tgi", _GENERATION_ERRORS)},
                                         _ref("GenerateRequest"), operation_id="generate")},
        "/generate_stream": {"post": _operation(
            "Generate a stream of tokens (Server-Sent Events)", "TGI",
            {"200": {"description": "The token stream.", "content": _sse(_TGI_STREAM)},
             **_errors("tgi", _GENERATION_ERRORS)},
            _ref("GenerateRequest"), operation_id="generate_stream")},
        "/tokenize": {"post": _operation("Tokenize `inputs`", "TGI", {
            "200": _json({"type": "array", "items": _ref("SimpleToken")}, "Tokens with character offsets."),
            **_errors("tgi", _TOKENIZE_ERRORS)}, _ref("TokenizeRequest"), operation_id="tokenize")},
        "/chat_tokenize": {"post": _operation("Render the chat template and tokenize it", "TGI", {
            "200": _json(_ref("ChatTokenizeResponse"), "The templated prompt and its tokens."),
            **_errors("tgi", _TOKENIZE_ERRORS)}, _ref("ChatRequest"), operation_id="chat_tokenize")},
        "/invocations": {"post": _operation(
            "SageMaker: a TGI compat body, or an OpenAI chat or completion body", "SageMaker",
            {"200": {"description": "The answer of the route the body belongs to.",
                     "content": {"application/json": {"schema": {"oneOf": [
                         {"type": "array", "items": _ref("GenerateResponse")}, _ref("ChatCompletion"),
                         _ref("Completion")]}}, **_sse(f"TGI: {_TGI_STREAM} OpenAI: {_OPENAI_STREAM}")}},
             **_errors("either", (*_GENERATION_ERRORS, 404))},
            # anyOf: a body with `messages` is a chat even when it also has `inputs`.
            {"anyOf": [_ref("CompatGenerateRequest"), _ref("ChatRequest"), _ref("CompletionRequest")]},
            operation_id="invocations")},
        "/info": {"get": _operation("Model and router limits", "TGI",
                                    {"200": _json(_ref("Info"), "Server info.")}, operation_id="info")},
        "/health": {"get": _operation("Health of the shards", "TGI", healthy, operation_id="health")},
        "/ping": {"get": _operation("Health (SageMaker's path)", "SageMaker", healthy, operation_id="ping")},
        "/live": {"get": _operation("Liveness: the event loop answers (never asks the shards)", "Probes", {
            "200": _json(_probe("live"), "Alive.")}, operation_id="live")},
        "/ready": {"get": _operation("Readiness: accepting requests (503 once draining)", "Probes", {
            "200": _json(_probe("ready"), "Ready."), **_errors("tgi", (503,))}, operation_id="ready")},
        "/metrics": {"get": _operation("Prometheus metrics", "TGI", {"200": {
            "description": "Prometheus text format.",
            "content": {"text/plain": {"schema": {"type": "string"}}}}},
            operation_id="metrics")},
    }


def _openai_paths() -> dict[str, Any]:
    chat_ok = {"description": "The completion, or an SSE stream with `stream: true`.",
               "content": {"application/json": {"schema": _ref("ChatCompletion")}, **_sse(_OPENAI_STREAM)}}
    completion_ok = {"description": "The completion, or an SSE stream with `stream: true`.",
                     "content": {"application/json": {"schema": _ref("Completion")}, **_sse(_OPENAI_STREAM)}}
    model_parameter = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/v1/chat/completions": {"post": _operation(
            "OpenAI chat completions", "OpenAI", {"200": chat_ok, **_errors("openai", _OPENAI_ERRORS)},
            _ref("ChatRequest"), operation_id="chat_completions")},
        "/v1/completions": {"post": _operation(
            "OpenAI completions", "OpenAI", {"200": completion_ok, **_errors("openai", _OPENAI_ERRORS)},
            _ref("CompletionRequest"), operation_id="completions")},
        "/v1/models": {"get": _operation("The served model", "OpenAI", {
            "200": _json(_ref("ModelList"), "One model."), **_errors("openai", (401, 503))},
            operation_id="models")},
        "/v1/models/{model}": {"get": _operation("One model by id", "OpenAI", {
            "200": _json(_ref("Model"), "The model."), **_errors("openai", (401, 404, 503))},
            operation_id="model", parameters=[model_parameter])},
    }


def _docs_paths(asset_names: tuple[str, ...]) -> dict[str, Any]:
    asset_types = {"text/css": {"schema": {"type": "string"}},
                   "text/javascript": {"schema": {"type": "string"}},
                   "image/png": {"schema": {"type": "string", "format": "binary"}}}
    asset_parameter = {"name": "asset", "in": "path", "required": True,
                       "schema": {"type": "string", "enum": list(asset_names)}}
    return {
        DOCUMENT_PATH: {"get": _operation("This document", "Docs", {
            "200": _json({"type": "object"}, "OpenAPI 3.0 document.")}, operation_id="openapi")},
        "/docs": {"get": _operation("Redirect to /docs/", "Docs", {"302": {"description": "To `docs/`."}},
                                    operation_id="docs_redirect")},
        "/docs/": {"get": _operation("Swagger UI", "Docs", {"200": {
            "description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}}},
            operation_id="docs")},
        "/docs/{asset}": {"get": _operation("Swagger UI files (from the swagger-ui-bundle package)", "Docs", {
            "200": {"description": "The file.", "content": asset_types}, **_errors("tgi", (404,))},
            operation_id="docs_asset", parameters=[asset_parameter])},
    }


_QUESTION = "What is Deep Learning?"  # the request examples' prompt (Swagger UI's "Try it out")


def build_document(limits: ApiLimits, version: str, asset_names: tuple[str, ...]) -> dict[str, Any]:
    parameters = generate_parameters_schema(limits)
    inputs = {"type": "string", "minLength": 1, "description": "The prompt."}
    schemas = {
        "GenerateParameters": parameters, "Grammar": _grammar_schema(),
        "GenerateRequest": _object({"inputs": inputs, "parameters": _ref("GenerateParameters")}, ("inputs",),
                                   example={"inputs": _QUESTION, "parameters": {"max_new_tokens": 20}}),
        "CompatGenerateRequest": _object({"inputs": inputs, "parameters": _ref("GenerateParameters"),
                                          "stream": {"type": "boolean"}}, ("inputs",),
                                         example={"inputs": _QUESTION, "parameters": {"max_new_tokens": 20},
                                                  "stream": False}),
        "TokenizeRequest": _object({"inputs": {"type": "string"}, "parameters": generate_parameters_schema(
            limits, validated=False)}, ("inputs",), description="A GenerateRequest; only `inputs` is used.",
            example={"inputs": _QUESTION}),
        "ChatRequest": {**_chat_request_schema(limits), "example": {
            "model": "tgi", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                         {"role": "user", "content": _QUESTION}], "max_tokens": 20}},
        "CompletionRequest": {**_completion_request_schema(limits), "example": {
            "model": "tgi", "prompt": _QUESTION, "max_tokens": 20}},
        **_tgi_response_schemas(), **_openai_response_schemas(),
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "pytgi", "version": version, "license": {"name": "Apache-2.0"},
                 "description": "Text Generation Inference compatible router (TGI and OpenAI APIs). "
                                "With --api-key, every route except /health, /ping, /info, /metrics, "
                                "/live, /ready and the docs needs `Authorization: Bearer <key>`."},
        "paths": {**_tgi_paths(), **_openai_paths(), **_docs_paths(asset_names)},
        "components": {"schemas": schemas},
    }

