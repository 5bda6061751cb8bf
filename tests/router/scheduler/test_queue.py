"""Queue.next_batch: FIFO admission within budgets and KV blocks, chunking, prefix hits."""

from __future__ import annotations

import pytest

from router.request import Entry
from router.scheduler.kv import KVManager
from router.scheduler.queue import Queue
from tests.router.helpers import valid_request

BS = 4


@pytest.fixture
def make_entry(router_tokenizer):
    counter = iter(range(1000))

    def make(length: int, max_new_tokens: int = 4, **overrides) -> Entry:
        ids = [100 + i for i in range(length)]
        return Entry.create(next(counter), valid_request(ids, max_new_tokens, **overrides), router_tokenizer)

    return make


def queue(num_blocks: int = 64, chunking: bool = True, prefix: bool = False) -> Queue:
    return Queue(KVManager(num_blocks, BS, prefix_caching=prefix), support_chunking=chunking)


def test_fifo_with_exact_blocks(make_entry):
    q = queue()
    a, b = make_entry(5), make_entry(3)  # 5+4-1 = 8 tokens → 2 blocks; 3+4-1 = 6 → 2 blocks
    q.append(a)
    q.append(b)
    batch = q.next_batch(min_size=None, max_size=None, prefill_budget=100, token_budget=1000)
    assert [e.id for e in batch.entries] == [a.id, b.id]
    assert [list(r.blocks) for r in batch.batch.requests] == [[1, 2], [3, 4]]
    assert batch.batch.max_tokens == 4 * BS and batch.batch.max_blocks == 2
    assert not batch.batch.requests[0].HasField("chunk_len")
    assert len(q) == 0


def test_prefill_budget_chunks_the_last_prompt(make_entry):
    q = queue()
    a, b, c = make_entry(6), make_entry(10), make_entry(2)
    for e in (a, b, c):
        q.append(e)
    batch = q.next_batch(min_size=None, max_size=None, prefill_budget=10, token_budget=1000)
    assert [e.id for e in batch.entries] == [a.id, b.id]
    assert batch.batch.requests[1].chunk_len == 4  # 10 - 6
    assert b.num_computed == 4 and b.is_prefilling
    assert len(q) == 1  # c waits


def test_without_chunking_a_prompt_that_does_not_fit_waits(make_entry):
    q = queue(chunking=False)
    a, b = make_entry(6), make_entry(10)
    q.append(a)
    q.append(b)
    batch = q.next_batch(min_size=None, max_size=None, prefill_budget=10, token_budget=1000)
    assert [e.id for e in batch.entries] == [a.id]
    assert q.kv.num_free_blocks == 63 - 3  # b's allocation was given back


def test_token_budget_max_size_and_min_size(make_entry):
    q = queue()
    entries = [make_entry(4) for _ in range(4)]  # 7 tokens each
    for e in entries:
        q.append(e)
    assert len(q.next_batch(min_size=None, max_size=None, prefill_budget=100, token_budget=15).entries) == 2
    assert len(q.next_batch(min_size=None, max_size=1, prefill_budget=100, token_budget=100).entries) == 1
    free = q.kv.num_free_blocks
    assert q.next_batch(min_size=2, max_size=None, prefill_budget=100, token_budget=100) is None
    assert len(q) == 1 and q.kv.num_free_blocks == free  # put back, nothing leaked


def test_out_of_blocks_waits_and_cancelled_entries_are_skipped(make_entry):
    q = queue(num_blocks=4)  # 3 usable blocks
    first, second, third = make_entry(5), make_entry(5), make_entry(1, max_new_tokens=1)
    second.cancelled = True
    for e in (first, second, third):
        q.append(e)
    batch = q.next_batch(min_size=None, max_size=None, prefill_budget=100, token_budget=1000)
    assert [e.id for e in batch.entries] == [first.id, third.id]
    big = make_entry(20)
    q.append(big)
    assert q.next_batch(min_size=None, max_size=None, prefill_budget=100, token_budget=1000) is None
    assert len(q) == 1


def test_prefix_hit_sets_cache_len(make_entry):
    q = queue(prefix=True)
    first = make_entry(9)
    q.append(first)
    q.next_batch(min_size=None, max_size=None, prefill_budget=100, token_budget=1000)
    first_blocks = list(first.allocation.blocks)
    q.kv.release(first.allocation, list(first.request.input_ids))  # finished: its prompt is cached
    second = make_entry(11)  # same first 9 tokens (ids 100..)
    q.append(second)
    batch = q.next_batch(min_size=None, max_size=None, prefill_budget=100, token_budget=1000)
    request = batch.batch.requests[0]
    assert request.cache_len == 8  # two full blocks
    assert list(request.blocks[:2]) == first_blocks[:2]
    assert second.num_computed == 11


def test_decoder_input_details_bypasses_the_prefix_cache(make_entry):
    q = queue(prefix=True)
    first = make_entry(9)
    q.append(first)
    q.next_batch(min_size=None, max_size=None, prefill_budget=100, token_budget=1000)
    q.kv.release(first.allocation, list(first.request.input_ids))
    second = make_entry(11, decoder_input_details=True)
    q.append(second)
    assert q.next_batch(min_size=None, max_size=None, prefill_budget=100, token_budget=1000).batch.requests[0].cache_len == 0


def test_prefix_cache_is_kept_per_adapter(make_entry):
    """K/V computed under one LoRA adapter is never reused by another (nor by the base model),
    and the adapter reaches the shards in the request."""
    q = queue(prefix=True)
    first = make_entry(9, adapter_id="a")
    q.append(first)
    assert q.next_batch(min_size=None, max_size=None, prefill_budget=100, token_budget=1000).batch.requests[0].adapter_id == "a"
    q.kv.release(first.allocation, list(first.request.input_ids))
    hits = {}
    for adapter in ("", "b", "a"):
        entry = make_entry(11, adapter_id=adapter)
        q.append(entry)
        request = q.next_batch(min_size=None, max_size=None, prefill_budget=100, token_budget=1000).batch.requests[0]
        hits[adapter] = (request.adapter_id, request.cache_len)
        q.kv.release(entry.allocation)  # nothing offered to the cache: only `a`'s prompt is there
    assert hits == {"": ("", 0), "b": ("b", 0), "a": ("a", 8)}
