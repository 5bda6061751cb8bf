"""RouterConfig: the router process's one frozen configuration, built by its CLI (router/cli.py, from
the options in router/options.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.options import BY_NAME


def _default(name: str) -> object:
    return BY_NAME[name].default  # router/options.py: each option's default, written once


@dataclass(frozen=True, slots=True)
class RouterConfig:
    master_shard_uds_path: str
    hostname: str
    port: int
    model_id: str
    revision: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int | None  # None: resolved at warmup (max_total_tokens - 1)
    max_total_tokens: int | None  # None: min(KV capacity, max_position_embeddings)
    waiting_served_ratio: float
    max_batch_prefill_tokens: int | None  # None: 4096 on GPU, 512 on CPU (one step ≈ 1 s there)
    max_batch_total_tokens: int | None  # None: the KV capacity the shards report
    max_waiting_tokens: int
    max_batch_size: int | None
    validation_workers: int
    api_key: str | None = field(repr=False)  # a secret: out of repr(), so of any log line showing the config
    cors_allow_origin: tuple[str, ...]
    json_output: bool
    otlp_endpoint: str | None
    otlp_service_name: str
    payload_limit: int
    max_client_batch_size: int
    disable_grammar_support: bool
    tokenizer_config_path: str | None
    prefix_caching: bool
    log_level: str = "info"
    # /v1/*: 404 for a `model` that is neither the served one (or "tgi") nor a LoRA adapter (with
    # adapters loaded, an unknown `model` is a 404 anyway: router/openai/routes.py Context.select_model)
    strict_model_name: bool = _default("strict_model_name")
    # router.openai.reasoning.CHOICES: `<think>` → reasoning_content
    reasoning_parser: str = _default("reasoning_parser")
    # Security and shutdown (router/http/auth.py, router/http/server.py, router/http/drain.py).
    api_key_file: str | None = _default("api_key_file")  # more accepted keys, one per line
    # seconds from queueing to the last token; None: no deadline
    request_timeout: float | None = _default("request_timeout")
    # SIGTERM → exit: how long in-flight requests may run on
    graceful_termination_timeout: float = _default("graceful_termination_timeout")
    # connection open (or last response) → complete request headers
    client_header_timeout: float = _default("client_header_timeout")
    client_body_timeout: float = _default("client_body_timeout")  # headers → complete request body
    disable_playground: bool = _default("disable_playground")  # no page on GET / (router/http/playground.py)
    # Not a flag (TGI has none): an idle stream gets an SSE comment this often (router/http/sse.py).
    # Under the 30-60 s idle limit of common proxies; tests shorten it.
    sse_keep_alive_seconds: float = 15.0

    def check(self) -> None:
        """Cross-checks of the token limits that can be made before warmup (TGI's rules)."""
        if self.max_input_tokens is not None and self.max_total_tokens is not None:
            if self.max_input_tokens >= self.max_total_tokens:
                raise ValueError("`max_input_tokens` must be < `max_total_tokens`")
        if self.max_batch_total_tokens is not None and self.max_total_tokens is not None:
            if self.max_total_tokens > self.max_batch_total_tokens:
                raise ValueError("`max_total_tokens` must be <= `max_batch_total_tokens`")
        if self.max_concurrent_requests < 1:
            raise ValueError("`max_concurrent_requests` must be > 0")
        if self.validation_workers < 1:
            raise ValueError("`validation_workers` must be > 0")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("`request_timeout` must be > 0")
        if self.graceful_termination_timeout < 0:
            raise ValueError("`graceful_termination_timeout` must be >= 0")
        for name in ("client_header_timeout", "client_body_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0")
