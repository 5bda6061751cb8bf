"""The aiohttp application: middlewares, routes, startup and cleanup. No request logic here."""

from __future__ import annotations

import hmac
import logging

from aiohttp import web

from router.config import RouterConfig
from router.errors import PayloadTooLargeError, RouterError
from router.openai import OPENAI_REQUEST, OpenAIRoutes
from router.routes import TgiRoutes
from router.state import STATE, AppState

log = logging.getLogger(__name__)
PUBLIC_PATHS = frozenset({"/health", "/ping", "/info", "/metrics"})


def is_openai(request: web.Request) -> bool:
    """OpenAI routes (and OpenAI bodies on /invocations) answer errors in OpenAI's envelope."""
    return request.path == "/v1" or request.path.startswith("/v1/") or request.get(OPENAI_REQUEST, False)


def openai_error(error: RouterError) -> web.Response:
    status = error.openai_status
    headers = {"Retry-After": "1"} if status == 429 else None
    return web.json_response(error.to_openai(), status=status, headers=headers)


def error_middleware():
    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except RouterError as error:
            if is_openai(request):
                return openai_error(error)
            return web.json_response(error.to_tgi(), status=error.status)
        except web.HTTPRequestEntityTooLarge as error:
            too_large = PayloadTooLargeError(error.text or "payload too large")
            if is_openai(request):
                return openai_error(too_large)
            return web.json_response(too_large.to_tgi(), status=too_large.status)
        except web.HTTPException as error:
            if error.status < 400 or not is_openai(request):
                raise
            if error.status == 404:
                message = f"Invalid URL ({request.method} {request.path})."
            elif error.status == 405:
                message = f"Method {request.method} is not allowed for {request.path}."
            else:
                message = error.text or error.reason
            error_type = error.reason.lower().replace(" ", "_")
            return openai_error(RouterError(message, status=error.status, error_type=error_type))
        except Exception:
            if not is_openai(request):
                raise
            log.exception("unhandled error on %s %s", request.method, request.path)
            return openai_error(RouterError("The server had an error while processing your request.",
                                            status=500))

    return errors


def auth_middleware(api_key: str):
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path not in PUBLIC_PATHS and request.method != "OPTIONS":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time
                if is_openai(request):
                    return openai_error(RouterError("Incorrect API key provided.", status=401,
                                                    error_type="authentication", code="invalid_api_key"))
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

    openai = OpenAIRoutes()
    TgiRoutes(invocations=openai.invocations).add_to(app)
    openai.add_to(app)
    app.on_startup.append(startup)
    app.on_startup.append(openai.startup)  # needs the state built by `startup`
    app.on_cleanup.append(cleanup)
    return app
