"""The waiting queue and TGI v3's `next_batch`: admit entries FIFO within the prefill token
budget, the token budget and the free KV blocks, chunking the last prompt that does not fit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from pytgi_proto import generate_pb2 as pb
from router.errors import GenerationError
from router.request import Entry
from router.scheduler.kv import KVManager

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NextBatch:
    entries: list[Entry]
    batch: pb.Batch


class Queue:
    def __init__(self, kv: KVManager, support_chunking: bool):
        self.kv = kv
        self.support_chunking = support_chunking
        self._entries: deque[Entry] = deque()
        self._changed = asyncio.Event()
        self._next_batch_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        self._entries.append(entry)
        self.notify()

    def pop_head(self) -> Entry | None:
        return self._entries.popleft() if self._entries else None

    def notify(self) -> None:
        """Wake the batcher: a request arrived, or something it waits on changed."""
        self._changed.set()

    async def wait(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    def next_batch(
        self, *, min_size: int | None, max_size: int | None, prefill_budget: int, token_budget: int
    ) -> NextBatch | None:
        if not self._entries or (min_size and len(self._entries) < min_size) or max_size == 0:
            return None
        if prefill_budget <= 0 or token_budget <= 0:
            return None
        taken: list[Entry] = []
        requests: list[pb.Request] = []
        prefill_tokens = decode_tokens = 0
        while self._entries and (max_size is None or len(taken) < max_size):
            entry = self._entries.popleft()
            if entry.cancelled:
                continue  # its client is gone; nothing was allocated yet
            params = entry.request.parameters
            input_length = entry.request.input_length
            # The last generated token is never fed back, so it needs no KV slot.
            num_tokens = input_length + params.max_new_tokens - 1
            if prefill_tokens + decode_tokens + num_tokens > token_budget:
                self._entries.appendleft(entry)
                break
            # Prompt logprobs need every prompt position computed: no prefix reuse for them.
            prompt = () if params.decoder_input_details else entry.request.input_ids
            allocation = self.kv.allocate(prompt, max(num_tokens, 1), entry.request.adapter_id)
            if allocation is None:
                self._entries.appendleft(entry)
                break
            postfix = input_length - allocation.cache_len
            chunk_len = None
            if prefill_tokens + postfix > prefill_budget:
                room = prefill_budget - prefill_tokens
                if not self.support_chunking or room <= 0:
                    self.kv.release(allocation)
                    self._entries.appendleft(entry)
                    break
                chunk_len = room
            try:
                # Built before the entry is committed (and only once it fits): a request that
                # cannot be expressed for the shards fails alone, its blocks back, no step run.
                message = _to_pb(entry)
            except (ValueError, TypeError) as error:  # protobuf: a value outside its field's range or type
                log.error("request %d cannot be sent to the shards: %s", entry.id, error)
                self.kv.release(allocation)
                entry.fail(GenerationError("the request could not be scheduled: a parameter is out of range"))
                continue
            entry.allocation = allocation
            entry.num_computed = allocation.cache_len + (chunk_len or postfix)
            entry.batched_at = time.monotonic()
            message.blocks.extend(allocation.blocks)
            message.cache_len = allocation.cache_len
            if chunk_len is not None:
                message.chunk_len = chunk_len
            taken.append(entry)
            requests.append(message)
            prefill_tokens += chunk_len or postfix
            decode_tokens += params.max_new_tokens - 1
            if chunk_len is not None:
                break  # the budget is spent
        if not taken or (min_size and len(taken) < min_size):
            for entry in reversed(taken):
                self.kv.release(entry.allocation)
                entry.allocation = None
                entry.batched_at = 0.0  # not admitted after all
                self._entries.appendleft(entry)
            return None
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        block_size = self.kv.block_size
        batch = pb.Batch(
            id=batch_id, requests=requests, size=len(requests),
            max_tokens=sum(len(e.allocation.blocks) for e in taken) * block_size,
            max_blocks=max(len(e.allocation.blocks) for e in taken),
        )
        return NextBatch(taken, batch)


def _to_pb(entry: Entry) -> pb.Request:
    """The shard request, without its KV placement (blocks, cache_len, chunk_len): those are
    added once blocks are allocated. ValueError if a value does not fit its proto field."""
    request, params = entry.request, entry.request.parameters
    message = pb.Request(
        id=entry.id,
        input_ids=request.input_ids,
        parameters=pb.NextTokenChooserParameters(
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, typical_p=params.typical_p,
            do_sample=params.do_sample, seed=params.seed or 0, has_seed=params.seed is not None,
            repetition_penalty=params.repetition_penalty, frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty, min_p=params.min_p, watermark=params.watermark,
            logit_bias=dict(params.logit_bias), grammar=params.grammar, grammar_type=params.grammar_type,
        ),
        stopping_parameters=pb.StoppingCriteriaParameters(
            max_new_tokens=params.max_new_tokens, ignore_eos_token=params.ignore_eos,
        ),
        prefill_logprobs=params.decoder_input_details,
        top_n_tokens=params.top_n_tokens,
        adapter_id=request.adapter_id,
    )
    return message
