"""Prefix cache: a block-granular radix tree over token ids with LRU eviction.

Like TGI's `RadixAllocator` (itself after SGLang's radix attention), finished requests leave the K/V
of their full blocks behind so a later request with the same prefix (system prompt, chat history,
few-shot examples) skips recomputing it. Every edge is one whole block: the key is the tuple of
`block_size` token ids stored in that block, the value the block id. Partially filled blocks are
never cached because their tail would be overwritten by the next request that extends them.

Namespaces: K/V depends on more than the tokens when a LoRA adapter changes the k/v projections,
so a prefix is only ever shared between requests of the same adapter. A namespace other than ""
is folded into the key of its first block (`(namespace, *ids)`), which no plain block key equals:
one tree, one LRU, and no cross-adapter hit.

Ownership: the cache holds exactly one allocator reference on every block it stores; a request that
matched a prefix holds its own references. So a cached block with allocator refcount 1 is used by
nobody but the cache and may be evicted, and the allocator needs no idea that a cache exists.

Eviction only removes leaves (removing an inner node would orphan the K/V of its subtree, which was
computed with that prefix), least recently used first, through a lazily invalidated min-heap of
leaves: touching a node pushes a new entry and stale ones are skipped when popped, so `evict(k)`
costs O((k + in-use leaves) log n) instead of a scan of the whole tree per block.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from router.scheduler.block_allocator import BlockAllocator


@dataclass(slots=True)
class PrefixMatch:
    """Cached blocks for the longest block-aligned prefix; the caller owns one reference to each."""

    blocks: list[int]
    num_tokens: int


@dataclass(slots=True, eq=False)
class _Node:
    key: tuple[int | str, ...]  # a block's ids; a first block under a namespace starts with it
    block: int
    parent: _Node | None
    children: dict[tuple[int | str, ...], _Node] = field(default_factory=dict)
    last_access: int = 0
    alive: bool = True


class RadixCache:
    """Block-granular prefix tree; see the module docstring for the ownership rules."""

    __slots__ = ("_allocator", "_block_size", "_root", "_num_nodes", "_clock", "_heap", "_seq")

    def __init__(self, allocator: BlockAllocator) -> None:
        self._allocator = allocator
        self._block_size = allocator.block_size
        self._root = _Node(key=(), block=-1, parent=None)
        self._num_nodes = 0
        self._clock = 0  # logical time: one tick per match/insert, so LRU order is deterministic
        # (last_access, seq, node); seq breaks ties so nodes are never compared.
        self._heap: list[tuple[int, int, _Node]] = []
        self._seq = 0

    @property
    def num_cached_blocks(self) -> int:
        return self._num_nodes

    @property
    def num_evictable(self) -> int:
        """Blocks `evict` could free right now: whole subtrees that no request holds.

        O(cached blocks); meant for metrics and diagnostics, not the per-step scheduling path
        (`KVManager` just calls `evict` when it is short of blocks).
        """
        refcount = self._allocator.refcount
        total = 0
        # Post-order without recursion: a node is evictable iff it and all its descendants are.
        stack: list[tuple[_Node, bool]] = [(child, False) for child in self._root.children.values()]
        evictable: dict[int, bool] = {}
        while stack:
            node, expanded = stack.pop()
            if not expanded:
                stack.append((node, True))
                stack.extend((child, False) for child in node.children.values())
                continue
            ok = refcount(node.block) == 1 and all(evictable[id(c)] for c in node.children.values())
            evictable[id(node)] = ok
            total += ok
        return total

    @property
    def num_idle_blocks(self) -> int:
        """Cached blocks that only the cache holds (refcount 1), evictable now or not; O(cached
        blocks). `used - num_idle_blocks` is what requests hold: 0 on an idle server, else a leak."""
        refcount = self._allocator.refcount
        total = 0
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            total += refcount(node.block) == 1
            stack.extend(node.children.values())
        return total

    # -- lookup / insertion ----------------------------------------------------------------------

    def match(self, token_ids: Sequence[int], namespace: str = "") -> PrefixMatch:
        """Longest cached prefix of full blocks, leaving at least one prompt token to compute.

        The prefill must run the model on at least one token to produce the first logits, hence the
        cap of ``(len - 1) // block_size`` blocks. Matched blocks are increfed for the caller and
        their LRU time is refreshed.
        """
        max_blocks = (len(token_ids) - 1) // self._block_size if token_ids else 0
        node = self._root
        path: list[_Node] = []
        for key in self._keys(token_ids, max_blocks, namespace):
            child = node.children.get(key)
            if child is None:
                break
            path.append(child)
            node = child
        blocks = [n.block for n in path]
        if blocks:
            self._allocator.incref(blocks)
            self._touch(path)
        return PrefixMatch(blocks=blocks, num_tokens=len(blocks) * self._block_size)

    def insert(self, token_ids: Sequence[int], blocks: Sequence[int], namespace: str = "") -> None:
        """Record the full blocks of `token_ids`, whose K/V is stored in `blocks` (block i holds tokens
        ``i*block_size .. (i+1)*block_size-1``).

        Where the tree already has a node for a prefix, the cached block is kept and the caller's
        duplicate stays the caller's (it frees it as usual); new nodes take one reference each.
        """
        num_full = len(token_ids) // self._block_size
        if len(blocks) < num_full:
            raise ValueError(f"{len(token_ids)} tokens need {num_full} full blocks, got {len(blocks)}")
        node = self._root
        path: list[_Node] = []
        for i, key in enumerate(self._keys(token_ids, num_full, namespace)):
            child = node.children.get(key)
            if child is None:
                block = blocks[i]
                self._allocator.incref((block,))
                child = _Node(key=key, block=block, parent=node)
                node.children[key] = child
                self._num_nodes += 1
            path.append(child)
            node = child
        if path:
            self._touch(path)

    # -- eviction --------------------------------------------------------------------------------

    def evict(self, num_blocks: int) -> int:
        """Free up to `num_blocks` cached blocks that no request holds, LRU leaves first.

        Returns how many were freed. A leaf still used by a request is set aside and pushed back
        afterwards; a parent whose last child goes becomes a leaf candidate itself.
        """
        freed = 0
        busy: dict[int, _Node] = {}
        refcount = self._allocator.refcount
        # self._heap, not a local alias: a push inside _remove_leaf may rebuild (replace) it.
        while freed < num_blocks and self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            if not node.alive or node.children or stamp != node.last_access:
                continue  # stale entry: evicted, grown children, or touched since it was pushed
            if refcount(node.block) > 1:
                busy[id(node)] = node
                continue
            self._remove_leaf(node)
            freed += 1
        for node in busy.values():
            self._push(node)
        return freed

    def clear(self) -> None:
        """Drop every cached block (the cache's reference only; requests keep theirs)."""
        blocks: list[int] = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            node.alive = False
            blocks.append(node.block)
            stack.extend(node.children.values())
        self._root.children.clear()
        self._num_nodes = 0
        self._heap.clear()
        self._allocator.free(blocks)

    # -- internals -------------------------------------------------------------------------------

    def _keys(self, token_ids: Sequence[int], num_blocks: int, namespace: str) -> Iterator[tuple[int | str, ...]]:
        bs = self._block_size
        for i in range(num_blocks):
            block = tuple(token_ids[i * bs : (i + 1) * bs])
            yield (namespace, *block) if namespace and i == 0 else block

    def _touch(self, path: list[_Node]) -> None:
        # Ancestors get the same stamp as their descendants, so a parent is never older than its
        # children and "LRU leaves first" never strands a fresher subtree under an evicted node.
        self._clock += 1
        for node in path:
            node.last_access = self._clock
        tail = path[-1]
        if not tail.children:
            self._push(tail)

    def _push(self, node: _Node) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (node.last_access, self._seq, node))
        # Touches leave stale entries behind; rebuild once they dominate so memory stays O(nodes).
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        heap: list[tuple[int, int, _Node]] = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                self._seq += 1
                heap.append((node.last_access, self._seq, node))
        heapq.heapify(heap)
        self._heap = heap

    def _remove_leaf(self, node: _Node) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[node.key]
        node.alive = False
        self._num_nodes -= 1
        self._allocator.free((node.block,))
        if parent is not self._root and not parent.children:
            self._push(parent)
