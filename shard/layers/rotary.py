"""Rotary position embeddings with the scaling variants transformers knows (linear, dynamic,
llama3, yarn, longrope), computed by transformers' own init functions so our frequencies are the
reference's. `dynamic` is evaluated at its init length: exact up to max_position_embeddings."""

from __future__ import annotations

import torch
from typing import TYPE_CHECKING

from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

if TYPE_CHECKING:
    from shard.cpu_kernels import FusedOps


class RotaryEmbedding(nn.Module):
    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int, device: torch.device):
        super().__init__()
        scaling = getattr(config, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope scaling type {rope_type!r}")
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        inv_freq = inv_freq[: head_dim // 2].float()
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        # Tables are fp32 and cast at use, as in transformers (cos/sin computed in fp32).
        self.register_buffer("cos", (freqs.cos() * attention_scaling).to(device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attention_scaling).to(device), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D/2] at these positions: looked up once per step and shared by every
        layer (six small ops per layer otherwise)."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: FusedOps | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, KVH, D]; the rotate-half (GPT-NeoX) convention of HF Llama. With
    `kernels` (the compiled CPU kernels) q and k are rotated in place, one call, same bits.
    Otherwise q and k are rotated as one tensor: half the elementwise ops, and the same
    arithmetic per element (the results are bit-identical to rotating them apart)."""
    if kernels is not None and q.dtype in kernels.dtypes and _fusable(q, k, cos, sin):
        kernels.rotary_(q, k, cos, sin)
        return q, k
    heads = q.shape[1]
    both = _rotate(torch.cat([q, k], dim=1), cos, sin)
    return both[:, :heads], both[:, heads:]


def _fusable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.is_contiguous()
            and sin.is_contiguous() and q.dtype == k.dtype == cos.dtype == sin.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
