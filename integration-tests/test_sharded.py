"""Tensor parallel over 3 CPU shards (gloo) with the bundled SmolLM2 (9 heads, 3 KV heads)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import free_port, start_launcher, stop_launcher
from test_launcher import alive, children

PROMPTS = [f"<|im_start|>user\nName {n} animals.<|im_end|>\n<|im_start|>assistant\n" for n in (2, 3, 4)]


def generate(url: str, prompt: str) -> str:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 16}}
    response = requests.post(f"{url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def sample(url: str, prompt: str, seed: int | None = None) -> tuple[str, int]:
    parameters = {"max_new_tokens": 16, "do_sample": True, "temperature": 0.7, "details": True}
    if seed is not None:
        parameters["seed"] = seed
    response = requests.post(f"{url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["generated_text"], body["details"]["seed"]


@pytest.fixture(scope="module")
def expected(url) -> list[str]:
    """The one-shard session server's greedy answers: what every topology here must write."""
    return [generate(url, p) for p in PROMPTS]


def test_two_shards_is_a_clear_error():
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "text-generation-launcher"), "--num-shard", "2",
         "--port", str(free_port()), "--shard-uds-path", "/tmp/pytgi-tp2-check"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "9 attention heads cannot be split over 2 shards" in result.stdout + result.stderr


def test_three_shards_equal_one_and_a_dead_rank_stops_everything(url, expected):
    server = start_launcher("--num-shard", "3")
    try:
        assert requests.get(f"{server.url}/info", timeout=10).json()["num_shard"] == 3
        # Several requests at once: each rank reports the requests with id % 3 == rank.
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: generate(server.url, p), PROMPTS))
        assert got == expected
        # Unseeded sampling: the router assigns the seed, so every rank draws the same tokens;
        # the reported seed reproduces the text, on 3 shards and on one.
        with ThreadPoolExecutor(3) as pool:
            sampled = list(pool.map(lambda p: sample(server.url, p), PROMPTS + PROMPTS[:1]))
        assert len({seed for _, seed in sampled}) == 4
        # Replayed at once on 3 shards (three ranks per step are slow on 2 cores: one run of steps
        # for the four, not four) and one by one on one shard: a seeded sample is the same in any batch.
        with ThreadPoolExecutor(4) as pool:
            replayed = list(pool.map(lambda pair: sample(server.url, pair[0], pair[1][1]),
                                     zip(PROMPTS + PROMPTS[:1], sampled)))
        assert replayed == sampled
        for prompt, (text, seed) in zip(PROMPTS + PROMPTS[:1], sampled):
            assert sample(url, prompt, seed) == (text, seed)
        descendants = children(server.process.pid)
        ranks = [pid for pid in descendants if b"serve" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(ranks) == 3
        started = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        assert server.process.wait(timeout=120) != 0
        assert time.monotonic() - started < 60
        time.sleep(0.5)
        assert not [pid for pid in descendants if alive(pid)]
    finally:
        stop_launcher(server)


def test_three_nodes_on_loopback_equal_one_shard(expected, tmp_path):
    """Multi-node recipe on one host: three launchers (--nnodes 3 --node-rank k), one shard each,
    every node's shards on its own TCP port; node 0 runs the router and reaches ranks 1-2 over TCP."""
    master, tcp = free_port(), [free_port() for _ in range(3)]
    common = ["--nnodes", "3", "--num-shard", "1", "--master-addr", "127.0.0.1", "--master-port", str(master)]
    exe = os.path.join(os.path.dirname(sys.executable), "text-generation-launcher")
    others = []
    for node in (1, 2):
        log = open(tmp_path / f"node{node}.log", "w")
        others.append(subprocess.Popen(
            [exe, *common, "--node-rank", str(node), "--shard-tcp-address", f"127.0.0.1:{tcp[node]}",
             "--shard-uds-path", str(tmp_path / f"n{node}"), "--port", str(free_port())],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    server = None
    try:
        server = start_launcher(*common, "--node-rank", "0", "--shard-tcp-address", f"127.0.0.1:{tcp[0]}")
        assert requests.get(f"{server.url}/info", timeout=10).json()["num_shard"] == 3
        with ThreadPoolExecutor(3) as pool:  # at once, as on one launcher: each rank reports its own
            assert list(pool.map(lambda p: generate(server.url, p), PROMPTS)) == expected
        assert "ready: shards 1..1 of 3" in (tmp_path / "node1.log").read_text()
    finally:
        if server is not None:
            assert stop_launcher(server) == 0
        for proc in others:
            # Node 0 went away: the remote shards' collectives fail or they get SIGTERM here.
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
