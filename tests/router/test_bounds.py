"""Every value a request carries is bounded before it is queued (router/bounds.py and the parsers
that use it): nesting, integer and float widths, sizes. Each bound answers a 4xx naming it."""

from __future__ import annotations

import json

import pytest

from router import bounds
from router.errors import ValidationError
from router.http.auth import ApiKeys
from router.openai.requests import parse_chat_request, parse_completion_request
from router.schemas import parse_generate_request
from tests.router.openai.test_requests import LIMITS, USER, chat_error, completion_error
from tests.router.test_validation import error as validation_error
from tests.router.test_validation import validate
from tests.router.test_validation import validator  # noqa: F401 - the fixture


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("depth", [bounds.MAX_JSON_DEPTH + 1, 10_000, 200_000])
def test_json_nested_too_deep_is_refused_not_a_recursion_error(depth):
    with pytest.raises(bounds.JsonTooComplex, match=f"more than {bounds.MAX_JSON_DEPTH} levels"):
        bounds.loads(nested(depth))


def test_json_at_the_depth_limit_and_scalars_are_read():
    assert bounds.loads(nested(bounds.MAX_JSON_DEPTH)) is not None
    deep_object = '{"a":' * bounds.MAX_JSON_DEPTH + "1" + "}" * bounds.MAX_JSON_DEPTH
    assert bounds.loads(deep_object)["a"]["a"] is not None
    assert bounds.loads("3") == 3 and bounds.loads('"x"') == "x"


def test_an_integer_too_long_to_convert_is_refused():
    with pytest.raises(bounds.JsonTooComplex, match="too long"):
        bounds.loads('{"temperature": ' + "9" * 5000 + "}")


def test_syntax_errors_stay_syntax_errors():
    with pytest.raises(json.JSONDecodeError):
        bounds.loads("{")
    with pytest.raises(UnicodeDecodeError):
        bounds.loads(b'{"inputs": "\xff"}')


@pytest.mark.parametrize("value, expected", [
    (1.5, 1.5), (0, 0.0), (-3, -3.0), (float("nan"), None), (float("inf"), None), (1e300, None),
    (10**400, None), (-(10**39), None), (3.4e38, 3.4e38),
])
def test_finite_float_is_a_proto_float(value, expected):
    assert bounds.finite_float(value) == expected


# ------------------------------------------------------------------------- TGI parameters


@pytest.mark.parametrize("value", [1e300, -1e300, 10**400, 1e39])
def test_native_floats_must_fit_f32(value):
    with pytest.raises(ValidationError) as info:
        parse_generate_request({"inputs": "x", "parameters": {"temperature": value}}, compat=False)
    assert info.value.status == 422 and "expected f32" in info.value.message


def test_stop_sequences_are_bounded_in_length(validator):  # noqa: F811
    long = "x" * (bounds.MAX_STOP_CHARS + 1)
    assert validation_error(validator, stop=[long]) == (
        f"a stop sequence must be at most {bounds.MAX_STOP_CHARS} characters long. Given: {len(long)}")
    assert validate(validator, stop=["x" * bounds.MAX_STOP_CHARS]).parameters.stop


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-45])
def test_a_vanishing_temperature_is_greedy(validator, temperature):  # noqa: F811
    params = validate(validator, do_sample=True, temperature=temperature, seed=3).parameters
    assert not params.do_sample and params.temperature == 1.0


# ----------------------------------------------------------------------- OpenAI parameters


@pytest.mark.parametrize("top_k", [2**31, 2**32, 2**64, -(2**31) - 1])
def test_openai_top_k_fits_the_proto(top_k):
    assert chat_error({"messages": USER, "top_k": top_k}).param == "top_k"


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [10**400, 1e300])
def test_openai_numbers_must_be_finite_floats(field, value):
    assert chat_error({"messages": USER, field: value}).param == field


def test_logit_bias_is_bounded_in_entries_and_key_syntax():
    too_many = {str(i): 1 for i in range(bounds.MAX_LOGIT_BIAS + 1)}
    error = chat_error({"messages": USER, "logit_bias": too_many})
    assert error.param == "logit_bias" and str(bounds.MAX_LOGIT_BIAS) in error.message
    for key in ("5_0", " 5", "٣", "1" * 5000, "-1"):
        assert chat_error({"messages": USER, "logit_bias": {key: 1}}).param == "logit_bias"
    bias = parse_chat_request({"messages": USER, "logit_bias": {"999": -100}}, LIMITS).sampling.logit_bias
    assert bias == ((999, -100.0),)


def test_tools_are_bounded_in_number():
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(bounds.MAX_TOOLS + 1)]
    error = chat_error({"messages": USER, "tools": tools})
    assert error.param == "tools" and str(bounds.MAX_TOOLS) in error.message
    assert parse_chat_request({"messages": USER, "tools": tools[:-1]}, LIMITS).tools


def test_messages_are_bounded_by_the_input_limit():
    messages = USER * (LIMITS.max_input_tokens + 1)
    error = chat_error({"messages": messages})
    assert error.param == "messages" and "--max-input-tokens" in error.message
    assert parse_chat_request({"messages": messages[:-1]}, LIMITS)


def test_deep_tool_call_arguments_are_refused():
    arguments = '{"a":' * 5000 + "1" + "}" * 5000
    message = {"role": "assistant", "content": None,
               "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}
    error = chat_error({"messages": [*USER, message]})
    assert error.param == "messages[1].tool_calls[0].function.arguments"


def test_token_id_prompts_are_checked_against_the_vocabulary():
    assert completion_error({"prompt": [1, LIMITS.vocab_size]}).param == "prompt"
    assert parse_completion_request({"prompt": [1, LIMITS.vocab_size - 1]}, LIMITS).prompts


# ----------------------------------------------------------------------------- API keys


def test_a_non_utf8_authorization_header_is_refused_not_an_error():
    keys = ApiKeys(("secret",))
    # aiohttp decodes header bytes that are not UTF-8 as surrogate escapes.
    assert not keys.accepts("Bearer \udcff\udcfe")
    assert not keys.accepts("\udcff")
    assert keys.accepts("Bearer secret")

