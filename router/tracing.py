"""OpenTelemetry traces of the router, exported over OTLP/gRPC when `--otlp-endpoint` is set.

The spans of one HTTP request:

    POST /generate_stream     SERVER span; a child of the caller's span when it sends a W3C
      │                       `traceparent` header (attributes: request id, status)
      ├── queue               per generation: enqueued → admitted into a batch
      └── infer               per generation: admitted → finished (tokens, finish reason, status)
            ├── prefill       each shard step that computed part of its prompt (several when the
            │                 prompt was chunked): batch size, tokens, shard forward time
            └── decode        one summary span over its decode steps: step count, mean batch size

A request with `n` choices or `best_of` has one queue/infer pair per generation.

The batcher never calls OpenTelemetry: after each step it appends the step's timings to the
`StepLog` (router/events.py) of every traced generation in it (a few attribute writes; a decode step only updates a
running summary, so a long generation does not grow its log), and the generation's spans are made
from those timestamps when it ends. The log's parent is OpenTelemetry's current context when the
generation starts: the request span, which the middleware makes current for the handler's task and
which asyncio copies into the tasks the handler starts (one per OpenAI choice).

OpenTelemetry is imported only when a `Tracer` is built, so without `--otlp-endpoint` the router
neither needs nor loads it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from router import request_id
from router.events import ErrorEvent, Event, StepLog
from router.http.probes import PROBE_PATHS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from router.config import RouterConfig
    from router.request import Entry

log = logging.getLogger(__name__)
UNTRACED_PATHS = PROBE_PATHS  # probes and scrapes would bury the generation traces


class Tracer:
    """Makes the router's spans; `provider` decides where they go (OTLP, or memory in tests)."""

    def __init__(self, provider: TracerProvider):
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._context = context
        self._trace = trace
        self._provider = provider
        self._tracer = provider.get_tracer("pytgi.router")
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def otlp(cls, endpoint: str, service_name: str) -> Tracer:
        """Batched export to an OTLP/gRPC collector (TGI's exporter; e.g. `http://127.0.0.1:4317`)."""
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if "://" not in endpoint:
            endpoint = f"http://{endpoint}"  # the exporter reads a bare host:port as a URL scheme
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        log.info("exporting traces to %s as %r", endpoint, service_name)
        return cls(provider)

    async def shutdown(self) -> None:
        """Export what is left; off the event loop (an unreachable collector takes seconds)."""
        await asyncio.get_running_loop().run_in_executor(None, self._provider.shutdown)

    # ---------------------------------------------------------------------------- HTTP request

    async def trace_request(self, request: web.Request, handler) -> web.StreamResponse:
        """Run `handler` inside the request's SERVER span (a child of its `traceparent`, if any)."""
        trace = self._trace
        parent = self._propagator.extract(request.headers)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        span = self._tracer.start_span(f"{request.method} {route}", context=parent, kind=trace.SpanKind.SERVER,
                                       attributes={"http.request.method": request.method, "http.route": route,
                                                   "url.path": request.path})
        if rid := request_id.CURRENT.get():
            span.set_attribute("request.id", rid)
        token = self._context.attach(trace.set_span_in_context(span, parent))
        try:
            response = await handler(request)
            self._set_status(span, response.status)
            return response
        except web.HTTPException as error:  # aiohttp's own answers (404, 405, ...)
            self._set_status(span, error.status)
            raise
        except asyncio.CancelledError:
            span.set_attribute("pytgi.client_disconnected", True)  # not a server error
            raise
        except Exception as error:
            span.record_exception(error)
            self._set_status(span, 500, f"{type(error).__name__}: {error}")
            raise
        finally:
            self._context.detach(token)
            span.end()

    def _set_status(self, span, status: int, description: str | None = None) -> None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:  # OTel's HTTP conventions: a 4xx is the client's error, not the server's
            span.set_status(self._trace.StatusCode.ERROR, description or f"HTTP {status}")

    # ------------------------------------------------------------------------------ generation

    def step_log(self) -> StepLog:
        """A log whose spans will be children of the current span (the request's)."""
        return StepLog(self._context.get_current(), time.time_ns() - time.monotonic_ns())

    def end_generation(self, entry: Entry, end: Event | None) -> None:
        """The queue / infer / step spans of a generation that ended with `end` (its finishing
        token or error event), or None when its consumer left first."""
        steps = entry.trace
        assert steps is not None
        now = time.monotonic()
        tracer, ns = self._tracer, steps.wall_ns
        ids = {"pytgi.generation.id": entry.id}
        admitted = entry.batched_at if entry.batched_at > 0 else None
        queue = tracer.start_span("queue", context=steps.context, start_time=ns(entry.queued_at), attributes=ids)
        if admitted is None:  # it ended while waiting: cancelled, timed out, or unschedulable
            self._set_outcome(queue, end)
        queue.end(end_time=ns(admitted or now))
        if admitted is None:
            return
        request = entry.request
        infer = tracer.start_span("infer", context=steps.context, start_time=ns(admitted), attributes={
            **ids, "gen_ai.usage.input_tokens": request.input_length,
            "gen_ai.request.max_tokens": request.parameters.max_new_tokens,
            "gen_ai.usage.output_tokens": len(entry.generated_ids),
        })
        inside = self._trace.set_span_in_context(infer, steps.context)
        for step in steps.prefills:
            span = tracer.start_span("prefill", context=inside, start_time=ns(step.start), attributes={
                "pytgi.batch.size": step.batch_size, "pytgi.step.tokens": step.num_tokens,
                "pytgi.shard.forward_s": step.forward_ns / 1e9})
            span.end(end_time=ns(step.end))
        if steps.decode_steps:
            span = tracer.start_span("decode", context=inside, start_time=ns(steps.decode_start), attributes={
                "pytgi.decode.steps": steps.decode_steps,
                "pytgi.batch.mean_size": steps.decode_batch_sizes / steps.decode_steps,
                "pytgi.shard.forward_s": steps.decode_forward_ns / 1e9})
            span.end(end_time=ns(steps.decode_end))
        self._set_outcome(infer, end)
        finish = getattr(end, "finish", None)
        infer.end(end_time=ns(finish.finished_at if finish is not None else now))

    def _set_outcome(self, span, end: Event | None) -> None:
        if end is None:
            span.set_attribute("pytgi.cancelled", True)
        elif isinstance(end, ErrorEvent):
            detail = getattr(end.error, "detail", None)  # the inside story, for operators only
            span.set_status(self._trace.StatusCode.ERROR, f"{end.error.message} ({detail})" if detail
                            else end.error.message)
        elif end.finish is not None:
            span.set_attribute("gen_ai.response.finish_reasons", (end.finish.finish_reason,))


def tracing_middleware(tracer_of: Callable[[web.Request], Tracer | None]):
    """`tracer_of(request)`: the app's tracer, looked up per request because it is built at startup
    (with the rest of the AppState), after the middlewares are fixed."""

    @web.middleware
    async def traced(request: web.Request, handler):
        tracer = tracer_of(request)
        if tracer is None or request.path in UNTRACED_PATHS:
            return await handler(request)
        return await tracer.trace_request(request, handler)

    return traced


def tracer_for(config: RouterConfig) -> Tracer | None:
    """The OTLP tracer `--otlp-endpoint` asks for; None (and no OpenTelemetry import) without it."""
    if not config.otlp_endpoint:
        return None
    return Tracer.otlp(config.otlp_endpoint, config.otlp_service_name)
