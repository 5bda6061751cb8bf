"""Harness for supervisor tests: fake children (fake_child.py), free ports, orphan checks."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launcher.config import LauncherArgs
from launcher.supervisor import Supervisor

FAKE = str(Path(__file__).with_name("fake_child.py"))
# Generous for fake children on a busy 2-core machine (a run takes 0.5-3 s), and half the 60 s
# that the tests' slow paths (a load, a download, a grace period) would take.
WATCHDOG_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    """True if pid runs (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in {"Z", "X"}


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@dataclass
class Run:
    code: int
    output: str
    elapsed: float


@dataclass
class Harness:
    root: Path
    port: int = field(default_factory=free_port)
    shard_opts: dict[int, list[str]] = field(default_factory=dict)
    router_opts: list[str] = field(default_factory=list)
    download_opts: list[str] | None = None  # None: no download step

    @property
    def uds(self) -> str:
        return str(self.root / "s")

    @property
    def piddir(self) -> Path:
        return self.root / "pids"

    def args(self, **overrides) -> LauncherArgs:
        values = dict(shard_uds_path=self.uds, port=self.port, hostname="127.0.0.1",
                      graceful_termination_timeout=3)
        values.update(overrides)
        return LauncherArgs(**values)

    def fake(self, role: str, *extra: str) -> list[str]:
        return [sys.executable, FAKE, role, "--piddir", str(self.piddir), *extra]

    def supervisor(self, num_shard: int = 1, args: LauncherArgs | None = None, **kwargs) -> Supervisor:
        args = args or self.args()
        download = None
        if self.download_opts is not None:
            download = lambda a: self.fake("download", *self.download_opts)  # noqa: E731
        return Supervisor(
            args, num_shard, os.environ,
            download_cmd=download,
            shard_cmd=lambda a, rank, world: self.fake("shard", "--uds", a.shard_uds_path,
                                                       *self.shard_opts.get(rank, [])),
            router_cmd=lambda a: self.fake("router", "--port", str(a.port), *self.router_opts),
            out=io.StringIO(), poll_interval=0.05, progress_interval=kwargs.pop("progress_interval", 5.0),
            **kwargs,
        )

    def run(self, supervisor: Supervisor, when: str | None = None, action=None, timeout: float = WATCHDOG_S) -> Run:
        """Run in this (main) thread; once `when` is in the output, a helper thread calls `action()`.
        A run still going after `timeout` is stopped (SIGTERM) and fails the test: "fast" in these
        tests means well before it, where the slow path they rule out waits longer (60 s)."""
        out = supervisor.out.stream
        if when is not None:
            def trigger():
                if wait_until(lambda: when in out.getvalue(), timeout):
                    action()
            threading.Thread(target=trigger, daemon=True).start()
        fired = threading.Event()

        def expire():
            fired.set()
            os.kill(os.getpid(), signal.SIGTERM)

        watchdog = threading.Timer(timeout, expire)
        watchdog.start()
        started = time.monotonic()
        try:
            code = supervisor.run()
        finally:
            watchdog.cancel()
        assert not fired.is_set(), f"the supervisor was still running after {timeout:g} s:\n{out.getvalue()}"
        return Run(code, out.getvalue(), time.monotonic() - started)

    def pids(self, suffix: str = ".pid") -> dict[str, int]:
        return {p.name[: -len(suffix)]: int(p.read_text()) for p in self.piddir.glob(f"*{suffix}")
                if p.read_text().strip()}

    def assert_no_orphans(self) -> None:
        everything = {**self.pids(".pid"), **{k + "+": v for k, v in self.pids(".grandchild").items()}}
        assert everything, "the fake children wrote no pid files"
        assert wait_until(lambda: not any(alive(pid) for pid in everything.values()), 5), \
            {name: pid for name, pid in everything.items() if alive(pid)}


@pytest.fixture
def harness():
    # A short /tmp path: unix socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))
    (root / "pids").mkdir()
    yield Harness(root)
    for pid in [*Harness(root).pids(".pid").values(), *Harness(root).pids(".grandchild").values()]:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(root, ignore_errors=True)
