"""Launcher-level behaviour: admission limit, and a crashed shard taking everything down cleanly."""

from __future__ import annotations

import os
import signal
import threading
import time

import requests

from conftest import start_launcher, stop_launcher


STORY = "<|im_start|>user\nWrite a long story about a dragon and a knight.<|im_end|>\n<|im_start|>assistant\n"


def children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                found.append(int(entry))
                frontier.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_admission_limit_and_shard_crash():
    server = start_launcher("--max-concurrent-requests", "1")
    try:
        # One long stream holds the only permit; a second request is refused at once.
        stream = requests.post(f"{server.url}/generate_stream", stream=True, timeout=120,
                               json={"inputs": STORY, "parameters": {"max_new_tokens": 400}})
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith(b"data:"))
        refused = requests.post(f"{server.url}/generate", timeout=30,
                                json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
        assert refused.status_code == 429
        assert refused.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        threading.Thread(target=lambda: [None for _ in lines], daemon=True).start()

        # Kill the shard: the launcher must notice, tear down the router and exit non-zero.
        descendants = children(server.process.pid)
        shards = [pid for pid in descendants if b"serve" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert shards, descendants
        started = time.monotonic()
        os.kill(shards[0], signal.SIGKILL)
        code = server.process.wait(timeout=60)
        assert code != 0
        assert time.monotonic() - started < 30
        time.sleep(0.5)
        assert not [pid for pid in descendants if alive(pid)], "orphaned child processes"
        assert "shard-0" in server.log() or "shard 0" in server.log()
    finally:
        stop_launcher(server)
