"""Start-up and decode step time per weight mode of a GGUF model, in process, interleaved.

    python -m benchmarks.weights_bench [--model-id FILE.gguf] [--modes fp32 int4 gguf] [--batch-sizes 1,32]

Modes: fp32 (`--dtype float32`: the dequantized file), int8 / int4 (`--quantize`: requantized
from fp32), gguf (`--quantize gguf`: the file's own blocks). Each mode is loaded as the
shard loads it (the same default resolution, `choose_quantize`) `--loads` times, alternating
modes (load s: resolve the cached conversion, build the model; not the one-time conversion); then per batch size, B sequences with `--context` cached tokens take
one decode step each (embedding to logits, paged attention), `--steps` steps per round,
alternating modes for `--rounds` rounds. Medians; ratios against the first mode.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks.decode_step import DecodeStep
from shard.config import build_config

# mode → (--dtype, --quantize) as a user would pass them
MODES = {"fp32": ("float32", None), "int8": (None, "int8"), "int4": (None, "int4"), "gguf": (None, "gguf")}


def load(model_id: str | None, mode: str, threads: int | None):
    """The model as `shard.cli._load` builds it (the same resolution: `choose_quantize`), without
    the engine around it (its KV cache would take a share of RAM per loaded mode)."""
    from shard.cli import _is_fast_path
    from shard.cpu_kernels import load_paged_attention
    from shard.distributed import TPGroup
    from shard.dtype import choose_dtype
    from shard.layers.quant import choose_quantize
    from shard.model_source import gguf_origin, resolve_model
    from shard.models import get_model
    from shard.models.base import ModelContext

    dtype, quantize = MODES[mode]
    config = build_config(model_id, revision=None, uds_path="", sharded=False, dtype=dtype, trust_remote_code=False,
                          json_output=False, log_level="warning", quantize=quantize, num_threads=threads,
                          device="cpu")
    torch.set_num_threads(config.num_threads)
    start = time.perf_counter()
    source = resolve_model(config.model_id, cache_dir=config.cache_dir, hub_cache_dir=config.hub_cache_dir,
                           offline=config.offline, progress=print)
    method = choose_quantize(config.quantize, "cpu", gguf_origin(source.path) is not None,
                             _is_fast_path(source.path)).method
    ctx = ModelContext(TPGroup(), config.device, choose_dtype(config.dtype, config.device, source.path).dtype,
                       None, quantize=method, cpu_kernel=load_paged_attention(config.cache_dir))
    model = get_model(source.path, ctx)
    return model, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", help="a .gguf file (default: the bundled SmolLM2 Q4_1)")
    parser.add_argument("--modes", nargs="+", default=["fp32", "int4", "gguf"], choices=list(MODES))
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--context", type=int, default=100, help="cached tokens per sequence")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    load_s: dict[str, list[float]] = {m: [] for m in args.modes}
    models = {}
    for _ in range(args.loads):
        for mode in args.modes:
            models.pop(mode, None)
            gc.collect()
            models[mode], seconds = load(args.model_id, mode, args.threads)
            load_s[mode].append(seconds)
    first = args.modes[0]
    print(f"{args.model_id or 'bundled SmolLM2-135M Q4_1'}, context {args.context}, {torch.get_num_threads()} threads; "
          f"medians ({args.loads} loads; {args.rounds} rounds x {args.steps} steps), ratio = {first} / mode")
    print("| | " + " | ".join(args.modes) + " |")
    print("|---" * (len(args.modes) + 1) + "|")
    loads = {m: statistics.median(v) for m, v in load_s.items()}
    print("| load s | " + " | ".join(f"{loads[m]:.2f}" for m in args.modes) + " |")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        times: dict[str, list[float]] = {m: [] for m in args.modes}
        for _ in range(args.rounds):
            for mode in args.modes:
                times[mode].append(DecodeStep(models[mode], batch, args.context).time_ms(args.steps))
        med = {m: statistics.median(v) for m, v in times.items()}
        cells = [f"{med[m]:.2f} ms ({batch * 1e3 / med[m]:.0f} tok/s, {med[first] / med[m]:.2f}x)" for m in args.modes]
        print(f"| batch {batch} step | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
