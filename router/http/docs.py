"""API documentation routes (TGI's paths): the OpenAPI document at `GET /api-doc/openapi.json`
and Swagger UI at `GET /docs/` (`GET /docs` redirects there).

The UI's files come from the `swagger-ui-bundle` package (a runtime dependency), never from a
CDN: its `index.j2` page is rendered once with the document's URL, and only the files that page
loads are served. Every URL is relative so the pages also work behind a path prefix. All of these
paths are public (`PUBLIC_PATHS`), like /health.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from router.http.openapi import DOCUMENT_PATH, build_document
from router.state import STATE, VERSION

# The files index.j2 references, with their media types (RFC 9239 for JavaScript).
ASSETS = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
PUBLIC_PATHS = frozenset({DOCUMENT_PATH, "/docs", "/docs/", *(f"/docs/{name}" for name in ASSETS)})


class DocsRoutes:
    def __init__(self, assets: Path = Path(swagger_ui_path), playground: bool = True) -> None:
        self._assets = assets
        self._playground = playground  # the document lists the playground's routes only when served
        template = jinja2.Template((assets / "index.j2").read_text())
        # From /docs/, "../api-doc/openapi.json" is the document, with or without a path prefix.
        self._page = template.render(openapi_spec_url=f"..{DOCUMENT_PATH}")
        self._document: dict[str, Any] | None = None  # built on first use: limits exist after startup

    def add_to(self, app: web.Application) -> None:
        app.router.add_get(DOCUMENT_PATH, self.document)
        app.router.add_get("/docs", self.redirect)
        app.router.add_get("/docs/", self.page)
        app.router.add_get("/docs/{asset}", self.asset)

    async def document(self, request: web.Request) -> web.Response:
        if self._document is None:
            # The limits the server enforces (router.limits.Limits), so the document shows them.
            self._document = build_document(request.app[STATE].limits, VERSION, tuple(ASSETS), self._playground)
        return web.json_response(self._document)

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("docs/")

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=self._page, content_type="text/html")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["asset"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.FileResponse(self._assets / name, headers={"Content-Type": ASSETS[name]})
