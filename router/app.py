"""The aiohttp application: middlewares, routes, startup and cleanup. No request logic here."""

from __future__ import annotations

import hmac
import logging

from aiohttp import web

from router.config import RouterConfig
from router.errors import PayloadTooLargeError, RouterError
from router.routes import TgiRoutes
from router.state import STATE, AppState

log = logging.getLogger(__name__)
PUBLIC_PATHS = frozenset({"/health", "/ping", "/info", "/metrics"})


def error_middleware():
    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except RouterError as error:
            return web.json_response(error.to_tgi(), status=error.status)
        except web.HTTPRequestEntityTooLarge as error:
            too_large = PayloadTooLargeError(error.text or "payload too large")
            return web.json_response(too_large.to_tgi(), status=too_large.status)

    return errors


def auth_middleware(api_key: str):
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path not in PUBLIC_PATHS and request.method != "OPTIONS":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time
                return web.json_response({"error": "Unauthorized", "error_type": "authentication"}, status=401)
        return await handler(request)

    return auth


def cors_middleware(origins: tuple[str, ...]):
    allowed = set(origins)

    @web.middleware
    async def cors(request: web.Request, handler):
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin:
            response = web.Response(status=204)
        else:
            response = await handler(request)
        if origin and (not allowed or origin in allowed or "*" in allowed):
            response.headers["Access-Control-Allow-Origin"] = origin if allowed and "*" not in allowed else "*"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = "content-type, authorization"
        return response

    return cors


def create_app(config: RouterConfig, state: AppState | None = None) -> web.Application:
    """With `state` given (tests), the app uses it instead of connecting to shards."""
    middlewares = [cors_middleware(config.cors_allow_origin)]
    if config.api_key:
        middlewares.append(auth_middleware(config.api_key))
    middlewares.append(error_middleware())
    app = web.Application(middlewares=middlewares, client_max_size=config.payload_limit)

    async def startup(app: web.Application) -> None:
        app[STATE] = state or await AppState.connect(config)
        app[STATE].start()
        log.info("router ready: %s", app[STATE].limits)

    async def cleanup(app: web.Application) -> None:
        if STATE in app:
            await app[STATE].stop()

    TgiRoutes().add_to(app)
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app
