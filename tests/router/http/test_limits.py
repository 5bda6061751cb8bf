"""Bounded hostile input: oversized bodies (413), slow headers and bodies (slowloris), and prompts
far past the context (422 without tokenizing the whole text)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest

from router.app import create_app
from router.errors import ContextLengthError, ValidationError
from router.http.server import make_runner
from router.limits import Limits
from router.schemas import parse_generate_request
from router.validation import Validator
from tests.router.app_harness import FakeState, GatedInfer, router_config

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def start(router_tokenizer, **overrides):
    config = router_config(**overrides)
    app = create_app(config, FakeState(config, router_tokenizer, GatedInfer(router_tokenizer)))
    runner = make_runner(app, config)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


def test_five_megabyte_body_is_413_in_each_envelope(router_tokenizer):
    async def main():
        runner, port = await start(router_tokenizer)  # --payload-limit's default, 2 MB
        body = json.dumps({"inputs": "a" * 5_000_000})
        try:
            async with aiohttp.ClientSession() as session:
                got = []
                for path in ("/generate", "/v1/completions"):
                    async with session.post(f"http://127.0.0.1:{port}{path}", data=body,
                                            headers={"Content-Type": "application/json"}) as response:
                        got.append((response.status, await response.json()))
                return got
        finally:
            await runner.cleanup()

    (tgi_status, tgi), (openai_status, openai) = asyncio.run(main())
    assert tgi_status == 413 and tgi["error_type"] == "payload_too_large" and "2000000" in tgi["error"]
    assert openai_status == 413 and openai["error"]["code"] == "payload_too_large"


def complete(answer: bytes) -> bool:
    head, separator, body = answer.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    return bool(separator) and length is not None and len(body) >= length


def raw_exchange(port: int, head: bytes, trickle: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Send `head`, then `trickle` one byte per `every` seconds; what the server answered (until
    it closed the connection or `limit` passed) and when its first byte (or the close) came."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.01)
        started = time.monotonic()
        sock.sendall(head)
        answer, answered_at, pending = b"", None, list(trickle)
        while time.monotonic() - started < limit:
            if pending:
                try:
                    sock.sendall(bytes([pending.pop(0)]))
                except OSError:
                    break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                time.sleep(every)
                continue
            except OSError:
                break
            if not chunk:
                return answer, answered_at or time.monotonic() - started
            answered_at = answered_at or time.monotonic() - started
            answer += chunk
            if complete(answer):
                break
        return answer, answered_at or time.monotonic() - started


def run_raw(router_tokenizer, head: bytes, trickle: bytes, **overrides) -> tuple[bytes, float]:
    async def main():
        runner, port = await start(router_tokenizer, **overrides)
        try:
            return await asyncio.to_thread(raw_exchange, port, head, trickle, 0.1, 5.0)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_slow_headers_are_cut_off(router_tokenizer):
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\n"
    answer, elapsed = run_raw(router_tokenizer, head, b"X-Slow: " + b"a" * 100, client_header_timeout=0.5)
    assert answer == b"" and 0.4 < elapsed < 5  # closed while the headers were still coming


def test_slow_body_gets_408(router_tokenizer):
    for path, envelope in ((b"/generate", "tgi"), (b"/v1/chat/completions", "openai")):
        head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
        answer, elapsed = run_raw(router_tokenizer, head, b"{" * 100, client_body_timeout=0.5)
        assert answer.startswith(b"HTTP/1.1 408 ") and 0.4 < elapsed < 5, (elapsed, answer[:100])
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        message = "The request body was not received within 0.5 s"
        if envelope == "tgi":
            assert body == {"error": message, "error_type": "request_timeout"}
        else:
            assert body["error"]["message"] == message and body["error"]["code"] == "request_timeout"


@pytest.fixture
def validator(router_tokenizer):
    return Validator(router_tokenizer, Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5,
                                                        max_input_tokens=4095, max_total_tokens=4096))


def test_ten_thousand_token_prompt_gets_tgis_message(validator, router_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 1000
    length = len(router_tokenizer.encode(text))
    assert 9_000 < length < 12_000
    request = parse_generate_request({"inputs": text, "parameters": {"max_new_tokens": 10}}, compat=False)
    with pytest.raises(ContextLengthError) as error:
        asyncio.run(validator.validate(request))
    assert error.value.status == 422 and error.value.to_tgi() == {
        "error": f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
                 f"Given: {length} `inputs` tokens and 10 `max_new_tokens`",
        "error_type": "validation"}


def test_prompt_far_past_the_context_is_refused_without_tokenizing(validator, router_tokenizer, monkeypatch):
    async def never(*args, **kwargs):
        raise AssertionError("tokenized")

    monkeypatch.setattr(router_tokenizer, "aencode", never)
    text = "supercalifragilistic " * 100_000  # 2.1 MB
    request = parse_generate_request({"inputs": text, "parameters": {"max_new_tokens": 10}}, compat=False)
    started = time.monotonic()
    with pytest.raises(ContextLengthError) as error:
        asyncio.run(validator.validate(request))
    assert time.monotonic() - started < 5  # the patched tokenizer proves it; this only bounds a hang
    assert error.value.message.startswith("Input validation error: `inputs` tokens + `max_new_tokens` must be "
                                          "<= 4096. Given: at least ")
    # The bound is a true lower bound: never more than the real count.
    sample = text[: len(text) // 50]
    assert router_tokenizer.min_num_tokens(sample) <= len(router_tokenizer.encode(sample))
    # With `truncate` any length is valid: the text must be tokenized, so the shortcut is off.
    truncated = parse_generate_request({"inputs": text, "parameters": {"truncate": 100}}, compat=False)
    with pytest.raises(ValidationError, match="tokenizer error tokenized"):  # reached the tokenizer
        asyncio.run(validator.validate(truncated))
