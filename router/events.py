"""What a generation emits and what it records: the token and error events an Entry streams to its
HTTP handler, and the shard steps a traced generation took part in (read by router/tracing.py).

Both router/request.py (which makes them) and router/tracing.py (which turns them into spans) need
these types; they live here so that neither of those imports the other's module for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router.errors import RouterError


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None  # None where unknown (first prompt token, cached prefix)
    special: bool


@dataclass(frozen=True, slots=True)
class Finish:
    # TGI: the full decode (stop text kept, special tokens skipped); OpenAI: the streamed text.
    # The prompt comes first with return_full_text (router/request.py `Entry._finish`).
    generated_text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    seed: int | None
    prefill: tuple[TokenInfo, ...]
    input_length: int
    queued_at: float
    batched_at: float
    finished_at: float


@dataclass(frozen=True, slots=True)
class TokenEvent:
    index: int  # 1-based position of the token in the generation
    token: TokenInfo
    top_tokens: tuple[TokenInfo, ...]
    finish: Finish | None  # set on the last token
    # The text this token adds to the output after stop-sequence handling: equal to token.text
    # in TGI mode; in OpenAI mode a stop sequence and anything after it never appear, and text
    # that might begin one is held back until it cannot.
    text: str = ""
    # On the first event only: the prompt's tokens with logprobs (decoder_input_details), so that
    # a stream can echo them before the end.
    prefill: tuple[TokenInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: RouterError


Event = TokenEvent | ErrorEvent


# ------------------------------------------------------------------------------ tracing


@dataclass(frozen=True, slots=True)
class StepRecord:
    start: float  # time.monotonic()
    end: float
    batch_size: int
    num_tokens: int  # prompt tokens this step computed for the generation
    forward_ns: int  # the shard's forward time for the whole batch


@dataclass(slots=True, eq=False)
class StepLog:
    """The shard steps one traced generation took part in, filled by the batcher."""

    context: Any  # the OpenTelemetry Context its spans are children of
    # time.time_ns() - time.monotonic_ns() when the log was made: turns step times into span times.
    wall_offset_ns: int
    prefills: list[StepRecord] = field(default_factory=list)
    decode_steps: int = 0
    decode_start: float = 0.0
    decode_end: float = 0.0
    decode_batch_sizes: int = 0  # summed over its decode steps, for the mean
    decode_forward_ns: int = 0

    def record(self, method: str, start: float, end: float, batch_size: int, num_tokens: int,
               forward_ns: int) -> None:
        if method == "prefill":
            self.prefills.append(StepRecord(start, end, batch_size, num_tokens, forward_ns))
            return
        if not self.decode_steps:
            self.decode_start = start
        self.decode_steps += 1
        self.decode_end = end
        self.decode_batch_sizes += batch_size
        self.decode_forward_ns += forward_ns

    def wall_ns(self, monotonic: float) -> int:
        return int(monotonic * 1e9) + self.wall_offset_ns
