"""Supervisor behaviour with fake children: start-up, failures, signals, grace period, no orphans."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launcher import commands
from launcher.supervisor import Supervisor

from .conftest import FAKE, alive, wait_until


def sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)


def test_start_then_sigterm_stops_router_first_and_exits_0(harness):
    run = harness.run(harness.supervisor(num_shard=2), when="ready:", action=sigterm_self)
    assert run.code == 0, run.output
    out = run.output
    assert "shard 0 ready" in out and "shard 1 ready" in out
    assert "[shard-1] shard-1 starting RANK=1 WORLD_SIZE=2 MASTER_PORT=29500" in out
    assert "[shard-0] shard-0 a warning on stderr" in out  # stderr is relayed too
    assert "[router] router listening" in out
    assert "received SIGTERM" in out
    # the router is stopped (and drained) before any shard gets SIGTERM
    assert out.index("[router] router got SIGTERM") < out.index("[shard-0] shard-0 got SIGTERM")
    assert "[shard-1] shard-1 got SIGTERM" in out
    harness.assert_no_orphans()


def test_shard_failing_during_load_exits_nonzero_fast_with_its_stderr(harness):
    harness.shard_opts = {1: ["--fail-load", "--delay", "0.2"]}
    run = harness.run(harness.supervisor(num_shard=2))
    assert run.code == 1  # on its own, before the harness's watchdog
    out = run.output
    assert "shard 1 (pid" in out and "exited unexpectedly (exit code 1)" in out
    assert "last 20 stderr line(s):" in out
    assert "  | error: shard-1 could not load the model" in out
    assert "  | shard-1 traceback line 24" in out
    assert "  | shard-1 traceback line 4\n" not in out  # only the last 20 lines are reported
    assert "[router]" not in out  # the router never started
    assert "[shard-0] shard-0 got SIGTERM" in out  # the healthy shard was stopped
    harness.assert_no_orphans()


def test_child_killed_later_terminates_the_rest_and_exits_nonzero(harness):
    def kill_shard_0():
        os.kill(harness.pids()["shard-0"], signal.SIGKILL)

    run = harness.run(harness.supervisor(num_shard=2), when="ready:", action=kill_shard_0)
    assert run.code == 1, run.output
    assert "shard 0 (pid" in run.output and "exited unexpectedly (killed by signal SIGKILL)" in run.output
    assert "[router] router got SIGTERM" in run.output
    assert "[shard-1] shard-1 got SIGTERM" in run.output
    harness.assert_no_orphans()


def test_router_exiting_is_a_failure(harness):
    harness.router_opts = ["--exit-after", "0.3", "--code", "3"]
    run = harness.run(harness.supervisor())
    assert run.code == 1
    assert "router (pid" in run.output and "exited unexpectedly (exit code 3)" in run.output
    assert "  | router exiting with 3" in run.output
    assert "[shard-0] shard-0 got SIGTERM" in run.output
    harness.assert_no_orphans()


def test_child_ignoring_sigterm_gets_sigkill_after_grace(harness):
    harness.shard_opts = {0: ["--ignore-term"]}
    supervisor = harness.supervisor(args=harness.args(graceful_termination_timeout=1))
    run = harness.run(supervisor, when="ready:", action=sigterm_self)
    assert run.code == 0, run.output
    assert "shard 0: no exit within 1 s of SIGTERM; sending SIGKILL" in run.output
    assert run.elapsed >= 1  # the grace period was given
    harness.assert_no_orphans()


def test_second_signal_skips_the_grace_period(harness):
    harness.shard_opts = {0: ["--ignore-term"]}

    def two_signals():
        sigterm_self()
        time.sleep(0.5)
        sigterm_self()

    supervisor = harness.supervisor(args=harness.args(graceful_termination_timeout=60))
    run = harness.run(supervisor, when="ready:", action=two_signals)
    assert run.code == 0
    assert "shard 0: a second signal; sending SIGKILL" in run.output  # not after the 60 s grace
    harness.assert_no_orphans()


def test_signal_during_model_load_stops_everything_and_exits_0(harness):
    harness.shard_opts = {0: ["--delay", "60"], 1: ["--delay", "60"]}
    run = harness.run(harness.supervisor(num_shard=2, progress_interval=0.2),
                      when="waiting for shard 0", action=sigterm_self)
    assert run.code == 0, run.output  # before the shards' 60 s load
    assert "waiting for shard 0 (" in run.output
    assert "[router]" not in run.output
    harness.assert_no_orphans()


def test_grandchildren_are_stopped_with_their_process_group(harness):
    harness.shard_opts = {0: ["--grandchild"]}
    run = harness.run(harness.supervisor(), when="ready:", action=sigterm_self)
    assert run.code == 0
    assert "shard-0" in harness.pids(".grandchild")
    harness.assert_no_orphans()


def test_download_runs_first_and_its_failure_stops_the_launch(harness):
    harness.download_opts = ["--code", "2"]
    run = harness.run(harness.supervisor())
    assert run.code == 1
    assert "download-weights failed (exit code 2)" in run.output
    assert "  | error: download could not load the model" in run.output
    assert set(harness.pids()) == {"download"}  # no shard was started


def test_signal_during_download_stops_it_and_exits_0(harness):
    harness.download_opts = ["--code", "0", "--delay", "60"]
    run = harness.run(harness.supervisor(), when="[download] download a warning", action=sigterm_self)
    assert run.code == 0, run.output  # before the download's 60 s
    assert set(harness.pids()) == {"download"}
    harness.assert_no_orphans()


def test_download_success_then_shards(harness):
    harness.download_opts = ["--code", "0"]
    run = harness.run(harness.supervisor(), when="ready:", action=sigterm_self)
    assert run.code == 0, run.output
    assert run.output.index("[download] /tmp/resolved-model-folder") < run.output.index("[shard-0]")
    harness.assert_no_orphans()


def test_json_output_wraps_plain_lines_and_passes_json_through(harness):
    harness.shard_opts = {0: ["--json"]}
    supervisor = harness.supervisor(args=harness.args(json_output=True))
    run = harness.run(supervisor, when="ready:", action=sigterm_self)
    assert run.code == 0
    records = [json.loads(line) for line in run.output.splitlines()]  # every line is JSON
    assert {"level": "INFO", "target": "fake", "message": "shard-0 json line"} in records
    wrapped = next(r for r in records if r["message"] == "shard-0 a warning on stderr")
    assert wrapped["target"] == "shard-0" and wrapped["stream"] == "stderr" and wrapped["level"] == "WARN"
    assert any(r["target"] == "launcher" and r["message"].startswith("ready:") for r in records)


def test_stale_socket_files_are_removed_and_live_ones_refused(harness):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(f"{harness.uds}-0")
    stale.close()  # the file stays, nobody listens: a crashed shard's leftover
    run = harness.run(harness.supervisor(), when="ready:", action=sigterm_self)
    assert run.code == 0, run.output

    with socket.socket(socket.AF_UNIX) as live:
        os.unlink(f"{harness.uds}-0")
        live.bind(f"{harness.uds}-0")
        live.listen()
        run = harness.run(harness.supervisor())
    assert run.code == 1
    assert "is in use by a running server" in run.output
    assert "[shard-0]" not in run.output


def test_port_in_use_fails_before_starting_anything(harness):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", harness.port))
        busy.listen()
        run = harness.run(harness.supervisor())
    assert run.code == 1
    assert f"port {harness.port} on 127.0.0.1 is already in use" in run.output
    assert harness.pids() == {}


def test_missing_executable_is_one_error_line(harness):
    supervisor = Supervisor(harness.args(), 1, {"PATH": "/nonexistent"}, download_cmd=None,
                            shard_cmd=lambda a, r, w: ["no-such-shard-binary"], out=io.StringIO())
    run = harness.run(supervisor)
    assert run.code == 1
    assert "no-such-shard-binary not found" in run.output


def test_launcher_killed_with_sigkill_takes_its_children_down(harness):
    """PR_SET_PDEATHSIG: even an un-catchable kill of the launcher leaves no orphans."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from launcher.config import LauncherArgs
        from launcher.supervisor import Supervisor
        fake = [sys.executable, {FAKE!r}, "--piddir", {str(harness.piddir)!r}]
        args = LauncherArgs(shard_uds_path={harness.uds!r}, port={harness.port}, hostname="127.0.0.1")
        sup = Supervisor(args, 2, os.environ, download_cmd=None,
            shard_cmd=lambda a, r, w: fake[:2] + ["shard", "--uds", a.shard_uds_path] + fake[2:],
            router_cmd=lambda a: fake[:2] + ["router", "--port", str(a.port)] + fake[2:],
            poll_interval=0.05)
        sys.exit(sup.run())
    """)
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in launcher.stdout:
            if "ready:" in line:
                break
        children = harness.pids()
        assert set(children) == {"shard-0", "shard-1", "router"}
        assert all(alive(pid) for pid in children.values())
        launcher.kill()
        launcher.wait(5)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.stdout.close()
    assert wait_until(lambda: not any(alive(pid) for pid in children.values()), 5)


def test_router_api_key_is_in_its_environment_never_in_argv_or_logs(harness):
    args = harness.args(api_key="s3cret", explicit=frozenset({"api_key"}))
    supervisor = harness.supervisor(args=args)
    # The real router argv, given to the fake router (it ignores the options it does not know).
    supervisor.router_cmd = lambda a: harness.fake("router", "--port", str(a.port),
                                                   *commands.build_router_argv(a)[1:])
    run = harness.run(supervisor, when="ready:", action=sigterm_self)
    assert run.code == 0, run.output
    assert "starting router:" in run.output and "s3cret" not in run.output
    assert "[router] router has an API_KEY of 6 characters" in run.output
    assert "shard-0 has an API_KEY" not in run.output


def test_missing_shard_uds_dir_is_created_private(harness):
    prefix = harness.root / "new" / "sockets" / "s"
    supervisor = harness.supervisor(args=harness.args(shard_uds_path=str(prefix)))
    run = harness.run(supervisor, when="ready:", action=sigterm_self)
    assert run.code == 0 and "ready:" in run.output, run.output
    assert prefix.parent.stat().st_mode & 0o777 == 0o700
    harness.assert_no_orphans()


def test_uncreatable_shard_uds_dir_is_one_error_line(harness, monkeypatch):
    in_the_way = harness.root / "file"
    in_the_way.write_text("")
    run = harness.run(harness.supervisor(args=harness.args(shard_uds_path=str(in_the_way / "s"))))
    lines = run.output.strip().splitlines()
    assert run.code == 1 and len(lines) == 1 and lines[0].endswith(
        f"ERROR --shard-uds-path {in_the_way}/s: cannot create the directory {in_the_way}: File exists")
    assert not harness.pids()  # nothing started

    def refuse(path, mode, exist_ok):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", refuse)  # as root, permissions cannot refuse anything
    run = harness.run(harness.supervisor(args=harness.args(shard_uds_path="/srv/pytgi/s")))
    assert run.code == 1 and run.output.rstrip().endswith(
        "ERROR --shard-uds-path /srv/pytgi/s: cannot create the directory /srv/pytgi: Permission denied")


def test_launcher_exception_still_stops_started_children(harness):
    """A crash inside the launcher (here: building rank 1's command) must not leave shard 0 running."""
    def shard_cmd(args, rank, world):
        if rank == 1:
            raise RuntimeError("bug while building the command")
        return harness.fake("shard", "--uds", args.shard_uds_path)

    supervisor = harness.supervisor(num_shard=2)
    supervisor.shard_cmd = shard_cmd
    with pytest.raises(RuntimeError):
        harness.run(supervisor)
    assert len(supervisor.shards) == 1
    assert not alive(supervisor.shards[0].pid)


def test_default_sockets_live_in_a_private_dir_removed_at_exit(harness):
    supervisor = harness.supervisor(num_shard=2, args=harness.args(shard_uds_path=None))
    seen = {}

    def inspect_then_stop():
        prefix = supervisor.args.shard_uds_path
        folder = os.path.dirname(prefix)
        info = os.stat(folder)
        seen.update(folder=folder, mode=info.st_mode & 0o777, owner=info.st_uid,
                    sockets=sorted(os.listdir(folder)))
        sigterm_self()

    run = harness.run(supervisor, when="ready:", action=inspect_then_stop)
    assert run.code == 0, run.output
    assert seen["mode"] == 0o700 and seen["owner"] == os.getuid()
    assert seen["sockets"] == ["shard-0", "shard-1"]
    assert not os.path.exists(seen["folder"])
    harness.assert_no_orphans()
