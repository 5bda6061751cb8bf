"""CUDA-graph decode on CPU: the size choice, the padded static inputs, the fallbacks, and the
whole replay path (static buffers → model forward with the kv-cache decode backend → sliced
logits) through an eager stand-in for the capture, against the eager engine."""

from __future__ import annotations

import logging
import random
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from pytgi_proto import generate_pb2 as pb
from shard.batch import Batch
from shard.graph_sizes import parse_cuda_graphs
from shard.cuda_graphs import (
    DEFAULT_SIZES, DecodeGraphs, KVCacheDecodeBackend, capture_decode_graphs, decode_graph_sizes, pick_size,
    plan_decode,
)
from tests.conftest import make_engine
from tests.shard.helpers import BlockPool, collect, generate, greedy_request

BLOCK = 4
SIZES = (1, 2, 4)


class EagerCapture:
    """The `GraphCapture` stand-in: runs the function once at capture (as the CUDA capture's
    warmup run does) and again at every replay, on the same static buffers."""

    def __init__(self):
        self.captured_rows: list[int] = []

    def capture(self, fn):
        self.captured_rows.append(fn().shape[0])
        return fn


def sdpa_decode(q, k_cache, v_cache, kv_lens, block_tables, scale):
    """What flash_attn_with_kvcache computes for one query per row, in torch: the rows' blocks
    gathered through the (fixed-width) block table, keys past each row's length masked."""
    batch, width = block_tables.shape
    block = k_cache.shape[1]
    keys = k_cache[block_tables.long()].view(batch, width * block, *k_cache.shape[2:]).transpose(1, 2)
    values = v_cache[block_tables.long()].view(batch, width * block, *v_cache.shape[2:]).transpose(1, 2)
    mask = (torch.arange(width * block) < kv_lens.long()[:, None]).view(batch, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def attach_graphs(engine, sizes=SIZES, width=16) -> EagerCapture:
    capture = EagerCapture()
    backend = KVCacheDecodeBackend(engine.model.backend.scale, sdpa_decode)
    engine.graphs = DecodeGraphs(engine.model, engine.kv_cache, sizes, width, capture, backend)
    return capture


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 120) for _ in range(rng.randrange(3, 20))] for _ in range(count)]


def prefill(engine, requests, batch_id=1) -> pb.PrefillResponse:
    return engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests))))


# -- configuration and size choice ------------------------------------------------------------

def test_parse_cuda_graphs_tgi_format():
    assert parse_cuda_graphs("1,2,4,8,16,32") == (1, 2, 4, 8, 16, 32)
    assert parse_cuda_graphs(" 8, 1,8 ") == (1, 8)  # sorted, deduplicated
    assert parse_cuda_graphs("0") == ()
    assert parse_cuda_graphs(None) is None and parse_cuda_graphs("") is None
    for bad in ("0,1", "-1", "a", "1,,2", "1.5"):
        with pytest.raises(ValueError, match="--cuda-graphs"):
            parse_cuda_graphs(bad)


def test_pick_size_is_the_smallest_that_holds_the_batch():
    assert [pick_size(SIZES, n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, None]


def test_sizes_only_on_cuda_with_flash_attn_and_the_fast_path(caplog):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="shard.cuda_graphs"):
        assert decode_graph_sizes((1, 2), cuda, "flash-attn", "llama") == (1, 2)
        assert decode_graph_sizes(None, cuda, "flash-attn", "llama") == DEFAULT_SIZES
        assert decode_graph_sizes((), cuda, "flash-attn", "llama") == ()
        assert decode_graph_sizes((1, 2), cpu, "cpu-paged", "llama") == ()
        assert decode_graph_sizes((1, 2), cuda, "sdpa", "llama") == ()
        assert decode_graph_sizes((1, 2), cuda, "flash-attn", "transformers") == ()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4 + (not DEFAULT_SIZES)  # one line per decision that turns them off
    assert sum("ignored on cpu (--cuda-graphs 1,2)" in m for m in messages) == 1


def test_cpu_engine_captures_nothing_and_says_so(tiny_llama, caplog):
    with caplog.at_level(logging.INFO, logger="shard.cuda_graphs"):
        engine = make_engine(tiny_llama, block_size=BLOCK)  # --cuda-graphs unset: not a word on CPU
        assert engine.graphs is None and not caplog.records
        config = replace(engine.config, cuda_graphs=(1, 2))
        assert capture_decode_graphs(engine.model, engine.kv_cache, config, 512) is None
    assert [r.getMessage() for r in caplog.records] == ["CUDA graphs: ignored on cpu (--cuda-graphs 1,2)"]


# -- the padded static inputs -----------------------------------------------------------------

def test_plan_pads_to_the_captured_size_with_block_zero_rows(tiny_llama):
    engine = make_engine(tiny_llama, block_size=BLOCK)
    pool = BlockPool(BLOCK)
    batch_prompts = prompts(3, seed=1)
    response = prefill(engine, [greedy_request(i, p, 8, pool) for i, p in enumerate(batch_prompts)])
    batch = engine.batches[response.batch.id]
    width = 6
    plan = plan_decode(batch, SIZES, BLOCK, width)
    assert (plan.size, plan.num_rows, plan.sample_rows, plan.sample_logits) == (4, 3, [0, 1, 2], [0, 1, 2])
    ids, positions, slots = plan.longs.tolist()
    kv_lens, tables = plan.ints[:4].tolist(), plan.ints[4:].view(4, width).tolist()
    for row, r in enumerate(batch.requests):
        position = len(r.prompt_ids)
        assert (ids[row], positions[row], kv_lens[row]) == (r.output_ids[-1], position, position + 1)
        assert slots[row] == r.blocks[position // BLOCK] * BLOCK + position % BLOCK
        used = position // BLOCK + 1
        assert tables[row] == r.blocks[:used] + [0] * (width - used)
    # The padding row: token 0 at position 0 into slot 0 of the reserved block 0, reading 1 token.
    assert (ids[3], positions[3], slots[3], kv_lens[3], tables[3]) == (0, 0, 0, 1, [0] * width)


def test_prefill_mixed_probe_too_large_and_too_long_steps_run_eagerly(tiny_llama):
    engine = make_engine(tiny_llama, block_size=BLOCK)
    pool = BlockPool(BLOCK)
    fresh = Batch.from_pb(pb.Batch(id=9, requests=[greedy_request(50, [5, 6, 7], 4, pool)], size=1), 128,
                          torch.device("cpu"))
    assert plan_decode(fresh, SIZES, BLOCK, 16) is None  # a prefill
    response = prefill(engine, [greedy_request(i, p, 8, pool) for i, p in enumerate(prompts(5, seed=2))])
    five = engine.batches[response.batch.id]
    assert plan_decode(five, SIZES, BLOCK, 16) is None  # larger than every captured size
    two = five.filter([0, 1])
    assert plan_decode(two, SIZES, BLOCK, 16).size == 2
    mixed = Batch.concatenate([two, fresh], 3)
    assert plan_decode(mixed, SIZES, BLOCK, 16) is None  # a decode row next to a prompt
    narrow = max(len(r.prompt_ids) for r in two.requests) // BLOCK  # one block short for the longest row
    assert plan_decode(two, SIZES, BLOCK, narrow) is None and plan_decode(two, SIZES, BLOCK, narrow + 1) is not None
    probe = pb.Request(id=7, input_ids=[3], blocks=[0], slots=[0],
                       stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=2))
    probe_batch = Batch.from_pb(pb.Batch(id=8, requests=[probe], size=1), 128, torch.device("cpu"))
    probe_batch.requests[0].num_computed, probe_batch.requests[0].output_ids = 1, [4]  # as after its prefill
    assert plan_decode(probe_batch, SIZES, BLOCK, 16) is None  # explicit slots


# -- replay against the eager engine ----------------------------------------------------------

def test_capture_runs_largest_first_and_writes_only_block_zero(tiny_llama):
    engine = make_engine(tiny_llama, block_size=BLOCK)
    storage = engine.kv_cache._storage
    storage.normal_()
    before = storage.clone()
    capture = attach_graphs(engine)
    assert capture.captured_rows == [4, 2, 1]
    assert torch.equal(storage[:, :, 1:], before[:, :, 1:])
    assert not torch.equal(storage[:, :, 0, 0], before[:, :, 0, 0])  # the padding rows' slot


def test_replayed_decode_equals_eager_logits_tokens_and_cache(tiny_llama):
    """Five requests finishing one step apart: batch 5 (eager: larger than every size), then 4,
    3 (padded to 4), 2 and 1 replayed. Logits, tokens and every cache block but 0 agree."""
    eager, graphed = make_engine(tiny_llama, block_size=BLOCK), make_engine(tiny_llama, block_size=BLOCK)
    attach_graphs(graphed)
    batch_prompts = prompts(5, seed=3)
    responses, outputs = [], ({}, {})
    for engine in (eager, graphed):
        pool = BlockPool(BLOCK)
        requests = [greedy_request(i, p, 2 + i, pool) for i, p in enumerate(batch_prompts)]
        responses.append(prefill(engine, requests))
    for engine, response, out in zip((eager, graphed), responses, outputs):
        collect(response.generations, out)
    sizes_seen = []
    while responses[0].HasField("batch"):
        assert list(responses[0].batch.request_ids) == list(responses[1].batch.request_ids)
        batch_id = responses[0].batch.id
        # The step's logits both ways, before the steps themselves (which rewrite the same K/V).
        rows_e, logits_e = eager._forward(eager.batches[batch_id])
        rows_g, logits_g = graphed._forward(graphed.batches[batch_id])
        assert logits_g.shape == logits_e.shape and rows_g.sample_rows == rows_e.sample_rows
        torch.testing.assert_close(logits_g, logits_e, rtol=1e-5, atol=1e-5)
        sizes_seen.append((len(rows_g.sample_rows), getattr(rows_g, "size", None)))
        responses = [engine.decode(pb.DecodeRequest(batches=[r.batch]))
                     for engine, r in zip((eager, graphed), responses)]
        for response, out in zip(responses, outputs):
            collect(response.generations, out)
        lps = [[g.tokens.logprobs[0] for g in r.generations] for r in responses]
        assert lps[0] == pytest.approx(lps[1], abs=1e-5)
    assert outputs[0] == outputs[1]
    assert sizes_seen == [(5, None), (4, 4), (3, 4), (2, 2), (1, 1)]
    assert graphed.graphs.num_replays == 8  # 4 sizes, each once in _forward and once in the step
    kv_e, kv_g = eager.kv_cache._storage, graphed.kv_cache._storage
    torch.testing.assert_close(kv_g[:, :, 1:], kv_e[:, :, 1:], rtol=1e-5, atol=1e-5)


def test_padding_rows_are_reset_every_step(tiny_llama):
    """A 4-row step then a 3-row one at size 4: row 3 of the static buffers must be padding
    again, or the stale row would write into a finished request's slot."""
    engine = make_engine(tiny_llama, block_size=BLOCK)
    attach_graphs(engine)
    pool = BlockPool(BLOCK)
    max_new = [4, 4, 4, 2]
    requests = [greedy_request(i, p, n, pool) for i, (p, n) in enumerate(zip(prompts(4, seed=4), max_new))]
    response = prefill(engine, requests)
    response = engine.decode(pb.DecodeRequest(batches=[response.batch]))  # 4 rows; request 3 finishes
    assert engine.graphs._longs[2, 3].item() != 0
    engine.decode(pb.DecodeRequest(batches=[response.batch]))  # 3 rows, padded to 4
    assert engine.graphs._longs[:, 3].tolist() == [0, 0, 0]
    assert engine.graphs._ints[3].item() == 1


def test_shard_cli_rejects_a_bad_cuda_graphs_before_loading(monkeypatch):
    from click.testing import CliRunner

    from shard.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_GRAPHS"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["serve", "--cuda-graphs", "4,0", "--device", "cpu"])
    assert result.exit_code == 1
    assert "error: --cuda-graphs must be positive batch sizes separated by commas, or 0 (got '4,0')" in result.output


def test_a_failed_capture_leaves_the_engine_decoding_eagerly(tiny_llama, monkeypatch, caplog):
    """Graphs are an optimisation: a capture that fails (an op that syncs while capturing, out of
    memory in the margin) logs one line and the engine serves eagerly, as in TGI."""
    import contextlib

    import shard.cuda_graphs as cuda_graphs

    class FailingCapture:
        def __init__(self, device):
            pass

        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    engine = make_engine(tiny_llama, block_size=BLOCK)
    monkeypatch.setattr(cuda_graphs, "decode_graph_sizes", lambda *args: (1, 2))
    monkeypatch.setattr(cuda_graphs, "FlashDecode", lambda: sdpa_decode)
    monkeypatch.setattr(cuda_graphs, "CudaGraphCapture", FailingCapture)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    with caplog.at_level(logging.WARNING, logger="shard.cuda_graphs"):
        assert capture_decode_graphs(engine.model, engine.kv_cache, engine.config, 512) is None
    assert emptied == [True]
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA graphs: capture failed, decoding eagerly: RuntimeError: operation not permitted when stream is capturing"]
    pool = BlockPool(BLOCK)
    requests = [greedy_request(i, p, 4, pool) for i, p in enumerate(prompts(2, 5))]
    assert engine.graphs is None
    outputs = generate(engine, requests)  # the engine still steps, eagerly
    assert sorted(outputs) == [0, 1] and all(len(ids) == 4 for ids in outputs.values())
