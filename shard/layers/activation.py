"""Gated activations applied to a fused gate_up projection."""

from __future__ import annotations

import torch
from torch.nn import functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def gated(act: str):
    fn = ACTIVATIONS.get(act)
    if fn is None:
        raise ValueError(f"unsupported hidden_act {act!r}")

    def forward(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return fn(gate) * up

    return forward
