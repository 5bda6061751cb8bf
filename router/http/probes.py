"""Kubernetes-style probes next to TGI's deep `/health`:

- `GET /live`  liveness: 200 while the event loop answers. It never touches the shards, so a
  slow or busy shard cannot get a healthy router restarted; a dead shard already makes the
  launcher exit. (`/health` probes the shards, TGI's semantics, and suits readiness gates that
  want that depth.)
- `GET /ready` readiness: 200 while accepting requests, 503 once draining (SIGTERM). There is no
  "loading" state to report: the router starts listening only after the shards are warmed up,
  so before that a probe gets "connection refused".

Plain names like TGI's own (`/health`, `/ping`, `/info`) rather than `/livez`-style ones.
"""

from __future__ import annotations

from aiohttp import web

from router.errors import DrainingError
from router.http.drain import Drain

# Health checks, probes and the metrics scrape: open without the API key (router/app.py) and never
# traced (router/tracing.py), so that they neither need a secret nor bury the generation traces.
PROBE_PATHS = frozenset({"/health", "/ping", "/metrics", "/live", "/ready"})


class ProbeRoutes:
    def __init__(self, drain: Drain) -> None:
        self._drain = drain

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/live", self.live)
        app.router.add_get("/ready", self.ready)

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def ready(self, request: web.Request) -> web.Response:
        if self._drain.is_draining:
            raise DrainingError()
        return web.json_response({"status": "ready"})
