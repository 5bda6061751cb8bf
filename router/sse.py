"""Server-Sent Events: `data: <json>\n\n` frames, keep-alive comments, disconnect detection."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

KEEP_ALIVE_SECONDS = 15.0


class ClientGone(Exception):
    """The client closed the connection; the request must be cancelled."""


class SseWriter:
    def __init__(self, response: web.StreamResponse):
        self.response = response

    @classmethod
    async def open(cls, request: web.Request, headers: dict[str, str] | None = None) -> "SseWriter":
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            **(headers or {}),
        })
        await response.prepare(request)
        return cls(response)

    async def send(self, payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        await self._write(f"data: {data}\n\n".encode())

    async def keep_alive(self) -> None:
        await self._write(b":\n\n")

    async def _write(self, frame: bytes) -> None:
        try:
            await self.response.write(frame)
        except (ConnectionResetError, asyncio.CancelledError, RuntimeError) as error:
            if isinstance(error, asyncio.CancelledError):
                raise
            raise ClientGone() from error

    async def close(self) -> None:
        try:
            await self.response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
