"""Soak test: many requests, some abandoned mid-flight, then a check that the server leaked nothing.

    python -m benchmarks.soak --url http://127.0.0.1:3000 --requests 1000 --concurrency 32 --max-tokens 16

`--concurrency` workers send `--requests` requests in all (closed loop), each a random pick of
/generate_stream, /generate, /v1/chat/completions streamed and not streamed. A `--disconnect`
fraction of them is abandoned at a random point: a stream after a random number of events (0: right
after the headers), a plain request after a random delay. Then the soak waits until the server is
idle (no running batch, empty queue) and reads /metrics:

- KV blocks leaked = blocks still held by requests on an idle server: `pytgi_kv_blocks_held_by_requests`
  (pytgi), else `pytgi_kv_blocks_used - pytgi_prefix_cache_blocks` (the prefix cache keeps blocks on
  purpose; everything else must have come back).
- The server's own counts over the run (deltas of `tgi_request_success` and `tgi_request_failure`).

Outcomes per request: completed, cancelled (abandoned on purpose before the end), or an error (HTTP
4xx / 5xx, an error event in a stream, a transport failure). Only loopback URLs are accepted; the
run is bounded by `--requests` and `--max-duration`. Exit status: 0; 1 on a leak, a 5xx or stream
error, a transport error, or a server that did not go idle; 2 when the arguments were refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TextIO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loadgen import BODY_EXCERPT, MAX_REQUESTS, RequestResult, handle_event, is_loopback_url, prompts_for
from benchmarks.report import format_table

KINDS = ("generate_stream", "generate", "chat_stream", "chat")
IDLE_POLL_SECONDS = 0.25
IDLE_CONFIRMATIONS = 3  # consecutive idle scrapes: a request between two steps is not "idle"


@dataclass(frozen=True, slots=True)
class Plan:
    """What one request does, drawn up front from the seed so that a run can be replayed."""

    kind: str
    prompt: str
    disconnect_after_events: int | None  # streams: abandon after this many events
    disconnect_after_s: float | None  # plain requests: abandon after this long


@dataclass(slots=True)
class Outcome:
    kind: str
    status: str  # "completed" | "cancelled" | "error"
    http_status: int | None = None
    error: str | None = None
    server_error: bool = False  # 5xx or an error event inside a 200 stream
    transport_error: bool = False


@dataclass(slots=True)
class ServerState:
    """The /metrics figures the soak reads."""

    batch_size: float
    queue_size: float
    kv_used: float | None
    prefix_cache_blocks: float | None
    held_by_requests: float | None
    success: float
    failures: dict[str, float]

    @property
    def is_idle(self) -> bool:
        return self.batch_size == 0 and self.queue_size == 0

    @property
    def leaked_blocks(self) -> float | None:
        if self.held_by_requests is not None:
            return self.held_by_requests
        if self.kv_used is not None and self.prefix_cache_blocks is not None:
            return self.kv_used - self.prefix_cache_blocks
        return None


@dataclass(slots=True)
class Report:
    requests: int
    completed: int
    cancelled: int
    errors: int
    errors_5xx: int
    errors_4xx: int
    errors_transport: int
    duration_s: float
    idle: bool
    leaked_kv_blocks: float | None
    kv_blocks_used: float | None
    prefix_cache_blocks: float | None
    server_success: float
    server_failures: dict[str, float]
    by_kind: dict[str, dict[str, int]]
    error_samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.idle and self.leaked_kv_blocks == 0 and not self.errors_5xx
                and not self.errors_transport)

    def table(self) -> str:
        totals = format_table(
            ["requests", "completed", "cancelled", "errors", "5xx", "4xx", "transport", "duration_s"],
            [[self.requests, self.completed, self.cancelled, self.errors, self.errors_5xx, self.errors_4xx,
              self.errors_transport, self.duration_s]], digits=1)
        server = format_table(
            ["idle", "leaked_kv_blocks", "kv_blocks_used", "prefix_cache_blocks", "server_success",
             "server_failures"],
            [[str(self.idle), self.leaked_kv_blocks, self.kv_blocks_used, self.prefix_cache_blocks,
              self.server_success, json.dumps(self.server_failures) if self.server_failures else "-"]],
            digits=0)
        kinds = format_table(["kind", "completed", "cancelled", "error"],
                             [[k, v.get("completed", 0), v.get("cancelled", 0), v.get("error", 0)]
                              for k, v in sorted(self.by_kind.items())])
        return f"{totals}\n\n{server}\n\n{kinds}\n\n{'PASS' if self.ok else 'FAIL'}"


def make_plans(args: argparse.Namespace) -> list[Plan]:
    rng = random.Random(args.seed)
    prompts = prompts_for("default")
    plans = []
    for _ in range(args.requests):
        kind = rng.choice(KINDS)
        abandon = rng.random() < args.disconnect
        streamed = kind.endswith("stream")
        plans.append(Plan(
            kind=kind, prompt=rng.choice(prompts),
            disconnect_after_events=rng.randrange(args.max_tokens) if abandon and streamed else None,
            disconnect_after_s=rng.uniform(0.0, args.disconnect_max_delay) if abandon and not streamed else None,
        ))
    return plans


def request_for(args: argparse.Namespace, plan: Plan) -> tuple[str, dict]:
    base = args.url.rstrip("/")
    sampling = {"temperature": args.temperature} if args.temperature > 0 else {}
    if plan.kind.startswith("generate"):
        params = {"max_new_tokens": args.max_tokens, "details": True, **sampling}
        if sampling:
            params["do_sample"] = True
        return f"{base}/{plan.kind}", {"inputs": plan.prompt, "parameters": params}
    body = {"model": "tgi", "messages": [{"role": "user", "content": plan.prompt}],
            "max_tokens": args.max_tokens, "temperature": args.temperature}
    if plan.kind == "chat_stream":
        body.update(stream=True, stream_options={"include_usage": True})
    return f"{base}/v1/chat/completions", body


async def run_one(session: aiohttp.ClientSession, args: argparse.Namespace, plan: Plan) -> Outcome:
    url, body = request_for(args, plan)
    outcome = Outcome(plan.kind, "completed")
    try:
        if plan.disconnect_after_s is not None:
            try:
                # Cancelling the request closes its connection: the server sees a disconnect.
                return await asyncio.wait_for(_plain(session, url, body, outcome, args), plan.disconnect_after_s)
            except asyncio.TimeoutError:
                outcome.status = "cancelled"
                return outcome
        if plan.kind.endswith("stream"):
            return await _stream(session, url, body, outcome, plan, args)
        return await _plain(session, url, body, outcome, args)
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as error:
        outcome.status, outcome.transport_error = "error", True
        outcome.error = f"{plan.kind}: {type(error).__name__}: {error}"[:BODY_EXCERPT]
        return outcome


async def _plain(session, url: str, body: dict, outcome: Outcome, args) -> Outcome:
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=args.timeout)) as resp:
        outcome.http_status = resp.status
        text = await resp.text(errors="replace")
        if resp.status != 200:
            _http_error(outcome, resp.status, text)
    return outcome


async def _stream(session, url: str, body: dict, outcome: Outcome, plan: Plan, args) -> Outcome:
    api = "openai" if plan.kind == "chat_stream" else "tgi"
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=args.timeout)) as resp:
        outcome.http_status = resp.status
        if resp.status != 200:
            _http_error(outcome, resp.status, await resp.text(errors="replace"))
            return outcome
        events = 0
        while plan.disconnect_after_events is None or events < plan.disconnect_after_events:
            raw = await resp.content.readline()
            if not raw:
                return outcome  # the server ended the stream
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return outcome
            events += 1
            try:
                handle_event(api, json.loads(data), RequestResult())
            except RuntimeError as error:  # an error event: the server failed after the 200
                outcome.status, outcome.server_error = "error", True
                outcome.error = f"{plan.kind}: {error}"[:BODY_EXCERPT]
                return outcome
        resp.close()  # hang up mid-stream (0 events: right after the headers)
        outcome.status = "cancelled"
    return outcome


def _http_error(outcome: Outcome, status: int, text: str) -> None:
    outcome.status = "error"
    outcome.server_error = status >= 500
    outcome.error = f"{outcome.kind}: HTTP {status}: {text[:BODY_EXCERPT]}"


async def read_server(session: aiohttp.ClientSession, url: str) -> ServerState:
    async with session.get(f"{url.rstrip('/')}/metrics", timeout=aiohttp.ClientTimeout(total=30)) as resp:
        text = await resp.text()
    samples: dict[str, float] = {}
    failures: dict[str, float] = {}
    # Read by family name: the parser renames a counter's samples to `<name>_total` whether the server
    # wrote them bare (TGI, pytgi) or with the suffix.
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "tgi_request_failure":
                failures[sample.labels.get("err", "")] = sample.value
            elif family.type in ("counter", "gauge") and not sample.labels:
                samples[family.name] = sample.value
    return ServerState(
        batch_size=samples.get("tgi_batch_current_size", 0.0), queue_size=samples.get("tgi_queue_size", 0.0),
        kv_used=samples.get("pytgi_kv_blocks_used"), prefix_cache_blocks=samples.get("pytgi_prefix_cache_blocks"),
        held_by_requests=samples.get("pytgi_kv_blocks_held_by_requests"),
        success=samples.get("tgi_request_success", 0.0), failures=failures,
    )


async def wait_idle(session: aiohttp.ClientSession, url: str, timeout: float) -> tuple[ServerState, bool]:
    deadline = time.monotonic() + timeout
    streak = 0
    while True:
        state = await read_server(session, url)
        streak = streak + 1 if state.is_idle else 0
        if streak >= IDLE_CONFIRMATIONS:
            return state, True
        if time.monotonic() >= deadline:
            return state, False
        await asyncio.sleep(IDLE_POLL_SECONDS)


async def run_soak(args: argparse.Namespace) -> Report:
    plans = make_plans(args)
    outcomes: list[Outcome] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # a hang-up must not poison a pooled socket
    async with aiohttp.ClientSession(connector=connector) as session:
        before = await read_server(session, args.url)
        start = time.monotonic()
        deadline = start + args.max_duration
        queue = iter(plans)

        async def worker() -> None:
            for plan in queue:
                if time.monotonic() >= deadline:
                    return
                outcomes.append(await run_one(session, args, plan))

        await asyncio.gather(*(worker() for _ in range(min(args.concurrency, len(plans)))))
        duration = time.monotonic() - start
        after, idle = await wait_idle(session, args.url, args.idle_timeout)
    return summarize(outcomes, duration, before, after, idle)


def summarize(outcomes: list[Outcome], duration: float, before: ServerState, after: ServerState,
              idle: bool) -> Report:
    by_status = Counter(o.status for o in outcomes)
    errors = [o for o in outcomes if o.status == "error"]
    by_kind: dict[str, Counter] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, Counter())[o.status] += 1
    failures = {err: value - before.failures.get(err, 0.0) for err, value in after.failures.items()}
    return Report(
        requests=len(outcomes), completed=by_status["completed"], cancelled=by_status["cancelled"],
        errors=len(errors), errors_5xx=sum(o.server_error for o in errors),
        errors_4xx=sum(o.http_status is not None and 400 <= o.http_status < 500 for o in errors),
        errors_transport=sum(o.transport_error for o in errors), duration_s=duration, idle=idle,
        leaked_kv_blocks=after.leaked_blocks, kv_blocks_used=after.kv_used,
        prefix_cache_blocks=after.prefix_cache_blocks, server_success=after.success - before.success,
        server_failures={err: value for err, value in sorted(failures.items()) if value},
        by_kind={kind: dict(counts) for kind, counts in by_kind.items()},
        error_samples=[o.error or "" for o in errors[:5]],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:3000", help="server base URL (loopback only)")
    p.add_argument("--requests", type=int, default=1000, help=f"requests in all (<= {MAX_REQUESTS})")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (closed loop)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--disconnect", type=float, default=0.25, help="fraction of requests abandoned mid-flight")
    p.add_argument("--disconnect-max-delay", type=float, default=2.0,
                   help="plain requests are abandoned after a uniform delay up to this, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s")
    p.add_argument("--max-duration", type=float, default=1800.0, help="stop sending new requests after this, s")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="how long to wait for the server to go idle, s")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """Why the arguments are refused, or None."""
    if not is_loopback_url(args.url):
        return f"refusing {args.url!r}: only loopback hosts (127.0.0.0/8, localhost, ::1) may be soaked"
    if not 1 <= args.requests <= MAX_REQUESTS:
        return f"--requests must be in 1..{MAX_REQUESTS}"
    if args.concurrency < 1 or args.max_tokens < 1:
        return "--concurrency and --max-tokens must be >= 1"
    if not 0 <= args.disconnect <= 1:
        return "--disconnect must be in 0..1"
    if args.disconnect_max_delay <= 0 or args.max_duration <= 0 or args.idle_timeout <= 0:
        return "--disconnect-max-delay, --max-duration and --idle-timeout must be > 0"
    return None


async def amain(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    if problem := check_args(args):
        print(f"soak: {problem}", file=sys.stderr)
        return 2
    report = await run_soak(args)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2), file=out)
    else:
        print(report.table(), file=out)
        if report.error_samples:
            print("errors (first few):", *report.error_samples, sep="\n  ", file=out)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(argv))


if __name__ == "__main__":
    sys.exit(main())
