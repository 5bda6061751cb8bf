"""On CUDA: the flash-attn backend equals SDPA on a paged step (fresh prompts, a chunk after a cached
prefix, decode rows, mixed; and pure decode, flash-attn's grouped-query path) in float16 and
bfloat16; the plan picks flash-attn with the real import; SDPA's CUDA paths reach a fused kernel
(never the math one). Skipped without CUDA, and the flash tests without a working flash-attn."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from shard.attention import (
    FlashAttnBackend, SdpaBackend, build_metadata, import_flash_attn, plan_attention, select_backend,
)
from tests.shard.test_attention_plan import MIXED, _random_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HEADS, KV_HEADS = 8, 2
PURE_DECODE = [(1, 257), (1, 1), (1, 600), (1, 256), (1, 31)]
# float32 SDPA is the reference; these bound the kernel's rounding, far below a wrong mask or table.
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def varlen():
    try:
        return import_flash_attn()
    except Exception as error:  # what plan_attention would refuse to start with
        pytest.skip(f"flash-attn does not import: {error}")


def test_the_plan_picks_flash_attn_with_the_real_import(varlen):
    device = torch.device("cuda", 0)
    plan = plan_attention("paged", device, torch.bfloat16, 128, None, False)
    assert (plan.name, plan.block_size) == ("flash-attn", 256)
    assert isinstance(select_backend(plan, 128**-0.5), FlashAttnBackend)


@pytest.mark.parametrize("shape", [MIXED, PURE_DECODE], ids=["mixed", "pure-decode"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attn_equals_sdpa_on_a_paged_step(varlen, shape, dim, dtype):
    torch.manual_seed(dim)
    device = torch.device("cuda", 0)
    seqs, k, v, cache = _random_step(shape, 256, KV_HEADS, dim, num_blocks=16, dtype=dtype, device=device)
    q = torch.randn(sum(s.q_len for s in seqs), HEADS, dim, device=device).to(dtype)
    reference_cache = tuple(c.float() for c in cache.layer(0))
    out = FlashAttnBackend(dim**-0.5, varlen).forward(q, k, v, cache.layer(0),
                                                      build_metadata(seqs, 256, device, "flash"))
    expected = SdpaBackend(dim**-0.5).forward(q.float(), k.float(), v.float(), reference_cache,
                                              build_metadata(seqs, 256, device))
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    torch.testing.assert_close(cache.layer(0)[0].float(), reference_cache[0])  # same slots written


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_on_cuda_runs_without_the_math_kernel(dtype):
    """ATTENTION=sdpa on a GPU: decode rows (GQA + padding mask) and a chunk after a cached prefix
    (GQA + offset causal mask) must reach a fused kernel; with MATH disabled torch raises otherwise."""
    torch.manual_seed(1)
    device = torch.device("cuda", 0)
    seqs, k, v, cache = _random_step(MIXED, 16, KV_HEADS, 64, num_blocks=128, dtype=dtype, device=device)
    q = torch.randn(sum(s.q_len for s in seqs), HEADS, 64, device=device).to(dtype)
    reference_cache = tuple(c.float() for c in cache.layer(0))
    meta = build_metadata(seqs, 16, device)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = SdpaBackend(0.125).forward(q, k, v, cache.layer(0), meta)
    with sdpa_kernel([SDPBackend.MATH]):
        expected = SdpaBackend(0.125).forward(q.float(), k.float(), v.float(), reference_cache, meta)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
