"""On a CUDA GPU with flash-attn: decode replayed from CUDA graphs equals decode without them
(skipped otherwise; scripts/gpu-smoke.sh runs it). The CPU side of the same logic, through an
eager stand-in for the capture, is tests/shard/test_cuda_graphs.py."""

from __future__ import annotations

import gc
import importlib.util
import random
from pathlib import Path

import pytest
import torch

from pytgi_proto import generate_pb2 as pb
from shard.config import build_config
from shard.cuda_graphs import DecodeGraphs, FlashDecode, KVCacheDecodeBackend
from tests.shard.helpers import BlockPool, generate, greedy_request
from tests.shard.test_cuda_graphs import EagerCapture

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA GPU and flash-attn")

SIZES = "1,2,4"


@pytest.fixture
def load_cuda(monkeypatch):
    """An engine on cuda:0 loaded as the shard loads it (`shard.cli._load`: dtype auto, flash-attn),
    warmed up with a fixed KV cache; the process memory cap is lifted after."""
    from shard.cli import _load

    engines = []

    def load(folder: Path, cuda_graphs: str):
        for name in ("ATTENTION", "CUDA_MEMORY_FRACTION", "TGI_WIGGLE_ROOM", "MAX_BATCH_SIZE", "CUDA_GRAPHS"):
            monkeypatch.delenv(name, raising=False)
        config = build_config(str(folder), revision=None, uds_path="/tmp/pytgi-gpu-test", sharded=False, dtype=None,
                              trust_remote_code=False, json_output=False, log_level="INFO", device="cuda",
                              cuda_graphs=cuda_graphs)
        engine = _load(config)
        engine.warmup(pb.WarmupRequest(max_batch_total_tokens=16 * 1024, max_prefill_tokens=1024))
        engines.append(engine)
        return engine

    yield load
    engines.clear()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0, torch.device("cuda", 0))


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 120) for _ in range(rng.randrange(3, 60))] for _ in range(count)]


def test_graphs_are_captured_at_warmup(load_cuda, tiny_llama):
    engine = load_cuda(tiny_llama, SIZES)
    assert engine.model.backend.name == "flash-attn"
    assert engine.graphs is not None and engine.graphs.sizes == (1, 2, 4)
    assert load_cuda(tiny_llama, "0").graphs is None


def test_greedy_decode_with_graphs_equals_without(load_cuda, tiny_llama):
    """Eight requests finishing at different steps: batches of 8 to 5 run eagerly (larger than
    every captured size), then 4, 3 (padded to 4), 2 and 1 replay; the tokens are the same."""
    block = None
    outputs = []
    for sizes in (SIZES, "0"):
        engine = load_cuda(tiny_llama, sizes)
        block = engine.block_size
        pool = BlockPool(block)
        requests = [greedy_request(i, p, 4 + 2 * i, pool) for i, p in enumerate(prompts(8, seed=11))]
        outputs.append(generate(engine, requests))
        if engine.graphs is not None:
            assert engine.graphs.num_replays >= 4 * 2  # at least two steps at each of 4, 3, 2, 1 rows
    assert block == 256
    assert outputs[0] == outputs[1]


def test_replay_equals_the_same_forward_without_a_graph(load_cuda, tiny_llama):
    """The captured graph against the very function it captured, run eagerly on the same static
    buffers (the CPU tests' stand-in) and against the engine's eager varlen forward."""
    engine = load_cuda(tiny_llama, SIZES)
    pool = BlockPool(engine.block_size)
    requests = [greedy_request(i, p, 8, pool) for i, p in enumerate(prompts(3, seed=12))]
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=requests, size=3)))
    batch = engine.batches[response.batch.id]
    plan = engine.graphs.plan(batch)
    assert (plan.size, plan.num_rows) == (4, 3)
    replayed = engine.graphs.replay(plan).clone()
    backend = KVCacheDecodeBackend(engine.model.backend.scale, FlashDecode())
    eager_graphs = DecodeGraphs(engine.model, engine.kv_cache, engine.graphs.sizes, engine.graphs.width,
                                EagerCapture(), backend)
    same_kernels = eager_graphs.replay(eager_graphs.plan(batch))
    torch.testing.assert_close(replayed, same_kernels, rtol=1e-3, atol=1e-3)
    graphs, engine.graphs = engine.graphs, None
    _, varlen = engine._forward(batch)  # prepare + the flash varlen backend
    engine.graphs = graphs
    assert torch.equal(replayed.argmax(-1), varlen.argmax(-1))
    torch.testing.assert_close(replayed, varlen, rtol=2e-2, atol=5e-2)  # bf16: two kernels, two orders
