"""Launcher-level behaviour: admission limit, a crashed shard taking everything down cleanly while
streams run, and SIGTERM draining a stream before the shards stop."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import requests

from conftest import start_launcher, stop_launcher


STREAMS = 8
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


def read_stream(lines, outcome: dict) -> None:
    """Consume an SSE stream's lines; record how it ended ("error-event", "finished", "cut",
    "exception") and when."""
    kind = "cut"
    try:
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                kind = "error-event"
            elif event.get("generated_text") is not None:
                kind = "finished"
    except requests.RequestException:
        kind = "exception"
    outcome.update(kind=kind, at=time.monotonic())


def test_admission_limit_and_shard_crash_during_streams():
    server = start_launcher("--max-concurrent-requests", str(STREAMS))
    try:
        # STREAMS long streams hold every permit; one more request is refused at once.
        streams = [requests.post(f"{server.url}/generate_stream", stream=True, timeout=120,
                                 json={"inputs": STORY, "parameters": {"max_new_tokens": 400}})
                   for _ in range(STREAMS)]
        # NOTE: one iter_lines() per stream, kept: a discarded one closes the connection (urllib3).
        lines = [stream.iter_lines() for stream in streams]
        for stream, stream_lines in zip(streams, lines):
            assert stream.status_code == 200
            next(line for line in stream_lines if line.startswith(b"data:"))  # generating now
        refused = requests.post(f"{server.url}/generate", timeout=30,
                                json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
        assert refused.status_code == 429
        assert refused.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        outcomes = [{} for _ in streams]
        readers = [threading.Thread(target=read_stream, args=pair, daemon=True) for pair in zip(lines, outcomes)]
        for reader in readers:
            reader.start()

        # Kill a shard: every stream must end with an error, not hang to its 400 tokens (or the
        # client's 120 s timeout), and the launcher must notice, tear down the router and exit
        # non-zero. It takes well under a second; the limits leave room for a busy 2-core machine.
        descendants = children(server.process.pid)
        shards = [pid for pid in descendants if b"serve" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert shards, descendants
        started = time.monotonic()
        os.kill(shards[0], signal.SIGKILL)
        for reader in readers:
            reader.join(timeout=max(started + 15 - time.monotonic(), 0))
        assert all(outcome.get("kind") in ("error-event", "exception") for outcome in outcomes), outcomes
        slowest = max(outcome["at"] for outcome in outcomes) - started
        assert slowest < 15
        code = server.process.wait(timeout=60)
        exited = time.monotonic() - started
        assert code != 0
        time.sleep(0.5)
        assert not [pid for pid in descendants if alive(pid)], "orphaned child processes"
        assert "shard-0" in server.log() or "shard 0" in server.log()
        print(f"\nshard SIGKILL: {STREAMS} streams ended in {slowest:.2f} s "
              f"({sorted(o['kind'] for o in outcomes)}), launcher exited {code} after {exited:.1f} s")
    finally:
        stop_launcher(server)


def test_sigterm_drains_a_stream_then_stops_router_before_shards():
    server = start_launcher("--graceful-termination-timeout", "60")
    try:
        descendants = children(server.process.pid)
        stream = requests.post(f"{server.url}/generate_stream", stream=True, timeout=120,
                               json={"inputs": STORY, "parameters": {"max_new_tokens": 120, "details": True}})
        lines = (line for line in stream.iter_lines() if line.startswith(b"data:"))
        events = [json.loads(next(lines)[5:])]
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # the router gets SIGTERM from the launcher a moment later
            refused = requests.post(f"{server.url}/generate", timeout=30,
                                    json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
            if refused.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert refused.json()["error_type"] == "unavailable"
        events += [json.loads(line[5:]) for line in lines]
        streamed = time.monotonic() - started
        assert "error" not in events[-1], events[-1]
        assert events[-1]["generated_text"] is not None
        assert [e["index"] for e in events] == list(range(1, events[-1]["details"]["generated_tokens"] + 1))
        code = server.process.wait(timeout=60)
        stopped = time.monotonic() - started
        assert code == 0, server.log()[-3000:]
        time.sleep(0.5)
        assert not [pid for pid in descendants if alive(pid)], "orphaned child processes"
        log = server.log()
        assert log.index("drained in") < log.index("terminating shard 0")
        print(f"\ndrain: a {len(events)}-token stream finished {streamed:.1f} s after SIGTERM; "
              f"launcher exited 0 after {stopped:.1f} s")
    finally:
        stop_launcher(server)


def test_max_total_tokens_past_the_model_positions_is_refused_at_start():
    """Positions past the model's would fail a shared step at the first long request: the
    launcher stops with one line naming both numbers instead (SmolLM2 has 8192 positions)."""
    with pytest.raises(RuntimeError) as info:
        start_launcher("--max-total-tokens", "9000", "--max-input-tokens", "100")
    assert "exited with" in str(info.value)
    assert "`max_total_tokens` (9000) exceeds the model's `max_position_embeddings` (8192)" in str(info.value)
