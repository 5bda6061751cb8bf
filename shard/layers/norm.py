"""RMSNorm with an optional fused residual add (the residual stream is carried between layers)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new residual) where new residual = x + residual."""
        if residual is not None:
            x = x + residual
        residual = x
        # Same op order as transformers' LlamaRMSNorm (fp32 variance, cast back), so fp32 greedy
        # outputs match the reference token for token.
        hidden = x.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.eps)
        return self.weight * hidden.to(x.dtype), residual
