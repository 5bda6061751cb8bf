"""Column- and row-parallel linear layers.

Column parallel: the output features are split over ranks; each rank keeps its slice, no
communication. Row parallel: the input features are split; partial products are summed with
an all-reduce. Fused projections (qkv, gate_up) are column-parallel layers whose weight is the
concatenation of each part's own slice, so one matmul serves all parts on every rank.

Either may carry LoRA adapters (shard/layers/lora.py): `forward` then takes the step's
`LoraStep`, and a row-parallel layer adds the adapters' delta to its partial product before the
all-reduce.
"""

from __future__ import annotations

import torch
from torch import nn

from shard.distributed import TPGroup
from shard.layers.lora import LoraProjection, LoraStep
from shard.layers.quant import Weight, make_linear


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: Weight, bias: torch.Tensor | None, quantize: str | None = None,
                 lora: LoraProjection | None = None):
        super().__init__()
        self.linear = make_linear(weight, bias, quantize)
        self.lora = lora

    def forward(self, x: torch.Tensor, lora: LoraStep | None = None) -> torch.Tensor:
        out = self.linear(x)
        if lora is not None and self.lora is not None:
            self.lora.add_to(out, x, lora)
        return out


class RowParallelLinear(nn.Module):
    def __init__(self, weight: Weight, bias: torch.Tensor | None, tp: TPGroup, quantize: str | None = None,
                 lora: LoraProjection | None = None):
        super().__init__()
        # The bias is added once, after the reduction, by rank 0 only.
        self.linear = make_linear(weight, bias if tp.rank == 0 else None, quantize)
        self.tp = tp
        self.lora = lora

    def forward(self, x: torch.Tensor, lora: LoraStep | None = None) -> torch.Tensor:
        out = self.linear(x)
        if lora is not None and self.lora is not None:
            self.lora.add_to(out, x, lora)  # x is this rank's input columns: a partial delta, summed below
        return self.tp.all_reduce(out)
