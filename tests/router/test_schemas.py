import math

import pytest

from router.errors import (
    GenerationError,
    IncompleteGenerationError,
    OverloadedError,
    PayloadTooLargeError,
    RouterError,
    TemplateError,
    UnhealthyError,
    ValidationError,
)
from router.schemas import GenerateParameters, Grammar, parse_generate_request

PREFIX = "Failed to deserialize the JSON body into the target type: "


def parse_error(body, compat=False) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_generate_request(body, compat=compat)
    error = info.value
    assert error.status == 422 and error.error_type == "validation"
    assert error.message.startswith(PREFIX)  # serde errors carry no "Input validation error: "
    return error


# ------------------------------------------------------------------------------- defaults


def test_parameters_absent_samples_like_tgi():
    request = parse_generate_request({"inputs": "hi"}, compat=False)
    assert request.inputs == "hi" and request.stream is False and request.add_special_tokens is True
    assert request.parameters == GenerateParameters(do_sample=True)


def test_parameters_present_use_serde_defaults():
    request = parse_generate_request({"inputs": "hi", "parameters": {}}, compat=False)
    assert request.parameters == GenerateParameters()
    assert request.parameters.do_sample is False
    assert request.parameters.max_new_tokens is None
    assert request.parameters.stop == []


def test_all_fields_parsed():
    params = {
        "best_of": 2, "temperature": 0.5, "repetition_penalty": 1.1, "frequency_penalty": 0.3,
        "top_k": 10, "top_p": 0.9, "typical_p": 0.95, "do_sample": True, "max_new_tokens": 7,
        "return_full_text": True, "stop": ["a", "b"], "truncate": 3, "watermark": True, "details": True,
        "decoder_input_details": True, "seed": 2**64 - 1, "top_n_tokens": 2,
        "grammar": {"type": "json_object", "value": {"properties": {}}}, "adapter_id": "lora",
        "presence_penalty": -0.5, "min_p": 0.05,
    }
    p = parse_generate_request({"inputs": "x", "parameters": params}, compat=False).parameters
    assert p == GenerateParameters(
        best_of=2, temperature=0.5, repetition_penalty=1.1, frequency_penalty=0.3, top_k=10, top_p=0.9,
        typical_p=0.95, do_sample=True, max_new_tokens=7, return_full_text=True, stop=["a", "b"],
        truncate=3, watermark=True, details=True, decoder_input_details=True, seed=2**64 - 1,
        top_n_tokens=2, grammar=Grammar("json", {"properties": {}}), adapter_id="lora",
        presence_penalty=-0.5, min_p=0.05,
    )


def test_integers_accepted_for_floats_and_nulls_for_options():
    params = {"temperature": 1, "top_p": None, "max_new_tokens": None, "seed": None, "grammar": None,
              "return_full_text": None, "adapter_id": None}
    p = parse_generate_request({"inputs": "x", "parameters": params}, compat=False).parameters
    assert p.temperature == 1.0 and isinstance(p.temperature, float)
    assert p.top_p is None and p.max_new_tokens is None and p.grammar is None and p.return_full_text is None


def test_unknown_fields_are_ignored():
    body = {"inputs": "x", "model": "tgi", "parameters": {"foo": [1], "max_new_tokens": 3}, "extra": {}}
    request = parse_generate_request(body, compat=False)
    assert request.parameters.max_new_tokens == 3


def test_stream_is_read_only_on_the_compat_route():
    assert parse_generate_request({"inputs": "x", "stream": True}, compat=True).stream is True
    assert parse_generate_request({"inputs": "x"}, compat=True).stream is False
    # /generate has no `stream` field: ignored, whatever its type.
    assert parse_generate_request({"inputs": "x", "stream": "yes"}, compat=False).stream is False
    error = parse_error({"inputs": "x", "stream": "yes"}, compat=True)
    assert error.message == PREFIX + 'stream: invalid type: string "yes", expected a boolean'


def test_empty_inputs_parse_and_are_left_to_validation():
    assert parse_generate_request({"inputs": ""}, compat=False).inputs == ""


# ---------------------------------------------------------------------------------- errors


def test_missing_inputs():
    error = parse_error({"parameters": {}})
    assert error.message == PREFIX + "missing field `inputs`"
    assert error.to_tgi() == {"error": PREFIX + "missing field `inputs`", "error_type": "validation"}


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"inputs": 5}, "inputs: invalid type: integer `5`, expected a string"),
        ({"inputs": None}, "inputs: invalid type: null, expected a string"),
        ({"inputs": ["a"]}, "inputs: invalid type: sequence, expected a string"),
        ({"inputs": "x", "parameters": None}, "parameters: invalid type: null, expected struct GenerateParameters"),
        ({"inputs": "x", "parameters": "p"},
         'parameters: invalid type: string "p", expected struct GenerateParameters'),
        ({"inputs": "x", "parameters": {"temperature": "hot"}},
         'parameters.temperature: invalid type: string "hot", expected f32'),
        ({"inputs": "x", "parameters": {"temperature": True}},
         "parameters.temperature: invalid type: boolean `true`, expected f32"),
        ({"inputs": "x", "parameters": {"top_p": [0.5]}},
         "parameters.top_p: invalid type: sequence, expected f32"),
        ({"inputs": "x", "parameters": {"max_new_tokens": -1}},
         "parameters.max_new_tokens: invalid value: integer `-1`, expected u32"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 2**32}},
         "parameters.max_new_tokens: invalid value: integer `4294967296`, expected u32"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 1.5}},
         "parameters.max_new_tokens: invalid type: floating point `1.5`, expected u32"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 20.0}},
         "parameters.max_new_tokens: invalid type: floating point `20.0`, expected u32"),
        ({"inputs": "x", "parameters": {"top_k": False}},
         "parameters.top_k: invalid type: boolean `false`, expected i32"),
        ({"inputs": "x", "parameters": {"top_k": 2**31}},
         "parameters.top_k: invalid value: integer `2147483648`, expected i32"),
        ({"inputs": "x", "parameters": {"best_of": -2}},
         "parameters.best_of: invalid value: integer `-2`, expected usize"),
        ({"inputs": "x", "parameters": {"seed": -1}},
         "parameters.seed: invalid value: integer `-1`, expected u64"),
        ({"inputs": "x", "parameters": {"truncate": "10"}},
         'parameters.truncate: invalid type: string "10", expected usize'),
        ({"inputs": "x", "parameters": {"top_n_tokens": {}}},
         "parameters.top_n_tokens: invalid type: map, expected u32"),
        ({"inputs": "x", "parameters": {"do_sample": None}},
         "parameters.do_sample: invalid type: null, expected a boolean"),
        ({"inputs": "x", "parameters": {"details": 1}},
         "parameters.details: invalid type: integer `1`, expected a boolean"),
        ({"inputs": "x", "parameters": {"return_full_text": "true"}},
         'parameters.return_full_text: invalid type: string "true", expected a boolean'),
        ({"inputs": "x", "parameters": {"stop": "\n"}},
         'parameters.stop: invalid type: string "\\n", expected a sequence'),
        ({"inputs": "x", "parameters": {"stop": None}},
         "parameters.stop: invalid type: null, expected a sequence"),
        ({"inputs": "x", "parameters": {"stop": ["a", 1]}},
         "parameters.stop[1]: invalid type: integer `1`, expected a string"),
        ({"inputs": "x", "parameters": {"adapter_id": 3}},
         "parameters.adapter_id: invalid type: integer `3`, expected a string"),
        ({"inputs": "x", "parameters": {"grammar": {"value": "a"}}},
         "parameters.grammar: missing field `type`"),
        ({"inputs": "x", "parameters": {"grammar": {"type": "regex"}}},
         "parameters.grammar: missing field `value`"),
        ({"inputs": "x", "parameters": {"grammar": {"type": "yaml", "value": "a"}}},
         "parameters.grammar.type: unknown variant `yaml`, expected one of "
         "`json`, `json_object`, `regex`, `json_schema`"),
        ({"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": 1}}},
         "parameters.grammar.value: invalid type: integer `1`, expected a string"),
        ("just text", 'invalid type: string "just text", expected struct GenerateRequest'),
        ([{"inputs": "x"}], "invalid type: sequence, expected struct GenerateRequest"),
        (None, "invalid type: null, expected struct GenerateRequest"),
    ],
)
def test_type_errors(body, expected):
    assert parse_error(body).message == PREFIX + expected


def test_compat_struct_name():
    assert parse_error(3, compat=True).message == (
        PREFIX + "invalid type: integer `3`, expected struct CompatGenerateRequest")


def test_first_bad_field_in_document_order_wins():
    body = {"parameters": {"top_k": "a", "temperature": "b"}, "inputs": 1}
    assert parse_error(body).message == PREFIX + 'parameters.top_k: invalid type: string "a", expected i32'
    body = {"inputs": 1, "parameters": {"top_k": "a"}}
    assert parse_error(body).message == PREFIX + "inputs: invalid type: integer `1`, expected a string"
    # Missing fields are only noticed at the end of the object, after every present field.
    body = {"parameters": {"top_k": "a"}}
    assert parse_error(body).message == PREFIX + 'parameters.top_k: invalid type: string "a", expected i32'


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_rejected(value):
    # Python's json accepts NaN/Infinity literals (and overflows 1e999 to inf); serde_json does not.
    error = parse_error({"inputs": "x", "parameters": {"temperature": value}})
    assert error.message.startswith(PREFIX + "parameters.temperature: invalid value: floating point")


# ------------------------------------------------------------------------- error hierarchy


@pytest.mark.parametrize(
    "error, status, error_type, message",
    [
        (ValidationError("`inputs` cannot be empty"), 422, "validation",
         "Input validation error: `inputs` cannot be empty"),
        (ValidationError("raw", prefix=False), 422, "validation", "raw"),
        (OverloadedError(), 429, "overloaded", "Model is overloaded"),
        (GenerationError("boom"), 424, "generation", "Request failed during generation: boom"),
        (IncompleteGenerationError(), 500, "incomplete_generation", "Incomplete generation"),
        (UnhealthyError(), 503, "healthcheck", "unhealthy"),
        (TemplateError("no chat template"), 422, "template_error", "Template error: no chat template"),
        (PayloadTooLargeError(), 413, "payload_too_large", "Payload Too Large"),
    ],
)
def test_errors(error, status, error_type, message):
    assert isinstance(error, RouterError)
    assert (error.status, error.error_type, error.message, str(error)) == (status, error_type, message, message)
    assert error.to_tgi() == {"error": message, "error_type": error_type}
    envelope = error.to_openai()["error"]
    assert envelope["message"] == message and envelope["param"] is None and envelope["code"] == error_type
    # A failed generation (TGI's 424) is a server error to OpenAI clients (answered 500 on /v1).
    assert envelope["type"] == {429: "rate_limit_error", 424: "server_error", 500: "server_error",
                                503: "server_error"}.get(status, "invalid_request_error")
