"""OpenAI request parsing: every rule answers 400 with OpenAI's envelope fields (message, param)."""

from __future__ import annotations

import asyncio

import pytest

from router.errors import ContextLengthError, InvalidRequestError, RouterError, ValidationError
from router.limits import Limits
from router.openai.choices import per_choice
from router.openai.constraints import ToolChoice
from router.openai.requests import Sampling, parse_chat_request, parse_completion_request
from router.openai.routes import context_error, generate_parameters
from router.schemas import GenerateRequest
from router.validation import Validator
from tests.router.helpers import valid_request

LIMITS = Limits(max_stop_sequences=4, max_top_n_tokens=5, max_client_batch_size=4, vocab_size=1000,
                      max_input_tokens=64, max_total_tokens=128)
USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return parse_chat_request({"messages": USER, **fields}, LIMITS)


def chat_error(body) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(body, LIMITS)
    error = info.value
    assert error.status == 400 and error.to_openai()["error"]["type"] == "invalid_request_error"
    return error


def completion_error(body) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse_completion_request(body, LIMITS)
    return info.value


# ---------------------------------------------------------------------------------- defaults


def test_chat_defaults_and_nulls():
    request = chat()
    assert request.model is None and request.sampling == Sampling()
    assert request.messages == [{"role": "user", "content": "hi"}]
    # text-generation's client sends every field, null when unset: null means absent.
    nulls = {k: None for k in ("model", "max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty",
                               "logit_bias", "stop", "seed", "n", "logprobs", "top_logprobs", "tools", "tool_choice",
                               "response_format", "stream_options", "user", "repetition_penalty")}
    assert parse_chat_request({"messages": USER, **nulls}, LIMITS).sampling == Sampling()


def test_chat_fields():
    request = chat(model="m", max_tokens=7, temperature=0.5, top_p=0.9, frequency_penalty=-1, presence_penalty=2,
                   logit_bias={"5": -100, "7": 3.5}, stop="END", seed=-1, n=3, logprobs=True, top_logprobs=2,
                   stream=True, stream_options={"include_usage": True}, user="u", parallel_tool_calls=False,
                   top_k=5, min_p=0.1, typical_p=0.5, repetition_penalty=1.1, ignore_eos=True)
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.frequency_penalty, s.presence_penalty) == (7, 0.5, 0.9, -1, 2)
    assert s.logit_bias == ((5, -100.0), (7, 3.5)) and s.stop == ("END",) and s.seed == 2**64 - 1 and s.n == 3
    assert s.stream and s.include_usage and s.ignore_eos and (s.top_k, s.min_p, s.typical_p) == (5, 0.1, 0.5)
    assert request.logprobs and request.top_logprobs == 2 and request.model == "m" and request.user == "u"
    assert chat(max_tokens=5, max_completion_tokens=9).sampling.max_tokens == 9  # the newer name wins
    assert chat(top_k=0).sampling.top_k is None and chat(top_k=-1).sampling.top_k is None  # vLLM: off


def test_typed_content_parts_and_tool_messages():
    request = parse_chat_request({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "q", "name": "bob"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
    ]}, LIMITS)
    system, user, assistant, tool = request.messages
    assert system["content"] == "a\nb" and user == {"role": "user", "content": "q", "name": "bob"}
    assert assistant["content"] is None and assistant["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert tool == {"role": "tool", "tool_call_id": "c1", "content": "42"}


# --------------------------------------------------------------------------- every chat rule

CHAT_RULES = [
    # (body fields, param, message fragment)
    ({"messages": None}, "messages", "Missing required parameter: 'messages'."),
    ({"messages": []}, "messages", "empty array"),
    ({"messages": "hi"}, "messages", "Invalid type for 'messages': expected an array, but got a string instead."),
    ({"messages": ["hi"]}, "messages[0]", "expected an object"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "Missing required parameter: 'messages[0].role'."),
    ({"messages": [{"role": 3, "content": "x"}]}, "messages[0].role", "non-empty string"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "Missing required parameter: 'messages[0].content'."),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string or an array of content parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content[0].type", "only 'text' parts are supported"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "a string"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls",
     "only assistant messages may have tool calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls[0]", "Invalid"),
    ({"model": 3}, "model", "Invalid type for 'model'"),
    ({"max_tokens": 0}, "max_tokens", "expected an integer >= 1, but got 0 instead."),
    ({"max_completion_tokens": -1}, "max_completion_tokens", ">= 1"),
    ({"max_tokens": "5"}, "max_tokens", "expected an integer, but got a string instead."),
    ({"max_tokens": 2.5}, "max_tokens", "expected an integer"),
    # A bad max_tokens beside max_completion_tokens used to be ignored (a schema-invalid body accepted).
    ({"max_completion_tokens": 5, "max_tokens": "5"}, "max_tokens", "expected an integer"),
    ({"max_completion_tokens": 5, "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"temperature": 2.5}, "temperature", "expected a number in [0, 2], but got 2.5 instead."),
    ({"temperature": -0.1}, "temperature", "in [0, 2]"),
    ({"temperature": True}, "temperature", "expected a number, but got a boolean instead."),
    ({"top_p": 1.5}, "top_p", "in [0, 1]"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "in [-2, 2]"),
    ({"presence_penalty": -3}, "presence_penalty", "in [-2, 2]"),
    ({"min_p": 2}, "min_p", "in [0, 1]"),
    ({"typical_p": 0}, "typical_p", "in (0, 1]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "in (0, inf]"),
    ({"top_k": "a"}, "top_k", "expected an integer"),
    ({"logit_bias": [1, 2]}, "logit_bias", "expected an object mapping token ids to bias values"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "'abc' is not a token id"),
    ({"logit_bias": {"1000": 1}}, "logit_bias", "token id 1000 is outside the vocabulary (0 to 999)"),
    ({"logit_bias": {"1": 101}}, "logit_bias", "between -100 and 100, but got 101"),
    ({"logit_bias": {"1": "x"}}, "logit_bias", "between -100 and 100"),
    ({"stop": 3}, "stop", "a string or an array of strings"),
    ({"stop": ["a", 1]}, "stop", "a string or an array of strings"),
    ({"seed": "1"}, "seed", "expected an integer"),
    ({"seed": 2**64}, "seed", "between"),
    ({"n": 0}, "n", "between 1 and 8"),
    ({"n": 9}, "n", "between 1 and 8, but got 9"),
    ({"logprobs": "yes"}, "logprobs", "expected a boolean"),
    ({"top_logprobs": 2}, "top_logprobs", "'top_logprobs' requires 'logprobs' to be true."),
    ({"logprobs": True, "top_logprobs": 6}, "top_logprobs", "between 0 and 5, but got 6"),
    ({"stream": "true"}, "stream", "expected a boolean"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream' is enabled"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "expected a boolean"),
    ({"stream": True, "stream_options": []}, "stream_options", "expected an object"),
    ({"user": 1}, "user", "expected a string"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls", "expected a boolean"),
    ({"ignore_eos": 1}, "ignore_eos", "expected a boolean"),
    ({"functions": [{"name": "f"}]}, "functions", "use 'tools'"),
    ({"tools": {}}, "tools", "expected an array"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "only 'function' tools"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "Missing required parameter"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "1 to 64"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]},
     "tools[1].function.name", "duplicate function name 'f'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters",
     "a JSON schema object"),
    ({"tool_choice": "required"}, "tool_choice", "'required' needs 'tools'"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "no tool named 'g'"),
    ({"tool_choice": {"type": "function"}}, "tool_choice", "expected 'none', 'auto', 'required'"),
    ({"tool_choice": 3}, "tool_choice", "a string or an object"),
    ({"response_format": "json"}, "response_format", "expected an object"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "expected one of 'text', 'json_object'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "Missing required parameter"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name",
     "1 to 64"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": 3}}},
     "response_format.json_schema.schema", "a JSON schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": "y"}}},
     "response_format.json_schema.strict", "a boolean"),
    ({"response_format": {"type": "regex", "value": 3}}, "response_format.value", "a regular expression string"),
    ({"response_format": {"type": "json"}}, "response_format.value", "Missing required parameter"),
    ({"grammar": {"type": "text"}}, "grammar.type", "expected one of 'json_object'"),
    ({"grammar": {"type": "regex", "value": "a+"}, "response_format": {"type": "text"}}, "grammar",
     "'grammar' and 'response_format' cannot both be set."),
]


@pytest.mark.parametrize("fields,param,fragment", CHAT_RULES, ids=[str(r[0])[:60] for r in CHAT_RULES])
def test_chat_rules(fields, param, fragment):
    body = {"messages": USER, **fields}
    if body["messages"] is None:
        del body["messages"]
    error = chat_error(body)
    assert error.param == param
    assert fragment in error.message
    assert error.to_openai()["error"]["param"] == param


def test_body_must_be_an_object():
    error = chat_error([1])
    assert error.message == "The request body must be a JSON object." and error.param is None


def test_tools_shapes_accepted():
    request = chat(tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
                   tool_choice="none")
    assert request.tool_choice == ToolChoice("none") and request.constraint is None
    assert request.tools[0].name == "get_weather" and request.tool_specs == [request.tools[0].spec]
    named = chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="f")  # TGI: a bare name
    assert named.tool_choice == ToolChoice("named", "f") and named.constraint.tool_call
    assert named.tools[0].parameters == {"type": "object", "properties": {}}  # none given: no arguments
    auto = chat(tools=[{"type": "function", "function": {"name": "f"}}])  # auto by default
    assert auto.tool_choice == ToolChoice("auto") and auto.constraint.free_text
    assert chat(tool_choice="auto").tool_choice == ToolChoice("none")  # nothing to call
    assert chat(response_format={"type": "text"}).constraint is None
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": True}},
                {"type": "json", "value": {"type": "object"}}, {"type": "json_object", "value": {}},
                {"type": "regex", "value": "[0-9]+"}):
        constraint = chat(response_format=fmt).constraint
        assert constraint.param == "response_format" and not constraint.tool_call
    assert chat(grammar={"type": "json", "value": {}}).constraint.param == "grammar"


# ---------------------------------------------------------------------------- completions


def test_completion_defaults_and_prompts():
    request = parse_completion_request({"prompt": "hi"}, LIMITS)
    assert request.prompts == ["hi"] and request.sampling.max_tokens == 16 and not request.echo
    assert request.logprobs is None
    assert parse_completion_request({"prompt": ["a", "b"]}, LIMITS).prompts == ["a", "b"]
    assert parse_completion_request({"prompt": [1, 2, 3]}, LIMITS).prompts == [[1, 2, 3]]
    assert parse_completion_request({"prompt": [[1], [2, 3]]}, LIMITS).prompts == [[1], [2, 3]]
    assert parse_completion_request({"prompt": "x", "suffix": ""}, LIMITS).prompts == ["x"]
    scoring = parse_completion_request({"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": 0}, LIMITS)
    assert scoring.sampling.max_tokens == 0 and scoring.logprobs == 0
    assert parse_completion_request({"prompt": "x", "best_of": 2, "n": 2}, LIMITS).sampling.n == 2


COMPLETION_RULES = [
    ({}, "prompt", "Missing required parameter: 'prompt'."),
    ({"prompt": []}, "prompt", "empty array"),
    ({"prompt": 3}, "prompt", "a string or an array"),
    ({"prompt": ["a", 3]}, "prompt", "a string, an array of strings, an array of token ids"),
    ({"prompt": ["a"] * 5}, "prompt", "at most 4 prompts per request (--max-client-batch-size), but got 5"),
    ({"prompt": ""}, "prompt", "a prompt cannot be empty"),
    ({"prompt": [[1], []]}, "prompt", "a prompt cannot be empty"),
    ({"prompt": [5000]}, "prompt", "token ids must be between 0 and 999"),
    ({"prompt": "x", "suffix": "y"}, "suffix", "'suffix' is not supported"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "expected an integer >= 1, but got 0"),
    ({"prompt": "x", "logprobs": 6}, "logprobs", "between 0 and 5, but got 6"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "expected an integer, but got a boolean"),
    ({"prompt": "x", "echo": "y"}, "echo", "expected a boolean"),
    ({"prompt": "x", "best_of": 3}, "best_of", "'best_of' other than 'n' is not supported"),
    ({"prompt": "x", "n": 9}, "n", "between 1 and 8"),
    ({"prompt": "x", "temperature": 3}, "temperature", "in [0, 2]"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream'"),
]


@pytest.mark.parametrize("body,param,fragment", COMPLETION_RULES, ids=[str(r[0])[:50] for r in COMPLETION_RULES])
def test_completion_rules(body, param, fragment):
    error = completion_error(body)
    assert error.status == 400 and error.param == param and fragment in error.message


# ------------------------------------------------------------------- mapping to generation


def test_generate_parameters_mapping():
    sampled = generate_parameters(Sampling(temperature=0.7, top_p=1.0, typical_p=1.0, min_p=0.0), top_n=2)
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_p is None and sampled.typical_p is None
    assert sampled.min_p is None and sampled.top_n_tokens == 2 and sampled.max_new_tokens is None
    default = generate_parameters(Sampling(), top_n=0)
    assert default.do_sample and default.temperature is None  # OpenAI default: temperature 1 with sampling
    assert generate_parameters(Sampling(max_tokens=0), top_n=0).max_new_tokens == 1  # echo scoring runs one step
    assert generate_parameters(Sampling(stop=("a",)), top_n=0).stop == ["a"]


def test_openai_greedy_is_what_the_validator_resolves(router_tokenizer):
    """temperature 0 and top_p 0 are argmax: the mapping says temperature 0 and the validator (the
    one greedy rule, pytgi_common/sampling.py) turns every warper off and reports no seed."""
    validator = Validator(router_tokenizer, LIMITS)
    for greedy in (Sampling(temperature=0.0, top_k=5), Sampling(top_p=0.0), Sampling(temperature=1e-7)):
        params = generate_parameters(greedy, top_n=0)
        assert params.top_p is None
        p = asyncio.run(validator.validate(GenerateRequest(inputs="hi", parameters=params))).parameters
        assert not p.do_sample and (p.temperature, p.top_k, p.top_p, p.seed) == (1.0, 0, 1.0, None)
    sampled = generate_parameters(Sampling(temperature=0.5, top_k=5), top_n=0)
    p = asyncio.run(validator.validate(GenerateRequest(inputs="hi", parameters=sampled))).parameters
    assert p.do_sample and (p.temperature, p.top_k) == (0.5, 5)


def test_per_choice_seeds():
    valid = valid_request([1, 2], seed=10)
    assert [v.parameters.seed for v in per_choice(valid, 3)] == [10, 11, 12]
    assert per_choice(valid_request([1]), 2)[1].parameters.seed is None
    assert per_choice(valid_request([1], seed=2**64 - 1), 2)[1].parameters.seed == 0


def test_context_length_wording_and_statuses():
    total = context_error(ContextLengthError("m", input_length=10, max_new_tokens=20, limit=16, kind="total"), "messages")
    assert total.message == ("This model's maximum context length is 16 tokens. However, you requested 30 tokens (10 in "
                             "the messages, 20 in the completion). Please reduce the length of the messages or completion.")
    assert total.param == "messages" and total.to_openai()["error"]["code"] == "context_length_exceeded"
    long = context_error(ContextLengthError("m", input_length=10, max_new_tokens=1, limit=8, kind="input"), "prompt")
    assert "maximum input length is 8 tokens" in long.message and long.param == "prompt"
    # OpenAI statuses: TGI's 422 → 400, 424 → 500; the TGI body keeps TGI's status.
    assert ValidationError("x").openai_status == 400 and ValidationError("x").status == 422
    assert RouterError("x", status=424).openai_status == 500
    assert RouterError("x", status=429).to_openai()["error"]["type"] == "rate_limit_error"
