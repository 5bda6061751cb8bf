"""Tools and structured output through the official OpenAI SDK (constrained decoding)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import OpenAI

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                         "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
EOS = "2"  # <|im_end|>, the bundled SmolLM2's stop token (a logit_bias key)


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="-")


def test_required_tool_call_parses(url):
    response = client(url).chat.completions.create(model="tgi", messages=ASK, tools=[WEATHER],
                                                   tool_choice="required", max_tokens=60, temperature=0,
                                                   parallel_tool_calls=False)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])


def test_named_tool_call_streams_as_fragments(url):
    stream = client(url).chat.completions.create(
        model="tgi", messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0, stream=True,
        parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    fragments, names, ids, reasons = [], [], [], []
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function.name:
                    names.append(call.function.name)
                    ids.append(call.id)
                if call.function.arguments:
                    fragments.append(call.function.arguments)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert names == ["get_weather"] and ids[0]
    jsonschema.validate(json.loads("".join(fragments)), WEATHER["function"]["parameters"])
    assert reasons == ["tool_calls"]


def test_parallel_calls_cut_by_max_tokens_keep_the_complete_ones(url):
    # Left to itself the model stops after one call (~40 tokens); with its stop token banned the
    # grammar's only way on is another call, so 100 tokens end inside the third one.
    response = client(url).chat.completions.create(model="tgi", messages=ASK, tools=[WEATHER],
                                                   tool_choice="required", max_tokens=100, temperature=0,
                                                   logit_bias={EOS: -100})
    choice = response.choices[0]
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 100
    assert len(choice.message.tool_calls) >= 2, choice.message
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_tool_choice_none_answers_in_text(url):
    response = client(url).chat.completions.create(model="tgi", messages=ASK, tools=[WEATHER],
                                                   tool_choice="none", max_tokens=20, temperature=0)
    assert response.choices[0].message.tool_calls is None and response.choices[0].message.content


def test_json_schema_response_format_validates(url):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    response = client(url).chat.completions.create(
        model="tgi", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)


def test_json_object_response_format(url):
    response = client(url).chat.completions.create(
        model="tgi", temperature=0, max_tokens=400, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give me a small JSON object with a cat's name and age."}])
    assert response.choices[0].finish_reason == "stop"  # the grammar completed, not cut by max_tokens
    assert isinstance(json.loads(response.choices[0].message.content), dict)


# ---------------------------------------------------------------------- agent loops (issue 12)

NAMED = {"type": "function", "function": {"name": "get_weather"}}
RESULT = json.dumps({"city": "Paris", "temperature": 22, "unit": "c", "sky": "sunny"})


def streamed_turn(stream) -> tuple[dict, str, list[str]]:
    """A streamed turn put back together: (assistant message as a dict, content, finish reasons)."""
    content, calls, reasons = [], {}, []
    for chunk in stream:
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": call.id, "type": "function",
                                                      "function": {"name": "", "arguments": ""}})
                entry["function"]["name"] += call.function.name or ""
                entry["function"]["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    message = {"role": "assistant", "content": "".join(content) or None,
               "tool_calls": [calls[i] for i in sorted(calls)] or None}
    return message, "".join(content), reasons


@pytest.mark.parametrize("stream", [False, True])
def test_two_turn_agent_loop(url, stream):
    """call → tool result → answer, the SDK's own assistant message sent back as is."""
    openai = client(url)
    messages = list(ASK)
    first = dict(model="tgi", tools=[WEATHER], tool_choice="required", max_tokens=48, temperature=0)
    if stream:
        message, _, reasons = streamed_turn(openai.chat.completions.create(messages=messages, stream=True, **first))
        assert reasons == ["tool_calls"]
        calls = message["tool_calls"]
        ids = [call["id"] for call in calls]
    else:
        response = openai.chat.completions.create(messages=messages, **first)
        assert response.choices[0].finish_reason == "tool_calls"
        message = response.choices[0].message  # content None, tool_calls, refusal, … as the SDK has them
        assert message.content is None
        ids = [call.id for call in message.tool_calls]
    messages.append(message)
    messages += [{"role": "tool", "tool_call_id": id_, "name": "get_weather", "content": RESULT} for id_ in ids]
    second = dict(model="tgi", messages=messages, tools=[WEATHER], max_tokens=32, temperature=0)
    if stream:
        _, content, reasons = streamed_turn(openai.chat.completions.create(stream=True, **second))
        assert reasons and reasons[-1] in ("stop", "length", "tool_calls")
    else:
        answer = openai.chat.completions.create(**second).choices[0]
        content, reasons = answer.message.content, [answer.finish_reason]
    if reasons[-1] != "tool_calls":
        assert content and "<tool_call>" not in content


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_forced_tool_choice_ends_with_the_call(url, choice, stream):
    """The turn ends as soon as the call is complete: no second call, no run to max_tokens."""
    request = dict(model="tgi", messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=48, temperature=0)
    if stream:
        stream_ = client(url).chat.completions.create(stream=True, stream_options={"include_usage": True}, **request)
        chunks = list(stream_)
        message, _, reasons = streamed_turn(iter(chunks))
        calls, usage = message["tool_calls"], chunks[-1].usage
        arguments = [call["function"]["arguments"] for call in calls]
    else:
        response = client(url).chat.completions.create(**request)
        reasons, usage = [response.choices[0].finish_reason], response.usage
        calls = response.choices[0].message.tool_calls
        arguments = [call.function.arguments for call in calls]
    assert reasons == ["tool_calls"]
    assert usage.completion_tokens < 48
    if choice == NAMED:
        assert len(calls) == 1
    for text in arguments:
        jsonschema.validate(json.loads(text), WEATHER["function"]["parameters"])


def test_parallel_tool_calls_false_gives_one_call(url):
    response = client(url).chat.completions.create(model="tgi", messages=ASK, tools=[WEATHER], tool_choice="required",
                                                   parallel_tool_calls=False, max_tokens=48, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert response.usage.completion_tokens < 48


def test_huggingface_hub_chat_completion_with_tools(url):
    from huggingface_hub import InferenceClient

    hub = InferenceClient(url, timeout=120)
    output = hub.chat_completion(ASK, tools=[WEATHER], tool_choice="required", max_tokens=48, temperature=0)
    choice = output.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = call.function.arguments
    jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments,
                        WEATHER["function"]["parameters"])
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    answer = hub.chat_completion(messages, tools=[WEATHER], max_tokens=32, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
