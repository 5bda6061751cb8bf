"""Router test helpers: valid requests without HTTP, and an in-process shard client."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pytgi_proto import generate_pb2 as pb
from router.infer import Infer
from router.limits import Limits
from router.metrics import Metrics
from router.scheduler.batcher import Batcher, BatchPolicy
from router.scheduler.client import ShardError
from router.scheduler.kv import KVManager
from router.scheduler.queue import Queue
from router.validation import ValidParameters, ValidRequest


def valid_request(input_ids, max_new_tokens: int = 4, adapter_id: str = "", **overrides) -> ValidRequest:
    params = dict(
        temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, min_p=0.0, do_sample=False, seed=None,
        repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, watermark=False,
        max_new_tokens=max_new_tokens, stop=(), return_full_text=False, details=True,
        decoder_input_details=False, top_n_tokens=0, best_of=1,
    )
    params.update(overrides)
    ids = tuple(input_ids)
    return ValidRequest(input_ids=ids, input_text="", input_length=len(ids), truncated=False,
                        parameters=ValidParameters(**params), adapter_id=adapter_id)


class EngineClient:
    """The ShardedClient interface over an in-process Engine (one shard, no sockets)."""

    def __init__(self, engine):
        self.engine = engine
        self.fail_next: str | None = None  # "prefill" / "decode": raise a ShardError once
        self.calls: list[str] = []

    async def _call(self, method: str, fn, *args):
        self.calls.append(method)
        await asyncio.sleep(0)  # let other tasks (handlers, cancellations) run, like a real RPC
        if self.fail_next == method:
            self.fail_next = None
            raise ShardError("INTERNAL", "RuntimeError: injected failure")
        try:
            return fn(*args)
        except (KeyError, ValueError) as error:
            raise ShardError("INVALID_ARGUMENT", str(error)) from error

    async def prefill(self, batch, cached_batch=None, updates=()):
        request = pb.PrefillRequest(batch=batch, updates=list(updates))
        if cached_batch is not None:
            request.cached_batch.CopyFrom(cached_batch)
        return await self._call("prefill", self.engine.prefill, request)

    async def decode(self, batches, updates=()):
        return await self._call("decode", self.engine.decode, pb.DecodeRequest(batches=batches, updates=list(updates)))

    async def filter_batch(self, batch_id, request_ids):
        batch = await self._call("filter", self.engine.filter_batch, batch_id, list(request_ids))
        return batch if batch.size else None

    async def clear_cache(self, batch_id=None):
        await self._call("clear", self.engine.clear_cache, batch_id)

    async def health(self):
        await self._call("health", self.engine.health)


def scraped(text: str, name: str, **labels) -> float:
    """The value of one sample line of a Prometheus text exposition, read by its exact sample name and
    labels (0 when absent)."""
    label_text = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    series = f"{name}{{{label_text}}}" if labels else name
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == series:
            return float(value)
    return 0.0


@dataclass
class Serving:
    """The router's serving objects (queue, KV, batcher, Infer) over an in-process engine."""

    client: EngineClient
    kv: KVManager
    queue: Queue
    batcher: Batcher
    metrics: Metrics
    infer: Infer

    def sample(self, name: str, **labels) -> float:
        """A sample of /metrics as Prometheus scrapes it (0 when never recorded)."""
        return scraped(self.metrics.render().decode(), name, **labels)

    async def collect(self, valid: ValidRequest) -> list:
        return [event async for event in self.infer.stream(valid)]

    async def idle(self) -> None:
        """Until the batcher has nothing left to run (it drops cancelled entries on its next step)."""
        for _ in range(1000):
            await asyncio.sleep(0)
            if not self.batcher.running and not len(self.queue) and self.batcher.cached is None:
                return
        raise AssertionError("the batcher did not go idle")


def serving(engine, tokenizer, *, block_size: int = 4, num_tokens: int = 2048, support_chunking: bool = True,
            max_batch_prefill_tokens: int = 16, max_waiting_tokens: int = 20, tracer=None) -> Serving:
    client = EngineClient(engine)
    kv = KVManager(num_tokens // block_size + 1, block_size, prefix_caching=True)
    queue = Queue(kv, support_chunking=support_chunking)
    metrics = Metrics(512, 512)
    metrics.watch(kv, queue.__len__)
    limits = Limits(max_input_tokens=num_tokens - 1, max_total_tokens=num_tokens,
                    max_batch_prefill_tokens=max_batch_prefill_tokens, max_batch_total_tokens=num_tokens)
    policy = BatchPolicy(max_waiting_tokens=max_waiting_tokens, support_chunking=support_chunking)
    batcher = Batcher(client, queue, kv, limits, metrics, policy)
    infer = Infer(None, tokenizer, queue, metrics, max_concurrent_requests=64, tracer=tracer)
    return Serving(client, kv, queue, batcher, metrics, infer)


def serve_app(make_app, scenario):
    """`scenario(client)` against the aiohttp app `make_app()` builds, on a test server (the app is
    made inside the event loop); its result."""
    from aiohttp.test_utils import TestClient, TestServer

    async def main():
        client = TestClient(TestServer(make_app()))
        try:
            await client.start_server()
            return await scenario(client)
        finally:
            await client.close()

    return asyncio.run(main())
