"""Spawn and supervise `download-weights`, N shards and the router.

Decisions:
- Every child runs in its own process group (like TGI's `process_group(0)`). A Ctrl-C in a
  terminal then reaches only the launcher, which shuts down in order (router first, then the
  shards) instead of every process dying at once mid-request. Signals go to the whole group, so
  a child's own helpers are stopped too.
- SIGINT, SIGTERM and SIGHUP all mean "shut down": each child gets SIGTERM, then SIGKILL after
  `--graceful-termination-timeout` seconds; a second signal skips the wait. Exit code 0.
  The router goes first and alone: it drains (in-flight requests and streams finish, new ones
  get 503), which needs the shards alive, so they get SIGTERM only once it has exited.
- Without --shard-uds-path the shards' sockets go in a fresh 0700 temp dir, removed at exit.
  With it, a missing directory is created (0700, kept) before any shard starts, or the launch
  stops with one line saying why (a shard would only die binding its socket, in a traceback).
- Any child exiting while we did not ask it to (during start-up or later) is a failure: the
  others are terminated the same way and the launcher exits 1, saying which child died, how
  (exit code or signal) and its last 20 stderr lines.
- If the launcher itself dies without cleaning up (SIGKILL, crash), Linux's PR_SET_PDEATHSIG
  makes the kernel SIGKILL every child. That signal fires when the *thread* that forked the
  child exits, so children are only ever spawned from the thread that calls `run()`.
- Children's stdout and stderr lines are relayed to our stdout as `[shard-0] …` / `[router] …`;
  with --json-output, JSON lines pass through untouched and other lines are wrapped in
  `{"timestamp", "level", "target", "message"}` objects.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TextIO

from launcher import commands
from launcher.config import MAX_UDS_PATH, LauncherArgs, shard_log_level

FAILURE = 1
STDERR_TAIL = 20
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _child_setup(parent_pid: int) -> None:  # runs in the child between fork and exec
    os.setpgid(0, 0)
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os._exit(1)


class StartupError(Exception):
    """Something that stops the launch before or while spawning (one line)."""


class Output:
    """The launcher's single stdout stream, shared by the relay threads."""

    LEVELS = {"DEBUG": 10, "INFO": 20, "WARN": 30, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}

    def __init__(self, stream: TextIO, json_output: bool, level: str = "info"):
        self.stream, self.json_output = stream, json_output
        self.min_level = min(self.LEVELS[shard_log_level(level)], self.LEVELS["ERROR"])
        self.lock = threading.RLock()  # reentrant: the signal handler may log mid-write

    def _write(self, text: str) -> None:
        with self.lock:
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # our stdout is gone (closed pipe): keep supervising
                pass

    @staticmethod
    def _now() -> str:
        now = time.time()
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"

    def _record(self, level: str, target: str, message: str, **extra) -> str:
        return json.dumps({"timestamp": self._now(), "level": level, "target": target, "message": message,
                           **extra})

    def log(self, level: str, message: str, details: Sequence[str] = ()) -> None:
        if self.LEVELS[level] < self.min_level:
            return
        if self.json_output:
            extra = {"details": list(details)} if details else {}
            self._write(self._record(level, "launcher", message, **extra))
            return
        lines = [f"[launcher] {self._now()} {level} {message}", *(f"  | {detail}" for detail in details)]
        self._write("\n".join(lines))

    def relay(self, name: str, line: str, stream: str) -> None:
        if not self.json_output:
            self._write(f"[{name}] {line}")
            return
        if line.startswith("{"):
            try:
                if isinstance(json.loads(line), dict):
                    self._write(line)
                    return
            except ValueError:
                pass
        self._write(self._record("WARN" if stream == "stderr" else "INFO", name, line, stream=stream))


class Child:
    """One supervised process: its Popen, relay threads and the tail of its stderr."""

    def __init__(self, name: str, label: str, argv: list[str], env: Mapping[str, str], out: Output):
        self.name, self.label, self.out = name, label, out
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", close_fds=True,
            preexec_fn=functools.partial(_child_setup, os.getpid()),
        )
        pipes = ((self.popen.stdout, "stdout"), (self.popen.stderr, "stderr"))
        self.threads = [threading.Thread(target=self._pump, args=pipe, daemon=True, name=f"{name}-{pipe[1]}")
                        for pipe in pipes]
        for thread in self.threads:
            thread.start()

    def _pump(self, pipe: TextIO, kind: str) -> None:
        with pipe:
            for raw in pipe:
                line = raw.rstrip("\r\n")
                if kind == "stderr":
                    self.stderr_tail.append(line)
                self.out.relay(self.name, line, kind)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def signal(self, sig: int) -> None:
        """Signal the child's whole process group (it is the group leader)."""
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self, timeout: float = 2.0) -> None:
        """After exit: stop any helper it left in its group, and drain its output."""
        self.signal(signal.SIGKILL)
        for thread in self.threads:
            thread.join(timeout)

    def describe_exit(self) -> str:
        code = self.popen.returncode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"


def _resolve_exe(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """Console scripts are looked up next to our interpreter first (the venv), then on PATH."""
    if os.sep in argv[0]:
        return argv
    beside = os.path.join(os.path.dirname(sys.executable), argv[0])
    if os.access(beside, os.X_OK):
        return [beside, *argv[1:]]
    found = shutil.which(argv[0], path=env.get("PATH"))
    if found is None:
        raise StartupError(f"{argv[0]} not found next to {sys.executable} or on PATH; is pytgi installed?")
    return [found, *argv[1:]]


def _connect_host(hostname: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1", "[::]": "::1"}.get(hostname, hostname)


def unix_socket_accepts(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def tcp_port_accepts(hostname: str, port: int) -> bool:
    try:
        with socket.create_connection((_connect_host(hostname), port), timeout=1.0):
            return True
    except OSError:
        return False


def check_port_free(hostname: str, port: int) -> None:
    """Fail before starting anything if the HTTP port is taken (else we could mistake it for our router)."""
    try:
        infos = socket.getaddrinfo(hostname or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # let the router report the bad hostname
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                message = f"port {port} on {hostname} is already in use; pass another --port"
                raise StartupError(message) from None


def make_socket_dir(prefix: str) -> None:
    """The directory of --shard-uds-path, created (with its missing parents) when missing. Only the
    new leaf gets 0700, like the private default; an existing directory is left as it is."""
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as error:  # no permission, or a file where a directory should be
        raise StartupError(f"--shard-uds-path {prefix}: cannot create the directory {directory}: "
                           f"{error.strerror or error}") from None


def clear_stale_sockets(paths: Sequence[str]) -> None:
    for path in paths:
        if not os.path.lexists(path):
            continue
        if unix_socket_accepts(path):
            raise StartupError(f"{path} is in use by a running server (another launcher?); "
                               "pass another --shard-uds-path")
        try:
            os.unlink(path)
        except OSError as error:
            raise StartupError(f"cannot remove stale socket {path}: {error.strerror}") from None


class Supervisor:
    def __init__(
        self,
        args: LauncherArgs,
        num_shard: int,
        env: Mapping[str, str],
        *,
        download_cmd: Callable[[LauncherArgs], list[str]] | None = commands.build_download_argv,
        shard_cmd: Callable[[LauncherArgs, int, int], list[str]] = commands.build_shard_argv,
        router_cmd: Callable[[LauncherArgs], list[str]] = commands.build_router_argv,
        out: TextIO | None = None,
        poll_interval: float = 0.1,
        progress_interval: float = 5.0,
    ):
        self.args, self.num_shard, self.env = args, num_shard, dict(env)
        self.download_cmd, self.shard_cmd, self.router_cmd = download_cmd, shard_cmd, router_cmd
        self.out = Output(out or sys.stdout, args.json_output, args.log_level)
        self.poll_interval, self.progress_interval = poll_interval, progress_interval
        self.download: Child | None = None
        self.shards: list[Child] = []
        self.router: Child | None = None
        self.signals: list[int] = []
        self.stopping = False  # set once we start terminating; a signal after that means "hurry"
        self.hurry = False

    # -- the main loop ----------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until a signal (→ 0) or a child's death (→ 1)."""
        in_main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS} if in_main else {}
        socket_dir = None
        try:
            if self.args.shard_uds_path is None:
                socket_dir = self._use_private_socket_dir()
            else:
                make_socket_dir(self.args.shard_uds_path)
            return self._launch_and_supervise()
        except StartupError as error:
            self.out.log("ERROR", str(error))
            return FAILURE
        finally:
            self._shutdown()
            if socket_dir is not None:
                shutil.rmtree(socket_dir, ignore_errors=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _use_private_socket_dir(self) -> str:
        """The shards' sockets go in a fresh directory only we can enter (mkdtemp: mode 0700).
        A shard obeys whoever connects, and a fixed /tmp path could be squatted by another
        local user posing as a shard; inside this directory neither is possible."""
        socket_dir = tempfile.mkdtemp(prefix="pytgi-")
        prefix = os.path.join(socket_dir, "shard")
        longest = f"{prefix}-{self.num_shard * self.args.nnodes - 1}"
        if len(longest.encode()) > MAX_UDS_PATH:
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise StartupError(f"the temp dir {socket_dir} makes socket paths longer than {MAX_UDS_PATH} bytes; "
                               "set TMPDIR to a shorter path or pass --shard-uds-path")
        self.args = replace(self.args, shard_uds_path=prefix)
        return socket_dir

    def _launch_and_supervise(self) -> int:
        args = self.args
        if args.node_rank == 0:  # only node 0 serves HTTP
            check_port_free(args.hostname, args.port)
        # Multi-node: this node runs global ranks [first, first + num_shard) of world_size.
        world_size, first = self.num_shard * args.nnodes, self.num_shard * args.node_rank
        ranks = range(first, first + self.num_shard)
        sockets = [commands.socket_path(args, rank) for rank in ranks]
        clear_stale_sockets(sockets)
        if self.download_cmd is not None and not self._download():
            return 0 if self.signals else FAILURE
        for rank in ranks:
            self.shards.append(self._spawn(
                f"shard-{rank}", f"shard {rank}", self.shard_cmd(args, rank, world_size),
                commands.shard_env(args, rank, world_size, self.env)))
        for shard, path in zip(self.shards, sockets):
            if not self._wait_until(shard, lambda path=path: unix_socket_accepts(path)):
                return 0 if self.signals else FAILURE
            self.out.log("INFO", f"{shard.label} ready in {time.monotonic() - shard.started:.1f} s")
        if args.node_rank > 0:
            self.out.log("INFO", f"ready: shards {first}..{first + self.num_shard - 1} of {world_size} serving "
                                 f"for the router on node 0")
            return self._supervise()
        self.router = self._spawn("router", "router", self.router_cmd(args),
                                  commands.router_env(args, self.env))
        if not self._wait_until(self.router, lambda: tcp_port_accepts(args.hostname, args.port)):
            return 0 if self.signals else FAILURE
        self.out.log("INFO", f"ready: router listening on {args.hostname}:{args.port} "
                             f"with {world_size} shard(s)")
        return self._supervise()

    def _supervise(self) -> int:
        while not self.signals:
            if dead := self._first_exited():
                return self._report_death(dead)
            time.sleep(self.poll_interval)
        return 0

    # -- steps ------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame) -> None:
        self.hurry = self.stopping
        self.signals.append(signum)
        if not self.stopping:
            self.out.log("INFO", f"received {signal.Signals(signum).name}; shutting down")

    def _spawn(self, name: str, label: str, argv: list[str], env: Mapping[str, str]) -> Child:
        argv = _resolve_exe(argv, env)
        self.out.log("INFO", f"starting {label}: {' '.join(argv)}")  # no secret: the API key is in env
        try:
            return Child(name, label, argv, env, self.out)
        except OSError as error:
            raise StartupError(f"cannot start {label} ({argv[0]}): {error.strerror or error}") from None

    def _download(self) -> bool:
        """Run download-weights to completion; False if it failed or we were asked to stop."""
        child = self.download = self._spawn("download", "download-weights", self.download_cmd(self.args),
                                            commands.child_env(self.args, self.env))
        while not child.exited():
            if self.signals:
                self._terminate([child])
                return False
            time.sleep(self.poll_interval)
        child.finish()
        if child.popen.returncode != 0:
            self._report(child, f"download-weights failed ({child.describe_exit()})")
            return False
        return True

    def _wait_until(self, child: Child, ready: Callable[[], bool]) -> bool:
        """Poll `ready` while watching every child; progress lines every few seconds."""
        last_progress = time.monotonic()
        while not self.signals:
            if dead := self._first_exited():
                self._report_death(dead)
                return False
            if ready():
                return True
            now = time.monotonic()
            if now - last_progress >= self.progress_interval:
                self.out.log("INFO", f"waiting for {child.label} ({now - child.started:.0f} s)")
                last_progress = now
            time.sleep(self.poll_interval)
        return False

    def _children(self) -> list[Child]:
        return ([self.router] if self.router else []) + self.shards

    def _first_exited(self) -> Child | None:
        return next((child for child in self._children() if child.exited()), None)

    def _report(self, child: Child, message: str) -> None:
        child.finish()
        tail = list(child.stderr_tail)
        if tail:
            message += f"; last {len(tail)} stderr line(s):"
        self.out.log("ERROR", message, tail)

    def _report_death(self, child: Child) -> int:
        self._report(child, f"{child.label} (pid {child.pid}) exited unexpectedly ({child.describe_exit()})")
        return FAILURE

    def _shutdown(self) -> None:
        """Router first, then every shard together (and download-weights if we never got past it)."""
        if self.router is not None:
            self._terminate([self.router])
        self._terminate(self.shards + ([self.download] if self.download else []))

    def _terminate(self, children: list[Child]) -> None:
        self.stopping = True
        alive = [child for child in children if not child.exited()]
        if alive:
            self.out.log("INFO", f"terminating {', '.join(child.label for child in alive)}")
        for child in alive:
            child.signal(signal.SIGTERM)
        grace = self.args.graceful_termination_timeout
        deadline = time.monotonic() + grace
        while any(not child.exited() for child in alive):
            if time.monotonic() >= deadline or self.hurry:
                break  # out of time, or a second Ctrl-C: stop waiting
            time.sleep(self.poll_interval)
        for child in alive:
            if not child.exited():
                why = "a second signal" if self.hurry else f"no exit within {grace} s of SIGTERM"
                self.out.log("WARN", f"{child.label}: {why}; sending SIGKILL")
                child.signal(signal.SIGKILL)
                try:
                    child.popen.wait(10)
                except subprocess.TimeoutExpired:  # stuck in the kernel; PDEATHSIG is the last resort
                    self.out.log("ERROR", f"{child.label} (pid {child.pid}) survived SIGKILL for 10 s")
        for child in children:
            child.finish()
