"""Server-Sent Events: `data: <json>\n\n` frames, keep-alive comments, disconnect detection.

A stream that waits longer than its keep-alive interval for its next event gets a `:` comment
frame (clients ignore it): proxies that drop idle connections (often after 30-60 s) keep the
stream open through a long prefill or queue wait, and a client that went away is noticed by the
failed write, which ends the stream and cancels its generation, instead of at the next token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

T = TypeVar("T")
_IDLE = object()  # queue item: nothing was written for a keep-alive interval
_END = object()  # queue item: the events are exhausted


@dataclass(frozen=True, slots=True)
class _Raised:
    """Queue item: the events raised `error` (re-raised in the consumer's task)."""

    error: Exception


class ClientGone(Exception):
    """The client closed the connection; the request must be cancelled."""


class SseWriter:
    def __init__(self, response: web.StreamResponse, keep_alive_seconds: float):
        self.response = response
        self.keep_alive_seconds = keep_alive_seconds
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()  # the headers went out just now

    @classmethod
    async def open(cls, request: web.Request, headers: dict[str, str] | None = None, *,
                   keep_alive_seconds: float) -> "SseWriter":
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            **(headers or {}),
        })
        await response.prepare(request)
        return cls(response, keep_alive_seconds)

    async def send(self, payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        # A lone surrogate (a client's "\ud800" echoed back, e.g. in `model`) has no UTF-8 form:
        # written as the JSON escape it came in as, which every client reads back the same.
        await self._write(f"data: {data}\n\n".encode("utf-8", "backslashreplace"))

    async def keep_alive(self) -> None:
        await self._write(b":\n\n")

    async def with_keep_alive(self, events: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """`events`, with a keep-alive comment written whenever the next one is an interval late.
        Closing this iterator closes `events` (and so cancels their generation).

        NOTE: the events are read into a queue by one task per stream, so that the wait for the
        next one can be interrupted without cancelling their source (a cancelled `anext` would
        end it). One timer per stream wakes that wait: when it fires it compares the time of the
        last write with the interval and re-arms for the rest, so an event costs a timestamp
        (in `_write`), never a task or a timer of its own."""
        interval, loop = self.keep_alive_seconds, self._loop
        queue: asyncio.Queue = asyncio.Queue()
        timer: asyncio.TimerHandle | None = None

        def check_idle() -> None:
            nonlocal timer
            idle = loop.time() - self._last_write
            if idle < interval:
                timer = loop.call_later(interval - idle, check_idle)
                return
            if queue.empty():  # else the consumer has work (a slow client's write, a pending comment)
                queue.put_nowait(_IDLE)
            timer = loop.call_later(interval, check_idle)

        async def pump() -> None:
            try:
                async for event in events:
                    queue.put_nowait(event)
                queue.put_nowait(_END)
            except Exception as error:  # noqa: BLE001 - raised again where the events are consumed
                queue.put_nowait(_Raised(error))

        reader = asyncio.create_task(pump())
        timer = loop.call_later(interval, check_idle)
        try:
            while (item := await queue.get()) is not _END:
                if item is _IDLE:
                    await self.keep_alive()
                elif isinstance(item, _Raised):
                    raise item.error
                else:
                    yield item
        finally:
            timer.cancel()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await events.aclose()  # a no-op once read to the end; else runs its clean-up

    async def _write(self, frame: bytes) -> None:
        try:
            await self.response.write(frame)
        except (ConnectionResetError, RuntimeError) as error:
            raise ClientGone() from error
        self._last_write = self._loop.time()

    async def close(self) -> None:
        try:
            await self.response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
