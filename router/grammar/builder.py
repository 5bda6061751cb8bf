"""Grammars built from requests: TGI's native `grammar`, and OpenAI's `response_format` / `tools` /
`tool_choice` turned into one constraint for the shards. Before a request is queued they are
checked (cost, compile) by router/grammar/validator.py.

TGI's native `grammar` (`json`/`json_object`: a schema object or its JSON text; `json_schema`:
`{name?, schema}`; `regex`: a string) becomes (GRAMMAR_TYPE_JSON | GRAMMAR_TYPE_REGEX, text).
Unlike TGI, a JSON schema need not have `properties`: any schema xgrammar compiles is accepted.

OpenAI (`build_constraint`; `constraint_for` in validator.py also compile-checks it):
`response_format` `text` → none; `json_object` → any JSON object; `json_schema{name, schema,
strict}` → that schema (always enforced, whatever `strict` says). TGI's
`{type, value}` shapes are accepted in `response_format` and in the `grammar` extra too. Tools:
every tool call is written `<tool_call>\\n{"name": "<name>", "arguments": <JSON>}\\n</tool_call>`
(the Hermes / Qwen convention, which many chat templates use; several calls back to back, see
router.openai.tool_calls.CALL_SEPARATOR), constrained by an xgrammar structural tag
(GRAMMAR_TYPE_STRUCTURAL_TAG). The turn ends where the grammar leaves only the stop token
(shard/grammar.py `GrammarState.complete`):
- `required`: one or more tool calls (one when `parallel_tool_calls` is false), nothing else;
- named: exactly one call of that tool; the turn ends as soon as it is complete;
- `auto`: free text; where the model writes `<tool_call>` a valid call of one of the tools must
  follow. With a `response_format`, the output is either content in that format or tool calls;
- `none`: no tool constraint (`response_format` still applies).
`parse_tool_call` reads the calls back ("no tool called" is None, and the text is the answer);
`ToolCallStream` does the same incrementally for streams (content, then per call its name and
argument fragments); `tool_prompt` describes the tools and the call format for chat templates
that do not render `tools` themselves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pytgi_proto import generate_pb2 as pb
from router import bounds
from router.openai.tool_calls import CALL_END, CALL_SEPARATOR, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, call_begin

JSON = pb.GRAMMAR_TYPE_JSON
REGEX = pb.GRAMMAR_TYPE_REGEX
STRUCTURAL_TAG = pb.GRAMMAR_TYPE_STRUCTURAL_TAG

# Whitespace inside tool-call JSON: at most one character in a row (no runaway indentation).
_TAG_JSON_WHITESPACE = 1
_ANY_OBJECT = {"type": "object"}
_NO_PARAMETERS = {"type": "object", "properties": {}}
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class GrammarError(ValueError):
    """A grammar or tool constraint the server will not run. `param` names the request field
    (OpenAI's error `param`); the TGI routes answer 422 "grammar is not valid: <message>"."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# ------------------------------------------------------------------------ native `grammar`


def native_grammar(kind: str, value: Any, param: str = "grammar") -> tuple[int, str]:
    """TGI's `{"type", "value"}` (kind already read "json_object" as "json") → (type, text)."""
    if kind == "regex":
        if not isinstance(value, str):
            raise GrammarError("a regex grammar's value must be a string", param)
        return REGEX, value
    if kind == "json":
        if isinstance(value, str):
            try:
                value = bounds.loads(value)
            except bounds.JsonTooComplex as error:
                raise GrammarError(f"the JSON schema is too complex: {error}", param) from None
            except json.JSONDecodeError as error:
                raise GrammarError(f"the JSON schema is not valid JSON: {error}", param) from error
        return JSON, schema_text(value, param)
    if kind == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise GrammarError("a json_schema grammar's value must be an object with a `schema`", param)
        return JSON, schema_text(value["schema"], param)
    raise GrammarError(f"unknown grammar type `{kind}`", param)


def schema_text(schema: Any, param: str | None = None) -> str:
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be a JSON object", param)
    # Key order is kept: it is the order in which properties are generated.
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


# ----------------------------------------------------------------------- OpenAI constraints


@dataclass(frozen=True, slots=True)
class Constraint:
    grammar_type: int  # pb.GRAMMAR_TYPE_JSON, _REGEX or _STRUCTURAL_TAG
    grammar: str  # JSON schema text, regex, or structural tag JSON
    tool_call: bool  # the output may hold tool calls: read it with parse_tool_call
    free_text: bool = False  # free text until a call's tag (tool_choice "auto"): room for reasoning


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: dict


def build_constraint(request) -> Constraint | None:
    """`constraint_for` without the compile check."""
    content = _content(request)
    tools = _tools(getattr(request, "tools", None))
    choice = _tool_choice(getattr(request, "tool_choice", None), tools)
    parallel = getattr(request, "parallel_tool_calls", None)
    single = parallel is False
    if choice == "none":
        return None if content is None else Constraint(content[0], content[1], tool_call=False)
    if choice == "auto":
        if content is None:
            fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_OPEN], "tags": _tags(tools),
                   "at_least_one": False, "stop_after_first": single}
        else:
            fmt = {"type": "or", "elements": [
                _content_format(*content),
                {"type": "tags_with_separator", "tags": _tags(tools), "separator": CALL_SEPARATOR,
                 "at_least_one": True, "stop_after_first": single},
            ]}
    else:  # "required" or one tool's name
        # A named choice is one call: with more allowed, a complete call could be followed by the
        # separator, so the grammar would never be complete-with-only-a-stop-token-left and the
        # shard (GrammarState.complete) could not end the turn; small models then repeat the call.
        chosen = tools if choice == "required" else [t for t in tools if t.name == choice]
        fmt = {"type": "tags_with_separator", "tags": _tags(chosen), "separator": CALL_SEPARATOR,
               "at_least_one": True, "stop_after_first": single or choice != "required"}
    text = json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False, separators=(",", ":"))
    return Constraint(STRUCTURAL_TAG, text, tool_call=True, free_text=fmt["type"] == "triggered_tags")


def _content(request) -> tuple[int, str] | None:
    """`response_format` (OpenAI or TGI shape) or the `grammar` extra → (type, text)."""
    grammar = getattr(request, "grammar", None)
    response_format = getattr(request, "response_format", None)
    if grammar is not None:
        if response_format is not None and _format_type(response_format) != "text":
            raise GrammarError("`grammar` and `response_format` cannot both be set", "grammar")
        return _tgi_shape(grammar, "grammar")
    if response_format is None:
        return None
    kind = _format_type(response_format)
    param = "response_format"
    if kind == "text":
        return None
    if kind == "json_object" and "value" not in response_format:
        return JSON, schema_text(_ANY_OBJECT)
    if kind == "json_schema" and "value" not in response_format:
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError("Missing required parameter: 'response_format.json_schema'.",
                               "response_format.json_schema")
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise GrammarError("Missing required parameter: 'response_format.json_schema.name'.",
                               "response_format.json_schema.name")
        schema = spec.get("schema", _ANY_OBJECT)
        return JSON, schema_text(schema, "response_format.json_schema.schema")
    return _tgi_shape(response_format, param)


def _format_type(value: Any) -> str:
    if not isinstance(value, dict):
        raise GrammarError("`response_format` must be an object", "response_format")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise GrammarError("Missing required parameter: 'response_format.type'.", "response_format.type")
    return kind


def _tgi_shape(value: Any, param: str) -> tuple[int, str]:
    if not isinstance(value, dict):
        raise GrammarError(f"`{param}` must be an object", param)
    kind = value.get("type")
    if kind not in ("json", "json_object", "json_schema", "regex"):
        expected = "`text`, `json_object`, `json_schema`" if param == "response_format" else "`json`, `regex`"
        raise GrammarError(f"unknown {param} type `{kind}`; expected one of {expected}", f"{param}.type")
    if "value" not in value:
        raise GrammarError(f"Missing required parameter: '{param}.value'.", f"{param}.value")
    return native_grammar("json" if kind == "json_object" else kind, value["value"], f"{param}.value")


def _tools(tools: Any) -> list[Tool]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise GrammarError("`tools` must be an array", "tools")
    out: list[Tool] = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise GrammarError(f"`{param}` must be an object", param)
        if tool.get("type", "function") != "function":
            raise GrammarError(f"unsupported tool type `{tool.get('type')}`; only `function` is supported",
                               f"{param}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise GrammarError(f"Missing required parameter: '{param}.function'.", f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str):
            raise GrammarError(f"Missing required parameter: '{param}.function.name'.",
                               f"{param}.function.name")
        if not _TOOL_NAME.match(name):
            raise GrammarError(f"invalid tool name {name!r}: use 1 to 64 letters, digits, '_', '-', '.' "
                               "or ':'",
                               f"{param}.function.name")
        if name in names:
            raise GrammarError(f"two tools are named `{name}`", f"{param}.function.name")
        names.add(name)
        # `arguments` is TGI's spelling of `parameters`.
        parameters = function.get("parameters", function.get("arguments"))
        if parameters is None:
            parameters = _NO_PARAMETERS
        if not isinstance(parameters, dict):
            raise GrammarError("a tool's `parameters` must be a JSON schema object",
                               f"{param}.function.parameters")
        out.append(Tool(name, parameters))
    return out


def _tool_choice(choice: Any, tools: list[Tool]) -> str:
    """"none" | "auto" | "required" | a tool's name."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else choice.get("name")
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise GrammarError("`tool_choice` must be \"none\", \"auto\", \"required\" or "
                               "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        choice = name
    elif not isinstance(choice, str):
        raise GrammarError("`tool_choice` must be a string or an object", "tool_choice")
    if choice == "none":
        return choice
    if not tools:
        if choice == "auto":
            return "none"
        raise GrammarError(f"`tool_choice` is `{choice}` but no `tools` were given", "tool_choice")
    if choice in ("auto", "required"):
        return choice
    if not any(t.name == choice for t in tools):
        names = ", ".join(t.name for t in tools)
        raise GrammarError(f"`tool_choice` names the tool `{choice}`, which is not in `tools` ({names})",
                           "tool_choice")
    return choice


def _tags(tools: Iterable[Tool]) -> list[dict]:
    return [{
        "type": "tag",
        "begin": call_begin(tool.name),
        "content": {"type": "json_schema", "json_schema": tool.parameters,
                    "max_whitespace_cnt": _TAG_JSON_WHITESPACE},
        "end": CALL_END,
    } for tool in tools]


def _content_format(grammar_type: int, text: str) -> dict:
    if grammar_type == REGEX:
        return {"type": "regex", "pattern": text}
    return {"type": "json_schema", "json_schema": json.loads(text),
            "max_whitespace_cnt": _TAG_JSON_WHITESPACE}


def tool_prompt(tools: Any) -> str:
    """Instructions for chat templates that do not render `tools` themselves: the tools'
    signatures and the call format the grammar enforces."""
    lines = ["You may call one or more of these functions:", "<tools>"]
    for tool in tools or []:
        function = tool.get("function", {}) if isinstance(tool, dict) else {}
        lines.append(json.dumps({"type": "function", "function": function}, ensure_ascii=False))
    lines += ["</tools>",
              "To call a function, answer with a JSON object holding its name and arguments inside tags:",
              f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
              f'{TOOL_CALL_CLOSE}']
    return "\n".join(lines)
