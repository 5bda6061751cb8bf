"""Prometheus metrics with TGI's `tgi_*` names (plus KV/prefix-cache/TTFT ones), in a registry
owned by the app (no process-global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

DURATION_BUCKETS = tuple(0.00015 * 1.5**i for i in range(35))


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

        # Counter names are given without `_total`: prometheus_client adds it on exposition,
        # as TGI's own exporter does.
        self.request_count = counter("tgi_request_count", "Requests received")
        self.request_success = counter("tgi_request_success", "Requests finished successfully")
        self.request_failure = counter("tgi_request_failure", "Failed requests", ("err",))
        self.request_duration = histogram("tgi_request_duration", "End-to-end request duration (s)")
        self.validation_duration = histogram("tgi_request_validation_duration", "Validation duration (s)")
        self.queue_duration = histogram("tgi_request_queue_duration", "Time in the queue (s)")
        self.inference_duration = histogram("tgi_request_inference_duration", "Inference duration (s)")
        self.time_per_token = histogram("tgi_request_mean_time_per_token_duration", "Mean inter-token latency (s)")
        self.ttft = histogram("pytgi_request_time_to_first_token", "Time to first token (s)")
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
        self.kv_used = gauge("pytgi_kv_blocks_used", "KV blocks held by requests or the prefix cache")
        self.kv_free = gauge("pytgi_kv_blocks_free", "KV blocks free")
        self.kv_cached = gauge("pytgi_prefix_cache_blocks", "KV blocks held by the prefix cache")
        self.prefix_hit_tokens = gauge("pytgi_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache")
        self.prefix_query_tokens = gauge("pytgi_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache")

    def step(self, method: str, response, seconds: float, new_requests: int) -> None:
        self.batch_count.labels(method).inc()
        self.batch_success.labels(method).inc()
        self.batch_duration.labels(method).observe(seconds)
        self.forward_duration.labels(method).observe(response.forward_ns / 1e9)
        self.decode_duration.labels(method).observe(response.decode_ns / 1e9)
        if response.HasField("concat_ns"):
            self.concat_duration.labels(method).observe(response.concat_ns / 1e9)
        if new_requests:
            self.batch_next_size.observe(new_requests)

    def step_failed(self, method: str) -> None:
        self.batch_count.labels(method).inc()
        self.batch_failure.labels(method).inc()

    def dropped(self) -> None:
        self.request_failure.labels("dropped").inc()

    def batch(self, running: dict, cached, kv, queue_size: int) -> None:
        self.queue_size.set(queue_size)
        self.batch_size.set(len(running))
        self.batch_max_tokens.set(cached.max_tokens if cached is not None else 0)
        free = kv.num_free_blocks
        self.kv_free.set(free)
        self.kv_used.set(kv.num_blocks - 1 - free)
        self.kv_cached.set(kv.num_cached_blocks)
        self.prefix_hit_tokens.set(kv.prefix_hit_tokens)
        self.prefix_query_tokens.set(kv.prefix_query_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
