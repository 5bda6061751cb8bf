"""`text-generation-benchmark`: prefill / decode latency of a running shard, per batch size.

Like TGI's benchmark it bypasses the router and drives the shard group over gRPC: Warmup once
(sized for the largest batch), then for every batch size B, `warmups` untimed and `runs` timed
runs of ClearCache → Prefill(B random prompts of `sequence-length` tokens, greedy, EOS ignored)
→ Decode until the batch finishes, every RPC timed on the client with `time.perf_counter`.
`--launch` starts the shard itself; `--compare-transformers` then measures plain
`transformers` `model.generate` on the same model folder, after the shard is stopped so the two
never share the CPU, and prints its tok/s next to ours: the baseline the project reports against.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import click

from benchmarks.report import Stats, format_table
from router.scheduler.client import ShardedClient, ShardError
from pytgi_proto import generate_pb2 as pb

DEFAULT_BATCH_SIZES = (1, 8, 32)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    batch_sizes: tuple[int, ...]
    sequence_length: int
    decode_length: int
    runs: int
    warmups: int
    seed: int


@dataclass(frozen=True, slots=True)
class BaselineResult:
    """plain transformers `generate` at one batch size (medians over the timed runs)."""

    prefill_ms: float  # start of generate → first generated token
    decode_tok_s: float  # B × (decode_length - 1) / (first → last generated token)
    total_tok_s: float  # B × decode_length / whole generate call


@dataclass(slots=True)
class BatchResult:
    batch_size: int
    prefill_ms: Stats
    decode_step_ms: Stats
    prefill_tok_s: float  # B × sequence_length / median prefill latency
    decode_tok_s: float  # B × decode steps / time in decode steps (= B / mean step latency)
    total_tok_s: float  # median over runs of B × decode_length / (prefill + all decode steps)
    transformers: BaselineResult | None = field(default=None)


# -- prompts and requests ---------------------------------------------------------------------

def random_prompts(count: int, length: int, vocab_size: int, exclude: frozenset[int], seed: int) -> list[list[int]]:
    """`count` prompts of `length` random token ids, never one of `exclude` (the EOS ids: an
    EOS inside a prompt would make the transformers baseline's sequences differ from ours)."""
    rng = random.Random(seed)
    allowed = [i for i in range(vocab_size) if i not in exclude]
    return [rng.choices(allowed, k=length) for _ in range(count)]


def _requests(prompts: list[list[int]], decode_length: int, blocks_per_request: int) -> list[pb.Request]:
    greedy = pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0)
    stopping = pb.StoppingCriteriaParameters(max_new_tokens=decode_length, ignore_eos_token=True)
    # Distinct blocks per request; block 0 is the health probe's.
    return [
        pb.Request(id=i, input_ids=prompt, parameters=greedy, stopping_parameters=stopping,
                   blocks=range(1 + i * blocks_per_request, 1 + (i + 1) * blocks_per_request))
        for i, prompt in enumerate(prompts)
    ]


# -- the shard part ---------------------------------------------------------------------------

async def _run_once(client: ShardedClient, batch: pb.Batch) -> tuple[float, list[float], float, int]:
    """One Prefill + Decodes until done: (prefill s, decode step s, total s, generated tokens)."""
    start = time.perf_counter()
    response = await client.prefill(batch)
    prefill_s = time.perf_counter() - start
    tokens, steps = len(response.generations), []
    while response.HasField("batch"):
        step_start = time.perf_counter()
        response = await client.decode([response.batch])
        steps.append(time.perf_counter() - step_start)
        tokens += len(response.generations)
    return prefill_s, steps, time.perf_counter() - start, tokens


async def _bench_batch_size(client: ShardedClient, info: pb.InfoResponse, cfg: BenchConfig, size: int,
                            blocks_per_request: int, batch_ids: Iterator[int]) -> BatchResult:
    prompts = random_prompts(size, cfg.sequence_length, info.vocab_size, frozenset(info.eos_token_ids), cfg.seed)
    requests = _requests(prompts, cfg.decode_length, blocks_per_request)
    prefills, steps, totals = [], [], []
    for run in range(cfg.warmups + cfg.runs):
        await client.clear_cache(None)
        batch = pb.Batch(id=next(batch_ids), requests=requests, size=size,
                         max_tokens=size * blocks_per_request * info.block_size, max_blocks=blocks_per_request)
        prefill_s, step_s, total_s, tokens = await _run_once(client, batch)
        if tokens != size * cfg.decode_length:
            raise RuntimeError(f"batch {size}: the shard generated {tokens} tokens, expected {size * cfg.decode_length}")
        if run >= cfg.warmups:
            prefills.append(prefill_s * 1e3)
            steps.extend(s * 1e3 for s in step_s)
            totals.append(size * cfg.decode_length / total_s)
    prefill = Stats.of(prefills)
    return BatchResult(
        batch_size=size, prefill_ms=prefill, decode_step_ms=Stats.of(steps),
        prefill_tok_s=size * cfg.sequence_length / (prefill.p50 / 1e3),
        decode_tok_s=size * len(steps) / (sum(steps) / 1e3) if steps else float("nan"),
        total_tok_s=statistics.median(totals),
    )


async def bench_shard(master_uds: str, cfg: BenchConfig) -> tuple[pb.InfoResponse, list[BatchResult]]:
    client = await ShardedClient.connect(master_uds)
    try:
        info = await client.info()
        total_len = cfg.sequence_length + cfg.decode_length
        if total_len > info.max_position_embeddings:
            raise click.UsageError(f"sequence + decode length {total_len} exceeds the model's "
                                   f"{info.max_position_embeddings} positions")
        blocks_per_request = -(-total_len // info.block_size)
        max_batch = max(cfg.batch_sizes)
        # The warmup prefill is the largest one we send: max batch × sequence length.
        prompts = random_prompts(max_batch, cfg.sequence_length, info.vocab_size, frozenset(info.eos_token_ids), cfg.seed)
        warmup_batch = pb.Batch(id=0, requests=_requests(prompts, 2, 0), size=max_batch)
        await client.clear_cache(None)
        await client.warmup(pb.WarmupRequest(
            batch=warmup_batch, max_input_tokens=cfg.sequence_length, max_total_tokens=total_len,
            max_prefill_tokens=max_batch * cfg.sequence_length,
            max_batch_total_tokens=max_batch * blocks_per_request * info.block_size,
        ))
        batch_ids = iter(range(1, 1 << 62))
        results = []
        for size in cfg.batch_sizes:
            click.echo(f"benchmarking batch size {size} ...", err=True)
            results.append(await _bench_batch_size(client, info, cfg, size, blocks_per_request, batch_ids))
        await client.clear_cache(None)
        return info, results
    finally:
        await client.close()


# -- launching a shard ------------------------------------------------------------------------

def _server_command() -> list[str]:
    # The console script next to this interpreter (the venv's), else the same module via -m.
    script = os.path.join(os.path.dirname(sys.executable), "text-generation-server")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "shard.cli"]


async def _wait_ready(proc: subprocess.Popen, socket_path: str, timeout_s: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as log:
                tail = "".join(log.readlines()[-20:])
            raise click.ClickException(f"the shard exited with code {proc.returncode} before it was ready:\n{tail}")
        if os.path.exists(socket_path):
            with contextlib.suppress(ShardError):
                client = await ShardedClient.connect(socket_path)
                try:
                    await client.health()
                    return
                finally:
                    await client.close()
        if time.monotonic() > deadline:
            raise click.ClickException(f"the shard was not ready after {timeout_s:.0f} s (log: {log_path})")
        await asyncio.sleep(0.25)


@contextlib.contextmanager
def launch_shard(model_id: str | None, timeout_s: float, quantize: str | None = None) -> Iterator[str]:
    """Start `text-generation-server serve` on a temp socket; yield rank 0's socket path; always
    terminate it (SIGTERM, then SIGKILL) and remove the temp folder."""
    folder = tempfile.mkdtemp(prefix="pytgi-bench-")
    prefix, log_path = os.path.join(folder, "shard"), os.path.join(folder, "shard.log")
    command = [*_server_command(), "serve", *([model_id] if model_id else []), "--uds-path", prefix,
               *(["--quantize", quantize] if quantize else [])]
    click.echo(f"launching {' '.join(command)}", err=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        start = time.monotonic()
        asyncio.run(_wait_ready(proc, f"{prefix}-0", timeout_s, log_path))
        click.echo(f"shard ready in {time.monotonic() - start:.1f} s", err=True)
        yield f"{prefix}-0"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


# -- the transformers baseline ----------------------------------------------------------------

def bench_transformers(model_path: str, info: pb.InfoResponse, cfg: BenchConfig, threads: int) -> dict[int, BaselineResult]:
    """`model.generate` (fp32, greedy, exactly `decode_length` new tokens) on the same prompts."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pad_id = model.generation_config.pad_token_id
    pad_id = pad_id if pad_id is not None else (info.eos_token_ids[0] if info.eos_token_ids else 0)

    class TimingStreamer(transformers.generation.BaseStreamer):
        # generate calls put() once with the prompt, then once per generated token.
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    results = {}
    for size in cfg.batch_sizes:
        click.echo(f"transformers baseline, batch size {size} ...", err=True)
        prompts = random_prompts(size, cfg.sequence_length, info.vocab_size, frozenset(info.eos_token_ids), cfg.seed)
        # Same prompt lengths as ours, so left padding (the batched-generate setup) pads nothing.
        input_ids = torch.tensor(prompts)
        prefill_ms, decode, total = [], [], []
        for run in range(cfg.warmups + cfg.runs):
            streamer = TimingStreamer()
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                    max_new_tokens=cfg.decode_length, min_new_tokens=cfg.decode_length,
                    pad_token_id=pad_id, streamer=streamer,
                )
            end = time.perf_counter()
            if run < cfg.warmups:
                continue
            first, last = streamer.times[1], streamer.times[-1]
            prefill_ms.append((first - start) * 1e3)
            if cfg.decode_length > 1:
                decode.append(size * (cfg.decode_length - 1) / (last - first))
            total.append(size * cfg.decode_length / (end - start))
        results[size] = BaselineResult(
            prefill_ms=statistics.median(prefill_ms),
            decode_tok_s=statistics.median(decode) if decode else float("nan"),
            total_tok_s=statistics.median(total),
        )
    return results


# -- report -----------------------------------------------------------------------------------

def render(info: pb.InfoResponse, cfg: BenchConfig, results: list[BatchResult]) -> str:
    headers = ["batch", "prefill ms p50", "p90", "p99", "prefill tok/s",
               "decode ms p50", "p90", "p99", "decode tok/s", "total tok/s"]
    baseline = any(r.transformers for r in results)
    if baseline:
        headers += ["hf prefill ms", "hf decode tok/s", "decode x", "hf total tok/s", "total x"]
    rows = []
    for r in results:
        row = [r.batch_size, r.prefill_ms.p50, r.prefill_ms.p90, r.prefill_ms.p99, r.prefill_tok_s,
               r.decode_step_ms.p50, r.decode_step_ms.p90, r.decode_step_ms.p99, r.decode_tok_s, r.total_tok_s]
        if baseline:
            hf = r.transformers
            row += [hf.prefill_ms, hf.decode_tok_s, f"{r.decode_tok_s / hf.decode_tok_s:.2f}x",
                    hf.total_tok_s, f"{r.total_tok_s / hf.total_tok_s:.2f}x"] if hf else ["-"] * 5
        rows.append(row)
    title = (f"model {info.model_path} ({info.model_impl}, {info.dtype}, {info.attention_impl}, "
             f"{info.device_type}, world {info.world_size}, block {info.block_size}); "
             f"sequence {cfg.sequence_length}, decode {cfg.decode_length}, runs {cfg.runs}, warmups {cfg.warmups}")
    return title + "\n" + format_table(headers, rows)


def to_json(info: pb.InfoResponse, cfg: BenchConfig, results: list[BatchResult], threads: int | None) -> dict:
    return {
        "model_path": info.model_path, "model_impl": info.model_impl, "dtype": info.dtype,
        "device_type": info.device_type, "attention_impl": info.attention_impl,
        "world_size": info.world_size, "block_size": info.block_size,
        "sequence_length": cfg.sequence_length, "decode_length": cfg.decode_length,
        "runs": cfg.runs, "warmups": cfg.warmups, "seed": cfg.seed, "transformers_threads": threads,
        "results": [{
            "batch_size": r.batch_size, "prefill_ms": r.prefill_ms.to_dict(),
            "decode_step_ms": r.decode_step_ms.to_dict(), "prefill_tok_s": r.prefill_tok_s,
            "decode_tok_s": r.decode_tok_s, "total_tok_s": r.total_tok_s,
            "transformers": None if r.transformers is None else {
                "prefill_ms": r.transformers.prefill_ms, "decode_tok_s": r.transformers.decode_tok_s,
                "total_tok_s": r.transformers.total_tok_s,
            },
        } for r in results],
    }


@click.command()
@click.option("--uds-path", default="/tmp/text-generation-server", envvar="SHARD_UDS_PATH", show_default=True,
              help="Shard socket prefix (rank 0 listens on {uds-path}-0); ignored with --launch.")
@click.option("--launch", is_flag=True, help="Start `text-generation-server serve` on a temp socket, stop it at the end.")
@click.option("--model-id", default=None, help="Model for --launch (default: the bundled SmolLM2-135M-Instruct).")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="Weight quantization of the --launch shard (the transformers baseline stays fp32).")
@click.option("--launch-timeout", type=float, default=600.0, show_default=True, help="Seconds to wait for the shard.")
@click.option("-b", "--batch-size", "batch_sizes", type=click.IntRange(min=1), multiple=True,
              help=f"Batch size to measure; repeatable (default {', '.join(map(str, DEFAULT_BATCH_SIZES))}).")
@click.option("--sequence-length", type=click.IntRange(min=1), default=32, show_default=True, help="Prompt tokens.")
@click.option("--decode-length", type=click.IntRange(min=1), default=64, show_default=True, help="New tokens.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs per batch size.")
@click.option("--warmups", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompts.")
@click.option("--json-out", type=click.Path(dir_okay=False, writable=True), default=None, help="Also write JSON here.")
@click.option("--compare-transformers", is_flag=True, help="Also measure plain transformers generate (fp32).")
@click.option("--transformers-threads", type=click.IntRange(min=1), default=None,
              help="torch threads of the baseline (default: all cores, as the shard uses).")
def main(uds_path, launch, model_id, quantize, launch_timeout, batch_sizes, sequence_length, decode_length, runs, warmups,
         seed, json_out, compare_transformers, transformers_threads):
    """Measure prefill and decode latency / throughput of a shard over gRPC."""
    cfg = BenchConfig(tuple(batch_sizes) or DEFAULT_BATCH_SIZES, sequence_length, decode_length, runs, warmups, seed)
    if quantize and not launch:
        raise click.UsageError("--quantize applies to the shard --launch starts")
    with launch_shard(model_id, launch_timeout, quantize) if launch else contextlib.nullcontext(f"{uds_path}-0") as master:
        try:
            info, results = asyncio.run(bench_shard(master, cfg))
        except ShardError as error:
            raise click.ClickException(f"shard error: {error}") from None
    threads = None
    if compare_transformers:
        # The launched shard is gone by now; a shard given by --uds-path sits idle.
        threads = transformers_threads or os.cpu_count() or 1
        baseline = bench_transformers(info.model_path, info, cfg, threads)
        for r in results:
            r.transformers = baseline[r.batch_size]
    click.echo(render(info, cfg, results))
    if json_out:
        with open(json_out, "w") as out:
            json.dump(to_json(info, cfg, results, threads), out, indent=2)


if __name__ == "__main__":
    main()
