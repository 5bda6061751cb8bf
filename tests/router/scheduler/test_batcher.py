"""The batching loop against an in-process engine: continuous batching, chunking, stop strings,
cancellation, shard failures — and no leaked KV blocks."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from router.events import ErrorEvent, TokenEvent
from router.limits import Limits
from router.metrics import Metrics
from router.request import Entry
from router.scheduler.batcher import Batcher, BatchPolicy
from router.scheduler.kv import KVManager
from router.scheduler.queue import Queue
from tests.conftest import make_engine, save_tiny
from tests.router.helpers import EngineClient, valid_request
from tests.shard.helpers import BlockPool, generate, greedy_request

BS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def harness(tiny, router_tokenizer):
    engine = make_engine(tiny, block_size=BS, num_blocks_tokens=2048)
    client = EngineClient(engine)
    kv = KVManager(2048 // BS + 1, BS, prefix_caching=True)
    queue = Queue(kv, support_chunking=True)
    limits = Limits(max_input_tokens=1024, max_total_tokens=2048, max_batch_prefill_tokens=16,
                    max_batch_total_tokens=2048)
    batcher = Batcher(client, queue, kv, limits, Metrics(512, 512))
    counter = iter(range(10_000))

    def submit(ids, max_new_tokens=6, **params) -> Entry:
        entry = Entry.create(next(counter), valid_request(ids, max_new_tokens, **params), router_tokenizer)
        queue.append(entry)
        return entry

    return batcher, client, kv, submit


async def drain(batcher: Batcher) -> None:
    while batcher.cached is not None or len(batcher.queue):
        if not await batcher.step():
            break


def token_events(entry: Entry) -> list[TokenEvent]:
    out = []
    while not entry.events.empty():
        event = entry.events.get_nowait()
        assert not isinstance(event, ErrorEvent), event
        out.append(event)
    return out


def tokens(entry: Entry) -> list[int]:
    return [event.token.id for event in token_events(entry)]


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 31 + i * 7) % 120 + 3 for i in range(length)]


def test_batched_equals_alone_and_blocks_return(harness):
    batcher, client, kv, submit = harness
    free = kv.num_free_blocks + kv.num_evictable
    alone = {}
    for i in range(5):
        entry = submit(prompt(i, 5 + 3 * i))
        asyncio.run(drain(batcher))
        alone[i] = tokens(entry)
    kv.clear_cache()
    entries = [submit(prompt(i, 5 + 3 * i)) for i in range(5)]  # 5..17 tokens, 16-token budget
    asyncio.run(drain(batcher))
    assert {i: tokens(e) for i, e in enumerate(entries)} == alone
    assert "prefill" in client.calls and "decode" in client.calls
    assert not batcher.running and kv.num_free_blocks + kv.num_evictable == free


def test_long_prompt_is_chunked(harness, tiny):
    batcher, client, kv, submit = harness
    entry = submit(prompt(9, 40), max_new_tokens=3)  # 40 tokens over a 16-token budget: 3 steps
    asyncio.run(drain(batcher))
    got = tokens(entry)
    assert client.calls.count("prefill") == 1 and client.calls.count("decode") >= 4
    # The same tokens as the whole prompt in one prefill (greedy, a fresh engine).
    whole = generate(make_engine(tiny, block_size=BS, num_blocks_tokens=2048),
                     [greedy_request(1, prompt(9, 40), 3, BlockPool(BS))])[1]
    assert got == whole


def test_stop_string_finishes_and_filters(harness):
    batcher, client, kv, submit = harness
    free_run = submit(prompt(3, 6), max_new_tokens=8)
    asyncio.run(drain(batcher))
    free = token_events(free_run)
    texts = ["".join(e.text for e in free[:n]) for n in range(len(free) + 1)]
    # The stop string: the text the first visible token from the third on adds.
    added = [(n, texts[n][len(texts[n - 1]):]) for n in range(3, len(free) + 1)]
    stop = next((text for _, text in added if text.strip()), None)
    assert stop is not None, f"no visible text to stop on in {texts[-1]!r}"
    ends = next(n for n in range(1, len(free) + 1) if stop in texts[n])  # where it first appears
    stopped = submit(prompt(3, 6), max_new_tokens=8, stop=(stop,))
    other = submit(prompt(4, 6), max_new_tokens=8)
    asyncio.run(drain(batcher))
    got = token_events(stopped)
    assert [e.token.id for e in got] == [e.token.id for e in free[:ends]]
    assert got[-1].finish.finish_reason == "stop_sequence"  # TGI keeps the stop text: include_stop
    assert len(tokens(other)) == 8 and "filter" in client.calls


def test_cancelled_request_leaves_the_batch(harness):
    batcher, client, kv, submit = harness
    keep = submit(prompt(5, 6), max_new_tokens=10)
    gone = submit(prompt(6, 6), max_new_tokens=10)

    async def run():
        await batcher.step()
        await batcher.step()
        gone.cancelled = True
        await drain(batcher)

    free = kv.num_free_blocks + kv.num_evictable
    asyncio.run(run())
    assert len(tokens(keep)) == 10
    assert len(tokens(gone)) < 10
    assert not batcher.running
    # Both requests' blocks came back (free, or idle in the prefix cache); none is still held.
    assert kv.num_request_blocks == 0 and kv.num_free_blocks + kv.num_evictable == free


def test_shard_failure_fails_only_that_step_and_recovers(harness):
    batcher, client, kv, submit = harness
    doomed = [submit(prompt(i, 6)) for i in range(3)]

    async def run():
        await batcher.step()  # prefill ok
        client.fail_next = "decode"
        await batcher.step()  # decode fails: every running request gets a generation error

    asyncio.run(run())
    for entry in doomed:
        events = []
        while not entry.events.empty():
            events.append(entry.events.get_nowait())
        assert isinstance(events[-1], ErrorEvent) and events[-1].error.status == 424
    assert not batcher.running and batcher.cached is None and not batcher.healthy
    survivor = submit(prompt(7, 6))
    asyncio.run(drain(batcher))
    assert len(tokens(survivor)) == 6 and batcher.healthy
    assert kv.num_free_blocks + kv.num_evictable == kv.num_blocks - 1


def test_prompt_blocks_are_shared_once_prefilled(harness):
    """A request with the same prompt arriving while the first still runs reuses its KV."""
    batcher, client, kv, submit = harness
    shared = prompt(11, 14)  # three full blocks of 4
    first = submit(shared, max_new_tokens=8)

    async def run():
        await batcher.step()  # prefill: the first token, the prompt's blocks are offered to the cache
        second = submit(shared, max_new_tokens=8)
        await batcher.step()
        return second

    second = asyncio.run(run())
    assert second.allocation.cache_len == 12
    assert second.allocation.blocks[:3] == first.allocation.blocks[:3]
    asyncio.run(drain(batcher))
    assert tokens(second) == tokens(first)


def test_speculative_runs_stream_each_token_and_stop_inside_a_run(tiny_llama, router_tokenizer):
    """With --speculate a Generation carries the accepted run: the batcher streams every token as
    its own event (the same tokens as without speculation), and a stop string matched inside a run
    ends the request there, its blocks returned."""
    rng = random.Random(2)
    grounded = [rng.randrange(2, 120) for _ in range(9)] * 3  # the tiny llama continues it by copying

    def run(speculate: int, **params) -> tuple[list[TokenEvent], float]:
        engine = make_engine(tiny_llama, block_size=BS, num_blocks_tokens=2048)
        engine.config = dataclasses.replace(engine.config, speculate=speculate)
        kv = KVManager(2048 // BS + 1, BS, prefix_caching=True)
        queue, metrics = Queue(kv, support_chunking=True), Metrics(512, 512)
        limits = Limits(max_input_tokens=1024, max_total_tokens=2048, max_batch_total_tokens=2048)
        batcher = Batcher(EngineClient(engine), queue, kv, limits, metrics, BatchPolicy(speculate=speculate))
        free = kv.num_free_blocks + kv.num_evictable
        entry = Entry.create(0, valid_request(grounded, 30, **params), router_tokenizer)
        queue.append(entry)
        asyncio.run(drain(batcher))
        assert kv.num_free_blocks + kv.num_evictable == free
        return token_events(entry), metrics.skipped_tokens.collect()[0].samples

    plain, _ = run(0)
    drafted, samples = run(4)
    assert [e.token.id for e in drafted] == [e.token.id for e in plain]
    assert [e.token.logprob for e in drafted] == pytest.approx([e.token.logprob for e in plain], abs=1e-4)
    accepted = next(s.value for s in samples if s.name.endswith("_sum"))
    assert accepted > 0  # some steps carried several tokens
    # A stop string: the text of a token well inside the output (the run it lands in is cut there).
    texts = ["".join(e.text for e in plain[:n]) for n in range(len(plain) + 1)]
    stop = next(t for n in range(len(plain) // 2, len(plain) + 1) if (t := texts[n][len(texts[n - 1]):]).strip())
    ends = next(n for n in range(1, len(plain) + 1) if stop in texts[n])
    stopped, _ = run(4, stop=(stop,))
    assert [e.token.id for e in stopped] == [e.token.id for e in plain[:ends]]
    assert stopped[-1].finish.finish_reason == "stop_sequence"
