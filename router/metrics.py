"""Prometheus metrics with TGI's `tgi_*` names, types and labels (plus TTFT, inter-token latency,
KV blocks and prefix-cache ones), in a registry owned by the app (no process-global registry).

Who records what: handlers count requests; `Infer` records per-request figures as the consumer
reads its events (validation, TTFT, inter-token gaps, success/failure, durations); the batcher
records per-step figures. Figures that change outside a step (queue length) or that live in the
KV manager are read at scrape time, so an idle server reports its true state.

Exposition: `render` writes Prometheus text format 0.0.4 the way TGI's Rust exporter does, so that
dashboards and scrape configs written for TGI (Grafana, Datadog, GKE) find the same series: a
counter's sample carries its bare name (`tgi_request_count`, not `tgi_request_count_total`) under a
`counter` TYPE line of that same name, and there are no `_created` series. The rule holds for every
family on the endpoint, `pytgi_*` included, so no query needs to know which prefix takes `_total`.
Histograms keep the standard `_bucket`/`_sum`/`_count` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from router.scheduler.kv import KVManager

DURATION_BUCKETS = tuple(0.00015 * 1.5**i for i in range(35))
# TGI's `err` labels for error types whose JSON `error_type` is longer.
FAILURE_LABELS = {"incomplete_generation": "incomplete", "template_error": "template"}


def _linear(maximum: int, count: int = 100) -> tuple[float, ...]:
    step = max(maximum / count, 1)
    return tuple(step * (i + 1) for i in range(count))


class Metrics:
    def __init__(self, max_input_tokens: int, max_total_tokens: int):
        self.registry = registry = CollectorRegistry(auto_describe=True)

        def counter(name, doc, labels=()):
            return Counter(name, doc, labels, registry=registry)

        def histogram(name, doc, buckets=DURATION_BUCKETS, labels=()):
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        def gauge(name, doc):
            return Gauge(name, doc, registry=registry)

        # prometheus_client records counters as `<name>_total` plus `<name>_created`; `render` writes
        # them as TGI does (bare name, no `_created`).
        self.request_count = counter("tgi_request_count", "Requests received")
        self.request_success = counter("tgi_request_success", "Requests finished successfully")
        self.request_failure = counter("tgi_request_failure", "Failed requests", ("err",))
        self.request_duration = histogram("tgi_request_duration", "End-to-end request duration (s)")
        self.validation_duration = histogram("tgi_request_validation_duration", "Validation duration (s)")
        self.queue_duration = histogram("tgi_request_queue_duration", "Time in the queue (s)")
        self.inference_duration = histogram("tgi_request_inference_duration", "Inference duration (s)")
        self.time_per_token = histogram("tgi_request_mean_time_per_token_duration", "Mean inter-token latency (s)")
        self.ttft = histogram("pytgi_request_time_to_first_token", "Time to first token (s)")
        self.inter_token_latency = histogram("pytgi_request_inter_token_latency",
                                             "Gap between consecutive tokens of a request (s)")
        self.generated_tokens = histogram("tgi_request_generated_tokens", "Generated tokens", _linear(max_total_tokens))
        self.input_length = histogram("tgi_request_input_length", "Prompt tokens", _linear(max_input_tokens))
        self.max_new_tokens = histogram("tgi_request_max_new_tokens", "Requested max_new_tokens", _linear(max_total_tokens))
        self.queue_size = gauge("tgi_queue_size", "Requests waiting")
        self.batch_size = gauge("tgi_batch_current_size", "Requests in the running batch")
        self.batch_max_tokens = gauge("tgi_batch_current_max_tokens", "KV tokens reserved by the running batch")
        self.batch_max_total_tokens = gauge("tgi_batch_max_total_tokens", "KV capacity in tokens")
        self.batch_next_size = histogram("tgi_batch_next_size", "Size of each new batch", tuple(range(1, 1025)))
        self.batch_count = counter("tgi_batch_inference_count", "Steps run", ("method",))
        self.batch_success = counter("tgi_batch_inference_success", "Steps that succeeded", ("method",))
        self.batch_failure = counter("tgi_batch_inference_failure", "Steps that failed", ("method",))
        self.batch_duration = histogram("tgi_batch_inference_duration", "Step duration (s)", labels=("method",))
        self.forward_duration = histogram("tgi_batch_forward_duration", "Shard forward (s)", labels=("method",))
        self.decode_duration = histogram("tgi_batch_decode_duration", "Shard sampling (s)", labels=("method",))
        self.concat_duration = histogram("tgi_batch_concat_duration", "Shard concatenation (s)", labels=("method",))
        self.filter_duration = histogram("tgi_batch_filter_duration",
                                         "Router time to stream a step's tokens and filter the batch (s)",
                                         labels=("method",))
        self.batch_concat = counter("tgi_batch_concat", "New requests joined a running batch", ("reason",))
        # Per LoRA adapter (none for base-model requests): what each fine-tune serves.
        self.adapter_requests = counter("pytgi_adapter_request_success",
                                        "Requests finished successfully, by LoRA adapter", ("adapter_id",))
        self.adapter_tokens = counter("pytgi_adapter_generated_tokens", "Tokens generated, by LoRA adapter",
                                      ("adapter_id",))
        self.skipped_tokens = histogram("tgi_request_skipped_tokens",
                                        "Draft tokens accepted in one step (--speculate)", tuple(range(17)))

    def watch(self, kv: KVManager, queue_size: Callable[[], int]) -> None:
        """Read the queue length and the KV figures at scrape time from now on."""
        self.queue_size.set_function(queue_size)
        self.registry.register(KVCollector(kv))

    def failure(self, error_type: str) -> None:
        self.request_failure.labels(FAILURE_LABELS.get(error_type, error_type)).inc()

    def step(self, method: str, response, started: float, filtering: float, finished: float,
             new_requests: int) -> None:
        """One successful step (monotonic times): the RPC ran from `started` to `filtering`, then the
        router streamed its tokens and filtered the batch until `finished`. As in TGI, the step's
        inference duration covers both."""
        self.batch_count.labels(method).inc()
        self.batch_success.labels(method).inc()
        self.batch_duration.labels(method).observe(finished - started)
        self.filter_duration.labels(method).observe(finished - filtering)
        self.forward_duration.labels(method).observe(response.forward_ns / 1e9)
        self.decode_duration.labels(method).observe(response.decode_ns / 1e9)
        if response.HasField("concat_ns"):
            self.concat_duration.labels(method).observe(response.concat_ns / 1e9)
        if new_requests:
            self.batch_next_size.observe(new_requests)

    def step_failed(self, method: str) -> None:
        self.batch_count.labels(method).inc()
        self.batch_failure.labels(method).inc()

    def batch(self, running: dict, cached) -> None:
        self.batch_size.set(len(running))
        self.batch_max_tokens.set(cached.max_tokens if cached is not None else 0)

    def render(self) -> bytes:
        return render_text(self.registry)


def render_text(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format 0.0.4, TGI-style: counters under their bare family name
    and no `_created` samples (see the module docstring)."""
    lines = []
    for family in registry.collect():
        name, kind = family.name, family.type
        assert kind in ("counter", "gauge", "histogram"), (name, kind)
        lines.append(f"# HELP {name} {_escape(family.documentation, quote=False)}")
        lines.append(f"# TYPE {name} {kind}")
        for sample in family.samples:
            if sample.name == f"{name}_created":
                continue
            sample_name = name if kind == "counter" else sample.name
            labels = ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(sample.labels.items()))
            labels = f"{{{labels}}}" if labels else ""
            lines.append(f"{sample_name}{labels} {floatToGoString(sample.value)}")
    return ("\n".join(lines) + "\n").encode()


def _escape(text: str, quote: bool = True) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


class KVCollector:
    """KV block and prefix-cache figures, read from the KV manager at each scrape."""

    def __init__(self, kv: KVManager) -> None:
        self.kv = kv

    def collect(self) -> Iterator[Metric]:
        kv = self.kv
        yield GaugeMetricFamily("pytgi_kv_blocks_used", "KV blocks held by requests or the prefix cache",
                                value=kv.num_used_blocks)
        yield GaugeMetricFamily("pytgi_kv_blocks_free", "KV blocks on the free list", value=kv.num_free_blocks)
        yield GaugeMetricFamily("pytgi_kv_blocks_held_by_requests",
                                "KV blocks held by at least one request (0 when idle; more is a leak)",
                                value=kv.num_request_blocks)
        yield GaugeMetricFamily("pytgi_prefix_cache_blocks", "KV blocks held by the prefix cache",
                                value=kv.num_cached_blocks)
        yield GaugeMetricFamily("pytgi_prefix_cache_evictable_blocks",
                                "Prefix-cache blocks that could be evicted now", value=kv.num_evictable)
        yield CounterMetricFamily("pytgi_prefix_cache_hits", "Admitted requests that reused cached blocks",
                                  value=kv.prefix_hits)
        yield CounterMetricFamily("pytgi_prefix_cache_queries", "Admitted requests looked up in the prefix cache",
                                  value=kv.prefix_queries)
        yield CounterMetricFamily("pytgi_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                  value=kv.prefix_hit_tokens)
        yield CounterMetricFamily("pytgi_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache",
                                  value=kv.prefix_query_tokens)
