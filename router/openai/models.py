"""The JSON bodies the OpenAI routes answer with (`/v1/*`), as typed dicts.

The same contract as router/api_models.py: the shapers (router/openai/responses.py) build each
body by calling its class, the OpenAPI document's schemas are generated from these classes,
`NotRequired` marks a key that may be absent, `X | None` a key always sent, maybe null.
"""

from __future__ import annotations

from typing import Literal

from typing_extensions import NotRequired, TypedDict

# "stop": the model's end or a stop sequence (OpenAI does not tell them apart).
FinishReason = Literal["stop", "length", "tool_calls"]
CompletionFinishReason = Literal["stop", "length"]
ErrorType = Literal["authentication_error", "not_found_error", "rate_limit_error", "invalid_request_error",
                    "server_error"]
_DOCSTRINGS = {"use_attribute_docstrings": True}  # attribute docstrings → schema descriptions


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# ------------------------------------------------------------------------------------ chat


class TopLogprob(TypedDict):
    """`logprob` is -9999.0 for a token the model gives no probability (JSON has no -inf);
    `bytes` are the token's exact UTF-8 bytes (a token may hold part of a character)."""

    # No attribute docstrings here: pydantic reads them only from the class it describes, so
    # ChatLogprob's schema would lose them.
    token: str
    logprob: float | None
    bytes: list[int]


class ChatLogprob(TopLogprob):
    """A generated token (as in TopLogprob) and its most likely alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[ChatLogprob]


class FunctionCall(TypedDict):
    name: str
    arguments: str
    """A JSON object, as text."""


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(TypedDict):
    __pydantic_config__ = _DOCSTRINGS
    role: Literal["assistant"]
    content: str | None
    reasoning_content: NotRequired[str | None]
    """A reasoning model's `<think>` section (with --reasoning-parser)."""
    tool_calls: NotRequired[list[ToolCall]]


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(TypedDict):
    name: NotRequired[str]
    arguments: str


class ToolCallDelta(TypedDict):
    """A fragment of a tool call: the first one of a call carries its id, type and name; the
    next ones only pieces of its arguments."""

    index: int
    id: NotRequired[str]
    type: NotRequired[Literal["function"]]
    function: FunctionDelta


class ChatDelta(TypedDict):
    # `role` on every delta and `tool_calls` always present keep text-generation 0.7's strict
    # pydantic chunk model happy; the OpenAI SDK reads the same values.
    role: Literal["assistant"]
    content: str | None
    reasoning_content: NotRequired[str]
    tool_calls: list[ToolCallDelta] | None


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(TypedDict):
    """One event of a chat stream; with `stream_options.include_usage`, every chunk has `usage:
    null` and the last one has no choices and the totals."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: NotRequired[Usage | None]


# ------------------------------------------------------------------------------ completions


class CompletionLogprobs(TypedDict):
    """The legacy shape: one entry per token in each list, the echoed prompt's tokens first (the
    first one has no logprob: null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None] | None]
    text_offset: list[int]


class CompletionChoice(TypedDict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: CompletionFinishReason


class CompletionChunkChoice(TypedDict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: CompletionFinishReason | None


class Completion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(TypedDict):
    """One event of a completion stream (`usage` as in ChatCompletionChunk)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChunkChoice]
    usage: NotRequired[Usage | None]


# ---------------------------------------------------------------------------- models, errors


class Model(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: NotRequired[str]
    """A LoRA adapter's base model (absent on the base model itself)."""


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[Model]


class OpenAIError(TypedDict):
    __pydantic_config__ = _DOCSTRINGS
    message: str
    type: ErrorType
    param: str | None
    """The request field at fault."""
    code: str
    """OpenAI's code (e.g. `context_length_exceeded`), else TGI's `error_type`."""


class OpenAIErrorResponse(TypedDict):
    """OpenAI's error envelope."""

    error: OpenAIError
