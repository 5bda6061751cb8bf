"""Gated activations applied to a fused gate_up projection."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from shard.cpu_kernels import FusedOps

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def gated(act: str):
    fn = ACTIVATIONS.get(act)
    if fn is None:
        raise ValueError(f"unsupported hidden_act {act!r}")

    def forward(gate_up: torch.Tensor, kernels: FusedOps | None = None) -> torch.Tensor:
        # SiLU has a compiled CPU kernel (one call instead of chunk, silu, mul; same bits).
        if (kernels is not None and act == "silu" and gate_up.device.type == "cpu"
                and gate_up.dtype in kernels.dtypes):
            return kernels.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return fn(gate) * up

    return forward
