"""The router's gRPC client against a real shard process on a Unix socket (tiny random Llama),
the ShardedClient merge / fan-out rules on fake shards, and the benchmark's helpers and CLI."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import save_tiny

from benchmarks.report import Stats, format_table, percentile
from pytgi_proto import generate_pb2 as pb
from router.scheduler.client import ShardClient, ShardedClient, ShardError, _merge_steps

BIN = Path(sys.executable).parent


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("client-tiny-llama"))


@pytest.fixture(scope="module")
def shard(tiny_folder):
    """A real `text-generation-server serve` process; yields rank 0's socket path."""
    # A short folder of our own: Unix socket paths are limited to ~108 bytes.
    folder = tempfile.mkdtemp(prefix="pytgi-client-")
    prefix = os.path.join(folder, "s")
    log = open(os.path.join(folder, "shard.log"), "wb")
    proc = subprocess.Popen([str(BIN / "text-generation-server"), "serve", str(tiny_folder), "--uds-path", prefix],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(f"{prefix}-0"):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"shard did not start (rc={proc.poll()}):\n"
                            + Path(folder, "shard.log").read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        yield f"{prefix}-0"
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def run(coro):
    return asyncio.run(coro)


async def _connect(socket_path: str) -> ShardedClient:
    # The socket appears at bind time; retry the first RPC until the server has started.
    for _ in range(100):
        try:
            return await ShardedClient.connect(socket_path)
        except ShardError:
            await asyncio.sleep(0.1)
    return await ShardedClient.connect(socket_path)


def _request(rid: int, prompt: list[int], max_new_tokens: int, blocks: list[int]) -> pb.Request:
    return pb.Request(
        id=rid, input_ids=prompt, blocks=blocks,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new_tokens, ignore_eos_token=True),
    )


# -- against a real shard ---------------------------------------------------------------------

def test_info_health_discovery(shard, tiny_folder):
    async def go():
        client = await _connect(shard)
        try:
            info = await client.info()
            await client.health()
            return info, await client.service_discovery(), client.world_size
        finally:
            await client.close()

    info, urls, world_size = run(go())
    assert info.block_size == 16 and info.eos_token_ids == [127] and info.vocab_size == 128
    assert info.model_path == str(tiny_folder) and info.model_impl == "llama" and info.world_size == 1
    assert not info.requires_padding and info.device_type == "cpu"
    assert urls == [f"unix://{shard}"] and world_size == 1


def test_warmup_prefill_decode_filter_clear(shard, tiny_folder):
    prompts = [[1, 5, 9, 14, 20], [1, 33, 2], [1, 70, 71, 72, 73, 74, 75]]

    async def go():
        client = await _connect(shard)
        try:
            warm = await client.warmup(pb.WarmupRequest(
                batch=pb.Batch(id=0, requests=[_request(0, prompts[0], 2, [])], size=1),
                max_prefill_tokens=16, max_batch_total_tokens=160,
            ))
            batch = pb.Batch(id=7, requests=[_request(i, p, 4, [1 + i]) for i, p in enumerate(prompts)],
                             size=3, max_tokens=48, max_blocks=1)
            prefill = await client.prefill(batch)
            decode = await client.decode([prefill.batch])
            kept = await client.filter_batch(7, [0, 2])
            decode2 = await client.decode([kept])
            emptied = await client.filter_batch(7, [])
            await client.clear_cache(7)
            with pytest.raises(ShardError) as gone:
                await client.decode([kept])
            await client.clear_cache(None)
            return warm, prefill, decode, kept, decode2, emptied, gone.value
        finally:
            await client.close()

    warm, prefill, decode, kept, decode2, emptied, gone = run(go())
    assert warm.num_blocks == 11 and warm.max_supported_total_tokens == 160 and warm.block_size == 16
    assert [g.request_id for g in prefill.generations] == [0, 1, 2]
    assert list(prefill.batch.request_ids) == [0, 1, 2] and prefill.batch.size == 3
    assert prefill.batch.current_tokens == 3 and prefill.total_ns >= prefill.forward_ns > 0
    assert [g.request_id for g in decode.generations] == [0, 1, 2]
    assert kept.id == 7 and list(kept.request_ids) == [0, 2] and kept.size == 2
    assert [g.request_id for g in decode2.generations] == [0, 2]
    assert not any(g.HasField("finished") for g in decode2.generations)
    assert emptied is None  # nothing kept: the shard's empty CachedBatch maps to None
    assert gone.code == "NOT_FOUND" and "batch 7 not found" in gone.message

    # Greedy tokens match transformers' generate (the correctness oracle) through the wire.
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    expected = model.generate(torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=3, min_new_tokens=3,
                              pad_token_id=0)[0, len(prompts[0]):].tolist()
    ours = [prefill.generations[0].tokens.ids[0], decode.generations[0].tokens.ids[0],
            decode2.generations[0].tokens.ids[0]]
    assert ours == expected


def test_errors_carry_status_and_shard_message(shard):
    async def go():
        client = await _connect(shard)
        try:
            await client.warmup(pb.WarmupRequest(max_prefill_tokens=16, max_batch_total_tokens=64))
            with pytest.raises(ShardError) as unknown:
                await client.decode([pb.CachedBatch(id=424242)])
            with pytest.raises(ShardError) as invalid:
                await client.prefill(pb.Batch(id=1, requests=[_request(3, [], 2, [1])], size=1))
            await client.health()  # the shard survives failed RPCs
            return unknown.value, invalid.value
        finally:
            await client.close()

    unknown, invalid = run(go())
    assert unknown.code == "NOT_FOUND" and "batch 424242 not found" in unknown.message
    assert unknown.url == f"unix://{shard}" and "NOT_FOUND" in str(unknown)
    assert invalid.code == "INVALID_ARGUMENT" and "empty input_ids" in invalid.message


def test_unreachable_shard_is_a_shard_error(tmp_path):
    async def go():
        client = ShardClient(str(tmp_path / "nobody-0"))
        try:
            await client.health()
        finally:
            await client.close()

    with pytest.raises(ShardError) as error:
        run(go())
    assert error.value.code == "UNAVAILABLE"


# -- ShardedClient rules on fake shards -------------------------------------------------------

class FakeShard:
    def __init__(self, rank: int, fail: bool = False, delay: float = 0.0):
        self.rank, self.fail, self.delay, self.cancelled = rank, fail, delay, False

    async def decode(self, batches, updates):
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail:
            raise ShardError("INTERNAL", f"rank {self.rank} broke")
        return pb.DecodeResponse(
            generations=[pb.Generation(request_id=i) for i in range(4) if i % 2 == self.rank],
            batch=pb.CachedBatch(id=1, request_ids=[0, 1, 2, 3], size=4),
            forward_ns=10 * (self.rank + 1), decode_ns=1, total_ns=100 - self.rank,
        )

    async def warmup(self, request):
        return pb.WarmupResponse(max_supported_total_tokens=160 - 16 * self.rank, num_blocks=11 - self.rank,
                                 block_size=16, max_input_tokens=10, max_total_tokens=20)


def test_sharded_merges_generations_batch_and_slowest_timings():
    client = ShardedClient([FakeShard(0), FakeShard(1)])
    merged = run(client.decode([pb.CachedBatch(id=1)]))
    assert sorted(g.request_id for g in merged.generations) == [0, 1, 2, 3]
    assert merged.batch.size == 4 and merged.total_ns == 100 and merged.forward_ns == 10
    warm = run(client.warmup(pb.WarmupRequest()))
    assert warm.max_supported_total_tokens == 144 and warm.num_blocks == 10 and warm.block_size == 16
    single = pb.DecodeResponse(total_ns=5)
    assert _merge_steps([single]) is single


def test_sharded_failure_cancels_the_other_shards():
    slow = FakeShard(0, delay=30)
    client = ShardedClient([slow, FakeShard(1, fail=True)])
    start = time.monotonic()
    with pytest.raises(ShardError, match="rank 1 broke"):
        run(client.decode([pb.CachedBatch(id=1)]))
    assert slow.cancelled and time.monotonic() - start < 15  # not the slow shard's 30 s


# -- benchmark helpers and CLI ----------------------------------------------------------------

def test_percentile_and_stats():
    samples = [4.0, 1.0, 3.0, 2.0]
    assert percentile(samples, 50) == 2.5  # numpy's linear interpolation
    assert percentile(samples, 0) == 1.0 and percentile(samples, 100) == 4.0
    assert percentile(list(range(1, 101)), 90) == pytest.approx(90.1)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile(samples, 101)
    stats = Stats.of(samples)
    assert (stats.count, stats.mean, stats.min, stats.max, stats.p50) == (4, 2.5, 1.0, 4.0, 2.5)
    assert Stats.of([]).count == 0


def test_format_table_is_fixed_width():
    table = format_table(["batch", "tok/s", "x"], [[1, 12.345, "1.50x"], [32, 1234.5, "-"]])
    lines = table.splitlines()
    assert lines[0] == "batch |   tok/s |     x"
    assert set(lines[1]) <= {"-", "+"} and len({len(line) for line in lines}) == 1
    assert lines[2] == "    1 |    12.3 | 1.50x"
    assert lines[3] == "   32 | 1,234.5 |     -"


def test_benchmark_cli_launches_a_shard(tiny_folder, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [str(BIN / "text-generation-benchmark"), "--launch", "--model-id", str(tiny_folder),
         "--batch-size", "1", "--batch-size", "2", "--sequence-length", "8", "--decode-length", "4",
         "--runs", "1", "--json-out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("batch"))
    for column in ("prefill ms p50", "prefill tok/s", "decode ms p50", "decode tok/s", "total tok/s"):
        assert column in header
    assert [line.split("|")[0].strip() for line in lines[lines.index(header) + 2:]] == ["1", "2"]
    import json

    report = json.loads(out.read_text())
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    assert report["results"][1]["decode_step_ms"]["count"] == 3  # 4 tokens: 1 from prefill + 3 decodes
