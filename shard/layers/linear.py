"""Column- and row-parallel linear layers.

Column parallel: the output features are split over ranks; each rank keeps its slice, no
communication. Row parallel: the input features are split; partial products are summed with
an all-reduce. Fused projections (qkv, gate_up) are column-parallel layers whose weight is the
concatenation of each part's own slice, so one matmul serves all parts on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from shard.distributed import TPGroup
from shard.layers.quant import Weight, make_linear


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: Weight, bias: torch.Tensor | None, quantize: str | None = None):
        super().__init__()
        self.linear = make_linear(weight, bias, quantize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class RowParallelLinear(nn.Module):
    def __init__(self, weight: Weight, bias: torch.Tensor | None, tp: TPGroup, quantize: str | None = None):
        super().__init__()
        # The bias is added once, after the reduction, by rank 0 only.
        self.linear = make_linear(weight, bias if tp.rank == 0 else None, quantize)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.linear(x))
