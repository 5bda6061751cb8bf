"""Real PEFT LoRA adapters for a base model folder (tests, integration tests, benchmarks), and the
in-process LoRA decode-step benchmark.

    python -m benchmarks.lora_adapters [--batch-sizes 8,32] [--rank 8] [--steps 4] [--rounds 15]

The benchmark loads the bundled SmolLM2 (fp32, as the shard serves it) twice, without adapters
and with 8 rank-r adapters on all seven projections, then times decode steps (B sequences of
`--context` cached tokens, one token each) with no adapter row, and with 2 and 8 distinct adapters
spread over the rows (as many rows each, in a shuffled order). Rounds alternate the cases; medians (a shared
2-core VM varies 10-20 % from minute to minute: many short rounds, interleaved). Run it as the
shard runs, without OMP_WAIT_POLICY=PASSIVE (the tests' setting), which makes every small
operator wake sleeping threads.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from shard.lora import TARGETS

ALL_TARGETS = tuple(TARGETS)  # every projection pytgi applies LoRA to
# ||scale * B A||_F as a share of ||W||_F for every adapted projection. On the bundled SmolLM2,
# 0.1: greedy answers leave the base model's within 0-4 tokens and stay fluent English (the base
# model's own NLL of them 0.3-1.6 nats/token, its answers' 0.4-1.2); 0.3: gibberish (3-6.6).
# tests/shard/test_lora.py checks both.
RELATIVE_NORM = 0.1


def bundled_model_folder() -> Path:
    """The bundled SmolLM2's safetensors folder (its GGUF converted once to fp32, as the shard
    and the transformers references in the tests load it)."""
    from shard.config import default_cache_dir
    from shard.model_source import resolve_model

    return resolve_model(None, cache_dir=default_cache_dir(), offline=True, progress=lambda _: None).path


def make_adapter(base_folder: Path, out_dir: Path, *, r: int, targets: tuple[str, ...], seed: int,
                 alpha: int | None = None, rslora: bool = False, strength: float = RELATIVE_NORM) -> Path:
    """A PEFT LoRA adapter of rank `r` on `targets` for the model in `base_folder`, saved with
    `save_pretrained` (adapter_config.json + adapter_model.safetensors) into `out_dir`.

    PEFT initialises B to zero (the adapter starts as the base model); here A and B are random,
    drawn from `seed`, and B is scaled so that each projection's update scale * B A has
    `strength` times its base weight's Frobenius norm (default RELATIVE_NORM: a visible change
    that keeps text sane). `alpha` defaults to `r` (scale 1; with `rslora`, sqrt(r))."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=r if alpha is None else alpha, target_modules=list(targets),
                        use_rslora=rslora, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=generator) / math.sqrt(a.shape[1]))
            direction = torch.randn(b.shape, generator=generator)
            delta = module.scaling["default"] * (direction @ a)
            b.copy_(direction * (strength * module.get_base_layer().weight.norm() / delta.norm()))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _load(folder: Path, adapters):
    """The model as the shard serves it on a CPU (paged kernel, fused ops), with `adapters`."""
    import torch

    from shard.config import default_cache_dir
    from shard.cpu_kernels import load_fused_ops, load_paged_attention
    from shard.distributed import TPGroup
    from shard.models import get_model
    from shard.models.base import ModelContext

    cache = default_cache_dir()
    ctx = ModelContext(TPGroup(), torch.device("cpu"), torch.float32, None, cpu_kernel=load_paged_attention(cache),
                       fused_ops=load_fused_ops(cache), lora_adapters=tuple(adapters))
    return get_model(folder, ctx)


class _Step:
    """One decode step of `batch` sequences, `context` cached tokens each, rows spread over
    `num_adapters` adapters (0: no LoRA step)."""

    def __init__(self, model, batch: int, context: int, num_adapters: int):
        import torch

        from shard.attention import SeqStep, build_metadata
        from shard.kv_cache import KVCache
        from shard.layers.lora import LoraStep

        spec = model.info.kv_spec
        blocks = -(-context // spec.block_size)
        self.cache = KVCache(spec, 1 + batch * blocks, torch.device("cpu"))
        seqs = [SeqStep(1, context, list(range(1 + i * blocks, 1 + (i + 1) * blocks))) for i in range(batch)]
        self.meta = build_metadata(seqs, spec.block_size, torch.device("cpu"), model.backend.layout)
        self.ids = torch.randint(0, 1000, (batch,))
        self.positions = torch.full((batch,), context - 1)
        slots = [i % num_adapters for i in range(batch)] if num_adapters else []
        random.Random(0).shuffle(slots)  # rows in slot order would spare the gather: not a real batch
        spans = [(slot, row, 1) for row, slot in enumerate(slots)]
        self.lora = LoraStep.build(spans, batch, torch.device("cpu"))
        self.model = model

    def time_ms(self, steps: int) -> float:
        run = lambda: self.model.forward(self.ids, self.positions, self.cache, self.meta, None, lora=self.lora)  # noqa: E731
        run()
        start = time.perf_counter()
        for _ in range(steps):
            run()
        return (time.perf_counter() - start) / steps * 1e3


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def main(argv: list[str] | None = None) -> int:
    import torch

    from shard.lora import read_adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", default="0,2,8", help="distinct adapters over the rows, per case")
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.adapters.split(",")]
    folder = bundled_model_folder()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [read_adapter(f"a{i}", make_adapter(folder, Path(tmp) / f"a{i}", r=args.rank, targets=ALL_TARGETS,
                                                        seed=i))
                    for i in range(max(counts))]
    base, served = _load(folder, []), _load(folder, adapters)
    print(f"{_cpu_name()}; bundled SmolLM2-135M fp32, {len(adapters)} adapters loaded (r={args.rank}, all 7 projections), context "
          f"{args.context}, {torch.get_num_threads()} threads; median ms per decode step ({args.rounds} rounds x "
          f"{args.steps} steps); ratio = no-adapter model / case")
    cases = [("no adapters loaded", base, 0)] + [(f"{n} adapters", served, n) for n in counts]
    print("| batch | " + " | ".join(name for name, _, _ in cases) + " |")
    print("|---" * (len(cases) + 1) + "|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        steps = [_Step(model, batch, args.context, n) for _, model, n in cases]
        times: list[list[float]] = [[] for _ in cases]
        for _ in range(args.rounds):
            for i, step in enumerate(steps):
                times[i].append(step.time_ms(args.steps))
        med = [statistics.median(t) for t in times]
        print(f"| {batch} | " + " | ".join(f"{m:.1f} ({med[0] / m:.2f}x)" for m in med) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
