import random

import pytest

from router.scheduler.block_allocator import BlockAllocator
from router.scheduler.kv import Allocation, KVManager
from router.scheduler.radix import PrefixMatch, RadixCache

BS = 4


def make(num_blocks=16, block_size=BS):
    alloc = BlockAllocator(num_blocks, block_size)
    return alloc, RadixCache(alloc)


def cache_request(alloc, cache, tokens, n_blocks=None):
    """Simulate a finished request: allocate, insert its tokens, free its own references."""
    blocks = alloc.allocate(n_blocks if n_blocks is not None else alloc.blocks_for(len(tokens)))
    cache.insert(tokens, blocks)
    alloc.free(blocks)
    return blocks


# -- RadixCache ----------------------------------------------------------------------------------


def test_miss_on_empty_cache():
    alloc, cache = make()
    assert cache.match(list(range(10))) == PrefixMatch(blocks=[], num_tokens=0)
    assert cache.match([]) == PrefixMatch(blocks=[], num_tokens=0)


def test_insert_caches_only_full_blocks():
    alloc, cache = make()
    blocks = alloc.allocate(3)  # 10 tokens: 2 full blocks + a partial one
    assert blocks == [1, 2, 3]
    cache.insert(list(range(10)), blocks)
    assert cache.num_cached_blocks == 2
    alloc.free(blocks)
    # Cache holds 1 and 2; the partial block 3 went back to the free list.
    assert [alloc.refcount(b) for b in blocks] == [1, 1, 0]
    assert alloc.num_free == 15 - 2


def test_full_and_partial_prefix_hits():
    alloc, cache = make()
    cache_request(alloc, cache, list(range(12)))  # blocks 1, 2, 3
    # Same first 8 tokens, then diverges: two blocks hit.
    m = cache.match(list(range(8)) + [99, 98, 97])
    assert m == PrefixMatch(blocks=[1, 2], num_tokens=8)
    assert [alloc.refcount(b) for b in (1, 2, 3)] == [2, 2, 1]
    alloc.free(m.blocks)
    # Divergence inside the second block: only the first block hits (block granularity).
    m = cache.match([0, 1, 2, 3, 4, 5, 77, 7, 8])
    assert m == PrefixMatch(blocks=[1], num_tokens=4)
    alloc.free(m.blocks)
    # Longer prompt extending the whole cached sequence: all three blocks.
    m = cache.match(list(range(20)))
    assert m == PrefixMatch(blocks=[1, 2, 3], num_tokens=12)
    alloc.free(m.blocks)
    assert [alloc.refcount(b) for b in (1, 2, 3)] == [1, 1, 1]


def test_match_leaves_at_least_one_token():
    alloc, cache = make()
    cache_request(alloc, cache, list(range(12)))
    # Exactly the cached 12 tokens: the last block must be recomputed to get logits.
    assert cache.match(list(range(12))).blocks == [1, 2]
    assert cache.match(list(range(13))).blocks == [1, 2, 3]
    assert cache.match(list(range(5))).blocks == [1]
    assert cache.match(list(range(4))).blocks == []


def test_insert_keeps_existing_blocks_and_adds_new_nodes():
    alloc, cache = make()
    cache_request(alloc, cache, list(range(8)))  # blocks 1, 2 cached
    # A concurrent request computed the same prefix in its own blocks and went further.
    mine = alloc.allocate(4)
    assert mine == [3, 4, 5, 6]
    cache.insert(list(range(16)), mine)
    assert cache.num_cached_blocks == 4
    # Duplicates (3, 4) stay the request's only; new nodes (5, 6) got a cache reference.
    assert [alloc.refcount(b) for b in mine] == [1, 1, 2, 2]
    alloc.free(mine)
    assert [alloc.refcount(b) for b in mine] == [0, 0, 1, 1]
    m = cache.match(list(range(17)))
    assert m.blocks == [1, 2, 5, 6]
    alloc.free(m.blocks)


def test_insert_rejects_too_few_blocks():
    alloc, cache = make()
    with pytest.raises(ValueError):
        cache.insert(list(range(8)), alloc.allocate(1))


def test_evict_lru_leaves_first():
    alloc, cache = make()
    assert cache_request(alloc, cache, [1] * 4 + [2] * 4) == [1, 2]  # A: 1 -> 2
    # B computed its own copy of A's first block (3, a duplicate freed again) and a new leaf 4.
    assert cache_request(alloc, cache, [1] * 4 + [3] * 4) == [3, 4]
    assert alloc.refcount(3) == 0 and alloc.refcount(4) == 1
    assert cache_request(alloc, cache, [5] * 4) == [3]  # C: LIFO reuses block 3
    alloc.free(cache.match([1] * 4 + [2] * 4 + [0]).blocks)  # touch A: LRU is now B, then C
    assert cache.evict(1) == 1 and alloc.refcount(4) == 0  # B's leaf
    assert cache.evict(1) == 1 and alloc.refcount(3) == 0  # C
    # A's leaf next; its parent only after the child went, although both have the same age.
    assert cache.evict(1) == 1 and alloc.refcount(2) == 0 and alloc.refcount(1) == 1
    assert cache.evict(5) == 1 and alloc.refcount(1) == 0
    assert cache.num_cached_blocks == 0 and alloc.num_free == 15


def test_exact_eviction_order_ids():
    alloc, cache = make()
    for t in range(3):  # three single-block entries, inserted in order: LRU is the first
        cache_request(alloc, cache, [t] * BS)
    assert cache.num_cached_blocks == 3
    assert [alloc.refcount(b) for b in (1, 2, 3)] == [1, 1, 1]
    alloc.free(cache.match([0] * BS + [9]).blocks)  # refresh block 1
    assert cache.evict(1) == 1 and alloc.refcount(2) == 0
    assert cache.evict(1) == 1 and alloc.refcount(3) == 0
    assert cache.evict(1) == 1 and alloc.refcount(1) == 0


def test_blocks_in_use_are_never_evicted():
    alloc, cache = make()
    cache_request(alloc, cache, list(range(8)))  # 1 -> 2
    cache_request(alloc, cache, [9] * 4)  # 3
    held = cache.match(list(range(9)))  # a running request holds 1 and 2
    assert held.blocks == [1, 2]
    assert cache.num_evictable == 1
    assert cache.evict(10) == 1  # only block 3
    assert alloc.refcount(3) == 0
    assert cache.evict(10) == 0
    assert cache.num_cached_blocks == 2
    alloc.free(held.blocks)  # request done: now evictable
    assert cache.num_evictable == 2
    assert cache.evict(10) == 2
    assert alloc.num_free == 15


def test_inner_node_pinned_by_child_in_use():
    alloc, cache = make()
    cache_request(alloc, cache, list(range(4)))  # block 1, cache-only
    mine = alloc.allocate(2)  # a request that computed both blocks itself
    cache.insert(list(range(8)), mine)  # node 1 kept, child = mine[1]
    alloc.free(mine[:1])  # still holds its second block
    assert cache.num_evictable == 0  # parent refcount 1, but its child is in use
    assert cache.evict(5) == 0
    alloc.free(mine[1:])
    assert cache.evict(5) == 2


def test_clear_releases_cache_references_only():
    alloc, cache = make()
    cache_request(alloc, cache, list(range(12)))
    held = cache.match(list(range(13)))
    cache.clear()
    assert cache.num_cached_blocks == 0
    assert [alloc.refcount(b) for b in held.blocks] == [1, 1, 1]
    assert cache.match(list(range(13))).blocks == []
    alloc.free(held.blocks)
    assert alloc.num_free == 15


def test_randomized_no_leaks_and_heap_stays_bounded():
    rng = random.Random(0)
    alloc, cache = make(num_blocks=64, block_size=2)
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 12))] for _ in range(8)]
    live = []
    content = {}  # block -> the tokens whose K/V a request "computed" into it
    hits = evicted = 0
    for _ in range(2000):
        if live and (rng.random() < 0.5 or len(live) > 6):
            tokens, blocks = live.pop(rng.randrange(len(live)))
            cache.insert(tokens, blocks)
            alloc.free(blocks)
            continue
        tokens = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(0, 6))]
        m = cache.match(tokens)
        for i, b in enumerate(m.blocks):  # a hit must hold exactly these tokens' K/V
            assert content[b] == tuple(tokens[i * 2 : i * 2 + 2])
        need = alloc.blocks_for(len(tokens)) - len(m.blocks)
        if need > alloc.num_free:
            evicted += cache.evict(need - alloc.num_free)
        fresh = alloc.allocate(need)
        if fresh is None:
            alloc.free(m.blocks)
            continue
        hits += bool(m.blocks)
        for i, b in enumerate(fresh, start=len(m.blocks)):
            content[b] = tuple(tokens[i * 2 : i * 2 + 2])
        live.append((tokens, m.blocks + fresh))
        assert len(cache._heap) <= 2 * cache.num_cached_blocks + 65
    for tokens, blocks in live:
        alloc.free(blocks)
    assert hits > 100 and evicted > 100  # the run exercised both paths
    assert cache.num_evictable == cache.num_cached_blocks
    cache.clear()
    assert alloc.num_free == 63 and alloc.num_used == 0


# -- KVManager -----------------------------------------------------------------------------------


def test_kv_without_prefix_caching():
    kv = KVManager(num_blocks=8, block_size=BS, prefix_caching=False)
    a = kv.allocate(list(range(10)), 14)
    assert a == Allocation(blocks=[1, 2, 3, 4], cache_len=0)
    kv.release(a, list(range(13)))  # ignored: no cache
    assert kv.num_free_blocks == 7 and kv.num_evictable == 0 and kv.num_cached_blocks == 0
    assert kv.prefix_query_tokens == 0


def test_kv_prefix_hit_and_counters():
    kv = KVManager(num_blocks=16, block_size=BS, prefix_caching=True)
    prompt = list(range(10))
    a = kv.allocate(prompt, 12)
    assert a == Allocation(blocks=[1, 2, 3], cache_len=0)
    kv.release(a, prompt + [50])  # 11 tokens have K/V: 2 full blocks cached
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 13 and kv.num_evictable == 2
    b = kv.allocate(list(range(9)) + [70, 71], 16)
    assert b.cache_len == 8 and b.blocks[:2] == [1, 2] and len(b.blocks) == 4
    assert (kv.prefix_hit_tokens, kv.prefix_query_tokens) == (8, 21)
    kv.release(b)
    kv.clear_cache()
    assert kv.num_free_blocks == 15


def test_kv_evicts_on_pressure():
    kv = KVManager(num_blocks=6, block_size=BS, prefix_caching=True)  # 5 usable blocks
    a = kv.allocate([1] * 8, 12)
    kv.release(a, [1] * 12)  # caches 3 blocks
    assert kv.num_free_blocks == 2 and kv.num_cached_blocks == 3
    b = kv.allocate([2] * 8, 16)  # needs 4: must evict 2 cached blocks (deepest first)
    assert b is not None and len(b.blocks) == 4 and b.cache_len == 0
    assert kv.num_cached_blocks == 1 and kv.num_free_blocks == 0
    # The surviving root block still serves hits.
    kv.release(b)
    c = kv.allocate([1] * 6, 8)
    assert c.cache_len == 4
    kv.release(c)
    kv.clear_cache()
    assert kv.num_free_blocks == 5


def test_kv_failed_allocation_holds_nothing():
    kv = KVManager(num_blocks=6, block_size=BS, prefix_caching=True)
    kv.release(kv.allocate([1] * 8, 8), [1] * 8)  # blocks 1, 2 cached
    running = kv.allocate([3] * 8, 12)  # 3 blocks in use, 0 free
    assert kv.num_free_blocks == 0
    # Hits the cached first block but needs 3 more with only 1 evictable: fails, releases the hit.
    assert kv.allocate([1] * 5, 16) is None
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 0
    assert (kv.prefix_hit_tokens, kv.prefix_query_tokens) == (0, 16)  # the failed try isn't counted
    assert kv.allocator.refcount(1) == 1
    kv.release(running)
    kv.clear_cache()
    assert kv.num_free_blocks == 5


def test_kv_release_guards():
    kv = KVManager(num_blocks=8, block_size=BS, prefix_caching=True)
    assert kv.allocate([1, 2, 3], 100) is None  # more blocks than exist: nothing taken
    a = kv.allocate([1, 2, 3], 9)
    assert a.blocks == [1, 2, 3]
    kv.release(a, [7] * 100)  # tokens beyond the blocks' capacity are ignored
    assert kv.num_cached_blocks == 3
    with pytest.raises(ValueError):
        kv.release(a)
    with pytest.raises(ValueError):
        kv.allocate([1, 2, 3], 2)


def test_kv_allocate_evicts_cached_blocks_when_short():
    kv = KVManager(num_blocks=4, block_size=BS, prefix_caching=True)  # 3 usable
    kv.release(kv.allocate([5] * 8, 8), [5] * 8)  # 2 cached, 1 free
    a = kv.allocate([], 12)  # empty prompt bypasses the cache; needs 3 blocks: evicts both cached
    assert len(a.blocks) == 3 and kv.num_cached_blocks == 0 and kv.prefix_query_tokens == 8
    kv.release(a)
    assert kv.num_free_blocks == 3


def test_repeated_hits_do_not_grow_heap_unboundedly():
    alloc, cache = make()
    cache_request(alloc, cache, [1] * 8)  # 1 -> 2
    cache_request(alloc, cache, [2] * 4)  # 3
    for _ in range(1000):  # every hit pushes a fresh heap entry for the touched leaf
        alloc.free(cache.match([1] * 9).blocks)
    assert len(cache._heap) <= 2 * cache.num_cached_blocks + 65
    # Order still right after the rebuilds: the untouched leaf goes first, then the hot path.
    assert cache.evict(1) == 1 and alloc.refcount(3) == 0
    assert cache.evict(1) == 1 and alloc.refcount(2) == 0
    assert cache.evict(1) == 1 and alloc.refcount(1) == 0


def test_namespaces_never_share_blocks():
    alloc, cache = make()
    free = alloc.num_free
    tokens = list(range(12))
    blocks = alloc.allocate(3)
    cache.insert(tokens, blocks, "adapter-a")
    alloc.free(blocks)
    assert cache.match(tokens + [99]).num_tokens == 0  # the base model's namespace
    assert cache.match(tokens + [99], "adapter-b").num_tokens == 0
    hit = cache.match(tokens + [99], "adapter-a")
    assert hit.blocks == blocks and hit.num_tokens == 12
    alloc.free(hit.blocks)
    # The same tokens in another namespace are new nodes with their own blocks; both stay evictable.
    other = alloc.allocate(3)
    cache.insert(tokens, other)
    alloc.free(other)
    base = cache.match(tokens + [99])
    assert cache.num_cached_blocks == 6 and base.blocks == other
    alloc.free(base.blocks)
    assert cache.evict(6) == 6 and alloc.num_free == free
