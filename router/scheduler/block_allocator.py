"""Logical KV-cache blocks owned by the router.

The router decides which KV blocks every request uses and passes their ids to the shards (TGI v3:
`backends/v3/src/block_allocator.rs`); the shards only index their paged KV tensors with them. This
module is the bookkeeping: a free list plus one reference count per block, so a block can be shared
by several requests and by the prefix cache (`router/scheduler/radix.py`) and returns to the free list only
when its last holder lets go.

Block 0 is reserved: the shards' health probe writes its K/V there, so no request may ever own it.

Free-list order is LIFO: the most recently freed block is handed out first. On a fresh allocator
blocks come out lowest id first (1, 2, 3, ...). LIFO keeps the set of touched blocks small and makes
the ids a test sees fully predictable; both pop and push are O(1) at the list's tail.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

RESERVED_BLOCK = 0


class BlockAllocator:
    """Reference-counted pool of block ids ``1 .. num_blocks-1`` (block 0 is reserved)."""

    __slots__ = ("num_blocks", "block_size", "_free", "_refcount")

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Stack whose tail is the next block to hand out: reversed so a fresh allocator gives 1, 2, ...
        self._free: list[int] = list(range(num_blocks - 1, RESERVED_BLOCK, -1))
        # refcount 0 == free; the reserved block stays at 0 but is never on the free list.
        self._refcount: list[int] = [0] * num_blocks

    # -- introspection -------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Allocatable blocks currently held by someone (the reserved block is not counted)."""
        return self.num_blocks - 1 - len(self._free)

    def refcount(self, block: int) -> int:
        """Holders of `block`; the prefix cache uses ``== 1`` to mean "only the cache holds it"."""
        self._check_id(block)
        return self._refcount[block]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    # -- mutation ------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh blocks with refcount 1, or None if fewer than `n` are free.

        All-or-nothing: a partial allocation would only have to be rolled back by the caller, and
        the scheduler treats "does not fit" as "wait in the queue".
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        blocks = self._free[-n:]
        del self._free[-n:]
        blocks.reverse()  # tail of the stack first, i.e. exactly n consecutive pops
        refcount = self._refcount
        for block in blocks:
            refcount[block] = 1
        return blocks

    def incref(self, blocks: Iterable[int]) -> None:
        """Add one holder to each block (listing a block twice adds two). Blocks must be in use."""
        blocks = list(blocks)
        for block in blocks:
            self._check_id(block)
            if self._refcount[block] == 0:
                raise ValueError(f"incref of free block {block}")
        for block in blocks:
            self._refcount[block] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one holder from each block; a block whose count reaches 0 goes back on the free list.

        Validated before anything changes, so a double free raises without corrupting the counts of
        the other blocks in the same call.
        """
        counts = Counter(blocks)
        refcount = self._refcount
        for block, n in counts.items():
            self._check_id(block)
            if refcount[block] < n:
                raise ValueError(f"double free of block {block} (refcount {refcount[block]}, freeing {n})")
        for block, n in counts.items():
            refcount[block] -= n
            if refcount[block] == 0:
                self._free.append(block)

    def _check_id(self, block: int) -> None:
        if block == RESERVED_BLOCK:
            raise ValueError("block 0 is reserved and never allocated")
        if not 0 < block < self.num_blocks:
            raise ValueError(f"block id {block} out of range 1..{self.num_blocks - 1}")

    def __repr__(self) -> str:
        return (
            f"BlockAllocator(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"free={self.num_free}, used={self.num_used})"
        )
