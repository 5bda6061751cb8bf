"""NCCL start-up on 2 GPUs through the shard's own path (plan_device → init_tp_group): each rank on
its own GPU, the object collectives (also from another thread, as the server's executor calls
them), the warmup's minimum and an activation all-reduce. Runs where there are 2 GPUs
(scripts/gpu-smoke.sh); skipped elsewhere."""

from __future__ import annotations

import socket
import threading
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shard.config import plan_device
from shard.distributed import init_tp_group
from tests.conftest import make_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    device = plan_device("cuda", rank, 2, torch.cuda.is_available(), torch.cuda.device_count(), lambda: "?")
    config = replace(make_config(), rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port,
                     device=device, dtype=torch.float16)
    tp = init_tp_group(config)
    current = torch.cuda.current_device()
    gathered = tp.all_gather_object({"rank": rank, "url": f"unix:///tmp/s-{rank}"})
    from_thread = []  # a new thread's current device is cuda:0 on every rank
    worker = threading.Thread(target=lambda: from_thread.append(tp.all_gather_object(rank)))
    worker.start()
    worker.join()
    smallest = tp.min_int(1000 - 300 * rank)
    total = tp.all_reduce(torch.full((8,), float(rank + 1), dtype=torch.float16, device=tp.device))
    parts = tp.all_gather_last_dim(torch.full((2, 3), float(rank), device=tp.device))
    tp.barrier()
    results[rank] = (str(tp.device), current, gathered, from_thread[0], smallest, total.tolist(), str(total.device),
                     parts.tolist())
    dist.destroy_process_group()


def test_two_ranks_start_nccl_on_their_own_gpus():
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(_free_port(), results), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        device, current, gathered, from_thread, smallest, total, total_device, parts = results[rank]
        assert device == f"cuda:{rank}" and current == rank and total_device == device
        assert gathered == [{"rank": 0, "url": "unix:///tmp/s-0"}, {"rank": 1, "url": "unix:///tmp/s-1"}]
        assert from_thread == [0, 1]
        assert smallest == 700
        assert total == [3.0] * 8
        assert parts == [[0.0] * 3 + [1.0] * 3] * 2
