"""What one decode step is made of, and what the fused CPU kernels (shard/csrc/fused_ops.cpp) save.

    python -m benchmarks.op_bench profile [--quantize int8|int4|gguf] [--batch-sizes 1,32]
    python -m benchmarks.op_bench step    [--quantize int8|int4|gguf] [--batch-sizes 1,32]
    python -m benchmarks.op_bench kernels [--rows 1,32]

* `profile`: torch.profiler over `--steps` decode steps of the bundled model (or --model-id), with
  and without the fused kernels: torch ops per step and the top ops by self CPU time.
* `step`: decode forward time with and without the fused kernels, alternating for `--rounds`
  rounds in one process; medians and the ratio.
* `kernels`: each fused kernel and its torch reference against the bytes it must move, next to a
  memcpy of the same bytes measured in the same run (the bandwidth limit at that size).

Every decode step reads B sequences of `--context` cached tokens and computes one token each
(the cache holds zeros: attention's cost is its reads, not the values).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.decode_step import DecodeStep
from shard.config import build_config


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _load(model_id: str | None, quantize: str | None, threads: int | None):
    from shard.cli import _load as load_engine

    # No --quantize: fp32 explicitly, the fidelity mode (not whatever the default becomes).
    config = build_config(model_id, revision=None, uds_path="", sharded=False,
                          dtype=None if quantize else "float32", trust_remote_code=False,
                          json_output=False, log_level="warning", quantize=quantize, num_threads=threads)
    return load_engine(config).model


def _variants(model) -> dict[str, object]:
    """The two ways to run the model: torch ops only, and the fused kernels (when they built)."""
    kernels = model.shared.kernels
    variants = {"torch ops": None}
    if kernels is not None:
        variants["fused"] = kernels
    return variants


class _Recorded:
    """The fused kernels, each call wrapped in a profiler range: they are pybind calls, not
    dispatcher ops, so the profiler would not see them (only this benchmark wraps them)."""

    def __init__(self, kernels):
        self._kernels = kernels

    def __getattr__(self, name):
        fn = getattr(self._kernels, name)
        if not callable(fn):
            return fn

        def recorded(*args):
            with torch.profiler.record_function(f"fused::{name}"):
                return fn(*args)

        return recorded


def profile(model, batch: int, context: int, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = DecodeStep(model, batch, context)
    original = model.shared.kernels
    for name, kernels in _variants(model).items():
        model.shared.kernels = None if kernels is None else _Recorded(kernels)
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        events = prof.key_averages()
        # Every dispatcher call counts, nested ones included (aten::linear -> t, matmul -> mm):
        # each pays the dispatch overhead the fused kernels avoid.
        calls = sum(e.count for e in events) / steps
        total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
        print(f"\n### batch {batch}, {name}: {calls:.0f} op calls per step, {total:.2f} ms self CPU per step (profiled)")
        print("| op | calls/step | self CPU ms/step | % |\n|---|---|---|---|")
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
            ms = e.self_cpu_time_total / steps / 1e3
            print(f"| {e.key} | {e.count / steps:.0f} | {ms:.3f} | {100 * ms / total:.1f} |")
    model.shared.kernels = original


def step_times(model, batch: int, context: int, steps: int, rounds: int) -> None:
    step = DecodeStep(model, batch, context)
    variants = _variants(model)
    original = model.shared.kernels
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, kernels in variants.items():
            model.shared.kernels = kernels
            times[name].append(step.time_ms(steps))
    model.shared.kernels = original
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["torch ops"]
    fused = medians.get("fused", float("nan"))
    print(f"| {batch} | {base:.2f} | {fused:.2f} | {base / fused:.2f}x |")


def _median_us(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def kernel_rows(rows_list: list[int], hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                repeats: int) -> None:
    from shard import cpu_kernels
    from shard.config import default_cache_dir
    from shard.layers.activation import gated
    from shard.layers.norm import RMSNorm
    from shard.layers.rotary import apply_rotary

    kernels = cpu_kernels.load_fused_ops(default_cache_dir())
    if kernels is None:
        print("the fused kernels did not build here (see the log)")
        return
    silu = gated("silu")
    print("| kernel | rows | bytes moved | torch ops µs | fused µs | speed-up | fused GB/s | memcpy GB/s (same bytes) |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in rows_list:
        x = torch.randn(rows, hidden)
        residual = torch.randn(rows, hidden)
        norm = RMSNorm(torch.rand(hidden) + 0.5, 1e-5)
        gate_up = torch.randn(rows, 2 * intermediate)
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim)
        q = qkv[:, : heads * head_dim].view(rows, heads, head_dim)
        k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
        angles = torch.rand(rows, 1, head_dim // 2)
        # a true rotation: the fused call rotates in place, repeatedly, and must not decay to denormals
        cos, sin = angles.cos(), angles.sin()
        # bytes each kernel must read + write at least once (fp32)
        cases = {
            "add+rmsnorm": (4 * rows * hidden * 4 + hidden * 4,  # x, residual read; residual, out written
                            lambda: norm(x, residual.clone()), lambda: norm(x, residual, kernels)),
            "silu*up": (4 * rows * 3 * intermediate, lambda: silu(gate_up), lambda: silu(gate_up, kernels)),
            "rotary q,k": (4 * 2 * rows * (heads + kv_heads) * head_dim + 4 * 2 * rows * head_dim,
                           lambda: apply_rotary(q, k, cos, sin), lambda: apply_rotary(q, k, cos, sin, kernels)),
        }
        for name, (nbytes, reference, fused) in cases.items():
            # copying half the bytes moves them all: each is read once and written once
            src = torch.ones(nbytes // 2, dtype=torch.uint8)
            dst = torch.empty_like(src)
            copy_us = _median_us(lambda: dst.copy_(src), repeats)
            ref_us = _median_us(reference, repeats)
            fused_us = _median_us(fused, repeats)
            print(f"| {name} | {rows} | {nbytes / 1e3:.1f} kB | {ref_us:.1f} | {fused_us:.1f} | {ref_us / fused_us:.1f}x | "
                  f"{nbytes / fused_us / 1e3:.1f} | {nbytes / copy_us / 1e3:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["profile", "step", "kernels"])
    parser.add_argument("--model-id")
    parser.add_argument("--quantize", choices=["int8", "int4", "gguf"], help="default: fp32 weights")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--context", type=int, default=200, help="cached tokens per sequence")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rows", default="1,32,512", help="kernels: rows (tokens) per call")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads() if args.threads is None else args.threads} threads, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    if args.what == "kernels":
        if args.threads:
            torch.set_num_threads(args.threads)
        # SmolLM2-135M's shapes
        kernel_rows([int(r) for r in args.rows.split(",")], 576, 1536, 9, 3, 64, repeats=200)
        return 0
    model = _load(args.model_id, args.quantize, args.threads)
    label = f"{args.model_id or 'bundled SmolLM2-135M'}, {args.quantize or 'fp32'} weights, context {args.context}"
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.what == "profile":
        print(f"{label}; {args.steps} decode steps profiled")
        for batch in batches:
            profile(model, batch, args.context, args.steps, args.top)
    else:
        print(f"{label}; decode forward ms, median of {args.rounds} rounds x {args.steps} steps, alternating")
        print("| batch | torch ops | fused | speed-up |\n|---|---|---|---|")
        for batch in batches:
            step_times(model, batch, args.context, args.steps, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
