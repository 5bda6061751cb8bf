"""The browser playground: `GET /` serves a single page, its files under `GET /playground/{asset}`.

The page is plain static files shipped inside the package (router/static/playground/, listed in
pyproject's package-data): no CDN, no build step, it works offline. Everything it shows comes
from the server's own public API (the OpenAI and TGI routes, /info, /metrics), called from the
browser with relative URLs, so it also works behind a path prefix.

Security: the page and its files are public (router/app.py), but they carry no secret: with
--api-key the page asks the user for the key and sends it as a Bearer header on every call it
makes. A strict Content-Security-Policy allows scripts, styles and connections to this origin
only, with no inline script or style, so text a model writes cannot run even if a rendering bug
let it through. `POST /` stays TGI's compat route (router/routes.py); only GET is the page's.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

ASSETS_DIR = Path(__file__).resolve().parent.parent / "static" / "playground"
PAGE = "index.html"
# The files the page loads, with their media types (RFC 9239 for JavaScript modules).
ASSETS = {
    "app.css": "text/css",
    "app.js": "text/javascript",
    "api.js": "text/javascript",
    "sse.js": "text/javascript",
    "markdown.js": "text/javascript",
    "store.js": "text/javascript",
    "params.js": "text/javascript",
    "chat.js": "text/javascript",
    "raw.js": "text/javascript",
    "stats.js": "text/javascript",
    "status.js": "text/javascript",
    "icon.svg": "image/svg+xml",
}
ASSET_PREFIX = "/playground/"
# Public for GET and HEAD only: `POST /` generates and needs the key (router/app.py).
PAGE_PATHS = frozenset({"/"})
# Public for every method (only GET routes exist there; anything else answers 405).
PUBLIC_PATHS = frozenset(ASSET_PREFIX + name for name in ASSETS)

# No inline script or style anywhere (the page sets styles through the CSSOM only), connections
# to this origin only, nothing may frame the page (clickjacking a key prompt).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on each load: an upgraded server's page never runs with a stale script.
    "Cache-Control": "no-cache",
}


class PlaygroundRoutes:
    def __init__(self, assets: Path = ASSETS_DIR) -> None:
        self._assets = assets
        self._page = (assets / PAGE).read_text(encoding="utf-8")  # read once; a missing file fails at start

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get(ASSET_PREFIX + "{asset}", self.asset)

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=self._page, content_type="text/html", headers=SECURITY_HEADERS)

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["asset"]
        if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
            raise web.HTTPNotFound()
        headers = {"Content-Type": ASSETS[name], **SECURITY_HEADERS}
        return web.FileResponse(self._assets / name, headers=headers)
