"""The JSON bodies TGI's native routes answer with, as typed dicts.

Each response is built by calling its class (`Token(id=…, …)` makes a plain dict, unvalidated)
and the OpenAPI document's response schemas are generated from the same classes
(router/http/openapi_schemas.py); tests/router/http/test_openapi_responses.py holds real responses
to those schemas, which are closed, so the two cannot drift apart unnoticed. A key that may be
absent is `NotRequired`; `X | None` is a key always sent, maybe null. Class and attribute
docstrings become the schemas' descriptions.

Why typed dicts rather than pydantic models: a streamed chat chunk is three to eight objects;
as models they cost ~5 µs more per chunk to build and dump, as typed dicts ~0.15 µs per object
more than dict literals (CPython 3.11, pydantic 2.14; `model_construct` is slower than
validating). `typing_extensions.TypedDict`: pydantic needs it below Python 3.12.
"""

from __future__ import annotations

from typing import Literal

from typing_extensions import NotRequired, TypedDict

FinishReason = Literal["length", "eos_token", "stop_sequence"]
# pydantic reads an attribute's docstring as its description only when asked (per class).
_DOCSTRINGS = {"use_attribute_docstrings": True}


class Token(TypedDict):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(TypedDict):
    id: int
    text: str
    logprob: float | None


class _Sequence(TypedDict):
    # No attribute docstrings here: pydantic reads them only from the class it describes, so a
    # subclass's schema would lose them.
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: NotRequired[list[list[Token]]]


class BestOfSequence(_Sequence):
    """One of the other `best_of` sequences (its fields as in Details)."""

    generated_text: str


class Details(_Sequence):
    """With `details` (or `decoder_input_details`). `prefill`: the prompt's tokens, with
    `decoder_input_details`; `top_tokens`: the `top_n_tokens` most likely tokens at each step,
    when asked for."""

    best_of_sequences: NotRequired[list[BestOfSequence]]


class GenerateResponse(TypedDict):
    generated_text: str
    details: NotRequired[Details]


class StreamDetails(TypedDict):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(TypedDict):
    """One event of `/generate_stream` (and of `/` with `stream: true`)."""

    __pydantic_config__ = _DOCSTRINGS
    index: int
    token: Token
    top_tokens: NotRequired[list[Token]]
    generated_text: str | None
    """The whole text, on the last event only."""
    details: StreamDetails | None
    """On the last event, with `details`."""


class SimpleToken(TypedDict):
    """A token of `/tokenize`, with its character offsets in `inputs`."""

    id: int
    text: str
    start: int
    stop: int


class ChatTokenizeResponse(TypedDict):
    tokenize_response: list[SimpleToken]
    templated_text: str


class Info(TypedDict):
    """`GET /info`: the model and the limits the router runs with."""

    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    model_dtype: str
    model_device_type: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int | None
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    block_size: int
    prefix_caching: bool
    attention_impl: str
    model_impl: str
    num_shard: int
    lora_adapters: list[str]
    """The LoRA adapters requests may name (`adapter_id`, the OpenAI `model`), in launch order."""


class ErrorResponse(TypedDict):
    """TGI's error envelope."""

    error: str
    error_type: str
