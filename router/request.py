"""Entry: the router-side state of one generation request (the events it streams are in
router/events.py).

The batcher owns entries while they run; the HTTP handler only reads `events`. Per-token work
(incremental detokenization, stop strings, finish) happens in `Entry.on_token`, so the handler
side never touches the tokenizer on the hot path.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from router.detokenizer import IncrementalDetokenizer, StopSequenceMatcher
from router.errors import RouterError
from router.events import ErrorEvent, Finish, StepLog, TokenEvent, TokenInfo
from router.scheduler.kv import Allocation
from router.tokenizer import Tokenizer
from router.validation import ValidRequest

FINISH_REASONS = {0: "length", 1: "eos_token", 2: "stop_sequence"}


@dataclass(slots=True, eq=False)
class Entry:
    id: int
    request: ValidRequest
    tokenizer: Tokenizer
    detokenizer: IncrementalDetokenizer
    stop: StopSequenceMatcher
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    batched_at: float = 0.0
    allocation: Allocation | None = None
    num_computed: int = 0  # prompt tokens with K/V computed (chunked prefill progress)
    generated_ids: list[int] = field(default_factory=list)
    prefill: tuple[TokenInfo, ...] = ()  # prompt tokens with logprobs (decoder_input_details)
    text: str = ""  # the output so far, after stop-sequence handling
    cancelled: bool = False  # the client went away
    finished: bool = False
    trace: StepLog | None = None  # the shard steps it took part in, when tracing is on

    @classmethod
    def create(cls, request_id: int, request: ValidRequest, tokenizer: Tokenizer) -> "Entry":
        return cls(
            id=request_id, request=request, tokenizer=tokenizer,
            detokenizer=IncrementalDetokenizer(tokenizer.backend, request.input_ids,
                                               skip_special_tokens=request.parameters.skip_special_tokens),
            stop=StopSequenceMatcher(list(request.parameters.stop), include_stop=request.parameters.include_stop),
        )

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.request.input_length

    def on_token(self, token_id: int, logprob: float, top: list[tuple[int, float]], shard_finish,
                 prefill: list[tuple[int, float]] | None = None) -> bool:
        """Stream one generated token. Returns True when the request is finished (by the shard's
        stopping criteria or by a stop string matched here)."""
        if prefill:
            self.prefill = tuple(self._info(i, lp, self.tokenizer.decode([i], False)) for i, lp in prefill)
        self.generated_ids.append(token_id)
        text = self.detokenizer.add(token_id)
        reason = FINISH_REASONS[shard_finish.finish_reason] if shard_finish is not None else None
        stop = self.stop.feed(text)
        emitted = stop.text_to_emit
        if stop.stopped and reason is None:
            reason = "stop_sequence"
        elif reason is not None and not stop.stopped:
            # Ended for another reason: release text held back (a partial character, or the
            # beginning of what could have been a stop sequence).
            tail = self.stop.feed(self.detokenizer.flush())
            emitted += tail.text_to_emit + ("" if tail.stopped else self.stop.flush())
        self.text += emitted
        finish = None
        if reason is not None:
            has_seed = shard_finish is not None and shard_finish.HasField("seed")
            finish = self._finish(reason, shard_finish.seed if has_seed else None)
        self.events.put_nowait(TokenEvent(
            index=len(self.generated_ids), token=self._info(token_id, logprob, text),
            top_tokens=tuple(self._info(i, lp, self.tokenizer.decode([i], False)) for i, lp in top),
            finish=finish, text=emitted, prefill=self.prefill if len(self.generated_ids) == 1 else (),
        ))
        self.finished = finish is not None
        return self.finished

    def fail(self, error: RouterError) -> None:
        self.finished = True
        self.events.put_nowait(ErrorEvent(error))

    def _info(self, token_id: int, logprob: float, text: str) -> TokenInfo:
        return TokenInfo(token_id, text, None if math.isnan(logprob) else logprob, self.tokenizer.is_special(token_id))

    def _finish(self, reason: str, seed: int | None) -> Finish:
        params = self.request.parameters
        # TGI: the full decode (stop text included, special tokens skipped). OpenAI: exactly the
        # streamed text, which already lacks the stop sequence.
        text = self.tokenizer.decode(self.generated_ids, True) if params.include_stop else self.text
        if params.return_full_text:
            text = self.request.input_text + text
        return Finish(
            generated_text=text, finish_reason=reason, generated_tokens=len(self.generated_ids), seed=seed,
            prefill=self.prefill, input_length=self.request.input_length, queued_at=self.queued_at,
            batched_at=self.batched_at, finished_at=time.monotonic(),
        )
