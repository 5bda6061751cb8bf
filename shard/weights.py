"""Safetensors weights: a name -> file routing table and tensor-parallel slicing at load time.

Only this rank's slice is read from disk (`safe_open(...).get_slice`), so every shard's resident
weight bytes are about 1/N of the model.

A GGUF served natively (`--quantize gguf`, opt-in on the CPU) adds a second
source: a linear layer's weight asked for with `quantized=True` comes from the GGUF file as the
file stores it (`BlockQuantized`, shard/gguf_weights.py) when its type has a kernel; everything
else still comes from the dequantized safetensors copy of the same file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from shard.distributed import TPGroup, shard_range
from shard.gguf_weights import GgufTensors
from shard.layers.quant import BlockQuantized, Weight


class Weights:
    def __init__(self, folder: Path, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 gguf: GgufTensors | None = None):
        self.folder = folder
        self.tp = tp
        self.dtype = dtype
        self.device = device
        self.gguf = gguf  # set: serve its Q4_0 / Q4_1 / Q8_0 tensors natively (`quantized=True`)
        self._routing: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {folder}")
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    self._routing[name] = file

    def serving_gguf(self, gguf: GgufTensors) -> "Weights":
        """The same checkpoint, with `gguf` (the file it was converted from) as the source of
        the linear layers' quantized weights."""
        return Weights(self.folder, self.tp, self.dtype, self.device, gguf)

    def _native(self, name: str, quantized: bool) -> BlockQuantized | None:
        if not quantized or self.gguf is None:
            return None
        return self.gguf.get(name)

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

    def get(self, name: str, *, quantized: bool = False) -> Weight:
        """`quantized`: the GGUF's block-quantized form when served natively (see the module doc)."""
        native = self._native(name, quantized)
        return native if native is not None else self._finish(self._slice(name)[:])

    def get_sharded(self, name: str, dim: int, *, even: bool = True, quantized: bool = False) -> Weight:
        """This rank's contiguous part of `dim`. `even` asserts the split is exact."""
        native = self._native(name, quantized)
        part = native if native is not None else self._slice(name)
        size = part.shape[dim] if native is not None else part.get_shape()[dim]
        if even and size % self.tp.world_size:
            raise ValueError(
                f"{name}: dimension {dim} of size {size} cannot be split evenly over "
                f"{self.tp.world_size} shards"
            )
        start, stop = shard_range(size, self.tp.rank, self.tp.world_size)
        if native is not None:
            return native.rows(slice(start, stop)) if dim == 0 else native.cols(start, stop)
        index = [slice(None)] * len(part.get_shape())
        index[dim] = slice(start, stop)
        return self._finish(part[tuple(index)])

    def get_heads(self, name: str, num_heads: int, head_dim: int, dim: int = 0, *, quantized: bool = False) -> Weight:
        """This rank's heads of a per-head weight (`head_rows`)."""
        world = self.tp.world_size
        start, stop = head_rows(name, num_heads, head_dim, self.tp.rank, world)
        if num_heads >= world:
            return self.get_sharded(name, dim, quantized=quantized)
        native = self._native(name, quantized)
        if native is not None and dim == 0:
            return native.rows(slice(start, stop))
        part = self._slice(name)
        index = [slice(None)] * len(part.get_shape())
        index[dim] = slice(start, stop)
        return self._finish(part[tuple(index)])


def head_rows(name: str, num_heads: int, head_dim: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of the rows (heads × head_dim) of a per-head weight that `rank` serves: an
    even share of the heads, or with fewer heads than shards (GQA KV heads) head
    rank * num_heads // world, replicated. LoRA's B follows the same rows (shard/layers/lora.py)."""
    if num_heads >= world:
        if num_heads % world:
            raise ValueError(f"{name}: {num_heads} heads cannot be split over {world} shards")
        return shard_range(num_heads * head_dim, rank, world)
    if world % num_heads:
        raise ValueError(f"{name}: {num_heads} heads cannot be replicated over {world} shards")
    head = rank * num_heads // world
    return head * head_dim, (head + 1) * head_dim
