import pytest

from router.scheduler.block_allocator import BlockAllocator


def test_fresh_allocator_counts():
    a = BlockAllocator(num_blocks=8, block_size=16)
    assert (a.num_blocks, a.block_size) == (8, 16)
    assert a.num_free == 7  # block 0 reserved
    assert a.num_used == 0


def test_fresh_allocation_lowest_ids_first():
    a = BlockAllocator(8, 4)
    assert a.allocate(3) == [1, 2, 3]
    assert a.allocate(2) == [4, 5]
    assert (a.num_free, a.num_used) == (2, 5)


def test_freed_blocks_reused_lifo():
    a = BlockAllocator(8, 4)
    assert a.allocate(5) == [1, 2, 3, 4, 5]
    a.free([2])
    a.free([4, 1])  # pushed 4 then 1: 1 is the most recently freed
    assert a.allocate(1) == [1]
    assert a.allocate(2) == [4, 2]
    assert a.allocate(1) == [6]  # then the untouched fresh blocks, in id order


def test_reserved_block_never_handed_out():
    a = BlockAllocator(5, 1)
    blocks = a.allocate(4)
    assert sorted(blocks) == [1, 2, 3, 4]
    assert a.allocate(1) is None
    a.free(blocks)
    assert 0 not in a.allocate(4)


def test_allocation_is_all_or_nothing():
    a = BlockAllocator(4, 2)
    assert a.allocate(2) == [1, 2]
    assert a.allocate(2) is None
    assert a.num_free == 1  # the failed request took nothing
    assert a.allocate(1) == [3]


def test_allocate_zero_and_negative():
    a = BlockAllocator(4, 2)
    assert a.allocate(0) == []
    with pytest.raises(ValueError):
        a.allocate(-1)


def test_refcount_keeps_block_until_last_free():
    a = BlockAllocator(4, 2)
    [b] = a.allocate(1)
    a.incref([b, b])
    assert a.refcount(b) == 3
    a.free([b])
    a.free([b])
    assert a.num_free == 2 and a.refcount(b) == 1
    a.free([b])
    assert a.num_free == 3 and a.refcount(b) == 0


def test_double_free_raises_and_changes_nothing():
    a = BlockAllocator(4, 2)
    b1, b2 = a.allocate(2)
    a.free([b1])
    with pytest.raises(ValueError, match="double free"):
        a.free([b1])
    with pytest.raises(ValueError, match="double free"):
        a.free([b2, b2])  # refcount 1, freed twice in one call
    assert a.refcount(b2) == 1  # validated before mutating
    assert a.num_free == 2


def test_free_or_incref_reserved_or_out_of_range_raises():
    a = BlockAllocator(4, 2)
    with pytest.raises(ValueError, match="reserved"):
        a.free([0])
    with pytest.raises(ValueError, match="reserved"):
        a.incref([0])
    with pytest.raises(ValueError):
        a.free([4])
    with pytest.raises(ValueError):
        a.incref([3])  # free block: incref would resurrect it behind the free list's back


def test_blocks_for():
    a = BlockAllocator(4, 16)
    assert [a.blocks_for(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        a.blocks_for(-1)


def test_invalid_construction():
    with pytest.raises(ValueError):
        BlockAllocator(0, 16)
    with pytest.raises(ValueError):
        BlockAllocator(4, 0)
    assert BlockAllocator(1, 16).allocate(1) is None  # only the reserved block
