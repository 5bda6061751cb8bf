"""One decode forward's inputs, built once and replayed: the shared timing core of the
shard-level benchmarks (attention_bench, op_bench, weights_bench).

B sequences of `context` cached tokens compute one token each (the cache holds zeros:
attention's cost is its reads, not the values).
"""

from __future__ import annotations

import time

import torch

from shard.attention import SeqStep, build_metadata
from shard.kv_cache import KVCache


class DecodeStep:
    def __init__(self, model, batch: int, context: int, layout: str | None = None):
        """`layout`: the attention metadata to build (default: the model's backend's)."""
        spec = model.info.kv_spec
        blocks = -(-context // spec.block_size)
        self.cache = KVCache(spec, 1 + batch * blocks, torch.device("cpu"))
        seqs = [SeqStep(1, context, list(range(1 + i * blocks, 1 + (i + 1) * blocks))) for i in range(batch)]
        self.meta = build_metadata(seqs, spec.block_size, torch.device("cpu"), layout or model.backend.layout)
        self.ids = torch.randint(0, 1000, (batch,))
        self.positions = torch.full((batch,), context - 1)
        self.model = model

    def __call__(self) -> torch.Tensor:
        return self.model.forward(self.ids, self.positions, self.cache, self.meta, None)

    def time_ms(self, steps: int) -> float:
        """Mean ms per forward over `steps`, after one warm-up forward."""
        self()
        start = time.perf_counter()
        for _ in range(steps):
            self()
        return (time.perf_counter() - start) / steps * 1e3
