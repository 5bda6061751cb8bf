"""Run the router's app: start (connect, warm up), listen, and on SIGTERM/SIGINT drain, then exit.

    runner.setup()   app startup: shard connection, Info, Warmup (nothing listens yet)
    site.start()     listen: from here /ready answers 200
    SIGTERM          Drain.begin(): new requests → 503, in-flight ones run on (router/http/drain.py)
    idle or grace    runner.cleanup(): close the socket, cancel what is left, stop the batcher

aiohttp's own `run_app` stops listening at the first signal, so late clients would see
"connection refused" rather than a 503 they can act on, and it cannot wait on streams by our
rules; hence this loop.

Connection limits (aiohttp has no header timeout of its own): `keepalive_timeout` is armed when
a connection opens and re-armed after each response, and fires only while no complete request
has arrived, so it bounds both an idle keep-alive connection and a client that trickles its
headers (slowloris). The body has its own limit (app.body_timeout_middleware). Header sizes are
aiohttp's defaults: 8190-byte lines and fields, 128 headers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiohttp import web

from router.config import RouterConfig
from router.http.drain import DRAIN

log = logging.getLogger(__name__)
# The launcher SIGKILLs the router `graceful_termination_timeout` seconds after SIGTERM: stop
# draining this much earlier, so that cleanup (cancel, close the shard channels) still happens.
EXIT_MARGIN_SECONDS = 2.0
# After the drain: how long aiohttp lets unfinished handlers run before cancelling them.
CANCEL_AFTER_SECONDS = 0.5


def make_runner(app: web.Application, config: RouterConfig) -> web.AppRunner:
    return web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                         keepalive_timeout=config.client_header_timeout, shutdown_timeout=CANCEL_AFTER_SECONDS)


async def drain_requests(app: web.Application, grace: float) -> None:
    """Refuse new requests and wait (up to `grace` minus the exit margin) for in-flight ones."""
    state = app[DRAIN]
    state.begin()
    budget = max(grace - EXIT_MARGIN_SECONDS, 0.0)
    log.info("draining: %d request(s) in flight, waiting up to %.0f s", state.num_in_flight, budget)
    started = time.monotonic()
    if await state.wait_idle(budget):
        log.info("drained in %.1f s", time.monotonic() - started)
    else:
        log.warning("grace period over: cancelling %d request(s) still in flight", state.num_in_flight)


async def serve(app: web.Application, config: RouterConfig) -> None:
    runner = make_runner(app, config)
    await runner.setup()
    try:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before listening: no request may see a default kill
            loop.add_signal_handler(sig, stop.set)
        await web.TCPSite(runner, config.hostname, config.port).start()
        log.info("listening on %s:%d", config.hostname, config.port)
        await stop.wait()
        await drain_requests(app, config.graceful_termination_timeout)
    finally:
        await runner.cleanup()
    log.info("router stopped")
