"""Paged attention over ragged batches, behind one interface.

A step's tokens are flattened ([T, heads, head_dim], no padding). `AttentionMetadata` says where
each new token's K/V goes (`slot_mapping`) and which cached slots every sequence reads. Two
backends:

* `SdpaBackend`: torch's scaled_dot_product_attention on gathered K/V. Runs on any device and is
  the correctness oracle in tests. Decode rows (one query token) are batched into one SDPA call
  over a padded gather; prefill rows run one call each (padding a 512-token prompt next to 31
  decode rows would waste 31x the attention FLOPs).
* `PagedCpuBackend`: SDPA for prefill rows, and for decode rows the compiled kernel of
  shard/cpu_kernels.py, which reads K/V in place through block tables (no gather, no padding).
* `FlashAttnBackend` (CUDA, lazy import): flash-attn's varlen kernel reading the paged cache
  through block tables directly.

Each backend names the metadata `layout` it reads, and `build_metadata` builds only that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from shard.cpu_kernels import PagedDecode


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
    # "paged" layout: decode rows read the cache through these instead of the padded slots above.
    decode_block_tables: torch.Tensor | None = None  # [B_dec, max_blocks] int32, padded with block 0
    decode_kv_lens: torch.Tensor | None = None  # [B_dec] int32
    # Flash-attn inputs (built only for that backend).
    cu_seqlens_q: torch.Tensor | None = None
    seqlens_k: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    @property
    def has_decode_rows(self) -> bool:
        return self.decode_kv_slots is not None or self.decode_block_tables is not None


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
        # 4-D inputs: torch's CPU flash kernel only takes batched inputs (3-D ones fall back to
        # the math path, ~10x slower for a 512-token prompt).
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, is_causal=causal,
            scale=self.scale, enable_gqa=True,
        )
        return out[0].transpose(0, 1)

    def _decode(self, q, cache, meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = (c.view(-1, c.shape[-2], c.shape[-1]) for c in cache)
        batch, max_kv = meta.decode_kv_slots.shape
        flat = meta.decode_kv_slots.reshape(-1)
        keys = k_cache.index_select(0, flat).view(batch, max_kv, *k_cache.shape[1:]).transpose(1, 2)
        values = v_cache.index_select(0, flat).view(batch, max_kv, *v_cache.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=meta.decode_kv_mask, scale=self.scale, enable_gqa=True
        )
        return out.squeeze(2)


class PagedCpuBackend(SdpaBackend):
    """Decode rows through the compiled paged kernel; prefill rows (compute-bound, where the
    gather is a small part) and explicit-slot probes stay on SDPA."""

    name = "cpu-paged"
    layout = "paged"

    def __init__(self, scale: float | None, kernel: PagedDecode):
        super().__init__(scale)
        self.kernel = kernel

    def with_scale(self, scale: float) -> "PagedCpuBackend":
        return PagedCpuBackend(scale, self.kernel)

    def _decode(self, q, cache, meta: AttentionMetadata) -> torch.Tensor:
        if meta.decode_block_tables is None:
            return super()._decode(q, cache, meta)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        return self.kernel(q, cache[0], cache[1], meta.decode_block_tables, meta.decode_kv_lens, scale)


class FlashAttnBackend:
    """flash-attn 2 varlen attention reading K/V straight from the paged cache (CUDA only).

    flash-attn's paged mode needs block sizes that are multiples of 256, so the engine uses
    256-token blocks with this backend (TGI's "flashdecoding" does the same).
    """

    name = "flash-attn"
    layout = "flash"
    block_size = 256

    def __init__(self, scale: float | None = None):
        from flash_attn import flash_attn_varlen_func  # lazy: never imported on CPU

        self._varlen = flash_attn_varlen_func
        self.scale = scale

    def with_scale(self, scale: float) -> "FlashAttnBackend":
        return FlashAttnBackend(scale)

    def forward(self, q, k, v, cache, meta: AttentionMetadata) -> torch.Tensor:
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


def select_backend(device: torch.device, scale: float | None, attention: str = "paged",
                   cpu_kernel: PagedDecode | None = None) -> Backend:
    """attention "paged": flash-attn on CUDA when installed, the compiled kernel on CPU when it
    built; "sdpa" (or neither available): torch SDPA."""
    if attention == "paged" and device.type == "cuda":
        try:
            return FlashAttnBackend(scale)
        except ImportError:
            pass
    if attention == "paged" and device.type == "cpu" and cpu_kernel is not None:
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
    tables for decode rows) or "flash" (varlen + block tables for every row)."""
    flash = layout == "flash"
    slot_mapping: list[int] = []
    prefills: list[PrefillSeq] = []
    decode_rows: list[int] = []
    token = 0
    for index, seq in enumerate(seqs):
        slot_mapping += _slots_for(seq, seq.kv_len - seq.q_len, seq.kv_len, block_size)
        if seq.q_len == 1:
            decode_rows.append(index)
        elif not flash:
            kv_slots = torch.tensor(_slots_for(seq, 0, seq.kv_len, block_size), dtype=torch.long)
            prefills.append(PrefillSeq(token, token + seq.q_len, kv_slots.to(device)))
        token += seq.q_len
    meta = dict(slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device), prefills=tuple(prefills))
    if flash:
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
    if layout == "paged" and all(s.slots is None for s in decode):
        return AttentionMetadata(
            decode_tokens=decode_tokens, decode_kv_slots=None, decode_kv_mask=None, **meta,
            **_paged_decode_inputs(decode, block_size, device),
        )
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


def _paged_decode_inputs(decode: list[SeqStep], block_size: int, device: torch.device) -> dict:
    used = [-(-s.kv_len // block_size) for s in decode]
    width = max(used)
    tables = [s.blocks[:n] + [0] * (width - n) for s, n in zip(decode, used)]
    return dict(
        decode_block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        decode_kv_lens=torch.tensor([s.kv_len for s in decode], dtype=torch.int32, device=device),
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
