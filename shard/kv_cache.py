"""Paged KV cache: per layer K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].

The router owns the block ids; the shard only writes the slots it is told to and reads through
block tables. Block 0 exists but is reserved for the router's health probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int  # per shard
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device):
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        # One allocation for everything; layers are views. zeros (not empty) so a read through a
        # padded block-table entry can never produce NaN/inf that leaks through a masked softmax.
        self._storage = torch.zeros(shape, dtype=spec.dtype, device=device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._storage[index, 0], self._storage[index, 1]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.spec.block_size

    @property
    def nbytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()


def available_memory(device: torch.device) -> int:
    """Bytes the KV cache could take right now: free GPU memory, or MemAvailable on Linux."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
