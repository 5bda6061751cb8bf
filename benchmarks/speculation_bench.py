"""`--speculate 0` against `--speculate N`, over HTTP, in one run on this machine.

    python -m benchmarks.speculation_bench --out OUT_DIR [--speculate 4] [--rounds 2] [--max-tokens 128]

Each setting starts its own launcher (the bundled model unless `--model-id`; extra launcher flags
after `--`), warms it up, then runs greedy loads with benchmarks/loadgen.py: the input-grounded set
(rewrite / extract / code edit, where the answer copies the prompt) one request at a time, and open-ended
chat at concurrency 1, 8 and 32. Between phases it reads `tgi_request_skipped_tokens` from /metrics:
the draft tokens accepted per decode step of that phase. The table (also OUT_DIR/summary.json) gives
each phase's output tok/s in both settings, their ratio and the accepted drafts per step. The two
settings run back to back on the same machine: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import loadgen
from benchmarks.report import format_table

# (name, prompt set, concurrency, requests per round)
PHASES = (("grounded c=1", "grounded", 1, 6), ("chat c=1", "default", 1, 6), ("chat c=8", "default", 8, 24),
          ("chat c=32", "default", 32, 64))
READY_TIMEOUT_S = 600


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    speculate: int
    output_tok_s: float
    accepted_per_step: float  # draft tokens accepted per decode step (0 without speculation)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skipped_tokens(url: str) -> tuple[float, float]:
    """(sum, count) of the `tgi_request_skipped_tokens` histogram."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(f"tgi_request_skipped_tokens{suffix} "):
                values[suffix] = float(line.split()[1])
    return values.get("_sum", 0.0), values.get("_count", 0.0)


def start(speculate: int, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [args.launcher, "--hostname", "127.0.0.1", "--port", str(port), "--speculate", str(speculate),
               *(["--model-id", args.model_id] if args.model_id else []), *args.launcher_args]
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


def run_setting(speculate: int, args: argparse.Namespace, out: Path) -> list[Phase]:
    process, url = start(speculate, args, out / f"launcher-speculate{speculate}.log")
    try:
        common = ["--url", url, "--max-tokens", str(args.max_tokens), "--temperature", "0"]
        asyncio.run(loadgen.run_load(loadgen.parse_args([*common, "--requests", "4", "--concurrency", "2",
                                                         "--max-tokens", "16"])))
        phases = []
        for name, prompt_set, concurrency, requests in PHASES:
            before = skipped_tokens(url)
            load = loadgen.parse_args([*common, "--prompt-set", prompt_set, "--concurrency", str(concurrency),
                                       "--requests", str(requests * args.rounds)])
            summary = asyncio.run(loadgen.run_load(load))
            if summary.errors:
                raise RuntimeError(f"{name}: {summary.errors} requests failed: {summary.error_samples}")
            after = skipped_tokens(url)
            steps = after[1] - before[1]
            accepted = (after[0] - before[0]) / steps if steps else 0.0
            phases.append(Phase(name, speculate, summary.output_tok_s, accepted))
            (out / f"speculate{speculate}-{name.replace(' ', '').replace('=', '')}.json").write_text(
                json.dumps(summary.to_dict(), indent=1))
        return phases
    finally:
        stop(process)


def table(base: list[Phase], spec: list[Phase]) -> str:
    rows = [[b.name, b.output_tok_s, s.output_tok_s, s.output_tok_s / b.output_tok_s, s.accepted_per_step]
            for b, s in zip(base, spec)]
    headers = ["phase", "tok/s speculate 0", f"tok/s speculate {spec[0].speculate}", "ratio",
               "accepted drafts/step"]
    return format_table(headers, rows, digits=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speculation_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the loadgen JSON, launcher logs and summary.json")
    p.add_argument("--speculate", type=int, default=4, help="the setting compared with 0")
    p.add_argument("--rounds", type=int, default=2, help="how many times each phase's request count runs")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model-id", default=None, help="default: the launcher's (the bundled SmolLM2)")
    p.add_argument("--launcher", default="text-generation-launcher")
    p.add_argument("launcher_args", nargs="*", help="extra launcher flags (after --)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = run_setting(0, args, out)
    spec = run_setting(args.speculate, args, out)
    summary = {"speculate": args.speculate, "phases": [asdict(phase) for phase in base + spec]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table(base, spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
