"""OpenTelemetry spans, exported to memory: the tree of one HTTP request (request → queue / infer →
prefill / decode), the parent taken from a W3C `traceparent`, choices run in their own tasks,
cancelled and failed generations, and a router that never loads OpenTelemetry without an endpoint."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from contextlib import aclosing

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.app import request_id_middleware
from router.events import ErrorEvent
from router.openai.choices import merge_streams
from router.tracing import Tracer, tracing_middleware
from tests.conftest import make_engine, save_tiny
from tests.router.helpers import serving, valid_request

BS = 4
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def traced(tiny, router_tokenizer):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = serving(make_engine(tiny, block_size=BS, num_blocks_tokens=2048), router_tokenizer, tracer=Tracer(provider))
    return s, exporter


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 31 + i * 7) % 120 + 3 for i in range(length)]


def app_for(s) -> web.Application:
    """The router's middleware order (request ids, then tracing) over a handler that runs the
    generations of `prompts` like the OpenAI routes run choices (merge_streams: one task each)."""

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        valids = [valid_request(p, body["max_new_tokens"], ignore_eos=True) for p in body["prompts"]]
        counts, errors = [0] * len(valids), []
        async with aclosing(merge_streams(s.infer, valids)) as events:
            async for index, event in events:
                if isinstance(event, ErrorEvent):
                    errors.append(event.error.message)
                    continue
                counts[index] += 1
                if body.get("stop_after") and sum(counts) >= body["stop_after"]:
                    break
        return web.json_response({"tokens": counts, "errors": errors})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[request_id_middleware(), tracing_middleware(lambda request: s.infer.tracer)])
    app.router.add_post("/gen", generate)
    app.router.add_get("/health", health)
    return app


def call(s, *requests: tuple[str, str, dict | None, dict | None]) -> list:
    """(method, path, json, headers) requests in order, with the batcher running. One event loop
    per Serving: its queue's asyncio.Event binds to the first loop that waits on it."""

    async def main():
        task = asyncio.create_task(s.batcher.run())
        answers = []
        try:
            async with TestClient(TestServer(app_for(s))) as client:
                for method, path, body, headers in requests:
                    response = await client.request(method, path, json=body, headers=headers)
                    assert response.status == 200, await response.text()
                    answers.append(await response.json() if path == "/gen" else await response.text())
            await s.idle()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return answers

    return asyncio.run(main())


def by_name(spans) -> dict[str, list]:
    out: dict[str, list] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def test_one_request_makes_a_tree_of_queue_infer_and_step_spans(traced):
    s, exporter = traced
    # 20 prompt tokens over a 16-token prefill budget: two prefill chunks, then 4 decode steps.
    (answer,) = call(s, ("POST", "/gen", {"prompts": [prompt(1, 20)], "max_new_tokens": 5},
                         {"X-Request-Id": "req-42"}))
    assert answer == {"tokens": [5], "errors": []}
    spans = by_name(exporter.get_finished_spans())
    assert sorted(spans) == ["POST /gen", "decode", "infer", "prefill", "queue"]
    (http,) = spans["POST /gen"]
    (queue,) = spans["queue"]
    (infer,) = spans["infer"]
    (decode,) = spans["decode"]
    prefills = sorted(spans["prefill"], key=lambda span: span.start_time)

    assert http.parent is None and http.kind.name == "SERVER"
    assert http.attributes["request.id"] == "req-42"
    assert http.attributes["http.response.status_code"] == 200
    assert http.attributes["http.route"] == "/gen"
    assert {span.context.trace_id for group in spans.values() for span in group} == {http.context.trace_id}
    assert queue.parent.span_id == infer.parent.span_id == http.context.span_id
    assert all(span.parent.span_id == infer.context.span_id for span in [*prefills, decode])

    assert queue.attributes["pytgi.generation.id"] == infer.attributes["pytgi.generation.id"]
    assert infer.attributes["gen_ai.usage.input_tokens"] == 20
    assert infer.attributes["gen_ai.usage.output_tokens"] == 5
    assert infer.attributes["gen_ai.request.max_tokens"] == 5
    assert infer.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert infer.status.is_ok
    assert [span.attributes["pytgi.step.tokens"] for span in prefills] == [16, 4]
    assert decode.attributes["pytgi.decode.steps"] == 4
    assert decode.attributes["pytgi.batch.mean_size"] == 1

    # Time order: queued, then admitted; steps inside the generation; all inside the request.
    assert http.start_time <= queue.start_time <= queue.end_time <= infer.start_time
    assert infer.start_time <= prefills[0].start_time < prefills[0].end_time <= prefills[1].start_time
    assert prefills[1].end_time <= decode.start_time < decode.end_time <= infer.end_time <= http.end_time


def test_traceparent_makes_the_request_span_a_child_of_the_callers(traced):
    s, exporter = traced
    call(s, ("POST", "/gen", {"prompts": [prompt(2, 6)], "max_new_tokens": 2},
             {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"}))
    spans = by_name(exporter.get_finished_spans())
    (http,) = spans["POST /gen"]
    assert http.parent is not None and http.parent.is_remote
    assert http.parent.span_id == int(PARENT_SPAN_ID, 16)
    assert {span.context.trace_id for group in spans.values() for span in group} == {int(TRACE_ID, 16)}


def test_choices_running_in_their_own_tasks_stay_under_the_request_span(traced):
    s, exporter = traced
    (answer,) = call(s, ("POST", "/gen", {"prompts": [prompt(3, 6), prompt(4, 7)], "max_new_tokens": 3}, None))
    assert answer["tokens"] == [3, 3]
    spans = by_name(exporter.get_finished_spans())
    (http,) = spans["POST /gen"]
    assert len(spans["queue"]) == len(spans["infer"]) == 2
    assert {span.parent.span_id for span in spans["queue"] + spans["infer"]} == {http.context.span_id}
    assert len({span.attributes["pytgi.generation.id"] for span in spans["infer"]}) == 2


def test_a_generation_whose_client_left_is_marked_cancelled(traced):
    s, exporter = traced
    (left,) = call(s, ("POST", "/gen", {"prompts": [prompt(5, 6)], "max_new_tokens": 40, "stop_after": 2}, None))
    assert left["tokens"] == [2]
    (cancelled,) = by_name(exporter.get_finished_spans())["infer"]
    assert cancelled.attributes["pytgi.cancelled"] is True
    assert "gen_ai.response.finish_reasons" not in cancelled.attributes


def test_a_generation_cancelled_in_the_queue_has_only_a_queue_span(traced):
    s, exporter = traced

    async def leave_while_queued():  # no batcher runs: the entry never leaves the queue
        stream = s.infer.stream(valid_request(prompt(7, 5), 3))
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    asyncio.run(leave_while_queued())
    (queue,) = exporter.get_finished_spans()
    assert queue.name == "queue" and queue.parent is None  # no request span outside an HTTP request
    assert queue.attributes["pytgi.cancelled"] is True
    assert queue.end_time >= queue.start_time


def test_a_failed_generation_has_an_error_status(traced):
    s, exporter = traced
    s.client.fail_next = "decode"
    (failed,) = call(s, ("POST", "/gen", {"prompts": [prompt(6, 6)], "max_new_tokens": 5}, None))
    assert len(failed["errors"]) == 1
    spans = by_name(exporter.get_finished_spans())
    (infer,) = spans["infer"]
    assert not infer.status.is_ok and "injected failure" in infer.status.description
    assert spans["POST /gen"][0].status.is_unset  # the HTTP exchange itself succeeded (200)


def test_probes_are_not_traced(traced):
    s, exporter = traced
    assert call(s, ("GET", "/health", None, None)) == ["ok"]
    assert exporter.get_finished_spans() == ()


def test_router_does_not_load_opentelemetry_without_an_endpoint():
    code = (
        "import sys\n"
        "from types import SimpleNamespace\n"
        "import router.app, router.cli, router.state\n"
        "from router.tracing import tracer_for\n"
        "assert tracer_for(SimpleNamespace(otlp_endpoint=None, otlp_service_name='x')) is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_otlp_tracer_accepts_a_bare_host_port():
    tracer = Tracer.otlp("127.0.0.1:4317", "svc")  # no connection is made until spans are exported
    try:
        assert tracer._provider.resource.attributes["service.name"] == "svc"
    finally:
        asyncio.run(tracer.shutdown())
