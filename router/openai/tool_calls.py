"""Tool calls as text: the `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>` blocks that a tool
Constraint (router.openai.constraints) makes the model write, read back whole or as a stream, and written the
same way (`call_text`) when an earlier call is rendered for a template that knows no tool calls.
Tool results come back inside `<tool_response>…</tool_response>` (the Hermes / Qwen convention)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
# Between the calls of one turn: none. After a complete call the model then chooses between
# another `<tool_call>` and its stop token; a newline there is whitespace that small models take
# by habit after a closing tag, and the grammar would go on into a second (often the same) call.
CALL_SEPARATOR = ""
CALL_END = f"}}\n{TOOL_CALL_CLOSE}"


def call_begin(name: str) -> str:
    """What a call of `name` starts with, up to its arguments."""
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '


def call_text(name: str, arguments: str) -> str:
    """One call, exactly as the grammar has the model write it (`arguments`: JSON text)."""
    return f"{call_begin(name)}{arguments}{CALL_END}"


_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.S)
_ARGS_AT = re.compile(r'\s*\{\s*"name"\s*:\s*"(?:[^"\\]|\\.)*"\s*,\s*"arguments"\s*:\s*')


class ToolCallParseError(ValueError):
    """Generated tool-call text that is not a complete call (e.g. cut by max_tokens)."""


def parse_tool_call(text: str) -> list[dict] | None:
    """Tool calls in a generation constrained by a tool Constraint:
    `[{"name": str, "arguments": <JSON text, as generated>}]`, or None if it called no tool
    (then `text` is the answer). ToolCallParseError for a call left incomplete."""
    if TOOL_CALL_OPEN not in text:
        return None
    calls = [_read_call(body) for body in _CALL.findall(text)]
    if text.count(TOOL_CALL_OPEN) != len(calls):
        raise ToolCallParseError("the generation ended inside a tool call")
    return calls


def split_tool_calls(text: str) -> tuple[str, list[dict] | None]:
    """(text outside the tool calls, stripped; the calls or None)."""
    calls = parse_tool_call(text)
    if calls is None:
        return text, None
    return _CALL.sub("", text).strip(), calls


def _read_call(body: str) -> dict:
    try:
        wrapper = json.loads(body)
    except json.JSONDecodeError as error:
        raise ToolCallParseError(f"a tool call is not valid JSON: {error}") from error
    if (not isinstance(wrapper, dict) or not isinstance(wrapper.get("name"), str)
            or not isinstance(wrapper.get("arguments"), dict)):
        raise ToolCallParseError('a tool call must be {"name": <string>, "arguments": <object>}')
    # The arguments exactly as generated (what a stream of argument fragments adds up to).
    arguments = None
    match = _ARGS_AT.match(body)
    if match is not None:
        try:
            _, end = json.JSONDecoder().raw_decode(body, match.end())
            arguments = body[match.end():end]
        except json.JSONDecodeError:
            arguments = None
    if arguments is None:
        arguments = json.dumps(wrapper["arguments"], ensure_ascii=False)
    return {"name": wrapper["name"], "arguments": arguments}


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One streamed piece of a tool-call generation: `content` text, or for tool call `index`
    its `name` (first piece of that call) or a fragment of its `arguments` JSON text."""

    content: str | None = None
    index: int | None = None
    name: str | None = None
    arguments: str | None = None


class ToolCallStream:
    """Incremental `parse_tool_call` for streams: feed the text of each token, get deltas.

    Text outside tool calls comes out as `content` (held back only while it could be the start
    of `<tool_call>`); each call yields its name once, then its arguments as they are generated,
    so the fragments of a call add up to `parse_tool_call(text)[i]["arguments"]`."""

    _HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

    def __init__(self) -> None:
        self._buffer = ""
        self._mode = "text"  # text | header | arguments | tail
        self._calls = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def calls(self) -> int:
        return self._calls

    def feed(self, text: str) -> list[ToolCallDelta]:
        self._buffer += text
        out: list[ToolCallDelta] = []
        while True:
            before = (self._mode, len(self._buffer))
            getattr(self, f"_{self._mode}")(out)
            if (self._mode, len(self._buffer)) == before:
                return out

    def finish(self) -> list[ToolCallDelta]:
        """The end of the generation: held-back text; ToolCallParseError inside a call."""
        if self._mode != "text":
            raise ToolCallParseError("the generation ended inside a tool call")
        rest, self._buffer = self._buffer, ""
        return [ToolCallDelta(content=rest)] if rest else []

    def _text(self, out: list[ToolCallDelta]) -> None:
        at = self._buffer.find(TOOL_CALL_OPEN)
        if at >= 0:
            emit, self._buffer = self._buffer[:at], self._buffer[at + len(TOOL_CALL_OPEN):]
            self._mode = "header"
        else:
            keep = _partial_suffix(self._buffer, TOOL_CALL_OPEN)
            cut = len(self._buffer) - keep
            emit, self._buffer = self._buffer[:cut], self._buffer[cut:]
        if emit and (self._calls == 0 or emit.strip()):  # separators between calls are not content
            out.append(ToolCallDelta(content=emit))

    def _header(self, out: list[ToolCallDelta]) -> None:
        match = self._HEADER.match(self._buffer)
        if match is None or match.end() == len(self._buffer):
            # Not complete yet: whitespace may still follow (a malformed header never matches,
            # and finish() reports it).
            return
        out.append(ToolCallDelta(index=self._calls, name=json.loads(f'"{match.group(1)}"')))
        self._buffer = self._buffer[match.end():]
        self._mode, self._depth, self._in_string, self._escaped = "arguments", 0, False, False

    def _arguments(self, out: list[ToolCallDelta]) -> None:
        end = None
        for i, char in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        fragment = self._buffer if end is None else self._buffer[:end]
        self._buffer = "" if end is None else self._buffer[end:]
        if fragment:
            out.append(ToolCallDelta(index=self._calls, arguments=fragment))
        if end is not None:
            self._mode = "tail"

    def _tail(self, out: list[ToolCallDelta]) -> None:
        at = self._buffer.find(TOOL_CALL_CLOSE)
        if at >= 0:
            self._buffer = self._buffer[at + len(TOOL_CALL_CLOSE):]
            self._mode = "text"
            self._calls += 1


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
