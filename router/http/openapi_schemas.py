"""The component schemas of the OpenAPI document (router/http/openapi.py assembles the document).

- TGI's `GenerateParameters` properties come from the dataclass' own fields: each type from its
  annotation, each range from the validation rule that checks it (`_parameter_rules`, with
  `router/validation.py`'s bounds and the limits the server runs with).
- The OpenAI bodies are read field by field in `router/openai/requests.py` (and chat_fields.py);
  their schemas are written out here beside the same constants (`MAX_N`, `SEED_RANGE`,
  `RESPONSE_FORMATS`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from router.openai.chat_fields import RESPONSE_FORMATS
from router.openai.requests import MAX_N, SEED_RANGE
from router.schemas import INT_RANGES, GenerateParameters

# The integer type router/schemas.py parses each integer parameter as (serde's widths in TGI).
INTEGER_KINDS = {"best_of": "usize", "top_k": "i32", "max_new_tokens": "u32", "truncate": "usize",
                 "seed": "u64", "top_n_tokens": "u32"}


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


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    # A `$ref` ignores its siblings in 3.0: wrap it so that `nullable` applies.
    if "$ref" in schema:
        return {"allOf": [schema], "nullable": True}
    return {**schema, "nullable": True}


def object_schema(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
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
        return nullable(_annotation_schema(members[0]))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return {"type": "array", "items": _annotation_schema(item)}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    return ref(hint.__name__)  # a nested dataclass, described in components


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
    return object_schema(properties)


def _grammar_schema() -> dict[str, Any]:
    return {
        "description": "`json` / `json_object`: a JSON schema (object or string); `regex`: a regular "
                       "expression; `json_schema`: `{name?, schema}`.",
        "oneOf": [
            object_schema({"type": {"type": "string", "enum": ["json", "json_object"]}, "value": {}},
                          ("type", "value")),
            object_schema({"type": {"type": "string", "enum": ["regex"]}, "value": {"type": "string"}},
                          ("type", "value")),
            object_schema({"type": {"type": "string", "enum": ["json_schema"]}, "value": {"type": "object"}},
                          ("type", "value")),
        ],
    }


# ----------------------------------------------------------------------------- TGI responses


def _tgi_response_schemas() -> dict[str, Any]:
    token = object_schema({"id": {"type": "integer"}, "text": {"type": "string"},
                           "logprob": {"type": "number", "nullable": True}, "special": {"type": "boolean"}},
                          ("id", "text", "logprob", "special"))
    prefill_token = object_schema({"id": {"type": "integer"}, "text": {"type": "string"},
                                   "logprob": {"type": "number", "nullable": True}}, ("id", "text", "logprob"))
    finish = {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]}
    sequence = {
        "finish_reason": finish, "generated_tokens": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer", "nullable": True},
        "prefill": {"type": "array", "items": ref("PrefillToken")},
        "tokens": {"type": "array", "items": ref("Token")},
        "top_tokens": {"type": "array", "items": {"type": "array", "items": ref("Token")}},
    }
    required = ("finish_reason", "generated_tokens", "seed", "prefill", "tokens")
    best_of = object_schema({"generated_text": {"type": "string"}, **sequence}, ("generated_text", *required))
    best_of_sequences = {"type": "array", "items": ref("BestOfSequence")}
    details = object_schema({**sequence, "best_of_sequences": best_of_sequences}, required)
    return {
        "Token": token, "PrefillToken": prefill_token, "BestOfSequence": best_of, "Details": details,
        "GenerateResponse": object_schema({"generated_text": {"type": "string"}, "details": ref("Details")},
                                          ("generated_text",)),
        "SimpleToken": object_schema({"id": {"type": "integer"}, "text": {"type": "string"},
                                      "start": {"type": "integer", "minimum": 0},
                                      "stop": {"type": "integer", "minimum": 0}},
                                     ("id", "text", "start", "stop")),
        "ChatTokenizeResponse": object_schema(
            {"tokenize_response": {"type": "array", "items": ref("SimpleToken")},
             "templated_text": {"type": "string"}},
            ("tokenize_response", "templated_text")),
        "Info": _info_schema(),
        "ErrorResponse": object_schema({"error": {"type": "string"}, "error_type": {"type": "string"}},
                                       ("error", "error_type"), description="TGI's error envelope."),
    }


def _info_schema() -> dict[str, Any]:
    string, integer, boolean = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
    fields = {
        "model_id": string, "model_sha": nullable(string), "model_pipeline_tag": nullable(string),
        "model_dtype": string, "model_device_type": string, "max_concurrent_requests": integer,
        "max_best_of": integer, "max_stop_sequences": integer, "max_input_tokens": integer,
        "max_total_tokens": integer, "max_batch_total_tokens": integer, "max_batch_prefill_tokens": integer,
        "max_batch_size": nullable(integer), "validation_workers": integer, "max_client_batch_size": integer,
        "router": string, "version": string, "sha": nullable(string), "docker_label": nullable(string),
        "block_size": integer, "prefix_caching": boolean, "attention_impl": string, "model_impl": string,
        "num_shard": integer,
    }
    return object_schema(fields, tuple(fields))


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
        "stream_options": nullable(object_schema({"include_usage": {"type": "boolean", "nullable": True}},
                                                 description="Only with `stream: true`.")),
        "user": {"type": "string", "nullable": True},
        "model": {"type": "string", "nullable": True},
    }


def _response_format_schema(kinds: tuple[str, ...]) -> dict[str, Any]:
    """One variant per `type`. Only what the server always checks is constrained: which of
    `value` / `schema` / `json_schema` it reads depends on which are present."""
    variants = {
        "text": object_schema({"type": {"type": "string", "enum": ["text"]}}, ("type",)),
        "regex": object_schema({"type": {"type": "string", "enum": ["regex"]}, "value": {"type": "string"}},
                               ("type", "value"), description="TGI: a regular expression."),
        "json_schema": object_schema(
            {"type": {"type": "string", "enum": ["json_schema"]}}, ("type",), description=(
                "OpenAI: `json_schema: {name, schema, strict}` (name: 1 to 64 of a-z A-Z 0-9 _ . -), or TGI's "
                "`value`: a JSON schema.")),
        "json": object_schema({"type": {"type": "string", "enum": ["json_object", "json"]}}, ("type",),
                              description="A JSON schema in `value` (or `schema`); optional for json_object."),
    }
    return {"nullable": True, "description": "OpenAI's text / json_object / json_schema, or TGI's grammar "
                                             "shape {type: json | json_object | regex, value}.",
            "oneOf": [variant for kind, variant in variants.items() if kind in kinds]}


def _chat_request_schema(limits: ApiLimits) -> dict[str, Any]:
    text_part = object_schema({"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                              ("type", "text"))
    function_call = object_schema({"name": {"type": "string"}, "arguments": {}}, ("name",))
    content = {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}]}
    # Other keys (name, …) reach the chat template unchecked. anyOf: an assistant message with
    # content may also carry tool calls.
    message = {"anyOf": [
        object_schema({"role": {"type": "string", "minLength": 1}, "content": content,
                       "tool_call_id": {"description": "On `tool` messages: a string."}}, ("role", "content")),
        object_schema({"role": {"type": "string", "enum": ["assistant"]}, "content": nullable(content),
                       "tool_calls": {"type": "array", "minItems": 1,
                                      "items": object_schema({"function": function_call}, ("function",))}},
                      ("role", "tool_calls"), description="An assistant's tool calls."),
    ]}
    tool = object_schema({"type": {"type": "string", "enum": ["function"]}, "function": object_schema({
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
        "description": {"type": "string", "nullable": True},
        "parameters": {"type": "object", "nullable": True}, "arguments": {"type": "object", "nullable": True},
    }, ("name",))}, ("function",))
    named_choice = object_schema({"type": {"type": "string", "enum": ["function"]},
                                  "function": object_schema({"name": {"type": "string"}}, ("name",))},
                                 ("type", "function"))
    # No maximum: what fits depends on the templated prompt's length (a 400 context_length_exceeded).
    token_limit = {"type": "integer", "nullable": True, "minimum": 1}
    return object_schema({
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
    return object_schema({
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
    usage = object_schema({"prompt_tokens": integer, "completion_tokens": integer, "total_tokens": integer},
                          ("prompt_tokens", "completion_tokens", "total_tokens"))
    top = object_schema({"token": string, "logprob": {"type": "number"},
                         "bytes": {"type": "array", "items": integer, "nullable": True}}, ("token", "logprob"))
    logprob = object_schema({**top["properties"], "top_logprobs": {"type": "array", "items": top}},
                            ("token", "logprob", "top_logprobs"))
    tool_call = object_schema({"id": string, "type": {"type": "string", "enum": ["function"]},
                               "function": object_schema({"name": string, "arguments": string}, ("name", "arguments"))},
                              ("id", "type", "function"))
    message = object_schema({"role": {"type": "string", "enum": ["assistant"]}, "content": nullable(string),
                             "reasoning_content": {**nullable(string), "description": "A reasoning model's "
                                                   "`<think>` section (with --reasoning-parser)."},
                             "tool_calls": {"type": "array", "items": tool_call}}, ("role", "content"))
    finish = {"type": "string", "enum": ["stop", "length", "tool_calls"]}
    chat_choice = object_schema({"index": integer, "message": message, "finish_reason": finish,
                                 "logprobs": nullable(object_schema({"content": {"type": "array", "items": logprob}},
                                                                    ("content",)))},
                                ("index", "message", "finish_reason", "logprobs"))
    envelope = {"id": string, "created": integer, "model": string, "system_fingerprint": string}
    legacy_logprobs = nullable(object_schema({
        "tokens": {"type": "array", "items": string},
        "token_logprobs": {"type": "array", "items": {"type": "number", "nullable": True}},
        "top_logprobs": {"type": "array", "items": {"type": "object", "nullable": True,
                                                    "additionalProperties": {"type": "number"}}},
        "text_offset": {"type": "array", "items": integer},
    }, ("tokens", "token_logprobs", "top_logprobs", "text_offset")))
    completion_choice = object_schema({"index": integer, "text": string, "logprobs": legacy_logprobs,
                                       "finish_reason": finish}, ("index", "text", "logprobs", "finish_reason"))
    model = object_schema({"id": string, "object": {"type": "string", "enum": ["model"]}, "created": integer,
                           "owned_by": string}, ("id", "object", "created", "owned_by"))
    return {
        "Usage": usage,
        "ChatCompletion": object_schema(
            {**envelope, "object": {"type": "string", "enum": ["chat.completion"]},
             "choices": {"type": "array", "items": chat_choice}, "usage": ref("Usage")},
            (*envelope, "object", "choices", "usage")),
        "Completion": object_schema({**envelope, "object": {"type": "string", "enum": ["text_completion"]},
                                     "choices": {"type": "array", "items": completion_choice},
                                     "usage": ref("Usage")},
                                    (*envelope, "object", "choices", "usage")),
        "Model": model,
        "ModelList": object_schema({"object": {"type": "string", "enum": ["list"]},
                                    "data": {"type": "array", "items": ref("Model")}}, ("object", "data")),
        "OpenAIErrorResponse": object_schema({"error": object_schema({
            "message": string, "type": string, "param": nullable(string), "code": nullable(string),
        }, ("message", "type", "param", "code"))}, ("error",), description="OpenAI's error envelope."),
    }


_QUESTION = "What is Deep Learning?"  # the request examples' prompt (Swagger UI's "Try it out")


def component_schemas(limits: ApiLimits) -> dict[str, Any]:
    """`components.schemas`: the request bodies (with examples) and the responses of every route."""
    parameters = generate_parameters_schema(limits)
    inputs = {"type": "string", "minLength": 1, "description": "The prompt."}
    return {
        "GenerateParameters": parameters, "Grammar": _grammar_schema(),
        "GenerateRequest": object_schema(
            {"inputs": inputs, "parameters": ref("GenerateParameters")}, ("inputs",),
            example={"inputs": _QUESTION, "parameters": {"max_new_tokens": 20}}),
        "CompatGenerateRequest": object_schema(
            {"inputs": inputs, "parameters": ref("GenerateParameters"), "stream": {"type": "boolean"}},
            ("inputs",), example={"inputs": _QUESTION, "parameters": {"max_new_tokens": 20}, "stream": False}),
        "TokenizeRequest": object_schema(
            {"inputs": {"type": "string"}, "parameters": generate_parameters_schema(limits, validated=False)},
            ("inputs",), description="A GenerateRequest; only `inputs` is used.", example={"inputs": _QUESTION}),
        "ChatRequest": {**_chat_request_schema(limits), "example": {
            "model": "tgi", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                         {"role": "user", "content": _QUESTION}], "max_tokens": 20}},
        "CompletionRequest": {**_completion_request_schema(limits), "example": {
            "model": "tgi", "prompt": _QUESTION, "max_tokens": 20}},
        **_tgi_response_schemas(), **_openai_response_schemas(),
    }
