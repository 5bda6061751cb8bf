"""CUDA graphs for decode on a GPU (skipped without CUDA; scripts/gpu-smoke.sh runs it). The CPU
side of the same logic, through an eager stand-in for the capture, is tests/shard/test_cuda_graphs.py.

Two halves:
- the real `CudaGraphCapture` (side-stream warmup, one memory pool for every size, pinned host
  inputs copied without blocking, padding rows, replay) around `DecodeGraphs`, with a torch-only
  stand-in for flash-attn's paged decode: runs on any CUDA GPU, flash-attn or not;
- the engine as the shard loads it, with flash-attn (skipped without it).

Replays and eager steps run different kernels (or the same kernels in another order) in bf16, so
tokens are compared with a margin rule: a greedy token may differ only where the reference's top-2
logits are within `GAP_BF16`, and the two continuations are not compared past that point."""

from __future__ import annotations

import gc
import importlib.util
import random
from pathlib import Path

import pytest
import torch

from pytgi_proto import generate_pb2 as pb
from shard.attention import grouped_decode
from shard.config import build_config
from shard.cuda_graphs import CudaGraphCapture, DecodeGraphs, FlashDecode, KVCacheDecodeBackend
from tests.shard.helpers import BlockPool, greedy_request
from tests.shard.test_cuda_graphs import EagerCapture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_flash_attn = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                                      reason="needs a CUDA GPU and flash-attn")

SIZES = "1,2,4"
# Two bf16 runs of one model may order a near-tie differently: the top-2 gap (in logits, equal to
# the gap in logprobs) under which a differing greedy token is accepted.
GAP_BF16 = 0.25
# Logits of the same forward by two kernels in bf16 (tens of units at most for these models).
LOGITS_BF16 = dict(rtol=2e-2, atol=5e-2)


@pytest.fixture(scope="module")
def llama_64(tmp_path_factory) -> Path:
    """A random Llama with a realistic head size (64; 4 heads, 2 KV heads), small enough to load
    in a second: the layout the served random model has, at test size."""
    from benchmarks.gpu_bench import save_random_llama

    return save_random_llama(tmp_path_factory.mktemp("llama-64"), vocab_size=512, hidden_size=256,
                             intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2, max_positions=1024)


@pytest.fixture
def load_cuda(monkeypatch):
    """load(folder, cuda_graphs, attention): an engine on cuda:0 loaded as the shard loads it
    (`shard.cli._load`, dtype auto), warmed up with a fixed KV cache. `release()` frees the engines
    loaded so far (one at a time on the GPU: each warmup sizes its cache from free memory); the
    process memory cap is lifted after."""
    from shard.cli import _load

    engines = []

    def release():
        engines.clear()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, torch.device("cuda", 0))

    def load(folder: Path, cuda_graphs: str, attention: str = "paged"):
        for name in ("CUDA_MEMORY_FRACTION", "TGI_WIGGLE_ROOM", "MAX_BATCH_SIZE", "CUDA_GRAPHS"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("ATTENTION", attention)
        release()
        config = build_config(str(folder), revision=None, uds_path="/tmp/pytgi-gpu-test", sharded=False, dtype=None,
                              trust_remote_code=False, json_output=False, log_level="INFO", device="cuda",
                              cuda_graphs=cuda_graphs)
        engine = _load(config)
        engine.warmup(pb.WarmupRequest(max_batch_total_tokens=16 * 1024, max_prefill_tokens=1024))
        engines.append(engine)
        return engine

    load.release = release
    yield load
    release()


def prompts(count: int, seed: int, vocab: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 60))] for _ in range(count)]


# -- the margin rule --------------------------------------------------------------------------

def generate_with_gaps(engine, requests: list[pb.Request]) -> dict[int, tuple[list[int], list[float]]]:
    """Greedy tokens of each request and, at each step, the gap between its top-2 logprobs (the
    requests must ask for top_n_tokens=2)."""
    out: dict[int, tuple[list[int], list[float]]] = {}

    def collect(generations):
        for g in generations:
            tokens, gaps = out.setdefault(g.request_id, ([], []))
            tokens.extend(g.tokens.ids)
            for top in g.top_tokens:
                gaps.append(top.logprobs[0] - top.logprobs[1])

    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=requests, size=len(requests))))
    collect(response.generations)
    while response.HasField("batch"):
        response = engine.decode(pb.DecodeRequest(batches=[response.batch]))
        collect(response.generations)
    return out


def assert_same_greedy(ours: dict, reference: dict, gap: float = GAP_BF16) -> None:
    """Every request's tokens equal the reference's up to the first step where they differ, and
    there the reference's top-2 gap is under `gap`: a near-tie, not a wrong kernel."""
    assert ours.keys() == reference.keys()
    for request_id, (reference_tokens, reference_gaps) in reference.items():
        tokens = ours[request_id][0]
        assert len(tokens) == len(reference_tokens), request_id
        for step, (a, b) in enumerate(zip(tokens, reference_tokens)):
            if a != b:
                assert reference_gaps[step] < gap, (
                    f"request {request_id} differs at step {step} with a top-2 gap of {reference_gaps[step]:.3f} "
                    f">= {gap}: {tokens} != {reference_tokens}")
                break


def assert_same_argmax(logits: torch.Tensor, reference: torch.Tensor, gap: float = GAP_BF16) -> None:
    """Row by row, the same argmax, or the reference's top-2 logits within `gap`."""
    top2 = reference.float().topk(2, dim=-1).values
    differ = logits.argmax(-1) != reference.argmax(-1)
    gaps = (top2[:, 0] - top2[:, 1])[differ]
    assert bool((gaps < gap).all()), f"rows {differ.nonzero().flatten().tolist()} differ with top-2 gaps {gaps.tolist()}"


# -- the real capture, torch-only attention ---------------------------------------------------

def torch_decode(q, k_cache, v_cache, kv_lens, block_tables, scale):
    """flash_attn_with_kvcache for one query per row, in torch ops that launch kernels only (no
    host sync, no shape that depends on a tensor's values: capturable). Each row's blocks are
    gathered through its fixed-width table, keys past its length are masked; the same grouped-query
    SDPA as the shard's eager CUDA decode (`grouped_decode`)."""
    batch, width = block_tables.shape
    block = k_cache.shape[1]
    tables = block_tables.long()
    keys = k_cache[tables].view(batch, width * block, *k_cache.shape[2:]).transpose(1, 2)
    values = v_cache[tables].view(batch, width * block, *v_cache.shape[2:]).transpose(1, 2)
    mask = (torch.arange(width * block, device=kv_lens.device) < kv_lens.long()[:, None]).view(batch, 1, 1, -1)
    return grouped_decode(q, keys, values, mask, scale)


class StrictCapture(CudaGraphCapture):
    """The real capture, with torch's sync debug mode on "error" while the captured function runs
    (its warmup run too, where a sync would otherwise pass unnoticed): a host sync in the forward
    raises instead of breaking the graph."""

    def capture(self, fn):
        def strict():
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn()
            finally:
                torch.cuda.set_sync_debug_mode(previous)

        return super().capture(strict)


def capture_torch_graphs(engine, sizes=(1, 2, 4)) -> DecodeGraphs:
    """The engine's decode graphs through the real CUDA capture, attention by `torch_decode`."""
    device = engine.config.device
    width = -(-2048 // engine.block_size)
    backend = KVCacheDecodeBackend(engine.model.backend.scale, torch_decode)
    with torch.cuda.device(device):
        return DecodeGraphs(engine.model, engine.kv_cache, sizes, width, StrictCapture(device), backend)


def test_captured_torch_decode_replays_what_it_captured(load_cuda, llama_64):
    """One replay of size 4 for 3 rows: pinned host inputs, the padding row, the logits of the very
    function captured run eagerly on the same buffers, and of the engine's own SDPA step."""
    engine = load_cuda(llama_64, "0", attention="sdpa")
    assert (engine.config.dtype, engine.model.backend.name) == (torch.bfloat16, "sdpa")
    graphs = capture_torch_graphs(engine)
    assert graphs.sizes == (1, 2, 4) and sorted(graphs._replays) == [1, 2, 4]
    pool = BlockPool(engine.block_size)
    requests = [greedy_request(i, p, 8, pool) for i, p in enumerate(prompts(3, seed=12, vocab=500))]
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=requests, size=3)))
    batch = engine.batches[response.batch.id]
    plan = graphs.plan(batch)
    assert (plan.size, plan.num_rows) == (4, 3)
    assert plan.longs.is_pinned() and plan.ints.is_pinned()  # so the copies to the device do not block
    replayed = graphs.replay(plan).clone()
    assert replayed.shape[0] == 3 and torch.isfinite(replayed).all()
    assert graphs._longs[:, 3].tolist() == [0, 0, 0] and graphs._ints[3].item() == 1  # the padding row
    eager = DecodeGraphs(engine.model, engine.kv_cache, graphs.sizes, graphs.width, EagerCapture(),
                         KVCacheDecodeBackend(engine.model.backend.scale, torch_decode))
    same_function = eager.replay(eager.plan(batch))
    torch.testing.assert_close(replayed, same_function, **LOGITS_BF16)
    assert_same_argmax(replayed, same_function)
    _, step = engine._forward(batch)  # graphs are not the engine's: its eager SDPA decode
    torch.testing.assert_close(replayed, step, **LOGITS_BF16)
    assert_same_argmax(replayed, step)


def test_greedy_through_captured_graphs_equals_eager(load_cuda, llama_64):
    """Eight requests finishing at different steps: batches of 8 to 5 run eagerly (larger than every
    captured size), then 4, 3 (padded to 4), 2 and 1 replay through the captured graphs."""
    runs = []
    for capture in (False, True):
        engine = load_cuda(llama_64, "0", attention="sdpa")
        if capture:
            engine.graphs = capture_torch_graphs(engine)
        pool = BlockPool(engine.block_size)
        requests = [greedy_request(i, p, 4 + 2 * i, pool, top_n_tokens=2)
                    for i, p in enumerate(prompts(8, seed=11, vocab=500))]
        runs.append(generate_with_gaps(engine, requests))
        if capture:
            assert engine.graphs.num_replays >= 4 * 2  # at least two steps at each of 4, 3, 2, 1 rows
    assert_same_greedy(runs[1], runs[0])


# -- the shard's own path, with flash-attn ----------------------------------------------------

@needs_flash_attn
def test_graphs_are_captured_at_warmup(load_cuda, tiny_llama):
    engine = load_cuda(tiny_llama, SIZES)
    assert engine.model.backend.name == "flash-attn"
    assert engine.graphs is not None and engine.graphs.sizes == (1, 2, 4)
    assert load_cuda(tiny_llama, "0").graphs is None


@needs_flash_attn
def test_greedy_decode_with_graphs_equals_without(load_cuda, tiny_llama):
    """As the torch-only test above, with flash-attn: its kvcache kernel replayed against its varlen
    kernel run eagerly."""
    block = None
    runs = []
    for sizes in ("0", SIZES):
        engine = load_cuda(tiny_llama, sizes)
        block = engine.block_size
        pool = BlockPool(block)
        requests = [greedy_request(i, p, 4 + 2 * i, pool, top_n_tokens=2) for i, p in enumerate(prompts(8, seed=11))]
        runs.append(generate_with_gaps(engine, requests))
        if engine.graphs is not None:
            assert engine.graphs.num_replays >= 4 * 2  # at least two steps at each of 4, 3, 2, 1 rows
    assert block == 256
    assert_same_greedy(runs[1], runs[0])


@needs_flash_attn
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
    assert_same_argmax(replayed, varlen)
    torch.testing.assert_close(replayed, varlen, **LOGITS_BF16)  # bf16: two kernels, two orders
