"""Vocab-parallel embedding and LM head: each rank owns a contiguous range of the vocabulary."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from shard.distributed import TPGroup, shard_range
from shard.layers.quant import BlockQuantized, Weight, make_linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, vocab_size: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.start, self.stop = shard_range(vocab_size, tp.rank, tp.world_size)
        # One extra zero row: ids outside this rank's range look it up and contribute nothing
        # to the all-reduce.
        padded = torch.cat([weight, weight.new_zeros(1, weight.shape[1])]) if tp.world_size > 1 else weight
        self.weight = nn.Parameter(padded, requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (input_ids < self.start) | (input_ids >= self.stop)
        local = local.masked_fill(outside, self.weight.shape[0] - 1)
        return self.tp.all_reduce(F.embedding(local, self.weight))


class LMHead(nn.Module):
    """Logits for this rank's vocab slice, gathered to the full vocabulary."""

    def __init__(self, weight: Weight, vocab_size: int, tp: TPGroup, quantize: str | None = None):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        block = -(-vocab_size // tp.world_size)
        if tp.world_size > 1 and weight.shape[0] < block:
            # all_gather needs equal shapes: the last rank pads its (shorter) slice.
            if isinstance(weight, BlockQuantized):
                weight = weight.padded_rows(block)
            else:
                weight = torch.cat([weight, weight.new_zeros(block - weight.shape[0], weight.shape[1])])
        # Quantizing the head pays most at batch 1: with tied embeddings it is a fifth of a small
        # model's bytes (SmolLM2: 113 of 538 MB). The embedding lookup keeps its own full table.
        self.linear = make_linear(weight, None, quantize)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(self.linear(hidden))
        return logits[..., : self.vocab_size] if self.tp.world_size > 1 else logits
