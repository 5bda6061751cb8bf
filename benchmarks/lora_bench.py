"""LoRA adapters over HTTP, in one run on this machine: what serving adapters costs.

    python -m benchmarks.lora_bench --out OUT_DIR [--adapters 8] [--rank 8] [--rounds 2] [--max-tokens 64]

Builds `--adapters` real PEFT adapters for the bundled model (benchmarks/lora_adapters.py: rank
`--rank` on all seven projections), then serves the model twice at once: without adapters, and
with all of them loaded (`--lora-adapters`). At concurrency 8 and 32 (open-ended chat, greedy,
`--max-tokens` tokens per request) it measures, rounds alternating between the cases so that a
change in the machine's speed falls on all of them alike:
- `base`: the server without adapters;
- `loaded, unused`: the server with adapters, every request on the base model (the cost of the
  LoRA path when no request uses it);
- `2 adapters` / `N adapters`: requests spread over 2 / all adapters in turn (the OpenAI `model`).
The table (also OUT_DIR/summary.json) gives each case's output tok/s and its ratio to `base`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.lora_adapters import ALL_TARGETS, bundled_model_folder, make_adapter
from benchmarks.report import format_table
from benchmarks.served import Tally, default_launcher, exit_on_sigterm, start, stop, warm_up

CONCURRENCY = ((8, 24), (32, 64))  # (streams, requests per round)


def cases(adapters: list[str]) -> list[tuple[str, int, str]]:
    """(name, server index, `model` values in turn)."""
    return [("base", 0, "tgi"), ("loaded, unused", 1, "tgi"), ("2 adapters", 1, ",".join(adapters[:2])),
            (f"{len(adapters)} adapters", 1, ",".join(adapters))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_folder = bundled_model_folder()
    names = [f"lora{i}" for i in range(args.adapters)]
    specs = ",".join(f"{name}={make_adapter(base_folder, out / 'adapters' / name, r=args.rank, targets=ALL_TARGETS, seed=i)}"
                     for i, name in enumerate(names))
    processes, urls = [], []
    try:
        for label, flags in (("base", []), ("lora", ["--lora-adapters", specs])):
            process, url = start(args.launcher, [*flags, *args.launcher_args], out / f"launcher-{label}.log")
            processes.append(process)
            urls.append(url)
        for url in urls:
            warm_up(url)
        rows, summary = [], []
        for concurrency, requests in CONCURRENCY:
            tallies = [(name, Tally(urls[server]), models) for name, server, models in cases(names)]
            for index in range(args.rounds):
                for name, tally, models in tallies if index % 2 == 0 else reversed(tallies):
                    # --ignore-eos: every case generates the same number of tokens per request,
                    # whatever its adapters make of the prompts.
                    load = ["--max-tokens", str(args.max_tokens), "--ignore-eos", "--temperature", "0", "--model", models,
                            "--concurrency", str(concurrency), "--requests", str(requests)]
                    slug = name.replace(" ", "").replace(",", "")
                    tally.measure(load, f"{name} c={concurrency}", out / f"c{concurrency}-{slug}-round{index}.json")
            base = tallies[0][1].tok_s
            for name, tally, _ in tallies:
                rows.append([f"c={concurrency}", name, tally.tok_s, tally.tok_s / base])
                summary.append({"concurrency": concurrency, "case": name, "output_tok_s": tally.tok_s})
    finally:
        for process in processes:
            stop(process)
    (out / "summary.json").write_text(json.dumps({"adapters": args.adapters, "rank": args.rank, "cases": summary},
                                                 indent=1))
    print(format_table(["streams", "case", "tok/s", "ratio to base"], rows, digits=2))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the adapters, loadgen JSON, launcher logs, summary.json")
    p.add_argument("--adapters", type=int, default=8, help="adapters built and loaded (at least 2)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="rounds per case, alternating between the cases")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--launcher", default=default_launcher(), help="default: the one beside this Python, else on PATH")
    p.add_argument("launcher_args", nargs="*", help="extra launcher flags for both servers (after --)")
    args = p.parse_args(argv)
    if args.adapters < 2:
        p.error("--adapters must be at least 2")
    return args


if __name__ == "__main__":
    sys.exit(main())
