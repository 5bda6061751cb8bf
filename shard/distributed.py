"""Tensor-parallel process group: torch.distributed (gloo on CPU, NCCL on CUDA), or a no-op group.

Layers take a `TPGroup` and call its collectives unconditionally; with world size 1 they return
their input, so the single-shard path pays nothing and has no `if world_size > 1` branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shard.config import ShardConfig

# A peer that died leaves the others blocked inside a collective; the timeout turns that hang
# into an error, the shard exits, and the launcher tears the group down.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True, slots=True)
class TPGroup:
    rank: int = 0
    world_size: int = 1
    group: object | None = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along the last dimension (rank order)."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def all_gather_object(self, value: object) -> list[object]:
        """Every rank's `value`, in rank order (pickled over the group; for start-up metadata)."""
        if self.world_size == 1:
            return [value]
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)


def init_tp_group(config: ShardConfig) -> TPGroup:
    if config.world_size == 1:
        return TPGroup()
    backend = "nccl" if config.device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{config.master_addr}:{config.master_port}",
        rank=config.rank,
        world_size=config.world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return TPGroup(rank=config.rank, world_size=config.world_size, group=dist.group.WORLD)


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of `size` owned by `rank`; the last rank may get fewer."""
    block = -(-size // world_size)
    start = min(rank * block, size)
    return start, min(start + block, size)
