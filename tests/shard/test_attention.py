"""Both CPU attention backends (SDPA over gathered K/V, the compiled paged kernel) against a dense
reference, on scattered block tables; the metadata each layout needs."""

from __future__ import annotations

import random

import pytest
import torch

from shard.attention import PagedCpuBackend, SdpaBackend, SeqStep, build_metadata
from shard.kv_cache import KVCache, KVCacheSpec

H, KVH, D, BS = 4, 2, 8, 4


def dense_reference(q, k, v, q_len):
    """Causal attention of the last q_len positions over the whole sequence (GQA expanded)."""
    kv_len = k.shape[0]
    k = k.repeat_interleave(H // KVH, dim=1).transpose(0, 1)
    v = v.repeat_interleave(H // KVH, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ k.transpose(1, 2) / D**0.5
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


@pytest.fixture(params=["sdpa", "paged"])
def backend(request):
    if request.param == "sdpa":
        return SdpaBackend(D**-0.5)
    return PagedCpuBackend(D**-0.5, request.getfixturevalue("paged_kernel"))


@pytest.mark.parametrize("shape", [
    [(1, 9)],  # one decode row
    [(9, 9)],  # one full prefill
    [(1, 5), (1, 13), (1, 2)],  # pure decode batch, ragged lengths
    [(6, 6), (1, 11), (3, 10), (1, 4)],  # mixed: prefill, decode, chunk after a cached prefix, decode
])
def test_paged_matches_dense(shape, backend):
    torch.manual_seed(0)
    rng = random.Random(0)
    cache = KVCache(KVCacheSpec(1, KVH, D, BS, torch.float32), num_blocks=64, device=torch.device("cpu"))
    free = list(range(1, 64))
    rng.shuffle(free)  # block tables are scattered, not contiguous
    seqs, full_k, full_v = [], [], []
    for q_len, kv_len in shape:
        blocks = [free.pop() for _ in range(-(-kv_len // BS))]
        seqs.append(SeqStep(q_len, kv_len, blocks))
        full_k.append(torch.randn(kv_len, KVH, D))
        full_v.append(torch.randn(kv_len, KVH, D))
        # The cached part of the sequence is already in the cache from earlier steps.
        k_cache, v_cache = (c.view(-1, KVH, D) for c in cache.layer(0))
        for pos in range(kv_len - q_len):
            slot = blocks[pos // BS] * BS + pos % BS
            k_cache[slot], v_cache[slot] = full_k[-1][pos], full_v[-1][pos]
    meta = build_metadata(seqs, BS, torch.device("cpu"), backend.layout)
    q = torch.randn(sum(q for q, _ in shape), H, D)
    k = torch.cat([fk[kv - ql:] for fk, (ql, kv) in zip(full_k, shape)])
    v = torch.cat([fv[kv - ql:] for fv, (ql, kv) in zip(full_v, shape)])
    out = backend.forward(q, k, v, cache.layer(0), meta)
    start = 0
    for (q_len, kv_len), fk, fv in zip(shape, full_k, full_v):
        expected = dense_reference(q[start : start + q_len], fk, fv, q_len)
        torch.testing.assert_close(out[start : start + q_len], expected, atol=1e-5, rtol=1e-5)
        start += q_len


def test_metadata_pure_decode_has_no_token_index():
    meta = build_metadata([SeqStep(1, 5, [3, 4]), SeqStep(1, 2, [7])], BS, torch.device("cpu"))
    assert meta.decode_tokens is None and not meta.prefills
    assert meta.slot_mapping.tolist() == [4 * BS + 0, 7 * BS + 1]
    assert meta.decode_kv_slots.tolist() == [
        [12, 13, 14, 15, 16], [28, 29, 30, 31, 0],  # past kv_len: masked out below
    ]
    assert meta.decode_kv_mask.view(2, -1).tolist() == [[True] * 5, [True, True, False, False, False]]


def test_explicit_slots_override_blocks():
    meta = build_metadata([SeqStep(1, 1, [0], slots=[0])], BS, torch.device("cpu"))
    assert meta.slot_mapping.tolist() == [0]


def test_kv_cache_layout_and_size():
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    cache = KVCache(spec, num_blocks=5, device=torch.device("cpu"))
    k, v = cache.layer(2)
    assert k.shape == (5, 4, 2, 8) and v.shape == (5, 4, 2, 8)
    assert spec.bytes_per_block == 2 * 3 * 4 * 2 * 8 * 4
    assert cache.nbytes == 5 * spec.bytes_per_block
    assert cache.num_tokens == 20


def test_paged_metadata_carries_block_tables_not_padded_slots():
    meta = build_metadata([SeqStep(1, 5, [3, 4, 9]), SeqStep(4, 4, [6]), SeqStep(1, 2, [7])], BS,
                          torch.device("cpu"), "paged")
    # Every token is a kernel row, prompt chunks included: no padded slots, no SDPA prefills.
    assert meta.decode_kv_slots is None and meta.decode_kv_mask is None and not meta.prefills
    assert meta.block_tables.tolist() == [[3, 4, 9], [6, 0, 0], [7, 0, 0]]  # padded with block 0 (never read)
    assert meta.block_tables.dtype == meta.seqlens_k.dtype == meta.cu_seqlens_q.dtype == torch.int32
    assert meta.cu_seqlens_q.tolist() == [0, 1, 5, 6]
    assert meta.seqlens_k.tolist() == [5, 4, 2]
    assert meta.slot_mapping.tolist() == [4 * BS, 6 * BS, 6 * BS + 1, 6 * BS + 2, 6 * BS + 3, 7 * BS + 1]


def test_paged_backend_serves_explicit_slot_probes_through_sdpa(paged_kernel):
    """The health probe addresses slots directly; the paged layout falls back to padded slots."""
    meta = build_metadata([SeqStep(1, 1, [0], slots=[0])], BS, torch.device("cpu"), "paged")
    assert meta.block_tables is None and meta.decode_kv_slots is not None
    cache = KVCache(KVCacheSpec(1, KVH, D, BS, torch.float32), num_blocks=2, device=torch.device("cpu"))
    q, k, v = torch.randn(1, H, D), torch.randn(1, KVH, D), torch.randn(1, KVH, D)
    out = PagedCpuBackend(D**-0.5, paged_kernel).forward(q, k, v, cache.layer(0), meta)
    torch.testing.assert_close(out, dense_reference(q, k, v, 1), atol=1e-5, rtol=1e-5)


def _kernel_rows(paged_kernel, q, k_cache, v_cache, seqs, block):
    meta = build_metadata(seqs, block, torch.device("cpu"), "paged")
    return paged_kernel(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seqlens_k, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_rows_are_bit_identical_however_the_step_is_cut(paged_kernel, dtype, threads):
    """The batch-invariance promise: a token's attention has the same bits whether it is computed
    in a whole prompt, in a chunk after a cached prefix, as a decode row, or beside other
    sequences, and whatever the thread count (tiles of 8 rows, the kv-head split for few items)."""
    torch.manual_seed(7)
    heads, kv_heads, dim, block, length = 9, 3, 64, 16, 45
    k_cache = torch.randn(8, block, kv_heads, dim).to(dtype)
    v_cache = torch.randn(8, block, kv_heads, dim).to(dtype)
    table = [5, 2, 7]
    q = torch.randn(length, heads, dim).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = _kernel_rows(paged_kernel, q, k_cache, v_cache, [SeqStep(length, length, table)], block)
        chunks = torch.cat([
            _kernel_rows(paged_kernel, q[a:b], k_cache, v_cache, [SeqStep(b - a, b, table)], block)
            for a, b in [(0, 3), (3, 20), (20, 21), (21, 45)]
        ])
        rows = torch.cat([_kernel_rows(paged_kernel, q[i:i + 1], k_cache, v_cache, [SeqStep(1, i + 1, table)], block)
                          for i in range(length)])
        other = torch.randn(13, heads, dim).to(dtype)  # another sequence's prompt before it, in one step
        mixed = _kernel_rows(paged_kernel, torch.cat([other, q[30:]]), k_cache, v_cache,
                             [SeqStep(13, 13, [1]), SeqStep(length - 30, length, table)], block)[13:]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(whole, chunks) and torch.equal(whole, rows) and torch.equal(whole[30:], mixed)


@pytest.mark.parametrize("batch", [1, 5])  # fewer sequences than threads: split by kv head; more: by sequence
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_sdpa_on_scattered_blocks(paged_kernel, batch, dtype):
    torch.manual_seed(batch)
    heads, kv_heads, dim, block = 6, 3, 16, 4
    lengths = [1, 4, 5, 17, 33][:batch]  # one token, exact block multiple, block + 1, longer ones
    blocks = [-(-n // block) for n in lengths]
    order = torch.randperm(sum(blocks)) + 1
    tables, start = [], 0
    for n in blocks:
        tables.append(order[start:start + n].tolist())
        start += n
    k_cache = torch.randn(1 + sum(blocks), block, kv_heads, dim).to(dtype)
    v_cache = torch.randn(1 + sum(blocks), block, kv_heads, dim).to(dtype)
    q = torch.randn(batch, heads, dim).to(dtype)
    seqs = [SeqStep(1, n, t) for n, t in zip(lengths, tables)]
    paged = build_metadata(seqs, block, torch.device("cpu"), "paged")
    padded = build_metadata(seqs, block, torch.device("cpu"))
    out = paged_kernel(q, k_cache, v_cache, paged.block_tables, paged.cu_seqlens_q, paged.seqlens_k, 0.25)
    expected = SdpaBackend(0.25)._decode(q.float(), (k_cache.float(), v_cache.float()), padded)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def test_kernel_rejects_out_of_range_tables(paged_kernel):
    cache = torch.zeros(3, BS, KVH, D)
    q = torch.zeros(1, H, D)
    lens = torch.tensor([BS], dtype=torch.int32)
    starts = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block id out of range"):
        paged_kernel(q, cache, cache, torch.tensor([[3]], dtype=torch.int32), starts, lens, 1.0)
    with pytest.raises(RuntimeError, match="kv length out of range"):
        paged_kernel(q, cache, cache, torch.tensor([[1]], dtype=torch.int32), starts, lens + 1, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        paged_kernel(q, cache, cache, torch.tensor([[1]]), starts, lens, 1.0)
    with pytest.raises(RuntimeError, match="query_starts"):
        paged_kernel(q, cache, cache, torch.tensor([[1]], dtype=torch.int32), starts + 1, lens, 1.0)
    with pytest.raises(RuntimeError, match="1..kv_len query rows"):  # more rows than positions
        paged_kernel(torch.zeros(2, H, D), cache, cache, torch.tensor([[1]], dtype=torch.int32),
                     torch.tensor([0, 2], dtype=torch.int32), torch.tensor([1], dtype=torch.int32), 1.0)
