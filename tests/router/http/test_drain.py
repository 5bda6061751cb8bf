"""SIGTERM drain through router.http.server.serve: in-flight streams finish, new requests get 503, the
probes tell them apart; past the grace period leftovers are cancelled."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import aiohttp

from router.app import create_app
from router.http.drain import DRAIN
from router.http.server import EXIT_MARGIN_SECONDS, drain_requests, make_runner, serve
from tests.router.app_harness import FakeState, GatedInfer, router_config

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_sigterm_drains_streams_and_refuses_new_requests(router_tokenizer):
    async def main():
        config = router_config(port=free_port(), graceful_termination_timeout=30)
        infer = GatedInfer(router_tokenizer, tokens=3)
        infer.gate = asyncio.Event()
        app = create_app(config, FakeState(config, router_tokenizer, infer))
        server = asyncio.create_task(serve(app, config))
        url = f"http://127.0.0.1:{config.port}"
        got = {}
        async with aiohttp.ClientSession() as session:
            async def up():
                try:
                    async with session.get(f"{url}/ready") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            while not await up():
                await asyncio.sleep(0.05)
            stream = await session.post(f"{url}/generate_stream", json={"inputs": "hi"})
            first = await stream.content.readline()  # one token out; the last waits for the gate
            os.kill(os.getpid(), signal.SIGTERM)
            await wait_for(lambda: app[DRAIN].is_draining)
            for name, method, path, body in [("generate", "POST", "/generate", {"inputs": "hi"}),
                                             ("chat", "POST", "/v1/chat/completions", CHAT),
                                             ("ready", "GET", "/ready", None), ("live", "GET", "/live", None),
                                             ("health", "GET", "/health", None)]:
                async with session.request(method, f"{url}{path}", json=body) as response:
                    got[name] = (response.status, response.headers.get("Retry-After"), await response.read())
            assert not server.done()  # still draining: the stream holds it
            released = time.monotonic()
            infer.gate.set()
            rest = await stream.text()
            await asyncio.wait_for(server, 5)
            got["exit_after_release"] = time.monotonic() - released
        return first, rest, got

    first, rest, got = asyncio.run(main())
    events = [json.loads(line[len(b"data: "):]) for line in (first + rest.encode()).split(b"\n")
              if line.startswith(b"data: ")]
    assert [e["index"] for e in events] == [1, 2, 3] and events[-1]["generated_text"] == "xxx"
    assert got["generate"] == (503, "5", b'{"error": "The server is shutting down; retry on another replica", '
                                         b'"error_type": "unavailable"}')
    status, retry_after, body = got["chat"]
    assert status == 503 and retry_after == "5" and json.loads(body)["error"]["type"] == "server_error"
    assert got["ready"][0] == 503 and got["live"][0] == 200 and got["health"][0] == 200
    assert got["exit_after_release"] < 2


def test_grace_period_over_cancels_what_is_left(router_tokenizer):
    async def main():
        config = router_config()
        infer = GatedInfer(router_tokenizer, tokens=3)
        infer.gate = asyncio.Event()  # never set: the stream would run forever
        app = create_app(config, FakeState(config, router_tokenizer, infer))
        runner = make_runner(app, config)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            stream = await session.post(f"http://127.0.0.1:{port}/generate_stream", json={"inputs": "hi"})
            await stream.content.readline()
            started = time.monotonic()
            await drain_requests(app, EXIT_MARGIN_SECONDS + 0.3)
            waited = time.monotonic() - started
            in_flight = app[DRAIN].num_in_flight
            await runner.cleanup()
            await wait_for(lambda: infer.cancelled == 1)
        return waited, in_flight

    waited, in_flight = asyncio.run(main())
    assert 0.3 <= waited < 1.5 and in_flight == 1
