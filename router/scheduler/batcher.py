"""The batching task: one loop that schedules, runs one step on every shard, and streams.

    step = admit new requests (or continue) → Prefill/Decode on all shards → dispatch tokens
           → drop finished and cancelled requests (FilterBatch) → repeat

New requests join the running batch in the same forward as its decode rows (a mixed step), with
their prompt tokens capped by `--max-batch-prefill-tokens`; a prompt that does not fit is
prefilled in chunks over the following steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pytgi_proto import generate_pb2 as pb
from router.errors import GenerationError
from router.limits import Limits
from router.metrics import Metrics
from router.options import BY_NAME
from router.request import Entry
from router.scheduler.client import ShardedClient, ShardError
from router.scheduler.kv import KVManager
from router.scheduler.queue import Queue

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When waiting requests join a running batch (the sizes are the Limits')."""

    waiting_served_ratio: float = BY_NAME["waiting_served_ratio"].default
    max_waiting_tokens: int = BY_NAME["max_waiting_tokens"].default
    support_chunking: bool = True  # the shards prefill in chunks (then nothing waits for a decode)
    # Draft tokens a decode row may verify per step (the shards' `--speculate`): each is a token of
    # the step's compute, so the prefill budget counts them.
    speculate: int = 0


class Batcher:
    def __init__(self, client: ShardedClient, queue: Queue, kv: KVManager, limits: Limits, metrics: Metrics,
                 policy: BatchPolicy = BatchPolicy()):
        self.client = client
        self.queue = queue
        self.kv = kv
        self.limits = limits
        self.policy = policy
        self.metrics = metrics
        self.running: dict[int, Entry] = {}
        self.cached: pb.CachedBatch | None = None
        self.waiting_steps = 0  # decode steps since new requests last joined
        self.healthy = True  # false after a failed step, until a step or a probe succeeds

    async def run(self) -> None:
        while True:
            if self.cached is None:
                await self.queue.wait()
            while self.cached is not None or len(self.queue):
                try:
                    if not await self.step():
                        break  # nothing could be scheduled: wait for a change
                except Exception as error:  # a bug here must fail requests, not hang them all
                    log.exception("batcher step crashed")
                    await self._fail_step(ShardError("INTERNAL", f"router error: {error!r}"), "step")

    async def step(self) -> bool:
        """One forward. Returns False when there was nothing to run."""
        updates, budget = self._chunk_updates()
        new = self._admit(budget)
        method = "prefill" if new else "decode"
        start = time.monotonic()
        try:
            if new:
                response = await self.client.prefill(new.batch, self.cached, updates)
                self.waiting_steps = 0
            elif self.cached is not None:
                response = await self.client.decode([self.cached], updates)
                self.waiting_steps += 1
            else:
                return False
        except ShardError as error:
            await self._fail_step(error, method)
            return True
        self.healthy = True
        filtering = time.monotonic()
        self._record_step(new.entries if new else [], updates, start, filtering, response)
        self._dispatch(response.generations)
        self.cached = response.batch if response.HasField("batch") else None
        await self._filter()
        self.metrics.step(method, response, start, filtering, time.monotonic(), len(new.entries) if new else 0)
        self.metrics.batch(self.running, self.cached)
        return True

    def _chunk_updates(self) -> tuple[list[pb.RequestUpdate], int]:
        """Next chunk of every running request still prefilling (oldest first), and the prefill
        budget left for new requests."""
        budget = self.limits.max_batch_prefill_tokens
        updates = []
        for entry in self.running.values():
            if entry.is_prefilling:
                # Every request in the batch computes at least one token per step.
                chunk = min(entry.request.input_length - entry.num_computed, max(budget, 1))
                entry.num_computed += chunk
                budget -= chunk
                updates.append(pb.RequestUpdate(request_id=entry.id, chunk_len=chunk))
            else:
                budget -= 1 + self.policy.speculate  # its decode token and the drafts it may verify
        return updates, budget

    def _admit(self, prefill_budget: int):
        limits = self.limits
        running = len(self.running)
        min_size = None
        policy = self.policy
        if running and not policy.support_chunking and self.waiting_steps < policy.max_waiting_tokens:
            # TGI without chunking: interrupt the running batch only for enough newcomers.
            min_size = int(running * policy.waiting_served_ratio)
        max_size = None if limits.max_batch_size is None else limits.max_batch_size - running
        reserved = sum(len(e.allocation.blocks) for e in self.running.values()) * self.kv.block_size
        new = self.queue.next_batch(
            min_size=min_size, max_size=max_size, prefill_budget=prefill_budget,
            token_budget=limits.max_batch_total_tokens - reserved,
        )
        if new is None and not self.running and len(self.queue):
            self._reject_unschedulable()
        if new is not None:
            if running:
                self.metrics.batch_concat.labels(self._concat_reason()).inc()
            for entry in new.entries:
                self.running[entry.id] = entry
        return new

    def _concat_reason(self) -> str:
        """TGI's label for why new requests joined a running batch."""
        if self.policy.support_chunking:
            return "chunking"
        return "wait_exceeded" if self.waiting_steps >= self.policy.max_waiting_tokens else "backpressure"

    def _record_step(self, new_entries: list[Entry], updates: list[pb.RequestUpdate], start: float, end: float,
                     response) -> None:
        """The step, in the step log of every traced request that took part (before any leaves)."""
        traced = [entry for entry in self.running.values() if entry.trace is not None]
        if not traced:
            return
        prefilling = {e.id: e.num_computed - e.allocation.cache_len for e in new_entries}
        prefilling.update((u.request_id, u.chunk_len) for u in updates)
        size = len(self.running)
        for entry in traced:
            tokens = prefilling.get(entry.id)
            entry.trace.record("decode" if tokens is None else "prefill", start, end, size,
                               1 if tokens is None else tokens, response.forward_ns)

    def _reject_unschedulable(self) -> None:
        """Nothing runs and the head still does not fit: it never will (validation bounds
        requests by max_total_tokens, so this only happens with a misconfigured KV budget)."""
        entry = self.queue.pop_head()
        if entry is not None:
            entry.fail(GenerationError("not enough KV cache memory for this request"))

    def _dispatch(self, generations) -> None:
        for g in generations:
            entry = self.running.get(g.request_id)
            if entry is None or entry.finished:
                continue
            prefill = list(zip(g.prefill_tokens.ids, g.prefill_tokens.logprobs)) if g.prefill_tokens.ids else None
            if not entry.generated_ids and not entry.request.parameters.decoder_input_details:
                self.kv.share_prompt(entry.allocation, entry.request.input_ids)  # its K/V exist now
            if self.policy.speculate:
                self.metrics.skipped_tokens.observe(len(g.tokens.ids) - 1)
            # Several tokens when the shard accepted drafts: each is streamed as its own event, and
            # the shard's finish belongs to the last one. A stop string inside the run ends it.
            last = len(g.tokens.ids) - 1
            for i, (token, logprob) in enumerate(zip(g.tokens.ids, g.tokens.logprobs)):
                top = list(zip(g.top_tokens[i].ids, g.top_tokens[i].logprobs)) if len(g.top_tokens) > i else []
                finish = g.finished if i == last and g.HasField("finished") else None
                if entry.on_token(token, logprob, top, finish, prefill if i == 0 else None):
                    self._release(entry)
                    break

    async def _filter(self) -> None:
        """Drop requests the router finished (stop strings) or whose client left."""
        for entry in [e for e in self.running.values() if e.cancelled and not e.finished]:
            self._release(entry)  # Infer counted its failure (dropped, timeout) when its consumer left
        if self.cached is None:
            return
        live = [i for i in self.cached.request_ids if i in self.running]
        if len(live) == len(self.cached.request_ids):
            return
        try:
            if live:
                self.cached = await self.client.filter_batch(self.cached.id, live)
            else:
                await self.client.clear_cache(self.cached.id)
                self.cached = None
        except ShardError as error:
            await self._fail_step(error, "filter")

    def _release(self, entry: Entry, kv_written: bool = True) -> None:
        """Give back the entry's blocks. `kv_written`: the steps it took part in all succeeded, so
        its blocks hold the K/V of its tokens and may be offered to the prefix cache; after a
        failed step they hold whatever the shards wrote before failing, and never are."""
        self.running.pop(entry.id, None)
        if entry.allocation is not None:
            # The prompt and every generated token but the last have K/V in the blocks.
            tokens = list(entry.request.input_ids) + entry.generated_ids[:-1]
            cacheable = (kv_written and not entry.request.parameters.decoder_input_details
                         and not entry.is_prefilling)
            self.kv.release(entry.allocation, tokens if cacheable else None)
            entry.allocation = None
        self.queue.notify()

    async def _fail_step(self, error: ShardError, method: str) -> None:
        """A failed step fails exactly the requests that were in it (admitted ones included:
        `_admit` put them in `running`); the server stays up."""
        log.error("%s failed on a shard: %s", method, error)
        self.healthy = False
        self.metrics.step_failed(method)
        # The client learns that the step failed, not the shard's internals (socket paths,
        # exception text): those are in the log line above, and on the request's trace.
        failure = GenerationError(f"{method} failed on the model shards ({error.code})", detail=str(error))
        for entry in list(self.running.values()):  # _release drops each from `running`
            if not entry.finished:
                entry.fail(failure)
            self._release(entry, kv_written=False)
        self.running.clear()
        self.cached = None
        self.metrics.batch(self.running, self.cached)
        try:
            await self.client.clear_cache(None)
        except ShardError as clear_error:
            log.error("ClearCache after a failed step also failed: %s", clear_error)
