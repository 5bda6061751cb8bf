"""RouterConfig: the router process's one frozen configuration, built by its CLI."""

from __future__ import annotations

from dataclasses import dataclass


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
    api_key: str | None
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
    strict_model_name: bool = False  # /v1/*: 404 for a `model` other than the served one (or "tgi")

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
