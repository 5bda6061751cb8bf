"""SSE keep-alive: an idle stream gets `:` comment frames (TGI and OpenAI routes), a client that left
is noticed by a failed comment, and busy streams pay no timer or task per event."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.app import create_app
from router.http.sse import ClientGone, SseWriter
from tests.router.app_harness import FakeState, GatedInfer, router_config

KEEP_ALIVE = 0.05


def app_with_held_first_token(router_tokenizer) -> tuple[web.Application, GatedInfer]:
    infer = GatedInfer(router_tokenizer, tokens=1)  # the gate holds the last token, here the first
    infer.gate = asyncio.Event()
    config = router_config(sse_keep_alive_seconds=KEEP_ALIVE)
    return create_app(config, FakeState(config, router_tokenizer, infer)), infer


@pytest.mark.parametrize("path,body,token", [
    ("/generate_stream", {"inputs": "hi"}, b'"token": {"id": 101'),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True},
     b'"content": "x"'),
])
def test_idle_stream_gets_a_comment_before_the_first_token(router_tokenizer, path, body, token):
    async def main():
        app, infer = app_with_held_first_token(router_tokenizer)
        async with TestClient(TestServer(app)) as client:
            async with client.post(path, json=body) as response:
                received = b""
                while b":\n\n" not in received:
                    received += await response.content.readany()
                infer.gate.set()
                return received + await response.read()

    frames = asyncio.run(main()).split(b"\n\n")
    comment = frames.index(b":")
    first_token = next(i for i, frame in enumerate(frames) if token in frame)
    assert comment < first_token, frames


class Sink:
    """What SseWriter needs of a response."""

    def __init__(self):
        self.frames: list[bytes] = []

    async def write(self, frame: bytes) -> None:
        self.frames.append(frame)


def test_one_task_and_one_timer_per_stream_not_per_event():
    async def events():
        for i in range(1000):
            await asyncio.sleep(0)
            yield i

    async def main():
        loop = asyncio.get_running_loop()
        calls = {"call_later": 0, "create_task": 0}
        for name in calls:
            def counting(*args, _original=getattr(loop, name), _name=name, **kwargs):
                calls[_name] += 1
                return _original(*args, **kwargs)
            setattr(loop, name, counting)
        writer = SseWriter(Sink(), keep_alive_seconds=60)
        got = [event async for event in writer.with_keep_alive(events())]
        return got, dict(calls), writer.response.frames  # asyncio.run's own clean-up makes tasks after

    got, calls, frames = asyncio.run(main())
    assert got == list(range(1000)) and frames == []
    assert calls == {"call_later": 1, "create_task": 1}


def test_a_failed_keep_alive_ends_the_stream_and_closes_the_events():
    """A client behind a proxy that went away is noticed by the write, not at the next token."""
    closed = []

    async def events():
        try:
            await asyncio.sleep(60)
            yield 1
        finally:
            closed.append(True)  # Infer.stream cancels the generation here

    class Gone(Sink):
        async def write(self, frame: bytes) -> None:
            raise ConnectionResetError()

    async def main():
        with pytest.raises(ClientGone):
            async for _ in SseWriter(Gone(), keep_alive_seconds=KEEP_ALIVE).with_keep_alive(events()):
                pass

    asyncio.run(asyncio.wait_for(main(), 5))
    assert closed == [True]


def test_errors_of_the_events_reach_the_consumer():
    async def events():
        yield 1
        raise RuntimeError("shard died")

    async def main():
        got = []
        with pytest.raises(RuntimeError, match="shard died"):
            async for event in SseWriter(Sink(), keep_alive_seconds=60).with_keep_alive(events()):
                got.append(event)
        return got

    assert asyncio.run(main()) == [1]
