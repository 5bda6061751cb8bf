"""Drain: what the router does between SIGTERM and exit.

    serving ──SIGTERM──▶ draining: /ready → 503, new requests → 503 + Retry-After,
                         in-flight requests (streams included) run on
            ──idle, or the grace period is over──▶ the server closes; leftovers are cancelled

Only requests on protected (non-probe) routes are counted and refused; probes keep answering so
that an orchestrator can watch the drain.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web


class Drain:
    def __init__(self) -> None:
        self.is_draining = False
        self.num_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.num_in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.num_in_flight -= 1
        if self.num_in_flight == 0:
            self._idle.set()

    def begin(self) -> None:
        self.is_draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if some still are after `timeout` seconds."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while self.num_in_flight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True


DRAIN = web.AppKey("drain", Drain)
