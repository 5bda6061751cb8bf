"""Infer: admission (→ 429), validation, enqueueing, and the per-request event stream."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from router.errors import IncompleteGenerationError, OverloadedError, RequestTimeoutError, RouterError
from router.events import ErrorEvent, Event, Finish, TokenEvent
from router.metrics import Metrics
from router.request import Entry
from router.scheduler.queue import Queue
from router.schemas import GenerateRequest
from router.tokenizer import Tokenizer
from router.tracing import Tracer
from router.validation import ValidRequest, Validator


@dataclass(frozen=True, slots=True)
class Generated:
    """A complete (non-streamed) generation."""

    request: ValidRequest
    tokens: tuple[TokenEvent, ...]
    finish: Finish
    validated_at: float

    @property
    def mean_logprob(self) -> float:
        values = [t.token.logprob for t in self.tokens if t.token.logprob is not None]
        return sum(values) / len(values) if values else float("-inf")


class Infer:
    def __init__(self, validator: Validator, tokenizer: Tokenizer, queue: Queue, metrics: Metrics,
                 max_concurrent_requests: int, request_timeout: float | None = None, tracer: Tracer | None = None,
                 draw_seed: Callable[[], int] = lambda: secrets.randbits(64)):
        self.validator = validator
        self.tokenizer = tokenizer
        self.queue = queue
        self.metrics = metrics
        self.permits = max_concurrent_requests
        self.request_timeout = request_timeout  # seconds from queueing; None: no deadline
        self.tracer = tracer
        self.draw_seed = draw_seed
        self._ids = itertools.count()

    async def validate(self, request: GenerateRequest) -> ValidRequest:
        start = time.monotonic()
        try:
            valid = await self.validator.validate(request)
        except RouterError as error:
            self.metrics.failure(error.error_type)
            raise
        self.metrics.validation_duration.observe(time.monotonic() - start)
        self.metrics.input_length.observe(valid.input_length)
        self.metrics.max_new_tokens.observe(valid.parameters.max_new_tokens)
        return valid

    def acquire(self, count: int = 1) -> None:
        """Take `count` permits now or fail with 429 (TGI: try_acquire, no waiting)."""
        if self.permits < count:
            self.metrics.failure("overloaded")
            raise OverloadedError()
        self.permits -= count

    def release(self, count: int = 1) -> None:
        self.permits += count

    async def stream(self, valid: ValidRequest) -> AsyncIterator[Event]:
        """Events of one generation. Leaving the iterator early (client gone, deadline passed)
        cancels it: the batcher drops it at its next step and frees its KV blocks."""
        entry = Entry.create(next(self._ids), self._seeded(valid), self.tokenizer)
        if self.tracer is not None:
            entry.trace = self.tracer.step_log()  # its spans: children of the request's
        self.queue.append(entry)
        deadline = self._arm_deadline(entry)
        end: Event | None = None  # the finishing token or the error, once the stream reached it
        last_token_at = entry.queued_at
        try:
            while end is None:
                event = await entry.events.get()
                now = time.monotonic()
                # Metrics before yielding: a consumer may stop iterating at the last event.
                if isinstance(event, ErrorEvent):
                    self.metrics.failure(event.error.error_type)
                    end = event
                else:
                    if event.index == 1:
                        self.metrics.ttft.observe(now - entry.queued_at)
                    else:
                        self.metrics.inter_token_latency.observe(now - last_token_at)
                    last_token_at = now
                    if event.finish is not None:
                        self._record(event.finish, valid.adapter_id)
                        end = event
                yield event
        finally:
            if deadline is not None:
                deadline.cancel()
            if end is None:  # the consumer left before the end: TGI counts that as dropped
                self.metrics.failure("dropped")
            if not entry.finished:
                entry.cancelled = True
                self.queue.notify()
            if entry.trace is not None:
                self.tracer.end_generation(entry, end)

    def _seeded(self, valid: ValidRequest) -> ValidRequest:
        """A sampled generation without a seed gets one here, as in TGI's router: every rank of a
        sharded model must draw the same tokens (the vocab-parallel embedding sums parts of
        each rank's token), and the seed reported in `details` must reproduce the output. Drawn
        per generation, not per HTTP request: `best_of` and `n` copies must differ."""
        params = valid.parameters
        if not params.do_sample or params.seed is not None:
            return valid
        return replace(valid, parameters=replace(params, seed=self.draw_seed()))

    def _arm_deadline(self, entry: Entry) -> asyncio.TimerHandle | None:
        """One timer per request, not a timeout around every token read: at the deadline a 408
        error event joins the request's events, the stream ends on it and the batcher drops it."""
        if self.request_timeout is None:
            return None
        message = f"Request exceeded the server's time limit of {self.request_timeout:g} s"
        error = ErrorEvent(RequestTimeoutError(message))
        delay = entry.queued_at + self.request_timeout - time.monotonic()
        # Not entry.fail(): the entry must stay unfinished so that the batcher releases it.
        return asyncio.get_running_loop().call_later(delay, entry.events.put_nowait, error)

    async def generate(self, valid: ValidRequest) -> Generated:
        start = time.monotonic()
        tokens: list[TokenEvent] = []
        async for event in self.stream(valid):
            if isinstance(event, ErrorEvent):
                raise event.error
            tokens.append(event)
            if event.finish is not None:
                return Generated(valid, tuple(tokens), event.finish, start)
        raise IncompleteGenerationError()

    async def generate_best_of(self, valid: ValidRequest) -> tuple[Generated, list[Generated]]:
        """`best_of` independent samples; the best by mean token logprob, then the others."""
        results = await asyncio.gather(*(self.generate(valid) for _ in range(valid.parameters.best_of)))
        ranked = sorted(results, key=lambda g: g.mean_logprob, reverse=True)
        return ranked[0], ranked[1:]

    def _record(self, finish: Finish, adapter_id: str) -> None:
        m = self.metrics
        m.request_success.inc()
        m.generated_tokens.observe(finish.generated_tokens)
        if adapter_id:
            m.adapter_requests.labels(adapter_id).inc()
            m.adapter_tokens.labels(adapter_id).inc(finish.generated_tokens)
        m.queue_duration.observe(max(finish.batched_at - finish.queued_at, 0))
        inference = finish.finished_at - finish.batched_at
        m.inference_duration.observe(inference)
        m.request_duration.observe(finish.finished_at - finish.queued_at)
        if finish.generated_tokens:
            m.time_per_token.observe(inference / finish.generated_tokens)
