"""Grammars on the router: validate and compile-check before a request is queued, and turn
OpenAI `response_format` / `tools` / `tool_choice` into one constraint for the shards.

The shards enforce the grammar (shard/grammar.py, xgrammar). The router's job is to make sure
only grammars that compile reach them, in bounded time:
- limits first, without compiling: grammar text at most MAX_GRAMMAR_CHARS; repetition bounds
  (`maxLength`, `maxItems`, ..., regex `{n,m}`) at most MAX_REPEAT, the one input whose compile
  time grows without bound (~50 µs per unit of `maxLength` on SmolLM2's vocabulary);
- then a real compile with the model's tokenizer on a worker thread (xgrammar releases the GIL,
  so the event loop keeps serving), awaited at most `timeout_s` (COMPILE_TIMEOUT_S). A compile
  that overruns answers "grammar is not valid: ... took longer than 5 s" and keeps running on its
  thread; its result is cached when it ends, and requests for the same grammar wait on that one
  compile instead of starting another;
- results, failures included, are cached by (type, sha256(text)), LRU-bounded.
The tokenizer and xgrammar (which imports torch and transformers) load on the first grammar,
outside the compile timeout.

TGI's native `grammar` (`json`/`json_object`: a schema object or its JSON text; `json_schema`:
`{name?, schema}`; `regex`: a string) becomes (GRAMMAR_TYPE_JSON | GRAMMAR_TYPE_REGEX, text).
Unlike TGI, a JSON schema need not have `properties`: any schema xgrammar compiles is accepted.

OpenAI (`constraint_for`): `response_format` `text` → none; `json_object` → any JSON object;
`json_schema{name, schema, strict}` → that schema (always enforced, whatever `strict` says). TGI's
`{type, value}` shapes are accepted in `response_format` and in the `grammar` extra too. Tools:
every tool call is written `<tool_call>\\n{"name": "<name>", "arguments": <JSON>}\\n</tool_call>`
(the Hermes / Qwen convention, which many chat templates use), constrained by an xgrammar
structural tag (GRAMMAR_TYPE_STRUCTURAL_TAG):
- `required`: one or more tool calls (one when `parallel_tool_calls` is false), nothing else;
- named: calls of that tool only;
- `auto`: free text; where the model writes `<tool_call>` a valid call of one of the tools must
  follow. With a `response_format`, the output is either content in that format or tool calls;
- `none`: no tool constraint (`response_format` still applies).
`parse_tool_call` reads the calls back ("no tool called" is None, and the text is the answer);
`ToolCallStream` does the same incrementally for streams (content, then per call its name and
argument fragments); `tool_prompt` describes the tools and the call format for chat templates
that do not render `tools` themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pytgi_proto import generate_pb2 as pb
from router.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 5.0
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_REPEAT = 50_000
CACHE_SIZE = 512

# Must equal shard.grammar.JSON_SCHEMA_OPTIONS (a test checks): the router predicts the shard.
JSON_SCHEMA_OPTIONS = {"any_whitespace": False, "strict_mode": True}

JSON = pb.GRAMMAR_TYPE_JSON
REGEX = pb.GRAMMAR_TYPE_REGEX
STRUCTURAL_TAG = pb.GRAMMAR_TYPE_STRUCTURAL_TAG

# Whitespace inside tool-call JSON: at most one character in a row (no runaway indentation).
_TAG_JSON_WHITESPACE = 1
_ANY_OBJECT = {"type": "object"}
_NO_PARAMETERS = {"type": "object", "properties": {}}
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_BOUNDED = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties",
            "maxContains", "minContains")
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


class GrammarError(ValueError):
    """A grammar or tool constraint the server will not run. `param` names the request field
    (OpenAI's error `param`); the TGI routes answer 422 "grammar is not valid: <message>"."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class GrammarNotSupported(GrammarError):
    """`--disable-grammar-support`, or shards without constrained decoding."""

    def __init__(self, param: str | None = None) -> None:
        super().__init__("grammar is not supported", param)


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
                value = json.loads(value)
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


def check_limits(grammar_type: int, text: str) -> None:
    """The cheap limits, before any compile (GrammarError)."""
    if not text:  # xgrammar compiles an empty regex, but the shards refuse an empty grammar
        raise GrammarError("the grammar is empty")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar is {len(text)} characters long; the limit is {MAX_GRAMMAR_CHARS}")
    if grammar_type == REGEX:
        _check_regex(text)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise GrammarError(f"the JSON schema is not valid JSON: {error}") from error
    _check_bounds(value)


def _check_regex(pattern: str) -> None:
    for low, high in _REPEAT.findall(pattern):
        for bound in (low, high):
            if bound and int(bound) > MAX_REPEAT:
                raise GrammarError(f"the regex repeats {bound} times; the limit is {MAX_REPEAT}")


def _check_bounds(value: Any) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            number = isinstance(item, (int, float)) and not isinstance(item, bool)
            if key in _BOUNDED and number and item > MAX_REPEAT:
                raise GrammarError(f"`{key}` is {item}; the limit is {MAX_REPEAT}")
            if key == "pattern" and isinstance(item, str):
                _check_regex(item)
            _check_bounds(item)
    elif isinstance(value, list):
        for item in value:
            _check_bounds(item)


# ------------------------------------------------------------------------------- compiling


def _clean(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return _CPP_PREFIX.sub("", text).strip()


def compile_with(compiler, grammar_type: int, text: str):
    """The shard's compile call (shard.grammar.compile_grammar), with the same options."""
    if grammar_type == JSON:
        return compiler.compile_json_schema(text, **JSON_SCHEMA_OPTIONS)
    if grammar_type == REGEX:
        return compiler.compile_regex(text)
    if grammar_type == STRUCTURAL_TAG:
        return compiler.compile_structural_tag(text)
    raise GrammarError(f"unknown grammar type {grammar_type}")


class GrammarValidator:
    """Compile-checks grammars off the event loop, bounded in time, cached by hash."""

    def __init__(self, tokenizer, *, disabled: bool = False, timeout_s: float = COMPILE_TIMEOUT_S,
                 cache_size: int = CACHE_SIZE, workers: int = 1) -> None:
        self.tokenizer = tokenizer  # router.tokenizer.Tokenizer (its `backend` and `eos_token_id`)
        self.disabled = disabled
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._compiler = None
        self._ready: Future | None = None
        # key → None (compiles) or the error message; and compiles still running.
        self._results: OrderedDict[tuple[int, bytes], str | None] = OrderedDict()
        self._running: dict[tuple[int, bytes], Future] = {}
        self.hits = self.compiles = 0

    async def check(self, grammar_type: int, text: str, param: str | None = None) -> None:
        """Return if the grammar compiles; GrammarError (with `param`) if not or not in time."""
        if self.disabled:
            raise GrammarNotSupported(param)
        key = (grammar_type, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
        if key in self._results:
            self._results.move_to_end(key)
            self.hits += 1
            message = self._results[key]
            if message is not None:
                raise GrammarError(message, param)
            return
        try:
            check_limits(grammar_type, text)
        except GrammarError as error:
            self._remember(key, error.message)
            raise GrammarError(error.message, param) from None
        try:
            await asyncio.wrap_future(self._start_init())
        except Exception as error:
            log.error("grammar support failed to load: %s", error)
            raise GrammarNotSupported(param) from error
        future = self._running.get(key)
        if future is None:
            self.compiles += 1
            future = self._executor.submit(self._compile, grammar_type, text)
            self._running[key] = future
            loop = asyncio.get_running_loop()

            def done(f: Future, key=key) -> None:
                try:
                    loop.call_soon_threadsafe(self._finished, key, f)
                except RuntimeError:  # the loop is gone (shutdown); nobody waits any more
                    self._running.pop(key, None)

            future.add_done_callback(done)
        else:
            self.hits += 1
        try:
            message = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout_s)
        except asyncio.TimeoutError:
            message = f"compiling the grammar took longer than {self.timeout_s:g} s"
        if message is not None:
            raise GrammarError(message, param)

    def _finished(self, key, future: Future) -> None:
        self._running.pop(key, None)
        error = future.exception()
        self._remember(key, _clean(error) if error is not None else future.result())

    def _remember(self, key, message: str | None) -> None:
        self._results[key] = message
        self._results.move_to_end(key)
        while len(self._results) > self.cache_size:
            self._results.popitem(last=False)

    def _start_init(self) -> Future:
        with self._lock:
            if self._ready is None or (self._ready.done() and self._ready.exception() is not None):
                self._ready = self._executor.submit(self._init)
            return self._ready

    def warm(self) -> None:
        """Load xgrammar and the tokenizer info in the background now (optional)."""
        if not self.disabled:
            self._start_init()

    def _init(self) -> None:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        backend = self.tokenizer.backend
        wrapped = PreTrainedTokenizerFast(tokenizer_object=backend)  # deep-copies the backend
        eos = getattr(self.tokenizer, "eos_token_id", None)
        info = xgr.TokenizerInfo.from_huggingface(wrapped, stop_token_ids=[eos] if eos is not None else None)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def _compile(self, grammar_type: int, text: str) -> str | None:
        """None when it compiles, else the reason (runs on the worker thread)."""
        try:
            if grammar_type == JSON:
                json.loads(text)
            compile_with(self._compiler, grammar_type, text)
        except json.JSONDecodeError as error:
            return f"the JSON schema is not valid JSON: {error}"
        except Exception as error:  # xgrammar: RuntimeError, pydantic's and its own errors
            return _clean(error)
        return None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_default: GrammarValidator | None = None


def set_default(validator: GrammarValidator | None) -> None:
    """The validator `constraint_for` uses when none is passed (the app's, set by Validator)."""
    global _default
    _default = validator


def get_default() -> GrammarValidator | None:
    return _default


# ----------------------------------------------------------------------- OpenAI constraints


@dataclass(frozen=True, slots=True)
class Constraint:
    grammar_type: int  # pb.GRAMMAR_TYPE_JSON, _REGEX or _STRUCTURAL_TAG
    grammar: str  # JSON schema text, regex, or structural tag JSON
    tool_call: bool  # the output may hold tool calls: read it with parse_tool_call


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: dict


async def constraint_for(request, validator: GrammarValidator | None = None) -> Constraint | None:
    """The constraint an OpenAI chat request asks for (None: unconstrained), compile-checked.

    `request` is duck-typed: `.response_format` (dict | None), `.tools` (list | None),
    `.tool_choice` (str | dict | None), `.grammar` (dict | None) and optionally
    `.parallel_tool_calls` (bool | None). Raises GrammarError with `param` set.
    """
    constraint = build_constraint(request)
    if constraint is None:
        return None
    validator = validator if validator is not None else _default
    if validator is not None:
        param = "tools" if constraint.tool_call else _content_param(request)
        await validator.check(constraint.grammar_type, constraint.grammar, param)
    return constraint


def _content_param(request) -> str:
    return "grammar" if getattr(request, "grammar", None) is not None else "response_format"


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
                {"type": "tags_with_separator", "tags": _tags(tools), "separator": "\n",
                 "at_least_one": True, "stop_after_first": single},
            ]}
    else:  # "required" or one tool's name
        chosen = tools if choice == "required" else [t for t in tools if t.name == choice]
        fmt = {"type": "tags_with_separator", "tags": _tags(chosen), "separator": "\n",
               "at_least_one": True, "stop_after_first": single}
    text = json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False, separators=(",", ":"))
    return Constraint(STRUCTURAL_TAG, text, tool_call=True)


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
        if any(t.name == name for t in out):
            raise GrammarError(f"two tools are named `{name}`", f"{param}.function.name")
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
        "begin": f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(tool.name)}, "arguments": ',
        "content": {"type": "json_schema", "json_schema": tool.parameters,
                    "max_whitespace_cnt": _TAG_JSON_WHITESPACE},
        "end": f"}}\n{TOOL_CALL_CLOSE}",
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
