"""OpenAI's `response_format` / `grammar` / `tools` / `tool_choice` as typed values, and the one
grammar (a Constraint) that honours them together.

router/openai/chat_fields.py checks the request's fields and builds `Tool`, `ToolChoice` and
`ContentFormat` (every shape rule and its 400 lives there, once); `build_constraint` only combines
them. The grammar is compile-checked later (router/grammar/validator.py, `GrammarValidator.check`).

`response_format` `text` → none; `json_object` → any JSON object; `json_schema{name, schema,
strict}` → that schema (always enforced, whatever `strict` says); TGI's `{type, value}` shapes
(router.grammar.native.native_grammar) are accepted there and in the `grammar` extra. Tools:
every call is written `<tool_call>\\n{"name": "<name>", "arguments": <JSON>}\\n</tool_call>` (the
Hermes / Qwen convention, which many chat templates use; router/openai/tool_calls.py), constrained
by an xgrammar structural tag. The turn ends where the grammar leaves only the stop token
(shard/grammar.py `GrammarState.complete`):
- `required`: one or more tool calls (one when `parallel_tool_calls` is false), nothing else;
- named: exactly one call of that tool; the turn ends as soon as it is complete;
- `auto`: free text; where the model writes `<tool_call>` a valid call of one of the tools must
  follow. With a `response_format`, the output is either content in that format or tool calls;
- `none`: no tool constraint (`response_format` still applies).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from router.grammar.native import REGEX, STRUCTURAL_TAG
from router.openai.tool_calls import CALL_END, CALL_SEPARATOR, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, call_begin

# Whitespace inside tool-call JSON: at most one character in a row (no runaway indentation).
_TAG_JSON_WHITESPACE = 1
# TGI's default `tool_prompt` is its own call format's; ours leads the description of ours.
DEFAULT_TOOL_PROMPT = "You may call one or more of these functions:"


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: dict[str, Any]  # a JSON schema (`{"type": "object", "properties": {}}` when none)
    spec: dict[str, Any]  # the tool as sent: what the chat template renders


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None  # the tool, when mode is "named"


@dataclass(frozen=True, slots=True)
class ContentFormat:
    """What the content must be: a JSON schema or a regex (from `response_format` or `grammar`)."""

    grammar_type: int  # pb.GRAMMAR_TYPE_JSON or _REGEX
    text: str  # the schema's JSON text, or the regex
    param: str  # the request field it came from: "response_format" or "grammar"


@dataclass(frozen=True, slots=True)
class Constraint:
    grammar_type: int  # pb.GRAMMAR_TYPE_JSON, _REGEX or _STRUCTURAL_TAG
    grammar: str  # JSON schema text, regex, or structural tag JSON
    tool_call: bool  # the output may hold tool calls: read it with parse_tool_call
    free_text: bool = False  # free text until a call's tag (tool_choice "auto"): room for reasoning
    param: str = "response_format"  # the field a compile error is reported on


def build_constraint(tools: tuple[Tool, ...], choice: ToolChoice, content: ContentFormat | None,
                     parallel_tool_calls: bool | None) -> Constraint | None:
    """The grammar for checked fields; None when nothing constrains the output."""
    single = parallel_tool_calls is False
    if choice.mode == "none":
        if content is None:
            return None
        return Constraint(content.grammar_type, content.text, tool_call=False, param=content.param)
    if choice.mode == "auto":
        if content is None:
            fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_OPEN], "tags": _tags(tools),
                   "at_least_one": False, "stop_after_first": single}
        else:
            fmt = {"type": "or", "elements": [
                _content_format(content),
                {"type": "tags_with_separator", "tags": _tags(tools), "separator": CALL_SEPARATOR,
                 "at_least_one": True, "stop_after_first": single},
            ]}
    else:  # "required" or one tool
        # A named choice is one call: with more allowed, a complete call could be followed by the
        # separator, so the grammar would never be complete-with-only-a-stop-token-left and the
        # shard (GrammarState.complete) could not end the turn; small models then repeat the call.
        chosen = tools if choice.mode == "required" else [t for t in tools if t.name == choice.name]
        fmt = {"type": "tags_with_separator", "tags": _tags(chosen), "separator": CALL_SEPARATOR,
               "at_least_one": True, "stop_after_first": single or choice.mode == "named"}
    text = json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False, separators=(",", ":"))
    return Constraint(STRUCTURAL_TAG, text, tool_call=True, free_text=fmt["type"] == "triggered_tags",
                      param="tools")


def _tags(tools: Iterable[Tool]) -> list[dict]:
    return [{
        "type": "tag",
        "begin": call_begin(tool.name),
        "content": {"type": "json_schema", "json_schema": tool.parameters,
                    "max_whitespace_cnt": _TAG_JSON_WHITESPACE},
        "end": CALL_END,
    } for tool in tools]


def _content_format(content: ContentFormat) -> dict:
    if content.grammar_type == REGEX:
        return {"type": "regex", "pattern": content.text}
    return {"type": "json_schema", "json_schema": json.loads(content.text),
            "max_whitespace_cnt": _TAG_JSON_WHITESPACE}


def tool_prompt(tools: Iterable[Tool], lead: str | None = None) -> str:
    """Instructions for chat templates that do not render `tools` themselves: `lead` (the
    request's `tool_prompt`, TGI's field), the tools' signatures and the call format the grammar
    enforces (always: a model told another format would fight its grammar)."""
    lines = [lead or DEFAULT_TOOL_PROMPT, "<tools>"]
    for tool in tools:
        lines.append(json.dumps({"type": "function", "function": tool.spec.get("function", {})},
                                ensure_ascii=False))
    lines += ["</tools>",
              "To call a function, answer with a JSON object holding its name and arguments inside tags:",
              f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
              f'{TOOL_CALL_CLOSE}']
    return "\n".join(lines)
