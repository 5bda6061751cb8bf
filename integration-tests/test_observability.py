"""Observability through the real launcher: /metrics counters after N requests, traces exported
to a local OTLP/gRPC collector (with the caller's `traceparent` as parent), and a short soak
(benchmarks/soak.py) that abandons requests mid-flight and checks that no KV block leaks."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent import futures

import grpc
import pytest
import requests

from benchmarks import soak
from conftest import assert_kv_returned, start_launcher, stop_launcher, wait_idle

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


def scrape(url: str) -> str:
    return requests.get(f"{url}/metrics", timeout=10).text


def total(text: str, name: str, **labels) -> float:
    """A sample of a scrape; 0 when absent (a labelled counter appears once first incremented)."""
    label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    sample = f"{name}{{{label_text}}}" if labels else name
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_counters_match_after_n_requests(url):
    wait_idle(url)
    before = scrape(url)
    # Over 16 tokens (a CPU block) before they differ, so the second round can hit the prefix cache.
    prompts = [f"Here is a list of the numbers that come after one, in order, one per line: {i}" for i in range(3)]
    generated = []
    for prompt in prompts:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 6, "details": True}}
        generated.append(requests.post(f"{url}/generate", json=body, timeout=60).json()["details"]["generated_tokens"])
    for prompt in prompts:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 5}}
        with requests.post(f"{url}/generate_stream", json=body, stream=True, timeout=60) as response:
            generated.append(sum(1 for line in response.iter_lines() if line.startswith(b"data:")))
    wait_idle(url)
    after = scrape(url)

    def delta(name: str, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    n, tokens = len(generated), sum(generated)
    # TGI's exposition: counters under their bare names, no `_total` and no `_created` series.
    assert not re.search(r"^\S+_(total|created)[{ ]", after, re.M)
    assert delta("tgi_request_count") == n
    assert delta("tgi_request_success") == n
    assert delta("tgi_request_failure", err="dropped") == 0
    for histogram in ("tgi_request_validation_duration", "tgi_request_input_length", "tgi_request_max_new_tokens",
                      "tgi_request_queue_duration", "tgi_request_inference_duration", "tgi_request_duration",
                      "tgi_request_generated_tokens", "pytgi_request_time_to_first_token"):
        assert delta(f"{histogram}_count") == n, histogram
    assert delta("tgi_request_generated_tokens_sum") == tokens
    assert delta("tgi_request_max_new_tokens_sum") == 3 * 6 + 3 * 5
    assert delta("pytgi_request_inter_token_latency_count") == tokens - n
    assert delta("tgi_batch_next_size_sum") == n  # each request admitted into a batch once
    steps = sum(delta("tgi_batch_inference_success", method=m) for m in ("prefill", "decode"))
    assert delta("tgi_batch_inference_success", method="prefill") == n  # one at a time
    assert steps == sum(delta("tgi_batch_filter_duration_count", method=m) for m in ("prefill", "decode"))
    assert steps == sum(delta("tgi_batch_inference_count", method=m) for m in ("prefill", "decode"))
    # The same prompts twice: the second round found the first round's prompt blocks.
    assert delta("pytgi_prefix_cache_hits") >= len(prompts)
    assert total(after, "tgi_batch_current_size") == total(after, "tgi_queue_size") == 0
    assert total(after, "pytgi_kv_blocks_held_by_requests") == 0
    assert total(after, "pytgi_kv_blocks_used") == total(after, "pytgi_prefix_cache_blocks")


def test_short_soak_leaks_no_blocks(url):
    code = asyncio.run(soak.amain(["--url", url, "--requests", "100", "--concurrency", "16", "--max-tokens", "8",
                                   "--disconnect", "0.3", "--disconnect-max-delay", "1.0", "--seed", "1"]))
    assert code == 0
    assert_kv_returned(url)


class Collector:
    """A minimal OTLP/gRPC trace collector on loopback that keeps what it receives."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        collector = self
        self.requests = []
        self.received = threading.Event()

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                collector.requests.append(request)
                collector.received.set()
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def spans(self) -> list[tuple[str, object]]:
        """(service.name, span) of everything received."""
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                out += [(service, span) for scope in resource_spans.scope_spans for span in scope.spans]
        return out

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture(scope="module")
def traced_server():
    collector = Collector()
    # Export every 200 ms instead of every 5 s, so the test does not wait on the batch processor.
    server = start_launcher("--otlp-endpoint", f"http://127.0.0.1:{collector.port}",
                            "--otlp-service-name", "pytgi-it", env={"OTEL_BSP_SCHEDULE_DELAY": "200"})
    yield server, collector
    stop_launcher(server)
    collector.stop()


def test_traces_reach_an_otlp_collector_under_the_callers_trace(traced_server):
    server, collector = traced_server
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01", "X-Request-Id": "trace-it-1"}
    body = {"inputs": "Count with me: one, two, three, four, five,", "parameters": {"max_new_tokens": 4}}
    response = requests.post(f"{server.url}/generate", json=body, headers=headers, timeout=60)
    assert response.status_code == 200
    chat = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with requests.post(f"{server.url}/v1/chat/completions", json=chat, stream=True, timeout=60) as streamed:
        assert sum(1 for _ in streamed.iter_lines()) > 0
    requests.get(f"{server.url}/health", timeout=10)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = {span.name for _, span in collector.spans()}
        if {"POST /generate", "POST /v1/chat/completions", "queue", "infer", "prefill", "decode"} <= names:
            break
        time.sleep(0.2)
    spans = collector.spans()
    assert {service for service, _ in spans} == {"pytgi-it"}
    names = [span.name for _, span in spans]
    assert "GET /health" not in names
    (request_span,) = [span for _, span in spans if span.name == "POST /generate"]
    assert request_span.trace_id.hex() == TRACE_ID
    assert request_span.parent_span_id.hex() == PARENT_SPAN_ID
    attributes = {a.key: a.value for a in request_span.attributes}
    assert attributes["request.id"].string_value == "trace-it-1"
    assert attributes["http.response.status_code"].int_value == 200

    in_trace = [span for _, span in spans if span.trace_id.hex() == TRACE_ID]
    by_name = {span.name: span for span in in_trace}
    assert {"queue", "infer", "prefill", "decode"} <= set(by_name)
    assert by_name["queue"].parent_span_id == by_name["infer"].parent_span_id == request_span.span_id
    assert by_name["prefill"].parent_span_id == by_name["decode"].parent_span_id == by_name["infer"].span_id
    infer = {a.key: a.value for a in by_name["infer"].attributes}
    assert 2 <= infer["gen_ai.usage.output_tokens"].int_value <= 4
    decode = {a.key: a.value for a in by_name["decode"].attributes}
    assert decode["pytgi.decode.steps"].int_value == infer["gen_ai.usage.output_tokens"].int_value - 1

    # Without a traceparent the chat request starts its own trace, with its generation inside.
    (chat_span,) = [span for _, span in spans if span.name == "POST /v1/chat/completions"]
    assert chat_span.trace_id.hex() != TRACE_ID and not chat_span.parent_span_id
    chat_children = [span for _, span in spans if span.parent_span_id == chat_span.span_id]
    assert sorted(span.name for span in chat_children) == ["infer", "queue"]
