"""Decode step time with the compiled paged-attention kernel vs torch SDPA, in process, on the
bundled model (or another fast-path --model-id), interleaved so both see the same machine.

    python -m benchmarks.attention_bench [--quantize int8] [--batch-sizes 1,8,32] [--context 200]

For each batch size: B sequences whose `--context` tokens are already cached, one decode token
each; the forward pass (embedding to logits) is timed `--steps` times per round, alternating the
two backends for `--rounds` rounds; the table shows medians. Both backends read the same cache and
metadata built for their layout, so the difference is attention alone.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.decode_step import DecodeStep
from shard.attention import SdpaBackend
from shard.config import build_config


def _load(model_id: str | None, quantize: str | None, threads: int | None):
    from shard.cli import _load as load_engine

    config = build_config(model_id, revision=None, uds_path="", sharded=False, dtype=None, trust_remote_code=False,
                          json_output=False, log_level="warning", quantize=quantize, num_threads=threads)
    return load_engine(config).model


def _time_steps(model, backend, batch: int, context: int, steps: int) -> float:
    model.layers[0].self_attn.shared.backend = backend  # one object every layer attends through
    return DecodeStep(model, batch, context, backend.layout).time_ms(steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id")
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--context", type=int, default=200, help="cached tokens per sequence")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    model = _load(args.model_id, args.quantize, args.threads)
    if model.backend.layout != "paged":
        print("the paged kernel did not build here (see the log); nothing to compare")
        return 1
    backends = {"paged": model.backend, "sdpa": SdpaBackend(model.backend.scale)}
    print(f"{args.model_id or 'bundled SmolLM2-135M'}, {args.quantize or 'fp32'} weights, context {args.context}, "
          f"{torch.get_num_threads()} threads; decode forward ms, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'batch':>5} | {'sdpa':>8} | {'paged':>8} | speed-up")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        times: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(args.rounds):
            for name, backend in backends.items():
                times[name].append(_time_steps(model, backend, batch, args.context, args.steps))
        sdpa, paged = (statistics.median(times[n]) for n in ("sdpa", "paged"))
        print(f"{batch:>5} | {sdpa:8.2f} | {paged:8.2f} | {sdpa / paged:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
