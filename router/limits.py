"""Limits: every bound the router enforces on requests and batches, in one frozen object.

Resolved once at start-up (router/state.py `AppState.connect`): the token limits from the
shards' warmup, the rest from the router's flags. Validation (both APIs), the OpenAI parsers,
the batcher and the OpenAPI document all read this one object, so a bound shown in the document
is the bound enforced. The defaults of the flag-given fields are the flags' defaults
(router/options.py), which keeps the object cheap to build in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.options import BY_NAME

MAX_N = 8  # most OpenAI choices per prompt (each one is a generation: `n` concurrency permits)


def _default(name: str) -> object:
    return BY_NAME[name].default


@dataclass(frozen=True, slots=True)
class Limits:
    # Tokens, from the warmup (the KV capacity and the model decide them).
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int = 512
    max_batch_total_tokens: int = 16_384
    num_blocks: int = 1024
    block_size: int = 16
    # Request fields, from the flags.
    max_best_of: int = _default("max_best_of")
    max_stop_sequences: int = _default("max_stop_sequences")
    max_top_n_tokens: int = _default("max_top_n_tokens")
    max_client_batch_size: int = _default("max_client_batch_size")
    max_concurrent_requests: int = _default("max_concurrent_requests")
    max_batch_size: int | None = _default("max_batch_size")
    # Ids the model can take (its embedding rows and logits, and the tokenizer's).
    vocab_size: int = 49_152
    max_n: int = MAX_N

    def __post_init__(self) -> None:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("`max_input_tokens` must be < `max_total_tokens`")
