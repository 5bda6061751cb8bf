"""Grammars on the router: validate and compile-check before a request is queued, and turn
OpenAI `response_format` / `tools` / `tool_choice` into one constraint for the shards.

The shards enforce the grammar (shard/grammar.py, xgrammar). The router's job is to make sure
that a grammar's cost is bounded before its request is queued, and that no shard compiles while
other requests wait on it. `GrammarValidator.check`, in order:
1. limits, without compiling: the text is at most MAX_GRAMMAR_CHARS; its estimated size with
   every repeat written out (router/grammar_cost.py: nested repeats multiply, repeats in
   sequence add up, regexes inside schemas count) is at most MAX_GRAMMAR_COST;
2. a real compile with the model's tokenizer in a child process (router/grammar_worker.py),
   killed at COMPILE_TIMEOUT_S (its start-up is not counted): an overrun is "grammar is not
   valid: compiling the grammar took longer than 5 s", and so is every later check of the same
   grammar. Requests for the same grammar share one compile. At most MAX_WAITING_COMPILES
   compiles wait for the child; a request that would wait beyond that is refused with 429
   (OverloadedError: the server is busy, the grammar may be fine; retry later). A waiting
   compile whose requests have all gone (client disconnected) is dropped without running;
3. with shards (`shards`, the app's ShardedClient): the same compile on every shard
   (CompileGrammar), on each shard's grammar thread, within the same deadline. Each shard keeps
   the grammar pinned in its cache while any request handler that checked it is running (the
   pin is released, ReleaseGrammar, when the last such asyncio task ends), so the Prefill of
   every one of those requests finds it compiled. A shard that rejects the grammar or overruns
   makes it rejected here too.
Results (rejections included) are cached by (type, sha256(text)), LRU-bounded, so a rejected
grammar stays rejected and an accepted one is checked in microseconds.

TGI's native `grammar` (`json`/`json_object`: a schema object or its JSON text; `json_schema`:
`{name?, schema}`; `regex`: a string) becomes (GRAMMAR_TYPE_JSON | GRAMMAR_TYPE_REGEX, text).
Unlike TGI, a JSON schema need not have `properties`: any schema xgrammar compiles is accepted.

OpenAI (`constraint_for`): `response_format` `text` → none; `json_object` → any JSON object;
`json_schema{name, schema, strict}` → that schema (always enforced, whatever `strict` says). TGI's
`{type, value}` shapes are accepted in `response_format` and in the `grammar` extra too. Tools:
every tool call is written `<tool_call>\\n{"name": "<name>", "arguments": <JSON>}\\n</tool_call>`
(the Hermes / Qwen convention, which many chat templates use; several calls back to back, see
router.tool_calls.CALL_SEPARATOR), constrained by an xgrammar structural tag
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

import asyncio
import hashlib
import json
import logging
import re
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pytgi_proto import generate_pb2 as pb
from router import bounds
from router.client import ShardedClient
from router.errors import OverloadedError
from router.grammar_cost import Estimate, regex_cost, schema_estimate, structural_tag_estimate
from router.grammar_pins import ShardGrammars
from router.grammar_worker import (  # JSON_SCHEMA_OPTIONS: the shard's options, a test compares them
    JSON_SCHEMA_OPTIONS,  # noqa: F401
    CompileQueue,
    CompileWorker,
    QueueFull,
    WorkerError,
)
from router.tool_calls import CALL_END, CALL_SEPARATOR, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, call_begin

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 5.0
MAX_GRAMMAR_CHARS = 256 * 1024
# The one cost limit: a grammar's size with its repeats written out (router/grammar_cost.py).
# Twice the largest single repeat accepted before (50,000: a `maxLength` that compiled in ~2.5 s
# on SmolLM2's vocabulary), so a grammar with one such repeat still passes while sequences and
# nests of them do not. The compile deadline remains the backstop for what the estimate misses.
MAX_GRAMMAR_COST = 100_000
# Compiles waiting for the compile process (the running one not counted). Beyond it: 429. At
# worst the queue drains in MAX_WAITING_COMPILES x COMPILE_TIMEOUT_S; compiles take milliseconds.
MAX_WAITING_COMPILES = 16
CACHE_SIZE = 512
# Grammars longer than this have their cost estimated off the event loop (a Python parse).
_OFFLOAD_CHARS = 16 * 1024

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


def grammar_key(grammar_type: int, text: str) -> tuple[int, bytes]:
    """What grammars are cached by, here and on the shards (shard.grammar.grammar_key)."""
    return grammar_type, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def check_limits(grammar_type: int, text: str) -> None:
    """The limits checked before any compile (GrammarError)."""
    if not text:  # xgrammar compiles an empty regex, but the shards refuse an empty grammar
        raise GrammarError("the grammar is empty")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar is {len(text)} characters long; the limit is {MAX_GRAMMAR_CHARS}")
    if grammar_type == REGEX:
        estimate, what = Estimate(regex_cost(text), None), "regex"
    elif grammar_type in (JSON, STRUCTURAL_TAG):
        try:
            value = json.loads(text)
            if grammar_type == JSON:
                estimate, what = schema_estimate(value, MAX_GRAMMAR_COST), "JSON schema"
            else:
                estimate, what = structural_tag_estimate(value, MAX_GRAMMAR_COST), "structural tag"
        except RecursionError:
            raise GrammarError("the grammar is nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, or an integer of more than 4300 digits
            raise GrammarError(f"the JSON schema is not valid JSON: {error}") from error
    else:
        raise GrammarError(f"unknown grammar type {grammar_type}")
    if estimate.cost > MAX_GRAMMAR_COST:
        where = f" at `{estimate.where}`" if estimate.where and estimate.where != "#" else ""
        raise GrammarError(
            f"the {what} is too large: with its repeats written out it comes to about {estimate.cost} "
            f"elements{where} (nested repeats multiply, repeats in sequence add up); "
            f"the limit is {MAX_GRAMMAR_COST}")


# ------------------------------------------------------------------------------- checking


@dataclass(eq=False, slots=True)
class _Compile:
    """One compile in the child process, shared by every request that waits for its result."""

    future: Future  # CompileWorker.compile's: None, or why the grammar does not compile
    waiters: int = 0


class GrammarValidator:
    """Checks grammars before their requests are queued (see the module docstring)."""

    def __init__(self, tokenizer, *, disabled: bool = False, timeout_s: float = COMPILE_TIMEOUT_S,
                 cache_size: int = CACHE_SIZE, max_waiting: int = MAX_WAITING_COMPILES,
                 shards: ShardedClient | None = None, compile_delay_s: float = 0.0) -> None:
        """`tokenizer`: router.tokenizer.Tokenizer (its `backend` and `eos_token_id`); `shards`:
        prepare grammars on them too (None: router-side checks only, as in unit tests);
        `compile_delay_s`: every compile takes that much longer (tests of overruns)."""
        self.disabled = disabled
        self.cache_size = cache_size
        eos = getattr(tokenizer, "eos_token_id", None)
        worker = CompileWorker(lambda: tokenizer.backend.to_str(), [eos] if eos is not None else [],
                               timeout_s=timeout_s, delay_s=compile_delay_s)
        self._queue = CompileQueue(worker, max_waiting)
        # The child process ends with the validator even if nobody calls close().
        self._close = weakref.finalize(self, self._queue.close)
        self._results: OrderedDict[tuple[int, bytes], str | None] = OrderedDict()  # None: compiles
        self._compiles: dict[tuple[int, bytes], _Compile] = {}
        self._shards = ShardGrammars(shards, timeout_s) if shards is not None else None
        self.hits = self.compiles = 0

    @property
    def worker(self) -> CompileWorker:
        return self._queue.worker

    @property
    def queue(self) -> CompileQueue:
        return self._queue

    async def check(self, grammar_type: int, text: str, param: str | None = None) -> None:
        """Return if the grammar compiles (here and, with shards, on every shard); GrammarError
        (with `param`) if not or not in time; OverloadedError if too many compiles wait."""
        if self.disabled:
            raise GrammarNotSupported(param)
        key = grammar_key(grammar_type, text)
        message = await self._compiled(key, grammar_type, text, param)
        if message is None and self._shards is not None:
            message = await self._shards.prepare(key, grammar_type, text)
            if message is not None:
                self._remember(key, message)  # rejected by a shard: rejected here too, from now on
        if message is not None:
            raise GrammarError(message, param)

    async def _compiled(self, key, grammar_type: int, text: str, param: str | None) -> str | None:
        if key not in self._results and key not in self._compiles:
            message = await self._limits(grammar_type, text)
            if message is not None:
                self._remember(key, message)
                return message
        if key in self._results:
            self._results.move_to_end(key)
            self.hits += 1
            return self._results[key]
        job = self._compiles.get(key)
        if job is None:
            try:
                job = _Compile(self._queue.submit(grammar_type, text))
            except QueueFull:
                raise OverloadedError(f"Model is overloaded: {self._queue.max_waiting} grammars are waiting to "
                                      "be compiled; retry later") from None
            except WorkerError as error:
                raise GrammarNotSupported(param) from error
            self._compiles[key] = job
            self.compiles += 1
            # Settled when the compile ends, whoever still waits: a compile whose clients all left
            # while it ran is still remembered (an overrun stays rejected) and never lingers here.
            loop = asyncio.get_running_loop()
            job.future.add_done_callback(lambda _, key=key, job=job: _on_loop(loop, self._settled, key, job))
        else:
            self.hits += 1
        job.waiters += 1
        try:
            await _done(job.future)
        finally:
            job.waiters -= 1
            if job.waiters == 0:
                self._queue.abandon(job.future)  # nobody waits: dropped if it has not started
        error = None if job.future.cancelled() else job.future.exception()
        if job.future.cancelled() or error is not None:  # closed, or xgrammar / the tokenizer failed
            log.error("grammar support is unavailable: %s", error or "the compiler is closed")
            raise GrammarNotSupported(param) from error
        return job.future.result()

    def _settled(self, key, job: _Compile) -> None:
        if self._compiles.get(key) is job:
            del self._compiles[key]
        if not job.future.cancelled() and job.future.exception() is None:
            self._remember(key, job.future.result())

    @staticmethod
    async def _limits(grammar_type: int, text: str) -> str | None:
        try:
            if len(text) > _OFFLOAD_CHARS:
                await asyncio.to_thread(check_limits, grammar_type, text)
            else:
                check_limits(grammar_type, text)
        except GrammarError as error:
            return error.message
        return None

    def _remember(self, key, message: str | None) -> None:
        self._results[key] = message
        self._results.move_to_end(key)
        while len(self._results) > self.cache_size:
            self._results.popitem(last=False)

    # -- lifecycle ------------------------------------------------------------------------

    def pinned(self, grammar_type: int, text: str) -> int:
        """Request handlers holding this grammar pinned on the shards (0 without shards)."""
        return self._shards.holders(grammar_key(grammar_type, text)) if self._shards is not None else 0

    def warm(self) -> Future | None:
        """Start the compile process in the background now (optional); done when it is ready."""
        return None if self.disabled else self._queue.submit(None)

    def close(self) -> None:
        """Kill the compile process and stop its thread; later checks say "not supported"."""
        self._close()


def _on_loop(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run `callback(*args)` on `loop` (from any thread); nothing once the loop is closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: the router is gone, and so is whatever waited
        pass


async def _done(future: Future) -> None:
    """Wait for a concurrent future on the running loop. Cancelling the wait leaves the future
    alone (others may wait on it; `abandon` decides whether it runs)."""
    if future.done():
        return
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: Future) -> None:
        try:
            loop.call_soon_threadsafe(_set_done, waiter)
        except RuntimeError:  # that loop is closed: nobody waits there any more
            pass

    future.add_done_callback(wake)
    await waiter


def _set_done(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
    free_text: bool = False  # free text until a call's tag (tool_choice "auto"): room for reasoning


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
    if constraint is not None:
        await check_constraint(request, constraint, validator)
    return constraint


async def check_constraint(request, constraint: Constraint, validator: GrammarValidator | None = None) -> None:
    """The compile check of `build_constraint(request)`'s result (GrammarError with `param`)."""
    validator = validator if validator is not None else _default
    if validator is not None:
        param = "tools" if constraint.tool_call else _content_param(request)
        await validator.check(constraint.grammar_type, constraint.grammar, param)


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
