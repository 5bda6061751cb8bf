"""Prometheus metrics recorded by Infer and the batcher, read back from the registry as a scrape
would see them: TGI's counters and histograms, inter-token latency, KV and prefix-cache figures."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from router.events import ErrorEvent
from router.metrics import Metrics
from router.scheduler.kv import KVManager
from tests.conftest import make_engine, save_tiny
from tests.router.helpers import scraped, serving, valid_request

BS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def engine(tiny):
    return make_engine(tiny, block_size=BS, num_blocks_tokens=2048)


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 31 + i * 7) % 120 + 3 for i in range(length)]


def run_served(s, work):
    """Await `work()` with the batcher task going, then wait until the batcher is idle again. Once
    per Serving: its queue's asyncio.Event binds to the first event loop that waits on it."""

    async def main():
        task = asyncio.create_task(s.batcher.run())
        try:
            result = await work()
            await s.idle()
            return result
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


def test_finished_requests_fill_tgi_request_metrics(engine, router_tokenizer):
    s = serving(engine, router_tokenizer)
    lengths = {0: 5, 1: 9, 2: 20}  # 20 tokens > the 16-token prefill budget: chunked
    max_new = {0: 3, 1: 6, 2: 4}
    valids = [valid_request(prompt(i, n), max_new[i], ignore_eos=True) for i, n in lengths.items()]
    events = run_served(s, lambda: asyncio.gather(*(s.collect(v) for v in valids)))

    assert [len(e) for e in events] == [3, 6, 4]
    assert s.sample("tgi_request_success") == 3
    assert s.sample("tgi_request_generated_tokens_count") == 3
    assert s.sample("tgi_request_generated_tokens_sum") == 13
    for name in ("tgi_request_queue_duration", "tgi_request_inference_duration", "tgi_request_duration",
                 "tgi_request_mean_time_per_token_duration", "pytgi_request_time_to_first_token"):
        assert s.sample(f"{name}_count") == 3, name
    # One gap per token after the first, each measured where the consumer receives it.
    assert s.sample("pytgi_request_inter_token_latency_count") == 13 - 3
    assert s.sample("pytgi_request_inter_token_latency_sum") > 0
    assert s.sample("tgi_request_failure", err="dropped") == 0

    steps = {m: s.sample("tgi_batch_inference_count", method=m) for m in ("prefill", "decode")}
    assert steps["prefill"] >= 1 and steps["decode"] >= 5
    for method, count in steps.items():
        assert s.sample("tgi_batch_inference_success", method=method) == count
        assert s.sample("tgi_batch_inference_duration_count", method=method) == count
        assert s.sample("tgi_batch_filter_duration_count", method=method) == count
        assert s.sample("tgi_batch_forward_duration_count", method=method) == count
    assert s.sample("tgi_batch_next_size_sum") == 3  # every request admitted exactly once
    assert s.client.calls.count("prefill") == steps["prefill"]
    assert s.client.calls.count("decode") == steps["decode"]


def test_idle_server_reports_empty_batch_queue_and_no_request_blocks(engine, router_tokenizer):
    s = serving(engine, router_tokenizer)
    shared = prompt(3, 14)  # 3 full blocks of 4 (the last token is always recomputed)

    async def one_after_the_other():
        for _ in range(2):
            await s.collect(valid_request(shared, 5))

    run_served(s, one_after_the_other)

    assert s.sample("tgi_batch_current_size") == 0
    assert s.sample("tgi_batch_current_max_tokens") == 0
    assert s.sample("tgi_queue_size") == 0
    assert s.sample("pytgi_kv_blocks_held_by_requests") == 0
    used, cached = s.sample("pytgi_kv_blocks_used"), s.sample("pytgi_prefix_cache_blocks")
    assert used == cached > 0  # what is still used is the prefix cache's, and all of it evictable
    assert s.sample("pytgi_prefix_cache_evictable_blocks") == cached
    assert used + s.sample("pytgi_kv_blocks_free") == s.kv.num_blocks - 1
    assert s.sample("pytgi_prefix_cache_queries") == 2
    assert s.sample("pytgi_prefix_cache_hits") == 1  # the second request reused the first's prompt
    assert s.sample("pytgi_prefix_cache_hit_tokens") == 12
    assert s.sample("pytgi_prefix_cache_query_tokens") == 28


def test_queue_size_is_read_at_scrape_time(engine, router_tokenizer):
    s = serving(engine, router_tokenizer)

    async def enqueue_only():
        streams = [s.infer.stream(valid_request(prompt(i, 5), 2)) for i in range(3)]
        # Each generator enqueues its entry on the first step; the batcher is not running.
        pending = [asyncio.ensure_future(anext(stream)) for stream in streams]
        await asyncio.sleep(0)
        size = s.sample("tgi_queue_size")
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        return size

    assert asyncio.run(enqueue_only()) == 3


def test_client_leaving_counts_dropped_and_frees_its_blocks(engine, router_tokenizer):
    s = serving(engine, router_tokenizer)

    async def leave_after_two():
        async with aclosing(s.infer.stream(valid_request(prompt(5, 6), 50, ignore_eos=True))) as events:
            got = [await anext(events), await anext(events)]
        return got

    got = run_served(s, leave_after_two)
    assert len(got) == 2
    assert s.sample("tgi_request_failure", err="dropped") == 1
    assert s.sample("tgi_request_success") == 0
    assert s.sample("tgi_batch_current_size") == 0
    assert s.sample("pytgi_kv_blocks_held_by_requests") == 0


def test_failed_step_counts_batch_and_request_failures(engine, router_tokenizer):
    s = serving(engine, router_tokenizer)
    s.client.fail_next = "decode"
    events = run_served(s, lambda: asyncio.gather(*(s.collect(valid_request(prompt(i, 6), 5)) for i in range(2))))

    assert all(isinstance(e[-1], ErrorEvent) for e in events)
    assert s.sample("tgi_batch_inference_failure", method="decode") == 1
    assert s.sample("tgi_batch_inference_count", method="decode") == (
        s.sample("tgi_batch_inference_success", method="decode") + 1)
    assert s.sample("tgi_request_failure", err="generation") == 2
    assert s.sample("tgi_request_failure", err="dropped") == 0
    assert s.sample("tgi_batch_current_size") == 0  # reset by the failure, not left from the last step
    assert s.sample("pytgi_kv_blocks_held_by_requests") == 0


@pytest.mark.parametrize("chunking, max_waiting_tokens, reason", [
    (True, 20, "chunking"), (False, 20, "backpressure"), (False, 0, "wait_exceeded")])
def test_joining_a_running_batch_counts_tgi_batch_concat(engine, router_tokenizer, chunking, max_waiting_tokens,
                                                         reason):
    s = serving(engine, router_tokenizer, support_chunking=chunking, max_waiting_tokens=max_waiting_tokens)

    async def staggered():
        first = asyncio.ensure_future(s.collect(valid_request(prompt(1, 6), 8, ignore_eos=True)))
        while not s.batcher.running:
            await asyncio.sleep(0)
        second = await s.collect(valid_request(prompt(2, 6), 3, ignore_eos=True))
        return await first, second

    first, second = run_served(s, staggered)
    assert (len(first), len(second)) == (8, 3)
    assert s.sample("tgi_batch_concat", reason=reason) == 1
    assert sum(s.sample("tgi_batch_concat", reason=r)
               for r in ("chunking", "backpressure", "wait_exceeded")) == 1


def test_failure_labels_follow_tgi():
    metrics = Metrics(16, 32)
    for error_type in ("incomplete_generation", "template_error", "validation"):
        metrics.failure(error_type)
    text = metrics.render().decode()
    assert scraped(text, "tgi_request_failure", err="incomplete") == 1
    assert scraped(text, "tgi_request_failure", err="template") == 1
    assert scraped(text, "tgi_request_failure", err="validation") == 1


def test_kv_blocks_held_by_requests_counts_shared_blocks_once():
    kv = KVManager(num_blocks=33, block_size=4, prefix_caching=True)
    ids = list(range(10, 23))  # 13 tokens: 3 full blocks cached after release
    first = kv.allocate(ids, 16)
    assert kv.num_request_blocks == 4
    kv.release(first, ids)
    assert kv.num_request_blocks == 0 and kv.num_cached_blocks == 3 and kv.num_used_blocks == 3
    second = kv.allocate(ids, 16)  # reuses the 3 cached blocks + 1 fresh
    third = kv.allocate(ids, 16)
    assert second.cache_len == third.cache_len == 12
    assert kv.num_request_blocks == 5  # 3 shared (counted once) + 1 fresh each
    kv.release(second)
    kv.release(third)
    assert kv.num_request_blocks == 0
