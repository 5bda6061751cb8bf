"""Paged SDPA attention against a dense reference, on scattered block tables."""

from __future__ import annotations

import random

import pytest
import torch

from shard.attention import SdpaBackend, SeqStep, build_metadata
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


@pytest.mark.parametrize("shape", [
    [(1, 9)],  # one decode row
    [(9, 9)],  # one full prefill
    [(1, 5), (1, 13), (1, 2)],  # pure decode batch, ragged lengths
    [(6, 6), (1, 11), (3, 10), (1, 4)],  # mixed: prefill, decode, chunk after a cached prefix, decode
])
def test_paged_matches_dense(shape):
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
    meta = build_metadata(seqs, BS, torch.device("cpu"))
    q = torch.randn(sum(q for q, _ in shape), H, D)
    k = torch.cat([fk[kv - ql:] for fk, (ql, kv) in zip(full_k, shape)])
    v = torch.cat([fv[kv - ql:] for fv, (ql, kv) in zip(full_v, shape)])
    out = SdpaBackend(D**-0.5).forward(q, k, v, cache.layer(0), meta)
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
