"""The Llama family fast path: Llama 2/3, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norms),
SmolLM, TinyLlama. Composition of the shared tensor-parallel layers; per-family differences are
read from the config and the checkpoint (bias present, norms present), never a copied file.
LoRA adapters (ModelContext.lora_adapters) ride on qkv_proj, o_proj, gate_up_proj and down_proj,
split over ranks as those layers' weights are (shard/layers/lora.py); a step's `LoraStep` is an
argument of `forward`, handed down to them."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from shard.attention import AttentionMetadata, plan_attention, select_backend
from shard.cpu_kernels import FusedOps
from shard.gguf_weights import open_for_folder
from shard.kv_cache import KVCache, KVCacheSpec
from shard.layers.activation import gated
from shard.layers.embedding import LMHead, VocabParallelEmbedding
from shard.distributed import shard_range
from shard.layers.linear import ColumnParallelLinear, RowParallelLinear
from shard.layers.lora import LoraStep, column_lora, row_lora
from shard.layers.norm import RMSNorm
from shard.layers.quant import GGUF, cat_weights
from shard.layers.rotary import RotaryEmbedding, apply_rotary
from shard.models.base import ModelContext, ModelInfo
from shard.lora import check_fit
from shard.weights import Weights, head_rows


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Shared:
    """Per-model objects every layer uses: the attention backend and the compiled CPU kernels
    (None: torch ops), one object each, so a benchmark or test can swap them for every layer at
    once. The rotary tables are looked up once per step in `LlamaModel.forward` and handed down."""

    def __init__(self, backend, kernels: FusedOps | None = None):
        self.backend = backend
        self.kernels = kernels


def _optional(weights: Weights, name: str, get) -> torch.Tensor | None:
    return get(name) if weights.has(name) else None


def projection_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection's full weight: what a LoRA must fit."""
    hidden, inner = config.hidden_size, config.num_attention_heads * head_dim(config)
    kv, mlp = config.num_key_value_heads * head_dim(config), config.intermediate_size
    return {"q_proj": (inner, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, inner),
            "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp)}


class Attention(nn.Module):
    def __init__(self, prefix: str, layer: int, config: PretrainedConfig, weights: Weights, ctx: ModelContext,
                 shared: "Shared"):
        super().__init__()
        tp = ctx.tp
        world = tp.world_size
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim(config)
        if heads % world:
            raise ValueError(f"{heads} attention heads cannot be split over {world} shards")
        self.num_heads = heads // world
        self.num_kv_heads = max(1, kv_heads // world)
        qkv = [weights.get_heads(f"{prefix}.{p}_proj.weight", n, self.head_dim, quantized=True)
               for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))]
        biases = [_optional(weights, f"{prefix}.{p}_proj.bias", lambda name, n=n: weights.get_heads(name, n, self.head_dim))
                  for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))]
        # LoRA's B takes the same output rows of q, k and v as the base weights above.
        lora_rows = [(f"{p}_proj", head_rows(f"{prefix}.{p}_proj.weight", n, self.head_dim, tp.rank, world))
                     for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))]
        self.qkv_proj = ColumnParallelLinear(
            cat_weights(qkv), torch.cat(biases) if biases[0] is not None else None, ctx.quantize,
            column_lora(ctx.lora_adapters, layer, lora_rows, ctx.dtype, ctx.device))
        self.o_proj = RowParallelLinear(
            weights.get_sharded(f"{prefix}.o_proj.weight", dim=1, quantized=True), _optional(weights, f"{prefix}.o_proj.bias", weights.get), ctx.tp,
            ctx.quantize,
            row_lora(ctx.lora_adapters, layer, "o_proj", shard_range(heads * self.head_dim, tp.rank, world),
                     config.hidden_size, ctx.dtype, ctx.device),
        )
        # Qwen3: RMSNorm over each head's q and k before the rotary embedding.
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(weights.get(f"{prefix}.q_norm.weight"), eps) if weights.has(f"{prefix}.q_norm.weight") else None
        self.k_norm = RMSNorm(weights.get(f"{prefix}.k_norm.weight"), eps) if self.q_norm is not None else None
        self.split = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim)
        self.shared = shared

    def forward(self, hidden, rope, cache, meta: AttentionMetadata, backend=None, lora: LoraStep | None = None):
        tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden, lora).split(self.split, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        kernels = self.shared.kernels
        if self.q_norm is not None:
            q, k = self.q_norm(q, None, kernels)[0], self.k_norm(k, None, kernels)[0]
        q, k = apply_rotary(q, k, *rope, kernels)
        out = (backend or self.shared.backend).forward(q, k, v.contiguous(), cache, meta)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim), lora)


class MLP(nn.Module):
    def __init__(self, prefix: str, layer: int, config: PretrainedConfig, weights: Weights, ctx: ModelContext):
        super().__init__()
        tp, size = ctx.tp, config.intermediate_size
        gate = weights.get_sharded(f"{prefix}.gate_proj.weight", dim=0, quantized=True)
        up = weights.get_sharded(f"{prefix}.up_proj.weight", dim=0, quantized=True)
        part = shard_range(size, tp.rank, tp.world_size)  # the rows of gate and up, the columns of down, here
        self.gate_up_proj = ColumnParallelLinear(
            cat_weights([gate, up]), None, ctx.quantize,
            column_lora(ctx.lora_adapters, layer, [("gate_proj", part), ("up_proj", part)], ctx.dtype, ctx.device))
        self.down_proj = RowParallelLinear(
            weights.get_sharded(f"{prefix}.down_proj.weight", dim=1, quantized=True), None, ctx.tp, ctx.quantize,
            row_lora(ctx.lora_adapters, layer, "down_proj", part, config.hidden_size, ctx.dtype, ctx.device))
        self.act = gated(config.hidden_act)

    def forward(self, hidden: torch.Tensor, kernels: FusedOps | None = None, lora: LoraStep | None = None):
        return self.down_proj(self.act(self.gate_up_proj(hidden, lora), kernels), lora)


class DecoderLayer(nn.Module):
    def __init__(self, layer: int, config, weights: Weights, ctx: ModelContext, shared: "Shared"):
        super().__init__()
        eps = config.rms_norm_eps
        prefix = f"model.layers.{layer}"
        self.input_layernorm = RMSNorm(weights.get(f"{prefix}.input_layernorm.weight"), eps)
        self.self_attn = Attention(f"{prefix}.self_attn", layer, config, weights, ctx, shared)
        self.post_attention_layernorm = RMSNorm(weights.get(f"{prefix}.post_attention_layernorm.weight"), eps)
        self.mlp = MLP(f"{prefix}.mlp", layer, config, weights, ctx)
        self.shared = shared

    def forward(self, hidden, residual, rope, cache, meta, backend=None, lora: LoraStep | None = None):
        kernels = self.shared.kernels
        hidden, residual = self.input_layernorm(hidden, residual, kernels)
        hidden = self.self_attn(hidden, rope, cache, meta, backend, lora)
        hidden, residual = self.post_attention_layernorm(hidden, residual, kernels)
        return self.mlp(hidden, kernels, lora), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, weights: Weights, ctx: ModelContext, eos_token_ids: tuple[int, ...]):
        super().__init__()
        tp = ctx.tp
        dim = head_dim(config)
        max_positions = config.max_position_embeddings
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if window:
            # No sliding-window masking in the attention backends yet: serve only contexts the
            # window covers entirely, where full attention is exact.
            max_positions = min(max_positions, window)
        plan = plan_attention(ctx.attention, ctx.device, ctx.dtype, dim, ctx.block_size, ctx.cpu_kernel is not None)
        self.backend = select_backend(plan, dim ** -0.5, ctx.cpu_kernel)
        self.rotary = RotaryEmbedding(config, dim, max_positions, ctx.device)
        shared = Shared(self.backend, ctx.fused_ops if ctx.device.type == "cpu" else None)
        self.shared = shared
        if ctx.quantize == GGUF:
            # The linear layers read the GGUF's own blocks; norms and the embedding table come
            # from the dequantized copy (exactly the file's values).
            weights = weights.serving_gguf(open_for_folder(weights.folder))
        for adapter in ctx.lora_adapters:  # before any weight is read: a wrong adapter fails fast
            check_fit(adapter, projection_shapes(config), config.num_hidden_layers)
        embed = weights.get_sharded("model.embed_tokens.weight", dim=0, even=False)
        self.embed_tokens = VocabParallelEmbedding(embed, config.vocab_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(i, config, weights, ctx, shared) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(weights.get("model.norm.weight"), config.rms_norm_eps)
        tied = getattr(config, "tie_word_embeddings", False) or not weights.has("lm_head.weight")
        head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        # Tied and dense: the embedding's own tensor (one copy in memory); a GGUF served natively
        # gives the head the file's quantized table.
        head = embed if tied and weights.gguf is None else weights.get_sharded(head_name, dim=0, even=False, quantized=True)
        self.lm_head = LMHead(head, config.vocab_size, tp, ctx.quantize)
        attn = self.layers[0].self_attn
        self.info = ModelInfo(
            impl="llama",
            vocab_size=config.vocab_size,
            max_position_embeddings=max_positions,
            eos_token_ids=eos_token_ids,
            kv_spec=KVCacheSpec(config.num_hidden_layers, attn.num_kv_heads, attn.head_dim, plan.block_size, ctx.dtype),
            window_size=window or None,
            adapter_ids=tuple(adapter.id for adapter in ctx.lora_adapters),
        )

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_cache: KVCache, meta: AttentionMetadata, logits_index, backend=None,
                lora: LoraStep | None = None):
        """`backend`: another attention backend for this call, with the metadata it reads (captured
        CUDA-graph decode: shard/cuda_graphs.py); None: the model's own. `lora`: the step's rows
        that use an adapter; None: no row does (no LoRA work at all)."""
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary.tables(positions, hidden.dtype)  # (cos, sin), the same for every layer
        residual = None
        for index, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, rope, kv_cache.layer(index), meta, backend, lora)
        hidden, _ = self.norm(hidden, residual, self.shared.kernels)
        if logits_index is not None:
            hidden = hidden.index_select(0, logits_index)
        return self.lm_head(hidden).float()
