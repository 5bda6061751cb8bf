"""Multi-node tensor parallelism on loopback: two `text-generation-server serve` processes, each
as the only shard of its own "node" (LOCAL_RANK 0, its own TCP address), one gloo group. The
router dials rank 0's Unix socket, discovers both ranks' TCP addresses, and the sharded group
generates what a single shard generates."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pytgi_proto import generate_pb2 as pb
from router.scheduler.client import ShardedClient, ShardError
from tests.conftest import save_tiny
from tests.router.scheduler.test_client import _request, _stop

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(model: Path, prefix: str, log_path: str, env: dict, *args: str) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([str(BIN / "text-generation-server"), "serve", str(model), "--uds-path", prefix, *args],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTGI_NUM_THREADS": "1", **env})


def _wait_for(paths: list[str], procs: list[subprocess.Popen], logs: list[str]) -> None:
    deadline = time.monotonic() + 120
    while not all(os.path.exists(p) for p in paths):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            pytest.fail("shards did not start:\n" + "\n".join(Path(l).read_text(errors="replace")[-2000:] for l in logs))
        time.sleep(0.1)


async def _generate(socket_path: str) -> tuple[list[str], dict[int, list[int]]]:
    for _ in range(100):  # the socket appears at bind time; retry until the server has started
        try:
            client = await ShardedClient.connect(socket_path)
            break
        except ShardError:
            await asyncio.sleep(0.1)
    try:
        urls = [c.url for c in client.clients]
        await client.warmup(pb.WarmupRequest(max_prefill_tokens=32, max_batch_total_tokens=256))
        prompts = [[1, 5, 9, 14, 20], [1, 33, 2], [1, 70, 71, 72, 73, 74, 75]]
        batch = pb.Batch(id=1, requests=[_request(i, p, 6, [1 + i]) for i, p in enumerate(prompts)],
                         size=3, max_tokens=33, max_blocks=1)
        outputs: dict[int, list[int]] = {}
        step = await client.prefill(batch)
        while True:
            for g in step.generations:
                outputs.setdefault(g.request_id, []).extend(g.tokens.ids)
            if not step.HasField("batch"):
                return urls, outputs
            step = await client.decode([step.batch])
    finally:
        await client.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("multinode-llama"))


def test_two_nodes_on_loopback_generate_like_one_shard(tiny):
    folder = tempfile.mkdtemp(prefix="pytgi-mn-")
    procs: list[subprocess.Popen] = []
    try:
        single_prefix = os.path.join(folder, "single")
        logs = [os.path.join(folder, f"{n}.log") for n in ("single", "node0", "node1")]
        procs.append(_start(tiny, single_prefix, logs[0], {}))
        _wait_for([f"{single_prefix}-0"], procs, logs[:1])
        _, expected = asyncio.run(_generate(f"{single_prefix}-0"))
        _stop(procs.pop())

        master, tcp0, tcp1 = _free_port(), _free_port(), _free_port()
        common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "LOCAL_RANK": "0"}
        # Each node has its own socket folder, as on two hosts; rank 1 is reachable over TCP only.
        node0, node1 = os.path.join(folder, "n0"), os.path.join(folder, "n1")
        procs.append(_start(tiny, node0, logs[1], {**common, "RANK": "0"}, "--sharded", "--tcp-address", f"127.0.0.1:{tcp0}"))
        procs.append(_start(tiny, node1, logs[2], {**common, "RANK": "1"}, "--sharded", "--tcp-address", f"127.0.0.1:{tcp1}"))
        _wait_for([f"{node0}-0", f"{node1}-1"], procs, logs[1:])
        urls, got = asyncio.run(_generate(f"{node0}-0"))
    finally:
        for proc in procs:
            _stop(proc)
        shutil.rmtree(folder, ignore_errors=True)
    assert urls == [f"127.0.0.1:{tcp0}", f"127.0.0.1:{tcp1}"]
    assert got == expected and all(len(tokens) == 6 for tokens in got.values())


def test_tcp_address_is_validated():
    result = subprocess.run([str(BIN / "text-generation-server"), "serve", "--tcp-address", "nohost"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "--tcp-address must be HOST:PORT (got 'nohost')" in result.stderr
