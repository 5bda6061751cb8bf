"""Start the real launcher (bundled SmolLM2, free port, private sockets) once per session."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 300  # the first run converts the bundled GGUF (~25 s) before loading
# Every process started from here (launchers, their shards) inherits it: OpenMP threads that wait
# sleep instead of spinning on the cores the others need. tests/conftest.py says why; it is set
# here too for a run of integration-tests alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def metric(url: str, name: str, absent: float | None = None) -> float:
    """One sample of the server's Prometheus metrics (`name` may carry labels). `absent`: its
    value when the sample is missing (a labelled counter appears once first incremented); None
    makes a missing sample a failure."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    if match is None and absent is not None:
        return absent
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_idle(url: str, timeout: float = 60) -> None:
    """Until no request is queued or running and none holds a KV block (a cancellation is applied
    at the next step); a failure names what is still busy."""
    deadline = time.monotonic() + timeout
    while True:
        busy = {name: value for name in ("tgi_queue_size", "tgi_batch_current_size", "pytgi_kv_blocks_held_by_requests")
                if (value := metric(url, name))}
        if not busy:
            return
        assert time.monotonic() < deadline, f"not idle {timeout:g} s later: {busy}"
        time.sleep(0.1)


def assert_kv_returned(url: str) -> None:
    """Every request's KV blocks came back: once idle, whatever is in use is the prefix cache's."""
    wait_idle(url)
    assert metric(url, "pytgi_kv_blocks_used") == metric(url, "pytgi_prefix_cache_blocks")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    uds_path: str | None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_launcher(*args: str, env: dict | None = None, private_sockets: bool = False) -> Server:
    """`private_sockets`: no --shard-uds-path, so the launcher picks its own private socket dir."""
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="pytgi-it-"))
    uds = None if private_sockets else str(tmp / "shard")
    log_path = tmp / "launcher.log"
    command = [str(BIN / "text-generation-launcher"), "--hostname", "127.0.0.1", "--port", str(port),
               *(["--shard-uds-path", uds] if uds else []), "--max-batch-total-tokens", "32768", *args]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                               start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log_path, uds)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"launcher exited with {process.returncode}:\n{server.log()[-3000:]}")
        try:
            if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    stop_launcher(server)
    raise RuntimeError(f"launcher not healthy after {STARTUP_TIMEOUT} s:\n{server.log()[-3000:]}")


def stop_launcher(server: Server, timeout: float = 30) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def server():
    server = start_launcher()
    yield server
    stop_launcher(server)


@pytest.fixture(scope="session")
def url(server) -> str:
    return server.url
