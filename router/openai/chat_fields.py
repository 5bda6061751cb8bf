"""The structured fields of an OpenAI chat body, checked once, here: `messages` (content parts,
assistant tool calls), `tools`, `tool_choice`, `response_format` / `grammar` (read into the typed
values of router/openai/constraints.py, which builds their grammar), and `chat_template_kwargs`.
Whether a grammar compiles is checked later (router/grammar/validator.py).
"""

from __future__ import annotations

import re
from typing import Any

from pytgi_common.grammar import GrammarError
from router import bounds
from router.errors import InvalidRequestError
from router.grammar.native import JSON, native_grammar, schema_text
from router.openai.chat_template import RESERVED_KWARGS
from router.openai.constraints import ContentFormat, Tool, ToolChoice
from router.openai.fields import missing, read_object, type_error, value_error

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ANY_OBJECT = {"type": "object"}
_NO_PARAMETERS = {"type": "object", "properties": {}}
RESPONSE_FORMATS = ("text", "json_object", "json_schema", "json", "regex")


def read_template_kwargs(body: dict) -> dict[str, Any] | None:
    kwargs = read_object(body, "chat_template_kwargs")
    reserved = sorted(RESERVED_KWARGS.intersection(kwargs or ()))
    if reserved:
        raise value_error("chat_template_kwargs", f"{reserved[0]!r} is set by the server and cannot be "
                                                  "overridden.")
    return kwargs


def read_messages(value: Any, max_messages: int) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise type_error("messages", "an array", value)
    if not value:
        raise InvalidRequestError("Invalid 'messages': empty array. Expected an array with minimum length 1.",
                                  "messages", code="empty_array")
    if len(value) > max_messages:
        # Every message takes at least one prompt token: refused before the template renders them.
        raise value_error("messages", f"at most {max_messages} messages fit this model's input limit "
                                      f"(--max-input-tokens), but got {len(value)}.")
    return [_message(item, f"messages[{i}]") for i, item in enumerate(value)]


def _message(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise type_error(where, "an object", item)
    role = item.get("role")
    if role is None:
        raise missing(f"{where}.role")
    if not isinstance(role, str) or not role:
        raise type_error(f"{where}.role", "a non-empty string", role)
    message = dict(item)  # other keys (name, tool_call_id, …) reach the template unchanged
    tool_calls = item.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise value_error(f"{where}.tool_calls", "only assistant messages may have tool calls.")
        message["tool_calls"] = _tool_calls(tool_calls, f"{where}.tool_calls")
    content = item.get("content")
    if content is None:
        if not (role == "assistant" and tool_calls):
            raise missing(f"{where}.content")
        message["content"] = None
    else:
        message["content"] = _content(content, f"{where}.content")
    if role == "tool" and item.get("tool_call_id") is not None and not isinstance(item["tool_call_id"], str):
        raise type_error(f"{where}.tool_call_id", "a string", item["tool_call_id"])
    return message


def _content(content: Any, where: str) -> str:
    """A string, or typed parts: text parts are joined with newlines; other kinds are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise type_error(where, "a string or an array of content parts", content)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise type_error(f"{where}[{i}]", "an object", part)
        kind = part.get("type")
        if kind != "text":
            raise InvalidRequestError(
                f"Invalid content part at '{where}[{i}]': only 'text' parts are supported by this text-only "
                f"model, got type {kind!r}.", f"{where}[{i}].type", code="invalid_value")
        if not isinstance(part.get("text"), str):
            raise type_error(f"{where}[{i}].text", "a string", part.get("text"))
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Assistant tool calls; `arguments` (a JSON string) is parsed for the template, as vLLM does,
    since templates render it with `tojson` or iterate over it."""
    if not isinstance(value, list):
        raise type_error(where, "an array", value)
    calls = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(f"Invalid '{where}[{i}]': expected {{\"id\", \"type\": \"function\", "
                                      f"\"function\": {{\"name\", \"arguments\"}}}}.", f"{where}[{i}]")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = bounds.loads(arguments)
            except bounds.JsonTooComplex as error:
                raise value_error(f"{where}[{i}].function.arguments", f"{error}.") from None
            except ValueError:
                pass  # not JSON: keep the string, the template decides
        calls.append({**call, "function": {**function, "arguments": arguments}})
    return calls


def read_tools(value: Any) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise type_error("tools", "an array", value)
    if len(value) > bounds.MAX_TOOLS:
        raise value_error("tools", f"at most {bounds.MAX_TOOLS} tools are allowed, but got {len(value)}.")
    tools: list[Tool] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise type_error(where, "an object", tool)
        if tool.get("type", "function") != "function":
            raise value_error(f"{where}.type",
                              f"only 'function' tools are supported, got {tool.get('type')!r}.")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise missing(f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise value_error(f"{where}.function.name", "a function name must be 1 to 64 characters among "
                                                        f"a-z, A-Z, 0-9, '_', '.' and '-', got {name!r}.")
        if any(t.name == name for t in tools):
            raise value_error(f"{where}.function.name", f"duplicate function name {name!r}.")
        for key in ("parameters", "arguments"):  # TGI's clients call the schema `arguments`
            if function.get(key) is not None and not isinstance(function[key], dict):
                raise type_error(f"{where}.function.{key}", "a JSON schema object", function[key])
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise type_error(f"{where}.function.description", "a string", function["description"])
        parameters = function.get("parameters", function.get("arguments"))
        tools.append(Tool(name, parameters if parameters is not None else _NO_PARAMETERS, tool))
    return tuple(tools)


def read_tool_choice(value: Any, tools: tuple[Tool, ...]) -> ToolChoice:
    """Absent: "auto" with tools, else "none" (OpenAI); "auto" without tools is "none" too."""
    if value is None or value == "auto":
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value == "none":
            return ToolChoice("none")
        if value == "required":
            if not tools:
                raise value_error("tool_choice", "'required' needs 'tools'.")
            return ToolChoice("required")
        name = value  # TGI: a bare function name
    elif isinstance(value, dict):
        function = value.get("function")
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        if value.get("type") != "function" or not named:
            raise value_error("tool_choice", "expected 'none', 'auto', 'required' or "
                                             "{\"type\": \"function\", \"function\": {\"name\": …}}.")
        name = function["name"]
    else:
        raise type_error("tool_choice", "a string or an object", value)
    if not any(t.name == name for t in tools):
        raise value_error("tool_choice", f"no tool named {name!r} in 'tools'.")
    return ToolChoice("named", name)


def read_response_format(value: Any, param: str) -> ContentFormat | None:
    """OpenAI's `text` / `json_object` / `json_schema{name, schema, strict}`, and TGI's grammar
    shapes `{"type": "json" | "json_object" | "json_schema" | "regex", "value": …}` (huggingface_hub
    sends these; router.grammar.native.native_grammar reads them, as for `/generate`)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise type_error(param, "an object", value)
    kind = value.get("type")
    allowed = RESPONSE_FORMATS if param == "response_format" else RESPONSE_FORMATS[1:]
    if kind not in allowed:
        raise value_error(f"{param}.type", f"expected one of {', '.join(map(repr, allowed))}, got {kind!r}.")
    if kind == "text":
        return None
    if kind == "regex" and not isinstance(value.get("value"), str):
        raise type_error(f"{param}.value", "a regular expression string", value.get("value"))
    if "value" in value:  # TGI's shape
        try:
            grammar_type, text = native_grammar("json" if kind == "json_object" else kind, value["value"],
                                                f"{param}.value")
        except GrammarError as error:
            raise value_error(error.param, f"{error.message}.") from None
        return ContentFormat(grammar_type, text, param)
    if kind == "json_object":
        return ContentFormat(JSON, schema_text(_ANY_OBJECT), param)
    if kind != "json_schema":
        raise missing(f"{param}.value")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise missing(f"{param}.json_schema")
    if not isinstance(spec.get("name"), str) or not _FUNCTION_NAME.match(spec["name"]):
        raise value_error(f"{param}.json_schema.name",
                          "expected 1 to 64 characters among a-z, A-Z, 0-9, '_', '.' and '-'.")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise type_error(f"{param}.json_schema.strict", "a boolean", spec["strict"])
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise type_error(f"{param}.json_schema.schema", "a JSON schema object", schema)
    return ContentFormat(JSON, schema_text(_ANY_OBJECT if schema is None else schema), param)
