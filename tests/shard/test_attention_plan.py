"""The attention plan: which backend runs with which KV block size, every branch on CPU with a fake
flash-attn import; the flash backend's call against flash-attn 2's documented contract (a CPU
stand-in with its signature); the CUDA SDPA decode path's arithmetic."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from shard.attention import (
    AttentionPlan, FlashAttnBackend, SdpaBackend, SeqStep, build_metadata, grouped_decode, plan_attention,
    select_backend,
)
from shard.distributed import TPGroup
from shard.kv_cache import KVCache, KVCacheSpec
from shard.models import get_model
from shard.models.base import ModelContext

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # a torch.device needs no GPU to exist
H100 = (9, 0)


def flash_ok():
    return lambda *args, **kwargs: None


def never_imported():
    raise AssertionError("flash-attn must not be imported for this plan")


def cuda_plan(dtype=torch.bfloat16, head_dim=64, block_size=None, flash_import=flash_ok, capability=H100):
    return plan_attention("paged", CUDA, dtype, head_dim, block_size, False, flash_import, capability)


# -- the plan -----------------------------------------------------------------------------------


def test_cpu_keeps_its_16_token_blocks_and_the_compiled_kernel():
    plan = plan_attention("paged", CPU, torch.float32, 64, None, True, never_imported)
    assert plan == AttentionPlan("cpu-paged", 16, "CPU, float32, head dim 64")
    assert plan_attention("paged", CPU, torch.bfloat16, 64, 4, True, never_imported).block_size == 4


def test_cpu_falls_back_to_sdpa_with_the_reason():
    no_kernel = plan_attention("paged", CPU, torch.float32, 64, None, False, never_imported)
    assert (no_kernel.name, no_kernel.block_size) == ("sdpa", 16)
    assert "did not build" in no_kernel.reason
    fp8 = plan_attention("paged", CPU, torch.float8_e4m3fn, 64, None, True, never_imported)
    assert fp8.name == "sdpa" and "takes no float8_e4m3fn" in fp8.reason


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_sdpa_is_an_explicit_choice_on_any_device(device):
    plan = plan_attention("sdpa", device, torch.float32, 320, None, True, never_imported, capability=(7, 0))
    assert plan == AttentionPlan("sdpa", 16, "ATTENTION=sdpa")
    assert str(plan) == "sdpa (16-token blocks): ATTENTION=sdpa"
    assert plan_attention("sdpa", device, torch.float32, 64, 48, True, never_imported).block_size == 48


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_flash_attn_on_cuda_with_256_token_blocks(dtype, head_dim):
    plan = cuda_plan(dtype, head_dim)
    assert (plan.name, plan.block_size) == ("flash-attn", 256)
    assert cuda_plan(dtype, head_dim, block_size=512).block_size == 512


def test_the_log_line_says_which_backend_and_why(caplog):
    plan = cuda_plan()
    assert str(plan) == "flash-attn (256-token blocks): CUDA, bfloat16, head dim 64"
    cpu_plan = plan_attention("paged", CPU, torch.float32, 64, None, False)
    with caplog.at_level(logging.INFO, logger="shard.attention"):
        backend = select_backend(cpu_plan, 0.125)
    assert type(backend) is SdpaBackend and backend.scale == 0.125
    assert [r.getMessage() for r in caplog.records] == [
        "attention: sdpa (16-token blocks): CPU, float32, head dim 64; the CPU paged kernel did not build"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype=torch.float32), "flash-attn takes float16 or bfloat16, not float32: pass --dtype bfloat16"),
    (dict(head_dim=288), "head dims up to 256 in multiples of 8, and this model's is 288"),
    (dict(head_dim=100), "this model's is 100"),  # flash-attn would pad the whole cache every call
    (dict(block_size=16), "multiple of 256 tokens, not --block-size 16"),
    (dict(block_size=384), "not --block-size 384"),
    (dict(capability=(7, 5)), "Ampere or newer GPU (compute capability >= 8.0; this one is 7.5)"),
])
def test_a_combination_flash_attn_would_reject_is_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError) as error:
        cuda_plan(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert "ATTENTION=sdpa" in str(error.value)


@pytest.mark.parametrize("failure", [
    ImportError("No module named 'flash_attn'"),
    OSError("libcudart.so.12: cannot open shared object file: No such file or directory"),
    ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi\n(more)"),
])
def test_cuda_without_a_working_flash_attn_refuses_to_start(failure):
    def broken():
        raise failure

    with pytest.raises(ValueError) as error:
        cuda_plan(flash_import=broken)
    text = str(error.value)
    assert text.startswith("ATTENTION=paged on CUDA needs flash-attn 2, which does not import (")
    assert str(failure).splitlines()[0] in text and "\n" not in text
    assert "install flash-attn" in text and "or set ATTENTION=sdpa" in text


def test_the_models_take_their_block_size_from_the_plan(tiny_llama, tmp_path):
    from tests.conftest import save_tiny

    ctx = ModelContext(TPGroup(), CPU, torch.float32, None)
    assert get_model(tiny_llama, ctx).info.kv_spec.block_size == 16  # the CPU default, as before
    assert get_model(tiny_llama, ModelContext(TPGroup(), CPU, torch.float32, 8)).info.kv_spec.block_size == 8
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2")
    assert get_model(gpt2, ctx).info.kv_spec.block_size == 16


def test_a_refused_plan_stops_the_load_before_any_cuda_call(tiny_llama):
    """float32 on CUDA is refused while the model is built; no GPU is touched before (none here)."""
    with pytest.raises(ValueError, match="flash-attn takes float16 or bfloat16, not float32"):
        get_model(tiny_llama, ModelContext(TPGroup(), CUDA, torch.float32, None))


# -- the flash backend against flash-attn 2's contract ------------------------------------------


def varlen_stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn_varlen_func's signature and documented paged semantics (flash-attn 2.8,
    flash_attn_interface.py and csrc/flash_attn/flash_api.cpp), in plain torch: each sequence's
    kv length is the difference of `cu_seqlens_k`, its keys come through `block_table`, and the
    causal mask is aligned bottom-right."""
    num_blocks, page, kv_heads, dim = k.shape
    assert page % 256 == 0 and v.shape == k.shape and block_table is not None
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == block_table.dtype == torch.int32
    assert q.shape[0] == int(cu_seqlens_q[-1]) and q.shape[2] == dim and q.shape[1] % kv_heads == 0
    assert dropout_p == 0.0 and causal and window_size == (-1, -1)
    group = q.shape[1] // kv_heads
    out = torch.empty_like(q)
    for b in range(block_table.shape[0]):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        kv_len = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
        assert q1 - q0 <= max_seqlen_q and kv_len <= max_seqlen_k
        blocks = block_table[b, : -(-kv_len // page)].long()
        keys = k[blocks].reshape(-1, kv_heads, dim)[:kv_len].repeat_interleave(group, 1)
        values = v[blocks].reshape(-1, kv_heads, dim)[:kv_len].repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], keys) * softmax_scale
        visible = torch.ones(q1 - q0, kv_len, dtype=torch.bool).tril(kv_len - (q1 - q0))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), values)
    return out


def _random_step(shape, block_size, kv_heads, dim, num_blocks, dtype=torch.float32, device=CPU):
    """A step of sequences (q_len, kv_len) on scattered blocks, their cached prefix already written.
    Returns the seqs, q/k/v of the new tokens and a cache."""
    rng = random.Random(0)
    cache = KVCache(KVCacheSpec(1, kv_heads, dim, block_size, dtype), num_blocks, device)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    seqs, new_k, new_v = [], [], []
    k_flat, v_flat = (c.view(-1, kv_heads, dim) for c in cache.layer(0))
    for q_len, kv_len in shape:
        blocks = [free.pop() for _ in range(-(-kv_len // block_size))]
        seqs.append(SeqStep(q_len, kv_len, blocks))
        full_k = torch.randn(kv_len, kv_heads, dim, device=device).to(dtype)
        full_v = torch.randn(kv_len, kv_heads, dim, device=device).to(dtype)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(kv_len - q_len)],
                             dtype=torch.long, device=device)
        k_flat.index_copy_(0, slots, full_k[: kv_len - q_len])
        v_flat.index_copy_(0, slots, full_v[: kv_len - q_len])
        new_k.append(full_k[kv_len - q_len:])
        new_v.append(full_v[kv_len - q_len:])
    return seqs, torch.cat(new_k), torch.cat(new_v), cache


# A fresh prompt, decode rows (one at a block boundary), a chunk after a cached prefix, mixed in one step.
MIXED = [(300, 300), (1, 257), (100, 600), (1, 1), (1, 513)]


def test_flash_backend_call_matches_flash_attn_contract_and_equals_sdpa():
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 16, 256
    seqs, k, v, cache = _random_step(MIXED, block, kv_heads, dim, num_blocks=16)
    q = torch.randn(sum(s.q_len for s in seqs), heads, dim)
    sdpa_cache = tuple(c.clone() for c in cache.layer(0))
    flash = FlashAttnBackend(dim**-0.5, varlen_stand_in)
    out = flash.with_scale(dim**-0.5).forward(q, k, v, cache.layer(0), build_metadata(seqs, block, CPU, "flash"))
    expected = SdpaBackend(dim**-0.5).forward(q, k, v, sdpa_cache, build_metadata(seqs, block, CPU))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.layer(0)[0], sdpa_cache[0])  # both wrote the new K/V to the same slots


# -- SDPA decode on CUDA: the grouped form ------------------------------------------------------


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 1), (4, 4)])
def test_grouped_decode_equals_sdpa_with_gqa(heads, kv_heads):
    """The CUDA decode path (query heads folded onto their kv head, additive mask) computes what
    the CPU path (enable_gqa, boolean mask) does."""
    torch.manual_seed(heads + kv_heads)
    seqs = [SeqStep(1, n, [1 + 3 * i, 2 + 3 * i, 3 + 3 * i]) for i, n in enumerate([5, 1, 12])]
    meta = build_metadata(seqs, 4, CPU)
    batch, max_kv = meta.decode_kv_slots.shape
    q = torch.randn(batch, heads, 8)
    keys, values = torch.randn(2, batch, kv_heads, max_kv, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=meta.decode_kv_mask, scale=0.3, enable_gqa=True).squeeze(2)
    torch.testing.assert_close(grouped_decode(q, keys, values, meta.decode_kv_mask, 0.3), expected,
                               atol=1e-6, rtol=1e-6)
