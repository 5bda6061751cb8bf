"""Router grammars: TGI's `grammar`, OpenAI response_format / tools → Constraint (parsed by
router/openai/chat_fields.py, combined by router/openai/constraints.py), compile checks (limits,
timeout, cache), and reading tool calls back."""

from __future__ import annotations

import asyncio
import json

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string as accepts

import router.grammar.validator as rg
from pytgi_common.grammar import JSON_SCHEMA_OPTIONS, GrammarError
from pytgi_proto import generate_pb2 as pb
from router.errors import InvalidRequestError, ValidationError
from router.grammar.native import native_grammar, schema_text
from router.grammar.validator import GrammarNotSupported, GrammarValidator
from router.limits import Limits
from router.openai.constraints import Constraint, tool_prompt
from router.openai.requests import ChatRequest, parse_chat_request
from router.openai.routes import check_constraint
from router.openai.tool_calls import ToolCallDelta, ToolCallParseError, ToolCallStream, parse_tool_call, split_tool_calls
from router.schemas import parse_generate_request
from router.validation import Validator

LIMITS = Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=32,
                          max_total_tokens=64)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
NOARGS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, NOARGS]
ANSWER = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


WEATHER_CALL = call("get_weather", '{"city": "Paris", "unit": "c"}')
NOW_CALL = call("now", "{}")


def chat(**fields) -> ChatRequest:
    return parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **fields}, LIMITS)


def build_constraint(request: ChatRequest) -> Constraint | None:
    return request.constraint


def grammar_fields(c: Constraint) -> tuple[int, str, bool]:
    return c.grammar_type, c.grammar, c.tool_call


def constraint_for(request: ChatRequest, validator: GrammarValidator) -> Constraint | None:
    """The request's constraint, compile-checked as the chat route checks it."""
    asyncio.run(check_constraint(validator, request.constraint))
    return request.constraint


@pytest.fixture(scope="module")
def grammars(router_tokenizer):
    validator = GrammarValidator(router_tokenizer)
    yield validator
    validator.close()


def run(coro):
    return asyncio.run(coro)


def grammar_of(constraint: Constraint):
    if constraint.grammar_type == pb.GRAMMAR_TYPE_STRUCTURAL_TAG:
        return xgr.Grammar.from_structural_tag(constraint.grammar)
    if constraint.grammar_type == pb.GRAMMAR_TYPE_REGEX:
        return xgr.Grammar.from_regex(constraint.grammar)
    return xgr.Grammar.from_json_schema(constraint.grammar, **JSON_SCHEMA_OPTIONS)


def allowed(constraint: Constraint, *texts: str) -> list[bool]:
    grammar = grammar_of(constraint)
    return [accepts(grammar, text) for text in texts]


# -------------------------------------------------------------------------- TGI's `grammar`


def test_native_grammar_shapes():
    schema = {"properties": {"a": {"type": "integer"}}}
    assert native_grammar("json", schema) == (pb.GRAMMAR_TYPE_JSON, '{"properties":{"a":{"type":"integer"}}}')
    assert native_grammar("json", json.dumps(schema)) == native_grammar("json", schema)  # a JSON string
    assert native_grammar("json_schema", {"name": "x", "schema": schema}) == native_grammar("json", schema)
    assert native_grammar("regex", "[a-z]+") == (pb.GRAMMAR_TYPE_REGEX, "[a-z]+")
    order = native_grammar("json", {"properties": {"z": {}, "a": {}}})[1]
    assert order.index('"z"') < order.index('"a"')  # property order is generation order: kept
    for kind, value, message in [("json", "{oops", "not valid JSON"), ("json", [1], "JSON object"),
                                 ("json_schema", {"name": "x"}, "`schema`"), ("regex", 3, "string")]:
        with pytest.raises(GrammarError, match=message):
            native_grammar(kind, value)


def validate(validator, **params):
    request = parse_generate_request({"inputs": "Hello world", "parameters": params}, compat=True)
    return run(validator.validate(request))


def reason(validator, **params) -> str:
    with pytest.raises(ValidationError) as info:
        validate(validator, **params)
    assert info.value.status == 422
    return info.value.reason


def test_validator_passes_a_valid_grammar_on(router_tokenizer, grammars):
    validator = Validator(router_tokenizer, LIMITS, grammars)
    valid = validate(validator, grammar={"type": "json", "value": ANSWER})
    assert valid.parameters.grammar_type == pb.GRAMMAR_TYPE_JSON
    assert json.loads(valid.parameters.grammar) == ANSWER
    valid = validate(validator, grammar={"type": "json_object", "value": json.dumps(ANSWER)})
    assert json.loads(valid.parameters.grammar) == ANSWER
    valid = validate(validator, grammar={"type": "regex", "value": r"\d+"})
    assert (valid.parameters.grammar_type, valid.parameters.grammar) == (pb.GRAMMAR_TYPE_REGEX, r"\d+")
    assert validate(validator).parameters.grammar_type == pb.GRAMMAR_TYPE_NONE


@pytest.mark.parametrize("grammar, message", [
    ({"type": "json", "value": {"type": "foo"}}, 'Unsupported type "foo"'),
    ({"type": "json", "value": "{not json"}, "not valid JSON"),
    ({"type": "json", "value": {"$ref": "#/$defs/missing"}}, "$defs"),
    ({"type": "regex", "value": "(ab"}, "parenthesis"),
    ({"type": "json", "value": {"type": "string", "maxLength": 10**7}}, "about 10000000 elements"),
    ({"type": "regex", "value": "a{1,1000000}"}, "the regex is too large"),
    # Found by integration-tests/test_fuzz.py: xgrammar compiles "", the shards refuse it (424).
    ({"type": "regex", "value": ""}, "the grammar is empty"),
    ({"type": "json", "value": {"properties": {"p": {"type": "string", "pattern": "x{99999999}"}}}},
     "at `#/properties/p/pattern`"),
])
def test_invalid_grammars_are_422(router_tokenizer, grammars, grammar, message):
    validator = Validator(router_tokenizer, LIMITS, grammars)
    text = reason(validator, grammar=grammar)
    assert text.startswith("grammar is not valid: ") and message in text


REPEATED = {"type": "array", "maxItems": 1000, "items": {"type": "string", "maxLength": 1000}}


@pytest.mark.parametrize("grammar_type, grammar, where", [
    # Nested repeats multiply.
    (pb.GRAMMAR_TYPE_REGEX, "(a{1000}){1000}", None),
    (pb.GRAMMAR_TYPE_REGEX, r"(\p{L}{400}){400}", None),  # Python's parser refuses \p: the scan counts it
    (pb.GRAMMAR_TYPE_JSON, REPEATED, "#"),
    (pb.GRAMMAR_TYPE_JSON, {"type": "object", "properties": {"tags": REPEATED}}, "#/properties/tags"),
    (pb.GRAMMAR_TYPE_JSON, {"$defs": {"s": {"type": "string", "maxLength": 2000}}, "type": "array",
                            "items": {"$ref": "#/$defs/s"}, "maxItems": 100}, "#"),
    # Repeats in sequence add up.
    (pb.GRAMMAR_TYPE_REGEX, "a{50000}" * 3, None),
    (pb.GRAMMAR_TYPE_JSON, {"type": "object", "properties": {
        k: {"type": "string", "maxLength": 50000} for k in "abc"}}, "#"),
    # Regexes in keys: patternProperties and propertyNames.
    (pb.GRAMMAR_TYPE_JSON, {"type": "object", "patternProperties": {"^(k{500}){500}$": {"type": "integer"}}},
     "#/patternProperties/^(k{500}){500}$"),
    (pb.GRAMMAR_TYPE_JSON, {"type": "object", "maxProperties": 1000,
                            "patternProperties": {"^k{200}$": {"type": "integer"}}}, "#"),
    (pb.GRAMMAR_TYPE_JSON, {"type": "object", "propertyNames": {"pattern": "(x{500}){500}"}},
     "#/propertyNames/pattern"),
    # A structural tag adds up the schemas and regexes it holds.
    (pb.GRAMMAR_TYPE_STRUCTURAL_TAG, {"type": "structural_tag", "format": {"type": "or", "elements": [
        {"type": "regex", "pattern": "a{60000}"}, {"type": "json_schema",
                                                   "json_schema": {"type": "string", "maxLength": 60000}}]}}, None),
])
def test_nested_and_cumulative_repeats_are_rejected(grammar_type, grammar, where):
    text = grammar if isinstance(grammar, str) else json.dumps(grammar)
    with pytest.raises(GrammarError) as info:
        rg.check_limits(grammar_type, text)
    message = info.value.message
    assert f"the limit is {rg.MAX_GRAMMAR_COST}" in message and "nested repeats multiply" in message
    if where is not None and where != "#":
        assert f"at `{where}`" in message
    elif where == "#":
        assert " at `" not in message


@pytest.mark.parametrize("grammar_type, grammar", [
    (pb.GRAMMAR_TYPE_REGEX, "a{50000}"),
    (pb.GRAMMAR_TYPE_REGEX, r"(\d{3}-){3}\d{4}"),
    (pb.GRAMMAR_TYPE_JSON, {"type": "string", "maxLength": 50000}),
    (pb.GRAMMAR_TYPE_JSON, {"type": "array", "maxItems": 100, "items": {"type": "string", "maxLength": 500}}),
    (pb.GRAMMAR_TYPE_JSON, {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
                            "$ref": "#/$defs/n"}),  # recursion counts as a loop
    (pb.GRAMMAR_TYPE_JSON, ANSWER),
])
def test_bounded_grammars_pass_the_limits(grammar_type, grammar):
    rg.check_limits(grammar_type, grammar if isinstance(grammar, str) else json.dumps(grammar))


def test_grammar_size_limit(router_tokenizer, grammars, monkeypatch):
    monkeypatch.setattr(rg, "MAX_GRAMMAR_CHARS", 100)
    validator = Validator(router_tokenizer, LIMITS, grammars)
    assert "the limit is 100" in reason(validator, grammar={"type": "regex", "value": "a" * 101})


def test_disabled_grammar_support(router_tokenizer):
    validator = Validator(router_tokenizer, LIMITS, GrammarValidator(router_tokenizer, disabled=True))
    assert reason(validator, grammar={"type": "regex", "value": "a"}) == "grammar is not supported"
    with pytest.raises(GrammarNotSupported):
        run(validator.grammar.check(pb.GRAMMAR_TYPE_REGEX, "a"))
    for fields, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"grammar": {"type": "regex", "value": "a"}}, "grammar"),
                          ({"tools": TOOLS}, "tools")):
        with pytest.raises(InvalidRequestError) as info:
            constraint_for(chat(**fields), validator.grammar)
        assert info.value.param == param and info.value.code == "unsupported_parameter"
        assert info.value.message.startswith(f"'{param}' is not supported by this server")


# ------------------------------------------------------------------------ compile machinery


def test_results_are_cached_by_hash(router_tokenizer):
    validator = GrammarValidator(router_tokenizer)
    try:
        run(validator.check(pb.GRAMMAR_TYPE_REGEX, "[0-9]+"))
        run(validator.check(pb.GRAMMAR_TYPE_REGEX, "[0-9]+"))
        assert (validator.compiles, validator.hits) == (1, 1)
        for _ in range(2):  # failures are remembered too
            with pytest.raises(GrammarError, match="parenthesis"):
                run(validator.check(pb.GRAMMAR_TYPE_REGEX, "(x"))
        assert (validator.compiles, validator.hits) == (2, 2)
    finally:
        validator.close()


def test_event_loop_keeps_running_during_a_real_slow_compile(router_tokenizer):
    validator = GrammarValidator(router_tokenizer, timeout_s=0.3)
    schema = json.dumps({"type": "string", "maxLength": 40000})  # ~1-2 s of compiling

    async def scenario():
        await validator.check(pb.GRAMMAR_TYPE_REGEX, "warm")  # load xgrammar first
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        with pytest.raises(GrammarError, match="took longer"):
            await validator.check(pb.GRAMMAR_TYPE_JSON, schema)
        task.cancel()
        assert ticks >= 10

    try:
        run(scenario())
    finally:
        validator.close()


# ---------------------------------------------------------------- OpenAI → Constraint


def test_no_constraint():
    assert build_constraint(chat()) is None
    assert build_constraint(chat(response_format={"type": "text"})) is None
    assert build_constraint(chat(tools=TOOLS, tool_choice="none")) is None
    assert build_constraint(chat(tool_choice="auto")) is None  # auto without tools: nothing to call


def test_json_object(grammars):
    c = constraint_for(chat(response_format={"type": "json_object"}), grammars)
    assert c.grammar_type == pb.GRAMMAR_TYPE_JSON and not c.tool_call
    assert allowed(c, '{"anything": [1, 2]}', "[1]", '"x"', "text") == [True, False, False, False]


def test_json_schema(grammars):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    c = constraint_for(chat(response_format=fmt), grammars)
    assert grammar_fields(c) == (pb.GRAMMAR_TYPE_JSON, schema_text(ANSWER), False)
    assert allowed(c, '{"answer": 42}', '{"answer": "x"}') == [True, False]
    # No schema: any object.
    c = build_constraint(chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}))
    assert allowed(c, '{"a": 1}') == [True]


def test_tgi_shapes_in_response_format_and_grammar():
    for c in (build_constraint(chat(response_format={"type": "json", "value": ANSWER})),
              build_constraint(chat(grammar={"type": "json", "value": ANSWER})),
              build_constraint(chat(response_format={"type": "json_object", "value": ANSWER})),
              build_constraint(chat(response_format={"type": "json_schema", "value": {"schema": ANSWER}}))):
        assert grammar_fields(c) == (pb.GRAMMAR_TYPE_JSON, schema_text(ANSWER), False)
    c = build_constraint(chat(response_format={"type": "regex", "value": "(yes|no)"}))
    assert grammar_fields(c) == (pb.GRAMMAR_TYPE_REGEX, "(yes|no)", False)


@pytest.mark.parametrize("fields, param, message", [
    # The shapes' own rules are tests/router/openai/test_requests.py's; these are TGI's values.
    ({"grammar": {"type": "json", "value": "{not json"}}, "grammar.value", "the JSON schema is not valid JSON"),
    ({"grammar": {"type": "json_schema", "value": {"name": "x"}}}, "grammar.value", "an object with a `schema`"),
    ({"response_format": {"type": "json", "value": [1]}}, "response_format.value", "must be a JSON object"),
    ({"response_format": {"type": "regex", "value": 3}}, "response_format.value", "a regular expression string"),
])
def test_tgi_shaped_values_are_checked_where_they_are_parsed(fields, param, message):
    with pytest.raises(InvalidRequestError) as info:
        chat(**fields)
    assert info.value.param == param and message in info.value.message


def test_bad_schema_is_reported_on_its_parameter(grammars):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    with pytest.raises(InvalidRequestError, match="Unsupported type") as info:
        constraint_for(chat(response_format=fmt), grammars)
    assert info.value.param == "response_format" and info.value.code == "invalid_value"
    with pytest.raises(InvalidRequestError, match="Unsupported type") as info:
        constraint_for(chat(grammar={"type": "json", "value": {"type": "nope"}}), grammars)
    assert info.value.param == "grammar"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nope"}}}]
    with pytest.raises(InvalidRequestError) as info:
        constraint_for(chat(tools=tools, tool_choice="required"), grammars)
    assert info.value.param == "tools"


def test_required_forces_calls_of_the_tools(grammars):
    c = constraint_for(chat(tools=TOOLS, tool_choice="required"), grammars)
    assert c.grammar_type == pb.GRAMMAR_TYPE_STRUCTURAL_TAG and c.tool_call
    # Calls come back to back: a newline after a call would not be a choice to end or go on.
    assert allowed(c, WEATHER_CALL, NOW_CALL, WEATHER_CALL + NOW_CALL, WEATHER_CALL + "\n" + NOW_CALL, "Sure!", "",
                   call("get_weather", '{"city": "Paris"}'), call("other", "{}"), WEATHER_CALL + "\n") == [
        True, True, True, False, False, False, False, False, False]
    single = build_constraint(chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    assert allowed(single, WEATHER_CALL, WEATHER_CALL + NOW_CALL) == [True, False]


def test_named_tool_choice(grammars):
    for choice in ("now", {"type": "function", "function": {"name": "now"}}):
        c = constraint_for(chat(tools=TOOLS, tool_choice=choice), grammars)
        assert c.tool_call and allowed(c, NOW_CALL, WEATHER_CALL, "hi", NOW_CALL + NOW_CALL) == [
            True, False, False, False]


@pytest.mark.parametrize("fields", [
    {"tool_choice": "now"}, {"tool_choice": "required", "parallel_tool_calls": False},
    {"tool_choice": "auto", "parallel_tool_calls": False}])
def test_a_single_call_ends_the_grammar(smollm2_folder, fields):
    """Once the only call allowed is complete, nothing but the stop token may follow: the shard
    finishes the request there (GrammarState.complete) instead of generating to max_tokens."""
    from transformers import AutoTokenizer

    from pytgi_common.grammar import tokenizer_info
    from shard.grammar import GrammarState

    hf = AutoTokenizer.from_pretrained(smollm2_folder)
    eos = hf.convert_tokens_to_ids("<|im_end|>")
    compiler = xgr.GrammarCompiler(tokenizer_info(hf, None, [eos]), cache_enabled=False)
    c = build_constraint(chat(tools=TOOLS, **fields))
    state = GrammarState(xgr.GrammarMatcher(compiler.compile_structural_tag(c.grammar)), frozenset([eos]),
                         len(hf))
    text = NOW_CALL if fields["tool_choice"] == "now" else WEATHER_CALL
    assert all(state.accept(t) for t in hf.encode(text, add_special_tokens=False))
    assert state.complete()


def test_auto_allows_text_or_a_tool_call(grammars):
    for c in (constraint_for(chat(tools=TOOLS), grammars),
              constraint_for(chat(tools=TOOLS, tool_choice="auto"), grammars)):
        assert c.grammar_type == pb.GRAMMAR_TYPE_STRUCTURAL_TAG and c.tool_call
        assert allowed(c, "The weather is fine.", "", WEATHER_CALL, "Let me check.\n" + WEATHER_CALL,
                       "text <tool_call>\nnot json", call("other", "{}")) == [True, True, True, True, False, False]
    single = build_constraint(chat(tools=TOOLS, parallel_tool_calls=False))
    assert allowed(single, WEATHER_CALL, WEATHER_CALL + NOW_CALL, WEATHER_CALL + "\n" + NOW_CALL) == [
        True, False, False]


def test_auto_with_response_format_applies_it_to_content(grammars):
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}
    c = constraint_for(chat(tools=TOOLS, response_format=fmt), grammars)
    assert c.tool_call
    assert allowed(c, '{"answer": 4}', WEATHER_CALL, "free text", '{"answer": "x"}') == [True, True, False, False]
    c = constraint_for(chat(tools=TOOLS, response_format={"type": "regex", "value": "(yes|no)"}), grammars)
    assert allowed(c, "yes", NOW_CALL, "maybe") == [True, True, False]
    # tool_choice none: only the response format; required: only calls.
    c = build_constraint(chat(tools=TOOLS, tool_choice="none", response_format=fmt))
    assert grammar_fields(c) == (pb.GRAMMAR_TYPE_JSON, schema_text(ANSWER), False)
    c = build_constraint(chat(tools=TOOLS, tool_choice="required", response_format=fmt))
    assert allowed(c, '{"answer": 4}', NOW_CALL) == [False, True]


# ------------------------------------------------------------------------ tool-call output


def test_parse_tool_call():
    assert parse_tool_call("Just an answer.") is None
    assert parse_tool_call('{"name": "now", "arguments": {}}') is None  # no tags: not a call
    assert parse_tool_call(WEATHER_CALL) == [{"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}]
    assert parse_tool_call(WEATHER_CALL + "\n" + NOW_CALL) == [
        {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}, {"name": "now", "arguments": "{}"}]
    # Arguments are returned as generated (json.loads-able text), not re-serialized.
    raw = call("f", '{"x":1.0,"y":[1e3]}')
    assert parse_tool_call(raw) == [{"name": "f", "arguments": '{"x":1.0,"y":[1e3]}'}]
    assert json.loads(parse_tool_call(raw)[0]["arguments"]) == {"x": 1.0, "y": [1000.0]}
    assert split_tool_calls("Checking.\n" + NOW_CALL) == ("Checking.", [{"name": "now", "arguments": "{}"}])
    assert split_tool_calls("plain") == ("plain", None)


@pytest.mark.parametrize("text, message", [
    ('<tool_call>\n{"name": "now", "argu', "ended inside a tool call"),
    ("<tool_call>\nnot json\n</tool_call>", "not valid JSON"),
    ('<tool_call>\n{"name": "now"}\n</tool_call>', '{"name": <string>, "arguments": <object>}'),
])
def test_parse_tool_call_errors(text, message):
    with pytest.raises(ToolCallParseError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_tool_call(text)


def test_tool_prompt_names_the_tools_and_the_format():
    tools = chat(tools=TOOLS).tools
    prompt = tool_prompt(tools)
    assert "get_weather" in prompt and '"name": "now"' in prompt and "<tool_call>" in prompt
    assert prompt.startswith("You may call one or more of these functions:")
    # TGI's `tool_prompt` leads instead; the call format the grammar enforces is always stated.
    led = tool_prompt(tools, "Pick a function.")
    assert led.startswith("Pick a function.\n<tools>") and "<tool_call>" in led


@pytest.mark.parametrize("separator", ["\n", ""])  # "": back to back, as the grammar writes them
@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_tool_call_stream_adds_up_to_parse_tool_call(chunk, separator):
    text = ("Let me check. " + call("get_weather", '{"city": "Pa}ri\\"s", "n": [1, {"a": "]"}]}') + separator
            + NOW_CALL)
    stream = ToolCallStream()
    deltas = []
    for i in range(0, len(text), chunk):
        deltas += stream.feed(text[i:i + chunk])
    deltas += stream.finish()
    calls = parse_tool_call(text)
    assert "".join(d.content for d in deltas if d.content is not None) == "Let me check. "
    assert [d.name for d in deltas if d.name is not None] == [c["name"] for c in calls]
    for index, expected in enumerate(calls):
        assert "".join(d.arguments for d in deltas if d.index == index and d.arguments is not None) == \
            expected["arguments"]
    # the name comes before any argument fragment of its call
    firsts = [next(i for i, d in enumerate(deltas) if d.index == n) for n in (0, 1)]
    assert all(deltas[i].name is not None for i in firsts)
    assert stream.calls == 2


def test_tool_call_stream_plain_text_and_truncation():
    stream = ToolCallStream()
    assert stream.feed("No tools <tool") == [ToolCallDelta(content="No tools ")]  # "<tool" held back
    assert stream.feed("s here") == [ToolCallDelta(content="<tools here")]
    assert stream.finish() == []
    stream = ToolCallStream()
    stream.feed('<tool_call>\n{"name": "now", "arguments": {')
    with pytest.raises(ToolCallParseError):
        stream.finish()
