"""Tensor-parallel process group: torch.distributed (gloo on CPU, NCCL on CUDA), or a no-op group.

Layers take a `TPGroup` and call its collectives unconditionally; with world size 1 they return
their input, so the single-shard path pays nothing and has no `if world_size > 1` branches.

NCCL start-up, in the order torch asks for: the rank's GPU is the current CUDA device
(`torch.cuda.set_device`) before `init_process_group`, which also gets it as `device_id` (the
communicator is created on that GPU at once, and an NCCL error surfaces here, not in the first
forward). The group carries its device: collectives whose tensors the group builds itself (the
warmup's minimum, the object collectives) put them there, on whatever thread calls them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
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
    # Where this group's collectives run: the rank's GPU under NCCL (which takes CUDA tensors
    # only), the CPU under gloo.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks in place; `tensor` is an activation, already on the group's device."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def min_int(self, value: int) -> int:
        """The smallest `value` over all ranks (e.g. the KV blocks every rank can hold)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return int(tensor.item())

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
        with self._current_device():
            dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            with self._current_device():
                dist.barrier(group=self.group)

    def _current_device(self) -> contextlib.AbstractContextManager:
        # NOTE: NCCL object collectives and barrier stage their tensors on
        # torch.cuda.current_device(), which is per thread: set_device in init_tp_group covers
        # the thread that loaded the model; this covers any other (the server's executor).
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()


def process_group_options(config: ShardConfig) -> dict:
    """`init_process_group`'s keyword arguments for this rank: NCCL bound to the rank's GPU, or
    gloo on the CPU."""
    cuda = config.device.type == "cuda"
    return dict(
        backend="nccl" if cuda else "gloo",
        init_method=f"tcp://{config.master_addr}:{config.master_port}",
        rank=config.rank,
        world_size=config.world_size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=config.device if cuda else None,
    )


def init_tp_group(config: ShardConfig) -> TPGroup:
    if config.device.type == "cuda":
        # Before the process group and the model: NCCL's staging, kernels and caches default to
        # the current device, which would be cuda:0 on every rank otherwise.
        torch.cuda.set_device(config.device)
    if config.world_size == 1:
        return TPGroup(device=config.device)
    dist.init_process_group(**process_group_options(config))
    return TPGroup(rank=config.rank, world_size=config.world_size, group=dist.group.WORLD, device=config.device)


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of `size` owned by `rank`; the last rank may get fewer."""
    block = -(-size // world_size)
    start = min(rank * block, size)
    return start, min(start + block, size)
