"""What every model implementation gives the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from shard.attention import AttentionMetadata, Backend
from shard.cpu_kernels import FusedOps, PagedAttention
from shard.distributed import TPGroup
from shard.kv_cache import KVCache, KVCacheSpec
from shard.layers.lora import LoraStep
from shard.lora import LoraAdapter


@dataclass(frozen=True, slots=True)
class ModelContext:
    tp: TPGroup
    device: torch.device
    dtype: torch.dtype
    block_size: int | None  # requested KV block size; None: the attention plan's default (attention.py)
    trust_remote_code: bool = False
    quantize: str | None = None  # "int8" | "int4" | "gguf": CPU weight quantization at load (layers/quant.py)
    attention: str = "paged"  # ShardConfig.attention
    cpu_kernel: PagedAttention | None = None  # the compiled paged-attention kernel, when it built (cpu_kernels.py)
    fused_ops: FusedOps | None = None  # the compiled per-layer CPU kernels, when they built (cpu_kernels.py)
    lora_adapters: tuple[LoraAdapter, ...] = ()  # --lora-adapters, read and checked (shard/lora.py)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    impl: str  # "llama" (fast path) or "transformers" (fallback)
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    kv_spec: KVCacheSpec
    window_size: int | None = None
    adapter_ids: tuple[str, ...] = ()  # the LoRA adapters loaded; a request's adapter is its index here


class CausalLM(Protocol):
    info: ModelInfo
    backend: Backend

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] flattened new tokens of every sequence
        positions: torch.Tensor,  # [T]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        logits_index: torch.Tensor | None,  # [N] tokens whose logits are needed (None: all)
        lora: LoraStep | None = None,  # the step's rows that use an adapter (None: none does)
    ) -> torch.Tensor:  # [N, vocab] float32
        ...
