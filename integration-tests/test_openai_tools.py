"""Tools and structured output through the official OpenAI SDK (constrained decoding)."""

from __future__ import annotations

import json

import jsonschema
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
    response = client(url).chat.completions.create(model="tgi", messages=ASK, tools=[WEATHER],
                                                   tool_choice="required", max_tokens=60, temperature=0)
    choice = response.choices[0]
    assert choice.message.tool_calls and choice.finish_reason in ("tool_calls", "length")
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
