"""What the OpenAI shapers build, in every optional shape (tool calls, reasoning, logprobs, echo,
usage), against the OpenAPI document's schemas generated from router/openai/models.py."""

from __future__ import annotations

from router.events import TokenInfo
from router.openai.responses import ChatShaper, Choice, CompletionShaper, TokenStrings
from tests.router.http.test_openapi_responses import check
from tests.router.openai.test_responses import event, finish

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def stream(shaper: ChatShaper, text: str, size: int = 6, reason: str = "eos_token") -> list[dict]:
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    done = finish(reason, text, len(pieces))
    chunks = [shaper.role_chunk(0)]
    for position, piece in enumerate(pieces, 1):
        last = position == len(pieces)
        chunks += shaper.chunks(0, event(position, 5, piece, -0.5, done=done if last else None))
    return chunks


def test_chat_chunks_and_responses_with_tool_calls_and_reasoning():
    text = f"<think>Paris, then.</think>\nLet me look. {CALL}"
    for options in ({"tool_calls": True}, {"reasoning": True}, {"tool_calls": True, "reasoning": True}):
        shaper = ChatShaper("m", "fp", None, include_usage=True, **options)
        shaper.prompt_tokens = 3
        chunks = stream(shaper, text)
        for chunk in chunks:
            check("ChatCompletionChunk", chunk)
        check("ChatCompletionChunk", shaper.usage_chunk())
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert any(d["tool_calls"] for d in deltas) == ("tool_calls" in options)
        assert any("reasoning_content" in d for d in deltas) == ("reasoning" in options)
        for cut in ("eos_token", "length"):  # cut inside a call: the complete calls only
            cut_short = Choice(0, finish=finish(cut, text[:-3], 9))
            check("ChatCompletion", ChatShaper("m", "fp", None, **options).response([cut_short]))
        whole = ChatShaper("m", "fp", None, **options).response([Choice(0, finish=finish("eos_token", text))])
        check("ChatCompletion", whole)
        message = whole["choices"][0]["message"]
        assert ("tool_calls" in message) == ("tool_calls" in options)
        assert ("reasoning_content" in message) == ("reasoning" in options)


def test_chat_logprobs(router_tokenizer):
    strings = TokenStrings(router_tokenizer)
    top = (TokenInfo(5, "x", -0.2, False), TokenInfo(6, "y", -float("inf"), False))
    shaper = ChatShaper("m", "fp", strings, logprobs=True)
    chunks = shaper.chunks(0, event(1, 7, "a", -0.1, top))
    chunks += shaper.chunks(0, event(2, 8, "", -float("inf"), top, done=finish("length", "a", 2)))
    for chunk in chunks:
        check("ChatCompletionChunk", chunk)
    assert chunks[-1]["choices"][0]["logprobs"]["content"][0]["logprob"] == -9999.0
    events = [event(1, 7, "a", -0.1, top), event(2, 8, "b", None, (), done=finish("length", "ab", 2))]
    whole = ChatShaper("m", "fp", strings, logprobs=True).response(
        [Choice(0, events=events, finish=events[-1].finish)])
    check("ChatCompletion", whole)
    assert whole["choices"][0]["logprobs"]["content"][1]["logprob"] is None


def test_completion_chunks_and_responses(router_tokenizer):
    strings = TokenStrings(router_tokenizer)
    prefill = (TokenInfo(1, "Hello", None, False), TokenInfo(2, " world", -3.0, False))
    done = finish("length", "!", 1, prefill)
    last = event(1, 3, "!", -1.0, (TokenInfo(5, "x", -0.2, False),), done, prefill)
    for options in ({}, {"echo": True, "logprobs": 1}, {"echo": True, "logprobs": 0, "score_only": True}):
        shaper = CompletionShaper("m", "fp", strings, prompts=["Hello world"], include_usage=True, **options)
        chunks = shaper.chunks(0, 0, last)
        assert chunks
        for chunk in chunks:
            check("CompletionChunk", chunk)
        check("CompletionChunk", shaper.usage_chunk())
        whole = CompletionShaper("m", "fp", strings, prompts=["Hello world"], **options)
        check("Completion", whole.response([Choice(0, 0, [last], done)]))
