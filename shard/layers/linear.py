"""Column- and row-parallel linear layers.

Column parallel: the output features are split over ranks; each rank keeps its slice, no
communication. Row parallel: the input features are split; partial products are summed with
an all-reduce. Fused projections (qkv, gate_up) are column-parallel layers whose weight is the
concatenation of each part's own slice, so one matmul serves all parts on every rank.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from shard.distributed import TPGroup


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        # The bias is added once, after the reduction, by rank 0 only.
        keep_bias = bias is not None and tp.rank == 0
        self.bias = nn.Parameter(bias, requires_grad=False) if keep_bias else None
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight, self.bias))
