"""KV block manager: the one object the scheduler talks to about KV memory.

Combines the allocator with the optional prefix cache the way TGI's v3 queue uses its
`BlockAllocator`: a request reserves all the blocks it can ever need up front (prompt + max new
tokens), reusing cached prefix blocks when prefix caching is on and evicting unreferenced cached
blocks when the free list runs short. There is no preemption: a request that does not fit waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.scheduler.block_allocator import BlockAllocator
from router.scheduler.radix import RadixCache


@dataclass(slots=True)
class Allocation:
    """Blocks reserved for one request. `cache_len` tokens at the front already have K/V cached.

    `released` guards against a second `release`: with prefix caching a block can be held by the
    cache and the request, and a double release would silently drop the cache's reference.
    """

    blocks: list[int]
    cache_len: int
    namespace: str = ""  # the prefix-cache namespace its blocks belong to: the LoRA adapter id
    released: bool = False


class KVManager:
    __slots__ = ("allocator", "cache", "prefix_hit_tokens", "prefix_query_tokens", "prefix_hits", "prefix_queries")

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool) -> None:
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.cache: RadixCache | None = RadixCache(self.allocator) if prefix_caching else None
        # Counted per successful allocation only: a request that does not fit is retried every
        # scheduling step and would otherwise be counted again each time.
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        self.prefix_hits = 0  # allocations that reused at least one cached block
        self.prefix_queries = 0

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free list (cached-but-evictable blocks are reported by `num_evictable`)."""
        return self.allocator.num_free

    @property
    def num_evictable(self) -> int:
        """Cached blocks no request holds; O(cached blocks), for metrics."""
        return self.cache.num_evictable if self.cache is not None else 0

    @property
    def num_cached_blocks(self) -> int:
        return self.cache.num_cached_blocks if self.cache is not None else 0

    @property
    def num_used_blocks(self) -> int:
        """Blocks off the free list: held by requests, by the prefix cache, or both."""
        return self.allocator.num_used

    @property
    def num_request_blocks(self) -> int:
        """Blocks at least one request holds (a block shared by several counts once); 0 whenever
        no request runs, so anything else on an idle server is a leak. O(cached blocks)."""
        idle = self.cache.num_idle_blocks if self.cache is not None else 0
        return self.allocator.num_used - idle

    def allocate(self, prompt_ids: Sequence[int], num_tokens: int, namespace: str = "") -> Allocation | None:
        """Reserve blocks for `num_tokens` tokens in total, reusing a cached prefix of `prompt_ids`
        computed in the same `namespace` (the LoRA adapter: its K/V differ from the base model's).

        Pass an empty `prompt_ids` to bypass the cache (e.g. when prompt logprobs must be computed
        for every token). Returns None, holding nothing, when the blocks are not available.
        """
        if num_tokens < len(prompt_ids):
            raise ValueError(f"num_tokens {num_tokens} < prompt length {len(prompt_ids)}")
        cached: list[int] = []
        cache_len = 0
        if self.cache is not None and prompt_ids:
            match = self.cache.match(prompt_ids, namespace)  # increfs: evict() below cannot take these
            cached, cache_len = match.blocks, match.num_tokens
        fresh = self._take(self.allocator.blocks_for(num_tokens) - len(cached))
        if fresh is None:
            if cached:
                self.allocator.free(cached)
            return None
        if self.cache is not None and prompt_ids:
            self.prefix_hit_tokens += cache_len
            self.prefix_query_tokens += len(prompt_ids)
            self.prefix_hits += cache_len > 0
            self.prefix_queries += 1
        return Allocation(blocks=cached + fresh, cache_len=cache_len, namespace=namespace)

    def share_prompt(self, allocation: Allocation, prompt_ids: Sequence[int]) -> None:
        """Offer a request's prompt blocks to the prefix cache as soon as their K/V exist (its
        prefill finished), so requests arriving while it still runs — like the other `n` choices
        of one OpenAI request — reuse them. No-op without prefix caching."""
        if self.cache is not None and not allocation.released:
            self.cache.insert(prompt_ids, allocation.blocks, allocation.namespace)

    def release(self, allocation: Allocation, token_ids: Sequence[int] | None = None) -> None:
        """Give the request's blocks back, first offering its full blocks to the prefix cache.

        `token_ids` must be tokens whose K/V is actually in the blocks, in order (the prompt, plus
        generated tokens except the last sampled one, which was never run through the model).
        Tokens beyond what the allocation's blocks hold are ignored.
        """
        self._check_live(allocation)
        if token_ids is not None and self.cache is not None:
            capacity = len(allocation.blocks) * self.block_size
            self.cache.insert(token_ids[:capacity], allocation.blocks, allocation.namespace)
        self.allocator.free(allocation.blocks)
        allocation.released = True

    def clear_cache(self) -> None:
        """Forget every cached prefix (shard `ClearCache`); blocks held by requests are untouched."""
        if self.cache is not None:
            self.cache.clear()

    def _take(self, n: int) -> list[int] | None:
        """`n` fresh blocks, evicting cached ones if the free list is short; all or nothing."""
        if n <= 0:
            return []
        shortfall = n - self.allocator.num_free
        if shortfall > 0:
            # Cheap upper bound first: never throw cached prefixes away for a request that could
            # not fit even if the whole cache were evicted.
            if self.cache is None or shortfall > self.cache.num_cached_blocks:
                return None
            self.cache.evict(shortfall)
        return self.allocator.allocate(n)

    @staticmethod
    def _check_live(allocation: Allocation) -> None:
        if allocation.released:
            raise ValueError("allocation already released")
