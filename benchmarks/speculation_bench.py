"""`--speculate 0` against `--speculate N`, over HTTP, in one run on this machine.

    python -m benchmarks.speculation_bench --out OUT_DIR [--speculate 4] [--rounds 2] [--max-tokens 128]

Both settings are served at once, each by its own launcher (the bundled model unless `--model-id`;
extra launcher flags after `--`), and every phase alternates between them round by round (0 then N,
then N then 0, ...), so that a change in the machine's speed during the run (these are shared VMs)
falls on both alike. The phases are greedy loads of benchmarks/loadgen.py: the input-grounded set
(rewrite / extract / code edit, where the answer copies the prompt) one request at a time, and
open-ended chat at concurrency 1, 8 and 32. Around each load it reads `tgi_request_skipped_tokens`
from /metrics: the draft tokens accepted per decode step. The table (also OUT_DIR/summary.json)
gives each phase's output tok/s in both settings (all rounds' tokens over all rounds' time), their
ratio and the accepted drafts per step. Read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.report import format_table
from benchmarks.served import Tally, default_launcher, exit_on_sigterm, metric_sums, start, stop, warm_up

# (name, prompt set, concurrency, requests per round)
PHASES = (("grounded c=1", "grounded", 1, 6), ("chat c=1", "default", 1, 6), ("chat c=8", "default", 8, 24),
          ("chat c=32", "default", 32, 64))


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    speculate: int
    output_tok_s: float
    accepted_per_step: float  # draft tokens accepted per decode step (0 without speculation)


def compare(args: argparse.Namespace, out: Path) -> tuple[list[Phase], list[Phase]]:
    processes, urls = [], []
    try:
        for speculate in (0, args.speculate):
            flags = ["--speculate", str(speculate), *(["--model-id", args.model_id] if args.model_id else []),
                     *args.launcher_args]
            process, url = start(args.launcher, flags, out / f"launcher-speculate{speculate}.log")
            processes.append(process)
            urls.append(url)
        for url in urls:
            warm_up(url)
        base, spec = [], []
        for name, prompt_set, concurrency, requests in PHASES:
            slug = name.replace(" ", "").replace("=", "")
            load = ["--max-tokens", str(args.max_tokens), "--temperature", "0", "--prompt-set", prompt_set,
                    "--concurrency", str(concurrency), "--requests", str(requests)]
            settings = [(0, Tally(urls[0]), [0.0, 0.0]), (args.speculate, Tally(urls[1]), [0.0, 0.0])]
            for index in range(args.rounds):
                for speculate, tally, drafts in settings if index % 2 == 0 else reversed(settings):
                    before = metric_sums(tally.url, "tgi_request_skipped_tokens")
                    tally.measure(load, name, out / f"speculate{speculate}-{slug}-round{index}.json")
                    after = metric_sums(tally.url, "tgi_request_skipped_tokens")
                    drafts[0] += after[0] - before[0]
                    drafts[1] += after[1] - before[1]
            (b, b_tally, _), (s, s_tally, drafts) = settings
            base.append(Phase(name, b, b_tally.tok_s, 0.0))
            spec.append(Phase(name, s, s_tally.tok_s, drafts[0] / drafts[1] if drafts[1] else 0.0))
        return base, spec
    finally:
        for process in processes:
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
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds per phase and setting, alternating between the settings")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model-id", default=None, help="default: the launcher's (the bundled SmolLM2)")
    p.add_argument("--launcher", default=default_launcher(), help="default: the one beside this Python, else on PATH")
    p.add_argument("launcher_args", nargs="*", help="extra launcher flags (after --)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, spec = compare(args, out)
    summary = {"speculate": args.speculate, "phases": [asdict(phase) for phase in base + spec]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table(base, spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
