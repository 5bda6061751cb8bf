"""The table of `benchmarks/compare_servers.sh OUT_DIR`: one column per server, medians over runs,
and each pytgi column's ratio to llama-server measured in the same run.

    python -m benchmarks.compare_report OUT_DIR [--baseline llama-server]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROWS = (
    ("1 stream, decode tok/s", "c1", "output_tok_s"),
    ("1 stream, ITL p50 ms", "c1", "itl_p50"),
    ("8 concurrent, aggregate tok/s", "c8", "output_tok_s"),
    ("32 concurrent, aggregate tok/s", "c32", "output_tok_s"),
    ("32 concurrent, TTFT p50 ms", "c32", "ttft_p50"),
)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _metric(summary: dict, key: str) -> float:
    if key == "itl_p50":
        return summary["itl_ms"]["p50"]
    if key == "ttft_p50":
        return summary["ttft_ms"]["p50"]
    return summary[key]


def server_numbers(out: Path, name: str) -> dict[str, float]:
    numbers: dict[str, float] = {}
    for label, phase, key in ROWS:
        runs = [_metric(_load(p), key) for p in sorted(out.glob(f"{name}-{phase}-r*.json"))]
        if runs:
            numbers[label] = statistics.median(runs)
    if (prefill := out / f"{name}-prefill.json").exists():
        rows = _load(prefill)["per_request"]
        numbers["prefill tok/s, 512-token prompt"] = statistics.median(r[2] / (r[0] / 1e3) for r in rows if r[2])
    if (prefix := out / f"{name}-prefix.json").exists():
        ttfts = [r[0] for r in _load(prefix)["per_request"]]
        numbers["1k shared prefix: first TTFT ms"] = ttfts[0]
        numbers["1k shared prefix: next TTFT ms (median)"] = statistics.median(ttfts[1:])
    return numbers


def render(out: Path, baseline: str) -> str:
    names = sorted({p.name.split("-c1-")[0] for p in out.glob("*-c1-r*.json")}, key=lambda n: (n != baseline, n))
    table = {n: server_numbers(out, n) for n in names}
    labels = [label for label, _, _ in ROWS] + [
        "prefill tok/s, 512-token prompt", "1k shared prefix: first TTFT ms", "1k shared prefix: next TTFT ms (median)"]
    header = ["workload", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        base = table.get(baseline, {}).get(label)
        cells = []
        for name in names:
            value = table[name].get(label)
            if value is None:
                cells.append("")
                continue
            cell = f"{value:,.1f}"
            if name != baseline and base:
                ratio = base / value if any(label.endswith(s) for s in ("ms", "ms (median)")) else value / base
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nRatios: against {baseline} in the same run; for latencies, baseline / value (> 1 = faster)."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--baseline", default="llama-server")
    args = parser.parse_args(argv)
    print(render(args.out_dir, args.baseline))


if __name__ == "__main__":
    main()
