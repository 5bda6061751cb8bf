"""The fallback for every causal LM that is not on the Llama-family fast path: transformers' own
modeling code (`AutoModelForCausalLM`) with our paged attention plugged in through its attention
interface (`attn_implementation="pytgi_paged"`).

A step's ragged tokens (every sequence, flattened) run as one "sequence" of shape [1, T] with
`position_ids=positions[None]` and `use_cache=False`; the model computes its own embeddings,
rotary, norms and MLPs, and every attention layer calls `paged_attention`, which writes the new
K/V into our paged cache and attends through our backend (which does all the masking: per
sequence, causal, over the cached prefix).

How the step's KV cache and metadata reach `paged_attention`: a `ContextVar` set around the
model call (and reset after it). transformers 4.57 forwards `**kwargs` to the attention function
in GPT-NeoX and the Llama-like models, but `GPT2LMHeadModel.forward` drops them before calling
its base model, and we want to call the *full* CausalLM forward (its own head and any logit
post-processing, with `logits_to_keep`) rather than re-implement heads per architecture. One
mechanism that works whatever a model file does with kwargs beats two.

No [T, T] mask is built: `masking_utils` returns no mask for an attention implementation that is
not registered in `AttentionMaskInterface` (the path transformers keeps for TGI/vLLM-style
backends), and we deliberately do not register one.

Not supported (refused with a clear error at load): tensor parallelism, LoRA adapters (their
projections are inside transformers' modules, which take no per-row adapter), models whose code
does not route attention through `ALL_ATTENTION_FUNCTIONS`, attention logit soft-capping and
attention sinks. Sliding-window models serve only contexts the window covers, as on the fast path.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, PretrainedConfig

from shard.attention import (
    AttentionMetadata, AttentionPlan, Backend, SeqStep, build_metadata, plan_attention, select_backend,
)
from shard.kv_cache import KVCache, KVCacheSpec
from shard.layers.lora import LoraStep
from shard.models import UnsupportedModelError
from shard.models.base import ModelContext, ModelInfo

ATTN_IMPLEMENTATION = "pytgi_paged"


@dataclass(slots=True)
class _Step:
    """What `paged_attention` needs during one forward call."""

    owner: "TransformersModel"
    kv_cache: KVCache
    meta: AttentionMetadata
    layers: list[int] = field(default_factory=list)  # layer index of each attention call, in order


_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("pytgi_transformers_step", default=None)


def _scale(module, scaling: float | None, head_dim: int) -> float:
    if scaling is not None:
        return float(scaling)
    if hasattr(module, "scale_attn_weights"):
        # GPT-2 family: passes no `scaling` to the attention interface; mirror its eager path.
        scale = head_dim**-0.5 if module.scale_attn_weights else 1.0
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(module.layer_idx + 1)
        return scale
    return head_dim**-0.5


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q [1, H, T, D], k/v [1, KVH, T, D] → ([1, T, H, D], None).

    `attention_mask` is ignored (None for models using `masking_utils`): the backend masks from
    the step's metadata."""
    step = _STEP.get()
    if step is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention called outside TransformersModel.forward")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(
                f"{type(module).__name__} uses attention `{name}`, "
                "which pytgi's paged attention does not implement"
            )
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        layer = len(step.layers)  # modules without `layer_idx`: layers run in order
    step.layers.append(layer)
    batch, dim = query.shape[0], query.shape[-1]
    spec = step.kv_cache.spec
    kv_shape = (key.shape[1], key.shape[-1], value.shape[-1])
    if batch != 1 or kv_shape != (spec.num_kv_heads, spec.head_dim, spec.head_dim):
        raise UnsupportedModelError(
            f"{type(module).__name__} (layer {layer}) gives k {tuple(key.shape)} / v {tuple(value.shape)}, "
            f"but the KV cache was sized from the config for {spec.num_kv_heads} KV heads of dim "
            f"{spec.head_dim}"
        )
    dtype = spec.dtype
    q = query[0].transpose(0, 1).to(dtype).contiguous()  # [T, H, D]
    k = key[0].transpose(0, 1).to(dtype).contiguous()  # [T, KVH, D]
    v = value[0].transpose(0, 1).to(dtype).contiguous()
    backend = step.owner.backend_for(_scale(module, scaling, dim))
    out = backend.forward(q, k, v, step.kv_cache.layer(layer), step.meta)
    return out.to(query.dtype).unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)


def _head_dim(text: PretrainedConfig) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _max_positions(config: PretrainedConfig) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(f"{type(config).__name__} names no maximum context length "
                                "(max_position_embeddings / n_positions / max_seq_len)")


class TransformersModel:
    """`CausalLM` over a transformers model; see the module docstring."""

    def __init__(self, model, config: PretrainedConfig, ctx: ModelContext, eos_token_ids: tuple[int, ...],
                 plan: AttentionPlan):
        text = config.get_text_config()
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = _head_dim(text)
        spec = KVCacheSpec(text.num_hidden_layers, kv_heads, head_dim, plan.block_size, ctx.dtype)
        self.model = model
        self.device = ctx.device
        self.backend: Backend = select_backend(plan, head_dim**-0.5, ctx.cpu_kernel)
        self._backends: dict[float, Backend] = {self.backend.scale: self.backend}
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._probe(spec, (getattr(config, "architectures", None) or [type(model).__name__])[0])
        max_positions = _max_positions(text)
        window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
        if window:
            # No sliding-window masking in the backends: serve only contexts the window covers.
            max_positions = min(max_positions, window)
        self.info = ModelInfo(
            impl="transformers",
            vocab_size=text.vocab_size,
            max_position_embeddings=max_positions,
            eos_token_ids=eos_token_ids,
            kv_spec=spec,
            window_size=window or None,
        )

    @classmethod
    def load(cls, folder: Path, config: PretrainedConfig, ctx: ModelContext, eos_token_ids: tuple[int, ...]):
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        if ctx.tp.world_size > 1:
            raise UnsupportedModelError(
                f"the transformers fallback for {arch} does not support --num-shard > 1; use a fast-path "
                "architecture (Llama, Mistral, Qwen2, Qwen3) or serve this model on a single shard"
            )
        if ctx.lora_adapters:
            raise UnsupportedModelError(
                f"--lora-adapters are served by the fast-path architectures (Llama, Mistral, Qwen2, Qwen3), not by "
                f"the transformers fallback serving {arch}"
            )
        if ctx.quantize:
            raise UnsupportedModelError(
                f"--quantize {ctx.quantize} is implemented for the fast-path architectures (Llama, Mistral, "
                f"Qwen2, Qwen3), not for the transformers fallback serving {arch}"
            )
        # Planned before the weights load: a refused combination fails in seconds.
        plan = plan_attention(ctx.attention, ctx.device, ctx.dtype, _head_dim(config.get_text_config()),
                              ctx.block_size, ctx.cpu_kernel is not None)
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=copy.deepcopy(config), dtype=ctx.dtype, attn_implementation=ATTN_IMPLEMENTATION,
            trust_remote_code=ctx.trust_remote_code,
        )
        return cls(model.to(ctx.device).eval(), config, ctx, eos_token_ids, plan)

    def backend_for(self, scale: float) -> Backend:
        backend = self._backends.get(scale)
        if backend is None:
            backend = self._backends[scale] = self.backend.with_scale(scale)
        return backend

    def _probe(self, spec: KVCacheSpec, arch: str) -> None:
        """One token through the model on a scratch cache: proves that every layer's attention
        goes through our function (in layer order) and that the cache shapes fit the config."""
        cache = KVCache(spec, 2, self.device)
        meta = build_metadata([SeqStep(q_len=1, kv_len=1, blocks=[1])], spec.block_size, self.device,
                              self.backend.layout)
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        layers = self._forward(zero, zero, cache, meta, None)[1]
        if layers != list(range(spec.num_layers)):
            raise UnsupportedModelError(
                f"{arch}'s transformers code does not route its {spec.num_layers} attention layers through "
                f"transformers' AttentionInterface (saw layers {layers}); pytgi cannot serve it"
            )

    @torch.inference_mode()
    def _forward(self, input_ids, positions, kv_cache: KVCache, meta: AttentionMetadata, logits_index):
        step = _Step(self, kv_cache, meta)
        extra = {}
        if self._logits_to_keep:
            extra["logits_to_keep"] = logits_index if logits_index is not None else 0
        token = _STEP.set(step)
        try:
            out = self.model(
                input_ids=input_ids[None], position_ids=positions[None], use_cache=False, return_dict=True,
                **extra,
            )
        finally:
            _STEP.reset(token)
        logits = out.logits[0]
        if logits_index is not None and not self._logits_to_keep:
            logits = logits.index_select(0, logits_index)
        return logits.float(), step.layers

    def forward(
        self, input_ids, positions, kv_cache: KVCache, meta: AttentionMetadata, logits_index, lora: LoraStep | None = None
    ) -> torch.Tensor:
        """`lora` is always None: no adapter is loaded here (`load`), so no request can name one."""
        return self._forward(input_ids, positions, kv_cache, meta, logits_index)[0]
