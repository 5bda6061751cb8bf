"""Paged attention over ragged batches, behind one interface.

A step's tokens are flattened ([T, heads, head_dim], no padding). `AttentionMetadata` says where
each new token's K/V goes (`slot_mapping`) and which cached slots every sequence reads. Two
backends:

* `SdpaBackend`: torch's scaled_dot_product_attention on gathered K/V. Runs on any device and is
  the correctness oracle in tests. Decode rows (one query token) are batched into one SDPA call
  over a padded gather; prefill rows run one call each (padding a 512-token prompt next to 31
  decode rows would waste 31x the attention FLOPs). Its sums follow its kernels' block sizes, so a
  token's bits can depend on how the step was cut (chunking, a cached prefix).
* `PagedCpuBackend`: every token of the step, prompt chunks included, through the compiled kernel
  of shard/cpu_kernels.py, which reads K/V in place through block tables (no gather, no padding)
  with one arithmetic per query row: batch- and cache-invariant by construction.
* `FlashAttnBackend` (CUDA, lazy import): flash-attn's varlen kernel reading the paged cache
  through block tables directly.

Each backend names the metadata `layout` it reads, and `build_metadata` builds only that.
`plan_attention` picks the backend and the KV block size together, from the device, the final
dtype and the model's head dim, and refuses a combination its kernel would reject at warmup.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from shard.cpu_kernels import PagedAttention

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrefillSeq:
    """A sequence computing more than one token this step."""

    token_start: int  # first of its tokens in the flattened step
    token_end: int
    kv_slots: torch.Tensor  # [kv_len] slots of every position 0..kv_len-1 (new tokens included)


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    # Decode rows (exactly one new token). `decode_tokens` indexes them in the flattened step;
    # None means every token is a decode row, in order (the common pure-decode step).
    decode_tokens: torch.Tensor | None
    decode_kv_slots: torch.Tensor | None  # [B_dec, max_kv] int64, padded with slot 0
    decode_kv_mask: torch.Tensor | None  # [B_dec, 1, 1, max_kv] bool, True = attend
    prefills: tuple[PrefillSeq, ...]
    # Varlen inputs of the "flash" and "paged" layouts (flash-attn, the CPU kernel): every token is
    # a row; sequence s owns rows cu_seqlens_q[s]..cu_seqlens_q[s+1]-1 and holds seqlens_k[s]
    # positions in the blocks of block_tables[s] once they are written.
    cu_seqlens_q: torch.Tensor | None = None
    seqlens_k: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    @property
    def has_decode_rows(self) -> bool:
        return self.decode_kv_slots is not None


class SdpaBackend:
    name = "sdpa"
    layout = "padded"

    def __init__(self, scale: float | None = None):
        self.scale = scale

    def with_scale(self, scale: float) -> "SdpaBackend":
        return SdpaBackend(scale)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] (new tokens) → [T, H, D]."""
        k_cache, v_cache = (c.view(-1, c.shape[-2], c.shape[-1]) for c in cache)
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for seq in meta.prefills:
            out[seq.token_start : seq.token_end] = self._prefill(
                q[seq.token_start : seq.token_end], k_cache, v_cache, seq.kv_slots
            )
        if meta.has_decode_rows:
            rows = q if meta.decode_tokens is None else q.index_select(0, meta.decode_tokens)
            result = self._decode(rows, cache, meta)
            if meta.decode_tokens is None:
                out = result
            else:
                out.index_copy_(0, meta.decode_tokens, result)
        return out

    def _prefill(self, q, k_cache, v_cache, kv_slots) -> torch.Tensor:
        q_len, kv_len = q.shape[0], kv_slots.shape[0]
        keys = k_cache.index_select(0, kv_slots).transpose(0, 1)  # [KVH, L, D]
        values = v_cache.index_select(0, kv_slots).transpose(0, 1)
        if q_len == kv_len:
            mask, causal = None, True
        else:
            # Queries are the last q_len positions: query i sees keys j <= i + (kv_len - q_len).
            # SDPA's is_causal aligns top-left, which is wrong once a prefix is cached.
            offset = kv_len - q_len
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(offset)
            causal = False
        gqa = True
        if mask is not None and q.is_cuda and keys.shape[0] != q.shape[1]:
            # CUDA SDPA takes GQA only in its flash and math kernels, and flash takes no mask:
            # with repeated K/V heads the masked chunk reaches the memory-efficient kernel.
            group = q.shape[1] // keys.shape[0]
            keys, values, gqa = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0), False
        # 4-D inputs: torch's CPU flash kernel only takes batched inputs (3-D ones fall back to
        # the math path, ~10x slower for a 512-token prompt).
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, is_causal=causal,
            scale=self.scale, enable_gqa=gqa,
        )
        return out[0].transpose(0, 1)

    def _decode(self, q, cache, meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = (c.view(-1, c.shape[-2], c.shape[-1]) for c in cache)
        batch, max_kv = meta.decode_kv_slots.shape
        flat = meta.decode_kv_slots.reshape(-1)
        keys = k_cache.index_select(0, flat).view(batch, max_kv, *k_cache.shape[1:]).transpose(1, 2)
        values = v_cache.index_select(0, flat).view(batch, max_kv, *v_cache.shape[1:]).transpose(1, 2)
        if q.is_cuda:
            return grouped_decode(q, keys, values, meta.decode_kv_mask, self.scale)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=meta.decode_kv_mask, scale=self.scale, enable_gqa=True
        )
        return out.squeeze(2)


def grouped_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   scale: float | None) -> torch.Tensor:
    """Decode attention without `enable_gqa`, for CUDA: with a mask, torch runs GQA only in its
    slow math kernel. Each kv head's query heads become its query rows instead (one query token
    each, so no causality among them; flash-attn does the same for decode), and the padding
    mask becomes an additive bias, which the memory-efficient and cuDNN kernels take.

    q: [B, H, D]; keys, values: [B, KVH, L, D]; mask: [B, 1, 1, L] bool, True = attend → [B, H, D].
    """
    batch, heads, dim = q.shape
    rows = q.reshape(batch, keys.shape[1], heads // keys.shape[1], dim)  # head h reads kv head h // group
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=bias, scale=scale)
    return out.reshape(batch, heads, dim)


class PagedCpuBackend(SdpaBackend):
    """Every token of the step through the compiled paged kernel (csrc/paged_attention.cpp), prompt
    chunks included, so a token's attention has one arithmetic whatever the step holds; only
    explicit-slot probes (no block tables) take SDPA."""

    name = "cpu-paged"
    layout = "paged"

    def __init__(self, scale: float | None, kernel: PagedAttention):
        super().__init__(scale)
        self.kernel = kernel

    def with_scale(self, scale: float) -> "PagedCpuBackend":
        return PagedCpuBackend(scale, self.kernel)

    def forward(self, q, k, v, cache, meta: AttentionMetadata) -> torch.Tensor:
        if meta.block_tables is None:
            return super().forward(q, k, v, cache, meta)
        k_cache, v_cache = cache
        k_cache.view(-1, *k_cache.shape[-2:]).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[-2:]).index_copy_(0, meta.slot_mapping, v)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        return self.kernel(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seqlens_k, scale)


class FlashAttnBackend:
    """flash-attn 2 varlen attention reading K/V straight from the paged cache (CUDA only).

    `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...,
    softmax_scale, causal, ..., block_table)` with a block table (flash-attn >= 2.5.7): k, v are the
    cache, [num_blocks, block_size, KVH, D] with block_size a multiple of 256; `cu_seqlens_k` is
    still cumulative, but only its differences (each sequence's kv length) are read: positions
    come from `block_table` [B, max_blocks] int32. The causal mask is aligned bottom-right, so the
    queries of a chunk after a cached prefix see that prefix.
    """

    name = "flash-attn"
    layout = "flash"

    def __init__(self, scale: float | None, varlen: Callable):
        self._varlen = varlen
        self.scale = scale

    def with_scale(self, scale: float) -> "FlashAttnBackend":
        return FlashAttnBackend(scale, self._varlen)

    def forward(self, q, k, v, cache, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] (new tokens) → [T, H, D]."""
        k_cache, v_cache = cache
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v)
        cu_seqlens_k = F.pad(meta.seqlens_k.cumsum(0, dtype=torch.int32), (1, 0))
        return self._varlen(
            q, k_cache, v_cache,
            cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k,
            softmax_scale=self.scale, causal=True, block_table=meta.block_tables,
        )


Backend = SdpaBackend | PagedCpuBackend | FlashAttnBackend

# flash-attn 2's limits (csrc/flash_attn/flash_api.cpp, mha_varlen_fwd): fp16/bf16, head dim
# <= 256 and a multiple of 8 (the Python wrapper pads other sizes, which would copy the whole
# paged cache every call), paged blocks a multiple of 256, Ampere (sm80) or newer.
FLASH_BLOCK_SIZE = 256
FLASH_MAX_HEAD_DIM = 256
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MIN_CAPABILITY = (8, 0)
CPU_BLOCK_SIZE = 16  # fine-grained prefix reuse; the CPU kernel takes any block size
# What csrc/paged_attention.cpp dispatches (AT_DISPATCH_FLOATING_TYPES_AND2); any head dim.
CPU_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True)
class AttentionPlan:
    """Which backend runs, with which KV block size, and why (the shard logs it in one line)."""

    name: str  # a backend's `name`: "flash-attn", "cpu-paged" or "sdpa"
    block_size: int
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.block_size}-token blocks): {self.reason}"


def import_flash_attn() -> Callable:
    """flash-attn 2's varlen function, provided it reads a paged cache (`block_table`)."""
    import flash_attn  # lazy: never imported on CPU
    from flash_attn import flash_attn_varlen_func

    if "block_table" not in inspect.signature(flash_attn_varlen_func).parameters:
        raise ImportError(f"flash-attn {getattr(flash_attn, '__version__', '?')} reads no paged KV cache "
                          "(block_table arrived in 2.5.7)")
    return flash_attn_varlen_func


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_attention(
    attention: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int | None,
    cpu_kernel_available: bool,
    flash_import: Callable[[], Callable] = import_flash_attn,
    capability: tuple[int, int] | None = None,
) -> AttentionPlan:
    """The attention backend and KV block size for this model on this device.

    attention "sdpa" (ATTENTION=sdpa): torch SDPA everywhere. "paged" (the default): on CUDA,
    flash-attn 2 or a refusal (as TGI refuses: SDPA over gathered K/V is a silent slowdown
    there, so it is an explicit opt-in); on CPU, the compiled kernel when it built and takes the
    dtype, else SDPA with the reason. `block_size` is the user's request (None: the backend's
    default). A combination the chosen kernel would reject raises ValueError, one line.
    `capability` is the GPU's compute capability (None: ask torch).
    """
    where = f"{device.type.upper()}, {_dtype_name(dtype)}, head dim {head_dim}"
    if attention == "sdpa":
        return AttentionPlan("sdpa", block_size or CPU_BLOCK_SIZE, "ATTENTION=sdpa")
    if device.type == "cuda":
        return _plan_flash(device, dtype, head_dim, block_size, flash_import, capability, where)
    if device.type != "cpu":
        return AttentionPlan("sdpa", block_size or CPU_BLOCK_SIZE, f"no paged kernel for {device.type}")
    if not cpu_kernel_available:
        return AttentionPlan("sdpa", block_size or CPU_BLOCK_SIZE, f"{where}; the CPU paged kernel did not build")
    if dtype not in CPU_KERNEL_DTYPES:
        return AttentionPlan("sdpa", block_size or CPU_BLOCK_SIZE,
                             f"{where}; the CPU paged kernel takes no {_dtype_name(dtype)}")
    return AttentionPlan("cpu-paged", block_size or CPU_BLOCK_SIZE, where)


def _plan_flash(device, dtype, head_dim, block_size, flash_import, capability, where) -> AttentionPlan:
    instead = "or set ATTENTION=sdpa (torch SDPA, slower)"
    if dtype not in FLASH_DTYPES:
        raise ValueError(f"flash-attn takes float16 or bfloat16, not {_dtype_name(dtype)}: pass --dtype bfloat16 "
                         f"(or float16) {instead}")
    if head_dim > FLASH_MAX_HEAD_DIM or head_dim % 8:
        raise ValueError(f"flash-attn takes head dims up to {FLASH_MAX_HEAD_DIM} in multiples of 8, and this model's "
                         f"is {head_dim}: set ATTENTION=sdpa")
    if block_size is not None and block_size % FLASH_BLOCK_SIZE:
        raise ValueError(f"flash-attn reads paged KV blocks of a multiple of {FLASH_BLOCK_SIZE} tokens, not "
                         f"--block-size {block_size}: omit it (default {FLASH_BLOCK_SIZE}) {instead}")
    capability = capability or torch.cuda.get_device_capability(device)
    if tuple(capability) < FLASH_MIN_CAPABILITY:
        raise ValueError(f"flash-attn 2 needs an Ampere or newer GPU (compute capability >= 8.0; this one is "
                         f"{capability[0]}.{capability[1]}): set ATTENTION=sdpa")
    try:
        flash_import()
    except Exception as error:  # ImportError, or OSError/RuntimeError from a .so built for another torch/CUDA
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"ATTENTION=paged on CUDA needs flash-attn 2, which does not import ({detail}): install "
                         f"flash-attn built for this torch and CUDA {instead}") from None
    return AttentionPlan("flash-attn", block_size or FLASH_BLOCK_SIZE, where)


def select_backend(plan: AttentionPlan, scale: float | None, cpu_kernel: PagedAttention | None = None) -> Backend:
    """The backend `plan` names (logged once per rank: which one runs and why)."""
    log.info("attention: %s", plan)
    if plan.name == "flash-attn":
        return FlashAttnBackend(scale, import_flash_attn())
    if plan.name == "cpu-paged":
        assert cpu_kernel is not None, "plan_attention chose the CPU kernel, so it was built"
        return PagedCpuBackend(scale, cpu_kernel)
    return SdpaBackend(scale)


@dataclass(frozen=True, slots=True)
class SeqStep:
    """One sequence's part of a step: `q_len` new tokens ending at position `kv_len - 1`."""

    q_len: int
    kv_len: int
    blocks: list[int]
    slots: list[int] | None = None  # explicit slots per position (health probe only)


def _slots_for(seq: SeqStep, start: int, stop: int, block_size: int) -> list[int]:
    if seq.slots is not None:
        return seq.slots[start:stop]
    return [seq.blocks[p // block_size] * block_size + p % block_size for p in range(start, stop)]


def build_metadata(
    seqs: list[SeqStep], block_size: int, device: torch.device, layout: str = "padded"
) -> AttentionMetadata:
    """The step's attention inputs in the backend's `layout`: "padded" (SDPA), "paged" (block
    tables for every row: the CPU kernel) or "flash" (the same varlen inputs, for flash-attn)."""
    # Both the flash and the paged layout (the CPU kernel) take every token as a row of a varlen
    # batch reading the block tables; explicit-slot probes take the padded path.
    varlen = layout == "flash" or (layout == "paged" and all(s.slots is None for s in seqs))
    slot_mapping: list[int] = []
    prefills: list[PrefillSeq] = []
    decode_rows: list[int] = []
    token = 0
    for index, seq in enumerate(seqs):
        slot_mapping += _slots_for(seq, seq.kv_len - seq.q_len, seq.kv_len, block_size)
        if seq.q_len == 1:
            decode_rows.append(index)
        elif not varlen:
            kv_slots = torch.tensor(_slots_for(seq, 0, seq.kv_len, block_size), dtype=torch.long)
            prefills.append(PrefillSeq(token, token + seq.q_len, kv_slots.to(device)))
        token += seq.q_len
    meta = dict(slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device), prefills=tuple(prefills))
    if varlen:
        return AttentionMetadata(
            decode_tokens=None, decode_kv_slots=None, decode_kv_mask=None, **meta, **_flash_inputs(seqs, device)
        )
    if not decode_rows:
        return AttentionMetadata(decode_tokens=None, decode_kv_slots=None, decode_kv_mask=None, **meta)
    decode = [seqs[i] for i in decode_rows]
    if len(decode_rows) == len(seqs):
        decode_tokens = None
    else:
        starts = [0]
        for seq in seqs:
            starts.append(starts[-1] + seq.q_len)
        decode_tokens = torch.tensor([starts[i] for i in decode_rows], dtype=torch.long, device=device)
    max_kv = max(s.kv_len for s in decode)
    if all(s.slots is None for s in decode):
        max_blocks = -(-max_kv // block_size)
        tables = torch.tensor([s.blocks[:max_blocks] + [0] * (max_blocks - len(s.blocks[:max_blocks])) for s in decode])
        offsets = torch.arange(block_size)
        kv_slots = (tables[:, :, None] * block_size + offsets).view(len(decode), -1)[:, :max_kv]
    else:
        kv_slots = torch.tensor([_slots_for(s, 0, s.kv_len, block_size) + [0] * (max_kv - s.kv_len) for s in decode])
    kv_lens = torch.tensor([s.kv_len for s in decode])
    mask = (torch.arange(max_kv)[None, :] < kv_lens[:, None]).view(len(decode), 1, 1, max_kv)
    return AttentionMetadata(
        decode_tokens=decode_tokens, decode_kv_slots=kv_slots.to(device), decode_kv_mask=mask.to(device), **meta
    )


def _flash_inputs(seqs: list[SeqStep], device: torch.device) -> dict:
    q_lens = torch.tensor([s.q_len for s in seqs], dtype=torch.int32)
    max_blocks = max(len(s.blocks) for s in seqs)
    tables = [s.blocks + [0] * (max_blocks - len(s.blocks)) for s in seqs]
    return dict(
        cu_seqlens_q=F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0)).to(device),
        seqlens_k=torch.tensor([s.kv_len for s in seqs], dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_seqlen_q=int(q_lens.max()),
        max_seqlen_k=max(s.kv_len for s in seqs),
    )
