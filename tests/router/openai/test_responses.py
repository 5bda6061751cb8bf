"""OpenAI response shapes built from router events (no server)."""

from __future__ import annotations

import json

from router.events import Finish, TokenEvent, TokenInfo
from router.openai.responses import ChatShaper, Choice, CompletionShaper, TokenStrings, finish_reason


def finish(reason="eos_token", text="", tokens=1, prefill=()):
    return Finish(generated_text=text, finish_reason=reason, generated_tokens=tokens, seed=None, prefill=prefill,
                  input_length=3, queued_at=0.0, batched_at=0.0, finished_at=0.0)


def event(index, token_id, text, logprob=-0.5, top=(), done=None, prefill=()):
    return TokenEvent(index=index, token=TokenInfo(token_id, text, logprob, False), top_tokens=top, finish=done,
                      text=text, prefill=prefill)


def test_finish_reasons_are_openai_words():
    assert finish_reason(finish("eos_token")) == "stop"
    assert finish_reason(finish("stop_sequence")) == "stop"
    assert finish_reason(finish("length")) == "length"


def test_token_bytes_rebuild_split_characters(router_tokenizer):
    strings = TokenStrings(router_tokenizer)
    text = "é😀 hi"
    ids = router_tokenizer.encode(text, add_special_tokens=False)
    pieces = [strings.get(i) for i in ids]
    assert b"".join(bytes(raw) for _, raw in pieces).decode() == text
    assert any("\ufffd" in token for token, _ in pieces)  # the emoji's pieces are partial characters
    assert strings.get(ids[-1]) == (" hi", list(b" hi"))
    im_end = router_tokenizer.token_to_id("<|im_end|>")
    assert strings.get(im_end) == ("<|im_end|>", list(b"<|im_end|>"))


def test_chat_stream_chunks(router_tokenizer):
    shaper = ChatShaper("m", "fp", TokenStrings(router_tokenizer), include_usage=True, logprobs=True)
    shaper.prompt_tokens = 3
    first = shaper.role_chunk(0)
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "tool_calls": None}
    assert first["usage"] is None
    hi = router_tokenizer.encode(" hi", add_special_tokens=False)[0]
    top = (TokenInfo(hi, " hi", -0.1, False),)
    [chunk] = shaper.chunks(0, event(1, hi, " hi", -0.1, top))
    assert chunk["id"] == first["id"] and chunk["choices"][0]["delta"]["content"] == " hi"
    entry = chunk["choices"][0]["logprobs"]["content"][0]
    assert entry == {"token": " hi", "logprob": -0.1, "bytes": list(b" hi"),
                     "top_logprobs": [{"token": " hi", "logprob": -0.1, "bytes": list(b" hi")}]}
    [last] = shaper.chunks(0, event(2, 2, "", -float("inf"), done=finish("eos_token", " hi", 2)))
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["choices"][0]["logprobs"]["content"][0]["logprob"] == -9999.0  # JSON has no -inf
    usage = shaper.usage_chunk()
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_chat_stream_skips_empty_chunks_without_logprobs(router_tokenizer):
    shaper = ChatShaper("m", "fp", TokenStrings(router_tokenizer))
    assert shaper.chunks(0, event(1, 5, "")) == []
    assert "usage" not in shaper.role_chunk(0)


def test_tool_calls_stream_and_response(router_tokenizer):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    streamed = ChatShaper("m", "fp", TokenStrings(router_tokenizer), tool_calls=True)
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    chunks = []
    for position, piece in enumerate(pieces, 1):
        done = finish("eos_token", text, len(pieces)) if position == len(pieces) else None
        chunks += streamed.chunks(0, event(position, 5, piece, -0.1, done=done))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"][0] for d in deltas if d["tool_calls"]]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert calls[0]["type"] == "function" and calls[0]["index"] == 0
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    assert not any(d["content"] for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    whole = ChatShaper("m", "fp", TokenStrings(router_tokenizer), tool_calls=True).response(
        [Choice(0, finish=finish("eos_token", text, 9))])
    message = whole["choices"][0]["message"]
    assert whole["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    plain = ChatShaper("m", "fp", TokenStrings(router_tokenizer), tool_calls=True).response(
        [Choice(0, finish=finish("eos_token", "Just text.", 3))])
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "Just text."}
    assert plain["choices"][0]["finish_reason"] == "stop"


def test_chat_response(router_tokenizer):
    shaper = ChatShaper("m", "fp", TokenStrings(router_tokenizer))
    shaper.prompt_tokens = 4
    choices = [Choice(i, events=[event(1, 5, "x")], finish=finish("length", f"text{i}", 3)) for i in range(2)]
    body = shaper.response(choices)
    assert body["object"] == "chat.completion" and body["model"] == "m" and body["system_fingerprint"] == "fp"
    assert [c["message"] for c in body["choices"]] == [{"role": "assistant", "content": "text0"},
                                                        {"role": "assistant", "content": "text1"}]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["choices"][0]["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_completion_echo_logprobs(router_tokenizer):
    ids = router_tokenizer.encode("Hello world", add_special_tokens=False)
    prefill = (TokenInfo(ids[0], "Hello", None, False), TokenInfo(ids[1], " world", -3.0, False))
    bang = router_tokenizer.encode("!", add_special_tokens=False)[0]
    shaper = CompletionShaper("m", "fp", TokenStrings(router_tokenizer), prompts=["Hello world"], echo=True,
                              logprobs=1)
    done = finish("length", "!", 1, prefill)
    body = shaper.response([Choice(0, 0, [event(1, bang, "!", -1.0, (TokenInfo(5, "x", -0.2, False),), done)], done)])
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert choice["text"] == "Hello world!"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["Hello", " world", "!"] and lp["token_logprobs"] == [None, -3.0, -1.0]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {" world": -3.0}
    assert lp["top_logprobs"][2] == {router_tokenizer.decode([5]): -0.2, "!": -1.0}  # the sampled token is added
    assert lp["text_offset"] == [0, 5, 11]


def test_completion_stream_echo_then_tokens_and_scoring(router_tokenizer):
    shaper = CompletionShaper("m", "fp", TokenStrings(router_tokenizer), prompts=["Hi", "Yo"], echo=True)
    chunks = shaper.chunks(1, 0, event(1, 5, "a"))
    assert [c["choices"][0]["text"] for c in chunks] == ["Hi", "a"] and chunks[0]["choices"][0]["index"] == 1
    assert [c["choices"][0]["text"] for c in shaper.chunks(1, 0, event(2, 6, "b", done=finish("eos_token", "ab", 2)))] \
        == ["b"]
    scoring = CompletionShaper("m", "fp", TokenStrings(router_tokenizer), prompts=["Hi"], echo=True, score_only=True)
    chunks = scoring.chunks(0, 0, event(1, 5, "a", done=finish("length", "a", 1)))
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [("Hi", None), ("", "length")]
    assert scoring.completion_tokens == 0
