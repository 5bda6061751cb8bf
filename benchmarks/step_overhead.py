"""The router's and gRPC's cost of one step when the shard computes nothing.

A fake shard (the real `TextGenerationService` servicer over a Unix socket, in its own process,
with an engine whose Prefill/Decode answer at once with protos shaped like the real engine's: one
token per generation, no top tokens, a CachedBatch) drives the real router objects (ShardedClient,
Batcher, Queue, KVManager, Infer, Entry with the bundled model's tokenizer). N streams generate
`--tokens` tokens each (ignore_eos); each stream's consumer does what the TGI SSE handler does per
event (the JSON of `generate_stream`). Reported per decode step, medians over the steps:

    step      wall time from one step's start to the next one's
    schedule  Batcher._chunk_updates + _admit (queue, KV)
    rpc       the Prefill/Decode call, minus the shard handler's own time (total_ns)
    shard     the shard handler's own time (fake engine: building the response)
    dispatch  Batcher._dispatch (Entry.on_token: detokenize, stop strings, events)
    filter    Batcher._filter (FilterBatch RPC when a request left)
    other     the rest of the step: metrics, trace records
    consumer  the consumers' work per step (Infer.stream + the event's JSON), summed over streams

    python -m benchmarks.step_overhead --streams 1 8 32 --tokens 256 --rounds 5 [--baseline HEAD]
    python -m benchmarks.step_overhead --streams 32 --profile      # cProfile of the router process

`--baseline REV` runs the router and servicer of git revision REV (extracted to a temporary
folder) in alternation with the working tree's, one subprocess per run, and prints both medians
and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.util
import json
import multiprocessing
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("step", "schedule", "rpc", "shard", "dispatch", "filter", "other", "consumer")
_TEXT = ("Deep learning is a subfield of machine learning that uses neural networks with many layers. "
         "It learns representations of data — images, text, sound — and powers translation, speech "
         "recognition and 🤖 assistants: « les réseaux de neurones » 深度学习 in many languages. ")


# ---------------------------------------------------------------------------------- fake shard


class FakeEngine:
    """The Engine's RPC surface, answering at once: every running request gets the next token of
    a fixed text, and finishes (length) after its `max_new_tokens`."""

    def __init__(self, token_ids: list[int]):
        from pytgi_proto import generate_pb2 as pb

        self.pb = pb
        self.token_ids = token_ids
        self.batches: dict[int, list] = {}  # batch id → [request id, generated, max_new_tokens]
        self.grammars = None

    def get_info(self):
        return self.pb.InfoResponse()

    def health(self) -> None:
        pass

    def clear_cache(self, batch_id) -> None:
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    def filter_batch(self, batch_id: int, request_ids: list[int]):
        keep = set(request_ids)
        rows = [r for r in self.batches.pop(batch_id) if r[0] in keep]
        self.batches[batch_id] = rows
        return self._cached(batch_id, rows)

    def prefill(self, request):
        start = time.perf_counter_ns()
        rows = []
        if request.HasField("cached_batch"):
            rows = self.batches.pop(request.cached_batch.id)
        rows += [[r.id, 0, r.stopping_parameters.max_new_tokens] for r in request.batch.requests]
        return self._step(self.pb.PrefillResponse, request.batch.id, rows, start)

    def decode(self, request):
        start = time.perf_counter_ns()
        rows = [row for batch in request.batches for row in self.batches.pop(batch.id)]
        return self._step(self.pb.DecodeResponse, request.batches[0].id, rows, start)

    def _step(self, response_type, batch_id: int, rows: list, start: int):
        pb, ids = self.pb, self.token_ids
        generations, alive = [], []
        for row in rows:
            row[1] += 1
            token = pb.Tokens(ids=[ids[row[1] % len(ids)]], logprobs=[-0.5])
            generation = pb.Generation(request_id=row[0], tokens=token)
            if row[1] >= row[2]:
                generation.finished.generated_tokens = row[1]
                generation.finished.finish_reason = pb.FINISH_REASON_LENGTH
            else:
                alive.append(row)
            generations.append(generation)
        response = response_type(generations=generations, forward_ns=0, decode_ns=0)
        if alive:
            self.batches[batch_id] = alive
            response.batch.CopyFrom(self._cached(batch_id, alive))
        response.total_ns = time.perf_counter_ns() - start
        return response

    def _cached(self, batch_id: int, rows: list):
        return self.pb.CachedBatch(id=batch_id, request_ids=[r[0] for r in rows], size=len(rows),
                                   max_tokens=len(rows) * 512, current_tokens=len(rows))


def _serve_fake_shard(socket_path: str, server_file: str, token_ids: list[int], ready) -> None:
    """Child process: the servicer module of `server_file` over `socket_path` with a FakeEngine."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from pytgi_proto import generate_pb2_grpc

    spec = importlib.util.spec_from_file_location("fake_shard_server", server_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    async def main() -> None:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 2**31 - 1),
                                          ("grpc.max_send_message_length", 2**31 - 1)])
        service = module.TextGenerationService(FakeEngine(token_ids), [f"unix://{socket_path}"], executor)
        generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(service, server)
        server.add_insecure_port(f"unix://{socket_path}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


# ---------------------------------------------------------------------------------- the router


def _tokenizer():
    from router.tokenizer import Tokenizer
    from shard.model_source import resolve_model
    from tests.conftest import default_cache_dir

    folder = resolve_model(None, cache_dir=default_cache_dir(), offline=True, progress=lambda _: None).path
    return Tokenizer.from_folder(folder)


class Phases:
    """perf_counter_ns totals per phase of the current step; one row per finished step."""

    def __init__(self):
        self.current = dict.fromkeys(PHASES, 0)
        self.rows: list[dict] = []

    def wrap(self, obj, name: str, phase: str) -> None:
        method = getattr(obj, name)
        current = self.current
        if asyncio.iscoroutinefunction(method):
            async def timed(*args, **kwargs):
                start = time.perf_counter_ns()
                try:
                    return await method(*args, **kwargs)
                finally:
                    current[phase] += time.perf_counter_ns() - start
        else:
            def timed(*args, **kwargs):
                start = time.perf_counter_ns()
                try:
                    return method(*args, **kwargs)
                finally:
                    current[phase] += time.perf_counter_ns() - start
        setattr(obj, name, timed)


class _TimedClient:
    """The ShardedClient, with the Prefill/Decode round trip split into rpc and shard time."""

    def __init__(self, client, current: dict):
        self._client, self._current = client, current

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def prefill(self, *args):
        return await self._timed(self._client.prefill(*args))

    async def decode(self, *args):
        return await self._timed(self._client.decode(*args))

    async def _timed(self, call):
        start = time.perf_counter_ns()
        response = await call
        self._current["rpc"] += time.perf_counter_ns() - start - response.total_ns
        self._current["shard"] += response.total_ns
        return response


async def _run_router(socket_path: str, tokenizer, streams: int, tokens: int, profile: cProfile.Profile | None):
    from router.events import TokenEvent
    from router.infer import Infer
    from router.limits import Limits
    from router.metrics import Metrics
    from router.routes import TgiRoutes
    from router.scheduler.batcher import Batcher, BatchPolicy
    from router.scheduler.client import ShardedClient, ShardClient
    from router.scheduler.kv import KVManager
    from router.scheduler.queue import Queue
    from router.schemas import GenerateParameters, GenerateRequest
    from router.validation import Validator

    client = ShardedClient([ShardClient(socket_path)])
    kv = KVManager(streams * 1024 // 16 + 64, 16, prefix_caching=True)
    queue = Queue(kv, support_chunking=True)
    metrics = Metrics(4096, 8192)
    limits = Limits(max_input_tokens=1000, max_total_tokens=2048, max_batch_prefill_tokens=4096,
                    max_batch_total_tokens=streams * 1024)
    phases = Phases()
    batcher = Batcher(_TimedClient(client, phases.current), queue, kv, limits, metrics, BatchPolicy(1.2))
    validator = Validator(tokenizer, limits)
    infer = Infer(validator, tokenizer, queue, metrics, max_concurrent_requests=streams)

    phases.wrap(batcher, "_chunk_updates", "schedule")
    phases.wrap(batcher, "_admit", "schedule")
    phases.wrap(batcher, "_dispatch", "dispatch")
    phases.wrap(batcher, "_filter", "filter")
    step = batcher.step
    last_start = None

    async def timed_step():
        nonlocal last_start
        start = time.perf_counter_ns()
        if last_start is not None:
            row = dict(phases.current)
            row["step"] = start - last_start
            named = sum(row[p] for p in ("schedule", "rpc", "shard", "dispatch", "filter"))
            row["other"] = row.pop("_inner") - named
            phases.rows.append(row)
        for key in phases.current:
            phases.current[key] = 0
        last_start = start
        result = await step()
        phases.current["_inner"] = time.perf_counter_ns() - start
        return result

    batcher.step = timed_step

    async def consume(prompt: str):
        request = GenerateRequest(inputs=prompt, parameters=GenerateParameters(max_new_tokens=tokens, details=True))
        valid = await infer.validate(request)
        valid = replace(valid, parameters=replace(valid.parameters, ignore_eos=True))
        events = infer.stream(valid)
        count = 0
        while True:
            try:
                event = await anext(events)
            except StopAsyncIteration:
                break
            start = time.perf_counter_ns()
            payload = TgiRoutes._stream_event(event, True)
            json.dumps(payload, ensure_ascii=False).encode()
            count += 1
            phases.current["consumer"] += time.perf_counter_ns() - start
            if isinstance(event, TokenEvent) and event.finish is not None:
                break
        return count

    await client.health()
    runner = asyncio.create_task(batcher.run())
    if profile is not None:
        profile.enable()
    started = time.perf_counter_ns()
    counts = await asyncio.gather(*(consume(f"Tell me about topic number {i}.") for i in range(streams)))
    elapsed = time.perf_counter_ns() - started
    if profile is not None:
        profile.disable()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await client.close()
    assert counts == [tokens] * streams, counts
    # Steady state: drop the first steps (prefill, admission) and the last (streams finishing).
    rows = phases.rows[2:-2]
    return {"medians_us": {p: statistics.median(r[p] for r in rows) / 1000 for p in PHASES},
            "mean_step_us": statistics.fmean(r["step"] for r in phases.rows) / 1000,
            "steps": len(phases.rows), "tok_s": streams * tokens / (elapsed / 1e9)}


async def _run_http(socket_path: str, tokenizer, streams: int, tokens: int) -> dict:
    """The router app (every middleware and route) over the fake shard, N SSE clients of
    /generate_stream in the same event loop: the median gap between two data frames a client
    receives, and the aggregate tok/s."""
    import aiohttp
    from aiohttp import web

    from router.app import create_app
    from router.scheduler.client import ShardClient, ShardedClient
    from router.limits import Limits
    from router.state import AppState
    from tests.router.app_harness import router_config

    from pytgi_proto import generate_pb2 as pb

    config = router_config(max_concurrent_requests=max(streams, 8), max_input_tokens=1000, max_total_tokens=2048)
    client = ShardedClient([ShardClient(socket_path)])
    info = pb.InfoResponse(device_type="cpu", support_chunking=True, use_prefix_caching=True,
                           max_position_embeddings=8192, world_size=1)
    limits = Limits(max_input_tokens=1000, max_total_tokens=2048, max_batch_prefill_tokens=4096,
                    max_batch_total_tokens=streams * 1024 + 2048, num_blocks=streams * 64 + 128, block_size=16)
    state = AppState.build(config, client, info, tokenizer, limits)
    runner = web.AppRunner(create_app(config, state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    gaps: list[int] = []

    async def consume(session, i: int) -> int:
        body = {"inputs": f"Tell me about topic number {i}.", "parameters": {"max_new_tokens": tokens}}
        frames, last = 0, None
        async with session.post(f"http://127.0.0.1:{port}/generate_stream", json=body) as response:
            async for line in response.content:
                if line.startswith(b"data:"):
                    now = time.perf_counter_ns()
                    if last is not None and frames > 2:
                        gaps.append(now - last)
                    last, frames = now, frames + 1
        return frames

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            started = time.perf_counter_ns()
            counts = await asyncio.gather(*(consume(session, i) for i in range(streams)))
            elapsed = time.perf_counter_ns() - started
    finally:
        await runner.cleanup()
    assert counts == [tokens] * streams, counts
    return {"gap_us": statistics.median(gaps) / 1000, "tok_s": streams * tokens / (elapsed / 1e9)}


def _measure(streams: list[int], tokens: int, server_file: str, profile: bool, http: bool = False) -> dict:
    tokenizer = _tokenizer()
    token_ids = tokenizer.encode(_TEXT * 4, add_special_tokens=False)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        socket_path = os.path.join(folder, "shard.sock")
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        shard = ctx.Process(target=_serve_fake_shard, args=(socket_path, server_file, token_ids, ready), daemon=True)
        shard.start()
        try:
            if not ready.wait(120):
                raise SystemExit("the fake shard did not start")
            for n in streams:
                if http:
                    results[n] = asyncio.run(_run_http(socket_path, tokenizer, n, tokens))
                    continue
                profiler = cProfile.Profile() if profile else None
                results[n] = asyncio.run(_run_router(socket_path, tokenizer, n, tokens, profiler))
                if profiler is not None:
                    print(f"\n== cProfile, router process, {n} streams x {tokens} tokens ==")
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        finally:
            shard.terminate()
            shard.join()
    tokenizer.close()
    return results


# ---------------------------------------------------------------------------------- A/B driver


def _extract(rev: str, folder: str) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "router", "shard/server.py"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)


def _child(args, root: str) -> dict:
    """One measurement in a fresh process whose `router` package comes from `root`."""
    command = [sys.executable, "-m", "benchmarks.step_overhead", "--streams", *map(str, args.streams),
               "--tokens", str(args.tokens), "--child", root] + (["--http"] if args.http else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(ROOT)]))
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT)).stdout
    return {int(k): v for k, v in json.loads(out.splitlines()[-1]).items()}


def _print_table(title: str, runs: list[dict]) -> None:
    if "gap_us" in next(iter(runs[0].values())):
        print(f"\n{title}: HTTP /generate_stream, median gap between two SSE frames at a client, "
              f"medians over {len(runs)} runs")
        for n in runs[0]:
            gap = statistics.median(r[n]["gap_us"] for r in runs)
            tok_s = statistics.median(r[n]["tok_s"] for r in runs)
            print(f"{n:>7} streams: {gap:9.1f} µs  {tok_s:8.0f} tok/s")
        return
    print(f"\n{title}: per decode step, µs, medians over steps then over {len(runs)} runs")
    print(f"{'streams':>7} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'tok/s':>8}")
    for n in runs[0]:
        cells = [statistics.median(r[n]["medians_us"][p] for r in runs) for p in PHASES]
        tok_s = statistics.median(r[n]["tok_s"] for r in runs)
        print(f"{n:>7} " + " ".join(f"{c:>9.1f}" for c in cells) + f" {tok_s:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="git revision to compare with, runs alternating")
    parser.add_argument("--profile", action="store_true", help="cProfile the router process (one run)")
    parser.add_argument("--http", action="store_true",
                        help="end to end instead: the router app and SSE clients of /generate_stream")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        result = _measure(args.streams, args.tokens, os.path.join(args.child, "shard", "server.py"), False, args.http)
        print(json.dumps(result))
        return
    if args.profile:
        _print_table("working tree", [_measure(args.streams, args.tokens, str(ROOT / "shard" / "server.py"), True)])
        return
    if args.baseline is None:
        runs = [_child(args, str(ROOT)) for _ in range(args.rounds)]
        _print_table("working tree", runs)
        return
    with tempfile.TemporaryDirectory() as base:
        _extract(args.baseline, base)
        before, after = [], []
        for _ in range(args.rounds):
            before.append(_child(args, base))
            after.append(_child(args, str(ROOT)))
    _print_table(f"baseline {args.baseline}", before)
    _print_table("working tree", after)
    key = "gap_us" if args.http else None
    print("\nratio baseline/working tree of the median step time (>1: the working tree is faster)")
    for n in before[0]:
        if key is not None:
            b = statistics.median(r[n][key] for r in before)
            a = statistics.median(r[n][key] for r in after)
            print(f"  {n:>3} streams: SSE frame gap {b:.1f} → {a:.1f} µs ({b / a:.2f}x)")
            continue
        b = statistics.median(r[n]["medians_us"]["step"] for r in before)
        a = statistics.median(r[n]["medians_us"]["step"] for r in after)
        tb = statistics.median(r[n]["tok_s"] for r in before)
        ta = statistics.median(r[n]["tok_s"] for r in after)
        print(f"  {n:>3} streams: step {b:.1f} → {a:.1f} µs ({b / a:.2f}x), tok/s {tb:.0f} → {ta:.0f} ({ta / tb:.2f}x)")


if __name__ == "__main__":
    main()
