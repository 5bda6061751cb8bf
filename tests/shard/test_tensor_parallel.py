"""Tensor parallelism on CPU (gloo): TP=2 gives TP=1's greedy tokens, each rank holds ~1/2 of
the weights, and only rank `id % world` reports a request."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pytgi_proto import generate_pb2 as pb
from shard.distributed import TPGroup
from shard.engine import Engine
from shard.models import get_model
from shard.models.base import ModelContext
from tests.conftest import make_config, make_engine, save_tiny
from tests.shard.helpers import BlockPool, generate, greedy_request

BLOCK = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _requests() -> list[pb.Request]:
    pool = BlockPool(BLOCK)
    prompts = [[(7 * i + 3 * j) % 120 + 3 for j in range(5 + 4 * i)] for i in range(5)]
    requests = [greedy_request(i, p, 8, pool) for i, p in enumerate(prompts)]
    requests[3].chunk_len = 4  # one chunked prefill in the mix
    return requests


def _rank(rank: int, world: int, port: int, folder: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tp = TPGroup(rank=rank, world_size=world, group=dist.group.WORLD)
    config = replace(make_config(folder, BLOCK), rank=rank, world_size=world)
    model = get_model(Path(folder), ModelContext(tp, config.device, config.dtype, BLOCK))
    engine = Engine(config, model, tp, Path(folder))
    engine.warmup(pb.WarmupRequest(max_batch_total_tokens=1024, max_prefill_tokens=16))
    outputs = generate(engine, _requests())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results[rank] = (outputs, weight_bytes, engine.seed_base)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tp-llama"))


def test_tp2_equals_tp1(tiny):
    single = make_engine(tiny, block_size=BLOCK, num_blocks_tokens=1024)
    expected = generate(single, _requests())
    total_bytes = sum(p.numel() * p.element_size() for p in single.model.parameters())
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(2, _free_port(), str(tiny), results), nprocs=2, join=True, start_method="spawn")
    merged: dict[int, list[int]] = {}
    # The base of the seeds of unseeded sampled requests is shared: every rank draws the same tokens.
    assert results[0][2] == results[1][2]
    for rank in range(2):
        outputs, weight_bytes, _ = results[rank]
        assert all(request_id % 2 == rank for request_id in outputs)  # each rank reports its own
        merged.update(outputs)
        # Embedding, attention and MLP weights are split; only the norms are replicated.
        assert weight_bytes < 0.6 * total_bytes
    assert merged == expected
