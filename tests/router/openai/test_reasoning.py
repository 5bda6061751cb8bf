"""Reasoning models: `<think>…</think>` → `reasoning_content`, apart from `content`.

The incremental parser against the whole-text split at every cut; the chat shaper (stream and
not); `chat_template_kwargs` reaching the template; and the OpenAI route over a scripted Infer
whose tokens spell a thinking answer, with the served tokenizer carrying a thinking template."""

from __future__ import annotations

import asyncio
import json
from itertools import combinations

import pytest

from router.errors import InvalidRequestError
from router.events import Finish, TokenEvent, TokenInfo
from router.limits import Limits
from router.openai import reasoning
from router.openai.chat_template import ChatTemplate
from router.openai.reasoning import ReasoningStream, split_reasoning
from router.openai.requests import parse_chat_request
from router.openai.responses import ChatShaper, Choice
from tests.router.openai.test_routes import MESSAGES, run, sse

LIMITS = Limits(max_stop_sequences=4, max_top_n_tokens=5, max_client_batch_size=4, vocab_size=49152,
                      max_input_tokens=4096, max_total_tokens=8192)

# Qwen3's shape: the generation prompt is open; `enable_thinking: false` closes an empty think block.
THINK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# DeepSeek-R1's shape: the generation prompt opens `<think>` itself.
OPEN_THINK_TEMPLATE = (
    "{%- for message in messages %}{{ message.role }}: {{ message.content }}\n{%- endfor %}"
    "{%- if add_generation_prompt %}assistant: <think>\n{%- endif %}{# </think> closes it #}"
)

CASES = [
    # (text, starts inside, reasoning, content)
    ("<think>\nplan it\n</think>\n\nthe answer", False, "plan it\n", "the answer"),
    ("  <think>a<b</think>c</think>", False, "a<b", "c</think>"),
    ("plan</think>answer <think>x</think>", True, "plan", "answer <think>x</think>"),
    ("no reasoning here </think> at all", False, None, "no reasoning here </think> at all"),
    ("<thinking> is not the tag", False, None, "<thinking> is not the tag"),
    ("cut short before the end </thi", True, "cut short before the end </thi", ""),
    ("<think>cut inside", False, "cut inside", ""),
    ("<thi", False, None, "<thi"),
    ("", True, "", ""),
    ("</think>", True, "", ""),
]


def feed_all(pieces: list[str], inside: bool) -> tuple[list[str], list[str], bool]:
    stream = ReasoningStream(inside)
    reasoning_parts, content_parts = [], []
    for piece in pieces:
        split = stream.feed(piece)
        reasoning_parts.append(split.reasoning)
        content_parts.append(split.content)
    last = stream.finish()
    reasoning_parts.append(last.reasoning)
    content_parts.append(last.content)
    return reasoning_parts, content_parts, stream.has_reasoning


@pytest.mark.parametrize("text,inside,want_reasoning,want_content", CASES)
def test_whole_text(text, inside, want_reasoning, want_content):
    assert split_reasoning(text, inside) == (want_reasoning, want_content)


@pytest.mark.parametrize("text,inside,want_reasoning,want_content", CASES)
def test_every_split_gives_the_whole_text_answer(text, inside, want_reasoning, want_content):
    cuts = [()] + [(i,) for i in range(1, len(text))] + list(combinations(range(1, len(text)), 2))
    for cut in cuts + [tuple(range(1, len(text)))]:  # and one character at a time
        bounds = [0, *cut, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        reasoning_parts, content_parts, has = feed_all(pieces, inside)
        got = ("".join(reasoning_parts) if has else None, "".join(content_parts))
        assert got == (want_reasoning, want_content), cut
        # A tag is never split across an emitted piece: no part shows a tag's beginning it then drops.
        for part in reasoning_parts + content_parts:
            assert part in (want_reasoning or "") or part in want_content, (cut, part)


def test_resolve():
    assert reasoning.resolve("auto", THINK_TEMPLATE)
    assert not reasoning.resolve("auto", "{{ messages }} <think>")
    assert not reasoning.resolve("auto", None)
    assert not reasoning.resolve("none", THINK_TEMPLATE)
    assert reasoning.resolve("deepseek_r1", None)
    assert reasoning.starts_inside("assistant: <think>\n")
    assert not reasoning.starts_inside("<think>\n\n</think>\n\n")


def test_launcher_offers_the_routers_parsers():
    from launcher.cli import main

    option = next(p for p in main.params if p.name == "reasoning_parser")
    assert tuple(option.type.choices) == reasoning.CHOICES


# ---------------------------------------------------------------------------------- shaping


def finish(text: str, reason: str = "eos_token", tokens: int = 1) -> Finish:
    return Finish(generated_text=text, finish_reason=reason, generated_tokens=tokens, seed=None, prefill=(),
                  input_length=3, queued_at=0.0, batched_at=0.0, finished_at=0.0)


def events(pieces: list[str], reason: str = "eos_token") -> list[TokenEvent]:
    done = finish("".join(pieces), reason, len(pieces))
    return [TokenEvent(i, TokenInfo(100 + i, p, -0.5, False), (), done if i == len(pieces) - 1 else None, p)
            for i, p in enumerate(pieces)]


def stream_fields(shaper: ChatShaper, pieces: list[str], reason: str = "eos_token") -> tuple[str, str, list]:
    chunks = [c for e in events(pieces, reason) for c in shaper.chunks(0, e)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    thought = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d["content"] or "" for d in deltas)
    return thought, content, chunks


PIECES = ["<th", "ink", ">\nI", " should", " greet.</", "thi", "nk>\n", "\nHel", "lo!"]


def test_stream_separates_reasoning_and_counts_every_token():
    shaper = ChatShaper("m", "fp", None, include_usage=True, reasoning=True)
    shaper.prompt_tokens = 3
    thought, content, chunks = stream_fields(shaper, PIECES)
    assert (thought, content) == ("I should greet.", "Hello!")
    for chunk in chunks:
        delta = chunk["choices"][0]["delta"]
        assert "<" not in (delta.get("reasoning_content") or "") + (delta["content"] or "")
        if delta.get("reasoning_content"):
            assert delta["content"] is None
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert shaper.usage_chunk()["usage"] == {"prompt_tokens": 3, "completion_tokens": len(PIECES),
                                             "total_tokens": 3 + len(PIECES)}


def test_non_stream_message():
    shaper = ChatShaper("m", "fp", None, reasoning=True)
    body = shaper.response([Choice(0, events=events(PIECES), finish=finish("".join(PIECES), tokens=9))])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!",
                                             "reasoning_content": "I should greet."}
    assert body["usage"]["completion_tokens"] == 9


def test_cut_inside_the_reasoning_is_all_reasoning():
    pieces = ["Let", " me", " think", " </th"]
    shaper = ChatShaper("m", "fp", None, reasoning=True, inside=True)
    thought, content, chunks = stream_fields(shaper, pieces, "length")
    assert (thought, content) == ("Let me think </th", "")
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    body = ChatShaper("m", "fp", None, reasoning=True, inside=True).response(
        [Choice(0, finish=finish("".join(pieces), "length", 4))])
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "Let me think </th" and message["content"] is None


def test_without_the_parser_the_tags_stay_content():
    shaper = ChatShaper("m", "fp", None)
    thought, content, _ = stream_fields(shaper, PIECES)
    assert (thought, content) == ("", "".join(PIECES))
    body = ChatShaper("m", "fp", None).response([Choice(0, finish=finish("".join(PIECES)))])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "".join(PIECES)}


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_calls_are_read_after_the_reasoning_only():
    # A call written inside the reasoning is reasoning; the one after `</think>` is the call.
    text = f"<think>maybe {CALL}?</think>\n{CALL}"
    shaper = ChatShaper("m", "fp", None, reasoning=True, tool_calls=True)
    message = shaper.response([Choice(0, finish=finish(text))])["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["reasoning_content"] == f"maybe {CALL}?"
    assert message["message"]["content"] is None
    [call] = message["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    pieces = [text[i:i + 5] for i in range(0, len(text), 5)]
    shaper = ChatShaper("m", "fp", None, reasoning=True, tool_calls=True)
    thought, content, chunks = stream_fields(shaper, pieces)
    assert thought == f"maybe {CALL}?" and content == ""
    calls = [d["tool_calls"][0] for d in (c["choices"][0]["delta"] for c in chunks) if d["tool_calls"]]
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# ----------------------------------------------------------------------- chat_template_kwargs


def test_chat_template_kwargs_reach_the_template():
    template = ChatTemplate(THINK_TEMPLATE)
    thinking = template.render(MESSAGES)
    assert thinking.endswith("<|im_start|>assistant\n")
    body = {"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False}}
    chat = parse_chat_request(body, LIMITS)
    plain = asyncio.run(template.arender(chat.messages, None, chat.chat_template_kwargs))
    assert plain == thinking + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("value,message", [
    ([1], "Invalid type for 'chat_template_kwargs'"),
    ("x", "Invalid type for 'chat_template_kwargs'"),
    ({"add_generation_prompt": False}, "'add_generation_prompt' is set by the server"),
    ({"messages": []}, "'messages' is set by the server"),
    ({"eos_token": "x"}, "'eos_token' is set by the server"),
])
def test_chat_template_kwargs_are_checked(value, message):
    with pytest.raises(InvalidRequestError) as error:
        parse_chat_request({"messages": MESSAGES, "chat_template_kwargs": value}, LIMITS)
    assert error.value.status == 400 and message in error.value.message
    assert error.value.param == "chat_template_kwargs"
    body = {"messages": MESSAGES, "chat_template_kwargs": None}
    assert parse_chat_request(body, LIMITS).chat_template_kwargs is None


# ------------------------------------------------------------------------ through the route


THOUGHT = [("token", p) for p in PIECES]


def test_route_separates_reasoning(router_tokenizer, monkeypatch):
    monkeypatch.setattr(router_tokenizer, "chat_template", THINK_TEMPLATE)

    async def scenario(client, infer):
        whole = await (await client.post("/v1/chat/completions", json={"messages": MESSAGES})).json()
        response = await client.post("/v1/chat/completions", json={
            "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}})
        return whole, sse(await response.text())

    whole, events_ = run(router_tokenizer, [THOUGHT], scenario)
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hello!",
                                              "reasoning_content": "I should greet."}
    assert whole["usage"]["completion_tokens"] == len(PIECES)
    chunks = [json.loads(e) for e in events_[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "I should greet."
    assert "".join(d["content"] or "" for d in deltas) == "Hello!"
    assert chunks[-1]["usage"]["completion_tokens"] == len(PIECES) and events_[-1] == "[DONE]"


def test_route_prompt_open_think_and_parser_off(router_tokenizer, monkeypatch):
    monkeypatch.setattr(router_tokenizer, "chat_template", OPEN_THINK_TEMPLATE)
    script = [("token", "Hmm."), ("token", "</think>"), ("token", "Hi")]

    async def scenario(client, infer):
        return await (await client.post("/v1/chat/completions", json={"messages": MESSAGES})).json()

    on = run(router_tokenizer, [script], scenario)
    assert on["choices"][0]["message"]["reasoning_content"] == "Hmm."
    assert on["choices"][0]["message"]["content"] == "Hi"
    off = run(router_tokenizer, [script], scenario, reasoning_parser="none")
    assert off["choices"][0]["message"] == {"role": "assistant", "content": "Hmm.</think>Hi"}


def test_route_enable_thinking_false_changes_the_prompt(router_tokenizer, monkeypatch):
    monkeypatch.setattr(router_tokenizer, "chat_template", THINK_TEMPLATE)

    async def scenario(client, infer):
        prompts = []
        for kwargs in (None, {"enable_thinking": False}):
            response = await client.post("/chat_tokenize", json={"messages": MESSAGES,
                                                                 "chat_template_kwargs": kwargs})
            prompts.append((await response.json())["templated_text"])
        bad = await client.post("/v1/chat/completions", json={"messages": MESSAGES,
                                                              "chat_template_kwargs": {"tools": []}})
        return prompts, bad.status, await bad.json()

    (thinking, plain), status, body = run(router_tokenizer, [THOUGHT], scenario)
    assert plain == thinking + "<think>\n\n</think>\n\n"
    assert status == 400 and body["error"]["param"] == "chat_template_kwargs"


def test_router_cli_reads_the_flag_and_the_env(monkeypatch):
    from click.testing import CliRunner

    from router import cli

    seen = []
    monkeypatch.setattr(cli.os, "environ", dict(cli.os.environ))  # main sets USE_TORCH=0: not for other tests
    monkeypatch.setattr(cli.asyncio, "run", seen.append)  # serve(…) below returns the config itself
    monkeypatch.setattr("router.app.create_app", lambda config: config)
    monkeypatch.setattr("router.http.server.serve", lambda app, config: config)
    monkeypatch.setattr("router.log.setup_logging", lambda *args: None)
    runner = CliRunner()
    assert runner.invoke(cli.main, ["--reasoning-parser", "deepseek_r1"]).exit_code == 0
    assert runner.invoke(cli.main, [], env={"REASONING_PARSER": "none"}).exit_code == 0
    assert runner.invoke(cli.main, ["--reasoning-parser", "bogus"]).exit_code == 2
    assert [config.reasoning_parser for config in seen] == ["deepseek_r1", "none"]
