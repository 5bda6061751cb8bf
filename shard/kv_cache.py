"""Paged KV cache: per layer K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].

The router owns the block ids; the shard only writes the slots it is told to and reads through
block tables. Block 0 exists but is reserved for the router's health probe.
"""

from __future__ import annotations

import os
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


def cuda_kv_budget(free: int, total: int, fraction: float, wiggle_room: float, transient: int) -> int:
    """KV cache bytes on a GPU, TGI's rule: this process may use `fraction` of the GPU's `total`
    memory; everything in use on the GPU now (`total - free`: our weights and CUDA context, other
    processes) counts against it, and so does the `transient` peak a step needs on top
    (activations, logits, sampler temporaries; measured by the warmup). The KV cache takes
    `wiggle_room` of what is left: TGI's `get_free_memory(device, MEMORY_FRACTION) *
    TGI_WIGGLE_ROOM`, where TGI's allocator still holds the warmup's peak. `free` must be measured
    after `empty_cache`, with the allocator's reserve returned, or that peak would count twice."""
    left = free - (1.0 - fraction) * total - transient
    return max(0, int(left * wiggle_room))


def cpu_kv_budget(available: int, fraction: float) -> int:
    """KV cache bytes on a CPU: `fraction` of the RAM available now (MemAvailable); the
    warmup's temporaries are back with the allocator by then, and the budget is small anyway."""
    return int(available * fraction)


def kv_budget(device: torch.device, fraction: float, wiggle_room: float, transient: int) -> int:
    """Measure the memory now and apply the device's rule (CUDA is never touched on a CPU shard)."""
    if device.type != "cuda":
        return cpu_kv_budget(available_ram(), fraction)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # the warmup's freed blocks back to the driver, so mem_get_info sees them
    free, total = torch.cuda.mem_get_info(device)
    return cuda_kv_budget(free, total, fraction, wiggle_room, transient)


class TransientPeak:
    """The most memory a step holds above what stays resident (CUDA; 0 elsewhere).

    Construction marks the baseline (weights, buffers); `bytes` is the peak allocated since, less
    `resident` (the warmup's temporary KV cache: its blocks are part of the real cache, not of
    any step's temporaries). The caching allocator's counters are exact and per device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)

    def bytes(self, resident: int = 0) -> int:
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline - resident)


def cap_process_memory(device: torch.device, fraction: float) -> None:
    """Make `fraction` of the GPU's total memory a hard limit for this process's caching
    allocator, as TGI does: past it, an allocation fails here instead of starving a neighbour."""
    if device.type == "cuda" and fraction < 1.0:
        torch.cuda.set_per_process_memory_fraction(float(fraction), device)


def available_ram() -> int:
    """RAM available right now: MemAvailable on Linux."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
