"""The aiohttp application: middlewares, routes, startup and cleanup. No request logic here."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from router import request_id
from router.config import RouterConfig
from router.errors import (
    AuthenticationError,
    DrainingError,
    PayloadTooLargeError,
    RequestTimeoutError,
    RouterError,
)
from router.http.auth import ApiKeys
from router.http.docs import PUBLIC_PATHS as DOCS_PATHS, DocsRoutes
from router.http.drain import DRAIN, Drain
from router.http.playground import (
    PAGE_PATHS as PLAYGROUND_PAGE,
    PUBLIC_PATHS as PLAYGROUND_PATHS,
    PlaygroundRoutes,
)
from router.http.probes import PROBE_PATHS, ProbeRoutes
from router.openai.routes import END_USER, OPENAI_REQUEST, OpenAIRoutes
from router.routes import ADAPTER, TgiRoutes
from router.state import STATE, AppState
from router.tracing import tracing_middleware

log = logging.getLogger(__name__)
# Every other path needs the API key (when one is set), unknown paths included: deny by default.
PUBLIC_PATHS = PROBE_PATHS | {"/info"} | DOCS_PATHS | PLAYGROUND_PATHS
# Public to read only (GET, HEAD): GET / is the playground's page, POST / TGI's compat route.
PUBLIC_READ_PATHS = PLAYGROUND_PAGE
REQUEST_ID = web.RequestKey("request_id", str)
DRAIN_RETRY_AFTER_SECONDS = 5  # long enough for a load balancer to drop this replica


def is_public(request: web.Request) -> bool:
    if request.path in PUBLIC_READ_PATHS:
        return request.method in ("GET", "HEAD")
    return request.path in PUBLIC_PATHS


def is_openai(request: web.Request) -> bool:
    """OpenAI routes (and OpenAI bodies on /invocations) answer errors in OpenAI's envelope."""
    return request.path == "/v1" or request.path.startswith("/v1/") or request.get(OPENAI_REQUEST, False)


def openai_error(error: RouterError, headers: dict[str, str] | None = None) -> web.Response:
    status = error.openai_status
    if status == 429:
        headers = {"Retry-After": "1", **(headers or {})}
    return web.json_response(error.to_openai(), status=status, headers=headers)


def error_response(request: web.Request, error: RouterError, headers: dict[str, str] | None = None) -> web.Response:
    """`error` in the envelope of the route family `request` belongs to."""
    if is_openai(request):
        return openai_error(error, headers)
    return web.json_response(error.to_tgi(), status=error.status, headers=headers)


def error_middleware():
    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except RouterError as error:
            return error_response(request, error)
        except web.HTTPRequestEntityTooLarge as error:
            return error_response(request, PayloadTooLargeError(error.text or "payload too large"))
        except web.HTTPException as error:
            if error.status < 400:
                raise
            if error.status == 404:
                message = f"Invalid URL ({request.method} {request.path})."
            elif error.status == 405:
                message = f"Method {request.method} is not allowed for {request.path}."
            else:
                message = error.text or error.reason
            error_type = error.reason.lower().replace(" ", "_")
            # aiohttp's own 404/405 are plain text: answer them in the route family's envelope too.
            headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
            return error_response(request, RouterError(message, status=error.status, error_type=error_type),
                                  headers)
        except ConnectionError:
            # The client left while its response was written (e.g. before a stream's headers went
            # out): nothing to answer and nothing broken. aiohttp's own write of this placeholder
            # fails quietly on the closed transport; 499 is what the access line shows.
            log.info("client went away during %s %s", request.method, request.path)
            return web.Response(status=499)
        except Exception:
            # A bug, never the client's fault: the traceback goes to the log, the client gets the
            # route family's envelope with nothing of the server's internals.
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(request, RouterError("The server had an error while processing your "
                                                        "request.", status=500))

    return errors


def auth_middleware(keys: ApiKeys):
    """Before routing, so that unknown paths answer 401, not 404, to a caller without a key.
    Allowed origins' CORS preflights never get here: Cors (outside this one) answers them."""

    @web.middleware
    async def auth(request: web.Request, handler):
        if is_public(request) or keys.accepts(request.headers.get("Authorization")):
            return await handler(request)
        error = AuthenticationError("Incorrect API key provided." if is_openai(request) else "Unauthorized")
        return error_response(request, error, {"WWW-Authenticate": "Bearer"})

    return auth


def request_id_middleware():
    """Outermost: every response (errors and streams included) echoes the id, and every log line
    written while serving the request carries it (router/log.py). One access line per request."""

    @web.middleware
    async def with_request_id(request: web.Request, handler):
        rid = request[REQUEST_ID] = request_id.resolve(request.headers.get(request_id.HEADER))
        token = request_id.CURRENT.set(rid)
        start, status = time.monotonic(), 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        except asyncio.CancelledError:
            status = 499  # nginx's "client closed request": the client left, the handler was cancelled
            raise
        finally:
            if not is_public(request):
                user = f" user={request[END_USER]!r}" if END_USER in request else ""
                adapter = f" adapter={request[ADAPTER]!r}" if ADAPTER in request else ""
                log.info("%s %s %d %.0f ms%s%s", request.method, request.path, status,
                         (time.monotonic() - start) * 1000, adapter, user)
            request_id.CURRENT.reset(token)

    return with_request_id


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: headers must be set before a stream's first byte, not after the handler."""
    if REQUEST_ID in request:
        response.headers[request_id.HEADER] = request[REQUEST_ID]


def drain_middleware(drain: Drain):
    """Counts protected requests in flight (a stream until its last event) and, once the router
    drains, refuses new ones with 503 + Retry-After; probes always pass."""

    @web.middleware
    async def admission(request: web.Request, handler):
        if is_public(request):
            return await handler(request)
        if drain.is_draining:
            response = error_response(request, DrainingError(), {"Retry-After": str(DRAIN_RETRY_AFTER_SECONDS)})
            response.force_close()  # the client's next request should open a connection elsewhere
            return response
        drain.enter()
        try:
            return await handler(request)
        finally:
            drain.leave()

    return admission


def body_timeout_middleware(timeout: float):
    """Read the whole body up front within `timeout` (aiohttp has no body timeout: a client
    trickling bytes would hold a handler forever). Handlers then reuse the cached body. Inside
    error_middleware, so 408 and 413 get the route family's envelope."""

    @web.middleware
    async def read_body(request: web.Request, handler):
        if request.body_exists:
            try:
                async with asyncio.timeout(timeout):
                    await request.read()
            except TimeoutError:
                raise RequestTimeoutError(f"The request body was not received within {timeout:g} s") from None
            except (HttpProcessingError, RequestPayloadError) as error:
                # A body that cannot be received as declared (a Content-Encoding it is not in, a
                # truncated chunk): the client's fault, a 400 like a body that is not JSON.
                log.info("unreadable request body: %r", error)
                raise RouterError("The request body could not be read: its Content-Encoding or framing is "
                                  "broken.", status=400, error_type="validation") from None
        return await handler(request)

    return read_body


class Cors:
    """--cors-allow-origin. Without it CORS is off: no CORS header at all, as in TGI (browsers
    then refuse cross-origin reads). With it, only the listed origins are answered, or any with an
    explicit `*`. Their preflights are answered before auth (browsers send them without the
    Authorization header); other preflights go on like any OPTIONS request (401, 405)."""

    METHODS = "GET, POST"
    HEADERS = "content-type, authorization"  # authorization: --api-key's bearer token
    MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer

    def __init__(self, origins: tuple[str, ...]):
        self.origins = frozenset(origins)
        self.any_origin = "*" in self.origins

    def allowed(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for a request from `origin`; None: no CORS."""
        if origin is None:
            return None
        if self.any_origin:
            return "*"
        return origin if origin in self.origins else None

    def middleware(self):
        @web.middleware
        async def preflight(request: web.Request, handler):
            if (request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
                    and self.allowed(request.headers.get("Origin"))):
                return web.Response(status=204, headers={
                    "Access-Control-Allow-Methods": self.METHODS, "Access-Control-Allow-Headers": self.HEADERS,
                    "Access-Control-Max-Age": self.MAX_AGE})
            return await handler(request)

        return preflight

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Headers on every response, set as it is prepared: a stream's headers leave before its
        handler returns, so a middleware adding them afterwards would miss every stream."""
        allow_origin = self.allowed(request.headers.get("Origin"))
        if allow_origin is not None:
            response.headers["Access-Control-Allow-Origin"] = allow_origin
        if not self.any_origin:
            # The answer depends on the Origin (a header for some, none for others): a shared
            # cache must not give one origin's response to another.
            vary = response.headers.get("Vary")
            response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


def create_app(config: RouterConfig, state: AppState | None = None) -> web.Application:
    """With `state` given (tests), the app uses it instead of connecting to shards."""
    keys = ApiKeys.load(config.api_key, config.api_key_file)  # ValueError: unusable key file
    drain = Drain()
    middlewares = [request_id_middleware()]
    if config.cors_allow_origin:
        cors = Cors(config.cors_allow_origin)
        middlewares.append(cors.middleware())
    if config.otlp_endpoint:
        # Inside request ids (spans carry them), outside the rest (spans cover auth and errors).
        middlewares.insert(1, tracing_middleware(lambda request: request.app[STATE].tracer))
    if keys is not None:
        middlewares.append(auth_middleware(keys))
    middlewares.append(drain_middleware(drain))
    middlewares.append(error_middleware())
    middlewares.append(body_timeout_middleware(config.client_body_timeout))
    app = web.Application(middlewares=middlewares, client_max_size=config.payload_limit)
    app[DRAIN] = drain
    app.on_response_prepare.append(echo_request_id)
    if config.cors_allow_origin:
        app.on_response_prepare.append(cors.on_prepare)

    async def startup(app: web.Application) -> None:
        app[STATE] = state or await AppState.connect(config)
        app[STATE].start()
        log.info("router ready: %s", app[STATE].limits)

    async def cleanup(app: web.Application) -> None:
        if STATE in app:
            await app[STATE].stop()

    openai = OpenAIRoutes()
    TgiRoutes(invocations=openai.invocations).add_to(app)
    ProbeRoutes(drain).add_to(app)
    openai.add_to(app)
    DocsRoutes(playground=not config.disable_playground).add_to(app)
    if not config.disable_playground:
        PlaygroundRoutes().add_to(app)
    app.on_startup.append(startup)
    app.on_startup.append(openai.startup)  # needs the state built by `startup`
    app.on_cleanup.append(cleanup)
    return app
