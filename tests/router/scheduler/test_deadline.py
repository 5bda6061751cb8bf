"""--request-timeout: past the deadline a generation ends with a 408 error event, leaves the batch,
and its KV blocks come back; requests within the deadline are untouched."""

from __future__ import annotations

import asyncio

import pytest

from router.errors import RequestTimeoutError
from router.events import ErrorEvent
from router.infer import Infer
from router.limits import Limits
from router.metrics import Metrics
from router.scheduler.batcher import Batcher
from router.scheduler.kv import KVManager
from router.scheduler.queue import Queue
from tests.conftest import make_engine, save_tiny
from tests.router.helpers import EngineClient, valid_request

BS = 4
STEP_SECONDS = 0.02


class SlowClient(EngineClient):
    """Every RPC takes STEP_SECONDS, like a real forward: a generation spans many event-loop turns."""

    async def _call(self, method, fn, *args):
        await asyncio.sleep(STEP_SECONDS)
        return await super()._call(method, fn, *args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny"))


def run_with_deadline(tiny, router_tokenizer, timeout: float, max_new_tokens: int):
    async def main():
        engine = make_engine(tiny, block_size=BS, num_blocks_tokens=2048)
        kv = KVManager(2048 // BS + 1, BS, prefix_caching=False)
        queue = Queue(kv, support_chunking=True)
        metrics = Metrics(512, 512)
        batcher = Batcher(SlowClient(engine), queue, kv, Limits(
            max_input_tokens=1024, max_total_tokens=2048, max_batch_prefill_tokens=64,
            max_batch_total_tokens=2048), metrics)
        infer = Infer(None, router_tokenizer, queue, metrics, 8, request_timeout=timeout)
        free = kv.num_free_blocks
        task = asyncio.create_task(batcher.run())
        try:
            events = [event async for event in infer.stream(valid_request(list(range(3, 20)), max_new_tokens,
                                                                           ignore_eos=True))]
            for _ in range(200):  # the batcher drops the request at its next step
                if not batcher.running and batcher.cached is None:
                    break
                await asyncio.sleep(STEP_SECONDS)
            return events, free, kv.num_free_blocks, batcher.running
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


def test_generation_past_the_deadline_is_cancelled_and_its_blocks_freed(tiny, router_tokenizer):
    events, free_before, free_after, running = run_with_deadline(tiny, router_tokenizer, 0.3, 200)
    *tokens, last = events
    assert isinstance(last, ErrorEvent) and isinstance(last.error, RequestTimeoutError)
    assert last.error.status == 408
    assert last.error.to_tgi() == {"error": "Request exceeded the server's time limit of 0.3 s",
                                   "error_type": "request_timeout"}
    assert 0 < len(tokens) < 200 and all(t.finish is None for t in tokens)
    assert not running and free_after == free_before


def test_generation_within_the_deadline_is_untouched(tiny, router_tokenizer):
    events, free_before, free_after, _ = run_with_deadline(tiny, router_tokenizer, 30, 5)
    assert len(events) == 5 and events[-1].finish is not None and free_after == free_before
