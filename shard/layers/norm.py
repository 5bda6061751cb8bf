"""RMSNorm with an optional fused residual add (the residual stream is carried between layers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from shard.cpu_kernels import FusedOps


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, kernels: FusedOps | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new residual) where new residual = x + residual. With `kernels` (the
        compiled CPU kernels) one call does both, adding x into `residual` in place; the results
        are bit-identical to the torch ops below."""
        if kernels is not None and x.dtype in kernels.dtypes and _fusable(x, residual, self.weight):
            if residual is None:
                return kernels.rms_norm(x, None, self.weight, self.eps), x
            return kernels.rms_norm(x, residual, self.weight, self.eps), residual
        return rms_norm_reference(x, residual, self.weight, self.eps)


def rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    residual = x
    # Same op order as transformers' LlamaRMSNorm (fp32 variance, cast back), so fp32 greedy
    # outputs match the reference token for token.
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype), residual


def _fusable(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or weight.dtype != x.dtype or x.stride(-1) != 1:
        return False
    if residual is None:
        return True
    return residual.dtype == x.dtype and residual.shape == x.shape and residual.is_contiguous()
