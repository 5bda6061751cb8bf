"""Safetensors weights: a name -> file routing table and tensor-parallel slicing at load time.

Only this rank's slice is read from disk (`safe_open(...).get_slice`), so every shard's resident
weight bytes are about 1/N of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from shard.distributed import TPGroup, shard_range


class Weights:
    def __init__(self, folder: Path, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        self.tp = tp
        self.dtype = dtype
        self.device = device
        self._routing: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {folder}")
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    self._routing[name] = file

    def names(self) -> list[str]:
        return list(self._routing)

    def has(self, name: str) -> bool:
        return name in self._routing

    def _slice(self, name: str):
        file = self._routing.get(name)
        if file is None:
            raise KeyError(f"weight {name!r} not found in the checkpoint")
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_slice(name)

    def _finish(self, tensor: torch.Tensor) -> torch.Tensor:
        # Move, then convert: given both at once, torch converts a CPU-to-GPU copy on the CPU
        # (ATen's copy_kernel_cuda: "type conversions are performed on the CPU for CPU-GPU
        # copies"); on the GPU the conversion is one kernel. On a CPU shard the move is a no-op.
        tensor = tensor.to(self.device)
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor.contiguous()

    def get(self, name: str) -> torch.Tensor:
        return self._finish(self._slice(name)[:])

    def get_sharded(self, name: str, dim: int, *, even: bool = True) -> torch.Tensor:
        """This rank's contiguous part of `dim`. `even` asserts the split is exact."""
        part = self._slice(name)
        size = part.get_shape()[dim]
        if even and size % self.tp.world_size:
            raise ValueError(
                f"{name}: dimension {dim} of size {size} cannot be split evenly over "
                f"{self.tp.world_size} shards"
            )
        start, stop = shard_range(size, self.tp.rank, self.tp.world_size)
        index = [slice(None)] * len(part.get_shape())
        index[dim] = slice(start, stop)
        return self._finish(part[tuple(index)])

    def get_heads(self, name: str, num_heads: int, head_dim: int, dim: int = 0) -> torch.Tensor:
        """This rank's heads of a per-head weight. With fewer heads than shards (GQA KV heads),
        heads are replicated: rank r takes head r * num_heads // world_size."""
        world, rank = self.tp.world_size, self.tp.rank
        if num_heads >= world:
            if num_heads % world:
                raise ValueError(f"{name}: {num_heads} heads cannot be split over {world} shards")
            return self.get_sharded(name, dim)
        if world % num_heads:
            raise ValueError(f"{name}: {num_heads} heads cannot be replicated over {world} shards")
        head = rank * num_heads // world
        part = self._slice(name)
        index = [slice(None)] * len(part.get_shape())
        index[dim] = slice(head * head_dim, (head + 1) * head_dim)
        return self._finish(part[tuple(index)])


def load_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
