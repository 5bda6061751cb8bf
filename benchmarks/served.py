"""Launched servers for the HTTP benchmarks that compare settings in one run (speculation_bench,
lora_bench): start `text-generation-launcher` on a free port and wait for /health, run loads
with benchmarks/loadgen.py and sum them per setting (`Tally`), read a histogram from /metrics,
stop the whole process group."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks import loadgen

READY_TIMEOUT_S = 600


def default_launcher() -> str:
    """The launcher installed beside this Python (the venv's, when run as `.venv/bin/python -m
    benchmarks...` without the venv on PATH), else the one on PATH."""
    beside = Path(sys.executable).with_name("text-generation-launcher")
    return str(beside) if beside.is_file() else "text-generation-launcher"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(launcher: str, flags: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """The launcher with `flags` on a free loopback port, once /health answers 200."""
    port = free_port()
    command = [launcher, "--hostname", "127.0.0.1", "--port", str(port), *flags]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the launcher exited with {process.returncode}; see {log}")
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                return process, url
        except OSError:
            time.sleep(1)
    stop(process)
    raise RuntimeError(f"the launcher was not ready within {READY_TIMEOUT_S} s; see {log}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def metric_sums(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of the histogram `name` on /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(f"{name}{suffix} "):
                values[suffix] = float(line.split()[1])
    return values.get("_sum", 0.0), values.get("_count", 0.0)


@dataclass(slots=True)
class Tally:
    """One setting's loads within one phase, summed over rounds: tok/s is all the rounds' output
    tokens over all their time."""

    url: str
    tokens: int = 0
    wall_s: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def measure(self, loadgen_flags: list[str], name: str, json_out: Path) -> None:
        """One closed-loop load (benchmarks/loadgen.py flags, --url added); any failed request
        fails the benchmark."""
        summary = asyncio.run(loadgen.run_load(loadgen.parse_args(["--url", self.url, *loadgen_flags])))
        if summary.errors:
            raise RuntimeError(f"{name}: {summary.errors} requests failed: {summary.error_samples}")
        self.tokens += summary.output_tokens
        self.wall_s += summary.wall_s
        json_out.write_text(json.dumps(summary.to_dict(), indent=1))


def warm_up(url: str) -> None:
    """A few short requests: first-use costs stay out of the figures."""
    asyncio.run(loadgen.run_load(loadgen.parse_args(
        ["--url", url, "--requests", "4", "--concurrency", "2", "--max-tokens", "16"])))


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so the `finally` that stops the launchers runs (Python's default
    would end the process at once and leave them serving)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
